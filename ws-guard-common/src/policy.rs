//! Allow/deny lists and bans: the keys of the CIDR tries and the pure decisions about bans.
//!
//! One longest-prefix-match trie per list covers both address families: the key data is a
//! family tag byte followed by the 16 address bytes (IPv4 in the first four), and the prefix
//! length counts the tag's 8 bits, so an IPv4 entry never matches an IPv6 source (even `/0`).

use crate::{
    key::mask,
    maps::{AF_INET, AF_INET6, BanValue, FLAG_ALLOW, FLAG_BANS, FLAG_DENY, GlobalConfig},
};

/// Bytes of a CIDR trie key's data: the family tag, then the address.
pub const CIDR_DATA_LEN: usize = 17;
/// Bits of the family tag at the front of every key.
pub const TAG_BITS: u32 = 8;

/// A CIDR trie key, in the form both sides wrap into their `lpm_trie::Key`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CidrKey {
    /// Bits of `data` that must match: [`TAG_BITS`] + the CIDR prefix.
    pub prefix_len: u32,
    pub data: [u8; CIDR_DATA_LEN],
}

/// The family's address length in bits (IPv4 for anything but [`AF_INET6`]).
#[inline(always)]
pub const fn address_bits(family: u16) -> u32 {
    if family == AF_INET6 { 128 } else { 32 }
}

/// The trie key of `addr/prefix` of `family`: host bits cleared, prefix clamped to the family.
/// With `prefix` = the family's full length it is the key a lookup of one address uses.
#[inline(always)]
pub fn cidr_key(family: u16, addr: [u8; 16], prefix: u32) -> CidrKey {
    let bits = address_bits(family);
    let prefix = if prefix > bits { bits } else { prefix };
    let masked = mask(addr, family, prefix);
    let mut data = [0u8; CIDR_DATA_LEN];
    data[0] = family as u8;
    let mut i = 0;
    while i < 16 {
        data[1 + i] = masked[i];
        i += 1;
    }
    CidrKey {
        prefix_len: TAG_BITS + prefix,
        data,
    }
}

/// The lookup key of one source address: its full-length key.
#[inline(always)]
pub fn lookup_key(family: u16, addr: [u8; 16]) -> CidrKey {
    cidr_key(family, addr, address_bits(family))
}

impl CidrKey {
    /// The family, address and prefix a key stands for; `None` for a key no [`cidr_key`] makes.
    pub fn parts(&self) -> Option<(u16, [u8; 16], u32)> {
        let family = self.data[0] as u16;
        if family != AF_INET && family != AF_INET6 {
            return None;
        }
        let prefix = self.prefix_len.checked_sub(TAG_BITS)?;
        if prefix > address_bits(family) {
            return None;
        }
        let mut addr = [0u8; 16];
        addr.copy_from_slice(&self.data[1..]);
        Some((family, addr, prefix))
    }
}

/// Whether a ban is still in force at `now_ns`; it ends at `until_ns` exactly.
#[inline(always)]
pub fn ban_active(ban: &BanValue, now_ns: u64) -> bool {
    now_ns < ban.until_ns
}

/// When a ban of `duration_ns` starting at `now_ns` ends (saturating: never wraps into the past).
#[inline(always)]
pub fn ban_until(now_ns: u64, duration_ns: u64) -> u64 {
    now_ns.saturating_add(duration_ns)
}

/// Nanoseconds left of a ban at `now_ns`, zero once it ended.
#[inline(always)]
pub fn ban_remaining(ban: &BanValue, now_ns: u64) -> u64 {
    ban.until_ns.saturating_sub(now_ns)
}

/// [`crate::maps::GlobalConfig::flags`] for the maps' contents: lookups only where they can hit.
/// Bans may exist when automatic bans are on (`ban_ns` > 0) or the ban map has entries.
#[inline(always)]
pub const fn flags(allow_entries: bool, deny_entries: bool, ban_ns: u64, bans: bool) -> u32 {
    let mut f = 0;
    if allow_entries {
        f |= FLAG_ALLOW;
    }
    if deny_entries {
        f |= FLAG_DENY;
    }
    if ban_ns > 0 || bans {
        f |= FLAG_BANS;
    }
    f
}

/// What the lists say about a new attempt, before any limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListVerdict {
    /// On the allowlist: not limited, not banned, tracked.
    Allowed,
    /// On the denylist (and not on the allowlist): dropped.
    Denied,
    /// On neither: the ban and the limits decide.
    Neither,
}

