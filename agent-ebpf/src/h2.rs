//! HTTP/2 connections: every transfer's frame headers are walked
//! (`connscope_common::h2_frames`, with the state in `H2_CONNS`) so that the streams the
//! client opened are the connection's exchanges, an exchange's idle gap is a time with no
//! stream open, and the first `GOAWAY` is known at the close. Only frame headers and a
//! `GOAWAY`'s code are read; HPACK blocks and bodies never are.

use aya_ebpf::helpers::{bpf_probe_read_kernel, generated};
use connscope_common::{
    Conn, Direction, EventHeader, EventKind, Http2CloseEvent, LostReason, Protocol, Role,
    conn::PROGRESS_AFTER_IDLE_NS,
    conn_flag,
    h2_frames::{
        FRAME_HEADER, FrameBytes, H2State, H2Streams, Lost, MAX_SEGMENTS, MAX_STEPS_PER_TRANSFER,
        Step, StreamChange, Unit, pass_unread, step,
    },
    is_request,
};

use crate::{
    exchange::{Transfer, count_gap},
    fill,
    maps::{CONNS, EVENTS, H2_CONNS, H2_CURSOR, H2_SCRATCH, UserBuffer, count_lost, submit_flags},
    records::{self, now_ns},
    syscall_args::{IOVEC_SIZE, Segments, read_iovec},
};

impl FrameBytes for UserBuffer {
    #[inline(always)]
    fn read_into(&self, offset: u64, len: u64, out: &mut [u8; FRAME_HEADER]) -> bool {
        read_short(self.addr + offset, len, out)
    }
}

/// Reads `len` (1 to 9) bytes of user memory at `addr` into the front of `dst` (map
/// memory: `H2_CURSOR`). Out of line with its arguments by value, as `head::read_bytes`:
/// the bound must be checked right before the helper call for older verifiers.
#[inline(never)]
fn read_short(addr: u64, len: u64, dst: &mut [u8; FRAME_HEADER]) -> bool {
    // The size a helper reads must be known exactly, and the verifier would trace that
    // back through the walk's offsets: every state of the frame loop would then differ by
    // their ranges, and none could be pruned. Copied through a helper, it is a value of
    // its own, bounded below.
    // SAFETY: reading a local through the fault-tolerant helper.
    let Ok(len) = (unsafe { bpf_probe_read_kernel(&len as *const u64) }) else { return false };
    if len == 0 || len > FRAME_HEADER as u64 {
        return false;
    }
    // SAFETY: user memory read through the fault-tolerant helper into `dst`, which holds
    // `FRAME_HEADER` bytes (`len` is at most that).
    unsafe { generated::bpf_probe_read_user(dst.as_mut_ptr().cast(), len as u32, addr as _) == 0 }
}

/// The client preface was seen on `conn`: its frame state starts, the preface to be passed
/// over (the transfer that holds it is walked like every other, [`on_payload`]).
#[inline(always)]
pub fn start(conn: &mut Conn, sock: u64) {
    let Some(scratch) = H2_SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's scratch slot, used only until this program ends.
    let scratch = unsafe { &mut *scratch };
    // SAFETY: the slot holds a whole `H2State`.
    unsafe { fill::zero_words(&raw mut *scratch) };
    scratch.start_at_preface();
    // BPF_ANY: a stale entry of a socket whose destruction was missed is replaced.
    if H2_CONNS.insert(&sock, scratch, 0).is_err() {
        lose(conn, sock);
    }
}

