//! The benchmark's own tiny XDP programs, assembled from raw instructions, and the few `bpf(2)`
//! commands it needs on them (and on ws-guard's program): load, BPF_PROG_TEST_RUN, attach by
//! link, and the run statistics from `/proc/self/fdinfo`.
//!
//! Why raw instructions rather than more `#[xdp]` functions in ws-guard-ebpf: these programs
//! are measuring instruments, not part of the product. Kept out of ws-guard's object, they
//! neither change what `Guard::load` loads and verifies nor appear in the daemon's binary, and
//! the floor is exactly two instructions (`r0 = XDP_PASS; exit`), with no compiler between the
//! source and what the kernel runs. The generator is small enough (about 40 instructions) to
//! read as assembly, and the smoke test checks its output frames byte by byte.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use anyhow::{Context as _, bail};

/// XDP verdicts.
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
/// `enum bpf_attach_type`: BPF_XDP.
const BPF_XDP: u32 = 37;
/// `BPF_F_TEST_XDP_LIVE_FRAMES`.
const TEST_XDP_LIVE_FRAMES: u32 = 2;
/// `XDP_FLAGS_DRV_MODE`: native XDP (veth has it).
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
/// `bpf_get_prandom_u32`.
const HELPER_GET_PRANDOM_U32: i32 = 7;
/// `bpf_tail_call`.
const HELPER_TAIL_CALL: i32 = 12;
/// `bpf_map_lookup_elem`, `bpf_map_update_elem`.
const HELPER_MAP_LOOKUP: i32 = 1;
const HELPER_MAP_UPDATE: i32 = 2;
const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
/// `src_reg` of a 64-bit immediate load that names a map by file descriptor.
const BPF_PSEUDO_MAP_FD: u8 = 1;

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    /// dst in the low nibble, src in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

// Instruction classes, sizes, modes and operations (include/uapi/linux/bpf_common.h, bpf.h).
const LD: u8 = 0x00;
const LDX: u8 = 0x01;
const STX: u8 = 0x03;
const ALU: u8 = 0x04;
const JMP: u8 = 0x05;
const ALU64: u8 = 0x07;
const W: u8 = 0x00;
const DW: u8 = 0x18;
const IMM: u8 = 0x00;
const H: u8 = 0x08;
const B: u8 = 0x10;
const MEM: u8 = 0x60;
const ATOMIC: u8 = 0xc0;
const K: u8 = 0x00;
const X: u8 = 0x08;
const ADD: u8 = 0x00;
const SUB: u8 = 0x10;
const OR: u8 = 0x40;
const AND: u8 = 0x50;
const RSH: u8 = 0x70;
const MOV: u8 = 0xb0;
const END: u8 = 0xd0;
const TO_BE: u8 = 0x08;
const JA: u8 = 0x00;
const JEQ: u8 = 0x10;
const JGT: u8 = 0x20;
const JNE: u8 = 0x50;
const CALL: u8 = 0x80;
const EXIT: u8 = 0x90;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

/// A minimal assembler: one method per instruction form used here.
#[derive(Default)]
struct Asm(Vec<Insn>);

