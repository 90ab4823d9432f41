//! `cargo xtask setup`: installs what building and testing ws-guard needs, and nothing that is
//! already there. Every step prints one line saying what it found or did.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};

use crate::{
    Ctx, llvm,
    proc::{capture, describe, find_program, run, stdout_of, version_of},
};

/// Debian packages the integration tests and benchmarks use, with a command each provides
/// (checked instead when dpkg is not there).
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("ethtool", "ethtool"),
    ("hping3", "hping3"),
    ("bpftool", "bpftool"),
    ("iptables", "iptables"),
    ("nftables", "nft"),
    ("python3", "python3"),
    // tests/completions.rs completes words in each shell the completions are generated for.
    ("bash", "bash"),
    ("zsh", "zsh"),
    ("fish", "fish"),
    // The real server and promtool of the metrics tests.
    ("prometheus", "promtool"),
    // systemd-analyze verify checks packaging/ws-guard.service (tests/systemd.rs).
    ("systemd", "systemd-analyze"),
    // `cargo xtask dist`: cargo-deb computes the package's Depends with dpkg-shlibdeps; the
    // tarball's binary is stripped and its glibc requirement read with objdump.
    ("dpkg-dev", "dpkg-shlibdeps"),
    ("binutils", "objdump"),
];

fn say(step: &str, msg: impl std::fmt::Display) {
    println!("xtask setup: {step}: {msg}");
}

type StepFn = fn(&Ctx) -> anyhow::Result<()>;

/// Runs every step, then fails if any failed (naming each, with what to do).
pub fn setup(ctx: &Ctx) -> anyhow::Result<()> {
    let steps: [(&str, StepFn); 7] = [
        ("privileges", privileges),
        ("rustfmt", rustfmt),
        ("nightly", nightly),
        ("bpf-linker", bpf_linker),
        ("cargo-deb", cargo_deb),
        ("packages", packages),
        ("filesystems", filesystems),
    ];
    let mut failed = Vec::new();
    for (name, step) in steps {
        if let Err(e) = step(ctx) {
            say(name, format_args!("FAILED: {e:#}"));
            failed.push(name);
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(
            "setup failed in: {} (see the messages above)",
            failed.join(", ")
        ))
    }
}

fn privileges(ctx: &Ctx) -> anyhow::Result<()> {
    if ctx.is_root {
        say("privileges", "running as root");
    } else {
        say(
            "privileges",
            "not root: system packages and mounts are only checked; privileged tests skip \
             (or fail with WS_GUARD_REQUIRE_PRIVILEGED=1)",
        );
    }
    Ok(())
}

/// `cargo fmt` for the toolchain that builds the workspace (`cargo xtask test` checks format).
fn rustfmt(ctx: &Ctx) -> anyhow::Result<()> {
    if let Ok(v) = stdout_of(Command::new(&ctx.cargo).args(["fmt", "--version"])) {
        say("rustfmt", format_args!("found {}", v.trim()));
        return Ok(());
    }
    let rustup = ctx.rustup()?;
    say("rustfmt", "missing; adding the rustfmt component");
    run(Command::new(rustup).args(["component", "add", "rustfmt"]))
        .context("could not add rustfmt; run `rustup component add rustfmt` by hand")?;
    let v = stdout_of(Command::new(&ctx.cargo).args(["fmt", "--version"]))?;
    say("rustfmt", format_args!("installed {}", v.trim()));
    Ok(())
}

/// cargo-deb builds the Debian package of `cargo xtask dist`. A working one is kept as it is.
fn cargo_deb(ctx: &Ctx) -> anyhow::Result<()> {
    let version = || stdout_of(Command::new(&ctx.cargo).args(["deb", "--version"]));
    if let Ok(v) = version() {
        say("cargo-deb", format_args!("found {}", v.trim()));
        return Ok(());
    }
    say(
        "cargo-deb",
        "not found; installing it from crates.io (about a minute)",
    );
    let mut cmd = Command::new(&ctx.cargo);
    cmd.args(["install", "cargo-deb", "--locked"])
        .current_dir(&ctx.root);
    run(&mut cmd).with_context(|| {
        format!(
            "installing cargo-deb failed; fix the error above and run `cargo xtask setup` again \
             (command: {})",
            describe(&cmd)
        )
    })?;
    let v = version().context("cargo-deb was installed but `cargo deb --version` fails")?;
    say("cargo-deb", format_args!("installed {}", v.trim()));
    Ok(())
}

