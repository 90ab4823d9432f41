//! The SYN-ACK that carries a SYN cookie, built in place of the SYN by the XDP program.
//!
//! The cookie itself is the kernel's (`bpf_tcp_gen_syncookie` on the listener: the same secret,
//! the same MSS table, checked by the kernel's own cookie code when the ACK arrives), so a
//! connection completed from it is the kernel's like any other. What the SYN-ACK must carry so
//! that the kernel decodes the connection's options from the ACK exactly as it would from its
//! own cookie SYN-ACK:
//!
//! - options only of the kinds the SYN offered and the host enables, each at most as long as the
//!   SYN's (so the reply is never longer than the SYN: no amplification);
//! - with timestamps, a TSval whose low 6 bits hold the client's window scale (0xf: none) and
//!   whether it offered SACK, as `cookie_init_timestamp` makes it; the kernel reads them back
//!   from the ACK's TSecr (`cookie_timestamp_decode`), after subtracting the per-connection
//!   timestamp offset, which is zero with `net.ipv4.tcp_timestamps = 2` (the daemon sets it
//!   while cookies are on);
//! - the server's own MSS, window scale and initial window, as `tcp_select_initial_window`
//!   computes them (see [`CookieSettings`]).
//!
//! ECN is not offered (the kernel's cookies carry it only with timestamps, and clients ask for
//! it rarely); without timestamps, window scaling and SACK are lost, as with the kernel's own
//! cookies.

use crate::{
    maps::{AF_INET, COOKIE_SACK, COOKIE_TIMESTAMPS, COOKIE_WSCALE, CookieSettings},
    parse::{Packet, TCP_ACK, TCP_SYN, TcpSegment},
};

const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_MSS: u8 = 2;
const TCPOPT_WINDOW: u8 = 3;
const TCPOPT_SACK_PERM: u8 = 4;
const TCPOPT_TIMESTAMP: u8 = 8;
/// The largest window scale RFC 7323 allows; the kernel clamps larger ones to it.
pub const MAX_WSCALE: u8 = 14;
/// [`SynOptions::wscale`] when the SYN has no window scale option.
pub const NO_WSCALE: u8 = 0xff;
/// Longest TCP header of a cookie SYN-ACK: 20 bytes and four option words.
pub const SYNACK_TCP_MAX: usize = 40;
/// Bytes of TCP options a segment can have.
pub const MAX_OPTION_BYTES: usize = 40;

/// Low bits of a cookie TSval that hold options (the kernel's `TSBITS`).
const TSBITS: u32 = 6;
const TS_OPT_WSCALE_MASK: u32 = 0xf;
const TS_OPT_SACK: u32 = 1 << 4;

/// The options of a SYN that the reply answers. Kept in map memory by the XDP program (see
/// [`syn_options`]), so plain integers (flags are 0 or 1).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynOptions {
    /// The TSval of its timestamp option (when `ts` is 1).
    pub tsval: u32,
    /// 1: the SYN has an MSS option.
    pub mss: u8,
    /// Its window scale (at most [`MAX_WSCALE`]), or [`NO_WSCALE`].
    pub wscale: u8,
    /// 1: it permits SACK.
    pub sack: u8,
    /// 1: it has a timestamp option.
    pub ts: u8,
}

const _: () = assert!(core::mem::size_of::<SynOptions>() == 8);

impl Default for SynOptions {
    fn default() -> Self {
        Self {
            tsval: 0,
            mss: 0,
            wscale: NO_WSCALE,
            sack: 0,
            ts: 0,
        }
    }
}

/// Where [`option_step`] is in a TCP header: the offset of the next option and of the end of
/// the options.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OptionCursor {
    pub at: u32,
    pub end: u32,
}

impl OptionCursor {
    /// The options of the TCP header of `header_len` bytes (at most 60 read) at `l4`.
    #[inline(always)]
    pub fn new(l4: usize, header_len: u32) -> Self {
        let header_len = if header_len > 60 { 60 } else { header_len };
        Self {
            at: l4 as u32 + 20,
            end: l4 as u32 + header_len,
        }
    }
}

