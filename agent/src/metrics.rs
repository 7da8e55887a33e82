//! Metric families of the metric contract (docs/architecture.md), registered under the
//! `connscope_` prefix.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

use serde::Deserialize;

pub use crate::bucket_histogram::BucketHistogram;
use crate::{bucket_histogram::IDLE_BOUNDS, placement::Placement};

/// Who talks to which server: the labels of most connection metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct Flow {
    pub role: String,
    pub process: String,
    pub server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct PlacedFlow {
    #[prometheus(flatten)]
    #[serde(flatten)]
    pub flow: Flow,
    #[prometheus(flatten)]
    #[serde(flatten)]
    pub placement: Placement,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct Closed {
    #[prometheus(flatten)]
    #[serde(flatten)]
    pub flow: PlacedFlow,
    pub closed_by: String,
    pub close_kind: String,
    pub reason: String,
}

/// Requests per connection are read differently per protocol (HTTP/1.x requests, exchanges
/// of other request/response protocols, TLS records, WebSocket upgrades).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct FlowProtocol {
    #[prometheus(flatten)]
    #[serde(flatten)]
    pub flow: Flow,
    pub protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct OpenState {
    #[prometheus(flatten)]
    #[serde(flatten)]
    pub flow: Flow,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct ClosedByLabels {
    #[prometheus(flatten)]
    #[serde(flatten)]
    pub flow: Flow,
    pub closed_by: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct HttpRequest {
    #[prometheus(flatten)]
    #[serde(flatten)]
    pub flow: Flow,
    pub http_version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct Server {
    pub server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Probe {
    pub hook: String,
    pub attach: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct EventKindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, Deserialize)]
pub struct SkipReason {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Build {
    pub version: String,
}

pub type HistogramFamily<L> = Family<L, BucketHistogram, fn() -> BucketHistogram>;

/// Connection lifetime: 1 ms to 1 h.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
    3600.0,
];
/// Exchanges per connection: 0 marks connections opened and never used, 1 the
/// one-request connections that cause churn.
pub const REQUEST_BUCKETS: [f64; 12] =
    [0.0, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];
fn duration_histogram() -> BucketHistogram {
    BucketHistogram::new(&DURATION_BUCKETS)
}
fn request_histogram() -> BucketHistogram {
    BucketHistogram::new(&REQUEST_BUCKETS)
}
/// Idle gaps: 1 ms to 300 s, with the common keep-alive timeouts (5, 15, 60, 75 s) as
/// bounds. The kernel counts gaps in these buckets (`connscope_common::conn::IDLE_BOUNDS_NS`).
fn idle_histogram() -> BucketHistogram {
    BucketHistogram::new(&IDLE_BOUNDS)
}

/// Every metric family the agent updates. Cloning shares the underlying series.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub opened: Family<PlacedFlow, Counter>,
    pub adopted: Family<PlacedFlow, Counter>,
    pub adoption_skipped: Family<SkipReason, Counter>,
    pub closed: Family<Closed, Counter>,
    pub open: Family<OpenState, Gauge>,
    pub duration: HistogramFamily<Flow>,
    pub requests: HistogramFamily<FlowProtocol>,
    pub idle: HistogramFamily<Flow>,
    pub close_idle: HistogramFamily<ClosedByLabels>,
    pub http_requests: Family<HttpRequest, Counter>,
    pub advertised_timeout: Family<Server, Gauge>,
    pub advertised_max: Family<Server, Gauge>,
    pub races: Family<Flow, Counter>,
    pub bytes_sent: Family<Flow, Counter>,
    pub bytes_received: Family<Flow, Counter>,
    pub tracked: Gauge,
    pub capacity: Gauge,
    pub probes: Family<Probe, Gauge>,
    pub build: Family<Build, Gauge>,
    pub events: Family<EventKindLabel, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            opened: Family::default(),
            adopted: Family::default(),
            adoption_skipped: Family::default(),
            closed: Family::default(),
            open: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            requests: Family::new_with_constructor(request_histogram),
            idle: Family::new_with_constructor(idle_histogram),
            close_idle: Family::new_with_constructor(idle_histogram),
            http_requests: Family::default(),
            advertised_timeout: Family::default(),
            advertised_max: Family::default(),
            races: Family::default(),
            bytes_sent: Family::default(),
            bytes_received: Family::default(),
            tracked: Gauge::default(),
            capacity: Gauge::default(),
            probes: Family::default(),
            build: Family::default(),
            events: Family::default(),
        }
    }

    /// A registry with every family (and the given collectors) under `connscope_`.
    pub fn register(&self, registry: &mut Registry) {
        let m = self.clone();
        registry.register("connections_opened", "TCP connections established, by flow", m.opened);
        registry.register(
            "connections_adopted",
            "TCP connections established before the agent started, tracked from their first send or receive on (not in connections_opened, connection_duration or connection_requests)",
            m.adopted,
        );
        registry.register(
            "adoption_skipped",
            "Entries of the start-up scan of listening ports that were skipped: process_vanished, unreadable, unparsable",
            m.adoption_skipped,
        );
        registry.register(
            "connections_closed",
            "TCP connections closed: who closed first (closed_by), by FIN or reset (close_kind), and why (reason)",
            m.closed,
        );
        registry.register(
            "connections_open",
            "Connections open now: active (an exchange in progress) or idle",
            m.open,
        );
        registry.register_with_unit(
            "connection_duration",
            "Lifetime of closed connections, from establishment to destruction",
            Unit::Seconds,
            m.duration,
        );
        registry.register(
            "connection_requests",
            "Requests carried per connection, observed at close, by protocol (http1: HTTP/1.x requests; other: request/response exchanges; tls: TLS application-data exchanges)",
            m.requests,
        );
        registry.register_with_unit(
            "connection_idle",
            "Idle gap on a kept-alive connection between the end of one exchange and the next request",
            Unit::Seconds,
            m.idle,
        );
        registry.register_with_unit(
            "connection_close_idle",
            "Idle time from the last exchange to the start of the close",
            Unit::Seconds,
            m.close_idle,
        );
        registry.register("http_requests", "HTTP/1.x requests seen, by version", m.http_requests);
        registry.register_with_unit(
            "http_keepalive_advertised_timeout",
            "Last Keep-Alive timeout advertised by the server",
            Unit::Seconds,
            m.advertised_timeout,
        );
        registry.register(
            "http_keepalive_advertised_max_requests",
            "Last Keep-Alive max advertised by the server",
            m.advertised_max,
        );
        registry.register(
            "keepalive_races",
            "Requests sent on a connection the peer was closing, or reset right after a request on a reused connection",
            m.races,
        );
        registry.register("bytes_sent", "Payload bytes sent", m.bytes_sent);
        registry.register("bytes_received", "Payload bytes received", m.bytes_received);
        registry.register(
            "tracked_connections",
            "Connections the agent is tracking now",
            m.tracked,
        );
        registry.register(
            "tracked_connections_capacity",
            "Connections the kernel map can track at once (--bpf.max-connections)",
            m.capacity,
        );
        registry.register("probe_info", "Hook backend in use for each hook", m.probes);
        registry.register("build_info", "connscope build", m.build);
        registry.register(
            "events_received",
            "Events the kernel sent to the agent, by kind (open, turn, close): the agent's own load",
            m.events,
        );
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
