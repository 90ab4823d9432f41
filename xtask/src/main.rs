//! Developer tasks for ws-guard: `cargo xtask setup`, `cargo xtask test`, `cargo xtask run`,
//! `cargo xtask bench`, `cargo xtask dist`.
//!
//! `cargo xtask` is an alias (.cargo/config.toml) for `cargo run --quiet --package xtask --`.

mod bench;
mod dist;
mod llvm;
mod proc;
mod setup;

use std::{
    ffi::OsString,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};
use clap::{Parser, Subcommand};

use crate::proc::run;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "ws-guard developer tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing needs: the nightly with rust-src, bpf-linker built
    /// against the nightly's LLVM, rustfmt, cargo-deb (for `dist`), the Debian packages the
    /// tests use; mount tracefs and bpffs. Does nothing that is already done.
    Setup,
    /// Set up, check formatting, build ws-guard (with its eBPF object), run every test.
    /// WS_GUARD_REQUIRE_PRIVILEGED=1 makes privileged tests fail instead of skipping.
    Test {
        /// Skip the setup step.
        #[arg(long)]
        quick: bool,
        /// Passed to the test binaries (e.g. a test name filter).
        #[arg(last = true)]
        test_args: Vec<OsString>,
    },
    /// Set up, build ws-guard (release) and run it in place of this process (via sudo when not
    /// root). Default arguments: `run --config packaging/config.toml`; a `run` always gets
    /// `--detach-on-exit` (a try-out: Ctrl-C leaves nothing enforcing).
    Run {
        /// Skip the setup step.
        #[arg(long)]
        quick: bool,
        /// Arguments for ws-guard, after `--` (e.g. `-- run --config other.toml`).
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Set up, build and run the benchmark (root): ns/packet of the XDP program and Mpps under
    /// SYN floods, next to iptables and nftables. Writes target/bench/{bench.md,bench.json,*.png}.
    Bench {
        /// Skip the setup step.
        #[arg(long)]
        quick: bool,
        /// Seconds instead of minutes: tiny counts (what the tests run).
        #[arg(long)]
        smoke: bool,
        /// Passed to the benchmark binary (e.g. `-- --layer 1`).
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Set up, then build the release artifacts into target/dist/: the Debian package
    /// (cargo-deb), a tarball of the release binary with the unit, config, man pages and
    /// completions, and SHA256SUMS. Prints where it wrote each one.
    Dist {
        /// Skip the setup step.
        #[arg(long)]
        quick: bool,
    },
    /// (Re)build bpf-linker against the nightly's LLVM even if one works, optionally into
    /// another install root (e.g. to try the build without touching the installed one).
    InstallBpfLinker {
        /// Install into DIR/bin instead of the cargo default.
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
    },
}

/// What every task needs to know about this machine.
pub struct Ctx {
    /// The workspace root.
    root: PathBuf,
    /// Cargo's target directory.
    target_dir: PathBuf,
    /// The cargo that runs xtask (same toolchain for the nested builds).
    cargo: OsString,
    /// `$CARGO_HOME/bin`.
    cargo_bin: PathBuf,
    /// `cargo_bin` was not on PATH; xtask added it for its own children.
    cargo_bin_added: bool,
    is_root: bool,
}

impl Ctx {
    fn new() -> anyhow::Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .ok_or_else(|| anyhow!("xtask has no parent directory"))?
            .to_owned();
        let cwd = std::env::current_dir().context("current directory")?;
        let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) if !dir.is_empty() => cwd.join(dir),
            _ => root.join("target"),
        };
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let cargo_home = match (std::env::var_os("CARGO_HOME"), &home) {
            (Some(dir), _) if !dir.is_empty() => cwd.join(dir),
            (_, Some(home)) => home.join(".cargo"),
            (_, None) => bail!("neither CARGO_HOME nor HOME is set"),
        };
        let cargo_bin = cargo_home.join("bin");
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
        let cargo_bin_added = !dirs.contains(&cargo_bin);
        if cargo_bin_added {
            // rustup's proxies and `cargo install`ed tools (bpf-linker) live there; the eBPF build
            // looks bpf-linker up on PATH.
            dirs.insert(0, cargo_bin.clone());
            let path = std::env::join_paths(dirs).context("PATH")?;
            // SAFETY: called from main before any other thread exists.
            unsafe { std::env::set_var("PATH", path) };
        }
        Ok(Self {
            root,
            target_dir,
            cargo: std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()),
            cargo_bin,
            cargo_bin_added,
            // SAFETY: geteuid has no preconditions.
            is_root: unsafe { libc::geteuid() } == 0,
        })
    }

    fn rustup(&self) -> anyhow::Result<PathBuf> {
        which::which("rustup").map_err(|_| {
            anyhow!(
                "rustup not found (looked on PATH and in {}): install it from https://rustup.rs; \
                 the eBPF build needs a rustup-managed nightly",
                self.cargo_bin.display()
            )
        })
    }

    /// Where `cargo install` puts binaries (under `bin/`).
    fn install_root(&self) -> PathBuf {
        match std::env::var_os("CARGO_INSTALL_ROOT") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => self.cargo_bin.parent().unwrap_or(Path::new("/")).to_owned(),
        }
    }

    /// A note for tools found in `$CARGO_HOME/bin` when that is not on the user's PATH.
    fn path_note(&self, tool: &Path) -> String {
        if self.cargo_bin_added && tool.starts_with(&self.cargo_bin) {
            format!(
                " (NOTE: {0} is not on your PATH; xtask adds it for its own builds, but a plain \
                 `cargo build` will not find bpf-linker: export PATH=\"{0}:$PATH\")",
                self.cargo_bin.display()
            )
        } else {
            String::new()
        }
    }

    fn cargo(&self) -> Command {
        let mut cmd = Command::new(&self.cargo);
        cmd.current_dir(&self.root);
        cmd
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let ctx = Ctx::new()?;
    match cli.task {
        Task::Setup => setup::setup(&ctx),
        Task::Test { quick, test_args } => test(&ctx, quick, &test_args),
        Task::Run { quick, args } => run_daemon(&ctx, quick, args),
        Task::Bench { quick, smoke, args } => bench::bench(&ctx, quick, smoke, &args),
        Task::Dist { quick } => {
            if quick {
                println!("xtask dist: --quick: setup skipped");
            } else {
                setup::setup(&ctx).context("setup failed, nothing was built")?;
            }
            dist::dist(&ctx)
        }
        Task::InstallBpfLinker { root } => {
            let root = match root {
                Some(dir) => Some(std::env::current_dir()?.join(dir)),
                None => None,
            };
            setup::install_bpf_linker(&ctx, root.as_deref()).map(|_| ())
        }
    }
}

