//! Every client command end to end: the real daemon in a network namespace, the real CLI over
//! its control socket, and TCP traffic from the client namespace showing each change take
//! effect (and survive a restart). Bad arguments change nothing; a non-root user is refused.

use std::{
    net::IpAddr,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use ws_guard_tests::{
    binary::{CliRun, DaemonFiles, binary, run_cli, wsg},
    netns::{Testbed, sa, test_port, wait_until},
    privileged,
    traffic::{Outcome, Server, Stack, connect_from},
};

/// The daemon files of a test, with its config: one port, 3 concurrent connections per
/// source, rejected above.
fn paths(tag: &str, tb: &Testbed, port: u16) -> DaemonFiles {
    let p = DaemonFiles::new(tag);
    p.write_config(
        &tb.srv_if,
        "",
        &format!("[[port]]\nport = {port}\nmax_connections = 3\nconnection_action = \"reject\"\n"),
    );
    p
}

/// Connects from `src` until an attempt is refused (RST); how long that took after `since`.
fn first_refusal(tb: &Testbed, src: IpAddr, port: u16, since: Instant) -> Option<Duration> {
    let dst = sa(tb.server_v4(), port);
    let mut held = Vec::new();
    let mut found = None;
    wait_until(Duration::from_secs(5), || {
        match connect_from(&tb.cli, src, dst, Duration::from_secs(1)) {
            Outcome::Refused => {
                found = Some(since.elapsed());
                true
            }
            Outcome::Connected(s) => {
                held.push(s);
                false
            }
            _ => false,
        }
    });
    found
}

fn connect(tb: &Testbed, src: IpAddr, port: u16) -> Outcome {
    connect_from(
        &tb.cli,
        src,
        sa(tb.server_v4(), port),
        Duration::from_secs(1),
    )
}

#[test]
fn every_command_takes_effect_and_survives_a_restart() {
    if !privileged("every_command_takes_effect_and_survives_a_restart") {
        return;
    }
    let port = test_port(25);
    let tb = Testbed::new("cli", 60);
    let paths = paths("cli", &tb, port);
    let _server = Server::start(&tb.srv, port, Stack::Separate);
    let mut daemon = paths.start(&tb.srv, &[]);
    let sock = paths.socket();
    let a = tb.client_v4(0);
    let b = tb.client_v4(1);

    // The socket: root's, 0600, in a 0700 directory.
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));
    let dir_mode = std::fs::metadata(sock.parent().unwrap()).unwrap().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);

    // status: the interface and the port, as JSON and as text.
    let st = wsg(&sock, &["--json", "status"]).json();
    assert_eq!(st["interfaces"][0]["interface"], tb.srv_if.as_str(), "{st}");
    assert_eq!(st["interfaces"][0]["attached"], true);
    assert_eq!(st["ports"][0]["port"], port);
    assert_eq!(st["ports"][0]["max_connections"], 3);
    // Every map once: the hash maps, the ban map and the two CIDR tries.
    let mut maps: Vec<&str> = st["maps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["map"].as_str().unwrap())
        .collect();
    maps.sort();
    assert_eq!(
        maps,
        [
            "WSG_ALLOW",
            "WSG_BANS",
            "WSG_DENY",
            "WSG_FLOWS",
            "WSG_SOURCES"
        ],
        "{st}"
    );
    let text = wsg(&sock, &["status"]).ok().stdout;
    assert!(
        text.contains(&tb.srv_if) && text.contains(&port.to_string()),
        "{text}"
    );

    // limits get
    let l = wsg(
        &sock,
        &["--json", "limits", "get", "--port", &port.to_string()],
    )
    .json();
    assert_eq!(l["ports"][0]["max_connections"], 3);
    assert_eq!(l["ports"][0]["source"], "config");

    // Two connections held by `a`; lowering the limit to 1 refuses the next one.
    let a1 = connect(&tb, a, port).stream();
    let a2 = connect(&tb, a, port).stream();
    wsg(
        &sock,
        &[
            "limits",
            "set",
            "--port",
            &port.to_string(),
            "--max-connections",
            "1",
        ],
    )
    .ok();
    let took = first_refusal(&tb, a, port, Instant::now())
        .expect("no refusal after limits set --max-connections 1");
    println!("CLI -> enforcement (limits set, first refused connection): {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    // Raise it: accepted again.
    wsg(
        &sock,
        &[
            "limits",
            "set",
            "--port",
            &port.to_string(),
            "--max-connections",
            "3",
        ],
    )
    .ok();
    let a3 = connect(&tb, a, port).stream();
    assert!(matches!(connect(&tb, a, port), Outcome::Refused));
    let l = wsg(&sock, &["--json", "limits", "get"]).json();
    assert_eq!(l["ports"][0]["source"], "config+runtime", "{l}");

    // sources top lists `a` with its 3 connections.
    let top = wsg(&sock, &["--json", "sources", "top", "-n", "5"]).json();
    assert_eq!(top["sources"][0]["source"], format!("{a}/32"), "{top}");
    assert_eq!(top["sources"][0]["connections"], 3, "{top}");
    assert!(
        wsg(&sock, &["sources", "top"])
            .ok()
            .stdout
            .contains(&format!("{a}/32"))
    );

    // monitor on: over the limit passes; off: refused again.
    wsg(&sock, &["monitor", "on"]).ok();
    let a4 = connect(&tb, a, port).stream();
    assert_eq!(wsg(&sock, &["--json", "status"]).json()["monitor"], true);
    wsg(&sock, &["monitor", "off"]).ok();
    assert!(matches!(connect(&tb, a, port), Outcome::Refused));
    drop(a4);

    // Actions and the rate limit: `b` gets 2 new connections a minute, then a RST.
    wsg(
        &sock,
        &[
            "limits",
            "set",
            "--port",
            &port.to_string(),
            "--new-connections",
            "2/1m",
            "--action",
            "reject",
        ],
    )
    .ok();
    let b1 = connect(&tb, b, port).stream();
    let b2 = connect(&tb, b, port).stream();
    assert!(matches!(connect(&tb, b, port), Outcome::Refused));
    let l = wsg(&sock, &["--json", "limits", "get"]).json();
    assert_eq!(l["ports"][0]["new_connections"], "2/1m", "{l}");
    assert_eq!(l["ports"][0]["rate_action"], "reject", "{l}");
    assert_eq!(l["ports"][0]["connection_action"], "reject", "{l}");
    // sources top --by drops: `b`, refused once.
    let top = wsg(&sock, &["--json", "sources", "top", "--by", "drops"]).json();
    let bs = top["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["source"] == format!("{b}/32"))
        .unwrap_or_else(|| panic!("{b} not among the top sources by drops: {top}"));
    assert!(bs["drops"].as_u64().unwrap() >= 1, "{top}");
    drop((b1, b2));
    wsg(
        &sock,
        &[
            "limits",
            "set",
            "--port",
            &port.to_string(),
            "--new-connections",
            "none",
        ],
    )
    .ok();
    let l = wsg(&sock, &["--json", "limits", "get"]).json();
    assert!(l["ports"][0]["new_connections"].is_null(), "{l}");
    assert_eq!(l["schema_version"], 1, "{l}");

    // Allowlist: `a` is no longer limited; removing it limits it again.
    let a_net = format!("{a}/32");
    wsg(&sock, &["allow", "add", &a_net]).ok();
    let a5 = connect(&tb, a, port).stream();
    let al = wsg(&sock, &["--json", "allow", "list"]).json();
    assert_eq!(al["cidrs"], serde_json::json!([a_net]), "{al}");
    wsg(&sock, &["allow", "remove", &a_net]).ok();
    assert!(matches!(connect(&tb, a, port), Outcome::Refused));
    drop(a5);

    // Denylist: `b` (holding nothing) is refused; removed, admitted.
    let b_net = format!("{b}/32");
    wsg(&sock, &["deny", "add", &b_net]).ok();
    assert!(
        !connect(&tb, b, port).is_connected(),
        "a denied source got in"
    );
    wsg(&sock, &["deny", "remove", &b_net]).ok();
    let b3 = connect(&tb, b, port).stream();
    drop(b3);

    // Bans: a manual ban blocks `b` on the port; removing it lets it in.
    wsg(
        &sock,
        &[
            "bans",
            "add",
            &b.to_string(),
            "--port",
            &port.to_string(),
            "--duration",
            "10m",
        ],
    )
    .ok();
    let bans = wsg(&sock, &["--json", "bans", "list"]).json();
    assert_eq!(bans["bans"][0]["source"], b_net.as_str(), "{bans}");
    assert_eq!(bans["bans"][0]["reason"], "manual", "{bans}");
    assert!(
        bans["bans"][0]["remaining_ms"].as_u64().unwrap() > 590_000,
        "{bans}"
    );
    assert!(
        !connect(&tb, b, port).is_connected(),
        "a banned source got in"
    );
    wsg(
        &sock,
        &[
            "bans",
            "remove",
            &b.to_string(),
            "--port",
            &port.to_string(),
        ],
    )
    .ok();
    assert_eq!(
        wsg(&sock, &["--json", "bans", "list"]).json()["bans"],
        serde_json::json!([])
    );
    let b4 = connect(&tb, b, port).stream();
    drop(b4);
    // Without --port: every protected port; without --duration: 1h (ban_duration is 0).
    wsg(&sock, &["bans", "add", &b.to_string()]).ok();
    let bans = wsg(&sock, &["--json", "bans", "list"]).json();
    let ms = bans["bans"][0]["remaining_ms"].as_u64().unwrap();
    assert!((3_500_000..=3_600_000).contains(&ms), "{bans}");
    assert!(!connect(&tb, b, port).is_connected());
    wsg(&sock, &["bans", "remove", &b.to_string()]).ok();

    // Runtime changes survive a restart: the state file holds them.
    wsg(
        &sock,
        &[
            "limits",
            "set",
            "--port",
            &port.to_string(),
            "--max-connections",
            "2",
        ],
    )
    .ok();
    wsg(&sock, &["deny", "add", &b_net]).ok();
    let before = wsg(&sock, &["--json", "limits", "get"]).json();
    let state_mode = std::fs::metadata(paths.state()).unwrap().mode() & 0o777;
    assert_eq!(state_mode, 0o600);
    assert!(daemon.stop(libc::SIGTERM).success());
    assert!(!sock.exists(), "the daemon left its socket behind");
    let daemon2 = paths.start(&tb.srv, &[]);
    let after = wsg(&sock, &["--json", "limits", "get"]).json();
    assert_eq!(before, after);
    assert_eq!(after["ports"][0]["max_connections"], 2);
    assert_eq!(
        wsg(&sock, &["--json", "deny", "list"]).json()["cidrs"],
        serde_json::json!([b_net])
    );
    // config show --effective: the iptables-save of ws-guard, a config file check-config
    // accepts, runtime changes included; without --effective the file alone; and the same
    // from the files when no daemon answers.
    let eff = wsg(&sock, &["config", "show", "--effective"]).ok().stdout;
    assert!(
        eff.contains("max_connections = 2") && eff.contains(&b_net),
        "{eff}"
    );
    let file_only = wsg(&sock, &["config", "show"]).ok().stdout;
    assert!(
        file_only.contains("max_connections = 3") && !file_only.contains(&b_net),
        "{file_only}"
    );
    // The state file itself is a config fragment in the config's schema: check-config takes
    // it (here it has a [[port]] table, so it is a whole config), with the changes in it.
    let state_text = std::fs::read_to_string(paths.state()).unwrap();
    assert!(
        state_text.contains("max_connections = 2") && state_text.contains(&b_net),
        "{state_text}"
    );
    let mut check = Command::new(binary());
    check.arg("check-config").arg(paths.state());
    let r = run_cli(check);
    assert_eq!(r.code, 0, "{r:?}\n{state_text}");
    let saved = paths.dir.path().join("saved.toml");
    std::fs::write(&saved, &eff).unwrap();
    let mut check = Command::new(binary());
    check.arg("check-config").arg(&saved);
    let r = run_cli(check);
    assert_eq!(r.code, 0, "{r:?}\n{eff}");
    let offline = wsg(
        &paths.dir.path().join("nothing.sock"),
        &[
            "config",
            "show",
            "--effective",
            "--config",
            paths.config().to_str().unwrap(),
        ],
    );
    assert_eq!(offline.code, 0, "{offline:?}");
    assert_eq!(offline.stdout, eff);
    assert!(
        offline.stderr.contains("showing what the files say"),
        "{offline:?}"
    );
    // `a` holds 3 (adopted), the file's limit is 3, the override 2: refused either way; a
    // fresh source shows the override: its third connection is refused.
    let c = tb.client_v4(2);
    let c1 = connect(&tb, c, port).stream();
    let c2 = connect(&tb, c, port).stream();
    assert!(
        matches!(connect(&tb, c, port), Outcome::Refused),
        "the override of 2 is lost"
    );
    assert!(
        !connect(&tb, b, port).is_connected(),
        "the denylist entry is lost"
    );
    // SIGHUP with a changed config file (4 instead of 3, and a denylist): the runtime changes
    // stay on top, and the masked list edit is said.
    let text = std::fs::read_to_string(paths.config()).unwrap();
    std::fs::write(
        paths.config(),
        text.replace("max_connections = 3", "max_connections = 4")
            .replace("interfaces = ", "deny = [\"198.19.7.0/24\"]\ninterfaces = "),
    )
    .unwrap();
    daemon2.signal(libc::SIGHUP);
    assert!(daemon2.wait_for("reloaded", Duration::from_secs(5)));
    let l = wsg(&sock, &["--json", "limits", "get"]).json();
    assert_eq!(l["ports"][0]["max_connections"], 2, "{l}");
    assert!(
        daemon2.contains("the config file's denylist changed, but the denylist changed at runtime"),
        "{:?}",
        daemon2.lines()
    );
    assert_eq!(
        wsg(&sock, &["--json", "deny", "list"]).json()["cidrs"],
        serde_json::json!([b_net])
    );
    // deny reset: the file's list is in force.
    wsg(&sock, &["deny", "reset"]).ok();
    let d = wsg(&sock, &["--json", "deny", "list"]).json();
    assert_eq!(d["cidrs"], serde_json::json!(["198.19.7.0/24"]), "{d}");
    assert_eq!(d["source"], "config", "{d}");
    assert!(matches!(connect(&tb, c, port), Outcome::Refused));
    // limits reset: back to the config file's, now 4.
    wsg(&sock, &["limits", "reset", "--port", &port.to_string()]).ok();
    let c3 = connect(&tb, c, port).stream();
    let c4 = connect(&tb, c, port).stream();
    assert!(matches!(connect(&tb, c, port), Outcome::Refused));
    let l = wsg(&sock, &["--json", "limits", "get"]).json();
    assert_eq!(l["ports"][0]["source"], "config");
    assert_eq!(l["ports"][0]["max_connections"], 4);
    drop((a1, a2, a3, c1, c2, c3, c4));
    assert!(
        daemon2.contains("runtime changes from"),
        "{:?}",
        daemon2.lines()
    );
}

/// Every bad argument: non-zero exit, a message saying what is wrong, nothing changed.
#[test]
fn bad_arguments_change_nothing() {
    if !privileged("bad_arguments_change_nothing") {
        return;
    }
    let port = test_port(26);
    let tb = Testbed::new("clibad", 61);
    let paths = paths("clibad", &tb, port);
    let _daemon = paths.start(&tb.srv, &[]);
    let sock = paths.socket();
    let p = port.to_string();
    wsg(&sock, &["allow", "add", "198.18.0.0/16"]).ok();
    let snapshot = || {
        (
            wsg(&sock, &["--json", "limits", "get"]).json(),
            wsg(&sock, &["--json", "allow", "list"]).json(),
            wsg(&sock, &["--json", "deny", "list"]).json(),
            wsg(&sock, &["--json", "bans", "list"]).json(),
            std::fs::read_to_string(paths.state()).unwrap(),
        )
    };
    let before = snapshot();
    // (arguments, exit code, a piece of the message)
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["limits", "set", "--port", "0", "--max-connections", "1"],
            2,
            "not in 1..=65535",
        ),
        (
            &["limits", "set", "--port", "65536", "--max-connections", "1"],
            2,
            "65536",
        ),
        (
            &["limits", "set", "--port", &p, "--max-connections", "0"],
            2,
            "refuse every",
        ),
        (
            &["limits", "set", "--port", &p, "--max-connections", "-3"],
            2,
            "-3",
        ),
        (
            &["limits", "set", "--port", &p, "--new-connections", "3/0s"],
            2,
            "window",
        ),
        (
            &["limits", "set", "--port", &p, "--new-connections", "33/1s"],
            2,
            "maximum of 32",
        ),
        (
            &["limits", "set", "--port", &p, "--new-connections", "3"],
            2,
            "COUNT/WINDOW",
        ),
        (
            &["limits", "set", "--port", &p, "--action", "explode"],
            2,
            "explode",
        ),
        (&["limits", "set", "--port", &p], 2, "at least one"),
        (&["limits", "get", "--port", "1"], 1, "not protected"),
        (&["limits", "reset", "--port", &p], 1, "no runtime override"),
        (&["allow", "add", "198.18.0.1/24"], 2, "host bits"),
        (&["allow", "add", "198.18.0.0/33"], 2, "not a CIDR"),
        (&["allow", "add", "banana"], 2, "not a CIDR"),
        (&["allow", "add", "198.18.1.0/24"], 1, "overlaps"),
        (&["allow", "add", "198.18.0.0/16"], 1, "already"),
        (
            &["allow", "remove", "10.0.0.0/8"],
            1,
            "not in the allowlist",
        ),
        (&["deny", "add", "2001:2::1/48"], 2, "host bits"),
        (&["bans", "add", "198.18.0.300"], 2, "198.18.0.300"),
        (
            &["bans", "add", "198.18.0.3", "--duration", "0s"],
            2,
            "at least 1s",
        ),
        (
            &["bans", "add", "198.18.0.3", "--port", "0"],
            2,
            "not in 1..=65535",
        ),
        (
            &["bans", "add", "198.18.0.3", "--port", "1"],
            1,
            "not protected",
        ),
        (&["bans", "remove", "198.18.0.3"], 1, "not banned"),
        (&["sources", "top", "-n", "0"], 2, "0"),
        (&["sources", "top", "--by", "bytes"], 2, "bytes"),
        (&["monitor", "maybe"], 2, "maybe"),
        (&["limits", "frobnicate"], 2, "frobnicate"),
    ];
    for (args, code, msg) in cases {
        let r = wsg(&sock, args);
        assert_eq!(r.code, *code, "{args:?}: {r:?}");
        assert!(
            r.stderr.contains(msg),
            "{args:?}: the message does not say {msg:?}: {}",
            r.stderr
        );
        assert!(r.stdout.is_empty(), "{args:?}: {r:?}");
    }
    // The daemon checks again what the CLI checks: a request written to the socket by
    // another client gets the same refusals (finding 14 of SECURITY.md).
    let raw = |line: &str| -> String {
        use std::io::{BufRead as _, Write as _};
        let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connecting");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        writeln!(s, "{line}").unwrap();
        let mut reply = String::new();
        std::io::BufReader::new(s).read_line(&mut reply).unwrap();
        eprintln!("raw {line} -> {reply}");
        reply
    };
    for (ms, msg) in [
        ("1", "at least 1s"),
        ("999", "at least 1s"),
        ("18446744073709551615", "at most 365 days"),
        ("31536000001", "at most 365 days"),
    ] {
        let reply = raw(&format!(
            r#"{{"command":"ban_add","addr":"198.18.0.3","port":{port},"duration_ms":{ms}}}"#
        ));
        assert!(reply.contains(msg), "duration_ms {ms}: {reply}");
    }
    assert_eq!(snapshot(), before, "a refused command changed something");

    // IPv4-mapped IPv6 addresses are the IPv4 ones, in the lists as in bans.
    wsg(&sock, &["deny", "add", "::ffff:198.19.0.5/128"]).ok();
    let deny = wsg(&sock, &["--json", "deny", "list"]).json().to_string();
    assert!(
        deny.contains("198.19.0.5/32") && !deny.contains("ffff"),
        "{deny}"
    );
    wsg(&sock, &["deny", "remove", "198.19.0.5"]).ok();
    // The denylist is a runtime list now (kept whole in the state file) until reset.
    let deny = wsg(&sock, &["--json", "deny", "list"]).json();
    assert_eq!(deny["source"], "runtime", "{deny}");
    let text = wsg(&sock, &["deny", "list"]).ok().stdout;
    assert!(text.contains("`ws-guard deny reset`"), "{text}");
    wsg(&sock, &["deny", "reset"]).ok();
    let r = wsg(&sock, &["deny", "reset"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("no runtime change to reset"), "{r:?}");
    assert_eq!(snapshot(), before, "add, remove and reset left something");

    // Unreachable daemon: exit 3 and what to do.
    let r = wsg(&paths.dir.path().join("nothing.sock"), &["status"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr.contains("does not exist") && r.stderr.contains("--socket"),
        "{r:?}"
    );
    // With --json the error is JSON too (on stdout), with the schema version.
    let r = wsg(
        &paths.dir.path().join("nothing.sock"),
        &["--json", "status"],
    );
    assert_eq!(r.code, 3, "{r:?}");
    let v: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"));
    assert_eq!(v["error"]["exit_code"], 3, "{v}");
    assert_eq!(v["schema_version"], 1, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("does not exist")),
        "{v}"
    );
    let r = wsg(&sock, &["--json", "limits", "get", "--port", "1"]);
    assert_eq!(r.code, 1, "{r:?}");
    let v: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"));
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not protected"),
        "{v}"
    );
    // --help documents the exit codes.
    let help = wsg(&sock, &["limits", "--help"]).ok().stdout;
    assert!(help.contains("Exit codes") && help.contains("3  the daemon could not be reached"));
}

