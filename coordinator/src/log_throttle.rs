//! Log throttling: at most a few lines per reason label and interval, so that a flood of refused requests cannot flood the log; the lines held back are counted and the next line written for that label says how many.
//!
//! [`Throttle`] is the pure logic: the caller passes the time. [`LogThrottle`] wraps it in a
//! mutex for the server's tasks and reads the monotonic clock. Counting every refusal is the
//! metrics' job (`fedrec_rejected_total`): the throttle only decides which ones get a line.
//!
//! ```
//! use fedrec_coordinator::log_throttle::LogThrottle;
//!
//! let throttle = LogThrottle::default(); // one line per label and second
//! let label = "bad_token";
//! throttle.warn(label, |suppressed| tracing::warn!(reason = label, suppressed, "refused a peer"));
//! ```

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Lines written per label and interval by [`LogThrottle::default`].
pub const DEFAULT_LINES_PER_INTERVAL: u32 = 1;
/// The interval of [`LogThrottle::default`].
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// What to do with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it, saying that `suppressed` lines of the same label were held back since the
    /// last line written for that label.
    Emit {
        /// Lines of this label held back since the last one written.
        suppressed: u64,
    },
    /// Hold it back (it is counted).
    Suppress,
}

/// Where one label stands in its current interval.
#[derive(Debug, Clone, Copy)]
struct LabelState {
    window_start: Instant,
    emitted: u32,
    suppressed: u64,
}

/// At most `lines_per_interval` lines per label in each interval, counted from the first line
/// of the interval; the rest are counted and reported by the next line that is written.
///
/// Labels are `&'static str` (the reason labels are fixed words), so memory is bounded by the
/// number of distinct labels in the program.
#[derive(Debug, Clone)]
pub struct Throttle {
    lines_per_interval: u32,
    interval: Duration,
    labels: HashMap<&'static str, LabelState>,
}

impl Throttle {
    /// A throttle writing at most `lines_per_interval` lines per label in each `interval`
    /// (0 holds back every line; a zero interval holds back none).
    pub fn new(lines_per_interval: u32, interval: Duration) -> Self {
        Self { lines_per_interval, interval, labels: HashMap::new() }
    }

    /// Decides about one line of `label` at `now`.
    ///
    /// A new interval starts at the first line at least `interval` after the previous
    /// interval's start. Time that goes backwards (it does not, with [`Instant`]) counts as
    /// no time.
    pub fn check(&mut self, label: &'static str, now: Instant) -> Verdict {
        let state =
            self.labels.entry(label).or_insert(LabelState { window_start: now, emitted: 0, suppressed: 0 });
        if now.saturating_duration_since(state.window_start) >= self.interval {
            state.window_start = now;
            state.emitted = 0;
        }
        if state.emitted < self.lines_per_interval {
            state.emitted += 1;
            Verdict::Emit { suppressed: std::mem::take(&mut state.suppressed) }
        } else {
            state.suppressed = state.suppressed.saturating_add(1);
            Verdict::Suppress
        }
    }

    /// Lines of `label` held back and not yet reported by a written line.
    pub fn pending(&self, label: &str) -> u64 {
        self.labels.get(label).map_or(0, |s| s.suppressed)
    }
}

/// A [`Throttle`] that tasks on several threads share; it reads the monotonic clock.
#[derive(Debug)]
pub struct LogThrottle {
    inner: Mutex<Throttle>,
}

impl LogThrottle {
    /// A shared throttle writing at most `lines_per_interval` lines per label in each
    /// `interval`.
    pub fn new(lines_per_interval: u32, interval: Duration) -> Self {
        Self { inner: Mutex::new(Throttle::new(lines_per_interval, interval)) }
    }

    /// Calls `emit(suppressed)` if a line of `label` may be written now, where `suppressed`
    /// is how many lines of `label` were held back since the last one; otherwise counts the
    /// line and does nothing. `emit` runs after the lock is released.
    pub fn warn(&self, label: &'static str, emit: impl FnOnce(u64)) {
        self.warn_at(label, Instant::now(), emit);
    }

    /// [`LogThrottle::warn`] at a given time.
    pub fn warn_at(&self, label: &'static str, now: Instant, emit: impl FnOnce(u64)) {
        // A panic while the lock was held cannot leave the counts inconsistent: keep going.
        let verdict = self.inner.lock().unwrap_or_else(PoisonError::into_inner).check(label, now);
        if let Verdict::Emit { suppressed } = verdict {
            emit(suppressed);
        }
    }

