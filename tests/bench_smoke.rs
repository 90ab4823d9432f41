//! The benchmark's smoke mode, so `cargo xtask bench` cannot rot: the same code as the real
//! benchmark with tiny counts, and checks that what it measures and prints is sane. Also checks
//! the flood generator's frames byte by byte (valid checksums, the fields it varies in range).

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use etherparse::{NetHeaders, PacketHeaders, TransportHeader};
use ws_guard_tests::{
    bench::{
        Machine,
        bpf::{self, GenMode, RawProgram, SourceCounts, TestRun, XDP_DROP, XDP_PASS, XDP_TX},
        layer1, layer2, report,
    },
    frames::{FrameBuilder, Tcp},
};

fn results(layer1: Option<layer1::Report>, layer2: Option<layer2::Report>) -> report::Results {
    report::Results {
        machine: Machine::detect(),
        mode: "smoke",
        layer1,
        layer2,
        skipped: report::not_measured(),
        seconds: 1.0,
    }
}

/// Markdown, JSON and PNG come out, and mention every measurement.
fn check_outputs(r: &report::Results, labels: &[String]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = report::write_all(r, dir.path()).expect("writing the outputs");
    let md = std::fs::read_to_string(dir.path().join("bench.md")).expect("bench.md");
    for l in labels {
        assert!(md.contains(l.as_str()), "bench.md lacks {l:?}:\n{md}");
    }
    assert!(md.contains("Not measured:"), "{md}");
    let js: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("bench.json")).unwrap())
            .expect("bench.json parses");
    assert_eq!(js["mode"], "smoke");
    assert!(js["machine"]["cpus"].as_u64().unwrap() >= 1);
    let pngs: Vec<_> = files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "png"))
        .collect();
    assert!(!pngs.is_empty(), "no chart written");
    for p in pngs {
        let bytes = std::fs::read(p).unwrap();
        assert!(
            bytes.len() > 5_000 && bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{} is not a plausible PNG ({} bytes)",
            p.display(),
            bytes.len()
        );
    }
}

#[test]
fn layer1_smoke_measures_every_scenario() {
    if !ws_guard_tests::privileged("layer1_smoke_measures_every_scenario") {
        return;
    }
    let r = layer1::run(&layer1::Options::smoke(), &mut |s| eprintln!("{s}")).expect("layer 1");
    let ids: Vec<&str> = r.measurements.iter().map(|m| m.id).collect();
    for want in [
        "floor",
        "syn_retransmit_v4",
        "syn_rate_limited_v4",
        "syn_conn_limited_v4",
        "ack_protected_v4",
        "syn_unprotected_v4",
        "syn_retransmit_v6",
        "syn_rate_limited_v6",
        "non_ip",
        "truncated",
        "floor_tail",
        "syn_admitted_v4",
        "syn_admitted_v6",
        "syn_admitted_v4_no_rate",
        "syn_conn_limited_v4_new_tuple",
        "syn_rate_limited_v4_new_tuple",
        "floor_single",
        "syn_admitted_v4_single",
        "syn_conn_limited_reject_v4",
    ] {
        assert!(ids.contains(&want), "scenario {want} missing: {ids:?}");
    }
    for m in &r.measurements {
        assert!(
            m.ns_per_packet.is_finite() && m.ns_per_packet > 0.0 && m.ns_per_packet < 1e6,
            "{}: {} ns/packet",
            m.id,
            m.ns_per_packet
        );
        assert!(
            m.low_ns <= m.ns_per_packet && m.ns_per_packet <= m.high_ns,
            "{m:?}"
        );
        assert!(m.runs > 0, "{m:?}");
        if m.is_floor {
            assert_eq!(m.overhead_ns, 0.0, "{m:?}");
        }
        assert!(m.overhead_ns.is_finite(), "{m:?}");
    }
    // Every method has its floor, and the admitted SYN costs more than the empty program.
    for method in [
        layer1::Method::Repeat,
        layer1::Method::Tail,
        layer1::Method::Single,
    ] {
        assert_eq!(
            r.measurements
                .iter()
                .filter(|m| m.method == method && m.is_floor)
                .count(),
            1,
            "{method:?}"
        );
    }
    let admitted = r
        .measurements
        .iter()
        .find(|m| m.id == "syn_admitted_v4")
        .unwrap();
    assert!(admitted.overhead_ns > 0.0, "{admitted:?}");
    assert!(admitted.target.is_some() && admitted.met().is_some());
    let unprotected = r
        .measurements
        .iter()
        .find(|m| m.id == "syn_unprotected_v4")
        .unwrap();
    assert!(unprotected.target.is_some());
    // The work per path: every budgeted path counted, each within its budget (a regression of
    // the data path's work fails here, whatever the machine's speed), and the counts are real
    // (the refusal looks the source up, the admission inserts).
    let work: Vec<&str> = r.work.iter().map(|w| w.id).collect();
    for want in [
        "syn_unprotected_v4",
        "syn_retransmit_v4",
        "syn_admitted_v4",
        "syn_admitted_v6",
        "syn_conn_limited_v4_new_tuple",
        "syn_rate_limited_v4_new_tuple",
    ] {
        assert!(work.contains(&want), "no work counted for {want}: {work:?}");
    }
    for w in &r.work {
        assert!(w.within_budget(), "over its budget: {w:?}");
        assert!(
            w.lookups >= w.budget.lookups - 0.01,
            "too few lookups counted: {w:?}"
        );
        assert!(
            w.inserts >= w.budget.inserts - 0.01,
            "too few inserts counted: {w:?}"
        );
    }

    let labels: Vec<String> = r.measurements.iter().map(|m| m.label.to_owned()).collect();
    check_outputs(&results(Some(r), None), &labels);
}

