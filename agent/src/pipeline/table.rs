//! One entry per live connection: turns kernel records into metric updates.
//!
//! The kernel counts exchanges, bytes and idle gaps per connection and reports cumulative
//! values in snapshots (`Progress`, `Close`, or the agent's own lookups in `sweep`); this
//! table adds the differences since the last snapshot it saw, parses the heads the kernel
//! sends, and classifies the close.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use connscope_common::{
    AttributeEvent, Attribution, CloseKind, ClosedBy, Conn, ConnectFailedEvent, Direction,
    Handover, HeadContent, Http2CloseEvent, OpenEvent, Protocol, Role, SnapshotEvent,
    conn::{GAP_BUCKETS, GapCounts, gap_sum_delta, open_token},
    conn_flag, handover_flag, is_request,
};

use crate::{
    exposition::flow_series::{Activity, FlowCache, FlowSeries},
    exposition::labels::LabelId,
    exposition::metrics::Metrics,
    model::{
        close_reason::{CloseReason, GoAwayBy, GoAwayCode},
        http_version::{RequestVersion, Version},
        placement::PlacementResolver,
        socket_census::{Census, TupleKey},
        tls_requests::TlsRequests,
    },
    pipeline::classify::{close_reason, is_keepalive_race},
    pipeline::events::{Event, Head},
    pipeline::handover,
    pipeline::head_memo::HeadMemo,
    pipeline::http,
    pipeline::http_session::{HttpSession, RequestCounts},
    pipeline::recent_closes::RecentCloses,
    pipeline::socket_count::{Published, Tally},
    pipeline::tls_hello,
};

/// The kernel's cumulative counts last added to the metrics.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    /// The last transfer included (the open time before the first): orders snapshots.
    last_ns: u64,
    exchanges: u32,
    /// The kernel's wrapping counters (differences are taken modulo 2^32).
    bytes_sent: u32,
    bytes_received: u32,
    gap_sum_us: u32,
    gaps: GapCounts,
}

impl Seen {
    fn of(conn: &Conn) -> Self {
        Self {
            last_ns: conn.last_ns,
            exchanges: conn.exchanges,
            bytes_sent: conn.bytes_sent,
            bytes_received: conn.bytes_received,
            gap_sum_us: conn.gap_sum_us,
            gaps: conn.gaps,
        }
    }

    /// Before the first snapshot: nothing counted, as of the open time.
    fn opened_at(open_ns: u64) -> Self {
        Self { last_ns: open_ns, ..Self::default() }
    }
}

#[derive(Debug)]
struct Tracked {
    open_ns: u64,
    role: Role,
    /// Established before the agent started: its lifetime and request count are partial,
    /// so it stays out of the duration and requests-per-connection histograms.
    adopted: bool,
    /// The owner's cgroup (placement), kept for the handover to the next agent.
    cgroup_id: u64,
    /// The owning process (0 until known, and for connections taken over from the
    /// previous agent): its TLS requests feed the decryption budget.
    pid: u32,
    /// Set once the owning process is known (clients at open, accepted sockets at their
    /// first use); until then only the `server` label is kept, in
    /// `ConnectionTable::pending_servers`.
    series: Option<Arc<FlowSeries>>,
    activity: Activity,
    protocol: Protocol,
    /// Re-read by the next sweep (see `ConnectionTable::sweep_candidates`).
    in_sweep: bool,
    seen: Seen,
    /// Only for connections that sent an HTTP head.
    http: Option<Box<HttpSession>>,
    /// HTTP/2: what the kernel's frame walk found, sent just before the close.
    h2: Option<Box<Http2CloseEvent>>,
    /// Its four-tuple, for the socket census (unknown for connections taken over from the
    /// previous agent: the handover does not carry endpoints).
    tuple: Option<TupleKey>,
}

/// Socket addresses are kernel pointers, not input anyone chooses: a fast hash will do.
type SockMap<V> = HashMap<u64, V, foldhash::fast::RandomState>;

