//! Layer 2: how many SYNs per second a receiver gets through under a flood, with ws-guard and
//! with its peers, through a veth pair between two namespaces of our own.
//!
//! ```text
//!  wsgb-<pid>-<n>-gen                                     wsgb-<pid>-<n>-srv
//!  wsgbg  198.18.0.2/24, 2001:2::2/64   <--- veth --->    wsgbs  198.18.0.1/24, 2001:2::1/64
//!  XDP_DROP sink (eats the replies)                       the filter under test; a listener on
//!  generator: BPF_PROG_TEST_RUN, live frames,             [::]:9000 (SYN cookies on, the default);
//!  ingress_ifindex = wsgbg, XDP_TX                        routes to the flood sources via
//!                                                         198.18.0.2 / 2001:2::2 (permanent
//!                                                         neighbours: no ARP/ND per source)
//! ```
//!
//! The generator (see [`super::bpf::generator_program`]) runs in a thread pinned to one CPU;
//! each frame it sends goes into the receiving veth's ring, and the receiver's NAPI runs on the
//! same CPU in softirq when the generator flushes a batch. So the figure is what one CPU does
//! generating *and* receiving: every filter is measured that way, in the same run, and the
//! XDP_DROP-everything receiver is the ceiling. A fresh pair of namespaces per measurement keeps
//! conntrack, xt_recent lists and neighbour entries from leaking from one into the next.
//!
//! Per measurement: `offered` = frames the generator sent, `processed` = frames the receiving
//! veth took off its ring (its rx_packets), both over the same wall time; then, for XDP
//! receivers, a shorter phase with BPF run-time statistics on gives the program's own
//! ns/packet (the statistics cost a clock read per run, so they are off while Mpps is measured).

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use serde_json::{Value, json};
use ws_guard::{
    config::XdpMode,
    guard::{Counters, Guard, LoadOptions},
};
use ws_guard_common::{
    maps::{ACTION_DROP, ACTION_REJECT, Counter, GlobalConfig, PortConfig},
    names,
};

use super::{
    bpf::{self, GenMode, RawProgram, TestRun},
    layer1::median,
    pin_to_cpu,
    report::{self, Bar},
};
use crate::{
    frames::{FrameBuilder, Tcp},
    netns::in_ns,
};

/// The protected (and listening) port.
pub const PORT: u16 = 9000;
const GEN_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x10, 0x00, 0x02];
const SRV_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x10, 0x00, 0x01];
const GEN_IF: &str = "wsgbg";
const SRV_IF: &str = "wsgbs";

/// A flood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// One IPv4 source, random source ports.
    OneSource,
    /// 65,536 random IPv4 sources (198.19.0.0/16), random source ports.
    Random65k,
    /// 1,048,576 random IPv6 sources (2001:2:0:1::/108, keyed per /128), random source ports.
    Random1M,
}

impl Scenario {
    pub const ALL: [Scenario; 3] = [Scenario::OneSource, Scenario::Random65k, Scenario::Random1M];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::OneSource => "one source (IPv4)",
            Scenario::Random65k => "65,536 random sources (IPv4)",
            Scenario::Random1M => "1,048,576 random sources (IPv6 /128)",
        }
    }

    pub fn id(self) -> &'static str {
        match self {
            Scenario::OneSource => "one_source",
            Scenario::Random65k => "random_65k",
            Scenario::Random1M => "random_1m",
        }
    }

    fn mode(self) -> GenMode {
        match self {
            Scenario::OneSource => GenMode::OneSourceV4,
            Scenario::Random65k => GenMode::RandomV4x16,
            Scenario::Random1M => GenMode::RandomV6x20,
        }
    }

    fn ipv6(self) -> bool {
        self == Scenario::Random1M
    }

    /// Distinct source keys the flood has.
    pub fn sources(self) -> u32 {
        match self {
            Scenario::OneSource => 1,
            Scenario::Random65k => 1 << 16,
            Scenario::Random1M => 1 << 20,
        }
    }
}

