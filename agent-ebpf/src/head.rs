//! Payload heads: read into a per-CPU record, looked at cheaply (start line, TLS record
//! type) and sent to the agent, which parses them. Steady keep-alive traffic repeats the
//! same heads, which are not read again (`exchange::steady_repeat`): the kernel counts the
//! repeats and the agent applies the last head it parsed to them.

use aya_ebpf::helpers::{bpf_probe_read_user, generated};
use connscope_common::{
    Conn, Direction, EventHeader, EventKind, HEAD_FIXED_LEN, HEAD_LEN, HeadContent, HeadEvent,
    LostReason, Protocol, conn_flag, h2_frames,
    tls_record::{self, TransferBytes},
};
use core::ffi::c_void;

use crate::{
    fill,
    maps::{EVENTS, HEAD_SCRATCH, UserBuffer, count_lost, submit_flags},
    payload_source::PayloadSource,
    records::current_attribution,
};

/// The head of the current transfer, read into this CPU's scratch record (`head_len` set).
/// `None` when the call has no user buffer (sendfile, io_uring) or it cannot be read.
#[inline(always)]
pub fn read(
    source: PayloadSource,
    direction: Direction,
    bytes: u64,
) -> Option<&'static mut HeadEvent> {
    read_from(source.buffer(direction)?, bytes)
}

/// Like [`read`], but only when the transfer starts like a request line: the first four
/// bytes are read first, so request bodies cost a 4-byte read, not a head.
#[inline(always)]
pub fn read_request(
    source: PayloadSource,
    direction: Direction,
    bytes: u64,
) -> Option<&'static mut HeadEvent> {
    let buffer = source.buffer(direction)?;
    if buffer.len.min(bytes) < 4 {
        return None;
    }
    // SAFETY: user memory read through the fault-tolerant helper.
    let prefix: [u8; 4] = unsafe { bpf_probe_read_user(buffer.addr as *const [u8; 4]) }.ok()?;
    if !METHOD_PREFIXES.contains(&u32::from_le_bytes(prefix)) {
        return None;
    }
    read_from(buffer, bytes)
}

#[inline(always)]
fn read_from(buffer: UserBuffer, bytes: u64) -> Option<&'static mut HeadEvent> {
    let record = HEAD_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot; programs do not migrate CPUs while running, and the
    // record is used only until this program ends.
    let record = unsafe { &mut *record };
    let len = read_bytes(buffer.addr, buffer.len.min(bytes), &mut record.head);
    if len == 0 {
        return None;
    }
    record.head_len = len;
    Some(record)
}

/// Copies at most `HEAD_LEN` bytes of the user buffer at `addr` into `dst`; returns how
/// many are valid (0 when unreadable, counted as `payload_unreadable`).
///
/// Kept out of line and given its arguments by value: inlined into a large program, the
/// size could be spilled to the stack between its bound check and the helper call, and
/// verifiers before 6.13 then reject the call ("R2 min value is negative").
#[inline(never)]
fn read_bytes(addr: u64, len: u64, dst: &mut [u8; HEAD_LEN]) -> u32 {
    // The volatile read hides the caller's bound from LLVM, so the comparison below is
    // emitted right before the call, where the verifier needs it.
    // SAFETY: reading a local.
    let len = unsafe { core::ptr::read_volatile(&len) };
    let size = if len < HEAD_LEN as u64 { len as u32 } else { HEAD_LEN as u32 };
    if size == 0 {
        return 0;
    }
    // SAFETY: user memory of the calling thread's own system call, read through the
    // fault-tolerant helper into `dst`, which holds HEAD_LEN bytes (size is at most that).
    let rc = unsafe {
        generated::bpf_probe_read_user(dst.as_mut_ptr().cast(), size, addr as *const c_void)
    };
    if rc == 0 {
        size
    } else {
        count_lost(LostReason::PayloadUnreadable);
        0
    }
}

/// Whether a request-direction transfer on undecrypted TLS carries application data (a
/// request), by its record headers (`connscope_common::tls_record::carries_request`).
#[inline(always)]
pub fn tls_carries_request(source: PayloadSource, direction: Direction, bytes: u64) -> bool {
    let Some(buffer) = source.buffer(direction) else { return false };
    tls_record::carries_request(&buffer, buffer.len.min(bytes))
}

impl TransferBytes for UserBuffer {
    #[inline(always)]
    fn byte_at(&self, offset: u64) -> Option<u8> {
        // SAFETY: user memory read through the fault-tolerant helper.
        unsafe { bpf_probe_read_user((self.addr + offset) as *const u8) }.ok()
    }

    #[inline(always)]
    fn header_at(&self, offset: u64) -> Option<[u8; 5]> {
        // SAFETY: as above.
        unsafe { bpf_probe_read_user((self.addr + offset) as *const [u8; 5]) }.ok()
    }
}

#[inline(always)]
fn prefix(head: &HeadEvent) -> u32 {
    u32::from_le_bytes([head.head[0], head.head[1], head.head[2], head.head[3]])
}

