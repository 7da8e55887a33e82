//! Every map of the programs, and the small helpers that write to them. The bottom layer:
//! it imports nothing from the rest of the crate.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use connscope_common::{
    CARRIED_CHUNKS, CarriedChunk, CheckpointSlot, Conn, ConnectInFlight, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_RINGBUF_BYTES, Handover, HeadEvent, IN_FLIGHT_CALLS, JournalChunk, ListenKey,
    LostReason, MAX_H2_CONNECTIONS, MAX_LISTEN_PORTS, PinSlot, Setting,
    checkpoint::{CHECKPOINT_SLOTS, journal_chunks},
    h2_frames::{H2State, Scratch},
    kernel_config::SOCK_COMMON_READ,
};

/// `BPF_F_NO_PREALLOC`: a tracked socket costs kernel memory only while it is tracked.
const NO_PREALLOC: u32 = 1;
/// `BPF_F_MMAPABLE`: an array userspace can map.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Per-socket state, keyed by the `struct sock` address. Bounded: when full, new
/// connections are counted as lost (`map_full`) and the host's traffic is unaffected.
#[map]
pub static CONNS: HashMap<u64, Conn> =
    HashMap::with_max_entries(DEFAULT_MAX_CONNECTIONS, NO_PREALLOC);

/// Records for the agent (see `connscope_common::records`).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RINGBUF_BYTES, 0);

/// Per-CPU counters of what could not be recorded, indexed by [`LostReason`].
#[map]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LostReason::COUNT, 0);

/// Switches the agent sets after attaching ([`Setting`]).
#[map]
pub static SETTINGS: Array<u32> = Array::with_max_entries(Setting::COUNT, 0);

/// The process and start time of a `connect()` in progress, by socket, until the handshake
/// completes and the connection is announced (with its connect time), or the connect fails.
/// LRU: a connect that ends without a state change we see leaves nothing behind for long.
#[map]
pub static CONNECTS_IN_FLIGHT: LruHashMap<u64, ConnectInFlight> =
    LruHashMap::with_max_entries(IN_FLIGHT_CALLS, 0);

/// Per-CPU space where a new connection's state is built before it is inserted, and where
/// the start of a `struct sock` is read at once: kernels before 6.13 allow 512 bytes of
/// stack for a program's whole call chain.
#[map]
pub static CONN_SCRATCH: PerCpuArray<Conn> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub static SOCK_SCRATCH: PerCpuArray<[u8; SOCK_COMMON_READ]> = PerCpuArray::with_max_entries(1, 0);

/// Listening sockets per {network namespace, port} (a count: `SO_REUSEPORT` and dual-stack
/// servers listen more than once on a port). Tells the role of an adopted socket. Kept by
/// the state changes to and from `LISTEN`; seeded by the agent from `/proc` at start.
#[map]
pub static LISTEN_PORTS: HashMap<ListenKey, u32> = HashMap::with_max_entries(MAX_LISTEN_PORTS, 0);

/// [`PinSlot`] values: which generation of programs runs, and the pinned state's layout.
#[map]
pub static PIN_STATE: Array<u64> = Array::with_max_entries(PinSlot::COUNT, 0);

/// Written by a stopping agent, read and emptied by the next (`connscope_common::handover`);
/// no program touches it. It lives here so the loader creates and pins it with the rest.
#[map]
pub static HANDOVER: HashMap<u64, Handover> =
    HashMap::with_max_entries(DEFAULT_MAX_CONNECTIONS + 1, NO_PREALLOC);

/// Written by a stopping agent before the handover's header, read and emptied by the next:
/// its metric values, so counters continue across agents (`connscope_common::handover`).
#[map]
pub static CARRIED_METRICS: HashMap<u32, CarriedChunk> =
    HashMap::with_max_entries(CARRIED_CHUNKS, NO_PREALLOC);

/// The crash checkpoint (`connscope_common::checkpoint`), written by the running agent and
/// read by the next after a crash; no program touches these. They live here so the loader
/// creates and pins them with the rest.
#[map]
pub static CHECKPOINT: Array<CheckpointSlot> = Array::with_max_entries(CHECKPOINT_SLOTS, 0);

#[map]
pub static CHECKPOINT_CONNS: HashMap<u64, Handover> =
    HashMap::with_max_entries(CHECKPOINT_SLOTS * DEFAULT_MAX_CONNECTIONS, NO_PREALLOC);

#[map]
pub static CHECKPOINT_METRICS: HashMap<u32, CarriedChunk> =
    HashMap::with_max_entries(CHECKPOINT_SLOTS * CARRIED_CHUNKS, NO_PREALLOC);

/// Sized by the agent for its `--bpf.ringbuf-bytes` (`journal_chunks`); mapped into the
/// agent's memory (`BPF_F_MMAPABLE`), so a journal write is a copy, not a syscall.
#[map]
pub static JOURNAL: Array<JournalChunk> =
    Array::with_max_entries(journal_chunks(DEFAULT_RINGBUF_BYTES), BPF_F_MMAPABLE);