/// The generator's template frame for a scenario: the fields it rewrites hold 0 and their
/// compensating fields 0xffff, checksums valid (see [`bpf::generator_template_words`]).
pub fn template(scenario: Scenario) -> Vec<u8> {
    // No TCP options: a SYN exactly as long as ws-guard's RST reply (see the generator).
    let mut tcp = Tcp::syn(0, PORT, 0xffff_ffff);
    tcp.window = 0xffff;
    let mut f = match scenario {
        Scenario::OneSource => {
            FrameBuilder::ipv4(Ipv4Addr::new(198, 19, 0, 1), Ipv4Addr::new(198, 18, 0, 1))
        }
        Scenario::Random65k => {
            FrameBuilder::ipv4(Ipv4Addr::new(198, 19, 0, 0), Ipv4Addr::new(198, 18, 0, 1))
        }
        Scenario::Random1M => FrameBuilder::ipv6(
            Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 0),
            Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1),
        ),
    }
    .macs(GEN_MAC, SRV_MAC)
    .tcp(tcp)
    .build();
    if !scenario.ipv6() {
        // Identification 0xffff (it compensates the source's low word), header checksum anew.
        f[18] = 0xff;
        f[19] = 0xff;
        f[24] = 0;
        f[25] = 0;
        let c = ipv4_checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
    }
    f
}

/// The IPv4 header checksum of `header` (its checksum field zero).
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The filter on the receiving side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Nothing: the kernel's TCP stack with SYN cookies.
    None,
    /// An empty XDP_PASS program, then the stack: the floor of any XDP filter.
    Pass,
    /// XDP_DROP of everything: the ceiling.
    Drop,
    /// ws-guard with the iptables recipe's policy (3 connections, reject; 9/100 s, drop).
    WsGuard,
    /// The same with `connection_action = "drop"`: what answering every refused SYN with an
    /// RST costs under a flood.
    WsGuardDrop,
    /// The iptables recipe (DESIGN.md): connlimit + recent (ip6tables for IPv6).
    Iptables,
    /// nftables: `ct count over 3` reject + a per-source `limit rate` meter.
    Nftables,
}

impl Filter {
    pub const ALL: [Filter; 7] = [
        Filter::None,
        Filter::Pass,
        Filter::Drop,
        Filter::WsGuard,
        Filter::WsGuardDrop,
        Filter::Iptables,
        Filter::Nftables,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Filter::None => "no filter (SYN cookies)",
            Filter::Pass => "empty XDP_PASS (floor)",
            Filter::Drop => "XDP_DROP all (ceiling)",
            Filter::WsGuard => "ws-guard",
            Filter::WsGuardDrop => "ws-guard, drop instead of reject",
            Filter::Iptables => "iptables recipe",
            Filter::Nftables => "nftables ct count + meter",
        }
    }

    pub fn id(self) -> &'static str {
        match self {
            Filter::None => "none",
            Filter::Pass => "xdp_pass",
            Filter::Drop => "xdp_drop",
            Filter::WsGuard => "ws_guard",
            Filter::WsGuardDrop => "ws_guard_drop",
            Filter::Iptables => "iptables",
            Filter::Nftables => "nftables",
        }
    }
}

/// How much to measure.
#[derive(Clone, Debug)]
pub struct Options {
    pub scenarios: Vec<Scenario>,
    pub filters: Vec<Filter>,
    /// Measured flood per (scenario, filter).
    pub measure: Duration,
    /// Flood with BPF statistics on, for the program's ns/packet.
    pub stats_phase: Duration,
    /// The CPU the generator (and so the receiver's softirq) runs on.
    pub cpu: usize,
    /// Frames of a first short flood that calibrates how many frames make the phases below.
    pub calibration_frames: u32,
    /// Flood before measuring.
    pub warmup: Duration,
    /// Frames per live-frames batch.
    pub batch: u32,
}

impl Options {
    pub fn full() -> Self {
        Self {
            scenarios: Scenario::ALL.to_vec(),
            filters: Filter::ALL.to_vec(),
            calibration_frames: 1 << 14,
            warmup: Duration::from_millis(500),
            measure: Duration::from_secs(3),
            stats_phase: Duration::from_secs(1),
            cpu: last_cpu(),
            batch: 64,
        }
    }

