//! The real `ws-guard` binary: `run --detach-on-exit` in a network namespace (enforces, then
//! detaches cleanly on SIGTERM) and `check-config`. The default exit, which leaves everything
//! pinned and enforcing, and `teardown` are tested in restart.rs.
//!
//! The binary is the one `cargo build -p ws-guard` left next to this test's own executable
//! (`cargo xtask test` builds it before the tests).

use std::{
    io::{BufRead as _, BufReader},
    net::IpAddr,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ws_guard_tests::{
    binary::{Daemon, PinRoot, Private, binary},
    netns::{Testbed, ip_output, sa, test_port, wait_until},
    privileged,
    traffic::{Outcome, Server, Stack, connect_from},
};

fn lines_contain(lines: &Mutex<Vec<String>>, needle: &str) -> bool {
    lines.lock().unwrap().iter().any(|l| l.contains(needle))
}

#[test]
fn daemon_enforces_then_detaches_on_sigterm() {
    if !privileged("daemon_enforces_then_detaches_on_sigterm") {
        return;
    }
    let port = test_port(20);
    let bin = binary();
    let tb = Testbed::new("daemon", 20);
    let _server = Server::start(&tb.srv, port, Stack::Separate);
    let mut cfg = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(
        &mut cfg,
        format!(
            "interfaces = [\"{}\"]\n[capacity]\nsources = 1024\nflows = 4096\n\n[[port]]\nport = {port}\nmax_connections = 2\nconnection_action = \"reject\"\n",
            tb.srv_if
        )
        .as_bytes(),
    )
    .unwrap();
    let cfg_path = cfg.path().to_str().unwrap().to_owned();

    let private = Private::new();
    let [a, b, c, d] = private.args();
    let daemon = tb.spawn_in(
        &tb.srv,
        bin.to_str().unwrap(),
        &[
            "run",
            "--config",
            &cfg_path,
            "--detach-on-exit",
            &a,
            &b,
            &c,
            &d,
        ],
        Stdio::piped(),
    );
    let stderr = daemon.child().stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let log = log.clone();
        // Ends at EOF, when the daemon exits (killed by the test bed at the latest).
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().take(100_000) {
                let Ok(line) = line else { break };
                eprintln!("daemon: {line}");
                log.lock().unwrap().push(line);
            }
        })
    };
    let started = wait_until(Duration::from_secs(15), || {
        lines_contain(&log, "enforcing on") || daemon.child().try_wait().ok().flatten().is_some()
    });
    assert!(
        started && lines_contain(&log, &format!("enforcing on {}", tb.srv_if)),
        "the daemon did not report enforcing on {}: {:?}",
        tb.srv_if,
        log.lock().unwrap()
    );
    let link = ip_output(&["-n", &tb.srv, "link", "show", "dev", &tb.srv_if]);
    assert!(
        link.contains("xdp"),
        "no XDP program on {}: {link}",
        tb.srv_if
    );

    let dst = sa(tb.server_v4(), port);
    let a: IpAddr = tb.client_v4(0);
    let connect = |t: Duration| connect_from(&tb.cli, a, dst, t);
    let c1 = connect(Duration::from_secs(2));
    let c2 = connect(Duration::from_secs(2));
    assert!(c1.is_connected() && c2.is_connected(), "{c1:?} {c2:?}");
    let t = Instant::now();
    let third = connect(Duration::from_secs(3));
    assert!(
        matches!(third, Outcome::Refused) && t.elapsed() < Duration::from_millis(500),
        "third connection: {third:?} after {:?}",
        t.elapsed()
    );

    assert!(daemon.signal(libc::SIGTERM), "the daemon already exited");
    let t = Instant::now();
    let status = daemon.wait_timeout(Duration::from_secs(5));
    let status = status.unwrap_or_else(|| panic!("no exit within 5 s of SIGTERM"));
    eprintln!("daemon exited after {:?}: {status}", t.elapsed());
    reader.join().unwrap();
    assert!(
        status.success(),
        "exit status {status}: {:?}",
        log.lock().unwrap()
    );
    assert!(
        lines_contain(&log, &format!("detached from {}", tb.srv_if)),
        "{:?}",
        log.lock().unwrap()
    );
    let link = ip_output(&["-n", &tb.srv, "link", "show", "dev", &tb.srv_if]);
    assert!(
        !link.contains("xdp"),
        "XDP still attached after exit: {link}"
    );
    // Nothing enforces any more: a third connection is accepted.
    match connect(Duration::from_secs(2)) {
        Outcome::Connected(_) => {}
        other => panic!("after the daemon exited: {other:?}"),
    }
    drop((c1, c2));
}

