//! Per-socket state in the kernel map (`CONNS`), and the idle-gap buckets the kernel counts.
//!
//! Steady keep-alive traffic never leaves the kernel: requests, bytes and idle gaps are
//! counted here, and the agent reads the cumulative values from `Progress` and `Close`
//! snapshots (or a lookup). Fields only needed to announce a connection (endpoints, process)
//! travel in the `Open`/`Attribute` records instead, which keeps a tracked socket small.

use core::mem::size_of;

use crate::{CloseKind, ClosedBy, Direction, Protocol, Role};

/// Upper bounds of the idle-gap histogram (`connscope_connection_idle_seconds`), in
/// nanoseconds: 1 ms to 300 s, with the common keep-alive timeouts (5, 15, 60, 75 s).
pub const IDLE_BOUNDS_NS: [u64; 17] = [
    1_000_000,
    5_000_000,
    10_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_000_000_000,
    5_000_000_000,
    10_000_000_000,
    15_000_000_000,
    30_000_000_000,
    60_000_000_000,
    75_000_000_000,
    120_000_000_000,
    300_000_000_000,
];
/// Buckets counted per connection: one per bound, plus the overflow (`+Inf`) bucket.
pub const GAP_BUCKETS: usize = IDLE_BOUNDS_NS.len() + 1;

/// Index of the bucket a gap falls in (Prometheus `le`: the first bound not below it).
#[inline(always)]
pub fn gap_bucket(gap_ns: u64) -> usize {
    let mut index = 0;
    while index < IDLE_BOUNDS_NS.len() {
        if gap_ns <= IDLE_BOUNDS_NS[index] {
            return index;
        }
        index += 1;
    }
    IDLE_BOUNDS_NS.len()
}

/// Gap bucket counts wrap. The kernel sends a `Progress` snapshot whenever a bucket count
/// reaches a multiple of its [`gap_report_every`], so the agent never misses a whole wrap: it
/// sees every bucket at least once per that many increments and takes differences modulo
/// [`gap_count_modulus`].
pub const GAP_REPORT_EVERY: u8 = 128;
/// Buckets up to [`PROGRESS_AFTER_IDLE_NS`] (500 ms) count in a byte each. The longer ones
/// count in 4 bits: a gap that long sends a snapshot anyway, so their counts change by one
/// between snapshots, and the four bytes saved keep [`Conn`] at 64 with
/// [`Conn::send_seq`].
pub const SHORT_GAP_BUCKETS: usize = 7;
const _: () = assert!(IDLE_BOUNDS_NS[SHORT_GAP_BUCKETS - 1] == PROGRESS_AFTER_IDLE_NS);
const LONG_GAP_BUCKETS: usize = GAP_BUCKETS - SHORT_GAP_BUCKETS;
const LONG_GAP_REPORT_EVERY: u8 = 8;

/// How many increments of `bucket` may pass before the kernel reports it.
pub const fn gap_report_every(bucket: usize) -> u8 {
    if bucket < SHORT_GAP_BUCKETS { GAP_REPORT_EVERY } else { LONG_GAP_REPORT_EVERY }
}

/// Counts of `bucket` are kept modulo this.
pub const fn gap_count_modulus(bucket: usize) -> u16 {
    if bucket < SHORT_GAP_BUCKETS { 256 } else { 16 }
}

/// Idle gaps per bucket of [`IDLE_BOUNDS_NS`], wrapping: a byte per short bucket, a nibble
/// per long one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GapCounts {
    short: [u8; SHORT_GAP_BUCKETS],
    long: [u8; LONG_GAP_BUCKETS.div_ceil(2)],
    _pad: u8,
}
const _: () = assert!(size_of::<GapCounts>() == 14);

impl GapCounts {
    pub const ZERO: Self =
        Self { short: [0; SHORT_GAP_BUCKETS], long: [0; LONG_GAP_BUCKETS.div_ceil(2)], _pad: 0 };

