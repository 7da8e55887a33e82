//! Connection table tests: synthetic kernel records in, metric values out.

use connscope_common::{
    AF_INET, Attribution, CloseKind, Conn, Direction, EventHeader, EventKind, HeadContent,
    OpenEvent, Role, SnapshotEvent,
    conn::{CLOSE_AWAITING, gap_bucket},
    conn_flag,
};

use super::*;
use crate::{
    model::label_sets::{
        Closed, ConnectFailed, Flow, FlowProtocol, HttpRequest, OpenState, PlacedFlow, Server,
    },
    model::placement::{NoPlacement, Placement},
    pipeline::events::{self, Event},
};

const SOCK: u64 = 0xffff_0000_0000_1000;
const OPEN_NS: u64 = 1_000;

fn flow(role: &str) -> Flow {
    Flow { role: role.into(), process: "curl".into(), server: "127.0.0.1:8080".into() }
}

fn open(role: Role) -> Event<'static> {
    let mut event = OpenEvent {
        header: EventHeader::new(EventKind::Open, SOCK, OPEN_NS),
        open_ns: OPEN_NS,
        role: role as u8,
        attribution: Attribution { valid: 1, tgid: 7, ..Attribution::default() },
        ..OpenEvent::default()
    };
    event.attribution.comm[..4].copy_from_slice(b"curl");
    let endpoints = &mut event.endpoints;
    endpoints.family = AF_INET;
    endpoints.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    endpoints.remote_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    (endpoints.local_port, endpoints.remote_port) =
        if role == Role::Client { (40_000, 8080) } else { (8080, 40_000) };
    Event::Open(event)
}

fn state(role: Role) -> Conn {
    Conn {
        open_token: open_token(OPEN_NS),
        last_ns: OPEN_NS,
        role: role as u8,
        flags: conn_flag::ATTRIBUTED,
        ..Conn::default()
    }
}

fn snapshot(kind: EventKind, conn: Conn, ts_ns: u64) -> Event<'static> {
    let event = SnapshotEvent { header: EventHeader::new(kind, SOCK, ts_ns), conn };
    if kind == EventKind::Close { Event::Close(event) } else { Event::Progress(event) }
}

/// A head record as the kernel sends it (bytes kept alive by the caller).
fn head_record(role: Role, direction: Direction, exchanges: u32, head: &[u8]) -> Vec<u8> {
    events::encode_head(&head_event(role, direction, exchanges, head))
}

fn head_event(role: Role, direction: Direction, exchanges: u32, bytes: &[u8]) -> events::Head<'_> {
    events::Head {
        header: EventHeader::new(EventKind::Head, SOCK, 0),
        open_token: open_token(OPEN_NS),
        exchanges,
        direction: direction as u8,
        role: role as u8,
        content: HeadContent::Http,
        owner: None,
        bytes,
    }
}

fn handle_bytes(table: &mut ConnectionTable, record: &[u8]) {
    table.handle(&events::decode(record).expect("a test record"));
}

fn table() -> (ConnectionTable, Metrics) {
    let metrics = Metrics::new();
    (ConnectionTable::new(metrics.clone(), 1024, 100, 100, Box::new(NoPlacement)), metrics)
}

fn closed_count(metrics: &Metrics, role: &str, by: &str, kind: &str, reason: &str) -> u64 {
    // Whatever the connection spoke.
    crate::model::metric_table::PROTOCOL
        .values
        .unwrap_or_default()
        .iter()
        .map(|protocol| {
            let labels = Closed {
                flow: PlacedFlow { flow: flow(role), placement: Placement::default() },
                closed_by: by.into(),
                close_kind: kind.into(),
                reason: reason.into(),
                protocol: (*protocol).into(),
            };
            metrics.closed.get(&labels).map(|c| c.get()).unwrap_or(0)
        })
        .sum()
}

fn open_gauge(metrics: &Metrics, role: &str, state: &str) -> i64 {
    metrics
        .open
        .get(&OpenState { flow: flow(role), state: state.into() })
        .map(|g| g.get())
        .unwrap_or(0)
}

fn requests(metrics: &Metrics, role: &str) -> (f64, u64) {
    let labels = FlowProtocol { flow: flow(role), protocol: "http1".into() };
    metrics.requests.get(&labels).map(|h| (h.sum(), h.count())).unwrap_or_default()
}

fn http11(metrics: &Metrics, role: &str) -> u64 {
    let version = HttpRequest { flow: flow(role), http_version: "1.1".into() };
    metrics.http_requests.get(&version).map(|c| c.get()).unwrap_or(0)
}

