//! Verdicts of the real XDP program, run with BPF_PROG_TEST_RUN on crafted frames: which SYNs are
//! admitted, refused (dropped or answered with a byte-checked RST), and what passes untouched;
//! the decision counters and the map state after each step are checked exactly.
//!
//! Every test loads its own programs and maps, so they are independent of each other.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    thread::sleep,
    time::{Duration, Instant},
};

use etherparse::{LinkExtHeader, NetHeaders, PacketHeaders, TransportHeader};
use ws_guard::{
    guard::{Counters, Guard, LoadOptions},
    lists::Policy,
};
use ws_guard_common::{
    maps::{
        ACTION_DROP, ACTION_REJECT, AF_INET, AF_INET6, ControlOp, Counter, FlowKey, GlobalConfig,
        OP_EXPIRE_PENDING, PortConfig, SourceKey,
    },
    parse::{self, Parsed},
};
use ws_guard_tests::frames::{
    CLIENT_MAC, Ext, FrameBuilder, IPV4_ROUTER_ALERT, LINUX_SYN_OPTIONS, Rng, TCP_ACK, TCP_CWR,
    TCP_ECE, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, TPID_8021AD, Tcp,
};

const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// The protected port.
const PORT: u16 = 9000;
/// A port that is not protected.
const OPEN_PORT: u16 = 9001;
const SECOND: u64 = 1_000_000_000;

fn client4(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, last)
}

fn server4() -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, 1)
}

fn client6() -> Ipv6Addr {
    "2001:2::1".parse().unwrap()
}

fn server6() -> Ipv6Addr {
    "2001:2:0:ff::1".parse().unwrap()
}

fn limits(
    max_connections: u32,
    conn_action: u32,
    rate_limit: u32,
    rate_action: u32,
    rate_window_ns: u64,
) -> PortConfig {
    PortConfig {
        enabled: 1,
        max_connections,
        conn_action,
        rate_action,
        rate_limit,
        index: 0,
        rate_window_ns,
        ..PortConfig::default()
    }
}

/// Loads the programs with `port` protecting [`PORT`] and the given global settings.
fn guard(port: PortConfig, global: GlobalConfig) -> Guard {
    let mut g = Guard::load(&LoadOptions::default()).expect("load the programs");
    g.set_global(global).expect("global settings");
    g.set_port(PORT, port).expect("port limits");
    g
}

fn run(g: &mut Guard, frame: &[u8]) -> (u32, Vec<u8>) {
    g.run_xdp(frame).expect("BPF_PROG_TEST_RUN")
}

/// Runs `frame` and checks the verdict; for XDP_PASS also that the frame left unchanged.
fn expect(g: &mut Guard, frame: &[u8], verdict: u32) -> Vec<u8> {
    let (v, out) = run(g, frame);
    assert_eq!(v, verdict, "verdict for frame {frame:02x?}");
    if v == XDP_PASS {
        assert_eq!(out, frame, "a passed frame must leave untouched");
    }
    out
}

/// Checks that the counters changed by exactly `want` since `before`, and no other counter
/// changed.
fn assert_deltas(g: &Guard, before: &Counters, want: &[(Counter, u64)]) {
    let after = g.counters().expect("counters");
    for c in Counter::ALL {
        let expected: u64 = want.iter().filter(|(w, _)| *w == c).map(|(_, n)| n).sum();
        let delta = after.get(c) - before.get(c);
        assert_eq!(
            delta,
            expected,
            "counter {} changed by {delta}, expected {expected} (before {before:?}, after {after:?})",
            c.name()
        );
    }
}

fn v4_bytes(a: Ipv4Addr) -> [u8; 16] {
    let mut o = [0u8; 16];
    o[..4].copy_from_slice(&a.octets());
    o
}

fn key4(masked: Ipv4Addr) -> SourceKey {
    SourceKey {
        addr: v4_bytes(masked),
        port: PORT,
        family: AF_INET,
    }
}

fn key6(masked: &str) -> SourceKey {
    SourceKey {
        addr: masked.parse::<Ipv6Addr>().unwrap().octets(),
        port: PORT,
        family: AF_INET6,
    }
}

fn flow4(client: Ipv4Addr, sport: u16) -> FlowKey {
    FlowKey {
        client: v4_bytes(client),
        server: v4_bytes(server4()),
        client_port: sport,
        server_port: PORT,
        family: AF_INET,
        _pad: 0,
    }
}

fn flow6(client: Ipv6Addr, sport: u16) -> FlowKey {
    FlowKey {
        client: client.octets(),
        server: server6().octets(),
        client_port: sport,
        server_port: PORT,
        family: AF_INET6,
        _pad: 0,
    }
}

/// A Linux-like IPv4 SYN from `client` to the protected port.
fn syn4(client: Ipv4Addr, sport: u16, seq: u32) -> FrameBuilder {
    FrameBuilder::ipv4(client, server4())
        .tcp(Tcp::syn(sport, PORT, seq).options(&LINUX_SYN_OPTIONS))
}

/// A Linux-like IPv6 SYN from `client` to the protected port.
fn syn6(client: Ipv6Addr, sport: u16, seq: u32) -> FrameBuilder {
    FrameBuilder::ipv6(client, server6())
        .tcp(Tcp::syn(sport, PORT, seq).options(&LINUX_SYN_OPTIONS))
}

fn connections(g: &Guard) -> Vec<(SourceKey, u32)> {
    g.connections().expect("connections").into_iter().collect()
}

fn pending_flows(g: &Guard) -> Vec<FlowKey> {
    let mut v: Vec<FlowKey> = g
        .pending()
        .expect("pending")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    v.sort_by_key(|k| (k.family, k.client, k.client_port));
    v
}

/// Checks that `out` is the RST+ACK answering the SYN `syn`, byte for byte where it matters.
fn check_rst(syn: &[u8], out: &[u8]) {
    let s = PacketHeaders::from_ethernet_slice(syn).expect("the SYN parses");
    let r = PacketHeaders::from_ethernet_slice(out)
        .unwrap_or_else(|e| panic!("the reply does not parse: {e:?}: {out:02x?}"));
    let s_eth = s
        .link
        .clone()
        .and_then(|l| l.ethernet2())
        .expect("SYN ethernet");
    let r_eth = r
        .link
        .clone()
        .and_then(|l| l.ethernet2())
        .expect("reply ethernet");
    assert_eq!(r_eth.source, s_eth.destination, "source MAC");
    assert_eq!(r_eth.destination, s_eth.source, "destination MAC");
    assert_eq!(r_eth.ether_type, s_eth.ether_type, "outer ether type");
    // VLAN tags kept as they were.
    let tags = |p: &PacketHeaders| -> Vec<_> {
        p.link_exts
            .iter()
            .map(|e| match e {
                LinkExtHeader::Vlan(v) => v.clone(),
                other => panic!("unexpected link extension {other:?}"),
            })
            .collect()
    };
    assert_eq!(tags(&r), tags(&s), "VLAN tags");
    let eth_len = 14 + 4 * s.link_exts.len();

    let Some(TransportHeader::Tcp(st)) = s.transport.clone() else {
        panic!("the SYN is not TCP")
    };
    let Some(TransportHeader::Tcp(rt)) = r.transport.clone() else {
        panic!("the reply is not TCP: {r:?}")
    };
    let syn_payload_len: u32;
    match (s.net.clone(), r.net.clone()) {
        (Some(NetHeaders::Ipv4(sip, _)), Some(NetHeaders::Ipv4(rip, rext))) => {
            syn_payload_len =
                sip.total_len as u32 - sip.header_len() as u32 - st.header_len() as u32;
            assert_eq!(rip.source, sip.destination, "IPv4 source");
            assert_eq!(rip.destination, sip.source, "IPv4 destination");
            assert_eq!(rip.header_len(), 20, "no IPv4 options");
            assert!(rext.is_empty());
            assert_eq!(rip.protocol.0, 6);
            assert_eq!(rip.total_len, 40, "IPv4 total length");
            assert!(
                !rip.more_fragments && rip.fragment_offset.value() == 0,
                "not a fragment"
            );
            assert!(rip.time_to_live > 0);
            assert_eq!(
                rip.header_checksum,
                rip.calc_header_checksum(),
                "IPv4 header checksum"
            );
            assert_eq!(
                rt.checksum,
                rt.calc_checksum_ipv4(&rip, &[]).unwrap(),
                "TCP checksum (IPv4)"
            );
            assert_eq!(out.len(), eth_len + 20 + 20, "reply length");
        }
        (Some(NetHeaders::Ipv6(sip, sext)), Some(NetHeaders::Ipv6(rip, rext))) => {
            assert!(
                sext.is_empty(),
                "RSTs answer IPv6 without extension headers only"
            );
            syn_payload_len = sip.payload_length as u32 - st.header_len() as u32;
            assert_eq!(rip.source, sip.destination, "IPv6 source");
            assert_eq!(rip.destination, sip.source, "IPv6 destination");
            assert!(rext.is_empty(), "no extension headers");
            assert_eq!(rip.next_header.0, 6);
            assert_eq!(rip.payload_length, 20, "IPv6 payload length");
            assert!(rip.hop_limit > 0);
            assert_eq!(
                rt.checksum,
                rt.calc_checksum_ipv6(&rip, &[]).unwrap(),
                "TCP checksum (IPv6)"
            );
            assert_eq!(out.len(), eth_len + 40 + 20, "reply length");
        }
        other => panic!("IP versions differ or are missing: {other:?}"),
    }
    assert_eq!(rt.source_port, st.destination_port, "source port");
    assert_eq!(rt.destination_port, st.source_port, "destination port");
    assert!(rt.rst && rt.ack, "RST+ACK");
    assert!(
        !rt.syn && !rt.fin && !rt.psh && !rt.urg && !rt.ece && !rt.cwr && !rt.ns,
        "only RST and ACK set: {rt:?}"
    );
    assert_eq!(rt.sequence_number, 0, "sequence number");
    assert_eq!(
        rt.acknowledgment_number,
        st.sequence_number
            .wrapping_add(1)
            .wrapping_add(syn_payload_len),
        "acknowledgment number"
    );
    assert_eq!(rt.header_len(), 20, "no TCP options");
    assert_eq!(r.payload.slice().len(), 0, "no payload");
}

