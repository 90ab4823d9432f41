//! The Prometheus endpoint: a [`Snapshot`] of the kernel's counters and maps, read when
//! Prometheus scrapes, rendered in the text exposition format and served over HTTP at
//! `/metrics`.
//!
//! Reading happens at scrape time, under the guard's lock; the kernel programs enforce on their
//! own meanwhile, so a slow scrape delays only the daemon's sweep.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use prometheus::{
    Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;
use ws_guard_common::{
    maps::{
        AF_INET6, Counter, FLOW_OWNED, FLOW_PENDING, FlowKey, FlowValue, GlobalConfig, SourceKey,
    },
    names,
};

use crate::{
    guard::{Guard, Stats},
    lists::List,
    slots::{self, Slots},
    view::MapView,
};

/// Every metric name the endpoint can expose (the top-sources one only when enabled). The
/// dashboard and the alert rules may use these and nothing else; a test checks both.
pub const METRIC_NAMES: [&str; 29] = [
    "ws_guard_build_info",
    "ws_guard_xdp_attached",
    "ws_guard_xdp_tx_errors_total",
    "ws_guard_monitor_mode",
    "ws_guard_decisions_total",
    "ws_guard_monitor_would_block_total",
    "ws_guard_rst_sent_total",
    "ws_guard_reject_as_drop_total",
    "ws_guard_other_segments_total",
    "ws_guard_fragments_total",
    "ws_guard_unjudged_packets_total",
    "ws_guard_connection_events_total",
    "ws_guard_ban_events_total",
    "ws_guard_tracked_sources",
    "ws_guard_active_connections",
    "ws_guard_half_open_connections",
    "ws_guard_established_connections",
    "ws_guard_map_entries",
    "ws_guard_map_capacity",
    "ws_guard_map_fill_ratio",
    "ws_guard_map_memory_bytes",
    "ws_guard_bans_active",
    "ws_guard_list_entries",
    "ws_guard_source_connections",
    "ws_guard_unmatched_connections_total",
    "ws_guard_scrape_duration_seconds",
    "ws_guard_syn_cookies_total",
    "ws_guard_syn_cookie_mode",
    "ws_guard_syn_cookie_transitions_total",
];

/// What happened in SYN-cookie mode, per port and family.
pub const COOKIE_EVENTS: [Counter; 5] = [
    Counter::CookiesSent,
    Counter::CookieAcksValid,
    Counter::CookieAcksInvalid,
    Counter::CookieAcksReplayed,
    Counter::CookieFallbacks,
];

/// Decisions on new connection attempts: each attempt to a protected port adds to exactly one.
pub const DECISIONS: [Counter; 8] = [
    Counter::Admitted,
    Counter::ConnLimited,
    Counter::RateLimited,
    Counter::SynRetransmits,
    Counter::MapFull,
    Counter::Allowed,
    Counter::Denied,
    Counter::Banned,
];

/// What happened to bans, and to their events.
pub const BAN_EVENTS: [Counter; 4] = [
    Counter::BansStarted,
    Counter::BansEnded,
    Counter::BansFull,
    Counter::EventsLost,
];

/// Frames passed without judgement; not tied to a protected port.
pub const UNJUDGED: [Counter; 3] = [
    Counter::NotProtected,
    Counter::Fragments,
    Counter::Malformed,
];

/// What happened to tracked connections.
pub const CONNECTION_EVENTS: [Counter; 5] = [
    Counter::Established,
    Counter::Closed,
    Counter::Adopted,
    Counter::Expired,
    Counter::UntrackedFull,
];

/// Where the XDP program is attached, and whether it still is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachState {
    pub interface: String,
    /// "native" or "generic".
    pub mode: &'static str,
    /// The interface still exists with the index the program was attached to.
    pub attached: bool,
    /// Frames its driver failed to send with XDP_TX (RSTs that never left), when it reports
    /// them ([`crate::interfaces::xdp_tx_errors`]).
    pub tx_errors: Option<u64>,
}

/// How full one of the hash maps is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFill {
    /// The kernel's name of the map.
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
    /// Memory the kernel charges for the map (fdinfo `memlock`; the hash maps are
    /// preallocated, so theirs is their size when full).
    pub bytes: u64,
}

/// Gauges of one protected port and address family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortGauges {
    /// Source keys holding at least one slot.
    pub tracked_sources: u64,
    /// Slots held: half-open plus established connections.
    pub active_connections: u64,
    /// Admitted attempts whose handshake is not complete.
    pub half_open: u64,
    /// Established connections tracked.
    pub established: u64,
}

