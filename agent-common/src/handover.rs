//! What a stopping agent leaves for the next one in the pinned `HANDOVER` map: the parts of
//! its per-connection state the kernel does not keep (labels, the counts already exported,
//! the HTTP session), so a connection that spans a restart is reported as if none happened.
//! Key 0 holds a header entry (no socket lives at address 0).
//!
//! Its metric values go in the pinned `CARRIED_METRICS` map ([`CarriedChunk`]), written before
//! the handover's header, so that the next agent's counters continue from them.

use core::mem::size_of;

/// Bits of [`Handover::flags`].
pub mod handover_flag {
    /// Established before an agent started (`connections_adopted_total`).
    pub const ADOPTED: u8 = 1 << 0;
    /// The process is known (`comm`, `cgroup_id` are set).
    pub const ATTRIBUTED: u8 = 1 << 1;
    /// Waiting for a response (the `active` state).
    pub const ACTIVE: u8 = 1 << 2;
    /// An HTTP session follows in the `http_*` fields.
    pub const HTTP: u8 = 1 << 3;
    pub const CONNECTION_CLOSE: u8 = 1 << 4;
    pub const HTTP10_CLOSE: u8 = 1 << 5;
    /// The last request head was HTTP/1.0 (else 1.1).
    pub const LAST_REQUEST_HTTP10: u8 = 1 << 6;
}

/// One tracked connection, or (key 0) the header: `open_ns` is when the handover was
/// written (`CLOCK_MONOTONIC`) and `exchanges` how many connections follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handover {
    pub open_ns: u64,
    pub cgroup_id: u64,
    /// The kernel's counts already added to the metrics (the agent's `Seen`): its
    /// wrapping counters, and the last transfer they include.
    pub last_ns: u64,
    pub bytes_sent: u32,
    pub bytes_received: u32,
    pub gap_sum_us: u32,
    pub _pad_counts: u32,
    /// HTTP requests counted on the connection.
    pub http_requests: u64,
    pub exchanges: u32,
    /// Exchanges whose requests are counted, and the advertised `Keep-Alive: max=` (first,
    /// latest; `u32::MAX`: none).
    pub http_accounted: u32,
    pub first_advertised_max: u32,
    pub last_advertised_max: u32,
    /// Requests in the last request head (0: none seen).
    pub last_request_count: u32,
    /// A `Role` and a `Protocol` as bytes.
    pub role: u8,
    pub protocol: u8,
    /// [`handover_flag`] bits.
    pub flags: u8,
    pub server_len: u8,
    pub gaps: crate::conn::GapCounts,
    pub comm: [u8; crate::COMM_LEN],
    /// The `server` label, `server_len` bytes.
    pub server: [u8; 48],
    pub _pad: [u8; 10],
}
const _: () = assert!(size_of::<Handover>() == 160);
// SAFETY: plain `#[repr(C)]` data with explicit padding; every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Handover {}

impl Handover {
    pub const fn zeroed() -> Self {
        Self {
            open_ns: 0,
            cgroup_id: 0,
            last_ns: 0,
            bytes_sent: 0,
            bytes_received: 0,
            _pad_counts: 0,
            gap_sum_us: 0,
            http_requests: 0,
            exchanges: 0,
            http_accounted: 0,
            first_advertised_max: u32::MAX,
            last_advertised_max: u32::MAX,
            last_request_count: 0,
            role: 0,
            protocol: 0,
            flags: 0,
            server_len: 0,
            gaps: crate::conn::GapCounts::ZERO,
            comm: [0; crate::COMM_LEN],
            server: [0; 48],
            _pad: [0; 10],
        }
    }

    pub const fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// Bytes of the carried metrics in one [`CarriedChunk`] (a map value of 4 KiB).
pub const CARRIED_CHUNK_BYTES: usize = 4092;
/// Chunks the `CARRIED_METRICS` map holds: about 4 MiB of gzipped exposition text, eight
/// times what the label caps' defaults filled need. Unpreallocated: empty while an agent runs.
pub const CARRIED_CHUNKS: u32 = 1024;

/// One piece of a stopping agent's counter, histogram and keep-alive gauge values (its
/// exposition text of those families, gzipped), keyed by position from 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CarriedChunk {
    /// Bytes of `bytes` in use.
    pub len: u32,
    pub bytes: [u8; CARRIED_CHUNK_BYTES],
}
const _: () = assert!(size_of::<CarriedChunk>() == 4096);
// SAFETY: plain `#[repr(C)]` data, a `u32` and bytes, no padding; every bit pattern is
// valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for CarriedChunk {}

impl CarriedChunk {
    pub const fn zeroed() -> Self {
        Self { len: 0, bytes: [0; CARRIED_CHUNK_BYTES] }
    }

    /// The bytes in use; empty when `len` is out of range.
    pub fn used(&self) -> &[u8] {
        self.bytes.get(..self.len as usize).unwrap_or_default()
    }
}