/// Reads into `o` the options of the TCP header of `header_len` bytes at `l4` of `p`: the
/// rounds of [`option_step`], as the XDP program runs them with `bpf_loop`.
#[inline(always)]
pub fn syn_options<P: Packet + ?Sized>(p: &P, l4: usize, header_len: u32, o: &mut SynOptions) {
    *o = SynOptions::default();
    let mut cursor = OptionCursor::new(l4, header_len);
    for _ in 0..MAX_OPTION_BYTES {
        if !option_step(p, &mut cursor, o) {
            break;
        }
    }
}

/// Reads one option at the cursor into `o` and moves past it; false once the options end. A
/// malformed option ends them (what was read before it counts, as in the kernel's
/// `tcp_parse_options`). Each round moves forward, so [`MAX_OPTION_BYTES`] rounds read all.
///
/// One round per call: the XDP program runs it from `bpf_loop`, whose callback the verifier
/// checks once, on a copy of the header in map memory; as an inline loop over packet memory its
/// branches multiply past the verifier's limits.
#[inline(always)]
pub fn option_step<P: Packet + ?Sized>(p: &P, c: &mut OptionCursor, o: &mut SynOptions) -> bool {
    let (at, end) = (c.at as usize, c.end as usize);
    if at >= end {
        return false;
    }
    // Kind and length read together (a lone byte at the very end can only be padding).
    let Some([kind, len]) = p.load::<[u8; 2]>(at) else {
        return false;
    };
    if kind == TCPOPT_EOL {
        return false;
    }
    if kind == TCPOPT_NOP {
        c.at += 1;
        return true;
    }
    let len = len as usize;
    if len < 2 || at + len > end {
        return false;
    }
    match (kind, len) {
        (TCPOPT_MSS, 4) => o.mss = 1,
        (TCPOPT_WINDOW, 3) => {
            if let Some([_, _, w]) = p.load::<[u8; 3]>(at) {
                o.wscale = if w > MAX_WSCALE { MAX_WSCALE } else { w };
            }
        }
        (TCPOPT_SACK_PERM, 2) => o.sack = 1,
        (TCPOPT_TIMESTAMP, 10) => {
            if let Some([_, _, a, b, c, d]) = p.load::<[u8; 6]>(at) {
                o.ts = 1;
                o.tsval = u32::from_be_bytes([a, b, c, d]);
            }
        }
        _ => {}
    }
    c.at += len as u32;
    true
}

/// What the cookie connection will have: the SYN's offer, less what the host disables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The client's window scale, or [`NO_WSCALE`] (then neither side scales).
    pub wscale: u8,
    pub sack: bool,
    pub ts: bool,
}

/// The options a SYN-ACK answering `syn` offers. Without timestamps the cookie cannot carry
/// window scaling or SACK (the kernel would not know them at the ACK), so neither is offered.
#[inline(always)]
pub fn negotiate(syn: &SynOptions, s: &CookieSettings) -> Negotiated {
    let ts = syn.ts != 0 && s.flags & COOKIE_TIMESTAMPS != 0;
    Negotiated {
        wscale: if ts && syn.wscale != NO_WSCALE && s.flags & COOKIE_WSCALE != 0 {
            syn.wscale
        } else {
            NO_WSCALE
        },
        sack: ts && syn.sack != 0 && s.flags & COOKIE_SACK != 0,
        ts,
    }
}

/// The TSval of a cookie SYN-ACK sent at `now_ns` (CLOCK_MONOTONIC, the kernel's TCP clock, or
/// its coarse reading, which lags it): the millisecond clock with its low 6 bits replaced by the
/// options, never ahead of the clock, so the kernel's later TSvals never go back (PAWS).
#[inline(always)]
pub fn cookie_tsval(now_ns: u64, n: &Negotiated) -> u32 {
    let now = crate::rate::div_1e6(now_ns) as u32;
    let mut options = if n.wscale != NO_WSCALE {
        n.wscale as u32
    } else {
        TS_OPT_WSCALE_MASK
    };
    if n.sack {
        options |= TS_OPT_SACK;
    }
    let mut ts = (now >> TSBITS << TSBITS) | options;
    if ts > now {
        ts = ts.wrapping_sub(1 << TSBITS);
    }
    ts
}

