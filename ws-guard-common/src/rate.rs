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
//! [`RATE_SLOTS`] timestamps, so the N-th previous attempt is one index away: O(1) per SYN, exact,
//! and a changed N or W applies to the very next attempt.

use crate::maps::{RATE_SLOTS, RateState};

const _: () = assert!(RATE_SLOTS.is_power_of_two());

#[inline(always)]
fn slot(seq: u32) -> usize {
    (seq as usize) & (RATE_SLOTS - 1)
}

impl RateState {
    /// Whether attempt number `seq` at `now_ns` is within `limit` per `window_ns`. `limit` is
    /// clamped to [`RATE_SLOTS`]; a limit of zero admits everything.
    #[inline(always)]
    pub fn admits(&self, seq: u32, now_ns: u64, limit: u32, window_ns: u64) -> bool {
        if limit == 0 {
            return true;
        }
        let limit = if limit as usize > RATE_SLOTS {
            RATE_SLOTS as u32
        } else {
            limit
        };
        let nth_previous = self.stamps[slot(seq.wrapping_sub(limit))];
        // Zero: fewer than `limit` attempts ever. A stamp ahead of `now` (written by another CPU
        // a moment later) is inside the window.
        nth_previous == 0 || now_ns.saturating_sub(nth_previous) >= window_ns
    }

    /// Records attempt number `seq` at `now_ns`.
    #[inline(always)]
    pub fn record(&mut self, seq: u32, now_ns: u64) {
        self.stamps[slot(seq)] = now_ns;
    }

    /// Claims the next sequence number, decides and records. The kernel does the same with an
    /// atomic claim; this is the single-threaded form for tests and models.
    pub fn attempt(&mut self, now_ns: u64, limit: u32, window_ns: u64) -> bool {
        let seq = self.next;
        self.next = seq.wrapping_add(1);
        let ok = self.admits(seq, now_ns, limit, window_ns);
        self.record(seq, now_ns);
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    const S: u64 = 1_000_000_000;

    fn run(state: &mut RateState, times: &[u64], limit: u32, window: u64) -> Vec<bool> {
        times
            .iter()
            .map(|&t| state.attempt(t, limit, window))
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
    fn recovers_exactly_one_window_after_the_nth_previous_attempt() {
        let mut s = RateState::default();
        assert_eq!(run(&mut s, &[S, 2 * S], 2, 10 * S), [true, true]);
        // 11 s - 1 ns: the attempt at 1 s is still inside the window.
        assert!(!s.attempt(11 * S - 1, 2, 10 * S));
        // 12 s - 1 ns: the 2nd previous attempt is the one at 2 s, 1 ns short of a window.
        assert!(!s.attempt(12 * S - 1, 2, 10 * S));
        // Refused attempts count: at 21 s - 2 ns the 2nd previous attempt is the refused one at
        // 11 s - 1 ns (1 ns short of a window), and at 22 s - 2 ns it is the one at 12 s - 1 ns.
        assert!(!s.attempt(21 * S - 2, 2, 10 * S));
        assert!(!s.attempt(22 * S - 2, 2, 10 * S));
        // Quiet: once the last two attempts are a window old, admitted.
        assert!(s.attempt(32 * S - 2, 2, 10 * S));
    }

    #[test]
    fn hammering_stays_refused() {
        let mut s = RateState::default();
        let mut t = S;
        let mut admitted = 0;
        for _ in 0..1000 {
            if s.attempt(t, 5, 10 * S) {
                admitted += 1;
            }
            t += S / 2; // 2 per second, limit is 0.5 per second
        }
        assert_eq!(admitted, 5);
        // After a quiet window it is admitted again.
        assert!(s.attempt(t + 10 * S, 5, 10 * S));
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
            if s.attempt(t, limit, window) {
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
        assert!(!s.attempt(S + 2, 2, 10 * S));
        assert!(s.attempt(S + 3, 10, 10 * S));
        // Shorter window: the old attempts are outside it now.
        assert!(s.attempt(S + 100, 2, 50));
    }

    #[test]
    fn clock_edges() {
        let mut s = RateState::default();
        // A stamp ahead of "now" (another CPU) counts as inside the window.
        s.record(0, 5 * S);
        s.next = 1;
        assert!(!s.admits(1, 4 * S, 1, S));
        // Near the end of the clock's range nothing overflows.
        let mut s = RateState::default();
        assert!(s.attempt(u64::MAX - 1, 1, u64::MAX));
        assert!(!s.attempt(u64::MAX, 1, u64::MAX));
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
        let times: Vec<u64> = (1..=40).map(|i| i as u64).collect();
        let got = run(&mut s, &times, 1000, 10 * S);
        assert_eq!(got.iter().filter(|&&a| a).count(), RATE_SLOTS);
    }

    #[test]
    fn zero_limit_is_unlimited() {
        let mut s = RateState::default();
        assert!(run(&mut s, &[1, 2, 3, 4, 5], 0, S).iter().all(|&a| a));
    }
}