    /// The count of `bucket` (modulo [`gap_count_modulus`]); 0 past the last bucket.
    #[inline(always)]
    pub fn get(&self, bucket: usize) -> u8 {
        match Self::slot(bucket) {
            Slot::Byte(index) => self.short.get(index).copied().unwrap_or(0),
            Slot::Nibble(index, shift) => {
                self.long.get(index).map_or(0, |pair| (pair >> shift) & 0x0f)
            }
        }
    }

    /// Counts a gap in `bucket`; true when the agent must see the counts now (the count
    /// reached a multiple of [`gap_report_every`]). Nothing past the last bucket.
    #[inline(always)]
    pub fn add(&mut self, bucket: usize) -> bool {
        if bucket >= GAP_BUCKETS {
            return false;
        }
        self.set(bucket, self.get(bucket).wrapping_add(1));
        self.get(bucket).is_multiple_of(gap_report_every(bucket))
    }

    /// Gaps counted in `bucket` since `earlier` (a snapshot of the same connection the agent
    /// saw within [`gap_report_every`] increments).
    pub fn since(&self, earlier: &Self, bucket: usize) -> u64 {
        let modulus = gap_count_modulus(bucket);
        let now = u16::from(self.get(bucket));
        let then = u16::from(earlier.get(bucket));
        u64::from((now + modulus - then) % modulus)
    }

    /// Sets the count of `bucket` (modulo [`gap_count_modulus`]).
    #[inline(always)]
    pub fn set(&mut self, bucket: usize, count: u8) {
        match Self::slot(bucket) {
            Slot::Byte(index) => {
                if let Some(byte) = self.short.get_mut(index) {
                    *byte = count;
                }
            }
            Slot::Nibble(index, shift) => {
                if let Some(pair) = self.long.get_mut(index) {
                    *pair = (*pair & !(0x0f << shift)) | ((count & 0x0f) << shift);
                }
            }
        }
    }

    /// Where `bucket`'s count lives.
    #[inline(always)]
    const fn slot(bucket: usize) -> Slot {
        if bucket < SHORT_GAP_BUCKETS {
            Slot::Byte(bucket)
        } else {
            let long = bucket - SHORT_GAP_BUCKETS;
            Slot::Nibble(long / 2, (long % 2) as u8 * 4)
        }
    }
}

/// A [`GapCounts`] bucket: a byte of `short`, or the nibble at `shift` in a byte of `long`.
enum Slot {
    Byte(usize),
    Nibble(usize, u8),
}

/// A request that follows at least this much idle time sends a `Progress` snapshot. The
/// agent re-reads recently active connections every [`SWEEP_INTERVAL_NS`]; a connection it
/// stopped re-reading (quiet for a whole sweep) is announced again by this rule.
pub const PROGRESS_AFTER_IDLE_NS: u64 = 500_000_000;
/// How often the agent re-reads the state of connections that were active recently.
pub const SWEEP_INTERVAL_NS: u64 = 1_000_000_000;
const _: () = assert!(PROGRESS_AFTER_IDLE_NS < SWEEP_INTERVAL_NS);

/// Set in [`Conn::close_idle_us`] when an exchange still awaited its response as the close
/// started (the close was not idle). Kept there, not in `flags`: only the close hooks write
/// that field, under the socket lock, while the send and receive hooks rewrite `flags`
/// without it, and a bit a FIN on another CPU set in `flags` meanwhile could be lost.
pub const CLOSE_AWAITING: u32 = 1 << 31;
/// The longest idle time [`Conn::close_idle_us`] holds (about 35 minutes).
pub const CLOSE_IDLE_MAX_US: u32 = CLOSE_AWAITING - 1;

