//! What arrives on the command queue: any `type` header, content type and body. A command
//! is parsed and validated, or refused with a reason for the dead-letter queue.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pulse_daemon::commands::parse;

const CLASSES: [&str; 6] = [
    "App\\Message\\SendNotification",
    "App\\Message\\EndPresence",
    "App\\Message\\EraseUserData",
    "App\\Message\\ExportUserData",
    "App\\Message\\ChangeSetting",
    "App\\Message\\Unknown",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let class = CLASSES[usize::from(pick) % CLASSES.len()];
    let content_type = if pick & 0x80 == 0 {
        Some("application/json")
    } else {
        None
    };
    if let Err(reason) = parse(Some(class), content_type, body) {
        assert!(!reason.0.is_empty());
    }
});