/// The generator's frames: both checksums valid, the varied fields in their ranges, and they
/// do vary.
#[test]
fn flood_generator_writes_valid_varied_syns() {
    if !ws_guard_tests::privileged("flood_generator_writes_valid_varied_syns") {
        return;
    }
    for (scenario, mode) in [
        (layer2::Scenario::OneSource, GenMode::OneSourceV4),
        (layer2::Scenario::Random65k, GenMode::RandomV4x16),
        (layer2::Scenario::Random1M, GenMode::RandomV6x20),
    ] {
        let template = layer2::template(scenario);
        for (at, want) in bpf::generator_template_words(mode) {
            assert_eq!(
                u16::from_be_bytes([template[at], template[at + 1]]),
                want,
                "{mode:?}: template word at {at}"
            );
        }
        let prog = RawProgram::load_xdp("wsgb_gen_test", &bpf::generator_program(mode, &template))
            .expect("loading the generator");
        let mut sources = HashSet::new();
        let mut ports = HashSet::new();
        for _ in 0..300 {
            let mut out = vec![0u8; template.len() + 64];
            let r = bpf::test_run(
                prog.fd(),
                TestRun {
                    data_in: &template,
                    data_out: Some(&mut out),
                    repeat: 1,
                    live: None,
                },
            )
            .expect("running the generator");
            assert_eq!(r.retval, XDP_TX, "{mode:?}");
            out.truncate(r.data_size_out as usize);
            assert_eq!(out.len(), template.len());
            let p = PacketHeaders::from_ethernet_slice(&out).expect("parses");
            let Some(TransportHeader::Tcp(tcp)) = p.transport else {
                panic!("{mode:?}: not TCP")
            };
            assert!(tcp.syn && !tcp.ack && !tcp.rst && !tcp.fin, "{mode:?}");
            assert_eq!(tcp.destination_port, layer2::PORT);
            assert!(tcp.source_port >= 32768, "{mode:?}: {}", tcp.source_port);
            ports.insert(tcp.source_port);
            let payload = p.payload.slice();
            let src: IpAddr = match p.net {
                Some(NetHeaders::Ipv4(ip, _)) => {
                    assert_eq!(
                        ip.header_checksum,
                        ip.calc_header_checksum(),
                        "{mode:?}: IPv4 header checksum"
                    );
                    assert_eq!(
                        tcp.checksum,
                        tcp.calc_checksum_ipv4(&ip, payload).unwrap(),
                        "{mode:?}: TCP checksum"
                    );
                    IpAddr::V4(Ipv4Addr::from(ip.source))
                }
                Some(NetHeaders::Ipv6(ip, _)) => {
                    assert_eq!(
                        tcp.checksum,
                        tcp.calc_checksum_ipv6(&ip, payload).unwrap(),
                        "{mode:?}: TCP checksum"
                    );
                    IpAddr::V6(Ipv6Addr::from(ip.source))
                }
                _ => panic!("{mode:?}: not IP"),
            };
            match (mode, src) {
                (GenMode::OneSourceV4, IpAddr::V4(a)) => {
                    assert_eq!(a, Ipv4Addr::new(198, 19, 0, 1))
                }
                (GenMode::RandomV4x16, IpAddr::V4(a)) => {
                    assert_eq!(&a.octets()[..2], &[198, 19], "{a}")
                }
                (GenMode::RandomV6x20, IpAddr::V6(a)) => {
                    let s = a.segments();
                    assert_eq!(&s[..6], &[0x2001, 2, 0, 1, 0, 0], "{a}");
                    assert!(s[6] <= 0xf, "{a}: only 20 bits vary");
                }
                other => panic!("unexpected {other:?}"),
            }
            sources.insert(src);
        }
        assert!(ports.len() > 250, "{mode:?}: source ports do not vary");
        match mode {
            GenMode::OneSourceV4 => assert_eq!(sources.len(), 1),
            _ => assert!(sources.len() > 250, "{mode:?}: sources do not vary"),
        }
    }
}

