//! `#[repr(C)]` types stored in the maps. Sizes are asserted at compile time: no implicit
//! padding, so kernel and userspace agree byte for byte.

use core::mem::size_of;

/// `AF_INET`, as the kernel spells it.
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as the kernel spells it.
pub const AF_INET6: u16 = 10;

/// Drop the SYN silently.
pub const ACTION_DROP: u32 = 0;
/// Answer the SYN with a TCP RST sent back with XDP_TX.
pub const ACTION_REJECT: u32 = 1;

/// The most attempts the rate window can remember; `new_connections` is at most this.
pub const RATE_SLOTS: usize = 32;

/// Who a limit applies to: a source address masked to the configured prefix, per protected port.
/// IPv4 addresses use the first four bytes of `addr`; the rest is zero. Aligned to 4 bytes (no
/// padding: 20 bytes either way), so [`SourceKey::same`] compares it as five words.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey {
    pub addr: [u8; 16],
    /// Protected (server) port, host byte order.
    pub port: u16,
    pub family: u16,
}

impl SourceKey {
    /// `self == other`, as five aligned 32-bit compares: the derived comparison of the bytes
    /// crashes the BPF backend of this LLVM inside the XDP program's largest function.
    #[inline(always)]
    pub fn same(&self, other: &SourceKey) -> bool {
        let a = (self as *const SourceKey).cast::<[u32; 5]>();
        let b = (other as *const SourceKey).cast::<[u32; 5]>();
        // SAFETY: both are 20 bytes of plain integers, 4-byte aligned (asserted below).
        let (a, b) = unsafe { (&*a, &*b) };
        (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4]) == 0
    }
}

/// Buckets of a source's flow filter ([`SourceState::filter`]); a power of two.
pub const FLOW_FILTER_SLOTS: usize = 16;

/// A source key's entry of `WSG_SOURCES`: its live connections, a filter that tells the XDP
/// program when a SYN of it cannot be a retransmission of a tracked attempt (see
/// [`crate::filter`]), and its recent new-connection attempts (see [`crate::rate`]). One entry
/// per source, so a judgement makes one lookup. The map holds only the first
/// [`source_value_size`]`(ring)` bytes of it: the stamps of the configured ring.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceState {
    /// Concurrent connections (half-open included) charged to the source.
    pub slots: u32,
    /// The sequence number the source's next rate attempt claims (see [`crate::rate`]). Next
    /// to `slots` in one aligned word, so an admission takes a slot and an attempt with one
    /// atomic add.
    pub next: u32,
    /// Sixteen 4-bit counts, bucket `i` in bits `4i..4i+4`: at least the number of this
    /// source's tracked flows (entries of `WSG_FLOWS` charged to this key) with
    /// [`crate::filter::flow_filter_index`] `i`; a count that reached 15 stays there (see
    /// [`crate::filter::filter_added`]). An over-count only costs lookups.
    pub filter: u64,
    /// Attempts of this source refused while it had an entry (`max_connections`, rate,
    /// denylist, ban), wrapping: the "drops" of `sources top`. Only ever added to atomically;
    /// kept here because a refused SYN has the entry at hand (no other lookup).
    pub refused: u32,
    /// The rate window's stamps: attempt `seq` at `seq % ring` (see [`crate::rate`]).
    pub stamps: [u32; RATE_SLOTS],
    pub _pad: u32,
}

/// Bytes of a [`SourceState`] before its rate stamps.
pub const SOURCE_HEADER_LEN: usize = 20;

/// The value size of `WSG_SOURCES` for a rate ring of `ring` stamps: the map is created with
/// it (at most `size_of::<SourceState>()`), so a source pays for the stamps the configuration
/// needs, not for [`RATE_SLOTS`] of them.
pub const fn source_value_size(ring: u32) -> usize {
    SOURCE_HEADER_LEN + 4 * ring as usize
}

/// The rate ring a `WSG_SOURCES` value of `value_size` bytes holds; `None` for a size no ring
/// gives.
pub const fn ring_of_value_size(value_size: usize) -> Option<u32> {
    if value_size < source_value_size(1) || value_size > source_value_size(RATE_SLOTS as u32) {
        return None;
    }
    if !(value_size - SOURCE_HEADER_LEN).is_multiple_of(4) {
        return None;
    }
    Some(((value_size - SOURCE_HEADER_LEN) / 4) as u32)
}

