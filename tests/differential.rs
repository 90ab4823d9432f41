//! Differential testing of the XDP program against the host-side reference model
//! (`ws_guard_tests::model`): a deterministic generator makes frames (random bytes; SYNs, ACKs,
//! SYN-ACKs, RSTs, FINs and other segments over IPv4 and IPv6, with VLAN stacks of 0-4 tags,
//! IPv4 options, IPv6 extension headers (fragment headers included), TCP options and payloads,
//! then mutated: bit flips, changed header fields, bogus lengths and checksums, truncation,
//! padding) from a small pool of sources and ports, so the limits are hit and tuples repeat
//! (retransmits). Limits, actions, monitor mode, prefixes and failing open or closed change
//! along the way, and accounting requests (expiry, adoption, release) go through the control
//! program. The allow and deny lists change (`Guard::apply_policy`: CIDRs over the pool's
//! sources, both families, nested prefixes, allowlisted ranges inside denied ones) with the
//! automatic ban duration (none, short, long); manual bans come and go (`Guard::ban` with long,
//! short and already-past deadlines, `Guard::unban`, `Guard::expire_bans`), and automatic bans
//! start on rate refusals and end when an attempt finds them expired. Every frame runs through
//! the real program (BPF_PROG_TEST_RUN) and the model; the verdict and the frame that leaves
//! are compared every time, the rate window a SYN goes through right after it, the counters
//! (totals and per port and family, the list and ban counters included) every
//! `WS_GUARD_DIFF_CHECK_EVERY` frames, and every map (the global settings with their lookup
//! flags, both lists and the ban map included) and the ban events of the ring buffer at
//! checkpoints and at the end.
//!
//! `WS_GUARD_DIFF_FRAMES` (default 20,000) sets the number of frames, `WS_GUARD_DIFF_SEED` the
//! seed (printed on failure, with the first disagreeing frame in hex). The full run:
//! `WS_GUARD_DIFF_FRAMES=1000000 cargo test -p ws-guard-tests --test differential -- --nocapture`.

use std::{
    collections::{BTreeSet, HashMap, HashSet, VecDeque},
    fmt::Write as _,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use ipnet::IpNet;
use ws_guard::{
    events::drain,
    guard::{Guard, LoadOptions},
    lists::{List, Policy},
};
use ws_guard_common::{
    filter::flow_filter_index,
    key::flow_source,
    maps::{
        ACTION_DROP, ACTION_REJECT, AF_INET, AF_INET6, BAN_MANUAL, BanValue, CONTROL_DONE,
        ControlOp, Counter, FLAG_CHECK_FLOWS, FlowKey, FlowValue, GlobalConfig, OP_ADOPT,
        OP_EXPIRE_PENDING, OP_RELEASE_OWNED, PortConfig, SourceKey, SourceState,
    },
    names,
    parse::{self, Parsed},
    policy::{CidrKey, ban_until, cidr_key},
};
use ws_guard_tests::{
    frames::Rng,
    model::{Capacity, Clock, Model, Since, Tracked, XDP_DROP, XDP_PASS, XDP_TX},
};

const SECOND: u64 = 1_000_000_000;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("{name}={v}: {e}"))
        }
        Err(_) => default,
    }
}

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write to.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(r, 0, "clock_gettime");
    ts.tv_sec as u64 * SECOND + ts.tv_nsec as u64
}

fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Frames.

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
const TPID_8021Q: u16 = 0x8100;
const TPID_8021AD: u16 = 0x88a8;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;
const URG: u8 = 0x20;
const ECE: u8 = 0x40;
const CWR: u8 = 0x80;

const HOPOPTS: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const AH: u8 = 51;
const DSTOPTS: u8 = 60;

/// Protected (sometimes) and other destination ports.
const PORTS: [u16; 5] = [9000, 9001, 9002, 443, 80];

const V4_CLIENTS: [[u8; 4]; 7] = [
    [198, 18, 0, 1],
    [198, 18, 0, 2],
    [198, 18, 0, 3],
    [198, 18, 0, 130],
    [198, 18, 1, 1],
    [198, 18, 1, 2],
    [198, 19, 200, 7],
];
const V4_SERVERS: [[u8; 4]; 2] = [[198, 19, 0, 1], [198, 19, 0, 2]];

fn v6(words: [u16; 8]) -> [u8; 16] {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[2 * i..2 * i + 2].copy_from_slice(&w.to_be_bytes());
    }
    o
}

fn v6_clients() -> [[u8; 16]; 7] {
    [
        v6([0x2001, 2, 0, 1, 0, 0, 0, 1]),
        v6([0x2001, 2, 0, 1, 0, 0, 0, 2]),
        v6([0x2001, 2, 0, 1, 0x8000, 0, 0, 1]),
        v6([0x2001, 2, 0, 2, 0, 0, 0, 1]),
        v6([0x2001, 2, 0, 2, 0, 0, 0, 2]),
        v6([0x2001, 2, 0, 0x100, 0, 0, 0, 9]),
        v6([0x2001, 2, 0, 0xff01, 1, 2, 3, 4]),
    ]
}

/// CIDRs over the pool's sources for the lists: nested prefixes of both families, some
/// covering several clients, some one, `/0` all of a family.
const V4_CIDRS: [&str; 10] = [
    "198.18.0.0/15",
    "198.18.0.0/16",
    "198.18.0.0/23",
    "198.18.0.0/24",
    "198.18.0.0/25",
    "198.18.0.128/25",
    "198.18.0.2/32",
    "198.18.1.0/24",
    "198.19.200.7/32",
    "0.0.0.0/0",
];
const V6_CIDRS: [&str; 9] = [
    "2001:2::/48",
    "2001:2:0:1::/64",
    "2001:2:0:1::/65",
    "2001:2:0:1::2/128",
    "2001:2:0:2::/64",
    "2001:2:0:100::/56",
    "2001:2:0:ff00::/56",
    "2001:2::/46",
    "::/0",
];

/// The ban durations (automatic and manual): none, already past (0, 1 µs), short, long, never
/// ending (the deadline saturates).
const BAN_NS: [u64; 8] = [
    0,
    0,
    1_000,
    200_000,
    5_000_000,
    1000 * SECOND,
    1000 * SECOND,
    u64::MAX,
];

/// The trie key of a CIDR, as the model keeps it (`policy::cidr_key`).
fn cidr(net: &IpNet) -> CidrKey {
    match net {
        IpNet::V4(n) => {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&n.addr().octets());
            cidr_key(AF_INET, a, n.prefix_len() as u32)
        }
        IpNet::V6(n) => cidr_key(AF_INET6, n.addr().octets(), n.prefix_len() as u32),
    }
}

fn v6_servers() -> [[u8; 16]; 2] {
    [
        v6([0x2001, 2, 0, 0xff, 0, 0, 0, 1]),
        v6([0x2001, 2, 0, 0xff, 0, 0, 0, 2]),
    ]
}

#[derive(Clone, Debug)]
enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        /// Option bytes (a multiple of four).
        options: Vec<u8>,
        payload: Vec<u8>,
    },
    /// Any other protocol (UDP, ICMP, ESP...): its number and bytes.
    Other { proto: u8, bytes: Vec<u8> },
}

#[derive(Clone, Debug)]
enum Net {
    V4 {
        src: [u8; 4],
        dst: [u8; 4],
        options: Vec<u8>,
        /// Flags and fragment offset field (host order, DF = 0x4000).
        frag: u16,
    },
    V6 {
        src: [u8; 16],
        dst: [u8; 16],
        /// (type, length byte); the fragment header's length byte is reserved.
        exts: Vec<(u8, u8)>,
    },
    /// Another EtherType, with bytes.
    Other { ether_type: u16, bytes: Vec<u8> },
}

#[derive(Clone, Debug)]
struct Spec {
    tags: Vec<(u16, u16)>,
    net: Net,
    l4: L4,
}

/// Where the fields of a built frame are, for targeted mutations.
#[derive(Clone, Debug, Default)]
struct Layout {
    l3: usize,
    l4: Option<usize>,
    /// End of the TCP header (or of the headers before an opaque payload).
    headers_end: usize,
    v6: bool,
    /// Offsets of the extension headers.
    exts: Vec<usize>,
}

