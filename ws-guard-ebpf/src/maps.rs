//! The maps, and the atomic operations on their values. Map names are the statics' names and
//! must equal the constants in `ws_guard_common::names` (a userspace test checks the object).

// SeqCst on purpose: LLVM lowers a *relaxed* fetch-and-add on BPF to an XADD that does not
// return the old value (and then uses garbage); SeqCst gives BPF_FETCH, which needs ISA v3.
// On BPF every atomic is a full barrier anyway.
use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_or, atomic_xadd, atomic_xsub};

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    macros::map,
    maps::{
        Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf, lpm_trie::Key,
    },
};
use ws_guard_common::{
    filter::{filter_added, filter_removed, filter_saturated},
    maps::{
        BanEvent, BanValue, Counter, EVENT_BAN_ENDED, FlowKey, FlowValue, GlobalConfig, PortConfig,
        RATE_SLOTS, RefusalMemo, STATS_ENTRIES, Scratch, SourceKey, SourceState, UNATTRIBUTED,
        stats_bucket,
    },
    policy::{CIDR_DATA_LEN, TAG_BITS, address_bits},
    rate,
};

// Capacities of the hash maps are defaults; userspace sets them from the config at load time.
#[map]
pub static WSG_PORTS: Array<PortConfig> = Array::with_max_entries(65536, 0);
#[map]
pub static WSG_GLOBAL: Array<GlobalConfig> = Array::with_max_entries(1, 0);
// A plain hash, never LRU: a flood must not evict the count of a source with live connections
// (the daemon's sweep reclaims entries that hold nothing).
#[map]
pub static WSG_SOURCES: Counted<SourceKey, SourceState> = Counted::with_max_entries(65536, 0);
#[map]
pub static WSG_FLOWS: Counted<FlowKey, FlowValue> = Counted::with_max_entries(262144, 0);

/// A hash map whose operations the benchmark's object counts (`crate::ops`, see counted.rs);
/// in the shipped object the count is nothing and this is the map itself. Same layout (the
/// map definition the loader reads).
#[repr(transparent)]
pub struct Counted<K, V>(HashMap<K, V>);

impl<K, V> Counted<K, V> {
    pub const fn with_max_entries(max_entries: u32, flags: u32) -> Self {
        Self(HashMap::with_max_entries(max_entries, flags))
    }

    /// # Safety
    /// As `HashMap::get`: the value may change or go while referenced.
    #[inline(always)]
    pub unsafe fn get(&self, key: &K) -> Option<&V> {
        crate::ops::lookup();
        unsafe { self.0.get(key) }
    }

    #[inline(always)]
    pub fn get_ptr_mut(&self, key: &K) -> Option<*mut V> {
        crate::ops::lookup();
        self.0.get_ptr_mut(key)
    }

    #[inline(always)]
    pub fn insert(&self, key: &K, value: &V, flags: u64) -> Result<(), i32> {
        crate::ops::insert();
        self.0.insert(key, value, flags)
    }

    #[inline(always)]
    pub fn remove(&self, key: &K) -> Result<(), i32> {
        crate::ops::delete();
        self.0.remove(key)
    }
}
/// All zeros, never written: the initial source state, too large to build on the 512-byte
/// stack (see [`create_source`]).
#[map]
pub static WSG_ZERO: Array<SourceState> = Array::with_max_entries(1, 0);
#[map]
pub static WSG_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_ENTRIES, 0);
// The lists: written by userspace only; values unused (presence is the answer).
#[map]
pub static WSG_ALLOW: LpmTrie<[u8; CIDR_DATA_LEN], u32> =
    LpmTrie::with_max_entries(16384, BPF_F_NO_PREALLOC);
#[map]
pub static WSG_DENY: LpmTrie<[u8; CIDR_DATA_LEN], u32> =
    LpmTrie::with_max_entries(16384, BPF_F_NO_PREALLOC);
// A plain hash, never LRU: a flood must not evict a ban. Not preallocated: bans are few, so
// their memory follows them (a ban that finds no memory is counted as `bans_full`).
#[map]
pub static WSG_BANS: HashMap<SourceKey, BanValue> =
    HashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);
/// Ban events for the daemon's log; 256 KiB holds over 6000 events.
#[map]
pub static WSG_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// `wsg_cookie`'s copy of the segment it judges (see `cookie::run`).
#[map]
pub static WSG_SEG: PerCpuArray<ws_guard_common::parse::TcpSegment> =
    PerCpuArray::with_max_entries(1, 0);
