//! `connscope_connection_idle_seconds`: a histogram whose observations the kernel already
//! sorted into buckets (per connection, `Conn::gap_buckets`). The agent adds bucket counts
//! and sums as they arrive, so the exported histogram equals one observation per gap.

use std::sync::{Arc, Mutex};

use connscope_common::conn::{GAP_BUCKETS, IDLE_BOUNDS_NS};
use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric},
};

#[derive(Debug, Default)]
struct Counts {
    buckets: [u64; GAP_BUCKETS],
    sum_seconds: f64,
}

/// Cloning shares the counts (like prometheus-client's own metrics).
#[derive(Clone, Debug, Default)]
pub struct GapHistogram {
    counts: Arc<Mutex<Counts>>,
}

impl GapHistogram {
    /// Adds `buckets[i]` observations to bucket `i` and `sum_seconds` to the sum.
    pub fn add(&self, buckets: &[u64; GAP_BUCKETS], sum_seconds: f64) {
        if let Ok(mut counts) = self.counts.lock() {
            for (total, added) in counts.buckets.iter_mut().zip(buckets) {
                *total += added;
            }
            counts.sum_seconds += sum_seconds;
        }
    }

    /// `(count, sum)`, for tests.
    pub fn totals(&self) -> (u64, f64) {
        self.counts
            .lock()
            .map(|counts| (counts.buckets.iter().sum(), counts.sum_seconds))
            .unwrap_or_default()
    }
}

impl TypedMetric for GapHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for GapHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (buckets, count, sum) = {
            let counts = self.counts.lock().map_err(|_| std::fmt::Error)?;
            let bounds = IDLE_BOUNDS_NS.iter().map(|&ns| ns as f64 / 1e9).chain([f64::INFINITY]);
            let buckets: Vec<(f64, u64)> = bounds.zip(counts.buckets).collect();
            (buckets, counts.buckets.iter().sum(), counts.sum_seconds)
        };
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::{
        encoding::text::encode, metrics::histogram::Histogram, registry::Registry,
    };

    use super::*;

    fn text(register: impl FnOnce(&mut Registry)) -> String {
        let mut registry = Registry::default();
        register(&mut registry);
        let mut out = String::new();
        let _ = encode(&mut out, &registry);
        out
    }

    /// Bucketed in the kernel or observed one by one: the same exposition.
    #[test]
    fn kernel_buckets_encode_like_single_observations() {
        let gaps_ns = [500_000u64, 3_000_000, 3_000_000, 2_000_000_000, 400_000_000_000];
        let mut buckets = [0u64; GAP_BUCKETS];
        let mut sum_ns = 0;
        for gap in gaps_ns {
            buckets[connscope_common::conn::gap_bucket(gap)] += 1;
            sum_ns += gap;
        }
        let kernel = GapHistogram::default();
        kernel.add(&buckets, sum_ns as f64 / 1e9);
        let single = Histogram::new(IDLE_BOUNDS_NS.iter().map(|&ns| ns as f64 / 1e9));
        for gap in gaps_ns {
            single.observe(gap as f64 / 1e9);
        }
        let kernel = text(|r| r.register("gap", "gaps", kernel));
        let single = text(|r| r.register("gap", "gaps", single));
        assert_eq!(kernel, single);
    }
}