impl SourceState {
    /// A value of `WSG_SOURCES` as read from the map (of any ring's size); `None` for a size no
    /// ring gives. The stamps past the ring are zero.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let ring = ring_of_value_size(b.len())? as usize;
        let u32_at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut s = SourceState {
            slots: u32_at(0),
            next: u32_at(4),
            filter: u64::from_ne_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
            refused: u32_at(16),
            ..SourceState::default()
        };
        for i in 0..ring {
            s.stamps[i] = u32_at(SOURCE_HEADER_LEN + 4 * i);
        }
        Some(s)
    }

    /// Its rate window.
    pub fn rate(&self) -> RateState {
        RateState {
            next: self.next,
            stamps: self.stamps,
        }
    }

    /// Whether the entry holds no connection: no slot taken, no flow counted in its filter
    /// but in saturated buckets. A tracked flow holds a slot, so with no slot taken a
    /// saturated count (which stays 15 whatever leaves) counts nothing; the other counts still
    /// show an admission between its filter add and its slot. Without this an entry whose
    /// bucket once saturated (a source that had ~15 flows in one bucket) would never be idle,
    /// and never removed. (Its rate window may still matter: see
    /// [`RateState::newest_age_ms`].)
    pub fn holds_nothing(&self) -> bool {
        self.slots == 0 && crate::filter::unsaturated(self.filter) == 0
    }

    /// The filter's count of bucket `i`.
    pub fn filter_count(&self, i: usize) -> u32 {
        crate::filter::filter_count(self.filter, i)
    }
}

/// One TCP connection as the server sees it. IPv4 addresses use the first four bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client: [u8; 16],
    pub server: [u8; 16],
    /// Host byte order.
    pub client_port: u16,
    /// Host byte order.
    pub server_port: u16,
    pub family: u16,
    pub _pad: u16,
}

/// [`FlowValue::state`]: admitted, handshake not completed (or not yet seen completed).
pub const FLOW_PENDING: u32 = 1;
/// [`FlowValue::state`]: the kernel established the connection.
pub const FLOW_OWNED: u32 = 2;
/// [`FlowValue::state`]: being released by whoever set it (the entry is about to go).
pub const FLOW_GONE: u32 = 3;

/// A tracked connection (`WSG_FLOWS`): its state, the source key it is charged to, and since
/// when. The source key is the flow's client address masked to `prefix`, on port `port` (the
/// protected port on the wire, which DNAT may have changed in the socket's tuple), so it needs
/// no 20 bytes of its own: 8 bytes a value. Every change of state (and of the key a prefix change
/// moves it to) is a compare-and-swap of `tag`, so exactly one contender (the tracepoint, the
/// sweep, the control program) wins each transition and a slot is given back exactly once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// `state | prefix << 8 | port << 16` ([`FLOW_PENDING`], [`FLOW_OWNED`], [`FLOW_GONE`]).
    pub tag: u32,
    /// Milliseconds of `bpf_ktime_get_ns` (wrapping, as [`crate::rate::stamp_ms`]) when the entry
    /// was made, when its last SYN came (half-open), or when it was established.
    pub since_ms: u32,
}

/// A [`FlowValue::tag`].
#[inline(always)]
pub const fn flow_tag(state: u32, prefix: u32, port: u16) -> u32 {
    (state & 0xff) | (prefix & 0xff) << 8 | (port as u32) << 16
}

/// `tag` in state `state`, the rest kept.
#[inline(always)]
pub const fn with_state(tag: u32, state: u32) -> u32 {
    (tag & !0xff) | (state & 0xff)
}

/// The state of a [`FlowValue::tag`].
#[inline(always)]
pub const fn tag_state(tag: u32) -> u32 {
    tag & 0xff
}

/// The source key's prefix length in a [`FlowValue::tag`].
#[inline(always)]
pub const fn tag_prefix(tag: u32) -> u32 {
    (tag >> 8) & 0xff
}

/// The source key's port in a [`FlowValue::tag`].
#[inline(always)]
pub const fn tag_port(tag: u32) -> u16 {
    (tag >> 16) as u16
}

impl FlowValue {
    /// A value in `state`, charged to `source` (a key of `flow`'s client masked to `prefix`).
    #[inline(always)]
    pub const fn new(state: u32, prefix: u32, port: u16, since_ms: u32) -> Self {
        Self {
            tag: flow_tag(state, prefix, port),
            since_ms,
        }
    }

    /// [`FLOW_PENDING`], [`FLOW_OWNED`] or [`FLOW_GONE`].
    #[inline(always)]
    pub const fn state(&self) -> u32 {
        tag_state(self.tag)
    }

