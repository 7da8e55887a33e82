//! Per-socket state in the kernel map (`CONNS`), and the idle-gap buckets the kernel counts.
//!
//! Steady keep-alive traffic never leaves the kernel: requests, bytes and idle gaps are
//! counted here, and the agent reads the cumulative values from `Progress` and `Close`
//! snapshots (or a lookup). Fields only needed to announce a connection (endpoints, process)
//! travel in the `Open`/`Attribute` records instead, which keeps a tracked socket small.

use core::mem::size_of;

use crate::{ClosedBy, Direction, Protocol, Role};

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

/// Gap bucket counts are `u8`s that wrap. The kernel sends a `Progress` snapshot whenever a
/// bucket count reaches a multiple of this, so the agent never misses a whole wrap: it sees
/// every bucket at least once per 128 increments and takes differences modulo 256.
pub const GAP_REPORT_EVERY: u8 = 128;
/// A request that follows at least this much idle time sends a `Progress` snapshot. The
/// agent re-reads recently active connections every [`SWEEP_INTERVAL_NS`]; a connection it
/// stopped re-reading (quiet for a whole sweep) is announced again by this rule.
pub const PROGRESS_AFTER_IDLE_NS: u64 = 500_000_000;
/// How often the agent re-reads the state of connections that were active recently.
pub const SWEEP_INTERVAL_NS: u64 = 1_000_000_000;
const _: () = assert!(PROGRESS_AFTER_IDLE_NS < SWEEP_INTERVAL_NS);

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
    /// No request was waiting for its response when the close started.
    pub const IDLE_AT_CLOSE: u16 = 1 << 4;
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
}

/// Per-socket state kept in the kernel for a connection's whole life (map value). All
/// counters are cumulative from the start of tracking.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conn {
    /// When tracking started (the connection was established). With the socket address it
    /// identifies the connection.
    pub open_ns: u64,
    /// The last payload transfer, either direction (0 before the first).
    pub last_ns: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Sum of the idle gaps counted in `gap_buckets`.
    pub gap_sum_ns: u64,
    /// Exchanges (requests) started on this connection.
    pub exchanges: u32,
    /// Fingerprints of the last request and response heads sent to the agent.
    pub request_print: u32,
    pub response_print: u32,
    /// Idle time from the last transfer to the start of the close, in µs (saturating).
    pub close_idle_us: u32,
    /// [`conn_flag`] bits.
    pub flags: u16,
    /// [`Role`], [`ClosedBy`], `CloseKind`, last [`Direction`] and [`Protocol`] as bytes.
    pub role: u8,
    pub closed_by: u8,
    pub close_kind: u8,
    pub last_direction: u8,
    pub protocol: u8,
    pub _pad: u8,
    /// Idle gaps per bucket of [`IDLE_BOUNDS_NS`], wrapping (see [`GAP_REPORT_EVERY`]).
    pub gap_buckets: [u8; GAP_BUCKETS],
    pub _pad2: [u8; 6],
}
const _: () = assert!(size_of::<Conn>() == 88);

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
}
