//! HTTP/2 frame boundaries (RFC 9113 §4.1) and the streams they open and end, for the
//! kernel's walk over each transfer of an HTTP/2 connection. The kernel reads the bytes from
//! user memory, the fuzz target (`fuzz/fuzz_targets/h2_frames.rs`) and the tests from
//! slices: one walker, run by both.
//!
//! Only the 9-byte frame headers are read, and the first 8 payload bytes of a `GOAWAY` (its
//! error code). Every other payload (HPACK blocks, `DATA`, settings) is passed over by its
//! length, never read. A transfer may end anywhere in a frame: the bytes of a header cut
//! there (at most 8) are carried to the direction's next transfer.

/// The client connection preface (RFC 9113 §3.4), passed over before the first frame.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// `length(3) type(1) flags(1) R|stream id(4)`.
pub const FRAME_HEADER: usize = 9;
/// What a `GOAWAY` payload's error code needs: last stream id (4), error code (4).
pub const GOAWAY_PREFIX: usize = 8;

pub mod frame_type {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const PRIORITY: u8 = 0x2;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
    /// The highest registered type (`PRIORITY_UPDATE`, RFC 9218). A header with a higher
    /// type is taken for lost frame sync: extension frames past it are unknown to this
    /// walker (RFC 9113 §5.5 lets a peer send them; none is in use).
    pub const LAST_KNOWN: u8 = 0x10;
}

/// `END_STREAM` on `DATA` and `HEADERS`.
pub const END_STREAM: u8 = 0x1;
/// The highest error code RFC 9113 §7 defines (`HTTP_1_1_REQUIRED`).
pub const LAST_KNOWN_ERROR: u32 = 0xd;

/// Steps of the walk per transfer at most (a frame unit read, or a move to the next iovec):
/// a bounded loop for the verifier. A transfer that needs more cannot be followed: its
/// connection loses frame sync (counted).
pub const MAX_STEPS_PER_TRANSFER: u32 = 64;
/// Iovecs of a vectored call walked at most; bytes past them are passed over unread.
pub const MAX_SEGMENTS: u64 = 64;

/// Upper bounds of the streams-in-flight histogram (`connscope_http2_concurrent_streams`),
/// taken at each stream's opening, the new stream included.
pub const CONCURRENCY_BOUNDS: [u32; 9] = [1, 2, 3, 4, 5, 10, 20, 50, 100];
pub const CONCURRENCY_BUCKETS: usize = CONCURRENCY_BOUNDS.len() + 1;

/// Index of the concurrency bucket `in_flight` (at least 1) falls in. Arithmetic, not a
/// loop over the bounds: the kernel runs it inside its frame loop.
#[inline(always)]
pub fn concurrency_bucket(in_flight: u32) -> usize {
    const _: () = assert!(CONCURRENCY_BOUNDS[4] == 5 && CONCURRENCY_BOUNDS[5] == 10);
    if in_flight <= 5 {
        return in_flight.saturating_sub(1) as usize;
    }
    5 + usize::from(in_flight > 10)
        + usize::from(in_flight > 20)
        + usize::from(in_flight > 50)
        + usize::from(in_flight > 100)
}

/// What `partial` collects.
pub mod phase {
    /// A frame header (9 bytes).
    pub const HEADER: u8 = 0;
    /// The first [`super::GOAWAY_PREFIX`] bytes of a `GOAWAY` payload.
    pub const GOAWAY: u8 = 1;
}

/// The walk of one direction: where the next frame header starts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct H2Direction {
    /// Payload bytes of the current frame still to pass over.
    pub skip: u32,
    /// A `GOAWAY`'s payload bytes after its first [`GOAWAY_PREFIX`].
    pub goaway_rest: u32,
    /// The bytes of a header (or `GOAWAY` prefix) cut by the end of a transfer.
    pub partial: [u8; 8],
    pub partial_len: u8,
    /// A [`phase`].
    pub phase: u8,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<H2Direction>() == 24);

/// Streams tracked one by one in [`H2Streams::open`]: a window of 64 client stream ids from
/// [`H2Streams::window_base`].
pub const STREAM_WINDOW: u32 = 64;

