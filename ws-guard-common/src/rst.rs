//! The TCP RST that answers a refused SYN, like iptables' `REJECT --reject-with tcp-reset`.
//!
//! RFC 9293 3.10.7.1: a segment without ACK is answered with `<SEQ=0><ACK=SEG.SEQ+SEG.LEN>
//! <CTL=RST,ACK>`. The reply reuses the frame: Ethernet addresses swapped, VLAN tags kept, a
//! fixed IP header with the addresses swapped, and a 20-byte TCP header. Frames whose IP header
//! has options or extension headers are not answered (the caller drops them instead).

use crate::{
    checksum,
    maps::AF_INET,
    parse::{IPPROTO_TCP, TCP_ACK, TCP_RST, TcpSegment},
};

/// Hop limit of replies.
pub const REPLY_TTL: u8 = 64;
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

/// The reply's TCP header, checksum left zero.
#[inline(always)]
fn tcp_header(seg: &TcpSegment) -> [u8; TCP_LEN] {
    let mut t = [0u8; TCP_LEN];
    t[0..2].copy_from_slice(&seg.dport.to_be_bytes());
    t[2..4].copy_from_slice(&seg.sport.to_be_bytes());
    // SEQ = 0.
    let ack = seg.seq.wrapping_add(seg.sequence_len());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = TCP_RST | TCP_ACK;
    t
}

/// The reply's IPv4 and TCP headers for a SYN whose IPv4 header (without options) is `ip`.
#[inline(always)]
pub fn ipv4(ip: &[u8; 20], seg: &TcpSegment) -> ([u8; 20], [u8; TCP_LEN]) {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((20 + TCP_LEN) as u16).to_be_bytes());
    h[6] = 0x40; // DF
    h[8] = REPLY_TTL;
    h[9] = IPPROTO_TCP;
    let src: [u8; 4] = [ip[16], ip[17], ip[18], ip[19]];
    let dst: [u8; 4] = [ip[12], ip[13], ip[14], ip[15]];
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    let c = checksum::finish(checksum::add(0, &h));
    h[10..12].copy_from_slice(&c.to_be_bytes());

    let mut t = tcp_header(seg);
    let mut acc = checksum::add(0, &src);
    acc = checksum::add(acc, &dst);
    acc += IPPROTO_TCP as u32 + TCP_LEN as u32;
    let c = checksum::finish(checksum::add(acc, &t));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    (h, t)
}

/// The reply's IPv6 and TCP headers for a SYN whose fixed IPv6 header is `ip`.
#[inline(always)]
pub fn ipv6(ip: &[u8; 40], seg: &TcpSegment) -> ([u8; 40], [u8; TCP_LEN]) {
    let mut h = [0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(TCP_LEN as u16).to_be_bytes());
    h[6] = IPPROTO_TCP;
    h[7] = REPLY_TTL;
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&ip[24..40]);
    dst.copy_from_slice(&ip[8..24]);
    h[8..24].copy_from_slice(&src);
    h[24..40].copy_from_slice(&dst);

    let mut t = tcp_header(seg);
    let mut acc = checksum::add(0, &src);
    acc = checksum::add(acc, &dst);
    acc += IPPROTO_TCP as u32 + TCP_LEN as u32;
    let c = checksum::finish(checksum::add(acc, &t));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    (h, t)
}
