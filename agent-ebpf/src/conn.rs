//! The per-socket state machine shared by every hook backend.
//!
//! Lifecycle comes from `sock:inet_sock_set_state` (all backends); payload transfers come
//! from the send/receive hooks; resets and destruction from the `tcp:*` tracepoints.
//! Process attribution (tgid, comm, cgroup) is only taken in process context: in
//! `connect()` for clients and at the first read/write/close call for accepted sockets,
//! never from a state change that may run in softirq on behalf of another task.

use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
};
use connscope_common::{
    Conn, ConnEvent, Endpoints, EventHeader, EventKind, HEAD_LEN, LostReason, TURN_FIXED_LEN,
    TurnEvent, close_kind, closed_by, conn_flag, direction, role, tcp_state,
};

use crate::{
    maps::{CONN_SCRATCH, CONNS, EVENTS, TURN_SCRATCH, count_lost, submit_flags},
    payload::{self, PendingPayload},
};

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// Handles `inet_sock_set_state(sk, old, new)` for a TCP socket.
#[inline(always)]
pub fn on_state_change(sock: u64, old: i32, new: i32, endpoints: &Endpoints) {
    match (old, new) {
        // connect(): runs in the calling process, so attribution is safe here.
        (tcp_state::CLOSE, tcp_state::SYN_SENT) => track(sock, role::CLIENT, endpoints, true),
        (tcp_state::SYN_SENT, tcp_state::ESTABLISHED) => client_established(sock),
        // Accepted child socket: softirq, so no attribution until the owner touches it.
        (tcp_state::SYN_RECV, tcp_state::ESTABLISHED) => {
            track(sock, role::SERVER, endpoints, false)
        }
        (_, tcp_state::FIN_WAIT1) => start_close(sock, closed_by::LOCAL, close_kind::FIN),
        (_, tcp_state::CLOSE_WAIT) => start_close(sock, closed_by::PEER, close_kind::FIN),
        // A jump to CLOSE with no FIN exchanged is an abort: a reset from the peer was
        // recorded just before by `on_reset`; otherwise the local side aborted
        // (SO_LINGER 0, unread data at close, or a timeout), and its reset follows.
        (_, tcp_state::CLOSE) => start_close(sock, closed_by::LOCAL, close_kind::RESET),
        _ => {}
    }
}

fn track(sock: u64, conn_role: u8, endpoints: &Endpoints, attribute_now: bool) {
    let Some(conn) = CONN_SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's scratch slot, used only until the insert below copies it.
    let conn = unsafe { &mut *conn };
    let now = now_ns();
    *conn = Conn::default();
    conn.open_ns = now;
    conn.role = conn_role;
    conn.endpoints = *endpoints;
    if conn_role == role::SERVER {
        conn.established_ns = now;
        conn.flags = conn_flag::ESTABLISHED;
    }
    if attribute_now {
        attribute_fields(conn);
    }
    // BPF_ANY: a stale entry left by a socket whose destruction we missed is replaced.
    if CONNS.insert(sock, &*conn, 0).is_err() {
        count_lost(LostReason::MapFull);
    }
}

fn client_established(sock: u64) {
    let Some(conn) = CONNS.get_ptr_mut(sock) else { return };
    // SAFETY: map value pointer from a successful lookup; entries are only removed by
    // `on_destroy` for the same socket, which the socket lock serialises with us.
    let conn = unsafe { &mut *conn };
    conn.flags |= conn_flag::ESTABLISHED;
    conn.established_ns = now_ns();
    announce_if_ready(sock, conn);
}

fn start_close(sock: u64, by: u8, kind: u8) {
    let Some(conn) = CONNS.get_ptr_mut(sock) else { return };
    // SAFETY: as in `client_established`.
    let conn = unsafe { &mut *conn };
    if conn.closed_by == closed_by::UNKNOWN && conn.flags & conn_flag::ESTABLISHED != 0 {
        conn.closed_by = by;
        conn.close_kind = kind;
        conn.close_start_ns = now_ns();
        mark_idle_at_close(conn);
    }
}

/// Idle when the last payload was a response (client received, server sent) or none moved.
fn mark_idle_at_close(conn: &mut Conn) {
    let response_dir = if conn.role == role::CLIENT { direction::RECV } else { direction::SEND };
    if conn.last_direction == direction::NONE || conn.last_direction == response_dir {
        conn.flags |= conn_flag::IDLE_AT_CLOSE;
    }
}

/// Handles `tcp_send_reset` (`sent`) and `tcp_receive_reset`.
#[inline(always)]
pub fn on_reset(sock: u64, sent: bool) {
    let Some(conn) = CONNS.get_ptr_mut(sock) else { return };
    // SAFETY: as in `client_established`.
    let conn = unsafe { &mut *conn };
    conn.flags |= if sent { conn_flag::RESET_SENT } else { conn_flag::RESET_RECEIVED };
    if conn.closed_by == closed_by::UNKNOWN && conn.flags & conn_flag::ESTABLISHED != 0 {
        conn.closed_by = if sent { closed_by::LOCAL } else { closed_by::PEER };
        conn.close_kind = close_kind::RESET;
        conn.close_start_ns = now_ns();
        mark_idle_at_close(conn);
    }
}

