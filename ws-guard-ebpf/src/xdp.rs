//! The XDP limiter: on a new connection attempt to a protected port, the allowlist, the
//! denylist, an active ban, the concurrency limit, then the rate limit (whose refusal may start
//! a ban), then track the attempt as half-open. Everything else passes.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    helpers::{bpf_ktime_get_ns, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use ws_guard_common::{
    filter::{flow_filter_index, must_check_flows},
    key::{prefix_of, source_key},
    maps::{
        ACTION_DROP, ACTION_REJECT, AF_INET, BAN_RATE, BanValue, Counter, EVENT_BAN_STARTED,
        FLAG_BANS, FLOW_PENDING, FlowKey, FlowValue, GATE_FLAGS, GlobalConfig, PortConfig,
        SourceKey, SourceState,
    },
    memo::{Recall, recall},
    parse::{self, Parsed, Quick, TcpSegment},
    policy::{ListVerdict, ban_active, ban_until, list_verdict},
    rate, rst,
};

use crate::{
    cookie,
    frame::{Frame, FrameIo},
    maps::{self, Bucket, WSG_BANS, WSG_FLOWS, WSG_SOURCES, count},
};

pub(crate) enum Verdict {
    Pass,
    Refuse(u32),
}

#[inline(always)]
pub fn enforce(ctx: &XdpContext) -> u32 {
    let frame = Frame(ctx);
    let quick_port = match parse::quick(&frame) {
        Quick::NotTcp => return not_protected(),
        Quick::Tcp { dport } => match maps::port(dport) {
            Some(p) => Some(p),
            None => return not_protected(),
        },
        Quick::Unknown => None,
    };
    let seg = match parse::parse(&frame) {
        Parsed::Tcp(seg) => seg,
        Parsed::NotIp | Parsed::NotTcp => return not_protected(),
        Parsed::Fragment => {
            count(Bucket::UNATTRIBUTED, Counter::Fragments);
            return xdp_action::XDP_PASS;
        }
        Parsed::TcpFirstFragment { family, dport } => return first_fragment(family, dport),
        Parsed::Malformed => {
            count(Bucket::UNATTRIBUTED, Counter::Malformed);
            return xdp_action::XDP_PASS;
        }
    };
    // The port the shortcut read is the segment's (`parse::quick` reads it where the parser
    // finds it), so it is not looked up twice.
    let Some(port) = quick_port.or_else(|| maps::port(seg.dport)) else {
        return not_protected();
    };
    let bucket = Bucket::of(port, seg.family);
    if !seg.is_new_attempt() {
        if port.syn_cookies != 0 && cookie::may_carry_cookie(&seg) {
            cookie::jump(ctx);
        }
        count(bucket, Counter::ProtectedOther);
        return xdp_action::XDP_PASS;
    }
    if port.syn_cookies != 0 {
        cookie::jump(ctx);
    }
    judge(ctx, &frame, &seg, port, bucket)
}

#[inline(always)]
fn not_protected() -> u32 {
    count(Bucket::UNATTRIBUTED, Counter::NotProtected);
    xdp_action::XDP_PASS
}

/// A new attempt's action: admitted (passed), or refused with the port's action.
#[inline(always)]
pub(crate) fn judge<F: FrameIo>(
    ctx: &XdpContext,
    frame: &F,
    seg: &TcpSegment,
    port: &PortConfig,
    bucket: Bucket,
) -> u32 {
    match new_attempt(ctx, frame, seg, port, bucket) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Refuse(action) => refuse(frame, seg, bucket, action),
    }
}

/// What a refused attempt gets: `action` (reject: a RST, else dropped).
#[inline(always)]
pub(crate) fn refuse<F: FrameIo>(frame: &F, seg: &TcpSegment, bucket: Bucket, action: u32) -> u32 {
    if action == ACTION_REJECT {
        reject(frame, seg, bucket)
    } else {
        xdp_action::XDP_DROP
    }
}

