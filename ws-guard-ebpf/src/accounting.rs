//! Connection accounting shared by the tracepoint and the control program. A tracked flow
//! (`WSG_FLOWS`) is half-open, established or being released (`FlowValue::state`); every
//! transition is a compare-and-swap of its state, which succeeds for exactly one contender, so a
//! slot is given back exactly once. Whoever moves a flow to `FLOW_GONE` deletes it and gives its
//! slot back.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use ws_guard_common::{
    filter::flow_filter_index,
    key::{flow_source, prefix_of},
    maps::{
        Counter, FLOW_GONE, FLOW_OWNED, FLOW_PENDING, FlowKey, FlowValue, SourceKey, flow_tag,
        source_of, tag_state, with_state,
    },
    rate::stamp_ms,
};

use crate::maps::{self, Bucket, WSG_FLOWS, WSG_SOURCES, cas, count};

/// Moves `flow`'s state from `from` to `to`; the source it is charged to (and the value) when
/// this call made the move, `None` if the flow is not tracked or not in state `from` (someone
/// else moved it).
#[inline(always)]
fn transition(flow: &FlowKey, from: u32, to: u32) -> Option<(*mut FlowValue, SourceKey)> {
    let v = WSG_FLOWS.get_ptr_mut(flow)?;
    // SAFETY: a live map value; `tag` is an aligned u32 only ever changed by CAS.
    unsafe {
        let tag = core::ptr::read_volatile(&raw const (*v).tag);
        if tag_state(tag) != from || !cas(&raw mut (*v).tag, tag, with_state(tag, to)) {
            return None;
        }
        Some((v, source_of(flow, tag)))
    }
}

/// Releases `flow` if it is in state `from`: the slot and the filter count go back to its
/// source, and the entry goes. The source, or `None` if someone else moved it first.
#[inline(always)]
fn release_if(flow: &FlowKey, from: u32) -> Option<SourceKey> {
    let (_, source) = transition(flow, from, FLOW_GONE)?;
    let _ = WSG_FLOWS.remove(flow);
    maps::release(&source, flow_filter_index(flow));
    Some(source)
}

/// The kernel established `flow`: half-open becomes established. The tracepoint fires in every
/// network namespace, so a container's socket is seen too; one whose tuple DNAT rewrote
/// matches no attempt here and is paired by the sweep (see [`translate`]). A connection the
/// XDP program never saw (another interface, loopback) is not charged here.
#[inline(always)]
pub fn established(flow: &FlowKey) {
    if let Some((v, _)) = transition(flow, FLOW_PENDING, FLOW_OWNED) {
        // SAFETY: a live map value this call just moved; only it writes `since_ms` now.
        unsafe { (*v).since_ms = stamp_ms(bpf_ktime_get_ns()) };
        count(Bucket::of_flow(flow), Counter::Established);
    }
}

/// Counts an established connection the programs have not seen. The source's entry comes
/// first: the flow is counted in its filter before it is in `WSG_FLOWS`.
#[inline(always)]
pub fn adopt(flow: &FlowKey) -> bool {
    let global = maps::global();
    let source = flow_source(flow, &global);
    let Some(c) = maps::source_entry(&source) else {
        // No room for the source: untracked, unless it is tracked already.
        // SAFETY: the lookup only tests presence.
        if unsafe { WSG_FLOWS.get(flow).is_none() } {
            count(Bucket::of_flow(flow), Counter::UntrackedFull);
        }
        return false;
    };
    let index = flow_filter_index(flow);
    maps::filter_add(c, index);
    let value = FlowValue::new(
        FLOW_OWNED,
        prefix_of(flow.family, &global),
        flow.server_port,
        stamp_ms(unsafe { bpf_ktime_get_ns() }),
    );
    if WSG_FLOWS.insert(flow, &value, BPF_NOEXIST as u64).is_err() {
        maps::filter_sub(c, index);
        return false;
    }
    maps::take_slot(c);
    // A flow the source's refusal memos do not know (they copied its filter before).
    maps::forget_refusals();
    count(Bucket::of_flow(flow), Counter::Adopted);
    true
}

/// The kernel closed `flow`: give its slot back, whichever state it was in.
#[inline(always)]
pub fn closed(flow: &FlowKey) {
    let source = match release_if(flow, FLOW_OWNED) {
        Some(s) => s,
        None => match release_if(flow, FLOW_PENDING) {
            Some(s) => s,
            None => return,
        },
    };
    count(Bucket::of_source(&source), Counter::Closed);
}