/// Bits of [`Conn::flags`].
pub mod conn_flag {
    /// The owning process (tgid, comm, cgroup) was reported (`Open` for clients,
    /// `Attribute` for accepted sockets).
    pub const ATTRIBUTED: u16 = 1 << 0;
    /// The local side sent a reset.
    pub const RESET_SENT: u16 = 1 << 1;
    /// The peer sent a reset.
    pub const RESET_RECEIVED: u16 = 1 << 2;
    /// The local side sent payload after the peer had started closing (keep-alive race).
    pub const SENT_AFTER_PEER_CLOSE: u16 = 1 << 3;
    /// HTTP/2 whose frame sync was lost, or whose frame state found no room: no stream
    /// count (`h2_frames`; bit 4 was "idle at close", now `Conn::close_idle_us`'s
    /// `CLOSE_AWAITING`).
    pub const H2_UNPARSED: u16 = 1 << 4;
    /// A `1xx` interim response was seen: the request body and the final response that
    /// follow belong to the same exchange.
    pub const INTERIM: u16 = 1 << 5;
    /// A request-direction turn started and its request has not been seen yet: TLS
    /// handshake records, or the body of an HTTP/1.x request.
    pub const REQUEST_PENDING: u16 = 1 << 6;
    /// `101 Switching Protocols`: no more HTTP/1.x exchanges on this connection.
    pub const UPGRADED: u16 = 1 << 7;
    /// Established before the agent started, tracked from its first send or receive on:
    /// counts before adoption are unknown.
    pub const ADOPTED: u16 = 1 << 8;
    /// An exchange started and no response-direction payload followed yet: the connection
    /// is busy (the close reason `idle` and the `active` state need this, not the last
    /// direction: a TLS `close_notify` is sent in the request direction but asks nothing).
    pub const AWAITING_RESPONSE: u16 = 1 << 9;
    /// libssl's plaintext of this connection is seen (`SSL_read`/`SSL_write` uprobes):
    /// exchanges are counted on the plaintext; the ciphertext transfers add bytes only.
    pub const TLS_PLAINTEXT: u16 = 1 << 10;
    /// The close started with a reset (an abort), not a FIN: the `CloseKind`, kept as a
    /// flag so the map value stays small.
    pub const CLOSED_BY_RESET: u16 = 1 << 11;
    /// An inactive generation of programs counted a send or receive at a function's exit
    /// during a takeover: the active one checks the stream position of its next call
    /// (`transfer::transfer_at_exit` in the eBPF crate).
    pub const COUNTED_BY_OTHER_GENERATION: u16 = 1 << 12;
    /// Undecrypted TLS: the first handshake message the local side writes or reads in the
    /// request direction (the ClientHello) is still to be sent to the agent, which reads
    /// its ALPN (`HeadContent::TlsHello`). A lone 5-byte record header leaves it pending.
    pub const HELLO_PENDING_REQUEST: u16 = 1 << 13;
    /// The same for the response direction (the ServerHello).
    pub const HELLO_PENDING_RESPONSE: u16 = 1 << 14;
}

/// Per-socket state kept in the kernel for a connection's whole life (map value). All
/// counters are cumulative from the start of tracking; the narrow ones wrap and are
/// reported before a wrap could hide (see [`WRAP_REPORT_BIT`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conn {
    /// The last payload transfer, either direction; the open time until the first one.
    pub last_ns: u64,
    /// The low 32 bits of the open time (`CLOCK_MONOTONIC` ns): with the socket address
    /// it tells this connection from an earlier one on the same socket (the agent keeps
    /// the full open time from the `Open` record).
    pub open_token: u32,
    /// Sum of the idle gaps counted in `gap_buckets`, in µs, wrapping.
    pub gap_sum_us: u32,
    /// Payload bytes, wrapping.
    pub bytes_sent: u32,
    pub bytes_received: u32,
    /// Exchanges (requests) started on this connection.
    pub exchanges: u32,
    /// Lengths of the transfers whose request and response heads were last read and sent
    /// to the agent (0: read the next one; transfers over 65,535 bytes are not kept). A
    /// later turn of the same length repeats that head and is counted without reading it:
    /// see `exchange.rs` in the eBPF crate.
    pub request_len: u16,
    pub response_len: u16,
    /// The socket's `tcp_sock.copied_seq` after the last receive counted at the exit of
    /// `tcp_recvmsg` (fexit, kretprobe): across a restart both agents' programs can see one
    /// receive, and only the first counts it (see `transfer::transfer_at_exit` in the eBPF
    /// crate).
    pub recv_seq: u32,
    /// `tcp_sock.write_seq` after the last send counted at the exit of `tcp_sendmsg`, for
    /// the same reason (`transfer::transfer_at_exit` in the eBPF crate).
    pub send_seq: u32,
    /// Idle time from the last transfer to the start of the close, in µs (saturating at
    /// [`CLOSE_IDLE_MAX_US`]), and [`CLOSE_AWAITING`].
    pub close_idle_us: u32,
    /// [`conn_flag`] bits.
    pub flags: u16,
    /// [`Role`], [`ClosedBy`], last [`Direction`] and [`Protocol`] as bytes (the
    /// `CloseKind` is [`conn_flag::CLOSED_BY_RESET`]).
    pub role: u8,
    pub closed_by: u8,
    pub last_direction: u8,
    pub protocol: u8,
    /// Idle gaps per bucket of [`IDLE_BOUNDS_NS`].
    pub gaps: GapCounts,
}
/// 64 bytes: with the hash map's 48-byte element header, the key and the allocator's
/// 8-byte list node, a tracked socket takes one 128-byte kernel allocation.
const _: () = assert!(size_of::<Conn>() == 64);
// SAFETY: plain `#[repr(C)]` data with explicit padding; every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Conn {}

