//! Encryption at rest: AES-256-GCM in the STREAM construction (BE32), in chunks of
//! [`CHUNK`] plaintext bytes, so files are encrypted and decrypted while streaming and a
//! byte range is served by decrypting only the chunks it touches.
//!
//! Object layout: a 16-byte header (`PLSENC1\0`, a random 7-byte nonce prefix, one
//! reserved byte), then one sealed chunk per [`CHUNK`] plaintext bytes, each followed by
//! its 16-byte tag. The last chunk carries STREAM's last-block flag (it may be empty),
//! so a truncated object fails to decrypt instead of reading short. The associated data
//! of every chunk is the object's storage key, so objects cannot be swapped.
//!
//! Key rotation: `storage.encryption_key` encrypts new objects; every key, current and
//! in `storage.encryption_previous_keys`, is known by its id (the first 16 hex digits of
//! the SHA-256 of the key), which each blob row records. To rotate, put the new key in
//! `storage.encryption_key`, move the old one to `storage.encryption_previous_keys`, and
//! restart: new uploads use the new key, older objects stay readable. An old key may be
//! dropped once no row of `pulse.file_blobs` names its id any more (re-upload or delete
//! those files first). This module must never log or return key material.

use aes_gcm::aead::stream::{NewStream, StreamBE32, StreamPrimitive};
use aes_gcm::{Aes256Gcm, KeyInit};
use sha2::{Digest, Sha256};

/// Plaintext bytes per chunk.
pub const CHUNK: usize = 64 * 1024;
/// Tag bytes per chunk.
pub const TAG: usize = 16;
/// Header bytes.
pub const HEADER: usize = 16;
const MAGIC: &[u8; 8] = b"PLSENC1\0";

/// The keys in force: one to write with, all to read with.
#[derive(Clone, Default)]
pub struct Keyring {
    current: Option<(String, [u8; 32])>,
    all: Vec<(String, [u8; 32])>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current.as_ref().map(|(id, _)| id))
            .field("ids", &self.all.iter().map(|(id, _)| id).collect::<Vec<_>>())
            .finish()
    }
}

/// The id a key is known by in the database: never the key itself.
pub fn key_id(key: &[u8; 32]) -> String {
    hex::encode(&Sha256::digest(key)[..8])
}

impl Keyring {
    /// A keyring from the configuration.
    pub fn new(current: Option<[u8; 32]>, previous: &[[u8; 32]]) -> Keyring {
        let current = current.map(|k| (key_id(&k), k));
        let mut all: Vec<_> = current.iter().cloned().collect();
        all.extend(previous.iter().map(|k| (key_id(k), *k)));
        Keyring { current, all }
    }

    /// The id of the key new objects are written with, if encryption is on.
    pub fn current_id(&self) -> Option<&str> {
        self.current.as_ref().map(|(id, _)| id.as_str())
    }

    /// An encryptor with the current key, if encryption is on.
    pub fn encryptor(&self, aad: &str) -> Option<Encryptor> {
        let (_, key) = self.current.as_ref()?;
        let mut prefix = [0u8; 7];
        rand::fill(&mut prefix);
        Some(Encryptor {
            stream: stream(key, &prefix),
            prefix,
            position: 0,
            pending: Vec::with_capacity(CHUNK + TAG),
            aad: aad.as_bytes().to_vec(),
            header_done: false,
        })
    }

    /// A decryptor for an object written with key `id`.
    pub fn decryptor(&self, id: &str, header: &[u8], aad: &str) -> Result<Decryptor, CryptoError> {
        let (_, key) = self
            .all
            .iter()
            .find(|(k, _)| k == id)
            .ok_or_else(|| CryptoError::UnknownKey(id.to_string()))?;
        if header.len() != HEADER || &header[..8] != MAGIC {
            return Err(CryptoError::Corrupt);
        }
        let prefix: [u8; 7] = header[8..15].try_into().expect("7 bytes");
        Ok(Decryptor {
            stream: stream(key, &prefix),
            aad: aad.as_bytes().to_vec(),
        })
    }
}