    /// Seconds: every filter once on the one-source flood, a fraction of a second each.
    pub fn smoke() -> Self {
        Self {
            scenarios: vec![Scenario::OneSource],
            filters: Filter::ALL.to_vec(),
            calibration_frames: 1 << 12,
            warmup: Duration::from_millis(50),
            measure: Duration::from_millis(250),
            stats_phase: Duration::from_millis(100),
            cpu: last_cpu(),
            batch: 64,
        }
    }
}

fn last_cpu() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() - 1)
        .unwrap_or(0)
}

/// Memory of ws-guard's maps as the kernel charges it (fdinfo memlock).
#[derive(Clone, Debug)]
pub struct MapMemory {
    pub total_bytes: u64,
    /// (map name, bytes, max_entries)
    pub maps: Vec<(String, u64, u32)>,
    /// The per-source maps (connection counts and rate windows) divided by their capacity.
    pub bytes_per_source: f64,
    pub source_capacity: u32,
}

/// One (scenario, filter) measurement.
#[derive(Clone, Debug)]
pub struct Measurement {
    pub scenario: &'static str,
    pub scenario_id: &'static str,
    pub filter: &'static str,
    pub filter_id: &'static str,
    pub seconds: f64,
    pub offered: u64,
    pub processed: u64,
    pub offered_mpps: f64,
    pub processed_mpps: f64,
    /// Frames sent but not taken by the receiver (its ring was full), as a share of offered.
    pub lost_share: f64,
    /// XDP receivers: the program's run time per packet (BPF statistics phase).
    pub program_ns: Option<f64>,
    /// ws-guard: what it did with the frames (counter shares), as text.
    pub verdicts: String,
    pub verdict_counts: Vec<(&'static str, u64)>,
    pub map_memory: Option<MapMemory>,
}

/// Everything layer 2 measured.
#[derive(Clone, Debug)]
pub struct Report {
    pub cpu: usize,
    pub seconds_per_run: f64,
    pub measurements: Vec<Measurement>,
}

impl Report {
    fn find(&self, scenario: Scenario, filter: Filter) -> Option<&Measurement> {
        self.measurements
            .iter()
            .find(|m| m.scenario_id == scenario.id() && m.filter_id == filter.id())
    }

    /// The issue's layer-2 targets, each as measured in this run (where it was).
    pub fn target_lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        let pct = |x: f64| format!("{:.1}%", x * 100.0);
        if let (Some(w), Some(d)) = (
            self.find(Scenario::OneSource, Filter::WsGuard),
            self.find(Scenario::OneSource, Filter::Drop),
        ) {
            let r = w.processed_mpps / d.processed_mpps;
            out.push(format!(
                "One-source flood: ws-guard {:.3} Mpps = {} of the XDP_DROP ceiling ({:.3} Mpps); \
                 target >= 85%: {}",
                w.processed_mpps,
                pct(r),
                d.processed_mpps,
                met(r >= 0.85)
            ));
        }
        if let (Some(w), Some(i)) = (
            self.find(Scenario::OneSource, Filter::WsGuard),
            self.find(Scenario::OneSource, Filter::Iptables),
        ) {
            let r = w.processed_mpps / i.processed_mpps;
            out.push(format!(
                "One-source flood: ws-guard = {r:.2}x the iptables recipe ({:.3} Mpps); target \
                 >= 9x: {}",
                i.processed_mpps,
                met(r >= 9.0)
            ));
        }
        if let (Some(w), Some(d), Some(i)) = (
            self.find(Scenario::OneSource, Filter::WsGuardDrop),
            self.find(Scenario::OneSource, Filter::Drop),
            self.find(Scenario::OneSource, Filter::Iptables),
        ) {
            out.push(format!(
                "One-source flood, ws-guard with connection_action = \"drop\" (not the recipe's \
                 policy; for comparison): {:.3} Mpps = {} of the ceiling, {:.2}x the iptables \
                 recipe",
                w.processed_mpps,
                pct(w.processed_mpps / d.processed_mpps),
                w.processed_mpps / i.processed_mpps
            ));
        }
        if let Some(w) = self.find(Scenario::Random1M, Filter::WsGuard) {
            if let Some(ns) = w.program_ns {
                out.push(format!(
                    "1M random sources: ws-guard program time {ns:.1} ns/packet; target <= 150 \
                     ns: {}",
                    met(ns <= 150.0)
                ));
            }
            if let Some(mm) = &w.map_memory {
                out.push(format!(
                    "1M random sources: {:.0} bytes of map memory per tracked source (per-source \
                     maps / capacity {}); target <= 64: {}",
                    mm.bytes_per_source,
                    mm.source_capacity,
                    met(mm.bytes_per_source <= 64.0)
                ));
            }
        }
        out
    }

