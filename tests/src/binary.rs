//! The ws-guard binary the integration tests run, and what it leaves on bpffs.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::netns::wait_until;

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

/// A control socket and a state file of one daemon of a test, in a directory removed on drop,
/// so test daemons never use (or leave) /run/ws-guard or /var/lib/ws-guard.
pub struct Private(tempfile::TempDir);

impl Private {
    pub fn new() -> Self {
        Self(tempfile::tempdir().expect("creating a private directory"))
    }

    /// `--socket S --state-file F` for `ws-guard run`.
    pub fn args(&self) -> [String; 4] {
        let p = |name: &str| self.0.path().join(name).to_str().unwrap().to_owned();
        [
            "--socket".into(),
            p("control.sock"),
            "--state-file".into(),
            p("runtime.toml"),
        ]
    }
}

impl Private {
    /// For a `ws-guard run` command line that does not choose its socket and state file (in
    /// its arguments or its config file), private ones; else None.
    pub fn unless_chosen(cmd: &Command) -> Option<Self> {
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let config = args
            .iter()
            .position(|a| a == "--config")
            .and_then(|i| args.get(i + 1))
            .and_then(|path| std::fs::read_to_string(path).ok())
            .unwrap_or_default();
        let chosen = args.iter().any(|a| a == "--socket" || a == "--state-file")
            || config.contains("[control]")
            || config.contains("state_file");
        (args.iter().any(|a| a == "run") && !chosen).then(Private::new)
    }
}

impl Default for Private {
    fn default() -> Self {
        Self::new()
    }
}

/// Collects the lines `from` gives (at most 100,000), echoing each as `label: line`, on a
/// thread of its own; the lines so far, and the thread (it ends at end of file).
pub fn collect_lines(
    from: impl std::io::Read + Send + 'static,
    label: &'static str,
) -> (Arc<Mutex<Vec<String>>>, std::thread::JoinHandle<()>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(from).lines().take(100_000) {
                let Ok(line) = line else { break };
                eprintln!("{label}: {line}");
                lines.lock().unwrap().push(line);
            }
        })
    };
    (lines, reader)
}

/// A running daemon, its stderr collected line by line; killed by PID on drop if still running.
pub struct Daemon {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    /// Its socket and state file, unless the test chose them.
    _private: Option<Private>,
}

impl Daemon {
    /// Starts `cmd` and waits (20 s at most) for "enforcing on".
    pub fn start(cmd: Command) -> Self {
        let mut d = Self::spawn(cmd);
        let started = wait_until(Duration::from_secs(20), || {
            d.contains("enforcing on") || d.child.try_wait().ok().flatten().is_some()
        });
        assert!(
            started && d.contains("enforcing on"),
            "the daemon did not start: {:?}",
            d.lines()
        );
        d
    }

    /// Starts `cmd` without waiting for anything (see [`Daemon::start`]).
    pub fn spawn(mut cmd: Command) -> Self {
        let private = Private::unless_chosen(&cmd);
        if let Some(p) = &private {
            cmd.args(p.args());
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the daemon");
        let (log, reader) = collect_lines(child.stderr.take().unwrap(), "daemon");
        Self {
            child,
            log,
            reader: Some(reader),
            _private: private,
        }
    }

    /// Starts the binary with `args` in network namespace `ns` through `nsenter --net` (which
    /// execs it, so the PID is the daemon's and it keeps the host's bpffs pins).
    pub fn start_in(ns: &str, args: &[&str]) -> Self {
        Self::start(Self::command_in(ns, args))
    }

    /// Like [`Daemon::start_in`], without waiting for anything.
    pub fn spawn_in(ns: &str, args: &[&str]) -> Self {
        Self::spawn(Self::command_in(ns, args))
    }

    fn command_in(ns: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}"))
            .arg(binary())
            .args(args);
        cmd
    }