// ---------------------------------------------------------------------------------------------
// Admission and retransmits.

#[test]
fn ipv4_syn_under_the_limits_is_admitted_and_tracked() {
    if !ws_guard_tests::privileged("ipv4_syn_under_the_limits_is_admitted_and_tracked") {
        return;
    }
    let mut g = guard(
        limits(3, ACTION_REJECT, 9, ACTION_DROP, 100 * SECOND),
        GlobalConfig::default(),
    );
    let c0 = g.counters().unwrap();
    expect(&mut g, &syn4(client4(1), 40000, 1000).build(), XDP_PASS);
    assert_deltas(&g, &c0, &[(Counter::Admitted, 1)]);
    assert_eq!(pending_flows(&g), vec![flow4(client4(1), 40000)]);
    let (f, v) = g.pending().unwrap()[0];
    assert_eq!(v.source(&f), key4(client4(1)));
    assert!(v.since_ms > 0);
    assert_eq!(connections(&g), vec![(key4(client4(1)), 1)]);
    assert!(g.owned().unwrap().is_empty());
}

#[test]
fn ipv6_syn_under_the_limits_is_admitted_and_tracked() {
    if !ws_guard_tests::privileged("ipv6_syn_under_the_limits_is_admitted_and_tracked") {
        return;
    }
    let mut g = guard(
        limits(3, ACTION_REJECT, 9, ACTION_DROP, 100 * SECOND),
        GlobalConfig::default(),
    );
    let c0 = g.counters().unwrap();
    expect(&mut g, &syn6(client6(), 40000, 1000).build(), XDP_PASS);
    assert_deltas(&g, &c0, &[(Counter::Admitted, 1)]);
    assert_eq!(pending_flows(&g), vec![flow6(client6(), 40000)]);
    let (f, v) = g.pending().unwrap()[0];
    assert_eq!(v.source(&f), key6("2001:2::"));
    assert_eq!(connections(&g), vec![(key6("2001:2::"), 1)]);
}

#[test]
fn ecn_setup_syn_is_a_new_attempt() {
    if !ws_guard_tests::privileged("ecn_setup_syn_is_a_new_attempt") {
        return;
    }
    // SYN with ECE and CWR (RFC 3168 ECN set-up) is still a SYN without ACK.
    let mut g = guard(
        limits(1, ACTION_DROP, 0, ACTION_DROP, 0),
        GlobalConfig::default(),
    );
    let c0 = g.counters().unwrap();
    let ecn = |sport| {
        FrameBuilder::ipv4(client4(1), server4())
            .tcp(Tcp::syn(sport, PORT, 5).flags(TCP_SYN | TCP_ECE | TCP_CWR))
            .build()
    };
    expect(&mut g, &ecn(40000), XDP_PASS);
    expect(&mut g, &ecn(40001), XDP_DROP);
    assert_deltas(
        &g,
        &c0,
        &[(Counter::Admitted, 1), (Counter::ConnLimited, 1)],
    );
}

#[test]
fn ipv4_retransmitted_syn_passes_without_taking_a_slot() {
    if !ws_guard_tests::privileged("ipv4_retransmitted_syn_passes_without_taking_a_slot") {
        return;
    }
    let mut g = guard(
        limits(3, ACTION_REJECT, 9, ACTION_DROP, 100 * SECOND),
        GlobalConfig::default(),
    );
    let syn = syn4(client4(1), 40000, 1000).build();
    let c0 = g.counters().unwrap();
    expect(&mut g, &syn, XDP_PASS);
    expect(&mut g, &syn, XDP_PASS);
    // A retransmit may differ in options and timestamps: the 4-tuple decides.
    let again = FrameBuilder::ipv4(client4(1), server4())
        .tcp(Tcp::syn(40000, PORT, 1000))
        .build();
    expect(&mut g, &again, XDP_PASS);
    assert_deltas(
        &g,
        &c0,
        &[(Counter::Admitted, 1), (Counter::SynRetransmits, 2)],
    );
    assert_eq!(connections(&g), vec![(key4(client4(1)), 1)]);
    assert_eq!(pending_flows(&g), vec![flow4(client4(1), 40000)]);
}

#[test]
fn ipv6_retransmitted_syn_passes_without_taking_a_slot() {
    if !ws_guard_tests::privileged("ipv6_retransmitted_syn_passes_without_taking_a_slot") {
        return;
    }
    let mut g = guard(
        limits(3, ACTION_REJECT, 9, ACTION_DROP, 100 * SECOND),
        GlobalConfig::default(),
    );
    let syn = syn6(client6(), 40000, 1000).build();
    let c0 = g.counters().unwrap();
    expect(&mut g, &syn, XDP_PASS);
    expect(&mut g, &syn, XDP_PASS);
    assert_deltas(
        &g,
        &c0,
        &[(Counter::Admitted, 1), (Counter::SynRetransmits, 1)],
    );
    assert_eq!(connections(&g), vec![(key6("2001:2::"), 1)]);
    assert_eq!(pending_flows(&g), vec![flow6(client6(), 40000)]);
}

