//! What every metric family can do besides counting: take a value carried over from the
//! agent before (`exposition::carry`), adding to a counter or histogram and setting a gauge.

use std::hash::Hash;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
};
use serde::de::DeserializeOwned;

use crate::exposition::bucket_histogram::BucketHistogram;

/// A histogram family with the agent's own bucket histograms.
pub type HistogramFamily<L> = Family<L, BucketHistogram, fn() -> BucketHistogram>;

/// One carried value: a counter's or gauge's number, or a histogram's buckets.
#[derive(Debug, PartialEq)]
pub enum CarriedValue {
    Number(f64),
    /// Cumulative counts by upper bound (as exposed, `+Inf` included), and the sum.
    Buckets {
        cumulative: Vec<(f64, f64)>,
        sum: f64,
    },
}

/// A metric family whose values a starting agent can take over.
pub trait Carry {
    /// Adds (counters, histograms) or sets (gauges) `value` for the series `labels`; false
    /// when the labels or the value do not fit this family.
    fn carry(&self, labels: serde_json::Value, value: &CarriedValue) -> bool;
}

fn label_set<L: DeserializeOwned>(labels: serde_json::Value) -> Option<L> {
    serde_json::from_value(labels).ok()
}

/// The labels and the finite number of a counter's or gauge's sample.
fn number<L: DeserializeOwned>(
    labels: serde_json::Value,
    value: &CarriedValue,
) -> Option<(L, f64)> {
    match (label_set(labels), value) {
        (Some(labels), CarriedValue::Number(n)) if n.is_finite() => Some((labels, *n)),
        _ => None,
    }
}

impl<L> Carry for Family<L, Counter>
where
    L: DeserializeOwned + EncodeLabelSet + Clone + Hash + Eq + Send + Sync + std::fmt::Debug,
{
    fn carry(&self, labels: serde_json::Value, value: &CarriedValue) -> bool {
        let Some((labels, n)) = number::<L>(labels, value).filter(|(_, n)| *n >= 0.0) else {
            return false;
        };
        self.get_or_create(&labels).inc_by(n as u64);
        true
    }
}

impl<L> Carry for Family<L, Gauge>
where
    L: DeserializeOwned + EncodeLabelSet + Clone + Hash + Eq + Send + Sync + std::fmt::Debug,
{
    fn carry(&self, labels: serde_json::Value, value: &CarriedValue) -> bool {
        let Some((labels, n)) = number::<L>(labels, value) else { return false };
        self.get_or_create(&labels).set(n as i64);
        true
    }
}

impl<L> Carry for HistogramFamily<L>
where
    L: DeserializeOwned + EncodeLabelSet + Clone + Hash + Eq + Send + Sync + std::fmt::Debug,
{
    fn carry(&self, labels: serde_json::Value, value: &CarriedValue) -> bool {
        let (Some(labels), CarriedValue::Buckets { cumulative, sum }) =
            (label_set::<L>(labels), value)
        else {
            return false;
        };
        let histogram = self.get_or_create(&labels);
        match per_bucket(&histogram, cumulative) {
            Some(buckets) => histogram.add(&buckets, *sum),
            None => false,
        }
    }
}

/// A gauge without labels takes the value it is given.
impl Carry for Gauge {
    fn carry(&self, labels: serde_json::Value, value: &CarriedValue) -> bool {
        let empty = labels.as_object().is_some_and(serde_json::Map::is_empty);
        match value {
            CarriedValue::Number(n) if empty && n.is_finite() => {
                self.set(*n as i64);
                true
            }
            _ => false,
        }
    }
}

/// The non-cumulative counts of `cumulative`, if its bounds are `histogram`'s.
fn per_bucket(histogram: &BucketHistogram, cumulative: &[(f64, f64)]) -> Option<Vec<u64>> {
    let mut sorted = cumulative.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let bounds = histogram.bounds().iter().copied().chain([f64::INFINITY]);
    if sorted.len() != histogram.bounds().len() + 1
        || !sorted.iter().zip(bounds).all(|((bound, _), expected)| *bound == expected)
    {
        return None;
    }
    let mut below = 0u64;
    let mut buckets = Vec::with_capacity(sorted.len());
    for (_, count) in sorted {
        if !(count.is_finite() && count >= below as f64) {
            return None;
        }
        let count = count as u64;
        buckets.push(count - below);
        below = count;
    }
    Some(buckets)
}
