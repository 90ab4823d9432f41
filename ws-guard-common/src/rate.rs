//! The new-connection rate window.
//!
//! Rule: with a limit of N per window W, an attempt at time t is admitted when fewer than N
//! earlier attempts of the same source key happened in the W before t, i.e. when the N-th
//! previous attempt is at least W old. Every attempt that reaches the rule counts, admitted or
//! not (like iptables' `recent --update`), so a source that keeps trying faster than N per W
//! stays refused until it has made fewer than N attempts in the last W. Admitted attempts never
//! exceed N in any window of length W.
//!
//! Each attempt claims a sequence number (atomically, in the kernel); the ring keeps the last
//! `ring` timestamps (the largest count the configuration uses, at most [`RATE_SLOTS`]: memory
//! follows the configuration), so the N-th previous attempt is one index away: O(1) per SYN,
//! and a changed N (up to the ring) or W applies to the very next attempt.
//!
//! Timestamps are kept to the millisecond (4 bytes each instead of 8): an attempt is admitted
//! once the N-th previous one is *more* than W old in whole milliseconds, which is never before
//! the exact rule admits it and at most 2 ms after. (iptables' `recent` counts in jiffies, 4 ms
//! at the usual HZ=250.) Stamps wrap after 2^32 ms (49.7 days); ages are taken modulo 2^32 and
//! read as signed, so a stamp a moment ahead of `now` (another CPU) is inside the window, and
//! the daemon's sweep clears stamps older than [`STALE_MS`] before they could look recent again.

#[cfg(doc)]
use crate::maps::RATE_SLOTS;
use crate::maps::RateState;

/// The longest window, in milliseconds (the configuration allows 7 days).
pub const MAX_WINDOW_MS: u32 = 1 << 30;
/// Age from which the sweep clears a stamp (longer than any window, half the range where ages
/// read correctly).
pub const STALE_MS: u32 = 1 << 30;

/// Where attempt `seq` is kept in a ring of `ring` stamps (`ring` in 1..=[`RATE_SLOTS`]).
#[inline(always)]
pub fn slot(seq: u32, ring: u32) -> usize {
    (seq % nonzero(ring)) as usize
}

/// `ring`, or 1 for a zero one: never a division by zero (which in the eBPF program would be a
/// panic path the verifier refuses).
#[inline(always)]
fn nonzero(ring: u32) -> u32 {
    if ring == 0 { 1 } else { ring }
}

/// Where the attempt `limit` before attempt `seq` is kept (`limit` clamped to the ring). Right
/// after the sequence number wraps (every 2^32 attempts of one source) it can point at another
/// of the last `ring` attempts, unless `ring` divides 2^32: a source that made four billion
/// attempts has every stamp of its ring in the window anyway.
#[inline(always)]
pub fn nth_previous_slot(seq: u32, limit: u32, ring: u32) -> usize {
    let ring = nonzero(ring);
    let limit = if limit > ring { ring } else { limit };
    ((seq % ring + ring - limit) % ring) as usize
}

/// Whether the `limit`-th previous attempt, stamped `nth_previous` (zero: none), leaves room
/// for an attempt at `now_ms` ([`stamp_ms`]) in a window of `window_ms` ([`window_ms`]).
#[inline(always)]
pub fn outside_window(nth_previous: u32, now_ms: u32, window_ms: u32) -> bool {
    // Zero: fewer than `limit` attempts ever. An empty window holds no attempt (exact; the
    // configuration never sets one, the benchmark does).
    nth_previous == 0 || window_ms == 0 || age_ms(now_ms, nth_previous) > window_ms as i32
}

/// A `bpf_ktime_get_ns` reading as the ring stores it: milliseconds, wrapping, never zero
/// (zero means "never used").
#[inline(always)]
pub fn stamp_ms(now_ns: u64) -> u32 {
    let ms = div_1e6(now_ns) as u32;
    if ms == 0 { 1 } else { ms }
}

