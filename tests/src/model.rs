//! A host-side reference model of the XDP limiter (`ws-guard-ebpf/src/xdp.rs`) and of the
//! accounting requests of the control program (`control.rs`, `accounting.rs`), for differential
//! testing against the real programs run with BPF_PROG_TEST_RUN.
//!
//! The model decides with the same `ws-guard-common` code the kernel runs (the parser, the
//! source-key masking, the rate window, the RST builder) and keeps its own state in plain Rust
//! maps: half-open and established flows, live-connection counters, rate windows, the limits of
//! each port, the global settings and the decision counters per stats bucket. Each step follows
//! the kernel program branch by branch, in the same order, with the same side effects (a slot is
//! taken before the rate check and given back when refused, a counter is created at zero on the
//! first attempt of a source, monitor mode skips the rate over `max_connections`...).
//!
//! Time is the one input the model cannot know: the kernel stamps each run with
//! `bpf_ktime_get_ns`. The model asks a [`Clock`] for the stamp of an attempt that reaches the
//! rate rule (the test reads it back from the kernel's rate window, then checks the whole window
//! against the model's), and otherwise records the host's monotonic interval around the run as
//! the bounds of the half-open entry's timestamp.

use std::collections::{BTreeMap, HashMap};

use ws_guard_common::{
    key::{flow_source, source_key},
    maps::{
        ACTION_REJECT, AF_INET, AF_INET6, Counter, FlowKey, GlobalConfig, PortConfig, RATE_SLOTS,
        RateState, SourceKey,
    },
    parse::{self, Packet, Parsed, TcpSegment},
    rst,
};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

const COUNT: usize = Counter::COUNT as usize;

/// Where a counter is added: the bucket of a protected port and family, or the unattributed one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Bucket {
    Unattributed,
    /// (port, family)
    Port(u16, u16),
}

/// When a tracked flow was stamped: exactly (the kernel's stamp, read back from its rate window)
/// or within the host's monotonic interval around the run that stamped it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Since {
    Exact(u64),
    Within(u64, u64),
}

impl Since {
    /// Whether a kernel stamp agrees.
    pub fn admits(&self, ns: u64) -> bool {
        match *self {
            Since::Exact(t) => t == ns,
            Since::Within(lo, hi) => lo <= ns && ns <= hi,
        }
    }
}

/// A tracked flow as the model expects it in `WSG_PENDING` or `WSG_OWNED`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracked {
    pub source: SourceKey,
    pub since: Since,
}

/// The kernel's timestamp of an attempt that reaches the rate rule.
pub trait Clock {
    /// The stamp the kernel used for attempt number `seq` of `key` (it is the stamp the rate
    /// window holds at `seq % RATE_SLOTS` after the run).
    fn rate_stamp(&mut self, key: &SourceKey, seq: u32) -> u64;
}

/// What the model expects of one run of the XDP program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: u32,
    /// The frame as it leaves the program.
    pub frame: Vec<u8>,
    /// Counters added, in order.
    pub counted: Vec<(Bucket, Counter)>,
    /// The source whose rate window the attempt went through, with the stamp it got.
    pub rate: Option<(SourceKey, u64)>,
}

/// Capacities of the maps, as loaded ([`ws_guard::guard::LoadOptions`]).
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    pub sources: usize,
    pub flows: usize,
}

/// The model's state.
#[derive(Clone, Debug)]
pub struct Model {
    pub capacity: Capacity,
    pub global: GlobalConfig,
    /// `WSG_PORTS`, entries written so far (absent: all zeros).
    pub ports: BTreeMap<u16, PortConfig>,
    pub pending: HashMap<FlowKey, Tracked>,
    pub owned: HashMap<FlowKey, Tracked>,
    /// `WSG_CONNS`, zero counters included.
    pub conns: HashMap<SourceKey, u32>,
    /// `WSG_RATE`.
    pub rate: HashMap<SourceKey, RateState>,
    /// Every counter since load (what `Guard::counters` sums).
    pub totals: [u64; COUNT],
    /// Counters of each protected port and family since the port became protected (what
    /// `Guard::stats` reports).
    pub port_stats: BTreeMap<(u16, u16), [u64; COUNT]>,
    /// Counters of no protected port, both families (`Stats::unattributed`).
    pub unattributed: [u64; COUNT],
}

