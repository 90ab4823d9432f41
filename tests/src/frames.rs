//! Frame builders for the tests: Ethernet (with any stack of 802.1Q/802.1ad tags), IPv4 (with
//! options, fragment fields) or IPv6 (with extension headers), then TCP (flags, sequence numbers,
//! options, payload), UDP or ICMP; and Ethernet ARP.
//!
//! The headers are etherparse's types, serialized and checksummed by etherparse; only the chaining
//! (VLAN stacks, extension-header chains, lengths) is done here, because etherparse's
//! `PacketBuilder` has no IPv4 options, no VLAN stacks deeper than two and no IPv6 extension
//! headers.
//!
//! ```
//! use std::net::Ipv4Addr;
//! use ws_guard_tests::frames::{FrameBuilder, Tcp};
//! let syn = FrameBuilder::ipv4(Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 19, 0, 1))
//!     .vlan(100)
//!     .tcp(Tcp::syn(40000, 9000, 1234))
//!     .build();
//! assert_eq!(syn.len(), 14 + 4 + 20 + 20);
//! ```

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::{
    ArpEthIpv4Packet, ArpOperation, EtherType, Ethernet2Header, IcmpEchoHeader, Icmpv4Header,
    Icmpv4Type, Icmpv6Header, Icmpv6Type, IpFragOffset, IpNumber, Ipv4Header, Ipv4Options,
    Ipv6FlowLabel, Ipv6FragmentHeader, Ipv6Header, Ipv6RawExtHeader, SingleVlanHeader, TcpHeader,
    UdpHeader, VlanId, VlanPcp,
};

/// Source MAC of frames from the client.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x00, 0x00, 0x01];
/// Destination MAC of frames from the client.
pub const SERVER_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x00, 0x00, 0x02];

/// 802.1Q tag protocol identifier.
pub const TPID_8021Q: u16 = 0x8100;
/// 802.1ad (QinQ service tag) protocol identifier.
pub const TPID_8021AD: u16 = 0x88a8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_URG: u8 = 0x20;
pub const TCP_ECE: u8 = 0x40;
pub const TCP_CWR: u8 = 0x80;

/// The options of a Linux SYN: MSS 1460, SACK permitted, timestamps, NOP, window scale 7.
pub const LINUX_SYN_OPTIONS: [u8; 20] = [
    2, 4, 0x05, 0xb4, // MSS
    4, 2, // SACK permitted
    8, 10, 0x00, 0x01, 0x02, 0x03, 0, 0, 0, 0, // timestamps
    1, // NOP
    3, 3, 7, // window scale
];

/// An IPv4 Router Alert option (RFC 2113), a real option of exactly four bytes.
pub const IPV4_ROUTER_ALERT: [u8; 4] = [0x94, 0x04, 0x00, 0x00];

