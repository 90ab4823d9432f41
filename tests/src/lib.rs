//! Helpers for ws-guard's integration tests.

pub mod bench;
pub mod binary;
pub mod frames;
pub mod hostbed;
pub mod model;
pub mod netns;
pub mod traffic;

/// Whether this process may load BPF programs and create network namespaces.
///
/// When it may not: with `WS_GUARD_REQUIRE_PRIVILEGED` set (as CI sets it) the test fails
/// loudly; otherwise it prints why it is skipped and the caller returns.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var_os("WS_GUARD_REQUIRE_PRIVILEGED").is_some() {
        panic!(
            "{test}: needs root (BPF, network namespaces) and WS_GUARD_REQUIRE_PRIVILEGED is set"
        );
    }
    eprintln!(
        "SKIPPED {test}: needs root (set WS_GUARD_REQUIRE_PRIVILEGED=1 to make this a failure)"
    );
    false
}
