//! The decryption budget's arithmetic: when a process's libssl uprobes cost too much, and
//! when it may be decrypted again. No I/O: `decryption` feeds it samples and acts.
//!
//! Decrypting a process costs its uprobe hits per second times what one hit costs on this
//! host (`uprobe_cost`, measured at start). Over `share` of one CPU, the process is counted
//! from its ciphertext instead. It then has no hits to count, so its cost is estimated from
//! its TLS requests per second times the hits per request it last had while decrypted; it
//! is decrypted again once that estimate stays under [`RESUME_FRACTION`] of the budget for
//! [`RESUME_AFTER`]. The gap between the two thresholds keeps a process near the budget
//! from flapping, and each flap costs at least [`RESUME_AFTER`] of ciphertext counting.

use std::time::{Duration, Instant};

/// How often the budget is judged (the agent's budget tick): half of the reaction time to
/// a load at most; removing the uprobes is the other part (about 0.8 s per file here).
pub const TICK: Duration = Duration::from_millis(500);
/// A process left out is decrypted again when its estimated cost stays under this
/// fraction of the budget ...
pub const RESUME_FRACTION: f64 = 0.5;
/// ... for this long.
pub const RESUME_AFTER: Duration = Duration::from_secs(10);
/// Hits per request assumed for a process that left decryption before any of its requests
/// was counted: a client's read and write and the read's return, the fewest a request-response
/// turn takes through libssl.
const DEFAULT_HITS_PER_REQUEST: f64 = 3.0;

/// What a process did over one tick.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    pub hits: u64,
    /// Requests on its TLS connections, decrypted or not.
    pub requests: u64,
}

/// The budget: a share of one CPU per process, at a measured cost per hit.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// 0: no budget.
    pub share: f64,
    pub hit_seconds: f64,
}

/// What the budget remembers of one process.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessCost {
    hits_per_request: Option<f64>,
    /// Since when its estimated cost has stayed low (while left out).
    low_since: Option<Instant>,
}

impl ProcessCost {
    pub fn hits_per_request(&self) -> Option<f64> {
        self.hits_per_request
    }
}

impl Budget {
    pub fn enabled(&self) -> bool {
        self.share > 0.0
    }

    /// Share of one CPU that `hits` over `elapsed` cost.
    pub fn cost(&self, hits: f64, elapsed: Duration) -> f64 {
        let seconds = elapsed.as_secs_f64();
        if seconds <= 0.0 { 0.0 } else { hits * self.hit_seconds / seconds }
    }

    /// A decrypted process's tick: whether it is over the budget. Learns its hits per request.
    pub fn over(&self, cost: &mut ProcessCost, sample: Sample, elapsed: Duration) -> bool {
        if sample.requests > 0 && sample.hits > 0 {
            cost.hits_per_request = Some(sample.hits as f64 / sample.requests as f64);
        }
        cost.low_since = None;
        self.enabled() && self.cost(sample.hits as f64, elapsed) > self.share
    }

    /// A tick of a process left out by the budget: whether it may be decrypted again.
    pub fn may_resume(
        &self,
        cost: &mut ProcessCost,
        requests: u64,
        elapsed: Duration,
        now: Instant,
    ) -> bool {
        if !self.enabled() {
            return true;
        }
        let per_request = cost.hits_per_request.unwrap_or(DEFAULT_HITS_PER_REQUEST);
        let estimate = self.cost(requests as f64 * per_request, elapsed);
        if estimate >= RESUME_FRACTION * self.share {
            cost.low_since = None;
            return false;
        }
        let since = *cost.low_since.get_or_insert(now);
        now.duration_since(since) >= RESUME_AFTER
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1% of a CPU at 10 µs a hit: 1,000 hits per second.
    const BUDGET: Budget = Budget { share: 0.01, hit_seconds: 10e-6 };

    #[test]
    fn over_budget_is_hits_per_second_times_their_cost() {
        let mut cost = ProcessCost::default();
        let second = Duration::from_secs(1);
        assert!(!BUDGET.over(&mut cost, Sample { hits: 1_000, requests: 200 }, second));
        assert!(BUDGET.over(&mut cost, Sample { hits: 1_001, requests: 200 }, second));
        assert!(!BUDGET.over(&mut cost, Sample { hits: 1_500, requests: 0 }, 2 * second));
        assert_eq!(cost.hits_per_request(), Some(1_001.0 / 200.0));
        let off = Budget { share: 0.0, ..BUDGET };
        assert!(!off.over(&mut cost, Sample { hits: u64::MAX, requests: 1 }, second));
    }

    #[test]
    fn resumes_after_a_low_estimate_held_long_enough() {
        let mut cost = ProcessCost::default();
        let second = Duration::from_secs(1);
        // 5 hits per request while decrypted.
        assert!(BUDGET.over(&mut cost, Sample { hits: 5_000, requests: 1_000 }, second));
        let start = Instant::now();
        // 100 req/s × 5 hits × 10 µs = 0.5% of a CPU: not under half the budget.
        assert!(!BUDGET.may_resume(&mut cost, 100, second, start));
        // 99 req/s is.
        assert!(!BUDGET.may_resume(&mut cost, 99, second, start + second));
        assert!(!BUDGET.may_resume(&mut cost, 10, second, start + 5 * second));
        // A busy second starts the wait again.
        assert!(!BUDGET.may_resume(&mut cost, 500, second, start + 6 * second));
        assert!(!BUDGET.may_resume(&mut cost, 0, second, start + 7 * second));
        assert!(!BUDGET.may_resume(&mut cost, 0, second, start + 16 * second));
        assert!(BUDGET.may_resume(&mut cost, 0, second, start + 17 * second));
    }
}
