//! Ban events: the XDP program reports bans it starts and ends through a ring buffer
//! (`WSG_EVENTS`); a task of the daemon reads them as they come and logs one structured line
//! each, rate-limited so a flood of bans cannot flood the log (the lines it holds back are
//! summarized once per interval).
//!
//! The daemon also keeps the last [`RING_CAPACITY`] events in memory for `ws-guard events`
//! ([`EventRing`]): every ban started and ended, and sampled refusals ([`RefusalSampler`]: on
//! each sweep tick, one `refused` event per source and port refused since the last look, at
//! most [`REFUSED_PER_SECOND`] a second, the rest summarized).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use aya::maps::{MapData, RingBuf};
use ipnet::IpNet;
use log::{info, warn};
use tokio::io::{Interest, unix::AsyncFd};
use ws_guard_common::{
    maps::{
        AF_INET6, BAN_RATE, BanEvent, Counter, EVENT_BAN_ENDED, EVENT_BAN_STARTED, GlobalConfig,
        SourceKey,
    },
    names,
};

use crate::{
    bans::BanReason,
    control::protocol::{EventInfo, EventKind, EventsReply},
    guard::Guard,
    metrics::source_label,
};

/// Events the daemon keeps for `ws-guard events`.
pub const RING_CAPACITY: usize = 1000;
/// `refused` events recorded per second at most (the others are summarized).
pub const REFUSED_PER_SECOND: u32 = 20;
/// How often at most the source map is walked for refusals (whatever `sweep_interval`): a walk
/// reads every entry, and a flood keeps the refusal counters moving.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Lines logged at once before the limit applies.
pub const BURST: u32 = 20;
/// Lines per second once the burst is spent.
pub const PER_SECOND: u32 = 5;
/// How often held-back lines are summarized.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// A token bucket for log lines: `burst` at once, then `per_second`; it counts what it refuses
/// and reports that count at most once per interval.
#[derive(Clone, Debug)]
pub struct LogLimiter {
    burst: f64,
    per_second: f64,
    tokens: f64,
    last: Instant,
    interval: Duration,
    suppressed: u64,
    since: Instant,
}

impl LogLimiter {
    /// A full bucket at `now`.
    pub fn new(burst: u32, per_second: u32, interval: Duration, now: Instant) -> Self {
        Self {
            burst: burst as f64,
            per_second: per_second as f64,
            tokens: burst as f64,
            last: now,
            interval,
            suppressed: 0,
            since: now,
        }
    }

    /// Whether a line may be logged at `now`; a refused one is counted for the summary.
    pub fn admit(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.last = self.last.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Once an interval has passed since the last summary: how many lines were held back
    /// and over how long, if any; the count starts again from zero.
    pub fn summary(&mut self, now: Instant) -> Option<(u64, Duration)> {
        let span = now.saturating_duration_since(self.since);
        if span < self.interval {
            return None;
        }
        self.since = now;
        let n = std::mem::take(&mut self.suppressed);
        (n > 0).then_some((n, span))
    }
}

/// The daemon's ban log: every line about bans goes through one limiter.
#[derive(Debug)]
pub struct EventLog {
    limiter: Mutex<LogLimiter>,
}

impl Default for EventLog {
    fn default() -> Self {
        Self {
            limiter: Mutex::new(LogLimiter::new(
                BURST,
                PER_SECOND,
                SUMMARY_INTERVAL,
                Instant::now(),
            )),
        }
    }
}

impl EventLog {
    fn limiter(&self) -> std::sync::MutexGuard<'_, LogLimiter> {
        self.limiter.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Logs `line` unless the limit is reached.
    pub fn log(&self, line: impl FnOnce() -> String) {
        if self.limiter().admit(Instant::now()) {
            info!("{}", line());
        }
    }

