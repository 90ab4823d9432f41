//! Header parsing shared by the XDP program and the host tests. It reads through [`Packet`], so
//! the kernel reads bounds-checked packet memory and the tests read byte slices, with the same
//! code deciding.

use crate::maps::{AF_INET, AF_INET6, FlowKey};

/// Read access to a frame.
pub trait Packet {
    /// A copy of the `T` at `offset`, or `None` if it runs past the end of the frame or starts
    /// past [`MAX_HEADER_OFFSET`] (the kernel's reader cannot go further, so no reader does).
    fn load<T: Copy>(&self, offset: usize) -> Option<T>;
}

impl Packet for [u8] {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        // As ws-guard-ebpf's `Frame`: the same bytes must parse the same on both sides (e.g. TCP
        // options ending past the bound make the segment malformed there, so here too).
        if offset > MAX_HEADER_OFFSET {
            return None;
        }
        let end = offset.checked_add(core::mem::size_of::<T>())?;
        if end > self.len() {
            return None;
        }
        // SAFETY: bounds checked above; T is plain data read unaligned.
        Some(unsafe { (self.as_ptr().add(offset) as *const T).read_unaligned() })
    }
}

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
/// VLAN tags followed (QinQ and one more).
pub const MAX_VLAN_TAGS: usize = 3;
/// IPv6 extension headers followed before giving up.
pub const MAX_IPV6_EXT: usize = 6;
/// Headers never extend past this offset; bounds variable offsets for the verifier.
pub const MAX_HEADER_OFFSET: usize = 512;

pub const IPPROTO_TCP: u8 = 6;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// The facts about a TCP segment that the decisions need. Offsets are from the frame start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpSegment {
    pub family: u16,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP header.
    pub l4: usize,
    /// Host byte order.
    pub sport: u16,
    /// Host byte order.
    pub dport: u16,
    pub flags: u8,
    pub seq: u32,
    /// Acknowledgment number (meaningful when [`TCP_ACK`] is set).
    pub ack: u32,
    /// TCP header plus payload, in bytes, as the IP header states.
    pub segment_len: u32,
    /// TCP header length in bytes.
    pub header_len: u32,
    /// IPv6 with extension headers between the fixed header and TCP.
    pub ipv6_ext: bool,
}

impl TcpSegment {
    /// A new connection attempt: SYN set, ACK, RST and FIN clear.
    #[inline(always)]
    pub fn is_new_attempt(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
    }

    /// Sequence space the segment occupies (payload plus SYN and FIN).
    #[inline(always)]
    pub fn sequence_len(&self) -> u32 {
        let payload = self.segment_len - self.header_len;
        payload + (self.flags & TCP_SYN != 0) as u32 + (self.flags & TCP_FIN != 0) as u32
    }
}

/// What a frame is, as far as ws-guard cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not IPv4 or IPv6.
    NotIp,
    /// IP, but not TCP (or TCP behind something we do not open, such as ESP).
    NotTcp,
    /// An IP fragment that is not the first of a TCP segment (a later fragment, or one of
    /// another protocol): it cannot be told apart from payload.
    Fragment,
    /// The first fragment of a fragmented TCP segment. Its ports are there (a fragment other
    /// than the last carries at least 8 bytes), its flags may not be; a real TCP stack never
    /// fragments its segments, so one to a protected port is refused whole (see
    /// `GlobalConfig::pass_fragments`): without it the kernel cannot reassemble the rest.
    TcpFirstFragment {
        family: u16,
        /// Destination port, host byte order.
        dport: u16,
    },
    /// A TCP segment whose headers are all present and consistent.
    Tcp(TcpSegment),
    /// Truncated or inconsistent headers.
    Malformed,
}

/// What [`quick`] can tell from fixed offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quick {
    /// Not IP, or IP that is not TCP: never ws-guard's business.
    NotTcp,
    /// TCP to `dport` (host byte order); its headers are not checked further.
    Tcp { dport: u16 },
    /// Anything else (VLAN tags, IPv4 options, fragments, IPv6 extension headers, short
    /// frames): [`parse`] decides.
    Unknown,
}

/// The shortcut for traffic that is not ws-guard's business: for the commonest layouts
/// (untagged Ethernet, then IPv4 without options and unfragmented, or IPv6 straight to TCP)
/// the destination port is at a fixed offset, so a frame to an unprotected port leaves after
/// one bounds check and one port lookup. A TCP segment to an unprotected port is then not
/// examined further (counted as not protected even where [`parse`] would call it malformed).
#[inline(always)]
pub fn quick<P: Packet + ?Sized>(p: &P) -> Quick {
    // Ethertype, a 20-byte IPv4 header and the TCP ports.
    let Some(h) = p.load::<[u8; 26]>(12) else {
        return Quick::Unknown;
    };
    match u16::from_be_bytes([h[0], h[1]]) {
        ETH_P_IP => {
            let total_len = u16::from_be_bytes([h[4], h[5]]);
            let frag = u16::from_be_bytes([h[8], h[9]]) & 0x3fff;
            if h[2] != 0x45 || frag != 0 || total_len < 20 {
                return Quick::Unknown;
            }
            if h[11] != IPPROTO_TCP {
                return Quick::NotTcp;
            }
            Quick::Tcp {
                dport: u16::from_be_bytes([h[24], h[25]]),
            }
        }
        ETH_P_IPV6 => {
            if h[2] >> 4 != 6 || h[8] != IPPROTO_TCP {
                return Quick::Unknown;
            }
            match p.load::<[u8; 2]>(ETH_HLEN + 40 + 2) {
                Some(d) => Quick::Tcp {
                    dport: u16::from_be_bytes(d),
                },
                None => Quick::Unknown,
            }
        }
        ETH_P_8021Q | ETH_P_8021AD => Quick::Unknown,
        _ => Quick::NotTcp,
    }
}

#[inline(always)]
fn be16<P: Packet + ?Sized>(p: &P, off: usize) -> Option<u16> {
    p.load::<[u8; 2]>(off).map(u16::from_be_bytes)
}

/// Parses Ethernet (with up to [`MAX_VLAN_TAGS`] 802.1Q/802.1ad tags), IPv4 (with options) or
/// IPv6 (with extension headers), then TCP.
#[inline(always)]
pub fn parse<P: Packet + ?Sized>(p: &P) -> Parsed {
    let Some(mut proto) = be16(p, 12) else {
        return Parsed::Malformed;
    };
    let mut l3 = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        let Some(inner) = be16(p, l3 + 2) else {
            return Parsed::Malformed;
        };
        proto = inner;
        l3 += 4;
    }
    match proto {
        ETH_P_IP => parse_ipv4(p, l3),
        ETH_P_IPV6 => parse_ipv6(p, l3),
        ETH_P_8021Q | ETH_P_8021AD => Parsed::Malformed,
        _ => Parsed::NotIp,
    }
}

#[inline(always)]
fn parse_ipv4<P: Packet + ?Sized>(p: &P, l3: usize) -> Parsed {
    let Some(h) = p.load::<[u8; 20]>(l3) else {
        return Parsed::Malformed;
    };
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return Parsed::Malformed;
    }
    let total_len = u16::from_be_bytes([h[2], h[3]]) as u32;
    if total_len < ihl as u32 {
        return Parsed::Malformed;
    }
    // More-fragments flag or a fragment offset.
    let frag = u16::from_be_bytes([h[6], h[7]]) & 0x3fff;
    if frag != 0 {
        if frag & 0x1fff != 0 || h[9] != IPPROTO_TCP {
            return Parsed::Fragment;
        }
        return first_fragment(p, AF_INET, l3 + ihl);
    }
    if h[9] != IPPROTO_TCP {
        return Parsed::NotTcp;
    }
    parse_tcp(p, AF_INET, l3, l3 + ihl, total_len - ihl as u32, false)
}