/// `conn` closing while an exchange awaited its response.
fn closing(mut conn: Conn, by: ClosedBy, kind: CloseKind) -> Conn {
    conn.closed_by = by as u8;
    conn.close_idle_us = CLOSE_AWAITING;
    if kind == CloseKind::Reset {
        conn.flags |= conn_flag::CLOSED_BY_RESET;
    }
    conn
}

/// `conn` closing while idle.
fn closing_idle(conn: Conn, by: ClosedBy, kind: CloseKind) -> Conn {
    Conn { close_idle_us: 0, ..closing(conn, by, kind) }
}

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
const OK: &[u8] = b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5, max=3\r\n\r\n";
const OK_LAST: &[u8] =
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nKeep-Alive: timeout=5, max=1\r\n\r\n";

#[test]
fn client_keep_alive_connection_closed_idle_by_peer() {
    let (mut table, metrics) = table();
    table.handle(&open(Role::Client));
    assert_eq!(open_gauge(&metrics, "client", "idle"), 1);
    handle_bytes(&mut table, &head_record(Role::Client, Direction::Send, 1, GET));
    assert_eq!(open_gauge(&metrics, "client", "active"), 1);
    handle_bytes(&mut table, &head_record(Role::Client, Direction::Recv, 1, OK));
    // The second exchange repeated both heads: only the kernel's counts say so.
    let mut last = state(Role::Client);
    last.exchanges = 2;
    last.gap_sum_us = 200_000;
    last.last_ns = OPEN_NS + 300_000_000;
    last.gaps.add(gap_bucket(200_000_000));
    last.last_direction = Direction::Recv as u8;
    table.handle(&snapshot(
        EventKind::Close,
        closing_idle(last, ClosedBy::Peer, CloseKind::Fin),
        2_000_001_000,
    ));

    assert_eq!(closed_count(&metrics, "client", "peer", "fin", "idle"), 1);
    assert_eq!(open_gauge(&metrics, "client", "idle"), 0);
    assert_eq!(open_gauge(&metrics, "client", "active"), 0);
    assert_eq!(table.len(), 0);
    let idle = metrics.idle.get_or_create(&flow("client"));
    let (count, sum) = (idle.count(), idle.sum());
    assert_eq!(count, 1, "one idle gap (before the second request)");
    assert!((sum - 0.2).abs() < 1e-9);
    let server = Server { server: "127.0.0.1:8080".into() };
    assert_eq!(metrics.advertised_timeout.get_or_create(&server).get(), 5);
    assert_eq!(metrics.advertised_max.get_or_create(&server).get(), 3);
    assert_eq!(http11(&metrics, "client"), 2);
    let duration = metrics.duration.get_or_create(&flow("client"));
    assert_eq!(duration.count(), 1);
    assert!((duration.sum() - 2.0).abs() < 1e-9);
}

/// One record per turn, or one head and batched snapshots: the same observations.
#[test]
fn batched_snapshots_equal_one_record_per_turn() {
    let gaps_ns: Vec<u64> =
        (0..1500u64).map(|n| (n % 7) * 3_000_000 + (n % 3) * 700_000_000).collect();
    let run = |batch: usize| {
        let (mut table, metrics) = table();
        table.handle(&open(Role::Server));
        handle_bytes(&mut table, &head_record(Role::Server, Direction::Recv, 1, GET));
        handle_bytes(&mut table, &head_record(Role::Server, Direction::Send, 1, OK));
        let mut conn = state(Role::Server);
        conn.exchanges = 1;
        for (n, gap) in gaps_ns.iter().enumerate() {
            conn.exchanges += 1;
            conn.last_ns += gap + 1_000;
            conn.gap_sum_us = conn.gap_sum_us.wrapping_add((gap / 1000) as u32);
            let bucket_due = conn.gaps.add(gap_bucket(*gap));
            conn.bytes_received += 30;
            conn.bytes_sent += 50;
            // The kernel reports before a bucket could wrap unseen.
            if (n + 1) % batch == 0 || bucket_due {
                table.handle(&snapshot(EventKind::Progress, conn, 0));
            }
        }
        conn.last_direction = Direction::Send as u8;
        table.handle(&snapshot(EventKind::Close, closing(conn, ClosedBy::Peer, CloseKind::Fin), 1));
        let idle = metrics.idle.get_or_create(&flow("server"));
        let bytes = metrics.bytes_sent.get_or_create(&flow("server")).get();
        let mut text = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("idle", "gaps", idle.clone());
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        (text, idle.count(), bytes, http11(&metrics, "server"), requests(&metrics, "server"))
    };
    let per_turn = run(1);
    assert_eq!(per_turn.1, gaps_ns.len() as u64);
    assert_eq!(per_turn.3, gaps_ns.len() as u64 + 1);
    assert_eq!(per_turn.4, ((gaps_ns.len() + 1) as f64, 1));
    for batch in [10, 100, 5000] {
        let batched = run(batch);
        assert_eq!(batched.1, per_turn.1, "batch {batch}");
        assert_eq!((batched.2, batched.3, batched.4), (per_turn.2, per_turn.3, per_turn.4));
        // Same buckets; sums equal up to float rounding of the additions.
        let buckets = |text: &str| {
            text.lines().filter(|l| l.contains("_bucket")).map(str::to_owned).collect::<Vec<_>>()
        };
        assert_eq!(buckets(&batched.0), buckets(&per_turn.0), "batch {batch}");
    }
}