    /// Logs how many lines were held back, once an interval has passed.
    pub fn summarize(&self) {
        if let Some((n, span)) = self.limiter().summary(Instant::now()) {
            warn!(
                "suppressed {n} ban events in the last {}s (`ws-guard bans` lists the bans)",
                span.as_secs()
            );
        }
    }
}

/// The log line of an event from the ring buffer. `now_ns`: CLOCK_MONOTONIC.
pub fn describe(event: &BanEvent, global: &GlobalConfig, now_ns: u64) -> String {
    match ban_event(event, global, now_ns) {
        Some(e) => e.message(),
        None => format!(
            "unknown ban event {}: source={} port={}",
            event.kind,
            source_label(&event.source, global),
            event.source.port
        ),
    }
}

/// An event from the ring buffer as `ws-guard events` shows it (not yet numbered); `None` for
/// a kind this daemon does not know. `now_ns`: CLOCK_MONOTONIC.
pub fn ban_event(event: &BanEvent, global: &GlobalConfig, now_ns: u64) -> Option<EventInfo> {
    let reason = BanReason::from_kernel(event.reason).name();
    let mut e = match event.kind {
        EVENT_BAN_STARTED => {
            // The configured duration when it is the rate's ban; else what is left of it.
            let ns = if event.reason == BAN_RATE && global.ban_ns > 0 {
                global.ban_ns
            } else {
                event.until_ns.saturating_sub(now_ns)
            };
            let mut e = EventInfo::new(EventKind::BanStarted);
            e.reason = Some(reason.into());
            // Rounded up, as the log line's seconds are.
            e.duration_ms = Some(ns.div_ceil(1_000_000));
            e
        }
        EVENT_BAN_ENDED => {
            let mut e = EventInfo::new(EventKind::BanEnded);
            e.reason = Some("expired".into());
            e.ban_reason = Some(reason.into());
            e
        }
        _ => return None,
    };
    e.source = Some(source_label(&event.source, global));
    e.port = Some(event.source.port);
    Some(e)
}

/// The daemon's last [`RING_CAPACITY`] events, numbered from 1, for `ws-guard events`.
#[derive(Debug)]
pub struct EventRing {
    ring: Mutex<Ring>,
}

#[derive(Debug)]
struct Ring {
    /// The last sequence number given (0: none yet).
    last: u64,
    events: VecDeque<EventInfo>,
    capacity: usize,
}

impl Default for EventRing {
    fn default() -> Self {
        Self::new(RING_CAPACITY)
    }
}

impl EventRing {
    /// An empty ring keeping the last `capacity` events (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            ring: Mutex::new(Ring {
                last: 0,
                events: VecDeque::with_capacity(capacity.clamp(1, RING_CAPACITY)),
                capacity: capacity.max(1),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Numbers and timestamps `event` and keeps it (the oldest goes when full); its number.
    pub fn record(&self, mut event: EventInfo) -> u64 {
        event.time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let mut r = self.lock();
        r.last += 1;
        event.seq = r.last;
        if r.events.len() >= r.capacity {
            r.events.pop_front();
        }
        r.events.push_back(event);
        r.last
    }

    /// The events after sequence number `since` (every one kept without it), how many of
    /// those are no longer kept, and the last number.
    pub fn since(&self, since: Option<u64>) -> EventsReply {
        let r = self.lock();
        let since = since.unwrap_or(0);
        let first = r.events.front().map_or(r.last + 1, |e| e.seq);
        EventsReply {
            seq: r.last,
            lost: first.saturating_sub(since.saturating_add(1)),
            events: r.events.iter().filter(|e| e.seq > since).cloned().collect(),
        }
    }
}

/// Samples refusals for the event ring on every sweep tick: one `refused` event per (source,
/// port) whose refusal count (`SourceState::refused`) grew since the last tick, with the
/// attempts refused since and the reason; at most `per_second` such events a second (the
/// sources refused most come first), the others summed up in one `refused_suppressed` event
/// once the second is over. Cheap when nothing is refused: the source map is walked only when
/// the kernel's refusal counters moved, and at most once per [`SAMPLE_EVERY`].
#[derive(Debug)]
pub struct RefusalSampler {
    /// The refusal count of each source key that has one, at the last walk.
    seen: HashMap<SourceKey, u32>,
    /// The kernel's refusal counters summed, at the last walk; `None` before the first.
    total: Option<u64>,
    /// When the source map was last walked.
    walked: Option<Instant>,
    per_second: u32,
    /// Since when `emitted` counts.
    window: Option<Instant>,
    emitted: u32,
    /// Left out in this window: (source, port) pairs and their attempts.
    held_sources: u64,
    held_count: u64,
}

impl Default for RefusalSampler {
    fn default() -> Self {
        Self::new(REFUSED_PER_SECOND)
    }
}

impl RefusalSampler {
    pub fn new(per_second: u32) -> Self {
        Self {
            seen: HashMap::new(),
            total: None,
            walked: None,
            per_second,
            window: None,
            emitted: 0,
            held_sources: 0,
            held_count: 0,
        }
    }