#[inline(always)]
fn parse_ipv6<P: Packet + ?Sized>(p: &P, l3: usize) -> Parsed {
    let Some(h) = p.load::<[u8; 8]>(l3) else {
        return Parsed::Malformed;
    };
    if h[0] >> 4 != 6 {
        return Parsed::Malformed;
    }
    if p.load::<[u8; 32]>(l3 + 8).is_none() {
        return Parsed::Malformed;
    }
    let payload_len = u16::from_be_bytes([h[4], h[5]]) as u32;
    let mut next = h[6];
    let mut off = l3 + 40;
    let mut ext_len = 0u32;
    let mut fragmented = false;
    for _ in 0..MAX_IPV6_EXT {
        let len = match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let Some(e) = p.load::<[u8; 2]>(off) else {
                    return Parsed::Malformed;
                };
                next = e[0];
                (e[1] as usize + 1) * 8
            }
            IPV6_AH => {
                let Some(e) = p.load::<[u8; 2]>(off) else {
                    return Parsed::Malformed;
                };
                next = e[0];
                (e[1] as usize + 2) * 4
            }
            IPV6_FRAGMENT => {
                let Some(e) = p.load::<[u8; 4]>(off) else {
                    return Parsed::Malformed;
                };
                let frag = u16::from_be_bytes([e[2], e[3]]);
                // A later fragment: payload. The first: judged by its TCP ports below. An
                // atomic fragment (offset 0, no more fragments) is a whole packet to the
                // kernel, and to the parser.
                if frag >> 3 != 0 {
                    return Parsed::Fragment;
                }
                fragmented |= frag & 1 != 0;
                next = e[0];
                8
            }
            _ => break,
        };
        off += len;
        ext_len += len as u32;
        if off > MAX_HEADER_OFFSET {
            return Parsed::Malformed;
        }
    }
    match next {
        IPPROTO_TCP if fragmented => return first_fragment(p, AF_INET6, off),
        IPPROTO_TCP => {}
        IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_AH | IPV6_FRAGMENT => {
            return Parsed::Malformed;
        }
        _ if fragmented => return Parsed::Fragment,
        _ => return Parsed::NotTcp,
    }
    if payload_len < ext_len {
        return Parsed::Malformed;
    }
    parse_tcp(p, AF_INET6, l3, off, payload_len - ext_len, ext_len != 0)
}

/// The first fragment of a TCP segment whose header starts at `l4`: its destination port.
#[inline(always)]
fn first_fragment<P: Packet + ?Sized>(p: &P, family: u16, l4: usize) -> Parsed {
    if l4 > MAX_HEADER_OFFSET {
        return Parsed::Malformed;
    }
    match p.load::<[u8; 4]>(l4) {
        Some(ports) => Parsed::TcpFirstFragment {
            family,
            dport: u16::from_be_bytes([ports[2], ports[3]]),
        },
        None => Parsed::Malformed,
    }
}

#[inline(always)]
fn parse_tcp<P: Packet + ?Sized>(
    p: &P,
    family: u16,
    l3: usize,
    l4: usize,
    segment_len: u32,
    ipv6_ext: bool,
) -> Parsed {
    if l4 > MAX_HEADER_OFFSET {
        return Parsed::Malformed;
    }
    let Some(t) = p.load::<[u8; 20]>(l4) else {
        return Parsed::Malformed;
    };
    let header_len = ((t[12] >> 4) as u32) * 4;
    if header_len < 20 || segment_len < header_len {
        return Parsed::Malformed;
    }
    // Options must be present too: a SYN's options are where stacks differ.
    if header_len > 20 && p.load::<u8>(l4 + header_len as usize - 1).is_none() {
        return Parsed::Malformed;
    }
    Parsed::Tcp(TcpSegment {
        family,
        l3,
        l4,
        sport: u16::from_be_bytes([t[0], t[1]]),
        dport: u16::from_be_bytes([t[2], t[3]]),
        flags: t[13],
        seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        ack: u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
        segment_len,
        header_len,
        ipv6_ext,
    })
}

/// Source and destination address of the IP header at `l3`; IPv4 in the first four bytes.
#[inline(always)]
pub fn addresses<P: Packet + ?Sized>(p: &P, seg: &TcpSegment) -> Option<([u8; 16], [u8; 16])> {
    if seg.family == AF_INET {
        let a = p.load::<[u8; 8]>(seg.l3 + 12)?;
        // Built as words (4-byte aligned): zeroing [u8; 16]s and copying four bytes in made LLVM
        // call a byte-wise memset twice per packet in the XDP program.
        let words = |b: [u8; 4]| [u32::from_ne_bytes(b), 0, 0, 0];
        // SAFETY: [u32; 4] and [u8; 16] have the same size; every bit pattern is valid.
        let bytes = |w: [u32; 4]| unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(w) };
        Some((
            bytes(words([a[0], a[1], a[2], a[3]])),
            bytes(words([a[4], a[5], a[6], a[7]])),
        ))
    } else {
        Some((
            p.load::<[u8; 16]>(seg.l3 + 8)?,
            p.load::<[u8; 16]>(seg.l3 + 24)?,
        ))
    }
}