impl Asm {
    fn mov_imm(&mut self, dst: u8, imm: i32) -> &mut Self {
        self.0.push(insn(ALU64 | MOV | K, dst, 0, 0, imm));
        self
    }
    fn mov(&mut self, dst: u8, src: u8) -> &mut Self {
        self.0.push(insn(ALU64 | MOV | X, dst, src, 0, 0));
        self
    }
    fn alu_imm(&mut self, op: u8, dst: u8, imm: i32) -> &mut Self {
        self.0.push(insn(ALU64 | op | K, dst, 0, 0, imm));
        self
    }
    fn alu(&mut self, op: u8, dst: u8, src: u8) -> &mut Self {
        self.0.push(insn(ALU64 | op | X, dst, src, 0, 0));
        self
    }
    /// `dst = htobe16(dst)` (zero-extended).
    fn be16(&mut self, dst: u8) -> &mut Self {
        self.0.push(insn(ALU | END | TO_BE, dst, 0, 0, 16));
        self
    }
    /// `dst = imm` (64 bits).
    fn ld_imm64(&mut self, dst: u8, imm: u64) -> &mut Self {
        self.0
            .push(insn(LD | DW | IMM, dst, 0, 0, imm as u32 as i32));
        self.0.push(insn(0, 0, 0, 0, (imm >> 32) as u32 as i32));
        self
    }
    /// `*(u64 *)(dst + off) = src`.
    fn stx_dw(&mut self, dst: u8, off: i16, src: u8) -> &mut Self {
        self.0.push(insn(STX | MEM | DW, dst, src, off, 0));
        self
    }
    /// `*(u32 *)(dst + off) = src`.
    fn stx_w(&mut self, dst: u8, off: i16, src: u8) -> &mut Self {
        self.0.push(insn(STX | MEM | W, dst, src, off, 0));
        self
    }
    /// `*(u8 *)(dst + off) = src`.
    fn stx_b(&mut self, dst: u8, off: i16, src: u8) -> &mut Self {
        self.0.push(insn(STX | MEM | B, dst, src, off, 0));
        self
    }
    /// Writes `bytes` at `data + 0` (register `data`), 8 bytes at a time.
    fn store_bytes(&mut self, data: u8, bytes: &[u8]) -> &mut Self {
        const T: u8 = 5;
        let mut at = 0;
        while at < bytes.len() {
            let n = match bytes.len() - at {
                8.. => 8,
                4..=7 => 4,
                2..=3 => 2,
                _ => 1,
            };
            let mut v = [0u8; 8];
            v[..n].copy_from_slice(&bytes[at..at + n]);
            self.ld_imm64(T, u64::from_le_bytes(v));
            match n {
                8 => self.stx_dw(data, at as i16, T),
                4 => self.stx_w(data, at as i16, T),
                2 => self.stx_h(data, at as i16, T),
                _ => self.stx_b(data, at as i16, T),
            };
            at += n;
        }
        self
    }
    /// `dst = map` (a map file descriptor, resolved by the kernel at load).
    fn ld_map_fd(&mut self, dst: u8, fd: i32) -> &mut Self {
        self.0
            .push(insn(LD | DW | IMM, dst, BPF_PSEUDO_MAP_FD, 0, fd));
        self.0.push(insn(0, 0, 0, 0, 0));
        self
    }
    fn ldx_w(&mut self, dst: u8, src: u8, off: i16) -> &mut Self {
        self.0.push(insn(LDX | MEM | W, dst, src, off, 0));
        self
    }
    fn stx_h(&mut self, dst: u8, off: i16, src: u8) -> &mut Self {
        self.0.push(insn(STX | MEM | H, dst, src, off, 0));
        self
    }
    fn ldx_h(&mut self, dst: u8, src: u8, off: i16) -> &mut Self {
        self.0.push(insn(LDX | MEM | H, dst, src, off, 0));
        self
    }
    fn ldx_b(&mut self, dst: u8, src: u8, off: i16) -> &mut Self {
        self.0.push(insn(LDX | MEM | B, dst, src, off, 0));
        self
    }
    fn ldx_dw(&mut self, dst: u8, src: u8, off: i16) -> &mut Self {
        self.0.push(insn(LDX | MEM | DW, dst, src, off, 0));
        self
    }
    /// `lock *(u64 *)(dst + off) += src`.
    fn atomic_add_dw(&mut self, dst: u8, off: i16, src: u8) -> &mut Self {
        self.0
            .push(insn(STX | ATOMIC | DW, dst, src, off, ADD as i32));
        self
    }
    /// `goto ?`: returns the jump's index, to patch.
    fn ja(&mut self) -> usize {
        self.0.push(insn(JMP | JA, 0, 0, 0, 0));
        self.0.len() - 1
    }
    /// `if dst > imm goto +off` (unsigned).
    fn jgt_imm(&mut self, dst: u8, imm: i32, off: i16) -> &mut Self {
        self.0.push(insn(JMP | JGT | K, dst, 0, off, imm));
        self
    }
    /// Sets the offset of the jump at `at` so it lands on the next instruction emitted.
    fn land(&mut self, at: usize) {
        self.0[at].off = (self.0.len() - at - 1) as i16;
    }
    /// `r2 = data, r3 = data_end`, then [`Asm::bounds`]`(len)`.
    fn frame(&mut self, len: i32) -> usize {
        self.ldx_w(2, 1, 0).ldx_w(3, 1, 4);
        self.bounds(len)
    }
    /// `if r2 + len > r3 goto ?` (r4 as scratch): returns the jump's index, to patch.
    fn bounds(&mut self, len: i32) -> usize {
        self.mov(4, 2).alu_imm(ADD, 4, len);
        let j = self.0.len();
        self.jgt(4, 3, 0);
        j
    }
    /// `if dst == imm goto +off`.
    fn jeq_imm(&mut self, dst: u8, imm: i32, off: i16) -> &mut Self {
        self.0.push(insn(JMP | JEQ | K, dst, 0, off, imm));
        self
    }
    /// `if dst != imm goto +off`.
    fn jne_imm(&mut self, dst: u8, imm: i32, off: i16) -> &mut Self {
        self.0.push(insn(JMP | JNE | K, dst, 0, off, imm));
        self
    }
    fn jgt(&mut self, dst: u8, src: u8, off: i16) -> &mut Self {
        self.0.push(insn(JMP | JGT | X, dst, src, off, 0));
        self
    }
    fn call(&mut self, helper: i32) -> &mut Self {
        self.0.push(insn(JMP | CALL, 0, 0, 0, helper));
        self
    }
    fn exit(&mut self) -> &mut Self {
        self.0.push(insn(JMP | EXIT, 0, 0, 0, 0));
        self
    }
    /// Stores the 16-bit value in `value` big-endian at `data + off`, and `0xffff - value` at
    /// `data + comp_off`. The two words add up to 0xffff (one's-complement zero) whatever the
    /// value, so a checksum covering both words is unchanged: the template holds 0 and 0xffff.
    fn store_compensated(&mut self, data: u8, value: u8, off: i16, comp_off: &[i16]) -> &mut Self {
        const T: u8 = 5;
        self.mov(T, value).be16(T).stx_h(data, off, T);
        for c in comp_off {
            self.mov_imm(T, 0xffff)
                .alu(SUB, T, value)
                .be16(T)
                .stx_h(data, *c, T);
        }
        self
    }
}