    pub fn to_json(&self) -> Value {
        json!({
            "cpu": self.cpu,
            "seconds_per_run": self.seconds_per_run,
            "targets": self.target_lines(),
            "measurements": self.measurements.iter().map(|m| json!({
                "scenario": m.scenario_id,
                "scenario_label": m.scenario,
                "filter": m.filter_id,
                "filter_label": m.filter,
                "seconds": m.seconds,
                "offered": m.offered,
                "processed": m.processed,
                "offered_mpps": m.offered_mpps,
                "processed_mpps": m.processed_mpps,
                "lost_share": m.lost_share,
                "program_ns_per_packet": m.program_ns,
                "verdicts": m.verdict_counts.iter().map(|(k, v)| (k.to_string(), json!(v)))
                    .collect::<serde_json::Map<_, _>>(),
                "map_memory": m.map_memory.as_ref().map(|mm| json!({
                    "total_bytes": mm.total_bytes,
                    "bytes_per_source": mm.bytes_per_source,
                    "source_capacity": mm.source_capacity,
                    "maps": mm.maps.iter().map(|(n, b, e)| json!({
                        "name": n, "bytes": b, "max_entries": e,
                    })).collect::<Vec<_>>(),
                })),
            })).collect::<Vec<_>>(),
        })
    }

    /// Processed Mpps per scenario and filter.
    pub fn chart(&self, path: &Path) -> anyhow::Result<()> {
        let bars: Vec<Bar> = self
            .measurements
            .iter()
            .map(|m| Bar {
                label: format!("{}: {}", short_scenario(m.scenario_id), m.filter),
                value: m.processed_mpps,
                note: String::new(),
                color: match m.filter_id {
                    "ws_guard" | "ws_guard_drop" => report::OK,
                    "xdp_drop" | "xdp_pass" => report::FLOOR,
                    "none" => report::NEUTRAL,
                    _ => report::OTHER,
                },
            })
            .collect();
        report::bar_chart(
            path,
            "SYN flood through veth, one CPU: Mpps processed by the receiver",
            "Mpps",
            &bars,
            None,
        )
    }
}

fn short_scenario(id: &str) -> &'static str {
    match id {
        "one_source" => "1 source",
        "random_65k" => "65k sources",
        "random_1m" => "1M sources",
        _ => "?",
    }
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// Runs `cmd`, failing with its stderr.
fn sh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The two namespaces and the veth pair of one measurement; removed by name on drop.
struct Bed {
    gen_ns: String,
    srv_ns: String,
    /// The generator side's XDP_DROP sink.
    _sink: Option<OwnedFd>,
    namespaces: Vec<String>,
}

impl Drop for Bed {
    fn drop(&mut self) {
        // The sink's link goes first (closing it detaches), then the namespaces.
        self._sink = None;
        for ns in self.namespaces.drain(..) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
    }
}

fn ifindex(name: &str) -> anyhow::Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {name}: {}", std::io::Error::last_os_error());
    }
    Ok(i)
}