#[test]
fn connection_close_header_sets_reason() {
    let (mut table, metrics) = table();
    table.handle(&open(Role::Server));
    handle_bytes(
        &mut table,
        &head_record(
            Role::Server,
            Direction::Recv,
            1,
            b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        ),
    );
    handle_bytes(
        &mut table,
        &head_record(
            Role::Server,
            Direction::Send,
            1,
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
        ),
    );
    let mut last = state(Role::Server);
    last.exchanges = 1;
    table.handle(&snapshot(
        EventKind::Close,
        closing(last, ClosedBy::Local, CloseKind::Fin),
        5_000,
    ));
    assert_eq!(closed_count(&metrics, "server", "local", "fin", "connection_close"), 1);
}

#[test]
fn http10_and_max_requests_reasons() {
    let (mut table, metrics) = table();
    table.handle(&open(Role::Client));
    handle_bytes(
        &mut table,
        &head_record(Role::Client, Direction::Send, 1, b"GET / HTTP/1.0\r\n\r\n"),
    );
    handle_bytes(
        &mut table,
        &head_record(Role::Client, Direction::Recv, 1, b"HTTP/1.0 200 OK\r\n\r\n"),
    );
    let mut last = state(Role::Client);
    last.exchanges = 1;
    let last = closing(last, ClosedBy::Peer, CloseKind::Fin);
    table.handle(&snapshot(EventKind::Close, last, 5_000));
    assert_eq!(closed_count(&metrics, "client", "peer", "fin", "http10"), 1);

    table.handle(&open(Role::Client));
    handle_bytes(&mut table, &head_record(Role::Client, Direction::Send, 1, GET));
    handle_bytes(&mut table, &head_record(Role::Client, Direction::Recv, 1, OK));
    // Exchange 2 repeated both heads; exchange 3 got the last response.
    handle_bytes(&mut table, &head_record(Role::Client, Direction::Recv, 3, OK_LAST));
    let mut third = last;
    third.exchanges = 3;
    table.handle(&snapshot(EventKind::Close, third, 9_000));
    assert_eq!(closed_count(&metrics, "client", "peer", "fin", "max_requests"), 1);
    assert_eq!(requests(&metrics, "client"), (4.0, 2), "1 + 3 requests over two connections");
}

#[test]
fn resets_and_races() {
    let (mut table, metrics) = table();
    table.handle(&open(Role::Client));
    let mut reset = closing(state(Role::Client), ClosedBy::Peer, CloseKind::Reset);
    reset.exchanges = 2;
    reset.flags |= conn_flag::RESET_RECEIVED;
    reset.last_direction = Direction::Send as u8;
    table.handle(&snapshot(EventKind::Close, reset, 5_000));
    assert_eq!(closed_count(&metrics, "client", "peer", "reset", "reset"), 1);
    assert_eq!(metrics.races.get_or_create(&flow("client")).get(), 1);

    // An abort with no reset on the wire (e.g. a timeout) is an error.
    table.handle(&open(Role::Client));
    let aborted = closing(state(Role::Client), ClosedBy::Local, CloseKind::Reset);
    table.handle(&snapshot(EventKind::Close, aborted, 7_000));
    assert_eq!(closed_count(&metrics, "client", "local", "reset", "error"), 1);
}