impl Model {
    pub fn new(capacity: Capacity) -> Self {
        Self {
            capacity,
            global: initial_global(),
            ports: BTreeMap::new(),
            pending: HashMap::new(),
            owned: HashMap::new(),
            conns: HashMap::new(),
            rate: HashMap::new(),
            totals: [0; COUNT],
            port_stats: BTreeMap::new(),
            unattributed: [0; COUNT],
        }
    }

    /// `Guard::set_global`.
    pub fn set_global(&mut self, g: GlobalConfig) {
        self.global = g;
    }

    /// `Guard::set_port`: a port that becomes protected starts with zero counters (it gets a
    /// free stats bucket, emptied); one that stops being protected leaves `Guard::stats`.
    pub fn set_port(&mut self, port: u16, limits: PortConfig) {
        let was = self.protected(port).is_some();
        let limits = PortConfig { index: 0, ..limits };
        self.ports.insert(port, limits);
        match (was, limits.enabled != 0) {
            (false, true) => {
                for family in [AF_INET, AF_INET6] {
                    self.port_stats.insert((port, family), [0; COUNT]);
                }
            }
            (true, false) => {
                for family in [AF_INET, AF_INET6] {
                    self.port_stats.remove(&(port, family));
                }
            }
            _ => {}
        }
    }

    /// The limits of `port` if it is protected (`maps::port`).
    pub fn protected(&self, port: u16) -> Option<PortConfig> {
        self.ports.get(&port).copied().filter(|p| p.enabled != 0)
    }

    /// `Bucket::of_flow`.
    fn bucket_of_flow(&self, flow: &FlowKey) -> Bucket {
        match self.protected(flow.server_port) {
            Some(_) => Bucket::Port(flow.server_port, flow.family),
            None => Bucket::Unattributed,
        }
    }

    fn count(&mut self, out: &mut Vec<(Bucket, Counter)>, b: Bucket, c: Counter) {
        out.push((b, c));
        self.totals[c as usize] += 1;
        match b {
            Bucket::Unattributed => self.unattributed[c as usize] += 1,
            Bucket::Port(port, family) => {
                // `Bucket::of` files every family but AF_INET6 in the IPv4 slot.
                let family = if family == AF_INET6 {
                    AF_INET6
                } else {
                    AF_INET
                };
                self.port_stats.entry((port, family)).or_insert([0; COUNT])[c as usize] += 1;
            }
        }
    }

    /// `maps::conns_counter`: the counter of `key`, created at zero; `None` when the map is full.
    fn conns_counter(&mut self, key: &SourceKey) -> Option<SourceKey> {
        if self.conns.contains_key(key) {
            return Some(*key);
        }
        if self.conns.len() >= self.capacity.sources {
            return None;
        }
        self.conns.insert(*key, 0);
        Some(*key)
    }

    /// `maps::take_slot`: the number of slots taken before.
    fn take_slot(&mut self, key: &SourceKey) -> u32 {
        let c = self.conns.get_mut(key).expect("counter exists");
        let before = *c;
        *c = c.wrapping_add(1);
        before
    }

    /// `maps::give_slot`: never below zero.
    fn give_slot(&mut self, key: &SourceKey) {
        let c = self.conns.get_mut(key).expect("counter exists");
        *c = c.saturating_sub(1);
    }

    /// `maps::release`: gives a slot back if the source has a counter.
    fn release(&mut self, key: &SourceKey) {
        if self.conns.contains_key(key) {
            self.give_slot(key);
        }
    }