/// The lists' decision: the allowlist beats the denylist. `in_allow` / `in_deny` are only
/// consulted when their flag is set in `global`, as the kernel does.
#[inline(always)]
pub fn list_verdict(
    global: &GlobalConfig,
    in_allow: impl FnOnce() -> bool,
    in_deny: impl FnOnce() -> bool,
) -> ListVerdict {
    if global.flags & FLAG_ALLOW != 0 && in_allow() {
        return ListVerdict::Allowed;
    }
    if global.flags & FLAG_DENY != 0 && in_deny() {
        return ListVerdict::Denied;
    }
    ListVerdict::Neither
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut o = [0; 16];
        o[..4].copy_from_slice(&a);
        o
    }

    /// The kernel's longest-prefix match, for checking key construction.
    fn matches(entry: &CidrKey, lookup: &CidrKey) -> bool {
        let mut bits = entry.prefix_len;
        for i in 0..CIDR_DATA_LEN {
            if bits == 0 {
                return true;
            }
            let n = bits.min(8);
            let m = 0xffu8 << (8 - n);
            if entry.data[i] & m != lookup.data[i] & m {
                return false;
            }
            bits -= n;
        }
        true
    }

    #[test]
    fn keys_clear_host_bits_and_count_the_tag() {
        let k = cidr_key(AF_INET, v4([198, 18, 7, 200]), 24);
        assert_eq!(k.prefix_len, 32);
        assert_eq!(k.data[0], AF_INET as u8);
        assert_eq!(&k.data[1..5], &[198, 18, 7, 0]);
        assert_eq!(k.parts(), Some((AF_INET, v4([198, 18, 7, 0]), 24)));
        // Clamped to the family.
        assert_eq!(cidr_key(AF_INET, v4([1, 2, 3, 4]), 99).prefix_len, 8 + 32);
        let a6 = [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
        let k = cidr_key(AF_INET6, a6, 48);
        assert_eq!(k.prefix_len, 56);
        assert_eq!(k.data[0], AF_INET6 as u8);
        assert_eq!(k.data[16], 0);
        assert_eq!(lookup_key(AF_INET6, a6).prefix_len, 136);
    }

    #[test]
    fn families_never_match_each_other() {
        let all_v4 = cidr_key(AF_INET, [0; 16], 0);
        let all_v6 = cidr_key(AF_INET6, [0; 16], 0);
        let a4 = lookup_key(AF_INET, v4([198, 18, 0, 1]));
        let a6 = lookup_key(
            AF_INET6,
            [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        );
        assert!(matches(&all_v4, &a4) && !matches(&all_v4, &a6));
        assert!(matches(&all_v6, &a6) && !matches(&all_v6, &a4));
        // An IPv4 address is not inside ::/96-ish IPv6 entries either.
        let zeros6 = cidr_key(AF_INET6, [0; 16], 96);
        assert!(!matches(&zeros6, &lookup_key(AF_INET, v4([0, 0, 0, 1]))));
    }

    #[test]
    fn prefixes_match_their_addresses_only() {
        let net = cidr_key(AF_INET, v4([198, 18, 4, 0]), 22);
        assert!(matches(&net, &lookup_key(AF_INET, v4([198, 18, 7, 255]))));
        assert!(!matches(&net, &lookup_key(AF_INET, v4([198, 18, 8, 0]))));
        let host = cidr_key(AF_INET, v4([198, 18, 4, 1]), 32);
        assert!(matches(&host, &lookup_key(AF_INET, v4([198, 18, 4, 1]))));
        assert!(!matches(&host, &lookup_key(AF_INET, v4([198, 18, 4, 2]))));
    }

    #[test]
    fn parts_refuses_foreign_keys() {
        let mut k = cidr_key(AF_INET, v4([1, 2, 3, 4]), 8);
        k.data[0] = 7;
        assert_eq!(k.parts(), None);
        let k = CidrKey {
            prefix_len: 3,
            data: [AF_INET as u8; CIDR_DATA_LEN],
        };
        assert_eq!(k.parts(), None);
        let k = CidrKey {
            prefix_len: 8 + 33,
            data: cidr_key(AF_INET, [0; 16], 0).data,
        };
        assert_eq!(k.parts(), None);
    }

    #[test]
    fn bans_end_exactly_at_their_deadline() {
        let b = BanValue {
            until_ns: 100,
            reason: crate::maps::BAN_RATE,
            _pad: 0,
        };
        assert!(ban_active(&b, 0));
        assert!(ban_active(&b, 99));
        assert!(!ban_active(&b, 100));
        assert_eq!(ban_remaining(&b, 40), 60);
        assert_eq!(ban_remaining(&b, 400), 0);
        assert_eq!(ban_until(5, 10), 15);
        assert_eq!(ban_until(u64::MAX - 1, 10), u64::MAX);
    }

    #[test]
    fn flags_follow_contents() {
        assert_eq!(flags(false, false, 0, false), 0);
        assert_eq!(flags(true, false, 0, false), FLAG_ALLOW);
        assert_eq!(flags(false, true, 0, false), FLAG_DENY);
        assert_eq!(flags(false, false, 1, false), FLAG_BANS);
        assert_eq!(flags(false, false, 0, true), FLAG_BANS);
    }

    #[test]
    fn allow_beats_deny_and_unset_flags_skip_lookups() {
        let mut g = GlobalConfig {
            flags: FLAG_ALLOW | FLAG_DENY,
            ..Default::default()
        };
        assert_eq!(list_verdict(&g, || true, || true), ListVerdict::Allowed);
        assert_eq!(list_verdict(&g, || false, || true), ListVerdict::Denied);
        assert_eq!(list_verdict(&g, || false, || false), ListVerdict::Neither);
        g.flags = FLAG_DENY;
        assert_eq!(
            list_verdict(&g, || panic!("allow looked up"), || true),
            ListVerdict::Denied
        );
        g.flags = 0;
        assert_eq!(
            list_verdict(&g, || panic!("allow"), || panic!("deny")),
            ListVerdict::Neither
        );
    }
}
