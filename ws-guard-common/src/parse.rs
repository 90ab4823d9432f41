//! Header parsing shared by the XDP program and the host tests. It reads through [`Packet`], so
//! the kernel reads bounds-checked packet memory and the tests read byte slices, with the same
//! code deciding.

use crate::maps::{AF_INET, AF_INET6};

/// Read access to a frame.
pub trait Packet {
    /// A copy of the `T` at `offset`, or `None` if it runs past the end of the frame.
    fn load<T: Copy>(&self, offset: usize) -> Option<T>;
}

impl Packet for [u8] {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// An IP fragment.
    Fragment,
    /// A TCP segment whose headers are all present and consistent.
    Tcp(TcpSegment),
    /// Truncated or inconsistent headers.
    Malformed,
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
    if u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
        return Parsed::Fragment;
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
            IPV6_FRAGMENT => return Parsed::Fragment,
            _ => break,
        };
        off += len;
        ext_len += len as u32;
        if off > MAX_HEADER_OFFSET {
            return Parsed::Malformed;
        }
    }
    match next {
        IPPROTO_TCP => {}
        IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_AH => return Parsed::Malformed,
        _ => return Parsed::NotTcp,
    }
    if payload_len < ext_len {
        return Parsed::Malformed;
    }
    parse_tcp(p, AF_INET6, l3, off, payload_len - ext_len, ext_len != 0)
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
        segment_len,
        header_len,
        ipv6_ext,
    })
}

/// Source and destination address of the IP header at `l3`; IPv4 in the first four bytes.
#[inline(always)]
pub fn addresses<P: Packet + ?Sized>(p: &P, seg: &TcpSegment) -> Option<([u8; 16], [u8; 16])> {
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    if seg.family == AF_INET {
        let a = p.load::<[u8; 8]>(seg.l3 + 12)?;
        src[..4].copy_from_slice(&a[..4]);
        dst[..4].copy_from_slice(&a[4..]);
    } else {
        src = p.load::<[u8; 16]>(seg.l3 + 8)?;
        dst = p.load::<[u8; 16]>(seg.l3 + 24)?;
    }
    Some((src, dst))
}