fn csum_add(mut acc: u32, b: &[u8]) -> u32 {
    for c in b.chunks(2) {
        acc += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    acc
}

fn csum_finish(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

fn ext_len(kind: u8, len_byte: u8) -> usize {
    match kind {
        AH => (len_byte as usize + 2) * 4,
        FRAGMENT => 8,
        _ => (len_byte as usize + 1) * 8,
    }
}

impl Spec {
    fn build(&self, rng: &mut Rng) -> (Vec<u8>, Layout) {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&[0x02, 0, 0x5e, 0, 0, 2]);
        f.extend_from_slice(&[0x02, 0, 0x5e, 0, 0, 1]);
        let ether_type = match &self.net {
            Net::V4 { .. } => ETH_P_IP,
            Net::V6 { .. } => ETH_P_IPV6,
            Net::Other { ether_type, .. } => *ether_type,
        };
        let mut types: Vec<u16> = self.tags.iter().map(|t| t.0).collect();
        types.push(ether_type);
        f.extend_from_slice(&types[0].to_be_bytes());
        for (i, (_, tci)) in self.tags.iter().enumerate() {
            f.extend_from_slice(&tci.to_be_bytes());
            f.extend_from_slice(&types[i + 1].to_be_bytes());
        }
        let l3 = f.len();
        let mut layout = Layout {
            l3,
            ..Layout::default()
        };
        let (proto, l4_bytes) = match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                seq,
                ack,
                flags,
                options,
                payload,
            } => {
                let mut t = Vec::with_capacity(20 + options.len() + payload.len());
                t.extend_from_slice(&sport.to_be_bytes());
                t.extend_from_slice(&dport.to_be_bytes());
                t.extend_from_slice(&seq.to_be_bytes());
                t.extend_from_slice(&ack.to_be_bytes());
                t.push((((20 + options.len()) / 4) as u8) << 4);
                t.push(*flags);
                t.extend_from_slice(&64240u16.to_be_bytes());
                t.extend_from_slice(&[0, 0]); // checksum, below
                t.extend_from_slice(&(rng.next_u64() as u16 & 0x7).to_be_bytes());
                t.extend_from_slice(options);
                t.extend_from_slice(payload);
                (6u8, t)
            }
            L4::Other { proto, bytes } => (*proto, bytes.clone()),
        };
        let tcp_len = match &self.l4 {
            L4::Tcp { options, .. } => 20 + options.len(),
            L4::Other { .. } => 0,
        };
        match &self.net {
            Net::V4 {
                src,
                dst,
                options,
                frag,
            } => {
                let ihl = 20 + options.len();
                let mut h = vec![0u8; 20];
                h[0] = 0x40 | (ihl / 4) as u8;
                h[2..4].copy_from_slice(&((ihl + l4_bytes.len()) as u16).to_be_bytes());
                h[4..6].copy_from_slice(&(rng.next_u64() as u16).to_be_bytes());
                h[6..8].copy_from_slice(&frag.to_be_bytes());
                h[8] = 64;
                h[9] = proto;
                h[12..16].copy_from_slice(src);
                h[16..20].copy_from_slice(dst);
                h.extend_from_slice(options);
                let c = csum_finish(csum_add(0, &h));
                h[10..12].copy_from_slice(&c.to_be_bytes());
                f.extend_from_slice(&h);
                let l4 = f.len();
                let mut l4b = l4_bytes;
                if matches!(self.l4, L4::Tcp { .. }) {
                    let mut acc = csum_add(0, src);
                    acc = csum_add(acc, dst);
                    acc += 6 + l4b.len() as u32;
                    let c = csum_finish(csum_add(acc, &l4b));
                    l4b[16..18].copy_from_slice(&c.to_be_bytes());
                    layout.l4 = Some(l4);
                }
                layout.headers_end = l4 + tcp_len.max(8).min(l4b.len());
                f.extend_from_slice(&l4b);
            }
            Net::V6 { src, dst, exts } => {
                let mut chain = Vec::new();
                let mut offsets = Vec::new();
                for (i, (kind, len_byte)) in exts.iter().enumerate() {
                    let next = exts.get(i + 1).map(|e| e.0).unwrap_or(proto);
                    let n = ext_len(*kind, *len_byte);
                    offsets.push(l3 + 40 + chain.len());
                    let mut e = vec![0u8; n];
                    e[0] = next;
                    e[1] = *len_byte;
                    if *kind == FRAGMENT {
                        let off_flags = rng.next_u64() as u16 & 0xfff9;
                        e[2..4].copy_from_slice(&off_flags.to_be_bytes());
                        e[4..8].copy_from_slice(&0xdead_beefu32.to_be_bytes());
                    } else if n > 2 {
                        // PadN over the rest.
                        e[2] = 1;
                        e[3] = (n - 4) as u8;
                    }
                    chain.extend_from_slice(&e);
                }
                let mut h = vec![0u8; 40];
                h[0] = 0x60;
                h[1] = 0x01;
                h[2] = 0x23;
                h[3] = 0x45;
                h[4..6].copy_from_slice(&((chain.len() + l4_bytes.len()) as u16).to_be_bytes());
                h[6] = exts.first().map(|e| e.0).unwrap_or(proto);
                h[7] = 64;
                h[8..24].copy_from_slice(src);
                h[24..40].copy_from_slice(dst);
                f.extend_from_slice(&h);
                f.extend_from_slice(&chain);
                let l4 = f.len();
                let mut l4b = l4_bytes;
                if matches!(self.l4, L4::Tcp { .. }) {
                    let mut acc = csum_add(0, src);
                    acc = csum_add(acc, dst);
                    acc += 6 + l4b.len() as u32;
                    let c = csum_finish(csum_add(acc, &l4b));
                    l4b[16..18].copy_from_slice(&c.to_be_bytes());
                    layout.l4 = Some(l4);
                }
                layout.v6 = true;
                layout.exts = offsets;
                layout.headers_end = l4 + tcp_len.max(8).min(l4b.len());
                f.extend_from_slice(&l4b);
            }
            Net::Other { bytes, .. } => {
                f.extend_from_slice(bytes);
                layout.headers_end = f.len();
            }
        }
        layout.headers_end = layout.headers_end.min(f.len());
        (f, layout)
    }

    fn flow(&self) -> Option<FlowKey> {
        let L4::Tcp { sport, dport, .. } = &self.l4 else {
            return None;
        };
        let (client, server, family) = match &self.net {
            Net::V4 { src, dst, .. } => {
                let mut c = [0u8; 16];
                let mut s = [0u8; 16];
                c[..4].copy_from_slice(src);
                s[..4].copy_from_slice(dst);
                (c, s, AF_INET)
            }
            Net::V6 { src, dst, .. } => (*src, *dst, AF_INET6),
            Net::Other { .. } => return None,
        };
        Some(FlowKey {
            client,
            server,
            client_port: *sport,
            server_port: *dport,
            family,
            _pad: 0,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The generator.

#[derive(Clone, Debug)]
enum Event {
    /// A frame and how it was made.
    Frame(Vec<u8>, Desc),
    SetPort(u16, PortConfig),
    SetGlobal(GlobalConfig),
    Expire(FlowKey),
    ReleaseOwned(FlowKey),
    Adopt(FlowKey),
    RemoveIdle(SourceKey),
    /// `Guard::apply_policy`: the lists and the automatic ban duration.
    Policy {
        allow: Vec<IpNet>,
        deny: Vec<IpNet>,
        ban_ns: u64,
    },
    /// `Guard::ban` for this many nanoseconds.
    Ban(SourceKey, u64),
    Unban(SourceKey),
    ExpireBans,
    /// `Guard::settle_flow_check` (the sweep's clearing of `FLAG_CHECK_FLOWS`).
    SettleFlowCheck,
    /// Checkpoint: compare every map; then maybe release everything tracked, maybe lift every
    /// ban.
    Checkpoint {
        release_all: bool,
        unban_all: bool,
    },
}

/// How a frame was made (formatted only for a failure report).
#[derive(Clone, Debug, Default)]
struct Desc {
    spec: Option<Spec>,
    notes: String,
}

impl Desc {
    fn of(spec: &Spec, notes: String) -> Self {
        Self {
            spec: Some(spec.clone()),
            notes,
        }
    }
}

/// An event of the run, for the failure report.
enum Noted {
    Frame(u64, Vec<u8>, Desc),
    Text(String),
}

struct Gen {
    rng: Rng,
    global: GlobalConfig,
    /// Flows of recent structured TCP frames, for retransmits and accounting requests.
    recent: VecDeque<FlowKey>,
    /// Recent structured frames (with their specs), to retransmit as they were.
    recent_specs: VecDeque<Spec>,
    queue: VecDeque<Event>,
    frames: u64,
    /// Frames between checkpoints.
    checkpoint_every: u64,
    next_checkpoint: u64,
    /// Frames between new configurations of every port.
    epoch: u64,
    next_epoch: u64,
    v6_clients: [[u8; 16]; 7],
    v6_servers: [[u8; 16]; 2],
    /// The small-maps run makes fail-closed more common.
    small_maps: bool,
    /// Sources banned by hand lately, to lift again.
    banned: VecDeque<SourceKey>,
    /// The cookie run: ports go into SYN-cookie mode.
    cookies: bool,
    /// ACKs answering SYN-ACKs the kernel sent with a cookie (from [`Run::cookie_acks`]).
    cookie_acks: VecDeque<Vec<u8>>,
    /// Cookie ACKs sent so far: kept under the capacity of `WSG_COOKIES` (an LRU whose
    /// evictions the model does not follow).
    cookie_acks_sent: u64,
    /// The limits last set on each port, and whether the allowlist has entries: bursts go only
    /// where a small `max_connections` holds the source's flows (see [`Gen::burst`]).
    limits: HashMap<u16, PortConfig>,
    allowlist: bool,
}

/// At most this many cookie ACKs per run: `WSG_COOKIES` holds 16,384 entries.
const MAX_COOKIE_ACKS: u64 = 12_000;

impl Gen {
    fn new(seed: u64, checkpoint_every: u64, small_maps: bool) -> Self {
        Self {
            rng: Rng::new(seed),
            global: GlobalConfig::default(),
            recent: VecDeque::new(),
            recent_specs: VecDeque::new(),
            queue: VecDeque::new(),
            frames: 0,
            checkpoint_every,
            next_checkpoint: checkpoint_every,
            epoch: 2_500,
            next_epoch: 0,
            v6_clients: v6_clients(),
            v6_servers: v6_servers(),
            small_maps,
            cookies: false,
            cookie_acks: VecDeque::new(),
            cookie_acks_sent: 0,
            limits: HashMap::new(),
            allowlist: false,
            banned: VecDeque::new(),
        }
    }

    /// Lists for `Guard::apply_policy`: often empty, else a few CIDRs of both families,
    /// sometimes an allowlisted range inside a denied one.
    fn policy(&mut self) -> Event {
        let mut allow = Vec::new();
        let mut deny = Vec::new();
        let net = |g: &mut Gen| -> IpNet {
            let s = if g.chance(1, 2) {
                g.pick(&V4_CIDRS)
            } else {
                g.pick(&V6_CIDRS)
            };
            s.parse().unwrap()
        };
        match self.below(10) {
            0..3 => {}
            3..5 => {
                for _ in 0..self.rng.range(1, 4) {
                    deny.push(net(self));
                }
            }
            5..6 => {
                for _ in 0..self.rng.range(1, 4) {
                    allow.push(net(self));
                }
            }
            _ => {
                // Allow inside deny: a wide denied range, narrower allowed ones (either
                // family's, whichever nests), and a few at random.
                deny.push(
                    self.pick(&["198.18.0.0/15", "2001:2::/46", "0.0.0.0/0", "::/0"])
                        .parse()
                        .unwrap(),
                );
                for _ in 0..self.rng.range(1, 3) {
                    allow.push(net(self));
                }
                for _ in 0..self.rng.range(0, 3) {
                    deny.push(net(self));
                }
            }
        }
        let ban_ns = self.pick(&BAN_NS);
        self.global.ban_ns = ban_ns;
        self.allowlist = !allow.is_empty();
        Event::Policy {
            allow,
            deny,
            ban_ns,
        }
    }

    fn below(&mut self, n: usize) -> usize {
        self.rng.range(0, n)
    }

    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.rng.chance(num, den)
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.rng.fill(&mut v);
        v
    }

    fn port_config(&mut self) -> PortConfig {
        let enabled = if self.chance(3, 4) {
            self.pick(&[1, 1, 1, 7, 0xffff_ffff])
        } else {
            0
        };
        let action = |g: &mut Gen| {
            g.pick(&[
                ACTION_DROP,
                ACTION_REJECT,
                ACTION_REJECT,
                ACTION_DROP,
                2,
                0xffff_ffff,
            ])
        };
        PortConfig {
            enabled,
            max_connections: self.pick(&[0, 1, 1, 2, 2, 3, 5, 8, 100]),
            conn_action: action(self),
            rate_action: action(self),
            rate_limit: self.pick(&[0, 0, 1, 1, 2, 3, 5, 9, 32, 33, 1000]),
            index: self.rng.next_u64() as u32,
            rate_window_ns: self.pick(&[
                1,
                1_000,
                20_000,
                50_000,
                200_000,
                1_000_000,
                5_000_000,
                100 * SECOND,
                u64::MAX,
            ]),
            syn_cookies: if self.cookies {
                self.pick(&[0, 1, 1, 1, 7])
            } else {
                0
            },
            ..PortConfig::default()
        }
    }

    fn global_config(&mut self) -> GlobalConfig {
        GlobalConfig {
            monitor: if self.chance(1, 5) {
                self.pick(&[1, 2, 0xffff_ffff])
            } else {
                0
            },
            ipv4_prefix: self.pick(&[32, 32, 32, 24, 31, 20, 8, 0, 33, 255]),
            ipv6_prefix: self.pick(&[64, 64, 128, 56, 48, 127, 0, 129, 1000]),
            fail_closed: if self.chance(if self.small_maps { 2 } else { 1 }, 4) {
                self.pick(&[1, 2, 0xffff_ffff])
            } else {
                0
            },
            ban_ns: if self.chance(1, 2) {
                self.global.ban_ns
            } else {
                self.pick(&BAN_NS)
            },
            pass_fragments: if self.chance(1, 3) {
                self.pick(&[1, 2, 0xffff_ffff])
            } else {
                0
            },
            ..GlobalConfig::default()
        }
    }

    /// The next event; `None` once `total` frames were made and the final checkpoint queued.
    fn next(&mut self, total: u64) -> Option<Event> {
        if let Some(e) = self.queue.pop_front() {
            return Some(e);
        }
        if self.frames >= total {
            return None;
        }
        if self.frames >= self.next_checkpoint {
            self.next_checkpoint += self.checkpoint_every;
            let release_all = self.chance(1, 2);
            let unban_all = self.chance(1, 3);
            return Some(Event::Checkpoint {
                release_all,
                unban_all,
            });
        }
        if self.frames >= self.next_epoch {
            self.next_epoch += self.epoch;
            if self.chance(1, 2) || self.frames == 0 {
                self.global = self.global_config();
                self.queue.push_back(Event::SetGlobal(self.global));
            }
            for port in PORTS {
                let e = self.set_port(port);
                self.queue.push_back(e);
            }
            if self.chance(1, 2) {
                let p = self.policy();
                self.queue.push_back(p);
            }
            return self.queue.pop_front();
        }
        let r = self.below(10_000);
        let e = match r {
            0..30 => {
                let port = self.pick(&PORTS);
                self.set_port(port)
            }
            30..40 => {
                self.global = if self.chance(1, 2) {
                    GlobalConfig {
                        monitor: (self.global.monitor == 0) as u32,
                        ..self.global
                    }
                } else {
                    self.global_config()
                };
                Event::SetGlobal(self.global)
            }
            40..240 => Event::Expire(self.known_flow()),
            240..290 => Event::ReleaseOwned(self.known_flow()),
            290..340 => Event::Adopt(self.known_flow()),
            340..360 => {
                let f = self.known_flow();
                Event::RemoveIdle(ws_guard_common::key::flow_source(&f, &self.global))
            }
            360..380 => {
                // Every truncation of one frame, then the frame itself.
                let spec = self.spec();
                let (f, _) = spec.build(&mut self.rng);
                for len in 14..f.len() {
                    self.queue.push_back(Event::Frame(
                        f[..len].to_vec(),
                        Desc::of(&spec, format!("cut at {len}")),
                    ));
                }
                self.frames += f.len() as u64 - 14;
                Event::Frame(f, Desc::of(&spec, "whole, after its truncations".into()))
            }
            380..392 => self.policy(),
            392..412 => {
                let f = self.known_flow();
                let key = ws_guard_common::key::flow_source(&f, &self.global);
                self.banned.push_back(key);
                if self.banned.len() > 8 {
                    self.banned.pop_front();
                }
                Event::Ban(key, self.pick(&BAN_NS[1..]))
            }
            412..424 => {
                if !self.banned.is_empty() && self.chance(2, 3) {
                    let i = self.below(self.banned.len());
                    Event::Unban(self.banned[i])
                } else {
                    let f = self.known_flow();
                    Event::Unban(ws_guard_common::key::flow_source(&f, &self.global))
                }
            }
            424..430 => Event::ExpireBans,
            430..445 => Event::SettleFlowCheck,
            445..1445
                if !self.cookie_acks.is_empty() && self.cookie_acks_sent < MAX_COOKIE_ACKS =>
            {
                self.cookie_ack()
            }
            1445..1485 => match self.burst_base() {
                Some(base) => self.burst(base),
                None => {
                    let (f, what) = self.frame();
                    Event::Frame(f, what)
                }
            },
            _ => {
                let (f, what) = self.frame();
                Event::Frame(f, what)
            }
        };
        if matches!(e, Event::Frame(..)) {
            self.frames += 1;
        }
        Some(e)
    }

    /// New limits for `port`, remembered.
    fn set_port(&mut self, port: u16) -> Event {
        let c = self.port_config();
        self.limits.insert(port, c);
        Event::SetPort(port, c)
    }

    /// A recent TCP frame to a port whose `max_connections` (1-8) holds its source's flows
    /// (not in monitor mode, no allowlist): bursts elsewhere would pile the flows of one
    /// source up in a filter bucket until it saturates, which the model does not follow.
    fn burst_base(&mut self) -> Option<Spec> {
        if self.recent_specs.is_empty() || self.global.monitor != 0 || self.allowlist {
            return None;
        }
        let i = self.below(self.recent_specs.len());
        let spec = self.recent_specs[i].clone();
        let L4::Tcp { dport, .. } = spec.l4 else {
            return None;
        };
        let p = self.limits.get(&dport)?;
        (p.enabled != 0 && (1..=8).contains(&p.max_connections)).then_some(spec)
    }

    /// A burst of new attempts from one recent source (the next client ports, plain SYNs), as
    /// a flood from one address sends them: a source at its limit is then refused from the
    /// CPU's refusal memo. The first is returned, the others queued.
    fn burst(&mut self, base: Spec) -> Event {
        let n = self.rng.range(4, 12) as u64;
        let mut admitted = Vec::new();
        for k in 0..n {
            let mut spec = base.clone();
            if let L4::Tcp { sport, flags, .. } = &mut spec.l4 {
                *sport = sport.wrapping_add(k as u16);
                *flags = ws_guard_common::parse::TCP_SYN;
            }
            if k == 0 {
                // Its retransmissions come later, among the other frames.
                self.remember(&spec);
            } else if let Some(f) = spec.flow() {
                admitted.push(f);
            }
            let (f, _) = spec.build(&mut self.rng);
            self.queue
                .push_back(Event::Frame(f, Desc::of(&spec, format!("burst {k}/{n}"))));
        }
        // What the burst admitted is released right after (as half-open attempts that never
        // became sockets), so bursts do not pile flows up in a source's filter buckets until one
        // saturates: the model does not follow a saturated bucket.
        for f in admitted {
            self.queue.push_back(Event::Expire(f));
        }
        self.frames += n - 1;
        self.queue.pop_front().expect("a burst of at least four")
    }

    /// The ACK of a SYN-ACK the kernel sent with a cookie: as it came (most often), again (a
    /// replay), or with a wrong cookie, sequence number or flags.
    fn cookie_ack(&mut self) -> Event {
        self.cookie_acks_sent += 1;
        let i = self.below(self.cookie_acks.len());
        let mut f = self.cookie_acks[i].clone();
        let replay = self.chance(1, 4);
        if !replay {
            self.cookie_acks.remove(i);
        }
        let l4 = match parse::parse(&f[..]) {
            Parsed::Tcp(seg) => seg.l4,
            _ => unreachable!("an ACK the harness built"),
        };
        // Wrong by a high bit: the kernel's check is not exact in the low bits (a cookie or
        // sequence number off by a little decodes to another MSS of its table, still valid);
        // off in the top byte, the cookie's minute counter is out of range.
        let how = match self.below(12) {
            0 => {
                f[l4 + 8] ^= 0x80 >> self.below(4);
                "a wrong cookie"
            }
            1 => {
                f[l4 + 4] ^= 0x80 >> self.below(4);
                "a wrong sequence number"
            }
            2 => {
                // Data with the ACK (PSH), still a cookie's ACK.
                f[l4 + 13] |= 0x08;
                "PSH"
            }
            3 => {
                f[l4 + 13] |= 0x01;
                "FIN"
            }
            _ => "as sent",
        };
        // Its flow released first now and then (as the sweep releases a closed connection), so
        // a replay meets no tracked flow and is judged a replay.
        if self.chance(1, 3)
            && let Parsed::Tcp(seg) = parse::parse(&f[..])
            && let Some(flow) = parse::flow(&f[..], &seg)
        {
            self.queue.push_back(Event::Expire(flow));
        }
        // Checksums are not verified by the program: the edited bytes need no fixing.
        let e = Event::Frame(
            f,
            Desc {
                notes: format!(
                    "cookie ACK, {how}{}",
                    if replay { " (kept to replay)" } else { "" }
                ),
                ..Desc::default()
            },
        );
        match self.queue.pop_front() {
            Some(expire) => {
                self.queue.push_back(e);
                expire
            }
            None => e,
        }
    }

    /// A flow seen recently, or a new one from the pools.
    fn known_flow(&mut self) -> FlowKey {
        if !self.recent.is_empty() && self.chance(9, 10) {
            let i = self.below(self.recent.len());
            return self.recent[i];
        }
        let spec = self.spec();
        spec.flow().unwrap_or_default()
    }

    fn remember(&mut self, spec: &Spec) {
        if let Some(f) = spec.flow() {
            self.recent.push_back(f);
            if self.recent.len() > 48 {
                self.recent.pop_front();
            }
        }
        self.recent_specs.push_back(spec.clone());
        if self.recent_specs.len() > 16 {
            self.recent_specs.pop_front();
        }
    }

    fn frame(&mut self) -> (Vec<u8>, Desc) {
        if self.chance(6, 100) {
            return self.random_bytes();
        }
        let (spec, retransmit) = if !self.recent_specs.is_empty() && self.chance(1, 8) {
            let i = self.below(self.recent_specs.len());
            (self.recent_specs[i].clone(), true)
        } else {
            (self.spec(), false)
        };
        if !retransmit {
            self.remember(&spec);
        }
        let (mut f, layout) = spec.build(&mut self.rng);
        let mut what = Desc::of(
            &spec,
            if retransmit {
                "again".into()
            } else {
                String::new()
            },
        );
        if self.chance(30, 100) {
            let n = self.rng.range(1, 4);
            for _ in 0..n {
                let m = self.mutate(&mut f, &layout);
                what.notes.push_str("; ");
                what.notes.push_str(&m);
            }
        }
        if f.len() < 14 {
            f.resize(14, 0);
        }
        (f, what)
    }

    fn random_bytes(&mut self) -> (Vec<u8>, Desc) {
        let len = self.rng.range(14, 200);
        let mut f = self.bytes(len);
        if self.chance(3, 4) {
            let t = self.pick(&[ETH_P_IP, ETH_P_IPV6, TPID_8021Q, TPID_8021AD, ETH_P_ARP]);
            f[12..14].copy_from_slice(&t.to_be_bytes());
            if self.chance(1, 2) && len > 14 {
                // A plausible version nibble.
                f[14] = if t == ETH_P_IPV6 { 0x60 } else { 0x45 };
            }
        }
        (
            f,
            Desc {
                spec: None,
                notes: "random bytes".into(),
            },
        )
    }

    /// A structured frame: mostly TCP to the pool's ports from the pool's clients.
    fn spec(&mut self) -> Spec {
        let ntags = match self.below(100) {
            0..60 => 0,
            60..80 => 1,
            80..90 => 2,
            90..96 => 3,
            _ => 4,
        };
        let mut tags = Vec::new();
        for _ in 0..ntags {
            let tpid = if self.chance(1, 20) {
                0x9100
            } else {
                self.pick(&[TPID_8021Q, TPID_8021AD])
            };
            tags.push((tpid, self.rng.next_u64() as u16));
        }
        let kind = self.below(100);
        let l4 = if kind < 88 {
            self.tcp()
        } else {
            let proto = self.pick(&[17, 1, 58, 50, 59, 132, 6]);
            let n = self.rng.range(0, 40);
            L4::Other {
                proto,
                bytes: self.bytes(n),
            }
        };
        let net = if kind >= 96 {
            let ether_type = self.pick(&[ETH_P_ARP, 0x88cc, 0x8847, 0x0000, 0xffff]);
            let n = self.rng.range(0, 60);
            Net::Other {
                ether_type,
                bytes: self.bytes(n),
            }
        } else if self.chance(1, 2) {
            let words = if self.chance(3, 4) {
                0
            } else {
                self.rng.range(1, 11)
            };
            let options = self.bytes(4 * words);
            let frag = match self.below(100) {
                0..3 => 0x2000,                                        // MF
                3..5 => 1 + (self.rng.next_u64() as u16 & 0x1fff) / 2, // offset
                5..7 => 0x8000,                                        // reserved bit
                7..40 => 0,
                _ => 0x4000, // DF
            };
            Net::V4 {
                src: self.pick(&V4_CLIENTS),
                dst: self.pick(&V4_SERVERS),
                options,
                frag,
            }
        } else {
            let mut exts = Vec::new();
            if self.chance(2, 5) {
                let n = match self.below(100) {
                    0..50 => 1,
                    50..75 => 2,
                    75..90 => self.rng.range(3, 7),
                    _ => self.rng.range(7, 9),
                };
                for _ in 0..n {
                    let kind = match self.below(100) {
                        0..25 => HOPOPTS,
                        25..45 => DSTOPTS,
                        45..65 => ROUTING,
                        65..85 => AH,
                        _ => FRAGMENT,
                    };
                    let len_byte = match self.below(100) {
                        0..60 => {
                            if kind == AH {
                                1
                            } else {
                                0
                            }
                        }
                        60..85 => self.rng.range(0, 4) as u8,
                        85..97 => self.rng.range(4, 64) as u8,
                        _ => self.rng.next_u64() as u8,
                    };
                    exts.push((kind, len_byte));
                }
            }
            if self.chance(3, 100) {
                // TCP near the end of the parsed headers (MAX_HEADER_OFFSET, 512 bytes).
                let len_byte = self.rng.range(50, 58) as u8;
                exts = vec![(DSTOPTS, len_byte)];
            }
            let (clients, servers) = (self.v6_clients, self.v6_servers);
            Net::V6 {
                src: self.pick(&clients),
                dst: self.pick(&servers),
                exts,
            }
        };
        Spec { tags, net, l4 }
    }

    fn tcp(&mut self) -> L4 {
        let sport = if self.chance(4, 5) {
            40_000 + self.rng.range(0, 8) as u16
        } else {
            self.rng.next_u64() as u16
        };
        let dport = if self.chance(19, 20) {
            self.pick(&PORTS)
        } else {
            self.rng.next_u64() as u16
        };
        let flags = match self.below(100) {
            0..50 => SYN,
            50..55 => SYN | ECE | CWR,
            55..58 => SYN | PSH | URG,
            58..66 => ACK,
            66..71 => SYN | ACK,
            71..75 => RST,
            75..78 => RST | ACK,
            78..82 => FIN | ACK,
            82..85 => SYN | FIN,
            85..88 => SYN | RST,
            88..91 => PSH | ACK,
            _ => self.rng.next_u64() as u8,
        };
        let seq = match self.below(10) {
            0 => 0xffff_ffff,
            1 => 0xffff_fff0,
            _ => self.rng.next_u64() as u32,
        };
        let words = if self.chance(1, 2) {
            0
        } else {
            self.rng.range(1, 11)
        };
        let options = self.bytes(4 * words);
        let payload_len = match self.below(1000) {
            0..600 => 0,
            600..900 => self.rng.range(1, 65),
            900..995 => self.rng.range(65, 1500),
            // Past a page: BPF_PROG_TEST_RUN hands the program a multi-buffer frame.
            _ => self.rng.range(3500, 9000),
        };
        L4::Tcp {
            sport,
            dport,
            seq,
            ack: if flags & ACK != 0 {
                self.rng.next_u64() as u32
            } else {
                0
            },
            flags,
            options,
            payload: self.bytes(payload_len),
        }
    }

    /// Changes `f` in one way; says how.
    fn mutate(&mut self, f: &mut Vec<u8>, l: &Layout) -> String {
        let end = l.headers_end.clamp(14, f.len().max(14)).min(f.len());
        match self.below(10) {
            0 | 1 => {
                let n = self.rng.range(1, 4);
                let mut at = Vec::new();
                for _ in 0..n {
                    let i = self.below(end.max(1));
                    let bit = self.below(8);
                    if let Some(b) = f.get_mut(i) {
                        *b ^= 1 << bit;
                    }
                    at.push((i, bit));
                }
                format!("bit flips {at:?}")
            }
            2 | 3 => {
                // A header field.
                let mut fields = vec![12, 13, 14, 15, 16, 17];
                fields.extend([
                    l.l3,
                    l.l3 + 2,
                    l.l3 + 3,
                    l.l3 + 4,
                    l.l3 + 5,
                    l.l3 + 6,
                    l.l3 + 7,
                ]);
                fields.extend([l.l3 + 9, l.l3 + 10, l.l3 + 12, l.l3 + 19, l.l3 + 23]);
                for e in &l.exts {
                    fields.extend([*e, *e + 1]);
                }
                if let Some(l4) = l.l4 {
                    fields.extend([
                        l4,
                        l4 + 1,
                        l4 + 2,
                        l4 + 3,
                        l4 + 4,
                        l4 + 12,
                        l4 + 13,
                        l4 + 13,
                    ]);
                }
                let i = self.pick(&fields);
                let v = match self.below(6) {
                    0 => 0,
                    1 => 0xff,
                    2 => f.get(i).copied().unwrap_or(0).wrapping_add(1),
                    3 => f.get(i).copied().unwrap_or(0).wrapping_sub(1),
                    _ => self.rng.next_u64() as u8,
                };
                if let Some(b) = f.get_mut(i) {
                    *b = v;
                }
                format!("byte {i} = {v:#04x}")
            }
            4 => {
                // A bogus IP length.
                let at = if l.v6 { l.l3 + 4 } else { l.l3 + 2 };
                let cur = f
                    .get(at..at + 2)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]))
                    .unwrap_or(0);
                let v = match self.below(7) {
                    0 => 0,
                    1 => self.rng.range(0, 64) as u16,
                    2 => cur.wrapping_sub(1),
                    3 => cur.wrapping_add(1),
                    4 => 0xffff,
                    5 => cur.wrapping_sub(self.rng.range(1, 40) as u16),
                    _ => self.rng.next_u64() as u16,
                };
                if let Some(b) = f.get_mut(at..at + 2) {
                    b.copy_from_slice(&v.to_be_bytes());
                }
                format!("IP length at {at} = {v}")
            }
            5 => {
                // A bogus header length: IHL or TCP data offset.
                if let Some(l4) = l.l4.filter(|_| self.chance(1, 2)) {
                    let at = l4 + 12;
                    let v = (self.below(16) as u8) << 4;
                    if let Some(b) = f.get_mut(at) {
                        *b = v | (*b & 0x0f);
                    }
                    format!("TCP data offset {}", v >> 4)
                } else {
                    let v = self.below(16) as u8;
                    if let Some(b) = f.get_mut(l.l3) {
                        *b = (*b & 0xf0) | v;
                    }
                    format!("IHL/low nibble {v}")
                }
            }
            6 => {
                // Bogus checksums: neither is checked (the stack does that), so nothing changes.
                let v = self.rng.next_u64() as u16;
                let at = match l.l4 {
                    Some(l4) if self.chance(1, 2) => l4 + 16,
                    _ => l.l3 + 10,
                };
                if let Some(b) = f.get_mut(at..at + 2) {
                    b.copy_from_slice(&v.to_be_bytes());
                }
                format!("checksum at {at} = {v:#06x}")
            }
            7 => {
                if f.len() > 14 {
                    let len = self.rng.range(14, f.len());
                    f.truncate(len);
                    format!("cut at {len}")
                } else {
                    "cut: too short".into()
                }
            }
            8 => {
                let n = self.rng.range(1, 48);
                let pad = if self.chance(1, 2) {
                    vec![0; n]
                } else {
                    self.bytes(n)
                };
                f.extend_from_slice(&pad);
                format!("{n} bytes of padding")
            }
            _ => {
                let i = self.below(f.len());
                let v = self.rng.next_u64() as u8;
                f[i] = v;
                format!("byte {i} = {v:#04x} (anywhere)")
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The comparison.

/// The kernel's stamp of an attempt, read back from its rate window.
struct KernelClock<'a> {
    guard: &'a Guard,
    error: Option<String>,
    /// The host's monotonic interval around the run.
    during: (u64, u64),
    /// Bans whose deadline fell inside `during` (± the slack): judged from the kernel's map.
    ambiguous: u64,
}

impl Clock for KernelClock<'_> {
    fn rate_stamp(&mut self, key: &SourceKey, seq: u32) -> u64 {
        match self.guard.rate_state(key) {
            Ok(Some(s)) => {
                let slot = ws_guard_common::rate::slot(seq, self.guard.rate_ring());
                u64::from(s.stamps[slot]) * 1_000_000
            }
            Ok(None) => {
                self.error
                    .get_or_insert_with(|| format!("the kernel has no rate window for {key:?}"));
                0
            }
            Err(e) => {
                self.error.get_or_insert_with(|| format!("{e:#}"));
                0
            }
        }
    }

    /// Decided by the host's interval around the run when the deadline is outside it; else by
    /// what the kernel did: a ban it found over is gone from its map after the run (or
    /// replaced by a new one, with another deadline). A rate stamp of the same run checks the
    /// answer (`Outcome::clock_conflict`).
    fn ban_active(&mut self, key: &SourceKey, until_ns: u64) -> bool {
        let (t0, t1) = self.during;
        if until_ns > t1.saturating_add(CLOCK_SLACK_NS) {
            return true;
        }
        if until_ns.saturating_add(CLOCK_SLACK_NS) <= t0 {
            return false;
        }
        self.ambiguous += 1;
        match self.guard.view().ban_entries() {
            Ok(bans) => bans.iter().any(|(k, v)| k == key && v.until_ns == until_ns),
            Err(e) => {
                self.error.get_or_insert_with(|| format!("{e:#}"));
                false
            }
        }
    }

    /// The kernel's deadline, read back from its ban map: its "now" is the rate stamp's
    /// millisecond and some nanoseconds more.
    fn ban_deadline(&mut self, key: &SourceKey, now: u64, ban_ns: u64) -> u64 {
        let model = ws_guard_common::policy::ban_until(now, ban_ns);
        match self.guard.view().ban_entries() {
            Ok(bans) => bans
                .iter()
                .find(|(k, v)| k == key && v.until_ns >= model && v.until_ns - model < 1_000_000)
                .map_or(model, |(_, v)| v.until_ns),
            Err(e) => {
                self.error.get_or_insert_with(|| format!("{e:#}"));
                model
            }
        }
    }
}

struct Run {
    name: &'static str,
    seed: u64,
    guard: Guard,
    /// The ban events' ring buffer, taken from the guard.
    events: RingBuf<MapData>,
    model: Model,
    frames: u64,
    check_every: u64,
    /// The last events, for the failure report.
    history: VecDeque<Noted>,
    frames_since_check: u64,
    last_checked_frame: u64,
    /// Each CPU's `RefusalMemo::flushes` at the last counter check (none before the first).
    memo_flushes: Option<Vec<u32>>,
    stats: RunStats,
    /// Whether the last frame's flow lookups were skipped by the flow filter (per the model,
    /// which checked that no tracked flow was this one).
    last_skipped: bool,
    /// ACKs of the SYN-ACKs the kernel sent with a cookie, for the generator.
    cookie_acks: Vec<Vec<u8>>,
}

#[derive(Default, Debug)]
struct RunStats {
    verdicts: HashMap<u32, u64>,
    rate_checks: u64,
    control_ops: u64,
    checkpoints: u64,
    /// Largest distance between a kernel stamp and the host interval around its run.
    max_clock_skew_ns: u64,
    /// List and ban changes made (`apply_policy`, `ban`, `unban`, `expire_bans`).
    policy_ops: u64,
    /// Bans found by an attempt whose deadline fell within the clock skew of the run.
    ambiguous_bans: u64,
    /// Ban events compared.
    ban_events: u64,
    /// SYNs whose flow lookups the flow filter skipped (the model checked each skip).
    skipped_lookups: u64,
    /// Clearings of `FLAG_CHECK_FLOWS` by `settle_flow_check`.
    flow_checks_settled: u64,
    /// Counter checks that found a CPU's refusal memo at work since the last one: holding
    /// refusals it had made, or having moved some into an entry (the sources' counts, compared
    /// at the checkpoints, include them).
    memo_checks: u64,
    /// Flow-filter buckets the kernel saturated that the model took in at a checkpoint (see
    /// `Model::learn_saturation`).
    saturated_buckets: u64,
    /// The decision counters at the end.
    totals: [u64; Counter::COUNT as usize],
    /// SYN-ACKs with a cookie compared.
    cookies: u64,
}

/// How far a kernel stamp may fall outside the host's monotonic interval around the run
/// (`bpf_ktime_get_ns` and `clock_gettime(CLOCK_MONOTONIC)` read the same clock; a little
/// margin for the fast-path clock).
const CLOCK_SLACK_NS: u64 = 20_000;

impl Run {
    fn new(name: &'static str, seed: u64, opts: &LoadOptions, check_every: u64) -> Self {
        let mut guard = Guard::load(opts).expect("load the programs");
        let events = guard.take_events().expect("the ban events' ring buffer");
        let capacity = Capacity {
            sources: guard.capacity(names::MAP_SOURCES).unwrap() as usize,
            flows: guard.capacity(names::MAP_FLOWS).unwrap() as usize,
            bans: guard.capacity(names::MAP_BANS).unwrap() as usize,
            ring: guard.rate_ring(),
        };
        Self {
            name,
            seed,
            guard,
            events,
            model: Model::new(capacity),
            frames: 0,
            check_every,
            history: VecDeque::new(),
            frames_since_check: 0,
            last_checked_frame: 0,
            memo_flushes: None,
            stats: RunStats::default(),
            last_skipped: false,
            cookie_acks: Vec::new(),
        }
    }

    fn fail(&self, what: &str) -> ! {
        let mut h = String::new();
        for e in &self.history {
            match e {
                Noted::Text(t) => {
                    let _ = writeln!(h, "  {t}");
                }
                Noted::Frame(i, f, d) => {
                    let _ = writeln!(h, "  frame {i} ({:?} {}):\n    {}", d.spec, d.notes, hex(f));
                }
            }
        }
        panic!(
            "{}: DISAGREEMENT at frame {} (seed {:#x}): {what}\nlast events, oldest first:\n{h}\
             replay: WS_GUARD_DIFF_SEED={:#x} WS_GUARD_DIFF_FRAMES={} WS_GUARD_DIFF_CHECK_EVERY=1 \
             cargo test -p ws-guard-tests --test differential {} -- --nocapture --exact",
            self.name,
            self.frames,
            self.seed,
            self.seed,
            env_u64("WS_GUARD_DIFF_FRAMES", 20_000),
            self.name,
        );
    }

    fn note(&mut self, e: Noted) {
        if self.history.len() >= 6 {
            self.history.pop_front();
        }
        self.history.push_back(e);
    }

    fn within(&self, ns: u64, during: (u64, u64)) -> bool {
        ns + CLOCK_SLACK_NS >= during.0 && ns <= during.1 + CLOCK_SLACK_NS
    }

    /// Runs `frame` through the kernel and the model and compares; returns the verdict and the
    /// frame that left.
    fn frame(&mut self, frame: &[u8], what: Desc) -> (u32, Vec<u8>) {
        self.frames += 1;
        self.note(Noted::Frame(self.frames, frame.to_vec(), what));
        let t0 = monotonic_ns();
        let (verdict, out) = match self.guard.run_xdp(frame) {
            Ok(r) => r,
            Err(e) => self.fail(&format!("BPF_PROG_TEST_RUN failed: {e:#}")),
        };
        let t1 = monotonic_ns();
        let mut clock = KernelClock {
            guard: &self.guard,
            error: None,
            during: (t0, t1),
            ambiguous: 0,
        };
        let expected = self.model.xdp(frame, (t0, t1), &mut clock);
        self.last_skipped = expected.skipped_lookups;
        self.stats.skipped_lookups += u64::from(expected.skipped_lookups);
        self.stats.ambiguous_bans += clock.ambiguous;
        if let Some(e) = expected.clock_conflict() {
            self.fail(&e);
        }
        if let Some(e) = clock.error {
            self.fail(&format!(
                "the model's attempt went through the rate window, the kernel's did not: {e} \
                 (model expected verdict {}, counters {:?}; kernel verdict {verdict})",
                expected.verdict, expected.counted
            ));
        }
        *self.stats.verdicts.entry(verdict).or_default() += 1;
        if verdict != expected.verdict {
            self.fail(&format!(
                "verdict: kernel {verdict}, model {} (model counted {:?})",
                expected.verdict, expected.counted
            ));
        }
        if let Some(plan) = &expected.synack {
            // The cookie is the kernel's (its secret); everything else is the model's.
            let cookie = match parse::parse(&out[..]) {
                Parsed::Tcp(seg) => seg.seq,
                other => self.fail(&format!("the SYN-ACK does not parse: {other:?}")),
            };
            let candidates = plan.candidates(cookie);
            if !candidates.contains(&out) {
                self.fail(&format!(
                    "SYN-ACK (cookie {cookie:#x}):\n  kernel {}\n  model  {}",
                    hex(&out),
                    hex(&candidates[0])
                ));
            }
            self.stats.cookies += 1;
            self.model.issued.insert((plan.flow, plan.isn), cookie);
            self.cookie_acks.push(ack_of(&out));
        } else if out != expected.frame {
            self.fail(&format!(
                "frame out (verdict {verdict}):\n  kernel {}\n  model  {}",
                hex(&out),
                hex(&expected.frame)
            ));
        }
        if let Some((key, now)) = expected.rate {
            self.stats.rate_checks += 1;
            // The stamp is the kernel's "now" cut to whole milliseconds.
            if !self.within(now, (t0 - t0 % 1_000_000, t1)) {
                self.fail(&format!(
                    "rate stamp {now} (whole milliseconds) outside the run's interval [{t0}, \
                     {t1}]"
                ));
            }
            let skew = (t0 - t0 % 1_000_000)
                .saturating_sub(now)
                .max(now.saturating_sub(t1));
            self.stats.max_clock_skew_ns = self.stats.max_clock_skew_ns.max(skew);
            let kernel = self
                .guard
                .rate_state(&key)
                .unwrap_or_else(|e| self.fail(&format!("{e:#}")));
            let model = self.model.rate.get(&key).copied();
            if kernel != model {
                self.fail(&format!(
                    "rate window of {key:?}:\n  kernel {kernel:?}\n  model  {model:?}"
                ));
            }
        }
        self.frames_since_check += 1;
        if self.frames_since_check >= self.check_every {
            self.check_counters();
        }
        // The ring buffer holds over 6,000 events: taken well before it could fill, whatever
        // the checkpoints' spacing (the model counts no `events_lost`).
        if self.model.events.len() >= 2048 {
            self.check_events();
        }
        (verdict, out)
    }

    fn check_counters(&mut self) {
        let memos = self
            .guard
            .refusal_memos()
            .unwrap_or_else(|e| self.fail(&format!("{e:#}")));
        let flushes: Vec<u32> = memos.iter().map(|m| m.flushes).collect();
        let moved = self.memo_flushes.as_ref().is_some_and(|f| *f != flushes);
        let at_work = moved || memos.iter().any(|m| m.pending != 0);
        self.stats.memo_checks += u64::from(at_work);
        self.memo_flushes = Some(flushes);
        let span = (self.last_checked_frame, self.frames);
        self.frames_since_check = 0;
        self.last_checked_frame = self.frames;
        let c = self
            .guard
            .counters()
            .unwrap_or_else(|e| self.fail(&format!("{e:#}")));
        for k in Counter::ALL {
            let (kernel, model) = (c.get(k), self.model.totals[k as usize]);
            if kernel != model {
                self.fail(&format!(
                    "counter {} (total): kernel {kernel}, model {model}; changed between frames \
                     {} and {} (replay with WS_GUARD_DIFF_CHECK_EVERY=1)",
                    k.name(),
                    span.0,
                    span.1
                ));
            }
        }
        let s = self
            .guard
            .stats()
            .unwrap_or_else(|e| self.fail(&format!("{e:#}")));
        if s.unattributed != self.model.unattributed {
            self.fail(&format!(
                "unattributed counters: kernel {:?}, model {:?} (frames {}..{})",
                s.unattributed, self.model.unattributed, span.0, span.1
            ));
        }
        let kernel_ports: Vec<_> = s.ports.keys().copied().collect();
        let model_ports: Vec<_> = self.model.port_stats.keys().copied().collect();
        if kernel_ports != model_ports {
            self.fail(&format!(
                "protected ports in the stats: kernel {kernel_ports:?}, model {model_ports:?}"
            ));
        }
        for (k, v) in &s.ports {
            if self.model.port_stats[k] != *v {
                self.fail(&format!(
                    "counters of port {} family {}: kernel {v:?}, model {:?} (frames {}..{})",
                    k.0, k.1, self.model.port_stats[k], span.0, span.1
                ));
            }
        }
    }

    fn compare_flows(
        &self,
        what: &str,
        kernel: Vec<(FlowKey, FlowValue)>,
        model: &HashMap<FlowKey, Tracked>,
    ) {
        let mut seen = HashSet::new();
        for (k, v) in &kernel {
            seen.insert(*k);
            let Some(t) = model.get(k) else {
                self.fail(&format!(
                    "{what}: the kernel tracks {k:?} ({v:?}), the model does not"
                ));
            };
            // Flows are stamped in whole milliseconds (`rate::stamp_ms`).
            let ms = |ns: u64| ws_guard_common::rate::stamp_ms(ns);
            let since_ok = match t.since {
                Since::Millisecond(t) => v.since_ms == ms(t),
                Since::Within(lo, hi) => {
                    let (lo, hi) = (
                        ms(lo.saturating_sub(CLOCK_SLACK_NS)),
                        ms(hi + CLOCK_SLACK_NS),
                    );
                    lo <= v.since_ms && v.since_ms <= hi
                }
            };
            if t.source != v.source(k) || !since_ok {
                self.fail(&format!("{what}: {k:?}: kernel {v:?}, model {t:?}"));
            }
        }
        for k in model.keys() {
            if !seen.contains(k) {
                self.fail(&format!(
                    "{what}: the model tracks {k:?}, the kernel does not"
                ));
            }
        }
    }

    fn check_maps(&mut self) {
        self.stats.checkpoints += 1;
        self.check_counters();
        let pending = self
            .guard
            .pending()
            .unwrap_or_else(|e| self.fail(&format!("{e:#}")));
        self.compare_flows("WSG_FLOWS (half-open)", pending, &self.model.pending);
        let owned = self
            .guard
            .owned()
            .unwrap_or_else(|e| self.fail(&format!("{e:#}")));
        self.compare_flows("WSG_FLOWS (established)", owned, &self.model.owned);
        // Slots, flow filters and rate windows: the model derives each source's filter from
        // its flows, and takes in the buckets it cannot know saturated or not.
        let conns: HashMap<SourceKey, SourceState> = self
            .guard
            .source_states()
            .unwrap_or_else(|e| self.fail(&format!("{e:#}")))
            .into_iter()
            .collect();
        for (k, v) in &conns {
            self.stats.saturated_buckets += self.model.learn_saturation(k, v.filter) as u64;
        }
        let model = self.model.source_states();
        if conns != model {
            let mut diff = String::new();
            for (k, v) in &conns {
                if model.get(k) != Some(v) {
                    let _ = write!(diff, "\n  {k:?}: kernel {v:?}, model {:?}", model.get(k));
                }
            }
            for (k, v) in &model {
                if !conns.contains_key(k) {
                    let _ = write!(diff, "\n  {k:?}: kernel none, model {v:?}");
                }
            }
            self.fail(&format!("WSG_SOURCES differs:{diff}"));
        }
        if self.guard.connections().unwrap() != self.model.connections() {
            self.fail("Guard::connections differs from the model's");
        }
        let used: HashMap<FlowKey, u32> = self
            .guard
            .used_cookies()
            .unwrap_or_else(|e| self.fail(&format!("{e:#}")))
            .into_iter()
            .collect();
        if used != self.model.used {
            self.fail(&format!(
                "WSG_COOKIES: kernel {} entries, model {}",
                used.len(),
                self.model.used.len()
            ));
        }
        self.check_policy();
    }

    /// The global settings (lookup flags included), both lists, the ban map and the ban
    /// events sent since the last look.
    fn check_policy(&mut self) {
        self.check_global();
        for (list, model) in [
            (List::Allow, &self.model.allow),
            (List::Deny, &self.model.deny),
        ] {
            let kernel: BTreeSet<CidrKey> = self
                .guard
                .list_entries(list)
                .unwrap_or_else(|e| self.fail(&format!("{e:#}")))
                .iter()
                .map(cidr)
                .collect();
            if &kernel != model {
                self.fail(&format!(
                    "the {} list: kernel {kernel:?}, model {model:?}",
                    list.name()
                ));
            }
        }
        let bans: HashMap<SourceKey, BanValue> = self
            .guard
            .view()
            .ban_entries()
            .unwrap_or_else(|e| self.fail(&format!("{e:#}")))
            .into_iter()
            .collect();
        if bans != self.model.bans {
            self.fail(&format!(
                "WSG_BANS: kernel {bans:?}, model {:?}",
                self.model.bans
            ));
        }
        self.check_events();
    }

    /// The ban events sent since the last look, in order (taken from the ring buffer).
    fn check_events(&mut self) {
        let kernel = drain(&mut self.events);
        let model = std::mem::take(&mut self.model.events);
        self.stats.ban_events += kernel.len() as u64;
        if kernel != model {
            self.fail(&format!("ban events: kernel {kernel:?}\n  model {model:?}"));
        }
    }

    /// The global settings, with the lookup flags userspace derived (after every change of
    /// the settings, the lists or the bans, and at checkpoints).
    fn check_global(&self) {
        let g = self
            .guard
            .global()
            .unwrap_or_else(|e| self.fail(&format!("{e:#}")));
        if g != self.model.global {
            let bans = self.guard.view().ban_entries();
            self.fail(&format!(
                "global settings: kernel {g:?}, model {:?} (bans: kernel {bans:?}, model {:?}; \
                 lists: model {:?} {:?})",
                self.model.global, self.model.bans, self.model.allow, self.model.deny
            ));
        }
    }

    /// `Guard::ban`; the model takes the deadline the kernel's map got, which must be the
    /// duration from a moment of the call.
    fn ban(&mut self, key: SourceKey, ns: u64) {
        self.stats.policy_ops += 1;
        self.note(Noted::Text(format!("ban {key:?} for {ns} ns")));
        let t0 = monotonic_ns();
        let r = self.guard.ban(key, Duration::from_nanos(ns));
        let t1 = monotonic_ns();
        let kernel = self
            .guard
            .view()
            .ban_entries()
            .unwrap_or_else(|e| self.fail(&format!("{e:#}")))
            .into_iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v);
        match (r, kernel) {
            (Ok(()), Some(v)) => {
                let bounds = (ban_until(t0, ns), ban_until(t1, ns));
                if v.reason != BAN_MANUAL || v.until_ns < bounds.0 || v.until_ns > bounds.1 {
                    self.fail(&format!(
                        "ban of {key:?}: kernel {v:?}, deadline in {bounds:?}"
                    ));
                }
                if !self.model.ban(&key, v.until_ns) {
                    self.fail("ban: the kernel took it, the model's ban map is full");
                }
            }
            (Ok(()), None) => self.fail(&format!("ban of {key:?}: not in the kernel's map")),
            (Err(e), _) => {
                if self.model.ban(&key, 0) {
                    self.fail(&format!("ban of {key:?}: kernel {e:#}, the model took it"));
                }
            }
        }
        self.check_global();
    }

    /// `Guard::unban`: whether the ban was in force is decided by the host's clock around the
    /// call (the same clock), unless the deadline falls inside the call.
    fn unban(&mut self, key: SourceKey) {
        self.stats.policy_ops += 1;
        self.note(Noted::Text(format!("unban {key:?}")));
        let t0 = monotonic_ns();
        let kernel = self
            .guard
            .unban(&key)
            .unwrap_or_else(|e| self.fail(&format!("{e:#}")));
        let t1 = monotonic_ns();
        let expected = match self.model.unban(&key) {
            None => Some(false),
            Some(b) if b.until_ns > t1 => Some(true),
            Some(b) if b.until_ns <= t0 => Some(false),
            Some(_) => None,
        };
        if expected.is_some_and(|m| m != kernel) {
            self.fail(&format!(
                "unban {key:?}: kernel {kernel}, model {expected:?}"
            ));
        }
        self.check_global();
    }

    /// `Guard::expire_bans`: removes the bans over at the moment of the call.
    fn expire_bans(&mut self) {
        self.stats.policy_ops += 1;
        self.note(Noted::Text("expire bans".into()));
        let t0 = monotonic_ns();
        let kernel = self
            .guard
            .expire_bans()
            .unwrap_or_else(|e| self.fail(&format!("{e:#}")));
        let t1 = monotonic_ns();
        let ended: HashSet<SourceKey> = kernel.iter().copied().collect();
        for (k, b) in &self.model.bans {
            let over = ended.contains(k);
            if (b.until_ns <= t0 && !over) || (b.until_ns > t1 && over) {
                self.fail(&format!(
                    "expire_bans in [{t0}, {t1}]: {k:?} {b:?}: kernel removed it: {over}"
                ));
            }
        }
        if let Some(k) = ended.iter().find(|k| !self.model.bans.contains_key(k)) {
            self.fail(&format!(
                "expire_bans removed {k:?}, which the model has no ban of"
            ));
        }
        self.model.expire_bans(&kernel);
        self.check_global();
    }

    fn control(&mut self, op: u32, flow: FlowKey) {
        self.stats.control_ops += 1;
        let name = match op {
            OP_EXPIRE_PENDING => "expire",
            OP_RELEASE_OWNED => "release",
            _ => "adopt",
        };
        self.note(Noted::Text(format!("control {name} {flow:?}")));
        let t0 = monotonic_ns();
        let kernel = self
            .guard
            .control(ControlOp {
                op,
                flow,
                ..ControlOp::default()
            })
            .unwrap_or_else(|e| self.fail(&format!("{e:#}")));
        let t1 = monotonic_ns();
        let model = match op {
            OP_EXPIRE_PENDING => self.model.expire_pending(&flow),
            OP_RELEASE_OWNED => self.model.release_owned(&flow),
            _ => self.model.adopt(&flow, (t0, t1)),
        };
        if kernel != model {
            self.fail(&format!(
                "control {name}: kernel {} ({CONTROL_DONE} = done), model {model}",
                kernel
            ));
        }
    }

    /// The sweep's clearing of `FLAG_CHECK_FLOWS`, in the kernel's maps and the model.
    fn settle_flow_check(&mut self) {
        self.note(Noted::Text("settle flow check".into()));
        let was_set = self.model.global.flags & FLAG_CHECK_FLOWS != 0;
        let kernel = self
            .guard
            .settle_flow_check()
            .unwrap_or_else(|e| self.fail(&format!("{e:#}")));
        let model = self.model.settle_flow_check();
        if kernel != model {
            self.fail(&format!(
                "settle_flow_check: kernel {kernel}, model {model}"
            ));
        }
        self.stats.flow_checks_settled += u64::from(was_set && kernel);
        self.check_global();
    }

    fn event(&mut self, e: Event) {
        match e {
            Event::Frame(f, what) => {
                self.frame(&f, what);
            }
            Event::SetPort(port, c) => {
                self.note(Noted::Text(format!("set port {port}: {c:?}")));
                self.guard
                    .set_port(port, c)
                    .unwrap_or_else(|e| self.fail(&format!("{e:#}")));
                self.model.set_port(port, c);
            }
            Event::SetGlobal(g) => {
                self.note(Noted::Text(format!("set global: {g:?}")));
                self.guard
                    .set_global(g)
                    .unwrap_or_else(|e| self.fail(&format!("{e:#}")));
                self.model.set_global(g);
                self.check_global();
            }
            Event::Expire(f) => self.control(OP_EXPIRE_PENDING, f),
            Event::ReleaseOwned(f) => self.control(OP_RELEASE_OWNED, f),
            Event::Adopt(f) => self.control(OP_ADOPT, f),
            Event::RemoveIdle(k) => {
                self.note(Noted::Text(format!("remove idle {k:?}")));
                self.guard
                    .remove_idle_source(&k, 0)
                    .unwrap_or_else(|e| self.fail(&format!("{e:#}")));
                self.model.remove_idle_source(&k);
            }
            Event::Policy {
                allow,
                deny,
                ban_ns,
            } => {
                self.stats.policy_ops += 1;
                self.note(Noted::Text(format!(
                    "policy: allow {allow:?}, deny {deny:?}, ban {ban_ns} ns"
                )));
                let policy = Policy {
                    allow: allow.clone(),
                    deny: deny.clone(),
                    ban_duration: Duration::from_nanos(ban_ns),
                };
                self.guard
                    .apply_policy(&policy)
                    .unwrap_or_else(|e| self.fail(&format!("{e:#}")));
                let allow: Vec<CidrKey> = allow.iter().map(cidr).collect();
                let deny: Vec<CidrKey> = deny.iter().map(cidr).collect();
                self.model.apply_policy(&allow, &deny, ban_ns);
                self.check_global();
            }
            Event::Ban(key, ns) => self.ban(key, ns),
            Event::Unban(key) => self.unban(key),
            Event::ExpireBans => self.expire_bans(),
            Event::SettleFlowCheck => self.settle_flow_check(),
            Event::Checkpoint {
                release_all,
                unban_all,
            } => {
                self.check_maps();
                if unban_all {
                    let mut keys: Vec<SourceKey> = self.model.bans.keys().copied().collect();
                    keys.sort_by_key(|k| (k.addr, k.port, k.family));
                    for k in keys {
                        self.unban(k);
                    }
                }
                if release_all {
                    let mut pending: Vec<FlowKey> = self.model.pending.keys().copied().collect();
                    let mut owned: Vec<FlowKey> = self.model.owned.keys().copied().collect();
                    // A deterministic order (the hash maps' is not).
                    pending.sort_by_key(|k| (k.client, k.server, k.client_port, k.server_port));
                    owned.sort_by_key(|k| (k.client, k.server, k.client_port, k.server_port));
                    for f in pending {
                        self.control(OP_EXPIRE_PENDING, f);
                    }
                    for f in owned {
                        self.control(OP_RELEASE_OWNED, f);
                    }
                    // Nothing tracked: the sweep's next look clears FLAG_CHECK_FLOWS.
                    self.settle_flow_check();
                    if self.model.global.flags & FLAG_CHECK_FLOWS != 0 {
                        self.fail("FLAG_CHECK_FLOWS still set with no flow tracked");
                    }
                }
            }
        }
    }
}