    /// The prefix length of the source key it is charged to.
    #[inline(always)]
    pub const fn prefix(&self) -> u32 {
        tag_prefix(self.tag)
    }

    /// The port of the source key it is charged to.
    #[inline(always)]
    pub const fn port(&self) -> u16 {
        tag_port(self.tag)
    }

    /// The source key it is charged to, as a flow `flow` of it.
    #[inline(always)]
    pub fn source(&self, flow: &FlowKey) -> SourceKey {
        source_of(flow, self.tag)
    }

    /// Milliseconds since `since_ms` at `now_ns`, negative for a stamp ahead of `now_ns` (a
    /// moment later, on another CPU) or more than 24.8 days old (the clock wraps).
    pub fn age_ms(&self, now_ns: u64) -> i32 {
        crate::rate::age_ms(crate::rate::stamp_ms(now_ns), self.since_ms)
    }
}

/// The source key a flow of `tag` is charged to.
#[inline(always)]
pub fn source_of(flow: &FlowKey, tag: u32) -> SourceKey {
    SourceKey {
        addr: crate::key::mask(flow.client, flow.family, tag_prefix(tag)),
        port: tag_port(tag),
        family: flow.family,
    }
}

/// Limits of one protected port. A zero limit means "no limit of this kind".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortConfig {
    /// Non-zero when the port is protected.
    pub enabled: u32,
    /// Concurrent connections (half-open included) per source key.
    pub max_connections: u32,
    /// [`ACTION_DROP`] or [`ACTION_REJECT`] for attempts over `max_connections`.
    pub conn_action: u32,
    /// [`ACTION_DROP`] or [`ACTION_REJECT`] for attempts over the rate.
    pub rate_action: u32,
    /// New connections per `rate_window_ns` per source key, at most [`RATE_SLOTS`].
    pub rate_limit: u32,
    /// Where this port's counters go in the stats map (`0..MAX_PORTS`, see [`stats_bucket`]).
    /// Assigned by userspace, stable while the port stays protected.
    pub index: u32,
    pub rate_window_ns: u64,
    /// Non-zero while the port is in SYN-cookie mode: a new attempt of a source key without
    /// state is answered with a SYN cookie and judged at its ACK (see [`crate::syncookie`]).
    /// Set by userspace (`syn_cookies = "on"`, or `"auto"` under a flood).
    pub syn_cookies: u32,
    /// `rate_window_ns` in whole milliseconds, rounded up ([`crate::rate::window_ms`]): what
    /// the kernel judges with (a division the program would make on every attempt otherwise).
    /// Derived by userspace whenever it writes the port.
    pub rate_window_ms: u32,
}

/// The most ports whose counters the stats map keeps apart (and so the most protected ports).
pub const MAX_PORTS: u32 = 64;
/// The stats bucket of frames and connections not tied to a protected port (not TCP, other
/// ports, fragments, frames too short to tell, closes after a port stopped being protected).
pub const UNATTRIBUTED: u32 = MAX_PORTS;
/// Address families the stats map keeps apart: IPv4 (slot 0) and IPv6 (slot 1).
pub const FAMILIES: u32 = 2;
/// Entries of the stats map: a [`Counter`] array per (port index or [`UNATTRIBUTED`], family).
pub const STATS_ENTRIES: u32 = (MAX_PORTS + 1) * FAMILIES * Counter::COUNT;

/// The stats map's family slot of `family`: 1 for [`AF_INET6`], 0 for anything else.
#[inline(always)]
pub const fn family_slot(family: u16) -> u32 {
    if family == AF_INET6 { 1 } else { 0 }
}

/// Index in the stats map of the first counter of the bucket of `port_index` (a port's
/// [`PortConfig::index`], or [`UNATTRIBUTED`]) and `family`; add a [`Counter`] to it. An index
/// out of range counts as [`UNATTRIBUTED`].
#[inline(always)]
pub const fn stats_bucket(port_index: u32, family: u16) -> u32 {
    let port_index = if port_index < MAX_PORTS {
        port_index
    } else {
        UNATTRIBUTED
    };
    (port_index * FAMILIES + family_slot(family)) * Counter::COUNT
}

