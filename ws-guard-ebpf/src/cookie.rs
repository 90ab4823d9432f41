//! SYN-cookie mode of a port (see `ws_guard_common::syncookie`): a new attempt of a source key
//! without state is answered with a SYN-ACK carrying the kernel's own cookie for the listener,
//! and nothing is stored; the ACK that returns a valid cookie is that attempt's judgement.

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock, bpf_sock_tuple, tcphdr, xdp_action},
    cty::c_void,
    helpers::{
        bpf_ktime_get_coarse_ns, bpf_loop, bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_check_syncookie,
        bpf_tcp_gen_syncookie, bpf_xdp_load_bytes, bpf_xdp_store_bytes,
    },
    programs::XdpContext,
};
use ws_guard_common::{
    key::source_key,
    maps::{
        AF_INET, Counter, FLOW_PENDING, FlowKey, GATE_FLAGS, GlobalConfig, PortConfig, Scratch,
    },
    parse::{self, MAX_HEADER_OFFSET, Packet, Parsed, TCP_ACK, TCP_RST, TCP_SYN, TcpSegment},
    reply, rst,
    syncookie::{self, MAX_OPTION_BYTES, OptionCursor, SynOptions},
};

use crate::{
    frame::{Frame, FrameIo, HelperFrame},
    maps::{
        self, Bucket, WSG_COOKIES, WSG_FLOWS, WSG_JUMP, WSG_SCRATCH, WSG_SEG, WSG_SOURCES, count,
    },
    xdp::{self, Gate},
};

const TCP_LISTEN: u32 = 10;

/// [`Frame`] for `parse_tcp` only: a type of its own, so that the parser is compiled apart from
/// `wsg_xdp`'s (code LLVM would share between the two programs becomes a subprogram the
/// verifier walks again for every header layout of `wsg_xdp`).
struct ParseFrame<'a>(Frame<'a>);

impl Packet for ParseFrame<'_> {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        self.0.load(offset)
    }
}

/// A socket the lookup helper returned; the reference is released when dropped.
struct Sock(*mut bpf_sock);

impl Drop for Sock {
    #[inline(always)]
    fn drop(&mut self) {
        // SAFETY: a reference the lookup helper acquired, released once.
        unsafe { bpf_sk_release(self.0.cast()) };
    }
}

impl Sock {
    /// The socket of `flow` in the interface's network namespace: an established (or
    /// time-wait, or request) socket if the flow has one, else the listener of its port.
    #[inline(always)]
    fn lookup(ctx: &XdpContext, flow: &FlowKey) -> Option<Sock> {
        // In the scratch space: the stack is full.
        let s = WSG_SCRATCH.get_ptr_mut(0)?;
        // SAFETY: the tuple bytes are 40 bytes of a live per-CPU value, large enough for a
        // `bpf_sock_tuple` (36) and only used by this CPU meanwhile.
        let tuple = unsafe { &mut *(*s).tuple.as_mut_ptr().cast::<bpf_sock_tuple>() };
        let size = if flow.family == AF_INET {
            // SAFETY: writing integer fields of the union.
            unsafe {
                let t = &mut tuple.__bindgen_anon_1.ipv4;
                t.saddr = u32::from_ne_bytes([
                    flow.client[0],
                    flow.client[1],
                    flow.client[2],
                    flow.client[3],
                ]);
                t.daddr = u32::from_ne_bytes([
                    flow.server[0],
                    flow.server[1],
                    flow.server[2],
                    flow.server[3],
                ]);
                t.sport = flow.client_port.to_be();
                t.dport = flow.server_port.to_be();
            }
            12
        } else {
            // SAFETY: as above.
            unsafe {
                let t = &mut tuple.__bindgen_anon_1.ipv6;
                t.saddr = core::mem::transmute::<[u8; 16], [u32; 4]>(flow.client);
                t.daddr = core::mem::transmute::<[u8; 16], [u32; 4]>(flow.server);
                t.sport = flow.client_port.to_be();
                t.dport = flow.server_port.to_be();
            }
            36
        };
        // SAFETY: the tuple is live for the call; the context is the program's.
        let sk = unsafe {
            bpf_skc_lookup_tcp(ctx.ctx.cast(), tuple, size, BPF_F_CURRENT_NETNS as u64, 0)
        };
        if sk.is_null() {
            return None;
        }
        Some(Sock(sk))
    }

    #[inline(always)]
    fn listening(&self) -> bool {
        // SAFETY: `state` is readable on every socket the lookup returns.
        unsafe { (*self.0).state == TCP_LISTEN }
    }
}