/// The ACK a client sends for the SYN-ACK `synack` (a frame the XDP program sent): the same
/// link header (MAC addresses swapped back), the IP addresses and ports swapped,
/// `<SEQ=SEG.ACK><ACK=SEG.SEQ+1><CTL=ACK>`, a 20-byte TCP header, checksums set.
fn ack_of(synack: &[u8]) -> Vec<u8> {
    let Parsed::Tcp(seg) = parse::parse(synack) else {
        unreachable!()
    };
    let mut f = synack[..seg.l4 + 20].to_vec();
    let (dst, src) = f.split_at_mut(6);
    dst.swap_with_slice(&mut src[..6]);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&seg.dport.to_be_bytes());
    tcp[2..4].copy_from_slice(&seg.sport.to_be_bytes());
    tcp[4..8].copy_from_slice(&seg.ack.to_be_bytes());
    tcp[8..12].copy_from_slice(&seg.seq.wrapping_add(1).to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = parse::TCP_ACK;
    tcp[14..16].copy_from_slice(&502u16.to_be_bytes());
    let (l3, l4) = (seg.l3, seg.l4);
    let sum = if seg.family == AF_INET {
        let ip = ws_guard_common::reply::ipv4_header(&synack[l3..l3 + 20].try_into().unwrap(), 20);
        f[l3..l3 + 20].copy_from_slice(&ip);
        ws_guard_common::reply::tcp_checksum_v4(&ip, &tcp, 20)
    } else {
        let ip = ws_guard_common::reply::ipv6_header(&synack[l3..l3 + 40].try_into().unwrap(), 20);
        f[l3..l3 + 40].copy_from_slice(&ip);
        ws_guard_common::reply::tcp_checksum_v6(&ip, &tcp, 20)
    };
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    f[l4..l4 + 20].copy_from_slice(&tcp);
    f
}