/// The low 32 bits of a monotonic time, as [`Conn::open_token`] keeps them.
pub const fn open_token(open_ns: u64) -> u32 {
    open_ns as u32
}

/// Whether adding to a wrapping `u32` counter flipped its top bit: the kernel then sends a
/// `Progress` snapshot. Consecutive snapshots the agent sees therefore differ by less than
/// 2^31 plus the last addition; for bytes that is one transfer (at most `MAX_RW_COUNT`, just
/// under 2^31), so differences modulo 2^32 are exact. For the gap sum the last addition is
/// one idle gap, which may be longer than 2^31 µs (36 min); the agent resolves that from
/// the time between the snapshots (`gap_sum_delta`).
pub const WRAP_REPORT_BIT: u32 = 1 << 31;

#[inline(always)]
pub const fn flipped_top_bit(before: u32, after: u32) -> bool {
    (before ^ after) & WRAP_REPORT_BIT != 0
}

/// Adds to a wrapping counter; true when the agent must see it now ([`flipped_top_bit`]).
#[inline(always)]
pub fn add_wrapping(counter: &mut u32, added: u32) -> bool {
    let before = *counter;
    *counter = before.wrapping_add(added);
    flipped_top_bit(before, *counter)
}

/// Idle time (µs) added to a gap sum between two snapshots of one connection, given the
/// sums' wrapping difference and the time between the snapshots' last transfers: the
/// added gaps lie within that time, and the agent's previous snapshot is recent (it
/// re-reads active connections every sweep), so the difference is the largest value
/// congruent to `wrapped` modulo 2^32 that fits in `interval_ns`.
pub const fn gap_sum_delta(wrapped: u32, interval_ns: u64) -> u64 {
    let wrapped = wrapped as u64;
    let interval_us = interval_ns / 1000;
    if interval_us <= wrapped {
        return wrapped;
    }
    wrapped + ((interval_us - wrapped) >> 32 << 32)
}

impl Conn {
    pub const fn role(&self) -> Option<Role> {
        Role::from_wire(self.role)
    }

    pub const fn closed_by(&self) -> ClosedBy {
        match ClosedBy::from_wire(self.closed_by) {
            Some(by) => by,
            None => ClosedBy::Unknown,
        }
    }

    /// Whether no exchange awaited its response as the close started (false while open).
    pub const fn idle_at_close(&self) -> bool {
        self.closed_by != ClosedBy::Unknown as u8 && self.close_idle_us & CLOSE_AWAITING == 0
    }

    /// How long the connection had been idle as the close started, in µs.
    pub const fn idle_before_close_us(&self) -> u32 {
        self.close_idle_us & CLOSE_IDLE_MAX_US
    }

    /// How the close started: `None` while open.
    pub const fn close_kind(&self) -> CloseKind {
        if self.closed_by == ClosedBy::Unknown as u8 {
            CloseKind::None
        } else if self.has(conn_flag::CLOSED_BY_RESET) {
            CloseKind::Reset
        } else {
            CloseKind::Fin
        }
    }