    pub fn contains(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    pub fn count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn wait_for(&self, needle: &str, limit: Duration) -> bool {
        wait_until(limit, || self.contains(needle))
    }

    /// Sends `signal` (e.g. SIGHUP) to the still running, unreaped process; does not wait.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own unreaped child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }

    /// The daemon's PID (nsenter execs it, so it is the daemon's own).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (at most `limit`, then panics) for the daemon to exit by itself; its status.
    pub fn stop_when_exited(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        let status = loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                break st;
            }
            assert!(
                start.elapsed() < limit,
                "the daemon did not exit within {limit:?}: {:?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        status
    }

    /// Sends `signal` to the (unreaped, so still ours) process and waits for its exit.
    pub fn stop(&mut self, signal: i32) -> std::process::ExitStatus {
        assert!(
            matches!(self.child.try_wait(), Ok(None)),
            "the daemon exited early: {:?}",
            self.lines()
        );
        // SAFETY: kill(2) on our own unreaped child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
        let start = Instant::now();
        let status = loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                break st;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no exit within 10 s of signal {signal}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        status
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A pin root of one test (`/sys/fs/bpf/ws-guard-test-TAG-PID`); whatever is left under it is
/// removed on drop. Declare it after the test bed, so it is dropped before the namespaces go.
pub struct PinRoot(pub PathBuf);

impl PinRoot {
    pub fn new(tag: &str) -> Self {
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/ws-guard-test-{tag}-{}",
            std::process::id()
        )))
    }

    /// The root as a `--pin-dir` argument.
    pub fn path(&self) -> String {
        self.0.to_str().unwrap().to_owned()
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        if let Err(e) = ws_guard::pin::teardown(&self.0) {
            eprintln!("warning: removing {}: {e:#}", self.0.display());
        }
    }
}

/// The files of one test daemon: a pin root (`/sys/fs/bpf/ws-guard-test-TAG-PID`) and a
/// private directory for its config, control socket and state file. The pins are removed on
/// drop, the directory with it.
pub struct DaemonFiles {
    pub pins: PathBuf,
    pub dir: tempfile::TempDir,
}

impl DaemonFiles {
    pub fn new(tag: &str) -> Self {
        Self {
            pins: PathBuf::from(format!(
                "/sys/fs/bpf/ws-guard-test-{tag}-{}",
                std::process::id()
            )),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run/control.sock")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("lib/runtime.toml")
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// Writes the config: `interface`, a 200 ms sweep, this socket and state file, small
    /// maps, no metrics endpoint, then `top` (more top-level keys) and `ports` (tables).
    pub fn write_config(&self, interface: &str, top: &str, ports: &str) {
        std::fs::write(
            self.config(),
            format!(
                "interfaces = [\"{interface}\"]\nsweep_interval = \"200ms\"\nstate_file = \
                 \"{}\"\n{top}\n[control]\nsocket = \"{}\"\n[capacity]\nsources = 1024\n\
                 flows = 4096\n[metrics]\nlisten = \"off\"\n\n{ports}",
                self.state().display(),
                self.socket().display()
            ),
        )
        .unwrap();
    }

    /// `run --config C --pin-dir P`, then `extra`.
    pub fn run_args(&self, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "run",
            "--config",
            self.config().to_str().unwrap(),
            "--pin-dir",
            self.pins.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Starts the daemon with these files in namespace `ns` (waits for "enforcing on").
    pub fn start(&self, ns: &str, extra: &[&str]) -> Daemon {
        let args = self.run_args(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start_in(ns, &args)
    }
}

impl Drop for DaemonFiles {
    fn drop(&mut self) {
        if let Err(e) = ws_guard::pin::teardown(&self.pins) {
            eprintln!("warning: removing {}: {e:#}", self.pins.display());
        }
    }
}

/// What one CLI run gave.
#[derive(Debug)]
pub struct CliRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    /// Asserts success.
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "{self:?}");
        self
    }

    /// Asserts success and parses the output as JSON.
    pub fn json(self) -> serde_json::Value {
        let r = self.ok();
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
    }
}

/// Runs a CLI command (stdin closed); what it gave.
pub fn run_cli(mut cmd: Command) -> CliRun {
    let out = cmd.stdin(Stdio::null()).output().expect("running the CLI");
    CliRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `ws-guard --socket SOCKET ARGS...` (from the host namespace: the socket is a file), logged
/// with how long it took.
pub fn wsg(socket: &Path, args: &[&str]) -> CliRun {
    let mut cmd = Command::new(binary());
    cmd.arg("--socket").arg(socket).args(args);
    let start = Instant::now();
    let r = run_cli(cmd);
    eprintln!(
        "$ ws-guard {} -> {} in {:?}\n{}{}",
        args.join(" "),
        r.code,
        start.elapsed(),
        r.stdout,
        r.stderr
    );
    r
}