/// An HTTP/2 connection's frame walk and streams (the kernel's `H2_CONNS` map value, made
/// at the client preface; `Conn` stays 64 bytes). Apart, so the walk of a direction and
/// the streams its frames change can be borrowed at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct H2State {
    /// Client → server, and server → client.
    pub request: H2Direction,
    pub response: H2Direction,
    pub streams: H2Streams,
}
const _: () = assert!(core::mem::size_of::<H2State>() == 152);
// SAFETY: plain `#[repr(C)]` data with explicit padding; every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for H2State {}

impl H2State {
    /// A zeroed state made at a client preface: the preface itself is passed over in the
    /// request direction.
    #[inline(always)]
    pub fn start_at_preface(&mut self) {
        self.request.skip = PREFACE.len() as u32;
    }
}

/// The streams of an HTTP/2 connection, and its first `GOAWAY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct H2Streams {
    /// The first and highest client-initiated stream ids seen (0: none yet).
    pub first_stream: u32,
    pub highest_stream: u32,
    /// The client stream id of bit 0 of the window bitmaps.
    pub window_base: u32,
    /// Streams open now (in the window or [`H2Streams::outside_window`]).
    pub in_flight: u32,
    /// Streams still open when 64 newer ones pushed them out of the window: they end at a
    /// `RST_STREAM` or the server's `END_STREAM`.
    pub outside_window: u32,
    /// The first `GOAWAY`'s error code, and who sent it (a [`crate::Role`] as `u8`; 0: none).
    pub goaway_code: u32,
    pub goaway_by: u8,
    /// [`change`] bits of the transfer being walked (the kernel reads and clears them after
    /// it: kept here, in map memory, the verifier does not tell the loop's states apart by
    /// them).
    pub changes: u8,
    pub _pad: [u8; 6],
    /// Per window stream: open, and `END_STREAM` sent by the client, by the server.
    pub open: u64,
    pub client_ended: u64,
    pub server_ended: u64,
    /// Streams in flight at each stream's opening: counts per bucket of
    /// [`CONCURRENCY_BOUNDS`], and their sum.
    pub concurrency: [u32; CONCURRENCY_BUCKETS],
    pub concurrency_sum: u32,
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<H2Streams>() == 104);

/// A frame header, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub len: u32,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl FrameHeader {
    pub fn parse(bytes: &[u8; FRAME_HEADER]) -> Self {
        Self {
            len: u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]),
            kind: bytes[3],
            flags: bytes[4],
            // The reserved bit stays in: `plausible` rejects it.
            stream: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]),
        }
    }

    /// Whether a peer could send this header (RFC 9113 §6): the reserved bit clear, a
    /// known type, on the stream or connection its type belongs to, with the fixed
    /// lengths of the control frames. Anything else means the walk lost frame sync (or the
    /// peer breaks the protocol, which ends the connection anyway).
    pub fn plausible(&self) -> bool {
        use frame_type::*;
        if self.stream & (1 << 31) != 0 || self.kind > LAST_KNOWN {
            return false;
        }
        let on_stream = self.stream != 0;
        match self.kind {
            DATA | HEADERS | CONTINUATION | PUSH_PROMISE => on_stream,
            PRIORITY => on_stream && self.len == 5,
            RST_STREAM => on_stream && self.len == 4,
            SETTINGS => !on_stream && self.len.is_multiple_of(6),
            PING => !on_stream && self.len == 8,
            GOAWAY => !on_stream && self.len >= GOAWAY_PREFIX as u32,
            WINDOW_UPDATE => self.len == 4,
            _ => true,
        }
    }
}

/// Bits of [`H2Streams::changes`].
pub mod change {
    pub const OPENED: u8 = 1 << 0;
    pub const OPENED_AFTER_IDLE: u8 = 1 << 1;
    pub const ENDED: u8 = 1 << 2;
}

/// How a stream changed at one frame (what the kernel adds to `Conn`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamChange {
    /// A new client stream opened.
    pub opened: bool,
    /// No stream was open before it did.
    pub after_idle: bool,
    /// A stream ended.
    pub ended: bool,
}

impl H2Streams {
    /// Streams the client opened: (highest − first) / 2 + 1 (client ids are odd and rise).
    pub fn streams(&self) -> u32 {
        if self.first_stream == 0 { 0 } else { (self.highest_stream - self.first_stream) / 2 + 1 }
    }