pub struct ConnectionTable {
    conns: SockMap<Tracked>,
    /// The `server` label of accepted connections not used by their process yet (kept
    /// apart: few connections are pending at a time, and every `Tracked` stays small).
    pending_servers: SockMap<LabelId>,
    /// Connections to re-read at the next sweep.
    sweep: Vec<u64>,
    flows: FlowCache,
    /// Shared with the per-event paths by reference count (a `Metrics` clone copies every
    /// family handle).
    metrics: Arc<Metrics>,
    /// TLS requests by process, for the decryption budget.
    tls_requests: TlsRequests,
    /// Processes seen speaking HTTP inside decrypted TLS: their requests counted from
    /// ciphertext (once they left decryption) are HTTP requests whose version was not read.
    http_in_tls: HashSet<u32>,
    /// Heads parsed once per distinct head.
    heads: HeadMemo,
    /// Connections whose local side closed first, for the census's TIME_WAIT sockets.
    recent_closes: RecentCloses,
    /// The gauges the last census set.
    census_gauges: Published,
}

/// Processes [`ConnectionTable::http_in_tls`] remembers; past it, it starts again (a
/// process forgotten counts its next ciphertext requests as `tls` only until one of its
/// decrypted connections is seen again).
const MAX_HTTP_IN_TLS: usize = 4_096;

impl ConnectionTable {
    /// `max_connections` is the kernel map's size, which the table cannot exceed: it is
    /// allocated once for 7/8 of that (a full power-of-two table, pages touched only as
    /// connections arrive) rather than grown by copying, which left old tables behind in
    /// a fragmented heap (17 MiB of heap at 100k connections, measured).
    pub fn new(
        metrics: Metrics,
        max_connections: usize,
        max_servers: usize,
        max_processes: usize,
        placement: Box<dyn PlacementResolver>,
    ) -> Self {
        Self {
            conns: SockMap::with_capacity_and_hasher(max_connections / 8 * 7, Default::default()),
            pending_servers: SockMap::default(),
            sweep: Vec::new(),
            flows: FlowCache::new(&metrics, max_servers, max_processes, placement),
            metrics: Arc::new(metrics),
            tls_requests: TlsRequests::default(),
            http_in_tls: HashSet::new(),
            heads: HeadMemo::default(),
            recent_closes: RecentCloses::default(),
            census_gauges: Published::default(),
        }
    }

    /// The `process` label's cap, shared with the decryption budget's metrics.
    pub fn process_labels(&self) -> crate::exposition::labels::SharedLabelCap {
        self.flows.process_labels()
    }