/// Settings that apply to every port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GlobalConfig {
    /// Non-zero: count what would be blocked, block nothing.
    pub monitor: u32,
    /// Prefix length of IPv4 source keys (0..=32).
    pub ipv4_prefix: u32,
    /// Prefix length of IPv6 source keys (0..=128).
    pub ipv6_prefix: u32,
    /// What a new attempt gets when it cannot be tracked because a map is full (no room for a
    /// new source's entry in `WSG_SOURCES`, or for the attempt in `WSG_FLOWS`): zero passes
    /// it untracked ("fail open"), non-zero refuses it with the port's `conn_action` ("fail
    /// closed"). Counted as [`Counter::MapFull`] either way; monitor mode refuses nothing and
    /// counts [`Counter::MonitorWouldBlock`] instead. Sources that already have a counter are
    /// judged as usual: `WSG_SOURCES` is never evicted from.
    pub fail_closed: u32,
    /// [`FLAG_ALLOW`], [`FLAG_DENY`], [`FLAG_BANS`], [`FLAG_CHECK_FLOWS`]: which lookups a new
    /// attempt needs, so the hot path skips the maps that are empty. Maintained by userspace
    /// from the maps' contents (and, for [`FLAG_CHECK_FLOWS`], prefix changes and the sweep).
    pub flags: u32,
    /// Non-zero: the first fragment of a TCP segment to a protected port passes (counted as
    /// [`Counter::Fragments`] of its port). Zero, the default: it is dropped, so a SYN sent in
    /// fragments never reaches the kernel unjudged (a real TCP stack never fragments its
    /// segments; conntrack, which iptables' connlimit uses, reassembles them first).
    pub pass_fragments: u32,
    /// How long a source refused by the rate limit is banned; zero: no automatic bans.
    pub ban_ns: u64,
    /// What SYN-ACKs carrying a cookie offer, as the kernel's own SYN-ACKs would.
    pub cookie: CookieSettings,
}

/// The host's TCP settings a SYN cookie's SYN-ACK must match, read by userspace from the
/// interfaces' MTU and the `net.ipv4.tcp_*` sysctls (see [`crate::syncookie`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CookieSettings {
    /// MSS offered over IPv4 (the smallest MTU of the interfaces minus 40).
    pub mss4: u16,
    /// MSS offered over IPv6 (MTU minus 60).
    pub mss6: u16,
    /// The server's window scale (what `tcp_select_initial_window` computes).
    pub wscale: u8,
    /// [`COOKIE_SACK`], [`COOKIE_TIMESTAMPS`], [`COOKIE_WSCALE`]: what the host enables.
    pub flags: u8,
    pub _pad: u16,
}

/// [`CookieSettings::flags`]: `net.ipv4.tcp_sack` is on.
pub const COOKIE_SACK: u8 = 1;
/// [`CookieSettings::flags`]: `net.ipv4.tcp_timestamps` is on.
pub const COOKIE_TIMESTAMPS: u8 = 2;
/// [`CookieSettings::flags`]: `net.ipv4.tcp_window_scaling` is on.
pub const COOKIE_WSCALE: u8 = 4;

impl Default for CookieSettings {
    /// Linux's defaults on a 1500-byte MTU.
    fn default() -> Self {
        Self {
            mss4: 1460,
            mss6: 1440,
            wscale: 7,
            flags: COOKIE_SACK | COOKIE_TIMESTAMPS | COOKIE_WSCALE,
            _pad: 0,
        }
    }
}

/// [`GlobalConfig::flags`]: the allowlist trie (`WSG_ALLOW`) has entries.
pub const FLAG_ALLOW: u32 = 1;
/// [`GlobalConfig::flags`]: the denylist trie (`WSG_DENY`) has entries.
pub const FLAG_DENY: u32 = 2;
/// [`GlobalConfig::flags`]: bans may exist (automatic bans are on, or `WSG_BANS` has entries).
pub const FLAG_BANS: u32 = 4;
/// [`GlobalConfig::flags`]: some tracked flow may be charged to a source key other than the one
/// the current prefixes give it (a prefix changed while flows were tracked), so its count is in
/// another entry's flow filter: every new attempt looks up both flow maps. Set by userspace when
/// a prefix changes; cleared by the sweep once every tracked flow's key is current again.
pub const FLAG_CHECK_FLOWS: u32 = 8;
/// The flags that send a new attempt through the lists and the ban map.
pub const GATE_FLAGS: u32 = FLAG_ALLOW | FLAG_DENY | FLAG_BANS;

impl Default for GlobalConfig {
    fn default() -> Self {
        Self {
            monitor: 0,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            fail_closed: 0,
            flags: 0,
            pass_fragments: 0,
            ban_ns: 0,
            cookie: CookieSettings::default(),
        }
    }
}