    /// One run of `wsg_xdp` on `frame`. `during` is the host's monotonic interval around the
    /// kernel's run (the bounds of its timestamp); `clock` gives the exact stamp of an attempt
    /// that reaches the rate rule.
    pub fn xdp(&mut self, frame: &[u8], during: (u64, u64), clock: &mut dyn Clock) -> Outcome {
        let mut out = Outcome {
            verdict: XDP_PASS,
            frame: frame.to_vec(),
            counted: Vec::new(),
            rate: None,
        };
        let counted = &mut Vec::new();
        let seg = match parse::parse(frame) {
            Parsed::Tcp(seg) => seg,
            Parsed::NotIp | Parsed::NotTcp => {
                self.count(counted, Bucket::Unattributed, Counter::NotProtected);
                out.counted = std::mem::take(counted);
                return out;
            }
            Parsed::Fragment => {
                self.count(counted, Bucket::Unattributed, Counter::Fragments);
                out.counted = std::mem::take(counted);
                return out;
            }
            Parsed::Malformed => {
                self.count(counted, Bucket::Unattributed, Counter::Malformed);
                out.counted = std::mem::take(counted);
                return out;
            }
        };
        let Some(port) = self.protected(seg.dport) else {
            self.count(counted, Bucket::Unattributed, Counter::NotProtected);
            out.counted = std::mem::take(counted);
            return out;
        };
        let bucket = Bucket::Port(seg.dport, seg.family);
        if !seg.is_new_attempt() {
            self.count(counted, bucket, Counter::ProtectedOther);
            out.counted = std::mem::take(counted);
            return out;
        }
        let refused =
            self.new_attempt(frame, &seg, &port, bucket, during, clock, counted, &mut out);
        if let Some(action) = refused {
            if action == ACTION_REJECT {
                self.reject(frame, &seg, bucket, counted, &mut out);
            } else {
                out.verdict = XDP_DROP;
            }
        }
        out.counted = std::mem::take(counted);
        out
    }

    /// `new_attempt`: `Some(action)` when refused.
    #[allow(clippy::too_many_arguments)]
    fn new_attempt(
        &mut self,
        frame: &[u8],
        seg: &TcpSegment,
        port: &PortConfig,
        bucket: Bucket,
        during: (u64, u64),
        clock: &mut dyn Clock,
        counted: &mut Vec<(Bucket, Counter)>,
        out: &mut Outcome,
    ) -> Option<u32> {
        let Some((client, server)) = parse::addresses(frame, seg) else {
            self.count(counted, bucket, Counter::Malformed);
            return None;
        };
        let flow = FlowKey {
            client,
            server,
            client_port: seg.sport,
            server_port: seg.dport,
            family: seg.family,
            _pad: 0,
        };
        if let Some(t) = self.pending.get_mut(&flow) {
            // The kernel restamps a half-open attempt on each retransmitted SYN.
            t.since = Since::Within(during.0, during.1);
            self.count(counted, bucket, Counter::SynRetransmits);
            return None;
        }
        if self.owned.contains_key(&flow) {
            self.count(counted, bucket, Counter::SynRetransmits);
            return None;
        }
        let monitor = self.global.monitor != 0;
        let source = source_key(seg.family, client, seg.dport, &self.global);
        let Some(slots) = self.conns_counter(&source) else {
            return self.map_full(port, bucket, false, counted);
        };
        let taken = self.take_slot(&slots);
        if port.max_connections != 0 && taken >= port.max_connections {
            if !monitor {
                self.give_slot(&slots);
                // Refusals are counted in the source's rate state, when it has one.
                if let Some(st) = self.rate.get_mut(&source) {
                    st.refused = st.refused.wrapping_add(1);
                }
                self.count(counted, bucket, Counter::ConnLimited);
                return Some(port.conn_action);
            }
            self.count(counted, bucket, Counter::MonitorWouldBlock);
            let since = Since::Within(during.0, during.1);
            return self.admit(&flow, source, since, port, bucket, true, counted);
        }
        let mut since = Since::Within(during.0, during.1);
        let mut would_block = false;
        if port.rate_limit != 0 {
            let state = self.rate.entry(source).or_default();
            let seq = state.next;
            state.next = seq.wrapping_add(1);
            let now = clock.rate_stamp(&source, seq);
            let state = self.rate.get_mut(&source).expect("just made");
            let ok = state.admits(seq, now, port.rate_limit, port.rate_window_ns);
            state.record(seq, now);
            out.rate = Some((source, now));
            since = Since::Exact(now);
            if !ok {
                if !monitor {
                    state.refused = state.refused.wrapping_add(1);
                    self.give_slot(&slots);
                    self.count(counted, bucket, Counter::RateLimited);
                    return Some(port.rate_action);
                }
                self.count(counted, bucket, Counter::MonitorWouldBlock);
                would_block = true;
            }
        }
        self.admit(&flow, source, since, port, bucket, would_block, counted)
    }