/// The options `cookie_tsval` encoded: (window scale or [`NO_WSCALE`], SACK), as the kernel's
/// `cookie_timestamp_decode` reads them from the ACK's TSecr.
#[inline(always)]
pub fn decode_tsval(tsecr: u32) -> (u8, bool) {
    let w = tsecr & TS_OPT_WSCALE_MASK;
    (
        if w == TS_OPT_WSCALE_MASK {
            NO_WSCALE
        } else {
            w as u8
        },
        tsecr & TS_OPT_SACK != 0,
    )
}

/// The MSS the server offers over `family`.
#[inline(always)]
pub fn server_mss(family: u16, s: &CookieSettings) -> u16 {
    if family == AF_INET { s.mss4 } else { s.mss6 }
}

/// The initial window of the SYN-ACK, as the kernel's: 65535 rounded down to a multiple of the
/// payload per segment (the MSS less the timestamp option's 12 bytes when timestamps are on).
#[inline(always)]
pub fn initial_window(mss: u16, ts: bool) -> u16 {
    let per_segment = if ts { mss.saturating_sub(12) } else { mss };
    if per_segment == 0 {
        return u16::MAX;
    }
    u16::MAX / per_segment * per_segment
}

/// Writes into `t` the TCP header (options included, checksum zero) of the SYN-ACK answering
/// `seg`, whose options are `syn`, with sequence number `cookie`; returns its length (20 to
/// [`SYNACK_TCP_MAX`] bytes, never more than the SYN's header). Bytes past it are zeroed.
#[inline(always)]
pub fn synack_tcp(
    seg: &TcpSegment,
    syn: &SynOptions,
    s: &CookieSettings,
    cookie: u32,
    now_ns: u64,
    t: &mut [u8; SYNACK_TCP_MAX],
) -> usize {
    let n = negotiate(syn, s);
    let mss = server_mss(seg.family, s);
    *t = [0u8; SYNACK_TCP_MAX];
    t[0..2].copy_from_slice(&seg.dport.to_be_bytes());
    t[2..4].copy_from_slice(&seg.sport.to_be_bytes());
    t[4..8].copy_from_slice(&cookie.to_be_bytes());
    t[8..12].copy_from_slice(&seg.seq.wrapping_add(1).to_be_bytes());
    t[13] = TCP_SYN | TCP_ACK;
    t[14..16].copy_from_slice(&initial_window(mss, n.ts).to_be_bytes());
    // Each option takes the fewest whole words; the SYN's own options, padded to a word, are
    // at least as long (see the tests).
    let mut len = 20;
    if syn.mss != 0 {
        let m = mss.to_be_bytes();
        t[len..len + 4].copy_from_slice(&[TCPOPT_MSS, 4, m[0], m[1]]);
        len += 4;
    }
    if n.ts {
        let first = if n.sack {
            [TCPOPT_SACK_PERM, 2]
        } else {
            [TCPOPT_NOP, TCPOPT_NOP]
        };
        t[len..len + 2].copy_from_slice(&first);
        t[len + 2] = TCPOPT_TIMESTAMP;
        t[len + 3] = 10;
        t[len + 4..len + 8].copy_from_slice(&cookie_tsval(now_ns, &n).to_be_bytes());
        t[len + 8..len + 12].copy_from_slice(&syn.tsval.to_be_bytes());
        len += 12;
    }
    if n.wscale != NO_WSCALE {
        t[len..len + 4].copy_from_slice(&[TCPOPT_NOP, TCPOPT_WINDOW, 3, s.wscale]);
        len += 4;
    }
    t[12] = ((len / 4) as u8) << 4;
    len
}

#[cfg(test)]
mod tests {
    //! Replies are built the way ws-guard-ebpf writes them and decoded with `etherparse`.