/// Recent new-connection attempts of one source key: a ring of millisecond timestamps indexed
/// by a sequence number that every attempt claims (see [`crate::rate`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RateState {
    /// Sequence number the next attempt claims.
    pub next: u32,
    /// Milliseconds of `bpf_ktime_get_ns` (wrapping at 2^32) of attempt `seq` at
    /// `seq % RATE_SLOTS`; zero when never used.
    pub stamps: [u32; RATE_SLOTS],
}

impl Default for RateState {
    fn default() -> Self {
        Self {
            next: 0,
            stamps: [0; RATE_SLOTS],
        }
    }
}

/// Index of each per-CPU decision counter within a bucket of the stats map (see
/// [`stats_bucket`]). Every frame the XDP program sees adds to exactly one of
/// [`Counter::FRAME_OUTCOMES`]; the others (`MonitorWouldBlock`, `RstSent`, `CookieAcksValid`...)
/// say more about a frame already counted, or count what the tracepoint and the sweep saw.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Not IP, not TCP, or TCP to a port that is not protected.
    NotProtected = 0,
    /// IP fragments (passed: only the first carries the TCP header).
    Fragments,
    /// Frames whose headers are truncated or inconsistent (passed untouched).
    Malformed,
    /// TCP segments to a protected port that are not a new attempt (ACK, data, FIN, RST...).
    ProtectedOther,
    /// A SYN of an attempt already admitted, sent again.
    SynRetransmits,
    /// New connection attempts admitted.
    Admitted,
    /// Attempts refused because the source was at `max_connections`.
    ConnLimited,
    /// Attempts refused by the new-connection rate.
    RateLimited,
    /// Attempts that would have been refused, passed because monitor mode is on.
    MonitorWouldBlock,
    /// RSTs sent back for refused attempts.
    RstSent,
    /// Rejects that fell back to a drop (IPv6 with extension headers).
    RejectAsDrop,
    /// Attempts passed without tracking because a map was full.
    MapFull,
    /// Connections the kernel established.
    Established,
    /// Tracked connections released because the kernel closed the socket.
    Closed,
    /// Connections counted that the XDP program had not seen (adopted from the kernel).
    Adopted,
    /// Half-open attempts released by userspace's sweep (the kernel had no socket for them).
    Expired,
    /// Established connections left untracked because a map was full (tracepoint side).
    UntrackedFull,
    /// New attempts of allowlisted sources (not limited, tracked like admitted ones).
    Allowed,
    /// Attempts dropped because the source is on the denylist.
    Denied,
    /// Attempts dropped because the source key is banned.
    Banned,
    /// Bans the XDP program started (a rate-limit refusal while `ban_duration` > 0).
    BansStarted,
    /// Expired bans the XDP program found and ended (userspace's expiry not included).
    BansEnded,
    /// Ban events lost because the ring buffer was full.
    EventsLost,
    /// Bans not started because the ban map was full.
    BansFull,
    /// New attempts of sources without state answered with a SYN cookie (nothing stored).
    CookiesSent,
    /// ACKs to a port in SYN-cookie mode whose cookie is not valid (forged, or too old):
    /// dropped.
    CookieAcksInvalid,
    /// ACKs carrying a cookie already used by an admitted connection: dropped.
    CookieAcksReplayed,
    /// ACKs carrying a valid cookie: judged as the source's new attempt (admitted, refused...).
    CookieAcksValid,
    /// New attempts a port in SYN-cookie mode judged on their SYN instead (no listener in the
    /// interface's network namespace, IP options, a full accept queue).
    CookieFallbacks,
}

impl Counter {
    /// Number of counters; the size of one bucket of the stats map.
    pub const COUNT: u32 = Counter::CookieFallbacks as u32 + 1;
    /// Every counter, in index order.
    pub const ALL: [Counter; Counter::COUNT as usize] = [
        Counter::NotProtected,
        Counter::Fragments,
        Counter::Malformed,
        Counter::ProtectedOther,
        Counter::SynRetransmits,
        Counter::Admitted,
        Counter::ConnLimited,
        Counter::RateLimited,
        Counter::MonitorWouldBlock,
        Counter::RstSent,
        Counter::RejectAsDrop,
        Counter::MapFull,
        Counter::Established,
        Counter::Closed,
        Counter::Adopted,
        Counter::Expired,
        Counter::UntrackedFull,
        Counter::Allowed,
        Counter::Denied,
        Counter::Banned,
        Counter::BansStarted,
        Counter::BansEnded,
        Counter::EventsLost,
        Counter::BansFull,
        Counter::CookiesSent,
        Counter::CookieAcksInvalid,
        Counter::CookieAcksReplayed,
        Counter::CookieAcksValid,
        Counter::CookieFallbacks,
    ];

