//! Values the agent writes into the programs before loading them (globals in `.rodata`,
//! frozen, so the verifier prunes what a kernel does not need) and the `SETTINGS` switches
//! it sets after attaching.

use core::mem::size_of;

use crate::Direction;

/// Byte offsets of the `struct sock` fields the programs read, taken by the agent from the
/// running kernel's BTF: the programs then work on any kernel layout without a rebuild.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockLayout {
    /// `sk_protocol`, and its size in bytes (2 since 5.6; 1 when it was a bitfield).
    pub protocol: u32,
    pub protocol_size: u32,
    /// `__sk_common.skc_family`.
    pub family: u32,
    /// `__sk_common.skc_dport` (network order) and `skc_num` (host order).
    pub dport: u32,
    pub num: u32,
    /// `__sk_common.skc_daddr` / `skc_rcv_saddr` (IPv4).
    pub daddr: u32,
    pub rcv_saddr: u32,
    /// `__sk_common.skc_v6_daddr` / `skc_v6_rcv_saddr`.
    pub v6_daddr: u32,
    pub v6_rcv_saddr: u32,
    /// Non-zero once the agent filled the layout in.
    pub valid: u32,
    /// `__sk_common.skc_state` (one byte).
    pub state: u32,
    /// `__sk_common.skc_net`: the socket's `struct net *`.
    pub net: u32,
    /// `ns.inum` in `struct net`: the network namespace's inode number.
    pub net_inum: u32,
    /// Non-zero when the three fields above are known: sockets established before the agent
    /// started are adopted at their first send or receive.
    pub adopt: u32,
    /// `tcp_sock.copied_seq` (0: unknown): how a receive seen at `tcp_recvmsg`'s exit by two
    /// generations of programs is counted once.
    pub copied_seq: u32,
    /// `tcp_sock.write_seq` (0: unknown): the same for a send seen at `tcp_sendmsg`'s exit.
    pub write_seq: u32,
    /// `tcp_sock.snd_una` (0: unknown): read with `write_seq` at the end of a send after
    /// the peer's FIN, it tells a request the peer acknowledged (read before closing) from
    /// one it never did (`SENT_AFTER_PEER_CLOSE`).
    pub snd_una: u32,
    /// `tcp_sock.bytes_acked` (0: unknown), read at the peer's FIN while an exchange awaits
    /// its response: acknowledged bytes no send hook has counted yet are a response the
    /// peer read before closing.
    pub bytes_acked: u32,
    /// `icsk_ack.lrcvtime` of the `inet_connection_sock` at the start of a `tcp_sock`: the
    /// jiffies of the last data segment received, kept in `lrcvtime_bits` bits from bit
    /// `lrcvtime_shift` of the 32-bit word at byte `lrcvtime` (0: unknown; a plain `__u32`
    /// in the kernels of the matrix, read from its word should one make it a bitfield).
    /// Tells an adopted server end whether its request arrived after the agent started
    /// (`PinSlot::AdoptionStartJiffies`).
    pub lrcvtime: u32,
    pub lrcvtime_shift: u32,
    pub lrcvtime_bits: u32,
    /// `sock.sk_err` (0: unknown): the error a connecting socket failed with, read as it
    /// leaves `SYN_SENT` for `CLOSE` (`ConnectFailure::of`).
    pub sk_err: u32,
    /// `inet_sock.inet_sport` (network order; 0: unknown): the local port a connect picked.
    /// Read there rather than `skc_num`, which the move to `CLOSE` zeroes (`inet_put_port`)
    /// before the state change is traced; `inet_sport` stays until the socket is reused.
    pub sport: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<SockLayout>() == 96);
// SAFETY: plain `#[repr(C)]` data with explicit padding; every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SockLayout {}

/// Bytes of `struct sock` read at once to fill an [`Endpoints`](crate::Endpoints): every
/// `sock_common` field above lies in them (the agent checks this against the BTF).
pub const SOCK_COMMON_READ: usize = 96;

/// Byte offsets to go from a file descriptor of the current task to its `struct sock`
/// (`task->files->fdt->fd[fd]->private_data->sk`), from the kernel's BTF. Used to count
/// socket transfers at syscall exit on kernels without the `sock_send_length` and
/// `sock_recv_length` tracepoints (before 6.3) when neither fentry nor kprobes work.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FdLayout {
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    pub valid: u32,
    pub _pad: u32,
    /// `file.f_inode` and `inode.i_mode` (`file_inode` 0: unknown; `i_mode` is at 0 in
    /// every kernel of the matrix): a descriptor is a socket when its
    /// inode's type is `S_IFSOCK`, which lets the syscall-exit path adopt a socket it does
    /// not track yet (without them it counts only tracked ones).
    pub file_inode: u32,
    pub inode_mode: u32,
}
const _: () = assert!(size_of::<FdLayout>() == 40);
// SAFETY: plain `#[repr(C)]` data with explicit padding; every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for FdLayout {}