/// Handles the destruction of a socket: emits its final state and forgets it.
#[inline(always)]
pub fn on_destroy(sock: u64) {
    let Some(conn) = CONNS.get_ptr(sock) else { return };
    // SAFETY: as in `client_established`; the record is written before the entry is removed.
    emit_conn(EventKind::Close, sock, unsafe { &*conn });
    let _ = CONNS.remove(sock);
}

/// Called from any hook that runs in the owning process's context (send, receive, close).
#[inline(always)]
pub fn on_process_context(sock: u64) {
    let Some(conn) = CONNS.get_ptr_mut(sock) else { return };
    // SAFETY: as in `client_established`.
    let conn = unsafe { &mut *conn };
    if conn.flags & conn_flag::ATTRIBUTED == 0 {
        attribute_fields(conn);
        announce_if_ready(sock, conn);
    }
}

/// Handles `bytes` of payload moved by a send (`direction::SEND`) or receive call.
/// A change of direction starts a new turn, reported with the first bytes of its payload.
#[inline(always)]
pub fn on_transfer(sock: u64, dir: u8, bytes: u64) {
    let Some(conn) = CONNS.get_ptr_mut(sock) else {
        count_lost(LostReason::UntrackedSocket);
        return;
    };
    // SAFETY: as in `client_established`.
    let conn = unsafe { &mut *conn };
    if conn.flags & conn_flag::ATTRIBUTED == 0 {
        attribute_fields(conn);
        announce_if_ready(sock, conn);
    }
    let now = now_ns();
    if dir == direction::SEND {
        conn.bytes_sent += bytes;
        if conn.closed_by == closed_by::PEER {
            conn.flags |= conn_flag::SENT_AFTER_PEER_CLOSE;
        }
    } else {
        conn.bytes_received += bytes;
    }
    if conn.last_direction != dir {
        let is_request = (conn.role == role::CLIENT) == (dir == direction::SEND);
        if is_request {
            conn.exchanges += 1;
        }
        let previous_other =
            if dir == direction::SEND { conn.last_recv_ns } else { conn.last_send_ns };
        let gap_ns = if previous_other == 0 { 0 } else { now - previous_other };
        conn.last_direction = dir;
        // Only a turn start reads the stashed buffer; the syscall's exit drops it otherwise.
        emit_turn(sock, conn, now, gap_ns, dir, bytes, payload::take());
    }
    if dir == direction::SEND {
        conn.last_send_ns = now;
    } else {
        conn.last_recv_ns = now;
    }
}

fn attribute_fields(conn: &mut Conn) {
    conn.tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    conn.comm = bpf_get_current_comm().unwrap_or_default();
    // SAFETY: helper without pointer arguments.
    conn.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    conn.flags |= conn_flag::ATTRIBUTED;
}

fn announce_if_ready(sock: u64, conn: &mut Conn) {
    let ready = conn_flag::ESTABLISHED | conn_flag::ATTRIBUTED;
    if conn.flags & ready == ready && conn.flags & conn_flag::ANNOUNCED == 0 {
        conn.flags |= conn_flag::ANNOUNCED;
        emit_conn(EventKind::Open, sock, conn);
    }
}

fn emit_conn(kind: EventKind, sock: u64, conn: &Conn) {
    let Some(mut entry) = EVENTS.reserve::<ConnEvent>(0) else {
        count_lost(LostReason::RingbufFull);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: a reserved, exclusively owned record of the right size; both fields are
    // written in place (no copy of the whole event on the stack).
    unsafe {
        (*event).header = EventHeader { kind: kind as u32, _pad: 0, sock, ts_ns: now_ns() };
        core::ptr::copy_nonoverlapping(conn, &raw mut (*event).conn, 1);
    }
    entry.submit(submit_flags());
}

#[inline(always)]
fn emit_turn(
    sock: u64,
    conn: &Conn,
    now: u64,
    gap_ns: u64,
    dir: u8,
    bytes: u64,
    pending: Option<PendingPayload>,
) {
    let Some(event) = TURN_SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's scratch slot; programs do not migrate CPUs while running, and the
    // record is copied into the ring buffer before the program ends.
    let event = unsafe { &mut *event };
    event.header = EventHeader { kind: EventKind::Turn as u32, _pad: 0, sock, ts_ns: now };
    event.open_ns = conn.open_ns;
    event.gap_ns = gap_ns;
    event.bytes_sent = conn.bytes_sent;
    event.bytes_received = conn.bytes_received;
    event.exchanges = conn.exchanges;
    event.tgid = conn.tgid;
    event.direction = dir;
    event.role = conn.role;
    event._pad = [0; 2];
    event.comm = conn.comm;
    let want = if bytes < HEAD_LEN as u64 { bytes as usize } else { HEAD_LEN };
    let head_len = match pending {
        Some(pending) => {
            payload::read_head(pending.buf, pending.len.min(want as u64), &mut event.head)
        }
        None => 0,
    };
    event.head_len = head_len;
    let len = TURN_FIXED_LEN + (head_len as usize).min(HEAD_LEN);
    // SAFETY: `len` is at most the size of the scratch record.
    let record =
        unsafe { core::slice::from_raw_parts((event as *const TurnEvent).cast::<u8>(), len) };
    if EVENTS.output::<[u8]>(record, submit_flags()).is_err() {
        count_lost(LostReason::RingbufFull);
    }
}