/// `n / 1_000_000`, exactly, without a 64-bit division: BPF has no multiply-high, so LLVM emits
/// one, which the JIT makes an x86 `div` (tens of cycles, on every judgement). Long division
/// of `n >> 6` by 15,625 in 16-bit digits instead: each step divides a number below 2^30 by a
/// constant, which LLVM turns into a multiplication.
#[inline(always)]
pub fn div_1e6(n: u64) -> u64 {
    const D: u32 = 15_625; // 1_000_000 >> 6
    let m = n >> 6;
    let mut q = 0u64;
    let mut r = 0u32;
    let mut shift = 64;
    while shift > 0 {
        shift -= 16;
        // r < D < 2^14, so x < 2^30.
        let x = (r << 16) | ((m >> shift) & 0xffff) as u32;
        let d = x / D;
        r = x - d * D;
        q = (q << 16) | d as u64;
    }
    q
}

/// A window in whole milliseconds, rounded up, at most [`MAX_WINDOW_MS`].
#[inline(always)]
pub fn window_ms(window_ns: u64) -> u32 {
    let ms = window_ns.div_ceil(1_000_000);
    if ms > MAX_WINDOW_MS as u64 {
        MAX_WINDOW_MS
    } else {
        ms as u32
    }
}

/// The age of `stamp` at `now` (both [`stamp_ms`]), negative when it is ahead of `now`.
#[inline(always)]
pub fn age_ms(now: u32, stamp: u32) -> i32 {
    now.wrapping_sub(stamp) as i32
}

impl RateState {
    /// Whether attempt number `seq` at `now_ms` ([`stamp_ms`]) is within `limit` per
    /// `window_ms` ([`window_ms`]), in a ring of `ring` stamps. `limit` is clamped to the ring; a
    /// limit of zero admits everything.
    #[inline(always)]
    pub fn admits(&self, seq: u32, now_ms: u32, limit: u32, window_ms: u32, ring: u32) -> bool {
        limit == 0
            || outside_window(
                self.stamps[nth_previous_slot(seq, limit, ring)],
                now_ms,
                window_ms,
            )
    }

    /// Records attempt number `seq` at `now_ms` ([`stamp_ms`]).
    #[inline(always)]
    pub fn record(&mut self, seq: u32, now_ms: u32, ring: u32) {
        self.stamps[slot(seq, ring)] = now_ms;
    }

    /// Claims the next sequence number, decides and records, from a `bpf_ktime_get_ns`
    /// reading and a window in nanoseconds. The kernel does the same with an atomic claim; this
    /// is the single-threaded form for tests and models.
    pub fn attempt(&mut self, now_ns: u64, limit: u32, window_ns: u64, ring: u32) -> bool {
        let seq = self.next;
        self.next = seq.wrapping_add(1);
        let now = stamp_ms(now_ns);
        let ok = self.admits(seq, now, limit, window_ms(window_ns), ring);
        self.record(seq, now, ring);
        ok
    }

    /// Age in milliseconds of the newest attempt at `now_ns`, `None` if there was none (or
    /// every stamp was cleared). A stamp ahead of `now` counts as age 0.
    pub fn newest_age_ms(&self, now_ns: u64) -> Option<u32> {
        let now = stamp_ms(now_ns);
        self.stamps
            .iter()
            .filter(|s| **s != 0)
            .map(|s| age_ms(now, *s).max(0) as u32)
            .min()
    }

    /// Whether some stamp is at least [`STALE_MS`] old at `now_ns` (and younger than twice
    /// that, where ages still read correctly): the sweep clears it.
    pub fn has_stale(&self, now_ns: u64) -> bool {
        let now = stamp_ms(now_ns);
        self.stamps
            .iter()
            .any(|s| *s != 0 && now.wrapping_sub(*s) >= STALE_MS && age_ms(now, *s) >= 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dividing_by_a_million_in_digits_is_exact() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let check = |n: u64| assert_eq!(div_1e6(n), n / 1_000_000, "{n}");
        for n in [
            0,
            1,
            999_999,
            1_000_000,
            1_000_001,
            u32::MAX as u64,
            u64::MAX,
            u64::MAX - 1,
        ] {
            check(n);
        }
        for k in 0..64 {
            for d in [0u64, 1, 999_999, 1_000_000] {
                check((1u64 << k).wrapping_sub(d));
                check((1u64 << k).wrapping_add(d));
            }
        }
        for _ in 0..2_000_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            check(x);
            check(x >> (x % 64));
            check((x % 1_000_000_000) * 1_000_000 + x % 1_000_000);
        }
    }
    use crate::maps::RATE_SLOTS;
    use std::vec::Vec;

    const S: u64 = 1_000_000_000;
    const MS: u64 = 1_000_000;
    /// The ring of the configuration's largest count.
    const R: u32 = RATE_SLOTS as u32;

