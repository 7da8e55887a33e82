//! Connection state machine tests: synthetic kernel events in, metric values out.

use connscope_common::{AF_INET, EventHeader, EventKind, HEAD_LEN};

use super::*;

const SOCK: u64 = 0xffff_0000_0000_1000;

fn flow(role: &str) -> Flow {
    Flow { role: role.into(), process: "curl".into(), server: "127.0.0.1:8080".into() }
}

fn conn(conn_role: u8) -> Conn {
    let mut c = Conn {
        open_ns: 1_000,
        established_ns: 1_000,
        role: conn_role,
        flags: conn_flag::ESTABLISHED | conn_flag::ATTRIBUTED | conn_flag::ANNOUNCED,
        ..Conn::default()
    };
    c.comm[..4].copy_from_slice(b"curl");
    c.endpoints.family = AF_INET;
    c.endpoints.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    c.endpoints.remote_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    if conn_role == role::CLIENT {
        (c.endpoints.local_port, c.endpoints.remote_port) = (40_000, 8080);
    } else {
        (c.endpoints.local_port, c.endpoints.remote_port) = (8080, 40_000);
    }
    c
}

fn conn_event(kind: EventKind, conn: Conn, ts_ns: u64) -> Event {
    let event =
        ConnEvent { header: EventHeader { kind: kind as u32, _pad: 0, sock: SOCK, ts_ns }, conn };
    if kind == EventKind::Open { Event::Open(event) } else { Event::Close(event) }
}

fn turn(conn_role: u8, dir: u8, exchanges: u32, gap_ns: u64, head: &[u8]) -> Event {
    let mut event = TurnEvent {
        header: EventHeader { kind: EventKind::Turn as u32, _pad: 0, sock: SOCK, ts_ns: 0 },
        open_ns: 1_000,
        gap_ns,
        bytes_sent: 0,
        bytes_received: 0,
        exchanges,
        head_len: head.len() as u32,
        tgid: 1,
        direction: dir,
        role: conn_role,
        _pad: [0; 2],
        comm: [0; 16],
        head: [0; HEAD_LEN],
    };
    event.head[..head.len()].copy_from_slice(head);
    Event::Turn(Box::new(event))
}

fn table() -> (ConnectionTable, Metrics) {
    let metrics = Metrics::new();
    (ConnectionTable::new(metrics.clone(), 100, 100, Box::new(NoPlacement)), metrics)
}

fn closed_count(metrics: &Metrics, role: &str, by: &str, kind: &str, reason: &str) -> u64 {
    let labels = Closed {
        flow: PlacedFlow { flow: flow(role), placement: Placement::default() },
        closed_by: by.into(),
        close_kind: kind.into(),
        reason: reason.into(),
    };
    metrics.closed.get(&labels).map(|c| c.get()).unwrap_or(0)
}

fn open_gauge(metrics: &Metrics, role: &str, state: &str) -> i64 {
    metrics
        .open
        .get(&OpenState { flow: flow(role), state: state.into() })
        .map(|g| g.get())
        .unwrap_or(0)
}

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
const OK: &[u8] = b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5, max=3\r\n\r\n";
const OK_LAST: &[u8] =
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nKeep-Alive: timeout=5, max=1\r\n\r\n";

#[test]
fn client_keep_alive_connection_closed_idle_by_peer() {
    let (mut table, metrics) = table();
    table.handle(&conn_event(EventKind::Open, conn(role::CLIENT), 1_000));
    assert_eq!(open_gauge(&metrics, "client", "idle"), 1);
    table.handle(&turn(role::CLIENT, direction::SEND, 1, 0, GET));
    assert_eq!(open_gauge(&metrics, "client", "active"), 1);
    table.handle(&turn(role::CLIENT, direction::RECV, 1, 0, OK));
    table.handle(&turn(role::CLIENT, direction::SEND, 2, 200_000_000, GET));
    table.handle(&turn(role::CLIENT, direction::RECV, 2, 0, OK));
    let mut closing = conn(role::CLIENT);
    closing.exchanges = 2;
    closing.closed_by = closed_by::PEER;
    closing.close_kind = close_kind::FIN;
    closing.flags |= conn_flag::IDLE_AT_CLOSE;
    table.handle(&conn_event(EventKind::Close, closing, 2_000_001_000));

    assert_eq!(closed_count(&metrics, "client", "peer", "fin", "idle"), 1);
    assert_eq!(open_gauge(&metrics, "client", "idle"), 0);
    assert_eq!(open_gauge(&metrics, "client", "active"), 0);
    assert_eq!(table.len(), 0);
    let idle = metrics.idle.get_or_create(&flow("client"));
    assert_eq!(idle.count(), 1, "one idle gap (before the second request)");
    assert!((idle.sum() - 0.2).abs() < 1e-9);
    let server = Server { server: "127.0.0.1:8080".into() };
    assert_eq!(metrics.advertised_timeout.get_or_create(&server).get(), 5);
    assert_eq!(metrics.advertised_max.get_or_create(&server).get(), 3);
    let version = HttpRequest { flow: flow("client"), http_version: "1.1".into() };
    assert_eq!(metrics.http_requests.get_or_create(&version).get(), 2);
    let duration = metrics.duration.get_or_create(&flow("client"));
    assert_eq!(duration.count(), 1);
    assert!((duration.sum() - 2.0).abs() < 1e-9);
}

