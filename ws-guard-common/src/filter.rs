//! The per-source flow filter: lets a refused SYN skip the flow-map lookup of the
//! retransmission check.
//!
//! A SYN whose 4-tuple is tracked (in `WSG_FLOWS`) is a retransmission and passes. An admitted
//! SYN learns that from its insert into `WSG_FLOWS`, which fails for a tracked tuple; a SYN about
//! to be refused must look. In a flood from one source every tuple is new, so that lookup would
//! miss every time. Each source key's `WSG_SOURCES` entry ([`SourceState`]) counts its tracked
//! flows per [`flow_filter_index`] in sixteen 4-bit counts: when the count of the SYN's index is
//! zero, no tracked flow of that source can be this one and the lookup is skipped. The count is
//! kept at or above the true number at every instant (raised before a flow is inserted, lowered
//! after one is removed; a count that reaches 15 stays there), so a skip is never wrong. Flows are
//! counted under the key they were charged to; after a prefix change that key may differ from
//! the one the SYN now maps to, so [`FLAG_CHECK_FLOWS`] turns the skip off until every tracked
//! flow's key is current again ([`flows_settled`]).

use crate::{
    key::source_key,
    maps::{
        FLAG_CHECK_FLOWS, FLOW_FILTER_SLOTS, FlowKey, FlowValue, GlobalConfig, SourceKey,
        SourceState,
    },
};

/// The filter bucket of `flow`, in `0..FLOW_FILTER_SLOTS`. Mixes both ports and the low two
/// bytes of both addresses (IPv4 in bytes 2..4, IPv6 in bytes 14..16: the bytes that differ
/// between nearby hosts), then Fibonacci hashing: consecutive client ports (how most stacks
/// pick ephemeral ports) go round all buckets evenly, and random ones spread evenly too.
#[inline(always)]
pub fn flow_filter_index(flow: &FlowKey) -> usize {
    let c = &flow.client;
    let s = &flow.server;
    let addrs = u32::from_le_bytes([c[2] ^ c[14], c[3] ^ c[15], s[2] ^ s[14], s[3] ^ s[15]]);
    // The client port is added last and unmultiplied, so for one (source, server) pair the
    // input is the client port plus a constant and consecutive ports stay consecutive.
    let x = (addrs.wrapping_mul(0x0100_0193) ^ ((flow.server_port as u32) << 16))
        .wrapping_add(flow.client_port as u32);
    // The top bits of the product by 2^32/phi (three-distance theorem).
    (x.wrapping_mul(0x9E37_79B1) >> (32 - FLOW_FILTER_SLOTS.trailing_zeros())) as usize
}

/// Whether a new SYN of `flow` must look up the flow maps: [`FLAG_CHECK_FLOWS`] is set in
/// `flags`, or its source has an entry (`state`) whose filter counts a flow at the flow's
/// index. `false` means it cannot be a retransmission of a tracked attempt.
#[inline(always)]
pub fn must_check_flows(flags: u32, state: Option<&SourceState>, index: usize) -> bool {
    if flags & FLAG_CHECK_FLOWS != 0 {
        return true;
    }
    match state {
        Some(s) => filter_count(s.filter, index) != 0,
        None => false,
    }
}

/// The count at bucket `i` (taken modulo [`FLOW_FILTER_SLOTS`]) of a filter word.
#[inline(always)]
pub fn filter_count(filter: u64, i: usize) -> u32 {
    ((filter >> (4 * (i % FLOW_FILTER_SLOTS))) & 0xf) as u32
}

/// The filter word with one more flow at bucket `i`. A count saturates at 15 and stays there
/// (its true value is unknown from then on; it only costs lookups).
#[inline(always)]
pub fn filter_added(filter: u64, i: usize) -> u64 {
    if filter_count(filter, i) == 15 {
        filter
    } else {
        filter + (1u64 << (4 * (i % FLOW_FILTER_SLOTS)))
    }
}

