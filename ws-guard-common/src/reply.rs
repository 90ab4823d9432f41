//! IP headers and checksums of the segments the XDP program sends back in place of the frame it
//! received (a RST for a refused attempt, a SYN-ACK carrying a SYN cookie): addresses swapped,
//! a fixed header without options or extension headers.

use crate::{checksum, parse::IPPROTO_TCP};

/// Hop limit of replies.
pub const REPLY_TTL: u8 = 64;

/// The reply's IPv4 header (checksum set) for a received header `ip` (its first 20 bytes) and a
/// TCP segment of `tcp_len` bytes.
#[inline(always)]
pub fn ipv4_header(ip: &[u8; 20], tcp_len: u16) -> [u8; 20] {
    let mut h = *ip;
    ipv4_in_place(&mut h, tcp_len);
    h
}

/// [`ipv4_header`] written over the received header itself (no copy: the eBPF stack is small).
#[inline(always)]
pub fn ipv4_in_place(h: &mut [u8; 20], tcp_len: u16) {
    let src = [h[16], h[17], h[18], h[19]];
    let dst = [h[12], h[13], h[14], h[15]];
    *h = [0; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&(20 + tcp_len).to_be_bytes());
    h[6] = 0x40; // DF
    h[8] = REPLY_TTL;
    h[9] = IPPROTO_TCP;
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    let c = checksum::finish(checksum::add(0, h));
    h[10..12].copy_from_slice(&c.to_be_bytes());
}

/// The reply's IPv6 header for a received fixed header `ip` and a TCP segment of `tcp_len` bytes.
#[inline(always)]
pub fn ipv6_header(ip: &[u8; 40], tcp_len: u16) -> [u8; 40] {
    let mut h = *ip;
    ipv6_in_place(&mut h, tcp_len);
    h
}

/// [`ipv6_header`] written over the received header itself.
#[inline(always)]
pub fn ipv6_in_place(h: &mut [u8; 40], tcp_len: u16) {
    let mut i = 8;
    while i < 24 {
        h.swap(i, i + 16);
        i += 1;
    }
    h[0] = 0x60;
    h[1] = 0;
    h[2] = 0;
    h[3] = 0;
    h[4..6].copy_from_slice(&tcp_len.to_be_bytes());
    h[6] = IPPROTO_TCP;
    h[7] = REPLY_TTL;
}

/// The TCP checksum of `tcp` (its first `tcp_len` bytes; the rest must be zero, as zeros add
/// nothing) sent in reply IPv4 header `ip`.
#[inline(always)]
pub fn tcp_checksum_v4<const N: usize>(ip: &[u8; 20], tcp: &[u8; N], tcp_len: u16) -> u16 {
    checksum::finish(checksum::add(pseudo(ip, 12, 20, tcp_len), tcp))
}

/// [`tcp_checksum_v4`] for a reply IPv6 header.
#[inline(always)]
pub fn tcp_checksum_v6<const N: usize>(ip: &[u8; 40], tcp: &[u8; N], tcp_len: u16) -> u16 {
    checksum::finish(checksum::add(pseudo(ip, 8, 40, tcp_len), tcp))
}

/// The pseudo-header's sum: the addresses (bytes `from..to` of the IP header), the protocol
/// and the TCP length.
#[inline(always)]
fn pseudo<const N: usize>(ip: &[u8; N], from: usize, to: usize, tcp_len: u16) -> u32 {
    let mut acc = IPPROTO_TCP as u32 + tcp_len as u32;
    let mut i = from;
    while i + 1 < to && i + 1 < N {
        acc += u16::from_be_bytes([ip[i], ip[i + 1]]) as u32;
        i += 2;
    }
    acc
}
