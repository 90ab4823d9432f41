//! Allow/deny lists and bans in the real XDP program, run with BPF_PROG_TEST_RUN on crafted
//! SYNs: the order allowlist -> denylist -> ban -> limits, longest-prefix matches of both
//! families, bans started by the rate limit and ended by time, manual bans, monitor mode, the
//! ban events in the ring buffer, whole-list syncing, and lists and bans kept across a re-load
//! from pins.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    thread::sleep,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use ws_guard::{
    bans::BanReason,
    events,
    guard::{Counters, Guard, LoadOptions},
    lists::{List, Policy},
    pin::PinDir,
};
use ws_guard_common::maps::{
    ACTION_DROP, AF_INET, AF_INET6, BAN_MANUAL, BAN_RATE, Counter, EVENT_BAN_ENDED,
    EVENT_BAN_STARTED, GlobalConfig, PortConfig, SourceKey,
};
use ws_guard_tests::{
    frames::{FrameBuilder, LINUX_SYN_OPTIONS, Tcp},
    privileged,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const PORT: u16 = 9000;

fn v4(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, last)
}

fn server4() -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, 1)
}

fn server6() -> Ipv6Addr {
    "2001:2:0:ff::1".parse().unwrap()
}

fn syn4(client: Ipv4Addr, sport: u16) -> Vec<u8> {
    FrameBuilder::ipv4(client, server4())
        .tcp(Tcp::syn(sport, PORT, 1).options(&LINUX_SYN_OPTIONS))
        .build()
}

