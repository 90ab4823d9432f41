//! State under pressure: floods of spoofed sources that fill ws-guard's maps, run through the
//! real XDP program with BPF_PROG_TEST_RUN (the fastest generator on these machines: each frame
//! is a SYN from a source never seen before).
//!
//! What is checked (docs/configuration.md, "When maps are full"):
//! - a source holding connections keeps its count whatever the flood does (`WSG_SOURCES` is a
//!   plain hash, never evicted from): it still cannot open one more, and once its connections
//!   are released it connects again;
//! - new sources when `WSG_SOURCES` is full, and new attempts when `WSG_FLOWS` is full, pass
//!   untracked (`on_map_full = "open"`) or are refused with the port's `connection_action`
//!   (`"closed"`), each counted exactly once as `map_full`;
//! - a flood of 1,000,000 distinct sources at the default capacity (set `WSG_FLOOD_SOURCES` for
//!   another size), timed;
//! - a rate window lives in its source's entry: a flood of new sources never evicts it; only
//!   the sweep reclaims entries that hold nothing, after their window, or (more than nine
//!   tenths full) the oldest newest attempts first.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use ws_guard::guard::{Counters, Guard, LoadOptions};
use ws_guard_common::{
    key::source_key,
    maps::{
        ACTION_DROP, ACTION_REJECT, AF_INET, AF_INET6, ControlOp, Counter, FlowKey, GlobalConfig,
        OP_EXPIRE_PENDING, PortConfig, SourceKey,
    },
};
use ws_guard_tests::{
    frames::{FrameBuilder, LINUX_SYN_OPTIONS, Tcp},
    privileged,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// The protected port.
const PORT: u16 = 9000;
const SECOND: u64 = 1_000_000_000;

/// The real client: holds its maximum of connections through every flood.
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// A source that keeps opening connections faster than the rate allows.
const HAMMER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Sources never seen before, for probing what a new source gets: 198.18.0.(3 + i).
fn newcomer(i: u8) -> Ipv4Addr {
    assert!(i < 13);
    Ipv4Addr::new(198, 18, 0, 3 + i)
}

fn server4() -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 255, 1)
}

fn server6() -> Ipv6Addr {
    "2001:2:0:ffff::1".parse().unwrap()
}

/// Flood sources skip the first 16 addresses of 198.18.0.0/15 (the client, the hammer, the
/// newcomers).
const V4_SKIP: u32 = 16;
/// IPv4 flood sources: the rest of 198.18.0.0/15.
const V4_FLOOD: u64 = (1 << 17) - V4_SKIP as u64;

/// Spoofed source number `i`: the IPv4 addresses of 198.18.0.0/15 first, then IPv6 addresses of
/// 2001:2::/48 (distinct source keys only with `ipv6_prefix = 128`).
fn spoofed(i: u64) -> IpAddr {
    if i < V4_FLOOD {
        IpAddr::V4(Ipv4Addr::from(
            u32::from(Ipv4Addr::new(198, 18, 0, 0)) + V4_SKIP + i as u32,
        ))
    } else {
        let j = i - V4_FLOOD;
        assert!(j < 1 << 48, "flood source {i} out of range");
        // 2001:2:0:G:0:H:L1:L2, the index spread over the low bits.
        let g = (j >> 32) as u16;
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            2,
            0,
            g,
            0,
            0x5eed,
            (j >> 16) as u16,
            j as u16,
        ))
    }
}

/// Flood SYNs, fast: one template frame per family, built by the test's frame builder, with
/// the source address and the checksums patched (checked against the builder below).
struct Flood {
    v4: Vec<u8>,
    v6: Vec<u8>,
}

const FLOOD_SPORT: u16 = 40000;

