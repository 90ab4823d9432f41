use which::which;

/// Rebuild when bpf-linker changes; fail with the fix when it is missing.
fn main() {
    // The linker is ./bpf-linker-v3 (see .cargo/config.toml), which selects BPF ISA v3.
    println!("cargo:rerun-if-changed=bpf-linker-v3");
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => panic!(
            "bpf-linker is not on PATH: run `cargo xtask setup` (installs the nightly with \
             rust-src and bpf-linker built against the nightly's LLVM)"
        ),
    }
}
