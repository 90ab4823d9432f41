//! The TCP RST that answers a refused SYN, like iptables' `REJECT --reject-with tcp-reset`.
//!
//! RFC 9293 3.10.7.1: a segment without ACK is answered with `<SEQ=0><ACK=SEG.SEQ+SEG.LEN>
//! <CTL=RST,ACK>`. The reply reuses the frame: Ethernet addresses swapped, VLAN tags kept, a
//! fixed IP header with the addresses swapped, and a 20-byte TCP header. Frames whose IP header
//! has options or extension headers are not answered (the caller drops them instead).

use crate::{
    maps::AF_INET,
    parse::{TCP_ACK, TCP_RST, TcpSegment},
    reply,
};

pub use crate::reply::REPLY_TTL;
/// TCP header length of the reply.
pub const TCP_LEN: usize = 20;

/// Whether the frame's RST can be built in place.
#[inline(always)]
pub fn can_reject(seg: &TcpSegment) -> bool {
    if seg.family == AF_INET {
        seg.l4 - seg.l3 == 20
    } else {
        !seg.ipv6_ext
    }
}

/// Length of the reply frame.
#[inline(always)]
pub fn reply_len(seg: &TcpSegment) -> usize {
    seg.l4 + TCP_LEN
}

/// The reply's TCP header, checksum left zero. A segment without ACK (a SYN) gets
/// `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`; one with ACK (a SYN cookie's ACK refused) gets
/// `<SEQ=SEG.ACK><CTL=RST>`, which the client, established in its own view, accepts.
#[inline(always)]
fn tcp_header(seg: &TcpSegment) -> [u8; TCP_LEN] {
    let mut t = [0u8; TCP_LEN];
    t[0..2].copy_from_slice(&seg.dport.to_be_bytes());
    t[2..4].copy_from_slice(&seg.sport.to_be_bytes());
    t[12] = 5 << 4;
    if seg.flags & TCP_ACK != 0 {
        t[4..8].copy_from_slice(&seg.ack.to_be_bytes());
        t[13] = TCP_RST;
    } else {
        let ack = seg.seq.wrapping_add(seg.sequence_len());
        t[8..12].copy_from_slice(&ack.to_be_bytes());
        t[13] = TCP_RST | TCP_ACK;
    }
    t
}

/// The reply's IPv4 and TCP headers for a segment whose IPv4 header (without options) is `ip`.
#[inline(always)]
pub fn ipv4(ip: &[u8; 20], seg: &TcpSegment) -> ([u8; 20], [u8; TCP_LEN]) {
    let h = reply::ipv4_header(ip, TCP_LEN as u16);
    let mut t = tcp_header(seg);
    let c = reply::tcp_checksum_v4(&h, &t, TCP_LEN as u16);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    (h, t)
}

/// The reply's IPv6 and TCP headers for a segment whose fixed IPv6 header is `ip`.
#[inline(always)]
pub fn ipv6(ip: &[u8; 40], seg: &TcpSegment) -> ([u8; 40], [u8; TCP_LEN]) {
    let h = reply::ipv6_header(ip, TCP_LEN as u16);
    let mut t = tcp_header(seg);
    let c = reply::tcp_checksum_v6(&h, &t, TCP_LEN as u16);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    (h, t)
}

#[cfg(test)]
mod tests {
    //! Builds replies the way ws-guard-ebpf's `write_rst` does and decodes them with `etherparse`.

    use super::*;
    use crate::{
        maps::AF_INET6,
        parse::{
            IPPROTO_TCP, Packet, Parsed, TCP_FIN, TCP_SYN, parse,
            tests::{DST, Ext, HBH, QINQ, RT, Rng, Spec, VLAN, tcp},
        },
    };
    use etherparse::{LinkHeader, NetHeaders, PacketHeaders, TransportHeader};
    use std::{format, vec, vec::Vec};

    /// ws-guard-ebpf's `write_rst` on a copy of `frame`: swap the MAC addresses, keep the tags,
    /// cut the frame to `reply_len`, write the IP header at `l3` and TCP at `l4`.
    fn write_rst(frame: &[u8]) -> (TcpSegment, Vec<u8>) {
        let seg = tcp(frame);
        assert!(can_reject(&seg), "{seg:?}");
        let mut out = frame.to_vec();
        let (dst, src) = out.split_at_mut(6);
        dst.swap_with_slice(&mut src[..6]);
        assert!(reply_len(&seg) <= out.len());
        out.truncate(reply_len(&seg));
        let (l3, l4) = (seg.l3, seg.l4);
        if seg.family == AF_INET {
            let (ip, t) = ipv4(&frame.load(l3).unwrap(), &seg);
            out[l3..l3 + 20].copy_from_slice(&ip);
            out[l4..l4 + TCP_LEN].copy_from_slice(&t);
        } else {
            let (ip, t) = ipv6(&frame.load(l3).unwrap(), &seg);
            out[l3..l3 + 40].copy_from_slice(&ip);
            out[l4..l4 + TCP_LEN].copy_from_slice(&t);
        }
        (seg, out)
    }