/// Budget of a judgement (BENCHMARKS.md, "Work per path", checks it): a refusal makes one hash
/// lookup (the source's entry; a second, of the flow, only where the source's filter says the
/// SYN may repeat a tracked attempt) and adds to its refusal count, taking nothing it must give
/// back; a refusal of the source this CPU last refused at `max_connections` makes none (its
/// memo, see `ws_guard_common::memo`; the flow's lookup as before); an admission of a known
/// source makes one lookup and one insert (the flow), whose failure on a tracked tuple is the
/// retransmission check.
#[inline(always)]
pub(crate) fn new_attempt<F: FrameIo>(
    ctx: &XdpContext,
    frame: &F,
    seg: &TcpSegment,
    port: &PortConfig,
    bucket: Bucket,
) -> Verdict {
    let Some(flow) = parse::flow(frame, seg) else {
        count(bucket, Counter::Malformed);
        return Verdict::Pass;
    };
    // A reference, not a copy: the program's stack is near its 512-byte limit. Index 0 of a
    // one-entry array always exists.
    let Some(global) = maps::WSG_GLOBAL.get(0) else {
        return Verdict::Pass;
    };
    let source = source_key(seg.family, flow.client, seg.dport, global);
    let index = flow_filter_index(&flow);
    let mut clock = Clock::unread();
    if global.monitor == 0 && port.max_connections != 0 {
        if let Some(v) = recalled(ctx, seg, &flow, index, &source, port, global, &mut clock, bucket)
        {
            return v;
        }
    }
    let state = WSG_SOURCES.get_ptr_mut(&source);
    if let Some(s) = state {
        let max = port.max_connections;
        let room = max == 0 || maps::slots_taken(s) < max;
        if room && global.flags & GATE_FLAGS == 0 && global.monitor == 0 {
            let now = clock.now();
            if rate_admits(s, port, now.ms) {
                return admit_known(ctx, seg, &flow, index, source, s, port, global, now, bucket);
            }
        }
    }
    judge_fully(
        ctx, seg, &flow, index, source, state, port, global, &mut clock, bucket,
    )
}

/// The verdict this CPU's refusal memo gives (see `ws_guard_common::memo`), if it knows the
/// source: refused at `max_connections` as last time, unless the SYN repeats a tracked attempt
/// (looked up where the memo's filter says it may). The refusal is counted in the memo.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn recalled(
    ctx: &XdpContext,
    seg: &TcpSegment,
    flow: &FlowKey,
    index: usize,
    source: &SourceKey,
    port: &PortConfig,
    global: &GlobalConfig,
    clock: &mut Clock,
    bucket: Bucket,
) -> Option<Verdict> {
    let m = maps::memo()?;
    // SAFETY: this CPU's memo; only this program run writes it now.
    let r = recall(
        unsafe { &*m },
        source,
        port.max_connections,
        maps::epoch,
        global,
        index,
    );
    match r {
        Recall::Unknown => return None,
        Recall::Refuse => {}
        Recall::RefuseUnlessTracked => {
            // SAFETY: the lookup only tests presence.
            if unsafe { WSG_FLOWS.get(flow).is_some() } {
                retransmitted(flow, clock.now().ms, bucket);
                return Some(Verdict::Pass);
            }
        }
    }
    // SAFETY: as above; userspace reads `pending` (see `RefusalMemo::flushes`).
    unsafe {
        let p = &raw mut (*m).pending;
        core::ptr::write_volatile(p, core::ptr::read_volatile(p).wrapping_add(1));
    }
    count(bucket, Counter::ConnLimited);
    debug!(ctx, "port {} over max_connections", seg.dport);
    Some(Verdict::Refuse(port.conn_action))
}

/// `bpf_ktime_get_ns`, read once and only if needed (a refusal at the concurrency limit never
/// reads the clock), with its millisecond stamp: the one division by 10^6 of a judgement (the
/// program has no faster way to divide). Unread while `ns` is 0 (the clock counts from boot), a
/// plain struct rather than an `Option`: LLVM spilled the `None`'s undefined payload, which the
/// verifier refuses to read.
struct Clock(Now);

