//! A connection's life: its open (from `sock:inet_sock_set_state`, all backends) with the
//! time its connect took, a connect that failed, listeners counted by port, its close (FIN
//! or reset, local or peer; from the state changes and the `tcp:*` reset tracepoints) and
//! the destruction that sends its final state.

use core::sync::atomic::{Ordering, compiler_fence};

use connscope_common::{
    CloseKind, ClosedBy, Conn, ConnectFailure, ConnectInFlight, Direction, EventKind, LostReason,
    Protocol, Role,
    conn::{CLOSE_AWAITING, CLOSE_IDLE_MAX_US},
    conn_flag, is_request, tcp_state,
};

use crate::{
    h2,
    maps::{CONNECTS_IN_FLIGHT, CONNS, LISTEN_PORTS, count_lost, submit_flags},
    records::{self, current_attribution, now_ns},
    sock::{self, SocketView},
    tracking::{NOEXIST, active, new_conn, orphaned_at, tracked},
};

/// Handles `inet_sock_set_state(sk, old, new)`.
#[inline(always)]
pub fn on_state_change(sock: u64, old: i32, new: i32, view: &impl SocketView) {
    if !active() {
        return;
    }
    match (old, new) {
        // connect(): runs in the calling process, so its attribution is taken here, and
        // the handshake starts (`tcp_v4_connect` enters SYN_SENT just before the SYN).
        (tcp_state::CLOSE, tcp_state::SYN_SENT) if view.is_tcp() => {
            let pending = ConnectInFlight { owner: current_attribution(), syn_ns: now_ns() };
            let _ = CONNECTS_IN_FLIGHT.insert(&sock, &pending, 0);
        }
        (tcp_state::SYN_SENT, tcp_state::ESTABLISHED) if view.is_tcp() => {
            track(sock, Role::Client, view)
        }
        // Accepted child socket: softirq, so no attribution until the owner touches it.
        (tcp_state::SYN_RECV, tcp_state::ESTABLISHED) if view.is_tcp() => {
            track(sock, Role::Server, view)
        }
        // A connect that failed or was given up.
        (tcp_state::SYN_SENT, tcp_state::CLOSE) if view.is_tcp() => connect_failed(sock, view),
        // listen() (inet_csk_listen_start) and the close of a listener.
        (tcp_state::CLOSE, tcp_state::LISTEN) if view.is_tcp() => listening(view, true),
        (tcp_state::LISTEN, tcp_state::CLOSE) if view.is_tcp() => listening(view, false),
        (_, tcp_state::FIN_WAIT1) => close_started(sock, ClosedBy::Local, CloseKind::Fin),
        (_, tcp_state::CLOSE_WAIT) => close_started(sock, ClosedBy::Peer, CloseKind::Fin),
        // The end of a FIN teardown: its close was recorded on entering FIN_WAIT1 or
        // CLOSE_WAIT (and a reset since, by `on_reset`), so no lookup is needed.
        (
            tcp_state::FIN_WAIT1
            | tcp_state::FIN_WAIT2
            | tcp_state::CLOSING
            | tcp_state::TIME_WAIT
            | tcp_state::CLOSE_WAIT
            | tcp_state::LAST_ACK,
            tcp_state::CLOSE,
        ) => {}
        // A jump to CLOSE with no FIN exchanged is an abort: a reset from the peer was
        // recorded just before by `on_reset`; otherwise the local side aborted (SO_LINGER
        // 0, unread data at close, or a timeout), and its reset follows.
        (_, tcp_state::CLOSE) => close_started(sock, ClosedBy::Local, CloseKind::Reset),
        _ => {}
    }
}

/// Counts a listening socket of a {namespace, port} in or out. Not atomic: two listeners
/// of one port changing state at the same instant on two CPUs may miscount by one.
/// Out of line, like `track`: the state-change program's own frame stays small, since
/// kernels before 6.13 allow 512 bytes of stack for a whole call chain.
#[inline(never)]
fn listening(view: &impl SocketView, started: bool) {
    let Some(key) = view.listen_key() else { return };
    match LISTEN_PORTS.get_ptr_mut(&key) {
        // SAFETY (both): map value pointer from a successful lookup.
        Some(count) if started => unsafe { *count += 1 },
        Some(count) if unsafe { *count } > 1 => unsafe { *count -= 1 },
        Some(_) => {
            let _ = LISTEN_PORTS.remove(&key);
        }
        None if started => {
            let _ = LISTEN_PORTS.insert(&key, &1, NOEXIST);
        }
        None => {}
    }
}

/// Announces a client socket's failed connect and forgets the connect.
#[inline(never)]
fn connect_failed(sock: u64, view: &impl SocketView) {
    // SAFETY: the attribution is copied into the record before the entry is removed.
    let pending = unsafe { CONNECTS_IN_FLIGHT.get(&sock) };
    let reason = ConnectFailure::of(sock::socket_error(sock), view.source_port());
    records::connect_failed(sock, view, pending.map(|p| &p.owner), reason);
    if pending.is_some() {
        let _ = CONNECTS_IN_FLIGHT.remove(&sock);
    }
}

