//! What a running agent keeps pinned so that the next one recovers after a crash (SIGKILL,
//! OOM kill, panic), when no handover is written: a write-ahead log of its state.
//!
//! - A **base** (one of two slots, written in turn): the agent's metric values (the carry's
//!   gzipped exposition, [`CarriedChunk`](crate::CarriedChunk)s in `CHECKPOINT_METRICS`,
//!   keyed [`metrics_key`]) and its live connections ([`Handover`](crate::Handover) entries
//!   in `CHECKPOINT_CONNS`, keyed [`connection_key`]), taken at ring buffer position
//!   [`CheckpointSlot::ring_pos`].
//! - A **journal** (`JOURNAL`, [`JournalChunk`]s): the ring buffer's bytes the agent consumed
//!   since that base, verbatim (record headers included), copied before it consumes them.
//! - A **commit word** (`PIN_STATE[PinSlot::Checkpoint]`, [`Commit`]): which slot is
//!   complete and how many journal bytes are. One `u64` store, so a kill never leaves it
//!   half written; a slot or journal being written is not named by it yet.
//!
//! Recovery: the base's values and connections, then the journal's records, then the ring
//! buffer from `ring_pos + journal bytes` on; each record is applied once.

use core::mem::size_of;

/// Bytes of one [`JournalChunk`].
pub const JOURNAL_CHUNK_BYTES: usize = 64 << 10;

/// The journal holds this many times `--bpf.ringbuf-bytes`.
pub const JOURNAL_RINGBUF_MULTIPLE: u32 = 2;

/// Chunks of the journal for a ring buffer of `ringbuf_bytes`: [`JOURNAL_RINGBUF_MULTIPLE`]
/// times its size, at least one chunk.
pub const fn journal_chunks(ringbuf_bytes: u32) -> u32 {
    let bytes = ringbuf_bytes as u64 * JOURNAL_RINGBUF_MULTIPLE as u64;
    let chunks = bytes.div_ceil(JOURNAL_CHUNK_BYTES as u64);
    if chunks == 0 { 1 } else { chunks as u32 }
}

/// Slots of the `CHECKPOINT` array (two bases, written in turn).
pub const CHECKPOINT_SLOTS: u32 = 2;

/// A slice of the journal, keyed by position from 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalChunk {
    pub bytes: [u8; JOURNAL_CHUNK_BYTES],
}
const _: () = assert!(size_of::<JournalChunk>() == JOURNAL_CHUNK_BYTES);
// SAFETY: plain bytes; every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for JournalChunk {}

/// One base's header: written after its metrics and connections, before the commit word
/// names its slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckpointSlot {
    /// The base's sequence number (1, 2, ...); the commit word names it too.
    pub seq: u64,
    /// When it was written (`CLOCK_MONOTONIC` ns).
    pub written_ns: u64,
    /// The ring buffer's consumer position its state includes every record before.
    pub ring_pos: u64,
    /// Entries of the slot in `CHECKPOINT_CONNS` and `CHECKPOINT_METRICS`.
    pub connections: u32,
    pub metric_chunks: u32,
    /// Bytes of the metric blob (the last chunk may be partly used).
    pub metric_bytes: u64,
}
const _: () = assert!(size_of::<CheckpointSlot>() == 40);
// SAFETY: plain `#[repr(C)]` integers without padding; every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for CheckpointSlot {}

/// The commit word: the complete base (slot and sequence) and the journal bytes complete
/// after it. 0: no usable checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Commit {
    pub slot: u32,
    /// The base's sequence, modulo 2^31.
    pub seq: u32,
    pub journal_bytes: u32,
}

const VALID: u64 = 1 << 63;
const SLOT_SHIFT: u32 = 62;
const SEQ_SHIFT: u32 = 32;
const SEQ_MASK: u64 = (1 << 30) - 1;

impl Commit {
    pub const fn encode(self) -> u64 {
        VALID
            | ((self.slot as u64 & 1) << SLOT_SHIFT)
            | ((self.seq as u64 & SEQ_MASK) << SEQ_SHIFT)
            | self.journal_bytes as u64
    }

    pub const fn decode(word: u64) -> Option<Self> {
        if word & VALID == 0 {
            return None;
        }
        Some(Self {
            slot: ((word >> SLOT_SHIFT) & 1) as u32,
            seq: ((word >> SEQ_SHIFT) & SEQ_MASK) as u32,
            journal_bytes: word as u32,
        })
    }

    /// Whether `slot`'s header is the base this word names.
    pub const fn names(self, slot: &CheckpointSlot) -> bool {
        slot.seq & SEQ_MASK == self.seq as u64
    }
}

/// `CHECKPOINT_CONNS` key of a connection in `slot`: the socket's address with the slot in
/// its low bits (a `struct sock` is at least 8-byte aligned). `slot + 1` alone is no socket.
pub const fn connection_key(sock: u64, slot: u32) -> u64 {
    sock | (slot as u64 + 1)
}

/// The slot and socket of a `CHECKPOINT_CONNS` key; `None` for a key of no slot.
pub const fn connection_of(key: u64) -> Option<(u32, u64)> {
    match key & 7 {
        1 => Some((0, key & !7)),
        2 => Some((1, key & !7)),
        _ => None,
    }
}

/// `CHECKPOINT_METRICS` key of chunk `index` of `slot`'s metric blob.
pub const fn metrics_key(slot: u32, index: u32) -> u32 {
    (slot << 16) | index
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_word_round_trips_and_zero_is_none() {
        let commit = Commit { slot: 1, seq: 77, journal_bytes: 8 << 20 };
        assert_eq!(Commit::decode(commit.encode()), Some(commit));
        assert_eq!(Commit::decode(0), None);
        let slot = CheckpointSlot { seq: 77, ..CheckpointSlot::default() };
        assert!(commit.names(&slot));
        assert!(!commit.names(&CheckpointSlot { seq: 78, ..slot }));
    }

    #[test]
    fn connection_keys_keep_the_socket_and_slot_apart() {
        let sock = 0xffff_8880_1234_5640;
        assert_eq!(connection_of(connection_key(sock, 0)), Some((0, sock)));
        assert_eq!(connection_of(connection_key(sock, 1)), Some((1, sock)));
        assert_eq!(connection_of(sock), None);
        assert_ne!(metrics_key(0, 5), metrics_key(1, 5));
    }
}