/// `r0 = XDP_PASS; exit`: the floor.
pub fn pass_program() -> Vec<Insn> {
    let mut a = Asm::default();
    a.mov_imm(0, XDP_PASS as i32).exit();
    a.0
}

/// `r0 = XDP_DROP; exit`: the ceiling of a receiver, and the sink of replies at the generator.
pub fn drop_program() -> Vec<Insn> {
    let mut a = Asm::default();
    a.mov_imm(0, XDP_DROP as i32).exit();
    a.0
}

/// `XDP_TX` of everything, an IPv4 frame's addresses swapped first: the least a receiver that
/// answers every frame (as SYN-cookie mode answers every forged SYN) costs this bed. The reply
/// goes back through the veth pair to the generator's sink, which drops it: an IPv4 reply is
/// addressed to the flood's source (not 198.18.0.0/16), and the sink drops every IPv6 frame.
pub fn tx_program() -> Vec<Insn> {
    let mut a = Asm::default();
    // Ethernet + an IPv4 header without options.
    let short = a.frame(34);
    // The EtherType, loaded little-endian: 0x0008 is IPv4.
    a.ldx_h(5, 2, 12);
    let not_v4 = a.0.len();
    a.jne_imm(5, 0x0008, 0);
    a.ldx_w(5, 2, 26).ldx_w(6, 2, 30);
    a.stx_w(2, 26, 6).stx_w(2, 30, 5);
    a.land(short);
    a.land(not_v4);
    a.mov_imm(0, XDP_TX as i32).exit();
    a.0
}

/// Emits the read of a frame as far as its TCP destination port (Ethernet type, IPv4 or IPv6
/// without options or extension headers, the protocol, the port): `on_v4` follows the checks of
/// an IPv4 frame to `port` (it must jump or exit: the IPv6 checks come next), `on_v6` those of
/// an IPv6 one (it may fall through). Returns the jumps of every other frame, to patch to a
/// pass.
fn to_the_port(
    a: &mut Asm,
    port: u16,
    on_v4: impl FnOnce(&mut Asm),
    on_v6: impl FnOnce(&mut Asm),
) -> Vec<usize> {
    // The port as a little-endian load of its two bytes in network order reads it.
    let port_le = i32::from(u16::from_le_bytes(port.to_be_bytes()));
    let mut to_pass = Vec::new();
    // IPv4: Ethernet (14) + IPv4 (20) + the TCP ports (4).
    to_pass.push(a.frame(38));
    a.ldx_h(5, 2, 12);
    let v6 = a.0.len();
    a.jeq_imm(5, 0xdd86, 0);
    to_pass.push(a.0.len());
    a.jne_imm(5, 0x0008, 0);
    a.ldx_b(5, 2, 23);
    to_pass.push(a.0.len());
    a.jne_imm(5, 6, 0);
    a.ldx_h(5, 2, 36);
    to_pass.push(a.0.len());
    a.jne_imm(5, port_le, 0);
    on_v4(a);
    // IPv6: Ethernet (14) + IPv6 (40) + the TCP ports (4).
    a.land(v6);
    to_pass.push(a.bounds(58));
    a.ldx_b(5, 2, 20);
    to_pass.push(a.0.len());
    a.jne_imm(5, 6, 0);
    a.ldx_h(5, 2, 56);
    to_pass.push(a.0.len());
    a.jne_imm(5, port_le, 0);
    on_v6(a);
    to_pass
}