/// Copies the IP header (without options) and `tcp_len` bytes of TCP header into the per-CPU
/// scratch space, for the cookie helpers; returns it and the IP header's length.
#[inline(always)]
fn scratch_headers(
    ctx: &XdpContext,
    seg: &TcpSegment,
    tcp_len: u32,
) -> Option<(*mut Scratch, u32)> {
    let s = WSG_SCRATCH.get_ptr_mut(0)?;
    let ip_len: u32 = if seg.family == AF_INET { 20 } else { 40 };
    if !(20..=60).contains(&tcp_len) {
        return None;
    }
    // SAFETY: both copies stay inside the scratch value (40 and 60 bytes); the helper checks
    // the frame's bounds.
    unsafe {
        if bpf_xdp_load_bytes(ctx.ctx, seg.l3 as u32, (*s).ip.as_mut_ptr().cast(), ip_len) != 0
            || bpf_xdp_load_bytes(
                ctx.ctx,
                seg.l4 as u32,
                (*s).tcp.as_mut_ptr().cast(),
                tcp_len,
            ) != 0
        {
            return None;
        }
    }
    Some((s, ip_len))
}

/// Hands the frame to `wsg_cookie` (a tail call: does not return when it works). If the jump
/// table is empty (the daemon has not filled it yet), the caller goes on as without cookies.
#[inline(always)]
pub fn jump(ctx: &XdpContext) {
    // SAFETY: index 0 holds an XDP program of this object, or nothing.
    let _ = unsafe { WSG_JUMP.tail_call(ctx, 0) };
}

/// Whether a segment that is not a new attempt may be the ACK completing a cookie handshake.
#[inline(always)]
pub fn may_carry_cookie(seg: &TcpSegment) -> bool {
    seg.flags & (TCP_ACK | TCP_SYN | TCP_RST) == TCP_ACK
}

/// What [`syn`] and [`ack`] return when they leave the frame to the usual judgement.
const UNDECIDED: u32 = u32::MAX;
/// What [`ack`] returns for a valid cookie: judge it (its flow and cookie are in the scratch).
const JUDGE: u32 = u32::MAX - 1;

/// `wsg_cookie`: a new attempt or an ACK to a port in cookie mode, read through helpers (see
/// [`HelperFrame`]). `wsg_xdp` parsed the same frame and chose to jump here; what it would have
/// counted is counted here.
///
/// The parts are functions of their own, called one after the other: each has its own stack
/// frame (the judgement alone needs most of the 512 bytes), and a BPF call returns one value.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let frame = HelperFrame(ctx);
    let Some(copy) = WSG_SEG.get_ptr_mut(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: a live per-CPU value.
    if !parse_tcp(ctx, unsafe { &mut *copy }) {
        count(Bucket::UNATTRIBUTED, Counter::Malformed);
        return xdp_action::XDP_PASS;
    }
    // Read back from map memory, the segment's fields are values the verifier does not know:
    // every header layout then reaches the parts below in one state, checked once.
    // SAFETY: as above.
    let seg = unsafe { &*copy };
    let Some(port) = maps::port(seg.dport) else {
        count(Bucket::UNATTRIBUTED, Counter::NotProtected);
        return xdp_action::XDP_PASS;
    };
    let bucket = Bucket::of(port, seg.family);
    if seg.is_new_attempt() {
        if port.syn_cookies != 0 {
            let action = syn(&frame, seg, bucket);
            if action != UNDECIDED {
                return action;
            }
        }
        return judge(&frame, seg, port, bucket);
    }
    if port.syn_cookies != 0 && may_carry_cookie(seg) {
        match ack(&frame, seg, bucket) {
            UNDECIDED => {}
            JUDGE => {
                let action = judge(&frame, seg, port, bucket);
                if action == xdp_action::XDP_PASS {
                    note_used();
                }
                return action;
            }
            action => return action,
        }
    }
    count(bucket, Counter::ProtectedOther);
    xdp_action::XDP_PASS
}

/// The frame's TCP segment into `seg`; false when it has none (wsg_xdp found one, so only a
/// frame changed meanwhile). Read with packet pointers (the rest of `wsg_cookie` uses helpers):
/// the verifier walks this function once per header layout, and nothing after it sees the
/// layout's exact offsets (they come back from map memory).
#[inline(never)]
fn parse_tcp(ctx: &XdpContext, seg: &mut TcpSegment) -> bool {
    // Through a volatile read: otherwise LLVM passes the context's data pointers as arguments
    // (cut to 32 bits), which the verifier no longer knows as packet pointers.
    // SAFETY: a read of a live reference.
    let ctx: &XdpContext = unsafe { core::ptr::read_volatile(&ctx) };
    match parse::parse(&ParseFrame(Frame(ctx))) {
        Parsed::Tcp(s) => {
            *seg = s;
            true
        }
        _ => false,
    }
}

