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
//! The allow and deny lists (CIDR sets, longest-prefix matched on the same trie keys as
//! `ws_guard_common::policy` builds them), the bans (`WSG_BANS`, manual and automatic, ended by
//! an attempt that finds them expired), the ban events and the lookup flags userspace derives
//! from them (`policy::flags`) follow the kernel and `Guard` the same way.
//!
//! Time is the one input the model cannot know: the kernel stamps each run with
//! `bpf_ktime_get_ns`. The model asks a [`Clock`] for the stamp of an attempt that reaches the
//! rate rule (the test reads it back from the kernel's rate window, then checks the whole window
//! against the model's), and otherwise records the host's monotonic interval around the run as
//! the bounds of the half-open entry's timestamp. Whether a ban is still in force at the
//! kernel's "now" is asked of the [`Clock`] too (decided by the host's interval around the run
//! unless the deadline falls inside it), and checked against the rate stamp when the attempt
//! gets one.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use ws_guard_common::{
    filter::{filter_count, flow_filter_index, must_check_flows, prefixes_changed, unsaturated},
    key::{flow_source, source_key},
    maps::{
        ACTION_DROP, ACTION_REJECT, AF_INET, AF_INET6, BAN_MANUAL, BAN_RATE, BanEvent, BanValue,
        Counter, EVENT_BAN_ENDED, EVENT_BAN_STARTED, FLAG_BANS, FLAG_CHECK_FLOWS,
        FLOW_FILTER_SLOTS, FlowKey, GATE_FLAGS, GlobalConfig, PortConfig, RATE_SLOTS, RateState,
        SourceKey, SourceState,
    },
    parse::{self, Packet, Parsed, TCP_ACK, TCP_RST, TCP_SYN, TcpSegment},
    policy::{self, CIDR_DATA_LEN, CidrKey, ListVerdict, ban_active, ban_until, list_verdict},
    reply, rst,
    syncookie::{self, SYNACK_TCP_MAX, SynOptions},
};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

const COUNT: usize = Counter::COUNT as usize;

/// A filter count from which the kernel's next add saturates the bucket (see
/// `ws_guard_common::filter::filter_added`).
const SATURABLE: u32 = 14;

/// Where a counter is added: the bucket of a protected port and family, or the unattributed one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Bucket {
    Unattributed,
    /// (port, family)
    Port(u16, u16),
}

/// When a tracked flow was stamped: in the millisecond of the kernel's rate stamp (read back
/// from its rate window; the stamp's first nanosecond), or within the host's monotonic interval
/// around the run that stamped it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Since {
    Millisecond(u64),
    Within(u64, u64),
}

impl Since {
    /// Whether a kernel stamp agrees.
    pub fn admits(&self, ns: u64) -> bool {
        match *self {
            Since::Millisecond(t) => t <= ns && ns - t < 1_000_000,
            Since::Within(lo, hi) => lo <= ns && ns <= hi,
        }
    }
}

/// A tracked flow as the model expects it in `WSG_FLOWS` (half-open or established).
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

    /// Whether the ban of `key` ending at `until_ns` was still in force at the kernel's "now"
    /// of this run (`policy::ban_active`).
    fn ban_active(&mut self, key: &SourceKey, until_ns: u64) -> bool;

    /// The deadline of the ban the kernel started for `key` in this run: `ban_ns` after its
    /// "now", which the rate stamp `now` (whole milliseconds) gives to the millisecond only.
    fn ban_deadline(&mut self, _key: &SourceKey, now: u64, ban_ns: u64) -> u64 {
        ban_until(now, ban_ns)
    }
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
    /// A ban the attempt found: its deadline and whether the [`Clock`] said it was in force
    /// (with `rate`, the stamp must agree).
    pub ban: Option<(u64, bool)>,
    /// A new attempt whose source's flow filter (and `FLAG_CHECK_FLOWS`) let the kernel skip
    /// the two flow-map lookups.
    pub skipped_lookups: bool,
    /// A SYN answered with a SYN cookie: `frame` is a placeholder; the expected frame is
    /// [`SynAck::frame`] of the kernel's cookie (the kernel's secret makes it: an oracle).
    pub synack: Option<SynAck>,
}

/// A SYN-ACK carrying a cookie, as the model expects it, but for the cookie itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynAck {
    syn: Vec<u8>,
    seg: TcpSegment,
    options: SynOptions,
    settings: ws_guard_common::maps::CookieSettings,
    /// The flow and the client's initial sequence number, for [`Model::issued`].
    pub flow: FlowKey,
    pub isn: u32,
    /// The run's interval: the SYN-ACK's TSval is the millisecond clock within it.
    pub during: (u64, u64),
}