/// Everything the endpoint reports, read from the kernel at one point in time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// The daemon's version.
    pub version: String,
    pub monitor: bool,
    pub attachments: Vec<AttachState>,
    /// Counters per protected port and family.
    pub stats: Stats,
    /// Per (port, family); protected ports always appear, others while they hold connections.
    pub gauges: BTreeMap<(u16, u16), PortGauges>,
    pub maps: Vec<MapFill>,
    /// The sources holding the most connections, most first (empty unless enabled).
    pub top_sources: Vec<(String, u16, u16, u32)>,
    /// Bans in force.
    pub bans_active: u64,
    /// Entries of each list: ("allow" | "deny", entries).
    pub list_entries: Vec<(&'static str, u64)>,
    /// Connections found in another namespace that match no admitted attempt, since start.
    pub unmatched_connections: u64,
    /// How long reading the kernel took.
    pub read_seconds: f64,
    /// Each protected port's SYN-cookie mode (empty unless the daemon's controller ran).
    pub cookies: BTreeMap<u16, crate::cookies::PortCookies>,
}

fn family_name(family: u16) -> &'static str {
    if family == AF_INET6 { "ipv6" } else { "ipv4" }
}

/// A source key as `ADDRESS/PREFIX`, e.g. `198.18.1.2/32` or `2001:2:0:100::/64`.
pub fn source_label(key: &SourceKey, global: &GlobalConfig) -> String {
    if key.family == AF_INET6 {
        let a = IpAddr::V6(Ipv6Addr::from(key.addr));
        format!("{a}/{}", global.ipv6_prefix)
    } else {
        let a = IpAddr::V4(Ipv4Addr::new(
            key.addr[0],
            key.addr[1],
            key.addr[2],
            key.addr[3],
        ));
        format!("{a}/{}", global.ipv4_prefix)
    }
}

/// Reads a snapshot from the kernel. `top_sources`: how many sources to list (0: none).
pub fn snapshot(guard: &Guard, top_sources: usize) -> anyhow::Result<Snapshot> {
    walk(read_fixed(guard)?, top_sources)
}

/// The part of a snapshot read through the guard: settings, counters, attachments, and the
/// handles for [`walk`]. Quick (a few hundred map reads), so the daemon's lock is held briefly.
pub struct Fixed {
    start: Instant,
    global: GlobalConfig,
    stats: Stats,
    attachments: Vec<AttachState>,
    unmatched: u64,
    cookies: BTreeMap<u16, crate::cookies::PortCookies>,
    view: Arc<MapView>,
}

/// Reads the [`Fixed`] part of a snapshot.
pub fn read_fixed(guard: &Guard) -> anyhow::Result<Fixed> {
    Ok(Fixed {
        start: Instant::now(),
        global: guard.global().context("reading the global settings")?,
        stats: guard.stats().context("reading the counters")?,
        attachments: guard
            .attachments()
            .iter()
            .map(|a| AttachState {
                interface: a.interface.clone(),
                mode: a.mode,
                attached: a.interface_present(),
                tx_errors: crate::interfaces::xdp_tx_errors(&a.interface),
            })
            .collect(),
        unmatched: guard.unmatched_connections,
        cookies: guard.cookie_status.clone(),
        view: guard.view(),
    })
}

/// Completes a snapshot by walking the maps that grow with traffic, without the guard (see
/// [`crate::view`]): up to ~2 s with every map full, so the endpoint does it on a blocking
/// thread.
pub fn walk(fixed: Fixed, top_sources: usize) -> anyhow::Result<Snapshot> {
    let Fixed {
        start,
        global,
        stats,
        attachments,
        unmatched,
        cookies: fixed_cookies,
        view,
    } = fixed;
    let sources = view
        .source_counters()
        .context("reading the source counters")?;
    let flows = view.flows(None)?;
    let pending: Vec<_> = flows
        .iter()
        .filter(|(_, v)| v.state() == FLOW_PENDING)
        .copied()
        .collect();
    let owned: Vec<_> = flows
        .iter()
        .filter(|(_, v)| v.state() == FLOW_OWNED)
        .copied()
        .collect();
    let bans = view.ban_entries().context("reading the bans")?;
    let now = crate::bans::monotonic_ns();
    let ban_entries = bans.len();
    let bans_active = bans
        .iter()
        .filter(|(_, v)| ws_guard_common::policy::ban_active(v.until_ns, now))
        .count() as u64;
    let mut list_entries = Vec::new();
    for list in [List::Allow, List::Deny] {
        let n = view
            .list_entries(list)
            .with_context(|| format!("reading the {} list", list.name()))?
            .len();
        list_entries.push((list.name(), n as u64));
    }

    let mut gauges: BTreeMap<(u16, u16), PortGauges> = stats
        .ports
        .keys()
        .map(|k| (*k, PortGauges::default()))
        .collect();
    for (key, count) in &sources {
        if *count != 0 {
            let g = gauges.entry((key.port, key.family)).or_default();
            g.tracked_sources += 1;
            g.active_connections += *count as u64;
        }
    }
    count_flows(&pending, &mut gauges, |g| &mut g.half_open);
    count_flows(&owned, &mut gauges, |g| &mut g.established);

    let mut maps = Vec::new();
    for (map, entries) in [
        (names::MAP_SOURCES, sources.len()),
        (names::MAP_FLOWS, flows.len()),
        (names::MAP_BANS, ban_entries),
        (names::MAP_ALLOW, list_entries[0].1 as usize),
        (names::MAP_DENY, list_entries[1].1 as usize),
    ] {
        maps.push(MapFill {
            map,
            entries: entries as u64,
            capacity: view.capacity(map)? as u64,
            bytes: view.memory_bytes(map)?,
        });
    }

    let mut top: Vec<&(SourceKey, u32)> = sources.iter().filter(|(_, n)| *n != 0).collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let top_sources = top
        .into_iter()
        .take(top_sources)
        .map(|(k, n)| (source_label(k, &global), k.port, k.family, *n))
        .collect();

    Ok(Snapshot {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        monitor: global.monitor != 0,
        attachments,
        stats,
        gauges,
        maps,
        top_sources,
        bans_active,
        list_entries,
        unmatched_connections: unmatched,
        read_seconds: start.elapsed().as_secs_f64(),
        cookies: fixed_cookies,
    })
}