/// Index 0: `wsg_cookie`, which `wsg_xdp` tail-calls for the ports in SYN-cookie mode.
#[map]
pub static WSG_JUMP: ProgramArray = ProgramArray::with_max_entries(1, 0);
#[map]
pub static WSG_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);
/// Used SYN cookies: flow -> cookie. Entries are made only for admitted connections (a real
/// handshake), and a cookie is valid for about two minutes: LRU eviction only drops old ones.
#[map]
pub static WSG_COOKIES: LruHashMap<FlowKey, u32> = LruHashMap::with_max_entries(16384, 0);

/// Each CPU's refusal memo (see `ws_guard_common::memo`).
#[map]
pub static WSG_MEMO: PerCpuArray<RefusalMemo> = PerCpuArray::with_max_entries(1, 0);
/// The memos' epoch, moved on by [`forget_refusals`].
#[map]
pub static WSG_EPOCH: Array<u32> = Array::with_max_entries(1, 0);

/// `-EEXIST`, as map updates with BPF_NOEXIST return it.
pub const EEXIST: i32 = -17;

/// The counters a frame or a connection adds to: those of its protected port and address
/// family, or the unattributed ones.
#[derive(Clone, Copy)]
pub struct Bucket(u32);

impl Bucket {
    /// Frames not tied to a protected port.
    pub const UNATTRIBUTED: Bucket = Bucket(stats_bucket(UNATTRIBUTED, 0));

    /// The bucket of a protected port's traffic of `family`.
    #[inline(always)]
    pub fn of(port: &PortConfig, family: u16) -> Bucket {
        Bucket(stats_bucket(port.index, family))
    }

    /// The bucket of a connection to `server_port`: its port's if protected, else unattributed.
    #[inline(always)]
    pub fn of_flow(flow: &FlowKey) -> Bucket {
        Bucket::of_port_number(flow.server_port, flow.family)
    }

    /// The bucket of a source key (of its protected port, as the XDP program counted it).
    #[inline(always)]
    pub fn of_source(source: &SourceKey) -> Bucket {
        Bucket::of_port_number(source.port, source.family)
    }

    #[inline(always)]
    fn of_port_number(number: u16, family: u16) -> Bucket {
        match port(number) {
            Some(p) => Bucket::of(p, family),
            None => Bucket(stats_bucket(UNATTRIBUTED, family)),
        }
    }
}

#[inline(always)]
pub fn count(b: Bucket, c: Counter) {
    if let Some(p) = WSG_STATS.get_ptr_mut(b.0 + c as u32) {
        // SAFETY: per-CPU slot, no other writer while this program runs on this CPU.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn global() -> GlobalConfig {
    match WSG_GLOBAL.get(0) {
        Some(g) => *g,
        None => GlobalConfig::default(),
    }
}

#[inline(always)]
pub fn port(port: u16) -> Option<&'static PortConfig> {
    WSG_PORTS.get(port as u32).filter(|p| p.enabled != 0)
}

/// The state (connection slots, flow filter, rate window) of `key`, created at zero if absent;
/// `None` when the map is full.
#[inline(always)]
pub fn source_entry(key: &SourceKey) -> Option<*mut SourceState> {
    if let Some(p) = WSG_SOURCES.get_ptr_mut(key) {
        return Some(p);
    }
    create_source(key)
}

/// Creates the zero state of `key` (absent a moment ago); `None` when the map is full.
#[inline(always)]
pub fn create_source(key: &SourceKey) -> Option<*mut SourceState> {
    let zero = WSG_ZERO.get(0)?;
    // Another CPU may insert first: NOEXIST then makes ours a no-op and the lookup finds theirs.
    let _ = WSG_SOURCES.insert(key, zero, BPF_NOEXIST as u64);
    WSG_SOURCES.get_ptr_mut(key)
}

/// The connection slots taken, as a plain read: a refusal decided on it takes nothing it would
/// have to give back (the admission that follows takes its slot atomically and re-checks).
#[inline(always)]
pub fn slots_taken(c: *mut SourceState) -> u32 {
    // SAFETY: `c` points to a live map value; a torn read is impossible for an aligned u32.
    unsafe { core::ptr::read_volatile(&raw const (*c).slots) }
}

/// Takes one connection slot; returns how many were taken before.
#[inline(always)]
pub fn take_slot(c: *mut SourceState) -> u32 {
    // SAFETY: `c` points to a live map value.
    unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(&raw mut (*c).slots, 1) }
}