/// `rustup run nightly rustc <args>`, never installing a toolchain implicitly.
fn nightly_rustc(ctx: &Ctx, args: &[&str]) -> anyhow::Result<String> {
    stdout_of(
        Command::new(ctx.rustup()?)
            .args(["run", "nightly", "rustc"])
            .args(args)
            .env("RUSTUP_AUTO_INSTALL", "0"),
    )
}

fn rust_src_present(sysroot: &Path) -> bool {
    sysroot.join("lib/rustlib/src/rust/library/core").is_dir()
}

/// The nightly with rust-src builds the eBPF crate. An existing nightly is never replaced:
/// a different nightly may bring a different LLVM than the one bpf-linker was built with.
fn nightly(ctx: &Ctx) -> anyhow::Result<()> {
    let rustup = ctx.rustup()?;
    let installed_now = match nightly_rustc(ctx, &["-vV"]) {
        Ok(_) => false,
        Err(e) => {
            say(
                "nightly",
                format_args!("not usable ({e:#}); installing it with rust-src"),
            );
            run(Command::new(&rustup).args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
                // Installing a toolchain is not a reason to replace rustup itself.
                "--no-self-update",
            ]))
            .context(
                "could not install the nightly toolchain; check the network, then run \
                 `rustup toolchain install nightly --profile minimal -c rust-src --no-self-update`",
            )?;
            true
        }
    };
    let vv = nightly_rustc(ctx, &["-vV"])?;
    let sysroot = PathBuf::from(nightly_rustc(ctx, &["--print", "sysroot"])?.trim());
    let mut src = "rust-src present";
    if !rust_src_present(&sysroot) {
        say("nightly", "rust-src is missing; adding it");
        run(Command::new(&rustup).args(["component", "add", "rust-src", "--toolchain", "nightly"]))
            .context("run `rustup component add rust-src --toolchain nightly` by hand")?;
        if !rust_src_present(&sysroot) {
            bail!(
                "rust-src still missing under {}: run `rustup component add rust-src \
                 --toolchain nightly`",
                sysroot.display()
            );
        }
        src = "rust-src added";
    }
    let release = vv.lines().next().unwrap_or("").trim();
    let llvm = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .map(str::trim)
        .unwrap_or("unknown");
    let what = if installed_now { "installed" } else { "found" };
    say(
        "nightly",
        format_args!("{what} {release}, LLVM {llvm}, {src}"),
    );
    Ok(())
}

/// bpf-linker links the eBPF object; it must be built against the nightly's LLVM. A working one
/// is kept as it is.
fn bpf_linker(ctx: &Ctx) -> anyhow::Result<()> {
    match which::which("bpf-linker") {
        Ok(path) => match version_of(&path) {
            Ok(v) => {
                say(
                    "bpf-linker",
                    format_args!("found {v} at {}{}", path.display(), ctx.path_note(&path)),
                );
                return Ok(());
            }
            Err(e) => say(
                "bpf-linker",
                format_args!("{} does not run ({e:#}); rebuilding it", path.display()),
            ),
        },
        Err(_) => say(
            "bpf-linker",
            "not found; building it against the nightly's LLVM (1-3 minutes)",
        ),
    }
    let installed = install_bpf_linker(ctx, None)?;
    // The build embeds the one PATH finds: it must be the one just installed, or another that runs.
    let found = which::which("bpf-linker").map_err(|_| {
        anyhow!(
            "installed {} but it is not on PATH: add {} to PATH",
            installed.display(),
            installed.parent().unwrap_or(Path::new("")).display()
        )
    })?;
    let v = version_of(&found).with_context(|| {
        format!(
            "PATH finds {} first, and it does not run; remove it (the working one is {})",
            found.display(),
            installed.display()
        )
    })?;
    say(
        "bpf-linker",
        format_args!(
            "installed {v} at {}{}",
            found.display(),
            ctx.path_note(&found)
        ),
    );
    Ok(())
}