fn run(name: &'static str, opts: LoadOptions, frames: u64, small_maps: bool) -> RunStats {
    run_with(name, opts, frames, small_maps, false)
}

fn run_with(
    name: &'static str,
    opts: LoadOptions,
    frames: u64,
    small_maps: bool,
    cookies: bool,
) -> RunStats {
    let seed = match std::env::var("WS_GUARD_DIFF_SEED") {
        Ok(_) => env_u64("WS_GUARD_DIFF_SEED", 0),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            t.as_nanos() as u64 ^ (std::process::id() as u64).rotate_left(32)
        }
    };
    // The two runs of one seed differ.
    let gen_seed = seed ^ if small_maps { 0x5a5a_0000_0000_0000 } else { 0 };
    let check_every = env_u64("WS_GUARD_DIFF_CHECK_EVERY", 256).max(1);
    // Tiny maps fill at once: release everything more often.
    let checkpoint_default = if small_maps { 256 } else { 1024 };
    let checkpoint_every = env_u64("WS_GUARD_DIFF_CHECKPOINT_EVERY", checkpoint_default).max(1);
    println!(
        "{name}: seed {seed:#x}, {frames} frames, counters every {check_every}, maps every \
         {checkpoint_every}"
    );
    let mut r = Run::new(name, seed, &opts, check_every);
    let mut g = Gen::new(gen_seed, checkpoint_every, small_maps);
    g.cookies = cookies;
    r.model.listeners = cookies;
    let start = Instant::now();
    while let Some(e) = g.next(frames) {
        r.event(e);
        g.cookie_acks.extend(r.cookie_acks.drain(..));
        while g.cookie_acks.len() > 64 {
            g.cookie_acks.pop_front();
        }
    }
    r.check_maps();
    let took = start.elapsed();
    r.stats.totals = r.model.totals;
    println!(
        "{name}: {} frames, zero disagreements, {:.1} s ({:.1} µs/frame); verdicts {:?}, \
         {} rate windows and {} accounting requests compared, {} list/ban changes, {} ban events \
         compared, {} checkpoints, largest clock skew {} ns, {} bans found at their deadline, \
         {} SYNs skipped the flow lookups, {} flow checks settled, {} counter checks found a \
         refusal memo at work, {} flow-filter buckets saturated",
        r.frames,
        took.as_secs_f64(),
        took.as_secs_f64() * 1e6 / r.frames.max(1) as f64,
        r.stats.verdicts,
        r.stats.rate_checks,
        r.stats.control_ops,
        r.stats.policy_ops,
        r.stats.ban_events,
        r.stats.checkpoints,
        r.stats.max_clock_skew_ns,
        r.stats.ambiguous_bans,
        r.stats.skipped_lookups,
        r.stats.flow_checks_settled,
        r.stats.memo_checks,
        r.stats.saturated_buckets,
    );
    let counters: Vec<String> = Counter::ALL
        .iter()
        .map(|c| format!("{} {}", c.name(), r.model.totals[*c as usize]))
        .collect();
    println!("{name}: counters: {}", counters.join(", "));
    assert!(r.frames >= frames);
    r.stats
}

