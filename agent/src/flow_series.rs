//! One flow's labels and metric series, shared by all its connections: looked up once per
//! flow, so neither the hot path nor each connection holds label strings of its own. The
//! cache is bounded by the label caps.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
};

use connscope_common::{Attribution, CloseKind, ClosedBy, Protocol, Role};
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};

use crate::{
    classify::CloseReason,
    http::Version,
    labels::{self, LabelCap},
    metrics::{
        BucketHistogram, Closed, ClosedByLabels, Flow, FlowProtocol, HttpRequest, Metrics,
        OpenState, PlacedFlow, Server,
    },
    placement::{Placement, PlacementResolver},
};

/// Whether a connection waits for a response (`active`) or for its next request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activity {
    Idle,
    Active,
}

impl Activity {
    pub const fn label(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Active => "active",
        }
    }
}

/// Protocols whose requests per connection are reported, in `requests` slot order. HTTP/2
/// multiplexes streams, so its exchanges are not requests: it is not reported.
const REPORTED_PROTOCOLS: [Protocol; 4] =
    [Protocol::Http1, Protocol::Tls, Protocol::WebSocket, Protocol::Other];

/// Who closed, how and why: one `connections_closed_total` series of a flow.
type CloseKey = (ClosedBy, CloseKind, CloseReason);

#[derive(Debug)]
pub struct FlowSeries {
    pub flow: Flow,
    pub placement: Placement,
    pub opened: Counter,
    pub bytes_sent: Counter,
    pub bytes_received: Counter,
    pub idle: BucketHistogram,
    pub duration: BucketHistogram,
    pub races: Counter,
    open_active: Gauge,
    open_idle: Gauge,
    /// Created on first use, so flows export only the series they have.
    requests: [OnceLock<BucketHistogram>; REPORTED_PROTOCOLS.len()],
    http10: OnceLock<Counter>,
    http11: OnceLock<Counter>,
    advertised_timeout: OnceLock<Gauge>,
    advertised_max: OnceLock<Gauge>,
    /// `connections_closed_total` by (closed_by, close_kind, reason) as seen so far: a
    /// flow has a few, and a close then costs no label allocation.
    closes: Mutex<Vec<(CloseKey, Counter)>>,
    /// `close_idle_seconds` by `closed_by` (in `ClosedBy` wire order).
    close_idle: [OnceLock<BucketHistogram>; ClosedBy::ALL.len()],
}

impl FlowSeries {
    fn new(metrics: &Metrics, key: &PlacedFlow) -> Self {
        let flow = key.flow.clone();
        let open = |state: Activity| {
            metrics.open.get_or_create_owned(&OpenState {
                flow: flow.clone(),
                state: state.label().to_owned(),
            })
        };
        Self {
            opened: metrics.opened.get_or_create_owned(key),
            bytes_sent: metrics.bytes_sent.get_or_create_owned(&flow),
            bytes_received: metrics.bytes_received.get_or_create_owned(&flow),
            idle: metrics.idle.get_or_create_owned(&flow),
            duration: metrics.duration.get_or_create_owned(&flow),
            races: metrics.races.get_or_create_owned(&flow),
            open_active: open(Activity::Active),
            open_idle: open(Activity::Idle),
            requests: Default::default(),
            http10: OnceLock::new(),
            http11: OnceLock::new(),
            advertised_timeout: OnceLock::new(),
            advertised_max: OnceLock::new(),
            closes: Mutex::new(Vec::new()),
            close_idle: Default::default(),
            placement: key.placement.clone(),
            flow,
        }
    }

    pub fn open_gauge(&self, activity: Activity) -> &Gauge {
        match activity {
            Activity::Active => &self.open_active,
            Activity::Idle => &self.open_idle,
        }
    }

    /// The requests-per-connection histogram of `protocol`; `None` where it is not reported.
    pub fn requests(&self, metrics: &Metrics, protocol: Protocol) -> Option<&BucketHistogram> {
        let slot = REPORTED_PROTOCOLS.iter().position(|&p| p.label() == protocol.label())?;
        Some(self.requests[slot].get_or_init(|| {
            let labels =
                FlowProtocol { flow: self.flow.clone(), protocol: protocol.label().to_owned() };
            metrics.requests.get_or_create_owned(&labels)
        }))
    }

