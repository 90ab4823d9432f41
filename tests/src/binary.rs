//! The ws-guard binary the integration tests run, and what it leaves on bpffs.

use std::path::{Path, PathBuf};

/// target/<profile>/ws-guard, beside target/<profile>/deps/<this test>.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable outside target/<profile>/deps");
    let bin = dir.join("ws-guard");
    assert!(
        bin.is_file(),
        "{} is missing: build it first with `cargo build -p ws-guard` (cargo xtask test does)",
        bin.display()
    );
    bin
}

/// Files under `root` (pins), recursively; 0 if it does not exist.
pub fn pins_under(root: &Path) -> usize {
    let mut n = 0;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten().take(1000) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(e.path());
            } else {
                n += 1;
            }
        }
    }
    n
}