    /// Where TLS requests by process go (the decryption budget reads them).
    pub fn count_tls_requests_in(&mut self, requests: TlsRequests) {
        self.tls_requests = requests;
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Goes on from the metric values of the agent before this one (`carry`).
    pub fn carry_on(&mut self, text: &str) -> crate::exposition::carry::Carried {
        let carried = crate::exposition::carry::seed(&self.metrics, text);
        self.flows.admit_carried(&carried);
        carried
    }

    /// The exposition of this table's metrics, gzipped, for the next agent (`carry`).
    pub fn carried_metrics(&self) -> anyhow::Result<Vec<u8>> {
        crate::exposition::carry::encode(&self.metrics)
    }

    /// Whether `sock` is a connection this table can label.
    pub fn knows(&self, sock: u64) -> bool {
        self.conns.contains_key(&sock)
    }

    pub fn handle(&mut self, event: &Event<'_>) {
        match event {
            Event::Open(open) => self.open(open),
            Event::Attribute(attribute) => self.attribute(attribute),
            Event::Head(head) => self.head(head),
            Event::Progress(snapshot) => self.progress(snapshot.header.sock, &snapshot.conn),
            Event::Close(snapshot) => self.close(snapshot),
            Event::ConnectFailed(failed) => self.connect_failed(failed),
            Event::Http2Close(h2) => {
                if let Some(tracked) = self.tracked(h2.header.sock, h2.open_token) {
                    tracked.h2 = Some(Box::new(*h2));
                }
            }
        }
        self.metrics.tracked.set(self.conns.len() as i64);
    }

    fn open(&mut self, event: &OpenEvent) {
        let Some(role) = event.role() else { return };
        let sock = event.header.sock;
        // A replaced entry (its close was lost) must not keep its gauge up.
        self.pending_servers.remove(&sock);
        if let Some(stale) = self.conns.remove(&sock)
            && let Some(series) = &stale.series
        {
            series.open_gauge(stale.activity).dec();
        }
        let server = self.flows.server(&event.endpoints, role);
        let mut tracked = Tracked {
            open_ns: event.open_ns,
            role,
            adopted: event.adopted != 0,
            cgroup_id: 0,
            pid: 0,
            series: None,
            activity: Activity::Idle,
            protocol: Protocol::Unknown,
            in_sweep: false,
            seen: Seen::opened_at(event.open_ns),
            http: None,
            h2: None,
            tuple: TupleKey::of_endpoints(&event.endpoints),
        };
        if event.attribution.valid != 0 {
            give_series(
                &mut self.flows,
                &self.metrics,
                &mut tracked,
                server,
                Some(&event.attribution),
            );
        } else {
            self.pending_servers.insert(sock, server);
        }
        if let Some(series) = &tracked.series
            && role == Role::Client
            && event.connect_ns != 0
        {
            series.connect_duration(&self.metrics).observe(seconds(event.connect_ns));
        }
        self.conns.insert(sock, tracked);
        self.mark_active(sock);
    }

    /// A client's connect that ended before the connection was established: counted on
    /// its flow (process unknown when its connect began before the agent).
    fn connect_failed(&mut self, event: &ConnectFailedEvent) {
        let Some(reason) = event.reason() else { return };
        let server = self.flows.server(&event.endpoints, Role::Client);
        let series =
            self.flows.series(&self.metrics, Role::Client, server, Some(&event.attribution));
        series.connect_failures(&self.metrics, reason).inc();
    }

    /// The connections for the next agent (`handover`): labels, counts already exported,
    /// HTTP session.
    pub fn handover(&self) -> impl Iterator<Item = (u64, Handover)> + '_ {
        self.conns.iter().filter_map(|(&sock, tracked)| {
            let pending =
                self.pending_servers.get(&sock).map(|&server| self.flows.server_name(server));
            Some((sock, tracked.handover(pending)?))
        })
    }

    /// Takes over a connection from the previous agent: labelled as it was, counted from
    /// where that agent stopped, not counted as opened again.
    pub fn restore(&mut self, sock: u64, entry: &Handover) -> bool {
        let (Some(role), Some(server)) =
            (Role::from_wire(entry.role), handover::label(&entry.server, entry.server_len))
        else {
            return false;
        };
        let server = self.flows.restored_server(server);
        let activity =
            if entry.has(handover_flag::ACTIVE) { Activity::Active } else { Activity::Idle };
        self.pending_servers.remove(&sock);
        let mut tracked = Tracked {
            open_ns: entry.open_ns,
            role,
            adopted: entry.has(handover_flag::ADOPTED),
            cgroup_id: entry.cgroup_id,
            pid: 0,
            series: None,
            activity,
            protocol: Protocol::from_wire(entry.protocol).unwrap_or(Protocol::Unknown),
            in_sweep: false,
            seen: Seen {
                last_ns: entry.last_ns,
                exchanges: entry.exchanges,
                bytes_sent: entry.bytes_sent,
                bytes_received: entry.bytes_received,
                gap_sum_us: entry.gap_sum_us,
                gaps: entry.gaps,
            },
            http: handover::session(entry).map(Box::new),
            h2: None,
            tuple: None,
        };
        if entry.has(handover_flag::ATTRIBUTED) {
            let owner =
                Attribution { cgroup_id: entry.cgroup_id, tgid: 0, valid: 1, comm: entry.comm };
            let series = self.flows.series(&self.metrics, role, server, Some(&owner));
            series.open_gauge(activity).inc();
            tracked.series = Some(series);
        } else {
            self.pending_servers.insert(sock, server);
        }
        if let Some(stale) = self.conns.insert(sock, tracked)
            && let Some(series) = &stale.series
        {
            series.open_gauge(stale.activity).dec();
        }
        self.mark_active(sock);
        self.metrics.tracked.set(self.conns.len() as i64);
        true
    }

