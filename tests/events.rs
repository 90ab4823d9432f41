//! `ws-guard events` and the daemon's log formats, end to end: the real daemon in a network
//! namespace, real TCP from the client namespace earning a ban and refusals, the real CLI over
//! the control socket (`--json`, text, `--since`, `--follow` stopped by SIGTERM or by the daemon
//! going away); and the daemon's stderr as JSON Lines, as text one line per record, and real
//! journal records sent to a socket standing in for journald's (a private mount namespace puts
//! it at /run/systemd/journal/socket), with `auto` falling back to text when that socket is
//! missing.

use std::{
    collections::HashMap,
    net::IpAddr,
    os::unix::net::UnixDatagram,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;
use ws_guard_tests::{
    binary::{Daemon, DaemonFiles, binary, collect_lines, wsg},
    netns::{Testbed, sa, test_port, wait_until},
    privileged,
    traffic::{Outcome, Server, Stack, connect_from},
};

/// A state file the daemon cannot read (a TOML error whose message spans lines).
fn break_state_file(paths: &DaemonFiles) {
    std::fs::create_dir_all(paths.state().parent().unwrap()).unwrap();
    std::fs::write(paths.state(), "monitor = \n[[[\n").unwrap();
}

/// The lines of `events --json`, each an object.
fn events_json(socket: &Path, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["--json", "events"];
    args.extend_from_slice(extra);
    let r = wsg(socket, &args);
    assert_eq!(r.code, 0, "{r:?}");
    r.stdout
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"));
            assert_eq!(v["schema_version"], 1, "{l}");
            v
        })
        .collect()
}

fn find<'a>(events: &'a [Value], want: &[(&str, Value)]) -> Option<&'a Value> {
    events
        .iter()
        .find(|e| want.iter().all(|(k, v)| &e[*k] == v))
}