/// Starts tracking an established connection and announces it, with a client's connect
/// time.
#[inline(never)]
fn track(sock: u64, role: Role, view: &impl SocketView) {
    let open_ns = now_ns();
    if orphaned_at(open_ns) {
        return;
    }
    // SAFETY: the attribution is copied into the record before the entry is removed.
    let pending =
        if role == Role::Client { unsafe { CONNECTS_IN_FLIGHT.get(&sock) } } else { None };
    let attributed = pending.is_some();
    let connect_ns = pending.map_or(0, |p| open_ns.saturating_sub(p.syn_ns));
    let owner = pending.map(|p| &p.owner);
    let Some(open) = records::open(sock, open_ns, role, view, owner, connect_ns) else { return };
    if attributed {
        let _ = CONNECTS_IN_FLIGHT.remove(&sock);
    }
    let flags = if attributed { conn_flag::ATTRIBUTED } else { 0 };
    let Some(conn) = new_conn(open_ns, role, flags) else {
        open.discard(0);
        return;
    };
    // BPF_ANY: a stale entry left by a socket whose destruction we missed is replaced.
    if CONNS.insert(&sock, &*conn, 0).is_err() {
        count_lost(LostReason::MapFull);
        open.discard(0);
        return;
    }
    open.submit(submit_flags());
}

fn close_started(sock: u64, by: ClosedBy, kind: CloseKind) {
    if let Some(conn) = tracked(sock) {
        begin_close(sock, conn, by, kind);
    }
}

/// Records the first close of a connection: who, how, and how long it had been idle.
#[inline(always)]
fn begin_close(sock: u64, conn: &mut Conn, by: ClosedBy, kind: CloseKind) {
    if conn.closed_by != ClosedBy::Unknown as u8 {
        return;
    }
    conn.closed_by = by as u8;
    if kind == CloseKind::Reset {
        conn.flags |= conn_flag::CLOSED_BY_RESET;
    }
    let idle_us = (now_ns().saturating_sub(conn.last_ns) / 1000).min(CLOSE_IDLE_MAX_US.into());
    // The bytes counted so far are read before the wait: a send hook on another CPU ends
    // the wait before it adds its bytes (`transfer::add_and_count`), so a wait still seen
    // set means these bytes are from before that send (stores and loads keep their order on
    // x86). Read the other way round, the hook could run in between: the wait seen, and the
    // response's bytes counted already, so none would look unacknowledged.
    let bytes_sent = conn.bytes_sent;
    compiler_fence(Ordering::SeqCst);
    // Idle when no exchange waits for its response.
    let waiting = conn.flags & conn_flag::AWAITING_RESPONSE != 0
        && !(by == ClosedBy::Peer && response_read_before_its_hook(sock, conn, bytes_sent));
    conn.close_idle_us = idle_us as u32 | if waiting { CLOSE_AWAITING } else { 0 };
}

/// At the peer's FIN while an exchange awaits its response: whether this end (the one that
/// responds) had sent bytes the peer acknowledged beyond `bytes_sent`, those the send hooks
/// had counted. The hooks run at a send's end, and on loopback the peer can read the
/// response and close before then: it closed an idle connection. Adopted connections
/// counted their bytes from adoption, not from the start as the kernel does: never.
#[inline(never)]
fn response_read_before_its_hook(sock: u64, conn: &Conn, bytes_sent: u32) -> bool {
    let responder = conn.role().is_some_and(|role| !is_request(role, Direction::Send));
    responder
        && !conn.has(conn_flag::ADOPTED)
        && sock::bytes_acknowledged(sock)
            .is_some_and(|acked| (acked.wrapping_sub(bytes_sent) as i32) > 0)
}

/// Handles `tcp_send_reset` (`by` local) and `tcp_receive_reset` (`by` peer).
#[inline(always)]
pub fn on_reset(sock: u64, by: ClosedBy) {
    if !active() {
        return;
    }
    let Some(conn) = tracked(sock) else { return };
    conn.flags |=
        if by == ClosedBy::Local { conn_flag::RESET_SENT } else { conn_flag::RESET_RECEIVED };
    begin_close(sock, conn, by, CloseKind::Reset);
}

/// Handles the destruction of a socket: sends its final state and forgets it.
#[inline(always)]
pub fn on_destroy(sock: u64) {
    if !active() {
        return;
    }
    let Some(conn) = tracked(sock) else { return };
    if conn.protocol == Protocol::Http2 as u8 {
        h2::close(sock, conn, now_ns());
    }
    records::snapshot(EventKind::Close, sock, conn);
    let _ = CONNS.remove(&sock);
}