/// The filter word with one flow fewer at bucket `i`: a saturated count, or a zero one, stays.
#[inline(always)]
pub fn filter_removed(filter: u64, i: usize) -> u64 {
    match filter_count(filter, i) {
        0 | 15 => filter,
        _ => filter - (1u64 << (4 * (i % FLOW_FILTER_SLOTS))),
    }
}

/// The filter word with bucket `i` saturated: what an add that could not be made atomically
/// falls back to (an over-count is always safe).
#[inline(always)]
pub fn filter_saturated(filter: u64, i: usize) -> u64 {
    filter | (0xfu64 << (4 * (i % FLOW_FILTER_SLOTS)))
}

/// The filter word with its saturated buckets (count 15) cleared: the counts that still say
/// how many flows a bucket holds at least. A saturated count says nothing, so an entry whose
/// slots are all free holds no flow whatever its saturated buckets say (see
/// [`SourceState::holds_nothing`]).
#[inline(always)]
pub fn unsaturated(filter: u64) -> u64 {
    const LOW: u64 = 0x1111_1111_1111_1111;
    // Bit 0 of each nibble: set where all four of its bits are.
    let full = filter & (filter >> 1) & (filter >> 2) & (filter >> 3) & LOW;
    filter & !(full * 0xf)
}

/// Whether every tracked flow is charged to the source key the prefixes of `global` give it:
/// then each flow is counted in the filter the XDP program reads for its SYNs, and
/// [`FLAG_CHECK_FLOWS`] may be cleared. The port is the one the flow was charged to: a
/// connection behind DNAT is tracked under its socket's port, not the protected one.
pub fn flows_settled<'a>(
    mut flows: impl Iterator<Item = (&'a FlowKey, &'a FlowValue)>,
    global: &GlobalConfig,
) -> bool {
    flows.all(|(flow, value)| current_source(flow, value, global) == value.source(flow))
}

/// The source key the prefixes of `global` give a tracked flow, on the port it is charged to.
#[inline(always)]
pub fn current_source(flow: &FlowKey, value: &FlowValue, global: &GlobalConfig) -> SourceKey {
    source_key(flow.family, flow.client, value.port(), global)
}