    fn run(state: &mut RateState, times: &[u64], limit: u32, window: u64) -> Vec<bool> {
        times
            .iter()
            .map(|&t| state.attempt(t, limit, window, R))
            .collect()
    }

    #[test]
    fn admits_n_per_window_then_refuses() {
        let mut s = RateState::default();
        let got = run(&mut s, &[S, S + 1, S + 2, S + 3], 3, 10 * S);
        assert_eq!(got, [true, true, true, false]);
    }

    #[test]
    fn iptables_recipe_gives_nine_per_hundred_seconds() {
        // `--hitcount 10 --seconds 100` is `new_connections = "9/100s"`.
        let mut s = RateState::default();
        let times: Vec<u64> = (0..10).map(|i| S + i * S).collect();
        let got = run(&mut s, &times, 9, 100 * S);
        assert_eq!(got.iter().filter(|&&a| a).count(), 9);
        assert!(!got[9]);
    }

    #[test]
    fn recovers_one_window_after_the_nth_previous_attempt_to_the_millisecond() {
        let mut s = RateState::default();
        assert_eq!(run(&mut s, &[S, 2 * S], 2, 10 * S), [true, true]);
        // 11 s: the attempt at 1 s is exactly a window old, but whole milliseconds cannot tell
        // it from one a little younger, so it is still inside (never early).
        assert!(!s.attempt(11 * S, 2, 10 * S, R));
        // 12 s + 1 ms: the 2nd previous attempt (2 s) is more than a window old: admitted.
        assert!(s.attempt(12 * S + MS, 2, 10 * S, R));
        // Refused attempts count: at 12 s + 2 ms the 2nd previous is the refused one at 11 s.
        assert!(!s.attempt(12 * S + 2 * MS, 2, 10 * S, R));
        // At 21 s + 1 ms it is the one at 12 s + 1 ms, a window less 1 ms ago.
        assert!(!s.attempt(21 * S + MS, 2, 10 * S, R));
        // At 22 s + 3 ms it is the one at 12 s + 2 ms, a window and 1 ms ago.
        assert!(s.attempt(22 * S + 3 * MS, 2, 10 * S, R));
    }

    #[test]
    fn never_early_and_at_most_two_milliseconds_late() {
        // Two attempts in every pairing of sub-millisecond offsets: the second is admitted
        // (limit 1) only when it is at least a window after the first, and always once it is
        // 2 ms past that.
        let w = 100 * MS;
        for a in [0, 1, MS / 2, MS - 1] {
            for d in (w - 3 * MS..w + 3 * MS).step_by((MS / 4) as usize) {
                let mut s = RateState::default();
                assert!(s.attempt(S + a, 1, w, R));
                let ok = s.attempt(S + a + d, 1, w, R);
                if d < w {
                    assert!(!ok, "early: {a} {d}");
                }
                if d >= w + 2 * MS {
                    assert!(ok, "late: {a} {d}");
                }
            }
        }
    }

    #[test]
    fn stamps_wrap_and_stale_ones_are_found() {
        let mut s = RateState::default();
        // Just before the millisecond clock wraps, and just after.
        let wrap = (1u64 << 32) * MS;
        assert!(s.attempt(wrap - MS, 1, 10 * MS, R));
        assert!(!s.attempt(wrap + 5 * MS, 1, 10 * MS, R));
        assert!(s.attempt(wrap + 20 * MS, 1, 10 * MS, R));
        assert_eq!(s.newest_age_ms(wrap + 25 * MS), Some(5));
        // Stale from STALE_MS on.
        let t = 5 * S;
        let mut s = RateState::default();
        s.attempt(t, 1, S, R);
        assert!(!s.has_stale(t + (STALE_MS as u64 - 1) * MS));
        assert!(s.has_stale(t + STALE_MS as u64 * MS));
        assert_eq!(RateState::default().newest_age_ms(t), None);
        assert_eq!(stamp_ms(0), 1);
        assert_eq!(window_ms(1), 1);
        assert_eq!(window_ms(u64::MAX), MAX_WINDOW_MS);
    }

