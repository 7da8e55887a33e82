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

/// Frames read per transfer at most (all its iovecs together): a bounded loop for the
/// verifier. A transfer with more frame headers than this cannot be followed: its
/// connection loses frame sync (counted).
pub const MAX_FRAMES_PER_TRANSFER: u32 = 48;

/// Upper bounds of the streams-in-flight histogram (`connscope_http2_concurrent_streams`),
/// taken at each stream's opening, the new stream included.
pub const CONCURRENCY_BOUNDS: [u32; 9] = [1, 2, 3, 4, 5, 10, 20, 50, 100];
pub const CONCURRENCY_BUCKETS: usize = CONCURRENCY_BOUNDS.len() + 1;

/// Index of the concurrency bucket `in_flight` falls in.
#[inline(always)]
pub fn concurrency_bucket(in_flight: u32) -> usize {
    let mut index = 0;
    while index < CONCURRENCY_BOUNDS.len() {
        if in_flight <= CONCURRENCY_BOUNDS[index] {
            return index;
        }
        index += 1;
    }
    CONCURRENCY_BOUNDS.len()
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

/// Bits of [`H2State::flags`].
pub mod h2_flag {
    /// Frame sync was lost (a header no peer sends, too many frames in one transfer,
    /// unreadable bytes where a header was due): nothing is counted any more.
    pub const UNPARSED: u8 = 1 << 0;
}

/// Streams tracked one by one in [`H2State::open`]: a window of 64 client stream ids from
/// [`H2State::window_base`].
pub const STREAM_WINDOW: u32 = 64;

/// An HTTP/2 connection's frame walk and streams (the kernel's `H2_CONNS` map value, made
/// at the client preface; `Conn` stays 64 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct H2State {
    /// Client → server, and server → client.
    pub request: H2Direction,
    pub response: H2Direction,
    /// The first and highest client-initiated stream ids seen (0: none yet).
    pub first_stream: u32,
    pub highest_stream: u32,
    /// The client stream id of bit 0 of the window bitmaps.
    pub window_base: u32,
    /// Streams open now (in the window or [`H2State::outside_window`]).
    pub in_flight: u32,
    /// Streams still open when 64 newer ones pushed them out of the window: they end at a
    /// `RST_STREAM` or the server's `END_STREAM`.
    pub outside_window: u32,
    /// The first `GOAWAY`'s error code, and who sent it (a [`crate::Role`] as `u8`; 0: none).
    pub goaway_code: u32,
    pub goaway_by: u8,
    /// [`h2_flag`] bits.
    pub flags: u8,
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
const _: () = assert!(core::mem::size_of::<H2State>() == 152);
// SAFETY: plain `#[repr(C)]` data with explicit padding; every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for H2State {}

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
            SETTINGS => !on_stream && self.len % 6 == 0,
            PING => !on_stream && self.len == 8,
            GOAWAY => !on_stream && self.len >= GOAWAY_PREFIX as u32,
            WINDOW_UPDATE => self.len == 4,
            _ => true,
        }
    }
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

impl H2State {
    /// The state made at a client preface: the preface itself is passed over in the
    /// request direction.
    pub fn at_preface(&mut self) {
        *self = Self::default();
        self.request.skip = PREFACE.len() as u32;
    }

    /// Streams the client opened: (highest − first) / 2 + 1 (client ids are odd and rise).
    pub fn streams(&self) -> u32 {
        if self.first_stream == 0 {
            0
        } else {
            (self.highest_stream - self.first_stream) / 2 + 1
        }
    }

    pub fn unparsed(&self) -> bool {
        self.flags & h2_flag::UNPARSED != 0
    }

