//! Text-format column values as pgoutput carries them, parsed as every kind: a value or the
//! text itself, never an error and never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pulse_cdc::value::{Kind, parse};

fn kind(pick: u8) -> Kind {
    let base = match pick % 14 {
        0 => Kind::Bool,
        1 => Kind::Int,
        2 => Kind::Float,
        3 => Kind::Numeric,
        4 => Kind::Text,
        5 => Kind::Uuid,
        6 => Kind::Json,
        7 => Kind::Date,
        8 => Kind::Time,
        9 => Kind::Timestamp,
        10 => Kind::TimestampTz,
        11 => Kind::Interval,
        12 => Kind::Bytea,
        _ => Kind::Array(Box::new(Kind::Text)),
    };
    if pick >= 128 {
        Kind::Array(Box::new(base))
    } else {
        base
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, text)) = data.split_first() else {
        return;
    };
    let _ = parse(&kind(pick), &String::from_utf8_lossy(text));
});
