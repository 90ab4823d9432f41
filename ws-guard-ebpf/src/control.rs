//! Requests from userspace, run through BPF_PROG_TEST_RUN: the "packet" is a `ControlOp`.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::XdpContext};
use ws_guard_common::{
    filter::flow_filter_index,
    maps::{
        CONTROL_DONE, CONTROL_NOOP, ControlOp, Counter, FLOW_OWNED, FLOW_PENDING, FlowKey,
        OP_ADOPT, OP_CHARGE, OP_CLEAR_STALE, OP_EXPIRE_BAN, OP_EXPIRE_PENDING, OP_FORGET, OP_SETTLE_MEMO, OP_REKEY_OWNED,
        OP_REKEY_PENDING, OP_RELEASE_OWNED, OP_TRANSLATE, OP_UNCHARGE, SourceKey,
    },
    parse::Packet,
    policy::ban_active,
};

use crate::{
    accounting,
    frame::Frame,
    maps::{self, Bucket, WSG_BANS, count},
};

#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let Some(op) = Frame(ctx).load::<ControlOp>(0) else {
        return CONTROL_NOOP;
    };
    let done = match op.op {
        OP_EXPIRE_PENDING => expire(&op.flow, FLOW_PENDING),
        OP_RELEASE_OWNED => expire(&op.flow, FLOW_OWNED),
        OP_ADOPT => accounting::adopt(&op.flow),
        OP_EXPIRE_BAN => expire_ban(&op.source),
        OP_TRANSLATE => accounting::translate(&op.flow, &op.socket),
        OP_CHARGE => accounting::charge(&op.flow, &op.source),
        OP_UNCHARGE => {
            maps::release(&op.source, flow_filter_index(&op.flow));
            true
        }
        OP_REKEY_PENDING => accounting::rekey(&op.flow, FLOW_PENDING, &op.source, op.prefix),
        OP_REKEY_OWNED => accounting::rekey(&op.flow, FLOW_OWNED, &op.source, op.prefix),
        OP_CLEAR_STALE => clear_stale(&op.source),
        OP_FORGET => {
            maps::forget_refusals();
            true
        }
        OP_SETTLE_MEMO => match maps::memo() {
            Some(m) => maps::settle_memo(m),
            None => false,
        },
        _ => false,
    };
    if done { CONTROL_DONE } else { CONTROL_NOOP }
}

/// Releases a tracked flow in state `state` the kernel has no socket for.
#[inline(always)]
fn expire(flow: &FlowKey, state: u32) -> bool {
    match accounting::expire(flow, state) {
        Some(source) => {
            count(Bucket::of_source(&source), Counter::Expired);
            true
        }
        None => false,
    }
}

/// Clears the stale rate stamps of `source` (see [`OP_CLEAR_STALE`]).
#[inline(always)]
fn clear_stale(source: &SourceKey) -> bool {
    match maps::WSG_SOURCES.get_ptr_mut(source) {
        Some(s) => maps::clear_stale(s, unsafe { bpf_ktime_get_ns() }),
        None => false,
    }
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