/// Where a send/receive hook finds the user buffer of the system call it runs in.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserBuffers {
    /// Payload heads are not read (`--http.capture-heads=false`).
    Off = 0,
    /// The task's saved user registers (`bpf_task_pt_regs`, 5.15+ with BTF): no syscall hook.
    TaskPtRegs = 1,
    /// A raw `sys_enter` hook stashes the buffer per thread (older kernels): a small cost on
    /// every read/write-like system call of the host.
    SyscallStash = 2,
}

/// Switches for the programs, set as the `PROGRAM_CONFIG` global before loading.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramConfig {
    /// A [`UserBuffers`] as `u32`.
    pub user_buffers: u32,
    /// 1 when the libssl uprobes may stash calls (`--tls.uprobes`): the send/receive hooks
    /// of undecrypted TLS then look a call up; 0 when they are off, so none can be in
    /// flight and the lookup is skipped.
    pub libssl_calls: u32,
}
const _: () = assert!(size_of::<ProgramConfig>() == 8);
// SAFETY: plain `#[repr(C)]` data with explicit padding; every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for ProgramConfig {}

impl Default for ProgramConfig {
    fn default() -> Self {
        Self { user_buffers: UserBuffers::Off as u32, libssl_calls: 0 }
    }
}

/// How a system call passes its buffer.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufferLayout {
    /// `(fd, buf, len)`.
    Flat = 0,
    /// `(fd, iov, iovcnt)`: the first iovec describes the head.
    Vectored = 1,
    /// `(fd, msghdr, flags)`: the first iovec of `msg_iov`.
    Message = 2,
}

/// A system call that moves socket payload through a user buffer.
#[derive(Clone, Copy, Debug)]
pub struct PayloadSyscallSpec {
    pub name: &'static str,
    pub direction: Direction,
    pub layout: BufferLayout,
}

/// The system calls whose buffer holds a payload head, by name: the agent resolves each
/// name to this architecture's number and writes the table as the `PAYLOAD_SYSCALLS` global.
pub const PAYLOAD_SYSCALLS: [PayloadSyscallSpec; 8] = [
    PayloadSyscallSpec { name: "read", direction: Direction::Recv, layout: BufferLayout::Flat },
    PayloadSyscallSpec { name: "write", direction: Direction::Send, layout: BufferLayout::Flat },
    PayloadSyscallSpec { name: "recvfrom", direction: Direction::Recv, layout: BufferLayout::Flat },
    PayloadSyscallSpec { name: "sendto", direction: Direction::Send, layout: BufferLayout::Flat },
    PayloadSyscallSpec {
        name: "readv",
        direction: Direction::Recv,
        layout: BufferLayout::Vectored,
    },
    PayloadSyscallSpec {
        name: "writev",
        direction: Direction::Send,
        layout: BufferLayout::Vectored,
    },
    PayloadSyscallSpec {
        name: "recvmsg",
        direction: Direction::Recv,
        layout: BufferLayout::Message,
    },
    PayloadSyscallSpec {
        name: "sendmsg",
        direction: Direction::Send,
        layout: BufferLayout::Message,
    },
];

/// One entry of the `PAYLOAD_SYSCALLS` global as the programs read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PayloadSyscall {
    /// This architecture's syscall number (`u64::MAX` for an unused slot).
    pub nr: u64,
    /// A [`Direction`] as `u8`.
    pub direction: u8,
    /// A [`BufferLayout`] as `u8`.
    pub layout: u8,
    pub _pad: [u8; 6],
}
const _: () = assert!(size_of::<PayloadSyscall>() == 16);
// SAFETY: plain `#[repr(C)]` data with explicit padding; every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PayloadSyscall {}

impl PayloadSyscall {
    pub const UNUSED: Self = Self { nr: u64::MAX, direction: 0, layout: 0, _pad: [0; 6] };

    pub const fn new(nr: u64, spec: &PayloadSyscallSpec) -> Self {
        Self { nr, direction: spec.direction as u8, layout: spec.layout as u8, _pad: [0; 6] }
    }
}

