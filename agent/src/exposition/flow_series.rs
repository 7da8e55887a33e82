//! One flow's labels and metric series, shared by all its connections: looked up once per
//! flow, so neither the hot path nor each connection holds label strings of its own. The
//! cache is bounded by the label caps.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
};

use connscope_common::{
    Attribution, COMM_LEN, CloseKind, ClosedBy, ConnectFailure, Endpoints, Protocol, Role,
};
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};

use crate::{
    exposition::labels::{self, LabelCap, LabelId, LabelMemo, ServerEndpoint, SharedLabelCap},
    exposition::metrics::{BucketHistogram, Metrics},
    model::close_reason::CloseReason,
    model::http_version::{RequestVersion, Version},
    model::label_sets::{
        CappedLabel, Closed, ClosedByLabels, ConnectFailed, Flow, FlowProtocol, HttpRequest,
        OpenState, PlacedFlow, PlacedFlowNetns, Server,
    },
    model::placement::{Placement, PlacementResolver},
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

/// Protocols whose requests per connection are reported, in `requests` slot order (HTTP/2:
/// the streams the client opened).
const REPORTED_PROTOCOLS: [Protocol; 5] =
    [Protocol::Http1, Protocol::Http2, Protocol::Tls, Protocol::WebSocket, Protocol::Other];

/// Who closed, how, why, and what the connection spoke: one `connections_closed_total`
/// series of a flow.
pub type CloseKey = (ClosedBy, CloseKind, CloseReason, Protocol);

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
    adopted: OnceLock<Counter>,
    http10: OnceLock<Counter>,
    http11: OnceLock<Counter>,
    http2: OnceLock<Counter>,
    http_unread: OnceLock<Counter>,
    h2_concurrency: OnceLock<BucketHistogram>,
    advertised_timeout: OnceLock<Gauge>,
    advertised_max: OnceLock<Gauge>,
    /// `connections_closed_total` by (closed_by, close_kind, reason) as seen so far: a
    /// flow has a few, and a close then costs no label allocation.
    closes: Mutex<Vec<(CloseKey, Counter)>>,
    /// `close_idle_seconds` by `closed_by` (in `ClosedBy` wire order).
    close_idle: [OnceLock<BucketHistogram>; ClosedBy::ALL.len()],
    /// Clients only: `connect_duration_seconds`, and `connect_failures_total` by reason (in
    /// `ConnectFailure` wire order).
    connect_duration: OnceLock<BucketHistogram>,
    connect_failures: [OnceLock<Counter>; ConnectFailure::ALL.len()],
    /// Set by each socket census (`pipeline::socket_count`).
    time_wait: OnceLock<Gauge>,
    /// Clients: `client_ports_in_use` by `netns` label (one namespace for most flows).
    ports_in_use: Mutex<Vec<(String, Gauge)>>,
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
            adopted: OnceLock::new(),
            http10: OnceLock::new(),
            http11: OnceLock::new(),
            http2: OnceLock::new(),
            http_unread: OnceLock::new(),
            h2_concurrency: OnceLock::new(),
            advertised_timeout: OnceLock::new(),
            advertised_max: OnceLock::new(),
            closes: Mutex::new(Vec::new()),
            close_idle: Default::default(),
            connect_duration: OnceLock::new(),
            connect_failures: Default::default(),
            time_wait: OnceLock::new(),
            ports_in_use: Mutex::new(Vec::new()),
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

    /// `connections_adopted_total` of this flow.
    pub fn adopted(&self, metrics: &Metrics) -> &Counter {
        self.adopted.get_or_init(|| metrics.adopted.get_or_create_owned(&self.placed_flow()))
    }

    pub fn http_requests(&self, metrics: &Metrics, version: RequestVersion) -> &Counter {
        let cell = match version {
            RequestVersion::Read(Version::Http10) => &self.http10,
            RequestVersion::Read(Version::Http11) => &self.http11,
            RequestVersion::Http2 => &self.http2,
            RequestVersion::Unread => &self.http_unread,
        };
        cell.get_or_init(|| {
            let labels =
                HttpRequest { flow: self.flow.clone(), http_version: version.label().to_owned() };
            metrics.http_requests.get_or_create_owned(&labels)
        })
    }

    /// This flow's `http2_concurrent_streams`.
    pub fn h2_concurrency(&self, metrics: &Metrics) -> &BucketHistogram {
        self.h2_concurrency.get_or_init(|| metrics.h2_concurrency.get_or_create_owned(&self.flow))
    }

    /// Counts one close of this flow's connections.
    pub fn count_close(&self, metrics: &Metrics, key: CloseKey) {
        let Ok(mut closes) = self.closes.lock() else { return };
        let (by, kind, reason, protocol) = key;
        if let Some((_, counter)) = closes.iter().find(|(k, _)| *k == key) {
            counter.inc();
            return;
        }
        let labels = Closed {
            flow: self.placed_flow(),
            closed_by: by.label().to_owned(),
            close_kind: kind.label().to_owned(),
            reason: reason.label().to_owned(),
            protocol: protocol.label().to_owned(),
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

    /// This client flow's `connect_duration_seconds`.
    pub fn connect_duration(&self, metrics: &Metrics) -> &BucketHistogram {
        self.connect_duration
            .get_or_init(|| metrics.connect_duration.get_or_create_owned(&self.placed_flow()))
    }

    /// This client flow's `connect_failures_total` of `reason`.
    pub fn connect_failures(&self, metrics: &Metrics, reason: ConnectFailure) -> &Counter {
        let slot = ConnectFailure::ALL.iter().position(|&r| r == reason).unwrap_or(0);
        self.connect_failures[slot].get_or_init(|| {
            let labels =
                ConnectFailed { flow: self.placed_flow(), reason: reason.label().to_owned() };
            metrics.connect_failures.get_or_create_owned(&labels)
        })
    }

    /// This flow's `connections_time_wait`.
    pub fn time_wait(&self, metrics: &Metrics) -> &Gauge {
        self.time_wait.get_or_init(|| metrics.time_wait.get_or_create_owned(&self.placed_flow()))
    }

    /// This client flow's `client_ports_in_use` in the namespace labelled `netns`.
    pub fn ports_in_use(&self, metrics: &Metrics, netns: &str) -> Option<Gauge> {
        let mut ports = self.ports_in_use.lock().ok()?;
        if let Some((_, gauge)) = ports.iter().find(|(label, _)| label == netns) {
            return Some(gauge.clone());
        }
        let labels = PlacedFlowNetns { flow: self.placed_flow(), netns: netns.to_owned() };
        let gauge = metrics.ports_in_use.get_or_create_owned(&labels);
        ports.push((netns.to_owned(), gauge.clone()));
        Some(gauge)
    }

    fn placed_flow(&self) -> PlacedFlow {
        PlacedFlow { flow: self.flow.clone(), placement: self.placement.clone() }
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

/// A flow by the ids of its labels: looked up per connection without building a string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FlowKey {
    role: Role,
    server: LabelId,
    process: LabelId,
    placement: PlacementId,
}

/// A placement by its index in `FlowCache::placements` (0: none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PlacementId(u32);

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Resolves a connection's labels into its flow's shared series.
pub struct FlowCache {
    flows: FastMap<FlowKey, Arc<FlowSeries>>,
    servers: LabelCap,
    /// Shared with the decryption budget's metrics.
    processes: SharedLabelCap,
    server_endpoints: LabelMemo<ServerEndpoint>,
    process_names: LabelMemo<[u8; COMM_LEN]>,
    /// Every placement seen, the empty one first; few per node (its pods' containers).
    placements: Vec<Placement>,
    placement_ids: FastMap<Placement, PlacementId>,
    resolver: Box<dyn PlacementResolver>,
}

impl FlowCache {
    pub fn new(
        metrics: &Metrics,
        max_servers: usize,
        max_processes: usize,
        resolver: Box<dyn PlacementResolver>,
    ) -> Self {
        let none = Placement::default();
        let in_use = |label: &str| {
            metrics.label_values.get_or_create_owned(&CappedLabel { label: label.into() })
        };
        Self {
            flows: FastMap::default(),
            servers: LabelCap::reporting(max_servers, in_use("server")),
            processes: SharedLabelCap::new(LabelCap::reporting(max_processes, in_use("process"))),
            server_endpoints: LabelMemo::default(),
            process_names: LabelMemo::default(),
            placement_ids: [(none.clone(), PlacementId(0))].into_iter().collect(),
            placements: vec![none],
            resolver,
        }
    }

    /// Admits the label values an agent before this one exported (`carry`) ahead of new
    /// ones, so a flow keeps its labels across the restart.
    pub fn admit_carried(&mut self, carried: &crate::exposition::carry::Carried) {
        for server in &carried.servers {
            self.servers.admit(server);
        }
        let mut processes = self.processes.lock();
        for process in &carried.processes {
            processes.admit(process);
        }
    }

    /// The `process` label's cap, for other producers of the label.
    pub fn process_labels(&self) -> SharedLabelCap {
        self.processes.clone()
    }

    /// The `server` label of a connection's server end, within the cap.
    pub fn server(&mut self, endpoints: &Endpoints, role: Role) -> LabelId {
        let endpoint = ServerEndpoint::of(endpoints, role);
        let servers = &mut self.servers;
        self.server_endpoints.get_or_label(endpoint, || servers.admit(&endpoint.label()))
    }

    /// The `server` label the previous agent gave a connection (`handover`).
    pub fn restored_server(&mut self, server: &str) -> LabelId {
        self.servers.restore(server)
    }

    pub fn server_name(&self, server: LabelId) -> &str {
        self.servers.name(server)
    }

    /// The series of the flow of `role` to `server` from the process in `owner` (unknown
    /// when not attributed).
    pub fn series(
        &mut self,
        metrics: &Metrics,
        role: Role,
        server: LabelId,
        owner: Option<&Attribution>,
    ) -> Arc<FlowSeries> {
        let owner = owner.filter(|owner| owner.valid != 0);
        let process = match owner {
            Some(owner) => {
                let processes = &self.processes;
                self.process_names.get_or_label(labels::comm_key(&owner.comm), || {
                    processes.lock().admit(&labels::process_label(&owner.comm))
                })
            }
            None => LabelId::UNKNOWN,
        };
        let placement = match owner {
            Some(owner) if owner.cgroup_id != 0 => self.placement_id(owner.cgroup_id),
            _ => PlacementId(0),
        };
        let key = FlowKey { role, server, process, placement };
        if let Some(series) = self.flows.get(&key) {
            return series.clone();
        }
        let labels = PlacedFlow {
            flow: Flow {
                role: role.label().to_owned(),
                process: self.processes.lock().name(process).to_owned(),
                server: self.servers.name(server).to_owned(),
            },
            placement: self.placements[placement.0 as usize].clone(),
        };
        let series = Arc::new(FlowSeries::new(metrics, &labels));
        self.flows.insert(key, series.clone());
        series
    }

    fn placement_id(&mut self, cgroup_id: u64) -> PlacementId {
        let Some(placement) = self.resolver.resolve(cgroup_id) else { return PlacementId(0) };
        if let Some(&id) = self.placement_ids.get(placement) {
            return id;
        }
        let Ok(index) = u32::try_from(self.placements.len()) else { return PlacementId(0) };
        let id = PlacementId(index);
        self.placements.push(placement.clone());
        self.placement_ids.insert(placement.clone(), id);
        id
    }
}