    use super::*;
    use crate::{
        maps::AF_INET6,
        parse::{
            Parsed, TCP_SYN, parse,
            tests::{QINQ, Spec, VLAN, tcp},
        },
        reply,
    };
    use etherparse::{NetHeaders, PacketHeaders, TcpOptionElement, TransportHeader};
    use std::{format, vec, vec::Vec};

    const MSS: [u8; 4] = [2, 4, 0x05, 0xb4];
    const SACK: [u8; 2] = [4, 2];
    const WS7: [u8; 3] = [3, 3, 7];
    const NOP: u8 = 1;

    fn ts(val: u32) -> Vec<u8> {
        let mut v = vec![8, 10];
        v.extend(val.to_be_bytes());
        v.extend([0, 0, 0, 0]);
        v
    }

    /// A Linux client's SYN: MSS, SACK_PERM, TS, NOP, WS.
    fn linux_options() -> Vec<u8> {
        let mut o = MSS.to_vec();
        o.extend(SACK);
        o.extend(ts(0x0102_0304));
        o.push(NOP);
        o.extend(WS7);
        o
    }

    fn syn_with(base: Spec, options: Vec<u8>) -> Spec {
        let words = options.len().div_ceil(4) as u8;
        Spec {
            tcp_option_words: words,
            tcp_options: Some(options),
            ..base
        }
    }

    /// ws-guard-ebpf's reply: MACs swapped, tags kept, a fixed IP header and the SYN-ACK,
    /// checksums set, the frame cut to the headers.
    fn write_synack(frame: &[u8], s: &CookieSettings, cookie: u32, now: u64) -> Vec<u8> {
        let seg = tcp(frame);
        let mut syn = SynOptions::default();
        syn_options(frame, seg.l4, seg.header_len, &mut syn);
        let mut t = [0u8; SYNACK_TCP_MAX];
        let len = synack_tcp(&seg, &syn, s, cookie, now, &mut t);
        let mut out = frame.to_vec();
        let (dst, src) = out.split_at_mut(6);
        dst.swap_with_slice(&mut src[..6]);
        out.truncate(seg.l4 + len);
        if seg.family == AF_INET {
            let ip = reply::ipv4_header(&frame.load(seg.l3).unwrap(), len as u16);
            let c = reply::tcp_checksum_v4(&ip, &t, len as u16);
            t[16..18].copy_from_slice(&c.to_be_bytes());
            out[seg.l3..seg.l3 + 20].copy_from_slice(&ip);
        } else {
            let ip = reply::ipv6_header(&frame.load(seg.l3).unwrap(), len as u16);
            let c = reply::tcp_checksum_v6(&ip, &t, len as u16);
            t[16..18].copy_from_slice(&c.to_be_bytes());
            out[seg.l3..seg.l3 + 40].copy_from_slice(&ip);
        }
        out[seg.l4..seg.l4 + len].copy_from_slice(&t[..len]);
        out
    }

    /// Decodes the reply, checks what every SYN-ACK must be, returns its options.
    fn check(spec: &Spec, s: &CookieSettings) -> Vec<TcpOptionElement> {
        let syn = spec.build();
        let now = 123_456_789_000;
        let out = write_synack(&syn, s, 0xc00c_1e00, now);
        let what = format!("{spec:?}");
        assert!(out.len() <= syn.len(), "amplification: {what}");
        let h = PacketHeaders::from_ethernet_slice(&out)
            .unwrap_or_else(|e| panic!("reply does not decode: {e:?} ({what})"));
        assert_eq!(h.link_exts.len(), spec.tags.len());
        let Some(TransportHeader::Tcp(t)) = h.transport else {
            panic!("{what}")
        };
        assert!(t.syn && t.ack && !t.rst && !t.fin && !t.ece, "{t:?}");
        assert_eq!(
            (t.source_port, t.destination_port),
            (spec.dport, spec.sport)
        );
        assert_eq!(t.sequence_number, 0xc00c_1e00);
        assert_eq!(t.acknowledgment_number, spec.seq.wrapping_add(1));
        match h.net {
            Some(NetHeaders::Ipv4(ip, _)) => {
                assert_eq!(ip.header_checksum, ip.calc_header_checksum());
                assert_eq!(
                    t.checksum,
                    t.calc_checksum_ipv4(&ip, &[]).unwrap(),
                    "{what}"
                );
                assert_eq!(ip.destination, first4(spec.src));
            }
            Some(NetHeaders::Ipv6(ip, _)) => {
                assert_eq!(
                    t.checksum,
                    t.calc_checksum_ipv6(&ip, &[]).unwrap(),
                    "{what}"
                );
                assert_eq!(ip.destination, spec.src);
            }
            other => panic!("{other:?}"),
        }
        assert!(h.payload.slice().is_empty());
        // Our parser does not take it for a new attempt.
        assert!(!tcp(&out).is_new_attempt());
        t.options_iterator().map(|o| o.unwrap()).collect()
    }

