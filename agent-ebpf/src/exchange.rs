//! Exchange counting: which transfers start a request, with the HTTP/1.x and TLS framing
//! rules that need a look at the payload, and the idle gaps between exchanges.
//!
//! A change of direction from response to request starts an exchange (protocol-agnostic, so
//! Redis or PostgreSQL get reuse figures too), except:
//! - on HTTP/1.x, a request-direction turn that does not start with a request line is the
//!   body of the current request: after a `1xx` interim response (`100 Continue`, RFC 9110
//!   §15.2), or after a final response the server sent before reading the whole body
//!   (RFC 9110 §10.1.1 lets it; nginx does for `return`). The next request line, even
//!   within that turn, starts the next exchange;
//! - after `101 Switching Protocols`, frames are not HTTP requests;
//! - on undecrypted TLS, handshake records and alerts are not requests: an exchange starts
//!   at the first application-data record of a request-direction turn
//!   (`head::tls_carries_request`).
//!
//! Heads are read only on HTTP/1.x connections, and there only when a turn's length differs
//! from the last head's (`steady_repeat`); besides, once to tell what a connection speaks,
//! and on undecrypted TLS once per direction, for the hello's ALPN (`tls_hello`).
//! HTTP/2 connections count streams instead of turns, from their frame headers (`h2`).

use connscope_common::{
    Conn, Direction, EventKind, HeadContent, Protocol,
    conn::{PROGRESS_AFTER_IDLE_NS, add_wrapping, gap_bucket},
    conn_flag, is_request, tls_record,
};

use crate::{
    h2,
    head::{self, Status},
    payload_source::PayloadSource,
    records::{self, now_ns},
};

/// While set, every request-direction transfer is looked at (TLS: record headers; HTTP/1.x:
/// its first four bytes) until the request starts.
const REQUEST_PENDING: u16 = conn_flag::REQUEST_PENDING;

/// What a send or receive passes along: its socket, the bytes it moved in `direction`, and
/// where they can be read. Borrowed down the transfer path (`transfer`, the heads' rules).
#[derive(Clone, Copy)]
pub struct Transfer {
    pub sock: u64,
    pub source: PayloadSource,
    pub direction: Direction,
    pub bytes: u64,
}

/// Counts `transfer` by the exchange rules; `report` forces a `Progress` record (a byte
/// counter's top bit flipped).
#[inline(always)]
pub fn count(conn: &mut Conn, transfer: &Transfer, mut report: bool) {
    // Undecrypted TLS: a whole alert record is the `close_notify` a side writes as it closes.
    // It asks and answers nothing, and the idle time before the close is measured from the
    // last exchange, not from it (the close starts right after it).
    let close_notify =
        conn.protocol == Protocol::Tls as u8 && tls_record::is_alert_record_len(transfer.bytes);
    if !close_notify {
        let now = now_ns();
        report |= on_payload(conn, transfer, now);
        conn.last_direction = transfer.direction as u8;
        // HTTP/2's activity is its streams' (`h2`).
        if conn.protocol != Protocol::Http2 as u8 {
            conn.last_ns = now;
        }
    }
    if report {
        records::snapshot(EventKind::Progress, transfer.sock, conn);
    }
}

/// Updates the exchange state for `transfer` at `now` (before `last_ns` and
/// `last_direction` are updated). Returns whether the agent must get a snapshot now.
#[inline(always)]
fn on_payload(conn: &mut Conn, transfer: &Transfer, now: u64) -> bool {
    let report =
        if conn.protocol == Protocol::Http2 as u8 { false } else { by_turns(conn, transfer, now) };
    // HTTP/2 known before this transfer, or sniffed in it (`request_payload` made its
    // state): its frames are walked once the hook counted the transfer (`h2`).
    if conn.protocol == Protocol::Http2 as u8 {
        h2::on_payload(conn, transfer);
    }
    report
}

/// [`on_payload`] by direction changes and heads: every protocol but HTTP/2.
#[inline(always)]
fn by_turns(conn: &mut Conn, transfer: &Transfer, now: u64) -> bool {
    let Some(role) = conn.role() else { return false };
    let direction = transfer.direction;
    let turn_start = conn.last_direction != direction as u8;
    // A connection quiet for a while may have dropped out of the agent's sweeps.
    let idle_restart = turn_start && now.saturating_sub(conn.last_ns) >= PROGRESS_AFTER_IDLE_NS;
    if conn.has(conn_flag::UPGRADED) {
        return idle_restart;
    }
    let wrapped = if is_request(role, direction) {
        request_payload(conn, transfer, now, turn_start)
    } else {
        end_wait(conn);
        response_payload(conn, transfer, now, turn_start);
        false
    };
    wrapped || idle_restart
}

/// A response moved: no exchange awaits it any more.
#[inline(always)]
pub fn end_wait(conn: &mut Conn) {
    conn.flags &= !conn_flag::AWAITING_RESPONSE;
}

