//! What uploaded bytes really are, and what a file may be called.
//!
//! The declared content type of an upload must be on the allow-list, and the first bytes
//! must agree with it: a PNG declared as a PDF, or an executable declared as an image, is
//! refused. File names are reduced to a safe final component before they are stored, and
//! quoted safely again when served.

/// How many leading bytes the sniffer looks at.
pub const SNIFF_LEN: usize = 512;

/// The content type the first bytes prove, if they are a recognised binary format.
pub fn magic_type(head: &[u8]) -> Option<&'static str> {
    const SIGNATURES: &[(&[u8], &str)] = &[
        (b"\x89PNG\r\n\x1a\n", "image/png"),
        (b"\xff\xd8\xff", "image/jpeg"),
        (b"GIF87a", "image/gif"),
        (b"GIF89a", "image/gif"),
        (b"%PDF-", "application/pdf"),
        (b"PK\x03\x04", "application/zip"),
        (b"PK\x05\x06", "application/zip"),
        (b"\x1f\x8b", "application/gzip"),
        (b"\x7fELF", "application/x-executable"),
        (b"MZ", "application/x-msdownload"),
    ];
    if head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WEBP" {
        return Some("image/webp");
    }
    SIGNATURES
        .iter()
        .find(|(sig, _)| head.starts_with(sig))
        .map(|(_, t)| *t)
}

/// Whether the leading bytes look like text: no NUL, valid UTF-8 (allowing a code point
/// cut at the end of the sample).
fn looks_like_text(head: &[u8]) -> bool {
    if head.contains(&0) {
        return false;
    }
    match std::str::from_utf8(head) {
        Ok(_) => true,
        Err(e) => e.error_len().is_none(),
    }
}

/// Checks that `head` (the first [`SNIFF_LEN`] bytes, or the whole file when shorter)
/// may be stored as `declared`. Returns the reason when not.
pub fn check(declared: &str, head: &[u8]) -> Result<(), String> {
    let magic = magic_type(head);
    let ok = match declared {
        "image/png" | "image/jpeg" | "image/gif" | "image/webp" | "application/pdf" | "application/zip"
        | "application/gzip" => magic == Some(declared),
        t if t.starts_with("text/") || t == "application/json" => magic.is_none() && looks_like_text(head),
        // Opaque bytes: anything but a format we know to be dangerous to serve.
        "application/octet-stream" => !matches!(
            magic,
            Some("application/x-executable" | "application/x-msdownload")
        ),
        // Any other allowed type: at least not a recognisably different format.
        _ => magic.is_none(),
    };
    if ok {
        Ok(())
    } else {
        Err(match magic {
            Some(m) => format!("the content is {m}, not the declared {declared}"),
            None => format!("the content does not look like {declared}"),
        })
    }
}

/// Normalises a declared content type: lower case, parameters dropped.
pub fn normalise_type(declared: &str) -> String {
    declared
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The longest stored name, in bytes.
pub const MAX_NAME_BYTES: usize = 200;

/// Reduces a client-given name to a safe final component: no directories (`/`, `\`), no
/// control characters (NUL included), no leading dots, at most [`MAX_NAME_BYTES`] bytes
/// (cut on a character boundary, keeping a short extension), never empty.
pub fn safe_name(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or("");
    let cleaned: String = last
        .chars()
        .filter(|c| !c.is_control() && !matches!(c, '"' | '\u{202e}' | '\u{202d}' | '\u{2066}'..='\u{2069}'))
        .collect();
    let trimmed = cleaned.trim().trim_start_matches('.').trim();
    if trimmed.is_empty() {
        return "file".to_string();
    }
    if trimmed.len() <= MAX_NAME_BYTES {
        return trimmed.to_string();
    }
    let (stem, ext) = match trimmed.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() && e.len() <= 10 => (s, Some(e)),
        _ => (trimmed, None),
    };
    let room = MAX_NAME_BYTES - ext.map_or(0, |e| e.len() + 1);
    let mut cut = room.min(stem.len());
    while !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    match ext {
        Some(e) => format!("{}.{e}", &stem[..cut]),
        None => stem[..cut].to_string(),
    }
}

/// A `Content-Disposition` value for a stored (already safe) name: an ASCII fallback in
/// `filename` and the exact name in `filename*` (RFC 6266 / RFC 8187).
pub fn content_disposition(inline: bool, name: &str) -> String {
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && !matches!(c, '"' | '\\' | '%' | ';') || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut encoded = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    let kind = if inline { "inline" } else { "attachment" };
    format!("{kind}; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

/// Whether a type is shown in the browser rather than downloaded. Only formats that
/// cannot run script (no HTML, no SVG).
pub fn shown_inline(content_type: &str) -> bool {
    matches!(
        content_type,
        "image/png" | "image/jpeg" | "image/gif" | "image/webp" | "application/pdf" | "text/plain"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing_agrees_or_explains() {
        assert!(check("image/png", b"\x89PNG\r\n\x1a\nrest").is_ok());
        assert!(
            check("image/png", b"%PDF-1.7")
                .unwrap_err()
                .contains("application/pdf")
        );
        assert!(check("text/plain", "héllo".as_bytes()).is_ok());
        assert!(check("text/plain", b"a\0b").is_err());
        assert!(check("application/octet-stream", b"\x7fELF....").is_err());
        assert!(check("application/octet-stream", b"\x00\x01\x02").is_ok());
        assert!(check("image/webp", b"RIFF\0\0\0\0WEBPVP8 ").is_ok());
    }

    #[test]
    fn names_lose_paths_controls_and_length() {
        assert_eq!(safe_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_name("..\\..\\boot.ini"), "boot.ini");
        assert_eq!(safe_name("a\0b\r\n.txt"), "ab.txt");
        assert_eq!(safe_name(".."), "file");
        assert_eq!(safe_name(""), "file");
        assert_eq!(safe_name(".hidden"), "hidden");
        let long = format!("{}.pdf", "é".repeat(300));
        let s = safe_name(&long);
        assert!(s.len() <= MAX_NAME_BYTES && s.ends_with(".pdf"), "{s}");
        assert_eq!(safe_name("résumé 2024.pdf"), "résumé 2024.pdf");
    }

    #[test]
    fn disposition_is_quoted_safely() {
        let d = content_disposition(false, "résumé \"x\";.pdf");
        assert!(d.starts_with("attachment; filename=\"r_sum_ _x__.pdf\""), "{d}");
        assert!(
            d.contains("filename*=UTF-8''r%C3%A9sum%C3%A9%20%22x%22%3B.pdf"),
            "{d}"
        );
    }
}