/// XDP_DROP of TCP to `port` after reading the frame as far as the port ([`to_the_port`]),
/// XDP_PASS of anything else: the least a receiver that tells a flood's SYNs from other traffic
/// costs this bed. Unlike [`drop_program`] it touches the frame's bytes, as any limiter must.
pub fn parse_drop_program(port: u16) -> Vec<Insn> {
    let mut a = Asm::default();
    let drop = |a: &mut Asm| {
        a.mov_imm(0, XDP_DROP as i32).exit();
    };
    let to_pass = to_the_port(&mut a, port, drop, drop);
    for j in to_pass {
        a.land(j);
    }
    a.mov_imm(0, XDP_PASS as i32).exit();
    a.0
}

/// Attempts [`minimal_limiter_program`] lets through from one address before it drops.
pub const MINIMAL_LIMIT: i32 = 3;

/// The least a per-source limiter does, as the issue that set the flood targets measured it
/// ("one LRU lookup and a counter, nothing else"): read the frame as far as the port
/// ([`to_the_port`]), look the source address up in `sources` (an LRU hash of
/// [`SourceCounts`]: 16-byte key, IPv4 in the first four bytes, 8-byte count), add one to its
/// count with an atomic add (CPUs share the entry) or insert it at one, and drop TCP to `port`
/// from an address counted more than [`MINIMAL_LIMIT`] times. No time window, no connection
/// accounting, no retransmission check, no refusal counters, no verdict but drop or pass: a
/// lower bound on the work of any limiter that keeps a count per source in a shared map.
pub fn minimal_limiter_program(port: u16, sources: &SourceCounts) -> Vec<Insn> {
    let map = sources.fd.as_raw_fd();
    let mut a = Asm::default();
    let mut v4_done = 0;
    // The key at r10 - 16: the IPv4 source (a zero-extended load) then zeros, or the IPv6
    // source.
    let mut to_pass = to_the_port(
        &mut a,
        port,
        |a| {
            a.ldx_w(5, 2, 26).stx_dw(10, -16, 5);
            a.mov_imm(5, 0).stx_dw(10, -8, 5);
            v4_done = a.ja();
        },
        |a| {
            a.ldx_dw(5, 2, 22).stx_dw(10, -16, 5);
            a.ldx_dw(5, 2, 30).stx_dw(10, -8, 5);
        },
    );
    a.land(v4_done);
    a.ld_map_fd(1, map).mov(2, 10).alu_imm(ADD, 2, -16);
    a.call(HELPER_MAP_LOOKUP);
    let absent = a.0.len();
    a.jeq_imm(0, 0, 0);
    a.mov_imm(1, 1).atomic_add_dw(0, 0, 1).ldx_dw(1, 0, 0);
    let over = a.0.len();
    a.jgt_imm(1, MINIMAL_LIMIT, 0);
    to_pass.push(a.ja());
    a.land(absent);
    a.mov_imm(1, 1).stx_dw(10, -24, 1);
    a.ld_map_fd(1, map)
        .mov(2, 10)
        .alu_imm(ADD, 2, -16)
        .mov(3, 10)
        .alu_imm(ADD, 3, -24)
        .mov_imm(4, 0);
    a.call(HELPER_MAP_UPDATE);
    to_pass.push(a.ja());
    a.land(over);
    a.mov_imm(0, XDP_DROP as i32).exit();
    for j in to_pass {
        a.land(j);
    }
    a.mov_imm(0, XDP_PASS as i32).exit();
    a.0
}

