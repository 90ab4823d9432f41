//! ws-guard where container servers run: the real daemon on a Docker-like host (a bridge,
//! container namespaces, published ports by DNAT with iptables-nft or nftables, a routed
//! container, the daemon inside a container's namespace on its veth), judged by what the
//! CLIENT sees: a connection open, refused (RST: ECONNREFUSED) or timed out. The peers are as
//! users have them: no XDP program, GRO off. See tests/src/hostbed.rs for the layout.
//!
//! The daemon's sweep runs every 250 ms here; each limit is checked again after a 2.5 s wait
//! (10 sweeps), since a limit that holds only until the next sweep does not hold.
//!
//! The tests of this file run one at a time (a lock), whatever `--test-threads` says: they
//! measure what clients see, and each runs its own daemon.

use std::{
    io::Read as _,
    net::IpAddr,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use ws_guard_tests::{
    hostbed::{Client, HostBed, Publish, Seen, Variant},
    netns::{test_port, wait_until},
    privileged,
};

/// Connect timeout of every attempt: a dropped SYN (or a lost RST) shows as timed out, after
/// one retransmission of the SYN at 1 s.
const TRY: Duration = Duration::from_millis(1500);
/// The wait in the middle of the limit checks: 10 sweeps of 250 ms.
const WAIT: Duration = Duration::from_millis(2500);
/// An RST from XDP reaches the client at once; a refusal that takes longer is not one.
const QUICK: Duration = Duration::from_secs(1);
/// How long a slot given back may take to be usable again.
const RELEASE: Duration = Duration::from_secs(10);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A `[[port]]` table: `max` concurrent connections per source, refused with `action`.
fn max_conns(port: u16, max: u32, action: &str) -> String {
    format!("[[port]]\nport = {port}\nmax_connections = {max}\nconnection_action = \"{action}\"\n")
}

/// What the client must see when refused with `action`.
fn refusal(action: &str) -> Seen {
    match action {
        "reject" => Seen::Refused,
        "drop" => Seen::TimedOut,
        _ => unreachable!(),
    }
}

/// One source against `max_connections = 3`: three attempts one at a time, each open and held;
/// the 4th refused; after a 2.5 s wait, the 5th and 6th refused too (the 3 still held). A
/// refusal by RST must be quick. Returns what went wrong.
fn hold_three(c: &mut Client, refused: Seen) -> Vec<String> {
    for _ in 0..4 {
        c.attempt(TRY);
    }
    c.note(&format!("waiting {WAIT:?} with {} held", c.held.len()));
    std::thread::sleep(WAIT);
    for _ in 0..2 {
        c.attempt(TRY);
    }
    let mut problems = Vec::new();
    let seen: Vec<Seen> = c.seen.iter().map(|(s, _)| *s).collect();
    let want = [
        Seen::Open,
        Seen::Open,
        Seen::Open,
        refused,
        refused,
        refused,
    ];
    if seen != want {
        problems.push(format!(
            "{} -> {}: expected {want:?}, the client saw {seen:?} ({} of 6 opened)",
            c.src,
            c.dst,
            c.opened()
        ));
    }
    if refused == Seen::Refused {
        for (i, (s, took)) in c.seen.iter().enumerate() {
            if *s == Seen::Refused && *took >= QUICK {
                problems.push(format!(
                    "{} -> {}: attempt #{} refused only after {took:?}",
                    c.src,
                    c.dst,
                    i + 1
                ));
            }
        }
    }
    problems
}

/// The server of container `i` holds exactly `n` connections: at least `n` within 2 s, and still
/// exactly `n` once late accepts had 300 ms to arrive.
fn server_holds(bed: &HostBed, i: u8, n: usize) -> Vec<String> {
    let s = bed.server(i);
    wait_until(Duration::from_secs(2), || s.held() >= n);
    std::thread::sleep(Duration::from_millis(300));
    let held = s.held();
    if held == n {
        Vec::new()
    } else {
        vec![format!(
            "the server in container K{i} holds {held} connections, expected {n}"
        )]
    }
}

/// Gives one of the 3 held connections back, closed by the server of container `by_server`
/// (then by the client, on EOF, as a real client does) or else by the client; then, within
/// 10 s, a new attempt must open, and only one: the next is refused again.
fn release_one(bed: &HostBed, c: &mut Client, by_server: Option<u8>, refused: Seen) -> Vec<String> {
    let mut problems = Vec::new();
    let s = c.held.pop().expect("a held connection");
    let local = s.local_addr().unwrap();
    match by_server {
        Some(i) => {
            if !bed.server(i).close(local) {
                problems.push(format!("the server of K{i} does not hold {local}"));
            }
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let eof = matches!((&s).read(&mut [0u8; 1]), Ok(0));
            c.note(&format!(
                "the server closed {local} (client saw EOF: {eof}); the client closes it"
            ));
            if !eof {
                problems.push(format!(
                    "no EOF on {local} within 3 s of the server's close"
                ));
            }
        }
        None => c.note(&format!("the client closes {local}")),
    }
    drop(s);
    let start = Instant::now();
    let mut opened = false;
    for _ in 0..60 {
        if c.attempt(TRY).0 == Seen::Open {
            opened = true;
            break;
        }
        if start.elapsed() >= RELEASE {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if !opened {
        problems.push(format!(
            "{} -> {}: no attempt opened within {RELEASE:?} after one of the 3 connections was closed",
            c.src, c.dst
        ));
        return problems;
    }
    c.note(&format!("a slot came back after {:?}", start.elapsed()));
    let (next, _) = c.attempt(TRY);
    if next != refused {
        problems.push(format!(
            "{} -> {}: after one slot came back, the attempt after the one that opened was {next:?}, expected {refused:?}",
            c.src, c.dst
        ));
    }
    problems
}

/// A source that has done nothing yet gets its own 3, and the 4th is refused.
fn own_three(c: &mut Client, refused: Seen) -> Vec<String> {
    for _ in 0..4 {
        c.attempt(TRY);
    }
    let seen: Vec<Seen> = c.seen.iter().map(|(s, _)| *s).collect();
    let want = [Seen::Open, Seen::Open, Seen::Open, refused];
    if seen == want {
        Vec::new()
    } else {
        vec![format!(
            "second source {} -> {}: expected {want:?}, saw {seen:?}",
            c.src, c.dst
        )]
    }
}

/// Passes, printing the clients' views, or panics with every problem, every client's attempts
/// and the daemon's log.
fn verdict(bed: &HostBed, clients: &[&Client], problems: Vec<String>) {
    let views: Vec<String> = clients.iter().map(|c| c.summary()).collect();
    if problems.is_empty() {
        eprintln!("{}", views.join("\n"));
        return;
    }
    panic!(
        "{} problem(s):\n  {}\n\nwhat the clients saw:\n  {}\n\n{}",
        problems.len(),
        problems.join("\n  "),
        views.join("\n  "),
        bed.report()
    );
}

/// `docker run -p WIRE:PORT` with iptables-nft DNAT, IPv4, reject: exactly 3 per source, also
/// after 10 sweeps; a connection the server closes gives exactly one slot back; another source
/// has its own 3.
#[test]
fn iptables_dnat_ipv4_exactly_three_per_source() {
    if !privileged("iptables_dnat_ipv4_exactly_three_per_source") {
        return;
    }
    let _serial = serial();
    let (wire, port) = (test_port(0), test_port(1));
    let mut bed = HostBed::new(
        1,
        Variant::IptablesDnat,
        &[Publish {
            wire,
            container: 1,
            port,
        }],
    );
    bed.start_server(1, port);
    let dst = bed.wire_dst(false, wire);
    bed.check_reachable(&[dst]);
    bed.start_daemon(&max_conns(wire, 3, "reject"));

    let mut a = Client::new(&bed, bed.client_v4(0), dst);
    let mut problems = hold_three(&mut a, Seen::Refused);
    problems.extend(server_holds(&bed, 1, 3));
    if problems.is_empty() {
        problems.extend(release_one(&bed, &mut a, Some(1), Seen::Refused));
    }
    let mut b = Client::new(&bed, bed.client_v4(1), dst);
    problems.extend(own_three(&mut b, Seen::Refused));
    verdict(&bed, &[&a, &b], problems);
    bed.stop_daemon();
}

/// The same over IPv6 (ip6tables-nft DNAT); the client closes the connection it gives back.
#[test]
fn iptables_dnat_ipv6_exactly_three_per_source() {
    if !privileged("iptables_dnat_ipv6_exactly_three_per_source") {
        return;
    }
    let _serial = serial();
    let (wire, port) = (test_port(2), test_port(3));
    let mut bed = HostBed::new(
        2,
        Variant::IptablesDnat,
        &[Publish {
            wire,
            container: 1,
            port,
        }],
    );
    bed.start_server(1, port);
    let dst = bed.wire_dst(true, wire);
    bed.check_reachable(&[dst]);
    bed.start_daemon(&max_conns(wire, 3, "reject"));

    let mut a = Client::new(&bed, bed.client_v6(0), dst);
    let mut problems = hold_three(&mut a, Seen::Refused);
    problems.extend(server_holds(&bed, 1, 3));
    if problems.is_empty() {
        problems.extend(release_one(&bed, &mut a, None, Seen::Refused));
    }
    let mut b = Client::new(&bed, bed.client_v6(1), dst);
    problems.extend(own_three(&mut b, Seen::Refused));
    verdict(&bed, &[&a, &b], problems);
    bed.stop_daemon();
}

/// `connection_action = "drop"` through DNAT: the refused attempts time out at the client,
/// still exactly 3 open after 10 sweeps; another source has its own 3.
#[test]
fn iptables_dnat_drop_times_out_beyond_three() {
    if !privileged("iptables_dnat_drop_times_out_beyond_three") {
        return;
    }
    let _serial = serial();
    let (wire, port) = (test_port(4), test_port(5));
    let mut bed = HostBed::new(
        3,
        Variant::IptablesDnat,
        &[Publish {
            wire,
            container: 1,
            port,
        }],
    );
    bed.start_server(1, port);
    let dst = bed.wire_dst(false, wire);
    bed.check_reachable(&[dst]);
    bed.start_daemon(&max_conns(wire, 3, "drop"));

    let mut a = Client::new(&bed, bed.client_v4(0), dst);
    let mut problems = hold_three(&mut a, refusal("drop"));
    problems.extend(server_holds(&bed, 1, 3));
    let mut b = Client::new(&bed, bed.client_v4(1), dst);
    problems.extend(own_three(&mut b, refusal("drop")));
    verdict(&bed, &[&a, &b], problems);
    bed.stop_daemon();
}

/// Three containers, each published on its own wire port (K3's wire port is its container port,
/// the others translate), each with its own IPv4 and IPv6 clients, all at once: every source is
/// limited to 3 on its own.
#[test]
fn three_containers_limit_each_source_independently() {
    if !privileged("three_containers_limit_each_source_independently") {
        return;
    }
    let _serial = serial();
    let wires = [test_port(6), test_port(7), test_port(8)];
    let ports = [test_port(9), test_port(9), test_port(8)];
    let publish: Vec<Publish> = (0..3)
        .map(|k| Publish {
            wire: wires[k],
            container: k as u8 + 1,
            port: ports[k],
        })
        .collect();
    let mut bed = HostBed::new(4, Variant::IptablesDnat, &publish);
    for (k, &port) in ports.iter().enumerate() {
        bed.start_server(k as u8 + 1, port);
    }
    let dsts: Vec<_> = (0..3)
        .flat_map(|k| [bed.wire_dst(false, wires[k]), bed.wire_dst(true, wires[k])])
        .collect();
    bed.check_reachable(&dsts);
    let toml: String = wires
        .iter()
        .map(|&w| max_conns(w, 3, "reject") + "\n")
        .collect();
    bed.start_daemon(&toml);

    let mut clients: Vec<Client> = (0..3u8)
        .flat_map(|k| {
            [
                Client::new(
                    &bed,
                    bed.client_v4(k),
                    bed.wire_dst(false, wires[k as usize]),
                ),
                Client::new(
                    &bed,
                    bed.client_v6(k),
                    bed.wire_dst(true, wires[k as usize]),
                ),
            ]
        })
        .collect();
    let mut problems: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = clients
            .iter_mut()
            .map(|c| s.spawn(move || hold_three(c, Seen::Refused)))
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    for i in 1..=3 {
        problems.extend(server_holds(&bed, i, 6));
    }
    let refs: Vec<&Client> = clients.iter().collect();
    verdict(&bed, &refs, problems);
    bed.stop_daemon();
}

/// DNAT written in nftables (a table of our own, `dnat to`), IPv4 and IPv6: exactly 3.
#[test]
fn nftables_dnat_exactly_three_per_source() {
    if !privileged("nftables_dnat_exactly_three_per_source") {
        return;
    }
    let _serial = serial();
    let (wire, port) = (test_port(10), test_port(11));
    let mut bed = HostBed::new(
        5,
        Variant::NftDnat,
        &[Publish {
            wire,
            container: 1,
            port,
        }],
    );
    bed.start_server(1, port);
    let (d4, d6) = (bed.wire_dst(false, wire), bed.wire_dst(true, wire));
    bed.check_reachable(&[d4, d6]);
    bed.start_daemon(&max_conns(wire, 3, "reject"));

    let mut a = Client::new(&bed, bed.client_v4(0), d4);
    let mut problems = hold_three(&mut a, Seen::Refused);
    if problems.is_empty() {
        problems.extend(release_one(&bed, &mut a, None, Seen::Refused));
    }
    let mut a6 = Client::new(&bed, bed.client_v6(0), d6);
    problems.extend(hold_three(&mut a6, Seen::Refused));
    problems.extend(server_holds(&bed, 1, 6));
    verdict(&bed, &[&a, &a6], problems);
    bed.stop_daemon();
}

/// A routed container, no NAT: the client connects to the container's own address and port
/// (the 4-tuple is unchanged); the daemon on the host's outside interface. Exactly 3.
#[test]
fn routed_container_exactly_three_per_source() {
    if !privileged("routed_container_exactly_three_per_source") {
        return;
    }
    let _serial = serial();
    let port = test_port(12);
    let mut bed = HostBed::new(6, Variant::Routed, &[]);
    bed.start_server(1, port);
    let (d4, d6) = (
        bed.container_dst(false, 1, port),
        bed.container_dst(true, 1, port),
    );
    bed.check_reachable(&[d4, d6]);
    bed.start_daemon(&max_conns(port, 3, "reject"));

    let mut a = Client::new(&bed, bed.client_v4(0), d4);
    let mut problems = hold_three(&mut a, Seen::Refused);
    if problems.is_empty() {
        problems.extend(release_one(&bed, &mut a, Some(1), Seen::Refused));
    }
    let mut a6 = Client::new(&bed, bed.client_v6(0), d6);
    problems.extend(hold_three(&mut a6, Seen::Refused));
    problems.extend(server_holds(&bed, 1, 6));
    verdict(&bed, &[&a, &a6], problems);
    bed.stop_daemon();
}

/// `new_connections = "9/10s"` through DNAT: a source opening and closing connections quickly
/// gets exactly 9, the 10th is dropped (the client times out); another source is unaffected.
#[test]
fn iptables_dnat_rate_limit_nine_per_window() {
    if !privileged("iptables_dnat_rate_limit_nine_per_window") {
        return;
    }
    let _serial = serial();
    let (wire, port) = (test_port(13), test_port(14));
    let mut bed = HostBed::new(
        7,
        Variant::IptablesDnat,
        &[Publish {
            wire,
            container: 1,
            port,
        }],
    );
    bed.start_server(1, port);
    let dst = bed.wire_dst(false, wire);
    bed.check_reachable(&[dst]);
    bed.start_daemon(&format!(
        "[[port]]\nport = {wire}\nnew_connections = \"9/10s\"\nrate_action = \"drop\"\n"
    ));

    let mut a = Client::new(&bed, bed.client_v4(0), dst);
    let start = Instant::now();
    for _ in 0..10 {
        a.attempt(TRY);
        // Open and close at once.
        a.held.clear();
    }
    let took = start.elapsed();
    let seen: Vec<Seen> = a.seen.iter().map(|(s, _)| *s).collect();
    let mut want = vec![Seen::Open; 9];
    want.push(Seen::TimedOut);
    let mut problems = Vec::new();
    if seen != want {
        problems.push(format!(
            "expected 9 open then the 10th timed out, saw {seen:?} ({} opened)",
            a.opened()
        ));
    }
    if took >= Duration::from_secs(8) {
        problems.push(format!(
            "the 10 attempts took {took:?}, not well inside the window"
        ));
    }
    let mut b = Client::new(&bed, bed.client_v4(1), dst);
    if b.attempt(TRY).0 != Seen::Open {
        problems.push("another source was refused".into());
    }
    verdict(&bed, &[&a, &b], problems);
    bed.stop_daemon();
}

/// The daemon inside the container's namespace, on its end of the veth (`xdp_mode = "auto"`),
/// the server beside it, the client routed through the host; the bridge-side peer has no XDP
/// program and GRO off. With reject, the 4th attempt is refused by an RST the client sees,
/// quickly, also after 10 sweeps.
#[test]
fn daemon_in_container_namespace_rejects_with_rst_the_client_sees() {
    if !privileged("daemon_in_container_namespace_rejects_with_rst_the_client_sees") {
        return;
    }
    let _serial = serial();
    let port = test_port(15);
    let mut bed = HostBed::new(8, Variant::DaemonInContainer, &[]);
    bed.start_server(1, port);
    let (d4, d6) = (
        bed.container_dst(false, 1, port),
        bed.container_dst(true, 1, port),
    );
    bed.check_reachable(&[d4, d6]);
    bed.start_daemon(&max_conns(port, 3, "reject"));

    let mut a = Client::new(&bed, bed.client_v4(0), d4);
    let mut problems = hold_three(&mut a, Seen::Refused);
    if problems.is_empty() {
        problems.extend(release_one(&bed, &mut a, Some(1), Seen::Refused));
    }
    let mut a6 = Client::new(&bed, bed.client_v6(0), d6);
    problems.extend(hold_three(&mut a6, Seen::Refused));
    problems.extend(server_holds(&bed, 1, 6));
    verdict(&bed, &[&a, &a6], problems);
    bed.stop_daemon();
}

/// A container destroyed while a source holds 3 connections to it through a published port:
/// its server is killed (its sockets closed), its namespace deleted. The daemon gives the 3
/// slots back (`ws-guard sources top` shows 0 within 10 s), and with the port published again
/// to another container, the same source gets exactly 3 again.
#[test]
fn destroyed_container_gives_its_slots_back() {
    if !privileged("destroyed_container_gives_its_slots_back") {
        return;
    }
    let _serial = serial();
    let (wire, port) = (test_port(16), test_port(17));
    let mut bed = HostBed::new(
        9,
        Variant::IptablesDnat,
        &[Publish {
            wire,
            container: 2,
            port,
        }],
    );
    bed.start_server(1, port);
    bed.start_server(2, port);
    let dst = bed.wire_dst(false, wire);
    bed.check_reachable(&[dst]);
    bed.start_daemon(&max_conns(wire, 3, "reject"));
    let src: IpAddr = bed.client_v4(0);

    let mut a = Client::new(&bed, src, dst);
    let mut problems = hold_three(&mut a, Seen::Refused);
    problems.extend(server_holds(&bed, 2, 3));
    match bed.slots_of(src, wire) {
        Ok(3) => {}
        other => problems.push(format!(
            "before the container is destroyed, the daemon charges {src} on {wire} with {other:?} slots, expected 3"
        )),
    }
    if !problems.is_empty() {
        verdict(&bed, &[&a], problems);
        return;
    }

    // docker stop + rm: the processes die (their sockets close), then the namespace goes.
    bed.stop_container(2);
    let mut eofs = 0;
    for s in &a.held {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        if matches!((&*s).read(&mut [0u8; 1]), Ok(0)) {
            eofs += 1;
        }
    }
    a.note(&format!(
        "K2's server killed: {eofs} of {} held saw EOF (the client keeps them)",
        a.held.len()
    ));
    bed.delete_container(2);
    a.note("K2's namespace deleted");
    let start = Instant::now();
    let mut last = Err(String::new());
    let released = wait_until(RELEASE, || {
        last = bed.slots_of(src, wire);
        last == Ok(0)
    });
    a.note(&format!(
        "slots of {src}: {last:?} after {:?}",
        start.elapsed()
    ));
    if !released {
        problems.push(format!(
            "{RELEASE:?} after K2 was destroyed the daemon still charges {src} on {wire} with {last:?} slots"
        ));
    }

    // Published again, to K1: the same source gets 3 again, and no more.
    bed.repoint(wire, 1, port);
    let mut again = Client::new(&bed, src, dst);
    for _ in 0..4 {
        again.attempt(TRY);
    }
    let seen: Vec<Seen> = again.seen.iter().map(|(s, _)| *s).collect();
    let want = [Seen::Open, Seen::Open, Seen::Open, Seen::Refused];
    if seen != want {
        problems.push(format!(
            "after K2 was destroyed and {wire} published to K1: expected {want:?}, saw {seen:?}"
        ));
    }
    verdict(&bed, &[&a, &again], problems);
    bed.stop_daemon();
}

/// What cannot work is said: behind a published port whose traffic is also masqueraded (the
/// client's address rewritten to the host's before the socket), the connections match no
/// admitted attempt. They are charged to no one (the attempts' slots come back), counted in
/// `ws-guard status` (`unmatched_connections`) and reported in the log, once a minute.
#[test]
fn masqueraded_connections_are_counted_as_unmatched_and_logged() {
    if !privileged("masqueraded_connections_are_counted_as_unmatched_and_logged") {
        return;
    }
    let _serial = serial();
    let port = test_port(18);
    let mut bed = HostBed::new(
        10,
        Variant::IptablesDnat,
        &[Publish {
            wire: port,
            container: 1,
            port,
        }],
    );
    ws_guard_tests::hostbed::ns_exec(
        &bed.host,
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            &bed.bridge(),
            "-j",
            "MASQUERADE",
        ],
        None,
    );
    bed.start_server(1, port);
    let dst = bed.wire_dst(false, port);
    bed.check_reachable(&[dst]);
    bed.start_daemon(&max_conns(port, 3, "reject"));
    let mut a = Client::new(&bed, bed.client_v4(0), dst);
    let mut problems = Vec::new();
    for _ in 0..3 {
        if a.attempt(TRY).0 != Seen::Open {
            problems.push("a connection below the limit was not opened".to_owned());
        }
    }
    let unmatched = |bed: &HostBed| -> u64 {
        let (code, out, _) = bed.cli(&["--json", "status"]);
        assert_eq!(code, 0, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["unmatched_connections"].as_u64().unwrap_or(0)
    };
    if !wait_until(Duration::from_secs(10), || unmatched(&bed) >= 3) {
        problems.push(format!(
            "unmatched_connections is {}, expected 3 (held, masqueraded)",
            unmatched(&bed)
        ));
    }
    // The attempts matched no socket, so their slots came back: no one is charged.
    if !wait_until(Duration::from_secs(10), || {
        bed.slots_of(bed.client_v4(0), port) == Ok(0)
    }) {
        problems.push(format!(
            "the client is still charged {:?} slots",
            bed.slots_of(bed.client_v4(0), port)
        ));
    }
    if !bed
        .daemon()
        .wait_for("match no attempt", Duration::from_secs(5))
    {
        problems.push("no log line about the unmatched connections".to_owned());
    }
    let (_, text, _) = bed.cli(&["status"]);
    if !text.contains("matched no admitted attempt") {
        problems.push(format!("`ws-guard status` does not say so:\n{text}"));
    }
    verdict(&bed, &[&a], problems);
    bed.stop_daemon();
}

/// `syn_cookies = "on"` on a published port whose wire port also has a listener in the host's
/// namespace (docker-proxy's, by Docker's default): the cookie is the host listener's, the ACK
/// goes on by DNAT to the container, whose kernel does not take it, and the connection dies.
/// The daemon sees connections admitted through a cookie that never reach a socket and turns
/// cookie mode off for the port; from then on new sources get in (judged at their SYN).
#[test]
fn cookies_turn_themselves_off_where_dnat_takes_their_connections_elsewhere() {
    if !privileged("cookies_turn_themselves_off_where_dnat_takes_their_connections_elsewhere") {
        return;
    }
    let _serial = serial();
    let (wire, port) = (test_port(19), test_port(20));
    let mut bed = HostBed::new(
        11,
        Variant::IptablesDnat,
        &[Publish {
            wire,
            container: 1,
            port,
        }],
    );
    bed.start_server(1, port);
    let dst = bed.wire_dst(false, wire);
    bed.check_reachable(&[dst]);
    // docker-proxy's listener on the wire port, in the host's namespace.
    let _proxy = ws_guard_tests::netns::in_ns(&bed.host, || {
        std::net::TcpListener::bind(("0.0.0.0", wire)).expect("the host's listener")
    });
    bed.start_daemon(&format!(
        "[[port]]\nport = {wire}\nmax_connections = 100\nsyn_cookies = \"on\"\n"
    ));
    assert!(
        bed.daemon().wait_for(
            &format!("port {wire}: SYN cookies on"),
            Duration::from_secs(5)
        ),
        "{}",
        bed.report()
    );
    // New sources, one attempt each, until the daemon gives up on cookies for the port (each
    // first connection of a new source went through a cookie and died in the container).
    let mut clients = Vec::new();
    let mut off = false;
    for i in 0..6 {
        let mut c = Client::new(&bed, bed.client_v4(i), dst);
        c.attempt(TRY);
        clients.push(c);
        if bed.daemon().wait_for(
            "SYN cookies off until the daemon restarts",
            Duration::from_secs(3),
        ) {
            off = true;
            break;
        }
    }
    assert!(off, "cookie mode stayed on\n{}", bed.report());
    // A new source now gets a connection the container's server holds.
    let before = bed.server(1).held();
    let mut c = Client::new(&bed, bed.client_v4(7), dst);
    assert_eq!(c.attempt(TRY).0, Seen::Open, "{}", bed.report());
    assert!(
        bed.server(1).wait_held(before + 1, Duration::from_secs(2)),
        "the container's server did not get the connection\n{}",
        bed.report()
    );
    let (code, out, _) = bed.cli(&["status"]);
    assert_eq!(code, 0);
    assert!(!out.contains("(active)"), "{out}");
    drop(clients);
    bed.stop_daemon();
}