#[test]
fn accepted_sockets_count_once_their_process_is_known() {
    let (mut table, metrics) = table();
    let Event::Open(mut accepted) = open(Role::Server) else { return };
    accepted.attribution = Attribution::default();
    table.handle(&Event::Open(accepted));
    let opened = PlacedFlow { flow: flow("server"), placement: Placement::default() };
    assert_eq!(metrics.opened.get(&opened).map(|c| c.get()), None);
    let Event::Open(owner) = open(Role::Server) else { return };
    let attribute = connscope_common::AttributeEvent {
        header: EventHeader::new(EventKind::Attribute, SOCK, 2_000),
        open_token: open_token(OPEN_NS),
        _pad: 0,
        attribution: owner.attribution,
    };
    table.handle(&Event::Attribute(attribute));
    assert_eq!(metrics.opened.get(&opened).map(|c| c.get()), Some(1));
    assert_eq!(open_gauge(&metrics, "server", "idle"), 1);
}

#[test]
fn an_accepted_socket_takes_its_process_from_its_first_head() {
    let (mut table, metrics) = table();
    let Event::Open(mut accepted) = open(Role::Server) else { return };
    let owner = accepted.attribution;
    accepted.attribution = Attribution::default();
    table.handle(&Event::Open(accepted));
    let request =
        events::Head { owner: Some(owner), ..head_event(Role::Server, Direction::Recv, 1, GET) };
    handle_bytes(&mut table, &events::encode_head(&request));
    let opened = PlacedFlow { flow: flow("server"), placement: Placement::default() };
    assert_eq!(metrics.opened.get(&opened).map(|c| c.get()), Some(1));
    assert_eq!(http11(&metrics, "server"), 1);
    assert_eq!(open_gauge(&metrics, "server", "active"), 1);
}

#[test]
fn records_of_other_generations_and_stale_snapshots_are_ignored() {
    let (mut table, metrics) = table();
    table.handle(&open(Role::Client));
    let stale =
        events::Head { open_token: 999, ..head_event(Role::Client, Direction::Send, 1, GET) };
    let stale = events::encode_head(&stale);
    handle_bytes(&mut table, &stale);
    assert_eq!(http11(&metrics, "client"), 0);
    let mut newer = state(Role::Client);
    (newer.exchanges, newer.bytes_sent) = (5, 500);
    table.handle(&snapshot(EventKind::Progress, newer, 0));
    let mut older = newer;
    (older.exchanges, older.bytes_sent) = (4, 400);
    table.handle(&snapshot(EventKind::Progress, older, 0));
    assert_eq!(metrics.bytes_sent.get_or_create(&flow("client")).get(), 500);
}

#[test]
fn bytes_are_counted_once() {
    let (mut table, metrics) = table();
    table.handle(&open(Role::Client));
    let mut progress = state(Role::Client);
    progress.bytes_sent = 100;
    table.handle(&snapshot(EventKind::Progress, progress, 0));
    let mut last = closing(state(Role::Client), ClosedBy::Local, CloseKind::Fin);
    (last.bytes_sent, last.bytes_received) = (150, 70);
    table.handle(&snapshot(EventKind::Close, last, 2_000));
    assert_eq!(metrics.bytes_sent.get_or_create(&flow("client")).get(), 150);
    assert_eq!(metrics.bytes_received.get_or_create(&flow("client")).get(), 70);
}

#[test]
fn wrapping_counters_count_across_their_wrap() {
    let (mut table, metrics) = table();
    table.handle(&open(Role::Client));
    let mut before = state(Role::Client);
    before.bytes_sent = u32::MAX - 9;
    before.gap_sum_us = u32::MAX - 99;
    before.exchanges = 2;
    before.gaps.set(GAP_BUCKETS - 1, 1);
    before.last_ns = OPEN_NS + 5_000_000_000_000;
    table.handle(&snapshot(EventKind::Progress, before, 0));
    let mut after = before;
    after.bytes_sent = 20;
    // One more gap of 2 h: longer than a whole wrap of the µs sum.
    let gap_us: u64 = 7_200_000_000;
    after.gap_sum_us = before.gap_sum_us.wrapping_add(gap_us as u32);
    after.exchanges = 3;
    after.gaps.set(GAP_BUCKETS - 1, 2);
    after.last_ns = before.last_ns + gap_us * 1000 + 40_000;
    table.handle(&snapshot(EventKind::Progress, after, 0));
    let bytes = metrics.bytes_sent.get_or_create(&flow("client")).get();
    assert_eq!(bytes, u64::from(u32::MAX - 9) + 30);
    let idle = metrics.idle.get_or_create(&flow("client"));
    let (count, sum) = (idle.count(), idle.sum());
    assert_eq!(count, 2);
    let expected = (u64::from(u32::MAX - 99) + gap_us) as f64 / 1e6;
    assert!((sum - expected).abs() < 1e-6, "{sum} != {expected}");
}

