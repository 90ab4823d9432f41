//! Source keys: the address a limit is charged to, masked like iptables' `--connlimit-mask`.

use crate::maps::{AF_INET, AF_INET6, FlowKey, GlobalConfig, SourceKey};

/// Keeps the first `prefix` bits of `addr` (IPv4 in the first four bytes) and zeroes the rest.
/// A prefix longer than the family's address is clamped to it. Word by word, in the words'
/// own byte order (only the mask is swapped): the byte-wise loop was ~200 BPF instructions on
/// the XDP program's every judgement.
#[inline(always)]
pub fn mask(addr: [u8; 16], family: u16, prefix: u32) -> [u8; 16] {
    let bits = if family == AF_INET { 32 } else { 128 };
    let prefix = if prefix > bits { bits } else { prefix };
    let mut out = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        let start = 32 * i as u32;
        let keep = if prefix <= start {
            0
        } else if prefix - start >= 32 {
            32
        } else {
            prefix - start
        };
        if keep != 0 {
            let word = u32::from_ne_bytes([
                addr[4 * i],
                addr[4 * i + 1],
                addr[4 * i + 2],
                addr[4 * i + 3],
            ]);
            out[i] = word & (u32::MAX << (32 - keep)).to_be();
        }
        i += 1;
    }
    // SAFETY: [u32; 4] and [u8; 16] have the same size; every bit pattern is valid.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(out) }
}

/// The prefix length source keys of `family` are masked to.
#[inline(always)]
pub fn prefix_of(family: u16, cfg: &GlobalConfig) -> u32 {
    if family == AF_INET {
        cfg.ipv4_prefix
    } else {
        cfg.ipv6_prefix
    }
}

/// The source key a connection from `client` to `port` is charged to.
#[inline(always)]
pub fn source_key(family: u16, client: [u8; 16], port: u16, cfg: &GlobalConfig) -> SourceKey {
    SourceKey {
        addr: mask(client, family, prefix_of(family, cfg)),
        port,
        family,
    }
}

/// The source key of a tracked flow.
#[inline(always)]
pub fn flow_source(flow: &FlowKey, cfg: &GlobalConfig) -> SourceKey {
    source_key(flow.family, flow.client, flow.server_port, cfg)
}

/// Addresses as the `sock:inet_sock_set_state` tracepoint reports them, in the form the XDP
/// program sees on the wire: an IPv4 client of a dual-stack socket is reported as AF_INET6 with
/// `::ffff:a.b.c.d` addresses, but arrives as IPv4.
#[inline(always)]
pub fn normalize(family: u16, v4: [u8; 4], v6: [u8; 16]) -> (u16, [u8; 16]) {
    let mut out = [0u8; 16];
    if family == AF_INET6 && !is_v4_mapped(&v6) {
        return (AF_INET6, v6);
    }
    if family == AF_INET6 {
        out[..4].copy_from_slice(&v6[12..]);
    } else {
        out[..4].copy_from_slice(&v4);
    }
    (AF_INET, out)
}

/// `::ffff:0:0/96`.
#[inline(always)]
pub fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[..10] == [0u8; 10] && a[10] == 0xff && a[11] == 0xff
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut o = [0; 16];
        o[..4].copy_from_slice(&a);
        o
    }

    /// The definition, byte by byte (what `mask` computed before it worked in words).
    fn mask_bytewise(addr: [u8; 16], family: u16, prefix: u32) -> [u8; 16] {
        let bits = if family == AF_INET { 32 } else { 128 };
        let prefix = if prefix > bits { bits } else { prefix };
        let mut out = [0u8; 16];
        let full = (prefix / 8) as usize;
        let rest = prefix % 8;
        let mut i = 0;
        while i < 16 {
            if i < full {
                out[i] = addr[i];
            } else if i == full && rest != 0 {
                out[i] = addr[i] & (0xffu8 << (8 - rest));
            }
            i += 1;
        }
        out
    }

    #[test]
    fn masking_in_words_is_masking_byte_by_byte() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..2000 {
            let mut addr = [0u8; 16];
            for b in addr.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            for family in [AF_INET, AF_INET6] {
                for prefix in 0..=130 {
                    assert_eq!(
                        mask(addr, family, prefix),
                        mask_bytewise(addr, family, prefix),
                        "{addr:?} family {family} /{prefix}"
                    );
                }
            }
        }
    }

    #[test]
    fn ipv4_masks() {
        let a = v4([198, 18, 7, 200]);
        assert_eq!(mask(a, AF_INET, 32), a);
        assert_eq!(mask(a, AF_INET, 24), v4([198, 18, 7, 0]));
        assert_eq!(mask(a, AF_INET, 20), v4([198, 18, 0, 0]));
        assert_eq!(mask(a, AF_INET, 0), [0; 16]);
        // Clamped: an IPv4 key never keeps bytes beyond the address.
        let mut dirty = a;
        dirty[5] = 9;
        assert_eq!(mask(dirty, AF_INET, 128), a);
    }

    #[test]
    fn ipv6_masks() {
        let a: [u8; 16] = [0x20, 0x01, 0, 2, 0, 0, 0x12, 0x34, 1, 2, 3, 4, 5, 6, 7, 8];
        let m = mask(a, AF_INET6, 64);
        assert_eq!(&m[..8], &a[..8]);
        assert_eq!(&m[8..], &[0; 8]);
        assert_eq!(mask(a, AF_INET6, 128), a);
        let m = mask(a, AF_INET6, 52);
        assert_eq!(m[6], 0x10);
        assert_eq!(m[7], 0);
    }

    #[test]
    fn sources_in_one_prefix_share_a_key() {
        let cfg = GlobalConfig::default();
        let mut a: [u8; 16] = [0x20, 0x01, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1];
        let k1 = source_key(AF_INET6, a, 9000, &cfg);
        a[15] = 2;
        assert_eq!(k1, source_key(AF_INET6, a, 9000, &cfg));
        assert_ne!(k1, source_key(AF_INET6, a, 9001, &cfg));
        let k = source_key(AF_INET, v4([198, 18, 0, 1]), 9000, &cfg);
        assert_ne!(k, source_key(AF_INET, v4([198, 18, 0, 2]), 9000, &cfg));
    }

    #[test]
    fn normalizes_v4_mapped_tracepoint_addresses() {
        let mapped = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 2];
        assert_eq!(
            normalize(AF_INET6, [198, 18, 0, 2], mapped),
            (AF_INET, v4([198, 18, 0, 2]))
        );
        assert_eq!(
            normalize(AF_INET, [198, 18, 0, 2], mapped),
            (AF_INET, v4([198, 18, 0, 2]))
        );
        let real = [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        assert_eq!(normalize(AF_INET6, [0; 4], real), (AF_INET6, real));
    }
}
