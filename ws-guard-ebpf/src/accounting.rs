//! Connection accounting shared by the tracepoint and the control program. Every transition of
//! a flow between "half-open" (WSG_PENDING), "established" (WSG_OWNED) and "gone" is decided by
//! a map delete, which succeeds for exactly one contender, so a slot is given back exactly once.

use aya_ebpf::maps::HashMap;
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use ws_guard_common::{
    filter::flow_filter_index,
    key::flow_source,
    maps::{Counter, FlowKey, FlowValue},
};

use crate::maps::{self, Bucket, EEXIST, WSG_OWNED, WSG_PENDING, count};

/// The kernel established `flow`: move it from half-open to established. A connection the XDP
/// program never saw (another interface, loopback) is left to the sweep, which reads the socket
/// table of ws-guard's own network namespace: this tracepoint fires for every namespace, and
/// counting here would charge a container's clients to ours.
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
    if release_from(&WSG_OWNED, flow) || release_from(&WSG_PENDING, flow) {
        count(Bucket::of_flow(flow), Counter::Closed);
    }
}

/// Removes `flow` from `map` and gives its slot back; false if it was not there (or another
/// CPU removed it first).
#[inline(always)]
pub fn release_from(map: &HashMap<FlowKey, FlowValue>, flow: &FlowKey) -> bool {
    let Some(v) = (unsafe { map.get(flow) }) else {
        return false;
    };
    let source = v.source;
    if map.remove(flow).is_err() {
        return false;
    }
    maps::release(&source, flow_filter_index(flow));
    true
}