/// A TCP segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack_number: u32,
    /// Flag byte as on the wire (`TCP_SYN | TCP_ACK`...).
    pub flags: u8,
    pub window: u16,
    /// Raw options; padded with zeros to a multiple of four.
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Tcp {
    /// A segment with the given flags and nothing else.
    pub fn with_flags(sport: u16, dport: u16, seq: u32, flags: u8) -> Self {
        Self {
            sport,
            dport,
            seq,
            ack_number: 0,
            flags,
            window: 64240,
            options: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// A bare SYN.
    pub fn syn(sport: u16, dport: u16, seq: u32) -> Self {
        Self::with_flags(sport, dport, seq, TCP_SYN)
    }

    /// Replaces the flag byte.
    pub fn flags(mut self, flags: u8) -> Self {
        self.flags = flags;
        self
    }

    /// Sets the acknowledgment number (the ACK flag is left as it is).
    pub fn ack_number(mut self, ack: u32) -> Self {
        self.ack_number = ack;
        self
    }

    /// Sets the raw options (at most 40 bytes).
    pub fn options(mut self, options: &[u8]) -> Self {
        assert!(options.len() <= 40, "TCP options are at most 40 bytes");
        self.options = options.to_vec();
        self
    }

    /// Sets the payload.
    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// TCP header length in bytes, options included.
    pub fn header_len(&self) -> usize {
        20 + self.options.len().div_ceil(4) * 4
    }

    /// The header as etherparse's type, checksum zero.
    pub fn header(&self) -> TcpHeader {
        let mut h = TcpHeader::new(self.sport, self.dport, self.seq, self.window);
        h.acknowledgment_number = self.ack_number;
        h.fin = self.flags & TCP_FIN != 0;
        h.syn = self.flags & TCP_SYN != 0;
        h.rst = self.flags & TCP_RST != 0;
        h.psh = self.flags & TCP_PSH != 0;
        h.ack = self.flags & TCP_ACK != 0;
        h.urg = self.flags & TCP_URG != 0;
        h.ece = self.flags & TCP_ECE != 0;
        h.cwr = self.flags & TCP_CWR != 0;
        h.set_options_raw(&self.options).expect("TCP options");
        h
    }
}

/// What follows the IP header(s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp(Tcp),
    Udp {
        sport: u16,
        dport: u16,
        payload: Vec<u8>,
    },
    /// ICMP (IPv4) or ICMPv6 (IPv6) echo request.
    Echo {
        id: u16,
        seq: u16,
        payload: Vec<u8>,
    },
    /// Any protocol number and bytes, written as they are.
    Raw {
        protocol: u8,
        bytes: Vec<u8>,
    },
}

/// An IPv6 extension header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ext {
    /// Hop-by-hop options holding one PadN option (8 bytes).
    HopByHop,
    /// Destination options holding one PadN option (8 bytes).
    DestOpts,
    /// Fragment header; offset in 8-byte units.
    Fragment { offset: u16, more: bool, id: u32 },
    /// A header of the generic format (hop-by-hop, routing, destination options) with the
    /// given type and body (the bytes after "next header" and "length"; `(len + 2) % 8 == 0`).
    Raw { kind: u8, body: Vec<u8> },
}

impl Ext {
    fn kind(&self) -> u8 {
        match self {
            Ext::HopByHop => 0,
            Ext::DestOpts => 60,
            Ext::Fragment { .. } => 44,
            Ext::Raw { kind, .. } => *kind,
        }
    }

    fn bytes(&self, next: u8) -> Vec<u8> {
        let pad_n = [1u8, 4, 0, 0, 0, 0];
        match self {
            Ext::HopByHop | Ext::DestOpts => Ipv6RawExtHeader::new_raw(IpNumber(next), &pad_n)
                .expect("extension header")
                .to_bytes()
                .to_vec(),
            Ext::Raw { body, .. } => Ipv6RawExtHeader::new_raw(IpNumber(next), body)
                .expect("extension header body length")
                .to_bytes()
                .to_vec(),
            Ext::Fragment { offset, more, id } => Ipv6FragmentHeader::new(
                IpNumber(next),
                IpFragOffset::try_new(*offset).expect("fragment offset"),
                *more,
                *id,
            )
            .to_bytes()
            .to_vec(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Net {
    V4 {
        src: [u8; 4],
        dst: [u8; 4],
        options: Vec<u8>,
        more_fragments: bool,
        fragment_offset: u16,
        ttl: u8,
    },
    V6 {
        src: [u8; 16],
        dst: [u8; 16],
        ext: Vec<Ext>,
        hop_limit: u8,
    },
    Arp {
        sender: [u8; 4],
        target: [u8; 4],
    },
}

/// A frame under construction. `build` serializes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameBuilder {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    /// (TPID, TCI), outermost first.
    vlans: Vec<(u16, u16)>,
    net: Net,
    l4: L4,
}

impl FrameBuilder {
    fn new(net: Net) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: SERVER_MAC,
            vlans: Vec::new(),
            net,
            l4: L4::Raw {
                protocol: 59, // IPv6 "no next header"; replaced by tcp()/udp()/...
                bytes: Vec::new(),
            },
        }
    }

    /// An IPv4 packet from `src` to `dst` (TTL 64, no options, not a fragment).
    pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        Self::new(Net::V4 {
            src: src.octets(),
            dst: dst.octets(),
            options: Vec::new(),
            more_fragments: false,
            fragment_offset: 0,
            ttl: 64,
        })
    }