    /// Applies a frame header sent by the client (`from_client`) or the server; the change
    /// is also added to [`H2Streams::changes`].
    #[inline(always)]
    pub fn on_frame(&mut self, header: &FrameHeader, from_client: bool) -> StreamChange {
        let change = self.stream_change(header, from_client);
        if change.opened {
            self.changes |= change::OPENED;
        }
        if change.after_idle {
            self.changes |= change::OPENED_AFTER_IDLE;
        }
        if change.ended {
            self.changes |= change::ENDED;
        }
        change
    }

    /// The changes gathered since the last call, cleared.
    #[inline(always)]
    pub fn take_changes(&mut self) -> StreamChange {
        let bits = self.changes;
        self.changes = 0;
        StreamChange {
            opened: bits & change::OPENED != 0,
            after_idle: bits & change::OPENED_AFTER_IDLE != 0,
            ended: bits & change::ENDED != 0,
        }
    }

    #[inline(always)]
    fn stream_change(&mut self, header: &FrameHeader, from_client: bool) -> StreamChange {
        use frame_type::*;
        let stream = header.stream;
        let end = header.flags & END_STREAM != 0;
        match header.kind {
            HEADERS if from_client && stream & 1 == 1 && stream > self.highest_stream => {
                self.open_stream(stream, end)
            }
            HEADERS | DATA if end => {
                StreamChange { ended: self.end_stream(stream, from_client), ..Default::default() }
            }
            RST_STREAM => StreamChange { ended: self.reset(stream), ..Default::default() },
            _ => StreamChange::default(),
        }
    }

    /// A `GOAWAY` with `code`: the first one is kept.
    #[inline(always)]
    pub fn on_goaway(&mut self, code: u32, by: u8) {
        if self.goaway_by == 0 {
            self.goaway_by = by;
            self.goaway_code = code;
        }
    }

    #[inline(always)]
    fn open_stream(&mut self, stream: u32, client_ended: bool) -> StreamChange {
        if self.first_stream == 0 {
            self.first_stream = stream;
            self.window_base = stream;
        }
        self.highest_stream = stream;
        if self.open == 0 {
            // Nothing open in the window: it restarts at this stream.
            self.window_base = stream;
        }
        let mut index = (stream - self.window_base) / 2;
        if index >= STREAM_WINDOW {
            self.slide(index - (STREAM_WINDOW - 1));
            index = STREAM_WINDOW - 1;
        }
        let after_idle = self.in_flight == 0;
        let bit = 1u64 << index;
        self.open |= bit;
        self.client_ended &= !bit;
        self.server_ended &= !bit;
        if client_ended {
            self.client_ended |= bit;
        }
        self.in_flight = self.in_flight.saturating_add(1);
        let bucket = concurrency_bucket(self.in_flight);
        if let Some(count) = self.concurrency.get_mut(bucket) {
            *count = count.wrapping_add(1);
        }
        self.concurrency_sum = self.concurrency_sum.wrapping_add(self.in_flight);
        StreamChange { opened: true, after_idle, ended: false }
    }

    /// Moves the window `by` streams up; open streams pushed out stay in flight.
    #[inline(always)]
    fn slide(&mut self, by: u32) {
        let (leaving, kept_shift) = if by >= STREAM_WINDOW {
            (self.open, None)
        } else {
            (self.open & ((1u64 << by) - 1), Some(by))
        };
        self.outside_window = self.outside_window.saturating_add(leaving.count_ones());
        match kept_shift {
            Some(shift) => {
                self.open >>= shift;
                self.client_ended >>= shift;
                self.server_ended >>= shift;
            }
            None => {
                self.open = 0;
                self.client_ended = 0;
                self.server_ended = 0;
            }
        }
        self.window_base = self.window_base.saturating_add(by.saturating_mul(2));
    }

    /// The window bit of `stream`, if it has one.
    #[inline(always)]
    fn bit(&self, stream: u32) -> Option<u64> {
        if stream & 1 == 0 || stream < self.window_base {
            return None;
        }
        let index = (stream - self.window_base) / 2;
        (index < STREAM_WINDOW).then(|| 1u64 << index)
    }

    /// `END_STREAM` from one side: the stream ends when both sides ended it.
    #[inline(always)]
    fn end_stream(&mut self, stream: u32, from_client: bool) -> bool {
        let Some(bit) = self.bit(stream) else {
            // Pushed out of the window: the server's end is taken as the stream's.
            return !from_client && self.end_outside(stream);
        };
        if self.open & bit == 0 {
            return false;
        }
        if from_client {
            self.client_ended |= bit;
        } else {
            self.server_ended |= bit;
        }
        if self.client_ended & self.server_ended & bit == 0 {
            return false;
        }
        self.close_bit(bit);
        true
    }