/// Counts flows by the protected port they are charged to (a connection behind DNAT is
/// tracked under its socket's port).
fn count_flows(
    flows: &[(FlowKey, FlowValue)],
    gauges: &mut BTreeMap<(u16, u16), PortGauges>,
    field: impl Fn(&mut PortGauges) -> &mut u64,
) {
    for (f, v) in flows {
        *field(gauges.entry((v.port(), f.family)).or_default()) += 1;
    }
}

/// The metrics of `s`, one registry per scrape.
fn registry(s: &Snapshot) -> prometheus::Result<Registry> {
    let r = Registry::new();
    let counter = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
        let v = IntCounterVec::new(Opts::new(name, help), labels)?;
        r.register(Box::new(v.clone()))?;
        Ok(v)
    };
    let gauge = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntGaugeVec> {
        let v = IntGaugeVec::new(Opts::new(name, help), labels)?;
        r.register(Box::new(v.clone()))?;
        Ok(v)
    };
    let float_gauge = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<GaugeVec> {
        let v = GaugeVec::new(Opts::new(name, help), labels)?;
        r.register(Box::new(v.clone()))?;
        Ok(v)
    };
    let pf = ["port", "family"];

    gauge(
        "ws_guard_build_info",
        "ws-guard's version; always 1.",
        &["version"],
    )?
    .with_label_values(&[s.version.as_str()])
    .set(1);
    let attached = gauge(
        "ws_guard_xdp_attached",
        "1 while the XDP program is attached to the interface (mode: native or generic), 0 \
         once the interface is gone.",
        &["interface", "mode"],
    )?;
    for a in &s.attachments {
        attached
            .with_label_values(&[a.interface.as_str(), a.mode])
            .set(a.attached as i64);
    }
    let tx_errors = counter(
        "ws_guard_xdp_tx_errors_total",
        "Frames the interface's driver failed to send with XDP_TX (RSTs of reject that never \
         left; ws_guard_rst_sent_total counts them as sent), from its ethtool statistics, for \
         drivers that report them (veth): on a veth in native mode, a peer without an XDP \
         program drops them all.",
        &["interface"],
    )?;
    for a in &s.attachments {
        if let Some(n) = a.tx_errors {
            tx_errors
                .with_label_values(&[a.interface.as_str()])
                .inc_by(n);
        }
    }
    let monitor = IntGauge::with_opts(Opts::new(
        "ws_guard_monitor_mode",
        "1 when monitor mode is on: nothing is refused, would-be refusals are counted.",
    ))?;
    monitor.set(s.monitor as i64);
    r.register(Box::new(monitor))?;

    let decisions = counter(
        "ws_guard_decisions_total",
        "New connection attempts (TCP SYN) to a protected port by decision; each attempt adds \
         to exactly one reason: admitted, conn_limited (over max_connections), rate_limited \
         (over new_connections), syn_retransmits (a SYN of an attempt already admitted), \
         map_full (passed untracked), allowed (allowlisted: not limited, tracked), denied \
         (denylisted: dropped), banned (the source key is banned: dropped).",
        &["port", "family", "reason"],
    )?;
    let ban_events = counter(
        "ws_guard_ban_events_total",
        "Bans by event: bans_started (a source over new_connections while ban_duration > 0), \
         bans_ended (a ban that ran out, ended by the XDP program on the source's \
         next attempt or by the daemon's sweep; bans lifted by the operator are not counted), bans_full (not banned: the ban map was full), events_lost (ban events \
         the daemon could not be told: ring buffer full).",
        &["port", "family", "event"],
    )?;
    let would_block = counter(
        "ws_guard_monitor_would_block_total",
        "Attempts admitted in monitor mode that enforcing would have refused.",
        &pf,
    )?;
    let rst = counter(
        "ws_guard_rst_sent_total",
        "Refused attempts answered with a TCP RST from XDP (action reject).",
        &pf,
    )?;
    let reject_as_drop = counter(
        "ws_guard_reject_as_drop_total",
        "Refused attempts to reject that were dropped instead (IPv4 options, IPv6 extension \
         headers).",
        &pf,
    )?;
    let other = counter(
        "ws_guard_other_segments_total",
        "TCP segments to a protected port that are not new connection attempts (ACKs, data, \
         FINs, RSTs); always passed.",
        &pf,
    )?;
    let fragments = counter(
        "ws_guard_fragments_total",
        "First fragments of TCP segments to a protected port: dropped (fragments = \"drop\", \
         the default: a SYN in fragments would reach the kernel unjudged), or passed \
         (fragments = \"pass\", or monitor mode).",
        &pf,
    )?;
    let events = counter(
        "ws_guard_connection_events_total",
        "Tracked connections by event: established (handshake completed), closed (slot given \
         back), adopted (counted without its SYN being seen), expired (half-open released by \
         the sweep), untracked_full (left untracked, a map was full).",
        &["port", "family", "event"],
    )?;
    let cookie_events = counter(
        "ws_guard_syn_cookies_total",
        "SYN-cookie mode by event: cookies_sent (a new source's SYN answered with a cookie, \
         nothing stored), cookie_acks_valid (its ACK returned a valid cookie: judged as the \
         source's attempt, see ws_guard_decisions_total), cookie_acks_invalid (dropped: forged \
         or too old), cookie_acks_replayed (dropped: the cookie of a connection already \
         admitted), cookie_fallbacks (judged on the SYN instead: no listener in the \
         interface's namespace, IP options, a full accept queue).",
        &["port", "family", "event"],
    )?;
    let mut unjudged = [0u64; Counter::COUNT as usize];
    for (t, v) in unjudged.iter_mut().zip(s.stats.unattributed) {
        *t += v;
    }
    for ((port, family), c) in &s.stats.ports {
        let (port, fam) = (port.to_string(), family_name(*family));
        for d in DECISIONS {
            decisions
                .with_label_values(&[port.as_str(), fam, d.name()])
                .inc_by(c[d as usize]);
        }
        for (v, k) in [
            (&would_block, Counter::MonitorWouldBlock),
            (&rst, Counter::RstSent),
            (&reject_as_drop, Counter::RejectAsDrop),
            (&other, Counter::ProtectedOther),
            (&fragments, Counter::Fragments),
        ] {
            v.with_label_values(&[port.as_str(), fam])
                .inc_by(c[k as usize]);
        }
        for e in CONNECTION_EVENTS {
            events
                .with_label_values(&[port.as_str(), fam, e.name()])
                .inc_by(c[e as usize]);
        }
        for e in BAN_EVENTS {
            ban_events
                .with_label_values(&[port.as_str(), fam, e.name()])
                .inc_by(c[e as usize]);
        }
        for e in COOKIE_EVENTS {
            cookie_events
                .with_label_values(&[port.as_str(), fam, e.name()])
                .inc_by(c[e as usize]);
        }
        // A frame too inconsistent to read its addresses, once its port was known.
        unjudged[Counter::Malformed as usize] += c[Counter::Malformed as usize];
    }
    let unjudged_vec = counter(
        "ws_guard_unjudged_packets_total",
        "Frames passed without judgement: not_protected (not IP, not TCP, or not to a \
         protected port), fragments (IP fragments), malformed (headers truncated or \
         inconsistent).",
        &["reason"],
    )?;
    for u in UNJUDGED {
        unjudged_vec
            .with_label_values(&[u.name()])
            .inc_by(unjudged[u as usize]);
    }

    let tracked = gauge(
        "ws_guard_tracked_sources",
        "Source keys (address masked to the prefix) holding at least one connection slot.",
        &pf,
    )?;
    let active = gauge(
        "ws_guard_active_connections",
        "Connection slots held: half-open plus established connections.",
        &pf,
    )?;
    let half_open = gauge(
        "ws_guard_half_open_connections",
        "Admitted attempts whose handshake has not completed.",
        &pf,
    )?;
    let established = gauge(
        "ws_guard_established_connections",
        "Established connections tracked.",
        &pf,
    )?;
    for ((port, family), g) in &s.gauges {
        let labels = [port.to_string(), family_name(*family).to_owned()];
        let labels = [labels[0].as_str(), labels[1].as_str()];
        tracked
            .with_label_values(&labels)
            .set(g.tracked_sources as i64);
        active
            .with_label_values(&labels)
            .set(g.active_connections as i64);
        half_open.with_label_values(&labels).set(g.half_open as i64);
        established
            .with_label_values(&labels)
            .set(g.established as i64);
    }

    let entries = gauge(
        "ws_guard_map_entries",
        "Entries in each hash map (WSG_SOURCES: source states, WSG_FLOWS: tracked \
         connections, half-open and established).",
        &["map"],
    )?;
    let capacity = gauge(
        "ws_guard_map_capacity",
        "Capacity of each hash map (the [capacity] settings).",
        &["map"],
    )?;
    let fill = float_gauge(
        "ws_guard_map_fill_ratio",
        "Entries over capacity of each hash map (0 to 1). Full WSG_SOURCES or WSG_FLOWS: \
         attempts of new sources pass untracked (or are refused, fail_closed).",
        &["map"],
    )?;
    let memory = gauge(
        "ws_guard_map_memory_bytes",
        "Kernel memory of each of those maps in bytes (fdinfo memlock). The hash maps are \
         preallocated: theirs is what [capacity] costs whatever the traffic; the allow and \
         deny lists grow with their entries.",
        &["map"],
    )?;
    for m in &s.maps {
        memory.with_label_values(&[m.map]).set(m.bytes as i64);
        entries.with_label_values(&[m.map]).set(m.entries as i64);
        capacity.with_label_values(&[m.map]).set(m.capacity as i64);
        let ratio = if m.capacity == 0 {
            0.0
        } else {
            m.entries as f64 / m.capacity as f64
        };
        fill.with_label_values(&[m.map]).set(ratio);
    }

    let bans = IntGauge::with_opts(Opts::new(
        "ws_guard_bans_active",
        "Source keys banned now (automatic and manual); `ws-guard bans` lists them.",
    ))?;
    bans.set(s.bans_active as i64);
    r.register(Box::new(bans))?;
    let lists = gauge(
        "ws_guard_list_entries",
        "CIDRs in each list: allow (never limited) and deny (always dropped).",
        &["list"],
    )?;
    for (list, n) in &s.list_entries {
        lists.with_label_values(&[list]).set(*n as i64);
    }

    if !s.top_sources.is_empty() {
        let top = gauge(
            "ws_guard_source_connections",
            "Connection slots held by the sources holding the most (metrics.top_sources).",
            &["port", "family", "source"],
        )?;
        for (source, port, family, n) in &s.top_sources {
            top.with_label_values(&[
                port.to_string().as_str(),
                family_name(*family),
                source.as_str(),
            ])
            .set(*n as i64);
        }
    }
    let unmatched = IntCounter::with_opts(Opts::new(
        "ws_guard_unmatched_connections_total",
        "Connections established in another network namespace (or on a port DNAT led to) that \
         match no attempt the XDP program admitted: the client's address was rewritten (SNAT, \
         masquerade, a proxy) or the traffic did not pass an attached interface. Charged to no \
         source.",
    ))?;
    unmatched.inc_by(s.unmatched_connections);
    r.register(Box::new(unmatched))?;
    let mode = gauge(
        "ws_guard_syn_cookie_mode",
        "1 while the port is in SYN-cookie mode (new sources judged at the ACK of their \
         cookie), 0 otherwise; setting: the port's syn_cookies (off, on, auto).",
        &["port", "setting"],
    )?;
    let transitions = counter(
        "ws_guard_syn_cookie_transitions_total",
        "Times the port's SYN-cookie mode went on or off (to: on, off).",
        &["port", "to"],
    )?;
    for (port, c) in &s.cookies {
        let port = port.to_string();
        mode.with_label_values(&[port.as_str(), &c.mode.to_string()])
            .set(c.active as i64);
        transitions
            .with_label_values(&[port.as_str(), "on"])
            .inc_by(c.turned_on);
        transitions
            .with_label_values(&[port.as_str(), "off"])
            .inc_by(c.turned_off);
    }
    let took = Gauge::with_opts(Opts::new(
        "ws_guard_scrape_duration_seconds",
        "Time this scrape took to read the kernel's maps.",
    ))?;
    took.set(s.read_seconds);
    r.register(Box::new(took))?;
    Ok(r)
}