    fn first4(a: [u8; 16]) -> [u8; 4] {
        [a[0], a[1], a[2], a[3]]
    }

    #[test]
    fn a_linux_syn_gets_every_option_back_and_the_options_in_the_tsval() {
        for base in [
            Spec::v4(),
            Spec::v6(),
            Spec {
                tags: vec![VLAN],
                ..Spec::v4()
            },
        ] {
            let spec = syn_with(base.clone(), linux_options());
            let s = CookieSettings::default();
            let opts = check(&spec, &s);
            let mss = if base.ipv6 { 1440 } else { 1460 };
            assert!(opts.contains(&TcpOptionElement::MaximumSegmentSize(mss)));
            assert!(opts.contains(&TcpOptionElement::SelectiveAcknowledgementPermitted));
            assert!(opts.contains(&TcpOptionElement::WindowScale(7)));
            let Some(TcpOptionElement::Timestamp(val, ecr)) = opts
                .iter()
                .find(|o| matches!(o, TcpOptionElement::Timestamp(..)))
                .cloned()
            else {
                panic!("{opts:?}")
            };
            assert_eq!(ecr, 0x0102_0304);
            // The kernel decodes the client's window scale (7) and SACK from the echo.
            assert_eq!(decode_tsval(val), (7, true));
            let f = write_synack(&spec.build(), &s, 1, 123_456_789_000);
            let window = u16::from_be_bytes([f[tcp(&f).l4 + 14], f[tcp(&f).l4 + 15]]);
            assert_eq!(window, if base.ipv6 { 64_260 } else { 65_160 });
        }
    }

    #[test]
    fn the_tsval_never_runs_ahead_of_the_clock() {
        let n = Negotiated {
            wscale: 9,
            sack: false,
            ts: true,
        };
        for ms in [0u64, 1, 63, 64, 65, 1000, 0xffff_ffff, 0x1_0000_0005] {
            let v = cookie_tsval(ms * 1_000_000 + 999_999, &n);
            let now = ms as u32;
            assert!(now.wrapping_sub(v) < 64, "{ms}: {v} vs {now}");
            assert_eq!(decode_tsval(v), (9, false));
        }
        let none = Negotiated {
            wscale: NO_WSCALE,
            sack: true,
            ts: true,
        };
        assert_eq!(
            decode_tsval(cookie_tsval(5_000_000_000, &none)),
            (NO_WSCALE, true)
        );
    }

    #[test]
    fn only_what_the_syn_offered_and_the_host_enables_is_offered() {
        let s = CookieSettings::default();
        // No options at all: a bare 20-byte SYN-ACK (the client assumes MSS 536).
        let opts = check(&Spec::v4(), &s);
        assert!(opts.is_empty(), "{opts:?}");
        // Without timestamps the cookie cannot carry window scale or SACK.
        let mut o = MSS.to_vec();
        o.extend(SACK);
        o.extend([NOP, 3, 3, 8]);
        let opts = check(&syn_with(Spec::v4(), o), &s);
        assert_eq!(opts, vec![TcpOptionElement::MaximumSegmentSize(1460)]);
        // Timestamps disabled on the host: the same.
        let off = CookieSettings {
            flags: COOKIE_SACK | COOKIE_WSCALE,
            ..s
        };
        let opts = check(&syn_with(Spec::v4(), linux_options()), &off);
        assert_eq!(opts, vec![TcpOptionElement::MaximumSegmentSize(1460)]);
        // SACK disabled: timestamps and window scale stay.
        let nosack = CookieSettings {
            flags: COOKIE_TIMESTAMPS | COOKIE_WSCALE,
            ..s
        };
        let opts = check(&syn_with(Spec::v4(), linux_options()), &nosack);
        assert!(!opts.contains(&TcpOptionElement::SelectiveAcknowledgementPermitted));
        assert!(opts.contains(&TcpOptionElement::WindowScale(7)));
    }