    /// The counters whose sum is the number of frames the XDP program saw.
    pub const FRAME_OUTCOMES: [Counter; 15] = [
        Counter::NotProtected,
        Counter::Fragments,
        Counter::Malformed,
        Counter::ProtectedOther,
        Counter::SynRetransmits,
        Counter::Admitted,
        Counter::ConnLimited,
        Counter::RateLimited,
        Counter::MapFull,
        Counter::Allowed,
        Counter::Denied,
        Counter::Banned,
        Counter::CookiesSent,
        Counter::CookieAcksInvalid,
        Counter::CookieAcksReplayed,
    ];

    /// A stable snake_case name for logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::NotProtected => "not_protected",
            Counter::Fragments => "fragments",
            Counter::Malformed => "malformed",
            Counter::ProtectedOther => "protected_other",
            Counter::SynRetransmits => "syn_retransmits",
            Counter::Admitted => "admitted",
            Counter::ConnLimited => "conn_limited",
            Counter::RateLimited => "rate_limited",
            Counter::MonitorWouldBlock => "monitor_would_block",
            Counter::RstSent => "rst_sent",
            Counter::RejectAsDrop => "reject_as_drop",
            Counter::MapFull => "map_full",
            Counter::Established => "established",
            Counter::Closed => "closed",
            Counter::Adopted => "adopted",
            Counter::Expired => "expired",
            Counter::UntrackedFull => "untracked_full",
            Counter::Allowed => "allowed",
            Counter::Denied => "denied",
            Counter::Banned => "banned",
            Counter::BansStarted => "bans_started",
            Counter::BansEnded => "bans_ended",
            Counter::EventsLost => "events_lost",
            Counter::BansFull => "bans_full",
            Counter::CookiesSent => "cookies_sent",
            Counter::CookieAcksInvalid => "cookie_acks_invalid",
            Counter::CookieAcksReplayed => "cookie_acks_replayed",
            Counter::CookieAcksValid => "cookie_acks_valid",
            Counter::CookieFallbacks => "cookie_fallbacks",
        }
    }
}

/// [`BanValue::reason`]: refused by the new-connection rate while `ban_duration` > 0.
pub const BAN_RATE: u32 = 1;
/// [`BanValue::reason`]: banned by the operator.
pub const BAN_MANUAL: u32 = 2;

/// A banned source key (`WSG_BANS`): every new attempt of it is dropped until `until_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BanValue {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the ban ends.
    pub until_ns: u64,
    /// [`BAN_RATE`] or [`BAN_MANUAL`].
    pub reason: u32,
    pub _pad: u32,
}

/// [`BanEvent::kind`]: a ban started.
pub const EVENT_BAN_STARTED: u32 = 1;
/// [`BanEvent::kind`]: a ban ended (the XDP program found it expired).
pub const EVENT_BAN_ENDED: u32 = 2;

/// A record of the `WSG_EVENTS` ring buffer, from the XDP program to the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BanEvent {
    /// [`EVENT_BAN_STARTED`] or [`EVENT_BAN_ENDED`].
    pub kind: u32,
    /// The ban's [`BanValue::reason`].
    pub reason: u32,
    pub source: SourceKey,
    pub _pad: u32,
    /// When the ban ends (or ended), `bpf_ktime_get_ns`.
    pub until_ns: u64,
}

impl BanEvent {
    /// The event from its bytes as the ring buffer holds them; `None` if too short.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < size_of::<Self>() {
            return None;
        }
        // SAFETY: length checked; every bit pattern is a valid BanEvent (integers only).
        Some(unsafe { core::ptr::read_unaligned(b.as_ptr().cast::<Self>()) })
    }
}

/// The `WSG_SCRATCH` value: copies of a frame's IP and TCP headers, for the kernel's SYN-cookie
/// helpers (which take memory of a size the verifier can bound, and the BPF stack is full).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Scratch {
    pub ip: [u8; 40],
    pub tcp: [u8; 60],
    /// A `struct bpf_sock_tuple` for the socket lookup.
    pub tuple: [u8; 40],
    /// The options of the SYN being answered.
    pub options: crate::syncookie::SynOptions,
    /// Where reading them is.
    pub cursor: crate::syncookie::OptionCursor,
    /// The flow of a valid cookie ACK being judged, and its cookie.
    pub flow: FlowKey,
    pub cookie: u32,
    pub _pad: u32,
}