/// Releases `flow` if it is still in state `from` (the sweep found no socket for it); the
/// source it was charged to. Counted by the caller, in the bucket of the source's port: a
/// translated connection's own port may be unprotected.
#[inline(always)]
pub fn expire(flow: &FlowKey, from: u32) -> Option<SourceKey> {
    release_if(flow, from)
}

/// The half-open attempt `wire` became the established connection `socket` under another
/// tuple (DNAT rewrote the server's address or port before the socket): it is tracked under
/// the socket's tuple from now on, still charged to its source, so the tracepoint gives the
/// slot back when that socket closes. The move of `wire` to gone decides, as in [`established`].
#[inline(always)]
pub fn translate(wire: &FlowKey, socket: &FlowKey) -> bool {
    let Some((v, source)) = transition(wire, FLOW_PENDING, FLOW_GONE) else {
        return false;
    };
    // The socket's tuple has the wire's client: the same prefix and port name the same key.
    // SAFETY: a live map value this call just moved; read before the delete.
    let tag = unsafe { core::ptr::read_volatile(&raw const (*v).tag) };
    let _ = WSG_FLOWS.remove(wire);
    let bucket = Bucket::of_source(&source);
    // A source holding a slot keeps its entry (only entries holding nothing are removed).
    let Some(c) = WSG_SOURCES.get_ptr_mut(&source) else {
        return true;
    };
    let index = flow_filter_index(socket);
    maps::filter_add(c, index);
    let value = FlowValue {
        tag: with_state(tag, FLOW_OWNED),
        since_ms: stamp_ms(unsafe { bpf_ktime_get_ns() }),
    };
    match WSG_FLOWS.insert(socket, &value, BPF_NOEXIST as u64) {
        Ok(()) => {
            maps::filter_sub(c, flow_filter_index(wire));
            // A tuple the source's refusal memos do not know.
            maps::forget_refusals();
            count(bucket, Counter::Established);
        }
        // Tracked already (adopted): the connection keeps that slot, not a second one.
        Err(maps::EEXIST) => {
            maps::filter_sub(c, index);
            maps::release(&source, flow_filter_index(wire));
        }
        Err(_) => {
            maps::filter_sub(c, index);
            maps::release(&source, flow_filter_index(wire));
            count(bucket, Counter::UntrackedFull);
        }
    }
    true
}

/// Charges `flow` to `source` as well (a slot, a filter count), creating its entry: see
/// [`ws_guard_common::maps::OP_CHARGE`]. False when the source map is full.
#[inline(always)]
pub fn charge(flow: &FlowKey, source: &SourceKey) -> bool {
    let Some(c) = maps::source_entry(source) else {
        return false;
    };
    // The filter first, as everywhere a slot is taken (see `ws_guard_common::memo`); then no
    // refusal memo may miss the flow.
    maps::filter_add(c, flow_filter_index(flow));
    maps::take_slot(c);
    maps::forget_refusals();
    true
}

/// Moves `flow`, in state `state` and already charged to `new` ([`charge`]; `new` is the
/// flow's client masked to `prefix`), to it: one compare-and-swap of the flow's tag, which
/// decides as everywhere; then its old key gives its slot back. If the flow is gone meanwhile
/// (its close released the old key), in another state, or names `new` already, the charge to
/// `new` is given back instead.
#[inline(always)]
pub fn rekey(flow: &FlowKey, state: u32, new: &SourceKey, prefix: u32) -> bool {
    let index = flow_filter_index(flow);
    let Some(v) = WSG_FLOWS.get_ptr_mut(flow) else {
        maps::release(new, index);
        return true;
    };
    // SAFETY: a live map value; `tag` is only ever changed by CAS.
    let tag = unsafe { core::ptr::read_volatile(&raw const (*v).tag) };
    let old = source_of(flow, tag);
    let moved = flow_tag(state, prefix, new.port);
    if tag_state(tag) != state
        || old == *new
        // SAFETY: as above.
        || !unsafe { cas(&raw mut (*v).tag, tag, moved) }
    {
        maps::release(new, index);
        return true;
    }
    maps::release(&old, index);
    true
}