/// The generator side's sink: XDP_DROP of the flood's replies (everything), except ARP and
/// IPv4 to 198.18.0.0/16 (the generator's own address and the legitimate clients'), which it
/// passes to the stack, so real clients can connect from the generator's side during a flood.
/// The flood's replies go to 198.19.0.0/16 and 2001:2:0:1::/64: dropped after about 10
/// instructions.
pub fn sink_program() -> Vec<Insn> {
    let mut a = Asm::default();
    // Ethernet + an IPv4 header without options.
    let short = a.frame(34);
    // The EtherType, loaded little-endian: 0x0008 is IPv4, 0x0608 ARP.
    a.ldx_h(5, 2, 12);
    let arp = a.0.len();
    a.jeq_imm(5, 0x0608, 0);
    let not_v4 = a.0.len();
    a.jne_imm(5, 0x0008, 0);
    // The destination address's first two bytes, 198.18 (c6 12), loaded little-endian.
    a.ldx_h(5, 2, 30);
    let ours = a.0.len();
    a.jeq_imm(5, 0x12c6, 0);
    a.land(not_v4);
    a.mov_imm(0, XDP_DROP as i32).exit();
    // A frame too short for the checks is an ARP frame or a runt: pass it (ARP is 42 bytes).
    for j in [short, arp, ours] {
        a.land(j);
    }
    a.mov_imm(0, XDP_PASS as i32).exit();
    a.0
}

/// What the generator varies in each frame it sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenMode {
    /// IPv4 template; a random source port (32768..=65535) per frame.
    OneSourceV4,
    /// IPv4 template; the low 16 bits of the source address random (the template's low 16
    /// bits must be zero), and a random source port.
    RandomV4x16,
    /// IPv6 template; the low 20 bits of the source address random (the template's last 32
    /// bits must be zero), and a random source port.
    RandomV6x20,
}

/// Offsets in a frame without VLAN tags, IPv4 without options or IPv6 without extension
/// headers.
mod off {
    pub const V4_ID: i16 = 14 + 4;
    pub const V4_SRC_LO: i16 = 14 + 14;
    pub const V4_TCP: i16 = 14 + 20;
    pub const V6_SRC_W6: i16 = 14 + 8 + 12;
    pub const V6_SRC_W7: i16 = 14 + 8 + 14;
    pub const V6_TCP: i16 = 14 + 40;
    pub const SPORT: i16 = 0;
    pub const SEQ_HI: i16 = 4;
    pub const SEQ_LO: i16 = 6;
    pub const WINDOW: i16 = 14;
}

/// Words of the template [`generator_program`] expects: these must hold 0 (the varied
/// fields) or 0xffff (their compensating fields), so the checksums of the template stay valid.
pub fn generator_template_words(mode: GenMode) -> Vec<(usize, u16)> {
    let tcp = |o: i16, base: i16| (base + o) as usize;
    match mode {
        GenMode::OneSourceV4 => vec![
            (tcp(off::SPORT, off::V4_TCP), 0),
            (tcp(off::SEQ_LO, off::V4_TCP), 0xffff),
        ],
        GenMode::RandomV4x16 => vec![
            (tcp(off::SPORT, off::V4_TCP), 0),
            (tcp(off::SEQ_LO, off::V4_TCP), 0xffff),
            (off::V4_SRC_LO as usize, 0),
            (off::V4_ID as usize, 0xffff),
            (tcp(off::SEQ_HI, off::V4_TCP), 0xffff),
        ],
        GenMode::RandomV6x20 => vec![
            (tcp(off::SPORT, off::V6_TCP), 0),
            (tcp(off::SEQ_LO, off::V6_TCP), 0xffff),
            (off::V6_SRC_W6 as usize, 0),
            (tcp(off::WINDOW, off::V6_TCP), 0xffff),
            (off::V6_SRC_W7 as usize, 0),
            (tcp(off::SEQ_HI, off::V6_TCP), 0xffff),
        ],
    }
}