/// Leaves the frames `transfer` moved on the HTTP/2 connection `conn` to be walked once the
/// hook's transfer is counted ([`walk_pending`]); bytes that cannot be read are passed over
/// at once.
///
/// The walk runs in [`connscope_h2_transfer`], a global function: the kernel verifies it
/// once, apart from its callers, instead of once per state a caller reaches it in (its
/// frame loop times every such state is past the verifier's budget). Its stack adds to
/// its caller's, so it is called from the hook's own body, not from the subprograms the
/// transfer path calls (they are deep enough already): the transfer is left in
/// `H2_CURSOR` for it.
#[inline(always)]
pub fn on_payload(conn: &mut Conn, transfer: &Transfer) {
    if conn.has(conn_flag::H2_UNPARSED) {
        return;
    }
    let (kind, addr, len) = match transfer.source.segments(transfer.direction) {
        Some(Segments::Flat(buffer)) => (SEGMENTS_FLAT, buffer.addr, buffer.len),
        Some(Segments::Vectored { iov, count }) => (SEGMENTS_VECTORED, iov, count),
        None => (SEGMENTS_NONE, 0, 0),
    };
    let Some(cursor) = H2_CURSOR.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's slot, used only until this program ends.
    let cursor = unsafe { &mut *cursor };
    if kind == SEGMENTS_NONE {
        // Nothing to read (a turn no hook saw, `sendfile`): passed over now, no loop.
        let Some(state) = H2_CONNS.get_ptr_mut(&transfer.sock) else { return };
        // SAFETY: the map value of this socket (see `connscope_h2_transfer`).
        let state = unsafe { &mut *state };
        let dir = if from_client(conn, transfer.direction) {
            &mut state.request
        } else {
            &mut state.response
        };
        if pass_unread(dir, transfer.bytes).is_err() {
            lose(conn, transfer.sock);
        }
        return;
    }
    cursor.sock = transfer.sock;
    // A system call moves less than 2^31 bytes (`transfer`).
    cursor.packed = (transfer.bytes & 0xffff_ffff)
        | (transfer.direction as u64) << DIRECTION_SHIFT
        | kind << SEGMENTS_SHIFT;
    cursor.addr = addr;
    cursor.len = len;
    cursor.pending = 1;
}

/// Walks the transfer [`on_payload`] left, if any: called by each hook once its transfer on
/// `conn` is counted. Only an HTTP/2 connection's transfer can have left one (`on_payload`
/// runs for no other), so the others skip the cursor's lookup.
#[inline(always)]
pub fn walk_pending(conn: &Conn) {
    if conn.protocol != Protocol::Http2 as u8 {
        return;
    }
    let Some(cursor) = H2_CURSOR.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's slot, used only until this program ends.
    let cursor = unsafe { &mut *cursor };
    if cursor.pending != 0 {
        cursor.pending = 0;
        connscope_h2_transfer();
    }
}

/// Whether a transfer in `direction` on `conn` was sent by the client.
#[inline(always)]
fn from_client(conn: &Conn, direction: Direction) -> bool {
    conn.role().is_some_and(|role| is_request(role, direction))
}

const DIRECTION_SHIFT: u64 = 32;
const SEGMENTS_SHIFT: u64 = 34;
const SEGMENTS_NONE: u64 = 0;
/// `addr`, `len`: one buffer.
const SEGMENTS_FLAT: u64 = 1;
/// `addr`, `len`: an iovec array and its count.
const SEGMENTS_VECTORED: u64 = 2;

