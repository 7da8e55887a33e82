//! Maps shared by every program, and the small helpers that write to them.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use connscope_common::{Conn, DEFAULT_MAX_CONNECTIONS, LostReason, TurnEvent, setting};

use crate::payload::PendingPayload;

/// Per-socket state, keyed by the `struct sock` address. Bounded: when full, new
/// connections are counted as lost (`map_full`) and the host's traffic is unaffected.
#[map(name = "CONNS")]
pub static CONNS: HashMap<u64, Conn> = HashMap::with_max_entries(DEFAULT_MAX_CONNECTIONS, 0);

/// Boundary events (open, turn start, close) for the agent.
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Per-CPU scratch space where a new connection's state is built before it is inserted:
/// kernels before 6.13 limit the stack of a whole call chain to 512 bytes.
#[map(name = "CONN_SCRATCH")]
pub static CONN_SCRATCH: PerCpuArray<Conn> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch space where a turn record is built before it is sent at its real
/// length (fixed part plus the captured head only).
#[map(name = "TURN_SCRATCH")]
pub static TURN_SCRATCH: PerCpuArray<TurnEvent> = PerCpuArray::with_max_entries(1, 0);

/// `bpf_ringbuf_*` flags and query.
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
/// Wake the agent only once this much is waiting; it also drains on a short timer, so a
/// quiet host's events are never held for long. Waking on every record costs a context
/// switch per event.
const WAKEUP_BYTES: u64 = 128 << 10;

/// Flags for submitting a ring buffer record (see `WAKEUP_BYTES`).
#[inline(always)]
pub fn submit_flags() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// Per-CPU counters of what could not be recorded, indexed by [`LostReason`].
#[map(name = "LOST")]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LostReason::COUNT, 0);

/// The user buffer of a socket read or write system call in progress, keyed by pid_tgid,
/// so the payload head can be read when the socket layer reports the transfer.
#[map(name = "PENDING_PAYLOAD")]
pub static PENDING_PAYLOAD: HashMap<u64, PendingPayload> = HashMap::with_max_entries(16_384, 0);

/// Switches the agent sets after attaching (see `connscope_common::setting`).
#[map(name = "SETTINGS")]
pub static SETTINGS: Array<u32> = Array::with_max_entries(setting::COUNT, 0);

#[inline(always)]
pub fn setting_on(index: u32) -> bool {
    SETTINGS.get(index).is_some_and(|value| *value != 0)
}

/// Counts one lost item. Per-CPU, so a plain increment is race-free.
#[inline(always)]
pub fn count_lost(reason: LostReason) {
    if let Some(counter) = LOST.get_ptr_mut(reason as u32) {
        // SAFETY: the pointer comes from the map lookup and is valid for this CPU's slot.
        unsafe { *counter += 1 };
    }
}