    fn resolve_pending(&mut self, sock: u64, owner: Option<&Attribution>) {
        let Some(tracked) = self.conns.get_mut(&sock) else { return };
        if let Some(server) = self.pending_servers.remove(&sock) {
            give_series(&mut self.flows, &self.metrics, tracked, server, owner);
        }
    }

    fn attribute(&mut self, event: &AttributeEvent) {
        let sock = event.header.sock;
        self.attribute_once(sock, event.open_token, &event.attribution);
        self.mark_active(sock);
    }

    /// Gives the connection of `sock` (opened at `token`) its process, from an `Attribute`
    /// record or the first head of its first use, unless it has one.
    fn attribute_once(&mut self, sock: u64, token: u32, owner: &Attribution) {
        if self.tracked(sock, token).is_some_and(|t| t.series.is_none()) {
            self.resolve_pending(sock, Some(owner));
        }
    }

    /// The connection of `sock` whose open time has `token` as its low bits (not an
    /// earlier one on the same socket).
    fn tracked(&mut self, sock: u64, token: u32) -> Option<&mut Tracked> {
        tracked_in(&mut self.conns, sock, token)
    }

    fn mark_active(&mut self, sock: u64) {
        if let Some(tracked) = self.conns.get_mut(&sock)
            && !tracked.in_sweep
        {
            tracked.in_sweep = true;
            self.sweep.push(sock);
        }
    }

    fn head(&mut self, head: &Head<'_>) {
        if let Some(owner) = &head.owner {
            self.attribute_once(head.header.sock, head.open_token, owner);
        }
        let metrics = self.metrics.clone();
        let Some(tracked) = tracked_in(&mut self.conns, head.header.sock, head.open_token) else {
            return;
        };
        if head.content == HeadContent::TlsHello {
            // Undecrypted TLS whose hello settles on HTTP/2: the flow says `http2`, with no
            // stream count (its frames are encrypted).
            if tls_hello::h2_verdict(head.bytes).is_some() {
                tracked.protocol = Protocol::Http2;
            }
            return;
        }
        let Some(series) = tracked.series.clone() else { return };
        let direction = Direction::from_wire(head.direction).unwrap_or(Direction::None);
        if is_request(tracked.role, direction) {
            if let Some(request) = self.heads.request(head.bytes) {
                let session = tracked.http.get_or_insert_default();
                let counts = session.on_request(&request, head.exchanges);
                add_requests(&metrics, &series, counts);
                tracked.protocol = Protocol::Http1;
            }
            set_activity(tracked, &series, Activity::Active);
        } else {
            if let Some(response) = self.heads.response(head.bytes) {
                on_response(&metrics, tracked, &series, &response);
            }
            set_activity(tracked, &series, Activity::Idle);
        }
        let sock = head.header.sock;
        self.mark_active(sock);
    }

    fn progress(&mut self, sock: u64, conn: &Conn) {
        if self.apply(sock, conn) {
            self.mark_active(sock);
        }
    }