/// The SYN-flood generator: writes the whole `template` frame over the frame it is given, then
/// the varied fields with fresh random values, and returns XDP_TX (with live frames, the frame
/// goes out of the device given as `ingress_ifindex`). The whole frame is written every time
/// because live-frames mode recycles pages without restoring their bytes, and a receiver may
/// have rewritten them (ws-guard's `reject` turns a SYN into an RST in place); `template` must
/// therefore be as long as any such rewrite leaves the frame (a SYN without TCP options is as
/// long as ws-guard's RST reply). Every varied 16-bit word is paired with a compensating word
/// covered by the same checksums (the IPv4 identification for the IPv4 header checksum; the
/// sequence number or the window for the TCP checksum), so both checksums stay valid without
/// being computed; [`generator_template_words`] says what the template must hold there.
/// Frames shorter than the template are dropped.
pub fn generator_program(mode: GenMode, template: &[u8]) -> Vec<Insn> {
    let tcp = match mode {
        GenMode::OneSourceV4 | GenMode::RandomV4x16 => off::V4_TCP,
        GenMode::RandomV6x20 => off::V6_TCP,
    };
    let mut a = Asm::default();
    // r6 = ctx; r7, r9 = random; r2 = data, r3 = data_end.
    a.mov(6, 1);
    a.call(HELPER_GET_PRANDOM_U32).mov(7, 0);
    a.call(HELPER_GET_PRANDOM_U32).mov(9, 0);
    a.ldx_w(2, 6, 0).ldx_w(3, 6, 4);
    a.mov(4, 2).alu_imm(ADD, 4, template.len() as i32);
    // if data + len > data_end: drop (the offset is set once the body is laid out).
    let jgt_at = a.0.len();
    a.jgt(4, 3, 0);
    a.store_bytes(2, template);
    // Source port: 0x8000 | random 15 bits.
    a.mov(8, 9)
        .alu_imm(AND, 8, 0x7fff)
        .alu_imm(OR, 8, 0x8000)
        .store_compensated(2, 8, tcp + off::SPORT, &[tcp + off::SEQ_LO]);
    match mode {
        GenMode::OneSourceV4 => {}
        GenMode::RandomV4x16 => {
            a.mov(8, 7).alu_imm(AND, 8, 0xffff).store_compensated(
                2,
                8,
                off::V4_SRC_LO,
                &[off::V4_ID, tcp + off::SEQ_HI],
            );
        }
        GenMode::RandomV6x20 => {
            a.mov(8, 7)
                .alu_imm(RSH, 8, 16)
                .alu_imm(AND, 8, 0xf)
                .store_compensated(2, 8, off::V6_SRC_W6, &[tcp + off::WINDOW]);
            a.mov(8, 7).alu_imm(AND, 8, 0xffff).store_compensated(
                2,
                8,
                off::V6_SRC_W7,
                &[tcp + off::SEQ_HI],
            );
        }
    }
    a.mov_imm(0, XDP_TX as i32).exit();
    a.land(jgt_at);
    a.mov_imm(0, XDP_DROP as i32).exit();
    a.0
}

/// The address family of [`tail_prelude_program`]'s frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// A prelude that gives every run of a repeated BPF_PROG_TEST_RUN a new connection from the
/// same source: it writes a random TCP source port and random low 16 bits of the destination
/// address (the flow key changes, the source key does not), then tail-calls the program in
/// slot 0 of `prog_array`. Checksums are not kept: nothing it calls looks at them. If the tail
/// call fails it returns XDP_ABORTED, which the caller checks for.
pub fn tail_prelude_program(family: Family, prog_array: &ProgArray) -> Vec<Insn> {
    let (tcp, dst_lo) = match family {
        Family::V4 => (off::V4_TCP, 14 + 18),
        Family::V6 => (off::V6_TCP, 14 + 24 + 14),
    };
    let mut a = Asm::default();
    a.mov(6, 1);
    a.call(HELPER_GET_PRANDOM_U32).mov(7, 0);
    a.ldx_w(2, 6, 0).ldx_w(3, 6, 4);
    a.mov(4, 2).alu_imm(ADD, 4, (tcp + 20) as i32);
    let jgt_at = a.0.len();
    a.jgt(4, 3, 0);
    a.mov(8, 7)
        .alu_imm(AND, 8, 0xffff)
        .be16(8)
        .stx_h(2, tcp + off::SPORT, 8);
    a.mov(8, 7)
        .alu_imm(RSH, 8, 16)
        .alu_imm(AND, 8, 0xffff)
        .be16(8)
        .stx_h(2, dst_lo, 8);
    a.mov(1, 6)
        .ld_map_fd(2, prog_array.fd.as_raw_fd())
        .mov_imm(3, 0);
    a.call(HELPER_TAIL_CALL);
    a.land(jgt_at);
    a.mov_imm(0, XDP_ABORTED as i32).exit();
    a.0
}

