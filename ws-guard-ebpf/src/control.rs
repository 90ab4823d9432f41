//! Requests from userspace, run through BPF_PROG_TEST_RUN: the "packet" is a `ControlOp`.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::XdpContext};
use ws_guard_common::{
    maps::{
        CONTROL_DONE, CONTROL_NOOP, ControlOp, Counter, OP_ADOPT, OP_EXPIRE_BAN, OP_EXPIRE_PENDING,
        OP_RELEASE_OWNED, SourceKey,
    },
    parse::Packet,
    policy::ban_active,
};

use crate::{
    accounting,
    frame::Frame,
    maps::{self, Bucket, WSG_BANS, WSG_OWNED, WSG_PENDING, count},
};

#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let Some(op) = Frame(ctx).load::<ControlOp>(0) else {
        return CONTROL_NOOP;
    };
    let done = match op.op {
        OP_EXPIRE_PENDING => accounting::release_from(&WSG_PENDING, &op.flow),
        OP_RELEASE_OWNED => accounting::release_from(&WSG_OWNED, &op.flow),
        OP_ADOPT => accounting::adopt(&op.flow),
        OP_EXPIRE_BAN => expire_ban(&op.source),
        _ => false,
    };
    if !done {
        return CONTROL_NOOP;
    }
    if op.op == OP_EXPIRE_PENDING || op.op == OP_RELEASE_OWNED {
        count(Bucket::of_flow(&op.flow), Counter::Expired);
    }
    CONTROL_DONE
}

/// Ends the ban of `source` if it is over by the kernel's clock: a ban renewed since userspace
/// looked is left alone.
#[inline(always)]
fn expire_ban(source: &SourceKey) -> bool {
    // SAFETY: copied out at once; the XDP program may delete the entry meanwhile.
    let (until_ns, reason) = match unsafe { WSG_BANS.get(source) } {
        Some(b) => (b.until_ns, b.reason),
        None => return false,
    };
    if ban_active(until_ns, unsafe { bpf_ktime_get_ns() }) {
        return false;
    }
    maps::end_ban(source, until_ns, reason, Bucket::of_source(source))
}
