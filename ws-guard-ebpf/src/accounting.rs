//! Connection accounting shared by the tracepoint and the control program. Every transition of
//! a flow between "half-open" (WSG_PENDING), "established" (WSG_OWNED) and "gone" is decided by
//! a map delete, which succeeds for exactly one contender, so a slot is given back exactly once.

use aya_ebpf::maps::HashMap;
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use ws_guard_common::{
    filter::flow_filter_index,
    key::flow_source,
    maps::{Counter, FlowKey, FlowValue, SourceKey},
};

use crate::maps::{self, Bucket, EEXIST, WSG_CONNS, WSG_OWNED, WSG_PENDING, count};

/// The kernel established `flow`: move it from half-open to established. The tracepoint fires
/// in every network namespace, so a container's socket is seen too; one whose tuple DNAT
/// rewrote matches no attempt here and is paired by the sweep (see [`translate`]). A
/// connection the XDP program never saw (another interface, loopback) is not charged here.
#[inline(always)]
pub fn established(flow: &FlowKey) {
    // SAFETY: copied out before the delete.
    if let Some(v) = unsafe { WSG_PENDING.get(flow) } {
        let mut v = *v;
        if WSG_PENDING.remove(flow).is_ok() {
            v.since_ns = unsafe { bpf_ktime_get_ns() };
            match WSG_OWNED.insert(flow, &v, BPF_NOEXIST as u64) {
                Ok(()) => count(Bucket::of_flow(flow), Counter::Established),
                // The sweep adopted it a moment ago and took a slot (and a filter count) of its
                // own: give back the half-open one's so the connection is counted once.
                Err(EEXIST) => maps::release(&v.source, flow_filter_index(flow)),
                // Map full: the connection can no longer be tracked; free its slot.
                Err(_) => {
                    maps::release(&v.source, flow_filter_index(flow));
                    count(Bucket::of_flow(flow), Counter::UntrackedFull);
                }
            }
            return;
        }
    }
}

/// Counts an established connection the programs have not seen. The source's entry comes
/// first: the flow is counted in its filter before it is in `WSG_OWNED`.
#[inline(always)]
pub fn adopt(flow: &FlowKey) -> bool {
    let source = flow_source(flow, &maps::global());
    let Some(c) = maps::conns_counter(&source) else {
        // No room for the source: untracked, unless it is tracked already.
        // SAFETY: the lookup only tests presence.
        if unsafe { WSG_OWNED.get(flow).is_none() } {
            count(Bucket::of_flow(flow), Counter::UntrackedFull);
        }
        return false;
    };
    let index = flow_filter_index(flow);
    maps::filter_add(c, index);
    let value = FlowValue {
        source,
        _pad: 0,
        since_ns: unsafe { bpf_ktime_get_ns() },
    };
    if WSG_OWNED.insert(flow, &value, BPF_NOEXIST as u64).is_err() {
        maps::filter_sub(c, index);
        return false;
    }
    maps::take_slot(c);
    count(Bucket::of_flow(flow), Counter::Adopted);
    true
}

/// The kernel closed `flow`: give its slot back, whichever state it was in.
#[inline(always)]
pub fn closed(flow: &FlowKey) {
    let source = match release_from(&WSG_OWNED, flow) {
        Some(s) => s,
        None => match release_from(&WSG_PENDING, flow) {
            Some(s) => s,
            None => return,
        },
    };
    count(Bucket::of_source(&source), Counter::Closed);
}

/// Removes `flow` from `map` and gives its slot back; the source it was charged to, or `None`
/// if it was not there (or another CPU removed it first). Counted by the caller, in the
/// bucket of the source's port: a translated connection's own port may be unprotected.
#[inline(always)]
pub fn release_from(map: &HashMap<FlowKey, FlowValue>, flow: &FlowKey) -> Option<SourceKey> {
    let v = unsafe { map.get(flow) }?;
    let source = v.source;
    if map.remove(flow).is_err() {
        return None;
    }
    maps::release(&source, flow_filter_index(flow));
    Some(source)
}

/// The half-open attempt `wire` became the established connection `socket` under another
/// tuple (DNAT rewrote the server's address or port before the socket): it is tracked under
/// the socket's tuple from now on, still charged to its source, so the tracepoint gives the
/// slot back when that socket closes. The delete of `wire` decides, as in [`established`].
#[inline(always)]
pub fn translate(wire: &FlowKey, socket: &FlowKey) -> bool {
    // SAFETY: copied out before the delete.
    let Some(v) = (unsafe { WSG_PENDING.get(wire) }) else {
        return false;
    };
    let source = v.source;
    if WSG_PENDING.remove(wire).is_err() {
        return false;
    }
    let bucket = Bucket::of_source(&source);
    // A source holding a slot keeps its entry (only idle entries are removed).
    let Some(c) = WSG_CONNS.get_ptr_mut(&source) else {
        return true;
    };
    let index = flow_filter_index(socket);
    maps::filter_add(c, index);
    let value = FlowValue {
        source,
        _pad: 0,
        since_ns: unsafe { bpf_ktime_get_ns() },
    };
    match WSG_OWNED.insert(socket, &value, BPF_NOEXIST as u64) {
        Ok(()) => {
            maps::filter_sub(c, flow_filter_index(wire));
            count(bucket, Counter::Established);
        }
        // Tracked already (adopted): the connection keeps that slot, not a second one.
        Err(EEXIST) => {
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
    let Some(c) = maps::conns_counter(source) else {
        return false;
    };
    maps::take_slot(c);
    maps::filter_add(c, flow_filter_index(flow));
    true
}

/// Moves `flow` of `map`, already charged to `new` ([`charge`]), to it: the entry is removed
/// (the delete decides, as everywhere) and put back naming `new`, then its old key gives its
/// slot back. If the flow is gone meanwhile (its close released the old key), or is tracked
/// again by someone else (who charged it), the charge to `new` is given back instead.
#[inline(always)]
pub fn rekey(map: &HashMap<FlowKey, FlowValue>, flow: &FlowKey, new: &SourceKey) -> bool {
    let index = flow_filter_index(flow);
    // SAFETY: copied out before the delete.
    let old = match unsafe { map.get(flow) } {
        Some(v) if v.source != *new => *v,
        _ => {
            maps::release(new, index);
            return true;
        }
    };
    if map.remove(flow).is_err() {
        maps::release(new, index);
        return true;
    }
    let value = FlowValue {
        source: *new,
        ..old
    };
    if map.insert(flow, &value, BPF_NOEXIST as u64).is_err() {
        maps::release(new, index);
    }
    maps::release(&old.source, index);
    true
}