    /// Builds the SYN of `spec`, answers it, and checks the answer with etherparse.
    fn check(spec: &Spec) {
        let syn = spec.build();
        let (seg, out) = write_rst(&syn);
        // SYN plus payload; FIN (not a new attempt) would add one more.
        assert_eq!(spec.flags & (TCP_SYN | TCP_FIN), TCP_SYN);
        let expected_ack = spec.seq.wrapping_add(1 + spec.payload as u32);
        let what = format!("{spec:?}");

        let orig = PacketHeaders::from_ethernet_slice(&syn).unwrap();
        let h = PacketHeaders::from_ethernet_slice(&out)
            .unwrap_or_else(|e| panic!("reply {out:02x?} does not decode: {e:?} ({what})"));

        let Some(LinkHeader::Ethernet2(eth)) = h.link else {
            panic!("{:?}", h.link)
        };
        let Some(LinkHeader::Ethernet2(orig_eth)) = orig.link else {
            panic!()
        };
        assert_eq!(
            (eth.source, eth.destination),
            (orig_eth.destination, orig_eth.source)
        );
        assert_eq!(eth.ether_type, orig_eth.ether_type);
        assert_eq!(h.link_exts, orig.link_exts, "{what}");
        assert_eq!(h.link_exts.len(), spec.tags.len());
        assert_eq!(out[12..seg.l3], syn[12..seg.l3]);

        let Some(TransportHeader::Tcp(t)) = h.transport else {
            panic!("{:?} ({what})", h.transport)
        };
        assert_eq!(
            (t.source_port, t.destination_port),
            (spec.dport, spec.sport)
        );
        assert!(t.rst && t.ack, "{t:?}");
        assert!(
            !(t.syn || t.fin || t.psh || t.urg || t.ece || t.cwr || t.ns),
            "{t:?}"
        );
        assert_eq!(t.sequence_number, 0);
        assert_eq!(t.acknowledgment_number, expected_ack, "{what}");
        assert_eq!(t.window_size, 0);
        assert_eq!(t.urgent_pointer, 0);
        assert_eq!(t.header_len(), 20);
        assert!(t.options.is_empty());
        assert!(h.payload.slice().is_empty());

        match h.net {
            Some(NetHeaders::Ipv4(ip, exts)) => {
                assert_eq!(seg.family, AF_INET);
                assert_eq!(out.len(), spec.l3() + 40);
                let Some(NetHeaders::Ipv4(orig_ip, _)) = orig.net else {
                    panic!()
                };
                assert_eq!(
                    (ip.source, ip.destination),
                    (orig_ip.destination, orig_ip.source)
                );
                assert_eq!(ip.time_to_live, 64);
                assert_eq!(ip.protocol.0, IPPROTO_TCP);
                assert_eq!(ip.total_len, 40);
                assert_eq!(ip.header_len(), 20);
                assert!(ip.options.is_empty() && exts.auth.is_none());
                assert!(!ip.is_fragmenting_payload());
                assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "{what}");
                assert_eq!(
                    t.checksum,
                    t.calc_checksum_ipv4(&ip, &[]).unwrap(),
                    "{what}"
                );
            }
            Some(NetHeaders::Ipv6(ip, exts)) => {
                assert_eq!(seg.family, AF_INET6);
                assert_eq!(out.len(), spec.l3() + 60);
                let Some(NetHeaders::Ipv6(orig_ip, _)) = orig.net else {
                    panic!()
                };
                assert_eq!(
                    (ip.source, ip.destination),
                    (orig_ip.destination, orig_ip.source)
                );
                assert_eq!(ip.hop_limit, 64);
                assert_eq!(ip.next_header.0, IPPROTO_TCP);
                assert_eq!(ip.payload_length, 20);
                assert!(exts.is_empty());
                assert_eq!(
                    t.checksum,
                    t.calc_checksum_ipv6(&ip, &[]).unwrap(),
                    "{what}"
                );
            }
            other => panic!("{other:?}"),
        }