#[derive(Clone, Copy)]
struct Now {
    ns: u64,
    /// [`rate::stamp_ms`] of `ns`.
    ms: u32,
}

impl Clock {
    #[inline(always)]
    fn unread() -> Self {
        Clock(Now { ns: 0, ms: 0 })
    }

    #[inline(always)]
    fn now(&mut self) -> Now {
        if self.0.ns != 0 {
            return self.0;
        }
        let ns = unsafe { bpf_ktime_get_ns() };
        self.0 = Now {
            ns,
            ms: rate::stamp_ms(ns),
        };
        self.0
    }
}

/// Whether a known source's next attempt is within its rate, read without claiming it.
#[inline(always)]
fn rate_admits(s: *mut SourceState, port: &PortConfig, now_ms: u32) -> bool {
    if port.rate_limit == 0 {
        return true;
    }
    // A racing claim only makes the decision re-checked after the insert.
    maps::rate_admits(
        s,
        maps::next_attempt(s),
        now_ms,
        port.rate_limit,
        port.rate_window_ms,
    )
}

/// The admission of a known source with room under `max_connections` whose next attempt
/// [`rate_admits`]: the flow is inserted first (a tracked tuple makes the insert fail: a
/// retransmission), then the slot and the rate attempt are taken. Another CPU may have taken the last slot or rate attempt since the reading; then the
/// attempt is refused after all, and only then is anything given back.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn admit_known(
    ctx: &XdpContext,
    seg: &TcpSegment,
    flow: &FlowKey,
    index: usize,
    source: SourceKey,
    s: *mut SourceState,
    port: &PortConfig,
    global: &GlobalConfig,
    now: Now,
    bucket: Bucket,
) -> Verdict {
    maps::filter_add(s, index);
    let value = FlowValue::new(
        FLOW_PENDING,
        prefix_of(flow.family, global),
        source.port,
        now.ms,
    );
    let inserted = match WSG_FLOWS.insert(flow, &value, BPF_NOEXIST as u64) {
        Ok(()) => true,
        Err(maps::EEXIST) => {
            maps::filter_sub(s, index);
            retransmitted(flow, now.ms, bucket);
            return Verdict::Pass;
        }
        Err(_) => {
            maps::filter_sub(s, index);
            false
        }
    };
    // The slot and the rate attempt in one atomic add (the attempt counts whether or not the
    // flow could be tracked, as in `judge_fully`); given back only if refused after all.
    let taken = if port.rate_limit != 0 {
        let (taken, seq) = maps::take_slot_and_claim(s);
        let ok = maps::rate_admits(s, seq, now.ms, port.rate_limit, port.rate_window_ms);
        maps::rate_record(s, seq, now.ms);
        if !ok {
            maps::give_slot(s);
            if inserted {
                untrack(flow, s, index);
            }
            return rate_limited(ctx, seg, &source, s, port, global, now.ns, bucket);
        }
        taken
    } else {
        maps::take_slot(s)
    };
    if !inserted {
        maps::give_slot(s);
        return untracked(port, global, bucket, Counter::Admitted, false);
    }
    let max = port.max_connections;
    if taken >= max && max != 0 {
        maps::give_slot(s);
        untrack(flow, s, index);
        return conn_limited(ctx, seg, port, &source, s, bucket);
    }
    count(bucket, Counter::Admitted);
    Verdict::Pass
}

/// Takes back a flow inserted for an attempt refused after all (a race with another CPU).
#[inline(always)]
fn untrack(flow: &FlowKey, s: *mut SourceState, index: usize) {
    let _ = WSG_FLOWS.remove(flow);
    maps::filter_sub(s, index);
}

