use which::which;

/// Rebuild when bpf-linker changes; fail with the fix when it is missing.
fn main() {
    // BPF ISA v3 (kernel >= 5.12): atomics that return the old value need it, and it gives
    // 32-bit subregisters: the slot counters are atomic fetch-and-add on map values.
    println!("cargo:rustc-link-arg=--cpu-features=+alu32");
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => panic!(
            "bpf-linker is not on PATH: run `cargo xtask setup` (installs the nightly with \
             rust-src and bpf-linker built against the nightly's LLVM)"
        ),
    }
}
