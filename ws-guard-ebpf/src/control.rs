//! Requests from userspace, run through BPF_PROG_TEST_RUN: the "packet" is a `ControlOp`.

use aya_ebpf::programs::XdpContext;
use ws_guard_common::{
    maps::{
        CONTROL_DONE, CONTROL_NOOP, ControlOp, Counter, OP_ADOPT, OP_EXPIRE_PENDING,
        OP_RELEASE_OWNED,
    },
    parse::Packet,
};

use crate::{
    accounting,
    frame::Frame,
    maps::{Bucket, WSG_OWNED, WSG_PENDING, count},
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
        _ => false,
    };
    if !done {
        return CONTROL_NOOP;
    }
    if op.op != OP_ADOPT {
        count(Bucket::of_flow(&op.flow), Counter::Expired);
    }
    CONTROL_DONE
}
