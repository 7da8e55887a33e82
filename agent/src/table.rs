//! One entry per live connection: turns kernel events into metric updates.
//!
//! The kernel counts exchanges (direction changes) and records who closed first; this table
//! adds what needs the payload heads (HTTP version, `Connection`, `Keep-Alive`, pipelining),
//! the label values, and the close reason.

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock},
};

use connscope_common::{
    Conn, ConnEvent, TurnEvent, close_kind, closed_by, conn_flag, direction, role,
};
use prometheus_client::metrics::{
    counter::Counter, family::Family, gauge::Gauge, histogram::Histogram,
};

use crate::{
    events::Event,
    http::{self, Version},
    labels::{self, LabelCap},
    metrics::{
        Closed, ClosedBy, Flow, HttpRequest, Metrics, OpenState, PlacedFlow, Placement, Server,
    },
};

/// Resolves the Kubernetes placement of a process from its cgroup id.
pub trait PlacementResolver: Send {
    fn resolve(&mut self, cgroup_id: u64) -> Placement;
}

/// Outside Kubernetes: no placement labels.
#[derive(Debug, Default)]
pub struct NoPlacement;

impl PlacementResolver for NoPlacement {
    fn resolve(&mut self, _cgroup_id: u64) -> Placement {
        Placement::default()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Activity {
    /// Waiting for the next request.
    Idle,
    /// A request was seen and its response has not started.
    Active,
}

impl Activity {
    const fn label(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Active => "active",
        }
    }
}

/// What the HTTP heads of a connection said.
#[derive(Debug, Default)]
struct HttpState {
    /// HTTP requests seen (pipelined ones included).
    requests: u64,
    /// A `Connection: close` from either side.
    connection_close: bool,
    /// An HTTP/1.0 exchange without keep-alive on both sides.
    http10_close: bool,
    /// `Keep-Alive: max=` of the first and of the latest response. Servers either repeat a
    /// fixed limit or count down the requests left (Apache); both reach their end.
    first_advertised_max: Option<u32>,
    last_advertised_max: Option<u32>,
    /// Whether the last request was HTTP/1.0 asking for keep-alive (for the response check).
    http10_request_keep_alive: Option<bool>,
}

/// One flow's labels and series, shared by all its connections: looked up once per flow,
/// so neither the hot path nor each connection holds label strings of its own.
#[derive(Debug)]
struct FlowSeries {
    flow: Flow,
    placement: Placement,
    opened: Counter,
    bytes_sent: Counter,
    bytes_received: Counter,
    idle: Histogram,
    requests: Histogram,
    duration: Histogram,
    races: Counter,
    open_active: Gauge,
    open_idle: Gauge,
    /// Created on first use, so flows without HTTP export no HTTP series.
    http10: OnceLock<Counter>,
    http11: OnceLock<Counter>,
    advertised_timeout: OnceLock<Gauge>,
    advertised_max: OnceLock<Gauge>,
}

impl FlowSeries {
    fn new(metrics: &Metrics, flow: Flow, placement: Placement) -> Self {
        let open = |state: Activity| {
            metrics.open.get_or_create_owned(&OpenState {
                flow: flow.clone(),
                state: state.label().to_owned(),
            })
        };
        Self {
            opened: metrics.opened.get_or_create_owned(&PlacedFlow {
                flow: flow.clone(),
                placement: placement.clone(),
            }),
            bytes_sent: metrics.bytes_sent.get_or_create_owned(&flow),
            bytes_received: metrics.bytes_received.get_or_create_owned(&flow),
            idle: metrics.idle.get_or_create_owned(&flow),
            requests: metrics.requests.get_or_create_owned(&flow),
            duration: metrics.duration.get_or_create_owned(&flow),
            races: metrics.races.get_or_create_owned(&flow),
            open_active: open(Activity::Active),
            open_idle: open(Activity::Idle),
            http10: OnceLock::new(),
            http11: OnceLock::new(),
            advertised_timeout: OnceLock::new(),
            advertised_max: OnceLock::new(),
            flow,
            placement,
        }
    }

    fn open_gauge(&self, activity: Activity) -> &Gauge {
        match activity {
            Activity::Active => &self.open_active,
            Activity::Idle => &self.open_idle,
        }
    }

