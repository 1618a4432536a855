//! What a browser (or anyone reaching the WebSocket) can send: any text. The parser answers
//! a frame or an `invalid_argument` error body; it never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pulse_shared::error::ErrorCode;
use pulse_shared::protocol::parse_client_frame;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Err(e) = parse_client_frame(&text) {
        assert_eq!(e.code, ErrorCode::InvalidArgument);
    }
});
