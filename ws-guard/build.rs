//! Builds the eBPF crate with the nightly and bpf-linker and embeds the object (aya-build).

use std::process::Command;

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    check_prerequisites()?;
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "ws-guard-ebpf")
        .ok_or_else(|| anyhow!("ws-guard-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("ws-guard-ebpf manifest has no parent"))?
        .as_str();
    // aya-build watches the eBPF crate only; the kernel also compiles ws-guard-common.
    let common = std::path::Path::new(root_dir)
        .parent()
        .map(|p| p.join("ws-guard-common"))
        .ok_or_else(|| anyhow!("ws-guard-ebpf has no parent directory"))?;
    println!("cargo:rerun-if-changed={}", common.display());
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

/// Fails with the fix when a prerequisite of the eBPF build is missing, instead of a cryptic
/// error from deep inside the nested cargo.
fn check_prerequisites() -> anyhow::Result<()> {
    if std::env::var_os("AYA_BUILD_SKIP").is_some() {
        return Ok(());
    }
    const FIX: &str = "run `cargo xtask setup` to install it";
    let nightly = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output();
    let sysroot = match nightly {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        _ => return Err(anyhow!("the nightly Rust toolchain is missing: {FIX}")),
    };
    let src = std::path::Path::new(&sysroot).join("lib/rustlib/src/rust/library/core");
    if !src.exists() {
        return Err(anyhow!(
            "rust-src is missing from the nightly toolchain: {FIX}"
        ));
    }
    match Command::new("bpf-linker").arg("--version").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(anyhow!(
            "bpf-linker does not run ({}): {FIX}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(_) => Err(anyhow!("bpf-linker is not on PATH: {FIX}")),
    }
}