/// One step of `cargo xtask test` and how it went.
struct Step {
    name: &'static str,
    outcome: Outcome,
}

enum Outcome {
    Passed,
    Failed(String),
    Skipped(&'static str),
}

fn test(ctx: &Ctx, quick: bool, test_args: &[OsString]) -> anyhow::Result<()> {
    if quick {
        println!("xtask test: --quick: setup skipped");
    } else {
        setup::setup(ctx).context("setup failed, nothing was built or tested")?;
    }
    match std::env::var_os("WS_GUARD_REQUIRE_PRIVILEGED") {
        Some(v) => println!(
            "xtask test: WS_GUARD_REQUIRE_PRIVILEGED={}: privileged tests fail instead of skipping",
            v.to_string_lossy()
        ),
        None => println!(
            "xtask test: WS_GUARD_REQUIRE_PRIVILEGED unset: privileged tests skip when not root"
        ),
    }

    let mut steps = Vec::new();
    let mut step = |name: &'static str, cmd: &mut Command, hint: &str| {
        println!("xtask test: {name}");
        let outcome = match run(cmd) {
            Ok(()) => Outcome::Passed,
            Err(e) => Outcome::Failed(format!("{hint}: {e:#}")),
        };
        let passed = matches!(outcome, Outcome::Passed);
        steps.push(Step { name, outcome });
        passed
    };

    const FMT_HINT: &str = "formatting is off (diff above): run `cargo fmt --all`";
    let fmt_check = ["fmt", "--all", "--", "--check"];
    if !step("format check", ctx.cargo().args(fmt_check), FMT_HINT) {
        println!("xtask test: {FMT_HINT}; continuing with the build and tests");
    }
    let built = step(
        "build ws-guard and its eBPF object",
        ctx.cargo().args(["build", "-p", "ws-guard"]),
        "the build failed (errors above)",
    );
    const DIST: &str = "release artifacts (cargo xtask dist)";
    const WORKSPACE_TESTS: &str = "unit and doc tests (workspace except ws-guard-tests)";
    const INTEGRATION_TESTS: &str = "integration tests (ws-guard-tests, one at a time)";
    if built {
        // A release build: the integration test tests/dist.rs installs what it writes to
        // target/dist/ (and fails, under WS_GUARD_REQUIRE_PRIVILEGED, if this step did not).
        let xtask = std::env::current_exe().context("locating the xtask binary")?;
        step(
            DIST,
            Command::new(xtask).args(["dist", "--quick"]),
            "building the release artifacts failed (errors above)",
        );
        // The eBPF crate only builds for the BPF target (ws-guard's build script does that).
        let exclude = ["--exclude", "ws-guard-ebpf", "--exclude", "ws-guard-tests"];
        step(
            WORKSPACE_TESTS,
            ctx.cargo()
                .args(["test", "--workspace"])
                .args(exclude)
                .args(["--no-fail-fast", "--"])
                .args(test_args),
            "some tests failed (see above)",
        );
        // Network-namespace tests measure traffic timing: never two at once.
        step(
            INTEGRATION_TESTS,
            ctx.cargo()
                .args(["test", "-p", "ws-guard-tests", "--no-fail-fast"])
                .args(["--", "--test-threads=1"])
                .args(test_args),
            "some integration tests failed (see above)",
        );
    } else {
        for name in [DIST, WORKSPACE_TESTS, INTEGRATION_TESTS] {
            steps.push(Step {
                name,
                outcome: Outcome::Skipped("the build failed"),
            });
        }
    }