#[test]
fn sweeps_read_active_connections_until_they_are_quiet() {
    let (mut table, metrics) = table();
    table.handle(&open(Role::Client));
    let mut candidates = Vec::new();
    table.sweep_candidates(&mut candidates);
    assert_eq!(candidates, [SOCK]);
    let mut busy = state(Role::Client);
    busy.bytes_sent = 10;
    table.swept(SOCK, Some(&busy));
    table.sweep_candidates(&mut candidates);
    assert_eq!(candidates, [SOCK], "changed: read again");
    table.swept(SOCK, Some(&busy));
    table.sweep_candidates(&mut candidates);
    assert!(candidates.is_empty(), "unchanged: dropped until the kernel reports it");
    assert_eq!(metrics.bytes_sent.get_or_create(&flow("client")).get(), 10);
}

#[test]
fn sweeps_read_a_reused_socket_address_once_and_a_closed_one_never() {
    let (mut table, _metrics) = table();
    let mut candidates = Vec::new();
    // Three connections in turn on one socket address, as churn reuses socket memory.
    for _ in 0..3 {
        table.handle(&open(Role::Client));
        table.handle(&snapshot(EventKind::Close, state(Role::Client), 2_000));
    }
    table.handle(&open(Role::Client));
    table.sweep_candidates(&mut candidates);
    assert_eq!(candidates, [SOCK], "the open one, once");
    table.handle(&snapshot(EventKind::Close, state(Role::Client), 2_000));
    table.handle(&open(Role::Client));
    table.handle(&snapshot(EventKind::Close, state(Role::Client), 2_000));
    table.sweep_candidates(&mut candidates);
    assert!(candidates.is_empty(), "closed since: nothing to read");
}

fn placed(role: &str) -> PlacedFlow {
    PlacedFlow { flow: flow(role), placement: Placement::default() }
}

#[test]
fn a_client_open_observes_its_connect_time_and_a_server_open_none() {
    let (mut table, metrics) = table();
    let Event::Open(mut client) = open(Role::Client) else { unreachable!() };
    client.connect_ns = 1_200_000_000;
    table.handle(&Event::Open(client));
    let histogram = metrics.connect_duration.get(&placed("client")).expect("a client series");
    assert_eq!((histogram.count(), histogram.sum()), (1, 1.2));
    // An adopted or older connect (0: its start was not seen) and a server end observe none.
    let Event::Open(mut unseen) = open(Role::Client) else { unreachable!() };
    unseen.header.sock = SOCK + 1;
    table.handle(&Event::Open(unseen));
    let Event::Open(mut server) = open(Role::Server) else { unreachable!() };
    server.header.sock = SOCK + 2;
    server.connect_ns = 5;
    table.handle(&Event::Open(server));
    assert_eq!(histogram.count(), 1);
    assert!(metrics.connect_duration.get(&placed("server")).is_none());
}

#[test]
fn failed_connects_count_by_reason_on_the_client_flow() {
    use connscope_common::{ConnectFailedEvent, ConnectFailure};
    let (mut table, metrics) = table();
    let Event::Open(open) = open(Role::Client) else { unreachable!() };
    let failed = |reason: u8| ConnectFailedEvent {
        header: EventHeader::new(EventKind::ConnectFailed, SOCK, 5),
        endpoints: open.endpoints,
        attribution: open.attribution,
        reason,
        _pad: [0; 7],
    };
    for reason in [ConnectFailure::Refused, ConnectFailure::Refused, ConnectFailure::NoLocalPort] {
        handle_bytes(&mut table, &events::encode(&failed(reason as u8)));
    }
    // A reason this build does not know is dropped, not counted as another.
    table.handle(&Event::ConnectFailed(failed(200)));
    let count = |reason: &str| {
        let labels = ConnectFailed { flow: placed("client"), reason: reason.into() };
        metrics.connect_failures.get(&labels).map(|c| c.get()).unwrap_or(0)
    };
    assert_eq!((count("refused"), count("no_local_port"), count("timeout")), (2, 1, 0));
    assert_eq!(open_gauge(&metrics, "client", "idle"), 0);
    assert_eq!(table.len(), 0);
}