/// Default capacities: maps never fill, every decision is the limits'.
#[test]
fn kernel_matches_model() {
    if !ws_guard_tests::privileged("kernel_matches_model") {
        return;
    }
    let frames = env_u64("WS_GUARD_DIFF_FRAMES", 20_000);
    // A ring of 9 (the recipe's count): not a power of two, and below some of the counts the
    // run sets (which the kernel clamps to it).
    let s = run(
        "kernel_matches_model",
        LoadOptions {
            rate_ring: 9,
            ..LoadOptions::default()
        },
        frames,
        false,
    );
    // The run exercised what it is meant to: every verdict, the rate window, the control program.
    for v in [XDP_PASS, XDP_DROP, XDP_TX] {
        assert!(
            s.verdicts.get(&v).copied().unwrap_or(0) > 0,
            "no verdict {v}: {s:?}"
        );
    }
    assert!(s.rate_checks > 0 && s.control_ops > 0, "{s:?}");
    // ... and the lists and bans: both lists decided, bans refused and reported (each path
    // of a ban is also a directed case of `regressions`, where a few seeds could miss one).
    for c in [Counter::Allowed, Counter::Denied, Counter::Banned] {
        assert!(s.totals[c as usize] > 0, "no {}: {s:?}", c.name());
    }
    assert!(s.policy_ops > 0 && s.ban_events > 0, "{s:?}");
    // ... and the flow filter: SYNs skipped the lookups, retransmits were still found, and
    // FLAG_CHECK_FLOWS was set by prefix changes and cleared.
    assert!(s.skipped_lookups > 0 && s.flow_checks_settled > 0, "{s:?}");
    assert!(s.totals[Counter::SynRetransmits as usize] > 0, "{s:?}");
    // ... and the refusal memos: refusals made from them, counted in their sources.
    assert!(s.memo_checks > 0, "{s:?}");
}

