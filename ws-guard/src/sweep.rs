//! Keeps the accounting in step with the kernel's socket table. The tracepoint sees every
//! established connection and every close; the sweep handles what no socket event reports:
//! an admitted SYN that never became a socket (no listener, a backlog drop, a client that
//! reset the handshake, SYN cookies), a request socket the kernel gave up on, connections that
//! existed before ws-guard, and idle counters. Each change goes through the control program, so
//! it is atomic with respect to the XDP program and the tracepoint.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::Context as _;
use procfs::{
    FromBufReadSI as _,
    net::{TcpNetEntries, TcpState},
};
use ws_guard_common::maps::{
    AF_INET, AF_INET6, ControlOp, FLAG_CHECK_FLOWS, FlowKey, OP_ADOPT, OP_CLEAR_STALE,
    OP_EXPIRE_PENDING, OP_RELEASE_OWNED, OP_TRANSLATE, SourceKey,
};
use ws_guard_common::{names, rate};

pub use crate::bans::monotonic_ns;
use crate::{guard::Guard, netns};

/// A half-open attempt younger than this is left alone: its SYN may still be on its way up the
/// stack, so the absence of a socket means nothing yet.
pub const GRACE: Duration = Duration::from_secs(1);

/// What one sweep changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Half-open attempts released.
    pub expired: u32,
    /// Established connections released because their socket was gone.
    pub released: u32,
    /// Connections counted that the programs had not seen.
    pub adopted: u32,
    /// Source entries removed that held nothing (no connection, no attempt in the window).
    pub idle_removed: u32,
    /// Half-open attempts found established behind DNAT and tracked under their socket's tuple.
    pub translated: u32,
    /// Connections newly found in another namespace (or on a port DNAT led to) that match no
    /// attempt the XDP program admitted: charged to no one (see README, "Deploying with
    /// containers").
    pub unmatched: u32,
    /// `FLAG_CHECK_FLOWS` was cleared: every tracked flow's source key is current again.
    pub flow_check_cleared: bool,
    /// Half-open attempts per protected (wire) port when the sweep read them: what `auto`
    /// cookie mode watches (crate::cookies).
    pub half_open: std::collections::BTreeMap<u16, u64>,
    /// Per wire port, attempts admitted at the ACK of their SYN cookie that never got a socket
    /// (released now): crate::cookies turns cookie mode off for a port where that is common.
    pub cookies_lost: std::collections::BTreeMap<u16, u64>,
}

/// A socket of the table, keyed like the programs key flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketKind {
    /// A request socket: the handshake is under way.
    HalfOpen,
    /// A full socket.
    Connected,
}

/// One server-side socket and where it lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Socket {
    pub kind: SocketKind,
    /// Its network namespace ([`netns::Namespace::id`]).
    pub namespace: u64,
    /// In the daemon's own namespace.
    pub own: bool,
}

/// A client's end of a connection: what DNAT leaves unchanged (it rewrites the server's).
pub type Endpoint = (u16, [u8; 16], u16);

/// The client endpoint of `flow`.
pub fn endpoint(flow: &FlowKey) -> Endpoint {
    (flow.family, flow.client, flow.client_port)
}

/// The server-side TCP sockets of every network namespace that matter to the sweep.
#[derive(Debug, Default)]
pub struct SocketTable {
    pub sockets: HashMap<FlowKey, Socket>,
    /// The sockets of each client endpoint.
    pub by_endpoint: HashMap<Endpoint, Vec<FlowKey>>,
}

