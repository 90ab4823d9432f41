//! `cargo xtask bench`: builds and runs ws-guard's benchmark (the `wsg-bench` binary of the
//! ws-guard-tests crate, whose measuring code the smoke test also runs), which writes
//! bench.md, bench.json and PNG charts under `target/bench/` and prints the tables.
//!
//! xtask itself does not link the benchmark: that needs the eBPF object, whose build needs what
//! `cargo xtask setup` installs, and xtask must build before setup has run.

use std::{ffi::OsString, process::Command};

use anyhow::{Context as _, bail};

use crate::{Ctx, proc::run, setup};

pub fn bench(ctx: &Ctx, quick: bool, smoke: bool, args: &[OsString]) -> anyhow::Result<()> {
    if !ctx.is_root {
        bail!(
            "the benchmark needs root (BPF programs, XDP, network namespaces): run it as root, \
             e.g. `sudo -E cargo xtask bench`"
        );
    }
    if quick {
        println!("xtask bench: --quick: setup skipped");
    } else {
        setup::setup(ctx).context("setup failed, nothing was built or measured")?;
    }
    // The dev profile on purpose: every figure is time spent in the kernel (BPF programs, the
    // network stack), and the test builds already made it.
    println!("xtask bench: building the benchmark");
    run(ctx
        .cargo()
        .args(["build", "-p", "ws-guard-tests", "--bin", "wsg-bench"]))
    .context("building the benchmark failed (errors above)")?;
    let out = ctx.target_dir.join("bench");
    let mut cmd = Command::new(ctx.target_dir.join("debug/wsg-bench"));
    cmd.current_dir(&ctx.root).arg("--out").arg(&out);
    if smoke {
        cmd.arg("--smoke");
    }
    cmd.args(args);
    run(&mut cmd).context("the benchmark failed (see above)")?;
    Ok(())
}