impl Flood {
    fn new() -> Self {
        Self {
            v4: flood_builder(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 0))).build(),
            v6: flood_builder(IpAddr::V6("2001:2::".parse().unwrap())).build(),
        }
    }

    /// The SYN from `src`.
    fn frame(&mut self, src: IpAddr) -> &[u8] {
        match src {
            IpAddr::V4(a) => {
                let f = &mut self.v4;
                f[26..30].copy_from_slice(&a.octets());
                f[24..26].copy_from_slice(&[0, 0]);
                let ip = checksum(&[&f[14..34]]);
                f[24..26].copy_from_slice(&ip.to_be_bytes());
                f[50..52].copy_from_slice(&[0, 0]);
                let len = (f.len() - 34) as u16;
                let pseudo = [&f[26..34], &[0, 6], &len.to_be_bytes()[..], &f[34..]];
                let tcp = checksum(&pseudo);
                f[50..52].copy_from_slice(&tcp.to_be_bytes());
                f
            }
            IpAddr::V6(a) => {
                let f = &mut self.v6;
                f[22..38].copy_from_slice(&a.octets());
                f[70..72].copy_from_slice(&[0, 0]);
                let len = (f.len() - 54) as u32;
                let pseudo = [&f[22..54], &len.to_be_bytes()[..], &[0, 0, 0, 6], &f[54..]];
                let tcp = checksum(&pseudo);
                f[70..72].copy_from_slice(&tcp.to_be_bytes());
                f
            }
        }
    }
}

fn flood_builder(src: IpAddr) -> FrameBuilder {
    let b = match src {
        IpAddr::V4(a) => FrameBuilder::ipv4(a, server4()),
        IpAddr::V6(a) => FrameBuilder::ipv6(a, server6()),
    };
    b.tcp(Tcp::syn(FLOOD_SPORT, PORT, 0x5eed))
}