const fn word(bytes: &[u8; 4]) -> u32 {
    u32::from_le_bytes(*bytes)
}

/// First four bytes of the request lines of the registered methods (HTTP/1.x).
const METHOD_PREFIXES: [u32; 9] = [
    word(b"GET "),
    word(b"POST"),
    word(b"PUT "),
    word(b"HEAD"),
    word(b"DELE"),
    word(b"OPTI"),
    word(b"PATC"),
    word(b"CONN"),
    word(b"TRAC"),
];
const HTTP2_PREFACE: u32 = word(b"PRI ");
const STATUS_PREFIX: u32 = word(b"HTTP");

/// Whether the head starts like an HTTP/1.x request line (the agent checks the rest).
#[inline(always)]
pub fn starts_request(head: &HeadEvent) -> bool {
    head.head_len >= 4 && METHOD_PREFIXES.contains(&prefix(head))
}

/// What a connection speaks, from the first head of its first request.
#[inline(always)]
pub fn sniff_request(head: &HeadEvent) -> Protocol {
    if starts_request(head) {
        Protocol::Http1
    } else if head.head_len >= 4 && prefix(head) == HTTP2_PREFACE {
        Protocol::Http2
    } else if head.head_len >= 3 && head.head[0] == tls_record::HANDSHAKE && head.head[1] == 3 {
        Protocol::Tls
    } else {
        Protocol::Other
    }
}

/// Whether the head starts with an HTTP/2 `SETTINGS` frame header (the server's preface,
/// RFC 9113 §3.4), which a server may send before it reads the client's.
#[inline(always)]
pub fn starts_h2_settings(head: &HeadEvent) -> bool {
    let h = &head.head;
    head.head_len >= h2_frames::FRAME_HEADER as u32
        && h[3] == h2_frames::frame_type::SETTINGS
        && h[4] & !1 == 0
        && u32::from_be_bytes([h[5], h[6], h[7], h[8]]) == 0
        && u32::from_be_bytes([0, h[0], h[1], h[2]]) % 6 == 0
}

/// The class of an HTTP/1.x status line (`HTTP/1.x NNN`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `101 Switching Protocols`.
    SwitchingProtocols,
    /// Any other `1xx`: the exchange goes on.
    Interim,
    Final,
}

#[inline(always)]
pub fn status(head: &HeadEvent) -> Option<Status> {
    if head.head_len < 12 || prefix(head) != STATUS_PREFIX || head.head[4] != b'/' {
        return None;
    }
    let code = &head.head;
    Some(match (code[9], code[10], code[11]) {
        (b'1', b'0', b'1') => Status::SwitchingProtocols,
        (b'1', _, _) => Status::Interim,
        _ => Status::Final,
    })
}

/// Sends the head record at its real length. The first head of an accepted socket not yet
/// attributed carries its process (heads are only read in the process's own system calls
/// and libssl calls), in place of a separate `Attribute` record.
#[inline(always)]
pub fn send(
    sock: u64,
    conn: &mut Conn,
    record: &mut HeadEvent,
    request: bool,
    content: HeadContent,
    now: u64,
) -> bool {
    record.header = EventHeader::new(EventKind::Head, sock, now);
    record.open_token = conn.open_token;
    record._pad0 = 0;
    record.exchanges = conn.exchanges;
    record.direction = direction_of(conn.role, request);
    record.role = conn.role;
    record.content = content as u8;
    fill::zero_array(&mut record._pad);
    let attributes = !conn.has(conn_flag::ATTRIBUTED);
    if attributes {
        record.attribution = current_attribution();
    } else {
        // SAFETY: the record's own field.
        unsafe { fill::zero_words(&raw mut record.attribution) };
    }
    let sent = output(record, record.head_len);
    if !sent {
        count_lost(LostReason::RingbufFull);
    } else if attributes {
        conn.flags |= conn_flag::ATTRIBUTED;
    }
    sent
}

/// Copies the record with `head_len` bytes of head into the ring buffer. Out of line with
/// the length by value, for the same reason as `read_bytes`: the bound must be checked
/// right before the helper call, or older verifiers lose it ("R3 unbounded memory access").
#[inline(never)]
fn output(record: &HeadEvent, head_len: u32) -> bool {
    // SAFETY: reading a local (hides the caller's bound from LLVM; see `read_bytes`).
    let head_len = unsafe { core::ptr::read_volatile(&head_len) } as usize;
    let len = HEAD_FIXED_LEN + if head_len < HEAD_LEN { head_len } else { HEAD_LEN };
    // SAFETY: `len` is at most the size of the record.
    let bytes =
        unsafe { core::slice::from_raw_parts((record as *const HeadEvent).cast::<u8>(), len) };
    EVENTS.output::<[u8]>(bytes, submit_flags()).is_ok()
}

/// The direction of a request (`request`) or response for a socket of `role`.
#[inline(always)]
fn direction_of(role: u8, request: bool) -> u8 {
    let client = role == connscope_common::Role::Client as u8;
    if client == request { Direction::Send as u8 } else { Direction::Recv as u8 }
}