fn syn6(client: &str, sport: u16) -> Vec<u8> {
    FrameBuilder::ipv6(client.parse().unwrap(), server6())
        .tcp(Tcp::syn(sport, PORT, 1).options(&LINUX_SYN_OPTIONS))
        .build()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// `max_connections` and `rate_limit` per `window`; drop for both.
fn limits(max_connections: u32, rate_limit: u32, window: Duration) -> PortConfig {
    PortConfig {
        enabled: 1,
        max_connections,
        conn_action: ACTION_DROP,
        rate_action: ACTION_DROP,
        rate_limit,
        index: 0,
        rate_window_ns: window.as_nanos() as u64,
        ..PortConfig::default()
    }
}

fn guard(port: PortConfig, policy: &Policy) -> Guard {
    let mut g = Guard::load(&LoadOptions::default()).expect("load the programs");
    g.set_global(GlobalConfig::default()).expect("global");
    g.set_port(PORT, port).expect("port");
    g.apply_policy(policy).expect("policy");
    g
}

fn verdict(g: &mut Guard, frame: &[u8]) -> u32 {
    g.run_xdp(frame).expect("BPF_PROG_TEST_RUN").0
}

fn assert_deltas(g: &Guard, before: &Counters, want: &[(Counter, u64)]) {
    let after = g.counters().expect("counters");
    for c in Counter::ALL {
        let expected: u64 = want.iter().filter(|(w, _)| *w == c).map(|(_, n)| n).sum();
        let delta = after.get(c) - before.get(c);
        assert_eq!(delta, expected, "counter {} (after {after:?})", c.name());
    }
    // The frame outcomes still add up: every frame run here is one new attempt.
    let frames: u64 = Counter::FRAME_OUTCOMES
        .iter()
        .map(|c| after.get(*c) - before.get(*c))
        .sum();
    let attempts: u64 = want
        .iter()
        .filter(|(c, _)| Counter::FRAME_OUTCOMES.contains(c))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(frames, attempts);
}

fn key4(last: u8) -> SourceKey {
    let mut addr = [0; 16];
    addr[..4].copy_from_slice(&v4(last).octets());
    SourceKey {
        addr,
        port: PORT,
        family: AF_INET,
    }
}

#[test]
fn allowlisted_source_is_never_limited_but_tracked() {
    if !privileged("allowlisted_source_is_never_limited_but_tracked") {
        return;
    }
    let policy = Policy {
        allow: vec![net("198.18.0.0/24")],
        deny: vec![net("198.18.0.0/16")],
        ban_duration: Duration::from_secs(60),
    };
    let mut g = guard(limits(1, 1, Duration::from_secs(60)), &policy);
    let c0 = g.counters().unwrap();
    for sport in 0..5 {
        assert_eq!(verdict(&mut g, &syn4(v4(7), 40000 + sport)), XDP_PASS);
    }
    assert_deltas(&g, &c0, &[(Counter::Allowed, 5)]);
    // Tracked: all five attempts hold a slot of its key, and no ban came of it.
    assert_eq!(g.connections().unwrap().get(&key4(7)), Some(&5));
    assert!(g.bans().unwrap().is_empty());
    // Outside the allowed /24 but inside the denied /16: dropped (allow beats deny only where
    // it matches).
    let c1 = g.counters().unwrap();
    let outside = Ipv4Addr::new(198, 18, 1, 7);
    assert_eq!(verdict(&mut g, &syn4(outside, 40000)), XDP_DROP);
    assert_deltas(&g, &c1, &[(Counter::Denied, 1)]);
}

#[test]
fn denylist_longest_prefix_match_both_families() {
    if !privileged("denylist_longest_prefix_match_both_families") {
        return;
    }
    let policy = Policy {
        allow: vec![net("198.18.0.128/25"), net("2001:2:0:1::/64")],
        deny: vec![net("198.18.0.0/24"), net("2001:2::/48")],
        ban_duration: Duration::ZERO,
    };
    let mut g = guard(limits(0, 0, Duration::from_secs(1)), &policy);
    let c0 = g.counters().unwrap();
    assert_eq!(verdict(&mut g, &syn4(v4(5), 40000)), XDP_DROP);
    assert_eq!(verdict(&mut g, &syn4(v4(200), 40000)), XDP_PASS); // the allowed /25
    assert_eq!(
        verdict(&mut g, &syn4(Ipv4Addr::new(198, 18, 1, 5), 1)),
        XDP_PASS
    );
    assert_eq!(verdict(&mut g, &syn6("2001:2::9", 40000)), XDP_DROP);
    assert_eq!(verdict(&mut g, &syn6("2001:2:0:1::9", 40000)), XDP_PASS);
    assert_eq!(verdict(&mut g, &syn6("2001:3::9", 40000)), XDP_PASS);
    assert_deltas(
        &g,
        &c0,
        &[
            (Counter::Denied, 2),
            (Counter::Allowed, 2),
            (Counter::Admitted, 2),
        ],
    );

    // /0 of one family covers that family only.
    let policy = Policy {
        deny: vec![net("0.0.0.0/0")],
        ..Default::default()
    };
    g.apply_policy(&policy).unwrap();
    assert_eq!(g.list_entries(List::Deny).unwrap(), vec![net("0.0.0.0/0")]);
    assert!(g.list_entries(List::Allow).unwrap().is_empty());
    let c1 = g.counters().unwrap();
    assert_eq!(
        verdict(&mut g, &syn4(Ipv4Addr::new(203, 0, 113, 1), 2)),
        XDP_DROP
    );
    assert_eq!(verdict(&mut g, &syn6("2001:2::77", 3)), XDP_PASS);
    assert_deltas(&g, &c1, &[(Counter::Denied, 1), (Counter::Admitted, 1)]);
    let policy = Policy {
        deny: vec![net("::/0"), net("198.18.0.5/32")],
        ..Default::default()
    };
    g.apply_policy(&policy).unwrap();
    let c2 = g.counters().unwrap();
    assert_eq!(verdict(&mut g, &syn6("2001:2::78", 3)), XDP_DROP);
    assert_eq!(verdict(&mut g, &syn4(v4(5), 4)), XDP_DROP);
    assert_eq!(verdict(&mut g, &syn4(v4(6), 4)), XDP_PASS);
    assert_deltas(&g, &c2, &[(Counter::Denied, 2), (Counter::Admitted, 1)]);
}

#[test]
fn apply_policy_adds_and_removes_exactly_and_sets_flags() {
    if !privileged("apply_policy_adds_and_removes_exactly_and_sets_flags") {
        return;
    }
    let mut g = guard(limits(0, 0, Duration::from_secs(1)), &Policy::default());
    assert_eq!(g.global().unwrap().flags, 0, "nothing listed: no lookups");
    let a = Policy {
        allow: vec![net("198.18.0.0/24"), net("2001:2::/48")],
        deny: vec![net("198.18.1.0/24"), net("198.18.2.0/24")],
        ban_duration: Duration::from_secs(5),
    };
    g.apply_policy(&a).unwrap();
    assert_eq!(g.list_entries(List::Allow).unwrap(), a.allow);
    assert_eq!(g.list_entries(List::Deny).unwrap(), a.deny);
    let global = g.global().unwrap();
    assert_eq!(global.ban_ns, 5 * 1_000_000_000);
    assert_eq!(global.flags, 1 | 2 | 4);
    // Host bits in the input are cleared; one removed, one added.
    let b = Policy {
        allow: vec![net("2001:2::/48")],
        deny: vec![net("198.18.2.9/24"), net("198.18.3.0/24")],
        ban_duration: Duration::ZERO,
    };
    g.apply_policy(&b).unwrap();
    assert_eq!(
        g.list_entries(List::Allow).unwrap(),
        vec![net("2001:2::/48")]
    );
    assert_eq!(
        g.list_entries(List::Deny).unwrap(),
        vec![net("198.18.2.0/24"), net("198.18.3.0/24")]
    );
    assert_eq!(g.global().unwrap().flags, 1 | 2);
    assert_eq!(
        verdict(&mut g, &syn4(Ipv4Addr::new(198, 18, 1, 1), 1)),
        XDP_PASS
    );
    assert_eq!(
        verdict(&mut g, &syn4(Ipv4Addr::new(198, 18, 3, 1), 1)),
        XDP_DROP
    );

    // Whole or nothing: a list over capacity changes nothing.
    let small = LoadOptions {
        cidrs: 64,
        ..LoadOptions::default()
    };
    let mut g = Guard::load(&small).unwrap();
    g.apply_policy(&b).unwrap();
    let too_many = Policy {
        deny: (0..=64u8)
            .map(|i| net(&format!("198.18.{i}.0/24")))
            .collect(),
        ..Default::default()
    };
    assert!(g.apply_policy(&too_many).is_err());
    assert_eq!(g.list_entries(List::Allow).unwrap(), b.allow);
    assert_eq!(
        g.list_entries(List::Deny).unwrap(),
        vec![net("198.18.2.0/24"), net("198.18.3.0/24")]
    );
    assert_eq!(g.global().unwrap().flags, 1 | 2);
    assert!(g.apply_policy(&Policy::default()).is_ok());
    assert!(g.list_entries(List::Deny).unwrap().is_empty());
    assert_eq!(g.global().unwrap().flags, 0);
}

#[test]
fn rate_refusal_bans_until_the_ban_ends_with_events() {
    if !privileged("rate_refusal_bans_until_the_ban_ends_with_events") {
        return;
    }
    let ban = Duration::from_millis(600);
    let window = Duration::from_millis(100);
    let policy = Policy {
        ban_duration: ban,
        ..Default::default()
    };
    let mut g = guard(limits(0, 1, window), &policy);
    let mut ring = g.take_events().expect("event ring buffer");
    let c0 = g.counters().unwrap();
    let start = Instant::now();
    assert_eq!(verdict(&mut g, &syn4(v4(9), 1)), XDP_PASS);
    assert_eq!(verdict(&mut g, &syn4(v4(9), 2)), XDP_DROP); // over the rate: banned
    assert_deltas(
        &g,
        &c0,
        &[
            (Counter::Admitted, 1),
            (Counter::RateLimited, 1),
            (Counter::BansStarted, 1),
        ],
    );
    let bans = g.bans().unwrap();
    assert_eq!(bans.len(), 1);
    assert_eq!(bans[0].source, key4(9));
    assert_eq!(bans[0].reason, BanReason::Rate);
    assert!(bans[0].remaining <= ban && bans[0].remaining > ban / 2);
    let ev = events::drain(&mut ring);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(
        (ev[0].kind, ev[0].reason, ev[0].source),
        (EVENT_BAN_STARTED, BAN_RATE, key4(9))
    );
    // The refusal is counted in the source's rate state.
    assert_eq!(g.source_refusals().unwrap(), vec![(key4(9), 1)]);

    // Past the rate window the rate would admit; the ban still drops.
    sleep(window * 2);
    assert!(
        start.elapsed() < ban,
        "the machine is too slow for this test's timing"
    );
    let c1 = g.counters().unwrap();
    assert_eq!(verdict(&mut g, &syn4(v4(9), 3)), XDP_DROP);
    assert_deltas(&g, &c1, &[(Counter::Banned, 1)]);
    assert_eq!(g.source_refusals().unwrap(), vec![(key4(9), 2)]);
    // Another source is not affected.
    assert_eq!(verdict(&mut g, &syn4(v4(10), 3)), XDP_PASS);

    // After the ban: the kernel ends it on the next attempt, which the rate admits.
    let deadline = Instant::now() + Duration::from_secs(5);
    while start.elapsed() < ban + Duration::from_millis(50) {
        assert!(Instant::now() < deadline);
        sleep(Duration::from_millis(20));
    }
    assert!(g.bans().unwrap().is_empty(), "expired bans are not listed");
    let c2 = g.counters().unwrap();
    assert_eq!(verdict(&mut g, &syn4(v4(9), 4)), XDP_PASS);
    assert_deltas(&g, &c2, &[(Counter::BansEnded, 1), (Counter::Admitted, 1)]);
    let ev = events::drain(&mut ring);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!((ev[0].kind, ev[0].source), (EVENT_BAN_ENDED, key4(9)));
    // Ended by the kernel: nothing left for userspace's expiry.
    assert!(g.expire_bans().unwrap().is_empty());
}

#[test]
fn userspace_expiry_and_manual_bans() {
    if !privileged("userspace_expiry_and_manual_bans") {
        return;
    }
    let mut g = guard(limits(0, 0, Duration::from_secs(1)), &Policy::default());
    assert_eq!(g.global().unwrap().flags, 0);
    let k6 = g
        .source_key("2001:2::1234".parse::<IpAddr>().unwrap(), PORT)
        .unwrap();
    assert_eq!(k6.family, AF_INET6);
    assert_eq!(&k6.addr[8..], &[0; 8], "masked with the default /64");
    let k4 = g.source_key(IpAddr::V4(v4(3)), PORT).unwrap();
    assert_eq!(k4, key4(3));
    // IPv4-mapped IPv6 is the IPv4 source.
    let mapped: IpAddr = "::ffff:198.18.0.3".parse().unwrap();
    assert_eq!(g.source_key(mapped, PORT).unwrap(), key4(3));

    g.ban(k4, Duration::from_secs(60)).unwrap();
    g.ban(k6, Duration::from_millis(200)).unwrap();
    assert_eq!(g.global().unwrap().flags, 4, "bans exist: looked up");
    let mut bans = g.bans().unwrap();
    bans.sort_by_key(|b| b.source.family);
    assert_eq!(bans.len(), 2);
    assert!(bans.iter().all(|b| b.reason == BanReason::Manual));
    let c0 = g.counters().unwrap();
    assert_eq!(verdict(&mut g, &syn4(v4(3), 1)), XDP_DROP);
    assert_eq!(verdict(&mut g, &syn6("2001:2::99", 1)), XDP_DROP);
    // Another source of the same /32 neighbourhood is not banned.
    assert_eq!(verdict(&mut g, &syn4(v4(4), 1)), XDP_PASS);
    assert_deltas(&g, &c0, &[(Counter::Banned, 2), (Counter::Admitted, 1)]);

    // The sweep's expiry ends the ban that is over without an attempt from its source: counted
    // and reported as when the XDP program ends one. Lifting a ban is neither.
    let mut ring = g.take_events().expect("event ring buffer");
    sleep(Duration::from_millis(300));
    let c1 = g.counters().unwrap();
    assert_eq!(g.expire_bans().unwrap(), vec![k6]);
    assert_deltas(&g, &c1, &[(Counter::BansEnded, 1)]);
    let ev = events::drain(&mut ring);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(
        (ev[0].kind, ev[0].reason, ev[0].source),
        (EVENT_BAN_ENDED, BAN_MANUAL, k6)
    );
    assert_eq!(g.bans().unwrap().len(), 1);
    assert!(g.unban(&k4).unwrap());
    assert!(!g.unban(&k4).unwrap(), "not banned any more");
    assert_deltas(&g, &c1, &[(Counter::BansEnded, 1)]);
    assert!(events::drain(&mut ring).is_empty());
    assert_eq!(g.global().unwrap().flags, 0, "no bans left: no lookups");
    assert_eq!(verdict(&mut g, &syn4(v4(3), 2)), XDP_PASS);
}

#[test]
fn monitor_mode_counts_and_passes() {
    if !privileged("monitor_mode_counts_and_passes") {
        return;
    }
    let policy = Policy {
        deny: vec![net("198.18.0.1/32")],
        ban_duration: Duration::from_secs(60),
        ..Default::default()
    };
    let mut g = guard(limits(0, 1, Duration::from_secs(60)), &policy);
    let mut global = g.global().unwrap();
    global.monitor = 1;
    g.set_global(global).unwrap();
    g.ban(key4(2), Duration::from_secs(60)).unwrap();
    let c0 = g.counters().unwrap();
    assert_eq!(verdict(&mut g, &syn4(v4(1), 1)), XDP_PASS); // denied
    assert_eq!(verdict(&mut g, &syn4(v4(2), 1)), XDP_PASS); // banned
    assert_eq!(verdict(&mut g, &syn4(v4(3), 1)), XDP_PASS);
    assert_eq!(verdict(&mut g, &syn4(v4(3), 2)), XDP_PASS); // over the rate: no ban
    assert_deltas(
        &g,
        &c0,
        &[(Counter::MonitorWouldBlock, 3), (Counter::Admitted, 4)],
    );
    assert_eq!(
        g.bans().unwrap().len(),
        1,
        "no automatic ban in monitor mode"
    );
}

/// A pin root of its own under bpffs, removed when dropped.
struct PinRoot(PathBuf);

impl Drop for PinRoot {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = ws_guard::pin::teardown(&self.0);
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn lists_and_bans_survive_a_reload_from_pins() {
    if !privileged("lists_and_bans_survive_a_reload_from_pins") {
        return;
    }
    let root = PinRoot(PathBuf::from(format!(
        "/sys/fs/bpf/wsg-lists-test-{}",
        std::process::id()
    )));
    let policy = Policy {
        allow: vec![net("2001:2::/48")],
        deny: vec![net("198.18.0.0/28")],
        ban_duration: Duration::from_secs(30),
    };
    {
        let mut g = Guard::load_pinned(&LoadOptions::default(), PinDir::new(&root.0)).unwrap();
        assert!(!g.adopted());
        g.set_port(PORT, limits(0, 1, Duration::from_secs(60)))
            .unwrap();
        g.apply_policy(&policy).unwrap();
        g.ban(key4(100), Duration::from_secs(60)).unwrap();
        assert_eq!(verdict(&mut g, &syn4(v4(50), 1)), XDP_PASS);
        assert_eq!(verdict(&mut g, &syn4(v4(50), 2)), XDP_DROP); // banned for the rate
        assert_eq!(g.bans().unwrap().len(), 2);
    }
    let mut g = Guard::load_pinned(&LoadOptions::default(), PinDir::new(&root.0)).unwrap();
    assert!(g.adopted());
    assert_eq!(g.list_entries(List::Allow).unwrap(), policy.allow);
    assert_eq!(g.list_entries(List::Deny).unwrap(), policy.deny);
    let mut banned: Vec<SourceKey> = g.bans().unwrap().into_iter().map(|b| b.source).collect();
    banned.sort();
    assert_eq!(banned, vec![key4(50), key4(100)]);
    assert_eq!(g.global().unwrap().ban_ns, 30 * 1_000_000_000);
    // The re-loaded program enforces them.
    let c0 = g.counters().unwrap();
    assert_eq!(verdict(&mut g, &syn4(v4(3), 1)), XDP_DROP);
    assert_eq!(verdict(&mut g, &syn4(v4(100), 1)), XDP_DROP);
    assert_eq!(verdict(&mut g, &syn6("2001:2::5", 1)), XDP_PASS);
    assert_deltas(
        &g,
        &c0,
        &[
            (Counter::Denied, 1),
            (Counter::Banned, 1),
            (Counter::Allowed, 1),
        ],
    );
    g.teardown().unwrap();
    drop(g);
    assert!(!root.0.join("v3").exists());
}

/// The daemon in a network namespace: the config's lists apply to real connections, a source
/// over the rate is banned, and the ban's start and end are logged as the daemon reads them from
/// the ring buffer and its sweep expires the ban.
#[test]
fn daemon_applies_lists_and_logs_bans() {
    use ws_guard_tests::{
        binary::Daemon,
        netns::{Testbed, sa, test_port},
        traffic::{Outcome, Server, Stack, connect_from},
    };
    if !privileged("daemon_applies_lists_and_logs_bans") {
        return;
    }
    let port = test_port(25);
    let tb = Testbed::new("bans", 25);
    // Declared after the test bed: dropped (pins removed) before its namespaces go.
    let root = PinRoot(PathBuf::from(format!(
        "/sys/fs/bpf/wsg-bans-test-{}",
        std::process::id()
    )));
    let _server = Server::start(&tb.srv, port, Stack::Separate);
    let (hammer, denied, allowed) = (tb.client_v4(0), tb.client_v4(1), tb.client_v4(2));
    let mut cfg = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(
        &mut cfg,
        format!(
            "interfaces = [\"{}\"]\nsweep_interval = \"200ms\"\nban_duration = \"2s\"\n\
             allow = [\"{allowed}/32\"]\ndeny = [\"{denied}/32\"]\n\
             [capacity]\nsources = 1024\nflows = 4096\n\n\
             [[port]]\nport = {port}\nnew_connections = \"2/100s\"\nrate_action = \"drop\"\n",
            tb.srv_if
        )
        .as_bytes(),
    )
    .unwrap();
    let cfg_path = cfg.path().to_str().unwrap().to_owned();
    let root_s = root.0.to_str().unwrap().to_owned();
    let mut daemon = Daemon::start_in(
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
    let dst = sa(tb.server_v4(), port);
    let short = Duration::from_millis(700);

    // Denied: dropped from the first attempt.
    assert!(matches!(
        connect_from(&tb.cli, denied, dst, short),
        Outcome::TimedOut
    ));
    // Allowed: never limited.
    let held: Vec<_> = (0..4)
        .map(|_| connect_from(&tb.cli, allowed, dst, Duration::from_secs(2)).stream())
        .collect();
    // Two per window, then the third attempt is refused and bans the source.
    let a = connect_from(&tb.cli, hammer, dst, Duration::from_secs(2)).stream();
    let b = connect_from(&tb.cli, hammer, dst, Duration::from_secs(2)).stream();
    assert!(matches!(
        connect_from(&tb.cli, hammer, dst, short),
        Outcome::TimedOut
    ));
    let started = format!("ban started: source={hammer}/32 port={port} reason=rate duration=2s");
    assert!(
        daemon.wait_for(&started, Duration::from_secs(3)),
        "no {started:?} in {:?}",
        daemon.lines()
    );
    // The sweep ends it about 2 s later.
    let ended = format!("ban ended: source={hammer}/32 port={port} reason=expired");
    assert!(
        daemon.wait_for(&ended, Duration::from_secs(5)),
        "no {ended:?} in {:?}",
        daemon.lines()
    );
    assert_eq!(daemon.count("ban started"), 1, "{:?}", daemon.lines());
    drop((a, b, held));
    assert!(daemon.stop(libc::SIGTERM).success());
}

/// The kernel ends an expired ban on the source's next attempt without touching the global
/// flags; the daemon's expiry round re-derives them, so once the last ban is gone new SYNs stop
/// paying a ban lookup.
#[test]
fn flags_follow_a_ban_the_kernel_ended() {
    if !privileged("flags_follow_a_ban_the_kernel_ended") {
        return;
    }
    use ws_guard_common::maps::FLAG_BANS;
    let policy = Policy {
        allow: vec![],
        deny: vec![],
        ban_duration: Duration::ZERO,
    };
    let mut g = guard(limits(0, 0, Duration::ZERO), &policy);
    assert_eq!(g.global().unwrap().flags & FLAG_BANS, 0);
    g.ban(key4(9), Duration::from_millis(1)).expect("ban");
    assert_ne!(g.global().unwrap().flags & FLAG_BANS, 0);
    sleep(Duration::from_millis(5));
    // The next attempt finds the ban over: the kernel ends it and admits the attempt.
    let before = g.counters().expect("counters");
    assert_eq!(verdict(&mut g, &syn4(v4(9), 41000)), XDP_PASS);
    assert_deltas(
        &g,
        &before,
        &[(Counter::Admitted, 1), (Counter::BansEnded, 1)],
    );
    assert!(g.bans().unwrap().is_empty());
    assert_ne!(
        g.global().unwrap().flags & FLAG_BANS,
        0,
        "the kernel does not touch the flags"
    );
    // The sweep's expiry round: nothing left to expire, the flag goes.
    assert!(g.expire_bans().expect("expire").is_empty());
    assert_eq!(g.global().unwrap().flags & FLAG_BANS, 0);
}