/// Takes one slot and claims the next rate attempt with one atomic add (`slots` and `next`
/// share an aligned u64, `slots` in its low half); the slots taken before and the attempt's
/// number.
#[inline(always)]
pub fn take_slot_and_claim(c: *mut SourceState) -> (u32, u32) {
    // SAFETY: `c` points to a live map value, 8-byte aligned, `slots` then `next` at its start
    // (asserted in ws-guard-common); `slots` never nears 2^32, so nothing carries into `next`.
    let old = unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(c.cast::<u64>(), 1 | 1 << 32)
    };
    (old as u32, (old >> 32) as u32)
}

/// Gives one slot back, never below zero; then no CPU refuses from its memo (the source may
/// have room now).
#[inline(always)]
pub fn give_slot(c: *mut SourceState) {
    // SAFETY: `c` points to a live map value.
    unsafe { saturating_dec(&raw mut (*c).slots) }
    forget_refusals();
}

/// The refusal memos' epoch (read before a source's slot count when a memo is made).
#[inline(always)]
pub fn epoch() -> u32 {
    match WSG_EPOCH.get_ptr(0) {
        // SAFETY: an aligned u32 of a live map value.
        Some(p) => unsafe { core::ptr::read_volatile(p) },
        None => 0,
    }
}

/// Moves the memos' epoch on: after whatever may turn a refusal at `max_connections` into
/// another verdict (see `ws_guard_common::memo`).
#[inline(always)]
pub fn forget_refusals() {
    if let Some(p) = WSG_EPOCH.get_ptr_mut(0) {
        // SAFETY: an aligned u32 of a live map value.
        unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(p, 1) };
    }
}

/// Attempts at a compare-and-swap of the filter word before an add falls back to saturating
/// its bucket (a remove to leaving it): only under heavy contention on one source.
const FILTER_TRIES: u32 = 4;

/// Counts a flow at `index` of the filter: before the flow is inserted into `WSG_FLOWS`.
#[inline(always)]
pub fn filter_add(c: *mut SourceState, index: usize) {
    if !update_filter(c, |f| filter_added(f, index)) {
        // Never under-count: the bucket saturates (and stays so).
        // SAFETY: `c` points to a live map value; the filter is an aligned u64.
        unsafe {
            atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(
                &raw mut (*c).filter,
                filter_saturated(0, index),
            )
        };
    }
}

/// Uncounts a flow at `index` of the filter (a saturated or zero count stays): after the flow
/// was removed from `WSG_FLOWS` (or its insert failed). Under contention it may be left
/// over-counted: safe, it only costs lookups.
#[inline(always)]
pub fn filter_sub(c: *mut SourceState, index: usize) {
    update_filter(c, |f| filter_removed(f, index));
}

/// Applies `change` to the filter word by compare-and-swap, [`FILTER_TRIES`] times at most;
/// false if every try lost to another writer.
#[inline(always)]
fn update_filter(c: *mut SourceState, change: impl Fn(u64) -> u64) -> bool {
    // SAFETY: `c` points to a live map value; the filter is an aligned u64.
    let p = unsafe { &raw mut (*c).filter };
    for _ in 0..FILTER_TRIES {
        let old = unsafe { core::ptr::read_volatile(p) };
        let new = change(old);
        if new == old || unsafe { cas(p, old, new) } {
            return true;
        }
    }
    false
}

/// Compare-and-swap of a shared word; true if `new` was stored.
///
/// # Safety
/// `p` points into a live map value.
#[inline(always)]
pub unsafe fn cas<T: Copy>(p: *mut T, old: T, new: T) -> bool {
    unsafe {
        atomic_cxchg::<T, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new).1
    }
}

/// Subtracts one from a shared counter, undoing it if it was zero.
///
/// # Safety
/// `p` points into a live map value.
#[inline(always)]
unsafe fn saturating_dec(p: *mut u32) {
    unsafe {
        if atomic_xsub::<u32, u32, { AtomicOrdering::SeqCst }>(p, 1) == 0 {
            atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(p, 1);
        }
    }
}

/// A tracked flow (filter bucket `index`) of `key` is gone: gives back its slot and uncounts
/// it from the filter, if `key` has an entry.
#[inline(always)]
pub fn release(key: &SourceKey, index: usize) {
    if let Some(p) = WSG_SOURCES.get_ptr_mut(key) {
        give_slot(p);
        filter_sub(p, index);
    }
}