/// Whether changing the global settings from `old` to `new` moves source keys (a prefix
/// changed): then [`FLAG_CHECK_FLOWS`] must be set.
#[inline(always)]
pub fn prefixes_changed(old: &GlobalConfig, new: &GlobalConfig) -> bool {
    old.ipv4_prefix != new.ipv4_prefix || old.ipv6_prefix != new.ipv6_prefix
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        key::flow_source,
        maps::{AF_INET, AF_INET6, FLOW_OWNED, FLOW_PENDING},
    };

    fn flow4(client: [u8; 4], client_port: u16, server_port: u16) -> FlowKey {
        let mut c = [0u8; 16];
        c[..4].copy_from_slice(&client);
        let mut s = [0u8; 16];
        s[..4].copy_from_slice(&[198, 19, 0, 1]);
        FlowKey {
            client: c,
            server: s,
            client_port,
            server_port,
            family: AF_INET,
            _pad: 0,
        }
    }

    fn flow6(last: u8, client_port: u16) -> FlowKey {
        let mut c = [0u8; 16];
        c[..4].copy_from_slice(&[0x20, 0x01, 0x00, 0x02]);
        c[15] = last;
        let mut s = c;
        s[15] = 1;
        FlowKey {
            client: c,
            server: s,
            client_port,
            server_port: 443,
            family: AF_INET6,
            _pad: 0,
        }
    }

    fn histogram(flows: impl Iterator<Item = FlowKey>) -> [u32; FLOW_FILTER_SLOTS] {
        let mut h = [0u32; FLOW_FILTER_SLOTS];
        for f in flows {
            h[flow_filter_index(&f)] += 1;
        }
        h
    }

    #[test]
    fn sequential_ports_fill_every_bucket_evenly() {
        // Linux's default ephemeral range, one source, two server ports.
        for server_port in [443u16, 9000] {
            let h = histogram((32768..61000u16).map(|p| flow4([198, 18, 0, 7], p, server_port)));
            let mean = 28232 / FLOW_FILTER_SLOTS as u32;
            for (i, n) in h.iter().enumerate() {
                assert!(
                    n.abs_diff(mean) <= 2,
                    "bucket {i}: {n} of mean {mean}: {h:?}"
                );
            }
        }
        // Any 16 consecutive ports of one source use at least 12 buckets, 64 all of them at most
        // 7 times.
        for start in (1024u16..65000).step_by(97) {
            let h = histogram((start..start + 16).map(|p| flow4([198, 18, 0, 7], p, 9000)));
            let used = h.iter().filter(|n| **n > 0).count();
            assert!(used >= 12, "from {start}: {h:?}");
            let h = histogram((start..start + 64).map(|p| flow6(9, p)));
            assert!(
                h.iter().all(|n| (1..=7).contains(n)),
                "v6 from {start}: {h:?}"
            );
        }
    }

    #[test]
    fn random_ports_and_addresses_spread_evenly() {
        // A fixed LCG: deterministic "random" tuples.
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = || {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 32) as u32
        };
        let n = 160_000u32;
        let h = histogram((0..n).map(|_| {
            let r = next();
            let a = next().to_le_bytes();
            flow4([198, 18, a[0], a[1]], r as u16, 9000)
        }));
        let mean = n / FLOW_FILTER_SLOTS as u32;
        for (i, c) in h.iter().enumerate() {
            assert!(
                c.abs_diff(mean) * 20 < mean,
                "bucket {i}: {c} of mean {mean}: {h:?}"
            );
        }
    }

    #[test]
    fn index_is_deterministic_in_range_and_depends_on_each_field() {
        let f = flow4([198, 18, 0, 7], 40000, 9000);
        let i = flow_filter_index(&f);
        assert!(i < FLOW_FILTER_SLOTS);
        assert_eq!(flow_filter_index(&f.clone()), i);
        // Each input moves the index for some value (none is ignored).
        let moved = |g: &dyn Fn(u8) -> FlowKey| (0..=255u8).any(|b| flow_filter_index(&g(b)) != i);
        assert!(moved(&|b| flow4([198, 18, 0, b], 40000, 9000)));
        assert!(moved(&|b| flow4([198, 18, b, 7], 40000, 9000)));
        assert!(moved(&|b| flow4([198, 18, 0, 7], 40000 + b as u16, 9000)));
        assert!(moved(&|b| flow4([198, 18, 0, 7], 40000, 9000 + b as u16)));
        assert!(moved(&|b| {
            let mut g = f;
            g.server[3] = b;
            g
        }));
        assert!(moved(&|b| {
            let mut g = flow6(9, 40000);
            g.client[15] = b;
            g
        }));
    }

    #[test]
    fn lookups_are_skipped_only_when_nothing_can_match() {
        let mut s = SourceState::default();
        assert!(!must_check_flows(0, None, 3));
        assert!(!must_check_flows(0, Some(&s), 3));
        assert!(must_check_flows(FLAG_CHECK_FLOWS, None, 3));
        assert!(must_check_flows(FLAG_CHECK_FLOWS, Some(&s), 3));
        s.filter = filter_added(s.filter, 3);
        assert!(must_check_flows(0, Some(&s), 3));
        assert!(!must_check_flows(0, Some(&s), 4));
        // Other flags do not force the lookups.
        assert!(!must_check_flows(!FLAG_CHECK_FLOWS, Some(&s), 4));
        assert!(!s.holds_nothing());
        s.filter = filter_removed(s.filter, 3);
        assert!(s.holds_nothing());
        s.slots = 1;
        assert!(!s.holds_nothing());
    }

    #[test]
    fn counts_are_independent_saturate_at_fifteen_and_never_go_below_zero() {
        let mut f = 0u64;
        for i in 0..FLOW_FILTER_SLOTS {
            for _ in 0..i {
                f = filter_added(f, i);
            }
        }
        for i in 0..FLOW_FILTER_SLOTS {
            assert_eq!(filter_count(f, i), i as u32);
        }
        // Bucket 15 is saturated: it stays at 15 through removals.
        f = filter_added(f, 15);
        assert_eq!(filter_count(f, 15), 15);
        f = filter_removed(f, 15);
        assert_eq!(filter_count(f, 15), 15);
        // Removing from an empty bucket leaves every bucket alone.
        assert_eq!(filter_removed(f, 0), f);
        // The neighbours of a bucket taken up and down are untouched.
        let g = filter_removed(filter_added(f, 7), 7);
        assert_eq!(g, f);
        assert_eq!(filter_count(filter_saturated(0, 9), 9), 15);
        assert_eq!(filter_count(filter_saturated(0, 9), 8), 0);
        assert_eq!(filter_count(f, 16 + 3), 3);
    }

    #[test]
    fn unsaturated_clears_exactly_the_saturated_buckets() {
        let bytewise = |f: u64| {
            (0..FLOW_FILTER_SLOTS).fold(0u64, |acc, i| match filter_count(f, i) {
                15 => acc,
                c => acc | (u64::from(c) << (4 * i)),
            })
        };
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Saturate a few buckets of a random word, so every mix of counts shows up.
            let f = filter_saturated(filter_saturated(x, (x >> 60) as usize), (x >> 3) as usize);
            assert_eq!(unsaturated(f), bytewise(f), "{f:#x}");
            assert_eq!(unsaturated(x), bytewise(x), "{x:#x}");
        }
        assert_eq!(unsaturated(u64::MAX), 0);
        assert_eq!(unsaturated(0xeeee_eeee_eeee_eeee), 0xeeee_eeee_eeee_eeee);
    }

    #[test]
    fn an_entry_with_free_slots_and_only_saturated_counts_holds_nothing() {
        let mut s = SourceState {
            filter: filter_saturated(filter_saturated(0, 2), 11),
            ..SourceState::default()
        };
        assert!(s.holds_nothing());
        // A count below 15 still says a flow may be on its way in (its slot not yet taken).
        s.filter = filter_added(s.filter, 5);
        assert!(!s.holds_nothing());
        s.filter = filter_removed(s.filter, 5);
        s.slots = 1;
        assert!(!s.holds_nothing());
    }

    #[test]
    fn flows_settle_when_every_key_is_current() {
        let g32 = GlobalConfig::default();
        let g24 = GlobalConfig {
            ipv4_prefix: 24,
            ..g32
        };
        assert!(prefixes_changed(&g32, &g24));
        assert!(!prefixes_changed(&g32, &GlobalConfig { monitor: 1, ..g32 }));
        assert!(prefixes_changed(
            &g32,
            &GlobalConfig {
                ipv6_prefix: 48,
                ..g32
            }
        ));
        let f = flow4([198, 18, 0, 7], 40000, 9000);
        let v32 = FlowValue::new(FLOW_PENDING, 32, 9000, 0);
        let v24 = FlowValue::new(FLOW_PENDING, 24, 9000, 0);
        assert_eq!(v32.source(&f), flow_source(&f, &g32));
        assert_eq!(v24.source(&f), flow_source(&f, &g24));
        assert_ne!(v32.source(&f), v24.source(&f));
        assert!(flows_settled([(&f, &v32)].into_iter(), &g32));
        assert!(!flows_settled([(&f, &v32)].into_iter(), &g24));
        assert!(flows_settled([(&f, &v24)].into_iter(), &g24));
        assert!(flows_settled(core::iter::empty(), &g24));
        let other = FlowValue::new(FLOW_OWNED, 16, 9000, 0);
        assert!(!flows_settled([(&f, &v32), (&f, &other)].into_iter(), &g32));
        // A connection behind DNAT with port translation: tracked under its socket's port
        // (9000), charged to the protected port on the wire (8080).
        let socket = flow4([198, 18, 0, 7], 40000, 9000);
        let wire = flow4([198, 18, 0, 7], 40000, 8080);
        let translated = FlowValue::new(FLOW_OWNED, 32, 8080, 0);
        assert_eq!(translated.source(&socket), flow_source(&wire, &g32));
        assert!(flows_settled([(&socket, &translated)].into_iter(), &g32));
        assert!(!flows_settled([(&socket, &translated)].into_iter(), &g24));
    }
}