/// A `ws-guard events --follow` child, its stdout collected line by line.
struct Follower {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Follower {
    fn start(socket: &Path, json: bool) -> Self {
        let mut cmd = Command::new(binary());
        cmd.arg("--socket").arg(socket).args(["events", "--follow"]);
        if json {
            cmd.arg("--json");
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting events --follow");
        let (lines, reader) = collect_lines(child.stdout.take().unwrap(), "follow");
        Self {
            child,
            lines,
            reader: Some(reader),
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn wait_for(&self, limit: Duration, mut cond: impl FnMut(&[String]) -> bool) -> bool {
        wait_until(limit, || cond(&self.lines()))
    }

    /// Waits (at most `limit`) for its exit; the exit code and stderr.
    fn exit(&mut self, limit: Duration) -> (Option<i32>, String) {
        let start = Instant::now();
        let status = loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                break st;
            }
            assert!(
                start.elapsed() < limit,
                "events --follow did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        (status.code(), err)
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own unreaped child, by PID.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A source over `new_connections` is banned and keeps being refused, another is refused by
/// `max_connections`: `events` shows the ban and the refusals with their source, port and
/// reason (JSON Lines and text, `--since`); `--follow` prints an event made after it started
/// and ends cleanly on SIGTERM, and with exit code 3 when the daemon goes away.
#[test]
fn events_show_bans_and_refusals_and_follow() {
    if !privileged("events_show_bans_and_refusals_and_follow") {
        return;
    }
    let (port, port2) = (test_port(1), test_port(2));
    let tb = Testbed::new("events", 70);
    let paths = DaemonFiles::new("events");
    let _server = Server::start(&tb.srv, port, Stack::Separate);
    let _server2 = Server::start(&tb.srv, port2, Stack::Separate);
    paths.write_config(
        &tb.srv_if,
        "ban_duration = \"3s\"",
        &format!(
            "[[port]]\nport = {port}\nnew_connections = \"2/100s\"\nrate_action = \"drop\"\n\n\
             [[port]]\nport = {port2}\nmax_connections = 1\nconnection_action = \"reject\"\n"
        ),
    );
    let args = paths.run_args(&["--detach-on-exit"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start_in(&tb.srv, &args);
    let sock = paths.socket();
    let (hammer, limited, manual): (IpAddr, IpAddr, IpAddr) =
        (tb.client_v4(0), tb.client_v4(1), tb.client_v4(2));
    let short = Duration::from_millis(700);

    // Nothing happened yet: no event.
    assert!(events_json(&sock, &[]).is_empty());

    // Two per window, then the third attempt is refused and bans the source; two more while
    // banned.
    let dst = sa(tb.server_v4(), port);
    let a = connect_from(&tb.cli, hammer, dst, Duration::from_secs(2)).stream();
    let b = connect_from(&tb.cli, hammer, dst, Duration::from_secs(2)).stream();
    for _ in 0..3 {
        assert!(matches!(
            connect_from(&tb.cli, hammer, dst, short),
            Outcome::TimedOut
        ));
    }
    // One connection on port2, the second refused by max_connections (RST).
    let dst2 = sa(tb.server_v4(), port2);
    let c = connect_from(&tb.cli, limited, dst2, Duration::from_secs(2)).stream();
    assert!(matches!(
        connect_from(&tb.cli, limited, dst2, short),
        Outcome::Refused
    ));

    let src = |a: IpAddr| Value::from(format!("{a}/32"));
    let mut events = Vec::new();
    let all_there = wait_until(Duration::from_secs(5), || {
        events = events_json(&sock, &[]);
        find(
            &events,
            &[("kind", "ban_started".into()), ("source", src(hammer))],
        )
        .is_some()
            && find(
                &events,
                &[("kind", "refused".into()), ("source", src(hammer))],
            )
            .is_some()
            && find(
                &events,
                &[("kind", "refused".into()), ("source", src(limited))],
            )
            .is_some()
    });
    assert!(all_there, "{events:#?}\n{:?}", daemon.lines());
    let started = find(
        &events,
        &[("kind", "ban_started".into()), ("source", src(hammer))],
    )
    .unwrap();
    assert_eq!(started["port"], port, "{started}");
    assert_eq!(started["reason"], "rate", "{started}");
    assert_eq!(started["duration_ms"], 3000, "{started}");
    let refused = find(
        &events,
        &[("kind", "refused".into()), ("source", src(hammer))],
    )
    .unwrap();
    assert_eq!(refused["port"], port, "{refused}");
    assert_eq!(refused["reason"], "banned", "{refused}");
    assert!(refused["count"].as_u64().unwrap() >= 1, "{refused}");
    let limit = find(
        &events,
        &[("kind", "refused".into()), ("source", src(limited))],
    )
    .unwrap();
    assert_eq!(limit["port"], port2, "{limit}");
    assert_eq!(limit["reason"], "limit", "{limit}");
    assert_eq!(limit["count"], 1, "{limit}");
    // Numbered in order from 1, with RFC 3339 times.
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    for e in &events {
        let t = e["time"].as_str().unwrap();
        assert!(
            t.len() == 24 && t.ends_with('Z') && &t[10..11] == "T",
            "{e}"
        );
    }

    // Text: the log line's form, after the time.
    let text = wsg(&sock, &["events"]);
    assert_eq!(text.code, 0, "{text:?}");
    let want = format!("ban started: source={hammer}/32 port={port} reason=rate duration=3s");
    assert!(text.stdout.contains(&want), "{want:?} in {text:?}");
    let want = format!("refused: source={limited}/32 port={port2} reason=limit count=1");
    assert!(text.stdout.contains(&want), "{want:?} in {text:?}");
    // One line per event (the ban may have ended meanwhile: one more).
    assert!(text.stdout.lines().count() >= events.len(), "{text:?}");
    // --since: only what comes after.
    let last = *seqs.last().unwrap();
    let after = events_json(&sock, &["--since", &(last - 1).to_string()]);
    assert_eq!(after[0]["seq"], last, "{after:?}");

    // --follow prints the events kept, then one made after it started.
    let mut follower = Follower::start(&sock, true);
    assert!(
        follower.wait_for(Duration::from_secs(5), |l| l.len() >= events.len()),
        "{:?}",
        follower.lines()
    );
    let r = wsg(
        &sock,
        &[
            "bans",
            "add",
            &manual.to_string(),
            "--port",
            &port.to_string(),
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let manual_started = |lines: &[String]| {
        lines.iter().any(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["kind"] == "ban_started" && v["source"] == src(manual) && v["reason"] == "manual"
        })
    };
    assert!(
        follower.wait_for(Duration::from_secs(5), manual_started),
        "{:?}",
        follower.lines()
    );
    // And the hammer's ban runs out (3 s): the sweep ends it, reported as it happens.
    let ended = |lines: &[String]| {
        lines.iter().any(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["kind"] == "ban_ended" && v["source"] == src(hammer) && v["ban_reason"] == "rate"
        })
    };
    assert!(
        follower.wait_for(Duration::from_secs(8), ended),
        "{:?}",
        follower.lines()
    );
    // Every line an event, each once, in order.
    let seqs: Vec<u64> = follower
        .lines()
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    follower.signal(libc::SIGTERM);
    let (code, err) = follower.exit(Duration::from_secs(3));
    assert_eq!(code, Some(0), "{err}");

    // A text follower ends with exit code 3 when the daemon goes away.
    let mut follower = Follower::start(&sock, false);
    assert!(
        follower.wait_for(Duration::from_secs(5), |l| l
            .iter()
            .any(|l| l.contains(&format!("ban started: source={manual}/32")))),
        "{:?}",
        follower.lines()
    );
    drop((a, b, c));
    assert!(daemon.stop(libc::SIGTERM).success());
    let (code, err) = follower.exit(Duration::from_secs(5));
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("the daemon went away"), "{err}");
    // And a plain `events` with no daemon: exit code 3, as every client command.
    let r = wsg(&sock, &["events"]);
    assert_eq!(r.code, 3, "{r:?}");
}

/// `--log-format json`: every line of the daemon's stderr is one JSON object with its
/// timestamp, level, target and message, the refused reload's message (a TOML error over
/// several lines) included.
#[test]
fn json_log_lines() {
    if !privileged("json_log_lines") {
        return;
    }
    let port = test_port(3);
    let tb = Testbed::new("logjson", 71);
    let paths = DaemonFiles::new("logjson");
    paths.write_config(
        &tb.srv_if,
        "",
        &format!("[[port]]\nport = {port}\nmax_connections = 2\n"),
    );
    let args = paths.run_args(&["--log-format", "json", "--detach-on-exit"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start_in(&tb.srv, &args);
    break_state_file(&paths);
    daemon.signal(libc::SIGHUP);
    assert!(
        daemon.wait_for("reload refused", Duration::from_secs(5)),
        "{:?}",
        daemon.lines()
    );
    assert!(daemon.stop(libc::SIGTERM).success());
    let records: Vec<Value> = daemon
        .lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    for r in &records {
        assert!(
            ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&r["level"].as_str().unwrap()),
            "{r}"
        );
        assert!(r["message"].is_string() && r["target"].is_string(), "{r}");
        let t = r["timestamp"].as_str().unwrap();
        assert!(t.ends_with('Z') && &t[10..11] == "T", "{r}");
    }
    let enforcing = records
        .iter()
        .find(|r| {
            r["message"]
                .as_str()
                .unwrap()
                .starts_with(&format!("enforcing on {}", tb.srv_if))
        })
        .expect("no enforcing record");
    assert_eq!(enforcing["level"], "INFO");
    assert_eq!(enforcing["target"], "ws_guard::daemon");
    let refused = records
        .iter()
        .find(|r| {
            r["message"]
                .as_str()
                .unwrap()
                .starts_with("reload refused, the running limits stay: ")
        })
        .expect("no refused reload");
    assert_eq!(refused["level"], "ERROR");
    // The message is whole, its line breaks escaped in the one line.
    assert!(
        refused["message"].as_str().unwrap().contains('\n'),
        "{refused}"
    );
}

/// The daemon in a private mount namespace of its own (a tmpfs over /run; with `journal`, that
/// directory bind-mounted on /run/systemd/journal), with JOURNAL_STREAM naming its stderr as
/// systemd would: `args` after the binary.
fn journal_command(ns: &str, journal: Option<&Path>, args: &[String]) -> Command {
    const SCRIPT: &str = "set -e\n\
        mount -t tmpfs wsg-test-run /run\n\
        mkdir -p /run/systemd/journal\n\
        if [ -n \"$WSG_JOURNAL_DIR\" ]; then\n\
          mount --bind \"$WSG_JOURNAL_DIR\" /run/systemd/journal\n\
        fi\n\
        JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2)\n\
        export JOURNAL_STREAM\n\
        exec \"$@\"\n";
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}"))
        .args([
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            SCRIPT,
            "sh",
        ])
        .arg(binary())
        .args(args)
        .env_remove("JOURNAL_STREAM")
        .env_remove("RUST_LOG");
    match journal {
        Some(dir) => cmd.env("WSG_JOURNAL_DIR", dir),
        None => cmd.env_remove("WSG_JOURNAL_DIR"),
    };
    cmd
}

/// One record of the journal's native protocol: `NAME=value` lines, or `NAME`, a 64-bit
/// little-endian length, the value and a newline.
fn journal_fields(mut b: &[u8]) -> Option<HashMap<String, String>> {
    let mut fields = HashMap::new();
    while !b.is_empty() {
        let nl = b.iter().position(|c| *c == b'\n')?;
        let line = &b[..nl];
        b = &b[nl + 1..];
        if let Some(eq) = line.iter().position(|c| *c == b'=') {
            fields.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
        } else {
            let len = u64::from_le_bytes(b.get(..8)?.try_into().ok()?) as usize;
            let value = b.get(8..8 + len)?;
            if b.get(8 + len) != Some(&b'\n') {
                return None;
            }
            fields.insert(
                String::from_utf8_lossy(line).into_owned(),
                String::from_utf8_lossy(value).into_owned(),
            );
            b = &b[8 + len + 1..];
        }
    }
    Some(fields)
}

/// Under systemd (JOURNAL_STREAM names stderr), `auto` sends journal records with priorities
/// and fields to the journal's socket, and nothing to stderr; without that socket, it falls
/// back to text on stderr, one line per record (a refused reload's message of several lines
/// included).
#[test]
fn journald_records_and_the_text_fallback() {
    if !privileged("journald_records_and_the_text_fallback") {
        return;
    }
    let port = test_port(4);
    let tb = Testbed::new("logjd", 72);
    let paths = DaemonFiles::new("logjd");
    paths.write_config(
        &tb.srv_if,
        "",
        &format!("[[port]]\nport = {port}\nmax_connections = 2\n"),
    );
    let args = paths.run_args(&["--detach-on-exit"]);

    // A socket standing in for journald's.
    let journal = tempfile::tempdir().unwrap();
    let socket = UnixDatagram::bind(journal.path().join("socket")).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let records = Arc::new(Mutex::new(Vec::<HashMap<String, String>>::new()));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (records, done) = (records.clone(), done.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let Ok(n) = socket.recv(&mut buf) else {
                    continue;
                };
                // tracing-journald's empty probe at start.
                if n == 0 {
                    continue;
                }
                let fields = journal_fields(&buf[..n])
                    .unwrap_or_else(|| panic!("malformed record {:?}", &buf[..n]));
                eprintln!("journal: {fields:?}");
                records.lock().unwrap().push(fields);
            }
        })
    };
    let record = |prefix: &str| {
        records
            .lock()
            .unwrap()
            .iter()
            .find(|r| r.get("MESSAGE").is_some_and(|m| m.starts_with(prefix)))
            .cloned()
    };

    let mut daemon = Daemon::spawn(journal_command(&tb.srv, Some(journal.path()), &args));
    let enforcing = format!("enforcing on {}", tb.srv_if);
    assert!(
        wait_until(Duration::from_secs(20), || record(&enforcing).is_some()),
        "no journal record {enforcing:?}: {:?}; stderr {:?}",
        records.lock().unwrap(),
        daemon.lines()
    );
    let r = record(&enforcing).unwrap();
    assert_eq!(r["PRIORITY"], "6", "{r:?}");
    assert_eq!(r["TARGET"], "ws_guard::daemon", "{r:?}");
    assert_eq!(r["SYSLOG_IDENTIFIER"], "ws-guard", "{r:?}");
    assert!(r["CODE_FILE"].ends_with("daemon.rs"), "{r:?}");
    assert!(r["CODE_LINE"].parse::<u32>().is_ok(), "{r:?}");
    break_state_file(&paths);
    daemon.signal(libc::SIGHUP);
    let refused = "reload refused, the running limits stay: ";
    assert!(
        wait_until(Duration::from_secs(5), || record(refused).is_some()),
        "{:?}",
        records.lock().unwrap()
    );
    assert_eq!(record(refused).unwrap()["PRIORITY"], "3");
    assert!(daemon.stop(libc::SIGTERM).success());
    assert!(
        record("exiting").is_some() || record("detached and removed").is_some(),
        "{:?}",
        records.lock().unwrap()
    );
    // Everything went to the journal: stderr is empty.
    assert!(daemon.lines().is_empty(), "{:?}", daemon.lines());
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    reader.join().unwrap();
    let _ = std::fs::remove_file(paths.state());

    // No journal socket: text on stderr (Daemon::start waits for its "enforcing on").
    let mut daemon = Daemon::start(journal_command(&tb.srv, None, &args));
    break_state_file(&paths);
    daemon.signal(libc::SIGHUP);
    assert!(
        daemon.wait_for(refused, Duration::from_secs(5)),
        "{:?}",
        daemon.lines()
    );
    assert!(daemon.stop(libc::SIGTERM).success());
    let lines = daemon.lines();
    // One line per record: each starts with its time and level.
    for l in &lines {
        let level = l.split_whitespace().nth(1).unwrap_or("");
        assert!(
            l.len() > 28
                && &l[4..5] == "-"
                && &l[10..11] == "T"
                && ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&level),
            "not a record of its own: {l:?} in {lines:#?}"
        );
    }
    let refused_line = lines.iter().find(|l| l.contains(refused)).unwrap();
    assert!(
        refused_line.contains(" ERROR ws_guard::daemon: ") && refused_line.contains("; "),
        "{refused_line}"
    );
}