    /// One sweep tick: records into `ring` what was refused since the last (the first tick
    /// only takes the counts as they are: refusals before the daemon started are not events).
    /// `deny`: the deny list in force.
    pub fn tick(&mut self, guard: &Guard, deny: &[IpNet], ring: &EventRing) -> anyhow::Result<()> {
        let now = Instant::now();
        self.next_window(now, ring);
        if self
            .walked
            .is_some_and(|t| now.saturating_duration_since(t) < SAMPLE_EVERY)
        {
            return Ok(());
        }
        let counters = guard.counters()?;
        let total: u64 = [
            Counter::ConnLimited,
            Counter::RateLimited,
            Counter::Denied,
            Counter::Banned,
        ]
        .iter()
        .map(|c| counters.get(*c))
        .sum();
        let first = self.total.is_none();
        if self.total == Some(total) {
            return Ok(());
        }
        self.total = Some(total);
        self.walked = Some(now);
        let states = guard.source_states()?;
        let grown = self.observe(states.iter().map(|(k, s)| (*k, s.refused)), first);
        if grown.is_empty() {
            return Ok(());
        }
        let global = guard.global()?;
        let mut banned: Option<HashSet<SourceKey>> = None;
        for (key, count) in grown {
            if !self.admit() {
                self.held_sources += 1;
                self.held_count += count;
                continue;
            }
            let banned = match &banned {
                Some(b) => b,
                None => banned.insert(guard.bans()?.into_iter().map(|b| b.source).collect()),
            };
            let mut e = EventInfo::new(EventKind::Refused);
            e.source = Some(source_label(&key, &global));
            e.port = Some(key.port);
            e.count = Some(count);
            e.reason = Some(refusal_reason(&key, &global, banned, deny).into());
            ring.record(e);
        }
        Ok(())
    }

    /// Takes the refusal counts `states` in; the (source key, attempts refused since the last
    /// look) of those that grew, most first (none on the `first` look).
    pub fn observe(
        &mut self,
        states: impl Iterator<Item = (SourceKey, u32)>,
        first: bool,
    ) -> Vec<(SourceKey, u64)> {
        let mut seen = HashMap::with_capacity(self.seen.len());
        let mut grown = Vec::new();
        for (key, refused) in states {
            let before = self.seen.get(&key).copied().unwrap_or(0);
            // Lower than before: the entry was reclaimed and made again, counting from zero.
            let since = if refused >= before {
                refused - before
            } else {
                refused
            };
            if !first && since > 0 {
                grown.push((key, since as u64));
            }
            if refused != 0 {
                seen.insert(key, refused);
            }
        }
        self.seen = seen;
        grown.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        grown
    }

    /// Whether one more `refused` event fits in this second.
    fn admit(&mut self) -> bool {
        if self.emitted < self.per_second {
            self.emitted += 1;
            true
        } else {
            false
        }
    }