    pub fn http_requests(&self, metrics: &Metrics, version: Version) -> &Counter {
        let cell = match version {
            Version::Http10 => &self.http10,
            Version::Http11 => &self.http11,
        };
        cell.get_or_init(|| {
            let labels =
                HttpRequest { flow: self.flow.clone(), http_version: version.label().to_owned() };
            metrics.http_requests.get_or_create_owned(&labels)
        })
    }

    /// Counts one close of this flow's connections.
    pub fn count_close(
        &self,
        metrics: &Metrics,
        by: ClosedBy,
        kind: CloseKind,
        reason: CloseReason,
    ) {
        let Ok(mut closes) = self.closes.lock() else { return };
        let key = (by, kind, reason);
        if let Some((_, counter)) = closes.iter().find(|(k, _)| *k == key) {
            counter.inc();
            return;
        }
        let labels = Closed {
            flow: PlacedFlow { flow: self.flow.clone(), placement: self.placement.clone() },
            closed_by: by.label().to_owned(),
            close_kind: kind.label().to_owned(),
            reason: reason.label().to_owned(),
        };
        let counter = metrics.closed.get_or_create_owned(&labels);
        counter.inc();
        closes.push((key, counter));
    }

    /// The idle time before the close, by who closed first.
    pub fn close_idle(&self, metrics: &Metrics, by: ClosedBy) -> &BucketHistogram {
        let slot = ClosedBy::ALL.iter().position(|&b| b == by).unwrap_or(0);
        self.close_idle[slot].get_or_init(|| {
            let labels =
                ClosedByLabels { flow: self.flow.clone(), closed_by: by.label().to_owned() };
            metrics.close_idle.get_or_create_owned(&labels)
        })
    }

    pub fn advertised_timeout(&self, metrics: &Metrics) -> &Gauge {
        self.server_gauge(&self.advertised_timeout, &metrics.advertised_timeout)
    }

    pub fn advertised_max(&self, metrics: &Metrics) -> &Gauge {
        self.server_gauge(&self.advertised_max, &metrics.advertised_max)
    }

    fn server_gauge<'a>(
        &self,
        cell: &'a OnceLock<Gauge>,
        family: &Family<Server, Gauge>,
    ) -> &'a Gauge {
        cell.get_or_init(|| {
            family.get_or_create_owned(&Server { server: self.flow.server.clone() })
        })
    }
}

/// Resolves a connection's labels into its flow's shared series.
pub struct FlowCache {
    flows: HashMap<PlacedFlow, Arc<FlowSeries>>,
    servers: LabelCap,
    processes: LabelCap,
    placement: Box<dyn PlacementResolver>,
}

impl FlowCache {
    pub fn new(
        max_servers: usize,
        max_processes: usize,
        placement: Box<dyn PlacementResolver>,
    ) -> Self {
        Self {
            flows: HashMap::new(),
            servers: LabelCap::new(max_servers),
            processes: LabelCap::new(max_processes),
            placement,
        }
    }

    /// Admits the label values an agent before this one exported (`carry`) ahead of new
    /// ones, so a flow keeps its labels across the restart.
    pub fn admit_carried(&mut self, carried: &crate::carry::Carried) {
        let exported =
            |value: &&String| value.as_str() != labels::OTHER && value.as_str() != labels::UNKNOWN;
        for server in carried.servers.iter().filter(exported) {
            self.servers.admit(server);
        }
        for process in carried.processes.iter().filter(exported) {
            self.processes.admit(process);
        }
    }

    /// The `server` label value for a server end, within the cap.
    pub fn server_label(&mut self, server: &str) -> String {
        self.servers.admit(server)
    }

    /// The series of the flow of `role` to `server` from the process in `owner` (unknown
    /// when not attributed).
    pub fn series(
        &mut self,
        metrics: &Metrics,
        role: Role,
        server: String,
        owner: Option<&Attribution>,
    ) -> Arc<FlowSeries> {
        let owner = owner.filter(|owner| owner.valid != 0);
        let process = match owner {
            Some(owner) => self.processes.admit(&labels::process_label(&owner.comm)),
            None => labels::UNKNOWN.to_owned(),
        };
        let placement = match owner {
            Some(owner) if owner.cgroup_id != 0 => self.placement.resolve(owner.cgroup_id),
            _ => Placement::default(),
        };
        let key =
            PlacedFlow { flow: Flow { role: role.label().to_owned(), process, server }, placement };
        if let Some(series) = self.flows.get(&key) {
            return series.clone();
        }
        let series = Arc::new(FlowSeries::new(metrics, &key));
        self.flows.insert(key, series.clone());
        series
    }
}
