//! Pure classifiers of a closed connection: why it ended, and whether it was a keep-alive
//! race. Inputs are the kernel's final state and what the HTTP heads said.

use std::time::Duration;

use connscope_common::{CloseKind, ClosedBy, Conn, Direction, Protocol, Role, conn_flag};

use crate::{model::close_reason::CloseReason, pipeline::http_session::HttpSession};

/// On a connection whose heads were not read (undecrypted TLS), a close that starts this soon
/// after the last answer is `after_response`, not `idle`: a `Connection: close` or a client
/// done with the connection, told apart from a keep-alive timeout's close without guessing
/// a header. Keep-alive timeouts are whole seconds (nginx, Apache, Envoy, Go, Node: 1 s and
/// up), and a close on `Connection: close` follows its answer in microseconds on loopback,
/// a round trip across a network (docs/performance.md has the measured gaps). The bound is
/// one of the idle-gap histogram's, so `connection_close_idle_seconds` shows the same split.
pub const CLOSE_AFTER_RESPONSE_WITHIN: Duration = Duration::from_millis(500);

/// Why the connection ended, most specific first: an HTTP/2 `GOAWAY` (`goaway`, the
/// reason it gives), then a limit reached or an HTTP/1.0 exchange, which explain a
/// `Connection: close` too, so they come before it. An HTTP reason also explains a reset
/// once every exchange was answered (`close_kind` still says reset): a client that closes
/// at once on `Connection: close` with a TLS `close_notify` unread sends one, and a gRPC
/// client often closes so after the server's `GOAWAY`.
pub fn close_reason(conn: &Conn, http: &HttpSession, goaway: Option<CloseReason>) -> CloseReason {
    let kind = conn.close_kind();
    let answered = conn.idle_at_close();
    let announced = http.announced_close() || goaway.is_some();
    if kind == CloseKind::Reset && !(answered && announced) {
        // An abort without any reset on the wire is a timeout or error, not a reset.
        return if conn.has(conn_flag::RESET_SENT | conn_flag::RESET_RECEIVED) {
            CloseReason::Reset
        } else {
            CloseReason::Error
        };
    }
    if let Some(goaway) = goaway {
        goaway
    } else if http.limit_reached() {
        CloseReason::MaxRequests
    } else if http.http10_close {
        CloseReason::Http10
    } else if http.connection_close {
        CloseReason::ConnectionClose
    } else if conn.protocol() == Protocol::Tls && closed_right_after_answer(conn, answered) {
        CloseReason::AfterResponse
    } else if answered {
        CloseReason::Idle
    } else {
        CloseReason::Unknown
    }
}

/// Whether the close started at most [`CLOSE_AFTER_RESPONSE_WITHIN`] after the last answer.
/// The peer's FIN can arrive while this end still awaits an answer that was sent before it
/// (a server closing right after its last answer): this end then reads the answer after the
/// FIN, in stream order before it, and no longer awaits one at the end.
fn closed_right_after_answer(conn: &Conn, answered: bool) -> bool {
    if !answered {
        return conn.closed_by() == ClosedBy::Peer
            && !conn.has(conn_flag::AWAITING_RESPONSE)
            && conn.exchanges > 0;
    }
    // `<=`, as a histogram's `le` bucket counts it.
    u128::from(conn.idle_before_close_us()) <= CLOSE_AFTER_RESPONSE_WITHIN.as_micros()
}

/// A request sent on a connection the peer had started closing, or a reset from the peer
/// right after a request on a reused connection (client side); on the server side, a
/// request that arrived after the server closed an idle connection (answered by a reset).
pub fn is_keepalive_race(conn: &Conn) -> bool {
    let reused = conn.exchanges > 1;
    match conn.role() {
        Some(Role::Client) => {
            conn.has(conn_flag::SENT_AFTER_PEER_CLOSE)
                || (reused
                    && conn.closed_by() == ClosedBy::Peer
                    && conn.has(conn_flag::RESET_RECEIVED)
                    && conn.last_direction() == Direction::Send)
        }
        _ => {
            conn.closed_by() == ClosedBy::Local
                && conn.close_kind() == CloseKind::Fin
                && conn.has(conn_flag::RESET_SENT)
                && conn.exchanges >= 1
        }
    }
}

#[cfg(test)]
mod tests {
    use connscope_common::conn::CLOSE_AWAITING;

    use super::*;

    /// Closed while an exchange awaited its response.
    fn closed(role: Role, by: ClosedBy, kind: CloseKind, flags: u16) -> Conn {
        Conn {
            role: role as u8,
            closed_by: by as u8,
            flags: flags | if kind == CloseKind::Reset { conn_flag::CLOSED_BY_RESET } else { 0 },
            close_idle_us: CLOSE_AWAITING,
            exchanges: 2,
            ..Conn::default()
        }
    }

    fn idle(conn: Conn) -> Conn {
        Conn { close_idle_us: 0, ..conn }
    }

    #[test]
    fn resets_without_a_reset_on_the_wire_are_errors() {
        let http = HttpSession::default();
        let reset =
            closed(Role::Client, ClosedBy::Peer, CloseKind::Reset, conn_flag::RESET_RECEIVED);
        assert_eq!(close_reason(&reset, &http, None), CloseReason::Reset);
        let abort = closed(Role::Client, ClosedBy::Local, CloseKind::Reset, 0);
        assert_eq!(close_reason(&abort, &http, None), CloseReason::Error);
    }