#[test]
fn connection_close_header_sets_reason() {
    let (mut table, metrics) = table();
    table.handle(&conn_event(EventKind::Open, conn(role::SERVER), 1_000));
    table.handle(&turn(
        role::SERVER,
        direction::RECV,
        1,
        0,
        b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
    ));
    table.handle(&turn(
        role::SERVER,
        direction::SEND,
        1,
        0,
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
    ));
    let mut closing = conn(role::SERVER);
    closing.exchanges = 1;
    closing.closed_by = closed_by::LOCAL;
    closing.close_kind = close_kind::FIN;
    table.handle(&conn_event(EventKind::Close, closing, 5_000));
    assert_eq!(closed_count(&metrics, "server", "local", "fin", "connection_close"), 1);
}

#[test]
fn http10_and_max_requests_reasons() {
    let (mut table, metrics) = table();
    table.handle(&conn_event(EventKind::Open, conn(role::CLIENT), 1_000));
    table.handle(&turn(role::CLIENT, direction::SEND, 1, 0, b"GET / HTTP/1.0\r\n\r\n"));
    table.handle(&turn(role::CLIENT, direction::RECV, 1, 0, b"HTTP/1.0 200 OK\r\n\r\n"));
    let mut closing = conn(role::CLIENT);
    (closing.exchanges, closing.closed_by, closing.close_kind) =
        (1, closed_by::PEER, close_kind::FIN);
    table.handle(&conn_event(EventKind::Close, closing, 5_000));
    assert_eq!(closed_count(&metrics, "client", "peer", "fin", "http10"), 1);

    table.handle(&conn_event(EventKind::Open, conn(role::CLIENT), 6_000));
    for n in 1..=3 {
        table.handle(&turn(role::CLIENT, direction::SEND, n, 10, GET));
        table.handle(&turn(role::CLIENT, direction::RECV, n, 0, if n == 3 { OK_LAST } else { OK }));
    }
    closing.exchanges = 3;
    table.handle(&conn_event(EventKind::Close, closing, 9_000));
    assert_eq!(closed_count(&metrics, "client", "peer", "fin", "max_requests"), 1);
    let requests = metrics.requests.get_or_create(&flow("client"));
    assert_eq!((requests.sum(), requests.count()), (4.0, 2), "1 + 3 requests over two connections");
}

#[test]
fn resets_and_races() {
    let (mut table, metrics) = table();
    table.handle(&conn_event(EventKind::Open, conn(role::CLIENT), 1_000));
    let mut closing = conn(role::CLIENT);
    closing.exchanges = 2;
    closing.closed_by = closed_by::PEER;
    closing.close_kind = close_kind::RESET;
    closing.flags |= conn_flag::RESET_RECEIVED;
    closing.last_direction = direction::SEND;
    table.handle(&conn_event(EventKind::Close, closing, 5_000));
    assert_eq!(closed_count(&metrics, "client", "peer", "reset", "reset"), 1);
    assert_eq!(metrics.races.get_or_create(&flow("client")).get(), 1);

    // An abort with no reset on the wire (e.g. a timeout) is an error.
    table.handle(&conn_event(EventKind::Open, conn(role::CLIENT), 6_000));
    let mut aborted = conn(role::CLIENT);
    (aborted.closed_by, aborted.close_kind) = (closed_by::LOCAL, close_kind::RESET);
    table.handle(&conn_event(EventKind::Close, aborted, 7_000));
    assert_eq!(closed_count(&metrics, "client", "local", "reset", "error"), 1);
}

#[test]
fn close_without_open_counts_both_and_failed_connects_count_nothing() {
    let (mut table, metrics) = table();
    let mut server = conn(role::SERVER);
    (server.closed_by, server.close_kind) = (closed_by::PEER, close_kind::FIN);
    server.flags |= conn_flag::IDLE_AT_CLOSE;
    table.handle(&conn_event(EventKind::Close, server, 5_000));
    let opened = PlacedFlow { flow: flow("server"), placement: Placement::default() };
    assert_eq!(metrics.opened.get_or_create(&opened).get(), 1);
    assert_eq!(closed_count(&metrics, "server", "peer", "fin", "idle"), 1);
    assert_eq!(open_gauge(&metrics, "server", "idle"), 0);

    let mut failed = conn(role::CLIENT);
    failed.flags = conn_flag::ATTRIBUTED;
    table.handle(&conn_event(EventKind::Close, failed, 5_000));
    let opened = PlacedFlow { flow: flow("client"), placement: Placement::default() };
    assert_eq!(metrics.opened.get(&opened).map(|c| c.get()), None);
}

#[test]
fn turns_for_other_generations_are_ignored() {
    let (mut table, metrics) = table();
    table.handle(&conn_event(EventKind::Open, conn(role::CLIENT), 1_000));
    let Event::Turn(mut stale) = turn(role::CLIENT, direction::SEND, 1, 0, GET) else { return };
    stale.open_ns = 999;
    table.handle(&Event::Turn(stale));
    let version = HttpRequest { flow: flow("client"), http_version: "1.1".into() };
    assert_eq!(metrics.http_requests.get(&version).map(|c| c.get()), None);
}

#[test]
fn bytes_are_counted_once() {
    let (mut table, metrics) = table();
    table.handle(&conn_event(EventKind::Open, conn(role::CLIENT), 1_000));
    let Event::Turn(mut t) = turn(role::CLIENT, direction::SEND, 1, 0, GET) else { return };
    t.bytes_sent = 100;
    table.handle(&Event::Turn(t));
    let mut closing = conn(role::CLIENT);
    (closing.bytes_sent, closing.bytes_received) = (150, 70);
    (closing.closed_by, closing.close_kind) = (closed_by::LOCAL, close_kind::FIN);
    table.handle(&conn_event(EventKind::Close, closing, 2_000));
    assert_eq!(metrics.bytes_sent.get_or_create(&flow("client")).get(), 150);
    assert_eq!(metrics.bytes_received.get_or_create(&flow("client")).get(), 70);
}
