//! pulsetop: the Pulse operations console (placeholder until the console issue lands).

#![forbid(unsafe_code)]

fn main() {
    eprintln!("pulsetop: the console is not written yet");
    std::process::exit(2);
}