/// The control socket is root's: another user gets exit code 3 and "permission denied", both
/// from the file mode and, with the file opened up, from the daemon's credential check. A
/// second daemon does not take over the socket of a running one; a stale socket is replaced.
#[test]
fn only_root_may_use_the_socket() {
    if !privileged("only_root_may_use_the_socket") {
        return;
    }
    let port = test_port(27);
    let tb = Testbed::new("cliroot", 62);
    let paths = paths("cliroot", &tb, port);
    let mut daemon = paths.start(&tb.srv, &[]);
    let sock = paths.socket();
    let nobody = |args: &[&str]| {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(binary())
            .arg("--socket")
            .arg(&sock)
            .args(args);
        run_cli(cmd)
    };
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));
    // The test's directory lets `nobody` reach the socket's directory.
    for d in [paths.dir.path(), sock.parent().unwrap()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let r = nobody(&["status"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("permission denied"), "{r:?}");
    let r = nobody(&["monitor", "on"]);
    assert_eq!(r.code, 3, "{r:?}");
    // With the file mode opened up, the daemon's own check refuses.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let r = nobody(&["monitor", "on"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr
            .contains("permission denied: only root may use the control socket; you are uid 65534"),
        "{r:?}"
    );
    assert!(daemon.wait_for(
        "refused a client running as uid 65534",
        Duration::from_secs(2)
    ));
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(wsg(&sock, &["--json", "status"]).json()["monitor"], false);

    // A second daemon (another pin root) refuses to take the socket of the running one.
    let other_pins = format!("{}-second", paths.pins.display());
    let mut second = Command::new("nsenter");
    second
        .arg(format!("--net=/run/netns/{}", tb.srv))
        .arg(binary())
        .args([
            "run",
            "--config",
            paths.config().to_str().unwrap(),
            "--pin-dir",
            &other_pins,
        ]);
    let r = run_cli(second);
    let _ = ws_guard::pin::teardown(Path::new(&other_pins));
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains("another ws-guard daemon answers"),
        "{r:?}"
    );
    wsg(&sock, &["status"]).ok();

    // kill -9 leaves the socket file; the next daemon replaces it.
    daemon.stop(libc::SIGKILL);
    assert!(sock.exists());
    assert_eq!(wsg(&sock, &["status"]).code, 3);
    let daemon = paths.start(&tb.srv, &[]);
    assert!(
        daemon.contains("replaced the stale control socket"),
        "{:?}",
        daemon.lines()
    );
    wsg(&sock, &["status"]).ok();
}

