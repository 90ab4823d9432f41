//! Keeps the accounting in step with the kernel's socket table. The tracepoint sees every
//! established connection and every close; the sweep handles what no socket event reports:
//! an admitted SYN that never became a socket (no listener, a backlog drop, a client that
//! reset the handshake, SYN cookies), a request socket the kernel gave up on, connections that
//! existed before ws-guard, and idle counters. Each change goes through the control program, so
//! it is atomic with respect to the XDP program and the tracepoint.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    time::Duration,
};

use anyhow::Context as _;
use procfs::{
    FromBufReadSI as _,
    net::{TcpNetEntries, TcpState},
};
use ws_guard_common::maps::{
    AF_INET, AF_INET6, ControlOp, FLAG_CHECK_FLOWS, FlowKey, OP_ADOPT, OP_EXPIRE_PENDING,
    OP_RELEASE_OWNED,
};
use ws_guard_common::names;

use crate::guard::Guard;

/// A half-open attempt younger than this is left alone: its SYN may still be on its way up the
/// stack, so the absence of a socket means nothing yet.
pub const GRACE: Duration = Duration::from_secs(1);

/// What one sweep changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Half-open attempts released.
    pub expired: u32,
    /// Established connections released because their socket was gone.
    pub released: u32,
    /// Connections counted that the programs had not seen.
    pub adopted: u32,
    /// Zero counters removed.
    pub idle_removed: u32,
    /// `FLAG_CHECK_FLOWS` was cleared: every tracked flow's source key is current again.
    pub flow_check_cleared: bool,
}

/// A socket of the table, keyed like the programs key flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketKind {
    /// A request socket: the handshake is under way.
    HalfOpen,
    /// A full socket.
    Connected,
}

/// The server-side TCP sockets on `ports` in the calling thread's network namespace.
pub fn socket_table(ports: &HashSet<u16>) -> anyhow::Result<HashMap<FlowKey, SocketKind>> {
    let mut out = HashMap::new();
    let si = procfs::current_system_info();
    // thread-self: the namespace of this thread, which is the one the daemon attached in.
    for file in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        let text = match read_whole(file) {
            Ok(t) => t,
            // No IPv6 in this kernel or namespace.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {file}")),
        };
        let entries = TcpNetEntries::from_buf_read(&text[..], si)
            .with_context(|| format!("parsing {file}"))?;
        for e in entries.0 {
            if !ports.contains(&e.local_address.port()) {
                continue;
            }
            let kind = match e.state {
                TcpState::SynRecv | TcpState::NewSynRecv => SocketKind::HalfOpen,
                // Released at CLOSE by the tracepoint, which comes before TIME_WAIT.
                TcpState::Listen | TcpState::TimeWait | TcpState::Close => continue,
                _ => SocketKind::Connected,
            };
            out.insert(flow_key(e.local_address, e.remote_address), kind);
        }
    }
    Ok(out)
}

/// Reads a /proc/net table in as few read(2) calls as possible. The kernel produces it in
/// chunks, one per read, and finds where the next chunk starts by counting sockets again:
/// sockets that close meanwhile shift the count, and a live socket can be skipped. Big reads
/// make that rare; the sweep's two-round rule (see [`Sweeper`]) makes it harmless.
fn read_whole(path: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    // read_to_end doubles its reads while they come back full: a handful of read(2) calls.
    let mut buf = Vec::with_capacity(1 << 20);
    std::fs::File::open(path)?.read_to_end(&mut buf)?;
    Ok(buf)
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

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Keeps what one periodic sweep learned for the next.
///
/// Neither the maps nor the socket table can be read atomically, and the kernel may skip a
/// socket of the table when connections close while it is read. So a periodic sweep acts
/// only on what two sweeps in a row agree on:
/// - a connected socket the maps do not know is counted when the previous sweep did not know
///   it either (it may be a connection established and closed between the two reads: counting
///   it at once would charge its source for a connection that is gone);
/// - a tracked connection without a socket is released when the previous sweep found none
///   either (a socket skipped by one read must not lose its count).
///
/// Start-up, before the XDP program sees a SYN, acts at once.
#[derive(Debug, Default)]
pub struct Sweeper {
    suspects: Rounds,
}

/// The flows one sweep found suspect, for the next to confirm.
#[derive(Debug, Default)]
struct Rounds {
    /// Connected sockets the maps did not know.
    unknown: HashSet<FlowKey>,
    /// Tracked flows (half-open or established) the socket table did not have.
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
        sweep(guard, handshake_timeout, Some(&mut self.suspects))
    }
}