    /// Once a second has passed since the window began: records the summary of what it left
    /// out, if anything, and begins a new one.
    fn next_window(&mut self, now: Instant, ring: &EventRing) {
        if self
            .window
            .is_some_and(|start| now.saturating_duration_since(start) < Duration::from_secs(1))
        {
            return;
        }
        if self.held_sources > 0 {
            let mut e = EventInfo::new(EventKind::RefusedSuppressed);
            e.count = Some(std::mem::take(&mut self.held_count));
            e.sources = Some(std::mem::take(&mut self.held_sources));
            ring.record(e);
        }
        self.window = Some(now);
        self.emitted = 0;
    }
}

/// Why `key`'s attempts are refused: `banned` (it has a ban in force), `denied` (a deny-list
/// CIDR holds it or lies within it), else `limit` (`max_connections` or `new_connections`).
pub fn refusal_reason(
    key: &SourceKey,
    global: &GlobalConfig,
    banned: &HashSet<SourceKey>,
    deny: &[IpNet],
) -> &'static str {
    if banned.contains(key) {
        return "banned";
    }
    let net = if key.family == AF_INET6 {
        IpNet::new(
            IpAddr::V6(Ipv6Addr::from(key.addr)),
            global.ipv6_prefix.min(128) as u8,
        )
    } else {
        let a = Ipv4Addr::new(key.addr[0], key.addr[1], key.addr[2], key.addr[3]);
        IpNet::new(IpAddr::V4(a), global.ipv4_prefix.min(32) as u8)
    };
    match net {
        Ok(net)
            if deny
                .iter()
                .any(|d| d.contains(&net.addr()) || net.contains(d)) =>
        {
            "denied"
        }
        _ => "limit",
    }
}

impl Guard {
    /// Takes the event ring buffer out of the guard, for a reader of its own; once only.
    pub fn take_events(&mut self) -> anyhow::Result<RingBuf<MapData>> {
        let map = self
            .ebpf_mut()
            .take_map(names::MAP_EVENTS)
            .ok_or_else(|| anyhow!("map {} missing (already taken?)", names::MAP_EVENTS))?;
        RingBuf::try_from(map).context("the event map is not a ring buffer")
    }
}

/// Every event waiting in the ring buffer.
pub fn drain(ring: &mut RingBuf<MapData>) -> Vec<BanEvent> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        match BanEvent::from_bytes(&item) {
            Some(e) => out.push(e),
            None => warn!("ignored a short ban event ({} bytes)", item.len()),
        }
    }
    out
}

/// Starts the task that logs the kernel's ban events (every start and end, whether the XDP
/// program or the daemon's expiry ended the ban). When the ring buffer cannot be watched, says
/// so and goes on without the kernel's events: bans still apply.
///
/// `G`: the guard, or the daemon's state holding it.
pub fn start<G: AsRef<Guard> + AsMut<Guard> + Send + 'static>(
    guard: &Arc<Mutex<G>>,
    ring: Arc<EventRing>,
) {
    match watch(guard) {
        Ok(fd) => {
            tokio::spawn(run(fd, guard.clone(), EventLog::default(), ring));
        }
        Err(e) => warn!("ban events will not be logged: {e:#}; `ws-guard bans` lists the bans"),
    }
}

fn watch<G: AsMut<Guard>>(guard: &Arc<Mutex<G>>) -> anyhow::Result<AsyncFd<RingBuf<MapData>>> {
    let ring = lock(guard).as_mut().take_events()?;
    // SAFETY: the ring buffer owns its map's fd, which stays open and the same until the
    // AsyncFd (which owns the ring buffer) is dropped.
    unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow!("watching the ban event ring buffer: {e}"))
}

async fn run<G: AsRef<Guard>>(
    mut fd: AsyncFd<RingBuf<MapData>>,
    guard: Arc<Mutex<G>>,
    log: EventLog,
    ring: Arc<EventRing>,
) {
    let mut tick = tokio::time::interval(SUMMARY_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ready = fd.readable_mut() => {
                let mut ready = match ready {
                    Ok(r) => r,
                    Err(e) => {
                        warn!("ban events can no longer be read ({e}); bans still apply, \
                               `ws-guard bans` lists them");
                        return;
                    }
                };
                let events = drain(ready.get_inner_mut());
                ready.clear_ready();
                if events.is_empty() {
                    continue;
                }
                let global = match lock(&guard).as_ref().global() {
                    Ok(g) => g,
                    Err(e) => {
                        warn!("reading the global settings for ban events: {e:#}");
                        continue;
                    }
                };
                let now = crate::bans::monotonic_ns();
                for e in &events {
                    log.log(|| describe(e, &global, now));
                    if let Some(info) = ban_event(e, &global, now) {
                        ring.record(info);
                    }
                }
            }
            _ = tick.tick() => log.summarize(),
        }
    }
}