/// The walk of the transfer left in `H2_CURSOR`, verified on its own (a global function:
/// no arguments; what it reads from the map is unknown to the verifier). Sends the
/// connection's snapshot when the walk says the agent needs one.
///
/// Its loop calls [`connscope_h2_step`], another global function, once per step: the
/// verifier checks a step once, and the loop's 64 iterations as calls. With the step
/// inlined, it walked every path of a step in every iteration: about 500,000 instructions
/// per transfer program, seconds of loading (minutes under emulation) for each of them.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn connscope_h2_transfer() -> i64 {
    let Some(cursor) = H2_CURSOR.get_ptr_mut(0) else { return 0 };
    // SAFETY: this CPU's slot, used only until this program ends.
    let cursor = unsafe { &mut *cursor };
    let sock = cursor.sock;
    let Some(conn) = CONNS.get_ptr_mut(&sock) else { return 0 };
    // SAFETY: the map value of this socket.
    let conn = unsafe { &mut *conn };
    if conn.has(conn_flag::H2_UNPARSED) {
        return 0;
    }
    let Some(state) = H2_CONNS.get_ptr_mut(&sock) else {
        lose(conn, sock);
        return 0;
    };
    let (packed, addr, len) = (cursor.packed, cursor.addr, cursor.len);
    cursor.left = packed & 0xffff_ffff;
    cursor.offset = 0;
    cursor.iov_next = 0;
    cursor.iov_end = 0;
    cursor.status = WALK_UNREAD;
    match packed >> SEGMENTS_SHIFT {
        SEGMENTS_FLAT => {
            cursor.segment = UserBuffer { addr, len };
            cursor.status = WALK_GOING;
        }
        SEGMENTS_VECTORED => {
            let count = if len < MAX_SEGMENTS { len } else { MAX_SEGMENTS };
            if count > 0
                && let Some(first) = read_iovec(addr)
            {
                cursor.segment = first;
                cursor.status = WALK_GOING;
            }
            cursor.iov_next = addr + IOVEC_SIZE;
            cursor.iov_end = addr + count * IOVEC_SIZE;
        }
        _ => {}
    }
    let send = (packed >> DIRECTION_SHIFT) & 3 == Direction::Send as u64;
    let direction = if send { Direction::Send } else { Direction::Recv };
    let from_client = from_client(conn, direction);
    cursor.from_client = u64::from(from_client);
    // SAFETY: the map value of this socket; its hooks run under the socket lock (or libssl's
    // call on it), one at a time. Copied whole into the cursor and back once walked.
    unsafe { core::ptr::copy_nonoverlapping(state, &raw mut cursor.state, 1) };
    // Gathered over the walk (`H2Streams::changes`) and counted once after it.
    cursor.state.streams.changes = 0;
    let mut steps = 0;
    while steps < MAX_STEPS_PER_TRANSFER {
        steps += 1;
        if connscope_h2_step() != WALK_GOING as i64 {
            break;
        }
    }
    let H2State { request, response, streams } = &mut cursor.state;
    let dir = if from_client { request } else { response };
    let walked = match cursor.status {
        WALK_DONE => Ok(()),
        WALK_UNREAD => pass_unread(dir, cursor.left),
        WALK_GOING => Err(Lost::TooManyFrames),
        _ => Err(Lost::Sync),
    };
    let changes = streams.take_changes();
    let report = count_change(conn, streams, changes, now_ns());
    let in_flight = streams.in_flight;
    // SAFETY: as above.
    unsafe { core::ptr::copy_nonoverlapping(&raw const cursor.state, state, 1) };
    if walked.is_err() {
        lose(conn, sock);
    } else if in_flight > 0 {
        conn.flags |= conn_flag::AWAITING_RESPONSE;
    } else {
        conn.flags &= !conn_flag::AWAITING_RESPONSE;
    }
    if report {
        records::snapshot(EventKind::Progress, sock, conn);
    }
    0
}

/// `WalkCursor::status`.
const WALK_GOING: u64 = 0;
const WALK_DONE: u64 = 1;
/// Bytes left past the last segment walked: passed over unread.
const WALK_UNREAD: u64 = 2;
const WALK_LOST: u64 = 3;