/// The connection `seg` is part of, as the server sees it (the source is the client).
#[inline(always)]
pub fn flow<P: Packet + ?Sized>(p: &P, seg: &TcpSegment) -> Option<FlowKey> {
    let (client, server) = addresses(p, seg)?;
    Some(FlowKey {
        client,
        server,
        client_port: seg.sport,
        server_port: seg.dport,
        family: seg.family,
        _pad: 0,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    //! Frames are built with `etherparse` (an implementation independent of this parser) wherever
    //! it can express them; the other cases are bytes of such frames edited by hand. The builders
    //! are `pub(crate)` so the RST tests in `rst.rs` share them.

    use super::*;
    use etherparse::{
        EtherType, Ethernet2Header, IpAuthHeader, IpFragOffset, IpNumber, Ipv4Header, Ipv4Options,
        Ipv6FlowLabel, Ipv6FragmentHeader, Ipv6Header, Ipv6RawExtHeader, PacketHeaders,
        SingleVlanHeader, TcpHeader, TransportHeader, UdpHeader, VlanId, VlanPcp,
    };
    use std::{vec, vec::Vec};

    pub(crate) const SRC_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x10, 0x00, 0x01];
    pub(crate) const DST_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x10, 0x00, 0x02];
    pub(crate) const V4_SRC: [u8; 4] = [198, 18, 0, 1];
    pub(crate) const V4_DST: [u8; 4] = [198, 19, 255, 2];
    pub(crate) const V6_SRC: [u8; 16] =
        [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34];
    pub(crate) const V6_DST: [u8; 16] = [0x20, 0x01, 0, 2, 0, 0, 0, 0xaa, 0, 0, 0, 0, 0, 0, 0, 2];
    /// 0x9cbb and 0x2328: byte-order mistakes show.
    pub(crate) const SPORT: u16 = 40_123;
    pub(crate) const DPORT: u16 = 9000;
    pub(crate) const VLAN: u16 = ETH_P_8021Q;
    pub(crate) const QINQ: u16 = ETH_P_8021AD;
    const URG: u8 = 0x20;
    const ECE: u8 = 0x40;
    const CWR: u8 = 0x80;
    const UDP: u8 = 17;
    const ICMP: u8 = 1;
    const ICMPV6: u8 = 58;
    const ESP: u8 = 50;
    const NO_NEXT: u8 = 59;

    /// An IPv6 extension header.
    #[derive(Clone, Copy, Debug)]
    pub(crate) enum Ext {
        /// Hop-by-hop options, routing or destination options: type, total length in bytes
        /// (a multiple of 8, at least 8).
        Raw(u8, usize),
        /// Authentication header, total length in bytes (a multiple of 4, at least 12).
        Auth(usize),
        /// Fragment header (8 bytes).
        Fragment { offset: u16, more: bool },
    }

    pub(crate) const HBH: u8 = IPV6_HOPOPTS;
    pub(crate) const RT: u8 = IPV6_ROUTING;
    pub(crate) const DST: u8 = IPV6_DSTOPTS;

    impl Ext {
        fn kind(self) -> u8 {
            match self {
                Ext::Raw(t, _) => t,
                Ext::Auth(_) => IPV6_AH,
                Ext::Fragment { .. } => IPV6_FRAGMENT,
            }
        }

        pub(crate) fn len(self) -> usize {
            match self {
                Ext::Raw(_, n) | Ext::Auth(n) => n,
                Ext::Fragment { .. } => 8,
            }
        }

        fn bytes(self, next: u8) -> Vec<u8> {
            let next = IpNumber(next);
            match self {
                Ext::Raw(_, n) => Ipv6RawExtHeader::new_raw(next, &vec![0; n - 2])
                    .unwrap()
                    .to_bytes()
                    .to_vec(),
                Ext::Auth(n) => IpAuthHeader::new(next, 0x100, 7, &vec![0xa5; n - 12])
                    .unwrap()
                    .to_bytes()
                    .to_vec(),
                Ext::Fragment { offset, more } => Ipv6FragmentHeader::new(
                    next,
                    IpFragOffset::try_new(offset).unwrap(),
                    more,
                    0xdead_beef,
                )
                .to_bytes()
                .to_vec(),
            }
        }
    }

    /// A frame to build: Ethernet, VLAN tags, IPv4 or IPv6 (with extension headers), then TCP,
    /// UDP, or 8 opaque bytes for any other protocol. Change fields with `Spec { .., ..Spec::v4() }`.
    #[derive(Clone, Debug)]
    pub(crate) struct Spec {
        /// Tag protocol identifiers, outermost first.
        pub tags: Vec<u16>,
        pub ipv6: bool,
        /// IPv4 option words (IHL - 5).
        pub ip_option_words: u8,
        /// IPv4 more-fragments flag.
        pub more_fragments: bool,
        /// IPv4 fragment offset, in 8-byte units.
        pub frag_offset: u16,
        /// IPv6 extension headers, in order.
        pub exts: Vec<Ext>,
        /// IPv4 protocol, or the last IPv6 next-header value.
        pub proto: u8,
        pub flags: u8,
        pub seq: u32,
        /// TCP option words (data offset - 5).
        pub tcp_option_words: u8,
        /// Raw TCP options (zero-padded to `tcp_option_words`) instead of MSS and no-ops.
        pub tcp_options: Option<Vec<u8>>,
        pub payload: usize,
        /// Zero bytes after the IP packet, as Ethernet padding.
        pub padding: usize,
        pub sport: u16,
        pub dport: u16,
        /// IPv4 uses the first four bytes.
        pub src: [u8; 16],
        pub dst: [u8; 16],
    }

    fn v4_in_16(a: [u8; 4]) -> [u8; 16] {
        let mut o = [0; 16];
        o[..4].copy_from_slice(&a);
        o
    }

    fn first4(a: [u8; 16]) -> [u8; 4] {
        [a[0], a[1], a[2], a[3]]
    }

    impl Spec {
        /// A plain IPv4 TCP SYN from SPORT to DPORT.
        pub(crate) fn v4() -> Spec {
            Spec {
                tags: Vec::new(),
                ipv6: false,
                ip_option_words: 0,
                more_fragments: false,
                frag_offset: 0,
                exts: Vec::new(),
                proto: IPPROTO_TCP,
                flags: TCP_SYN,
                seq: 0x1234_5678,
                tcp_option_words: 0,
                tcp_options: None,
                payload: 0,
                padding: 0,
                sport: SPORT,
                dport: DPORT,
                src: v4_in_16(V4_SRC),
                dst: v4_in_16(V4_DST),
            }
        }

        /// A plain IPv6 TCP SYN from SPORT to DPORT.
        pub(crate) fn v6() -> Spec {
            Spec {
                ipv6: true,
                src: V6_SRC,
                dst: V6_DST,
                ..Spec::v4()
            }
        }

        /// Offset of the IP header.
        pub(crate) fn l3(&self) -> usize {
            ETH_HLEN + 4 * self.tags.len()
        }

        /// Offset of the TCP header.
        pub(crate) fn l4(&self) -> usize {
            if self.ipv6 {
                self.l3() + 40 + self.exts.iter().map(|e| e.len()).sum::<usize>()
            } else {
                self.l3() + 20 + 4 * self.ip_option_words as usize
            }
        }

        pub(crate) fn tcp_len(&self) -> usize {
            20 + 4 * self.tcp_option_words as usize
        }

        fn tcp_header(&self) -> TcpHeader {
            let mut t = TcpHeader::new(self.sport, self.dport, self.seq, 64_240);
            let f = self.flags;
            t.fin = f & TCP_FIN != 0;
            t.syn = f & TCP_SYN != 0;
            t.rst = f & TCP_RST != 0;
            t.psh = f & TCP_PSH != 0;
            t.ack = f & TCP_ACK != 0;
            t.urg = f & URG != 0;
            t.ece = f & ECE != 0;
            t.cwr = f & CWR != 0;
            if t.ack {
                t.acknowledgment_number = 0x0bad_cafe;
            }
            // MSS, then no-ops; or the options given.
            let mut opts = vec![1u8; 4 * self.tcp_option_words as usize];
            if !opts.is_empty() {
                opts[..4].copy_from_slice(&[2, 4, 0x05, 0xb4]);
            }
            if let Some(given) = &self.tcp_options {
                opts = given.clone();
                opts.resize(4 * self.tcp_option_words as usize, 0);
            }
            t.set_options_raw(&opts).unwrap();
            assert_eq!(t.header_len(), self.tcp_len());
            t
        }

        pub(crate) fn payload_bytes(&self) -> Vec<u8> {
            (0..self.payload).map(|i| (i * 7 + 3) as u8).collect()
        }

        pub(crate) fn build(&self) -> Vec<u8> {
            let mut types = self.tags.clone();
            types.push(if self.ipv6 { ETH_P_IPV6 } else { ETH_P_IP });
            let mut f = Ethernet2Header {
                source: SRC_MAC,
                destination: DST_MAC,
                ether_type: EtherType(types[0]),
            }
            .to_bytes()
            .to_vec();
            for (i, w) in types.windows(2).enumerate() {
                let tag = SingleVlanHeader {
                    pcp: VlanPcp::ZERO,
                    drop_eligible_indicator: false,
                    vlan_id: VlanId::try_new(100 + i as u16).unwrap(),
                    ether_type: EtherType(w[1]),
                };
                f.extend_from_slice(&tag.to_bytes());
            }
            let payload = self.payload_bytes();
            let mut tcp = (self.proto == IPPROTO_TCP).then(|| self.tcp_header());
            let upper_len = tcp.as_ref().map_or(8, |t| t.header_len()) + payload.len();
            let upper_bytes = |tcp: &Option<TcpHeader>| match tcp {
                Some(t) => t.to_bytes().to_vec(),
                None if self.proto == UDP => UdpHeader {
                    source_port: self.sport,
                    destination_port: self.dport,
                    length: upper_len as u16,
                    checksum: 0,
                }
                .to_bytes()
                .to_vec(),
                None => vec![8, 0, 0, 0, 0, 1, 0, 1],
            };
            if self.ipv6 {
                let kinds: Vec<u8> = self.exts.iter().map(|e| e.kind()).collect();
                let mut exts = Vec::new();
                for (i, e) in self.exts.iter().enumerate() {
                    exts.extend(e.bytes(kinds.get(i + 1).copied().unwrap_or(self.proto)));
                }
                let ip = Ipv6Header {
                    traffic_class: 0,
                    flow_label: Ipv6FlowLabel::try_new(0x12345).unwrap(),
                    payload_length: (exts.len() + upper_len) as u16,
                    next_header: IpNumber(kinds.first().copied().unwrap_or(self.proto)),
                    hop_limit: 57,
                    source: self.src,
                    destination: self.dst,
                };
                if let Some(t) = tcp.as_mut() {
                    t.checksum = t.calc_checksum_ipv6(&ip, &payload).unwrap();
                }
                f.extend_from_slice(&ip.to_bytes());
                f.extend(exts);
            } else {
                let mut ip = Ipv4Header::new(
                    0,
                    57,
                    IpNumber(self.proto),
                    first4(self.src),
                    first4(self.dst),
                )
                .unwrap();
                // Router alert, then no-ops.
                let mut opts = vec![1u8; 4 * self.ip_option_words as usize];
                if !opts.is_empty() {
                    opts[..4].copy_from_slice(&[0x94, 4, 0, 0]);
                }
                ip.options = Ipv4Options::try_from(&opts[..]).unwrap();
                ip.set_payload_len(upper_len).unwrap();
                ip.identification = 0x4242;
                ip.more_fragments = self.more_fragments;
                ip.fragment_offset = IpFragOffset::try_new(self.frag_offset).unwrap();
                ip.dont_fragment = !self.more_fragments && self.frag_offset == 0;
                ip.header_checksum = ip.calc_header_checksum();
                if let Some(t) = tcp.as_mut() {
                    t.checksum = t.calc_checksum_ipv4(&ip, &payload).unwrap();
                }
                f.extend_from_slice(&ip.to_bytes());
            }
            f.extend(upper_bytes(&tcp));
            f.extend(payload);
            f.extend(vec![0; self.padding]);
            f
        }
    }

    /// The frame with the big-endian `value` written at `off`.
    pub(crate) fn with_be16(mut f: Vec<u8>, off: usize, value: u16) -> Vec<u8> {
        f[off..off + 2].copy_from_slice(&value.to_be_bytes());
        f
    }

    pub(crate) fn tcp(frame: &[u8]) -> TcpSegment {
        match parse(frame) {
            Parsed::Tcp(s) => s,
            other => panic!("expected Tcp, got {other:?} for {frame:02x?}"),
        }
    }

    /// The segment etherparse decodes from the frame: the builder's output is real TCP.
    fn etherparse_tcp(frame: &[u8]) -> TcpHeader {
        let h = PacketHeaders::from_ethernet_slice(frame).unwrap();
        match h.transport {
            Some(TransportHeader::Tcp(t)) => t,
            other => panic!("etherparse found {other:?}"),
        }
    }

    /// Parses every prefix of `frame`, from empty to whole, expecting `expect(prefix_len)`.
    fn sweep(frame: &[u8], expect: impl Fn(usize) -> Parsed) {
        for n in 0..=frame.len() {
            assert_eq!(
                parse(&frame[..n]),
                expect(n),
                "{n}-byte prefix of {frame:02x?}"
            );
        }
    }

    #[test]
    fn builder_makes_frames_etherparse_accepts() {
        let specs = [
            Spec::v4(),
            Spec {
                tags: vec![QINQ, VLAN, VLAN],
                ip_option_words: 10,
                tcp_option_words: 10,
                payload: 9,
                ..Spec::v4()
            },
            Spec::v6(),
            Spec {
                tags: vec![VLAN],
                exts: vec![
                    Ext::Raw(HBH, 16),
                    Ext::Raw(RT, 8),
                    Ext::Auth(24),
                    Ext::Raw(DST, 8),
                ],
                tcp_option_words: 3,
                payload: 5,
                ..Spec::v6()
            },
        ];
        for s in specs {
            let f = s.build();
            let t = etherparse_tcp(&f);
            assert_eq!((t.source_port, t.destination_port), (SPORT, DPORT));
            assert_eq!(t.header_len(), s.tcp_len());
            let h = PacketHeaders::from_ethernet_slice(&f).unwrap();
            assert_eq!(h.link_exts.len(), s.tags.len());
            assert_eq!(h.payload.slice(), &s.payload_bytes()[..]);
            assert_eq!(f.len(), s.l4() + s.tcp_len() + s.payload);
        }
    }

    #[test]
    fn ipv4_syn() {
        let f = Spec::v4().build();
        assert_eq!(f.len(), 54);
        let s = tcp(&f);
        assert_eq!(
            s,
            TcpSegment {
                family: AF_INET,
                l3: 14,
                l4: 34,
                sport: 40_123,
                dport: 9000,
                flags: TCP_SYN,
                seq: 0x1234_5678,
                ack: 0,
                segment_len: 20,
                header_len: 20,
                ipv6_ext: false,
            }
        );
        assert!(s.is_new_attempt());
        assert_eq!(s.sequence_len(), 1);
    }

    /// The shortcut never contradicts the full parser: where it names a port, that is the
    /// port of a TCP segment (or of a TCP header too short to parse); where it says "not TCP",
    /// the parser finds no TCP segment either.
    #[test]
    fn quick_agrees_with_parse() {
        let mut specs = vec![
            Spec::v4(),
            Spec::v6(),
            Spec {
                proto: UDP,
                ..Spec::v4()
            },
            Spec {
                proto: ICMP,
                ..Spec::v4()
            },
            Spec {
                proto: ICMPV6,
                ..Spec::v6()
            },
            Spec {
                ip_option_words: 2,
                ..Spec::v4()
            },
            Spec {
                more_fragments: true,
                ..Spec::v4()
            },
            Spec {
                frag_offset: 3,
                ..Spec::v4()
            },
            Spec {
                tags: vec![VLAN],
                ..Spec::v4()
            },
            Spec {
                exts: six_exts(),
                ..Spec::v6()
            },
            Spec {
                tcp_option_words: 3,
                ..Spec::v6()
            },
        ];
        specs.push(Spec {
            dport: 443,
            ..Spec::v4()
        });
        let mut frames: Vec<Vec<u8>> = specs.iter().map(|s| s.build()).collect();
        // Cut every frame at every length, and an ARP-like frame.
        for f in frames.clone() {
            for n in 0..f.len() {
                frames.push(f[..n].to_vec());
            }
        }
        let mut arp = Spec::v4().build();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        frames.push(arp);
        let mut named = 0;
        for f in &frames {
            match (quick(&f[..]), parse(&f[..])) {
                (Quick::Unknown, _) => {}
                (Quick::NotTcp, Parsed::NotIp | Parsed::NotTcp) => {}
                (Quick::Tcp { dport }, Parsed::Tcp(seg)) => {
                    assert_eq!(dport, seg.dport);
                    named += 1;
                }
                (Quick::Tcp { .. }, Parsed::Malformed) => {}
                (q, p) => panic!("quick {q:?} but parse {p:?} for {f:?}"),
            }
        }
        assert_eq!(named, 4);
        assert_eq!(quick(&Spec::v4().build()[..]), Quick::Tcp { dport: DPORT });
        assert_eq!(quick(&Spec::v6().build()[..]), Quick::Tcp { dport: DPORT });
    }

    #[test]
    fn only_a_bare_syn_is_a_new_attempt() {
        let cases = [
            (TCP_SYN, true),
            (TCP_SYN | ECE | CWR, true),
            (TCP_SYN | TCP_PSH, true),
            (TCP_SYN | URG, true),
            (TCP_SYN | TCP_ACK, false),
            (TCP_ACK, false),
            (TCP_RST, false),
            (TCP_RST | TCP_ACK, false),
            (TCP_FIN, false),
            (TCP_FIN | TCP_ACK, false),
            (TCP_SYN | TCP_RST, false),
            (TCP_SYN | TCP_FIN, false),
            (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN, false),
            (TCP_PSH | TCP_ACK, false),
            (0, false),
        ];
        for (flags, new) in cases {
            for base in [Spec::v4(), Spec::v6()] {
                let s = tcp(&Spec { flags, ..base }.build());
                assert_eq!(s.flags, flags);
                assert_eq!(s.is_new_attempt(), new, "flags {flags:#04x}");
            }
        }
    }

    #[test]
    fn ipv4_options_every_ihl() {
        for words in 1..=10u8 {
            let f = Spec {
                ip_option_words: words,
                ..Spec::v4()
            }
            .build();
            assert_eq!(f[14] & 0x0f, 5 + words);
            let s = tcp(&f);
            assert_eq!(s.l3, 14);
            assert_eq!(s.l4, 14 + 4 * (5 + words as usize));
            assert_eq!((s.sport, s.dport, s.seq), (SPORT, DPORT, 0x1234_5678));
            assert_eq!((s.segment_len, s.header_len), (20, 20));
            assert!(s.is_new_attempt());
        }
    }

    #[test]
    fn tcp_options_every_data_offset() {
        for base in [Spec::v4(), Spec::v6()] {
            for words in 1..=10u8 {
                let f = Spec {
                    tcp_option_words: words,
                    ..base.clone()
                }
                .build();
                let s = tcp(&f);
                let len = 4 * (5 + words as u32);
                assert_eq!(s.header_len, len);
                assert_eq!(s.segment_len, len);
                assert_eq!(s.sequence_len(), 1);
                assert_eq!(f.len(), s.l4 + len as usize);
            }
        }
    }

    #[test]
    fn payload_counts_in_sequence_space() {
        for base in [Spec::v4(), Spec::v6()] {
            let spec = |flags, payload| Spec {
                flags,
                payload,
                tcp_option_words: 5,
                ..base.clone()
            };
            let s = tcp(&spec(TCP_SYN, 100).build());
            assert_eq!((s.segment_len, s.header_len), (140, 40));
            assert_eq!(s.sequence_len(), 101);
            assert!(s.is_new_attempt());
            assert_eq!(
                tcp(&spec(TCP_SYN | TCP_FIN, 100).build()).sequence_len(),
                102
            );
            assert_eq!(tcp(&spec(TCP_FIN | TCP_ACK, 0).build()).sequence_len(), 1);
            assert_eq!(tcp(&spec(TCP_ACK | TCP_PSH, 7).build()).sequence_len(), 7);
            assert_eq!(tcp(&spec(TCP_ACK, 0).build()).sequence_len(), 0);
        }
    }

    #[test]
    fn lengths_come_from_the_ip_header_not_the_frame() {
        // A 54-byte SYN padded to the 60-byte Ethernet minimum.
        let f = Spec {
            padding: 6,
            ..Spec::v4()
        }
        .build();
        assert_eq!(f.len(), 60);
        assert_eq!(tcp(&f).segment_len, 20);
        assert_eq!(tcp(&f).sequence_len(), 1);
        let f = Spec {
            padding: 3,
            ..Spec::v6()
        }
        .build();
        assert_eq!(tcp(&f).segment_len, 20);
    }

    #[test]
    fn vlan_tags() {
        let cases: [(&[u16], usize); 6] = [
            (&[VLAN], 18),
            (&[QINQ], 18),
            (&[QINQ, VLAN], 22),
            (&[VLAN, VLAN], 22),
            (&[QINQ, VLAN, VLAN], 26),
            (&[QINQ, QINQ, QINQ], 26),
        ];
        for (tags, l3) in cases {
            for base in [Spec::v4(), Spec::v6()] {
                let spec = Spec {
                    tags: tags.to_vec(),
                    ..base
                };
                let f = spec.build();
                let s = tcp(&f);
                assert_eq!(s.l3, l3, "{tags:04x?}");
                assert_eq!(s.l4, l3 + if spec.ipv6 { 40 } else { 20 });
                assert_eq!(s.family, if spec.ipv6 { AF_INET6 } else { AF_INET });
                assert_eq!((s.sport, s.dport, s.segment_len), (SPORT, DPORT, 20));
                assert!(s.is_new_attempt());
                etherparse_tcp(&f);
            }
        }
    }

    #[test]
    fn more_than_three_vlan_tags_is_malformed() {
        assert_eq!(MAX_VLAN_TAGS, 3);
        for tags in [[VLAN; 4], [QINQ, VLAN, VLAN, VLAN], [QINQ; 4]] {
            for base in [Spec::v4(), Spec::v6()] {
                let f = Spec {
                    tags: tags.to_vec(),
                    ..base
                }
                .build();
                assert_eq!(parse(&f[..]), Parsed::Malformed, "{tags:04x?}");
            }
        }
        let mut five = Spec {
            tags: vec![VLAN; 5],
            ..Spec::v4()
        };
        assert_eq!(parse(&five.build()[..]), Parsed::Malformed);
        five.ipv6 = true;
        assert_eq!(parse(&five.build()[..]), Parsed::Malformed);
    }

    #[test]
    fn ipv6_syn() {
        let f = Spec::v6().build();
        assert_eq!(f.len(), 74);
        let s = tcp(&f);
        assert_eq!(
            s,
            TcpSegment {
                family: AF_INET6,
                l3: 14,
                l4: 54,
                sport: SPORT,
                dport: DPORT,
                flags: TCP_SYN,
                seq: 0x1234_5678,
                ack: 0,
                segment_len: 20,
                header_len: 20,
                ipv6_ext: false,
            }
        );
        assert!(s.is_new_attempt());
    }

    #[test]
    fn ipv6_each_extension_header() {
        let exts = [
            Ext::Raw(HBH, 8),
            Ext::Raw(HBH, 16),
            Ext::Raw(RT, 8),
            Ext::Raw(RT, 24),
            Ext::Raw(DST, 8),
            Ext::Raw(DST, 40),
            // AH counts 4-byte units minus 2: a 12-byte AH has length field 1.
            Ext::Auth(12),
            Ext::Auth(24),
        ];
        for ext in exts {
            let f = Spec {
                exts: vec![ext],
                tcp_option_words: 3,
                payload: 7,
                ..Spec::v6()
            }
            .build();
            let payload_len = u16::from_be_bytes([f[18], f[19]]) as usize;
            assert_eq!(payload_len, ext.len() + 32 + 7);
            let s = tcp(&f);
            assert!(s.ipv6_ext, "{ext:?}");
            assert_eq!(s.l4, 54 + ext.len(), "{ext:?}");
            assert_eq!(s.header_len, 32);
            assert_eq!(s.segment_len as usize, payload_len - ext.len());
            assert_eq!(s.sequence_len(), 8);
            assert_eq!((s.sport, s.dport, s.seq), (SPORT, DPORT, 0x1234_5678));
            assert!(s.is_new_attempt());
            etherparse_tcp(&f);
        }
    }

    fn six_exts() -> Vec<Ext> {
        vec![
            Ext::Raw(HBH, 8),
            Ext::Raw(DST, 16),
            Ext::Raw(RT, 8),
            Ext::Auth(16),
            Ext::Raw(DST, 8),
            Ext::Raw(DST, 24),
        ]
    }

    #[test]
    fn ipv6_extension_chains_up_to_the_limit() {
        assert_eq!(MAX_IPV6_EXT, 6);
        let all = six_exts();
        for n in 1..=MAX_IPV6_EXT {
            let exts = all[..n].to_vec();
            let ext_len: usize = exts.iter().map(|e| e.len()).sum();
            let s = tcp(&Spec {
                exts,
                payload: 3,
                ..Spec::v6()
            }
            .build());
            assert!(s.ipv6_ext);
            assert_eq!(s.l4, 54 + ext_len);
            assert_eq!(s.segment_len, 23);
        }
    }

    #[test]
    fn ipv6_more_extension_headers_than_the_limit_is_malformed() {
        for last in [
            Ext::Raw(HBH, 8),
            Ext::Raw(RT, 8),
            Ext::Raw(DST, 8),
            Ext::Auth(12),
        ] {
            let mut exts = six_exts();
            exts.push(last);
            let f = Spec { exts, ..Spec::v6() }.build();
            assert_eq!(parse(&f[..]), Parsed::Malformed, "{last:?}");
        }
        // A seventh header that is a fragment header is over the limit all the same.
        let mut exts = six_exts();
        exts.push(Ext::Fragment {
            offset: 0,
            more: true,
        });
        let f = Spec { exts, ..Spec::v6() }.build();
        assert_eq!(parse(&f[..]), Parsed::Malformed);
    }

    #[test]
    fn ipv6_headers_never_reach_past_the_offset_bound() {
        // 14 + 40 + 456 = 510: TCP starts inside the bound.
        let f = Spec {
            exts: vec![Ext::Raw(DST, 456)],
            ..Spec::v6()
        }
        .build();
        assert_eq!(tcp(&f).l4, 510);
        // 14 + 40 + 464 = 518: past it, although the whole frame is there.
        for exts in [
            vec![Ext::Raw(DST, 464)],
            vec![Ext::Raw(HBH, 8), Ext::Raw(DST, 2048)],
        ] {
            // Also when the protocol after them is not TCP.
            for proto in [IPPROTO_TCP, UDP] {
                let f = Spec {
                    exts: exts.clone(),
                    proto,
                    ..Spec::v6()
                }
                .build();
                assert_eq!(parse(&f[..]), Parsed::Malformed, "{exts:?} then {proto}");
            }
        }
    }

    #[test]
    fn ipv6_fragment_header() {
        let frag = |offset, more| Ext::Fragment { offset, more };
        let chains = [
            vec![frag(0, true)],
            vec![frag(0, false)],
            vec![frag(185, false)],
            vec![frag(1, true)],
            vec![Ext::Raw(HBH, 8), frag(0, true)],
            vec![
                Ext::Raw(HBH, 8),
                Ext::Raw(DST, 8),
                Ext::Raw(RT, 16),
                frag(0, true),
            ],
            vec![Ext::Auth(12), frag(0, true), Ext::Raw(DST, 8)],
            {
                let mut v = six_exts();
                v[5] = frag(0, true);
                v
            },
        ];
        for exts in chains {
            let first = exts.iter().any(|e| {
                matches!(
                    e,
                    Ext::Fragment {
                        offset: 0,
                        more: true
                    }
                )
            });
            let atomic = exts.iter().any(|e| {
                matches!(
                    e,
                    Ext::Fragment {
                        offset: 0,
                        more: false
                    }
                )
            });
            for proto in [IPPROTO_TCP, UDP] {
                let f = Spec {
                    exts: exts.clone(),
                    proto,
                    ..Spec::v6()
                }
                .build();
                let got = parse(&f[..]);
                match (first, atomic, proto) {
                    // The first fragment of a TCP segment: its destination port.
                    (true, _, IPPROTO_TCP) => assert_eq!(
                        got,
                        Parsed::TcpFirstFragment {
                            family: AF_INET6,
                            dport: Spec::v6().dport
                        },
                        "{exts:?}"
                    ),
                    // An atomic fragment is a whole packet.
                    (_, true, IPPROTO_TCP) => assert!(matches!(got, Parsed::Tcp(_)), "{exts:?}"),
                    (_, true, _) => assert_eq!(got, Parsed::NotTcp, "{exts:?}"),
                    _ => assert_eq!(got, Parsed::Fragment, "{exts:?} then {proto}"),
                }
            }
        }
    }

    #[test]
    fn ipv6_not_tcp() {
        for proto in [ESP, NO_NEXT, UDP, ICMPV6, 4, 41] {
            for exts in [vec![], vec![Ext::Raw(HBH, 8)], six_exts()] {
                let f = Spec {
                    proto,
                    exts: exts.clone(),
                    ..Spec::v6()
                }
                .build();
                assert_eq!(
                    parse(&f[..]),
                    Parsed::NotTcp,
                    "proto {proto} after {exts:?}"
                );
            }
        }
    }

    #[test]
    fn ipv4_fragments() {
        for (more_fragments, frag_offset) in [(true, 0), (false, 1), (true, 1), (false, 0x1fff)] {
            for proto in [IPPROTO_TCP, UDP] {
                let f = Spec {
                    more_fragments,
                    frag_offset,
                    proto,
                    ..Spec::v4()
                }
                .build();
                let want = if frag_offset == 0 && proto == IPPROTO_TCP {
                    Parsed::TcpFirstFragment {
                        family: AF_INET,
                        dport: Spec::v4().dport,
                    }
                } else {
                    Parsed::Fragment
                };
                assert_eq!(
                    parse(&f[..]),
                    want,
                    "MF {more_fragments} offset {frag_offset} proto {proto}"
                );
            }
        }
        // A first fragment too short for the ports is malformed.
        let f = Spec {
            more_fragments: true,
            ..Spec::v4()
        }
        .build();
        assert_eq!(parse(&f[..14 + 20 + 3]), Parsed::Malformed);
        // Don't-fragment alone, and the reserved flag, are not fragmentation.
        let f = Spec::v4().build();
        assert_eq!(f[20], 0x40);
        let l3 = 14;
        for flags in [0x0000u16, 0x4000, 0x8000, 0xc000] {
            let f = with_be16(f.clone(), l3 + 6, flags);
            assert!(matches!(parse(&f[..]), Parsed::Tcp(_)), "{flags:#06x}");
        }
    }

    #[test]
    fn ipv4_not_tcp() {
        for proto in [UDP, ICMP, 47, 0, 41] {
            let f = Spec {
                proto,
                ..Spec::v4()
            }
            .build();
            assert_eq!(parse(&f[..]), Parsed::NotTcp, "proto {proto}");
        }
    }

    #[test]
    fn not_ip() {
        // An ARP request.
        let mut arp = Ethernet2Header {
            source: SRC_MAC,
            destination: [0xff; 6],
            ether_type: EtherType::ARP,
        }
        .to_bytes()
        .to_vec();
        arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&SRC_MAC);
        arp.extend_from_slice(&V4_SRC);
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&V4_DST);
        assert_eq!(parse(&arp[..]), Parsed::NotIp);
        // Other ethertypes, including 802.3 lengths and the old 0x9100 QinQ, which is not followed.
        let f = Spec::v4().build();
        for t in [
            0x0806, 0x88cc, 0x8847, 0x9100, 0x0026, 0x05dc, 0xffff, 0x0000,
        ] {
            assert_eq!(
                parse(&with_be16(f.clone(), 12, t)[..]),
                Parsed::NotIp,
                "{t:#06x}"
            );
        }
        // Behind tags.
        let f = Spec {
            tags: vec![QINQ, VLAN],
            ..Spec::v4()
        }
        .build();
        assert_eq!(parse(&with_be16(f, 20, 0x0806)[..]), Parsed::NotIp);
    }

    #[test]
    fn truncated_vlan_ipv4_syn_with_options() {
        let spec = Spec {
            tags: vec![VLAN],
            ip_option_words: 2,
            tcp_option_words: 5,
            payload: 12,
            ..Spec::v4()
        };
        let f = spec.build();
        let full = tcp(&f);
        // Ethernet 14 + tag 4, IPv4 28, TCP 40, payload 12.
        assert_eq!(
            (full.l3, full.l4, full.header_len, full.segment_len),
            (18, 46, 40, 52)
        );
        assert_eq!(f.len(), 98);
        // Everything that decides (ethertypes, IP version/IHL/length/fragment/protocol, TCP
        // header and options) ends at byte 86: any shorter prefix is Malformed, even where the
        // cut falls inside a tag (bytes 14..18) or between tag and IP header; from 86 on the
        // missing payload does not matter and the segment is the full frame's, its lengths
        // taken from the IP header.
        sweep(&f, |n| {
            if n < 86 {
                Parsed::Malformed
            } else {
                Parsed::Tcp(full)
            }
        });
    }

    #[test]
    fn truncated_ipv6_syn_with_extension_header() {
        let spec = Spec {
            exts: vec![Ext::Raw(DST, 16)],
            tcp_option_words: 3,
            payload: 5,
            ..Spec::v6()
        };
        let f = spec.build();
        let full = tcp(&f);
        // Ethernet 14, IPv6 40, destination options 16, TCP 32, payload 5.
        assert_eq!(
            (full.l3, full.l4, full.header_len, full.segment_len),
            (14, 70, 32, 37)
        );
        assert_eq!(f.len(), 107);
        // Cut in the fixed header, the extension header or the TCP header (options included):
        // Malformed. From 102 on: the full frame's segment.
        sweep(&f, |n| {
            if n < 102 {
                Parsed::Malformed
            } else {
                Parsed::Tcp(full)
            }
        });
    }

    #[test]
    fn truncated_frames_decided_before_the_cut() {
        // Here the answer is known before the TCP header: the prefix only has to reach the byte
        // that decides it.
        let l3 = 18;
        let v4_udp = Spec {
            tags: vec![VLAN],
            proto: UDP,
            payload: 4,
            ..Spec::v4()
        };
        // IPv4: the whole fixed header is read before anything is decided.
        sweep(&v4_udp.build(), |n| {
            if n < l3 + 20 {
                Parsed::Malformed
            } else {
                Parsed::NotTcp
            }
        });
        let v4_frag = Spec {
            more_fragments: true,
            ..v4_udp.clone()
        };
        sweep(&v4_frag.build(), |n| {
            if n < l3 + 20 {
                Parsed::Malformed
            } else {
                Parsed::Fragment
            }
        });
        // IPv6: the fixed header, then the first two bytes of each extension header.
        let v6_udp = Spec {
            exts: vec![Ext::Raw(HBH, 16)],
            proto: UDP,
            ..Spec::v6()
        };
        sweep(&v6_udp.build(), |n| {
            if n < 14 + 40 + 2 {
                Parsed::Malformed
            } else {
                Parsed::NotTcp
            }
        });
        let v6_frag = |offset| Spec {
            exts: vec![Ext::Raw(HBH, 16), Ext::Fragment { offset, more: true }],
            ..Spec::v6()
        };
        // A later fragment: decided by the fragment header's offset (its first 4 bytes).
        sweep(&v6_frag(1).build(), |n| {
            if n < 14 + 40 + 16 + 4 {
                Parsed::Malformed
            } else {
                Parsed::Fragment
            }
        });
        // The first: by the TCP ports after the fragment header.
        sweep(&v6_frag(0).build(), |n| {
            if n < 14 + 40 + 16 + 8 + 4 {
                Parsed::Malformed
            } else {
                Parsed::TcpFirstFragment {
                    family: AF_INET6,
                    dport: Spec::v6().dport,
                }
            }
        });
        let v6_esp = Spec {
            proto: ESP,
            ..Spec::v6()
        };
        sweep(&v6_esp.build(), |n| {
            if n < 14 + 40 {
                Parsed::Malformed
            } else {
                Parsed::NotTcp
            }
        });
        // Not IP: decided by the ethertype.
        let arp = with_be16(Spec::v4().build(), 12, 0x0806);
        sweep(&arp, |n| {
            if n < 14 {
                Parsed::Malformed
            } else {
                Parsed::NotIp
            }
        });
        let tagged_arp = with_be16(
            Spec {
                tags: vec![QINQ, VLAN],
                ..Spec::v4()
            }
            .build(),
            20,
            0x0806,
        );
        sweep(&tagged_arp, |n| {
            if n < 22 {
                Parsed::Malformed
            } else {
                Parsed::NotIp
            }
        });
    }

    #[test]
    fn inconsistent_ipv4_lengths() {
        let base = Spec {
            ip_option_words: 1,
            tcp_option_words: 5,
            payload: 10,
            ..Spec::v4()
        };
        let f = base.build();
        let l3 = 14;
        let l4 = 14 + 24;
        assert!(matches!(parse(&f[..]), Parsed::Tcp(_)));
        let set = |off: usize, v: u8| {
            let mut g = f.clone();
            g[off] = v;
            g
        };
        // Version.
        for b in [0x06, 0x16, 0x56, 0x66, 0xf6] {
            assert_eq!(parse(&set(l3, b)[..]), Parsed::Malformed, "{b:#04x}");
        }
        // IHL below 5.
        for ihl in 0..5 {
            assert_eq!(
                parse(&set(l3, 0x40 | ihl)[..]),
                Parsed::Malformed,
                "IHL {ihl}"
            );
        }
        // Total length below IHL * 4 (24), and below IHL * 4 + data offset * 4 (64).
        for total in [0u16, 19, 20, 23, 24, 43, 63] {
            assert_eq!(
                parse(&with_be16(f.clone(), l3 + 2, total)[..]),
                Parsed::Malformed,
                "total {total}"
            );
        }
        // Exactly the headers: a SYN without payload.
        let s = tcp(&with_be16(f.clone(), l3 + 2, 64));
        assert_eq!((s.segment_len, s.sequence_len()), (40, 1));
        // Data offset below 5.
        for doff in 0..5u8 {
            assert_eq!(
                parse(&set(l4 + 12, doff << 4)[..]),
                Parsed::Malformed,
                "doff {doff}"
            );
        }
        // The reserved bits next to the data offset do not change it.
        assert_eq!(tcp(&set(l4 + 12, 0xaf)).header_len, 40);
    }

    #[test]
    fn inconsistent_ipv6_lengths() {
        let base = Spec {
            exts: vec![Ext::Raw(HBH, 16)],
            ..Spec::v6()
        };
        let f = base.build();
        let l3 = 14;
        assert!(matches!(parse(&f[..]), Parsed::Tcp(_)));
        for b in [0x00, 0x40, 0x50, 0x70, 0xf0] {
            let mut g = f.clone();
            g[l3] = b;
            assert_eq!(parse(&g[..]), Parsed::Malformed, "{b:#04x}");
        }
        // Payload length below the extension headers (16), and below them plus TCP (36).
        for len in [0u16, 8, 15, 16, 20, 35] {
            assert_eq!(
                parse(&with_be16(f.clone(), l3 + 4, len)[..]),
                Parsed::Malformed,
                "payload {len}"
            );
        }
        assert_eq!(tcp(&with_be16(f.clone(), l3 + 4, 36)).segment_len, 20);
        // No extension headers: payload length below the TCP header.
        let f = Spec::v6().build();
        for len in [0u16, 1, 19] {
            assert_eq!(
                parse(&with_be16(f.clone(), l3 + 4, len)[..]),
                Parsed::Malformed,
                "payload {len}"
            );
        }
        // Data offset below 5.
        let mut g = f.clone();
        g[54 + 12] = 0x40;
        assert_eq!(parse(&g[..]), Parsed::Malformed);
    }

    #[test]
    fn ipv4_addresses() {
        for tags in [vec![], vec![QINQ, VLAN]] {
            let f = Spec {
                tags,
                ip_option_words: 3,
                ..Spec::v4()
            }
            .build();
            let s = tcp(&f);
            let (src, dst) = addresses(&f[..], &s).unwrap();
            assert_eq!(src, [198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            assert_eq!(dst, [198, 19, 255, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            assert_eq!(addresses(&f[..s.l3 + 19], &s), None);
            assert!(addresses(&f[..s.l3 + 20], &s).is_some());
        }
    }

    #[test]
    fn ipv6_addresses() {
        for tags in [vec![], vec![VLAN]] {
            let f = Spec {
                tags,
                exts: vec![Ext::Raw(DST, 8)],
                ..Spec::v6()
            }
            .build();
            let s = tcp(&f);
            assert_eq!(addresses(&f[..], &s), Some((V6_SRC, V6_DST)));
            assert_eq!(addresses(&f[..s.l3 + 39], &s), None);
            assert_eq!(addresses(&f[..s.l3 + 40], &s), Some((V6_SRC, V6_DST)));
        }
    }

    #[test]
    fn slice_loads_are_bounds_checked() {
        let b = [1u8, 2, 3, 4];
        let p: &[u8] = &b;
        assert_eq!(p.load::<[u8; 4]>(0), Some(b));
        assert_eq!(p.load::<[u8; 2]>(2), Some([3, 4]));
        assert_eq!(p.load::<[u8; 2]>(3), None);
        assert_eq!(p.load::<u8>(4), None);
        assert_eq!(p.load::<()>(4), Some(()));
        assert_eq!(p.load::<u8>(usize::MAX), None);
        assert_eq!(p.load::<[u8; 2]>(usize::MAX - 1), None);
        let empty: &[u8] = &[];
        assert_eq!(empty.load::<u8>(0), None);
    }

    /// xorshift64*: deterministic pseudo-random numbers.
    pub(crate) struct Rng(pub u64);

    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        pub(crate) fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn corrupted_frames_never_panic_and_tcp_results_are_in_bounds() {
        let seeds = [
            Spec {
                tags: vec![VLAN],
                ip_option_words: 2,
                tcp_option_words: 5,
                payload: 12,
                ..Spec::v4()
            },
            Spec {
                tags: vec![QINQ, VLAN],
                exts: vec![Ext::Raw(HBH, 8), Ext::Auth(16), Ext::Raw(DST, 8)],
                tcp_option_words: 3,
                payload: 5,
                ..Spec::v6()
            },
        ]
        .map(|s| s.build());
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut tcp_seen = 0;
        for i in 0..40_000 {
            let mut f = seeds[i % seeds.len()].clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(f.len());
                f[at] = match rng.below(4) {
                    0 => 0,
                    1 => 0xff,
                    _ => rng.next() as u8,
                };
            }
            f.truncate(rng.below(f.len() + 1).max(f.len() - rng.below(8)));
            if let Parsed::Tcp(s) = parse(&f[..]) {
                tcp_seen += 1;
                assert!(matches!(s.l3, 14 | 18 | 22 | 26), "{s:?}");
                let min_ip = if s.family == AF_INET { 20 } else { 40 };
                assert!(s.family == AF_INET || s.family == AF_INET6);
                assert!(s.l4 >= s.l3 + min_ip && s.l4 <= MAX_HEADER_OFFSET, "{s:?}");
                assert!((20..=60).contains(&s.header_len) && s.header_len % 4 == 0);
                assert!(s.segment_len >= s.header_len);
                assert!(s.l4 + s.header_len as usize <= f.len(), "{s:?}");
                assert!(addresses(&f[..], &s).is_some());
                let _ = s.sequence_len();
            }
        }
        // The corruption leaves plenty of frames TCP, so the checks above ran.
        assert!(tcp_seen > 5_000, "{tcp_seen}");
    }

    #[test]
    fn tcp_options_ending_past_max_header_offset_are_malformed() {
        // Found by the differential test (tests/differential.rs): the kernel's reader refuses a
        // load that starts past MAX_HEADER_OFFSET, so this reader must too. TCP at 478, behind
        // a 424-byte destination-options header: the options' last byte is at 509 or 513.
        let syn = |tcp_option_words| {
            Spec {
                exts: vec![Ext::Raw(DST, 424)],
                tcp_option_words,
                ..Spec::v6()
            }
            .build()
        };
        assert!(matches!(parse(&syn(3)[..]), Parsed::Tcp(s) if s.l4 == 478 && s.header_len == 32));
        assert_eq!(parse(&syn(4)[..]), Parsed::Malformed);
        assert_eq!(syn(4).load::<u8>(MAX_HEADER_OFFSET + 1), None);
        assert!(syn(4).load::<u8>(MAX_HEADER_OFFSET).is_some());
    }
}