/// Idle and polling clients of the control socket never lock the operator out (SECURITY.md
/// finding 13): 40 idle connections and 8 scripts sending `status` every 4 s on connections
/// they keep open; meanwhile every `ws-guard status` succeeds within 2 s.
#[test]
fn idle_and_polling_clients_never_lock_out_the_cli() {
    if !privileged("idle_and_polling_clients_never_lock_out_the_cli") {
        return;
    }
    let port = test_port(28);
    let tb = Testbed::new("clislow", 63);
    let paths = paths("clislow", &tb, port);
    let _daemon = paths.start(&tb.srv, &[]);
    let sock = paths.socket();
    let idle: Vec<std::os::unix::net::UnixStream> = (0..40)
        .map(|_| std::os::unix::net::UnixStream::connect(&sock).expect("connect"))
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pollers: Vec<_> = (0..8)
        .map(|_| {
            let (stop, sock) = (stop.clone(), sock.clone());
            std::thread::spawn(move || {
                use std::io::Write as _;
                let start = Instant::now();
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && start.elapsed() < Duration::from_secs(30)
                {
                    // One connection kept open, a request every 4 s; a new one when closed.
                    let Ok(mut s) = std::os::unix::net::UnixStream::connect(&sock) else {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    };
                    while s.write_all(b"{\"command\":\"status\"}\n").is_ok()
                        && !stop.load(std::sync::atomic::Ordering::Relaxed)
                    {
                        std::thread::sleep(Duration::from_secs(4));
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut runs = Vec::new();
    for _ in 0..6 {
        let start = Instant::now();
        let r = wsg(&sock, &["status"]);
        runs.push((r.code, start.elapsed()));
        std::thread::sleep(Duration::from_millis(700));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in pollers {
        p.join().unwrap();
    }
    drop(idle);
    for (code, took) in &runs {
        assert_eq!(*code, 0, "`ws-guard status` failed: {runs:?}");
        assert!(
            *took < Duration::from_secs(2),
            "`ws-guard status` took {took:?}: {runs:?}"
        );
    }
}

/// A block list is imported in one go: `deny add -f FILE` with 16,384 CIDRs (the default
/// capacity) is applied whole, in seconds (each add used to re-read the whole trie: 316 s for
/// 20,000 adds); a file with one bad line adds nothing and names the line; single adds on the
/// full list still work (SECURITY.md finding 15). Timings are printed.
#[test]
fn block_lists_load_in_bulk_whole_or_not_at_all() {
    if !privileged("block_lists_load_in_bulk_whole_or_not_at_all") {
        return;
    }
    let port = test_port(29);
    let tb = Testbed::new("clibulk", 64);
    let paths = paths("clibulk", &tb, port);
    let _daemon = paths.start(&tb.srv, &[]);
    let sock = paths.socket();
    let cidrs: Vec<String> = (0..16_383u32)
        .map(|i| format!("2001:2:0:{:x}::/64", i + 1))
        .collect();
    let file = paths.dir.path().join("block.txt");
    // One bad line at the end: nothing is added.
    let mut text = format!("# imported block list\n{}\n", cidrs.join("\n"));
    text.push_str("2001:2:0:1::1/64\n");
    std::fs::write(&file, &text).unwrap();
    let r = wsg(&sock, &["deny", "add", "-f", file.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains(&format!("block.txt:{}", cidrs.len() + 2))
            && r.stderr.contains("host bits"),
        "{r:?}"
    );
    let listed = |r: CliRun| r.json()["cidrs"].as_array().map_or(0, Vec::len);
    assert_eq!(listed(wsg(&sock, &["--json", "deny", "list"])), 0);
    // The good file, whole.
    std::fs::write(&file, format!("{}\n", cidrs.join("\n"))).unwrap();
    let start = Instant::now();
    wsg(&sock, &["deny", "add", "-f", file.to_str().unwrap()]).ok();
    let bulk = start.elapsed();
    assert_eq!(listed(wsg(&sock, &["--json", "deny", "list"])), cidrs.len());
    // One more by hand fills the list; single adds and removes on a full list.
    let start = Instant::now();
    wsg(&sock, &["deny", "add", "2001:2:0:ffff::/64"]).ok();
    let single_full = start.elapsed();
    let r = wsg(&sock, &["deny", "add", "2001:2:0:fffe::/64"]);
    assert_eq!(r.code, 1, "over capacity must be refused: {r:?}");
    wsg(&sock, &["deny", "remove", "2001:2:0:ffff::/64"]).ok();
    eprintln!(
        "bulk add of {} CIDRs: {bulk:?}; one add to a list of {}: {single_full:?}",
        cidrs.len(),
        cidrs.len()
    );
    // Generous: a regression to a walk per CIDR takes minutes.
    assert!(bulk < Duration::from_secs(30), "bulk add took {bulk:?}");
    assert!(
        single_full < Duration::from_secs(5),
        "one add took {single_full:?}"
    );
}
