//! Metrics: the kernel's counters split by protected port and address family, the Prometheus
//! exposition of the running daemon (checked by `promtool check metrics`), and an end-to-end
//! run in which a real Prometheus server scrapes the daemon while traffic crosses the limits.

use std::net::{Ipv4Addr, Ipv6Addr};

use ws_guard::{
    config::Config,
    guard::{Guard, LoadOptions},
};
use ws_guard_common::maps::{AF_INET, AF_INET6, Counter};
use ws_guard_tests::{
    frames::{FrameBuilder, LINUX_SYN_OPTIONS, TCP_ACK, Tcp},
    privileged,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

fn client4() -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 7)
}
fn server4() -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, 1)
}
fn client6() -> Ipv6Addr {
    "2001:2::7".parse().unwrap()
}
fn server6() -> Ipv6Addr {
    "2001:2:0:ff::1".parse().unwrap()
}

fn syn4(sport: u16, dport: u16) -> Vec<u8> {
    FrameBuilder::ipv4(client4(), server4())
        .tcp(Tcp::syn(sport, dport, 1000).options(&LINUX_SYN_OPTIONS))
        .build()
}
fn syn6(sport: u16, dport: u16) -> Vec<u8> {
    FrameBuilder::ipv6(client6(), server6())
        .tcp(Tcp::syn(sport, dport, 1000).options(&LINUX_SYN_OPTIONS))
        .build()
}

fn config(ports: &str) -> Config {
    Config::parse(
        &format!("[capacity]\nsources = 1024\nflows = 4096\n{ports}"),
        "test config",
    )
    .expect("test config")
}

fn run(g: &mut Guard, frame: &[u8], want: u32) {
    let (v, _) = g.run_xdp(frame).expect("BPF_PROG_TEST_RUN");
    assert_eq!(v, want, "verdict for {frame:02x?}");
}

/// A counter array with the given non-zero entries.
fn counts(entries: &[(Counter, u64)]) -> [u64; Counter::COUNT as usize] {
    let mut out = [0; Counter::COUNT as usize];
    for (c, n) in entries {
        out[*c as usize] += n;
    }
    out
}

#[test]
fn counters_are_split_by_port_and_family() {
    if !privileged("counters_are_split_by_port_and_family") {
        return;
    }
    let mut g = Guard::load(&LoadOptions {
        sources: 1024,
        flows: 4096,
        kernel_log_level: 0,
    })
    .expect("load");
    g.apply(&config(
        "[[port]]\nport = 9301\nmax_connections = 1\nconnection_action = \"reject\"\n\
         [[port]]\nport = 9302\nmax_connections = 1\nconnection_action = \"drop\"\n",
    ))
    .expect("apply");

    // 9301: IPv4 one admitted, two rejected with a RST, one ACK; IPv6 one admitted.
    run(&mut g, &syn4(40000, 9301), XDP_PASS);
    run(&mut g, &syn4(40001, 9301), XDP_TX);
    run(&mut g, &syn4(40002, 9301), XDP_TX);
    let ack = FrameBuilder::ipv4(client4(), server4())
        .tcp(Tcp::with_flags(40000, 9301, 1001, TCP_ACK))
        .build();
    run(&mut g, &ack, XDP_PASS);
    run(&mut g, &syn6(40000, 9301), XDP_PASS);
    // 9302: IPv6 one admitted, one retransmitted, three dropped.
    run(&mut g, &syn6(41000, 9302), XDP_PASS);
    run(&mut g, &syn6(41000, 9302), XDP_PASS);
    for sport in 41001..41004 {
        run(&mut g, &syn6(sport, 9302), XDP_DROP);
    }
    // Not tied to a protected port: an unprotected port, UDP, a non-first fragment.
    run(&mut g, &syn4(40000, 9303), XDP_PASS);
    let udp = FrameBuilder::ipv4(client4(), server4())
        .udp(5000, 9301, b"x")
        .build();
    run(&mut g, &udp, XDP_PASS);
    let frag = FrameBuilder::ipv4(client4(), server4())
        .ipv4_fragment(false, 64)
        .udp(5000, 9301, b"x")
        .build();
    run(&mut g, &frag, XDP_PASS);

    let s = g.stats().expect("stats");
    let want = [
        (
            (9301, AF_INET),
            counts(&[
                (Counter::Admitted, 1),
                (Counter::ConnLimited, 2),
                (Counter::RstSent, 2),
                (Counter::ProtectedOther, 1),
            ]),
        ),
        ((9301, AF_INET6), counts(&[(Counter::Admitted, 1)])),
        ((9302, AF_INET), counts(&[])),
        (
            (9302, AF_INET6),
            counts(&[
                (Counter::Admitted, 1),
                (Counter::SynRetransmits, 1),
                (Counter::ConnLimited, 3),
            ]),
        ),
    ];
    assert_eq!(s.ports, want.into_iter().collect(), "per port and family");
    assert_eq!(
        s.unattributed,
        counts(&[(Counter::NotProtected, 2), (Counter::Fragments, 1)]),
        "unattributed"
    );
    let totals = g.counters().expect("counters");
    assert_eq!(totals.get(Counter::ConnLimited), 5);
    assert_eq!(totals.get(Counter::Admitted), 3);

    // 9301 stops being protected and 9304 starts: 9304 gets the freed bucket, empty; 9302
    // keeps its own and its counts; the totals keep everything.
    g.apply(&config(
        "[[port]]\nport = 9302\nmax_connections = 1\n[[port]]\nport = 9304\n",
    ))
    .expect("re-apply");
    let s2 = g.stats().expect("stats");
    assert_eq!(s2.ports.len(), 4, "{:?}", s2.ports.keys());
    assert_eq!(s2.ports[&(9302, AF_INET6)], s.ports[&(9302, AF_INET6)]);
    assert_eq!(s2.ports[&(9304, AF_INET)], counts(&[]));
    assert_eq!(s2.ports[&(9304, AF_INET6)], counts(&[]));
    assert_eq!(g.counters().expect("counters"), totals);
    run(&mut g, &syn4(40100, 9304), XDP_PASS);
    run(&mut g, &syn4(40100, 9301), XDP_PASS);
    let s3 = g.stats().expect("stats");
    assert_eq!(
        s3.ports[&(9304, AF_INET)],
        counts(&[(Counter::Admitted, 1)])
    );
    assert_eq!(
        s3.unattributed,
        counts(&[(Counter::NotProtected, 3), (Counter::Fragments, 1)])
    );
    assert_eq!(g.counters().expect("counters").get(Counter::Admitted), 4);
}
