//! Values that live in BPF maps, read at scrape time: the loss counters.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use crate::model::metric_table;
use aya::maps::{MapData, PerCpuArray};
use connscope_common::LostReason;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter},
};

/// Losses counted in user space (the kernel's are read from the `LOST` map).
#[derive(Debug, Default)]
pub struct UserLosses {
    pub decode_error: AtomicU64,
    /// Records the start-up drain could not keep (`crate::pipeline::backlog`).
    pub startup_backlog_full: AtomicU64,
}

/// `connscope_events_lost_total{reason}`: kernel-side losses summed over CPUs, plus the
/// agent's own (records it could not decode, or keep while it started).
pub struct LossCollector {
    kernel: Mutex<PerCpuArray<MapData, u64>>,
    user: Arc<UserLosses>,
}

impl LossCollector {
    pub fn new(kernel: PerCpuArray<MapData, u64>, user: Arc<UserLosses>) -> Self {
        Self { kernel: Mutex::new(kernel), user }
    }

    /// Current totals by `reason` label.
    pub fn totals(&self) -> Vec<(&'static str, u64)> {
        let mut totals = Vec::with_capacity(LostReason::ALL.len() + 1);
        if let Ok(kernel) = self.kernel.lock() {
            for &reason in LostReason::ALL {
                let sum = kernel
                    .get(&(reason as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                totals.push((reason.label(), sum));
            }
        }
        totals.push(("decode_error", self.user.decode_error.load(Ordering::Relaxed)));
        totals
            .push(("startup_backlog_full", self.user.startup_backlog_full.load(Ordering::Relaxed)));
        totals
    }
}

impl std::fmt::Debug for LossCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LossCollector").finish_non_exhaustive()
    }
}

impl Collector for LossCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let row = &metric_table::EVENTS_LOST;
        let mut family =
            encoder.encode_descriptor(row.name, row.help, None, MetricType::Counter)?;
        for (reason, total) in self.totals() {
            let labels = [("reason", reason)];
            ConstCounter::new(total).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