/// The sockets, in every network namespace, that are on one of `ports` or whose client
/// endpoint is one of `endpoints` (those of the tracked flows: a socket behind DNAT is found by
/// its client's address and port, whatever its own).
pub fn socket_table(
    ports: &HashSet<u16>,
    endpoints: &HashSet<Endpoint>,
) -> anyhow::Result<SocketTable> {
    let mut out = SocketTable::default();
    let si = procfs::current_system_info();
    let namespaces = netns::tables().context("reading the network namespaces' socket tables")?;
    for ns in &namespaces {
        for (file, text) in [("tcp", Some(&ns.tcp)), ("tcp6", ns.tcp6.as_ref())] {
            // No IPv6 in that namespace.
            let Some(text) = text else { continue };
            let entries = TcpNetEntries::from_buf_read(&text[..], si)
                .with_context(|| format!("parsing net/{file}"))?;
            for e in entries.0 {
                let kind = match e.state {
                    TcpState::SynRecv | TcpState::NewSynRecv => SocketKind::HalfOpen,
                    // Released at CLOSE by the tracepoint, which comes before TIME_WAIT.
                    TcpState::Listen | TcpState::TimeWait | TcpState::Close => continue,
                    _ => SocketKind::Connected,
                };
                let flow = flow_key(e.local_address, e.remote_address);
                if !ports.contains(&flow.server_port) && !endpoints.contains(&endpoint(&flow)) {
                    continue;
                }
                let socket = Socket {
                    kind,
                    namespace: ns.id,
                    own: ns.own,
                };
                // The first namespace that has it wins (the daemon's own comes first).
                if let std::collections::hash_map::Entry::Vacant(v) = out.sockets.entry(flow) {
                    v.insert(socket);
                    out.by_endpoint
                        .entry(endpoint(&flow))
                        .or_default()
                        .push(flow);
                }
            }
        }
    }
    Ok(out)
}

/// The flow key of a server socket, normalizing IPv4-mapped IPv6 to IPv4 as the XDP program
/// sees it on the wire.
pub fn flow_key(local: SocketAddr, remote: SocketAddr) -> FlowKey {
    let (family, server) = addr_bytes(local);
    let (_, client) = addr_bytes(remote);
    FlowKey {
        client,
        server,
        client_port: remote.port(),
        server_port: local.port(),
        family,
        _pad: 0,
    }
}

fn addr_bytes(a: SocketAddr) -> (u16, [u8; 16]) {
    let ip = a.ip().to_canonical();
    let mut out = [0u8; 16];
    match ip {
        std::net::IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            (AF_INET, out)
        }
        std::net::IpAddr::V6(v6) => (AF_INET6, v6.octets()),
    }
}

/// Keeps what one periodic sweep learned for the next.
///
/// Neither the maps nor the socket tables can be read atomically, and the kernel may skip a
/// socket of a table when connections close while it is read. So a periodic sweep acts
/// only on what two sweeps in a row agree on:
/// - a connected socket the maps do not know is counted (or reported as unmatched) when the
///   previous sweep did not know it either (it may be a connection established and closed
///   between the two reads: counting it at once would charge its source for a connection that
///   is gone);
/// - a tracked connection without a socket is released when the previous sweep found none
///   either (a socket skipped by one read must not lose its count).
///
/// Start-up, before the XDP program sees a SYN, acts at once.
#[derive(Debug, Default)]
pub struct Sweeper {
    suspects: Rounds,
    /// (namespace, port) pairs where DNAT led admitted attempts: besides the protected ports,
    /// where connections that match no admitted attempt are looked for.
    targets: HashSet<(u64, u16)>,
    /// Unmatched connections already reported, so each is counted once.
    reported: HashSet<FlowKey>,
}

/// The most (namespace, port) pairs [`Sweeper`] remembers as DNAT targets.
const MAX_TARGETS: usize = 4096;

/// The flows one sweep found suspect, for the next to confirm.
#[derive(Debug, Default)]
struct Rounds {
    /// Connected sockets of the daemon's namespace on a protected port the maps did not know.
    unknown: HashSet<FlowKey>,
    /// Connected sockets elsewhere (or on a DNAT target port) that match no tracked flow.
    unmatched: HashSet<FlowKey>,
    /// Tracked flows (half-open or established) the socket tables did not have.
    missing: HashSet<FlowKey>,
    /// The prefixes (IPv4, IPv6) in force when this sweep found `FLAG_CHECK_FLOWS` set.
    flow_check: Option<(u32, u32)>,
}

impl Sweeper {
    /// One periodic round: see [`sweep`].
    pub fn run(
        &mut self,
        guard: &mut Guard,
        handshake_timeout: Duration,
    ) -> anyhow::Result<SweepReport> {
        let report = sweep(guard, handshake_timeout, Some(self))?;
        guard.unmatched_connections += u64::from(report.unmatched);
        Ok(report)
    }
}