    /// Adds what changed since the last snapshot; false when nothing did (or the snapshot
    /// is older than one already applied).
    fn apply(&mut self, sock: u64, conn: &Conn) -> bool {
        let metrics = self.metrics.clone();
        // Borrows the map alone: the TLS request counts are updated beside it.
        let Some(tracked) = tracked_in(&mut self.conns, sock, conn.open_token) else {
            return false;
        };
        let Some(series) = tracked.series.clone() else { return false };
        let seen = tracked.seen;
        if conn.last_ns < seen.last_ns || conn.exchanges < seen.exchanges {
            return false;
        }
        let changed = conn.exchanges != seen.exchanges
            || conn.bytes_sent != seen.bytes_sent
            || conn.bytes_received != seen.bytes_received;
        series.bytes_sent.inc_by(u64::from(conn.bytes_sent.wrapping_sub(seen.bytes_sent)));
        series
            .bytes_received
            .inc_by(u64::from(conn.bytes_received.wrapping_sub(seen.bytes_received)));
        let gaps: [u64; GAP_BUCKETS] =
            std::array::from_fn(|bucket| conn.gaps.since(&seen.gaps, bucket));
        let gap_sum_us = gap_sum_delta(
            conn.gap_sum_us.wrapping_sub(seen.gap_sum_us),
            conn.last_ns - seen.last_ns,
        );
        if gaps.iter().any(|&n| n != 0) {
            series.idle.add(&gaps, gap_sum_us as f64 / 1e6);
        }
        let decrypted = conn.has(conn_flag::TLS_PLAINTEXT);
        let protocol = conn.protocol();
        let ciphertext = protocol == Protocol::Tls;
        let exchanges = u64::from(conn.exchanges - seen.exchanges);
        if decrypted || ciphertext {
            self.tls_requests.add(tracked.pid, exchanges);
        }
        if let Some(session) = tracked.http.as_deref_mut() {
            if decrypted && tracked.pid != 0 && !self.http_in_tls.contains(&tracked.pid) {
                if self.http_in_tls.len() >= MAX_HTTP_IN_TLS {
                    self.http_in_tls.clear();
                }
                self.http_in_tls.insert(tracked.pid);
            }
            // Counted from its ciphertext now (its process left decryption): no head says
            // the version any more.
            let counts = if ciphertext {
                session.unread_until(conn.exchanges)
            } else {
                session.repeat_until(conn.exchanges)
            };
            add_requests(&metrics, &series, counts);
        } else if protocol == Protocol::Http2 && !conn.has(conn_flag::H2_UNPARSED) {
            let streams = RequestCounts { http2: exchanges, ..RequestCounts::default() };
            add_requests(&metrics, &series, streams);
        } else if ciphertext
            && tracked.protocol != Protocol::Http2
            && self.http_in_tls.contains(&tracked.pid)
        {
            let unread = RequestCounts { unread: exchanges, ..RequestCounts::default() };
            add_requests(&metrics, &series, unread);
        }
        // A connection keeps the protocol it was seen speaking: one counted from its
        // ciphertext after its plaintext was read stays `http1`.
        if protocol != Protocol::Unknown && !(ciphertext && tracked.protocol != Protocol::Unknown) {
            tracked.protocol = protocol;
        }
        tracked.seen = Seen::of(conn);
        let waiting = conn.has(conn_flag::AWAITING_RESPONSE);
        set_activity(tracked, &series, if waiting { Activity::Active } else { Activity::Idle });
        changed
    }

    /// Connections to re-read from the kernel map now: those active since the last sweep
    /// and still open, each once. Under churn the kernel hands a closed socket's memory to
    /// the next connection at once, so an address can be listed once per connection it
    /// carried since the last sweep: reading each listing cost a `bpf()` call per
    /// connection. Each is re-read until a sweep finds it unchanged (`swept`).
    pub fn sweep_candidates(&mut self, into: &mut Vec<u64>) {
        into.clear();
        for sock in self.sweep.drain(..) {
            if let Some(tracked) = self.conns.get_mut(&sock)
                && tracked.in_sweep
            {
                tracked.in_sweep = false;
                into.push(sock);
            }
        }
    }

    /// Applies a swept snapshot: a changed connection stays in the next sweep.
    pub fn swept(&mut self, sock: u64, conn: Option<&Conn>) {
        let changed = conn.is_some_and(|conn| self.apply(sock, conn));
        if changed {
            self.mark_active(sock);
        }
    }