/// `s` in the Prometheus text exposition format.
pub fn encode(s: &Snapshot) -> anyhow::Result<String> {
    let r = registry(s).context("building the metric families")?;
    TextEncoder::new()
        .encode_to_string(&r.gather())
        .context("encoding the metrics")
}

/// What the endpoint needs: the guard (or the daemon's state holding it) and how many sources
/// to export.
pub struct Endpoint<G = Guard> {
    pub guard: Arc<Mutex<G>>,
    /// `metrics.top_sources`.
    pub top_sources: usize,
}

/// Serializes the scrapes' map walks.
static WALK: Mutex<()> = Mutex::new(());

/// Binds the endpoint's address (before anything is attached, so a taken port fails early).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!(
            "listening for Prometheus on {addr} (change [metrics] listen, or set it to \"off\")"
        )
    })
}

/// Connections the endpoint serves at once. Prometheus needs one; a new connection beyond
/// them closes the oldest one that is not in the middle of a request (see [`serve`]), so file
/// descriptors stay bounded and no number of slow clients keeps a scrape out (SECURITY.md).
pub const MAX_CONNECTIONS: usize = 16;
/// How long a client has to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may stay open. Then it finishes the request in progress and closes,
/// within [`CLOSE_GRACE`]. Prometheus reconnects for its next scrape.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// See [`CONNECTION_LIFETIME`].
pub const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Serves `/metrics` on `listener` until the task is dropped.
///
/// Any local user can connect to the endpoint: at most [`MAX_CONNECTIONS`] are held, and a new
/// one never waits for a place (see [`crate::slots`]), so slow or idle clients cannot keep a
/// scrape out.
pub async fn serve<G: AsRef<Guard> + Send + 'static>(
    listener: TcpListener,
    endpoint: Arc<Endpoint<G>>,
) {
    let slots = Slots::new(MAX_CONNECTIONS, slots::HTTP_HEADER_END);
    if let Err(e) = slots::defer_accept(&listener, HEADER_TIMEOUT) {
        warn!(
            "metrics endpoint: cannot defer accepting connections until their request ({e}); \
             a scrape whose client is slow to write may be closed while others flood the endpoint"
        );
    }
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // E.g. out of file descriptors: wait instead of spinning.
                warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(admitted) = slots.admit(stream.as_raw_fd()) else {
            debug!("metrics endpoint: {peer} closed, {MAX_CONNECTIONS} requests in progress");
            continue;
        };
        let endpoint = endpoint.clone();
        let busy = admitted.busy.clone();
        let stream = admitted.watch(stream);
        let handle = tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let endpoint = endpoint.clone();
                let busy = busy.clone();
                async move {
                    let _answering = busy.start();
                    Ok::<_, Infallible>(respond(&endpoint, &req).await)
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = tokio::time::sleep(CONNECTION_LIFETIME) => {
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(CLOSE_GRACE, conn).await {
                        Ok(r) => r,
                        Err(_) => {
                            debug!("metrics endpoint: connection from {peer}: closed, too slow");
                            return;
                        }
                    }
                }
            };
            if let Err(e) = result {
                debug!("metrics endpoint: connection from {peer}: {e}");
            }
        });
        slots.register(&admitted, handle.abort_handle());
    }
}