    /// `admit`: records the attempt as half-open; its slot is already taken. `would_block`:
    /// monitor mode already counted the attempt as one enforcing would refuse.
    #[allow(clippy::too_many_arguments)]
    fn admit(
        &mut self,
        flow: &FlowKey,
        source: SourceKey,
        since: Since,
        port: &PortConfig,
        bucket: Bucket,
        would_block: bool,
        counted: &mut Vec<(Bucket, Counter)>,
    ) -> Option<u32> {
        if self.pending.contains_key(flow) {
            self.give_slot(&source);
            self.count(counted, bucket, Counter::SynRetransmits);
            None
        } else if self.pending.len() >= self.capacity.flows {
            self.give_slot(&source);
            self.map_full(port, bucket, would_block, counted)
        } else {
            self.pending.insert(*flow, Tracked { source, since });
            self.count(counted, bucket, Counter::Admitted);
            None
        }
    }

    /// `map_full`: an attempt that cannot be tracked. Failing open passes it; failing closed
    /// refuses it with `conn_action`, except in monitor mode, which counts it as one enforcing
    /// would refuse (once per attempt).
    fn map_full(
        &mut self,
        port: &PortConfig,
        bucket: Bucket,
        would_block: bool,
        counted: &mut Vec<(Bucket, Counter)>,
    ) -> Option<u32> {
        self.count(counted, bucket, Counter::MapFull);
        if self.global.fail_closed != 0 {
            if self.global.monitor == 0 {
                return Some(port.conn_action);
            }
            if !would_block {
                self.count(counted, bucket, Counter::MonitorWouldBlock);
            }
        }
        None
    }

    /// `reject`: the RST, or a drop when the frame cannot carry one.
    fn reject(
        &mut self,
        frame: &[u8],
        seg: &TcpSegment,
        bucket: Bucket,
        counted: &mut Vec<(Bucket, Counter)>,
        out: &mut Outcome,
    ) {
        if !rst::can_reject(seg) {
            self.count(counted, bucket, Counter::RejectAsDrop);
            out.verdict = XDP_DROP;
            return;
        }
        match rst_frame(frame, seg) {
            Some(reply) => {
                self.count(counted, bucket, Counter::RstSent);
                out.verdict = XDP_TX;
                out.frame = reply;
            }
            None => {
                self.count(counted, bucket, Counter::RejectAsDrop);
                out.verdict = XDP_DROP;
            }
        }
    }

    /// The control program's `OP_EXPIRE_PENDING` (`release` of `WSG_PENDING`): whether it
    /// changed anything.
    pub fn expire_pending(&mut self, flow: &FlowKey) -> bool {
        self.release_from(false, flow)
    }

    /// The control program's `OP_RELEASE_OWNED`.
    pub fn release_owned(&mut self, flow: &FlowKey) -> bool {
        self.release_from(true, flow)
    }

