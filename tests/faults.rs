//! Faults, with the real binary: an interface deleted and recreated while the daemon runs, start-up
//! errors that must leave nothing attached or pinned (missing interface, native XDP unsupported,
//! not root), bpffs not mounted, a tracepoint layout the program does not know, and `kill -9`
//! during a SYN flood.
//!
//! The daemon runs in the server namespace with `nsenter --net` (see tests/restart.rs: `ip netns
//! exec` would give it a private bpffs), with a pin root of its own per test.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, TcpStream},
    os::unix::fs::PermissionsExt as _,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use ws_guard::guard::check_format_text;
use ws_guard_tests::{
    binary::PinRoot,
    binary::binary,
    binary::{Daemon, pins_under},
    netns::{Testbed, in_ns, ip, ip_output, peer_like_a_container, sa, test_port, wait_until},
    privileged,
    traffic::{Outcome, Server, Stack, connect_from},
};

/// A config file readable by anybody (the unprivileged run must get past reading it).
fn config_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.flush().unwrap();
    std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    f
}

/// A command that runs the binary in namespace `ns` (nsenter execs it: the PID is its own).
fn in_netns(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}"))
        .arg(binary())
        .args(args);
    c
}

/// Runs `cmd` to its exit (at most 30 s; killed by PID after that): its status and stderr.
fn run_to_exit(mut cmd: Command) -> (std::process::ExitStatus, String) {
    let private = ws_guard_tests::binary::Private::unless_chosen(&cmd);
    if let Some(p) = &private {
        cmd.args(p.args());
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the command");
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = reader.join().unwrap();
    eprintln!("{cmd:?}: {status}\n{err}");
    (status, err)
}

/// The daemon's metrics page in `ns`.
fn metrics(ns: &str, metrics_port: u16) -> Option<String> {
    in_ns(ns, || {
        let mut s = TcpStream::connect(("127.0.0.1", metrics_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    })
}

/// The value of the sample whose name and labels start with `prefix`.
fn sample(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

fn xdp_on(ns: &str, dev: &str) -> bool {
    ip_output(&["-n", ns, "link", "show", "dev", dev]).contains("xdp")
}

/// Recreates the test bed's veth pair (deleted with `ip link del`) with the same names and
/// addresses, the client end like a container's (no XDP program, GRO off).
fn recreate_veth(tb: &Testbed) {
    let (srv, cli, s, c, n) = (&tb.srv, &tb.cli, &tb.srv_if, &tb.cli_if, tb.n);
    ip(&[
        "-n", srv, "link", "add", s, "type", "veth", "peer", "name", c, "netns", cli,
    ]);
    ip(&[
        "-n",
        srv,
        "addr",
        "add",
        &format!("198.18.{n}.1/24"),
        "dev",
        s,
    ]);
    for i in 0..8u8 {
        ip(&[
            "-n",
            cli,
            "addr",
            "add",
            &format!("198.18.{n}.{}/24", 2 + i),
            "dev",
            c,
        ]);
    }
    ip(&["-n", srv, "link", "set", s, "up"]);
    ip(&["-n", cli, "link", "set", c, "up"]);
    let up = wait_until(Duration::from_secs(5), || {
        ip_output(&["-n", srv, "-o", "link", "show", "dev", s]).contains("state UP")
            && ip_output(&["-n", cli, "-o", "link", "show", "dev", c]).contains("state UP")
    });
    assert!(up, "recreated veth pair {s}/{c} did not come up within 5 s");
    peer_like_a_container(cli, c);
}

#[test]
fn interface_deleted_and_recreated_is_protected_again() {
    if !privileged("interface_deleted_and_recreated_is_protected_again") {
        return;
    }
    let port = test_port(25);
    let metrics_port = 9105;
    let tb = Testbed::new("reatt", 40);
    // Declared after the test bed: dropped (pins removed) before its namespaces go.
    let root = PinRoot::new("reattach");
    let root_s = root.path();
    let server = Server::start(&tb.srv, port, Stack::Separate);
    let cfg = config_file(&format!(
        "interfaces = [\"{}\"]\nsweep_interval = \"200ms\"\n[capacity]\nsources = 1024\n\
         flows = 4096\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n[[port]]\n\
         port = {port}\nmax_connections = 2\nconnection_action = \"reject\"\n",
        tb.srv_if
    ));
    let cfg_path = cfg.path().to_str().unwrap().to_owned();
    let mut daemon = Daemon::start(in_netns(
        &tb.srv,
        &[
            "run",
            "--config",
            &cfg_path,
            "--pin-dir",
            &root_s,
            "--detach-on-exit",
        ],
    ));
    let attached = format!("ws_guard_xdp_attached{{interface=\"{}\",", tb.srv_if);
    let dst = sa(tb.server_v4(), port);
    let (a, b) = (tb.client_v4(0), tb.client_v4(1));
    let connect = |src: IpAddr| connect_from(&tb.cli, src, dst, Duration::from_secs(2));
    let _a1 = connect(a).stream();
    let _a2 = connect(a).stream();
    assert!(matches!(connect(a), Outcome::Refused));
    assert!(server.wait_held(2, Duration::from_secs(5)));
    assert_eq!(
        metrics(&tb.srv, metrics_port).and_then(|m| sample(&m, &attached)),
        Some(1.0)
    );

    // Deleting the server end deletes the pair; the kernel detaches the XDP link with it.
    let t0 = Instant::now();
    ip(&["-n", &tb.srv, "link", "del", &tb.srv_if]);
    let gone = format!(
        "{} is gone; XDP will be re-attached when it comes back",
        tb.srv_if
    );
    assert!(
        daemon.wait_for(&gone, Duration::from_secs(5)),
        "no warning that the interface is gone: {:?}",
        daemon.lines()
    );
    assert_eq!(
        metrics(&tb.srv, metrics_port).and_then(|m| sample(&m, &attached)),
        Some(0.0)
    );
    // Said once, not every sweep.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(daemon.count(&gone), 1, "{:?}", daemon.lines());

    recreate_veth(&tb);
    let back = format!("{} is back", tb.srv_if);
    assert!(
        daemon.wait_for(&back, Duration::from_secs(5)),
        "no re-attach within 5 s: {:?}",
        daemon.lines()
    );
    eprintln!("deleted, recreated and re-attached in {:?}", t0.elapsed());
    assert!(xdp_on(&tb.srv, &tb.srv_if));
    let link_pins = std::fs::read_dir(
        root.0
            .join(format!("v{}/links", ws_guard_common::names::LAYOUT_VERSION)),
    )
    .unwrap()
    .flatten()
    .filter(|e| {
        e.file_name()
            .to_string_lossy()
            .starts_with(&format!("xdp-{}-", tb.srv_if))
    })
    .count();
    assert_eq!(
        link_pins, 1,
        "one pinned XDP link for the recreated interface"
    );
    assert_eq!(
        metrics(&tb.srv, metrics_port).and_then(|m| sample(&m, &attached)),
        Some(1.0)
    );

    // Enforcing again: `a` still holds its 2 connections (TCP outlived the link), `b` gets 2.
    assert!(
        matches!(connect(a), Outcome::Refused),
        "a source at its maximum was let in after the re-attach"
    );
    let _b1 = connect(b).stream();
    let _b2 = connect(b).stream();
    assert!(matches!(connect(b), Outcome::Refused));
    assert_eq!(daemon.count(&gone), 1);

    assert!(daemon.stop(libc::SIGTERM).success());
    assert!(!xdp_on(&tb.srv, &tb.srv_if), "still attached after exit");
    assert_eq!(pins_under(&root.0), 0, "pins left after --detach-on-exit");
}

/// A start that fails must leave nothing attached and nothing pinned.
fn assert_nothing_left(ns: &str, devs: &[&str], root: &PinRoot) {
    for dev in devs {
        assert!(!xdp_on(ns, dev), "{dev} still has an XDP program");
    }
    assert_eq!(
        pins_under(&root.0),
        0,
        "pins left under {}",
        root.0.display()
    );
    assert!(!root.0.exists(), "{} left behind", root.0.display());
}

#[test]
fn missing_interface_is_refused_with_nothing_attached() {
    if !privileged("missing_interface_is_refused_with_nothing_attached") {
        return;
    }
    let tb = Testbed::new("noif", 41);
    let root = PinRoot::new("noif");
    // The existing interface first: attaching it must not survive the missing one.
    let cfg = config_file(&format!(
        "interfaces = [\"{}\", \"wsgnope0\"]\nwait_for_interfaces = \"1s\"\n[metrics]\n\
         listen = \"\"\n\n[[port]]\nport = {}\nmax_connections = 2\n",
        tb.srv_if,
        test_port(26)
    ));
    let (status, err) = run_to_exit(in_netns(
        &tb.srv,
        &[
            "run",
            "--config",
            cfg.path().to_str().unwrap(),
            "--pin-dir",
            &root.path(),
        ],
    ));
    assert!(!status.success());
    assert!(
        err.contains("interface wsgnope0")
            && err.contains("does not exist")
            && err.contains("waiting for it")
            && err.contains("after waiting 1s; nothing was attached"),
        "{err}"
    );
    assert_nothing_left(&tb.srv, &[&tb.srv_if], &root);
}

/// At boot the daemon may start before its interface exists (the unit's config names the
/// default route's, or an interface networking brings up later): it waits for it (bounded,
/// logged) and then enforces; a SIGTERM meanwhile stops it cleanly with nothing loaded.
#[test]
fn daemon_started_before_its_interface_waits_for_it() {
    if !privileged("daemon_started_before_its_interface_waits_for_it") {
        return;
    }
    let port = test_port(28);
    let tb = Testbed::new("boot", 50);
    let root = PinRoot::new("boot");
    let _server = Server::start(&tb.srv, port, Stack::Separate);
    let cfg = config_file(&format!(
        "interfaces = [\"wsgboot0\"]\nwait_for_interfaces = \"20s\"\n[metrics]\nlisten = \"\"\n\n\
         [[port]]\nport = {port}\nmax_connections = 1\nconnection_action = \"reject\"\n"
    ));
    let args = [
        "run",
        "--config",
        cfg.path().to_str().unwrap(),
        "--pin-dir",
        &root.path(),
        "--detach-on-exit",
    ];
    // Stopped while waiting: a clean exit, nothing pinned.
    let mut d = Daemon::spawn_in(&tb.srv, &args);
    assert!(
        d.wait_for("waiting for it", Duration::from_secs(10)),
        "{:?}",
        d.lines()
    );
    assert!(d.stop(libc::SIGTERM).success(), "{:?}", d.lines());
    assert!(d.contains("stopped while waiting"), "{:?}", d.lines());
    assert_nothing_left(&tb.srv, &[&tb.srv_if], &root);
    // Waiting, then the interface appears (a veth renamed into place, as networking would).
    let mut d = Daemon::spawn_in(&tb.srv, &args);
    assert!(
        d.wait_for("waiting for it", Duration::from_secs(10)),
        "{:?}",
        d.lines()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(!d.contains("enforcing on"), "{:?}", d.lines());
    ip(&["-n", &tb.srv, "link", "set", &tb.srv_if, "down"]);
    ip(&["-n", &tb.srv, "link", "set", &tb.srv_if, "name", "wsgboot0"]);
    ip(&["-n", &tb.srv, "link", "set", "wsgboot0", "up"]);
    assert!(
        d.wait_for("enforcing on wsgboot0", Duration::from_secs(10)),
        "{:?}",
        d.lines()
    );
    let dst = sa(tb.server_v4(), port);
    let a = tb.client_v4(0);
    let held = wait_until(Duration::from_secs(5), || {
        connect_from(&tb.cli, a, dst, Duration::from_secs(1)).is_connected()
    });
    assert!(held, "no connection through the interface once it appeared");
    assert!(d.stop(libc::SIGTERM).success(), "{:?}", d.lines());
    // Back to its name, for the test bed's cleanup.
    ip(&["-n", &tb.srv, "link", "set", "wsgboot0", "name", &tb.srv_if]);
}

#[test]
fn native_mode_unsupported_is_an_error_and_auto_falls_back_to_generic() {
    if !privileged("native_mode_unsupported_is_an_error_and_auto_falls_back_to_generic") {
        return;
    }
    let tb = Testbed::new("nonat", 42);
    let root = PinRoot::new("nonat");
    // A dummy interface has no native XDP (its driver has no ndo_bpf); neither has a bridge,
    // used where the kernel has no dummy driver (built without modules).
    let dummy = Command::new("ip")
        .args(["-n", &tb.srv, "link", "add", "wsgd0", "type", "dummy"])
        .output()
        .expect("ip");
    if !dummy.status.success() {
        eprintln!(
            "no dummy interfaces ({}): using a bridge",
            String::from_utf8_lossy(&dummy.stderr).trim()
        );
        ip(&["-n", &tb.srv, "link", "add", "wsgd0", "type", "bridge"]);
    }
    ip(&["-n", &tb.srv, "link", "set", "wsgd0", "up"]);
    let config = |mode: &str| {
        config_file(&format!(
            "interfaces = [\"{}\", \"wsgd0\"]\nxdp_mode = \"{mode}\"\n[metrics]\nlisten = \"\"\n\n\
             [[port]]\nport = {}\nmax_connections = 2\n",
            tb.srv_if,
            test_port(27)
        ))
    };
    let native = config("native");
    let (status, err) = run_to_exit(in_netns(
        &tb.srv,
        &[
            "run",
            "--config",
            native.path().to_str().unwrap(),
            "--pin-dir",
            &root.path(),
        ],
    ));
    assert!(!status.success());
    assert!(
        err.contains("attaching to wsgd0 in native mode")
            && err.contains("may not support native XDP"),
        "{err}"
    );
    // The veth (native XDP) was attached first and must have been undone.
    assert_nothing_left(&tb.srv, &[&tb.srv_if, "wsgd0"], &root);

    let auto = config("auto");
    let auto_path = auto.path().to_str().unwrap().to_owned();
    let root_s = root.path();
    let mut d = Daemon::start(in_netns(
        &tb.srv,
        &[
            "run",
            "--config",
            &auto_path,
            "--pin-dir",
            &root_s,
            "--detach-on-exit",
        ],
    ));
    assert!(
        d.contains("wsgd0: native XDP unavailable")
            && d.contains("attached in generic mode")
            && d.contains("enforcing on wsgd0 (generic XDP)")
            && d.contains(&format!(
                "{} is a veth (or a bond of veths): attached in generic mode",
                tb.srv_if
            ))
            && d.contains(&format!("enforcing on {} (generic XDP)", tb.srv_if)),
        "{:?}",
        d.lines()
    );
    assert!(ip_output(&["-n", &tb.srv, "link", "show", "dev", "wsgd0"]).contains("xdpgeneric"));
    assert!(d.stop(libc::SIGTERM).success());
    assert_nothing_left(&tb.srv, &[&tb.srv_if, "wsgd0"], &root);
}

#[test]
fn not_root_is_a_clear_error() {
    if !privileged("not_root_is_a_clear_error") {
        return;
    }
    let tb = Testbed::new("noroot", 43);
    let root = PinRoot::new("noroot");
    let cfg = config_file(&format!(
        "interfaces = [\"{}\"]\n[metrics]\nlisten = \"\"\n\n[[port]]\nport = {}\n\
         max_connections = 2\n",
        tb.srv_if,
        test_port(28)
    ));
    // nsenter (as root) enters the namespace, setpriv drops to nobody with no capabilities.
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", tb.srv))
        .args([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(binary())
        .args([
            "run",
            "--config",
            cfg.path().to_str().unwrap(),
            "--pin-dir",
            &root.path(),
        ]);
    let (status, err) = run_to_exit(cmd);
    assert!(!status.success());
    assert!(
        err.contains("needs root") && err.contains("CAP_BPF") && err.contains("uid 65534"),
        "{err}"
    );
    assert_nothing_left(&tb.srv, &[&tb.srv_if], &root);
}

/// `stat -f` type of a path, as seen by this process.
fn fs_type(path: &str) -> String {
    let out = Command::new("stat")
        .args(["-f", "-c", "%T", path])
        .output()
        .expect("stat");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn bpffs_not_mounted_is_mounted_by_the_daemon() {
    if !privileged("bpffs_not_mounted_is_mounted_by_the_daemon") {
        return;
    }
    assert_eq!(fs_type("/sys/fs/bpf"), "bpf_fs", "the host's bpffs");
    let tb = Testbed::new("nobpf", 44);
    let port = test_port(29);
    let cfg = config_file(&format!(
        "interfaces = [\"{}\"]\n[metrics]\nlisten = \"\"\n\n[[port]]\nport = {port}\n\
         max_connections = 2\n",
        tb.srv_if
    ));
    let _server = Server::start(&tb.srv, port, Stack::Separate);
    // A private mount namespace (nothing propagates back to the host's), with every bpffs at
    // /sys/fs/bpf unmounted in it; the daemon then finds none. Its pins live in the bpffs it
    // mounts there, which goes with the namespace.
    let private = ws_guard_tests::binary::Private::new();
    let script = format!(
        "for i in 1 2 3 4 5 6 7 8; do \
           [ \"$(stat -f -c %T /sys/fs/bpf)\" = bpf_fs ] || break; \
           umount /sys/fs/bpf || exit 97; \
         done; \
         [ \"$(stat -f -c %T /sys/fs/bpf)\" = bpf_fs ] && exit 98; \
         exec nsenter --net=/run/netns/{} {} run --config {} --detach-on-exit {}",
        tb.srv,
        binary().display(),
        cfg.path().display(),
        private.args().join(" ")
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let mut d = Daemon::start(cmd);
    assert!(
        d.contains("mounted bpffs at /sys/fs/bpf"),
        "{:?}",
        d.lines()
    );
    assert_eq!(
        fs_type("/sys/fs/bpf"),
        "bpf_fs",
        "the host's bpffs is untouched"
    );
    // A fresh bpffs: nothing of the host's pins is seen.
    assert!(d.contains("no pinned state"), "{:?}", d.lines());
    // Enforcing: 2 connections, the third refused.
    let dst = sa(tb.server_v4(), port);
    let a = tb.client_v4(0);
    let _a1 = connect_from(&tb.cli, a, dst, Duration::from_secs(2)).stream();
    let _a2 = connect_from(&tb.cli, a, dst, Duration::from_secs(2)).stream();
    assert!(matches!(
        connect_from(&tb.cli, a, dst, Duration::from_secs(2)),
        Outcome::Refused
    ));
    assert!(d.stop(libc::SIGTERM).success());
    assert!(!xdp_on(&tb.srv, &tb.srv_if));
}

/// The tracepoint format of Linux 6.x, as tracefs prints it.
const FORMAT: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;

print fmt: \"family=%s ...\"
";

#[test]
fn tracepoint_layout_the_program_does_not_know_is_refused() {
    check_format_text(FORMAT).expect("the layout the program was built for");
    // A kernel that moved a field (here: a field inserted before `family`).
    let moved = FORMAT.replace("__u16 family;\toffset:28;", "__u16 family;\toffset:32;");
    let err = format!("{:#}", check_format_text(&moved).unwrap_err());
    assert!(
        err.contains("field family is not at offset 28 size 2")
            && err.contains("offset:32")
            && err.contains("this kernel is not supported"),
        "{err}"
    );
    // A field of another size.
    let resized = FORMAT.replace(
        "int newstate;\toffset:20;\tsize:4;",
        "int newstate;\toffset:20;\tsize:8;",
    );
    let err = format!("{:#}", check_format_text(&resized).unwrap_err());
    assert!(
        err.contains("field newstate is not at offset 20 size 4"),
        "{err}"
    );
    // A kernel without the field at all.
    let missing: String = FORMAT
        .lines()
        .filter(|l| !l.contains("saddr_v6"))
        .map(|l| format!("{l}\n"))
        .collect();
    let err = format!("{:#}", check_format_text(&missing).unwrap_err());
    assert!(
        err.contains("has no field saddr_v6") && err.contains("this kernel is not supported"),
        "{err}"
    );
    // Matches the running kernel, where tracefs is readable.
    if let Ok(real) =
        std::fs::read_to_string("/sys/kernel/tracing/events/sock/inet_sock_set_state/format")
    {
        check_format_text(&real).expect("this kernel's layout");
    }
}

/// `ws_guard_source_connections` of `source` (e.g. `198.18.45.2/32`) on `port`.
fn source_connections(body: &str, port: u16, source: &str) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with("ws_guard_source_connections{"))
        .find(|l| {
            l.contains(&format!("port=\"{port}\"")) && l.contains(&format!("source=\"{source}\""))
        })
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

#[test]
fn kill_during_a_syn_flood_never_lets_a_source_at_its_maximum_in() {
    if !privileged("kill_during_a_syn_flood_never_lets_a_source_at_its_maximum_in") {
        return;
    }
    let t0 = Instant::now();
    let port = test_port(30);
    let metrics_port = 9105;
    let tb = Testbed::new("kflood", 45);
    let root = PinRoot::new("kflood");
    let root_s = root.path();
    let server = Server::start(&tb.srv, port, Stack::Separate);
    let cfg = config_file(&format!(
        "interfaces = [\"{}\"]\nsweep_interval = \"200ms\"\n[capacity]\nsources = 1024\n\
         flows = 4096\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\ntop_sources = 10\n\n\
         [[port]]\nport = {port}\nmax_connections = 2\nconnection_action = \"reject\"\n",
        tb.srv_if
    ));
    let cfg_path = cfg.path().to_str().unwrap().to_owned();
    let mut first = Daemon::start(in_netns(
        &tb.srv,
        &["run", "--config", &cfg_path, "--pin-dir", &root_s],
    ));
    let dst = sa(tb.server_v4(), port);
    let a = tb.client_v4(0);
    let a_key = format!("{a}/32");
    let _a1 = connect_from(&tb.cli, a, dst, Duration::from_secs(2)).stream();
    let _a2 = connect_from(&tb.cli, a, dst, Duration::from_secs(2)).stream();
    assert!(matches!(
        connect_from(&tb.cli, a, dst, Duration::from_secs(2)),
        Outcome::Refused
    ));
    assert!(server.wait_held(2, Duration::from_secs(5)));
    let before = metrics(&tb.srv, metrics_port).expect("metrics");
    assert_eq!(source_connections(&before, port, &a_key), Some(2.0));
    let limited = format!(
        "ws_guard_decisions_total{{family=\"ipv4\",port=\"{port}\",reason=\"conn_limited\"}} "
    );
    let limited_before = sample(&before, &limited).expect("conn_limited");

    // The real client keeps trying from `a` through the flood, the kill and the restart.
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
    // A SYN flood from a spoofed address of the client's subnet that nobody has.
    let spoofed = Ipv4Addr::new(198, 18, tb.n, 200).to_string();
    let flood = tb.spawn_in(
        &tb.cli,
        "hping3",
        &[
            "--flood",
            "-S",
            "-p",
            &port.to_string(),
            "-a",
            &spoofed,
            &tb.server_v4().to_string(),
        ],
        Stdio::null(),
    );
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        flood.child().try_wait().unwrap().is_none(),
        "hping3 exited at once"
    );

    // kill -9 while the flood runs.
    let status = first.stop(libc::SIGKILL);
    assert!(!status.success());
    assert!(
        xdp_on(&tb.srv, &tb.srv_if),
        "the XDP program went with the daemon"
    );
    let during = refused.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        refused.load(Ordering::Relaxed) > during,
        "the client's attempts were not refused while the daemon was down"
    );

    // Restarted under the flood: adopts the pinned state, `a` still holds exactly 2.
    let mut second = Daemon::start(in_netns(
        &tb.srv,
        &[
            "run",
            "--config",
            &cfg_path,
            "--pin-dir",
            &root_s,
            "--detach-on-exit",
        ],
    ));
    assert!(
        second.contains("adopted the pinned state"),
        "{:?}",
        second.lines()
    );
    let after = metrics(&tb.srv, metrics_port).expect("metrics after the restart");
    assert_eq!(
        source_connections(&after, port, &a_key),
        Some(2.0),
        "the real client's count changed across the kill"
    );
    let limited_after = sample(&after, &limited).expect("conn_limited");
    std::thread::sleep(Duration::from_millis(500));
    assert!(flood.signal(libc::SIGKILL), "hping3 had already exited");
    assert!(flood.wait_timeout(Duration::from_secs(5)).is_some());
    stop.store(true, Ordering::Relaxed);
    hammer.join().unwrap();

    let (admitted, refused) = (
        admitted.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    );
    eprintln!(
        "flood: {} SYNs refused over the limit while it ran (kernel counter); the real client: \
         {refused} attempts refused, {admitted} admitted; {:?} in all",
        limited_after - limited_before,
        t0.elapsed()
    );
    assert_eq!(
        admitted, 0,
        "a source at its maximum was let in during the kill"
    );
    assert!(refused >= 10, "only {refused} attempts were judged");
    // The flood reached the program: thousands of its SYNs were over its limit of 2.
    assert!(
        limited_after - limited_before > 1000.0,
        "the flood barely reached the program: {}",
        limited_after - limited_before
    );
    let end = metrics(&tb.srv, metrics_port).expect("metrics at the end");
    assert_eq!(source_connections(&end, port, &a_key), Some(2.0));
    assert!(matches!(
        connect_from(&tb.cli, a, dst, Duration::from_secs(2)),
        Outcome::Refused
    ));
    assert!(second.stop(libc::SIGTERM).success());
    assert!(!xdp_on(&tb.srv, &tb.srv_if));
    assert_eq!(pins_under(&root.0), 0);
}

/// An interface another XDP program occupies (here another ws-guard with its own pin
/// directory): the start fails naming that program and how to remove it, with nothing left.
#[test]
fn an_occupied_interface_names_its_program() {
    if !privileged("an_occupied_interface_names_its_program") {
        return;
    }
    let tb = Testbed::new("busy", 51);
    let (root1, root2) = (PinRoot::new("busy1"), PinRoot::new("busy2"));
    let cfg = config_file(&format!(
        "interfaces = [\"{}\"]\n[metrics]\nlisten = \"\"\n\n[[port]]\nport = {}\n",
        tb.srv_if,
        test_port(29)
    ));
    let cfg_s = cfg.path().to_str().unwrap().to_owned();
    let mut first = Daemon::start_in(
        &tb.srv,
        &[
            "run",
            "--config",
            &cfg_s,
            "--pin-dir",
            &root1.path(),
            "--detach-on-exit",
        ],
    );
    let (status, err) = run_to_exit(in_netns(
        &tb.srv,
        &["run", "--config", &cfg_s, "--pin-dir", &root2.path()],
    ));
    assert!(!status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "{} already has an XDP program attached (wsg_xdp, id",
            tb.srv_if
        )) && err.contains("ws-guard teardown --pin-dir"),
        "{err}"
    );
    assert!(first.stop(libc::SIGTERM).success());
    assert_eq!(pins_under(&root2.0), 0, "the failed start left pins");
}