        // Our own parser sees a RST, which is never judged as a new attempt.
        let r = tcp(&out);
        assert_eq!(r.flags, TCP_RST | TCP_ACK);
        assert!(!r.is_new_attempt());
        assert_eq!((r.sport, r.dport, r.seq), (spec.dport, spec.sport, 0));
        assert_eq!((r.segment_len, r.sequence_len()), (20, 0));
    }

    fn variants(base: Spec) -> Vec<Spec> {
        let mut v = Vec::new();
        for tags in [vec![], vec![VLAN], vec![QINQ, VLAN], vec![QINQ, VLAN, VLAN]] {
            for (tcp_option_words, payload) in [(0, 0), (0, 1), (5, 0), (10, 0), (5, 33), (3, 1400)]
            {
                v.push(Spec {
                    tags: tags.clone(),
                    tcp_option_words,
                    payload,
                    ..base.clone()
                });
            }
        }
        v
    }

    #[test]
    fn ipv4_reply() {
        for spec in variants(Spec::v4()) {
            check(&spec);
        }
    }

    #[test]
    fn ipv6_reply() {
        for spec in variants(Spec::v6()) {
            check(&spec);
        }
    }

    #[test]
    fn reply_to_a_padded_frame_is_cut_to_the_headers() {
        for base in [Spec::v4(), Spec::v6()] {
            let spec = Spec { padding: 6, ..base };
            check(&spec);
            let (_, out) = write_rst(&spec.build());
            assert_eq!(out.len(), if spec.ipv6 { 74 } else { 54 });
        }
    }

    #[test]
    fn reply_to_an_ecn_setup_syn() {
        for base in [Spec::v4(), Spec::v6()] {
            check(&Spec {
                flags: TCP_SYN | 0x40 | 0x80,
                ..base
            });
        }
    }

    #[test]
    fn an_ack_is_answered_with_its_acknowledgment_as_sequence_number() {
        // A SYN cookie's ACK refused: <SEQ=SEG.ACK><CTL=RST>, which the client accepts.
        for base in [Spec::v4(), Spec::v6()] {
            let spec = Spec {
                flags: TCP_ACK,
                payload: 7,
                ..base
            };
            let (seg, out) = write_rst(&spec.build());
            let h = PacketHeaders::from_ethernet_slice(&out).unwrap();
            let Some(TransportHeader::Tcp(t)) = h.transport else {
                panic!()
            };
            assert!(t.rst && !t.ack && !t.syn, "{t:?}");
            assert_eq!(t.sequence_number, seg.ack);
            assert_eq!(t.sequence_number, 0x0bad_cafe);
            assert_eq!(t.acknowledgment_number, 0);
            match h.net {
                Some(NetHeaders::Ipv4(ip, _)) => {
                    assert_eq!(t.checksum, t.calc_checksum_ipv4(&ip, &[]).unwrap())
                }
                Some(NetHeaders::Ipv6(ip, _)) => {
                    assert_eq!(t.checksum, t.calc_checksum_ipv6(&ip, &[]).unwrap())
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn ack_wraps_around() {
        for base in [Spec::v4(), Spec::v6()] {
            for (seq, payload, ack) in [
                (0xffff_ffff, 0, 0),
                (0xffff_fffe, 0, 0xffff_ffff),
                (0xffff_fff0, 20, 5),
                (0xffff_ffff, 1, 1),
            ] {
                let spec = Spec {
                    seq,
                    payload,
                    ..base.clone()
                };
                check(&spec);
                let (seg, out) = write_rst(&spec.build());
                let l4 = seg.l4;
                assert_eq!(out[l4 + 8..l4 + 12], u32::to_be_bytes(ack));
            }
        }
    }

    #[test]
    fn tcp_header_bytes() {
        let (seg, out) = write_rst(&Spec::v4().build());
        let t = &out[seg.l4..];
        // Ports swapped, SEQ 0, ACK 0x12345679, data offset 5, RST+ACK, window 0, urgent 0.
        assert_eq!(t[..4], [0x23, 0x28, 0x9c, 0xbb]);
        assert_eq!(t[4..12], [0, 0, 0, 0, 0x12, 0x34, 0x56, 0x79]);
        assert_eq!(t[12..16], [0x50, 0x14, 0, 0]);
        assert_eq!(t[18..20], [0, 0]);
    }

    #[test]
    fn checksums_over_many_addresses_ports_and_sequence_numbers() {
        // Random fields exercise the carries of the one's-complement sums.
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        for i in 0..2_000 {
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            for b in src.iter_mut().chain(dst.iter_mut()) {
                *b = match rng.below(3) {
                    0 => 0xff,
                    1 => 0,
                    _ => rng.next() as u8,
                };
            }
            // IPv4 takes the first four bytes of each address.
            let base = if i % 2 == 0 { Spec::v4() } else { Spec::v6() };
            check(&Spec {
                src,
                dst,
                sport: rng.next() as u16,
                dport: [0xffff, 1, rng.next() as u16][rng.below(3)],
                seq: rng.next() as u32,
                payload: rng.below(64),
                tcp_option_words: rng.below(11) as u8,
                ..base
            });
        }
    }

    /// Whether folding the reply's unfolded TCP checksum sum once still leaves a carry.
    fn first_fold_carries(seg: &TcpSegment, out: &[u8]) -> bool {
        let addrs = if seg.family == AF_INET {
            &out[seg.l3 + 12..seg.l3 + 20]
        } else {
            &out[seg.l3 + 8..seg.l3 + 40]
        };
        let mut t = out[seg.l4..seg.l4 + TCP_LEN].to_vec();
        t[16..18].fill(0);
        let words = addrs.chunks(2).chain(t.chunks(2));
        let sum: u64 = words
            .map(|w| u16::from_be_bytes([w[0], w[1]]) as u64)
            .sum::<u64>()
            + 26;
        (sum & 0xffff) + (sum >> 16) > 0xffff
    }

    #[test]
    fn checksum_whose_first_fold_carries() {
        // Large words; a source port found so that folding once is not enough.
        for base in [Spec::v4(), Spec::v6()] {
            let spec = |sport| Spec {
                src: [0xff; 16],
                dst: [0xfe; 16],
                dport: 0xffff,
                seq: 0xffff_fffe,
                sport,
                ..base.clone()
            };
            let sport = (0..=u16::MAX)
                .find(|&p| {
                    let (seg, out) = write_rst(&spec(p).build());
                    first_fold_carries(&seg, &out)
                })
                .expect("some port makes the first fold carry");
            check(&spec(sport));
        }
    }

    #[test]
    fn can_reject_only_without_ip_options_or_extension_headers() {
        for tags in [vec![], vec![QINQ, VLAN]] {
            let v4 = Spec {
                tags: tags.clone(),
                tcp_option_words: 5,
                ..Spec::v4()
            };
            assert!(can_reject(&tcp(&v4.build())));
            for ip_option_words in 1..=10 {
                let seg = tcp(&Spec {
                    ip_option_words,
                    ..v4.clone()
                }
                .build());
                assert!(!can_reject(&seg), "IHL {}", 5 + ip_option_words);
            }
            let v6 = Spec {
                tags: tags.clone(),
                tcp_option_words: 5,
                ..Spec::v6()
            };
            assert!(can_reject(&tcp(&v6.build())));
            for exts in [
                vec![Ext::Raw(HBH, 8)],
                vec![Ext::Raw(RT, 8)],
                vec![Ext::Raw(DST, 8)],
                vec![Ext::Auth(12)],
                vec![Ext::Raw(HBH, 8), Ext::Raw(DST, 16)],
            ] {
                let seg = tcp(&Spec {
                    exts: exts.clone(),
                    ..v6.clone()
                }
                .build());
                assert!(!can_reject(&seg), "{exts:?}");
            }
        }
    }

    #[test]
    fn reply_len_is_headers_only() {
        for (spec, len) in [
            (Spec::v4(), 54),
            (
                Spec {
                    tags: vec![QINQ, VLAN],
                    payload: 100,
                    tcp_option_words: 10,
                    ..Spec::v4()
                },
                62,
            ),
            (Spec::v6(), 74),
            (
                Spec {
                    tags: vec![VLAN],
                    payload: 100,
                    tcp_option_words: 10,
                    ..Spec::v6()
                },
                78,
            ),
        ] {
            assert_eq!(reply_len(&tcp(&spec.build())), len);
        }
    }

    #[test]
    fn reply_of_a_syn_fin_counts_the_fin() {
        // Not a new attempt, so never rejected by XDP; the builder still follows RFC 9293.
        let f = Spec {
            flags: TCP_SYN | TCP_FIN,
            payload: 3,
            ..Spec::v4()
        }
        .build();
        let seg = tcp(&f);
        assert!(!seg.is_new_attempt());
        let (_, t) = ipv4(&f.load(seg.l3).unwrap(), &seg);
        assert_eq!(t[8..12], (0x1234_5678u32 + 5).to_be_bytes());
        assert!(matches!(parse(&f[..]), Parsed::Tcp(_)));
    }
}