    fn release_from(&mut self, owned: bool, flow: &FlowKey) -> bool {
        let map = if owned {
            &mut self.owned
        } else {
            &mut self.pending
        };
        let Some(t) = map.remove(flow) else {
            return false;
        };
        self.release(&t.source);
        let b = self.bucket_of_flow(flow);
        self.count(&mut Vec::new(), b, Counter::Expired);
        true
    }

    /// The control program's `OP_ADOPT` (`accounting::adopt`): counts an established
    /// connection the XDP program did not see. `during` bounds its timestamp.
    pub fn adopt(&mut self, flow: &FlowKey, during: (u64, u64)) -> bool {
        let source = flow_source(flow, &self.global);
        if self.owned.contains_key(flow) || self.owned.len() >= self.capacity.flows {
            return false;
        }
        self.owned.insert(
            *flow,
            Tracked {
                source,
                since: Since::Within(during.0, during.1),
            },
        );
        let b = self.bucket_of_flow(flow);
        match self.conns_counter(&source) {
            Some(k) => {
                self.take_slot(&k);
                self.count(&mut Vec::new(), b, Counter::Adopted);
                true
            }
            None => {
                self.owned.remove(flow);
                self.count(&mut Vec::new(), b, Counter::UntrackedFull);
                false
            }
        }
    }

    /// `Guard::remove_idle_source`: removes a zero counter.
    pub fn remove_idle_source(&mut self, key: &SourceKey) {
        if self.conns.get(key) == Some(&0) {
            self.conns.remove(key);
        }
    }

    /// Live connections per source, zero counters left out (`Guard::connections`).
    pub fn connections(&self) -> BTreeMap<SourceKey, u32> {
        self.conns
            .iter()
            .filter(|(_, v)| **v != 0)
            .map(|(k, v)| (*k, *v))
            .collect()
    }

    /// Consistency of the model itself: each source's count is the number of flows charged to
    /// it (true as long as prefixes do not change under tracked flows and counters are not
    /// removed while held; the caller knows when).
    pub fn counts_match_flows(&self) -> Result<(), String> {
        let mut held: HashMap<SourceKey, u32> = HashMap::new();
        for t in self.pending.values().chain(self.owned.values()) {
            *held.entry(t.source).or_default() += 1;
        }
        for (k, v) in &self.conns {
            let h = held.get(k).copied().unwrap_or(0);
            if *v != h {
                return Err(format!("{k:?}: counter {v}, flows {h}"));
            }
        }
        Ok(())
    }
}

/// `write_rst`/`write_reply` on a copy of `frame`: the Ethernet addresses swapped, the frame cut
/// to the reply's length, the reply's IP header at `l3` and TCP header at `l4`. `None` where the
/// kernel's loads or stores would fail.
pub fn rst_frame(frame: &[u8], seg: &TcpSegment) -> Option<Vec<u8>> {
    let macs: [u8; 12] = frame.load(0)?;
    let len = rst::reply_len(seg);
    if len > frame.len() || len < parse::ETH_HLEN {
        return None;
    }
    let mut out = frame[..len].to_vec();
    out[..6].copy_from_slice(&macs[6..]);
    out[6..12].copy_from_slice(&macs[..6]);
    let (l3, l4) = (seg.l3, seg.l4);
    if seg.family == AF_INET {
        let (ip, tcp) = rst::ipv4(&frame.load(l3)?, seg);
        out.get_mut(l3..l3 + ip.len())?.copy_from_slice(&ip);
        out.get_mut(l4..l4 + tcp.len())?.copy_from_slice(&tcp);
    } else {
        let (ip, tcp) = rst::ipv6(&frame.load(l3)?, seg);
        out.get_mut(l3..l3 + ip.len())?.copy_from_slice(&ip);
        out.get_mut(l4..l4 + tcp.len())?.copy_from_slice(&tcp);
    }
    Some(out)
}

