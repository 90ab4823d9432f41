//! Pure helpers for building bpf-linker against the nightly toolchain's own LLVM.

/// The LLVM major version from `rustc -vV` output (`LLVM version: 22.1.4` -> 22).
pub fn llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv.lines().find_map(|line| {
        let version = line.trim().strip_prefix("LLVM version:")?.trim();
        let major = version.split('.').next()?;
        if major.is_empty() || !major.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        major.parse().ok()
    })
}

/// Among the file names of the nightly sysroot's `lib/`, the shared LLVM that matches the glob
/// `libLLVM.so.<major>.*-rust-*` (e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`). When several
/// match, the greatest name wins, so the choice does not depend on directory order.
pub fn choose_libllvm<'a>(names: impl IntoIterator<Item = &'a str>, major: u32) -> Option<&'a str> {
    let prefix = format!("libLLVM.so.{major}.");
    names
        .into_iter()
        .filter(|name| {
            name.strip_prefix(prefix.as_str())
                .and_then(|rest| rest.find("-rust-"))
                .is_some_and(|at| at > 0)
        })
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NIGHTLY_VV: &str = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)
binary: rustc
commit-hash: e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a
commit-date: 2026-05-19
host: x86_64-unknown-linux-gnu
release: 1.97.0-nightly
LLVM version: 22.1.4
";

    #[test]
    fn major_from_rustc_vv() {
        assert_eq!(llvm_major(NIGHTLY_VV), Some(22));
        assert_eq!(llvm_major("LLVM version: 22.1.4"), Some(22));
        assert_eq!(llvm_major("LLVM version: 19.1.7\n"), Some(19));
        assert_eq!(llvm_major("LLVM version: 23"), Some(23));
        assert_eq!(llvm_major("LLVM version: 23.0.0git"), Some(23));
    }

    #[test]
    fn major_missing_or_garbled() {
        assert_eq!(llvm_major(""), None);
        assert_eq!(
            llvm_major("rustc 1.97.0-nightly\nrelease: 1.97.0-nightly\n"),
            None
        );
        assert_eq!(llvm_major("LLVM version: "), None);
        assert_eq!(llvm_major("LLVM version: x.1"), None);
        assert_eq!(llvm_major("LLVM version: -3.1"), None);
    }

    #[test]
    fn libllvm_from_sysroot_listing() {
        let names = [
            "librustc_driver-b5a965480ee51f9a.so",
            "libLLVM-22-rust-1.97.0-nightly.so",
            "libLLVM.so.22.1-rust-1.97.0-nightly",
            "rustlib",
        ];
        assert_eq!(
            choose_libllvm(names, 22),
            Some("libLLVM.so.22.1-rust-1.97.0-nightly")
        );
    }

    #[test]
    fn libllvm_other_major_or_shapes_do_not_match() {
        let names = [
            "libLLVM.so.22.1-rust-1.97.0-nightly",
            "libLLVM.so.2",
            "libLLVM-2-rust-1.97.0-nightly.so",
            "libLLVM.so.2.-rust-x",
            "libLLVM.so.220.1-rust-1.97.0-nightly",
        ];
        // Major 2 must not pick the major-22 or major-220 library.
        assert_eq!(choose_libllvm(names, 2), None);
        assert_eq!(choose_libllvm(names, 21), None);
        assert_eq!(choose_libllvm(names, 23), None);
        assert_eq!(
            choose_libllvm(names, 220),
            Some("libLLVM.so.220.1-rust-1.97.0-nightly")
        );
        assert_eq!(choose_libllvm(["libLLVM.so.22.1"], 22), None);
        assert_eq!(choose_libllvm(std::iter::empty(), 22), None);
    }

    #[test]
    fn libllvm_choice_is_independent_of_order() {
        let a = "libLLVM.so.22.1-rust-1.97.0-nightly";
        let b = "libLLVM.so.22.2-rust-1.98.0-nightly";
        assert_eq!(choose_libllvm([a, b], 22), Some(b));
        assert_eq!(choose_libllvm([b, a], 22), Some(b));
    }
}