impl SynAck {
    /// The reply with `cookie`, its TSval taken at `now_ns`.
    pub fn frame(&self, cookie: u32, now_ns: u64) -> Vec<u8> {
        let mut tcp = [0u8; SYNACK_TCP_MAX];
        let len = syncookie::synack_tcp(
            &self.seg,
            &self.options,
            &self.settings,
            cookie,
            now_ns,
            &mut tcp,
        );
        let (l3, l4) = (self.seg.l3, self.seg.l4);
        let mut out = self.syn[..l4 + len].to_vec();
        let (dst, src) = out.split_at_mut(6);
        dst.swap_with_slice(&mut src[..6]);
        let sum = if self.seg.family == AF_INET {
            let ip = reply::ipv4_header(&self.syn.load(l3).unwrap(), len as u16);
            out[l3..l3 + 20].copy_from_slice(&ip);
            reply::tcp_checksum_v4(&ip, &tcp, len as u16)
        } else {
            let ip = reply::ipv6_header(&self.syn.load(l3).unwrap(), len as u16);
            out[l3..l3 + 40].copy_from_slice(&ip);
            reply::tcp_checksum_v6(&ip, &tcp, len as u16)
        };
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
        out[l4..l4 + len].copy_from_slice(&tcp[..len]);
        out
    }

    /// The candidates for the kernel's reply with `cookie`: one per millisecond of the run.
    pub fn candidates(&self, cookie: u32) -> Vec<Vec<u8>> {
        let (a, b) = (self.during.0 / 1_000_000, self.during.1 / 1_000_000);
        (a..=b.min(a + 2))
            .map(|ms| self.frame(cookie, ms * 1_000_000))
            .collect()
    }
}

impl Outcome {
    /// A contradiction between the clock's answers in this run: the ban's answer and the rate
    /// window's stamp (the same kernel "now", known to the millisecond).
    pub fn clock_conflict(&self) -> Option<String> {
        let (until, active) = self.ban?;
        let (_, now) = self.rate?;
        let conflict = if active {
            !ban_active(until, now)
        } else {
            ban_active(until, now + 999_999)
        };
        conflict.then(|| {
            format!(
                "the ban ending at {until} was judged {} but the attempt's stamp is {now}",
                if active { "in force" } else { "over" }
            )
        })
    }
}