    #[inline(always)]
    fn reset(&mut self, stream: u32) -> bool {
        match self.bit(stream) {
            Some(bit) if self.open & bit != 0 => {
                self.close_bit(bit);
                true
            }
            Some(_) => false,
            None => self.end_outside(stream),
        }
    }

    #[inline(always)]
    fn close_bit(&mut self, bit: u64) {
        self.open &= !bit;
        self.client_ended &= !bit;
        self.server_ended &= !bit;
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// A stream below the window ended: one of those pushed out, if any is left.
    #[inline(always)]
    fn end_outside(&mut self, stream: u32) -> bool {
        if stream >= self.window_base || self.outside_window == 0 {
            return false;
        }
        self.outside_window -= 1;
        self.in_flight = self.in_flight.saturating_sub(1);
        true
    }
}

/// The bytes of one transfer segment (an iovec, a buffer), read at an offset into a
/// destination (false: unreadable).
pub trait FrameBytes {
    /// `len` bytes (1 to 9) at the front of `out`.
    fn read_into(&self, offset: u64, len: u64, out: &mut [u8; FRAME_HEADER]) -> bool;
}

/// Where a step puts the bytes it reads: the kernel gives map memory (`H2_CURSOR`), so its
/// stack stays small and the values stay unknown to the verifier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Scratch {
    pub unit: [u8; FRAME_HEADER],
    pub _pad: [u8; 7],
    pub fresh: [u8; FRAME_HEADER],
    pub _pad2: [u8; 7],
}

/// What the walk found in one frame unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Header(FrameHeader),
    /// A `GOAWAY`'s error code.
    GoAway(u32),
}

/// Why a walk stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lost {
    /// A header no peer sends, or bytes that could not be read where a header was due.
    Sync,
    /// More steps than [`MAX_STEPS_PER_TRANSFER`] in one transfer.
    TooManyFrames,
}

/// One step of the walk of a segment of `len` bytes from `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A unit read; the walk goes on at this offset.
    Unit(Unit, u64),
    /// The segment is used up (its last bytes may be carried in `partial`).
    SegmentDone,
    Lost(Lost),
}

/// Reads the next frame unit of the segment `bytes` (`len` bytes, from `offset`) in `dir`:
/// passes over the current payload, then reads a header or a `GOAWAY` prefix, whole or
/// completing one carried from the previous segment, into `scratch`. Nothing is read at or
/// past `len`.
#[inline(always)]
pub fn step(
    dir: &mut H2Direction,
    bytes: &impl FrameBytes,
    offset: u64,
    len: u64,
    scratch: &mut Scratch,
) -> Step {
    let left = len.saturating_sub(offset);
    if u64::from(dir.skip) >= left {
        dir.skip -= left as u32;
        return Step::SegmentDone;
    }
    let offset = offset + u64::from(dir.skip);
    dir.skip = 0;
    let left = len - offset;
    let goaway = dir.phase == phase::GOAWAY;
    let unit_len = if goaway { GOAWAY_PREFIX } else { FRAME_HEADER } as u64;
    let next = if dir.partial_len == 0 && left >= unit_len {
        if !bytes.read_into(offset, unit_len, &mut scratch.unit) {
            return Step::Lost(Lost::Sync);
        }
        offset + unit_len
    } else {
        match join(dir, bytes, offset, left, unit_len, scratch) {
            Ok(Some(read)) => offset + read,
            Ok(None) => return Step::SegmentDone,
            Err(lost) => return Step::Lost(lost),
        }
    };
    let unit = &scratch.unit;
    if goaway {
        dir.phase = phase::HEADER;
        dir.skip = dir.goaway_rest;
        let code = u32::from_be_bytes([unit[4], unit[5], unit[6], unit[7]]);
        return Step::Unit(Unit::GoAway(code), next);
    }
    let header = FrameHeader::parse(unit);
    if !header.plausible() {
        return Step::Lost(Lost::Sync);
    }
    if header.kind == frame_type::GOAWAY {
        dir.phase = phase::GOAWAY;
        dir.goaway_rest = header.len - GOAWAY_PREFIX as u32;
    } else {
        dir.skip = header.len;
    }
    Step::Unit(Unit::Header(header), next)
}

