//! The metric families the agent updates, each registered from its row of the metric table
//! (`model::metric_table`), under the `connscope_` prefix.

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{self, Registry},
};

pub use crate::exposition::bucket_histogram::BucketHistogram;
use crate::{
    exposition::family::{Carry, HistogramFamily},
    model::{
        label_sets::{
            Build, CappedLabel, Closed, ClosedByLabels, ConnectFailed, EventKindLabel, Flow,
            FlowProtocol, HttpRequest, Netns, OpenState, PlacedFlow, PlacedFlowNetns, Probe,
            Server, SkipReason,
        },
        metric_table::{self as table, Metric, Unit},
    },
};

/// Registers `metric` under its row: name, help and unit.
pub fn register(registry: &mut Registry, row: &Metric, metric: impl registry::Metric) {
    match row.unit {
        Some(Unit::Seconds) => {
            registry.register_with_unit(row.name, row.help, registry::Unit::Seconds, metric);
        }
        None => registry.register(row.name, row.help, metric),
    }
}

/// How a family is made: histograms get their row's buckets, the rest start empty.
pub trait NewFamily {
    fn new_family(histogram: fn() -> BucketHistogram) -> Self;
}

impl<L: Clone + std::hash::Hash + Eq> NewFamily for Family<L, Counter> {
    fn new_family(_: fn() -> BucketHistogram) -> Self {
        Family::default()
    }
}

impl<L: Clone + std::hash::Hash + Eq> NewFamily for Family<L, Gauge> {
    fn new_family(_: fn() -> BucketHistogram) -> Self {
        Family::default()
    }
}

impl<L: Clone + std::hash::Hash + Eq> NewFamily for HistogramFamily<L> {
    fn new_family(histogram: fn() -> BucketHistogram) -> Self {
        Family::new_with_constructor(histogram)
    }
}

impl NewFamily for Gauge {
    fn new_family(_: fn() -> BucketHistogram) -> Self {
        Gauge::default()
    }
}

/// Declares [`Metrics`]: one field per family, each tied to its row of the table, which
/// makes it, registers it and says whether it is carried.
macro_rules! families {
    ($($(#[$doc:meta])* $field:ident: $family:ty = $row:path,)+) => {
        /// Every metric family the agent updates. Cloning shares the underlying series.
        #[derive(Clone, Debug)]
        pub struct Metrics {
            $($(#[$doc])* pub $field: $family,)+
        }

        impl Metrics {
            pub fn new() -> Self {
                Self {
                    $($field: <$family as NewFamily>::new_family(|| {
                        BucketHistogram::new($row.buckets.bounds())
                    }),)+
                }
            }

            /// Registers every family under its row (the registry adds the prefix).
            pub fn register(&self, registry: &mut Registry) {
                $(register(registry, &$row, self.$field.clone());)+
            }

            /// Each family's row, in field order.
            #[cfg(test)]
            fn rows() -> Vec<&'static Metric> {
                vec![$(&$row),+]
            }

            /// The families a starting agent takes over from the agent before it, with
            /// their rows.
            pub fn carried(&self) -> Vec<(&'static Metric, &dyn Carry)> {
                let all: [(&'static Metric, &dyn Carry); [$(stringify!($field)),+].len()] =
                    [$((&$row, &self.$field)),+];
                all.into_iter().filter(|(row, _)| row.carried).collect()
            }
        }
    };
}

families! {
    opened: Family<PlacedFlow, Counter> = table::CONNECTIONS_OPENED,
    adopted: Family<PlacedFlow, Counter> = table::CONNECTIONS_ADOPTED,
    adoption_skipped: Family<SkipReason, Counter> = table::ADOPTION_SKIPPED,
    closed: Family<Closed, Counter> = table::CONNECTIONS_CLOSED,
    open: Family<OpenState, Gauge> = table::CONNECTIONS_OPEN,
    duration: HistogramFamily<Flow> = table::CONNECTION_DURATION,
    connect_duration: HistogramFamily<PlacedFlow> = table::CONNECT_DURATION,
    connect_failures: Family<ConnectFailed, Counter> = table::CONNECT_FAILURES,
    time_wait: Family<PlacedFlow, Gauge> = table::CONNECTIONS_TIME_WAIT,
    time_wait_unattributed: Family<Netns, Gauge> = table::TIME_WAIT_UNATTRIBUTED,
    ports_in_use: Family<PlacedFlowNetns, Gauge> = table::CLIENT_PORTS_IN_USE,
    requests: HistogramFamily<FlowProtocol> = table::CONNECTION_REQUESTS,
    h2_concurrency: HistogramFamily<Flow> = table::HTTP2_CONCURRENT_STREAMS,
    idle: HistogramFamily<Flow> = table::CONNECTION_IDLE,
    close_idle: HistogramFamily<ClosedByLabels> = table::CONNECTION_CLOSE_IDLE,
    http_requests: Family<HttpRequest, Counter> = table::HTTP_REQUESTS,
    advertised_timeout: Family<Server, Gauge> = table::HTTP_KEEPALIVE_ADVERTISED_TIMEOUT,
    advertised_max: Family<Server, Gauge> = table::HTTP_KEEPALIVE_ADVERTISED_MAX_REQUESTS,
    races: Family<Flow, Counter> = table::KEEPALIVE_RACES,
    bytes_sent: Family<Flow, Counter> = table::BYTES_SENT,
    bytes_received: Family<Flow, Counter> = table::BYTES_RECEIVED,
    tracked: Gauge = table::TRACKED_CONNECTIONS,
    capacity: Gauge = table::TRACKED_CONNECTIONS_CAPACITY,
    probes: Family<Probe, Gauge> = table::PROBE_INFO,
    build: Family<Build, Gauge> = table::BUILD_INFO,
    events: Family<EventKindLabel, Counter> = table::EVENTS_RECEIVED,
    label_values: Family<CappedLabel, Gauge> = table::LABEL_VALUES,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each row of the table is exposed once: by a family of `Metrics`, or by the
    /// producers that register their own (the TLS targets, the loss collector, the
    /// decryption budget, the listen queue and port range collectors).
    #[test]
    fn every_row_has_one_family() {
        let mut names: Vec<&str> = Metrics::rows().iter().map(|row| row.name).collect();
        names.extend([table::TLS_UPROBE_TARGETS.name, table::EVENTS_LOST.name]);
        names.extend(
            [
                &table::TLS_DECRYPTION_PROCESSES,
                &table::TLS_UPROBE_HITS,
                &table::TLS_UPROBE_HIT,
                &table::TLS_DECRYPTION_BUDGET,
            ]
            .map(|row| row.name),
        );
        names.extend([table::LISTEN_OVERFLOWS.name, table::LISTEN_DROPS.name]);
        names.push(table::CLIENT_PORT_RANGE_SIZE.name);
        names.extend(
            [table::CHECKPOINTS, table::CHECKPOINT_WRITE, table::CHECKPOINT_COVERED]
                .map(|row| row.name),
        );
        names.sort_unstable();
        let mut table: Vec<&str> = table::ALL.iter().map(|row| row.name).collect();
        table.sort_unstable();
        assert_eq!(names, table);
    }
}
