//! systemd integration: `packaging/ws-guard.service` passes `systemd-analyze verify`, and the
//! real daemon speaks the notification protocol (sd_notify(3)) to a socket this test binds in
//! place of systemd: READY=1 only once XDP is attached and metrics listen, WATCHDOG=1 at half
//! of WATCHDOG_USEC, RELOADING=1 then READY=1 around a SIGHUP reload, STOPPING=1 on SIGTERM.
//!
//! The daemon runs with `nsenter --net` (which execs it, so the PID is its own, and keeps the
//! host's mount namespace, so the socket's path under /tmp is the same for it).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ws_guard_tests::{
    binary::PinRoot,
    binary::binary,
    netns::{Testbed, in_ns, ip_output, test_port, wait_until},
    privileged,
};

fn unit_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/ws-guard.service")
}

fn find_program(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

/// `systemd-analyze verify` of `unit` (a copy whose ExecStart names the built binary, since
/// verify checks that the command exists): its exit status and everything it printed.
fn verify(analyze: &Path, text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("ws-guard.service");
    std::fs::write(&copy, text).unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("running systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[test]
fn unit_file_passes_systemd_analyze_verify() {
    let Some(analyze) = find_program("systemd-analyze") else {
        if std::env::var_os("WS_GUARD_REQUIRE_PRIVILEGED").is_some() {
            panic!(
                "systemd-analyze is not installed (package systemd; `cargo xtask setup` installs \
                 it) and WS_GUARD_REQUIRE_PRIVILEGED is set"
            );
        }
        eprintln!(
            "SKIPPED unit_file_passes_systemd_analyze_verify: systemd-analyze is not installed \
             (package systemd)"
        );
        return;
    };
    let shipped = std::fs::read_to_string(unit_file()).expect("packaging/ws-guard.service");
    let exec = "ExecStart=/usr/local/bin/ws-guard run --config /etc/ws-guard/config.toml\n";
    assert!(shipped.contains(exec), "the unit's ExecStart changed");
    let local = shipped.replace(
        "ExecStart=/usr/local/bin/ws-guard ",
        &format!("ExecStart={} ", binary().display()),
    );
    let (ok, said) = verify(&analyze, &local);
    assert!(
        ok && said.trim().is_empty(),
        "systemd-analyze verify: success {ok}, said:\n{said}"
    );
    // verify exits 0 on some bad settings and only warns: the check must see those too.
    let (_, said) = verify(&analyze, &local.replace("Type=notify\n", "Type=notifyy\n"));
    assert!(
        said.contains("notifyy"),
        "a bad Type= went unnoticed: {said}"
    );

    // What the unit promises (README, SECURITY.md): notify with a watchdog, reload by SIGHUP,
    // no teardown on stop, and exactly the reviewed capabilities.
    let settings: Vec<&str> = shipped
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    for want in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "WatchdogSec=30s",
        "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON",
        "AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_PERFMON",
        "ProtectSystem=strict",
        "ReadWritePaths=/sys/fs/bpf",
        "RuntimeDirectory=ws-guard",
        "RuntimeDirectoryMode=0700",
        "StateDirectory=ws-guard",
        "StateDirectoryMode=0700",
        "NoNewPrivileges=yes",
        "LimitMEMLOCK=infinity",
    ] {
        assert!(settings.contains(&want), "the unit lacks {want}");
    }
    // The directories systemd creates are where the default config puts the socket and state.
    assert!(ws_guard::config::DEFAULT_CONTROL_SOCKET.starts_with("/run/ws-guard/"));
    assert!(ws_guard::config::DEFAULT_STATE_FILE.starts_with("/var/lib/ws-guard/"));
    assert!(
        !settings.iter().any(|l| l.starts_with("ExecStop")),
        "stopping must leave the pins enforcing"
    );
}

/// Our child (its PID is the daemon's, see the module comment); killed by PID on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The notification socket: every datagram, split into its `KEY=VALUE` lines.
struct NotifySocket(UnixDatagram);

impl NotifySocket {
    /// The next message within `limit`, or None.
    fn next(&self, limit: Duration) -> Option<Vec<String>> {
        self.0.set_read_timeout(Some(limit)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.0.recv(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        eprintln!("notify: {text:?}");
        Some(text.lines().map(str::to_owned).collect())
    }

    /// Waits up to `limit` for a message with the line `want`, returning it and how many
    /// WATCHDOG=1-only messages came before it.
    fn wait_for(&self, want: &str, limit: Duration) -> (Option<Vec<String>>, usize) {
        let start = Instant::now();
        let mut pings = 0;
        for _ in 0..10_000 {
            let Some(left) = limit.checked_sub(start.elapsed()) else {
                break;
            };
            let Some(msg) = self.next(left.max(Duration::from_millis(1))) else {
                break;
            };
            if msg.iter().any(|l| l == want) {
                return (Some(msg), pings);
            }
            if msg == ["WATCHDOG=1"] {
                pings += 1;
            }
        }
        (None, pings)
    }
}

fn lines_contain(log: &Mutex<Vec<String>>, needle: &str) -> bool {
    log.lock().unwrap().iter().any(|l| l.contains(needle))
}

#[test]
fn daemon_notifies_ready_watchdog_reload_and_stop() {
    if !privileged("daemon_notifies_ready_watchdog_reload_and_stop") {
        return;
    }
    let port = test_port(12);
    let metrics_port = test_port(13);
    let tb = Testbed::new("sdn", 46);
    // Declared after the test bed: dropped (pins removed) before its namespaces go.
    let root = PinRoot::new("sdn");
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = NotifySocket(UnixDatagram::bind(&sock_path).expect("binding the notify socket"));
    let cfg_path = dir.path().join("config.toml");
    let write_cfg = |max: u32| {
        let mut f = std::fs::File::create(&cfg_path).unwrap();
        write!(
            f,
            "interfaces = [\"{}\"]\nsweep_interval = \"200ms\"\n[capacity]\nsources = 1024\n\
             flows = 4096\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
             [[port]]\nport = {port}\nmax_connections = {max}\n",
            tb.srv_if
        )
        .unwrap();
    };
    write_cfg(2);

    let private = ws_guard_tests::binary::Private::new();
    // WATCHDOG_PID is the shell's PID, which exec keeps through nsenter to the daemon: the
    // daemon checks it is its own (sd_watchdog_enabled(3)).
    let child = Command::new("sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$@\"")
        .arg("sh")
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{}", tb.srv))
        .arg(binary())
        .args(["run", "--config", cfg_path.to_str().unwrap()])
        .args(["--pin-dir", root.0.to_str().unwrap(), "--detach-on-exit"])
        .args(private.args())
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the daemon");
    let mut daemon = Daemon(child);
    let pid = daemon.0.id() as i32;
    let stderr = daemon.0.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().take(100_000) {
                let Ok(line) = line else { break };
                eprintln!("daemon: {line}");
                log.lock().unwrap().push(line);
            }
        })
    };

    // READY=1: at that moment XDP must be on the interface and the metrics port must answer.
    let (ready, _) = sock.wait_for("READY=1", Duration::from_secs(20));
    let ready = ready.unwrap_or_else(|| panic!("no READY=1 within 20 s: {:?}", log.lock()));
    let link = ip_output(&["-n", &tb.srv, "link", "show", "dev", &tb.srv_if]);
    assert!(
        link.contains("xdp"),
        "READY=1 before XDP was attached: {link}"
    );
    let metrics_up = in_ns(&tb.srv, move || {
        TcpStream::connect(("127.0.0.1", metrics_port)).is_ok()
    });
    assert!(metrics_up, "READY=1 before the metrics endpoint listened");
    let status = format!("STATUS=enforcing on {} (", tb.srv_if);
    assert!(
        ready.iter().any(|l| l.starts_with(&status)),
        "READY=1 without the status line: {ready:?}"
    );
    assert!(
        wait_until(Duration::from_secs(2), || lines_contain(
            &log,
            &format!("enforcing on {}", tb.srv_if)
        )),
        "{:?}",
        log.lock()
    );

    // WATCHDOG=1 every 0.5 s (half of WATCHDOG_USEC).
    let start = Instant::now();
    let mut pings = 0;
    while let Some(left) = Duration::from_millis(1500).checked_sub(start.elapsed()) {
        match sock.next(left.max(Duration::from_millis(1))) {
            Some(m) if m == ["WATCHDOG=1"] => pings += 1,
            Some(m) => panic!("unexpected notification while idle: {m:?}"),
            None => break,
        }
    }
    assert!(pings >= 2, "{pings} WATCHDOG=1 within 1.5 s");

    // SIGHUP with a changed file: RELOADING=1, then READY=1 once applied.
    write_cfg(3);
    // SAFETY: kill(2) on our own unreaped child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let (reloading, _) = sock.wait_for("RELOADING=1", Duration::from_secs(5));
    let reloading = reloading.expect("no RELOADING=1 within 5 s of SIGHUP");
    assert!(
        reloading.iter().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{reloading:?}"
    );
    let (ready, _) = sock.wait_for("READY=1", Duration::from_secs(5));
    assert!(ready.is_some(), "no READY=1 after the reload");
    assert!(
        wait_until(Duration::from_secs(2), || lines_contain(&log, "reloaded")),
        "{:?}",
        log.lock()
    );
    // Still pinging after the reload.
    let (_, pings) = sock.wait_for("never sent", Duration::from_millis(1200));
    assert!(
        pings >= 2,
        "{pings} WATCHDOG=1 within 1.2 s after the reload"
    );

    // SIGTERM: STOPPING=1, then a clean exit.
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let (stopping, _) = sock.wait_for("STOPPING=1", Duration::from_secs(5));
    assert!(stopping.is_some(), "no STOPPING=1 within 5 s of SIGTERM");
    let exited = wait_until(Duration::from_secs(10), || {
        daemon.0.try_wait().ok().flatten().is_some()
    });
    assert!(exited, "no exit within 10 s of SIGTERM");
    let status = daemon.0.wait().unwrap();
    reader.join().unwrap();
    assert!(status.success(), "exit status {status}: {:?}", log.lock());
}

#[test]
fn watchdog_pid_of_another_process_sends_no_pings() {
    if !privileged("watchdog_pid_of_another_process_sends_no_pings") {
        return;
    }
    let port = test_port(16);
    let tb = Testbed::new("sdw", 47);
    let root = PinRoot::new("sdw");
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = NotifySocket(UnixDatagram::bind(&sock_path).expect("binding the notify socket"));
    let cfg_path = dir.path().join("config.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "interfaces = [\"{}\"]\n[capacity]\nsources = 1024\nflows = 4096\n[metrics]\n\
             listen = \"off\"\n\n[[port]]\nport = {port}\nmax_connections = 2\n",
            tb.srv_if
        ),
    )
    .unwrap();
    let private = ws_guard_tests::binary::Private::new();
    // The watchdog belongs to PID 1, not to the daemon: it must not ping (a forked helper
    // would otherwise keep a hung main process alive).
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", tb.srv))
        .arg(binary())
        .args(["run", "--config", cfg_path.to_str().unwrap()])
        .args(["--pin-dir", root.0.to_str().unwrap(), "--detach-on-exit"])
        .args(private.args())
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000")
        .env("WATCHDOG_PID", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the daemon");
    let mut daemon = Daemon(child);
    let (ready, pings) = sock.wait_for("READY=1", Duration::from_secs(20));
    assert!(ready.is_some(), "no READY=1 within 20 s");
    let (_, later) = sock.wait_for("never sent", Duration::from_millis(800));
    assert_eq!(
        pings + later,
        0,
        "WATCHDOG=1 sent for another PID's watchdog"
    );
    // SAFETY: kill(2) on our own unreaped child.
    assert_eq!(
        unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) },
        0
    );
    let exited = wait_until(Duration::from_secs(10), || {
        daemon.0.try_wait().ok().flatten().is_some()
    });
    assert!(exited, "no exit within 10 s of SIGTERM");
}