/// A SYN of a tracked flow: passed, and a half-open one's clock restarted. The kernel may have
/// dropped the first SYN (full backlog): the sweep releases a half-open attempt that has no
/// socket a second after its *last* SYN, not its first.
#[inline(always)]
fn retransmitted(flow: &FlowKey, now_ms: u32, bucket: Bucket) {
    if let Some(v) = WSG_FLOWS.get_ptr_mut(flow) {
        // SAFETY: a live map value; a racing writer can only store another "now" (or move the
        // state, which this leaves alone).
        unsafe {
            if (*v).state() == FLOW_PENDING {
                (*v).since_ms = now_ms;
            }
        }
    }
    count(bucket, Counter::SynRetransmits);
}

/// Every other attempt, in the rules' order: a retransmission of a tracked attempt passes
/// (looked up only where the source's filter says it can be one); then the lists and bans, the
/// concurrency limit, the rate; then the attempt is tracked as half-open.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn judge_fully(
    ctx: &XdpContext,
    seg: &TcpSegment,
    flow: &FlowKey,
    index: usize,
    source: SourceKey,
    state: Option<*mut SourceState>,
    port: &PortConfig,
    global: &GlobalConfig,
    clock: &mut Clock,
    bucket: Bucket,
) -> Verdict {
    // SAFETY: a live map value; the filter is read as a snapshot (a count is raised before its
    // flow is inserted, so a racing admit is never missed).
    let state_ref = state.map(|p| unsafe { &*p });
    if must_check_flows(global.flags, state_ref, index)
        // SAFETY: the lookup only tests presence.
        && unsafe { WSG_FLOWS.get(flow).is_some() }
    {
        retransmitted(flow, clock.now().ms, bucket);
        return Verdict::Pass;
    }
    let monitor = global.monitor != 0;

    // How the attempt is tracked: `limited` false skips the limits (allowlisted, or already
    // judged by monitor mode); `would_block` says monitor mode counted it already.
    let mut tracked_as = Counter::Admitted;
    let mut limited = true;
    let mut would_block = false;
    if global.flags & GATE_FLAGS != 0 {
        match gate(&flow.client, &source, state, global, bucket) {
            Gate::Continue => {}
            Gate::Allowed => {
                tracked_as = Counter::Allowed;
                limited = false;
            }
            Gate::Refuse => {
                debug!(ctx, "port {} source denylisted or banned", seg.dport);
                return Verdict::Refuse(ACTION_DROP);
            }
            Gate::WouldBlock => {
                count(bucket, Counter::MonitorWouldBlock);
                limited = false;
                would_block = true;
            }
        }
    }

    // No room for a new source's counter: it cannot be limited, so the operator's choice
    // decides. Sources that have a counter never get here (WSG_SOURCES is never evicted from).
    // The entry found above is reused (the lookup `source_entry` would repeat).
    let Some(slots) = state.or_else(|| maps::create_source(&source)) else {
        return untracked(port, global, bucket, tracked_as, would_block);
    };
    // The slots are read before one is taken, and the rate judged before the slot is taken, so
    // a refusal takes nothing it must give back.
    let max = port.max_connections;
    if limited && max != 0 && maps::slots_taken(slots) >= max {
        if !monitor {
            return conn_limited(ctx, seg, port, &source, slots, bucket);
        }
        // Monitor mode admits it, and, as when enforcing, it does not count toward the rate.
        count(bucket, Counter::MonitorWouldBlock);
        limited = false;
        would_block = true;
    }

    let now = clock.now();
    if limited && port.rate_limit != 0 {
        let seq = maps::claim_attempt(slots);
        let ok = maps::rate_admits(slots, seq, now.ms, port.rate_limit, port.rate_window_ms);
        maps::rate_record(slots, seq, now.ms);
        if !ok {
            if !monitor {
                return rate_limited(ctx, seg, &source, slots, port, global, now.ns, bucket);
            }
            count(bucket, Counter::MonitorWouldBlock);
            would_block = true;
        }
    }

    // The slot itself: taken atomically, so N simultaneous attempts against a limit of N - k
    // still give exactly N - k connections. One that lost that race to another CPU since the
    // read above is refused like any attempt over the limit (its rate attempt stays counted, as
    // if the two had arrived the other way round). The flow is counted in the source's filter
    // first: a slot is never held for a flow the filter misses (a refusal memo copies the
    // filter after the slot count).
    maps::filter_add(slots, index);
    let taken = maps::take_slot(slots);
    if limited && max != 0 && taken >= max {
        if !monitor {
            maps::give_slot(slots);
            maps::filter_sub(slots, index);
            return conn_limited(ctx, seg, port, &source, slots, bucket);
        }
        if !would_block {
            count(bucket, Counter::MonitorWouldBlock);
            would_block = true;
        }
    }

    let prefix = prefix_of(flow.family, global);
    if !admit(flow, index, source, prefix, now.ms, slots, bucket, tracked_as) {
        return untracked(port, global, bucket, tracked_as, would_block);
    }
    Verdict::Pass
}