/// A CPU's refusal memo (`WSG_MEMO`, see [`crate::memo`]): the last source key it refused at
/// `max_connections`, valid while the epoch (`WSG_EPOCH`) stands.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefusalMemo {
    pub source: SourceKey,
    /// `WSG_EPOCH` when the source's slot count was read.
    pub epoch: u32,
    /// The port's `max_connections` then (never 0 in a memo made).
    pub max: u32,
    /// Plain per-CPU writes only: a seqlock for userspace, odd while `pending` is being moved
    /// into the source's entry.
    pub flushes: u32,
    /// The source's flow filter, read after its slot count.
    pub filter: u64,
    /// Refusals made from the memo, not yet in the source's [`SourceState::refused`].
    pub pending: u32,
    pub _pad: u32,
}

/// Release a half-open attempt the kernel no longer has a socket for.
pub const OP_EXPIRE_PENDING: u32 = 1;
/// Release an established connection the kernel no longer has a socket for.
pub const OP_RELEASE_OWNED: u32 = 2;
/// Count an established connection the programs have not seen (e.g. older than ws-guard).
pub const OP_ADOPT: u32 = 3;
/// End the ban of `source` if it is over (the daemon's expiry of bans whose source went quiet),
/// counted and reported like an end the XDP program finds.
pub const OP_EXPIRE_BAN: u32 = 4;
/// Track the half-open attempt `flow` (the tuple on the wire) as the established connection
/// `socket` (the server's socket, whose address or port DNAT rewrote): the sweep found the
/// socket in another network namespace under the client's address and port.
pub const OP_TRANSLATE: u32 = 5;
/// Charge tracked flow `flow` to `source` too (a slot, a filter count): the first step of
/// moving it to the source key a prefix change gives it, taken before the new prefixes are
/// written, so the flow is never charged to no key.
pub const OP_CHARGE: u32 = 6;
/// Undo an [`OP_CHARGE`].
pub const OP_UNCHARGE: u32 = 7;
/// Move half-open `flow`, charged to `source` by [`OP_CHARGE`], to it (`source` is the flow's
/// client masked to [`ControlOp::prefix`]): its value names `source`, its old key gives the
/// slot back (or, if the flow is gone meanwhile, the charge is given back).
pub const OP_REKEY_PENDING: u32 = 8;
/// [`OP_REKEY_PENDING`] for an established flow.
pub const OP_REKEY_OWNED: u32 = 9;
/// Clear the rate stamps of `source` that are [`crate::rate::STALE_MS`] old or more, before
/// the millisecond clock's wrap could make them look recent (an entry kept by a connection
/// for weeks).
pub const OP_CLEAR_STALE: u32 = 10;
/// Move the refusal memos' epoch on: userspace changed the lists, bans, limits or global
/// settings, so no CPU may refuse from what it remembers (see [`crate::memo`]).
pub const OP_FORGET: u32 = 11;
/// Move the refusals counted in this CPU's refusal memo into the entry of the source it names
/// (userspace runs it on the memo's CPU before it removes that entry: see [`crate::memo`]).
pub const OP_SETTLE_MEMO: u32 = 12;

/// A request to the control program, passed as its "packet" through BPF_PROG_TEST_RUN, so the
/// change happens in the kernel with the same atomic operations the other programs use.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ControlOp {
    pub op: u32,
    /// [`OP_REKEY_PENDING`], [`OP_REKEY_OWNED`]: the prefix length `source` was masked to.
    pub prefix: u32,
    pub flow: FlowKey,
    pub source: SourceKey,
    pub _pad2: u32,
    /// [`OP_TRANSLATE`]: the socket's tuple.
    pub socket: FlowKey,
}

/// Control program answer: the request changed state.
pub const CONTROL_DONE: u32 = 2;
/// Control program answer: nothing to do (already released, already counted...).
pub const CONTROL_NOOP: u32 = 1;