/// The start-up sweep, before the XDP program is attached: counts every connection that
/// already exists at once (see [`sweep`]).
pub fn sweep_now(guard: &mut Guard, handshake_timeout: Duration) -> anyhow::Result<SweepReport> {
    sweep(guard, handshake_timeout, None)
}

/// Brings the maps in step with the kernel's socket tables, of every network namespace, read
/// after the maps (so a connection tracked when the maps were read and established since is
/// known):
///
/// - a half-open attempt whose tuple no socket has, but whose client endpoint an untracked
///   socket has (DNAT rewrote the server's address or port on the way to the socket, often in
///   a container's namespace), is that socket's: once the socket is connected the attempt is
///   tracked under the socket's tuple ([`OP_TRANSLATE`]), so its close gives the slot back;
/// - a half-open attempt at least [`GRACE`] old without any socket is released, and so is one
///   older than `handshake_timeout` whatever the kernel still has;
/// - an established connection at least [`GRACE`] old without a socket is released (its close
///   was not seen, e.g. it ended while the programs were being replaced);
/// - a connected socket the maps do not know, in the daemon's namespace on a protected port,
///   is counted; at start-up also in other namespaces, unless its client is an address of this
///   host (a masqueraded or local connection that no attached interface admits); otherwise one
///   in another namespace (on a protected port, or a port DNAT led to) is reported as
///   unmatched and charged to no one;
/// - `FLAG_CHECK_FLOWS` is cleared once every tracked flow's source key is current;
/// - counters at zero are removed when the counter map is more than half full.
///
/// Without `state` (start-up) at once; otherwise a release or a count needs the previous
/// round to have found the same (see [`Sweeper`]).
fn sweep(
    guard: &mut Guard,
    handshake_timeout: Duration,
    mut state: Option<&mut Sweeper>,
) -> anyhow::Result<SweepReport> {
    let pending = guard.pending()?;
    let owned = guard.owned()?;
    let ports: HashSet<u16> = guard.ports()?.into_iter().map(|(p, _)| p).collect();
    let known: HashSet<FlowKey> = pending
        .iter()
        .chain(owned.iter())
        .map(|(k, _)| *k)
        .collect();
    let endpoints: HashSet<Endpoint> = known.iter().map(endpoint).collect();
    let table = socket_table(&ports, &endpoints)?;
    let now = monotonic_ns();
    // Ages in milliseconds, as the flows are stamped.
    let grace = GRACE.as_millis() as u32;
    let timeout = u32::try_from(handshake_timeout.as_millis()).unwrap_or(u32::MAX);
    let mut report = SweepReport::default();
    for (flow, _) in &pending {
        *report.half_open.entry(flow.server_port).or_default() += 1;
    }

    // The socket of each attempt whose tuple DNAT rewrote: an untracked socket with its client
    // endpoint, the one on the same port first. Each socket is one attempt's at most.
    let mut partners: HashMap<FlowKey, FlowKey> = HashMap::new();
    let mut taken: HashSet<FlowKey> = HashSet::new();
    for (wire, _) in &pending {
        if table.sockets.contains_key(wire) {
            continue;
        }
        let Some(candidates) = table.by_endpoint.get(&endpoint(wire)) else {
            continue;
        };
        let free = || {
            candidates
                .iter()
                .filter(|s| !known.contains(s) && !taken.contains(s))
        };
        let chosen = free()
            .find(|s| s.server_port == wire.server_port)
            .or_else(|| free().next())
            .copied();
        if let Some(socket) = chosen {
            taken.insert(socket);
            partners.insert(*wire, socket);
        }
    }

    let missing: HashSet<FlowKey> = known
        .iter()
        .filter(|flow| !table.sockets.contains_key(flow) && !partners.contains_key(flow))
        .copied()
        .collect();
    let previous = state.as_deref().map(|s| &s.suspects);
    let confirmed_missing = |flow: &FlowKey| match previous {
        None => true,
        Some(r) => r.missing.contains(flow),
    };

    let mut translated_to = Vec::new();
    for (flow, v) in &pending {
        if let Some(socket) = partners.get(flow) {
            let s = table.sockets[socket];
            if s.kind == SocketKind::Connected {
                if guard.control(translate(*flow, *socket))? {
                    report.translated += 1;
                    translated_to.push((s.namespace, socket.server_port));
                }
                continue;
            }
        }
        // Stamped a moment after `now` (its last SYN): as young as can be.
        let age = v.age_ms(now).max(0) as u32;
        let gone = age >= grace && missing.contains(flow) && confirmed_missing(flow);
        if (gone || age >= timeout) && guard.control(op(OP_EXPIRE_PENDING, *flow))? {
            report.expired += 1;
            // Admitted at the ACK of its SYN cookie, yet no socket anywhere: the kernel did not
            // take the cookie (the connection went on to another namespace by DNAT, where it
            // is not valid, or the accept queue was full).
            if gone && guard.cookie_used(flow)? {
                *report.cookies_lost.entry(flow.server_port).or_default() += 1;
            }
        }
    }
    for (flow, v) in &owned {
        // Negative: established a moment after `now`, or more than 24.8 days ago (the
        // millisecond clock wrapped); the socket table read twice decides either way.
        let age = u32::try_from(v.age_ms(now)).unwrap_or(u32::MAX);
        if age >= grace
            && missing.contains(flow)
            && confirmed_missing(flow)
            && guard.control(op(OP_RELEASE_OWNED, *flow))?
        {
            report.released += 1;
        }
    }

    let targets = state.as_deref().map(|s| &s.targets);
    let is_target = |ns: u64, port: u16| targets.is_some_and(|t| t.contains(&(ns, port)));
    let mut unknown = HashSet::new();
    let mut unmatched = HashSet::new();
    let host = if state.is_none() {
        local_addresses()
    } else {
        HashSet::new()
    };
    for (flow, s) in &table.sockets {
        if s.kind != SocketKind::Connected || known.contains(flow) || taken.contains(flow) {
            continue;
        }
        let protected = ports.contains(&flow.server_port);
        if protected && (s.own || (state.is_none() && !host.contains(&client_ip(flow)))) {
            unknown.insert(*flow);
        } else if protected || is_target(s.namespace, flow.server_port) {
            unmatched.insert(*flow);
        }
    }
    let adopt: Vec<FlowKey> = match state.as_deref_mut() {
        None => unknown.into_iter().collect(),
        Some(st) => {
            let confirmed = unknown
                .intersection(&st.suspects.unknown)
                .copied()
                .collect();
            let confirmed_unmatched: HashSet<FlowKey> = unmatched
                .intersection(&st.suspects.unmatched)
                .copied()
                .collect();
            report.unmatched = confirmed_unmatched.difference(&st.reported).count() as u32;
            st.reported = confirmed_unmatched;
            st.suspects.unknown = unknown;
            st.suspects.unmatched = unmatched;
            st.suspects.missing = missing;
            if st.targets.len() + translated_to.len() > MAX_TARGETS {
                st.targets.clear();
            }
            st.targets.extend(translated_to);
            confirmed
        }
    };
    for flow in adopt {
        if guard.control(op(OP_ADOPT, flow))? {
            report.adopted += 1;
        }
    }
    report.flow_check_cleared = settle_flow_check(guard, state.map(|s| &mut s.suspects))?;
    reclaim_sources(guard, &mut report)?;
    Ok(report)
}

