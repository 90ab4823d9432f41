//! Feeds arbitrary bytes to the control socket's request handling, one request per line as
//! the daemon reads them, against the shipped config: parsing must never panic, and every
//! change it accepts must give a valid effective config and a state file that reads back the
//! same (see `ws_guard::control::exercise`). The kernel side of a request (the map writes) is
//! covered by the integration tests.
//!
//! `cargo +nightly fuzz run control` (docs/testing.md, "Testing").

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use ws_guard::{
    config::{Config, DEFAULT_CONFIG},
    control::exercise::exercise_request,
    state::Overrides,
};

fuzz_target!(|data: &[u8]| {
    static FILE: OnceLock<Config> = OnceLock::new();
    let file = FILE.get_or_init(|| Config::parse(DEFAULT_CONFIG, "default").unwrap());
    let mut overrides = Overrides::default();
    for line in data.split(|b| *b == b'\n').take(64) {
        exercise_request(line, file, &mut overrides);
    }
});
