//! Properties of the client frame parser on arbitrary input (TARGETS.md, "fuzzing": the
//! client frame parser never panics). `scripts/fuzz client_frame` runs the same property
//! coverage-guided on nightly.

use proptest::prelude::*;
use pulse_shared::error::ErrorCode;
use pulse_shared::protocol::{ClientFrame, parse_client_frame};

/// Valid frames of every kind a browser sends, to mutate.
const VALID: [&str; 8] = [
    r#"{"type":"hello","protocol":1,"token":"a.b.c"}"#,
    r#"{"type":"subscribe","id":"s1","query":"members","args":{"status":"active"}}"#,
    r#"{"type":"unsubscribe","id":"s1"}"#,
    r#"{"type":"resume","cursor":"e-1","subscriptions":[{"id":"s1","query":"members"}]}"#,
    r#"{"type":"mutate","id":"m1","name":"mark_read","args":{"id":"1"}}"#,
    r#"{"type":"heartbeat","resource":"/members/7","state":{"typing":true}}"#,
    r#"{"type":"heartbeat","resource":"/"}"#,
    r#"{"type":"ping","nonce":7}"#,
];

fn check(text: &str) -> Result<(), TestCaseError> {
    match parse_client_frame(text) {
        Ok(frame) => {
            // What parses serialises back and parses to the same frame.
            let again = serde_json::to_string(&frame).expect("a parsed frame serialises");
            let reparsed: ClientFrame = parse_client_frame(&again).expect("its own output parses");
            prop_assert_eq!(reparsed, frame);
        }
        Err(e) => {
            prop_assert_eq!(e.code, ErrorCode::InvalidArgument);
            prop_assert!(e.message.starts_with("malformed frame: "));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn arbitrary_text_is_a_frame_or_invalid_argument(text in ".{0,200}") {
        check(&text)?;
    }

    #[test]
    fn mutated_valid_frames_are_a_frame_or_invalid_argument(
        which in 0..VALID.len(),
        cut in any::<prop::sample::Index>(),
        insert in "[{}\\[\\]\",:0-9a-z\\\\ ]{0,8}",
    ) {
        let base = VALID[which];
        let at = cut.index(base.len() + 1);
        let at = (0..=at).rev().find(|i| base.is_char_boundary(*i)).unwrap_or(0);
        let mutated = format!("{}{}{}", &base[..at], insert, &base[at..]);
        check(&mutated)?;
        check(&base[..at])?;
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow(depth in 1usize..5000) {
        let text = format!(
            r#"{{"type":"heartbeat","resource":"/","state":{}{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        check(&text)?;
    }
}

#[test]
fn the_valid_frames_parse() {
    for text in VALID {
        assert!(parse_client_frame(text).is_ok(), "{text}");
    }
}