    /// An IPv6 packet from `src` to `dst` (hop limit 64, no extension headers).
    pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr) -> Self {
        Self::new(Net::V6 {
            src: src.octets(),
            dst: dst.octets(),
            ext: Vec::new(),
            hop_limit: 64,
        })
    }

    /// An Ethernet ARP request: who has `target`, tell `sender`.
    pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Self {
        let mut b = Self::new(Net::Arp {
            sender: sender.octets(),
            target: target.octets(),
        });
        b.dst_mac = [0xff; 6];
        b
    }

    /// Source and destination MAC addresses.
    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    /// Adds an 802.1Q tag with VLAN id `vid` inside the tags added before.
    pub fn vlan(self, vid: u16) -> Self {
        self.vlan_tag(TPID_8021Q, vid)
    }

    /// Adds a tag with the given TPID (802.1Q, 802.1ad) and VLAN id inside the tags added before.
    pub fn vlan_tag(mut self, tpid: u16, vid: u16) -> Self {
        assert!(vid < 4096, "VLAN id");
        self.vlans.push((tpid, vid));
        self
    }

    /// IPv4 options (a multiple of four bytes, at most 40).
    pub fn ip_options(mut self, opts: &[u8]) -> Self {
        match &mut self.net {
            Net::V4 { options, .. } => {
                assert!(
                    opts.len().is_multiple_of(4) && opts.len() <= 40,
                    "IPv4 options length"
                );
                *options = opts.to_vec();
            }
            _ => panic!("ip_options on a non-IPv4 frame"),
        }
        self
    }

    /// IPv4 fragment fields (offset in 8-byte units). For IPv6 use [`FrameBuilder::ext`] with
    /// [`Ext::Fragment`].
    pub fn ipv4_fragment(mut self, more: bool, offset: u16) -> Self {
        match &mut self.net {
            Net::V4 {
                more_fragments,
                fragment_offset,
                ..
            } => {
                *more_fragments = more;
                *fragment_offset = offset;
            }
            _ => panic!("ipv4_fragment on a non-IPv4 frame"),
        }
        self
    }

    /// IPv4 TTL or IPv6 hop limit.
    pub fn ttl(mut self, value: u8) -> Self {
        match &mut self.net {
            Net::V4 { ttl, .. } => *ttl = value,
            Net::V6 { hop_limit, .. } => *hop_limit = value,
            Net::Arp { .. } => panic!("ttl on ARP"),
        }
        self
    }

    /// Appends an IPv6 extension header to the chain.
    pub fn ext(mut self, e: Ext) -> Self {
        match &mut self.net {
            Net::V6 { ext, .. } => ext.push(e),
            _ => panic!("IPv6 extension header on a non-IPv6 frame"),
        }
        self
    }

    /// A TCP segment.
    pub fn tcp(mut self, tcp: Tcp) -> Self {
        self.l4 = L4::Tcp(tcp);
        self
    }

    /// A UDP datagram.
    pub fn udp(mut self, sport: u16, dport: u16, payload: &[u8]) -> Self {
        self.l4 = L4::Udp {
            sport,
            dport,
            payload: payload.to_vec(),
        };
        self
    }

    /// An ICMP (or ICMPv6) echo request.
    pub fn echo_request(mut self, id: u16, seq: u16, payload: &[u8]) -> Self {
        self.l4 = L4::Echo {
            id,
            seq,
            payload: payload.to_vec(),
        };
        self
    }

    /// Any upper-layer protocol, with its bytes as given.
    pub fn raw_l4(mut self, protocol: u8, bytes: &[u8]) -> Self {
        self.l4 = L4::Raw {
            protocol,
            bytes: bytes.to_vec(),
        };
        self
    }

    /// The TCP segment, if the frame carries one.
    pub fn tcp_segment(&self) -> Option<&Tcp> {
        match &self.l4 {
            L4::Tcp(t) => Some(t),
            _ => None,
        }
    }

    /// Offset of the IP (or ARP) header: Ethernet plus the VLAN tags.
    pub fn l3_offset(&self) -> usize {
        14 + 4 * self.vlans.len()
    }

    /// Length of the IP header and its options or extension headers.
    pub fn ip_header_len(&self) -> usize {
        match &self.net {
            Net::V4 { options, .. } => 20 + options.len(),
            Net::V6 { ext, .. } => 40 + ext.iter().map(|e| e.bytes(0).len()).sum::<usize>(),
            Net::Arp { .. } => 0,
        }
    }

    /// Offset of the upper-layer header.
    pub fn l4_offset(&self) -> usize {
        self.l3_offset() + self.ip_header_len()
    }

    fn ether_type(&self) -> u16 {
        match self.net {
            Net::V4 { .. } => 0x0800,
            Net::V6 { .. } => 0x86dd,
            Net::Arp { .. } => 0x0806,
        }
    }

    /// The upper-layer protocol number and bytes, checksummed for the given pseudo header.
    fn l4_bytes(&self) -> (u8, Vec<u8>) {
        let (src4, dst4, src6, dst6) = match &self.net {
            Net::V4 { src, dst, .. } => (Some(*src), Some(*dst), None, None),
            Net::V6 { src, dst, .. } => (None, None, Some(*src), Some(*dst)),
            Net::Arp { .. } => (None, None, None, None),
        };
        match &self.l4 {
            L4::Tcp(t) => {
                let mut h = t.header();
                h.checksum = match (src4, dst4, src6, dst6) {
                    (Some(s), Some(d), _, _) => h.calc_checksum_ipv4_raw(s, d, &t.payload),
                    (_, _, Some(s), Some(d)) => h.calc_checksum_ipv6_raw(s, d, &t.payload),
                    _ => panic!("TCP needs IP"),
                }
                .expect("TCP checksum");
                let mut out = h.to_bytes().to_vec();
                out.extend_from_slice(&t.payload);
                (6, out)
            }
            L4::Udp {
                sport,
                dport,
                payload,
            } => {
                let h = match (src4, dst4, src6, dst6) {
                    (Some(s), Some(d), _, _) => {
                        let ip = Ipv4Header::new(0, 64, IpNumber::UDP, s, d).expect("ip");
                        UdpHeader::with_ipv4_checksum(*sport, *dport, &ip, payload)
                    }
                    (_, _, Some(s), Some(d)) => {
                        let ip = Ipv6Header {
                            source: s,
                            destination: d,
                            next_header: IpNumber::UDP,
                            ..Default::default()
                        };
                        UdpHeader::with_ipv6_checksum(*sport, *dport, &ip, payload)
                    }
                    _ => panic!("UDP needs IP"),
                }
                .expect("UDP header");
                let mut out = h.to_bytes().to_vec();
                out.extend_from_slice(payload);
                (17, out)
            }
            L4::Echo { id, seq, payload } => {
                let echo = IcmpEchoHeader { id: *id, seq: *seq };
                let (proto, mut out) = match (src6, dst6) {
                    (Some(s), Some(d)) => {
                        let h = Icmpv6Header::with_checksum(
                            Icmpv6Type::EchoRequest(echo),
                            s,
                            d,
                            payload,
                        )
                        .expect("ICMPv6");
                        (58, h.to_bytes().to_vec())
                    }
                    _ => {
                        let h = Icmpv4Header::with_checksum(Icmpv4Type::EchoRequest(echo), payload);
                        (1, h.to_bytes().to_vec())
                    }
                };
                out.extend_from_slice(payload);
                (proto, out)
            }
            L4::Raw { protocol, bytes } => (*protocol, bytes.clone()),
        }
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let first_type = self
            .vlans
            .first()
            .map(|v| v.0)
            .unwrap_or_else(|| self.ether_type());
        Ethernet2Header {
            source: self.src_mac,
            destination: self.dst_mac,
            ether_type: EtherType(first_type),
        }
        .write(&mut out)
        .expect("ethernet");
        for (i, (_, tci)) in self.vlans.iter().enumerate() {
            let inner = self
                .vlans
                .get(i + 1)
                .map(|v| v.0)
                .unwrap_or_else(|| self.ether_type());
            SingleVlanHeader {
                pcp: VlanPcp::try_new(0).expect("pcp"),
                drop_eligible_indicator: false,
                vlan_id: VlanId::try_new(*tci).expect("vlan id"),
                ether_type: EtherType(inner),
            }
            .write(&mut out)
            .expect("vlan");
        }
        match &self.net {
            Net::Arp { sender, target } => {
                let arp = ArpEthIpv4Packet {
                    operation: ArpOperation::REQUEST,
                    sender_mac: self.src_mac,
                    sender_ipv4: *sender,
                    target_mac: [0; 6],
                    target_ipv4: *target,
                };
                out.extend_from_slice(&arp.to_bytes());
            }
            Net::V4 {
                src,
                dst,
                options,
                more_fragments,
                fragment_offset,
                ttl,
            } => {
                let (proto, l4) = self.l4_bytes();
                let mut ip =
                    Ipv4Header::new(0, *ttl, IpNumber(proto), *src, *dst).expect("IPv4 header");
                ip.options = Ipv4Options::try_from(&options[..]).expect("IPv4 options");
                ip.set_payload_len(l4.len()).expect("IPv4 length");
                ip.dont_fragment = !*more_fragments && *fragment_offset == 0;
                ip.more_fragments = *more_fragments;
                ip.fragment_offset = IpFragOffset::try_new(*fragment_offset).expect("offset");
                ip.identification = 0x1234;
                ip.header_checksum = ip.calc_header_checksum();
                ip.write(&mut out).expect("IPv4");
                out.extend_from_slice(&l4);
            }
            Net::V6 {
                src,
                dst,
                ext,
                hop_limit,
            } => {
                let (proto, l4) = self.l4_bytes();
                let mut chain = Vec::new();
                for (i, e) in ext.iter().enumerate() {
                    let next = ext.get(i + 1).map(|n| n.kind()).unwrap_or(proto);
                    chain.extend_from_slice(&e.bytes(next));
                }
                let ip = Ipv6Header {
                    traffic_class: 0,
                    flow_label: Ipv6FlowLabel::try_new(0x12345).expect("flow label"),
                    payload_length: (chain.len() + l4.len()) as u16,
                    next_header: IpNumber(ext.first().map(|e| e.kind()).unwrap_or(proto)),
                    hop_limit: *hop_limit,
                    source: *src,
                    destination: *dst,
                };
                ip.write(&mut out).expect("IPv6");
                out.extend_from_slice(&chain);
                out.extend_from_slice(&l4);
            }
        }
        out
    }
}

