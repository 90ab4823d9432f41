//! The built object: every program passes the verifier, and its map and program names are the
//! ones `ws_guard_common::names` declares (the kernel cuts names to 15 bytes).

use ws_guard::guard::{Guard, LoadOptions};
use ws_guard_common::names;

#[test]
fn programs_load_and_names_match() {
    if !ws_guard_tests::privileged("programs_load_and_names_match") {
        return;
    }
    let guard = Guard::load(&LoadOptions::default()).expect("load");
    // Data sections (.rodata...) aside; aya-log's ring buffer is taken by the logger.
    let mut maps: Vec<String> = guard
        .map_names()
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .collect();
    maps.sort();
    let mut want: Vec<String> = names::MAPS.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(maps, want);
    let mut progs = guard.program_names();
    progs.sort();
    let mut want: Vec<String> = names::PROGRAMS.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(progs, want);
    for n in names::MAPS.iter().chain(names::PROGRAMS.iter()) {
        assert!(n.len() <= names::MAX_NAME_LEN, "{n}");
    }
}

#[test]
fn tracepoint_layout_matches_this_kernel() {
    if !ws_guard_tests::privileged("tracepoint_layout_matches_this_kernel") {
        return;
    }
    ws_guard::guard::check_tracepoint_format().expect("format");
}
