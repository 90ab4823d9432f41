// The programs and modules of both eBPF objects (see main.rs and counted.rs), included into
// each crate root.

mod accounting;
mod control;
mod cookie;
mod frame;
mod maps;
mod sock_state;
mod xdp;

use aya_ebpf::{
    macros::{tracepoint, xdp},
    programs::{TracePointContext, XdpContext},
};

/// Enforces the limits on ingress. Never returns XDP_ABORTED: a frame it cannot judge passes.
#[xdp]
pub fn wsg_xdp(ctx: XdpContext) -> u32 {
    xdp::enforce(&ctx)
}

/// SYN-cookie mode (see `cookie`): reached from `wsg_xdp` by a tail call, for the new attempts
/// and ACKs of a port in cookie mode. Never attached.
#[xdp]
pub fn wsg_cookie(ctx: XdpContext) -> u32 {
    cookie::run(&ctx)
}

/// Learns from the kernel's own socket state when connections are established and closed.
#[tracepoint]
pub fn wsg_sock_state(ctx: TracePointContext) -> u32 {
    sock_state::handle(&ctx);
    0
}

/// Never attached: userspace runs it with BPF_PROG_TEST_RUN to change accounting atomically.
#[xdp]
pub fn wsg_control(ctx: XdpContext) -> u32 {
    control::run(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