/// An attempt refused by the new-connection rate (its attempt recorded; no slot taken), which
/// starts a ban when bans are on.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rate_limited(
    ctx: &XdpContext,
    seg: &TcpSegment,
    source: &SourceKey,
    s: *mut SourceState,
    port: &PortConfig,
    global: &GlobalConfig,
    now: u64,
    bucket: Bucket,
) -> Verdict {
    maps::note_refusal(s);
    count(bucket, Counter::RateLimited);
    debug!(ctx, "port {} over new_connections", seg.dport);
    if global.ban_ns != 0 {
        start_ban(source, now, global.ban_ns, bucket);
    }
    Verdict::Refuse(port.rate_action)
}

/// An attempt refused because its source is at `max_connections` (no slot was taken for it),
/// which this CPU then remembers.
#[inline(always)]
fn conn_limited(
    ctx: &XdpContext,
    seg: &TcpSegment,
    port: &PortConfig,
    source: &SourceKey,
    slots: *mut SourceState,
    bucket: Bucket,
) -> Verdict {
    remember_refusal(source, port.max_connections, slots);
    count(bucket, Counter::ConnLimited);
    debug!(ctx, "port {} over max_connections", seg.dport);
    Verdict::Refuse(port.conn_action)
}

/// Counts a refusal of `source` at `max` in its entry (`s`) and makes it this CPU's memo if it
/// is still at its limit; the refusals the memo counted for another source go to that one's
/// entry first. The epoch is read before the slot count, the filter after it (see
/// `ws_guard_common::memo`).
#[inline(always)]
fn remember_refusal(source: &SourceKey, max: u32, s: *mut SourceState) {
    let Some(m) = maps::memo() else {
        maps::note_refusal(s);
        return;
    };
    let epoch = maps::epoch();
    // SAFETY: this CPU's memo, written by this program run only.
    unsafe {
        // Each way, an atomic add: a full barrier between the epoch's read and the slot count's.
        if (*m).source.same(source) {
            // Its pending count goes in with this refusal.
            maps::move_pending(m, Some(s), 1);
        } else {
            maps::settle_memo(m);
            maps::note_refusal(s);
        }
        if maps::slots_taken(s) < max {
            (*m).max = 0;
            return;
        }
        (*m).filter = maps::filter_after(s);
        (*m).source = *source;
        (*m).epoch = epoch;
        (*m).max = max;
    }
}

/// The first fragment of a TCP segment: to a protected port, dropped unless the operator
/// chose to pass fragments (without it the kernel cannot reassemble the segment, so a SYN in
/// fragments never reaches it unjudged); counted as a fragment of that port either way.
#[inline(always)]
fn first_fragment(family: u16, dport: u16) -> u32 {
    let Some(port) = maps::port(dport) else {
        count(Bucket::UNATTRIBUTED, Counter::Fragments);
        return xdp_action::XDP_PASS;
    };
    count(Bucket::of(port, family), Counter::Fragments);
    match maps::WSG_GLOBAL.get(0) {
        Some(g) if g.pass_fragments != 0 || g.monitor != 0 => xdp_action::XDP_PASS,
        _ => xdp_action::XDP_DROP,
    }
}