/// The start-up sweep, before the XDP program is attached: counts every connection that
/// already exists at once (see [`sweep`]).
pub fn sweep_now(guard: &mut Guard, handshake_timeout: Duration) -> anyhow::Result<SweepReport> {
    sweep(guard, handshake_timeout, None)
}

/// Brings the maps in step with the kernel's socket table, read after the maps (so a
/// connection tracked when the maps were read and established since is known):
///
/// - a half-open attempt at least [`GRACE`] old without any socket is released, and so is one
///   older than `handshake_timeout` whatever the kernel still has;
/// - an established connection at least [`GRACE`] old without a socket is released (its close
///   was not seen, e.g. it ended while the programs were being replaced);
/// - a connected socket the maps do not know is counted;
/// - `FLAG_CHECK_FLOWS` is cleared once every tracked flow's source key is current;
/// - counters at zero are removed when the counter map is more than half full.
///
/// Without `rounds` (start-up) at once; otherwise a release or a count needs the previous
/// round to have found the same (see [`Sweeper`]).
fn sweep(
    guard: &mut Guard,
    handshake_timeout: Duration,
    rounds: Option<&mut Rounds>,
) -> anyhow::Result<SweepReport> {
    let pending = guard.pending()?;
    let owned = guard.owned()?;
    let ports: HashSet<u16> = guard.ports()?.into_iter().map(|(p, _)| p).collect();
    let sockets = socket_table(&ports)?;
    let now = monotonic_ns();
    let grace = GRACE.as_nanos() as u64;
    let timeout = handshake_timeout.as_nanos() as u64;
    let mut report = SweepReport::default();
    let missing: HashSet<FlowKey> = pending
        .iter()
        .chain(owned.iter())
        .filter(|(flow, _)| !sockets.contains_key(flow))
        .map(|(flow, _)| *flow)
        .collect();
    let confirmed_missing = |flow: &FlowKey| match &rounds {
        None => true,
        Some(r) => r.missing.contains(flow),
    };

    for (flow, v) in &pending {
        let age = now.saturating_sub(v.since_ns);
        let gone = age >= grace && missing.contains(flow) && confirmed_missing(flow);
        if (gone || age >= timeout) && guard.control(op(OP_EXPIRE_PENDING, *flow))? {
            report.expired += 1;
        }
    }
    for (flow, v) in &owned {
        let age = now.saturating_sub(v.since_ns);
        if age >= grace
            && missing.contains(flow)
            && confirmed_missing(flow)
            && guard.control(op(OP_RELEASE_OWNED, *flow))?
        {
            report.released += 1;
        }
    }
    let known: HashSet<FlowKey> = pending
        .iter()
        .chain(owned.iter())
        .map(|(k, _)| *k)
        .collect();
    let unknown: HashSet<FlowKey> = sockets
        .iter()
        .filter(|(flow, kind)| **kind == SocketKind::Connected && !known.contains(flow))
        .map(|(flow, _)| *flow)
        .collect();
    let mut rounds = rounds;
    let adopt: Vec<FlowKey> = match rounds.as_deref_mut() {
        None => unknown.into_iter().collect(),
        Some(rounds) => {
            let confirmed = unknown.intersection(&rounds.unknown).copied().collect();
            rounds.unknown = unknown;
            rounds.missing = missing;
            confirmed
        }
    };
    for flow in adopt {
        if guard.control(op(OP_ADOPT, flow))? {
            report.adopted += 1;
        }
    }
    report.flow_check_cleared = settle_flow_check(guard, rounds)?;
    // A zero counter costs a map entry, nothing else; removing one can race with a SYN of that
    // source (the XDP program increments an entry being deleted), so only reclaim them when
    // the map is more than half full.
    let capacity = guard.capacity(names::MAP_CONNS)? as usize;
    let idle = guard.idle_sources()?;
    if idle.len() + guard.connections()?.len() > capacity / 2 {
        for key in idle {
            guard.remove_idle_source(&key)?;
            report.idle_removed += 1;
        }
    }
    Ok(report)
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