/// Reclaims the source entries that hold nothing (no connection, no flow in the filter) and
/// whose rate window has no attempt left in it; clears rate stamps about to wrap in the entries
/// that stay. An entry that holds nothing costs a map entry, nothing else; removing one can race
/// with a SYN of that source (the XDP program increments an entry being deleted), so they are
/// only reclaimed when the map is more than half full. Above nine tenths, an entry's rate
/// window does not keep it (the least recent attempts are forgotten first, as an LRU map
/// would): a flood of new sources must not lock new sources out for a whole window.
pub fn reclaim_sources(guard: &mut Guard, report: &mut SweepReport) -> anyhow::Result<()> {
    let capacity = guard.capacity(names::MAP_SOURCES)? as usize;
    let states = guard.source_states()?;
    let now = monotonic_ns();
    for (key, s) in &states {
        if s.rate().has_stale(now) {
            guard.control(ControlOp {
                op: OP_CLEAR_STALE,
                source: *key,
                ..ControlOp::default()
            })?;
        }
    }
    if states.len() <= capacity / 2 {
        return Ok(());
    }
    let windows: HashMap<u16, u32> = guard
        .ports()?
        .into_iter()
        .filter(|(_, p)| p.rate_limit != 0)
        .map(|(n, p)| (n, rate::window_ms(p.rate_window_ns)))
        .collect();
    let mut idle: Vec<(u32, SourceKey)> = states
        .iter()
        .filter(|(_, s)| s.holds_nothing())
        .map(|(k, s)| (s.rate().newest_age_ms(now).unwrap_or(u32::MAX), *k))
        .collect();
    // Oldest newest attempt first.
    idle.sort_unstable_by_key(|a| std::cmp::Reverse(a.0));
    let mut len = states.len();
    for (age, key) in idle {
        let window = windows.get(&key.port).copied().unwrap_or(0);
        let pressed = len > capacity / 10 * 9;
        if age <= window && !pressed {
            continue;
        }
        let min_age = if pressed { 0 } else { window + 1 };
        if guard.remove_idle_source(&key, min_age)? {
            report.idle_removed += 1;
            len -= 1;
        }
    }
    Ok(())
}