/// `prog`'s verdict on `frame`, run once.
fn run_once(prog: &RawProgram, frame: &[u8]) -> u32 {
    bpf::test_run(
        prog.fd(),
        TestRun {
            data_in: frame,
            data_out: None,
            repeat: 1,
            live: None,
        },
    )
    .expect("running a raw program")
    .retval
}

/// The generator side's sink drops the flood's replies and passes what the legitimate clients
/// need (their replies, ARP).
#[test]
fn sink_passes_clients_and_drops_flood_replies() {
    if !ws_guard_tests::privileged("sink_passes_clients_and_drops_flood_replies") {
        return;
    }
    let prog = RawProgram::load_xdp("wsgb_sink_test", &bpf::sink_program()).expect("loading");
    let srv4 = Ipv4Addr::new(198, 18, 0, 1);
    let srv6 = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
    let synack = || Tcp::with_flags(layer2::PORT, 40000, 1, 0x12);
    for (what, frame, want) in [
        (
            "SYN-ACK to a client",
            FrameBuilder::ipv4(srv4, Ipv4Addr::new(198, 18, 0, 64))
                .tcp(synack())
                .build(),
            XDP_PASS,
        ),
        (
            "SYN-ACK to the generator's address",
            FrameBuilder::ipv4(srv4, Ipv4Addr::new(198, 18, 0, 2))
                .tcp(synack())
                .build(),
            XDP_PASS,
        ),
        (
            "ARP request",
            FrameBuilder::arp_request(srv4, Ipv4Addr::new(198, 18, 0, 2)).build(),
            XDP_PASS,
        ),
        (
            "SYN-ACK to the one-source flood",
            FrameBuilder::ipv4(srv4, Ipv4Addr::new(198, 19, 0, 1))
                .tcp(synack())
                .build(),
            XDP_DROP,
        ),
        (
            "RST to a random flood source",
            FrameBuilder::ipv4(srv4, Ipv4Addr::new(198, 19, 77, 9))
                .tcp(Tcp::with_flags(layer2::PORT, 40000, 0, 0x14))
                .build(),
            XDP_DROP,
        ),
        (
            "IPv6 SYN-ACK to a flood source",
            FrameBuilder::ipv6(srv6, Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 3, 7))
                .tcp(synack())
                .build(),
            XDP_DROP,
        ),
    ] {
        assert_eq!(run_once(&prog, &frame), want, "{what}");
    }
}

#[test]
fn reflector_answers_every_frame_and_the_sink_drops_the_flood_replies() {
    if !ws_guard_tests::privileged(
        "reflector_answers_every_frame_and_the_sink_drops_the_flood_replies",
    ) {
        return;
    }
    let tx = RawProgram::load_xdp("wsgb_tx_test", &bpf::tx_program()).expect("loading");
    let sink = RawProgram::load_xdp("wsgb_sink_test", &bpf::sink_program()).expect("loading");
    let srv4 = Ipv4Addr::new(198, 18, 0, 1);
    let srv6 = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
    let syn = || Tcp::with_flags(40000, layer2::PORT, 1, 0x02);
    for (what, frame, swapped) in [
        (
            "SYN of the 65k flood",
            FrameBuilder::ipv4(Ipv4Addr::new(198, 19, 77, 9), srv4)
                .tcp(syn())
                .build(),
            Some(
                FrameBuilder::ipv4(srv4, Ipv4Addr::new(198, 19, 77, 9))
                    .tcp(syn())
                    .build(),
            ),
        ),
        (
            "SYN of the 1M flood",
            FrameBuilder::ipv6(Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 3, 7), srv6)
                .tcp(syn())
                .build(),
            None,
        ),
    ] {
        let mut out = vec![0u8; frame.len()];
        let r = bpf::test_run(
            tx.fd(),
            TestRun {
                data_in: &frame,
                data_out: Some(&mut out),
                repeat: 1,
                live: None,
            },
        )
        .expect("running the reflector");
        assert_eq!(r.retval, XDP_TX, "{what}");
        // IPv4: the addresses swapped (the checksum is the same); IPv6 reflected as it came.
        assert_eq!(out, swapped.unwrap_or_else(|| frame.clone()), "{what}");
        assert_eq!(
            run_once(&sink, &out),
            XDP_DROP,
            "{what}: the reflected frame reaches the sink's drop"
        );
    }
}