    #[test]
    fn hammering_stays_refused() {
        let mut s = RateState::default();
        let mut t = S;
        let mut admitted = 0;
        for _ in 0..1000 {
            if s.attempt(t, 5, 10 * S, R) {
                admitted += 1;
            }
            t += S / 2; // 2 per second, limit is 0.5 per second
        }
        assert_eq!(admitted, 5);
        // After a quiet window it is admitted again.
        assert!(s.attempt(t + 10 * S, 5, 10 * S, R));
    }

    #[test]
    fn never_more_than_n_in_any_window() {
        // Pseudo-random arrival times; check the invariant on the admitted ones.
        let mut s = RateState::default();
        let (limit, window) = (4u32, 5 * S);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut t = S;
        let mut admitted = Vec::new();
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            t += x % (3 * S);
            if s.attempt(t, limit, window, R) {
                admitted.push(t);
            }
        }
        for w in admitted.windows(limit as usize + 1) {
            assert!(w[limit as usize] - w[0] >= window, "{w:?}");
        }
        assert!(admitted.len() > 100);
    }

    #[test]
    fn limit_change_applies_to_next_attempt() {
        let mut s = RateState::default();
        assert_eq!(run(&mut s, &[S, S + 1], 5, 10 * S), [true, true]);
        assert!(!s.attempt(S + 2, 2, 10 * S, R));
        assert!(s.attempt(S + 3, 10, 10 * S, R));
        // Shorter window: the old attempts are outside it now.
        assert!(s.attempt(S + 100 * MS, 2, 50 * MS, R));
    }

    #[test]
    fn clock_edges() {
        let mut s = RateState::default();
        // A stamp ahead of "now" (another CPU) counts as inside the window.
        s.record(0, stamp_ms(5 * S), R);
        s.next = 1;
        assert!(!s.admits(1, stamp_ms(4 * S), 1, window_ms(S), R));
        // Sequence numbers wrap without losing the window.
        let mut s = RateState {
            next: u32::MAX - 1,
            ..Default::default()
        };
        assert_eq!(
            run(&mut s, &[S, S + 1, S + 2, S + 3], 3, 10 * S),
            [true, true, true, false]
        );
        // Limits above the ring are clamped to it, not wrapped.
        let mut s = RateState::default();
        let times: Vec<u64> = (1..=40).map(|i| S + i as u64).collect();
        let got = run(&mut s, &times, 1000, 10 * S);
        assert_eq!(got.iter().filter(|&&a| a).count(), RATE_SLOTS);
    }

    #[test]
    fn rings_of_any_length_keep_exactly_the_last_attempts() {
        // The recipe's 9 per window with a ring of 9: the same decisions as with the largest
        // ring, over a long irregular run, for every ring from the count up.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut times = Vec::new();
        let mut t = S;
        for _ in 0..3000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            t += x % (30 * S);
            times.push(t);
        }
        let reference: Vec<bool> = {
            let mut s = RateState::default();
            times.iter().map(|&t| s.attempt(t, 9, 100 * S, R)).collect()
        };
        for ring in 9..=R {
            let mut s = RateState::default();
            let got: Vec<bool> = times
                .iter()
                .map(|&t| s.attempt(t, 9, 100 * S, ring))
                .collect();
            assert_eq!(got, reference, "ring {ring}");
            // Nothing is written past the ring.
            assert!(
                s.stamps[ring as usize..].iter().all(|x| *x == 0),
                "ring {ring}"
            );
        }
        // Limits above the ring are clamped to it.
        let mut s = RateState::default();
        let got = run_ring(&mut s, &[S, S + 1, S + 2, S + 3], 5, 10 * S, 3);
        assert_eq!(got, [true, true, true, false]);
        assert_eq!(nth_previous_slot(7, 2, 9), 5);
        assert_eq!(nth_previous_slot(1, 3, 9), 7);
        assert_eq!(nth_previous_slot(1, 30, 9), 1);
    }

    fn run_ring(s: &mut RateState, times: &[u64], limit: u32, window: u64, ring: u32) -> Vec<bool> {
        times
            .iter()
            .map(|&t| s.attempt(t, limit, window, ring))
            .collect()
    }

    #[test]
    fn an_empty_window_holds_nothing() {
        let mut s = RateState::default();
        assert!(run(&mut s, &[S, S, S, S], 1, 0).iter().all(|&a| a));
    }

    #[test]
    fn zero_limit_is_unlimited() {
        let mut s = RateState::default();
        assert!(run(&mut s, &[1, 2, 3, 4, 5], 0, S).iter().all(|&a| a));
    }
}
