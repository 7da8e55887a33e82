//! The common tail of every send/receive backend: a transfer on a tracked (or newly
//! adopted) socket adds its bytes and is counted by the exchange rules, once, by the
//! generation that counts (takeovers: [`transfer_at_exit`]).

use core::sync::atomic::{Ordering, compiler_fence};

use connscope_common::{
    Conn, Direction, EventKind, PinSlot, Protocol, Role, conn::add_wrapping, conn_flag, is_request,
};

use crate::{
    adopt::adopt,
    exchange::{self, Transfer},
    globals::generation,
    h2,
    maps::PIN_STATE,
    payload_source::PayloadSource,
    records, sock,
    tls_calls::{self, Ciphertext},
    tls_hello, tls_plaintext,
    tracking::{active, attribute_once, process_context, tracked, turned_off},
};

/// `MSG_PEEK`: a receive that leaves the data queued moves no payload.
const MSG_PEEK: i32 = 2;

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
/// the offset, the generation decides as for every other hook. Orphaned programs
/// (`tracking::orphaned_at`) count nothing.
#[inline(always)]
pub fn transfer_at_exit(sock: u64, direction: Direction, ret: i64, recv_flags: i32) {
    // First and on its own: folded into the choice of `seq` below, Debian 11's 5.10
    // verifier refused the program (a stack slot read on a path that never wrote it).
    if turned_off() {
        return;
    }
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
    // A system call moves at most `MAX_RW_COUNT` (just under 2^31) bytes: `ret` fits.
    let bytes = u64::from(ret as u32);
    count_transfer(conn, &Transfer { sock, source: PayloadSource::Syscall, direction, bytes });
    // HTTP/2 frames, walked here, in the hook's own body (`h2::on_payload`); and an
    // undecrypted TLS connection's hellos.
    h2::walk_pending(conn);
    tls_hello::send_pending(sock, conn, direction, bytes);
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
    let transfer = Transfer {
        sock,
        source: PayloadSource::Unreadable,
        direction: missed,
        bytes: u64::from(moved),
    };
    // Decrypted TLS counts exchanges from libssl's calls (uprobes, never missed).
    add_and_count(conn, &transfer, |_, conn| {
        if conn.has(conn_flag::TLS_PLAINTEXT) { Ciphertext::Yes } else { Ciphertext::No }
    });
}

/// The stream position (`write_seq`, `copied_seq`) after the last call counted in
/// `direction` ([`transfer_at_exit`]).
#[inline(always)]
fn counted_position(conn: &mut Conn, direction: Direction) -> &mut u32 {
    if direction == Direction::Send { &mut conn.send_seq } else { &mut conn.recv_seq }
}

/// Counts a system call's `transfer` (of at least one byte) on a tracked connection.
#[inline(always)]
fn count_transfer(conn: &mut Conn, transfer: &Transfer) {
    let Transfer { sock, direction, .. } = *transfer;
    if !head_may_attribute(conn, direction) {
        attribute_once(sock, conn);
    }
    // Decrypted TLS: only `SSL_write`'s ciphertext (`tls_calls`); a close_notify asks nothing.
    if direction == Direction::Send
        && !conn.has(conn_flag::TLS_PLAINTEXT)
        && sock::sent_after_peer_close(sock, conn)
    {
        conn.flags |= conn_flag::SENT_AFTER_PEER_CLOSE;
    }
    add_and_count(conn, transfer, |sock, conn| tls_calls::ciphertext(sock, conn, direction));
}

/// Whether this transfer is the first request read of an accepted socket whose process is
/// not reported yet, in cleartext that may be HTTP/1.x: the request's head record, if one is
/// sent, carries the process (`head::send`), an `Attribute` record less per connection.
/// When none is sent (not HTTP/1.x, unreadable), the socket's next transfer or its close
/// (both in its process's context) reports the process.
#[inline(always)]
fn head_may_attribute(conn: &Conn, direction: Direction) -> bool {
    conn.role == Role::Server as u8
        && direction == Direction::Recv
        && !conn.has(conn_flag::ATTRIBUTED)
        && matches!(conn.protocol(), Protocol::Unknown | Protocol::Http1)
        && !conn.has(conn_flag::TLS_PLAINTEXT)
}

/// Adds the bytes `transfer` moved (at most `u32::MAX`) and counts them by the exchange
/// rules, unless `ciphertext` says they are TLS whose plaintext the libssl uprobes see:
/// then the exchange rules count the plaintext, here for a write's first ciphertext
/// (`tls_calls::Ciphertext::Write`), at the return for a read.
#[inline(always)]
fn add_and_count(
    conn: &mut Conn,
    transfer: &Transfer,
    ciphertext: impl FnOnce(u64, &mut Conn) -> Ciphertext,
) {
    let (sock, direction, moved) = (transfer.sock, transfer.direction, transfer.bytes as u32);
    // A response ends the wait before its bytes are counted (decrypted TLS too: the wire
    // says it left, even before libssl's call returns). The peer's FIN, processed meanwhile
    // on another CPU (`lifecycle::begin_close`), then sees no wait, or bytes acknowledged
    // beyond the count: an idle close either way.
    if conn.role().is_some_and(|role| !is_request(role, direction)) {
        exchange::end_wait(conn);
        compiler_fence(Ordering::SeqCst);
    }
    let wrapped = if direction == Direction::Send {
        add_wrapping(&mut conn.bytes_sent, moved)
    } else {
        add_wrapping(&mut conn.bytes_received, moved)
    };
    // One call of the exchange rules for both: inlined once.
    let counted = match ciphertext(sock, conn) {
        Ciphertext::No => *transfer,
        Ciphertext::Write(plaintext) => tls_plaintext::transfer(sock, direction, plaintext),
        Ciphertext::Yes => {
            if wrapped {
                records::snapshot(EventKind::Progress, sock, conn);
            }
            return;
        }
    };
    exchange::count(conn, &counted, wrapped);
}