#[test]
fn parse_ceiling_drops_tcp_to_the_port_and_passes_the_rest() {
    if !ws_guard_tests::privileged("parse_ceiling_drops_tcp_to_the_port_and_passes_the_rest") {
        return;
    }
    let prog = RawProgram::load_xdp("wsgb_parse_test", &bpf::parse_drop_program(layer2::PORT))
        .expect("loading");
    let srv4 = Ipv4Addr::new(198, 18, 0, 1);
    let src4 = Ipv4Addr::new(198, 19, 0, 1);
    let srv6 = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
    let src6 = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 3, 7);
    let syn = |dport| Tcp::with_flags(40000, dport, 1, 0x02);
    for (what, frame, want) in [
        (
            "IPv4 SYN to the port",
            FrameBuilder::ipv4(src4, srv4)
                .tcp(syn(layer2::PORT))
                .build(),
            XDP_DROP,
        ),
        (
            "IPv6 SYN to the port",
            FrameBuilder::ipv6(src6, srv6)
                .tcp(syn(layer2::PORT))
                .build(),
            XDP_DROP,
        ),
        (
            "IPv4 SYN to another port",
            FrameBuilder::ipv4(src4, srv4).tcp(syn(22)).build(),
            XDP_PASS,
        ),
        (
            "IPv6 SYN to another port",
            FrameBuilder::ipv6(src6, srv6).tcp(syn(9001)).build(),
            XDP_PASS,
        ),
        (
            "UDP to the port",
            FrameBuilder::ipv4(src4, srv4)
                .udp(40000, layer2::PORT, b"x")
                .build(),
            XDP_PASS,
        ),
        (
            "ARP request",
            FrameBuilder::arp_request(srv4, Ipv4Addr::new(198, 18, 0, 2)).build(),
            XDP_PASS,
        ),
    ] {
        assert_eq!(run_once(&prog, &frame), want, "{what}");
    }
}

/// The minimal limiter passes an address's first `MINIMAL_LIMIT` attempts to the port and drops
/// the rest, counting each address (IPv4 and IPv6) apart; other traffic passes uncounted.
#[test]
fn minimal_limiter_counts_each_source_and_drops_past_its_limit() {
    if !ws_guard_tests::privileged("minimal_limiter_counts_each_source_and_drops_past_its_limit") {
        return;
    }
    let counts = SourceCounts::new(64).expect("creating the map");
    let prog = RawProgram::load_xdp(
        "wsgb_lru_test",
        &bpf::minimal_limiter_program(layer2::PORT, &counts),
    )
    .expect("loading");
    let srv4 = Ipv4Addr::new(198, 18, 0, 1);
    let srv6 = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
    let syn = |dport| Tcp::with_flags(40000, dport, 1, 0x02);
    let v4 = |last| {
        FrameBuilder::ipv4(Ipv4Addr::new(198, 19, 0, last), srv4)
            .tcp(syn(layer2::PORT))
            .build()
    };
    // Two IPv6 sources that differ only in their last byte: the whole address is the key.
    let v6 = |last| {
        FrameBuilder::ipv6(Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 3, last), srv6)
            .tcp(syn(layer2::PORT))
            .build()
    };
    let limit = bpf::MINIMAL_LIMIT as usize;
    for (what, frame) in [("IPv4", v4(1)), ("IPv6", v6(7))] {
        for n in 1..=limit + 2 {
            let want = if n <= limit { XDP_PASS } else { XDP_DROP };
            assert_eq!(run_once(&prog, &frame), want, "{what} attempt {n}");
        }
    }
    for (what, frame) in [("IPv4", v4(2)), ("IPv6", v6(8))] {
        assert_eq!(run_once(&prog, &frame), XDP_PASS, "another {what} source");
    }
    let other = FrameBuilder::ipv4(Ipv4Addr::new(198, 19, 0, 1), srv4)
        .tcp(syn(22))
        .build();
    let udp = FrameBuilder::ipv4(Ipv4Addr::new(198, 19, 0, 1), srv4)
        .udp(40000, layer2::PORT, b"x")
        .build();
    for (what, frame) in [("TCP to another port", other), ("UDP to the port", udp)] {
        for _ in 0..limit + 2 {
            assert_eq!(run_once(&prog, &frame), XDP_PASS, "{what}");
        }
    }
}