/// A small deterministic pseudo-random generator (xorshift64*), for reproducible fuzz-like tests.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        assert!(lo < hi);
        lo + (self.next_u64() % (hi - lo) as u64) as usize
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.next_u64() % den < num
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next_u64() as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetHeaders, PacketHeaders, TransportHeader};

    #[test]
    fn ipv4_syn_with_vlan_and_options_parses_back() {
        let b = FrameBuilder::ipv4(Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 19, 0, 1))
            .vlan(7)
            .ip_options(&IPV4_ROUTER_ALERT)
            .tcp(
                Tcp::syn(40000, 9000, 77)
                    .options(&LINUX_SYN_OPTIONS)
                    .payload(b"hi"),
            );
        let f = b.build();
        assert_eq!(f.len(), 14 + 4 + 24 + 40 + 2);
        assert_eq!(b.l4_offset(), 14 + 4 + 24);
        let p = PacketHeaders::from_ethernet_slice(&f).unwrap();
        assert_eq!(p.vlan_ids().len(), 1);
        let Some(NetHeaders::Ipv4(ip, _)) = p.net else {
            panic!()
        };
        assert_eq!(ip.header_checksum, ip.calc_header_checksum());
        assert_eq!(ip.options.as_slice(), &IPV4_ROUTER_ALERT);
        let Some(TransportHeader::Tcp(t)) = p.transport else {
            panic!()
        };
        assert!(t.syn && !t.ack);
        assert_eq!(t.checksum, t.calc_checksum_ipv4(&ip, b"hi").unwrap());
    }

    #[test]
    fn ipv6_extension_chain_is_linked() {
        let b = FrameBuilder::ipv6("2001:2::1".parse().unwrap(), "2001:2::ff".parse().unwrap())
            .vlan_tag(TPID_8021AD, 5)
            .vlan(6)
            .ext(Ext::HopByHop)
            .ext(Ext::DestOpts)
            .tcp(Tcp::syn(1, 2, 3));
        let f = b.build();
        assert_eq!(f.len(), 14 + 8 + 40 + 16 + 20);
        assert_eq!(&f[12..14], &[0x88, 0xa8]);
        assert_eq!(&f[16..18], &[0x81, 0x00]);
        assert_eq!(&f[20..22], &[0x86, 0xdd]);
        let p = PacketHeaders::from_ethernet_slice(&f).unwrap();
        let Some(NetHeaders::Ipv6(ip, _)) = p.net else {
            panic!()
        };
        assert_eq!(ip.payload_length, 36);
        let Some(TransportHeader::Tcp(t)) = p.transport else {
            panic!()
        };
        assert_eq!(
            t.checksum,
            t.calc_checksum_ipv6_raw(ip.source, ip.destination, &[])
                .unwrap()
        );
    }
}