/// The rate ring's length: set at load (`override_global`) to the ring `WSG_SOURCES` was
/// created for, whose values end after that many stamps. Read-only data, so a constant to the
/// verifier, which bounds every stamp access by it.
#[unsafe(no_mangle)]
static RATE_RING: u32 = RATE_SLOTS as u32;

#[inline(always)]
fn rate_ring() -> u32 {
    // SAFETY: a read of a static; volatile, so each read is its own (see `stamp`).
    unsafe { core::ptr::read_volatile(&RATE_RING) }
}

/// Stamp `i` of a source's rate ring. The check against a second read of the ring's length
/// never fails for an index of `rate::slot` (LLVM cannot drop it, and the verifier needs it: the
/// map's values end with the ring).
#[inline(always)]
fn stamp(s: *mut SourceState, i: usize) -> Option<*mut u32> {
    if i >= rate_ring() as usize {
        return None;
    }
    // A no-op (the ring is at most RATE_SLOTS, a power of two) that bounds all 64 bits of the
    // index for the verifier, which does not follow a remainder and compares 32-bit halves.
    let i = i & (RATE_SLOTS - 1);
    // SAFETY: `s` points to a live map value holding `rate_ring()` stamps.
    Some(unsafe { (&raw mut (*s).stamps).cast::<u32>().add(i) })
}

/// Whether attempt number `seq` at `now_ms` is within `limit` per `window_ms` (nothing
/// written).
#[inline(always)]
pub fn rate_admits(s: *mut SourceState, seq: u32, now_ms: u32, limit: u32, window_ms: u32) -> bool {
    if limit == 0 {
        return true;
    }
    match stamp(s, rate::nth_previous_slot(seq, limit, rate_ring())) {
        // SAFETY: a stamp of a live map value.
        Some(p) => rate::outside_window(unsafe { core::ptr::read_volatile(p) }, now_ms, window_ms),
        None => true,
    }
}

/// Records attempt number `seq` at `now_ms` in the source's ring.
#[inline(always)]
pub fn rate_record(s: *mut SourceState, seq: u32, now_ms: u32) {
    if let Some(p) = stamp(s, rate::slot(seq, rate_ring())) {
        // SAFETY: a stamp of a live map value; concurrent writers race on distinct slots.
        unsafe { core::ptr::write_volatile(p, now_ms) };
    }
}

/// The next attempt number of a source's rate window, read without claiming it.
#[inline(always)]
pub fn next_attempt(s: *mut SourceState) -> u32 {
    // SAFETY: `next` is a u32 inside a live map value.
    unsafe { core::ptr::read_volatile(&raw const (*s).next) }
}

/// Clears the stamps of `s` that are [`rate::STALE_MS`] old or more at `now`, each by a
/// compare-and-swap (a stamp written meanwhile stays); true if it cleared one.
#[inline(always)]
pub fn clear_stale(s: *mut SourceState, now: u64) -> bool {
    let now = rate::stamp_ms(now);
    let mut cleared = false;
    for i in 0..RATE_SLOTS {
        let Some(p) = stamp(s, i) else {
            break;
        };
        // SAFETY: a stamp of a live map value.
        unsafe {
            let t = core::ptr::read_volatile(p);
            if t != 0
                && now.wrapping_sub(t) >= rate::STALE_MS
                && rate::age_ms(now, t) >= 0
                && cas(p, t, 0)
            {
                cleared = true;
            }
        }
    }
    cleared
}

/// Claims the next attempt number of a source's rate window.
#[inline(always)]
pub fn claim_attempt(state: *mut SourceState) -> u32 {
    // SAFETY: `next` is a u32 inside a live map value.
    unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(&raw mut (*state).next, 1) }
}

/// The lookup key of one address: the family tag, then all of the address (as
/// [`ws_guard_common::policy::lookup_key`] builds it, without its masking copies).
#[inline(always)]
fn list_key(family: u16, addr: &[u8; 16]) -> Key<[u8; CIDR_DATA_LEN]> {
    let mut data = [0u8; CIDR_DATA_LEN];
    data[0] = family as u8;
    data[1..].copy_from_slice(addr);
    Key::new(TAG_BITS + address_bits(family), data)
}

/// Whether `addr` of `family` is inside an entry of the allowlist (longest-prefix match).
#[inline(always)]
pub fn in_allow(family: u16, addr: &[u8; 16]) -> bool {
    WSG_ALLOW.get(list_key(family, addr)).is_some()
}