    pub const fn last_direction(&self) -> Direction {
        match Direction::from_wire(self.last_direction) {
            Some(direction) => direction,
            None => Direction::None,
        }
    }

    pub const fn protocol(&self) -> Protocol {
        match Protocol::from_wire(self.protocol) {
            Some(protocol) => protocol,
            None => Protocol::Unknown,
        }
    }

    pub const fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_fall_in_the_first_bucket_whose_bound_is_not_below_them() {
        assert_eq!(gap_bucket(0), 0);
        assert_eq!(gap_bucket(1_000_000), 0);
        assert_eq!(gap_bucket(1_000_001), 1);
        assert_eq!(gap_bucket(300_000_000_000), 16);
        assert_eq!(gap_bucket(u64::MAX), GAP_BUCKETS - 1);
    }

    #[test]
    fn gap_counts_wrap_at_their_width_and_report_before_a_whole_wrap() {
        let mut gaps = GapCounts::default();
        let short = 3;
        let long = GAP_BUCKETS - 1;
        let mut short_reports = 0;
        let mut long_reports = 0;
        for _ in 0..300 {
            short_reports += usize::from(gaps.add(short));
            long_reports += usize::from(gaps.add(long));
        }
        assert_eq!((gaps.get(short), gaps.get(long)), ((300 % 256) as u8, (300 % 16) as u8));
        assert_eq!((short_reports, long_reports), (300 / 128, 300 / 8));
        // Neighbouring nibbles stay apart, and differences are taken modulo the width.
        let earlier = gaps;
        for _ in 0..5 {
            gaps.add(long - 1);
        }
        assert_eq!(gaps.since(&earlier, long - 1), 5);
        assert_eq!(gaps.since(&earlier, long), 0);
        let mut later = gaps;
        later.set(long, 2);
        assert_eq!(later.since(&gaps, long), (2 + 16 - 300 % 16) as u64);
        assert_eq!(gaps.get(GAP_BUCKETS), 0);
        assert!(!gaps.add(GAP_BUCKETS));
    }

    #[test]
    fn gap_sums_resolve_wraps_from_the_time_between_snapshots() {
        // Short gaps: the wrapping difference is the answer.
        assert_eq!(gap_sum_delta(1_500, 2_000_000), 1_500);
        assert_eq!(gap_sum_delta(0u32.wrapping_sub(10).wrapping_add(20), 1_000_000), 10);
        // One gap of 2 h (more than a whole wrap of µs) right after the last snapshot.
        let two_hours_us: u64 = 7_200_000_000;
        let wrapped = two_hours_us as u32;
        assert_eq!(gap_sum_delta(wrapped, two_hours_us * 1000 + 3_000_000), two_hours_us);
        assert!(flipped_top_bit(WRAP_REPORT_BIT - 1, WRAP_REPORT_BIT));
        assert!(flipped_top_bit(u32::MAX, 0));
        assert!(!flipped_top_bit(5, 500));
    }
}

/// One libssl call in progress (`TLS_CALLS`, by pid_tgid), from its entry uprobe to its
/// return probe (reads, the handshake) or to its first ciphertext on a socket (writes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SslCall {
    pub ssl: u64,
    /// The caller's plaintext buffer (0 for the handshake).
    pub buf: u64,
    /// `SSL_read_ex`: where the call stores how many bytes it read; 0 when the return value
    /// says it (`SSL_read`) and for writes.
    pub moved_out: u64,
    /// `SSL_write`, `SSL_write_ex`: the plaintext's length (`num`), known at entry; 0 for
    /// the others.
    pub len: u64,
    /// The socket a transfer inside this call moved ciphertext on (0 until one did).
    pub sock: u64,
    /// [`Direction`](crate::Direction) of the plaintext; `None` for the handshake.
    pub direction: u8,
    pub _pad: [u8; 7],
}
const _: () = assert!(core::mem::size_of::<SslCall>() == 48);