/// Builds and installs bpf-linker with `cargo +nightly install`, linked dynamically against the
/// nightly's own `libLLVM.so.<major>.*-rust-*` (with an rpath to it, so it runs without
/// LD_LIBRARY_PATH). `root`: install there instead of the cargo default (for trying it out).
/// Returns the installed binary, checked to run.
pub fn install_bpf_linker(ctx: &Ctx, root: Option<&Path>) -> anyhow::Result<PathBuf> {
    let vv = nightly_rustc(ctx, &["-vV"])
        .context("the nightly toolchain is needed: run `cargo xtask setup`")?;
    let major = llvm::llvm_major(&vv)
        .ok_or_else(|| anyhow!("no `LLVM version: N.x.y` line in `rustc +nightly -vV`:\n{vv}"))?;
    let sysroot = PathBuf::from(nightly_rustc(ctx, &["--print", "sysroot"])?.trim());
    let sysroot_lib = sysroot.join("lib");
    let entries =
        fs::read_dir(&sysroot_lib).with_context(|| format!("reading {}", sysroot_lib.display()))?;
    let names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let lib = llvm::choose_libllvm(names.iter().map(String::as_str), major).ok_or_else(|| {
        anyhow!(
            "no libLLVM.so.{major}.*-rust-* in {}: the nightly has no shared LLVM to build \
             bpf-linker against (reinstall it: `rustup toolchain install nightly --force`)",
            sysroot_lib.display()
        )
    })?;
    let prefix = ctx.target_dir.join("llvm-prefix");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    let link = prefix_lib.join("libLLVM.so");
    if link.symlink_metadata().is_ok() {
        fs::remove_file(&link).with_context(|| format!("removing the old {}", link.display()))?;
    }
    std::os::unix::fs::symlink(sysroot_lib.join(lib), &link)
        .with_context(|| format!("creating the symlink {}", link.display()))?;
    say(
        "bpf-linker",
        format_args!(
            "LLVM {major}: {} -> {}",
            link.display(),
            sysroot_lib.join(lib).display()
        ),
    );

    let mut cmd = Command::new(ctx.rustup()?);
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "install",
        "bpf-linker",
        "--locked",
        "--force",
    ])
    .args([
        "--no-default-features",
        "--features",
        &format!("llvm-{major}"),
    ])
    .env("RUSTUP_AUTO_INSTALL", "0")
    .env("LLVM_PREFIX", &prefix)
    // Without this rpath bpf-linker fails at start with "libLLVM.so.<v>-rust-...: cannot
    // open shared object file": the symlink directory does not hold the SONAME.
    .env(
        "RUSTFLAGS",
        format!("-C link-args=-Wl,-rpath,{}", sysroot_lib.display()),
    )
    .env_remove("CARGO_ENCODED_RUSTFLAGS")
    .current_dir(&ctx.root);
    if let Some(root) = root {
        cmd.arg("--root").arg(root);
    }
    run(&mut cmd).with_context(|| {
        format!(
            "building bpf-linker failed; fix the error above and run `cargo xtask setup` again \
             (command: {})",
            describe(&cmd)
        )
    })?;
    let bin = root
        .map(Path::to_owned)
        .unwrap_or_else(|| ctx.install_root())
        .join("bin/bpf-linker");
    let v = version_of(&bin)
        .with_context(|| format!("the freshly built {} does not run", bin.display()))?;
    say("bpf-linker", format_args!("built {v} at {}", bin.display()));
    Ok(bin)
}

/// Names of the `wanted` packages dpkg does not have installed.
fn missing_packages(dpkg_query: &Path, wanted: &[&str]) -> anyhow::Result<Vec<String>> {
    let out = capture(
        Command::new(dpkg_query)
            .args(["-W", "-f=${Package} ${Status}\\n"])
            .args(wanted),
    )
    .context("running dpkg-query")?;
    // Exit status 1 just means some package is unknown; those have no line.
    Ok(not_installed(&String::from_utf8_lossy(&out.stdout), wanted))
}

/// From `dpkg-query -W -f='${Package} ${Status}\n'` output, the `wanted` packages that are not
/// installed (unknown, removed with config files left, half-installed, ...).
fn not_installed(dpkg_output: &str, wanted: &[&str]) -> Vec<String> {
    let installed: Vec<&str> = dpkg_output
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let name = words.next()?;
            (words.last() == Some("installed")).then_some(name)
        })
        .collect();
    wanted
        .iter()
        .filter(|p| !installed.contains(p))
        .map(|p| p.to_string())
        .collect()
}