#[inline(never)]
fn judge(frame: &HelperFrame, seg: &TcpSegment, port: &PortConfig, bucket: Bucket) -> u32 {
    xdp::judge(frame.0, frame, seg, port, bucket)
}

#[inline(never)]
fn syn(frame: &HelperFrame, seg: &TcpSegment, bucket: Bucket) -> u32 {
    syn_action(frame, seg, bucket).unwrap_or(UNDECIDED)
}

#[inline(never)]
fn ack(frame: &HelperFrame, seg: &TcpSegment, bucket: Bucket) -> u32 {
    ack_action(frame, seg, bucket).unwrap_or(UNDECIDED)
}

/// Records the cookie of the ACK just admitted (flow and cookie left in the scratch by
/// [`ack`]), so a replay of it is not another connection.
#[inline(always)]
fn note_used() {
    if let Some(s) = WSG_SCRATCH.get_ptr_mut(0) {
        // SAFETY: a live per-CPU value; the insert copies key and value.
        unsafe {
            let _ = WSG_COOKIES.insert(&(*s).flow, &(*s).cookie, 0);
        }
    }
}

/// A new attempt to a port in cookie mode: the action (a SYN cookie sent, or dropped by the
/// lists or a ban), or `None` to judge it on its SYN as usual (a source with state or
/// allowlisted, monitor mode's "would block", or no cookie to be had).
#[inline(always)]
fn syn_action(frame: &HelperFrame, seg: &TcpSegment, bucket: Bucket) -> Option<u32> {
    let ctx = frame.0;
    let global = maps::WSG_GLOBAL.get(0)?;
    let flow = parse::flow(frame, seg)?;
    let source = source_key(seg.family, flow.client, seg.dport, global);
    // SAFETY: the lookup only tests presence.
    if unsafe { WSG_SOURCES.get(&source).is_some() } {
        return None;
    }
    if global.flags & GATE_FLAGS != 0 {
        match xdp::gate(&flow.client, &source, None, global, bucket) {
            Gate::Continue => {}
            Gate::Refuse => return Some(xdp_action::XDP_DROP),
            Gate::Allowed | Gate::WouldBlock => return None,
        }
    }
    if !rst::can_reject(seg) {
        count(bucket, Counter::CookieFallbacks);
        return None;
    }
    let Some(cookie) = gen_cookie(ctx, seg, &flow) else {
        count(bucket, Counter::CookieFallbacks);
        return None;
    };
    // gen_cookie left the SYN's headers in the scratch space, where write_synack reads them.
    if write_synack(frame, seg, global, cookie).is_none() {
        count(bucket, Counter::CookieFallbacks);
        return None;
    }
    count(bucket, Counter::CookiesSent);
    Some(xdp_action::XDP_TX)
}

/// The kernel's cookie for this SYN from the flow's listener (which notes, as the kernel does
/// when it sends one itself, that cookies are in use, so it accepts their ACKs); negative when
/// there is none.
#[inline(always)]
fn gen_cookie(ctx: &XdpContext, seg: &TcpSegment, flow: &FlowKey) -> Option<u32> {
    let sk = Sock::lookup(ctx, flow)?;
    if !sk.listening() {
        return None;
    }
    let (s, ip_len) = scratch_headers(ctx, seg, seg.header_len)?;
    // SAFETY: the scratch value holds both headers; the socket reference is live.
    let r = unsafe {
        bpf_tcp_gen_syncookie(
            sk.0.cast(),
            (*s).ip.as_mut_ptr().cast(),
            ip_len,
            (*s).tcp.as_mut_ptr().cast::<tcphdr>(),
            seg.header_len,
        )
    };
    drop(sk);
    (r >= 0).then_some(r as u32)
}