/// Indexes of the `SETTINGS` array map, written by the agent after it attached the hooks.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// Count sends at the exit of write-like syscalls (no send hook on this kernel).
    SyscallSends = 0,
    /// Count receives at the exit of read-like syscalls (no receive hook on this kernel).
    SyscallRecvs = 1,
}

impl Setting {
    pub const COUNT: u32 = 2;
}

/// Slots of the pinned `PIN_STATE` array (`u64` each).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinSlot {
    /// The generation whose programs run; programs of any other generation return at once.
    /// Set by an agent after it attached its own, so a takeover neither counts twice nor
    /// leaves a gap.
    ActiveGeneration = 0,
    /// [`contract_fingerprint`] of the agent that pinned the state.
    Fingerprint = 1,
    /// When the last takeover's trampoline updates were over (`CLOCK_MONOTONIC` ns;
    /// `u64::MAX` while one is under way, 0 before any). An fexit program does not run for a
    /// call in flight during an update, so a connection last counted before this time may
    /// have missed one: its next call looks for it (`transfer::recover_missed_turn` in the
    /// eBPF crate).
    TakeoverEndNs = 2,
    /// The kernel's jiffies just before this agent attached its hooks, written by the
    /// `ADOPTION_START` program (0: unknown). A receive no hook saw (at `tcp_recvmsg`'s exit,
    /// fexit and kretprobe, one already in progress then; on any backend, one that ended
    /// before the attach): a server end adopted at its response whose last data arrived
    /// after this counts that request (`adopt::request_read_in_flight_at_start` in the eBPF
    /// crate).
    AdoptionStartJiffies = 3,
    /// The pid of the agent that runs the pinned state (the last to take it over), and its
    /// start time (clock ticks after boot, `/proc/<pid>/stat`), which tells it from a later
    /// process given the same pid. A second agent waits for it to exit.
    OwnerPid = 4,
    OwnerStartTicks = 5,
    /// The crash checkpoint's commit word (`checkpoint::Commit`; 0: none).
    Checkpoint = 6,
    /// When the agent running the pinned state last showed it is alive (`CLOCK_MONOTONIC`
    /// ns, written every second; 0: never). Older than `OrphanAfterNs`, the programs turn
    /// themselves off ([`ORPHANED_GENERATION`]).
    Heartbeat = 7,
    /// How old the heartbeat may grow before the programs turn themselves off (ns; 0:
    /// never): [`PINNED_STATE_MAX_AGE_NS`], written by the agent at its takeover. Data
    /// rather than a constant of the programs, so a test can shorten it.
    OrphanAfterNs = 8,
}

impl PinSlot {
    pub const COUNT: u32 = 9;
}

/// How long pinned state serves a successor after its agent stopped: a handover, a
/// checkpoint or pinned programs older than this describe connections long gone, and the
/// next agent starts afresh. Pinned programs whose agent has been silent this long only
/// cost the host, so they stop counting.
pub const PINNED_STATE_MAX_AGE_NS: u64 = 600 * 1_000_000_000;

/// `PinSlot::ActiveGeneration` of orphaned pinned state: no generation counts. Written by
/// the first program that finds the heartbeat older than [`PINNED_STATE_MAX_AGE_NS`]; from
/// then on every hook returns after one array lookup until an agent replaces the state or
/// `connscope cleanup` detaches the programs.
pub const ORPHANED_GENERATION: u64 = u64::MAX;

/// Bumped whenever the meaning of pinned state changes without a change of size.
pub const PIN_FORMAT: u64 = 6;

/// Identifies the layout of the pinned state: the format number and the sizes of every
/// shared struct. An agent finding another fingerprint replaces the pinned state.
pub const fn contract_fingerprint() -> u64 {
    let sizes = [
        PIN_FORMAT as usize,
        size_of::<crate::Conn>(),
        size_of::<crate::OpenEvent>(),
        size_of::<crate::AttributeEvent>(),
        size_of::<crate::SnapshotEvent>(),
        size_of::<crate::HeadEvent>(),
        size_of::<crate::Attribution>(),
        size_of::<crate::ConnectInFlight>(),
        size_of::<crate::ConnectFailedEvent>(),
        size_of::<crate::ListenKey>(),
        size_of::<crate::Handover>(),
        size_of::<crate::SslCall>(),
        size_of::<crate::CheckpointSlot>(),
        size_of::<crate::h2_frames::H2State>(),
        crate::LostReason::COUNT as usize,
        crate::conn::GAP_BUCKETS,
    ];
    // FNV-1a over the sizes.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut index = 0;
    while index < sizes.len() {
        hash ^= sizes[index] as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
        index += 1;
    }
    hash
}