/// The socket errors the kernel programs compare with are the host's.
#[test]
fn connect_errors_are_the_kernels_errno_values() {
    use connscope_common::net::errno;
    assert_eq!(
        [errno::ENONET, errno::ENETUNREACH, errno::ETIMEDOUT, errno::ECONNREFUSED],
        [libc::ENONET, libc::ENETUNREACH, libc::ETIMEDOUT, libc::ECONNREFUSED]
    );
    assert_eq!([errno::EHOSTDOWN, errno::EHOSTUNREACH], [libc::EHOSTDOWN, libc::EHOSTUNREACH]);
}

/// A census that found `sockets` (four-tuple, TIME_WAIT?) in one namespace, at `taken_ns`.
fn census(taken_ns: u64, sockets: &[(TupleKey, bool)]) -> Census {
    use crate::model::socket_census::Held;
    let mut census = Census { taken_ns, namespaces: vec!["111".into()], ..Census::default() };
    for &(tuple, time_wait) in sockets {
        census.sockets.insert(tuple, Held { namespace: 0, time_wait });
    }
    census
}

fn tuple_of(event: &Event<'_>) -> TupleKey {
    let Event::Open(open) = event else { unreachable!() };
    TupleKey::of_endpoints(&open.endpoints).expect("an IPv4 tuple")
}

#[test]
fn a_census_counts_time_wait_and_ports_on_the_flow_that_closed_first() {
    use crate::model::label_sets::{Netns, PlacedFlowNetns};
    let (mut table, metrics) = table();
    let client = open(Role::Client);
    let tuple = tuple_of(&client);
    table.handle(&client);
    let ports = PlacedFlowNetns { flow: placed("client"), netns: "111".into() };
    let ports_in_use = || metrics.ports_in_use.get(&ports).map(|g| g.get());
    let time_wait = || metrics.time_wait.get(&placed("client")).map(|g| g.get());
    let unattributed = || metrics.time_wait_unattributed.get(&Netns { netns: "111".into() });
    let unattributed = || unattributed().map(|g| g.get());
    // Open: a port, no TIME_WAIT. A TIME_WAIT socket no connection of the table had is
    // unattributed.
    let stranger = TupleKey::new(
        (std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped(), 1),
        (std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped(), 2),
    );
    table.count_sockets(&census(2_000, &[(tuple, false), (stranger, true)]));
    assert_eq!((ports_in_use(), time_wait(), unattributed()), (Some(1), None, Some(1)));
    // Closed first by this side with a FIN: its socket in TIME_WAIT still holds the port.
    let closed = closing_idle(state(Role::Client), ClosedBy::Local, CloseKind::Fin);
    table.handle(&snapshot(EventKind::Close, closed, 3_000));
    table.count_sockets(&census(4_000, &[(tuple, true), (stranger, true)]));
    assert_eq!((ports_in_use(), time_wait(), unattributed()), (Some(1), Some(1), Some(1)));
    // Past TIME_WAIT: the gauges fall back to 0.
    table.count_sockets(&census(5_000, &[]));
    assert_eq!((ports_in_use(), time_wait(), unattributed()), (Some(0), Some(0), Some(0)));
    // The close is forgotten after the TIME_WAIT length: a socket of that tuple found then
    // is not the flow's.
    let later = 3_000 + crate::pipeline::recent_closes::KEPT_NS + 1;
    table.count_sockets(&census(later, &[(tuple, true)]));
    assert_eq!((time_wait(), unattributed()), (Some(0), Some(1)));
}

#[test]
fn a_close_by_the_peer_or_by_a_reset_leaves_no_time_wait_here() {
    use crate::model::label_sets::PlacedFlowNetns;
    let (mut table, metrics) = table();
    for (by, kind) in [(ClosedBy::Peer, CloseKind::Fin), (ClosedBy::Local, CloseKind::Reset)] {
        let server = open(Role::Server);
        let tuple = tuple_of(&server);
        table.handle(&server);
        let closed = closing_idle(state(Role::Server), by, kind);
        table.handle(&snapshot(EventKind::Close, closed, 3_000));
        table.count_sockets(&census(4_000, &[(tuple, true)]));
        assert_eq!(metrics.time_wait.get(&placed("server")).map(|g| g.get()), None);
        // Servers hold no client port.
        let ports = PlacedFlowNetns { flow: placed("server"), netns: "111".into() };
        assert!(metrics.ports_in_use.get(&ports).is_none());
    }
}