fn stream(key: &[u8; 32], prefix: &[u8; 7]) -> StreamBE32<Aes256Gcm> {
    let aead = Aes256Gcm::new(key.into());
    StreamBE32::from_aead(aead, prefix.into())
}

/// Why decryption failed.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The object names a key that is not configured.
    #[error(
        "the file was encrypted with key id {0}, which is not configured; add that key to storage.encryption_previous_keys"
    )]
    UnknownKey(String),
    /// A tag did not verify, or the header is wrong.
    #[error("the stored file is corrupt or was tampered with (authentication failed)")]
    Corrupt,
}

/// Encrypts a plaintext stream chunk by chunk.
pub struct Encryptor {
    stream: StreamBE32<Aes256Gcm>,
    prefix: [u8; 7],
    position: u32,
    pending: Vec<u8>,
    aad: Vec<u8>,
    header_done: bool,
}

impl Encryptor {
    fn header(&mut self, out: &mut Vec<u8>) {
        if !self.header_done {
            out.extend_from_slice(MAGIC);
            out.extend_from_slice(&self.prefix);
            out.push(0);
            self.header_done = true;
        }
    }

    /// Takes plaintext; appends every completed sealed chunk to `out`.
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<u8>) {
        self.header(out);
        while !data.is_empty() {
            // A full chunk is sealed only once more data follows, because the final
            // chunk must carry the last-block flag and may be the full one.
            if self.pending.len() == CHUNK {
                self.seal(false, out);
            }
            let take = (CHUNK - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
    }

    fn seal(&mut self, last: bool, out: &mut Vec<u8>) {
        self.stream
            .encrypt_in_place(self.position, last, &self.aad, &mut self.pending)
            .expect("AES-GCM encryption of a bounded chunk cannot fail");
        out.extend_from_slice(&self.pending);
        self.pending.clear();
        self.position += 1;
    }

    /// Seals what is left, as the last chunk.
    pub fn finish(mut self, out: &mut Vec<u8>) {
        self.header(out);
        if self.pending.len() == CHUNK {
            // The data ended exactly on a chunk boundary: seal it, then an empty last one.
            self.seal(false, out);
        }
        self.seal(true, out);
    }
}

/// The number of chunks of a plaintext of `size` bytes (the last may be empty).
pub fn chunks(size: u64) -> u64 {
    size / CHUNK as u64 + 1
}

/// The stored size of a plaintext of `size` bytes.
pub fn sealed_size(size: u64) -> u64 {
    HEADER as u64 + size + TAG as u64 * chunks(size)
}

/// Decrypts chunks of one object, at any position.
pub struct Decryptor {
    stream: StreamBE32<Aes256Gcm>,
    aad: Vec<u8>,
}

impl Decryptor {
    /// Opens sealed chunk number `index` (of an object of `size` plaintext bytes) in place.
    pub fn open(&self, index: u64, size: u64, sealed: &mut Vec<u8>) -> Result<(), CryptoError> {
        let last = index + 1 == chunks(size);
        let position = u32::try_from(index).map_err(|_| CryptoError::Corrupt)?;
        self.stream
            .decrypt_in_place(position, last, &self.aad, sealed)
            .map_err(|_| CryptoError::Corrupt)
    }
}

/// The stored byte range holding the plaintext range `start..end` of an object of `size`
/// bytes, and the index of its first chunk.
pub fn sealed_range(start: u64, end: u64, size: u64) -> (std::ops::Range<u64>, u64) {
    let c = CHUNK as u64;
    let first = start / c;
    // The chunk holding the last byte wanted; an empty range still reads one chunk.
    let last = if end > start { (end - 1) / c } else { first };
    let last = last.min(chunks(size) - 1);
    let sealed = c + TAG as u64;
    let from = HEADER as u64 + first * sealed;
    let to = (HEADER as u64 + (last + 1) * sealed).min(sealed_size(size));
    (from..to, first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(size: usize, pieces: usize) {
        let ring = Keyring::new(Some([7u8; 32]), &[]);
        let plain: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let mut enc = ring.encryptor("t/abc").unwrap();
        let mut out = Vec::new();
        for part in plain.chunks(pieces.max(1)) {
            enc.push(part, &mut out);
        }
        enc.finish(&mut out);
        assert_eq!(out.len() as u64, sealed_size(size as u64), "size {size}");
        let dec = ring
            .decryptor(ring.current_id().unwrap(), &out[..HEADER], "t/abc")
            .unwrap();
        // Every range decrypts to the same bytes.
        for (s, e) in [
            (0, size),
            (size / 3, size),
            (0, size / 2),
            (size.saturating_sub(1), size),
        ] {
            if s >= e {
                continue;
            }
            let (r, first) = sealed_range(s as u64, e as u64, size as u64);
            let mut got = Vec::new();
            for (i, c) in out[r.start as usize..r.end as usize]
                .chunks(CHUNK + TAG)
                .enumerate()
            {
                let mut buf = c.to_vec();
                dec.open(first + i as u64, size as u64, &mut buf).unwrap();
                got.extend_from_slice(&buf);
            }
            let skip = s - (first as usize * CHUNK);
            assert_eq!(
                &got[skip..skip + (e - s)],
                &plain[s..e],
                "size {size} range {s}..{e}"
            );
        }
    }

    #[test]
    fn round_trips_at_every_boundary() {
        for size in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17] {
            round_trip(size, 1000);
            round_trip(size, CHUNK);
        }
    }

    #[test]
    fn tampering_and_truncation_are_detected() {
        let ring = Keyring::new(Some([9u8; 32]), &[]);
        let mut enc = ring.encryptor("k").unwrap();
        let mut out = Vec::new();
        enc.push(&vec![1u8; 2 * CHUNK], &mut out);
        enc.finish(&mut out);
        let dec = ring
            .decryptor(ring.current_id().unwrap(), &out[..HEADER], "k")
            .unwrap();
        let mut chunk = out[HEADER..HEADER + CHUNK + TAG].to_vec();
        chunk[5] ^= 1;
        assert!(dec.open(0, 2 * CHUNK as u64, &mut chunk).is_err());
        // Claiming a full chunk is the last one fails: truncation is caught.
        let mut chunk = out[HEADER..HEADER + CHUNK + TAG].to_vec();
        assert!(dec.open(0, CHUNK as u64 - 1, &mut chunk).is_err());
        // Another object's key as associated data fails.
        let other = ring
            .decryptor(ring.current_id().unwrap(), &out[..HEADER], "x")
            .unwrap();
        let mut chunk = out[HEADER..HEADER + CHUNK + TAG].to_vec();
        assert!(other.open(0, 2 * CHUNK as u64, &mut chunk).is_err());
    }

    #[test]
    fn previous_keys_still_read_and_unknown_ones_say_so() {
        let old = [1u8; 32];
        let new = [2u8; 32];
        let before = Keyring::new(Some(old), &[]);
        let mut enc = before.encryptor("k").unwrap();
        let mut out = Vec::new();
        enc.push(b"hello", &mut out);
        enc.finish(&mut out);
        let after = Keyring::new(Some(new), &[old]);
        let dec = after.decryptor(&key_id(&old), &out[..HEADER], "k").unwrap();
        let mut buf = out[HEADER..].to_vec();
        dec.open(0, 5, &mut buf).unwrap();
        assert_eq!(buf, b"hello");
        let dropped = Keyring::new(Some(new), &[]);
        assert!(matches!(
            dropped.decryptor(&key_id(&old), &out[..HEADER], "k"),
            Err(CryptoError::UnknownKey(_))
        ));
    }
}