/// The global settings before anything sets them: `Guard::load` writes the defaults (IPv4 /32,
/// IPv6 /64, enforcing, fail open).
pub fn initial_global() -> GlobalConfig {
    GlobalConfig::default()
}

/// The slot of attempt `seq` in a rate window.
pub fn rate_slot(seq: u32) -> usize {
    seq as usize % RATE_SLOTS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::{FrameBuilder, Tcp};
    use ws_guard_common::maps::ACTION_DROP;

    struct Fixed(u64);
    impl Clock for Fixed {
        fn rate_stamp(&mut self, _: &SourceKey, _: u32) -> u64 {
            self.0
        }
    }

    fn syn(last: u8, sport: u16) -> Vec<u8> {
        FrameBuilder::ipv4([198, 18, 0, last].into(), [198, 19, 0, 1].into())
            .tcp(Tcp::syn(sport, 9000, 7))
            .build()
    }

    fn model(max: u32, action: u32, rate: u32) -> Model {
        let mut m = Model::new(Capacity {
            sources: 1024,
            flows: 1024,
        });
        m.set_port(
            9000,
            PortConfig {
                enabled: 1,
                max_connections: max,
                conn_action: action,
                rate_action: ACTION_DROP,
                rate_limit: rate,
                index: 0,
                rate_window_ns: 1_000_000_000,
            },
        );
        m
    }

    #[test]
    fn admits_up_to_the_limit_then_rejects_and_passes_retransmits() {
        let mut m = model(2, ACTION_REJECT, 0);
        let mut c = Fixed(1);
        for sport in [1000, 1001] {
            assert_eq!(m.xdp(&syn(1, sport), (0, 1), &mut c).verdict, XDP_PASS);
        }
        let o = m.xdp(&syn(1, 1002), (0, 1), &mut c);
        assert_eq!(o.verdict, XDP_TX);
        assert_eq!(o.frame.len(), 54);
        let r = m.xdp(&syn(1, 1000), (0, 1), &mut c);
        assert_eq!(r.verdict, XDP_PASS);
        assert_eq!(
            r.counted,
            [(Bucket::Port(9000, AF_INET), Counter::SynRetransmits)]
        );
        assert_eq!(m.totals[Counter::Admitted as usize], 2);
        assert_eq!(m.totals[Counter::ConnLimited as usize], 1);
        assert_eq!(m.totals[Counter::RstSent as usize], 1);
        assert_eq!(m.pending.len(), 2);
        m.counts_match_flows().unwrap();
    }

    #[test]
    fn rate_refusal_gives_the_slot_back_and_still_counts() {
        let mut m = model(0, ACTION_DROP, 1);
        let mut c = Fixed(5);
        assert_eq!(m.xdp(&syn(1, 1), (0, 9), &mut c).verdict, XDP_PASS);
        assert_eq!(m.xdp(&syn(1, 2), (0, 9), &mut c).verdict, XDP_DROP);
        let key = m.pending.values().next().unwrap().source;
        assert_eq!(m.conns[&key], 1);
        assert_eq!(m.rate[&key].next, 2);
        assert_eq!(m.pending.values().next().unwrap().since, Since::Exact(5));
    }

    #[test]
    fn monitor_over_the_limit_skips_the_rate() {
        let mut m = model(1, ACTION_DROP, 1);
        m.set_global(GlobalConfig {
            monitor: 1,
            ..GlobalConfig::default()
        });
        let mut c = Fixed(5);
        m.xdp(&syn(1, 1), (0, 9), &mut c);
        let o = m.xdp(&syn(1, 2), (0, 9), &mut c);
        assert_eq!(o.verdict, XDP_PASS);
        assert_eq!(o.rate, None);
        assert_eq!(m.totals[Counter::MonitorWouldBlock as usize], 1);
        assert_eq!(m.totals[Counter::Admitted as usize], 2);
    }
}
