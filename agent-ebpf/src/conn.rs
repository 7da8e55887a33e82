//! The per-socket state machine shared by every hook backend.
//!
//! Lifecycle comes from `sock:inet_sock_set_state` (all backends); payload transfers from
//! the send/receive hooks ([`transfer`], their common tail); resets and destruction from
//! the `tcp:*` tracepoints. Process attribution (tgid, comm, cgroup) is only taken in
//! process context: in `connect()` for clients and at the first read/write/close call for
//! accepted sockets, never from a state change that may run in softirq for another task.

use core::sync::atomic::{Ordering, compiler_fence};

use connscope_common::{
    CloseKind, ClosedBy, Conn, Direction, EventKind, LostReason, PinSlot, Role,
    conn::{CLOSE_AWAITING, CLOSE_IDLE_MAX_US, add_wrapping, open_token},
    conn_flag, is_request, tcp_state,
};

use crate::{
    exchange, fill,
    globals::generation,
    maps::{
        CONN_SCRATCH, CONNECTS_IN_FLIGHT, CONNS, LISTEN_PORTS, PIN_STATE, UserBuffer, count_lost,
        submit_flags,
    },
    payload_source::PayloadSource,
    records::{self, current_attribution, now_jiffies, now_ns},
    sock::{self, BtfSocket, SocketView, state_and_port},
    tls_calls,
};

/// `BPF_NOEXIST`: insert only if the key is absent.
const NOEXIST: u64 = 1;

/// `MSG_PEEK`: a receive that leaves the data queued moves no payload.
const MSG_PEEK: i32 = 2;

/// Whether these programs are the ones that count. With pinned state two agents' programs
/// are attached during a takeover; only the generation in `PIN_STATE` runs (one array
/// lookup; none when nothing is pinned, a frozen global the verifier folds).
#[inline(always)]
fn active() -> bool {
    let generation = generation();
    generation == 0
        || PIN_STATE
            .get(PinSlot::ActiveGeneration as u32)
            .is_some_and(|active| *active == generation)
}