/// SYN-cookie mode: ports switch in and out of it, in a network namespace of its own with
/// listeners on every port of the pool (IPv4 and IPv6) and `net.ipv4.tcp_syncookies = 2`, so
/// the kernel issues cookies. The model cannot compute a cookie (the kernel's secret): it takes
/// the one in the kernel's SYN-ACK and checks every other byte of it, then expects exactly the
/// ACKs returning a cookie it saw issued to be valid. The generator sends those ACKs (as they
/// came, replayed, or with a wrong cookie, sequence number or flags) among everything else.
#[test]
fn kernel_matches_model_in_cookie_mode() {
    if !ws_guard_tests::privileged("kernel_matches_model_in_cookie_mode") {
        return;
    }
    let frames = env_u64("WS_GUARD_DIFF_FRAMES", 20_000);
    let ns = format!("wsg-diffck-{}", std::process::id());
    ws_guard_tests::netns::ip(&["netns", "add", &ns]);
    let _cleanup = NetnsGuard(ns.clone());
    let s = ws_guard_tests::netns::in_ns(&ns, || {
        for (name, value) in [("tcp_syncookies", "2"), ("tcp_timestamps", "2")] {
            std::fs::write(format!("/proc/sys/net/ipv4/{name}"), value).expect("sysctl");
        }
        let mut listeners = Vec::new();
        for port in PORTS {
            for v6 in [false, true] {
                use socket2::{Domain, Protocol, Socket, Type};
                let (domain, addr): (Domain, std::net::SocketAddr) = if v6 {
                    (Domain::IPV6, (std::net::Ipv6Addr::UNSPECIFIED, port).into())
                } else {
                    (Domain::IPV4, (std::net::Ipv4Addr::UNSPECIFIED, port).into())
                };
                let l = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).unwrap();
                if v6 {
                    l.set_only_v6(true).unwrap();
                }
                l.bind(&addr.into()).unwrap();
                l.listen(4096).unwrap();
                listeners.push(l);
            }
        }
        let s = run_with(
            "kernel_matches_model_in_cookie_mode",
            LoadOptions::default(),
            frames,
            false,
            true,
        );
        drop(listeners);
        s
    });
    assert!(s.cookies > 0, "no SYN-ACK with a cookie: {s:?}");
    for c in [
        Counter::CookiesSent,
        Counter::CookieAcksValid,
        Counter::CookieAcksInvalid,
        Counter::CookieAcksReplayed,
    ] {
        assert!(s.totals[c as usize] > 0, "no {}: {s:?}", c.name());
    }
    // The refusal memos serve the cookie half's judgements too.
    assert!(s.memo_checks > 0, "{s:?}");
}