    /// Applies a frame header sent by the client (`from_client`) or the server.
    #[inline(always)]
    pub fn on_frame(&mut self, header: &FrameHeader, from_client: bool) -> StreamChange {
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

/// The bytes of one transfer segment (an iovec, a buffer), read at an offset (`None`:
/// unreadable).
pub trait FrameBytes {
    fn header_at(&self, offset: u64) -> Option<[u8; FRAME_HEADER]>;
    fn prefix_at(&self, offset: u64) -> Option<[u8; GOAWAY_PREFIX]>;
    fn byte_at(&self, offset: u64) -> Option<u8>;
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
    /// More frames than [`MAX_FRAMES_PER_TRANSFER`] in one transfer.
    TooManyFrames,
}

/// Walks `len` bytes of one segment in `dir`, calling `on_unit` for each complete header
/// and `GOAWAY` code, with `budget` frames left for the transfer (decremented). Nothing is
/// read at or past `len`.
#[inline(always)]
pub fn walk(
    dir: &mut H2Direction,
    bytes: &impl FrameBytes,
    len: u64,
    budget: &mut u32,
    mut on_unit: impl FnMut(Unit),
) -> Result<(), Lost> {
    let mut offset: u64 = 0;
    let mut rounds = 0;
    while rounds < MAX_FRAMES_PER_TRANSFER {
        rounds += 1;
        let left = len.saturating_sub(offset);
        if u64::from(dir.skip) >= left {
            dir.skip -= left as u32;
            return Ok(());
        }
        offset += u64::from(dir.skip);
        dir.skip = 0;
        if *budget == 0 {
            return Err(Lost::TooManyFrames);
        }
        *budget -= 1;
        let left = len - offset;
        let goaway = dir.phase == phase::GOAWAY;
        let unit_len = if goaway { GOAWAY_PREFIX } else { FRAME_HEADER };
        let unit: [u8; FRAME_HEADER] = if dir.partial_len == 0 && left >= unit_len as u64 {
            offset += unit_len as u64;
            let whole = if goaway {
                bytes.prefix_at(offset - unit_len as u64).map(|p| {
                    let mut unit = [0u8; FRAME_HEADER];
                    unit[..GOAWAY_PREFIX].copy_from_slice(&p);
                    unit
                })
            } else {
                bytes.header_at(offset - unit_len as u64)
            };
            whole.ok_or(Lost::Sync)?
        } else {
            match collect(dir, bytes, offset, left, unit_len)? {
                Some(unit) => {
                    offset += (unit_len - usize::from(dir.partial_len)) as u64;
                    dir.partial_len = 0;
                    unit
                }
                None => return Ok(()),
            }
        };
        if goaway {
            dir.phase = phase::HEADER;
            dir.skip = dir.goaway_rest;
            on_unit(Unit::GoAway(u32::from_be_bytes([unit[4], unit[5], unit[6], unit[7]])));
            continue;
        }
        let header = FrameHeader::parse(&unit);
        if !header.plausible() {
            return Err(Lost::Sync);
        }
        if header.kind == frame_type::GOAWAY {
            dir.phase = phase::GOAWAY;
            dir.goaway_rest = header.len - GOAWAY_PREFIX as u32;
        } else {
            dir.skip = header.len;
        }
        on_unit(Unit::Header(header));
    }
    // Every round reads a unit or returns; `budget` stops the transfer first.
    Err(Lost::TooManyFrames)
}

/// Adds the segment's first bytes (at most `left`) to a header or `GOAWAY` prefix cut by
/// the end of the previous segment. `Some(unit)` when it is complete (`partial_len` still
/// says how many bytes were carried: the caller advances by the rest), `None` when the
/// segment ended first (all its bytes are carried).
#[inline(always)]
fn collect(
    dir: &mut H2Direction,
    bytes: &impl FrameBytes,
    offset: u64,
    left: u64,
    unit_len: usize,
) -> Result<Option<[u8; FRAME_HEADER]>, Lost> {
    let mut unit = [0u8; FRAME_HEADER];
    let carried = usize::from(dir.partial_len).min(dir.partial.len());
    let mut index = 0;
    while index < dir.partial.len() {
        if index < carried {
            unit[index] = dir.partial[index];
        }
        index += 1;
    }
    let mut have = carried;
    let mut read: u64 = 0;
    while have < unit_len && read < left && have < FRAME_HEADER {
        unit[have] = bytes.byte_at(offset + read).ok_or(Lost::Sync)?;
        have += 1;
        read += 1;
    }
    if have < unit_len {
        let mut index = 0;
        while index < dir.partial.len() {
            if index < have {
                dir.partial[index] = unit[index];
            }
            index += 1;
        }
        dir.partial_len = have as u8;
        return Ok(None);
    }
    Ok(Some(unit))
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