/// Handles `inet_sock_set_state(sk, old, new)`.
#[inline(always)]
pub fn on_state_change(sock: u64, old: i32, new: i32, view: &impl SocketView) {
    if !active() {
        return;
    }
    match (old, new) {
        // connect(): runs in the calling process, so its attribution is taken here.
        (tcp_state::CLOSE, tcp_state::SYN_SENT) if view.is_tcp() => {
            let _ = CONNECTS_IN_FLIGHT.insert(&sock, &current_attribution(), 0);
        }
        (tcp_state::SYN_SENT, tcp_state::ESTABLISHED) if view.is_tcp() => {
            track(sock, Role::Client, view)
        }
        // Accepted child socket: softirq, so no attribution until the owner touches it.
        (tcp_state::SYN_RECV, tcp_state::ESTABLISHED) if view.is_tcp() => {
            track(sock, Role::Server, view)
        }
        (tcp_state::SYN_SENT, tcp_state::CLOSE) => {
            let _ = CONNECTS_IN_FLIGHT.remove(&sock);
        }
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

/// Starts tracking an established connection and announces it.
#[inline(never)]
fn track(sock: u64, role: Role, view: &impl SocketView) {
    let open_ns = now_ns();
    // SAFETY: the attribution is copied into the record before the entry is removed.
    let owner = if role == Role::Client { unsafe { CONNECTS_IN_FLIGHT.get(&sock) } } else { None };
    let attributed = owner.is_some();
    let Some(open) = records::open(sock, open_ns, role, view, owner) else { return };
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

/// A new connection's state, built in this CPU's scratch space (a `Conn` literal would be
/// built on the small stack first) until the caller's insert copies it.
#[inline(always)]
fn new_conn(open_ns: u64, role: Role, flags: u16) -> Option<&'static mut Conn> {
    let conn = CONN_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot, zeroed in place and used only by this program.
    let conn = unsafe {
        fill::zero_words(conn);
        &mut *conn
    };
    conn.open_token = open_token(open_ns);
    conn.last_ns = open_ns;
    conn.role = role as u8;
    conn.flags = flags;
    Some(conn)
}

/// The tracked connection of `sock`.
#[inline(always)]
fn tracked(sock: u64) -> Option<&'static mut Conn> {
    let conn = CONNS.get_ptr_mut(&sock)?;
    // SAFETY: map value pointer from a successful lookup; entries are only removed by
    // `on_destroy` for the same socket, which the socket's owner serialises with us.
    Some(unsafe { &mut *conn })
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
    // the wait before it adds its bytes (`add_and_count`), so a wait still seen set means
    // these bytes are from before that send (stores and loads keep their order on x86).
    // Read the other way round, the hook could run in between: the wait seen, and the
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
    records::snapshot(EventKind::Close, sock, conn);
    let _ = CONNS.remove(&sock);
}

/// Called from any hook that runs in the owning process's context (send, receive, close).
#[inline(always)]
pub fn on_process_context(sock: u64) {
    if active() {
        process_context(sock);
    }
}

#[inline(always)]
fn process_context(sock: u64) {
    if let Some(conn) = tracked(sock) {
        attribute_once(sock, conn);
    }
}

#[inline(always)]
fn attribute_once(sock: u64, conn: &mut Conn) {
    if conn.flags & conn_flag::ATTRIBUTED == 0 {
        conn.flags |= conn_flag::ATTRIBUTED;
        records::attribute(sock, conn, &current_attribution());
    }
}

/// Common tail of every send/receive backend: `ret` is the call's return value. `is_tcp`
/// is asked only for sockets that are not tracked (hooks that also see other protocols).
#[inline(always)]
pub fn transfer(
    sock: u64,
    direction: Direction,
    ret: i64,
    recv_flags: i32,
    is_tcp: impl FnOnce() -> bool,
) {
    transfer_counted_once(sock, direction, ret, recv_flags, is_tcp, None);
}

/// A send or receive seen at `tcp_sendmsg`'s or `tcp_recvmsg`'s exit (fexit, kretprobe). A
/// kretprobe call returns through the probes that were registered when it entered, so one
/// already in progress when a new agent takes over returns only through the previous
/// generation's: those count it although no longer active. (fexit runs no program for a
/// call in flight while its trampoline is updated; see README, "Restarts".) A call both
/// generations see is counted by the first to run. Every count leaves the socket's stream
/// position after the call (`write_seq` or `copied_seq`) in `Conn::send_seq` or
/// `Conn::recv_seq`; an inactive generation skips a call whose position is already there,
/// and flags the connection when it counts one, so that the active generation makes the
/// same check once. Only then: two calls on one socket at once can leave the same
/// position, which must not cost a count outside a takeover. Without pinning, or without
/// the offset, the generation decides as for every other hook.
#[inline(always)]
pub fn transfer_at_exit(sock: u64, direction: Direction, ret: i64, recv_flags: i32) {
    let seq = if generation() == 0 { None } else { sock::stream_seq(sock, direction) };
    transfer_counted_once(sock, direction, ret, recv_flags, || true, seq);
}

/// [`transfer`], counted by the active generation only, or with `seq` (the socket's stream
/// position after the call) by any generation, once ([`transfer_at_exit`]).
/// Only the active generation adopts sockets and records process contexts.
#[inline(always)]
fn transfer_counted_once(
    sock: u64,
    direction: Direction,
    ret: i64,
    recv_flags: i32,
    is_tcp: impl FnOnce() -> bool,
    seq: Option<u32>,
) {
    let active = active();
    if !active && seq.is_none() {
        return;
    }
    if ret <= 0 || (direction == Direction::Recv && recv_flags & MSG_PEEK != 0) {
        // An error, EOF or a peek moved no payload; still a process-context touch.
        if active {
            process_context(sock);
        }
        return;
    }
    let adoptable = || active && is_tcp();
    let Some(conn) =
        tracked(sock).or_else(|| if adoptable() { adopt(sock, direction) } else { None })
    else {
        return;
    };
    if let Some(seq) = seq {
        let other_generation = conn.has(conn_flag::COUNTED_BY_OTHER_GENERATION);
        conn.flags &= !conn_flag::COUNTED_BY_OTHER_GENERATION;
        let counted = counted_position(conn, direction);
        if (!active || other_generation) && *counted == seq {
            return;
        }
        *counted = seq;
        if !active {
            conn.flags |= conn_flag::COUNTED_BY_OTHER_GENERATION;
        }
        // A call that continues the last turn may follow one in the other direction that
        // no program saw: a turn no hook counted (`recover_missed_turn`).
        if conn.last_direction == direction as u8 && last_counted_before_takeover_end(conn) {
            recover_missed_turn(sock, conn, direction);
        }
    }
    count_transfer(sock, conn, direction, ret);
}

/// Whether `conn`'s last counted transfer came before the last takeover's trampoline updates
/// were over (`PinSlot::TakeoverEndNs`).
#[inline(always)]
fn last_counted_before_takeover_end(conn: &Conn) -> bool {
    PIN_STATE.get(PinSlot::TakeoverEndNs as u32).is_some_and(|end| conn.last_ns <= *end)
}

/// Counts the transfer in the other direction than `direction` that an fexit program missed
/// during a takeover (a call in flight while its trampoline was updated runs none): the
/// socket's stream position in that direction moved past what was counted. Its bytes are
/// gone, so it counts by direction change, as an unreadable head does. A call in flight now
/// in that direction (two threads on one socket) may have moved the position: flagged, so
/// that its own exit is not counted again.
#[inline(never)]
fn recover_missed_turn(sock: u64, conn: &mut Conn, direction: Direction) {
    let missed = direction.opposite();
    let counted = counted_position(conn, missed);
    // 0: nothing counted in that direction yet, so no position to compare with.
    let Some(position) = sock::stream_seq(sock, missed).filter(|_| *counted != 0) else { return };
    let moved = position.wrapping_sub(*counted);
    if moved as i32 <= 0 {
        return;
    }
    *counted = position;
    conn.flags |= conn_flag::COUNTED_BY_OTHER_GENERATION;
    // Decrypted TLS counts exchanges from libssl's calls (uprobes, never missed).
    add_and_count(sock, conn, PayloadSource::Unreadable, missed, moved, |_, conn| {
        conn.has(conn_flag::TLS_PLAINTEXT)
    });
}

/// The stream position (`write_seq`, `copied_seq`) after the last call counted in
/// `direction` ([`transfer_at_exit`]).
#[inline(always)]
fn counted_position(conn: &mut Conn, direction: Direction) -> &mut u32 {
    if direction == Direction::Send { &mut conn.send_seq } else { &mut conn.recv_seq }
}

/// Counts `ret` (> 0) bytes moved on a tracked connection.
#[inline(always)]
fn count_transfer(sock: u64, conn: &mut Conn, direction: Direction, ret: i64) {
    attribute_once(sock, conn);
    // Decrypted TLS: only `SSL_write`'s ciphertext (`tls_calls`); a close_notify asks nothing.
    if direction == Direction::Send
        && !conn.has(conn_flag::TLS_PLAINTEXT)
        && sock::sent_after_peer_close(sock, conn)
    {
        conn.flags |= conn_flag::SENT_AFTER_PEER_CLOSE;
    }
    // A system call moves at most `MAX_RW_COUNT` (just under 2^31) bytes: `ret` fits.
    add_and_count(sock, conn, PayloadSource::Syscall, direction, ret as u32, |sock, conn| {
        tls_calls::ciphertext(sock, conn, direction)
    });
}

/// Adds `moved` bytes in `direction` and counts them by the exchange rules, unless
/// `plaintext_counted_elsewhere` (TLS whose plaintext the libssl uprobes see: exchanges are
/// counted there).
#[inline(always)]
fn add_and_count(
    sock: u64,
    conn: &mut Conn,
    source: PayloadSource,
    direction: Direction,
    moved: u32,
    plaintext_counted_elsewhere: impl FnOnce(u64, &mut Conn) -> bool,
) {
    // A response ends the wait before its bytes are counted (decrypted TLS too: the wire
    // says it left, even before libssl's call returns). The peer's FIN, processed meanwhile
    // on another CPU (`begin_close`), then sees no wait, or bytes acknowledged beyond the
    // count: an idle close either way.
    if conn.role().is_some_and(|role| !is_request(role, direction)) {
        exchange::end_wait(conn);
        compiler_fence(Ordering::SeqCst);
    }
    let wrapped = if direction == Direction::Send {
        add_wrapping(&mut conn.bytes_sent, moved)
    } else {
        add_wrapping(&mut conn.bytes_received, moved)
    };
    if plaintext_counted_elsewhere(sock, conn) {
        if wrapped {
            records::snapshot(EventKind::Progress, sock, conn);
        }
        return;
    }
    count_exchanges(sock, conn, source, direction, u64::from(moved), wrapped);
}

/// The exchange rules for `bytes` of payload readable from `source`; `report` forces a
/// `Progress` record (a byte counter's top bit flipped).
#[inline(always)]
fn count_exchanges(
    sock: u64,
    conn: &mut Conn,
    source: PayloadSource,
    direction: Direction,
    bytes: u64,
    report: bool,
) {
    let now = now_ns();
    let report = exchange::on_payload(sock, conn, source, direction, bytes, now) || report;
    conn.last_direction = direction as u8;
    conn.last_ns = now;
    if report {
        records::snapshot(EventKind::Progress, sock, conn);
    }
}

/// TLS plaintext libssl moved for `sock` (the uprobes' return probe): counted by the same
/// rules as cleartext, reading `buffer`; its bytes were counted as ciphertext. By any
/// generation: the call was finished by the one return probe that removed it from the
/// shared `TLS_CALLS` (`tls_calls::finish`), and during a takeover a call entered under the
/// old programs returns through theirs only.
#[inline(always)]
pub fn plaintext(sock: u64, direction: Direction, bytes: u64, buffer: UserBuffer) {
    let Some(conn) = tracked(sock) else { return };
    if !conn.has(conn_flag::TLS_PLAINTEXT) {
        tls_calls::to_plaintext(conn);
    }
    count_exchanges(sock, conn, PayloadSource::Buffer(buffer), direction, bytes, false);
}

/// Adopts an untracked TCP socket at its first send or receive: an established connection
/// that predates the agent (or whose `Open` was lost). Its role comes from `LISTEN_PORTS`
/// (server when its local port listens in its namespace), its process from the caller's
/// context. Payload on a socket that cannot be adopted (another state, no BTF offsets, a
/// full map) is counted as `untracked_socket` (or `map_full`). Runs once per socket: out of
/// line, so the tracked path stays small. `direction` is the call's.
#[inline(never)]
fn adopt(sock: u64, direction: Direction) -> Option<&'static mut Conn> {
    let Some((_, key)) = state_and_port(sock).filter(|(state, _)| *state == ESTABLISHED) else {
        count_lost(LostReason::UntrackedSocket);
        return None;
    };
    let role = if LISTEN_PORTS.get_ptr(&key).is_some() { Role::Server } else { Role::Client };
    let open_ns = now_ns();
    let owner = current_attribution();
    let mut open = records::open(sock, open_ns, role, &BtfSocket { sock }, Some(&owner))?;
    records::mark_adopted(&mut open);
    let Some(conn) = new_conn(open_ns, role, conn_flag::ATTRIBUTED | conn_flag::ADOPTED) else {
        open.discard(0);
        return None;
    };
    // NOEXIST: another CPU may have adopted it first; that one stands.
    if CONNS.insert(&sock, &*conn, NOEXIST).is_err() {
        open.discard(0);
        if CONNS.get_ptr(&sock).is_none() {
            count_lost(LostReason::MapFull);
        }
        return tracked(sock);
    }
    open.submit(submit_flags());
    let conn = tracked(sock)?;
    if role == Role::Server && direction == Direction::Send {
        request_read_in_flight_at_start(sock, conn);
    }
    Some(conn)
}

/// A server end adopted at its response: the receive that read its request was not seen.
/// With fexit or kretprobe receive hooks, a call already in progress when the agent
/// attached never passes through them (a server blocked waiting for its next request); on
/// any backend, a receive may end between the agent's start and its attach. When the
/// socket's last data arrived after the agent started (`PinSlot::AdoptionStartJiffies`),
/// that receive read this response's request: counted as the turn no program saw, by
/// direction change (its head is gone), so every backend reports the same exchanges.
#[inline(never)]
fn request_read_in_flight_at_start(sock: u64, conn: &mut Conn) {
    let start = PIN_STATE.get(PinSlot::AdoptionStartJiffies as u32).copied().unwrap_or(0);
    let now = now_jiffies();
    if start == 0 || now < start || !sock::data_received_within(sock, now, now - start) {
        return;
    }
    count_exchanges(sock, conn, PayloadSource::Unreadable, Direction::Recv, 0, false);
}

const ESTABLISHED: u8 = tcp_state::ESTABLISHED as u8;