fn packages(ctx: &Ctx) -> anyhow::Result<()> {
    let wanted: Vec<&str> = PACKAGES.iter().map(|(p, _)| *p).collect();
    let Some(dpkg_query) = find_program("dpkg-query") else {
        // Not Debian: check the commands themselves.
        let missing: Vec<&str> = PACKAGES
            .iter()
            .filter(|(_, cmd)| find_program(cmd).is_none())
            .map(|(_, cmd)| *cmd)
            .collect();
        if missing.is_empty() {
            say("packages", "no dpkg; all needed commands found");
            return Ok(());
        }
        bail!(
            "no dpkg (not Debian?) and these commands are missing: {}; install them with \
             your package manager",
            missing.join(" ")
        );
    };
    let missing = missing_packages(&dpkg_query, &wanted)?;
    if missing.is_empty() {
        say(
            "packages",
            format_args!("all installed ({})", wanted.join(" ")),
        );
        return Ok(());
    }
    let install = format!(
        "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
         --no-install-recommends {}",
        missing.join(" ")
    );
    if !ctx.is_root {
        bail!(
            "missing Debian packages: {}; as root run: {install}",
            missing.join(" ")
        );
    }
    say("packages", format_args!("installing {}", missing.join(" ")));
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        cmd
    };
    run(&mut apt(&["update"]))
        .with_context(|| format!("check the network and apt sources, then run: {install}"))?;
    let mut cmd = apt(&["install", "-y", "--no-install-recommends"]);
    cmd.args(&missing);
    run(&mut cmd).with_context(|| format!("run by hand to see why: {install}"))?;
    let still = missing_packages(&dpkg_query, &wanted)?;
    if !still.is_empty() {
        bail!("still not installed after apt-get: {}", still.join(" "));
    }
    say("packages", format_args!("installed {}", missing.join(" ")));
    Ok(())
}

fn mounted(mount_point: &str, fstype: &str) -> anyhow::Result<bool> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    Ok(mounts_contain(&mounts, mount_point, fstype))
}

/// Whether /proc/self/mounts text has a `fstype` file system at `mount_point`.
fn mounts_contain(mounts: &str, mount_point: &str, fstype: &str) -> bool {
    mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&mount_point) && fields.get(2) == Some(&fstype)
    })
}

/// tracefs (the socket-state tracepoint) and bpffs (pinned programs and maps).
fn filesystems(ctx: &Ctx) -> anyhow::Result<()> {
    let mut done = Vec::new();
    let mut problems = Vec::new();

    const TRACING: &str = "/sys/kernel/tracing";
    if Path::new(TRACING).join("events").is_dir() {
        done.push(format!("tracefs at {TRACING}"));
    } else if ctx.is_root {
        match run(Command::new("mount").args(["-t", "tracefs", "tracefs", TRACING])) {
            Ok(()) if Path::new(TRACING).join("events").is_dir() => {
                done.push(format!("mounted tracefs at {TRACING}"))
            }
            Ok(()) => problems.push(format!(
                "mounted tracefs at {TRACING} but it has no events/"
            )),
            Err(e) => problems.push(format!("{e:#}: the tracepoint needs tracefs at {TRACING}")),
        }
    } else {
        done.push(format!(
            "tracefs not visible (not root); if missing, as root: mount -t tracefs tracefs {TRACING}"
        ));
    }

    const BPFFS: &str = "/sys/fs/bpf";
    if mounted(BPFFS, "bpf")? {
        done.push(format!("bpffs at {BPFFS}"));
    } else if ctx.is_root {
        match run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS])) {
            Ok(()) if mounted(BPFFS, "bpf")? => done.push(format!("mounted bpffs at {BPFFS}")),
            Ok(()) => problems.push(format!("mount reported success but no bpffs at {BPFFS}")),
            Err(e) => problems.push(format!("{e:#}: pinning needs bpffs at {BPFFS}")),
        }
    } else {
        done.push(format!(
            "bpffs not mounted; as root: mount -t bpf bpf {BPFFS}"
        ));
    }

    if problems.is_empty() {
        say("filesystems", done.join("; "));
        Ok(())
    } else {
        bail!("{}", problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_status_parsing() {
        let out = "iproute2 install ok installed
ethtool deinstall ok config-files
hping3 install ok half-installed
bpftool hold ok installed
python3 install ok installed
";
        let wanted = [
            "iproute2", "ethtool", "hping3", "bpftool", "nftables", "python3",
        ];
        assert_eq!(
            not_installed(out, &wanted),
            ["ethtool", "hping3", "nftables"]
        );
        assert_eq!(not_installed("", &["iptables"]), ["iptables"]);
        assert!(not_installed(out, &["iproute2", "bpftool"]).is_empty());
    }

    #[test]
    fn mount_table_parsing() {
        let mounts = "sysfs /sys sysfs rw,nosuid 0 0
nodev /sys/kernel/tracing tracefs rw,relatime 0 0
bpf /sys/fs/bpf/sub bpf rw 0 0
none /sys/fs/bpf tmpfs rw 0 0
";
        assert!(mounts_contain(mounts, "/sys/kernel/tracing", "tracefs"));
        assert!(!mounts_contain(mounts, "/sys/fs/bpf", "bpf"));
        assert!(mounts_contain(
            &format!("{mounts}bpf /sys/fs/bpf bpf rw 0 0\n"),
            "/sys/fs/bpf",
            "bpf"
        ));
    }
}