async fn respond<G: AsRef<Guard>>(
    endpoint: &Endpoint<G>,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let fixed = {
                let guard = endpoint.guard.lock().unwrap_or_else(|p| p.into_inner());
                read_fixed((*guard).as_ref())
            };
            let top_sources = endpoint.top_sources;
            let body = match fixed {
                // Off the daemon's thread and without its lock; one walk at a time, so
                // parallel scrapes queue instead of multiplying the work.
                Ok(fixed) => tokio::task::spawn_blocking(move || {
                    let _one = WALK.lock().unwrap_or_else(|p| p.into_inner());
                    walk(fixed, top_sources)
                })
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("the scrape's map walk failed: {e}"))),
                Err(e) => Err(e),
            }
            .and_then(|s| encode(&s));
            match body {
                Ok(body) => {
                    let mut r = text(StatusCode::OK, body);
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static(prometheus::TEXT_FORMAT),
                    );
                    r
                }
                Err(e) => {
                    warn!("metrics endpoint: {e:#}");
                    text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n"))
                }
            }
        }
        "/" => text(
            StatusCode::OK,
            "ws-guard: metrics at /metrics (Prometheus text format)\n".into(),
        ),
        _ => text(StatusCode::NOT_FOUND, "not found: try /metrics\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use ws_guard_common::maps::AF_INET;

    fn counts(entries: &[(Counter, u64)]) -> [u64; Counter::COUNT as usize] {
        let mut out = [0; Counter::COUNT as usize];
        for (c, n) in entries {
            out[*c as usize] += n;
        }
        out
    }

    /// A snapshot with known values in every family.
    fn known() -> Snapshot {
        let mut stats = Stats::default();
        stats.ports.insert(
            (9000, AF_INET),
            counts(&[
                (Counter::Admitted, 7),
                (Counter::ConnLimited, 3),
                (Counter::RateLimited, 2),
                (Counter::RstSent, 3),
                (Counter::ProtectedOther, 40),
                (Counter::Established, 6),
                (Counter::Closed, 4),
                (Counter::Malformed, 1),
            ]),
        );
        stats.ports.insert(
            (9000, AF_INET6),
            counts(&[(Counter::Admitted, 1), (Counter::MonitorWouldBlock, 1)]),
        );
        stats.unattributed = counts(&[
            (Counter::NotProtected, 1000),
            (Counter::Fragments, 5),
            (Counter::Malformed, 2),
            (Counter::Closed, 9),
        ]);
        let mut gauges = BTreeMap::new();
        gauges.insert(
            (9000, AF_INET),
            PortGauges {
                tracked_sources: 2,
                active_connections: 3,
                half_open: 1,
                established: 2,
            },
        );
        gauges.insert((9000, AF_INET6), PortGauges::default());
        Snapshot {
            version: "1.2.3".into(),
            monitor: false,
            attachments: vec![
                AttachState {
                    interface: "eth0".into(),
                    mode: "native",
                    attached: true,
                    tx_errors: Some(7),
                },
                AttachState {
                    interface: "eth1".into(),
                    mode: "generic",
                    attached: false,
                    tx_errors: None,
                },
            ],
            stats,
            gauges,
            maps: vec![
                MapFill {
                    map: names::MAP_SOURCES,
                    entries: 16384,
                    capacity: 65536,
                    bytes: 15_728_640,
                },
                MapFill {
                    map: names::MAP_FLOWS,
                    entries: 0,
                    capacity: 262144,
                    bytes: 35_651_584,
                },
            ],
            top_sources: vec![("198.18.0.9/32".into(), 9000, AF_INET, 3)],
            bans_active: 2,
            list_entries: vec![("allow", 1), ("deny", 3)],
            unmatched_connections: 4,
            read_seconds: 0.25,
            cookies: [(
                9000,
                crate::cookies::PortCookies {
                    mode: crate::config::CookieMode::Auto,
                    active: true,
                    turned_on: 2,
                    turned_off: 1,
                },
            )]
            .into(),
        }
    }

    /// The sample lines (no comments), for exact comparisons.
    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn known_values_give_exact_samples() {
        let text = encode(&known()).unwrap();
        let got = samples(&text);
        for want in [
            r#"ws_guard_build_info{version="1.2.3"} 1"#,
            r#"ws_guard_xdp_attached{interface="eth0",mode="native"} 1"#,
            r#"ws_guard_xdp_attached{interface="eth1",mode="generic"} 0"#,
            r#"ws_guard_xdp_tx_errors_total{interface="eth0"} 7"#,
            "ws_guard_monitor_mode 0",
            r#"ws_guard_decisions_total{family="ipv4",port="9000",reason="admitted"} 7"#,
            r#"ws_guard_decisions_total{family="ipv4",port="9000",reason="conn_limited"} 3"#,
            r#"ws_guard_decisions_total{family="ipv4",port="9000",reason="rate_limited"} 2"#,
            r#"ws_guard_decisions_total{family="ipv4",port="9000",reason="syn_retransmits"} 0"#,
            r#"ws_guard_decisions_total{family="ipv4",port="9000",reason="map_full"} 0"#,
            r#"ws_guard_decisions_total{family="ipv6",port="9000",reason="admitted"} 1"#,
            r#"ws_guard_monitor_would_block_total{family="ipv6",port="9000"} 1"#,
            r#"ws_guard_monitor_would_block_total{family="ipv4",port="9000"} 0"#,
            r#"ws_guard_rst_sent_total{family="ipv4",port="9000"} 3"#,
            r#"ws_guard_reject_as_drop_total{family="ipv4",port="9000"} 0"#,
            r#"ws_guard_other_segments_total{family="ipv4",port="9000"} 40"#,
            r#"ws_guard_connection_events_total{event="established",family="ipv4",port="9000"} 6"#,
            r#"ws_guard_connection_events_total{event="closed",family="ipv4",port="9000"} 4"#,
            r#"ws_guard_unjudged_packets_total{reason="not_protected"} 1000"#,
            r#"ws_guard_unjudged_packets_total{reason="fragments"} 5"#,
            r#"ws_guard_fragments_total{family="ipv4",port="9000"} 0"#,
            // 2 unattributed + 1 of port 9000.
            r#"ws_guard_unjudged_packets_total{reason="malformed"} 3"#,
            r#"ws_guard_tracked_sources{family="ipv4",port="9000"} 2"#,
            r#"ws_guard_active_connections{family="ipv4",port="9000"} 3"#,
            r#"ws_guard_half_open_connections{family="ipv4",port="9000"} 1"#,
            r#"ws_guard_established_connections{family="ipv4",port="9000"} 2"#,
            r#"ws_guard_active_connections{family="ipv6",port="9000"} 0"#,
            r#"ws_guard_map_entries{map="WSG_SOURCES"} 16384"#,
            r#"ws_guard_map_capacity{map="WSG_SOURCES"} 65536"#,
            r#"ws_guard_map_fill_ratio{map="WSG_SOURCES"} 0.25"#,
            r#"ws_guard_map_fill_ratio{map="WSG_FLOWS"} 0"#,
            r#"ws_guard_map_memory_bytes{map="WSG_SOURCES"} 15728640"#,
            r#"ws_guard_map_memory_bytes{map="WSG_FLOWS"} 35651584"#,
            "ws_guard_bans_active 2",
            r#"ws_guard_list_entries{list="allow"} 1"#,
            r#"ws_guard_list_entries{list="deny"} 3"#,
            r#"ws_guard_decisions_total{family="ipv4",port="9000",reason="banned"} 0"#,
            r#"ws_guard_ban_events_total{event="bans_started",family="ipv4",port="9000"} 0"#,
            r#"ws_guard_source_connections{family="ipv4",port="9000",source="198.18.0.9/32"} 3"#,
            "ws_guard_unmatched_connections_total 4",
            "ws_guard_scrape_duration_seconds 0.25",
            r#"ws_guard_syn_cookie_mode{port="9000",setting="auto"} 1"#,
            r#"ws_guard_syn_cookie_transitions_total{port="9000",to="on"} 2"#,
            r#"ws_guard_syn_cookie_transitions_total{port="9000",to="off"} 1"#,
            r#"ws_guard_syn_cookies_total{event="cookies_sent",family="ipv4",port="9000"} 0"#,
        ] {
            assert!(got.contains(&want), "missing {want:?} in\n{text}");
        }
        // 8 decisions, 4 per-port counters, 5 connection and 4 ban events per port and family;
        // 3 unjudged.
        let n = |prefix: &str| got.iter().filter(|l| l.starts_with(prefix)).count();
        assert_eq!(n("ws_guard_decisions_total{"), 16);
        assert_eq!(n("ws_guard_connection_events_total{"), 10);
        assert_eq!(n("ws_guard_ban_events_total{"), 8);
        assert_eq!(n("ws_guard_unjudged_packets_total{"), 3);
        assert_eq!(n("ws_guard_source_connections{"), 1);
        // Unattributed closes are not reported per port.
        assert!(!text.contains("port=\"\""), "{text}");
    }

    #[test]
    fn every_family_is_typed_and_named() {
        let text = encode(&known()).unwrap();
        let mut names = BTreeMap::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                names.insert(name.to_owned(), kind.to_owned());
            }
        }
        let listed: BTreeMap<String, String> = METRIC_NAMES
            .iter()
            .map(|n| {
                let kind = if n.ends_with("_total") {
                    "counter"
                } else {
                    "gauge"
                };
                (n.to_string(), kind.to_owned())
            })
            .collect();
        assert_eq!(names, listed, "METRIC_NAMES must list what is exposed");
        for l in samples(&text) {
            let name = l.split(['{', ' ']).next().unwrap();
            assert!(names.contains_key(name), "{l}");
        }
    }

    #[test]
    fn top_sources_are_off_when_empty_and_labelled_when_on() {
        let mut s = known();
        s.top_sources.clear();
        let text = encode(&s).unwrap();
        assert!(!text.contains("ws_guard_source_connections"), "{text}");
        let g = GlobalConfig {
            ipv6_prefix: 56,
            ..GlobalConfig::default()
        };
        let mut key = SourceKey {
            family: AF_INET6,
            port: 9000,
            ..Default::default()
        };
        key.addr[..8].copy_from_slice(&[0x20, 0x01, 0, 2, 0, 0, 0x01, 0]);
        assert_eq!(source_label(&key, &g), "2001:2:0:100::/56");
        let mut key4 = SourceKey {
            family: ws_guard_common::maps::AF_INET,
            port: 9000,
            ..Default::default()
        };
        key4.addr[..4].copy_from_slice(&[198, 18, 3, 0]);
        assert_eq!(source_label(&key4, &g), "198.18.3.0/32");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut s = known();
        s.attachments[0].interface = "we\"ird\\".into();
        let text = encode(&s).unwrap();
        assert!(
            text.contains(r#"interface="we\"ird\\""#),
            "label value not escaped:\n{text}"
        );
    }
}