#[test]
fn layer2_smoke_floods_every_filter() {
    if !ws_guard_tests::privileged("layer2_smoke_floods_every_filter") {
        return;
    }
    let opts = layer2::Options::smoke();
    let r = layer2::run(&opts, &mut |s| eprintln!("{s}")).expect("layer 2");
    assert_eq!(
        r.measurements.len(),
        opts.scenarios.len() * opts.filters.len()
    );
    for m in &r.measurements {
        assert!(m.offered > 0 && m.seconds > 0.0, "{m:?}");
        // The receiver took frames off its ring, and no more than were sent (plus the odd
        // neighbour or router solicitation).
        assert!(
            m.processed > 0,
            "{}: nothing reached the receiver",
            m.filter
        );
        assert!(
            m.processed <= m.offered + 100,
            "{}: {} processed of {} sent",
            m.filter,
            m.processed,
            m.offered
        );
        let xdp = matches!(
            m.filter_id,
            "xdp_pass"
                | "xdp_drop"
                | "xdp_tx"
                | "xdp_parse_drop"
                | "xdp_lru_limit"
                | "ws_guard"
                | "ws_guard_drop"
                | "ws_guard_cookies"
        );
        assert_eq!(m.program_ns.is_some(), xdp, "{m:?}");
        if let Some(ns) = m.program_ns {
            assert!(ns > 0.0 && ns.is_finite(), "{m:?}");
        }
        // The receiving CPU's time, for every filter: ticks were counted, some of them ours
        // when the interval is long enough to see any (/proc/stat counts 10 ms ticks, and a
        // smoke flood into XDP_DROP can be over in 30 ms).
        let cpu = m.cpu.as_ref().expect("CPU time measured");
        assert!(cpu.ticks > 0, "{m:?}");
        let ns = cpu.system_ns + cpu.softirq_ns;
        assert!(ns >= 0.0 && ns.is_finite() && ns < 1e7, "{m:?}");
        if cpu.ticks >= 20 {
            assert!(ns > 0.0, "{m:?}");
        }
        assert!((0.0..=1.0).contains(&cpu.busy_share), "{m:?}");
        // Legitimate clients: cookies on, then off, where asked for; every attempt accounted.
        let scenario = layer2::Scenario::ALL
            .into_iter()
            .find(|s| s.id() == m.scenario_id)
            .unwrap();
        let filter = layer2::Filter::ALL
            .into_iter()
            .find(|f| f.id() == m.filter_id)
            .unwrap();
        if !(opts.client_scenarios.contains(&scenario) && opts.client_filters.contains(&filter)) {
            assert!(m.clients.is_empty(), "{m:?}");
            continue;
        }
        assert_eq!(m.clients.len(), 2, "{m:?}");
        for (c, cookies) in m.clients.iter().zip([true, false]) {
            assert_eq!(c.syn_cookies, cookies, "{c:?}");
            assert_eq!(c.syncookies_sysctl, u32::from(cookies), "{c:?}");
            assert_eq!(c.backlog, layer2::BACKLOG);
            assert!(c.max_syn_backlog > 0, "{c:?}");
            assert_eq!(
                c.attempts,
                opts.clients.addresses as u32 * opts.clients.attempts,
                "{c:?}"
            );
            assert_eq!(
                c.succeeded + c.timed_out + c.refused + c.other_failures,
                c.attempts,
                "{c:?}"
            );
            assert!(c.flood_mpps > 0.0 && c.seconds > 0.0, "{c:?}");
            assert!(c.syn_retransmitted <= c.succeeded, "{c:?}");
            // A connection that waited past the client's first SYN retransmission (1 s) had
            // its SYN retransmitted.
            if c.max_ms > 1000.0 {
                assert!(c.syn_retransmitted > 0, "{c:?}");
            }
            if c.succeeded > 0 {
                assert!(
                    0.0 < c.p50_ms && c.p50_ms <= c.p99_ms && c.p99_ms <= c.max_ms,
                    "{c:?}"
                );
                assert!(
                    c.max_ms <= opts.clients.timeout.as_secs_f64() * 1e3 + 50.0,
                    "{c:?}"
                );
            } else {
                assert!(c.p50_ms.is_nan() && c.p99_ms.is_nan(), "{c:?}");
            }
            // With SYN cookies every filter admits clients under its limits: the sink passed
            // their replies, the server echoed their byte.
            if cookies {
                assert!(
                    c.succeeded > 0,
                    "{}: no client connected during the flood: {c:?}",
                    m.filter
                );
            }
        }
    }
    // ws-guard in cookie mode answered the one-source flood with cookies and stored nothing.
    let m = r
        .measurements
        .iter()
        .find(|m| m.filter_id == "ws_guard_cookies")
        .expect("the cookie-mode cell");
    let cookies = m
        .verdict_counts
        .iter()
        .find(|(n, _)| *n == "cookies_sent")
        .map_or(0, |(_, v)| *v);
    assert!(cookies * 100 >= m.processed * 99, "{m:?}");
    let (before, after) = m.map_entries.as_ref().expect("map entries measured");
    assert_eq!(before, after, "{m:?}");
    // The rule-based filters: each rule's counter read, and the one-source flood refused by
    // the connection limit (the first rule), as ws-guard refuses it.
    for (id, rules) in [
        (
            "iptables",
            &["connlimit_reject", "recent_set", "recent_drop"][..],
        ),
        (
            "iptables_hashlimit",
            &["connlimit_reject", "hashlimit_drop"][..],
        ),
        ("nftables", &["ct_count_reject", "meter_drop"][..]),
    ] {
        let m = r
            .measurements
            .iter()
            .find(|m| m.filter_id == id)
            .unwrap_or_else(|| panic!("{id} not measured"));
        let names: Vec<&str> = m.verdict_counts.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, rules, "{id}: {}", m.verdicts);
        let refused = m.verdict_counts[0].1;
        assert!(
            refused * 100 >= m.processed * 90,
            "{id}: {refused} of {} refused at the limit: {}",
            m.processed,
            m.verdicts
        );
    }
    // ws-guard saw the one-source flood for what it is: a few admitted, the rest refused at
    // the concurrency limit (RSTs with reject, silently with drop).
    for (id, rst) in [("ws_guard", true), ("ws_guard_drop", false)] {
        let w = r
            .measurements
            .iter()
            .find(|m| m.filter_id == id)
            .expect("ws-guard measured");
        let get = |name: &str| {
            w.verdict_counts
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| *v)
                .unwrap_or(0)
        };
        let refused = get("conn_limited");
        assert!(
            refused * 100 >= w.processed * 99,
            "{id}: {refused} of {} refused at the limit: {}",
            w.processed,
            w.verdicts
        );
        assert_eq!(get("rst_sent") == refused, rst, "{id}: {}", w.verdicts);
        let mm = w.map_memory.as_ref().expect("map memory");
        assert!(mm.total_bytes > 0 && mm.bytes_per_source > 0.0, "{mm:?}");
    }
    let lines = r.target_lines();
    assert!(
        lines.iter().any(|l| l.contains("of the XDP_DROP ceiling")),
        "{lines:?}"
    );
    for cookies in ["SYN cookies on", "SYN cookies off"] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("Legitimate clients") && l.contains(cookies)),
            "{lines:?}"
        );
    }
    let md = report::clients_table(&r);
    assert_eq!(
        md.lines().count(),
        2 + 2 * opts.client_filters.len() * opts.client_scenarios.len(),
        "{md}"
    );
    let js = r.to_json();
    // CPU time is sampled in 10 ms ticks and a smoke cell can be shorter than one, so a single
    // cell may see none; every cell must report a sane figure, and the run as a whole some time.
    let cpu: Vec<f64> = js["measurements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let ns = m["cpu"]["ns_per_packet"].as_f64().unwrap();
            assert!(ns.is_finite() && ns >= 0.0, "{m}");
            ns
        })
        .collect();
    assert!(
        cpu.iter().any(|ns| *ns > 0.0),
        "no cell saw CPU time: {cpu:?}"
    );
    let mut labels: Vec<String> = r.measurements.iter().map(|m| m.filter.to_owned()).collect();
    labels.push("Legitimate clients during the floods".into());
    labels.push("CPU ns/packet (softirq)".into());
    check_outputs(&results(None, Some(r)), &labels);
}