/// Rewrites the SYN into the SYN-ACK carrying `cookie`, in place. The scratch space must hold
/// the SYN's TCP header ([`scratch_headers`]).
#[inline(always)]
fn write_synack(
    frame: &HelperFrame,
    seg: &TcpSegment,
    global: &GlobalConfig,
    cookie: u32,
) -> Option<()> {
    let io = frame;
    // The coarse clock (the last tick's time): a precise reading is a TSC read, which costs a
    // virtual machine ~25 ns per SYN-ACK. It lags the kernel's TCP clock by at most a tick, the
    // safe side (see `cookie_tsval`).
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // Built in the scratch space (the stack is too small): headers, then the checksum.
    // SAFETY: a live per-CPU value, used by this CPU only meanwhile.
    let s = unsafe { &mut *WSG_SCRATCH.get_ptr_mut(0)? };
    // The SYN's options, from the copy of its TCP header gen_cookie made, before the SYN-ACK
    // is built over it.
    s.options = SynOptions::default();
    s.cursor = OptionCursor::new(0, seg.header_len);
    // The callback looks the scratch value up itself: bpf_loop passes only stack pointers.
    let mut unused = 0u64;
    // SAFETY: a callback of bpf_loop's type; its context is live for the call.
    unsafe {
        bpf_loop(
            MAX_OPTION_BYTES as u32,
            read_option as *mut c_void,
            (&raw mut unused).cast(),
            0,
        )
    };
    let options = s.options;
    let (ip_buf, tcp_buf) = (&mut s.ip, &mut s.tcp);
    let tcp: &mut [u8; syncookie::SYNACK_TCP_MAX] = (&mut tcp_buf[..syncookie::SYNACK_TCP_MAX])
        .try_into()
        .ok()?;
    let len = syncookie::synack_tcp(seg, &options, &global.cookie, cookie, now, tcp);
    let sum = if seg.family == AF_INET {
        let ip: &mut [u8; 20] = (&mut ip_buf[..20]).try_into().ok()?;
        *ip = io.load(seg.l3)?;
        reply::ipv4_in_place(ip, len as u16);
        io.store(seg.l3, ip)?;
        reply::tcp_checksum_v4(ip, tcp, len as u16)
    } else {
        *ip_buf = io.load(seg.l3)?;
        reply::ipv6_in_place(ip_buf, len as u16);
        io.store(seg.l3, ip_buf)?;
        reply::tcp_checksum_v6(ip_buf, tcp, len as u16)
    };
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let macs = frame.load::<[u8; 12]>(0)?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    frame.store(0, &swapped)?;
    // The header and its options in one store of `len` bytes (20 to 40, inside the scratch).
    if !(20..=syncookie::SYNACK_TCP_MAX).contains(&len) || seg.l4 > MAX_HEADER_OFFSET {
        return None;
    }
    // SAFETY: `len` bytes of the scratch value; the helper checks the frame's bounds.
    let stored = unsafe {
        bpf_xdp_store_bytes(
            frame.0.ctx,
            seg.l4 as u32,
            tcp.as_mut_ptr().cast(),
            len as u32,
        )
    };
    if stored != 0 {
        return None;
    }
    xdp::shrink(frame.0, (seg.l4 + len) as i32 - frame.len() as i32)
}

/// One round of reading the SYN's options (see `ws_guard_common::syncookie::option_step`),
/// from `bpf_loop`: 0 to go on, 1 to stop.
#[inline(never)]
extern "C" fn read_option(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = WSG_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: a live per-CPU value, used by this CPU only meanwhile.
    let s = unsafe { &mut *s };
    if syncookie::option_step(&s.tcp[..], &mut s.cursor, &mut s.options) {
        0
    } else {
        1
    }
}

/// A segment with ACK (and neither SYN nor RST) to a port in cookie mode: dropped when its
/// cookie is invalid or replayed, [`JUDGE`] when it is valid; `None` for the traffic of a
/// connection or handshake the kernel knows, which passes.
#[inline(always)]
fn ack_action(frame: &HelperFrame, seg: &TcpSegment, bucket: Bucket) -> Option<u32> {
    let ctx = frame.0;
    let flow = parse::flow(frame, seg)?;
    let sk = Sock::lookup(ctx, &flow)?;
    if !sk.listening() {
        return None;
    }
    // Judged at its SYN (a source with state; the kernel answered with its own cookie).
    // SAFETY: the lookup only tests presence.
    if unsafe {
        WSG_FLOWS
            .get(&flow)
            .is_some_and(|v| v.state() == FLOW_PENDING)
    } {
        return None;
    }
    let (s, ip_len) = scratch_headers(ctx, seg, 20)?;
    // SAFETY: the scratch value holds both headers; the socket reference is live.
    let r = unsafe {
        bpf_tcp_check_syncookie(
            sk.0.cast(),
            (*s).ip.as_mut_ptr().cast(),
            ip_len,
            (*s).tcp.as_mut_ptr().cast::<tcphdr>(),
            20,
        )
    };
    drop(sk);
    if r != 0 {
        count(bucket, Counter::CookieAcksInvalid);
        return Some(xdp_action::XDP_DROP);
    }
    let cookie = seg.ack.wrapping_sub(1);
    // SAFETY: read at once.
    if unsafe { WSG_COOKIES.get(&flow) } == Some(&cookie) {
        count(bucket, Counter::CookieAcksReplayed);
        return Some(xdp_action::XDP_DROP);
    }
    count(bucket, Counter::CookieAcksValid);
    // SAFETY: a live per-CPU value, used by this CPU only until the judgement is done.
    unsafe {
        (*s).flow = flow;
        (*s).cookie = cookie;
    }
    Some(JUDGE)
}