/// Whether `addr` of `family` is inside an entry of the denylist.
#[inline(always)]
pub fn in_deny(family: u16, addr: &[u8; 16]) -> bool {
    WSG_DENY.get(list_key(family, addr)).is_some()
}

/// Sends a ban event to the daemon, written in place in the ring buffer (no copy on the
/// stack, which is near its limit); counted as lost when the ring buffer is full.
#[inline(always)]
pub fn emit(b: Bucket, kind: u32, reason: u32, source: &SourceKey, until_ns: u64) {
    match WSG_EVENTS.reserve::<BanEvent>(0) {
        Some(mut entry) => {
            let p = entry.as_mut_ptr();
            // SAFETY: a reserved, exclusively owned record of the event's size.
            unsafe {
                (*p).kind = kind;
                (*p).reason = reason;
                (*p).source = *source;
                (*p)._pad = 0;
                (*p).until_ns = until_ns;
            }
            entry.submit(0);
        }
        None => count(b, Counter::EventsLost),
    }
}

/// Ends an expired ban: whoever deletes it (the XDP program on the source's next attempt, on
/// this CPU or another, or the daemon's expiry through the control program) counts and reports
/// its end, so each end is reported once.
#[inline(always)]
pub fn end_ban(source: &SourceKey, until_ns: u64, reason: u32, bucket: Bucket) -> bool {
    if WSG_BANS.remove(source).is_err() {
        return false;
    }
    count(bucket, Counter::BansEnded);
    emit(bucket, EVENT_BAN_ENDED, reason, source, until_ns);
    true
}

/// Adds one to the refusal count of a source's entry.
#[inline(always)]
pub fn note_refusal(state: *mut SourceState) {
    add_refusals(state, 1);
}

/// Adds `n` to the refusal count of a source's entry.
#[inline(always)]
pub fn add_refusals(state: *mut SourceState, n: u32) {
    // SAFETY: `refused` is a u32 inside a live map value.
    unsafe {
        atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(&raw mut (*state).refused, n);
    }
}

/// This CPU's refusal memo.
#[inline(always)]
pub fn memo() -> Option<*mut RefusalMemo> {
    WSG_MEMO.get_ptr_mut(0)
}

/// Moves the refusals counted in this CPU's memo `m` into the entry of the source it names
/// (gone: they go with it); true if there were any.
#[inline(always)]
pub fn settle_memo(m: *mut RefusalMemo) -> bool {
    // SAFETY: this CPU's memo, written by this program run only.
    unsafe {
        if core::ptr::read_volatile(&raw const (*m).pending) == 0 {
            return false;
        }
        // The memo's key is in map memory: no copy on the stack.
        move_pending(m, WSG_SOURCES.get_ptr_mut(&(*m).source), 0);
    }
    true
}

/// Moves the refusals counted in this CPU's memo `m`, and `extra` more, into `entry` (`None`:
/// the entry is gone, and they with it). `flushes` is odd meanwhile, so userspace, which adds
/// the pending counts to the entries it reads, reads again. The add is atomic: a full barrier.
#[inline(always)]
pub fn move_pending(m: *mut RefusalMemo, entry: Option<*mut SourceState>, extra: u32) {
    // SAFETY: this CPU's memo, written by this program run only.
    unsafe {
        let flushes = &raw mut (*m).flushes;
        let f = core::ptr::read_volatile(flushes);
        core::ptr::write_volatile(flushes, f.wrapping_add(1));
        let pending = &raw mut (*m).pending;
        if let Some(e) = entry {
            add_refusals(e, core::ptr::read_volatile(pending).wrapping_add(extra));
        }
        core::ptr::write_volatile(pending, 0);
        core::ptr::write_volatile(flushes, f.wrapping_add(2));
    }
}

/// The flow filter of a source's entry, read with a full barrier after the slot count it is
/// paired with (a flow is counted in the filter before its slot is taken).
#[inline(always)]
pub fn filter_after(c: *mut SourceState) -> u64 {
    // SAFETY: `c` points to a live map value; the filter is an aligned u64. A swap of zero for
    // zero changes nothing and returns the value; the atomic orders the read after the earlier
    // ones. (A fetching OR crashes this LLVM's BPF backend.)
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            &raw mut (*c).filter,
            0,
            0,
        )
        .0
    }
}