/// HTTP/2 connections' frame walks and streams, by socket: made at the client preface,
/// removed at the socket's destruction (or when frame sync is lost). Apart from `CONNS`, so
/// no other connection pays for it.
#[map]
pub static H2_CONNS: HashMap<u64, H2State> =
    HashMap::with_max_entries(MAX_H2_CONNECTIONS, NO_PREALLOC);

/// Per-CPU space where a new HTTP/2 state is built before it is inserted.
#[map]
pub static H2_SCRATCH: PerCpuArray<H2State> = PerCpuArray::with_max_entries(1, 0);

/// Where the HTTP/2 walk of one transfer is (`h2::connscope_h2_step`): kept in a map, not in
/// registers, so the verifier does not tell the frame loop's states apart by it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct WalkCursor {
    /// The transfer to walk, left by the transfer path for the hook to walk once it is
    /// counted (`h2::walk_pending`): its socket, length, direction and kind of segments
    /// (`h2::on_payload`), the buffer or iovec array and its length or count.
    pub sock: u64,
    pub packed: u64,
    pub addr: u64,
    pub len: u64,
    /// Non-zero while a transfer waits to be walked.
    pub pending: u64,
    /// The segment being walked, and the offset in it.
    pub segment: UserBuffer,
    pub offset: u64,
    /// Bytes of the transfer not walked yet (this segment's included).
    pub left: u64,
    /// The next iovec's address, and the end of those walked.
    pub iov_next: u64,
    pub iov_end: u64,
    /// A `WALK_*` value.
    pub status: u64,
    /// Non-zero when the transfer walked was sent by the client.
    pub from_client: u64,
    /// What each step reads.
    pub scratch: Scratch,
    /// The connection's `H2_CONNS` value while its transfer is walked: copied in before the
    /// walk and back after it, so a step (`h2::connscope_h2_step`) finds it here with no
    /// hash lookup.
    pub state: H2State,
}

#[map]
pub static H2_CURSOR: PerCpuArray<WalkCursor> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU space where a head record is read and built before it is sent at its real length.
#[map]
pub static HEAD_SCRATCH: PerCpuArray<HeadEvent> = PerCpuArray::with_max_entries(1, 0);

/// A user buffer: address and length.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UserBuffer {
    pub addr: u64,
    pub len: u64,
}

/// Kernels without `bpf_task_pt_regs`: the buffer of a read/write-like system call in
/// progress, by pid_tgid (stashed at `sys_enter`).
#[map]
pub static SYSCALL_STASH: HashMap<u64, UserBuffer> = HashMap::with_max_entries(IN_FLIGHT_CALLS, 0);

/// kprobe backend: socket and receive flags of a `tcp_sendmsg`/`tcp_recvmsg` in progress,
/// by pid_tgid (the kretprobe cannot see the arguments).
#[map]
pub static CALLS_IN_FLIGHT: HashMap<u64, [u64; 2]> = HashMap::with_max_entries(IN_FLIGHT_CALLS, 0);

/// The benchmark's floor arm: bytes per socket, nothing else.
#[map]
pub static FLOOR_BYTES: HashMap<u64, u64> = HashMap::with_max_entries(DEFAULT_MAX_CONNECTIONS, 0);

/// `bpf_ringbuf_*` flags and query.
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
/// Wake the agent only once this much is waiting; it also drains on a short timer, so a
/// quiet host's records are never held for long. Waking on every record costs a context
/// switch per record.
const WAKEUP_BYTES: u64 = 128 << 10;
/// While that much stays waiting (the agent is woken but not drained yet), a CPU wakes it
/// again at most this often. Each wakeup is an interrupt (`irq_work`: a self-IPI, a VM exit
/// under a hypervisor): waking on every record above the mark took a third of the programs'
/// time under `Connection: close` load (perf, docs/performance.md).
const REWAKE_AFTER_NS: u64 = 1_000_000;

/// When this CPU last woke the agent (`bpf_ktime_get_ns`). Per generation, not pinned.
#[map]
pub static LAST_WAKEUP: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Flags for submitting a ring buffer record (see `WAKEUP_BYTES`, `REWAKE_AFTER_NS`).
#[inline(always)]
pub fn submit_flags() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA) < WAKEUP_BYTES {
        return BPF_RB_NO_WAKEUP;
    }
    let Some(last) = LAST_WAKEUP.get_ptr_mut(0) else { return BPF_RB_FORCE_WAKEUP };
    // SAFETY: `bpf_ktime_get_ns` has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: the pointer comes from the map lookup and is valid for this CPU's slot.
    unsafe {
        if now.wrapping_sub(*last) < REWAKE_AFTER_NS {
            return BPF_RB_NO_WAKEUP;
        }
        *last = now;
    }
    BPF_RB_FORCE_WAKEUP
}

#[inline(always)]
pub fn setting_on(setting: Setting) -> bool {
    SETTINGS.get(setting as u32).is_some_and(|value| *value != 0)
}

/// Counts one lost item. Per-CPU, so a plain increment is race-free.
#[inline(always)]
pub fn count_lost(reason: LostReason) {
    if let Some(counter) = LOST.get_ptr_mut(reason as u32) {
        // SAFETY: the pointer comes from the map lookup and is valid for this CPU's slot.
        unsafe { *counter += 1 };
    }
}