impl Bed {
    fn new(n: u32, sink: &RawProgram) -> anyhow::Result<Self> {
        let pid = std::process::id();
        let gen_ns = format!("wsgb-{pid}-{n}-gen");
        let srv_ns = format!("wsgb-{pid}-{n}-srv");
        let mut bed = Bed {
            gen_ns: gen_ns.clone(),
            srv_ns: srv_ns.clone(),
            _sink: None,
            namespaces: Vec::new(),
        };
        for ns in [&gen_ns, &srv_ns] {
            bed.namespaces.push(ns.clone());
            sh(&["ip", "netns", "add", ns])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        let mac = |m: [u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        let (gmac, smac) = (mac(GEN_MAC), mac(SRV_MAC));
        sh(&[
            "ip", "-n", &srv_ns, "link", "add", SRV_IF, "address", &smac, "type", "veth", "peer",
            "name", GEN_IF, "address", &gmac, "netns", &gen_ns,
        ])?;
        let s = |args: &[&str]| {
            let mut v = vec!["ip", "-n", srv_ns.as_str()];
            v.extend_from_slice(args);
            sh(&v)
        };
        let g = |args: &[&str]| {
            let mut v = vec!["ip", "-n", gen_ns.as_str()];
            v.extend_from_slice(args);
            sh(&v)
        };
        s(&["addr", "add", "198.18.0.1/24", "dev", SRV_IF])?;
        s(&["addr", "add", "2001:2::1/64", "dev", SRV_IF, "nodad"])?;
        g(&["addr", "add", "198.18.0.2/24", "dev", GEN_IF])?;
        g(&["addr", "add", "2001:2::2/64", "dev", GEN_IF, "nodad"])?;
        s(&["link", "set", SRV_IF, "up"])?;
        g(&["link", "set", GEN_IF, "up"])?;
        // Replies to the flood's sources go to the generator side through one permanent
        // neighbour: no ARP or neighbour discovery per source.
        s(&[
            "neigh",
            "replace",
            "198.18.0.2",
            "lladdr",
            &gmac,
            "dev",
            SRV_IF,
            "nud",
            "permanent",
        ])?;
        s(&[
            "neigh",
            "replace",
            "2001:2::2",
            "lladdr",
            &gmac,
            "dev",
            SRV_IF,
            "nud",
            "permanent",
        ])?;
        s(&[
            "route",
            "add",
            "198.19.0.0/16",
            "via",
            "198.18.0.2",
            "dev",
            SRV_IF,
        ])?;
        s(&[
            "-6",
            "route",
            "add",
            "2001:2:0:1::/64",
            "via",
            "2001:2::2",
            "dev",
            SRV_IF,
        ])?;
        // Frames sent to a veth with XDP_TX/redirect reach a peer without an XDP program only
        // with GRO on (the no-filter, iptables and nftables receivers).
        sh(&[
            "ip", "netns", "exec", &srv_ns, "ethtool", "-K", SRV_IF, "gro", "on",
        ])?;
        let up = (0..250).any(|_| {
            let ok = s(&["-o", "link", "show", "dev", SRV_IF])
                .map(|o| o.contains("state UP"))
                .unwrap_or(false)
                && g(&["-o", "link", "show", "dev", GEN_IF])
                    .map(|o| o.contains("state UP"))
                    .unwrap_or(false);
            if !ok {
                std::thread::sleep(Duration::from_millis(20));
            }
            ok
        });
        if !up {
            bail!("the veth pair did not come up within 5 s");
        }
        let link = in_ns(&gen_ns, || sink.attach(ifindex(GEN_IF)?))?;
        bed._sink = Some(link);
        Ok(bed)
    }

    fn rx_packets(&self) -> anyhow::Result<u64> {
        let out = sh(&[
            "ip",
            "-n",
            &self.srv_ns,
            "-s",
            "-j",
            "link",
            "show",
            "dev",
            SRV_IF,
        ])?;
        let v: Value = serde_json::from_str(&out).context("parsing `ip -j -s link`")?;
        v[0]["stats64"]["rx"]["packets"]
            .as_u64()
            .ok_or_else(|| anyhow!("no rx packets in `ip -j -s link` output"))
    }

    fn netns_exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut v = vec!["ip", "netns", "exec", self.srv_ns.as_str()];
        v.extend_from_slice(args);
        sh(&v)
    }
}

/// What is attached or configured on the receiver; undone on drop (with the namespace).
enum Receiver {
    Plain,
    Raw(#[allow(dead_code)] OwnedFd),
    Guard(Box<Guard>),
}

fn setup_filter(
    bed: &Bed,
    scenario: Scenario,
    filter: Filter,
    pass_prog: &RawProgram,
    drop_prog: &RawProgram,
) -> anyhow::Result<Receiver> {
    let p = PORT.to_string();
    Ok(match filter {
        Filter::None => Receiver::Plain,
        Filter::Pass => Receiver::Raw(in_ns(&bed.srv_ns, || pass_prog.attach(ifindex(SRV_IF)?))?),
        Filter::Drop => Receiver::Raw(in_ns(&bed.srv_ns, || drop_prog.attach(ifindex(SRV_IF)?))?),
        Filter::WsGuard | Filter::WsGuardDrop => {
            let sources = scenario.sources().next_power_of_two().max(65536);
            let mut g = Guard::load(&LoadOptions {
                sources,
                // Three half-open attempts per source fit.
                flows: (sources * 4).max(262_144),
                kernel_log_level: 2,
                ..LoadOptions::default()
            })?;
            g.set_global(GlobalConfig {
                monitor: 0,
                ipv4_prefix: 32,
                ipv6_prefix: if scenario.ipv6() { 128 } else { 64 },
                ..GlobalConfig::default()
            })?;
            g.set_port(
                PORT,
                PortConfig {
                    enabled: 1,
                    max_connections: 3,
                    conn_action: if filter == Filter::WsGuard {
                        ACTION_REJECT
                    } else {
                        ACTION_DROP
                    },
                    rate_action: ACTION_DROP,
                    rate_limit: 9,
                    index: 0,
                    rate_window_ns: 100_000_000_000,
                },
            )?;
            in_ns(&bed.srv_ns, || g.attach_xdp(SRV_IF, XdpMode::Native))?;
            Receiver::Guard(Box::new(g))
        }
        Filter::Iptables => {
            let ipt = if scenario.ipv6() {
                "ip6tables"
            } else {
                "iptables"
            };
            let mask = if scenario.ipv6() { "128" } else { "32" };
            bed.netns_exec(&[
                ipt,
                "-A",
                "INPUT",
                "-p",
                "tcp",
                "--syn",
                "--dport",
                &p,
                "-m",
                "connlimit",
                "--connlimit-above",
                "3",
                "--connlimit-mask",
                mask,
                "-j",
                "REJECT",
            ])?;
            bed.netns_exec(&[
                ipt, "-A", "INPUT", "-p", "tcp", "--dport", &p, "-i", SRV_IF, "-m", "state",
                "--state", "NEW", "-m", "recent", "--set",
            ])?;
            bed.netns_exec(&[
                ipt,
                "-A",
                "INPUT",
                "-p",
                "tcp",
                "--dport",
                &p,
                "-i",
                SRV_IF,
                "-m",
                "state",
                "--state",
                "NEW",
                "-m",
                "recent",
                "--update",
                "--seconds",
                "100",
                "--hitcount",
                "10",
                "-j",
                "DROP",
            ])?;
            Receiver::Plain
        }
        Filter::Nftables => {
            let (fam, addr, size) = if scenario.ipv6() {
                ("ipv6_addr", "ip6 saddr", 1 << 20)
            } else {
                ("ipv4_addr", "ip saddr", 1 << 16)
            };
            let rules = format!(
                "table inet wsgbench {{\n\
                 set conns {{ type {fam}; size {size}; flags dynamic; }}\n\
                 set rate {{ type {fam}; size {size}; flags dynamic,timeout; timeout 100s; }}\n\
                 chain input {{ type filter hook input priority 0; policy accept;\n\
                 tcp dport {PORT} ct state new add @conns {{ {addr} ct count over 3 }} reject with tcp reset\n\
                 tcp dport {PORT} ct state new update @rate {{ {addr} limit rate over 6/minute burst 9 packets }} drop\n\
                 }}\n}}\n"
            );
            let file = std::env::temp_dir().join(format!("wsgb-{}.nft", std::process::id()));
            std::fs::write(&file, rules)?;
            let r = bed.netns_exec(&["nft", "-f", file.to_str().unwrap_or_default()]);
            let _ = std::fs::remove_file(&file);
            r?;
            Receiver::Plain
        }
    })
}

fn map_memory(g: &mut Guard) -> anyhow::Result<MapMemory> {
    let info = g
        .xdp_program()?
        .info()
        .map_err(|e| anyhow!("program info: {e}"))?;
    let ids = info
        .map_ids()
        .map_err(|e| anyhow!("map ids: {e}"))?
        .unwrap_or_default();
    let mut maps = Vec::new();
    let mut total = 0;
    let mut per_source = 0;
    let mut cap = 0;
    for id in ids {
        let m = aya::maps::MapInfo::from_id(id).map_err(|e| anyhow!("map {id}: {e}"))?;
        let name = m.name_as_str().unwrap_or("?").to_owned();
        let fd = m.fd().map_err(|e| anyhow!("map {id} fd: {e}"))?;
        let bytes = bpf::memlock(fd.as_fd())?;
        let entries = m.max_entries();
        total += bytes;
        if name == names::MAP_CONNS || name == names::MAP_RATE {
            per_source += bytes;
            cap = entries;
        }
        maps.push((name, bytes, entries));
    }
    maps.sort();
    Ok(MapMemory {
        total_bytes: total,
        maps,
        bytes_per_source: per_source as f64 / cap.max(1) as f64,
        source_capacity: cap,
    })
}

const SHOWN: [Counter; 7] = [
    Counter::Admitted,
    Counter::SynRetransmits,
    Counter::ConnLimited,
    Counter::RateLimited,
    Counter::MapFull,
    Counter::RstSent,
    Counter::NotProtected,
];

fn verdicts(before: &Counters, after: &Counters) -> (String, Vec<(&'static str, u64)>) {
    let d: Vec<(&'static str, u64)> = SHOWN
        .iter()
        .map(|c| (c.name(), after.get(*c).saturating_sub(before.get(*c))))
        .collect();
    let frames: u64 = d
        .iter()
        .filter(|(n, _)| *n != Counter::RstSent.name())
        .map(|(_, v)| v)
        .sum();
    let text = d
        .iter()
        .filter(|(_, v)| *v > 0)
        .map(|(n, v)| format!("{n} {:.2}%", 100.0 * *v as f64 / frames.max(1) as f64))
        .collect::<Vec<_>>()
        .join(", ");
    (text, d)
}

/// Sends `frames` frames (in calls of at most 2^30); returns the wall time it took. Each call
/// has a fixed cost of ~16 ms here (the kernel swaps the XDP dispatcher's target around the
/// loop), so calls are made long: the measured phase is one call of ~`measure`.
fn flood(
    generator: &RawProgram,
    frame: &[u8],
    ifindex: u32,
    batch: u32,
    frames: u64,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let mut left = frames;
    while left > 0 {
        let n = left.min(1 << 30) as u32;
        let r = bpf::test_run(
            generator.fd(),
            TestRun {
                data_in: frame,
                data_out: None,
                repeat: n,
                live: Some((ifindex, batch)),
            },
        )?;
        if r.retval != 0 && r.retval != bpf::XDP_TX {
            // Live mode reports 0; anything else is an error of the run.
            bail!("the generator returned {}", r.retval);
        }
        left -= n as u64;
    }
    Ok(t0.elapsed())
}

/// Frames that take about `d` at `rate` frames per second (at least 2^12).
fn frames_for(rate: f64, d: Duration) -> u64 {
    ((rate * d.as_secs_f64()) as u64).clamp(1 << 12, 1 << 34)
}

/// Runs every (scenario, filter) of `opts`.
pub fn run(opts: &Options, log: &mut dyn FnMut(&str)) -> anyhow::Result<Report> {
    let pass_prog = RawProgram::load_xdp("wsgb_pass", &bpf::pass_program())?;
    let drop_prog = RawProgram::load_xdp("wsgb_drop", &bpf::drop_program())?;
    let sink = RawProgram::load_xdp("wsgb_sink", &bpf::drop_program())?;
    let mut out = Vec::new();
    let mut n = 0;
    for &scenario in &opts.scenarios {
        let frame = template(scenario);
        let generator =
            RawProgram::load_xdp("wsgb_gen", &bpf::generator_program(scenario.mode(), &frame))?;
        for &filter in &opts.filters {
            n += 1;
            log(&format!("layer 2: {} / {}", scenario.name(), filter.name()));
            let bed = Bed::new(n, &sink)?;
            // A listener for the admitted SYNs (SYN cookies on: the namespace's default).
            let listener = in_ns(&bed.srv_ns, || {
                std::net::TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, PORT)))
            })
            .context("listening on [::]:9000 in the server namespace")?;
            let mut receiver = setup_filter(&bed, scenario, filter, &pass_prog, &drop_prog)?;
            let guard_fd = match &mut receiver {
                Receiver::Guard(g) => Some(
                    g.xdp_program()?
                        .fd()
                        .map_err(|e| anyhow!("{e}"))?
                        .try_clone()?,
                ),
                _ => None,
            };
            let raw_fd = match filter {
                Filter::Pass => Some(pass_prog.fd()),
                Filter::Drop => Some(drop_prog.fd()),
                _ => None,
            };
            let counters = |r: &Receiver| -> anyhow::Result<Option<Counters>> {
                match r {
                    Receiver::Guard(g) => Ok(Some(g.counters()?)),
                    _ => Ok(None),
                }
            };

            let m = in_ns(&bed.gen_ns, || -> anyhow::Result<Measurement> {
                pin_to_cpu(opts.cpu)?;
                let gen_if = ifindex(GEN_IF)?;
                let n = opts.calibration_frames as u64;
                let calib = flood(&generator, &frame, gen_if, opts.batch, n)?;
                let rate = n as f64 / calib.as_secs_f64();
                // The warm-up also calibrates better (one call's fixed cost weighs less).
                let warm = frames_for(rate, opts.warmup);
                let took = flood(&generator, &frame, gen_if, opts.batch, warm)?;
                let rate = warm as f64 / took.as_secs_f64();
                let sent = frames_for(rate, opts.measure);
                let c0 = counters(&receiver)?;
                let rx0 = bed.rx_packets()?;
                let took = flood(&generator, &frame, gen_if, opts.batch, sent)?;
                let rx1 = bed.rx_packets()?;
                let c1 = counters(&receiver)?;
                let prog_fd = guard_fd.as_ref().map(|f| f.as_fd()).or(raw_fd);
                let program_ns = match prog_fd {
                    Some(fd) if !opts.stats_phase.is_zero() => {
                        let stats = bpf::enable_stats()?;
                        let s0 = bpf::run_stats(fd)?;
                        let n = frames_for(rate, opts.stats_phase);
                        flood(&generator, &frame, gen_if, opts.batch, n)?;
                        let s1 = bpf::run_stats(fd)?;
                        drop(stats);
                        s1.ns_per_run_since(&s0)
                    }
                    _ => None,
                };
                let processed = rx1.saturating_sub(rx0);
                let secs = took.as_secs_f64();
                let (text, counts) = match (&c0, &c1) {
                    (Some(a), Some(b)) => verdicts(a, b),
                    _ => (String::new(), Vec::new()),
                };
                Ok(Measurement {
                    scenario: scenario.name(),
                    scenario_id: scenario.id(),
                    filter: filter.name(),
                    filter_id: filter.id(),
                    seconds: secs,
                    offered: sent,
                    processed,
                    offered_mpps: sent as f64 / secs / 1e6,
                    processed_mpps: processed as f64 / secs / 1e6,
                    lost_share: 1.0 - (processed as f64 / sent.max(1) as f64).min(1.0),
                    program_ns,
                    verdicts: text,
                    verdict_counts: counts,
                    map_memory: None,
                })
            })?;
            let mut m = m;
            if let Receiver::Guard(g) = &mut receiver {
                m.map_memory = Some(map_memory(g)?);
                g.detach_all()?;
            }
            log(&format!(
                "    offered {:.3} Mpps, processed {:.3} Mpps{}{}",
                m.offered_mpps,
                m.processed_mpps,
                m.program_ns
                    .map(|ns| format!(", program {ns:.1} ns/packet"))
                    .unwrap_or_default(),
                if m.verdicts.is_empty() {
                    String::new()
                } else {
                    format!(", {}", m.verdicts)
                }
            ));
            drop(receiver);
            drop(listener);
            drop(bed);
            out.push(m);
        }
    }
    let secs: Vec<f64> = out.iter().map(|m| m.seconds).collect();
    Ok(Report {
        cpu: opts.cpu,
        seconds_per_run: median(&secs),
        measurements: out,
    })
}