/// A one-slot BPF_MAP_TYPE_PROG_ARRAY, for [`tail_prelude_program`].
pub struct ProgArray {
    fd: OwnedFd,
}

impl ProgArray {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            fd: create_map(BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 1, "wsgb_tails")
                .context("creating a program array")?,
        })
    }

    /// Puts `prog` in slot 0.
    pub fn set(&self, prog: BorrowedFd<'_>) -> anyhow::Result<()> {
        #[repr(C)]
        #[derive(Default)]
        struct Attr {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
            _rest: [u64; 4],
        }
        let key = 0u32;
        let value = prog.as_raw_fd() as u32;
        let mut attr = Attr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: &key as *const u32 as u64,
            value: &value as *const u32 as u64,
            ..Default::default()
        };
        sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr).context("setting the tail-call target")?;
        Ok(())
    }
}

/// The map of [`minimal_limiter_program`]: an LRU hash, source address to count.
pub struct SourceCounts {
    fd: OwnedFd,
}

impl SourceCounts {
    pub fn new(capacity: u32) -> anyhow::Result<Self> {
        Ok(Self {
            fd: create_map(BPF_MAP_TYPE_LRU_HASH, 16, 8, capacity, "wsgb_counts")
                .context("creating the minimal limiter's LRU map")?,
        })
    }
}

/// BPF_MAP_CREATE of a map without flags.
fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    name: &str,
) -> io::Result<OwnedFd> {
    #[repr(C)]
    #[derive(Default)]
    struct Attr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
        numa_node: u32,
        map_name: [u8; 16],
        // Named so the struct has no padding: every byte the kernel reads is zeroed.
        map_ifindex: u32,
        _rest: [u64; 8],
    }
    let mut attr = Attr {
        map_type,
        key_size,
        value_size,
        max_entries,
        ..Default::default()
    };
    let n = name.len().min(15);
    attr.map_name[..n].copy_from_slice(&name.as_bytes()[..n]);
    let fd = sys_bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A loaded program of the benchmark's own.
pub struct RawProgram {
    fd: OwnedFd,
    pub name: String,
}