/// Walks `len` bytes of one segment in `dir`, calling `on_unit` for each complete header
/// and `GOAWAY` code, with `steps` left for the transfer (decremented). The host's form
/// of the kernel's loop (`h2.rs` in the eBPF crate), for the tests and the fuzz target.
pub fn walk(
    dir: &mut H2Direction,
    bytes: &impl FrameBytes,
    len: u64,
    steps: &mut u32,
    mut on_unit: impl FnMut(Unit),
) -> Result<(), Lost> {
    let mut offset = 0;
    let mut scratch = Scratch::default();
    loop {
        if *steps == 0 {
            return Err(Lost::TooManyFrames);
        }
        *steps -= 1;
        match step(dir, bytes, offset, len, &mut scratch) {
            Step::Unit(unit, next) => {
                offset = next;
                on_unit(unit);
            }
            Step::SegmentDone => return Ok(()),
            Step::Lost(lost) => return Err(lost),
        }
    }
}

/// A unit cut by the end of a segment: the segment's first bytes (at most `left`) join the
/// bytes carried in `partial`, without a loop (one read of at most 8 bytes, joined as
/// big-endian words) into `scratch.unit`. `Some(bytes read)` when the unit is whole,
/// `None` when the segment ended first (its bytes are carried).
#[inline(always)]
fn join(
    dir: &mut H2Direction,
    bytes: &impl FrameBytes,
    offset: u64,
    left: u64,
    unit_len: u64,
    scratch: &mut Scratch,
) -> Result<Option<u64>, Lost> {
    let carried = u64::from(dir.partial_len);
    if carried >= unit_len || carried > 8 {
        return Err(Lost::Sync);
    }
    // At least 1 byte (a cut header carries at most 8 of its 9).
    let need = unit_len - carried;
    let take = if left < need { left } else { need };
    if take == 0 || take > 8 {
        return Err(Lost::Sync);
    }
    scratch.fresh = [0; FRAME_HEADER];
    if !bytes.read_into(offset, take, &mut scratch.fresh) {
        return Err(Lost::Sync);
    }
    let f = &scratch.fresh;
    // The unit's first 8 bytes as a big-endian word: the carried bytes, then the fresh ones
    // (no 128-bit shifts on the bpf target).
    let fresh_word = u64::from_be_bytes([f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7]]);
    let first8 =
        u64::from_be_bytes(dir.partial) | fresh_word.checked_shr(8 * carried as u32).unwrap_or(0);
    let have = carried + take;
    if have < unit_len {
        // Still cut: carried, left-aligned in `partial` (bytes past `have` are zeros).
        dir.partial = first8.to_be_bytes();
        dir.partial_len = have as u8;
        return Ok(None);
    }
    dir.partial_len = 0;
    dir.partial = [0; 8];
    let [b0, b1, b2, b3, b4, b5, b6, b7] = first8.to_be_bytes();
    // The ninth byte: fresh byte `8 - carried` (carried is at least 1 then).
    let ninth = if have > 8 {
        (fresh_word.checked_shl(8 * (8 - carried) as u32).unwrap_or(0) >> 56) as u8
    } else {
        0
    };
    scratch.unit = [b0, b1, b2, b3, b4, b5, b6, b7, ninth];
    Ok(Some(take))
}

/// Passes over `len` bytes of a direction that cannot be read (a `sendfile`'s, an iovec
/// past the walked ones): only inside a frame's payload.
#[inline(always)]
pub fn pass_unread(dir: &mut H2Direction, len: u64) -> Result<(), Lost> {
    if dir.partial_len != 0 || dir.phase != phase::HEADER || u64::from(dir.skip) < len {
        return Err(Lost::Sync);
    }
    dir.skip -= len as u32;
    Ok(())
}

/// The close reason class of a `GOAWAY` error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoAwayCode {
    /// `NO_ERROR`: a graceful shutdown (max connection age, idle timeout, restart).
    Graceful,
    /// A code RFC 9113 §7 defines.
    Error,
    /// Any code past those.
    Other,
}

impl GoAwayCode {
    pub const fn of(code: u32) -> Self {
        match code {
            0 => Self::Graceful,
            1..=LAST_KNOWN_ERROR => Self::Error,
            _ => Self::Other,
        }
    }
}

#[cfg(test)]
mod tests;