/// Removes a network namespace by name on drop.
struct NetnsGuard(String);

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

/// A tiny flow map (8 connections, half-open and established) and ban map (4): attempts and
/// adoptions meet a full `WSG_FLOWS`, and failing open or closed decides; automatic
/// bans meet a full `WSG_BANS` (`bans_full`), manual ones fail.
#[test]
fn kernel_matches_model_with_full_maps() {
    if !ws_guard_tests::privileged("kernel_matches_model_with_full_maps") {
        return;
    }
    let frames = env_u64("WS_GUARD_DIFF_FRAMES", 20_000).div_ceil(4);
    let opts = LoadOptions {
        flows: 8,
        bans: 4,
        ..LoadOptions::default()
    };
    let s = run("kernel_matches_model_with_full_maps", opts, frames, true);
    assert!(s.verdicts.get(&XDP_PASS).copied().unwrap_or(0) > 0, "{s:?}");
}

/// An IPv6 SYN from the pool's first client to `dport` behind one destination-options header
/// of `(len_byte + 1) * 8` bytes (none if `None`), with `tcp_options` bytes of TCP options and
/// `payload` bytes of payload.
fn ipv6_syn(len_byte: Option<u8>, tcp_options: usize, payload: usize, sport: u16) -> Vec<u8> {
    let spec = Spec {
        tags: Vec::new(),
        net: Net::V6 {
            src: v6_clients()[0],
            dst: v6_servers()[0],
            exts: len_byte.map(|b| (DSTOPTS, b)).into_iter().collect(),
        },
        l4: L4::Tcp {
            sport,
            dport: 9000,
            seq: 7,
            ack: 0,
            flags: SYN,
            options: vec![1; tcp_options],
            payload: vec![0xa5; payload],
        },
    };
    spec.build(&mut Rng::new(1)).0
}

/// Frames on which the kernel and the model once disagreed, and directed cases of paths the
/// generator reaches rarely: each runs through both (which must agree, as in the generated
/// runs) and must have the outcome the README gives it.
#[test]
fn regressions() {
    if !ws_guard_tests::privileged("regressions") {
        return;
    }
    let mut r = Run::new("regressions", 0, &LoadOptions::default(), 1);
    r.event(Event::SetGlobal(GlobalConfig::default()));
    let port = PortConfig {
        enabled: 1,
        max_connections: 1,
        conn_action: ACTION_REJECT,
        ..PortConfig::default()
    };
    r.event(Event::SetPort(9000, port));
    // Kernel and model agree (checked by `Run::frame`, counters after every frame with
    // `check_every` 1), and the outcome is the one expected.
    let expect = |r: &mut Run, frame: &[u8], verdict: u32, counters: &[Counter]| {
        let before = r.model.totals;
        let what = Desc {
            spec: None,
            notes: "regression".into(),
        };
        let (v, out) = r.frame(frame, what);
        assert_eq!(v, verdict, "{counters:?}");
        let mut want = before;
        for c in counters {
            want[*c as usize] += 1;
        }
        assert_eq!(r.model.totals, want, "{counters:?}");
        r.check_maps();
        out
    };

    // Seed 0x42b10af9ed347e63, frame 524 of kernel_matches_model_with_full_maps: TCP options
    // ending past MAX_HEADER_OFFSET (512). The kernel's reader refuses loads starting past it,
    // so the segment is malformed there; the host's byte-slice reader read on and judged it.
    // l4 = 14 + 40 + 424 = 478: the last byte of a 36-byte TCP header is at 513, of a 32-byte
    // one at 509.
    let f = ipv6_syn(Some(52), 16, 0, 40_000);
    assert_eq!(parse::parse(&f[..]), Parsed::Malformed);
    expect(&mut r, &f, XDP_PASS, &[Counter::Malformed]);
    let f = ipv6_syn(Some(52), 12, 0, 40_000);
    assert!(matches!(parse::parse(&f[..]), Parsed::Tcp(s) if s.l4 == 478 && s.header_len == 32));
    expect(&mut r, &f, XDP_PASS, &[Counter::Admitted]);
    // It holds the source's one slot: the kernel finds it again as a retransmit.
    expect(&mut r, &f, XDP_PASS, &[Counter::SynRetransmits]);

    // A SYN larger than a page: BPF_PROG_TEST_RUN gives the program a multi-buffer frame, and
    // the RST cuts it to the reply (74 bytes: Ethernet, IPv6, TCP) across the fragments.
    let jumbo = ipv6_syn(None, 0, 6000, 40_001);
    assert!(jumbo.len() > 4096);
    let out = expect(
        &mut r,
        &jumbo,
        XDP_TX,
        &[Counter::ConnLimited, Counter::RstSent],
    );
    assert_eq!(out.len(), 74);
    assert_eq!(out[54 + 8..54 + 12], (7u32 + 1 + 6000).to_be_bytes());
    // Passed untouched in full when it has a slot.
    r.event(Event::SetPort(
        9000,
        PortConfig {
            max_connections: 2,
            ..port
        },
    ));
    expect(&mut r, &jumbo, XDP_PASS, &[Counter::Admitted]);

    // Lists and bans. An allowlisted host inside a denied /24: not limited (two attempts over
    // a rate of one), tracked as allowed; its neighbour denied; IPv6 sources untouched by
    // IPv4 entries.
    let syn = |src: [u8; 4], sport: u16| ipv4_syn_spec(src, sport, 9002);
    let build = |s: &Spec| s.build(&mut Rng::new(2)).0;
    r.event(Event::SetPort(
        9002,
        PortConfig {
            enabled: 1,
            max_connections: 0,
            conn_action: ACTION_DROP,
            rate_action: ACTION_REJECT,
            rate_limit: 1,
            index: 0,
            rate_window_ns: 20_000_000,
            ..PortConfig::default()
        },
    ));
    r.event(Event::Policy {
        allow: vec!["198.18.0.1/32".parse().unwrap()],
        deny: vec![
            "198.18.0.0/24".parse().unwrap(),
            "0.0.0.0/0".parse().unwrap(),
        ],
        ban_ns: 100_000_000,
    });
    r.check_maps();
    for sport in [1, 2] {
        let f = build(&syn([198, 18, 0, 1], sport));
        expect(&mut r, &f, XDP_PASS, &[Counter::Allowed]);
    }
    let f = build(&syn([198, 18, 0, 2], 1));
    expect(&mut r, &f, XDP_DROP, &[Counter::Denied]);
    let f6 = ipv6_syn_to(9002, 40_002);
    expect(&mut r, &f6, XDP_PASS, &[Counter::Admitted]);
    // Outside the lists: a rate refusal (rejected) starts a 100 ms ban, which drops the next
    // attempt; the first attempt after it ends ends it (and, past the 20 ms window, passes).
    r.event(Event::Policy {
        allow: Vec::new(),
        deny: vec!["198.18.0.0/24".parse().unwrap()],
        ban_ns: 100_000_000,
    });
    let client = [198, 18, 1, 1];
    expect(
        &mut r,
        &build(&syn(client, 1)),
        XDP_PASS,
        &[Counter::Admitted],
    );
    expect(
        &mut r,
        &build(&syn(client, 2)),
        XDP_TX,
        &[Counter::RateLimited, Counter::BansStarted, Counter::RstSent],
    );
    expect(
        &mut r,
        &build(&syn(client, 3)),
        XDP_DROP,
        &[Counter::Banned],
    );
    std::thread::sleep(Duration::from_millis(150));
    expect(
        &mut r,
        &build(&syn(client, 4)),
        XDP_PASS,
        &[Counter::BansEnded, Counter::Admitted],
    );
    // A manual ban, lifted; one already over when the attempt comes ends the same way.
    let key = ws_guard_common::key::flow_source(&syn(client, 5).flow().unwrap(), &r.model.global);
    r.event(Event::Ban(key, 1000 * SECOND));
    expect(
        &mut r,
        &build(&syn(client, 5)),
        XDP_DROP,
        &[Counter::Banned],
    );
    r.event(Event::Unban(key));
    r.event(Event::Ban(key, 0));
    std::thread::sleep(Duration::from_millis(1));
    expect(
        &mut r,
        &build(&syn(client, 6)),
        XDP_TX,
        &[
            Counter::BansEnded,
            Counter::RateLimited,
            Counter::BansStarted,
            Counter::RstSent,
        ],
    );
    r.event(Event::ExpireBans);
    assert_eq!(r.model.bans.len(), 1, "the automatic ban is in force");
    r.check_maps();
    assert_eq!(r.stats.ban_events, 4, "started, ended, ended, started");
    // Once it is over, the daemon's expiry ends it without an attempt: counted and reported as
    // the XDP program would.
    let ended_before = r.model.totals[Counter::BansEnded as usize];
    std::thread::sleep(Duration::from_millis(150));
    r.event(Event::ExpireBans);
    assert!(r.model.bans.is_empty(), "the automatic ban ended");
    assert_eq!(
        r.model.totals[Counter::BansEnded as usize],
        ended_before + 1
    );
    r.check_maps();
    assert_eq!(
        r.stats.ban_events, 5,
        "started, ended, ended, started, ended"
    );
}

