//! Feeds arbitrary bytes to the configuration parser: it must never panic, and every
//! configuration it accepts must keep the invariants the kernel relies on (ports 1-65535 and
//! unique, prefixes in range, rate counts 1-32, capacities in range) and convert to the
//! kernel's form without panicking.
//!
//! `cargo +nightly fuzz run config` (docs/testing.md, "Testing").

#![no_main]

use libfuzzer_sys::fuzz_target;
use ws_guard::config::Config;

fuzz_target!(|data: &[u8]| {
    // The daemon reads the file with read_to_string, so invalid UTF-8 never reaches the
    // parser; lossy conversion still gives the fuzzer's bytes a way in.
    let text = match std::str::from_utf8(data) {
        Ok(t) => std::borrow::Cow::Borrowed(t),
        Err(_) => String::from_utf8_lossy(data),
    };
    match Config::parse(&text, "fuzz") {
        Ok(cfg) => {
            cfg.assert_invariants();
            for p in &cfg.ports {
                let _ = p.to_kernel();
                if let Some(r) = p.new_connections {
                    let _ = r.to_string();
                }
            }
            let _ = cfg.global();
            let _ = cfg.kernel_log_level();
            let _ = format!("{cfg:?}");
        }
        // Errors are printed to the operator: formatting them must not panic either.
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