const _: () = {
    assert!(size_of::<SourceKey>() == 20);
    assert!(core::mem::align_of::<SourceKey>() == 4);
    assert!(size_of::<FlowKey>() == 40);
    assert!(size_of::<SourceState>() == 16 + size_of::<RateState>() + 4);
    assert!(core::mem::offset_of!(SourceState, stamps) == SOURCE_HEADER_LEN);
    assert!(core::mem::offset_of!(SourceState, next) == 4);
    assert!(source_value_size(RATE_SLOTS as u32) + 4 == size_of::<SourceState>());
    assert!(FLOW_FILTER_SLOTS.is_power_of_two());
    // Sixteen 4-bit counts in the u64.
    assert!(FLOW_FILTER_SLOTS * 4 == 64);
    assert!(size_of::<FlowValue>() == 8);
    assert!(size_of::<PortConfig>() == 40);
    assert!(size_of::<GlobalConfig>() == 40);
    assert!(size_of::<CookieSettings>() == 8);
    assert!(size_of::<Scratch>() == 204);
    assert!(size_of::<BanValue>() == 16);
    assert!(size_of::<BanEvent>() == 40);
    assert!(size_of::<RateState>() == 4 + 4 * RATE_SLOTS);
    assert!(size_of::<ControlOp>() == 112);
    assert!(size_of::<RefusalMemo>() == 48);
    assert!(core::mem::offset_of!(RefusalMemo, filter) == 32);
    assert!(Counter::ALL.len() == Counter::COUNT as usize);
    assert!(stats_bucket(UNATTRIBUTED, AF_INET6) + Counter::COUNT == STATS_ENTRIES);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain `#[repr(C)]` data without padding (sizes asserted above).
    unsafe impl aya::Pod for SourceKey {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for SourceState {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for PortConfig {}
    unsafe impl aya::Pod for GlobalConfig {}
    unsafe impl aya::Pod for CookieSettings {}
    unsafe impl aya::Pod for Scratch {}
    unsafe impl aya::Pod for RateState {}
    unsafe impl aya::Pod for ControlOp {}
    unsafe impl aya::Pod for BanValue {}
    unsafe impl aya::Pod for BanEvent {}
    unsafe impl aya::Pod for RefusalMemo {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_tags_keep_state_prefix_and_port_apart() {
        let v = FlowValue::new(FLOW_PENDING, 128, 65535, 7);
        assert_eq!(
            (v.state(), v.prefix(), v.port(), v.since_ms),
            (FLOW_PENDING, 128, 65535, 7)
        );
        let moved = with_state(v.tag, FLOW_OWNED);
        assert_eq!(tag_state(moved), FLOW_OWNED);
        assert_eq!(moved & !0xff, v.tag & !0xff);
        let mut client = [0u8; 16];
        client[..4].copy_from_slice(&[198, 18, 7, 9]);
        let flow = FlowKey {
            client,
            server_port: 9000,
            family: AF_INET,
            ..FlowKey::default()
        };
        let s = FlowValue::new(FLOW_OWNED, 24, 8080, 0).source(&flow);
        assert_eq!(&s.addr[..4], &[198, 18, 7, 0]);
        assert_eq!((s.port, s.family), (8080, AF_INET));
    }

    #[test]
    fn source_values_of_every_ring_read_back() {
        let mut s = SourceState {
            slots: 3,
            refused: 7,
            filter: 0x1234_5678_9abc_def0,
            ..SourceState::default()
        };
        s.next = 11;
        for ring in 1..=RATE_SLOTS as u32 {
            for i in 0..RATE_SLOTS {
                s.stamps[i] = if i < ring as usize { 100 + i as u32 } else { 0 };
            }
            // The bytes of the struct, cut where the map's value ends.
            // SAFETY: plain `#[repr(C)]` data without padding.
            let all = unsafe {
                core::slice::from_raw_parts(
                    (&s as *const SourceState).cast::<u8>(),
                    size_of::<SourceState>(),
                )
            };
            let size = source_value_size(ring);
            assert_eq!(ring_of_value_size(size), Some(ring));
            assert_eq!(
                SourceState::from_bytes(&all[..size]),
                Some(s),
                "ring {ring}"
            );
        }
        assert_eq!(ring_of_value_size(SOURCE_HEADER_LEN), None);
        assert_eq!(ring_of_value_size(source_value_size(1) + 2), None);
        assert_eq!(SourceState::from_bytes(&[0; 3]), None);
    }

    #[test]
    fn counters_are_indexed_in_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{}", c.name());
        }
    }

    #[test]
    fn stats_buckets_tile_the_map() {
        let mut seen = [false; STATS_ENTRIES as usize];
        for index in 0..=UNATTRIBUTED {
            for family in [AF_INET, AF_INET6] {
                for c in Counter::ALL {
                    let i = (stats_bucket(index, family) + c as u32) as usize;
                    assert!(!seen[i], "index {index} family {family} {}", c.name());
                    seen[i] = true;
                }
            }
        }
        assert!(seen.iter().all(|s| *s));
        // Out-of-range indexes and unknown families land in existing buckets.
        assert_eq!(
            stats_bucket(MAX_PORTS + 7, AF_INET),
            stats_bucket(UNATTRIBUTED, 0)
        );
        assert_eq!(stats_bucket(3, 0), stats_bucket(3, AF_INET));
    }
}