    fn close(&mut self, event: &SnapshotEvent) {
        let sock = event.header.sock;
        let conn = &event.conn;
        if self.tracked(sock, conn.open_token).is_none() {
            // Its Open was lost (counted as ringbuf_full): no labels to count it under.
            return;
        }
        if self.conns.get(&sock).is_some_and(|t| t.series.is_none()) {
            // Accepted, never used by its process.
            self.resolve_pending(sock, None);
        }
        self.apply(sock, conn);
        self.pending_servers.remove(&sock);
        let Some(tracked) = self.conns.remove(&sock) else { return };
        let Some(series) = tracked.series.clone() else { return };
        series.open_gauge(tracked.activity).dec();
        let no_http = HttpSession::default();
        let http = tracked.http.as_deref().unwrap_or(&no_http);
        let by = conn.closed_by();
        // The active closer's socket stays in TIME_WAIT (a reset leaves none).
        if by == ClosedBy::Local
            && conn.close_kind() == CloseKind::Fin
            && let Some(tuple) = tracked.tuple
        {
            self.recent_closes.insert(tuple, series.clone(), tracked.role, event.header.ts_ns);
        }
        let protocol =
            if tracked.protocol == Protocol::Unknown { conn.protocol() } else { tracked.protocol };
        let h2 = tracked.h2.as_deref();
        let reason = close_reason(conn, http, h2.and_then(goaway_reason));
        series.count_close(&self.metrics, (by, conn.close_kind(), reason, protocol));
        let end_ns = event.header.ts_ns;
        let exact = !tracked.adopted;
        // HTTP/2 whose frames were lost track of, or are encrypted (known by its hello's
        // ALPN), has no stream count.
        let counted = !(protocol == Protocol::Http2
            && (conn.has(conn_flag::H2_UNPARSED) || conn.protocol() == Protocol::Tls));
        if let Some(h2) = h2.filter(|_| counted && exact) {
            let buckets = h2.concurrency.map(u64::from);
            series.h2_concurrency(&self.metrics).add(&buckets, f64::from(h2.concurrency_sum));
        }
        if let Some(histogram) =
            (exact && counted).then(|| series.requests(&self.metrics, protocol)).flatten()
        {
            let requests = match protocol {
                Protocol::Http1 => http.requests.max(u64::from(conn.exchanges)),
                _ => u64::from(conn.exchanges),
            };
            histogram.observe(requests as f64);
        }
        if exact && end_ns >= tracked.open_ns {
            series.duration.observe(seconds(end_ns - tracked.open_ns));
        }
        let close_idle_seconds = if by == ClosedBy::Unknown {
            seconds(end_ns.saturating_sub(conn.last_ns))
        } else {
            f64::from(conn.idle_before_close_us()) / 1e6
        };
        series.close_idle(&self.metrics, by).observe(close_idle_seconds);
        if is_keepalive_race(conn) {
            series.races.inc();
        }
    }
}

impl ConnectionTable {
    /// Attributes a socket census to flows and sets their gauges (`socket_count`): open
    /// connections first, so a tuple used again since its close counts for its new flow.
    pub fn count_sockets(&mut self, census: &Census) {
        self.recent_closes.expire(census.taken_ns);
        let mut tally = Tally::new(census, &self.metrics);
        let mut reused = HashSet::new();
        for tracked in self.conns.values() {
            if let (Some(tuple), Some(series)) = (tracked.tuple, &tracked.series) {
                tally.add(tuple, series, tracked.role);
                if self.recent_closes.contains(&tuple) {
                    reused.insert(tuple);
                }
            }
        }
        for (tuple, closed) in self.recent_closes.iter() {
            if !reused.contains(tuple) {
                tally.add(*tuple, &closed.series, closed.role);
            }
        }
        tally.publish(&mut self.census_gauges);
    }
}