/// The Internet checksum of the concatenated parts (each of even length but the last).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for p in parts {
        for pair in p.chunks(2) {
            let word = (pair[0] as u32) << 8 | *pair.get(1).unwrap_or(&0) as u32;
            sum += word;
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn limits(max_connections: u32, conn_action: u32, rate_limit: u32, window_ns: u64) -> PortConfig {
    PortConfig {
        enabled: 1,
        max_connections,
        conn_action,
        rate_action: ACTION_DROP,
        rate_limit,
        index: 0,
        rate_window_ns: window_ns,
        ..PortConfig::default()
    }
}

fn load(sources: u32, flows: u32, port: PortConfig, global: GlobalConfig) -> Guard {
    let mut g = Guard::load(&LoadOptions {
        sources,
        flows,
        kernel_log_level: 0,
        ..LoadOptions::default()
    })
    .expect("load the programs");
    g.set_global(global).expect("global settings");
    g.set_port(PORT, port).expect("port limits");
    g
}

fn run(g: &mut Guard, frame: &[u8]) -> u32 {
    g.run_xdp(frame).expect("BPF_PROG_TEST_RUN").0
}

/// A Linux-like SYN from `src:sport` to the protected port.
fn syn(src: Ipv4Addr, sport: u16) -> Vec<u8> {
    FrameBuilder::ipv4(src, server4())
        .tcp(Tcp::syn(sport, PORT, 1000 + sport as u32).options(&LINUX_SYN_OPTIONS))
        .build()
}

#[track_caller]
fn expect(g: &mut Guard, src: Ipv4Addr, sport: u16, verdict: u32) {
    let v = run(g, &syn(src, sport));
    assert_eq!(v, verdict, "verdict of a SYN from {src}:{sport}");
}

fn v4(a: Ipv4Addr) -> [u8; 16] {
    let mut o = [0u8; 16];
    o[..4].copy_from_slice(&a.octets());
    o
}

fn flow4(client: Ipv4Addr, sport: u16) -> FlowKey {
    FlowKey {
        client: v4(client),
        server: v4(server4()),
        client_port: sport,
        server_port: PORT,
        family: AF_INET,
        _pad: 0,
    }
}

fn flow_of(src: IpAddr) -> FlowKey {
    match src {
        IpAddr::V4(a) => flow4(a, FLOOD_SPORT),
        IpAddr::V6(a) => FlowKey {
            client: a.octets(),
            server: server6().octets(),
            client_port: FLOOD_SPORT,
            server_port: PORT,
            family: AF_INET6,
            _pad: 0,
        },
    }
}

fn key_of(g: &Guard, src: IpAddr) -> SourceKey {
    let global = g.global().expect("global");
    match src {
        IpAddr::V4(a) => source_key(AF_INET, v4(a), PORT, &global),
        IpAddr::V6(a) => source_key(AF_INET6, a.octets(), PORT, &global),
    }
}

/// Live connections of `src` (0 when it has no counter or a zero one).
fn count_of(g: &Guard, src: Ipv4Addr) -> u32 {
    let key = key_of(g, IpAddr::V4(src));
    g.connections()
        .expect("connections")
        .get(&key)
        .copied()
        .unwrap_or(0)
}

/// Releases a half-open attempt through the control program, as the sweep does.
fn release(g: &mut Guard, flow: FlowKey) -> bool {
    g.control(ControlOp {
        op: OP_EXPIRE_PENDING,
        flow,
        ..Default::default()
    })
    .expect("control program")
}

/// Checks that the counters changed by exactly `want` since `before`, and no other counter.
#[track_caller]
fn assert_deltas(g: &Guard, before: &Counters, want: &[(Counter, u64)]) -> Counters {
    let after = g.counters().expect("counters");
    let mut wrong = Vec::new();
    for c in Counter::ALL {
        let expected: u64 = want.iter().filter(|(w, _)| *w == c).map(|(_, n)| n).sum();
        let delta = after.get(c) - before.get(c);
        if delta != expected {
            wrong.push(format!(
                "{} changed by {delta}, expected {expected}",
                c.name()
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("; "));
    after
}

/// The outcome of a flood.
#[derive(Debug, Default)]
struct FloodReport {
    frames: u64,
    /// Verdicts: how many of each.
    verdicts: BTreeMap<u32, u64>,
    /// Index of the first frame counted as map_full, if any.
    first_full: Option<u64>,
    /// When that was noticed (within 64 frames).
    fill_time: Option<Duration>,
    elapsed: Duration,
}

impl FloodReport {
    fn rate(&self) -> f64 {
        self.frames as f64 / self.elapsed.as_secs_f64()
    }
}

/// Sends SYNs from spoofed sources `from..to`; every `probe_every` frames, `probe` runs (e.g. the
/// real client trying once more).
fn flood(
    g: &mut Guard,
    from: u64,
    to: u64,
    probe_every: u64,
    mut probe: impl FnMut(&mut Guard, u64),
) -> FloodReport {
    let mut f = Flood::new();
    let mut report = FloodReport::default();
    let start = Instant::now();
    let mut full_before = g.counters().expect("counters").get(Counter::MapFull);
    for i in from..to {
        let v = run(g, f.frame(spoofed(i)));
        *report.verdicts.entry(v).or_default() += 1;
        report.frames += 1;
        // Looking for the fill point costs a counter read per frame: only until it is found.
        if report.first_full.is_none() && (i - from) % 64 == 63 {
            let full = g.counters().expect("counters").get(Counter::MapFull);
            if full != full_before {
                report.first_full = Some(i + 1 - (full - full_before));
                report.fill_time = Some(start.elapsed());
            }
            full_before = full;
        }
        if probe_every != 0 && (i - from + 1).is_multiple_of(probe_every) {
            probe(g, i + 1);
        }
    }
    report.elapsed = start.elapsed();
    report
}

#[test]
fn flood_frames_are_the_builders_frames() {
    let mut f = Flood::new();
    for i in [0, 1, 77, V4_FLOOD - 1, V4_FLOOD, V4_FLOOD + 65_537, 999_999] {
        let src = spoofed(i);
        assert_eq!(
            f.frame(src),
            flood_builder(src).build(),
            "flood frame {i} ({src})"
        );
    }
    assert_eq!(spoofed(0), IpAddr::V4(Ipv4Addr::new(198, 18, 0, 16)));
    assert_eq!(
        spoofed(V4_FLOOD - 1),
        IpAddr::V4(Ipv4Addr::new(198, 19, 255, 255))
    );
    assert!(
        matches!(spoofed(V4_FLOOD + 5_000_000), IpAddr::V6(a) if a.segments()[..3] == [0x2001, 2, 0])
    );
}

/// Small maps, so a flood really fills them.
const SMALL_SOURCES: u32 = 4096;

/// The real client opens its maximum (3) of connections.
fn client_holds_three(g: &mut Guard) {
    for sport in 40000..40003 {
        expect(g, CLIENT, sport, XDP_PASS);
    }
    assert_eq!(count_of(g, CLIENT), 3);
}

#[test]
fn full_counter_map_keeps_live_counts_and_fails_as_configured() {
    if !privileged("full_counter_map_keeps_live_counts_and_fails_as_configured") {
        return;
    }
    // WSG_SOURCES (4096) fills long before WSG_FLOWS (16384).
    let mut g = load(
        SMALL_SOURCES,
        4 * SMALL_SOURCES,
        limits(3, ACTION_REJECT, 0, 0),
        GlobalConfig::default(),
    );
    let c0 = g.counters().unwrap();
    client_holds_three(&mut g);
    expect(&mut g, CLIENT, 40003, XDP_TX);

    // Twice as many spoofed sources as there is room for: the first 4095 get the counters left
    // (the client holds one), the rest pass untracked (fail open, the default).
    let n = 2 * SMALL_SOURCES as u64;
    let probes = std::cell::Cell::new(0u64);
    let r = flood(&mut g, 0, n, 512, |g, _| {
        // During the flood, the client still cannot open a fourth connection.
        let v = run(g, &syn(CLIENT, 41000 + probes.get() as u16));
        assert_eq!(
            v, XDP_TX,
            "the client got a 4th connection during the flood"
        );
        probes.set(probes.get() + 1);
    });
    let room = SMALL_SOURCES as u64 - 1;
    assert_eq!(r.verdicts, BTreeMap::from([(XDP_PASS, n)]), "{r:?}");
    assert_eq!(r.first_full, Some(room), "{r:?}");
    let c1 = assert_deltas(
        &g,
        &c0,
        &[
            (Counter::Admitted, 3 + room),
            (Counter::ConnLimited, 1 + probes.get()),
            (Counter::RstSent, 1 + probes.get()),
            (Counter::MapFull, n - room),
        ],
    );
    assert_eq!(g.source_counters().unwrap().len(), SMALL_SOURCES as usize);
    assert_eq!(g.pending().unwrap().len() as u64, 3 + room);
    // The client's count survived the flood: still 3, a 4th is refused, a retransmission of
    // one of its SYNs is still recognised.
    assert_eq!(count_of(&g, CLIENT), 3);
    expect(&mut g, CLIENT, 40003, XDP_TX);
    expect(&mut g, CLIENT, 40000, XDP_PASS);
    // A source the flood gave a counter is judged as usual: a second connection is admitted.
    let tracked = match spoofed(7) {
        IpAddr::V4(a) => a,
        _ => unreachable!(),
    };
    expect(&mut g, tracked, 50000, XDP_PASS);
    assert_eq!(count_of(&g, tracked), 2);
    // A new source fails open: passed, untracked.
    expect(&mut g, newcomer(0), 40000, XDP_PASS);
    assert_eq!(count_of(&g, newcomer(0)), 0);
    let c2 = assert_deltas(
        &g,
        &c1,
        &[
            (Counter::ConnLimited, 1),
            (Counter::RstSent, 1),
            (Counter::SynRetransmits, 1),
            (Counter::Admitted, 1),
            (Counter::MapFull, 1),
        ],
    );

    // Fail closed: a new source is refused with the port's connection_action (reject: an RST),
    // counted as map_full; the client and the tracked sources are judged as before.
    g.set_global(GlobalConfig {
        fail_closed: 1,
        ..GlobalConfig::default()
    })
    .unwrap();
    let (v, rst) = g.run_xdp(&syn(newcomer(1), 40000)).unwrap();
    assert_eq!(v, XDP_TX);
    assert_eq!(rst.len(), 54, "an RST+ACK answers the refused SYN");
    assert_eq!(rst[47] & 0x14, 0x14, "RST and ACK set: {rst:02x?}");
    expect(&mut g, CLIENT, 40004, XDP_TX);
    expect(&mut g, tracked, 50001, XDP_PASS);
    g.set_port(PORT, limits(3, ACTION_DROP, 0, 0)).unwrap();
    expect(&mut g, newcomer(2), 40000, XDP_DROP);
    let c3 = assert_deltas(
        &g,
        &c2,
        &[
            (Counter::MapFull, 2),
            (Counter::RstSent, 2),
            (Counter::ConnLimited, 1),
            (Counter::Admitted, 1),
        ],
    );
    // Monitor mode refuses nothing: counted as what failing closed would have refused.
    g.set_global(GlobalConfig {
        fail_closed: 1,
        monitor: 1,
        ..GlobalConfig::default()
    })
    .unwrap();
    expect(&mut g, newcomer(3), 40000, XDP_PASS);
    let c4 = assert_deltas(
        &g,
        &c3,
        &[(Counter::MapFull, 1), (Counter::MonitorWouldBlock, 1)],
    );
    g.set_global(GlobalConfig {
        fail_closed: 1,
        ..GlobalConfig::default()
    })
    .unwrap();

    // The client's connections end (released as the sweep or the tracepoint would): its
    // counter is still there, so even with the map full and failing closed it connects again,
    // up to its maximum.
    for sport in 40000..40003 {
        assert!(release(&mut g, flow4(CLIENT, sport)), "release {sport}");
    }
    assert_eq!(count_of(&g, CLIENT), 0);
    for sport in 42000..42003 {
        expect(&mut g, CLIENT, sport, XDP_PASS);
    }
    expect(&mut g, CLIENT, 42003, XDP_DROP);
    assert_eq!(count_of(&g, CLIENT), 3);
    assert_deltas(
        &g,
        &c4,
        &[
            (Counter::Expired, 3),
            (Counter::Admitted, 3),
            (Counter::ConnLimited, 1),
        ],
    );
    assert_eq!(g.source_counters().unwrap().len(), SMALL_SOURCES as usize);
    eprintln!(
        "counter map of {SMALL_SOURCES}: full after {room} spoofed sources; {n} in {:?} ({:.0} SYNs/s)",
        r.elapsed,
        r.rate()
    );
}

#[test]
fn full_flow_map_fails_as_configured_and_frees_with_releases() {
    if !privileged("full_flow_map_fails_as_configured_and_frees_with_releases") {
        return;
    }
    // WSG_FLOWS (1024) fills before WSG_SOURCES (4096).
    const FLOWS: u32 = 1024;
    let mut g = load(
        SMALL_SOURCES,
        FLOWS,
        limits(3, ACTION_REJECT, 0, 0),
        GlobalConfig::default(),
    );
    let c0 = g.counters().unwrap();
    client_holds_three(&mut g);
    let n = 2 * FLOWS as u64;
    let r = flood(&mut g, 0, n, 0, |_, _| {});
    let room = FLOWS as u64 - 3;
    assert_eq!(r.verdicts, BTreeMap::from([(XDP_PASS, n)]), "{r:?}");
    assert_eq!(r.first_full, Some(room), "{r:?}");
    let c1 = assert_deltas(
        &g,
        &c0,
        &[(Counter::Admitted, 3 + room), (Counter::MapFull, n - room)],
    );
    // Each flood source got a counter, but only those whose attempt is tracked hold a slot.
    assert_eq!(g.source_counters().unwrap().len() as u64, 1 + n);
    assert_eq!(g.connections().unwrap().len() as u64, 1 + room);
    assert_eq!(g.pending().unwrap().len(), FLOWS as usize);

    // The client is still at its maximum: refused before any map is needed.
    expect(&mut g, CLIENT, 40003, XDP_TX);
    // Any other attempt cannot be tracked: fail open passes it...
    expect(&mut g, newcomer(0), 40000, XDP_PASS);
    let c2 = assert_deltas(
        &g,
        &c1,
        &[
            (Counter::ConnLimited, 1),
            (Counter::RstSent, 1),
            (Counter::MapFull, 1),
        ],
    );
    // ... fail closed refuses it, whether the source has a counter or not.
    g.set_global(GlobalConfig {
        fail_closed: 1,
        ..GlobalConfig::default()
    })
    .unwrap();
    expect(&mut g, newcomer(1), 40000, XDP_TX);
    let untracked = match spoofed(n - 1) {
        IpAddr::V4(a) => a,
        _ => unreachable!(),
    };
    expect(&mut g, untracked, 50000, XDP_TX);
    assert_eq!(
        count_of(&g, untracked),
        0,
        "a refused attempt holds no slot"
    );
    let c3 = assert_deltas(&g, &c2, &[(Counter::MapFull, 2), (Counter::RstSent, 2)]);
    // Monitor mode passes all, and counts each attempt enforcing would refuse once: the
    // client's (over its maximum, and untrackable) as the newcomer's (untrackable).
    g.set_global(GlobalConfig {
        fail_closed: 1,
        monitor: 1,
        ..GlobalConfig::default()
    })
    .unwrap();
    expect(&mut g, CLIENT, 40020, XDP_PASS);
    expect(&mut g, newcomer(2), 40000, XDP_PASS);
    assert_eq!(count_of(&g, CLIENT), 3);
    let c3 = assert_deltas(
        &g,
        &c3,
        &[(Counter::MapFull, 2), (Counter::MonitorWouldBlock, 2)],
    );
    g.set_global(GlobalConfig {
        fail_closed: 1,
        ..GlobalConfig::default()
    })
    .unwrap();

    // One of the client's connections ends: its entry is free, and the client takes it back.
    assert!(release(&mut g, flow4(CLIENT, 40000)));
    assert_eq!(count_of(&g, CLIENT), 2);
    expect(&mut g, CLIENT, 40010, XDP_PASS);
    expect(&mut g, CLIENT, 40011, XDP_TX);
    assert_eq!(count_of(&g, CLIENT), 3);
    assert_deltas(
        &g,
        &c3,
        &[
            (Counter::Expired, 1),
            (Counter::Admitted, 1),
            (Counter::ConnLimited, 1),
            (Counter::RstSent, 1),
        ],
    );
    assert_eq!(g.pending().unwrap().len(), FLOWS as usize);
}

/// How many flood sources to send: `WSG_FLOOD_SOURCES`, default 1,000,000.
fn flood_size() -> u64 {
    match std::env::var("WSG_FLOOD_SOURCES") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("WSG_FLOOD_SOURCES={s:?} is not a number")),
        Err(_) => 1_000_000,
    }
}

/// The recipe's limits: 3 connections (reject), 9 new ones per 100 s (drop).
fn recipe() -> PortConfig {
    limits(3, ACTION_REJECT, 9, 100 * SECOND)
}

/// Distinct keys for every flood source, IPv6 ones included.
fn per_address() -> GlobalConfig {
    GlobalConfig {
        ipv6_prefix: 128,
        ..GlobalConfig::default()
    }
}

/// The hammer opens and closes connections until the rate stops it: 9 admitted (each closed at
/// once), the 10th dropped.
fn hammer_until_limited(g: &mut Guard) {
    for sport in 30000..30009 {
        expect(g, HAMMER, sport, XDP_PASS);
        assert!(release(g, flow4(HAMMER, sport)));
    }
    expect(g, HAMMER, 30009, XDP_DROP);
}

/// Sends flood sources `from..to`, then releases each one's attempt and removes its idle
/// counter, as the daemon's sweep does for attempts the kernel has no socket for: the maps
/// churn instead of staying full, so every flood source reaches the rate map.
fn churn(g: &mut Guard, f: &mut Flood, from: u64, to: u64) {
    const BATCH: u64 = 1024;
    let mut at = from;
    while at < to {
        let end = to.min(at + BATCH);
        for j in at..end {
            let src = spoofed(j);
            assert_eq!(run(g, f.frame(src)), XDP_PASS, "flood source {j}");
        }
        for j in at..end {
            let src = spoofed(j);
            assert!(release(g, flow_of(src)), "release flood source {j}");
            let k = key_of(g, src);
            assert!(
                g.remove_idle_source(&k, 0).unwrap(),
                "flood source {j} reclaimed"
            );
        }
        at = end;
    }
}

#[test]
fn rate_windows_are_never_evicted_by_a_flood_only_reclaimed_by_the_sweep() {
    if !privileged("rate_windows_are_never_evicted_by_a_flood_only_reclaimed_by_the_sweep") {
        return;
    }
    // Twice the capacity of new sources churn through (each released and reclaimed at once,
    // as the sweep does under pressure): the hammer, quiet meanwhile, is still limited.
    let mut g = load(SMALL_SOURCES, 4 * SMALL_SOURCES, recipe(), per_address());
    hammer_until_limited(&mut g);
    let hammer = key_of(&g, IpAddr::V4(HAMMER));
    churn(&mut g, &mut Flood::new(), 0, 2 * SMALL_SOURCES as u64);
    assert_eq!(
        run(&mut g, &syn(HAMMER, 31000)),
        XDP_DROP,
        "window survived"
    );
    // Its entry holds nothing (every attempt released) but its window: the sweep's rule keeps
    // it for the window, and only pressure or age lets it go.
    assert!(!g.remove_idle_source(&hammer, 100_001).unwrap());
    assert!(g.source_states().unwrap().iter().any(|(k, _)| *k == hammer));

    // Fill the map past nine tenths with flood sources that hold nothing (their attempts
    // released, their windows fresh): the sweep then reclaims the oldest newest attempts first,
    // down to nine tenths, and the hammer's (the oldest) goes first.
    let mut f = Flood::new();
    let fill = SMALL_SOURCES as u64 * 19 / 20;
    for j in 0..fill {
        let src = spoofed(1_000_000 + j);
        assert_eq!(run(&mut g, f.frame(src)), XDP_PASS, "flood source {j}");
        assert!(release(&mut g, flow_of(src)));
    }
    let before = g.source_states().unwrap().len();
    assert!(before as u64 > SMALL_SOURCES as u64 * 9 / 10, "{before}");
    let mut report = ws_guard::sweep::SweepReport::default();
    ws_guard::sweep::reclaim_sources(&mut g, &mut report).unwrap();
    let after = g.source_states().unwrap();
    assert!(
        !after.iter().any(|(k, _)| *k == hammer),
        "the oldest went first"
    );
    assert_eq!(
        after.len(),
        (SMALL_SOURCES as usize / 10) * 9,
        "down to nine tenths"
    );
    assert_eq!(report.idle_removed as usize, before - after.len());
    // Its window went with it: admitted again.
    assert_eq!(run(&mut g, &syn(HAMMER, 31001)), XDP_PASS);
}

#[test]
fn million_spoofed_sources_at_default_capacity() {
    if !privileged("million_spoofed_sources_at_default_capacity") {
        return;
    }
    let n = flood_size();
    let opts = LoadOptions::default();
    let mut g = load(opts.sources, opts.flows, recipe(), per_address());
    let c0 = g.counters().unwrap();
    client_holds_three(&mut g);
    hammer_until_limited(&mut g);
    let c1 = assert_deltas(
        &g,
        &c0,
        &[
            (Counter::Admitted, 3 + 9),
            (Counter::Expired, 9),
            (Counter::RateLimited, 1),
        ],
    );

    // Every 10,000 spoofed sources, the client tries a 4th connection.
    let probes = std::cell::Cell::new(0u64);
    let r = flood(&mut g, 0, n, 10_000, |g, _| {
        let v = run(g, &syn(CLIENT, 41000 + probes.get() as u16));
        assert_eq!(
            v, XDP_TX,
            "the client got a 4th connection during the flood"
        );
        probes.set(probes.get() + 1);
    });
    // The counters left (the client and the hammer hold one each) go to the first sources;
    // every later one passes untracked.
    let room = (opts.sources as u64 - 2).min(n);
    assert_eq!(r.verdicts, BTreeMap::from([(XDP_PASS, n)]), "{r:?}");
    assert_eq!(r.first_full, (n > room).then_some(room), "{r:?}");
    let c2 = assert_deltas(
        &g,
        &c1,
        &[
            (Counter::Admitted, room),
            (Counter::MapFull, n - room),
            (Counter::ConnLimited, probes.get()),
            (Counter::RstSent, probes.get()),
        ],
    );
    assert_eq!(count_of(&g, CLIENT), 3);
    assert_eq!(g.pending().unwrap().len() as u64, 3 + room);
    // The hammer's window: flood sources that found the counter map full never reached the
    // rate map, so at most `room` new windows were made (measured, see the README).
    let hammer_limited = run(&mut g, &syn(HAMMER, 31000)) == XDP_DROP;

    // After the flood: still no 4th connection; a new source fails open, or closed if asked.
    expect(&mut g, CLIENT, 40003, XDP_TX);
    expect(&mut g, newcomer(0), 40000, XDP_PASS);
    g.set_global(GlobalConfig {
        fail_closed: 1,
        ..per_address()
    })
    .unwrap();
    expect(&mut g, newcomer(1), 40000, XDP_TX);
    // The client's connections end; it connects again, up to its maximum.
    for sport in 40000..40003 {
        assert!(release(&mut g, flow4(CLIENT, sport)));
    }
    assert_eq!(count_of(&g, CLIENT), 0);
    for sport in 42000..42003 {
        expect(&mut g, CLIENT, sport, XDP_PASS);
    }
    expect(&mut g, CLIENT, 42003, XDP_TX);
    assert_eq!(count_of(&g, CLIENT), 3);
    let c3 = g.counters().unwrap();
    let d = |c: Counter| c3.get(c) - c2.get(c);
    assert_eq!(d(Counter::Expired), 3);
    assert_eq!(d(Counter::Admitted), 3 + !hammer_limited as u64);
    assert_eq!(d(Counter::RateLimited), hammer_limited as u64);
    assert_eq!(d(Counter::MapFull), 2);
    let fill = match (r.first_full, r.fill_time) {
        (Some(i), Some(t)) => format!("{i} sources ({t:?})"),
        _ => "never".into(),
    };
    eprintln!(
        "{n} spoofed sources at the default capacity ({} sources, {} flows): {:?}, {:.0} SYNs/s; \
         the counter map full after {fill}; the hammer's rate window {}",
        opts.sources,
        opts.flows,
        r.elapsed,
        r.rate(),
        if hammer_limited {
            "survived"
        } else {
            "was evicted"
        }
    );
}

/// An active ban is never evicted by a flood (`WSG_BANS` is a plain hash map): a flood of
/// sources that each go over the rate, and so each earn a ban, fills the ban map; the bans
/// already there all stay, the sources banned meanwhile are still refused by the rate, and
/// the pressure is counted as `bans_full`.
#[test]
fn bans_are_never_evicted_by_a_flood() {
    if !privileged("bans_are_never_evicted_by_a_flood") {
        return;
    }
    use ws_guard::bans::BanReason;
    const BANS: u32 = 64;
    const FLOOD: u64 = 2_000;
    let mut g = Guard::load(&LoadOptions {
        sources: 8192,
        flows: 8192,
        bans: BANS,
        kernel_log_level: 0,
        ..LoadOptions::default()
    })
    .expect("load the programs");
    // One new connection per 100 s, a ban of 10 minutes for a source over it.
    g.set_global(GlobalConfig {
        ban_ns: 600 * SECOND,
        ..GlobalConfig::default()
    })
    .expect("global settings");
    g.set_port(PORT, limits(0, ACTION_REJECT, 1, 100 * SECOND))
        .expect("port limits");
    // Banned by hand before the flood.
    let x = key_of(&g, IpAddr::V4(HAMMER));
    g.ban(x, Duration::from_secs(3600)).expect("ban");
    expect(&mut g, HAMMER, 40000, XDP_DROP);

    let before = g.counters().expect("counters");
    for i in 0..FLOOD {
        let IpAddr::V4(src) = spoofed(i) else {
            unreachable!()
        };
        // The first attempt is admitted, the second (another port: not a retransmission) is
        // over the rate and earns a ban while there is room.
        expect(&mut g, src, 50000, XDP_PASS);
        expect(&mut g, src, 50001, XDP_DROP);
    }
    let room = (BANS - 1) as u64;
    assert_deltas(
        &g,
        &before,
        &[
            (Counter::Admitted, FLOOD),
            (Counter::RateLimited, FLOOD),
            (Counter::BansStarted, room),
            (Counter::BansFull, FLOOD - room),
        ],
    );
    let bans = g.bans().expect("bans");
    assert_eq!(bans.len(), BANS as usize, "the ban map is full");
    let kept = bans
        .iter()
        .find(|b| b.source == x)
        .expect("the ban by hand was evicted");
    assert_eq!(kept.reason, BanReason::Manual);
    // Still banned: dropped as banned, not by the rate (it never made an attempt before).
    let before = g.counters().expect("counters");
    expect(&mut g, HAMMER, 40001, XDP_DROP);
    assert_deltas(&g, &before, &[(Counter::Banned, 1)]);
    // The first flood sources, banned before the map filled, are still banned too.
    let IpAddr::V4(first) = spoofed(0) else {
        unreachable!()
    };
    let before = g.counters().expect("counters");
    expect(&mut g, first, 50002, XDP_DROP);
    assert_deltas(&g, &before, &[(Counter::Banned, 1)]);
}