impl RawProgram {
    /// Loads an XDP program (expected attach type BPF_XDP, so it can also be attached).
    pub fn load_xdp(name: &str, insns: &[Insn]) -> anyhow::Result<Self> {
        #[repr(C)]
        #[derive(Default)]
        struct Attr {
            prog_type: u32,
            insn_cnt: u32,
            insns: u64,
            license: u64,
            log_level: u32,
            log_size: u32,
            log_buf: u64,
            kern_version: u32,
            prog_flags: u32,
            prog_name: [u8; 16],
            prog_ifindex: u32,
            expected_attach_type: u32,
            _rest: [u64; 8],
        }
        let license = c"GPL";
        let mut log = vec![0u8; 1 << 16];
        let mut attr = Attr {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            expected_attach_type: BPF_XDP,
            ..Default::default()
        };
        let n = name.len().min(15);
        attr.prog_name[..n].copy_from_slice(&name.as_bytes()[..n]);
        let fd = sys_bpf(BPF_PROG_LOAD, &mut attr).map_err(|e| {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            anyhow::anyhow!(
                "loading the benchmark program {name}: {e}; verifier log:\n{}",
                String::from_utf8_lossy(&log[..end])
            )
        })?;
        // SAFETY: BPF_PROG_LOAD returned a new file descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Self {
            fd,
            name: name.to_owned(),
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// Attaches the program in native mode to interface `ifindex` of the calling thread's
    /// network namespace. Detached when the returned link is dropped.
    pub fn attach(&self, ifindex: u32) -> anyhow::Result<OwnedFd> {
        #[repr(C)]
        #[derive(Default)]
        struct Attr {
            prog_fd: u32,
            target_ifindex: u32,
            attach_type: u32,
            flags: u32,
            _rest: [u64; 6],
        }
        let mut attr = Attr {
            prog_fd: self.fd.as_raw_fd() as u32,
            target_ifindex: ifindex,
            attach_type: BPF_XDP,
            flags: XDP_FLAGS_DRV_MODE,
            ..Default::default()
        };
        let fd = sys_bpf(BPF_LINK_CREATE, &mut attr)
            .with_context(|| format!("attaching {} to interface {ifindex}", self.name))?;
        // SAFETY: a new file descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }
}

/// The result of one BPF_PROG_TEST_RUN.
#[derive(Clone, Copy, Debug)]
pub struct RunResult {
    pub retval: u32,
    /// The kernel's average per run, in whole nanoseconds.
    pub duration_ns: u32,
    pub data_size_out: u32,
}

/// What to run: the frame, how often, and whether frames go out for real.
#[derive(Default)]
pub struct TestRun<'a> {
    pub data_in: &'a [u8],
    pub data_out: Option<&'a mut [u8]>,
    pub repeat: u32,
    /// `Some((ingress_ifindex, batch_size))`: BPF_F_TEST_XDP_LIVE_FRAMES.
    pub live: Option<(u32, u32)>,
}

/// BPF_PROG_TEST_RUN of any XDP program (ws-guard's or the benchmark's own), the same way.
pub fn test_run(prog: BorrowedFd<'_>, run: TestRun<'_>) -> anyhow::Result<RunResult> {
    #[repr(C)]
    #[derive(Default)]
    struct Attr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
        _rest: [u64; 4],
    }
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex.
    let mut ctx = [0u32; 6];
    let mut attr = Attr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: run.data_in.len() as u32,
        data_in: run.data_in.as_ptr() as u64,
        repeat: run.repeat,
        ..Default::default()
    };
    if let Some(out) = run.data_out {
        attr.data_out = out.as_mut_ptr() as u64;
        attr.data_size_out = out.len() as u32;
    }
    if let Some((ifindex, batch)) = run.live {
        ctx[1] = run.data_in.len() as u32;
        ctx[3] = ifindex;
        attr.ctx_in = ctx.as_ptr() as u64;
        attr.ctx_size_in = std::mem::size_of_val(&ctx) as u32;
        attr.flags = TEST_XDP_LIVE_FRAMES;
        attr.batch_size = batch;
    }
    sys_bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN")?;
    Ok(RunResult {
        retval: attr.retval,
        duration_ns: attr.duration,
        data_size_out: attr.data_size_out,
    })
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, writable, correctly laid out bpf_attr prefix of its own size;
    // every pointer in it points to memory that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A program's run statistics (kept by the kernel while BPF stats are enabled).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

impl RunStats {
    /// Nanoseconds per run between two readings.
    pub fn ns_per_run_since(&self, before: &RunStats) -> Option<f64> {
        let n = self.run_cnt.checked_sub(before.run_cnt)?;
        let t = self.run_time_ns.checked_sub(before.run_time_ns)?;
        (n > 0).then(|| t as f64 / n as f64)
    }
}

/// `key: value` lines of `/proc/self/fdinfo/FD`.
pub fn fdinfo(fd: BorrowedFd<'_>) -> anyhow::Result<Vec<(String, String)>> {
    let path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect())
}

fn fdinfo_u64(info: &[(String, String)], key: &str) -> anyhow::Result<u64> {
    let Some((_, v)) = info.iter().find(|(k, _)| k == key) else {
        bail!("fdinfo has no {key}");
    };
    v.parse().with_context(|| format!("fdinfo {key}: {v:?}"))
}

/// Run statistics of the program behind `fd`.
pub fn run_stats(fd: BorrowedFd<'_>) -> anyhow::Result<RunStats> {
    let info = fdinfo(fd)?;
    Ok(RunStats {
        run_cnt: fdinfo_u64(&info, "run_cnt")?,
        run_time_ns: fdinfo_u64(&info, "run_time_ns")?,
    })
}

/// Memory the kernel charges for the map or program behind `fd` (fdinfo `memlock`).
pub fn memlock(fd: BorrowedFd<'_>) -> anyhow::Result<u64> {
    ws_guard::view::memlock(fd)
}

/// Enables BPF run-time statistics (`BPF_ENABLE_STATS`) while the returned descriptor is open.
pub fn enable_stats() -> anyhow::Result<OwnedFd> {
    const BPF_ENABLE_STATS: libc::c_long = 32;
    #[repr(C)]
    #[derive(Default)]
    struct Attr {
        kind: u32,
        _rest: [u32; 7],
    }
    // BPF_STATS_RUN_TIME = 0.
    let mut attr = Attr::default();
    let fd = sys_bpf(BPF_ENABLE_STATS, &mut attr).context("enabling BPF run-time statistics")?;
    // SAFETY: a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
