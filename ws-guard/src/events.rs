//! Ban events: the XDP program reports bans it starts and ends through a ring buffer
//! (`WSG_EVENTS`); a task of the daemon reads them as they come and logs one structured line
//! each, rate-limited so a flood of bans cannot flood the log (the lines it holds back are
//! summarized once per interval).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use aya::maps::{MapData, RingBuf};
use log::{info, warn};
use tokio::io::{Interest, unix::AsyncFd};
use ws_guard_common::{
    maps::{BAN_RATE, BanEvent, EVENT_BAN_ENDED, EVENT_BAN_STARTED, GlobalConfig},
    names,
};

use crate::{bans::BanReason, guard::Guard, metrics::source_label};

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

fn seconds(ns: u64) -> String {
    humantime::format_duration(Duration::from_secs(ns.div_ceil(1_000_000_000))).to_string()
}

/// The log line of an event from the ring buffer. `now_ns`: CLOCK_MONOTONIC.
pub fn describe(event: &BanEvent, global: &GlobalConfig, now_ns: u64) -> String {
    let source = source_label(&event.source, global);
    let port = event.source.port;
    let reason = BanReason::from_kernel(event.reason).name();
    match event.kind {
        EVENT_BAN_STARTED => {
            // The configured duration when it is the rate's ban; else what is left of it.
            let ns = if event.reason == BAN_RATE && global.ban_ns > 0 {
                global.ban_ns
            } else {
                event.until_ns.saturating_sub(now_ns)
            };
            format!(
                "ban started: source={source} port={port} reason={reason} duration={}",
                seconds(ns)
            )
        }
        EVENT_BAN_ENDED => {
            format!("ban ended: source={source} port={port} reason=expired ban_reason={reason}")
        }
        k => format!("unknown ban event {k}: source={source} port={port}"),
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
pub fn start<G: AsRef<Guard> + AsMut<Guard> + Send + 'static>(guard: &Arc<Mutex<G>>) {
    match watch(guard) {
        Ok(fd) => {
            tokio::spawn(run(fd, guard.clone(), EventLog::default()));
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
    }
}
