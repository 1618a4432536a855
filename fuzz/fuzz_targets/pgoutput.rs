//! The replication stream as the server could send it, byte for byte: CopyData payloads
//! (XLogData, keepalives) and pgoutput messages, fed in sequence to one assembler so that
//! its state machine (transactions, streamed blocks, subtransaction aborts, relations,
//! types) meets every order of messages. An error is fine; a panic or a hang is not.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pulse_cdc::assemble::Assembler;
use pulse_cdc::decode::{parse_copy, parse_pgoutput};

fuzz_target!(|data: &[u8]| {
    let _ = parse_copy(Bytes::copy_from_slice(data));
    // The input is a sequence of messages, each preceded by one length byte.
    let mut assembler = Assembler::default();
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (message, next) = tail.split_at(len);
        rest = next;
        if let Ok(msg) = parse_pgoutput(Bytes::copy_from_slice(message), assembler.in_stream()) {
            let _ = assembler.handle(msg);
        }
    }
});