    /// Lines of `label` held back and not yet reported.
    pub fn pending(&self, label: &str) -> u64 {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).pending(label)
    }
}

impl Default for LogThrottle {
    /// [`DEFAULT_LINES_PER_INTERVAL`] line per label and [`DEFAULT_INTERVAL`].
    fn default() -> Self {
        Self::new(DEFAULT_LINES_PER_INTERVAL, DEFAULT_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn one_line_per_label_and_second_and_the_next_line_counts_the_rest() {
        let t0 = Instant::now();
        let mut throttle = Throttle::new(1, ms(1000));
        assert_eq!(throttle.check("bad_token", t0), Verdict::Emit { suppressed: 0 });
        // A flood within the second: every line held back and counted.
        for i in 1..=1234u64 {
            assert_eq!(throttle.check("bad_token", t0 + ms(i % 1000)), Verdict::Suppress);
        }
        assert_eq!(throttle.pending("bad_token"), 1234);
        // Another label has its own allowance.
        assert_eq!(throttle.check("replay", t0 + ms(10)), Verdict::Emit { suppressed: 0 });
        // The first line of the next second reports the count, once.
        assert_eq!(throttle.check("bad_token", t0 + ms(1000)), Verdict::Emit { suppressed: 1234 });
        assert_eq!(throttle.pending("bad_token"), 0);
        assert_eq!(throttle.check("bad_token", t0 + ms(1500)), Verdict::Suppress);
        // After a quiet spell the next line is written at once.
        assert_eq!(throttle.check("bad_token", t0 + ms(60_000)), Verdict::Emit { suppressed: 1 });
        assert_eq!(throttle.check("bad_token", t0 + ms(60_001)), Verdict::Suppress);
    }

    #[test]
    fn the_interval_starts_at_its_first_line_not_on_a_fixed_grid() {
        let t0 = Instant::now();
        let mut throttle = Throttle::new(2, ms(1000));
        assert_eq!(throttle.check("a", t0 + ms(900)), Verdict::Emit { suppressed: 0 });
        assert_eq!(throttle.check("a", t0 + ms(950)), Verdict::Emit { suppressed: 0 });
        // 1100 ms is only 200 ms into the interval that began at 900 ms.
        assert_eq!(throttle.check("a", t0 + ms(1100)), Verdict::Suppress);
        assert_eq!(throttle.check("a", t0 + ms(1899)), Verdict::Suppress);
        assert_eq!(throttle.check("a", t0 + ms(1900)), Verdict::Emit { suppressed: 2 });
        assert_eq!(throttle.check("a", t0 + ms(1901)), Verdict::Emit { suppressed: 0 });
        assert_eq!(throttle.check("a", t0 + ms(1902)), Verdict::Suppress);
    }

    #[test]
    fn zero_lines_hold_back_everything_and_a_zero_interval_nothing() {
        let t0 = Instant::now();
        let mut silent = Throttle::new(0, ms(1000));
        for i in 0..5 {
            assert_eq!(silent.check("x", t0 + ms(i * 5000)), Verdict::Suppress);
        }
        assert_eq!(silent.pending("x"), 5);
        let mut open = Throttle::new(1, Duration::ZERO);
        for _ in 0..5 {
            assert_eq!(open.check("x", t0), Verdict::Emit { suppressed: 0 });
        }
    }

    #[test]
    fn the_shared_throttle_calls_back_only_for_written_lines() {
        let t0 = Instant::now();
        let throttle = LogThrottle::new(1, ms(1000));
        let mut written = Vec::new();
        for i in 0..100u64 {
            throttle.warn_at("cut_off", t0 + ms(i * 25), |suppressed| written.push((i, suppressed)));
        }
        // 100 lines over 2.5 s: the ones at 0, 1000 and 2000 ms are written.
        assert_eq!(written, vec![(0, 0), (40, 39), (80, 39)]);
        assert_eq!(throttle.pending("cut_off"), 19);
    }

    #[test]
    fn the_shared_throttle_is_usable_from_many_threads() {
        let throttle = std::sync::Arc::new(LogThrottle::new(1, Duration::from_secs(3600)));
        let t0 = Instant::now();
        let written = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..250 {
                        throttle.warn_at("bad_token", t0, |_| {
                            written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(written.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(throttle.pending("bad_token"), 999);
    }
}