#[inline(always)]
fn request_payload(conn: &mut Conn, transfer: &Transfer, now: u64, turn_start: bool) -> bool {
    let Transfer { sock, source, direction, bytes } = *transfer;
    let protocol = conn.protocol();
    let pending = conn.has(REQUEST_PENDING);
    if !turn_start && !pending {
        return false;
    }
    if protocol == Protocol::Tls {
        if !head::tls_carries_request(source, direction, bytes) {
            conn.flags |= REQUEST_PENDING;
            return false;
        }
        conn.flags &= !REQUEST_PENDING;
        return new_exchange(conn, now);
    }
    // Only HTTP/1.x and TLS set `REQUEST_PENDING`: other protocols get here at turn starts.
    if protocol != Protocol::Http1 && protocol != Protocol::Unknown {
        return new_exchange(conn, now);
    }
    if turn_start && !pending && steady_repeat(conn, conn.request_len, bytes) {
        return new_exchange(conn, now);
    }
    // A request-direction transfer ends any interim response.
    conn.flags &= !conn_flag::INTERIM;
    let head = if turn_start {
        head::read(source, direction, bytes)
    } else {
        // Inside a request body: only a request line matters.
        let head = head::read_request(source, direction, bytes);
        if head.is_none() {
            return false;
        }
        head
    };
    if protocol == Protocol::Http1 {
        if head.as_ref().is_some_and(|head| !head::starts_request(head)) {
            // The request's body (after `100 Continue` or an early response): the same
            // exchange. An unreadable head still counts, by direction change.
            conn.flags |= REQUEST_PENDING;
            return false;
        }
        conn.flags &= !REQUEST_PENDING;
    }
    if protocol == Protocol::Unknown {
        if let Some(head) = head.as_ref() {
            conn.protocol = head::sniff_request(head) as u8;
        }
        if conn.protocol == Protocol::Tls as u8 {
            // The first flight is a ClientHello: the request comes after the handshake. The
            // hellos are sent for their ALPN once the transfer is counted (`tls_hello`).
            conn.flags |= REQUEST_PENDING
                | conn_flag::HELLO_PENDING_REQUEST
                | conn_flag::HELLO_PENDING_RESPONSE;
            return false;
        }
        if conn.protocol == Protocol::Http2 as u8 {
            h2::start(conn, sock);
            return false;
        }
    }
    let report = new_exchange(conn, now);
    if let Some(head) = head {
        if conn.protocol == Protocol::Http1 as u8 {
            let sent = head::send(sock, conn, head, true, HeadContent::Http, now);
            conn.request_len = if sent { kept_len(bytes) } else { 0 };
        }
    }
    report
}

#[inline(always)]
fn response_payload(conn: &mut Conn, transfer: &Transfer, now: u64, turn_start: bool) {
    let Transfer { sock, source, direction, bytes } = *transfer;
    let protocol = conn.protocol();
    if protocol != Protocol::Http1 && protocol != Protocol::Unknown {
        return;
    }
    // Inside a response only the write after an interim one can start a new head.
    if !turn_start && !conn.has(conn_flag::INTERIM) {
        return;
    }
    if turn_start && steady_repeat(conn, conn.response_len, bytes) {
        return;
    }
    let Some(head) = head::read(source, direction, bytes) else { return };
    let Some(status) = head::status(head) else {
        // A response that is not HTTP/1.x (or a server that speaks first). An HTTP/2
        // server may send its SETTINGS before it reads the client's preface, which decides.
        if protocol == Protocol::Unknown
            && !conn.has(conn_flag::TLS_PLAINTEXT)
            && !head::starts_h2_settings(head)
        {
            conn.protocol = Protocol::Other as u8;
        }
        return;
    };
    conn.protocol = Protocol::Http1 as u8;
    match status {
        Status::Interim => conn.flags |= conn_flag::INTERIM,
        Status::SwitchingProtocols => {
            conn.flags = (conn.flags & !conn_flag::INTERIM) | conn_flag::UPGRADED;
            conn.protocol = Protocol::WebSocket as u8;
            // Always sent: the agent reads which protocol it became.
            head::send(sock, conn, head, false, HeadContent::Http, now);
        }
        Status::Final => {
            conn.flags &= !conn_flag::INTERIM;
            let sent = head::send(sock, conn, head, false, HeadContent::Http, now);
            conn.response_len = if sent { kept_len(bytes) } else { 0 };
        }
    }
}

/// Whether a turn on an HTTP/1.x connection repeats the last head read in its direction:
/// it moves as many bytes as the transfer that head came in (`last_len`), and no interim
/// response is in progress. Steady keep-alive traffic (the same request, the same
/// response) then costs no read of user memory at all. The heads that change a metric
/// change their transfer's length: `Connection: close` for `keep-alive`, a `Keep-Alive`
/// parameter, an interim or `101` status, a pipelined second request, another body size.
/// The exception would be a head that changes one of those while keeping its length
/// exactly (a header of the same size dropped in exchange); its exchange is still
/// counted, with the previous head's version and keep-alive terms.
#[inline(always)]
fn steady_repeat(conn: &Conn, last_len: u16, bytes: u64) -> bool {
    conn.protocol == Protocol::Http1 as u8
        && last_len != 0
        && u64::from(last_len) == bytes
        && !conn.has(conn_flag::INTERIM)
}

/// A head's transfer length as [`Conn::request_len`] keeps it: 0 (read the next head) past
/// what 16 bits hold.
#[inline(always)]
fn kept_len(bytes: u64) -> u16 {
    u16::try_from(bytes).unwrap_or(0)
}

/// Counts a new exchange and its idle gap since the previous transfer. Returns whether a
/// gap bucket count must be reported (`GapCounts::add`).
#[inline(always)]
fn new_exchange(conn: &mut Conn, now: u64) -> bool {
    conn.exchanges += 1;
    conn.flags |= conn_flag::AWAITING_RESPONSE;
    if conn.exchanges == 1 {
        return false;
    }
    count_gap(conn, now)
}

/// Counts the idle gap from the last activity (`last_ns`) to `now`. Returns whether a gap
/// bucket count must be reported.
#[inline(always)]
pub fn count_gap(conn: &mut Conn, now: u64) -> bool {
    let gap = now.saturating_sub(conn.last_ns);
    let sum_wrapped = add_wrapping(&mut conn.gap_sum_us, (gap / 1000) as u32);
    conn.gaps.add(gap_bucket(gap)) || sum_wrapped
}