impl Tracked {
    /// `pending_server`: the `server` label of a connection whose process is not known yet.
    fn handover(&self, pending_server: Option<&str>) -> Option<Handover> {
        let seen = &self.seen;
        let mut entry = Handover {
            open_ns: self.open_ns,
            cgroup_id: self.cgroup_id,
            last_ns: seen.last_ns,
            bytes_sent: seen.bytes_sent,
            bytes_received: seen.bytes_received,
            gap_sum_us: seen.gap_sum_us,
            exchanges: seen.exchanges,
            gaps: seen.gaps,
            role: self.role as u8,
            protocol: self.protocol as u8,
            ..Handover::zeroed()
        };
        let server = match (&self.series, pending_server) {
            (Some(series), _) => {
                entry.flags |= handover_flag::ATTRIBUTED;
                handover::put_label(&mut entry.comm, &series.flow.process)?;
                series.flow.server.as_str()
            }
            (None, Some(server)) => server,
            (None, None) => return None,
        };
        entry.server_len = handover::put_label(&mut entry.server, server)?;
        if self.adopted {
            entry.flags |= handover_flag::ADOPTED;
        }
        if self.activity == Activity::Active {
            entry.flags |= handover_flag::ACTIVE;
        }
        if let Some(http) = &self.http {
            handover::put_session(&mut entry, http);
        }
        Some(entry)
    }
}

/// The connection of `sock` in `conns` whose open time has `token` as its low bits.
fn tracked_in(conns: &mut SockMap<Tracked>, sock: u64, token: u32) -> Option<&mut Tracked> {
    conns.get_mut(&sock).filter(|t| open_token(t.open_ns) == token)
}

/// The close reason an HTTP/2 connection's first `GOAWAY` gives, if one was seen.
fn goaway_reason(h2: &Http2CloseEvent) -> Option<CloseReason> {
    let by = match Role::from_wire(h2.goaway_by)? {
        Role::Server => GoAwayBy::Server,
        Role::Client => GoAwayBy::Client,
    };
    Some(CloseReason::GoAway(by, GoAwayCode::of(h2.goaway_code)))
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn set_activity(tracked: &mut Tracked, series: &FlowSeries, next: Activity) {
    if next != tracked.activity {
        series.open_gauge(tracked.activity).dec();
        series.open_gauge(next).inc();
        tracked.activity = next;
    }
}

/// Gives a connection its flow's series: it now counts as opened.
fn give_series(
    flows: &mut FlowCache,
    metrics: &Metrics,
    tracked: &mut Tracked,
    server: LabelId,
    owner: Option<&Attribution>,
) {
    let series = flows.series(metrics, tracked.role, server, owner);
    if tracked.adopted {
        series.adopted(metrics).inc();
    } else {
        series.opened.inc();
    }
    series.open_gauge(tracked.activity).inc();
    tracked.series = Some(series);
    tracked.cgroup_id = owner.map_or(0, |owner| owner.cgroup_id);
    tracked.pid = owner.map_or(0, |owner| owner.tgid);
}

fn add_requests(metrics: &Metrics, series: &FlowSeries, counts: RequestCounts) {
    let by_version = [
        (RequestVersion::Read(Version::Http10), counts.http10),
        (RequestVersion::Read(Version::Http11), counts.http11),
        (RequestVersion::Http2, counts.http2),
        (RequestVersion::Unread, counts.unread),
    ];
    for (version, requests) in by_version {
        if requests > 0 {
            series.http_requests(metrics, version).inc_by(requests);
        }
    }
}

fn on_response(
    metrics: &Metrics,
    tracked: &mut Tracked,
    series: &FlowSeries,
    response: &http::Head,
) {
    tracked.http.get_or_insert_default().on_response(response);
    if let Some(timeout) = response.keep_alive.timeout_seconds {
        series.advertised_timeout(metrics).set(i64::from(timeout));
    }
    if let Some(max) = response.keep_alive.max_requests {
        series.advertised_max(metrics).set(i64::from(max));
    }
}

#[cfg(test)]
mod tests;