/// One step of the walk of the transfer in `H2_CURSOR` (a frame unit read, or a move to
/// the next iovec), in the direction's state copied there; returns the walk's `WALK_*`
/// status after it. A global function, verified once (see [`connscope_h2_transfer`]).
///
/// The iovecs of a vectored call are walked one after the other. Bytes that cannot be read
/// (none readable, iovecs past `MAX_SEGMENTS`) are left for the caller to pass over inside
/// a payload (`WALK_UNREAD`), or lose the sync. Everything a step carries lives in map
/// memory, whose values the verifier does not track.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn connscope_h2_step() -> i64 {
    let Some(cursor) = H2_CURSOR.get_ptr_mut(0) else { return WALK_LOST as i64 };
    // SAFETY: this CPU's slot, used only until this program ends.
    let cursor = unsafe { &mut *cursor };
    if cursor.status != WALK_GOING {
        return cursor.status as i64;
    }
    let from_client = cursor.from_client != 0;
    let H2State { request, response, streams } = &mut cursor.state;
    let dir = if from_client { request } else { response };
    let buffer = cursor.segment;
    let len = if buffer.len < cursor.left { buffer.len } else { cursor.left };
    match step(dir, &buffer, cursor.offset, len, &mut cursor.scratch) {
        Step::Unit(Unit::Header(header), next) => {
            cursor.offset = next;
            streams.on_frame(&header, from_client);
        }
        Step::Unit(Unit::GoAway(code), next) => {
            cursor.offset = next;
            let by = if from_client { Role::Client } else { Role::Server };
            streams.on_goaway(code, by as u8);
        }
        Step::SegmentDone => {
            cursor.left -= len;
            cursor.offset = 0;
            if cursor.left == 0 {
                cursor.status = WALK_DONE;
            } else if cursor.iov_next < cursor.iov_end {
                match read_iovec(cursor.iov_next) {
                    Some(segment) => cursor.segment = segment,
                    None => cursor.status = WALK_UNREAD,
                }
                cursor.iov_next += IOVEC_SIZE;
            } else {
                cursor.status = WALK_UNREAD;
            }
        }
        Step::Lost(_) => cursor.status = WALK_LOST,
    }
    cursor.status as i64
}

/// Adds a transfer's stream changes to the connection's counts: new streams are exchanges
/// (the count is the stream ids', so skipped ids count too), and one opened with none in
/// flight ends an idle gap (one per transfer: a stream can end and another open after it
/// within one transfer only through a reset, and that gap is microseconds). Stream
/// openings and ends are the connection's activity (`last_ns`): frames between them
/// (pings, settings, window updates) do not end its idle time.
#[inline(always)]
fn count_change(conn: &mut Conn, streams: &H2Streams, change: StreamChange, now: u64) -> bool {
    let mut report = false;
    if change.opened {
        conn.exchanges = streams.streams();
        if change.after_idle && conn.exchanges > 1 {
            report |= count_gap(conn, now);
            report |= now.saturating_sub(conn.last_ns) >= PROGRESS_AFTER_IDLE_NS;
        }
    }
    if change.opened || change.ended {
        conn.last_ns = now;
    }
    report
}

/// Frame sync lost (or no state): the connection is no longer counted, and the loss is
/// counted once.
#[inline(never)]
fn lose(conn: &mut Conn, sock: u64) {
    conn.flags |= conn_flag::H2_UNPARSED;
    conn.flags &= !conn_flag::AWAITING_RESPONSE;
    count_lost(LostReason::Http2Unparsed);
    let _ = H2_CONNS.remove(&sock);
}

/// At the socket's destruction: sends what the walk found, before the `Close` record, and
/// forgets the state.
#[inline(always)]
pub fn close(sock: u64, conn: &Conn, now: u64) {
    // SAFETY: read into the record before the entry is removed.
    let Some(state) = (unsafe { H2_CONNS.get(&sock) }) else { return };
    let streams = &state.streams;
    if let Some(mut entry) = EVENTS.reserve::<Http2CloseEvent>(0) {
        let record = entry.as_mut_ptr();
        // SAFETY: the reservation holds a whole record; every field is written.
        unsafe {
            (*record).header = EventHeader::new(EventKind::Http2Close, sock, now);
            (*record).open_token = conn.open_token;
            (*record).goaway_code = streams.goaway_code;
            (*record).goaway_by = streams.goaway_by;
            (*record)._pad = [0; 3];
            (*record).concurrency_sum = streams.concurrency_sum;
            core::ptr::copy_nonoverlapping(&streams.concurrency, &raw mut (*record).concurrency, 1);
        }
        entry.submit(submit_flags());
    } else {
        count_lost(LostReason::RingbufFull);
    }
    let _ = H2_CONNS.remove(&sock);
}