/// An attempt a full map keeps from being tracked: [`map_full`] decides, except for an
/// allowlisted source, which passes untracked whatever `fail_closed` says (never refused).
#[inline(always)]
fn untracked(
    port: &PortConfig,
    global: &GlobalConfig,
    bucket: Bucket,
    tracked_as: Counter,
    would_block: bool,
) -> Verdict {
    if tracked_as == Counter::Allowed {
        count(bucket, Counter::MapFull);
        return Verdict::Pass;
    }
    map_full(port, global, bucket, would_block)
}

/// What the lists and bans say about a new attempt.
pub(crate) enum Gate {
    /// Neither listed nor banned: the limits decide.
    Continue,
    /// Allowlisted: not limited, tracked.
    Allowed,
    /// Denylisted or banned: dropped (already counted).
    Refuse,
    /// Denylisted or banned in monitor mode: passed and tracked.
    WouldBlock,
}

/// The allowlist (beats the denylist), the denylist, then an active ban of `source`; each map
/// is looked up only when its flag says it can hit. An expired ban found here is ended. A
/// refusal is noted in the source's entry (`state`) if it has one; none is created for it. Kept
/// lean (scalars, events written in place): the program's stack is near its 512-byte limit.
#[inline(always)]
pub(crate) fn gate(
    client: &[u8; 16],
    source: &SourceKey,
    state: Option<*mut SourceState>,
    global: &GlobalConfig,
    bucket: Bucket,
) -> Gate {
    let monitor = global.monitor != 0;
    let lists = list_verdict(
        global,
        || maps::in_allow(source.family, client),
        || maps::in_deny(source.family, client),
    );
    match lists {
        ListVerdict::Allowed => return Gate::Allowed,
        ListVerdict::Denied if monitor => return Gate::WouldBlock,
        ListVerdict::Denied => {
            if let Some(s) = state {
                maps::note_refusal(s);
            }
            count(bucket, Counter::Denied);
            return Gate::Refuse;
        }
        ListVerdict::Neither => {}
    }
    if global.flags & FLAG_BANS == 0 {
        return Gate::Continue;
    }
    // SAFETY: read at once; userspace may delete the entry meanwhile.
    let (until_ns, reason) = match unsafe { WSG_BANS.get(source) } {
        Some(b) => (b.until_ns, b.reason),
        None => return Gate::Continue,
    };
    // The clock is read only when there is a ban to judge.
    let now = unsafe { bpf_ktime_get_ns() };
    if !ban_active(until_ns, now) {
        maps::end_ban(source, until_ns, reason, bucket);
        return Gate::Continue;
    }
    if monitor {
        return Gate::WouldBlock;
    }
    if let Some(s) = state {
        maps::note_refusal(s);
    }
    count(bucket, Counter::Banned);
    Gate::Refuse
}

/// Bans `source` for `ban_ns` after a rate-limit refusal and tells the daemon. A ban already
/// there (another CPU's, a moment ago) is kept; a full ban map is counted, not evicted from.
#[inline(always)]
fn start_ban(source: &SourceKey, now: u64, ban_ns: u64, bucket: Bucket) {
    let value = BanValue {
        until_ns: ban_until(now, ban_ns),
        reason: BAN_RATE,
        _pad: 0,
    };
    match WSG_BANS.insert(source, &value, BPF_NOEXIST as u64) {
        Ok(()) => {
            maps::forget_refusals();
            count(bucket, Counter::BansStarted);
            maps::emit(bucket, EVENT_BAN_STARTED, BAN_RATE, source, value.until_ns);
        }
        Err(maps::EEXIST) => {}
        Err(_) => count(bucket, Counter::BansFull),
    }
}