/// Clears `FLAG_CHECK_FLOWS` (set when a prefix changed) once every tracked flow is charged to
/// its current source key ([`Guard::settle_flow_check`]); true if it cleared it. A periodic
/// sweep only tries when the previous round saw the flag with the same prefixes, so no XDP run
/// that read the older prefixes can still be inserting a flow. The start-up sweep leaves it to
/// them (a previous daemon's program may still be attached while the config is applied).
fn settle_flow_check(guard: &mut Guard, rounds: Option<&mut Rounds>) -> anyhow::Result<bool> {
    let g = guard.global()?;
    if g.flags & FLAG_CHECK_FLOWS == 0 {
        if let Some(r) = rounds {
            r.flow_check = None;
        }
        return Ok(false);
    }
    let prefixes = (g.ipv4_prefix, g.ipv6_prefix);
    let ready = match rounds {
        None => false,
        Some(r) => r.flow_check.replace(prefixes) == Some(prefixes),
    };
    Ok(ready && guard.settle_flow_check()?)
}

fn op(code: u32, flow: FlowKey) -> ControlOp {
    ControlOp {
        op: code,
        flow,
        ..Default::default()
    }
}

fn translate(wire: FlowKey, socket: FlowKey) -> ControlOp {
    ControlOp {
        socket,
        ..op(OP_TRANSLATE, wire)
    }
}

fn client_ip(flow: &FlowKey) -> IpAddr {
    if flow.family == AF_INET {
        let c = flow.client;
        IpAddr::from([c[0], c[1], c[2], c[3]])
    } else {
        IpAddr::from(flow.client)
    }
}

/// The addresses of the daemon's network namespace (loopback included): a connection from one
/// of them to a container is the host's own, or masqueraded, never one an attached interface
/// admitted.
fn local_addresses() -> HashSet<IpAddr> {
    let mut out = HashSet::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below; each entry is read while the list lives.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut p = list;
        while !p.is_null() {
            let addr = (*p).ifa_addr;
            if !addr.is_null() {
                match (*addr).sa_family as i32 {
                    libc::AF_INET => {
                        let a = &*addr.cast::<libc::sockaddr_in>();
                        out.insert(IpAddr::from(u32::from_be(a.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let a = &*addr.cast::<libc::sockaddr_in6>();
                        out.insert(IpAddr::from(a.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_sockets_key_as_ipv4() {
        let local: SocketAddr = "[::ffff:198.18.0.1]:9000".parse().unwrap();
        let remote: SocketAddr = "[::ffff:198.18.0.2]:40000".parse().unwrap();
        let k = flow_key(local, remote);
        assert_eq!(k.family, AF_INET);
        assert_eq!(&k.server[..4], &[198, 18, 0, 1]);
        assert_eq!(&k.client[..4], &[198, 18, 0, 2]);
        assert_eq!(&k.client[4..], &[0; 12]);
        assert_eq!((k.client_port, k.server_port), (40000, 9000));
        let local: SocketAddr = "[2001:2::1]:9000".parse().unwrap();
        let remote: SocketAddr = "[2001:2::2]:40000".parse().unwrap();
        assert_eq!(flow_key(local, remote).family, AF_INET6);
    }
}
