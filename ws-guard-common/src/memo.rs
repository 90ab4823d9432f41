//! The refusal memo: each CPU remembers the last source key it refused at `max_connections`,
//! so the next attempts of that source (a flood from one address) are refused without a hash
//! lookup of its entry.
//!
//! Why it stays exact: a memo is valid only while the epoch (`WSG_EPOCH`) is the one read before
//! the source's slot count was. Everything that could turn a refusal at the concurrency limit
//! into another verdict moves the epoch on: every slot given back (a close, an expiry, a rekey,
//! an admission undone), every ban the kernel starts, every flow counted without an admission
//! (adopted, charged to a new key, translated behind DNAT), and every change userspace makes to
//! the lists, bans, limits or global settings (`OP_FORGET`). While the epoch stands, slots only
//! grow and only admissions add flows, which need room: the source is still at its limit, and
//! the memo's copy of its flow filter (read after the slot count; a flow is counted in the
//! filter before its slot is taken) still counts every tracked attempt of it, so a SYN that may
//! repeat one is looked up in the flow map first, as without the memo. The lists judge
//! addresses, not keys: while either list has entries, a memo serves only keys that are whole
//! addresses (a prefix shorter than the address holds addresses the lists may tell apart).
//!
//! The memo's refusals are counted in it (`pending`, plain per-CPU adds) and moved into the
//! source's `refused` when the CPU memoizes another source; userspace adds the pending counts
//! when it reads the source map ([`RefusalMemo::flushes`] tells it a move was in between), and
//! before it removes an idle entry it has the memos naming it moved in (`OP_SETTLE_MEMO`, run
//! on their CPUs), so a count never lands in a later entry of the same key.

use crate::{
    filter::filter_count,
    key::prefix_of,
    maps::{FLAG_ALLOW, FLAG_CHECK_FLOWS, FLAG_DENY, GlobalConfig, RefusalMemo, SourceKey},
    policy::address_bits,
};

/// What the memo says about a new attempt of `source`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recall {
    /// Not remembered (another source, another limit, or stale): judge it fully.
    Unknown,
    /// Refused at the concurrency limit, as the last time.
    Refuse,
    /// Refused unless it repeats a tracked attempt: look the flow up first.
    RefuseUnlessTracked,
}

/// What `memo` says about an attempt of `source` to a port whose `max_connections` is `max`,
/// with the settings `global` and the epoch `epoch` reads (monitor mode never uses it: a
/// refusal there is counted and passed, and the full judgement does that). The epoch, a map
/// read, is read last: only for the memo's own source.
#[inline(always)]
pub fn recall(
    memo: &RefusalMemo,
    source: &SourceKey,
    max: u32,
    epoch: impl FnOnce() -> u32,
    global: &GlobalConfig,
    flow_index: usize,
) -> Recall {
    let flags = global.flags;
    // `memo.max != 0` also rules out a memo never written (all zeros).
    if memo.max == 0
        || memo.max != max
        || !memo.source.same(source)
        || flags & FLAG_CHECK_FLOWS != 0
        || (flags & (FLAG_ALLOW | FLAG_DENY) != 0
            && prefix_of(source.family, global) < address_bits(source.family))
        || memo.epoch != epoch()
    {
        return Recall::Unknown;
    }
    if filter_count(memo.filter, flow_index) != 0 {
        Recall::RefuseUnlessTracked
    } else {
        Recall::Refuse
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        filter::filter_added,
        maps::{AF_INET, FLAG_BANS},
    };

    fn settings(flags: u32, ipv4_prefix: u32) -> GlobalConfig {
        GlobalConfig {
            flags,
            ipv4_prefix,
            ipv6_prefix: 64,
            ..Default::default()
        }
    }

    fn key(last: u8) -> SourceKey {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[198, 18, 0, last]);
        SourceKey {
            addr,
            port: 9000,
            family: AF_INET,
        }
    }

    fn memo() -> RefusalMemo {
        RefusalMemo {
            source: key(1),
            epoch: 7,
            max: 3,
            filter: filter_added(0, 5),
            ..Default::default()
        }
    }

    #[test]
    fn a_valid_memo_refuses_and_asks_for_the_flow_where_the_filter_counts_one() {
        assert_eq!(
            recall(&memo(), &key(1), 3, || 7, &settings(0, 32), 4),
            Recall::Refuse
        );
        assert_eq!(
            recall(&memo(), &key(1), 3, || 7, &settings(0, 32), 5),
            Recall::RefuseUnlessTracked
        );
        // The lists and bans were judged when it was made; a change to them moves the epoch.
        assert_eq!(
            recall(&memo(), &key(1), 3, || 7, &settings(FLAG_BANS, 32), 4),
            Recall::Refuse
        );
    }

    #[test]
    fn anything_else_is_unknown() {
        assert_eq!(
            recall(&memo(), &key(2), 3, || 7, &settings(0, 32), 4),
            Recall::Unknown
        );
        // Another source's attempt does not read the epoch (a map read in the kernel).
        assert_eq!(
            recall(&memo(), &key(2), 3, || unreachable!(), &settings(0, 32), 4),
            Recall::Unknown
        );
        let mut other_port = key(1);
        other_port.port = 9001;
        assert_eq!(
            recall(&memo(), &other_port, 3, || 7, &settings(0, 32), 4),
            Recall::Unknown
        );
        // A slot given back, a ban, a change by the operator.
        assert_eq!(
            recall(&memo(), &key(1), 3, || 8, &settings(0, 32), 4),
            Recall::Unknown
        );
        // A raised (or lowered) limit.
        assert_eq!(
            recall(&memo(), &key(1), 4, || 7, &settings(0, 32), 4),
            Recall::Unknown
        );
        // Flows may be charged to other keys: every attempt looks its flow up.
        assert_eq!(
            recall(
                &memo(),
                &key(1),
                3,
                || 7,
                &settings(FLAG_CHECK_FLOWS, 32),
                4
            ),
            Recall::Unknown
        );
        // A key of several addresses while the lists may tell them apart (a whole address is
        // judged by the lists as its key is).
        for list in [FLAG_ALLOW, FLAG_DENY] {
            assert_eq!(
                recall(&memo(), &key(1), 3, || 7, &settings(list, 24), 4),
                Recall::Unknown
            );
            assert_eq!(
                recall(&memo(), &key(1), 3, || 7, &settings(list, 32), 4),
                Recall::Refuse
            );
        }
        assert_eq!(
            recall(&memo(), &key(1), 3, || 7, &settings(FLAG_BANS, 24), 4),
            Recall::Refuse
        );
        // Never written.
        let zero = RefusalMemo::default();
        assert_eq!(
            recall(&zero, &SourceKey::default(), 0, || 0, &settings(0, 32), 0),
            Recall::Unknown
        );
    }
}