fn lock<G>(guard: &Mutex<G>) -> std::sync::MutexGuard<'_, G> {
    guard.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ws_guard_common::maps::{AF_INET, BAN_MANUAL, SourceKey};

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(3, 2, Duration::from_secs(10), t0);
        assert!((0..3).all(|_| l.admit(t0)));
        assert!(!l.admit(t0));
        // 2 per second: one more after half a second, not before.
        assert!(!l.admit(t0 + Duration::from_millis(400)));
        assert!(l.admit(t0 + Duration::from_millis(600)));
        assert!(!l.admit(t0 + Duration::from_millis(600)));
        // A long pause refills up to the burst, not beyond.
        let later = t0 + Duration::from_secs(100);
        assert_eq!((0..10).filter(|_| l.admit(later)).count(), 3);
    }

    #[test]
    fn summaries_once_per_interval_with_the_count() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(1, 1, Duration::from_secs(10), t0);
        assert!(l.admit(t0));
        for _ in 0..5 {
            assert!(!l.admit(t0));
        }
        assert_eq!(l.summary(t0 + Duration::from_secs(9)), None);
        assert_eq!(
            l.summary(t0 + Duration::from_secs(10)),
            Some((5, Duration::from_secs(10)))
        );
        // Counted again from zero; nothing held back, nothing to say.
        assert_eq!(l.summary(t0 + Duration::from_secs(30)), None);
        let t1 = t0 + Duration::from_secs(30);
        assert!(l.admit(t1));
        assert!(!l.admit(t1));
        assert_eq!(
            l.summary(t1 + Duration::from_secs(10)),
            Some((1, Duration::from_secs(10)))
        );
    }

    #[test]
    fn a_clock_going_backwards_does_not_mint_tokens() {
        let t0 = Instant::now() + Duration::from_secs(5);
        let mut l = LogLimiter::new(1, 1, Duration::from_secs(10), t0);
        assert!(l.admit(t0));
        assert!(!l.admit(t0 - Duration::from_secs(3)));
        assert!(!l.admit(t0));
    }

    fn key() -> SourceKey {
        let mut addr = [0; 16];
        addr[..4].copy_from_slice(&[198, 18, 0, 5]);
        SourceKey {
            addr,
            port: 9000,
            family: AF_INET,
        }
    }

    #[test]
    fn lines() {
        let global = GlobalConfig {
            ban_ns: 60_000_000_000,
            ..Default::default()
        };
        let mut e = BanEvent {
            kind: EVENT_BAN_STARTED,
            reason: BAN_RATE,
            source: key(),
            _pad: 0,
            until_ns: 70_000_000_000,
        };
        assert_eq!(
            describe(&e, &global, 10_000_000_000),
            "ban started: source=198.18.0.5/32 port=9000 reason=rate duration=1m"
        );
        e.reason = BAN_MANUAL;
        assert_eq!(
            describe(&e, &global, 40_000_000_000),
            "ban started: source=198.18.0.5/32 port=9000 reason=manual duration=30s"
        );
        e.kind = EVENT_BAN_ENDED;
        e.reason = BAN_RATE;
        assert_eq!(
            describe(&e, &global, 0),
            "ban ended: source=198.18.0.5/32 port=9000 reason=expired ban_reason=rate"
        );
        e.kind = 99;
        assert!(ban_event(&e, &global, 0).is_none());
        assert_eq!(
            describe(&e, &global, 0),
            "unknown ban event 99: source=198.18.0.5/32 port=9000"
        );
    }

    #[test]
    fn ban_events_for_the_ring() {
        let global = GlobalConfig {
            ban_ns: 60_000_000_000,
            ipv4_prefix: 32,
            ..Default::default()
        };
        let mut e = BanEvent {
            kind: EVENT_BAN_STARTED,
            reason: BAN_MANUAL,
            source: key(),
            _pad: 0,
            until_ns: 10_000_000_001,
        };
        let info = ban_event(&e, &global, 0).unwrap();
        assert_eq!(info.kind, EventKind::BanStarted);
        assert_eq!(info.source.as_deref(), Some("198.18.0.5/32"));
        assert_eq!(info.port, Some(9000));
        assert_eq!(info.reason.as_deref(), Some("manual"));
        // Rounded up as the log line's seconds are: 10.000000001 s is 11 s there.
        assert_eq!(info.duration_ms, Some(10_001));
        assert_eq!(
            info.message(),
            "ban started: source=198.18.0.5/32 port=9000 reason=manual duration=11s"
        );
        assert_eq!(info.message(), describe(&e, &global, 0));
        e.kind = EVENT_BAN_ENDED;
        let info = ban_event(&e, &global, 0).unwrap();
        assert_eq!(
            serde_json::to_value(&info).unwrap(),
            serde_json::json!({"seq": 0, "time": "", "kind": "ban_ended",
                "source": "198.18.0.5/32", "port": 9000, "reason": "expired",
                "ban_reason": "manual"})
        );
    }

    #[test]
    fn the_ring_keeps_the_last_events_numbered() {
        let ring = EventRing::new(3);
        let empty = ring.since(None);
        assert_eq!((empty.seq, empty.lost, empty.events.len()), (0, 0, 0));
        for i in 0..5u64 {
            let mut e = EventInfo::new(EventKind::Refused);
            e.count = Some(i);
            assert_eq!(ring.record(e), i + 1);
        }
        let all = ring.since(None);
        assert_eq!(all.seq, 5);
        assert_eq!(
            all.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        // Events 1 and 2 went; since None, they are counted as lost too.
        assert_eq!(all.lost, 2);
        assert!(all.events[0].time.ends_with('Z') && all.events[0].time.contains('T'));
        assert!(humantime::parse_rfc3339(&all.events[0].time).is_ok());
        let after1 = ring.since(Some(1));
        assert_eq!((after1.lost, after1.events.len()), (1, 3));
        let after4 = ring.since(Some(4));
        assert_eq!((after4.lost, after4.events.len()), (0, 1));
        assert_eq!(after4.events[0].seq, 5);
        let after5 = ring.since(Some(5));
        assert_eq!((after5.seq, after5.lost, after5.events.len()), (5, 0, 0));
        // A number from a daemon before a restart: nothing, and the last number.
        let ahead = ring.since(Some(100));
        assert_eq!((ahead.seq, ahead.lost, ahead.events.len()), (5, 0, 0));
    }

    fn key4(last: u8, port: u16) -> SourceKey {
        let mut addr = [0; 16];
        addr[..4].copy_from_slice(&[198, 18, 0, last]);
        SourceKey {
            addr,
            port,
            family: ws_guard_common::maps::AF_INET,
        }
    }

    #[test]
    fn refusals_are_what_grew_since_the_last_look() {
        let mut s = RefusalSampler::new(20);
        // The first look only takes the counts.
        assert!(
            s.observe([(key4(1, 80), 5), (key4(2, 80), 0)].into_iter(), true)
                .is_empty()
        );
        // Grew: 1 by 3, 2 by 7 (most first); 3 is new with 2.
        let grown = s.observe(
            [(key4(1, 80), 8), (key4(2, 80), 7), (key4(3, 80), 2)].into_iter(),
            false,
        );
        assert_eq!(
            grown,
            [(key4(2, 80), 7), (key4(1, 80), 3), (key4(3, 80), 2)]
        );
        // Nothing new: nothing. An entry reclaimed and made again counts from zero.
        assert!(
            s.observe(
                [(key4(1, 80), 8), (key4(2, 80), 7), (key4(3, 80), 2)].into_iter(),
                false
            )
            .is_empty()
        );
        assert_eq!(
            s.observe([(key4(1, 80), 1)].into_iter(), false),
            [(key4(1, 80), 1)]
        );
        // Gone and back with the same count as before it went: counted again.
        assert_eq!(
            s.observe([(key4(2, 80), 7)].into_iter(), false),
            [(key4(2, 80), 7)]
        );
    }

    #[test]
    fn refused_events_are_limited_per_second_and_the_rest_summarized() {
        let ring = EventRing::new(100);
        let mut s = RefusalSampler::new(2);
        let t0 = Instant::now();
        s.next_window(t0, &ring);
        let mut emitted = 0;
        for count in [5, 4, 3, 2] {
            if s.admit() {
                emitted += 1;
            } else {
                s.held_sources += 1;
                s.held_count += count;
            }
        }
        assert_eq!(emitted, 2);
        // Within the second: no summary yet, and still no room.
        s.next_window(t0 + Duration::from_millis(900), &ring);
        assert!(ring.since(None).events.is_empty());
        assert!(!s.admit());
        s.held_sources += 1;
        s.held_count += 1;
        // The second is over: the summary, and room again.
        s.next_window(t0 + Duration::from_millis(1000), &ring);
        let events = ring.since(None).events;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventKind::RefusedSuppressed);
        assert_eq!((events[0].count, events[0].sources), (Some(6), Some(3)));
        assert_eq!(
            events[0].message(),
            "refused events suppressed: count=6 sources=3"
        );
        assert!(s.admit() && s.admit() && !s.admit());
        // Nothing held back: no summary.
        s.next_window(t0 + Duration::from_secs(5), &ring);
        assert_eq!(ring.since(None).events.len(), 1);
    }

    #[test]
    fn refusal_reasons() {
        let global = GlobalConfig {
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            ..Default::default()
        };
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let deny = [net("198.18.0.0/30"), net("2001:db8:1:2::7/128")];
        let mut banned = HashSet::new();
        banned.insert(key4(9, 80));
        assert_eq!(
            refusal_reason(&key4(9, 80), &global, &banned, &deny),
            "banned"
        );
        // Banned on another port only: not banned here.
        assert_eq!(
            refusal_reason(&key4(9, 81), &global, &banned, &deny),
            "limit"
        );
        assert_eq!(
            refusal_reason(&key4(2, 80), &global, &banned, &deny),
            "denied"
        );
        assert_eq!(
            refusal_reason(&key4(4, 80), &global, &banned, &deny),
            "limit"
        );
        // An IPv6 /64 key holding a denied /128.
        let mut addr = [0u8; 16];
        addr[..8].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 2]);
        let v6 = SourceKey {
            addr,
            port: 80,
            family: AF_INET6,
        };
        assert_eq!(refusal_reason(&v6, &global, &banned, &deny), "denied");
        addr[7] = 3;
        let other = SourceKey { addr, ..v6 };
        assert_eq!(refusal_reason(&other, &global, &banned, &deny), "limit");
    }

    #[test]
    fn event_lines() {
        let mut e = EventInfo::new(EventKind::Refused);
        e.seq = 7;
        e.time = "2026-01-02T03:04:05.678Z".into();
        e.source = Some("198.18.0.5/32".into());
        e.port = Some(9000);
        e.reason = Some("banned".into());
        e.count = Some(12);
        assert_eq!(
            e.line(),
            "2026-01-02T03:04:05.678Z refused: source=198.18.0.5/32 port=9000 reason=banned \
             count=12"
        );
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            "{\"seq\":7,\"time\":\"2026-01-02T03:04:05.678Z\",\"kind\":\"refused\",\
             \"source\":\"198.18.0.5/32\",\"port\":9000,\"reason\":\"banned\",\"count\":12}"
        );
        let back: EventInfo = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
    }
}