    #[test]
    fn an_announced_close_explains_a_reset_after_the_last_answer() {
        let mut http = HttpSession::default();
        http.connection_close = true;
        let abort =
            idle(closed(Role::Client, ClosedBy::Local, CloseKind::Reset, conn_flag::RESET_SENT));
        assert_eq!(close_reason(&abort, &http, None), CloseReason::ConnectionClose);
        let mid_exchange =
            closed(Role::Client, ClosedBy::Local, CloseKind::Reset, conn_flag::RESET_SENT);
        assert_eq!(close_reason(&mid_exchange, &http, None), CloseReason::Reset);
        assert_eq!(close_reason(&abort, &HttpSession::default(), None), CloseReason::Reset);
    }

    #[test]
    fn http_reasons_take_precedence_over_idle() {
        let idle = idle(closed(Role::Server, ClosedBy::Local, CloseKind::Fin, 0));
        assert_eq!(close_reason(&idle, &HttpSession::default(), None), CloseReason::Idle);
        let mut http = HttpSession::default();
        http.connection_close = true;
        assert_eq!(close_reason(&idle, &http, None), CloseReason::ConnectionClose);
        http.http10_close = true;
        assert_eq!(close_reason(&idle, &http, None), CloseReason::Http10);
        http.last_advertised_max = Some(1);
        assert_eq!(close_reason(&idle, &http, None), CloseReason::MaxRequests);
        let busy = closed(Role::Server, ClosedBy::Local, CloseKind::Fin, 0);
        assert_eq!(close_reason(&busy, &HttpSession::default(), None), CloseReason::Unknown);
    }

    /// Undecrypted TLS: no header was read, so the gap before the close is all there is.
    #[test]
    fn a_ciphertext_close_right_after_an_answer_has_its_own_reason() {
        let tls = |close_idle_us| Conn {
            protocol: Protocol::Tls as u8,
            close_idle_us,
            ..closed(Role::Server, ClosedBy::Local, CloseKind::Fin, 0)
        };
        let http = HttpSession::default();
        assert_eq!(close_reason(&tls(120), &http, None), CloseReason::AfterResponse);
        assert_eq!(close_reason(&tls(500_000), &http, None), CloseReason::AfterResponse);
        assert_eq!(close_reason(&tls(500_001), &http, None), CloseReason::Idle);
        assert_eq!(close_reason(&tls(5_000_000), &http, None), CloseReason::Idle);
        // Awaiting an answer at the close: unknown, unless it arrived after the peer's FIN.
        let awaiting = Conn { flags: conn_flag::AWAITING_RESPONSE, ..tls(CLOSE_AWAITING) };
        assert_eq!(close_reason(&awaiting, &http, None), CloseReason::Unknown);
        let mut answered_late = tls(CLOSE_AWAITING);
        answered_late.role = Role::Client as u8;
        answered_late.closed_by = ClosedBy::Peer as u8;
        assert_eq!(close_reason(&answered_late, &http, None), CloseReason::AfterResponse);
        answered_late.flags |= conn_flag::AWAITING_RESPONSE;
        assert_eq!(close_reason(&answered_late, &http, None), CloseReason::Unknown);
        // Read heads say more than a gap: plaintext keeps `idle` for a quick close.
        let plain = Conn { protocol: Protocol::Http1 as u8, ..tls(120) };
        assert_eq!(close_reason(&plain, &http, None), CloseReason::Idle);
    }

    #[test]
    fn a_goaway_names_the_close_and_explains_a_reset_after_the_last_answer() {
        use crate::model::close_reason::{GoAwayBy, GoAwayCode};
        let http = HttpSession::default();
        let graceful = CloseReason::GoAway(GoAwayBy::Server, GoAwayCode::Graceful);
        let server = Some(graceful);
        let quiet = idle(closed(Role::Client, ClosedBy::Local, CloseKind::Fin, 0));
        assert_eq!(close_reason(&quiet, &http, server), graceful);
        let reset =
            idle(closed(Role::Client, ClosedBy::Local, CloseKind::Reset, conn_flag::RESET_SENT));
        assert_eq!(close_reason(&reset, &http, server), graceful);
        let busy = closed(Role::Client, ClosedBy::Local, CloseKind::Reset, conn_flag::RESET_SENT);
        assert_eq!(close_reason(&busy, &http, server), CloseReason::Reset);
    }

    #[test]
    fn races() {
        let late =
            closed(Role::Client, ClosedBy::Peer, CloseKind::Fin, conn_flag::SENT_AFTER_PEER_CLOSE);
        assert!(is_keepalive_race(&late));
        let mut reset =
            closed(Role::Client, ClosedBy::Peer, CloseKind::Reset, conn_flag::RESET_RECEIVED);
        reset.last_direction = Direction::Send as u8;
        assert!(is_keepalive_race(&reset));
        reset.exchanges = 1;
        assert!(!is_keepalive_race(&reset), "a first request is not a reuse race");
        let server = closed(Role::Server, ClosedBy::Local, CloseKind::Fin, conn_flag::RESET_SENT);
        assert!(is_keepalive_race(&server));
        let idle = closed(Role::Server, ClosedBy::Local, CloseKind::Fin, 0);
        assert!(!is_keepalive_race(&idle));
    }
}