/// Records an admitted attempt as half-open (counted as `counter`); its slot is already taken
/// and it is counted in the source's flow filter (bucket `index`), so a retransmission on
/// another CPU never skips the lookup that finds it. False when `WSG_FLOWS` is full: the slot
/// and the filter count are given back and nothing counted (see [`map_full`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn admit(
    flow: &FlowKey,
    index: usize,
    source: SourceKey,
    prefix: u32,
    now_ms: u32,
    slots: *mut SourceState,
    bucket: Bucket,
    counter: Counter,
) -> bool {
    let value = FlowValue::new(FLOW_PENDING, prefix, source.port, now_ms);
    match WSG_FLOWS.insert(flow, &value, BPF_NOEXIST as u64) {
        Ok(()) => count(bucket, counter),
        // The same SYN, retransmitted, won on another CPU (and counted the flow itself).
        Err(maps::EEXIST) => {
            maps::filter_sub(slots, index);
            maps::give_slot(slots);
            count(bucket, Counter::SynRetransmits);
        }
        // WSG_FLOWS is full: the attempt cannot be tracked, so it must not hold a slot.
        Err(_) => {
            maps::filter_sub(slots, index);
            maps::give_slot(slots);
            return false;
        }
    }
    true
}

/// An attempt that cannot be tracked because a map is full. Failing open (the default) passes
/// it: a flood of spoofed sources that fills the maps then costs new sources their limits, but
/// never their connections. Failing closed refuses it like an attempt over `max_connections`:
/// new sources are locked out until the maps have room again (the sweep releases what the
/// kernel has no socket for), while sources with a counter keep their normal treatment. Monitor
/// mode refuses nothing; it counts what failing closed would have refused, once per attempt
/// (`would_block`: already counted, the attempt was over a limit).
#[inline(always)]
fn map_full(
    port: &PortConfig,
    global: &GlobalConfig,
    bucket: Bucket,
    would_block: bool,
) -> Verdict {
    count(bucket, Counter::MapFull);
    if global.fail_closed != 0 {
        if global.monitor == 0 {
            return Verdict::Refuse(port.conn_action);
        }
        if !would_block {
            count(bucket, Counter::MonitorWouldBlock);
        }
    }
    Verdict::Pass
}

/// Turns the frame into the RST that answers it and sends it back out.
#[inline(always)]
fn reject<F: FrameIo>(frame: &F, seg: &TcpSegment, bucket: Bucket) -> u32 {
    if !rst::can_reject(seg) {
        count(bucket, Counter::RejectAsDrop);
        return xdp_action::XDP_DROP;
    }
    match write_rst(frame, seg) {
        Some(()) => {
            count(bucket, Counter::RstSent);
            xdp_action::XDP_TX
        }
        None => {
            count(bucket, Counter::RejectAsDrop);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn write_rst<F: FrameIo>(frame: &F, seg: &TcpSegment) -> Option<()> {
    if seg.family == AF_INET {
        let (ip, tcp) = rst::ipv4(&frame.load(seg.l3)?, seg);
        write_reply(frame, seg, &ip, &tcp)
    } else {
        let (ip, tcp) = rst::ipv6(&frame.load(seg.l3)?, seg);
        write_reply(frame, seg, &ip, &tcp)
    }
}

/// Swaps the Ethernet addresses, cuts the frame to the reply's length and writes the headers.
#[inline(always)]
fn write_reply<F: FrameIo, const N: usize>(
    frame: &F,
    seg: &TcpSegment,
    ip: &[u8; N],
    tcp: &[u8; rst::TCP_LEN],
) -> Option<()> {
    let macs = frame.load::<[u8; 12]>(0)?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    shrink(frame.ctx(), rst::reply_len(seg) as i32 - frame.len() as i32)?;
    frame.store(0, &swapped)?;
    frame.store(seg.l3, ip)?;
    frame.store(seg.l4, tcp)
}

#[inline(always)]
pub(crate) fn shrink(ctx: &XdpContext, delta: i32) -> Option<()> {
    if delta == 0 {
        return Some(());
    }
    // SAFETY: the helper only moves data_end; later accesses re-check bounds.
    (unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } == 0).then_some(())
}
