//! Enforcement outlives the daemon: `kill -9` of the real binary while clients keep connecting,
//! a restart that adopts the pinned state, then the default exit (still enforcing) and
//! `ws-guard teardown`.
//!
//! The daemon runs in the server namespace with `nsenter --net` rather than `ip netns exec`:
//! the latter gives it a private mount namespace, whose bpffs (and so every pin) would go with
//! the process.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, TcpStream},
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use ws_guard_tests::{
    binary::binary,
    binary::{Daemon, pins_under},
    binary::{PinRoot, Private},
    netns::{Testbed, in_ns, ip_output, sa, test_port, wait_until},
    privileged,
    traffic::{Outcome, Server, Stack, connect_from},
};

/// `ws_guard_active_connections` of `port` (IPv4) from the daemon's metrics endpoint in `ns`.
fn active_connections(ns: &str, metrics_port: u16, port: u16) -> Option<u64> {
    let body = in_ns(ns, || {
        let mut s = TcpStream::connect(("127.0.0.1", metrics_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    })?;
    let prefix = format!("ws_guard_active_connections{{family=\"ipv4\",port=\"{port}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// A config file: the test bed's server interface, `port` at one connection per source, no
/// metrics endpoint.
fn one_connection_config(tb: &Testbed, port: u16) -> tempfile::NamedTempFile {
    let mut cfg = tempfile::NamedTempFile::new().unwrap();
    write!(
        cfg,
        "interfaces = [\"{}\"]\n[metrics]\nlisten = \"off\"\n[[port]]\nport = {port}\nmax_connections = 1\n",
        tb.srv_if
    )
    .unwrap();
    cfg
}

fn xdp_on(tb: &Testbed) -> bool {
    ip_output(&["-n", &tb.srv, "link", "show", "dev", &tb.srv_if]).contains("xdp")
}

#[test]
fn enforcement_survives_kill_and_restart_adopts_the_counts() {
    if !privileged("enforcement_survives_kill_and_restart_adopts_the_counts") {
        return;
    }
    let port = test_port(21);
    let metrics_port = 9105;
    let tb = Testbed::new("rst", 21);
    // Declared after the test bed: dropped (pins removed) before its namespaces go.
    let root = PinRoot::new("rst");
    let root_s = root.0.to_str().unwrap().to_owned();
    let server = Server::start(&tb.srv, port, Stack::Separate);
    let mut cfg = tempfile::NamedTempFile::new().unwrap();
    write!(
        cfg,
        "interfaces = [\"{}\"]\nsweep_interval = \"200ms\"\n[capacity]\nsources = 1024\nflows = 4096\n\
         [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
         [[port]]\nport = {port}\nmax_connections = 2\nconnection_action = \"reject\"\n",
        tb.srv_if
    )
    .unwrap();
    let cfg_path = cfg.path().to_str().unwrap().to_owned();
    // The CLI reaches the daemon through this socket (a file: from the host namespace).
    let private = Private::new();
    let sock = private.args()[1].clone();
    let args = run_args(&cfg_path, &root_s, &private);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let bans = || -> Vec<(String, u64, String)> {
        let v: serde_json::Value =
            serde_json::from_str(&cli(&sock, &["--json", "bans", "list"])).unwrap();
        v["bans"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["source"].as_str().unwrap().to_owned(),
                    b["port"].as_u64().unwrap(),
                    b["reason"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };

    let mut first = Daemon::start_in(&tb.srv, &args);
    assert!(first.contains("no pinned state"), "{:?}", first.lines());
    let dst = sa(tb.server_v4(), port);
    let a: IpAddr = tb.client_v4(0);
    let b: IpAddr = tb.client_v4(1);
    let connect = |src: IpAddr| connect_from(&tb.cli, src, dst, Duration::from_secs(2));
    let a1 = connect(a).stream();
    let a2 = connect(a).stream();
    assert!(matches!(connect(a), Outcome::Refused));
    assert!(server.wait_held(2, Duration::from_secs(5)));
    // A third source is banned with the CLI: refused before, during and after the kill.
    let c: IpAddr = tb.client_v4(2);
    let port_s = port.to_string();
    cli(
        &sock,
        &[
            "bans",
            "add",
            &c.to_string(),
            "--port",
            &port_s,
            "--duration",
            "10m",
        ],
    );
    let banned = bans();
    assert_eq!(
        banned,
        [(format!("{c}/32"), port as u64, "manual".to_owned())]
    );
    assert!(matches!(connect(c), Outcome::TimedOut));

    // A client keeps trying from `a` through the kill, the downtime and the restart.
    let stop = Arc::new(AtomicBool::new(false));
    let admitted = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let hammer = {
        let (stop, admitted, refused) = (stop.clone(), admitted.clone(), refused.clone());
        let cli = tb.cli.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(60) {
                match connect_from(&cli, a, dst, Duration::from_secs(1)) {
                    Outcome::Connected(_) => admitted.fetch_add(1, Ordering::Relaxed),
                    Outcome::Refused => refused.fetch_add(1, Ordering::Relaxed),
                    _ => 0,
                };
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(200));

    // kill -9: nothing runs in userspace any more.
    let status = first.stop(libc::SIGKILL);
    assert!(!status.success());
    assert!(xdp_on(&tb), "the XDP program went with the daemon");
    let during = refused.load(Ordering::Relaxed);
    assert!(
        wait_until(Duration::from_secs(3), || refused.load(Ordering::Relaxed)
            > during),
        "no refusal seen while the daemon is down"
    );
    // Another source still gets its own two slots, and no more.
    let b1 = connect(b).stream();
    let b2 = connect(b).stream();
    assert!(matches!(connect(b), Outcome::Refused));
    // A close while the daemon is down gives the slot back (the tracepoint is still attached).
    stop.store(true, Ordering::Relaxed);
    hammer.join().unwrap();
    let peer = a1.local_addr().unwrap();
    assert!(server.reset(peer));
    drop(a1);
    let mut a3 = None;
    assert!(
        wait_until(Duration::from_secs(5), || match connect(a) {
            Outcome::Connected(s) => {
                a3 = Some(s);
                true
            }
            _ => false,
        }),
        "the slot of the connection closed while the daemon was down was not given back"
    );
    assert!(matches!(connect(a), Outcome::Refused));
    assert!(server.wait_held(4, Duration::from_secs(5)));
    // `status` with the daemon down: exit 3, and what the kernel enforces, from the pins.
    let out = Command::new(binary())
        .args(["--socket", &sock, "status", "--pin-dir", &root_s])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        text.contains("the kernel keeps enforcing")
            && text.contains(&format!("attached to {}", tb.srv_if))
            && text.contains(&format!(
                "port {port}: max_connections 2 (then reject), new_connections none (then \
                 drop); 4 connection(s) held by 2 source(s)"
            ))
            && text.contains("bans pinned: 1"),
        "{text}"
    );
    let out = Command::new(binary())
        .args(["--json", "--socket", &sock, "status", "--pin-dir", &root_s])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["daemon"], "down", "{v}");
    assert_eq!(v["pinned"]["ports"][0]["connections"], 4, "{v}");

    // The hammer thread again, through the restart.
    let stop = Arc::new(AtomicBool::new(false));
    let admitted2 = Arc::new(AtomicUsize::new(0));
    let hammer = {
        let (stop, admitted2) = (stop.clone(), admitted2.clone());
        let cli = tb.cli.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(60) {
                if connect_from(&cli, a, dst, Duration::from_secs(1)).is_connected() {
                    admitted2.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let mut second = Daemon::start_in(&tb.srv, &args);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    hammer.join().unwrap();
    assert_eq!(
        admitted.load(Ordering::Relaxed) + admitted2.load(Ordering::Relaxed),
        0,
        "an over-limit connection was admitted around the kill or the restart"
    );
    assert!(
        second.contains("adopted the pinned state")
            && second.contains("4 connections held by 2 sources"),
        "{:?}",
        second.lines()
    );
    assert!(
        second.contains("replaced the pinned XDP program atomically"),
        "{:?}",
        second.lines()
    );
    // The sweep, the metrics: the same counts; the CLI: the same bans.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(active_connections(&tb.srv, metrics_port, port), Some(4));
    assert_eq!(bans(), banned, "the restarted daemon reports other bans");
    assert!(matches!(connect(c), Outcome::TimedOut));
    assert!(matches!(connect(a), Outcome::Refused));
    assert!(matches!(connect(b), Outcome::Refused));

    // The default exit leaves everything pinned and enforcing.
    let status = second.stop(libc::SIGTERM);
    assert!(status.success(), "{status}: {:?}", second.lines());
    assert!(second.contains("stay pinned"), "{:?}", second.lines());
    assert!(xdp_on(&tb));
    assert!(matches!(connect(a), Outcome::Refused));

    // A restart whose configuration needs a longer rate window (a count of 20, where there was
    // none: 1 stamp per source) cannot adopt the source and flow maps: they are made afresh,
    // the established connections counted again from the kernel's sockets, and the limits hold
    // throughout.
    std::fs::write(
        cfg.path(),
        format!(
            "interfaces = [\"{}\"]\nsweep_interval = \"200ms\"\n[capacity]\nsources = 1024\n\
             flows = 4096\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n[[port]]\n\
             port = {port}\nmax_connections = 2\nconnection_action = \"reject\"\n\
             new_connections = \"20/100s\"\n",
            tb.srv_if
        ),
    )
    .unwrap();
    let mut third = Daemon::start_in(&tb.srv, &args);
    assert!(
        third.contains("this configuration needs 20: the source and flow maps are made afresh"),
        "{:?}",
        third.lines()
    );
    assert!(
        third.contains("rate windows keep the last 20 attempts of each source"),
        "{:?}",
        third.lines()
    );
    assert!(
        wait_until(Duration::from_secs(5), || active_connections(
            &tb.srv,
            metrics_port,
            port
        ) == Some(4)),
        "the connections were not counted again"
    );
    assert!(matches!(connect(a), Outcome::Refused));
    assert!(matches!(connect(b), Outcome::Refused));
    // A count above the ring is refused live, saying what to do.
    let out = Command::new(binary())
        .args([
            "--socket",
            &sock,
            "limits",
            "set",
            "--port",
            &port_s,
            "--new-connections",
            "25/10s",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("capacity.rate_attempts"),
        "{out:?}"
    );
    let status = third.stop(libc::SIGTERM);
    assert!(status.success(), "{status}: {:?}", third.lines());

    // `teardown` removes it all.
    let out = Command::new(binary())
        .args(["teardown", "--pin-dir", &root_s])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!root.0.exists(), "{} left: {}", root_s, pins_under(&root.0));
    assert!(!xdp_on(&tb), "XDP still attached after teardown");
    assert!(connect(a).is_connected(), "still enforcing after teardown");
    drop((a2, a3, b1, b2));
}

#[test]
fn detach_on_exit_removes_everything() {
    if !privileged("detach_on_exit_removes_everything") {
        return;
    }
    let port = test_port(22);
    let tb = Testbed::new("rsd", 22);
    let root = PinRoot::new("d");
    let root_s = root.0.to_str().unwrap().to_owned();
    let _server = Server::start(&tb.srv, port, Stack::Separate);
    let cfg = one_connection_config(&tb, port);
    let cfg_path = cfg.path().to_str().unwrap().to_owned();
    let mut d = Daemon::start_in(
        &tb.srv,
        &[
            "run",
            "--config",
            &cfg_path,
            "--pin-dir",
            &root_s,
            "--detach-on-exit",
        ],
    );
    assert!(pins_under(&root.0) > 0, "nothing pinned under {root_s}");
    let dst = sa(tb.server_v4(), port);
    let a = tb.client_v4(0);
    let c1 = connect_from(&tb.cli, a, dst, Duration::from_secs(2)).stream();
    assert!(matches!(
        connect_from(&tb.cli, a, dst, Duration::from_secs(2)),
        Outcome::Refused
    ));
    let status = d.stop(libc::SIGTERM);
    assert!(status.success(), "{status}: {:?}", d.lines());
    assert!(!root.0.exists(), "pins left under {root_s}");
    assert!(!xdp_on(&tb), "XDP still attached");
    assert!(connect_from(&tb.cli, a, dst, Duration::from_secs(2)).is_connected());
    drop(c1);
}

/// A pin directory another user could change is refused before anything is pinned in it: with
/// bpffs mounted world-writable (its default mode), any local user could create
/// `/sys/fs/bpf/ws-guard` first and then unlink the daemon's link pins (SECURITY.md).
#[test]
fn pin_directory_another_user_can_change_is_refused() {
    if !privileged("pin_directory_another_user_can_change_is_refused") {
        return;
    }
    use std::os::unix::fs::{PermissionsExt as _, chown};
    use ws_guard::pin::{PinDir, ensure_bpffs};
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let root = PathBuf::from(format!("/sys/fs/bpf/wsg-squat-{}", std::process::id()));
    ensure_bpffs(&root).expect("bpffs");
    std::fs::create_dir(&root).expect("create");
    let _remove = Remove(root.clone());
    let nobody = 65534;
    chown(&root, Some(nobody), Some(nobody)).expect("chown");
    let e = format!("{:#}", PinDir::new(&root).prepare().unwrap_err());
    assert!(e.contains("owned by uid 65534"), "{e}");
    chown(&root, Some(0), Some(0)).expect("chown");
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = format!("{:#}", PinDir::new(&root).prepare().unwrap_err());
    assert!(e.contains("mode 777"), "{e}");
    // Sticky, like the root of bpffs mounted without a mode: others cannot touch our entries.
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o1777)).unwrap();
    PinDir::new(&root)
        .prepare()
        .expect("sticky root-owned directory");
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    PinDir::new(&root).prepare().expect("private directory");
    // A subdirectory planted by another user is refused too.
    let maps = PinDir::new(&root).dir().join("maps");
    chown(&maps, Some(nobody), Some(nobody)).expect("chown");
    let e = format!("{:#}", PinDir::new(&root).prepare().unwrap_err());
    assert!(
        e.contains(&format!("{} is owned by uid 65534", maps.display())),
        "{e}"
    );
}

/// An upgrade to a daemon with another map layout (a new `LAYOUT_VERSION`) takes over the older
/// daemon's XDP link and swaps its program atomically: the interface is never without XDP, the
/// older version's pins are removed, the connection held through the upgrade is counted again
/// from the kernel's socket table, the limit holds right after, and the bans in force are
/// carried over (an upgrade lifts no ban).
#[test]
fn upgrade_across_layout_versions_takes_over_the_link() {
    if !privileged("upgrade_across_layout_versions_takes_over_the_link") {
        return;
    }
    use ws_guard_common::names::LAYOUT_VERSION;
    let port = test_port(23);
    let tb = Testbed::new("rsu", 23);
    let root = PinRoot::new("u");
    let root_s = root.0.to_str().unwrap().to_owned();
    let server = Server::start(&tb.srv, port, Stack::Separate);
    let cfg = one_connection_config(&tb, port);
    let cfg_path = cfg.path().to_str().unwrap().to_owned();
    let private = Private::new();
    let sock = private.args()[1].clone();
    let args = run_args(&cfg_path, &root_s, &private);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let wsg = |args: &[&str]| cli(&sock, args);
    let mut old = Daemon::start_in(&tb.srv, &args);
    let dst = sa(tb.server_v4(), port);
    let a = tb.client_v4(0);
    // A banned source, and one whose ban is already over when the upgrade comes.
    let banned = tb.client_v4(2);
    let port_s = port.to_string();
    wsg(&[
        "bans",
        "add",
        &banned.to_string(),
        "--port",
        &port_s,
        "--duration",
        "10m",
    ]);
    wsg(&[
        "bans",
        "add",
        &tb.client_v4(3).to_string(),
        "--port",
        &port_s,
        "--duration",
        "1s",
    ]);
    assert!(matches!(
        connect_from(&tb.cli, banned, dst, Duration::from_millis(700)),
        Outcome::TimedOut
    ));
    let held = connect_from(&tb.cli, a, dst, Duration::from_secs(2)).stream();
    assert!(server.wait_held(1, Duration::from_secs(5)));
    assert!(matches!(
        connect_from(&tb.cli, a, dst, Duration::from_secs(2)),
        Outcome::Refused
    ));
    std::thread::sleep(Duration::from_millis(1100));
    assert!(old.stop(libc::SIGTERM).success(), "{:?}", old.lines());
    // What an older release left: the same pins under an older version's directory.
    let mine = root.0.join(format!("v{LAYOUT_VERSION}"));
    let older = root.0.join(format!("v{}", LAYOUT_VERSION - 1));
    std::fs::rename(&mine, &older).unwrap();
    assert!(xdp_on(&tb), "the older version's link must be enforcing");

    // Watch the interface through the upgrade: XDP must never be missing.
    let stop = Arc::new(AtomicBool::new(false));
    let gaps = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (stop, gaps) = (stop.clone(), gaps.clone());
        let (srv, srv_if) = (tb.srv.clone(), tb.srv_if.clone());
        std::thread::spawn(move || {
            let mut polls = 0;
            while !stop.load(Ordering::Relaxed) && polls < 2000 {
                if !ip_output(&["-n", &srv, "link", "show", "dev", &srv_if]).contains("xdp") {
                    gaps.fetch_add(1, Ordering::Relaxed);
                }
                polls += 1;
            }
            polls
        })
    };
    let mut new = Daemon::start_in(&tb.srv, &args);
    stop.store(true, Ordering::Relaxed);
    let polls = watcher.join().unwrap();
    assert!(polls > 0);
    assert_eq!(
        gaps.load(Ordering::Relaxed),
        0,
        "XDP missing during the upgrade"
    );
    assert!(
        new.contains("took over the XDP link of another layout version"),
        "{:?}",
        new.lines()
    );
    assert!(!older.exists(), "the older version's pins are left");
    assert!(mine.join("links").exists());
    // The ban in force came along; the one that was over did not.
    assert!(
        new.contains(&format!(
            "carried 1 bans in force over from layout v{}",
            LAYOUT_VERSION - 1
        )),
        "{:?}",
        new.lines()
    );
    let bans: serde_json::Value = serde_json::from_str(&wsg(&["--json", "bans", "list"])).unwrap();
    let listed: Vec<&str> = bans["bans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["source"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [format!("{banned}/32")], "{bans}");
    assert!(matches!(
        connect_from(&tb.cli, banned, dst, Duration::from_millis(700)),
        Outcome::TimedOut
    ));
    // The held connection was counted again: the source is still at its maximum.
    assert!(matches!(
        connect_from(&tb.cli, a, dst, Duration::from_secs(2)),
        Outcome::Refused
    ));
    // Closing it gives the slot back through the new version's tracepoint.
    assert!(server.reset(held.local_addr().unwrap()));
    drop(held);
    assert!(
        wait_until(Duration::from_secs(5), || connect_from(
            &tb.cli,
            a,
            dst,
            Duration::from_secs(2)
        )
        .is_connected()),
        "the slot was not given back after the upgrade"
    );
    assert!(new.stop(libc::SIGTERM).success(), "{:?}", new.lines());
}

/// A restart that fails half-way (a second interface without native XDP) keeps the link it took
/// over from the earlier daemon: the protected interface stays protected with its counts, and
/// the interface the failed start attached anew is detached.
#[test]
fn failed_restart_keeps_the_taken_over_link() {
    if !privileged("failed_restart_keeps_the_taken_over_link") {
        return;
    }
    let port = test_port(24);
    let tb = Testbed::new("rsf", 24);
    let root = PinRoot::new("f");
    let root_s = root.0.to_str().unwrap().to_owned();
    let server = Server::start(&tb.srv, port, Stack::Separate);
    // A dummy interface has no native XDP: attaching to it in native mode fails.
    let dummy = Command::new("ip")
        .args(["-n", &tb.srv, "link", "add", "wsgf0", "type", "dummy"])
        .output()
        .expect("ip");
    if !dummy.status.success() {
        let out = Command::new("ip")
            .args(["-n", &tb.srv, "link", "add", "wsgf0", "type", "bridge"])
            .output()
            .expect("ip");
        assert!(out.status.success(), "{out:?}");
    }
    let up = Command::new("ip")
        .args(["-n", &tb.srv, "link", "set", "wsgf0", "up"])
        .status()
        .expect("ip");
    assert!(up.success());
    let config = |interfaces: &str| {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        write!(
            f,
            "interfaces = [{interfaces}]\nxdp_mode = \"native\"\n[metrics]\nlisten = \"off\"\n\
             [[port]]\nport = {port}\nmax_connections = 1\n"
        )
        .unwrap();
        f
    };
    let good = config(&format!("\"{}\"", tb.srv_if));
    let bad = config(&format!("\"{}\", \"wsgf0\"", tb.srv_if));
    let run = |f: &tempfile::NamedTempFile| {
        vec![
            "run".to_owned(),
            "--config".to_owned(),
            f.path().to_str().unwrap().to_owned(),
            "--pin-dir".to_owned(),
            root_s.clone(),
        ]
    };
    let good_args = run(&good);
    let good_args: Vec<&str> = good_args.iter().map(String::as_str).collect();
    let mut first = Daemon::start_in(&tb.srv, &good_args);
    let dst = sa(tb.server_v4(), port);
    let a = tb.client_v4(0);
    let held = connect_from(&tb.cli, a, dst, Duration::from_secs(2)).stream();
    assert!(server.wait_held(1, Duration::from_secs(5)));
    assert!(first.stop(libc::SIGTERM).success());

    let bad_args = run(&bad);
    let private = ws_guard_tests::binary::Private::new();
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", tb.srv))
        .arg(binary())
        .args(&bad_args)
        .args(private.args())
        .output()
        .expect("running ws-guard");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the start should fail: {log}");
    assert!(log.contains("wsgf0"), "{log}");
    assert!(log.contains("keeping the link taken over"), "{log}");
    assert!(xdp_on(&tb), "the taken-over link was detached:\n{log}");
    let wsgf0 = ip_output(&["-n", &tb.srv, "link", "show", "dev", "wsgf0"]);
    assert!(!wsgf0.contains("xdp"), "{wsgf0}");
    // Still enforcing, with the count of the held connection. Native XDP on this veth: the
    // RSTs do not reach a client without an XDP program (the daemon warns), so the refused
    // attempt times out.
    assert!(log.contains("in native XDP mode: the RSTs"), "{log}");
    assert!(matches!(
        connect_from(&tb.cli, a, dst, Duration::from_secs(2)),
        Outcome::TimedOut
    ));
    // And a good start afterwards adopts everything.
    let mut again = Daemon::start_in(&tb.srv, &good_args);
    assert!(
        again.contains("adopted the pinned state"),
        "{:?}",
        again.lines()
    );
    assert!(matches!(
        connect_from(&tb.cli, a, dst, Duration::from_secs(2)),
        Outcome::TimedOut
    ));
    // The RSTs the driver dropped are said, not only counted as sent.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(matches!(
        connect_from(&tb.cli, a, dst, Duration::from_secs(2)),
        Outcome::TimedOut
    ));
    assert!(
        again.wait_for("its driver dropped", Duration::from_secs(5)),
        "{:?}",
        again.lines()
    );
    assert!(again.stop(libc::SIGTERM).success());
    drop(held);
}

/// `run --config CFG --pin-dir ROOT` with `private`'s control socket and state file (the CLI
/// reaches the daemon through that socket, a file: from the host namespace).
fn run_args(cfg: &str, root: &str, private: &Private) -> Vec<String> {
    let mut v: Vec<String> = ["run", "--config", cfg, "--pin-dir", root]
        .map(String::from)
        .to_vec();
    v.extend(private.args());
    v
}

/// Runs the CLI against the daemon on `sock`; its standard output (it must succeed).
fn cli(sock: &str, args: &[&str]) -> String {
    let out = Command::new(binary())
        .args(["--socket", sock])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Exactly one daemon owns a pin directory: a second one started on it refuses before it loads
/// or replaces anything, naming the first, and the first keeps enforcing its own limits
/// (SECURITY.md finding 7).
#[test]
fn a_second_daemon_on_the_same_pin_directory_is_refused() {
    if !privileged("a_second_daemon_on_the_same_pin_directory_is_refused") {
        return;
    }
    let port = test_port(25);
    let tb = Testbed::new("rs2", 25);
    let root = PinRoot::new("two");
    let root_s = root.0.to_str().unwrap().to_owned();
    let _server = Server::start(&tb.srv, port, Stack::Separate);
    let first_cfg = one_connection_config(&tb, port);
    let mut second_cfg = tempfile::NamedTempFile::new().unwrap();
    write!(
        second_cfg,
        "interfaces = [\"{}\"]\n[metrics]\nlisten = \"off\"\n[[port]]\nport = {port}\nmax_connections = 5\n",
        tb.srv_if
    )
    .unwrap();
    let (p1, p2) = (Private::new(), Private::new());
    let mut first = Daemon::start_in(
        &tb.srv,
        &run_args(first_cfg.path().to_str().unwrap(), &root_s, &p1)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let mut second = Daemon::spawn_in(
        &tb.srv,
        &run_args(second_cfg.path().to_str().unwrap(), &root_s, &p2)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let status = second.stop_when_exited(Duration::from_secs(20));
    assert!(
        !status.success(),
        "the second daemon ran: {:?}",
        second.lines()
    );
    let pid = first.pid().to_string();
    assert!(
        second.contains("another ws-guard daemon")
            && second.contains(&format!("process {pid}"))
            && second.contains(&root_s),
        "{:?}",
        second.lines()
    );
    assert!(!second.contains("enforcing on"), "{:?}", second.lines());
    // The first daemon's limit (1), not the second's (5), is what clients get.
    let dst = sa(tb.server_v4(), port);
    let a = tb.client_v4(0);
    let held = connect_from(&tb.cli, a, dst, Duration::from_secs(2));
    assert!(held.is_connected(), "{held:?}");
    for _ in 0..3 {
        let r = connect_from(&tb.cli, a, dst, Duration::from_secs(2));
        assert!(matches!(r, Outcome::Refused), "{r:?}");
    }
    assert!(xdp_on(&tb));
    assert!(first.stop(libc::SIGTERM).success(), "{:?}", first.lines());
    drop(held);
}

/// `ws-guard teardown` while the daemon runs: its exit says that nothing stays attached, and
/// nothing does.
#[test]
fn teardown_while_running_leaves_nothing_and_says_so() {
    if !privileged("teardown_while_running_leaves_nothing_and_says_so") {
        return;
    }
    let port = test_port(26);
    let tb = Testbed::new("rtd", 26);
    let root = PinRoot::new("td");
    let root_s = root.0.to_str().unwrap().to_owned();
    let cfg = one_connection_config(&tb, port);
    let p = Private::new();
    let mut d = Daemon::start_in(
        &tb.srv,
        &run_args(cfg.path().to_str().unwrap(), &root_s, &p)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let out = Command::new(binary())
        .args(["teardown", "--pin-dir", &root_s])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(d.stop(libc::SIGTERM).success(), "{:?}", d.lines());
    assert!(
        d.contains("nothing stays attached") && !d.contains("stay pinned"),
        "{:?}",
        d.lines()
    );
    assert!(!xdp_on(&tb), "XDP still attached after teardown and exit");
    assert!(!root.0.exists());
}