    println!("xtask test: summary");
    let mut failed = Vec::new();
    for Step { name, outcome } in &steps {
        match outcome {
            Outcome::Passed => println!("    ok       {name}"),
            Outcome::Failed(why) => {
                println!("    FAILED   {name}: {why}");
                failed.push(*name);
            }
            Outcome::Skipped(why) => {
                println!("    SKIPPED  {name}: {why}");
                failed.push(*name);
            }
        }
    }
    if failed.is_empty() {
        println!("xtask test: all {} steps passed", steps.len());
        Ok(())
    } else {
        Err(anyhow!(
            "{} of {} steps did not pass: {}",
            failed.len(),
            steps.len(),
            failed.join("; ")
        ))
    }
}

/// The daemon's arguments for `cargo xtask run`: by default `run --config packaging/config.toml`;
/// a `run` always gets `--detach-on-exit`, since this is a try-out (Ctrl-C must not leave the
/// host's interface enforcing; a service keeps enforcing instead, and so does the binary run
/// directly).
fn run_args(args: Vec<OsString>, default_config: &Path) -> Vec<OsString> {
    let mut args = if args.is_empty() {
        vec![
            "run".into(),
            "--config".into(),
            default_config.as_os_str().to_owned(),
        ]
    } else {
        args
    };
    if args.first().is_some_and(|a| a == "run") && !args.iter().any(|a| a == "--detach-on-exit") {
        args.push("--detach-on-exit".into());
    }
    args
}

/// Builds the release daemon and replaces this process with it, so Ctrl-C and SIGTERM reach the
/// daemon directly and it shuts down (and detaches) cleanly.
fn run_daemon(ctx: &Ctx, quick: bool, args: Vec<OsString>) -> anyhow::Result<()> {
    if quick {
        println!("xtask run: --quick: setup skipped");
    } else {
        setup::setup(ctx).context("setup failed, not starting ws-guard")?;
    }
    println!("xtask run: building ws-guard (release)");
    run(ctx.cargo().args(["build", "--release", "-p", "ws-guard"]))
        .context("building ws-guard failed (errors above)")?;
    let bin = ctx.target_dir.join("release/ws-guard");
    let args = run_args(args, &ctx.root.join("packaging/config.toml"));
    let mut cmd =
        if ctx.is_root {
            Command::new(&bin)
        } else {
            let sudo = which::which("sudo").map_err(|_| {
            anyhow!(
                "ws-guard must run as root (BPF, XDP) and sudo is not installed: run it as root: \
                 {} {}",
                bin.display(),
                args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
            )
        })?;
            let mut cmd = Command::new(sudo);
            cmd.arg("--");
            // sudo resets the environment; keep the log level the user asked for.
            if let Some(level) = std::env::var_os("RUST_LOG") {
                let mut assign = OsString::from("RUST_LOG=");
                assign.push(level);
                cmd.arg("env").arg(assign);
            }
            cmd.arg(&bin);
            cmd
        };
    cmd.args(&args);
    println!("xtask run: exec {}", proc::describe(&cmd));
    let err = cmd.exec();
    Err(anyhow!("could not exec {}: {err}", proc::describe(&cmd)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_always_detaches_on_exit() {
        let cfg = Path::new("/cfg.toml");
        let s = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            run_args(Vec::new(), cfg),
            s(&["run", "--config", "/cfg.toml", "--detach-on-exit"])
        );
        assert_eq!(
            run_args(s(&["run", "--config", "x.toml"]), cfg),
            s(&["run", "--config", "x.toml", "--detach-on-exit"])
        );
        assert_eq!(
            run_args(s(&["run", "--detach-on-exit"]), cfg),
            s(&["run", "--detach-on-exit"])
        );
        assert_eq!(run_args(s(&["status"]), cfg), s(&["status"]));
    }
}