/// Capacities of the maps, as loaded ([`ws_guard::guard::LoadOptions`]).
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    pub sources: usize,
    pub flows: usize,
    /// `WSG_BANS`.
    pub bans: usize,
    /// Rate stamps per source (`LoadOptions::rate_ring`).
    pub ring: u32,
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
    /// `WSG_SOURCES`: the slots of each entry, zero ones included. The flow filters are derived
    /// from the tracked flows ([`Model::source_states`]).
    pub conns: HashMap<SourceKey, u32>,
    /// Tracked flows (`pending` and `owned`) per source key and filter bucket, kept with them.
    flow_counts: HashMap<(SourceKey, usize), u32>,
    /// Filter buckets whose count reached [`SATURABLE`] since their key's entry was made: from
    /// there the kernel's next filter add, even one it takes back at once (a retransmitted SYN
    /// whose insert fails), saturates the count, so whether it did is not the model's to know.
    saturable: HashSet<(SourceKey, usize)>,
    /// Saturable buckets the kernel was seen holding at 15 ([`Model::learn_saturation`]): they
    /// stay so as long as their key's entry does.
    saturated: HashSet<(SourceKey, usize)>,
    /// `SourceState::refused` of the `WSG_SOURCES` entries that have refusals.
    pub refusals: HashMap<SourceKey, u32>,
    /// The rate windows of `WSG_SOURCES` entries.
    pub rate: HashMap<SourceKey, RateState>,
    /// Every counter since load (what `Guard::counters` sums).
    pub totals: [u64; COUNT],
    /// Counters of each protected port and family since the port became protected (what
    /// `Guard::stats` reports).
    pub port_stats: BTreeMap<(u16, u16), [u64; COUNT]>,
    /// Counters of no protected port, both families (`Stats::unattributed`).
    pub unattributed: [u64; COUNT],
    /// `WSG_ALLOW` and `WSG_DENY`: trie keys (`policy::cidr_key`).
    pub allow: BTreeSet<CidrKey>,
    pub deny: BTreeSet<CidrKey>,
    /// `WSG_BANS`, expired bans not yet removed included.
    pub bans: HashMap<SourceKey, BanValue>,
    /// Ban events the XDP program sent since the caller last took them.
    pub events: Vec<BanEvent>,
    /// Whether every protected port has a listener in the namespace the programs run in (the
    /// differential's cookie run): SYN cookies can then be made, else a port in cookie mode
    /// judges on the SYN (`cookie_fallbacks`).
    pub listeners: bool,
    /// SYN cookies the kernel issued: (flow, client ISN) -> cookie.
    pub issued: HashMap<(FlowKey, u32), u32>,
    /// `WSG_COOKIES`: the cookie of each flow admitted at its cookie's ACK.
    pub used: HashMap<FlowKey, u32>,
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
            flow_counts: HashMap::new(),
            saturable: HashSet::new(),
            saturated: HashSet::new(),
            refusals: HashMap::new(),
            rate: HashMap::new(),
            totals: [0; COUNT],
            port_stats: BTreeMap::new(),
            unattributed: [0; COUNT],
            allow: BTreeSet::new(),
            deny: BTreeSet::new(),
            bans: HashMap::new(),
            events: Vec::new(),
            listeners: false,
            issued: HashMap::new(),
            used: HashMap::new(),
        }
    }

    /// `Guard::set_global`: the flags are derived from the maps' contents, not taken;
    /// `FLAG_CHECK_FLOWS` is set by a prefix change and otherwise kept. A prefix change moves
    /// every tracked flow to the key the new prefixes give it (its slot and filter count), all
    /// of them or, when the source map has no room for the new keys, none.
    pub fn set_global(&mut self, g: GlobalConfig) {
        if prefixes_changed(&self.global, &g) {
            self.rekey(&g);
        }
        let check = if prefixes_changed(&self.global, &g) {
            FLAG_CHECK_FLOWS
        } else {
            self.global.flags & FLAG_CHECK_FLOWS
        };
        self.global = GlobalConfig { flags: check, ..g };
        self.refresh_flags();
    }

    /// `Guard::rekey_flows`.
    fn rekey(&mut self, g: &GlobalConfig) {
        let new_key = |f: &FlowKey, t: &Tracked| source_key(f.family, f.client, t.source.port, g);
        let new_keys: std::collections::HashSet<SourceKey> = self
            .pending
            .iter()
            .chain(self.owned.iter())
            .map(|(f, t)| new_key(f, t))
            .filter(|k| !self.conns.contains_key(k))
            .collect();
        if self.conns.len() + new_keys.len() > self.capacity.sources {
            return;
        }
        let mut moved = Vec::new();
        for map in [&mut self.pending, &mut self.owned] {
            for (f, t) in map.iter_mut() {
                let new = new_key(f, t);
                if new == t.source {
                    continue;
                }
                *self.conns.entry(new).or_insert(0) += 1;
                if let Some(n) = self.conns.get_mut(&t.source) {
                    *n = n.saturating_sub(1);
                }
                moved.push((*f, t.source, new));
                t.source = new;
            }
        }
        for (f, old, new) in moved {
            self.count_flow(new, &f);
            self.uncount_flow(old, &f);
        }
    }

    /// `Guard::live_flags`, written with the global settings: userspace re-derives them on
    /// every change of the settings, the lists or the bans, and on every ban expiry round (not
    /// when the kernel ends a ban). `FLAG_CHECK_FLOWS` is kept.
    fn refresh_flags(&mut self) {
        self.global.flags = policy::flags(
            !self.allow.is_empty(),
            !self.deny.is_empty(),
            self.global.ban_ns,
            !self.bans.is_empty(),
        ) | (self.global.flags & FLAG_CHECK_FLOWS);
    }

    /// `Guard::settle_flow_check`: clears `FLAG_CHECK_FLOWS` when every tracked flow is
    /// charged to the key the live prefixes give it. True if the flag is clear now.
    pub fn settle_flow_check(&mut self) -> bool {
        if self.global.flags & FLAG_CHECK_FLOWS == 0 {
            return true;
        }
        let g = self.global;
        let settled = self
            .pending
            .iter()
            .chain(self.owned.iter())
            .all(|(f, t)| flow_source(f, &g) == t.source);
        if settled {
            self.global.flags &= !FLAG_CHECK_FLOWS;
        }
        settled
    }

    /// The flow filter the kernel must hold for `key`: its tracked flows (half-open and
    /// established entries, each counted) per filter bucket, four bits each; 15 where the count
    /// reached it or the kernel was seen holding a saturable bucket saturated.
    pub fn expected_filter(&self, key: &SourceKey) -> u64 {
        let mut filter = 0u64;
        for i in 0..FLOW_FILTER_SLOTS {
            let c = if self.saturated.contains(&(*key, i)) {
                15
            } else {
                self.flow_counts.get(&(*key, i)).map_or(0, |c| (*c).min(15))
            };
            filter |= u64::from(c) << (4 * i);
        }
        filter
    }

    /// Takes in what the model cannot know: `kernel`, the filter the kernel holds for `key`,
    /// has a saturable bucket (see [`Model::saturable`]) at 15. Anything else that differs
    /// stays a difference for the comparison to report. Returns how many buckets it learnt.
    pub fn learn_saturation(&mut self, key: &SourceKey, kernel: u64) -> usize {
        let mut learnt = 0;
        for i in 0..FLOW_FILTER_SLOTS {
            let b = (*key, i);
            if filter_count(kernel, i) == 15
                && self.saturable.contains(&b)
                && self.saturated.insert(b)
            {
                learnt += 1;
            }
        }
        learnt
    }

    /// A flow now tracked under `key` (see [`Model::saturable`]).
    fn count_flow(&mut self, key: SourceKey, flow: &FlowKey) {
        let b = (key, flow_filter_index(flow));
        let c = self.flow_counts.entry(b).or_default();
        *c += 1;
        if *c >= SATURABLE {
            self.saturable.insert(b);
        }
    }

    /// A flow no longer tracked under `key`.
    fn uncount_flow(&mut self, key: SourceKey, flow: &FlowKey) {
        let b = (key, flow_filter_index(flow));
        if let Some(c) = self.flow_counts.get_mut(&b) {
            *c -= 1;
            if *c == 0 {
                self.flow_counts.remove(&b);
            }
        }
    }

    /// `WSG_SOURCES` as the kernel must hold it: each entry's slots, refusals and rate window,
    /// and its flow filter, derived from the tracked flows.
    pub fn source_states(&self) -> HashMap<SourceKey, SourceState> {
        self.conns
            .iter()
            .map(|(k, v)| {
                (
                    *k,
                    SourceState {
                        slots: *v,
                        refused: self.refusals.get(k).copied().unwrap_or(0),
                        filter: self.expected_filter(k),
                        next: self.rate.get(k).map_or(0, |r| r.next),
                        stamps: self.rate.get(k).map_or([0; RATE_SLOTS], |r| r.stamps),
                        _pad: 0,
                    },
                )
            })
            .collect()
    }

    /// `Guard::apply_policy`: the lists become exactly `allow` / `deny` (trie keys) and the ban
    /// duration `ban_ns`; the other global settings stay.
    pub fn apply_policy(&mut self, allow: &[CidrKey], deny: &[CidrKey], ban_ns: u64) {
        self.allow = allow.iter().copied().collect();
        self.deny = deny.iter().copied().collect();
        self.global.ban_ns = ban_ns;
        self.refresh_flags();
    }

    /// `Guard::ban` of `key` until `until_ns` (the deadline the kernel's map got: userspace
    /// stamps it with its own clock). False when the map is full (and `key` is not in it):
    /// `Guard::ban` then fails.
    pub fn ban(&mut self, key: &SourceKey, until_ns: u64) -> bool {
        if !self.bans.contains_key(key) && self.bans.len() >= self.capacity.bans {
            return false;
        }
        self.bans.insert(
            *key,
            BanValue {
                until_ns,
                reason: BAN_MANUAL,
                _pad: 0,
            },
        );
        self.refresh_flags();
        true
    }

    /// `Guard::unban`: the removed ban, if `key` had one (in force or not). The flags are
    /// re-derived only when there was one (they may still say bans exist after the kernel
    /// ended the last one).
    pub fn unban(&mut self, key: &SourceKey) -> Option<BanValue> {
        let b = self.bans.remove(key);
        if b.is_some() {
            self.refresh_flags();
        }
        b
    }

    /// `Guard::expire_bans` after `ended` said which of the bans were over when it looked:
    /// the control program ends each (counted and reported as the XDP program does), then the
    /// flags are re-derived (also when the kernel ended the last ban).
    pub fn expire_bans(&mut self, ended: &[SourceKey]) {
        let mut counted = Vec::new();
        for k in ended {
            let b = self.bucket_of_source(k);
            self.end_ban(&mut counted, b, k);
        }
        self.refresh_flags();
    }

    /// Whether `addr` of `family` is inside an entry of `list` (the trie's longest-prefix
    /// match: any entry matching is enough, values are not read).
    fn in_list(list: &BTreeSet<CidrKey>, family: u16, addr: &[u8; 16]) -> bool {
        let k = policy::lookup_key(family, *addr);
        list.iter().any(|e| prefix_matches(e, &k))
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
        self.bucket_of_port(flow.server_port, flow.family)
    }

    /// `Bucket::of_source`.
    fn bucket_of_source(&self, source: &SourceKey) -> Bucket {
        self.bucket_of_port(source.port, source.family)
    }

    fn bucket_of_port(&self, port: u16, family: u16) -> Bucket {
        match self.protected(port) {
            Some(_) => Bucket::Port(port, family),
            None => Bucket::Unattributed,
        }
    }

    /// `maps::end_ban`: removes the ban of `source`, counts and reports its end.
    fn end_ban(&mut self, out: &mut Vec<(Bucket, Counter)>, b: Bucket, source: &SourceKey) {
        let Some(ban) = self.bans.remove(source) else {
            return;
        };
        self.count(out, b, Counter::BansEnded);
        self.events.push(BanEvent {
            kind: EVENT_BAN_ENDED,
            reason: ban.reason,
            source: *source,
            _pad: 0,
            until_ns: ban.until_ns,
        });
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
            ban: None,
            skipped_lookups: false,
            synack: None,
        };
        let counted = &mut Vec::new();
        let unprotected = match parse::quick(frame) {
            parse::Quick::NotTcp => true,
            parse::Quick::Tcp { dport } => self.protected(dport).is_none(),
            parse::Quick::Unknown => false,
        };
        if unprotected {
            self.count(counted, Bucket::Unattributed, Counter::NotProtected);
            out.counted = std::mem::take(counted);
            return out;
        }
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
            Parsed::TcpFirstFragment { family, dport } => {
                match self.protected(dport) {
                    Some(_) => {
                        self.count(counted, Bucket::Port(dport, family), Counter::Fragments);
                        if self.global.pass_fragments == 0 && self.global.monitor == 0 {
                            out.verdict = XDP_DROP;
                        }
                    }
                    None => self.count(counted, Bucket::Unattributed, Counter::Fragments),
                }
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
            if port.syn_cookies != 0
                && seg.flags & (TCP_ACK | TCP_SYN | TCP_RST) == TCP_ACK
                && self.cookie_ack(frame, &seg, &port, bucket, during, clock, counted, &mut out)
            {
                out.counted = std::mem::take(counted);
                return out;
            }
            self.count(counted, bucket, Counter::ProtectedOther);
            out.counted = std::mem::take(counted);
            return out;
        }
        if port.syn_cookies != 0
            && self.cookie_syn(frame, &seg, bucket, during, clock, counted, &mut out)
        {
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

    /// `cookie::syn_action`: true when the SYN was answered (a cookie, or dropped by the
    /// lists or a ban); false to judge it on its SYN.
    #[allow(clippy::too_many_arguments)]
    fn cookie_syn(
        &mut self,
        frame: &[u8],
        seg: &TcpSegment,
        bucket: Bucket,
        during: (u64, u64),
        clock: &mut dyn Clock,
        counted: &mut Vec<(Bucket, Counter)>,
        out: &mut Outcome,
    ) -> bool {
        let Some(flow) = parse::flow(frame, seg) else {
            return false;
        };
        let source = source_key(seg.family, flow.client, seg.dport, &self.global);
        if self.conns.contains_key(&source) {
            return false;
        }
        if self.global.flags & GATE_FLAGS != 0 {
            match self.gate(&flow.client, &source, bucket, clock, counted, out) {
                Gate::Continue => {}
                Gate::Refuse => {
                    out.verdict = XDP_DROP;
                    return true;
                }
                Gate::Allowed | Gate::WouldBlock => return false,
            }
        }
        if !rst::can_reject(seg) || !self.listeners {
            self.count(counted, bucket, Counter::CookieFallbacks);
            return false;
        }
        let mut options = SynOptions::default();
        syncookie::syn_options(frame, seg.l4, seg.header_len, &mut options);
        self.count(counted, bucket, Counter::CookiesSent);
        out.verdict = XDP_TX;
        out.synack = Some(SynAck {
            syn: frame.to_vec(),
            seg: *seg,
            options,
            settings: self.global.cookie,
            flow,
            isn: seg.seq,
            during,
        });
        true
    }

    /// `cookie::ack_action` and what `wsg_cookie` does with it: true when the ACK carried a
    /// cookie (dropped as invalid or replayed, or judged); false for a flow's own traffic.
    #[allow(clippy::too_many_arguments)]
    fn cookie_ack(
        &mut self,
        frame: &[u8],
        seg: &TcpSegment,
        port: &PortConfig,
        bucket: Bucket,
        during: (u64, u64),
        clock: &mut dyn Clock,
        counted: &mut Vec<(Bucket, Counter)>,
        out: &mut Outcome,
    ) -> bool {
        // No listener: the lookup finds nothing, the segment is the kernel's to answer.
        if !self.listeners {
            return false;
        }
        let Some(flow) = parse::flow(frame, seg) else {
            return false;
        };
        if self.pending.contains_key(&flow) {
            return false;
        }
        let cookie = seg.ack.wrapping_sub(1);
        let isn = seg.seq.wrapping_sub(1);
        if self.issued.get(&(flow, isn)) != Some(&cookie) {
            self.count(counted, bucket, Counter::CookieAcksInvalid);
            out.verdict = XDP_DROP;
            return true;
        }
        if self.used.get(&flow) == Some(&cookie) {
            self.count(counted, bucket, Counter::CookieAcksReplayed);
            out.verdict = XDP_DROP;
            return true;
        }
        self.count(counted, bucket, Counter::CookieAcksValid);
        match self.new_attempt(frame, seg, port, bucket, during, clock, counted, out) {
            None => {
                self.used.insert(flow, cookie);
            }
            Some(action) if action == ACTION_REJECT => {
                self.reject(frame, seg, bucket, counted, out)
            }
            Some(_) => out.verdict = XDP_DROP,
        }
        true
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
        let Some(flow) = parse::flow(frame, seg) else {
            self.count(counted, bucket, Counter::Malformed);
            return None;
        };
        let source = source_key(seg.family, flow.client, seg.dport, &self.global);
        // The kernel looks up the source's entry (without creating it) and skips the flow maps
        // when its filter and the flags say the SYN cannot be a retransmission.
        let state = self.conns.get(&source).map(|slots| SourceState {
            slots: *slots,
            refused: self.refusals.get(&source).copied().unwrap_or(0),
            filter: self.expected_filter(&source),
            ..SourceState::default()
        });
        let index = flow_filter_index(&flow);
        if must_check_flows(self.global.flags, state.as_ref(), index) {
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
        } else {
            // The exactness of the skip: no tracked flow may be this one.
            assert!(
                !self.pending.contains_key(&flow) && !self.owned.contains_key(&flow),
                "the flow filter skipped the lookups of a tracked flow {flow:?} (source \
                 {source:?}, filter {:?}, flags {:#x})",
                state.map(|s| s.filter),
                self.global.flags
            );
            out.skipped_lookups = true;
        }
        let monitor = self.global.monitor != 0;

        // `limited` false skips the limits (allowlisted, or already judged by monitor mode);
        // `would_block`: monitor mode counted the attempt already.
        let mut tracked_as = Counter::Admitted;
        let mut limited = true;
        let mut would_block = false;
        if self.global.flags & GATE_FLAGS != 0 {
            match self.gate(&flow.client, &source, bucket, clock, counted, out) {
                Gate::Continue => {}
                Gate::Allowed => {
                    tracked_as = Counter::Allowed;
                    limited = false;
                }
                Gate::Refuse => return Some(ACTION_DROP),
                Gate::WouldBlock => {
                    self.count(counted, bucket, Counter::MonitorWouldBlock);
                    limited = false;
                    would_block = true;
                }
            }
        }

        let Some(slots) = self.conns_counter(&source) else {
            return self.untracked(port, bucket, tracked_as, would_block, counted);
        };
        let taken = self.take_slot(&slots);
        if limited && port.max_connections != 0 && taken >= port.max_connections {
            if !monitor {
                self.give_slot(&slots);
                self.note_refusal(&source);
                self.count(counted, bucket, Counter::ConnLimited);
                return Some(port.conn_action);
            }
            self.count(counted, bucket, Counter::MonitorWouldBlock);
            limited = false;
            would_block = true;
        }
        let mut since = Since::Within(during.0, during.1);
        if limited && port.rate_limit != 0 {
            let state = self.rate.entry(source).or_default();
            let seq = state.next;
            state.next = seq.wrapping_add(1);
            let now = clock.rate_stamp(&source, seq);
            let state = self.rate.get_mut(&source).expect("just made");
            let now_ms = ws_guard_common::rate::stamp_ms(now);
            let ok = state.admits(
                seq,
                now_ms,
                port.rate_limit,
                ws_guard_common::rate::window_ms(port.rate_window_ns),
                self.capacity.ring,
            );
            state.record(seq, now_ms, self.capacity.ring);
            out.rate = Some((source, now));
            // The kernel's "now" is within the millisecond of its rate stamp.
            since = Since::Millisecond(now);
            if !ok {
                if !monitor {
                    self.note_refusal(&source);
                    self.give_slot(&slots);
                    self.count(counted, bucket, Counter::RateLimited);
                    if self.global.ban_ns != 0 {
                        self.start_ban(&source, now, clock, bucket, counted);
                    }
                    return Some(port.rate_action);
                }
                self.count(counted, bucket, Counter::MonitorWouldBlock);
                would_block = true;
            }
        }
        self.admit(
            &flow,
            source,
            since,
            port,
            bucket,
            tracked_as,
            would_block,
            counted,
        )
    }

    /// `maps::note_refusal`: one more refusal in the source's `WSG_SOURCES` entry, if it has one
    /// (the gate's refusals come before an entry is created, and create none).
    fn note_refusal(&mut self, source: &SourceKey) {
        if self.conns.contains_key(source) {
            let r = self.refusals.entry(*source).or_default();
            *r = r.wrapping_add(1);
        }
    }

    /// `gate`: the allowlist (beats the denylist), the denylist, then an active ban; an
    /// expired ban found is ended.
    fn gate(
        &mut self,
        client: &[u8; 16],
        source: &SourceKey,
        bucket: Bucket,
        clock: &mut dyn Clock,
        counted: &mut Vec<(Bucket, Counter)>,
        out: &mut Outcome,
    ) -> Gate {
        let monitor = self.global.monitor != 0;
        let (allow, deny) = (&self.allow, &self.deny);
        let lists = list_verdict(
            &self.global,
            || Self::in_list(allow, source.family, client),
            || Self::in_list(deny, source.family, client),
        );
        match lists {
            ListVerdict::Allowed => return Gate::Allowed,
            ListVerdict::Denied if monitor => return Gate::WouldBlock,
            ListVerdict::Denied => {
                self.note_refusal(source);
                self.count(counted, bucket, Counter::Denied);
                return Gate::Refuse;
            }
            ListVerdict::Neither => {}
        }
        if self.global.flags & FLAG_BANS == 0 {
            return Gate::Continue;
        }
        let Some(ban) = self.bans.get(source).copied() else {
            return Gate::Continue;
        };
        let active = clock.ban_active(source, ban.until_ns);
        out.ban = Some((ban.until_ns, active));
        if !active {
            self.end_ban(counted, bucket, source);
            return Gate::Continue;
        }
        if monitor {
            return Gate::WouldBlock;
        }
        self.note_refusal(source);
        self.count(counted, bucket, Counter::Banned);
        Gate::Refuse
    }

    /// `start_ban`: bans `source` for `ban_ns` from `now` (the rate stamp); a ban already there
    /// is kept, a full map counted.
    fn start_ban(
        &mut self,
        source: &SourceKey,
        now: u64,
        clock: &mut dyn Clock,
        bucket: Bucket,
        counted: &mut Vec<(Bucket, Counter)>,
    ) {
        if self.bans.contains_key(source) {
            return;
        }
        if self.bans.len() >= self.capacity.bans {
            self.count(counted, bucket, Counter::BansFull);
            return;
        }
        let value = BanValue {
            until_ns: clock.ban_deadline(source, now, self.global.ban_ns),
            reason: BAN_RATE,
            _pad: 0,
        };
        self.bans.insert(*source, value);
        self.count(counted, bucket, Counter::BansStarted);
        self.events.push(BanEvent {
            kind: EVENT_BAN_STARTED,
            reason: BAN_RATE,
            source: *source,
            _pad: 0,
            until_ns: value.until_ns,
        });
    }

    /// `untracked`: an attempt a full map keeps from being tracked; an allowlisted one passes
    /// whatever `fail_closed` says.
    fn untracked(
        &mut self,
        port: &PortConfig,
        bucket: Bucket,
        tracked_as: Counter,
        would_block: bool,
        counted: &mut Vec<(Bucket, Counter)>,
    ) -> Option<u32> {
        if tracked_as == Counter::Allowed {
            self.count(counted, bucket, Counter::MapFull);
            return None;
        }
        self.map_full(port, bucket, would_block, counted)
    }

    /// `admit`: records the attempt as half-open (counted as `tracked_as`); its slot is
    /// already taken. `would_block`: monitor mode already counted the attempt as one enforcing
    /// would refuse.
    #[allow(clippy::too_many_arguments)]
    fn admit(
        &mut self,
        flow: &FlowKey,
        source: SourceKey,
        since: Since,
        port: &PortConfig,
        bucket: Bucket,
        tracked_as: Counter,
        would_block: bool,
        counted: &mut Vec<(Bucket, Counter)>,
    ) -> Option<u32> {
        if self.pending.contains_key(flow) || self.owned.contains_key(flow) {
            self.give_slot(&source);
            self.count(counted, bucket, Counter::SynRetransmits);
            None
        } else if self.pending.len() + self.owned.len() >= self.capacity.flows {
            self.give_slot(&source);
            self.untracked(port, bucket, tracked_as, would_block, counted)
        } else {
            self.pending.insert(*flow, Tracked { source, since });
            self.count_flow(source, flow);
            self.count(counted, bucket, tracked_as);
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

    /// The control program's `OP_EXPIRE_PENDING` (a half-open flow of `WSG_FLOWS` released): whether it
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
        self.uncount_flow(t.source, flow);
        self.release(&t.source);
        let b = self.bucket_of_flow(flow);
        self.count(&mut Vec::new(), b, Counter::Expired);
        true
    }

    /// The control program's `OP_ADOPT` (`accounting::adopt`): counts an established
    /// connection the XDP program did not see. `during` bounds its timestamp.
    /// The source's entry comes first (created even when the flow then turns out to be
    /// tracked already, or `WSG_FLOWS` full).
    pub fn adopt(&mut self, flow: &FlowKey, during: (u64, u64)) -> bool {
        let source = flow_source(flow, &self.global);
        let b = self.bucket_of_flow(flow);
        let Some(k) = self.conns_counter(&source) else {
            if !self.owned.contains_key(flow) {
                self.count(&mut Vec::new(), b, Counter::UntrackedFull);
            }
            return false;
        };
        // One flow map: the insert fails for a flow tracked in either state.
        if self.owned.contains_key(flow)
            || self.pending.contains_key(flow)
            || self.pending.len() + self.owned.len() >= self.capacity.flows
        {
            return false;
        }
        self.owned.insert(
            *flow,
            Tracked {
                source,
                since: Since::Within(during.0, during.1),
            },
        );
        self.count_flow(source, flow);
        self.take_slot(&k);
        self.count(&mut Vec::new(), b, Counter::Adopted);
        true
    }

    /// `Guard::remove_idle_source` with no minimum age: removes an entry that holds nothing
    /// (`SourceState::holds_nothing`: no slot, no flow counted but in saturated buckets), its
    /// rate window and what the model knew of its saturated buckets with it.
    pub fn remove_idle_source(&mut self, key: &SourceKey) {
        let idle = self.conns.get(key) == Some(&0) && unsaturated(self.expected_filter(key)) == 0;
        if idle {
            self.conns.remove(key);
            self.refusals.remove(key);
            self.rate.remove(key);
            self.saturable.retain(|(k, _)| k != key);
            self.saturated.retain(|(k, _)| k != key);
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

/// What the lists and bans say about a new attempt (`gate`).
enum Gate {
    Continue,
    Allowed,
    Refuse,
    WouldBlock,
}

/// The LPM trie's match of `entry` for the lookup key `key`: the entry's first `prefix_len`
/// bits equal the key's.
pub fn prefix_matches(entry: &CidrKey, key: &CidrKey) -> bool {
    if entry.prefix_len > key.prefix_len {
        return false;
    }
    let mut bits = entry.prefix_len;
    for i in 0..CIDR_DATA_LEN {
        if bits == 0 {
            return true;
        }
        let n = bits.min(8);
        let m = 0xffu8 << (8 - n);
        if entry.data[i] & m != key.data[i] & m {
            return false;
        }
        bits -= n;
    }
    true
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
        fn ban_active(&mut self, _: &SourceKey, until_ns: u64) -> bool {
            ban_active(until_ns, self.0)
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
            bans: 1024,
            ring: 32,
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
                ..PortConfig::default()
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
        assert_eq!(
            m.pending.values().next().unwrap().since,
            Since::Millisecond(5)
        );
    }

    fn v4(last: u8, prefix: u32) -> CidrKey {
        policy::cidr_key(
            AF_INET,
            [198, 18, 0, last, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            prefix,
        )
    }

    #[test]
    fn allow_inside_deny_passes_untouched_by_limits() {
        let mut m = model(1, ACTION_DROP, 0);
        m.apply_policy(&[v4(1, 32)], &[v4(0, 24)], 0);
        let mut c = Fixed(5);
        // Allowlisted: not limited (two attempts over max_connections 1), tracked as allowed.
        for sport in [1, 2] {
            assert_eq!(m.xdp(&syn(1, sport), (0, 9), &mut c).verdict, XDP_PASS);
        }
        assert_eq!(m.totals[Counter::Allowed as usize], 2);
        assert_eq!(m.pending.len(), 2);
        // Its neighbour is denied.
        assert_eq!(m.xdp(&syn(2, 1), (0, 9), &mut c).verdict, XDP_DROP);
        assert_eq!(m.totals[Counter::Denied as usize], 1);
        // An IPv4 /0 never matches IPv6 sources (the family tag).
        assert!(!Model::in_list(
            &[v4(0, 0)].into(),
            AF_INET6,
            &[0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
        ));
        m.counts_match_flows().unwrap();
    }

    #[test]
    fn rate_refusal_bans_and_the_ban_ends_on_the_next_attempt_after_it() {
        const SEC: u64 = 1_000_000_000;
        let mut m = model(0, ACTION_DROP, 1);
        m.apply_policy(&[], &[], 2 * SEC);
        assert_eq!(m.global.flags, FLAG_BANS);
        let mut c = Fixed(5);
        m.xdp(&syn(1, 1), (0, 9), &mut c);
        assert_eq!(m.xdp(&syn(1, 2), (0, 9), &mut c).verdict, XDP_DROP);
        let key = m.pending.values().next().unwrap().source;
        assert_eq!(m.bans[&key].until_ns, 5 + 2 * SEC);
        assert_eq!(m.events.len(), 1);
        // Banned until then (the rate is not consulted), over at that time exactly (past the
        // rate window).
        let o = m.xdp(&syn(1, 3), (0, 9), &mut Fixed(4 + 2 * SEC));
        assert_eq!((o.verdict, o.rate), (XDP_DROP, None));
        assert_eq!(m.totals[Counter::Banned as usize], 1);
        let o = m.xdp(&syn(1, 4), (0, 9), &mut Fixed(5 + 2 * SEC));
        assert_eq!(o.verdict, XDP_PASS);
        assert_eq!(o.clock_conflict(), None);
        assert!(m.bans.is_empty());
        assert_eq!(m.totals[Counter::BansEnded as usize], 1);
        assert_eq!(m.events[1].kind, EVENT_BAN_ENDED);
        // The flags stay until userspace re-derives them.
        assert_eq!(m.global.flags, FLAG_BANS);
        m.apply_policy(&[], &[], 0);
        assert_eq!(m.global.flags, 0);
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