    #[test]
    fn the_reply_is_never_longer_than_the_syn() {
        // Every subset of the four options, in two orders, with and without padding.
        let s = CookieSettings::default();
        for mask in 0..16u8 {
            for reversed in [false, true] {
                let mut parts: Vec<Vec<u8>> = Vec::new();
                if mask & 1 != 0 {
                    parts.push(MSS.to_vec());
                }
                if mask & 2 != 0 {
                    parts.push(SACK.to_vec());
                }
                if mask & 4 != 0 {
                    parts.push(ts(77));
                }
                if mask & 8 != 0 {
                    parts.push(WS7.to_vec());
                }
                if reversed {
                    parts.reverse();
                }
                let o: Vec<u8> = parts.concat();
                for tags in [vec![], vec![QINQ, VLAN]] {
                    for base in [Spec::v4(), Spec::v6()] {
                        check(
                            &syn_with(
                                Spec {
                                    tags: tags.clone(),
                                    ..base
                                },
                                o.clone(),
                            ),
                            &s,
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn malformed_options_end_the_reading() {
        let seg_of = |o: Vec<u8>| {
            let f = syn_with(Spec::v4(), o).build();
            let seg = tcp(&f);
            // As the XDP program reads it: a copy of the TCP header.
            let copy = &f[seg.l4..seg.l4 + seg.header_len as usize];
            let (mut a, mut b) = (SynOptions::default(), SynOptions::default());
            syn_options(copy, 0, seg.header_len, &mut a);
            syn_options(&f[..], seg.l4, seg.header_len, &mut b);
            assert_eq!(a, b);
            a
        };
        // A zero length stops at once; what came before counts.
        let mut o = MSS.to_vec();
        o.extend([3, 0, 7, 4, 2]);
        let r = seg_of(o);
        assert!(r.mss == 1 && r.wscale == NO_WSCALE && r.sack == 0);
        // An option running past the header is not read.
        let r = seg_of(vec![NOP, NOP, NOP, 8, 10, 1]);
        assert_eq!(r.ts, 0);
        // EOL ends the list.
        let r = seg_of(vec![0, 4, 2, 0]);
        assert_eq!(r.sack, 0);
        // A window scale above 14 is clamped, as the kernel does.
        let r = seg_of(vec![3, 3, 20, 0]);
        assert_eq!(r.wscale, MAX_WSCALE);
        // Wrong lengths of known kinds are skipped.
        let r = seg_of(vec![2, 3, 0, 4, 2, 0, 0, 0]);
        assert!(r.mss == 0 && r.sack == 1);
    }

    #[test]
    fn every_reply_parses_as_tcp() {
        for base in [Spec::v4(), Spec::v6()] {
            let f = write_synack(
                &syn_with(base, linux_options()).build(),
                &CookieSettings::default(),
                9,
                1,
            );
            assert!(matches!(parse(&f[..]), Parsed::Tcp(t) if t.flags == TCP_SYN | TCP_ACK));
            let seg = tcp(&f);
            assert_eq!(seg.family == AF_INET6, base_is_v6(&f));
        }
    }

    fn base_is_v6(f: &[u8]) -> bool {
        u16::from_be_bytes([f[12], f[13]]) == 0x86dd
    }

    #[test]
    fn windows_are_whole_segments() {
        assert_eq!(initial_window(1460, false), 64_240);
        assert_eq!(initial_window(1460, true), 65_160);
        assert_eq!(initial_window(536, false), 65_392);
        assert_eq!(initial_window(0, false), u16::MAX);
    }
}