    fn http_requests(&self, metrics: &Metrics, version: Version) -> &Counter {
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

#[derive(Debug)]
struct Tracked {
    open_ns: u64,
    activity: Activity,
    bytes_sent: u64,
    bytes_received: u64,
    http: HttpState,
    series: Arc<FlowSeries>,
}

pub struct ConnectionTable {
    conns: HashMap<u64, Tracked>,
    /// Bounded by the label caps: one entry per distinct label set.
    flows: HashMap<PlacedFlow, Arc<FlowSeries>>,
    servers: LabelCap,
    processes: LabelCap,
    placement: Box<dyn PlacementResolver>,
    metrics: Metrics,
}

impl ConnectionTable {
    pub fn new(
        metrics: Metrics,
        max_servers: usize,
        max_processes: usize,
        placement: Box<dyn PlacementResolver>,
    ) -> Self {
        Self {
            conns: HashMap::new(),
            flows: HashMap::new(),
            servers: LabelCap::new(max_servers),
            processes: LabelCap::new(max_processes),
            placement,
            metrics,
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn handle(&mut self, event: &Event) {
        match event {
            Event::Open(open) => {
                self.open(open);
            }
            Event::Turn(turn) => self.turn(turn),
            Event::Close(close) => self.close(close),
        }
        self.metrics.tracked.set(self.conns.len() as i64);
    }

    fn open(&mut self, event: &ConnEvent) -> Option<&mut Tracked> {
        let sock = event.header.sock;
        let conn = &event.conn;
        if conn.flags & conn_flag::ESTABLISHED == 0 {
            return None;
        }
        if self.conns.get(&sock).is_some_and(|t| t.open_ns == conn.open_ns) {
            return self.conns.get_mut(&sock);
        }
        let process = if conn.flags & conn_flag::ATTRIBUTED != 0 {
            self.processes.admit(&labels::process_label(&conn.comm))
        } else {
            labels::UNKNOWN.to_owned()
        };
        let flow = Flow {
            role: labels::role_label(conn.role).to_owned(),
            process,
            server: self.servers.admit(&labels::server_label(&conn.endpoints, conn.role)),
        };
        let placement = if conn.cgroup_id != 0 {
            self.placement.resolve(conn.cgroup_id)
        } else {
            Placement::default()
        };
        let key = PlacedFlow { flow, placement };
        let series = match self.flows.get(&key) {
            Some(series) => series.clone(),
            None => {
                let series = Arc::new(FlowSeries::new(
                    &self.metrics,
                    key.flow.clone(),
                    key.placement.clone(),
                ));
                self.flows.insert(key, series.clone());
                series
            }
        };
        series.opened.inc();
        series.open_idle.inc();
        // A replaced entry (its close was lost) must not keep its gauge up.
        if let Some(stale) = self.conns.remove(&sock) {
            stale.series.open_gauge(stale.activity).dec();
        }
        let tracked = Tracked {
            open_ns: conn.open_ns,
            activity: Activity::Idle,
            bytes_sent: 0,
            bytes_received: 0,
            http: HttpState::default(),
            series,
        };
        Some(self.conns.entry(sock).insert_entry(tracked).into_mut())
    }

    fn turn(&mut self, turn: &TurnEvent) {
        let Some(tracked) =
            self.conns.get_mut(&turn.header.sock).filter(|t| t.open_ns == turn.open_ns)
        else {
            return;
        };
        count_bytes(tracked, turn.bytes_sent, turn.bytes_received);
        let head = &turn.head[..(turn.head_len as usize).min(turn.head.len())];
        let is_request = (turn.role == role::CLIENT) == (turn.direction == direction::SEND);
        let next = if is_request {
            if let Some(request) = http::parse_request(head) {
                on_request(&self.metrics, tracked, &request);
            }
            if turn.exchanges > 1 && turn.gap_ns > 0 {
                tracked.series.idle.observe(seconds(turn.gap_ns));
            }
            Activity::Active
        } else {
            if let Some(response) = http::parse_response(head) {
                on_response(&self.metrics, tracked, &response);
            }
            Activity::Idle
        };
        if next != tracked.activity {
            tracked.series.open_gauge(tracked.activity).dec();
            tracked.series.open_gauge(next).inc();
            tracked.activity = next;
        }
    }

    fn close(&mut self, event: &ConnEvent) {
        let sock = event.header.sock;
        let conn = &event.conn;
        let known = self.conns.get(&sock).is_some_and(|t| t.open_ns == conn.open_ns);
        if !known && self.open(event).is_none() {
            // Never established (a failed connect): not a connection.
            return;
        }
        let Some(tracked) = self.conns.remove(&sock) else { return };
        tracked.series.open_gauge(tracked.activity).dec();
        let mut tracked = tracked;
        count_bytes(&mut tracked, conn.bytes_sent, conn.bytes_received);

        let by = closed_by_label(conn.closed_by);
        let closed = Closed {
            flow: PlacedFlow {
                flow: tracked.series.flow.clone(),
                placement: tracked.series.placement.clone(),
            },
            closed_by: by.to_owned(),
            close_kind: close_kind_label(conn.close_kind).to_owned(),
            reason: close_reason(conn, &tracked).to_owned(),
        };
        self.metrics.closed.get_or_create(&closed).inc();

        let requests = tracked.http.requests.max(u64::from(conn.exchanges));
        tracked.series.requests.observe(requests as f64);
        let end_ns = event.header.ts_ns;
        if conn.established_ns != 0 && end_ns >= conn.established_ns {
            tracked.series.duration.observe(seconds(end_ns - conn.established_ns));
        }
        let last_activity = conn.last_send_ns.max(conn.last_recv_ns).max(conn.established_ns);
        let close_start = if conn.close_start_ns != 0 { conn.close_start_ns } else { end_ns };
        if last_activity != 0 && close_start >= last_activity {
            let labels = ClosedBy { flow: tracked.series.flow.clone(), closed_by: by.to_owned() };
            self.metrics
                .close_idle
                .get_or_create(&labels)
                .observe(seconds(close_start - last_activity));
        }
        if is_keepalive_race(conn) {
            tracked.series.races.inc();
        }
    }
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn count_bytes(tracked: &mut Tracked, sent: u64, received: u64) {
    if sent > tracked.bytes_sent {
        tracked.series.bytes_sent.inc_by(sent - tracked.bytes_sent);
        tracked.bytes_sent = sent;
    }
    if received > tracked.bytes_received {
        tracked.series.bytes_received.inc_by(received - tracked.bytes_received);
        tracked.bytes_received = received;
    }
}

fn on_request(metrics: &Metrics, tracked: &mut Tracked, request: &http::Head) {
    tracked.http.requests += u64::from(request.count);
    let counter = tracked.series.http_requests(metrics, request.version);
    counter.inc_by(u64::from(request.count));
    record_persistence(&mut tracked.http, request);
    tracked.http.http10_request_keep_alive =
        (request.version == Version::Http10).then(|| request.wants_persistence());
}

fn on_response(metrics: &Metrics, tracked: &mut Tracked, response: &http::Head) {
    record_persistence(&mut tracked.http, response);
    // HTTP/1.0 persists only when both sides said keep-alive.
    if tracked.http.http10_request_keep_alive == Some(true)
        && response.version == Version::Http10
        && !response.wants_persistence()
    {
        tracked.http.http10_close = true;
    }
    let series = &tracked.series;
    if let Some(timeout) = response.keep_alive.timeout_seconds {
        series
            .server_gauge(&series.advertised_timeout, &metrics.advertised_timeout)
            .set(i64::from(timeout));
    }
    if let Some(max) = response.keep_alive.max_requests {
        series.server_gauge(&series.advertised_max, &metrics.advertised_max).set(i64::from(max));
        tracked.http.first_advertised_max.get_or_insert(max);
        tracked.http.last_advertised_max = Some(max);
    }
}

fn record_persistence(http: &mut HttpState, head: &http::Head) {
    if head.connection.close {
        http.connection_close = true;
    } else if head.version == Version::Http10 && !head.connection.keep_alive {
        http.http10_close = true;
    }
}

const fn closed_by_label(value: u8) -> &'static str {
    match value {
        closed_by::LOCAL => "local",
        closed_by::PEER => "peer",
        _ => "unknown",
    }
}

const fn close_kind_label(value: u8) -> &'static str {
    match value {
        close_kind::FIN => "fin",
        close_kind::RESET => "reset",
        _ => "unknown",
    }
}

/// Why the connection ended, most specific first: a limit reached or an HTTP/1.0 exchange
/// explains a `Connection: close` too, so they come before it.
fn close_reason(conn: &Conn, tracked: &Tracked) -> &'static str {
    if conn.close_kind == close_kind::RESET {
        // An abort without any reset on the wire is a timeout or error, not a reset.
        return if conn.flags & (conn_flag::RESET_SENT | conn_flag::RESET_RECEIVED) != 0 {
            "reset"
        } else {
            "error"
        };
    }
    let http = &tracked.http;
    let limit_reached = http.last_advertised_max.is_some_and(|left| left <= 1)
        || http.first_advertised_max.is_some_and(|max| max > 1 && http.requests >= u64::from(max));
    if limit_reached {
        "max_requests"
    } else if http.http10_close {
        "http10"
    } else if http.connection_close {
        "connection_close"
    } else if conn.close_kind == close_kind::FIN && conn.flags & conn_flag::IDLE_AT_CLOSE != 0 {
        "idle"
    } else {
        "unknown"
    }
}

/// A request sent on a connection the peer had started closing, or a reset from the peer
/// right after a request on a reused connection (client side); on the server side, a
/// request that arrived after the server closed an idle connection (answered by a reset).
fn is_keepalive_race(conn: &Conn) -> bool {
    let reused = conn.exchanges > 1;
    match conn.role {
        role::CLIENT => {
            conn.flags & conn_flag::SENT_AFTER_PEER_CLOSE != 0
                || (reused
                    && conn.closed_by == closed_by::PEER
                    && conn.flags & conn_flag::RESET_RECEIVED != 0
                    && conn.last_direction == direction::SEND)
        }
        _ => {
            conn.closed_by == closed_by::LOCAL
                && conn.close_kind == close_kind::FIN
                && conn.flags & conn_flag::RESET_SENT != 0
                && conn.exchanges >= 1
        }
    }
}

#[cfg(test)]
#[path = "table_tests.rs"]
mod tests;