#[test]
fn retransmit_of_an_admitted_syn_passes_even_at_the_limit() {
    if !ws_guard_tests::privileged("retransmit_of_an_admitted_syn_passes_even_at_the_limit") {
        return;
    }
    let mut g = guard(
        limits(1, ACTION_DROP, 1, ACTION_DROP, 100 * SECOND),
        GlobalConfig::default(),
    );
    let first = syn4(client4(1), 40000, 1).build();
    let c0 = g.counters().unwrap();
    expect(&mut g, &first, XDP_PASS);
    // At the concurrency limit and at the rate limit, the same attempt still passes.
    expect(&mut g, &first, XDP_PASS);
    expect(&mut g, &syn4(client4(1), 40001, 1).build(), XDP_DROP);
    expect(&mut g, &first, XDP_PASS);
    assert_deltas(
        &g,
        &c0,
        &[
            (Counter::Admitted, 1),
            (Counter::SynRetransmits, 2),
            (Counter::ConnLimited, 1),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// The concurrency limit: drop, reject.

/// The refusals this CPU's memo holds for `key`.
fn memo_pending(g: &Guard, key: &SourceKey) -> u32 {
    g.refusal_memos()
        .expect("refusal memos")
        .iter()
        .filter(|m| m.source == *key)
        .map(|m| m.pending)
        .sum()
}

/// The refusal count of `key` as userspace reads it (memos included).
fn refused(g: &Guard, key: &SourceKey) -> u32 {
    g.source_states()
        .expect("source states")
        .into_iter()
        .find(|(k, _)| k == key)
        .map_or(0, |(_, s)| s.refused)
}

/// A source at its limit is refused from the CPU's refusal memo (no lookup of its entry), and
/// everything that can end that refusal ends it: a retransmission still passes, a released slot,
/// a raised limit, the allowlist; a ban counts as a ban. Refusals are counted exactly, and none
/// lands in a later entry of the key after its idle entry is removed.
#[test]
fn a_remembered_refusal_ends_with_whatever_could_end_it() {
    if !ws_guard_tests::privileged("a_remembered_refusal_ends_with_whatever_could_end_it") {
        return;
    }
    // The memo is the CPU's own: every frame runs on the CPU the test started on.
    let cpu = ws_guard::cpu::current().expect("the current CPU");
    ws_guard::cpu::on_cpu(cpu, || {
        let mut g = guard(
            limits(2, ACTION_DROP, 0, ACTION_DROP, 0),
            GlobalConfig::default(),
        );
        let key = key4(client4(1));
        let syn = |sport| syn4(client4(1), sport, 7).build();
        let c0 = g.counters().unwrap();
        expect(&mut g, &syn(40000), XDP_PASS);
        expect(&mut g, &syn(40001), XDP_PASS);
        for sport in 40002..40007 {
            expect(&mut g, &syn(sport), XDP_DROP);
        }
        // The first refusal made the memo, the other four came from it.
        assert_eq!(memo_pending(&g, &key), 4);
        assert_eq!(refused(&g, &key), 5);
        // A retransmission of an admitted attempt passes (the memo's copy of the filter).
        expect(&mut g, &syn(40000), XDP_PASS);
        assert_deltas(
            &g,
            &c0,
            &[
                (Counter::Admitted, 2),
                (Counter::ConnLimited, 5),
                (Counter::SynRetransmits, 1),
            ],
        );

        // A slot given back.
        let expire = |g: &mut Guard, sport| {
            assert!(
                g.control(ControlOp {
                    op: OP_EXPIRE_PENDING,
                    flow: flow4(client4(1), sport),
                    ..ControlOp::default()
                })
                .unwrap()
            );
        };
        expire(&mut g, 40000);
        expect(&mut g, &syn(40010), XDP_PASS);
        expect(&mut g, &syn(40011), XDP_DROP);
        expect(&mut g, &syn(40012), XDP_DROP);
        // A raised limit.
        g.set_port(PORT, limits(3, ACTION_DROP, 0, ACTION_DROP, 0))
            .unwrap();
        expect(&mut g, &syn(40013), XDP_PASS);
        expect(&mut g, &syn(40014), XDP_DROP);
        expect(&mut g, &syn(40015), XDP_DROP);
        // The allowlist.
        let c1 = g.counters().unwrap();
        let allow = Policy {
            allow: vec!["198.18.0.1/32".parse().unwrap()],
            ..Policy::default()
        };
        g.apply_policy(&allow).unwrap();
        expect(&mut g, &syn(40016), XDP_PASS);
        g.apply_policy(&Policy::default()).unwrap();
        expect(&mut g, &syn(40017), XDP_DROP);
        expect(&mut g, &syn(40018), XDP_DROP);
        // A ban.
        g.ban(key, Duration::from_secs(60)).unwrap();
        expect(&mut g, &syn(40019), XDP_DROP);
        assert_deltas(
            &g,
            &c1,
            &[
                (Counter::Allowed, 1),
                (Counter::ConnLimited, 2),
                (Counter::Banned, 1),
            ],
        );
        // Every refusal of the source, counted once: 5 + 2 + 2 + 2 + 1.
        assert_eq!(refused(&g, &key), 12);
        g.unban(&key).unwrap();

        // The source's connections end; its entry, idle, goes, and its refusals with it (the
        // memo's are moved into it first, on the memo's CPU).
        expect(&mut g, &syn(40020), XDP_DROP);
        expect(&mut g, &syn(40022), XDP_DROP);
        assert_eq!(memo_pending(&g, &key), 1);
        for sport in [40001, 40010, 40013, 40016] {
            expire(&mut g, sport);
        }
        assert!(g.remove_idle_source(&key, 0).unwrap());
        assert_eq!(memo_pending(&g, &key), 0);
        expect(&mut g, &syn(40021), XDP_PASS);
        assert_eq!(refused(&g, &key), 0);
        assert_eq!(connections(&g), vec![(key, 1)]);
    })
    .expect("running on one CPU");
}

/// SYNs from one source with five distinct source ports against max_connections = 3.
fn five_syns(g: &mut Guard, frames: &[Vec<u8>], refused: u32) -> Vec<Vec<u8>> {
    let mut outs = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let want = if i < 3 { XDP_PASS } else { refused };
        outs.push(expect(g, f, want));
    }
    outs
}

#[test]
fn ipv4_over_max_connections_is_dropped() {
    if !ws_guard_tests::privileged("ipv4_over_max_connections_is_dropped") {
        return;
    }
    let mut g = guard(
        limits(3, ACTION_DROP, 0, ACTION_DROP, 0),
        GlobalConfig::default(),
    );
    let frames: Vec<Vec<u8>> = (0..5)
        .map(|i| syn4(client4(1), 40000 + i, 7).build())
        .collect();
    let c0 = g.counters().unwrap();
    five_syns(&mut g, &frames, XDP_DROP);
    assert_deltas(
        &g,
        &c0,
        &[(Counter::Admitted, 3), (Counter::ConnLimited, 2)],
    );
    assert_eq!(connections(&g), vec![(key4(client4(1)), 3)]);
    assert_eq!(
        pending_flows(&g),
        (0..3)
            .map(|i| flow4(client4(1), 40000 + i))
            .collect::<Vec<_>>()
    );
}

#[test]
fn ipv6_over_max_connections_is_dropped() {
    if !ws_guard_tests::privileged("ipv6_over_max_connections_is_dropped") {
        return;
    }
    let mut g = guard(
        limits(3, ACTION_DROP, 0, ACTION_DROP, 0),
        GlobalConfig::default(),
    );
    let frames: Vec<Vec<u8>> = (0..5)
        .map(|i| syn6(client6(), 40000 + i, 7).build())
        .collect();
    let c0 = g.counters().unwrap();
    five_syns(&mut g, &frames, XDP_DROP);
    assert_deltas(
        &g,
        &c0,
        &[(Counter::Admitted, 3), (Counter::ConnLimited, 2)],
    );
    assert_eq!(connections(&g), vec![(key6("2001:2::"), 3)]);
    assert_eq!(pending_flows(&g).len(), 3);
}

#[test]
fn ipv4_over_max_connections_is_rejected_with_a_correct_rst() {
    if !ws_guard_tests::privileged("ipv4_over_max_connections_is_rejected_with_a_correct_rst") {
        return;
    }
    let mut g = guard(
        limits(3, ACTION_REJECT, 0, ACTION_DROP, 0),
        GlobalConfig::default(),
    );
    let frames: Vec<Vec<u8>> = (0..5)
        .map(|i| syn4(client4(1), 40000 + i, 0x1000_0000 * i as u32 + 17).build())
        .collect();
    let c0 = g.counters().unwrap();
    let outs = five_syns(&mut g, &frames, XDP_TX);
    check_rst(&frames[3], &outs[3]);
    check_rst(&frames[4], &outs[4]);
    assert_deltas(
        &g,
        &c0,
        &[
            (Counter::Admitted, 3),
            (Counter::ConnLimited, 2),
            (Counter::RstSent, 2),
        ],
    );
    assert_eq!(connections(&g), vec![(key4(client4(1)), 3)]);
    assert_eq!(pending_flows(&g).len(), 3);
}

#[test]
fn ipv6_over_max_connections_is_rejected_with_a_correct_rst() {
    if !ws_guard_tests::privileged("ipv6_over_max_connections_is_rejected_with_a_correct_rst") {
        return;
    }
    let mut g = guard(
        limits(3, ACTION_REJECT, 0, ACTION_DROP, 0),
        GlobalConfig::default(),
    );
    let frames: Vec<Vec<u8>> = (0..5)
        .map(|i| syn6(client6(), 40000 + i, 0xfedc_ba98 ^ i as u32).build())
        .collect();
    let c0 = g.counters().unwrap();
    let outs = five_syns(&mut g, &frames, XDP_TX);
    check_rst(&frames[3], &outs[3]);
    check_rst(&frames[4], &outs[4]);
    assert_deltas(
        &g,
        &c0,
        &[
            (Counter::Admitted, 3),
            (Counter::ConnLimited, 2),
            (Counter::RstSent, 2),
        ],
    );
    assert_eq!(connections(&g), vec![(key6("2001:2::"), 3)]);
}

#[test]
fn vlan_tagged_ipv4_over_max_connections_is_rejected_keeping_the_tag() {
    if !ws_guard_tests::privileged(
        "vlan_tagged_ipv4_over_max_connections_is_rejected_keeping_the_tag",
    ) {
        return;
    }
    let mut g = guard(
        limits(3, ACTION_REJECT, 0, ACTION_DROP, 0),
        GlobalConfig::default(),
    );
    let frames: Vec<Vec<u8>> = (0..5)
        .map(|i| syn4(client4(1), 40000 + i, 99).vlan(42).build())
        .collect();
    let c0 = g.counters().unwrap();
    let outs = five_syns(&mut g, &frames, XDP_TX);
    for i in 3..5 {
        check_rst(&frames[i], &outs[i]);
        assert_eq!(outs[i].len(), 14 + 4 + 20 + 20);
        // The tag bytes themselves, as sent.
        assert_eq!(&outs[i][12..18], &frames[i][12..18]);
    }
    assert_deltas(
        &g,
        &c0,
        &[
            (Counter::Admitted, 3),
            (Counter::ConnLimited, 2),
            (Counter::RstSent, 2),
        ],
    );
}

#[test]
fn qinq_tagged_ipv6_over_max_connections_is_rejected_keeping_both_tags() {
    if !ws_guard_tests::privileged(
        "qinq_tagged_ipv6_over_max_connections_is_rejected_keeping_both_tags",
    ) {
        return;
    }
    let mut g = guard(
        limits(1, ACTION_REJECT, 0, ACTION_DROP, 0),
        GlobalConfig::default(),
    );
    let f = |sport| {
        syn6(client6(), sport, 5)
            .vlan_tag(TPID_8021AD, 100)
            .vlan(200)
            .build()
    };
    let c0 = g.counters().unwrap();
    expect(&mut g, &f(40000), XDP_PASS);
    let syn = f(40001);
    let out = expect(&mut g, &syn, XDP_TX);
    check_rst(&syn, &out);
    assert_eq!(out.len(), 14 + 8 + 40 + 20);
    assert_eq!(&out[12..22], &syn[12..22]);
    assert_deltas(
        &g,
        &c0,
        &[
            (Counter::Admitted, 1),
            (Counter::ConnLimited, 1),
            (Counter::RstSent, 1),
        ],
    );
}

#[test]
fn rst_acknowledges_the_payload_of_an_ipv4_syn() {
    if !ws_guard_tests::privileged("rst_acknowledges_the_payload_of_an_ipv4_syn") {
        return;
    }
    let mut g = guard(
        limits(1, ACTION_REJECT, 0, ACTION_DROP, 0),
        GlobalConfig::default(),
    );
    expect(&mut g, &syn4(client4(1), 40000, 1).build(), XDP_PASS);
    // A TCP Fast Open style SYN with 100 bytes of data, its sequence number about to wrap.
    let payload: Vec<u8> = (0..100u8).collect();
    let b = FrameBuilder::ipv4(client4(1), server4()).tcp(
        Tcp::syn(40001, PORT, 0xffff_ffc0)
            .options(&LINUX_SYN_OPTIONS)
            .payload(&payload),
    );
    let syn = b.build();
    let c0 = g.counters().unwrap();
    let out = expect(&mut g, &syn, XDP_TX);
    check_rst(&syn, &out);
    // seq + 1 + 100, modulo 2^32.
    assert_eq!(
        &out[14 + 20 + 8..14 + 20 + 12],
        &0x0000_0025u32.to_be_bytes()
    );
    assert_eq!(out.len(), 54);
    assert_deltas(&g, &c0, &[(Counter::ConnLimited, 1), (Counter::RstSent, 1)]);
}

#[test]
fn rst_acknowledges_the_payload_of_an_ipv6_syn() {
    if !ws_guard_tests::privileged("rst_acknowledges_the_payload_of_an_ipv6_syn") {
        return;
    }
    let mut g = guard(
        limits(1, ACTION_REJECT, 0, ACTION_DROP, 0),
        GlobalConfig::default(),
    );
    expect(&mut g, &syn6(client6(), 40000, 1).build(), XDP_PASS);
    let b = FrameBuilder::ipv6(client6(), server6()).tcp(
        Tcp::syn(40001, PORT, 1000)
            .options(&LINUX_SYN_OPTIONS)
            .payload(&[0xab; 33]),
    );
    let syn = b.build();
    let c0 = g.counters().unwrap();
    let out = expect(&mut g, &syn, XDP_TX);
    check_rst(&syn, &out);
    assert_eq!(&out[14 + 40 + 8..14 + 40 + 12], &1034u32.to_be_bytes());
    assert_eq!(out.len(), 74);
    assert_deltas(&g, &c0, &[(Counter::ConnLimited, 1), (Counter::RstSent, 1)]);
}

#[test]
fn rst_ignores_ethernet_padding() {
    if !ws_guard_tests::privileged("rst_ignores_ethernet_padding") {
        return;
    }
    // A bare 54-byte SYN arrives padded to the 60-byte Ethernet minimum: the padding is not
    // payload, and the reply is 54 bytes.
    let mut g = guard(
        limits(1, ACTION_REJECT, 0, ACTION_DROP, 0),
        GlobalConfig::default(),
    );
    let pad = |b: FrameBuilder| {
        let mut f = b.build();
        assert_eq!(f.len(), 54);
        f.resize(60, 0);
        f
    };
    let bare = |sport| FrameBuilder::ipv4(client4(1), server4()).tcp(Tcp::syn(sport, PORT, 500));
    expect(&mut g, &pad(bare(40000)), XDP_PASS);
    let syn = pad(bare(40001));
    let out = expect(&mut g, &syn, XDP_TX);
    check_rst(&syn, &out);
    assert_eq!(&out[14 + 20 + 8..14 + 20 + 12], &501u32.to_be_bytes());
    assert_eq!(out.len(), 54);
}

#[test]
fn reject_of_ipv4_with_options_falls_back_to_drop() {
    if !ws_guard_tests::privileged("reject_of_ipv4_with_options_falls_back_to_drop") {
        return;
    }
    let mut g = guard(
        limits(1, ACTION_REJECT, 0, ACTION_DROP, 0),
        GlobalConfig::default(),
    );
    let f = |sport| {
        syn4(client4(1), sport, 1)
            .ip_options(&IPV4_ROUTER_ALERT)
            .build()
    };
    let c0 = g.counters().unwrap();
    expect(&mut g, &f(40000), XDP_PASS);
    expect(&mut g, &f(40001), XDP_DROP);
    assert_deltas(
        &g,
        &c0,
        &[
            (Counter::Admitted, 1),
            (Counter::ConnLimited, 1),
            (Counter::RejectAsDrop, 1),
        ],
    );
    assert_eq!(connections(&g), vec![(key4(client4(1)), 1)]);
}

#[test]
fn reject_of_ipv6_with_hop_by_hop_falls_back_to_drop() {
    if !ws_guard_tests::privileged("reject_of_ipv6_with_hop_by_hop_falls_back_to_drop") {
        return;
    }
    let mut g = guard(
        limits(1, ACTION_REJECT, 0, ACTION_DROP, 0),
        GlobalConfig::default(),
    );
    let f = |sport| syn6(client6(), sport, 1).ext(Ext::HopByHop).build();
    let c0 = g.counters().unwrap();
    expect(&mut g, &f(40000), XDP_PASS);
    expect(&mut g, &f(40001), XDP_DROP);
    assert_deltas(
        &g,
        &c0,
        &[
            (Counter::Admitted, 1),
            (Counter::ConnLimited, 1),
            (Counter::RejectAsDrop, 1),
        ],
    );
    assert_eq!(connections(&g), vec![(key6("2001:2::"), 1)]);
    assert_eq!(pending_flows(&g), vec![flow6(client6(), 40000)]);
}

// ---------------------------------------------------------------------------------------------
// Source keys: prefix masking.

#[test]
fn ipv4_prefix_24_puts_two_sources_under_one_limit() {
    if !ws_guard_tests::privileged("ipv4_prefix_24_puts_two_sources_under_one_limit") {
        return;
    }
    let global = GlobalConfig {
        ipv4_prefix: 24,
        ..GlobalConfig::default()
    };
    let mut g = guard(limits(1, ACTION_DROP, 0, ACTION_DROP, 0), global);
    let c0 = g.counters().unwrap();
    expect(&mut g, &syn4(client4(1), 40000, 1).build(), XDP_PASS);
    expect(&mut g, &syn4(client4(2), 40000, 1).build(), XDP_DROP);
    assert_deltas(
        &g,
        &c0,
        &[(Counter::Admitted, 1), (Counter::ConnLimited, 1)],
    );
    assert_eq!(
        connections(&g),
        vec![(key4(Ipv4Addr::new(198, 18, 0, 0)), 1)]
    );
    // The pending entry remembers the key it is charged to.
    let (f, v) = g.pending().unwrap()[0];
    assert_eq!(v.source(&f), key4(Ipv4Addr::new(198, 18, 0, 0)));
}

#[test]
fn ipv4_prefix_32_keeps_sources_apart() {
    if !ws_guard_tests::privileged("ipv4_prefix_32_keeps_sources_apart") {
        return;
    }
    let mut g = guard(
        limits(1, ACTION_DROP, 0, ACTION_DROP, 0),
        GlobalConfig::default(),
    );
    let c0 = g.counters().unwrap();
    expect(&mut g, &syn4(client4(1), 40000, 1).build(), XDP_PASS);
    expect(&mut g, &syn4(client4(2), 40000, 1).build(), XDP_PASS);
    assert_deltas(&g, &c0, &[(Counter::Admitted, 2)]);
    assert_eq!(
        connections(&g),
        vec![(key4(client4(1)), 1), (key4(client4(2)), 1)]
    );
}

#[test]
fn ipv4_prefix_20_masks_inside_a_byte() {
    if !ws_guard_tests::privileged("ipv4_prefix_20_masks_inside_a_byte") {
        return;
    }
    let global = GlobalConfig {
        ipv4_prefix: 20,
        ..GlobalConfig::default()
    };
    let mut g = guard(limits(1, ACTION_DROP, 0, ACTION_DROP, 0), global);
    let c0 = g.counters().unwrap();
    let syn = |a: Ipv4Addr| syn4(a, 40000, 1).build();
    expect(&mut g, &syn(Ipv4Addr::new(198, 18, 15, 200)), XDP_PASS);
    expect(&mut g, &syn(Ipv4Addr::new(198, 18, 0, 1)), XDP_DROP);
    expect(&mut g, &syn(Ipv4Addr::new(198, 18, 16, 1)), XDP_PASS);
    assert_deltas(
        &g,
        &c0,
        &[(Counter::Admitted, 2), (Counter::ConnLimited, 1)],
    );
    assert_eq!(
        connections(&g),
        vec![
            (key4(Ipv4Addr::new(198, 18, 0, 0)), 1),
            (key4(Ipv4Addr::new(198, 18, 16, 0)), 1)
        ]
    );
}

#[test]
fn ipv6_default_prefix_64_groups_by_subnet() {
    if !ws_guard_tests::privileged("ipv6_default_prefix_64_groups_by_subnet") {
        return;
    }
    let mut g = guard(
        limits(1, ACTION_DROP, 0, ACTION_DROP, 0),
        GlobalConfig::default(),
    );
    let c0 = g.counters().unwrap();
    let syn = |a: &str| syn6(a.parse().unwrap(), 40000, 1).build();
    expect(&mut g, &syn("2001:2::1"), XDP_PASS);
    expect(&mut g, &syn("2001:2::2"), XDP_DROP);
    expect(&mut g, &syn("2001:2::ffff:ffff:ffff:ffff"), XDP_DROP);
    expect(&mut g, &syn("2001:2:0:1::1"), XDP_PASS);
    assert_deltas(
        &g,
        &c0,
        &[(Counter::Admitted, 2), (Counter::ConnLimited, 2)],
    );
    assert_eq!(
        connections(&g),
        vec![(key6("2001:2::"), 1), (key6("2001:2:0:1::"), 1)]
    );
}

#[test]
fn limits_are_per_protected_port() {
    if !ws_guard_tests::privileged("limits_are_per_protected_port") {
        return;
    }
    let mut g = guard(
        limits(1, ACTION_DROP, 0, ACTION_DROP, 0),
        GlobalConfig::default(),
    );
    g.set_port(PORT + 10, limits(1, ACTION_DROP, 0, ACTION_DROP, 0))
        .unwrap();
    let c0 = g.counters().unwrap();
    let to = |dport| {
        FrameBuilder::ipv4(client4(1), server4())
            .tcp(Tcp::syn(40000, dport, 1))
            .build()
    };
    expect(&mut g, &to(PORT), XDP_PASS);
    expect(&mut g, &to(PORT + 10), XDP_PASS);
    assert_deltas(&g, &c0, &[(Counter::Admitted, 2)]);
    let other = SourceKey {
        port: PORT + 10,
        ..key4(client4(1))
    };
    let mut want = vec![(key4(client4(1)), 1), (other, 1)];
    want.sort();
    assert_eq!(connections(&g), want);
}

// ---------------------------------------------------------------------------------------------
// The rate limit.

#[test]
fn rate_limit_drops_the_attempt_over_the_rate() {
    if !ws_guard_tests::privileged("rate_limit_drops_the_attempt_over_the_rate") {
        return;
    }
    let mut g = guard(
        limits(0, ACTION_REJECT, 3, ACTION_DROP, 10 * SECOND),
        GlobalConfig::default(),
    );
    let c0 = g.counters().unwrap();
    for i in 0..3 {
        expect(&mut g, &syn4(client4(1), 40000 + i, 1).build(), XDP_PASS);
    }
    expect(&mut g, &syn4(client4(1), 40003, 1).build(), XDP_DROP);
    assert_deltas(
        &g,
        &c0,
        &[(Counter::Admitted, 3), (Counter::RateLimited, 1)],
    );
    // A retransmit of an admitted attempt is not a new attempt: it passes and does not count.
    expect(&mut g, &syn4(client4(1), 40000, 1).build(), XDP_PASS);
    expect(&mut g, &syn4(client4(1), 40004, 1).build(), XDP_DROP);
    assert_deltas(
        &g,
        &c0,
        &[
            (Counter::Admitted, 3),
            (Counter::RateLimited, 2),
            (Counter::SynRetransmits, 1),
        ],
    );
    // Rate refusals give their slot back.
    assert_eq!(connections(&g), vec![(key4(client4(1)), 3)]);
    assert_eq!(pending_flows(&g).len(), 3);
    // Another source has its own window.
    expect(&mut g, &syn4(client4(2), 40000, 1).build(), XDP_PASS);
}

#[test]
fn rate_limit_rejects_with_a_correct_rst() {
    if !ws_guard_tests::privileged("rate_limit_rejects_with_a_correct_rst") {
        return;
    }
    let mut g = guard(
        limits(0, ACTION_DROP, 3, ACTION_REJECT, 10 * SECOND),
        GlobalConfig::default(),
    );
    let c0 = g.counters().unwrap();
    for i in 0..3 {
        expect(&mut g, &syn6(client6(), 40000 + i, 1).build(), XDP_PASS);
    }
    let syn = syn6(client6(), 40003, 0xdead_beef).build();
    let out = expect(&mut g, &syn, XDP_TX);
    check_rst(&syn, &out);
    assert_deltas(
        &g,
        &c0,
        &[
            (Counter::Admitted, 3),
            (Counter::RateLimited, 1),
            (Counter::RstSent, 1),
        ],
    );
}

#[test]
fn concurrency_refusals_do_not_count_towards_the_rate() {
    if !ws_guard_tests::privileged("concurrency_refusals_do_not_count_towards_the_rate") {
        return;
    }
    // Concurrency is checked first. Conn refusals answer with an RST, rate refusals drop, so the
    // verdict tells which rule refused.
    let mut port = limits(1, ACTION_REJECT, 2, ACTION_DROP, 10 * SECOND);
    let mut g = guard(port, GlobalConfig::default());
    let c0 = g.counters().unwrap();
    expect(&mut g, &syn4(client4(1), 40000, 1).build(), XDP_PASS); // rate attempt #1
    for i in 1..=5 {
        expect(&mut g, &syn4(client4(1), 40000 + i, 1).build(), XDP_TX);
    }
    assert_deltas(
        &g,
        &c0,
        &[
            (Counter::Admitted, 1),
            (Counter::ConnLimited, 5),
            (Counter::RstSent, 5),
        ],
    );
    // Lift the concurrency limit. Had the five refusals counted, the rate (2 per 10 s) would be
    // exhausted; they did not, so this is attempt #2 and is admitted...
    port.max_connections = 10;
    g.set_port(PORT, port).unwrap();
    expect(&mut g, &syn4(client4(1), 40010, 1).build(), XDP_PASS);
    // ... and attempt #3 is the first one over the rate.
    expect(&mut g, &syn4(client4(1), 40011, 1).build(), XDP_DROP);
    assert_deltas(
        &g,
        &c0,
        &[
            (Counter::Admitted, 2),
            (Counter::ConnLimited, 5),
            (Counter::RstSent, 5),
            (Counter::RateLimited, 1),
        ],
    );
    assert_eq!(connections(&g), vec![(key4(client4(1)), 2)]);
}

#[test]
fn rate_window_admits_again_after_it_passes() {
    if !ws_guard_tests::privileged("rate_window_admits_again_after_it_passes") {
        return;
    }
    let window = Duration::from_millis(300);
    let mut g = guard(
        limits(0, ACTION_DROP, 2, ACTION_DROP, window.as_nanos() as u64),
        GlobalConfig::default(),
    );
    let c0 = g.counters().unwrap();
    let start = Instant::now();
    expect(&mut g, &syn4(client4(1), 40000, 1).build(), XDP_PASS);
    expect(&mut g, &syn4(client4(1), 40001, 1).build(), XDP_PASS);
    expect(&mut g, &syn4(client4(1), 40002, 1).build(), XDP_DROP);
    assert!(
        start.elapsed() < window,
        "the first three attempts took longer than the window"
    );
    sleep(window + Duration::from_millis(50));
    expect(&mut g, &syn4(client4(1), 40003, 1).build(), XDP_PASS);
    assert_deltas(
        &g,
        &c0,
        &[(Counter::Admitted, 3), (Counter::RateLimited, 1)],
    );
}

#[test]
fn hammering_source_stays_refused_until_it_is_quiet() {
    if !ws_guard_tests::privileged("hammering_source_stays_refused_until_it_is_quiet") {
        return;
    }
    // Limit 2 per 300 ms; after two admitted attempts the client retransmits its refused SYN
    // every 100 ms for 1.2 s. Each refused attempt counts, so the 2nd previous attempt is always
    // 200 ms old: it stays refused. After 400 ms of quiet it is admitted.
    let window = Duration::from_millis(300);
    let interval = Duration::from_millis(100);
    let mut g = guard(
        limits(0, ACTION_DROP, 2, ACTION_DROP, window.as_nanos() as u64),
        GlobalConfig::default(),
    );
    let c0 = g.counters().unwrap();
    expect(&mut g, &syn4(client4(1), 40000, 1).build(), XDP_PASS);
    expect(&mut g, &syn4(client4(1), 40001, 1).build(), XDP_PASS);
    let hammer = syn4(client4(1), 40002, 1).build();
    let start = Instant::now();
    // Start of each attempt; the 2nd previous attempt must be inside the window for the
    // expectation to hold, which a scheduling stall of more than 100 ms could break.
    let mut starts: Vec<Instant> = vec![start, start];
    let mut attempts = 0;
    while start.elapsed() < Duration::from_millis(1200) && attempts < 20 {
        let t = Instant::now();
        assert!(
            t.duration_since(starts[starts.len() - 2]) < window,
            "scheduling stall: attempts more than a window apart"
        );
        let (v, _) = run(&mut g, &hammer);
        assert_eq!(v, XDP_DROP, "attempt {attempts} at {:?}", start.elapsed());
        starts.push(t);
        attempts += 1;
        sleep(interval);
    }
    assert!(
        start.elapsed() >= Duration::from_secs(1) && attempts >= 10,
        "hammered {attempts} times for {:?}",
        start.elapsed()
    );
    // The client was refused for over a second. Quiet for 400 ms (more than the window after
    // the last two attempts), then the same SYN is admitted.
    sleep(Duration::from_millis(400).saturating_sub(interval));
    expect(&mut g, &hammer, XDP_PASS);
    assert_deltas(
        &g,
        &c0,
        &[(Counter::Admitted, 3), (Counter::RateLimited, attempts)],
    );
}

// ---------------------------------------------------------------------------------------------
// Runtime changes and monitor mode.

#[test]
fn raising_max_connections_applies_to_the_next_syn() {
    if !ws_guard_tests::privileged("raising_max_connections_applies_to_the_next_syn") {
        return;
    }
    let mut port = limits(1, ACTION_DROP, 0, ACTION_DROP, 0);
    let mut g = guard(port, GlobalConfig::default());
    let c0 = g.counters().unwrap();
    let second = syn4(client4(1), 40001, 1).build();
    expect(&mut g, &syn4(client4(1), 40000, 1).build(), XDP_PASS);
    expect(&mut g, &second, XDP_DROP);
    port.max_connections = 2;
    g.set_port(PORT, port).unwrap();
    // The very SYN that was dropped, retransmitted: now admitted, same programs and maps.
    expect(&mut g, &second, XDP_PASS);
    expect(&mut g, &syn4(client4(1), 40002, 1).build(), XDP_DROP);
    assert_deltas(
        &g,
        &c0,
        &[(Counter::Admitted, 2), (Counter::ConnLimited, 2)],
    );
    assert_eq!(connections(&g), vec![(key4(client4(1)), 2)]);
}

#[test]
fn switching_actions_and_unprotecting_apply_to_the_next_syn() {
    if !ws_guard_tests::privileged("switching_actions_and_unprotecting_apply_to_the_next_syn") {
        return;
    }
    let mut port = limits(1, ACTION_DROP, 0, ACTION_DROP, 0);
    let mut g = guard(port, GlobalConfig::default());
    expect(&mut g, &syn4(client4(1), 40000, 1).build(), XDP_PASS);
    let c0 = g.counters().unwrap();
    let syn = syn4(client4(1), 40001, 1).build();
    expect(&mut g, &syn, XDP_DROP);
    port.conn_action = ACTION_REJECT;
    g.set_port(PORT, port).unwrap();
    let out = expect(&mut g, &syn, XDP_TX);
    check_rst(&syn, &out);
    g.set_port(PORT, PortConfig::default()).unwrap();
    expect(&mut g, &syn, XDP_PASS);
    assert_deltas(
        &g,
        &c0,
        &[
            (Counter::ConnLimited, 2),
            (Counter::RstSent, 1),
            (Counter::NotProtected, 1),
        ],
    );
}

#[test]
fn monitor_mode_passes_over_the_connection_limit() {
    if !ws_guard_tests::privileged("monitor_mode_passes_over_the_connection_limit") {
        return;
    }
    let global = GlobalConfig {
        monitor: 1,
        ..GlobalConfig::default()
    };
    let mut g = guard(limits(1, ACTION_DROP, 0, ACTION_DROP, 0), global);
    let c0 = g.counters().unwrap();
    for i in 0..3 {
        expect(&mut g, &syn4(client4(1), 40000 + i, 1).build(), XDP_PASS);
    }
    assert_deltas(
        &g,
        &c0,
        &[(Counter::Admitted, 3), (Counter::MonitorWouldBlock, 2)],
    );
    // Still accounted: the source has three live attempts.
    assert_eq!(connections(&g), vec![(key4(client4(1)), 3)]);
    assert_eq!(pending_flows(&g).len(), 3);
}

#[test]
fn monitor_mode_passes_over_the_rate() {
    if !ws_guard_tests::privileged("monitor_mode_passes_over_the_rate") {
        return;
    }
    let global = GlobalConfig {
        monitor: 1,
        ..GlobalConfig::default()
    };
    let mut g = guard(
        limits(0, ACTION_REJECT, 2, ACTION_REJECT, 10 * SECOND),
        global,
    );
    let c0 = g.counters().unwrap();
    for i in 0..4 {
        expect(&mut g, &syn6(client6(), 40000 + i, 1).build(), XDP_PASS);
    }
    assert_deltas(
        &g,
        &c0,
        &[(Counter::Admitted, 4), (Counter::MonitorWouldBlock, 2)],
    );
    assert_eq!(connections(&g), vec![(key6("2001:2::"), 4)]);
}

#[test]
fn monitor_mode_counts_what_enforcing_would_refuse() {
    if !ws_guard_tests::privileged("monitor_mode_counts_what_enforcing_would_refuse") {
        return;
    }
    // The same four attempts against max_connections 1 and 2 per 10 s, enforced and monitored.
    // Enforced: one admitted, three refused by the concurrency rule (which do not count towards
    // the rate). Monitor mode must count each attempt it would refuse once: three.
    let port = limits(1, ACTION_DROP, 2, ACTION_DROP, 10 * SECOND);
    let frames: Vec<Vec<u8>> = (0..4)
        .map(|i| syn4(client4(1), 40000 + i, 1).build())
        .collect();

    let mut enforcing = guard(port, GlobalConfig::default());
    let c0 = enforcing.counters().unwrap();
    for (i, f) in frames.iter().enumerate() {
        expect(&mut enforcing, f, if i == 0 { XDP_PASS } else { XDP_DROP });
    }
    assert_deltas(
        &enforcing,
        &c0,
        &[(Counter::Admitted, 1), (Counter::ConnLimited, 3)],
    );

    let global = GlobalConfig {
        monitor: 1,
        ..GlobalConfig::default()
    };
    let mut monitor = guard(port, global);
    let c0 = monitor.counters().unwrap();
    for f in &frames {
        expect(&mut monitor, f, XDP_PASS);
    }
    assert_deltas(
        &monitor,
        &c0,
        &[(Counter::Admitted, 4), (Counter::MonitorWouldBlock, 3)],
    );
}

// ---------------------------------------------------------------------------------------------
// Traffic that is not judged passes untouched.

fn assert_untracked(g: &Guard) {
    assert!(g.pending().unwrap().is_empty(), "nothing pending");
    assert!(
        g.connections().unwrap().is_empty(),
        "no connections counted"
    );
}

#[test]
fn non_syn_segments_to_the_protected_port_pass_untouched() {
    if !ws_guard_tests::privileged("non_syn_segments_to_the_protected_port_pass_untouched") {
        return;
    }
    let mut g = guard(
        limits(1, ACTION_REJECT, 1, ACTION_REJECT, 100 * SECOND),
        GlobalConfig::default(),
    );
    let flag_sets = [
        TCP_SYN | TCP_ACK,
        TCP_ACK,
        TCP_ACK | TCP_PSH,
        TCP_RST,
        TCP_RST | TCP_ACK,
        TCP_FIN,
        TCP_FIN | TCP_ACK,
        TCP_SYN | TCP_FIN,
        TCP_SYN | TCP_RST,
        0,
    ];
    let c0 = g.counters().unwrap();
    let mut n = 0;
    for flags in flag_sets {
        for v6 in [false, true] {
            let tcp = Tcp::with_flags(40000, PORT, 1, flags)
                .ack_number(77)
                .payload(b"data");
            let f = if v6 {
                FrameBuilder::ipv6(client6(), server6()).tcp(tcp)
            } else {
                FrameBuilder::ipv4(client4(1), server4()).tcp(tcp)
            };
            expect(&mut g, &f.build(), XDP_PASS);
            n += 1;
        }
    }
    assert_deltas(&g, &c0, &[(Counter::ProtectedOther, n)]);
    assert_untracked(&g);
}

#[test]
fn syn_to_an_unprotected_port_passes_untouched() {
    if !ws_guard_tests::privileged("syn_to_an_unprotected_port_passes_untouched") {
        return;
    }
    let mut g = guard(
        limits(1, ACTION_REJECT, 1, ACTION_REJECT, 100 * SECOND),
        GlobalConfig::default(),
    );
    // A port with limits written but not enabled is not protected either.
    g.set_port(
        OPEN_PORT + 1,
        PortConfig {
            enabled: 0,
            ..limits(1, ACTION_DROP, 1, ACTION_DROP, SECOND)
        },
    )
    .unwrap();
    let c0 = g.counters().unwrap();
    for i in 0..3 {
        for dport in [OPEN_PORT, OPEN_PORT + 1] {
            let v4 = FrameBuilder::ipv4(client4(1), server4())
                .tcp(Tcp::syn(40000 + i, dport, 1).options(&LINUX_SYN_OPTIONS));
            let v6 = FrameBuilder::ipv6(client6(), server6())
                .tcp(Tcp::syn(40000 + i, dport, 1).options(&LINUX_SYN_OPTIONS));
            expect(&mut g, &v4.build(), XDP_PASS);
            expect(&mut g, &v6.build(), XDP_PASS);
        }
    }
    assert_deltas(&g, &c0, &[(Counter::NotProtected, 12)]);
    assert_untracked(&g);
}

#[test]
fn udp_icmp_arp_and_other_ether_types_pass_untouched() {
    if !ws_guard_tests::privileged("udp_icmp_arp_and_other_ether_types_pass_untouched") {
        return;
    }
    let mut g = guard(
        limits(1, ACTION_REJECT, 1, ACTION_REJECT, 100 * SECOND),
        GlobalConfig::default(),
    );
    let mut lldp = vec![0u8; 60];
    lldp[..6].copy_from_slice(&[0x01, 0x80, 0xc2, 0, 0, 0x0e]);
    lldp[6..12].copy_from_slice(&CLIENT_MAC);
    lldp[12..14].copy_from_slice(&[0x88, 0xcc]);
    let frames = vec![
        FrameBuilder::ipv4(client4(1), server4())
            .udp(40000, PORT, b"hello")
            .build(),
        FrameBuilder::ipv6(client6(), server6())
            .udp(40000, PORT, b"hello")
            .build(),
        FrameBuilder::ipv4(client4(1), server4())
            .echo_request(1, 1, b"ping")
            .build(),
        FrameBuilder::ipv6(client6(), server6())
            .echo_request(1, 1, b"ping")
            .build(),
        FrameBuilder::arp_request(client4(1), server4()).build(),
        FrameBuilder::arp_request(client4(1), server4())
            .vlan(9)
            .build(),
        // SCTP, whose ports sit where TCP's do.
        FrameBuilder::ipv4(client4(1), server4())
            .raw_l4(132, &[0x9c, 0x40, 0x23, 0x28, 0, 0, 0, 0, 0, 0, 0, 0])
            .build(),
        // IPv6 behind a destination-options header, then UDP.
        FrameBuilder::ipv6(client6(), server6())
            .ext(Ext::DestOpts)
            .udp(40000, PORT, b"x")
            .build(),
        lldp,
    ];
    let c0 = g.counters().unwrap();
    for f in &frames {
        expect(&mut g, f, XDP_PASS);
    }
    assert_deltas(&g, &c0, &[(Counter::NotProtected, frames.len() as u64)]);
    assert_untracked(&g);
}

/// IP fragments (SECURITY.md finding 10): the first fragment of a TCP segment to a protected
/// port is dropped, so a SYN sent in fragments never reaches the kernel unjudged (Linux would
/// reassemble it); later fragments (no ports to read) and first fragments to other ports or of
/// other protocols pass; an IPv6 atomic fragment is a whole SYN, judged as one. With
/// `pass_fragments` or in monitor mode, first fragments pass too. All are counted as fragments.
#[test]
fn first_fragments_to_a_protected_port_are_dropped() {
    if !ws_guard_tests::privileged("first_fragments_to_a_protected_port_are_dropped") {
        return;
    }
    let first_to_port = vec![
        // First IPv4 fragment of a SYN to the protected port.
        syn4(client4(1), 40000, 1).ipv4_fragment(true, 0).build(),
        syn4(client4(1), 40003, 1)
            .ipv4_fragment(true, 0)
            .vlan(3)
            .build(),
        // IPv6 fragment header in front of a SYN, alone and behind hop-by-hop.
        syn6(client6(), 40000, 1)
            .ext(Ext::Fragment {
                offset: 0,
                more: true,
                id: 9,
            })
            .build(),
        syn6(client6(), 40004, 1)
            .ext(Ext::HopByHop)
            .ext(Ext::Fragment {
                offset: 0,
                more: true,
                id: 10,
            })
            .ext(Ext::DestOpts)
            .build(),
    ];
    let others = vec![
        // A later IPv4 fragment, whose "TCP header" is payload.
        syn4(client4(1), 40001, 1).ipv4_fragment(false, 100).build(),
        syn4(client4(1), 40002, 1)
            .ipv4_fragment(true, 7)
            .vlan(3)
            .build(),
        syn6(client6(), 40001, 1)
            .ext(Ext::HopByHop)
            .ext(Ext::Fragment {
                offset: 20,
                more: false,
                id: 9,
            })
            .build(),
        // A first fragment to another port.
        FrameBuilder::ipv4(client4(1), server4())
            .tcp(Tcp::syn(40005, PORT + 1, 1))
            .ipv4_fragment(true, 0)
            .build(),
    ];
    for (global, first_verdict) in [
        (GlobalConfig::default(), XDP_DROP),
        (
            GlobalConfig {
                pass_fragments: 1,
                ..GlobalConfig::default()
            },
            XDP_PASS,
        ),
        (
            GlobalConfig {
                monitor: 1,
                ..GlobalConfig::default()
            },
            XDP_PASS,
        ),
    ] {
        let mut g = guard(
            limits(1, ACTION_REJECT, 1, ACTION_REJECT, 100 * SECOND),
            global,
        );
        let c0 = g.counters().unwrap();
        for f in &first_to_port {
            let (v, _) = run(&mut g, f);
            assert_eq!(v, first_verdict, "{global:?}: {f:02x?}");
        }
        for f in &others {
            expect(&mut g, f, XDP_PASS);
        }
        assert_deltas(
            &g,
            &c0,
            &[(
                Counter::Fragments,
                (first_to_port.len() + others.len()) as u64,
            )],
        );
        // The first fragments to the port are its own.
        let stats = g.stats().unwrap();
        let port_fragments: u64 = stats
            .ports
            .iter()
            .filter(|((p, _), _)| *p == PORT)
            .map(|(_, c)| c[Counter::Fragments as usize])
            .sum();
        assert_eq!(port_fragments, first_to_port.len() as u64);
        assert_untracked(&g);
    }
    // An IPv6 atomic fragment (offset 0, no more fragments) is a whole packet: judged.
    let mut g = guard(
        limits(1, ACTION_DROP, 0, ACTION_DROP, 0),
        GlobalConfig::default(),
    );
    let atomic = |sport| {
        syn6(client6(), sport, 1)
            .ext(Ext::Fragment {
                offset: 0,
                more: false,
                id: 11,
            })
            .build()
    };
    expect(&mut g, &atomic(40010), XDP_PASS);
    let (v, _) = run(&mut g, &atomic(40011));
    assert_eq!(v, XDP_DROP, "over max_connections");
}

#[test]
fn every_frame_adds_to_exactly_one_frame_outcome() {
    if !ws_guard_tests::privileged("every_frame_adds_to_exactly_one_frame_outcome") {
        return;
    }
    // `Counter::FRAME_OUTCOMES` add up to the number of frames the XDP program saw.
    let mut g = guard(
        limits(1, ACTION_REJECT, 2, ACTION_DROP, 100 * SECOND),
        GlobalConfig::default(),
    );
    let frames = vec![
        syn4(client4(1), 40000, 1).build(), // admitted
        syn4(client4(1), 40001, 1).build(), // conn limited, RST
        syn4(client4(1), 40001, 1)
            .ip_options(&IPV4_ROUTER_ALERT)
            .build(), // conn limited, drop
        syn4(client4(1), 40000, 1).build(), // retransmit
        syn4(client4(2), 40000, 1).build(), // admitted
        FrameBuilder::arp_request(client4(1), server4()).build(), // not protected
        FrameBuilder::ipv4(client4(1), server4())
            .tcp(Tcp::with_flags(40000, PORT, 1, TCP_ACK))
            .build(), // protected other
        syn4(client4(1), 40000, 1).ipv4_fragment(true, 0).build(), // fragment
        syn4(client4(1), 40000, 1).build()[..30].to_vec(), // malformed
    ];
    let sum = |c: &Counters| {
        Counter::FRAME_OUTCOMES
            .iter()
            .map(|&o| c.get(o))
            .sum::<u64>()
    };
    let c0 = g.counters().unwrap();
    for f in &frames {
        run(&mut g, f);
    }
    assert_eq!(sum(&g.counters().unwrap()) - sum(&c0), frames.len() as u64);
    assert_deltas(
        &g,
        &c0,
        &[
            (Counter::Admitted, 2),
            (Counter::ConnLimited, 2),
            (Counter::RstSent, 1),
            (Counter::RejectAsDrop, 1),
            (Counter::SynRetransmits, 1),
            (Counter::NotProtected, 1),
            (Counter::ProtectedOther, 1),
            (Counter::Fragments, 1),
            (Counter::Malformed, 1),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Truncated and garbage frames.

/// The errno of a failed run, if it failed in the syscall.
fn errno(e: &anyhow::Error) -> Option<i32> {
    e.chain()
        .find_map(|c| c.downcast_ref::<std::io::Error>())
        .and_then(|io| io.raw_os_error())
}

/// Runs every proper prefix of `full`. The kernel refuses XDP test runs of less than an Ethernet
/// header (EINVAL); every accepted prefix must pass untouched and count as malformed.
fn every_prefix_is_malformed(g: &mut Guard, full: &[u8]) {
    // The full frame is a SYN to the protected port (checked with the kernel's own parser).
    match parse::parse(full) {
        Parsed::Tcp(seg) => assert!(seg.is_new_attempt() && seg.dport == PORT),
        other => panic!("the full frame parses as {other:?}"),
    }
    let c0 = g.counters().unwrap();
    let mut accepted = 0u64;
    for len in 0..full.len() {
        let prefix = &full[..len];
        match g.run_xdp(prefix) {
            Err(e) => {
                assert!(len < 14, "length {len} refused by the kernel: {e:#}");
                assert_eq!(errno(&e), Some(libc::EINVAL), "length {len}: {e:#}");
            }
            Ok((v, out)) => {
                assert!(len >= 14, "the kernel accepted a {len}-byte frame");
                assert_ne!(v, XDP_ABORTED, "length {len}");
                assert_eq!(v, XDP_PASS, "length {len}");
                assert_eq!(out, prefix, "length {len}: passed untouched");
                // Every prefix misses a header byte the parser needs.
                assert_eq!(parse::parse(prefix), Parsed::Malformed, "length {len}");
                accepted += 1;
            }
        }
    }
    assert_eq!(accepted, full.len() as u64 - 14);
    assert_deltas(g, &c0, &[(Counter::Malformed, accepted)]);
    assert_untracked(g);
    // The full frame itself is judged: admitted.
    expect(g, full, XDP_PASS);
    assert_deltas(
        g,
        &c0,
        &[(Counter::Malformed, accepted), (Counter::Admitted, 1)],
    );
}

#[test]
fn every_truncation_of_a_tagged_ipv4_syn_with_options_passes_as_malformed() {
    if !ws_guard_tests::privileged(
        "every_truncation_of_a_tagged_ipv4_syn_with_options_passes_as_malformed",
    ) {
        return;
    }
    let mut g = guard(
        limits(1, ACTION_REJECT, 1, ACTION_REJECT, 100 * SECOND),
        GlobalConfig::default(),
    );
    let full = syn4(client4(1), 40000, 1)
        .vlan(42)
        .ip_options(&[1, 1, 1, 0x94, 4, 0, 0, 0])
        .build();
    assert_eq!(full.len(), 14 + 4 + 28 + 40);
    every_prefix_is_malformed(&mut g, &full);
}

#[test]
fn every_truncation_of_an_ipv6_syn_with_hop_by_hop_passes_as_malformed() {
    if !ws_guard_tests::privileged(
        "every_truncation_of_an_ipv6_syn_with_hop_by_hop_passes_as_malformed",
    ) {
        return;
    }
    let mut g = guard(
        limits(1, ACTION_REJECT, 1, ACTION_REJECT, 100 * SECOND),
        GlobalConfig::default(),
    );
    let full = syn6(client6(), 40000, 1).ext(Ext::HopByHop).build();
    assert_eq!(full.len(), 14 + 40 + 8 + 40);
    every_prefix_is_malformed(&mut g, &full);
}

#[test]
fn inconsistent_lengths_pass_as_malformed() {
    if !ws_guard_tests::privileged("inconsistent_lengths_pass_as_malformed") {
        return;
    }
    let mut g = guard(
        limits(1, ACTION_REJECT, 1, ACTION_REJECT, 100 * SECOND),
        GlobalConfig::default(),
    );
    let v4 = syn4(client4(1), 40000, 1).build();
    let v6 = syn6(client6(), 40000, 1).build();
    let mut frames = Vec::new();
    // IPv4 header length below 20.
    let mut f = v4.clone();
    f[14] = 0x44;
    frames.push(f);
    // IPv4 total length shorter than its header.
    let mut f = v4.clone();
    f[16..18].copy_from_slice(&19u16.to_be_bytes());
    frames.push(f);
    // IPv4 total length shorter than the TCP header it carries.
    let mut f = v4.clone();
    f[16..18].copy_from_slice(&39u16.to_be_bytes());
    frames.push(f);
    // Wrong IP version behind the IPv4 ether type.
    let mut f = v4.clone();
    f[14] = 0x65;
    frames.push(f);
    // TCP data offset below 5.
    let mut f = v4.clone();
    f[14 + 20 + 12] = 0x40;
    frames.push(f);
    // IPv6 payload length shorter than the TCP header.
    let mut f = v6.clone();
    f[18..20].copy_from_slice(&10u16.to_be_bytes());
    frames.push(f);
    // Wrong version behind the IPv6 ether type.
    let mut f = v6.clone();
    f[14] = 0x40;
    frames.push(f);
    // Four VLAN tags: more than the parser follows.
    frames.push(
        syn4(client4(1), 40000, 1)
            .vlan(1)
            .vlan(2)
            .vlan(3)
            .vlan(4)
            .build(),
    );
    let c0 = g.counters().unwrap();
    for f in &frames {
        assert_eq!(parse::parse(&f[..]), Parsed::Malformed, "{f:02x?}");
        expect(&mut g, f, XDP_PASS);
    }
    assert_deltas(&g, &c0, &[(Counter::Malformed, frames.len() as u64)]);
    assert_untracked(&g);
}

/// A frame that starts with plausible headers (or not), cut or extended with random bytes to a
/// random length in 14..200, with a few bytes flipped now and then.
fn garbage_frame(rng: &mut Rng, sources: &[Ipv4Addr]) -> Vec<u8> {
    let len = rng.range(14, 200);
    let mut f = vec![0u8; len];
    rng.fill(&mut f);
    let kind = rng.range(0, 4);
    if kind == 0 {
        return f;
    }
    let flags = match rng.range(0, 4) {
        0 | 1 => TCP_SYN,
        2 => TCP_SYN | TCP_ACK,
        _ => rng.next_u64() as u8,
    };
    let dport = if rng.chance(3, 4) {
        PORT
    } else {
        rng.next_u64() as u16
    };
    let opts_len = rng.range(0, 6) * 4;
    let mut tcp = Tcp::syn(rng.next_u64() as u16, dport, rng.next_u64() as u32).flags(flags);
    tcp = tcp.options(&LINUX_SYN_OPTIONS[..opts_len.min(20)]);
    let payload_len = rng.range(0, 20);
    let mut payload = vec![0u8; payload_len];
    rng.fill(&mut payload);
    tcp = tcp.payload(&payload);
    let ipv4 = match kind {
        1 => true,
        2 => false,
        _ => rng.chance(1, 2),
    };
    let mut b = if ipv4 {
        let src = sources[rng.range(0, sources.len())];
        let mut b = FrameBuilder::ipv4(src, server4());
        if rng.chance(1, 4) {
            b = b.ip_options(&IPV4_ROUTER_ALERT);
        }
        if rng.chance(1, 10) {
            b = b.ipv4_fragment(rng.chance(1, 2), rng.range(0, 3) as u16);
        }
        b
    } else {
        let mut a = client6().octets();
        a[15] = rng.next_u64() as u8;
        a[7] = rng.range(0, 3) as u8;
        let mut b = FrameBuilder::ipv6(Ipv6Addr::from(a), server6());
        if rng.chance(1, 4) {
            b = b.ext(Ext::HopByHop);
        }
        if rng.chance(1, 10) {
            b = b.ext(Ext::Fragment {
                offset: 0,
                more: true,
                id: 1,
            });
        }
        b
    };
    if rng.chance(1, 4) {
        b = b.vlan(rng.range(0, 4096) as u16);
    }
    let valid = b.tcp(tcp).build();
    let n = valid.len().min(len);
    f[..n].copy_from_slice(&valid[..n]);
    if rng.chance(1, 3) {
        for _ in 0..rng.range(1, 4) {
            let i = rng.range(0, len);
            f[i] ^= 1 << rng.range(0, 8);
        }
    }
    f
}

#[test]
fn garbage_frames_are_never_aborted_and_only_syns_are_refused() {
    if !ws_guard_tests::privileged("garbage_frames_are_never_aborted_and_only_syns_are_refused") {
        return;
    }
    let mut g = guard(
        limits(2, ACTION_REJECT, 6, ACTION_DROP, 100 * SECOND),
        GlobalConfig::default(),
    );
    let sources: Vec<Ipv4Addr> = (1..=4).map(client4).collect();
    let mut rng = Rng::new(0x5eed_0f9a_7ba6_e001);
    let (mut judged, mut refused, mut sent_rst) = (0, 0, 0);
    for i in 0..2000 {
        let f = garbage_frame(&mut rng, &sources);
        let before = g.counters().unwrap();
        let (v, out) = run(&mut g, &f);
        assert_ne!(v, XDP_ABORTED, "frame {i}: {f:02x?}");
        let parsed = parse::parse(&f[..]);
        let syn_to_port = match parsed {
            Parsed::Tcp(seg) => seg.dport == PORT && seg.is_new_attempt(),
            _ => false,
        };
        // What the program counts follows from what the shared parser says, after its
        // shortcut for traffic to unprotected ports.
        let shortcut = match parse::quick(&f[..]) {
            parse::Quick::NotTcp => true,
            parse::Quick::Tcp { dport } => dport != PORT,
            parse::Quick::Unknown => false,
        };
        let want: Vec<(Counter, u64)> = match parsed {
            _ if shortcut => vec![(Counter::NotProtected, 1)],
            Parsed::NotIp | Parsed::NotTcp => vec![(Counter::NotProtected, 1)],
            Parsed::Fragment | Parsed::TcpFirstFragment { .. } => vec![(Counter::Fragments, 1)],
            Parsed::Malformed => vec![(Counter::Malformed, 1)],
            Parsed::Tcp(seg) if seg.dport != PORT => vec![(Counter::NotProtected, 1)],
            Parsed::Tcp(_) if !syn_to_port => vec![(Counter::ProtectedOther, 1)],
            Parsed::Tcp(_) => Vec::new(),
        };
        // Besides SYNs, only first fragments of TCP segments to the port are refused (dropped).
        let first_fragment_to_port =
            matches!(parsed, Parsed::TcpFirstFragment { dport, .. } if dport == PORT);
        if !syn_to_port {
            let verdict = if first_fragment_to_port {
                XDP_DROP
            } else {
                XDP_PASS
            };
            assert_eq!(v, verdict, "frame {i} ({parsed:?}): {f:02x?}");
            assert_eq!(out, f, "frame {i}: untouched");
            assert_deltas(&g, &before, &want);
            continue;
        }
        judged += 1;
        let Parsed::Tcp(seg) = parsed else {
            unreachable!()
        };
        let after = g.counters().unwrap();
        let d = |c| after.get(c) - before.get(c);
        assert_eq!(
            Counter::FRAME_OUTCOMES.iter().map(|&c| d(c)).sum::<u64>(),
            1,
            "frame {i}: one outcome"
        );
        match v {
            XDP_PASS => {
                assert_eq!(out, f, "frame {i}: passed untouched");
                assert_eq!(
                    d(Counter::Admitted) + d(Counter::SynRetransmits),
                    1,
                    "frame {i}"
                );
            }
            XDP_DROP => {
                refused += 1;
                assert_eq!(
                    d(Counter::RateLimited) + d(Counter::RejectAsDrop),
                    1,
                    "frame {i}"
                );
            }
            XDP_TX => {
                refused += 1;
                sent_rst += 1;
                assert_eq!(d(Counter::ConnLimited), 1, "frame {i}");
                assert_eq!(d(Counter::RstSent), 1, "frame {i}");
                assert_eq!(out.len(), seg.l4 + 20, "frame {i}: reply length");
                // The reply is a RST+ACK to the SYN's sender.
                assert_eq!(&out[..6], &f[6..12]);
                assert_eq!(out[seg.l4 + 13], TCP_RST | TCP_ACK);
            }
            other => panic!("frame {i}: verdict {other}"),
        }
    }
    // The generator must have exercised the judged paths, not only the parser.
    assert!(judged > 200, "only {judged} SYNs to the protected port");
    assert!(
        refused > 50 && sent_rst > 10,
        "refused {refused}, RSTs {sent_rst}"
    );
}