#[test]
fn check_config_names_the_bad_field() {
    let bin = binary();
    let mut bad = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut bad, b"[[port]]\nport = 0\nmax_connections = 3\n").unwrap();
    let out = Command::new(&bin)
        .arg("check-config")
        .arg(bad.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted port = 0: {stderr}");
    assert!(stderr.contains("port[0].port"), "{stderr}");
    assert!(stderr.contains(":2: "), "no line number: {stderr}");
    // The same for scripts: file, line and field as JSON, and the same exit code.
    let out = Command::new(&bin)
        .args(["--json", "check-config"])
        .arg(bad.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["valid"], false);
    assert_eq!(v["error"]["line"], 2);
    assert_eq!(v["error"]["field"], "port[0].port");
    let good = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/config.toml");
    let out = Command::new(&bin)
        .args(["--json", "check-config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["valid"], true);
    assert!(
        v["enforces"][0].as_str().unwrap().starts_with("port 9000:"),
        "{v}"
    );
}

#[test]
fn check_config_accepts_the_shipped_config() {
    let bin = binary();
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../packaging/config.toml");
    let out = Command::new(&bin)
        .arg("check-config")
        .arg(&shipped)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        shipped.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("valid"), "{stdout}");
    assert!(stdout.contains("port 9000"), "{stdout}");
}

/// SIGHUP with a changed file applies only the difference: the changed port's new limit
/// takes effect, the unchanged port keeps its counts, and connections held through the reload
/// keep working. An invalid file is refused and the running limits stay.
#[test]
fn sighup_applies_only_the_difference_and_held_connections_survive() {
    if !privileged("sighup_applies_only_the_difference_and_held_connections_survive") {
        return;
    }
    use std::io::{Read as _, Write as _};
    let (p1, p2) = (test_port(25), test_port(26));
    let tb = Testbed::new("hup", 25);
    let root = PinRoot::new("hup");
    let s1 = Server::start(&tb.srv, p1, Stack::Separate);
    let s2 = Server::start(&tb.srv, p2, Stack::Separate);
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("config.toml");
    let write_cfg = |max2: u32, extra: &str| {
        std::fs::write(
            &cfg_path,
            format!(
                "interfaces = [\"{}\"]\nstate_file = \"{}\"\n{extra}\n[control]\nsocket = \"{}\"\n\
                 [metrics]\nlisten = \"off\"\n\
                 [[port]]\nport = {p1}\nmax_connections = 2\n\
                 [[port]]\nport = {p2}\nmax_connections = {max2}\n",
                tb.srv_if,
                dir.path().join("runtime.toml").display(),
                dir.path().join("control.sock").display(),
            ),
        )
        .unwrap();
    };
    write_cfg(1, "");
    let cfg_s = cfg_path.to_str().unwrap().to_owned();
    let mut d = Daemon::start_in(
        &tb.srv,
        &[
            "run",
            "--config",
            &cfg_s,
            "--pin-dir",
            &root.path(),
            "--detach-on-exit",
        ],
    );
    let a = tb.client_v4(0);
    let (d1, d2) = (sa(tb.server_v4(), p1), sa(tb.server_v4(), p2));
    let connect = |dst| connect_from(&tb.cli, a, dst, Duration::from_secs(2));
    let mut held1 = connect(d1).stream();
    let mut held1b = connect(d1).stream();
    let held2 = connect(d2).stream();
    assert!(s1.wait_held(2, Duration::from_secs(5)) && s2.wait_held(1, Duration::from_secs(5)));
    assert!(matches!(connect(d1), Outcome::Refused));
    assert!(matches!(connect(d2), Outcome::Refused));

    // Raise port 2's limit only.
    write_cfg(2, "");
    d.signal(libc::SIGHUP);
    assert!(
        d.wait_for("reload: port", Duration::from_secs(5)),
        "{:?}",
        d.lines()
    );
    assert!(
        d.contains(&format!("reload: port {p2}: max_connections 1 -> 2")),
        "{:?}",
        d.lines()
    );
    assert!(
        !d.lines()
            .iter()
            .any(|l| l.contains(&format!("reload: port {p1}"))),
        "the unchanged port was reported changed: {:?}",
        d.lines()
    );
    // Port 2 takes one more; port 1 kept its count of 2 and still refuses.
    let extra2 = connect(d2).stream();
    assert!(matches!(connect(d2), Outcome::Refused));
    assert!(matches!(connect(d1), Outcome::Refused));
    // The connections held through the reload still carry data.
    for s in [&mut held1, &mut held1b] {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(b"p").unwrap();
        s1.echo_once(s.local_addr().unwrap(), Duration::from_secs(2))
            .expect("a held connection died in the reload");
        let mut buf = [0u8; 1];
        s.read_exact(&mut buf)
            .expect("no echo on a held connection");
        assert_eq!(&buf, b"p");
    }

    // An invalid file is refused; the limits stay.
    std::fs::write(&cfg_path, "[[port]]\nport = 0\n").unwrap();
    d.signal(libc::SIGHUP);
    assert!(
        d.wait_for("reload refused", Duration::from_secs(5)),
        "{:?}",
        d.lines()
    );
    assert!(matches!(connect(d2), Outcome::Refused));
    assert!(matches!(connect(d1), Outcome::Refused));
    drop((held1, held1b, held2, extra2));
    assert!(d.stop(libc::SIGTERM).success());
}

/// A SIGTERM that arrives while the daemon is still starting (here: as soon as it logs its
/// first line) is taken once the start is complete: the daemon exits cleanly, with its usual
/// SIGTERM handling, instead of being killed half-way by the signal's default action.
#[test]
fn sigterm_during_start_up_exits_cleanly() {
    if !privileged("sigterm_during_start_up_exits_cleanly") {
        return;
    }
    let port = test_port(17);
    let tb = Testbed::new("early", 48);
    let root = PinRoot::new("early");
    let mut cfg = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(
        &mut cfg,
        format!(
            "interfaces = [\"{}\"]\n[metrics]\nlisten = \"off\"\n[[port]]\nport = {port}\n\
             max_connections = 2\n",
            tb.srv_if
        )
        .as_bytes(),
    )
    .unwrap();
    let cfg_path = cfg.path().to_str().unwrap().to_owned();
    let root_s = root.path();
    let args = [
        "run",
        "--config",
        &cfg_path,
        "--pin-dir",
        &root_s,
        "--detach-on-exit",
    ];
    let mut d = Daemon::spawn_in(&tb.srv, &args);
    assert!(
        wait_until(Duration::from_secs(15), || !d.lines().is_empty()),
        "the daemon logged nothing"
    );
    let status = d.stop(libc::SIGTERM);
    assert!(status.success(), "{status:?}: {:?}", d.lines());
    assert!(d.contains("SIGTERM"), "{:?}", d.lines());
    assert!(d.contains("enforcing on"), "{:?}", d.lines());
    // It detached and removed what it pinned, as on any SIGTERM with --detach-on-exit.
    assert!(
        !ip_output(&["-n", &tb.srv, "link", "show", "dev", &tb.srv_if]).contains("xdp"),
        "{:?}",
        d.lines()
    );
}

/// A prefix change never lets a source past `max_connections` (SECURITY.md finding 9): a
/// client at its limit of 2; `ipv4_prefix` 32 -> 24 and SIGHUP: the client gets nothing more,
/// nor does its /24 neighbour (the /24 key holds the 2 connections); back to 32: the client
/// still nothing, the neighbour its own 2; the same for `ipv6_prefix` 64 -> 48 -> 64. Judged by
/// what the clients get.
#[test]
fn prefix_changes_never_let_a_source_past_its_limit() {
    if !privileged("prefix_changes_never_let_a_source_past_its_limit") {
        return;
    }
    let port = test_port(18);
    let tb = Testbed::new("pfx", 49);
    let root = PinRoot::new("pfx");
    let _server = Server::start(&tb.srv, port, Stack::Separate);
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("config.toml");
    let write_cfg = |v4: u32, v6: u32| {
        std::fs::write(
            &cfg_path,
            format!(
                "interfaces = [\"{}\"]\nipv4_prefix = {v4}\nipv6_prefix = {v6}\n\
                 state_file = \"{}\"\n[control]\nsocket = \"{}\"\n[metrics]\nlisten = \"off\"\n\
                 [[port]]\nport = {port}\nmax_connections = 2\nconnection_action = \"reject\"\n",
                tb.srv_if,
                dir.path().join("runtime.toml").display(),
                dir.path().join("control.sock").display(),
            ),
        )
        .unwrap();
    };
    write_cfg(32, 64);
    let cfg_s = cfg_path.to_str().unwrap().to_owned();
    let mut d = Daemon::start_in(
        &tb.srv,
        &[
            "run",
            "--config",
            &cfg_s,
            "--pin-dir",
            &root.path(),
            "--detach-on-exit",
        ],
    );
    let mut reloads = 0;
    let mut reload = |v4: u32, v6: u32| {
        write_cfg(v4, v6);
        d.signal(libc::SIGHUP);
        reloads += 1;
        let done = wait_until(Duration::from_secs(5), || d.count("reload: ipv") >= reloads);
        assert!(done, "reload {reloads} not reported: {:?}", d.lines());
    };
    for (dst, a, b, prefixes) in [
        (
            sa(tb.server_v4(), port),
            tb.client_v4(0),
            tb.client_v4(1),
            [(24, 64), (32, 64)],
        ),
        (
            sa(tb.server_v6(), port),
            tb.client_v6(0),
            // The client's address in its second /64 (same /48).
            tb.client_v6(2),
            [(32, 48), (32, 64)],
        ),
    ] {
        let connect = |src: IpAddr| connect_from(&tb.cli, src, dst, Duration::from_secs(2));
        let _held: Vec<_> = (0..2).map(|_| connect(a).stream()).collect();
        assert!(matches!(connect(a), Outcome::Refused), "{a} over its limit");
        // Widen the prefix: a and b are one source now, holding 2.
        reload(prefixes[0].0, prefixes[0].1);
        for who in [a, b, a] {
            let r = connect(who);
            assert!(matches!(r, Outcome::Refused), "{who} after widening: {r:?}");
        }
        std::thread::sleep(Duration::from_millis(1500));
        assert!(matches!(connect(a), Outcome::Refused), "{a} a while later");
        // Narrow it again: a holds its 2, b is a source of its own again.
        reload(prefixes[1].0, prefixes[1].1);
        assert!(
            matches!(connect(a), Outcome::Refused),
            "{a} after narrowing"
        );
        let b_held: Vec<_> = (0..2).map(|_| connect(b).stream()).collect();
        assert!(
            matches!(connect(b), Outcome::Refused),
            "{b} over its own limit"
        );
        drop(b_held);
    }
    assert!(d.stop(libc::SIGTERM).success());
}
