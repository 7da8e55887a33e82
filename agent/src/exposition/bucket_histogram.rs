//! A histogram whose bucket counts can be added as well as observed: the kernel sorts idle
//! gaps into buckets itself (`Conn::gap_buckets`), and a starting agent continues from the
//! counts the agent before it exported (`carry`). Encoded exactly like prometheus-client's
//! `Histogram`, so adding a bucket's count equals observing that many values in it.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric},
};

#[derive(Debug)]
struct Counts {
    /// Observations per bucket (not cumulative); the last is `+Inf`'s own.
    buckets: Vec<u64>,
    sum: f64,
}

/// Cloning shares the counts (like prometheus-client's own metrics).
#[derive(Clone, Debug)]
pub struct BucketHistogram {
    /// Upper bounds, ascending, without `+Inf`.
    bounds: &'static [f64],
    counts: Arc<Mutex<Counts>>,
}

impl BucketHistogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        let counts = Counts { buckets: vec![0; bounds.len() + 1], sum: 0.0 };
        Self { bounds, counts: Arc::new(Mutex::new(counts)) }
    }

    pub fn bounds(&self) -> &'static [f64] {
        self.bounds
    }

    /// One observation, in the first bucket whose bound is at least `value`.
    pub fn observe(&self, value: f64) {
        let bucket = self.bounds.iter().position(|&bound| value <= bound);
        if let Ok(mut counts) = self.counts.lock() {
            let last = counts.buckets.len() - 1;
            counts.buckets[bucket.unwrap_or(last)] += 1;
            counts.sum += value;
        }
    }

    /// Adds `buckets[i]` observations to bucket `i` (the last one: `+Inf`) and `sum` to the
    /// sum. False, and nothing added, when `buckets` does not have one count per bucket.
    pub fn add(&self, buckets: &[u64], sum: f64) -> bool {
        let Ok(mut counts) = self.counts.lock() else { return false };
        if buckets.len() != counts.buckets.len() {
            return false;
        }
        for (total, added) in counts.buckets.iter_mut().zip(buckets) {
            *total += added;
        }
        counts.sum += sum;
        true
    }

    pub fn count(&self) -> u64 {
        self.counts.lock().map(|counts| counts.buckets.iter().sum()).unwrap_or_default()
    }

    pub fn sum(&self) -> f64 {
        self.counts.lock().map(|counts| counts.sum).unwrap_or_default()
    }
}

impl TypedMetric for BucketHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for BucketHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (buckets, count, sum) = {
            let counts = self.counts.lock().map_err(|_| std::fmt::Error)?;
            let bounds = self.bounds.iter().copied().chain([f64::INFINITY]);
            let buckets: Vec<(f64, u64)> = bounds.zip(counts.buckets.iter().copied()).collect();
            (buckets, counts.buckets.iter().sum(), counts.sum)
        };
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use connscope_common::conn::{GAP_BUCKETS, gap_bucket};
    use prometheus_client::{
        encoding::text::encode, metrics::histogram::Histogram, registry::Registry,
    };

    use super::*;
    use crate::model::metric_table::Buckets;

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
            buckets[gap_bucket(gap)] += 1;
            sum_ns += gap;
        }
        let bounds = Buckets::IdleGaps.bounds();
        let kernel = BucketHistogram::new(bounds);
        assert!(kernel.add(&buckets, sum_ns as f64 / 1e9));
        let single = Histogram::new(bounds.iter().copied());
        for gap in gaps_ns {
            single.observe(gap as f64 / 1e9);
        }
        let kernel = text(|r| r.register("gap", "gaps", kernel));
        let single = text(|r| r.register("gap", "gaps", single));
        assert_eq!(kernel, single);
    }

    /// Observing, bounds included, sorts values like prometheus-client does.
    #[test]
    fn observations_encode_like_prometheus_client() {
        const BOUNDS: [f64; 4] = [0.0, 1.0, 2.0, 5.0];
        let ours = BucketHistogram::new(&BOUNDS);
        let theirs = Histogram::new(BOUNDS);
        for value in [0.0, 0.5, 1.0, 1.0, 2.0, 4.9, 5.0, 7.0, 1e9] {
            ours.observe(value);
            theirs.observe(value);
        }
        assert_eq!((ours.count(), ours.sum()), (9, 1_000_000_021.4));
        let ours = text(|r| r.register("h", "h", ours));
        let theirs = text(|r| r.register("h", "h", theirs));
        assert_eq!(ours, theirs);
    }

    #[test]
    fn counts_of_another_shape_are_refused() {
        let histogram = BucketHistogram::new(&[1.0, 2.0]);
        assert!(!histogram.add(&[1, 2], 3.0));
        assert!(histogram.add(&[1, 2, 3], 3.0));
        assert_eq!(histogram.count(), 6);
    }
}