/// A SYN from `src`:`sport` to the first IPv4 server's `dport`.
fn ipv4_syn_spec(src: [u8; 4], sport: u16, dport: u16) -> Spec {
    Spec {
        tags: Vec::new(),
        net: Net::V4 {
            src,
            dst: V4_SERVERS[0],
            options: Vec::new(),
            frag: 0x4000,
        },
        l4: L4::Tcp {
            sport,
            dport,
            seq: 7,
            ack: 0,
            flags: SYN,
            options: Vec::new(),
            payload: Vec::new(),
        },
    }
}

/// An IPv6 SYN of the pool's first client to `dport`.
fn ipv6_syn_to(dport: u16, sport: u16) -> Vec<u8> {
    let spec = Spec {
        tags: Vec::new(),
        net: Net::V6 {
            src: v6_clients()[0],
            dst: v6_servers()[0],
            exts: Vec::new(),
        },
        l4: L4::Tcp {
            sport,
            dport,
            seq: 7,
            ack: 0,
            flags: SYN,
            options: Vec::new(),
            payload: Vec::new(),
        },
    };
    spec.build(&mut Rng::new(1)).0
}

/// The per-source flow filter (directed): a new tuple skips the two flow lookups with its
/// verdict unchanged, a retransmit of a source at its limit is still found (the filter counts
/// its flow), and a prefix change moves every tracked flow to its new key (slot and filter
/// count) while `FLAG_CHECK_FLOWS` forces the lookups, until the sweep clears the flag. Kernel and model
/// agree on every frame and every map after each step (slots and filters included).
#[test]
fn flow_filter() {
    if !ws_guard_tests::privileged("flow_filter") {
        return;
    }
    let mut r = Run::new("flow_filter", 0, &LoadOptions::default(), 1);
    r.event(Event::SetGlobal(GlobalConfig::default()));
    r.check_maps();
    assert_eq!(
        r.model.global.flags & FLAG_CHECK_FLOWS,
        0,
        "no flag at load"
    );
    r.event(Event::SetPort(
        9000,
        PortConfig {
            enabled: 1,
            max_connections: 1,
            conn_action: ACTION_DROP,
            ..PortConfig::default()
        },
    ));
    let spec = |src: [u8; 4], sport: u16| ipv4_syn_spec(src, sport, 9000);
    let build = |s: &Spec| s.build(&mut Rng::new(3)).0;
    let index = |s: &Spec| flow_filter_index(&s.flow().unwrap());
    let step = |r: &mut Run, s: &Spec, verdict: u32, counter: Counter, skipped: bool| {
        let before = r.model.totals[counter as usize];
        let (v, _) = r.frame(&build(s), Desc::of(s, "flow filter".into()));
        assert_eq!(v, verdict, "{counter:?}");
        assert_eq!(r.model.totals[counter as usize], before + 1, "{counter:?}");
        assert_eq!(r.last_skipped, skipped, "{counter:?}: lookups skipped");
        r.check_maps();
    };
    let a = [198, 18, 0, 1];
    let first = spec(a, 40_000);
    // A source without an entry: nothing to look up; admitted as without the filter.
    step(&mut r, &first, XDP_PASS, Counter::Admitted, true);
    let key = flow_source(&first.flow().unwrap(), &r.model.global);
    let state = r.guard.source_states().unwrap();
    let (_, s) = state.iter().find(|(k, _)| *k == key).expect("entry");
    assert_eq!(s.slots, 1);
    assert_eq!(s.filter_count(index(&first)), 1, "{s:?}");
    assert_eq!(s.filter, 1 << (4 * index(&first)), "{s:?}");
    // At its limit: the retransmit is found through the filter and passes...
    step(&mut r, &first, XDP_PASS, Counter::SynRetransmits, false);
    // ... a new tuple in another bucket skips the lookups and is refused as before ...
    let other = (40_001..41_000)
        .map(|p| spec(a, p))
        .find(|s| index(s) != index(&first))
        .unwrap();
    step(&mut r, &other, XDP_DROP, Counter::ConnLimited, true);
    // ... and one in the same bucket looks them up (missing both) and is refused too.
    let same = (40_001..41_000)
        .map(|p| spec(a, p))
        .find(|s| index(s) == index(&first))
        .unwrap();
    step(&mut r, &same, XDP_DROP, Counter::ConnLimited, false);
    // Established (the half-open entry expired, then adopted): still found.
    r.event(Event::Expire(first.flow().unwrap()));
    r.event(Event::Adopt(first.flow().unwrap()));
    r.check_maps();
    step(&mut r, &first, XDP_PASS, Counter::SynRetransmits, false);

    // A prefix change with the flow in flight: the flow moves to its /24 key (its slot and its
    // filter count), so the /24 source is at its limit at once (SECURITY.md finding 9: the new
    // key used to start at zero, letting a source at its limit in again).
    r.event(Event::SetGlobal(GlobalConfig {
        ipv4_prefix: 24,
        ..GlobalConfig::default()
    }));
    assert_ne!(
        r.model.global.flags & FLAG_CHECK_FLOWS,
        0,
        "set by the change"
    );
    let key24 = flow_source(&first.flow().unwrap(), &r.model.global);
    let state = r.guard.source_states().unwrap();
    let (_, s24) = state.iter().find(|(k, _)| *k == key24).expect("/24 entry");
    assert_eq!(
        (s24.slots, s24.filter_count(index(&first))),
        (1, 1),
        "{s24:?}"
    );
    let (_, s32) = state.iter().find(|(k, _)| *k == key).expect("/32 entry");
    assert!(s32.holds_nothing(), "{s32:?}");
    step(&mut r, &first, XDP_PASS, Counter::SynRetransmits, false);
    // A neighbour in the /24: refused, the /24 key holds the flow's slot.
    let b = spec([198, 18, 0, 2], 40_000);
    step(&mut r, &b, XDP_DROP, Counter::ConnLimited, false);
    // Other changes keep the flag (the lists', the bans' and the monitor switch's).
    r.event(Event::Policy {
        allow: Vec::new(),
        deny: vec!["198.18.9.0/24".parse().unwrap()],
        ban_ns: 0,
    });
    r.event(Event::SetGlobal(GlobalConfig {
        ipv4_prefix: 24,
        monitor: 0,
        fail_closed: 1,
        ..GlobalConfig::default()
    }));
    assert_ne!(r.model.global.flags & FLAG_CHECK_FLOWS, 0, "kept");
    // Every flow is under its current key: the sweep's check clears the flag.
    r.event(Event::SettleFlowCheck);
    assert_eq!(r.model.global.flags & FLAG_CHECK_FLOWS, 0, "cleared");
    r.check_maps();
    // The /24 key now skips again: a new tuple in another bucket than the flow's is refused
    // without lookups; the flow's retransmission is still found.
    let b2 = (40_001..41_000)
        .map(|p| spec([198, 18, 0, 3], p))
        .find(|s| index(s) != index(&first))
        .unwrap();
    step(&mut r, &b2, XDP_DROP, Counter::ConnLimited, true);
    step(&mut r, &first, XDP_PASS, Counter::SynRetransmits, false);
    // Back to /32: the flow moves back, its old key at its limit again, the neighbour free.
    r.event(Event::SetGlobal(GlobalConfig::default()));
    step(
        &mut r,
        &spec(a, 40_002),
        XDP_DROP,
        Counter::ConnLimited,
        false,
    );
    step(&mut r, &b, XDP_PASS, Counter::Admitted, false);
}

/// A saturated flow-filter bucket (directed): a source with 14 flows in one bucket (no limit
/// on the port) has the filter add of a retransmitted SYN saturate the count, which then stays
/// at 15 while its flows leave; the model takes that in (it cannot know it) and keeps it. Once
/// every slot is free the entry holds nothing, so the sweep's idle removal takes it (before,
/// a saturated bucket kept its entry for good), and the next attempt of the source starts a
/// fresh filter. Kernel and model agree on every frame and every map after each step.
#[test]
fn saturated_filter_bucket() {
    if !ws_guard_tests::privileged("saturated_filter_bucket") {
        return;
    }
    let mut r = Run::new("saturated_filter_bucket", 0, &LoadOptions::default(), 1);
    r.event(Event::SetGlobal(GlobalConfig::default()));
    r.event(Event::SetPort(
        9000,
        PortConfig {
            enabled: 1,
            ..PortConfig::default()
        },
    ));
    let spec = |sport: u16| ipv4_syn_spec([198, 18, 0, 9], sport, 9000);
    let index = |s: &Spec| flow_filter_index(&s.flow().unwrap());
    let b0 = index(&spec(40_000));
    let same: Vec<Spec> = (40_000..60_000)
        .map(spec)
        .filter(|s| index(s) == b0)
        .take(14)
        .collect();
    assert_eq!(same.len(), 14);
    let key = flow_source(&same[0].flow().unwrap(), &r.model.global);
    let kernel_state = |r: &Run| {
        r.guard
            .source_states()
            .unwrap()
            .into_iter()
            .find(|(k, _)| *k == key)
            .map(|(_, s)| s)
    };
    let frame = |r: &mut Run, s: &Spec, want: u32| {
        let (v, _) = r.frame(
            &s.build(&mut Rng::new(5)).0,
            Desc::of(s, "saturation".into()),
        );
        assert_eq!(v, want);
    };
    for s in &same {
        frame(&mut r, s, XDP_PASS);
    }
    r.check_maps();
    let s = kernel_state(&r).expect("entry");
    assert_eq!((s.slots, s.filter_count(b0)), (14, 14), "{s:?}");
    // A retransmission at 14: its filter add saturates the bucket, the failed insert's take-back
    // cannot undo that.
    let retransmits = r.model.totals[Counter::SynRetransmits as usize];
    frame(&mut r, &same[3], XDP_PASS);
    assert_eq!(
        r.model.totals[Counter::SynRetransmits as usize],
        retransmits + 1
    );
    r.check_maps();
    assert_eq!(
        r.stats.saturated_buckets, 1,
        "the model learnt the saturation"
    );
    let s = kernel_state(&r).expect("entry");
    assert_eq!((s.slots, s.filter_count(b0)), (14, 15), "{s:?}");
    // The flows leave; the count stays saturated, every other bucket exact.
    for s in &same {
        r.event(Event::Expire(s.flow().unwrap()));
    }
    r.check_maps();
    let s = kernel_state(&r).expect("entry");
    assert_eq!((s.slots, s.filter), (0, 0xf << (4 * b0)), "{s:?}");
    assert!(s.holds_nothing(), "{s:?}");
    // Idle: removed, in the kernel as in the model.
    r.event(Event::RemoveIdle(key));
    r.check_maps();
    assert!(kernel_state(&r).is_none(), "the idle entry was removed");
    // The source comes back: a fresh entry, its filter exact again.
    frame(&mut r, &same[0], XDP_PASS);
    r.check_maps();
    let s = kernel_state(&r).expect("entry");
    assert_eq!((s.slots, s.filter), (1, 1 << (4 * b0)), "{s:?}");
}
