//! Types shared by the kernel programs (`connscope-ebpf`) and the agent.
//!
//! Every type is `#[repr(C)]` with fixed-width fields and explicit padding so both sides agree
//! byte for byte; a `const` assertion pins each size. Events start with an [`EventHeader`]
//! whose `kind` tells the agent which struct follows; the agent checks lengths before reading.
#![no_std]

use core::mem::size_of;

/// Length of a task's `comm` (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;
/// Bytes of payload captured at the start of an exchange turn (enough for an HTTP/1.x head's
/// request/status line and the headers that matter; the rest is never read).
pub const HEAD_LEN: usize = 512;

/// Default capacity of the per-socket map (overridable with `--bpf.max-connections`).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 65_536;

/// TCP states, as in the kernel's `include/net/tcp_states.h`.
pub mod tcp_state {
    pub const ESTABLISHED: i32 = 1;
    pub const SYN_SENT: i32 = 2;
    pub const SYN_RECV: i32 = 3;
    pub const FIN_WAIT1: i32 = 4;
    pub const FIN_WAIT2: i32 = 5;
    pub const TIME_WAIT: i32 = 6;
    pub const CLOSE: i32 = 7;
    pub const CLOSE_WAIT: i32 = 8;
    pub const LAST_ACK: i32 = 9;
    pub const LISTEN: i32 = 10;
    pub const CLOSING: i32 = 11;
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// Which end of the connection this socket is.
pub mod role {
    /// The local side called `connect()`.
    pub const CLIENT: u8 = 1;
    /// The local side accepted the connection.
    pub const SERVER: u8 = 2;
}

/// Which side started closing the connection.
pub mod closed_by {
    pub const UNKNOWN: u8 = 0;
    pub const LOCAL: u8 = 1;
    pub const PEER: u8 = 2;
}

/// How the first close happened.
pub mod close_kind {
    pub const NONE: u8 = 0;
    pub const FIN: u8 = 1;
    pub const RESET: u8 = 2;
}

/// Direction of the last payload seen on a socket.
pub mod direction {
    pub const NONE: u8 = 0;
    pub const SEND: u8 = 1;
    pub const RECV: u8 = 2;
}

/// Bits of [`Conn::flags`].
pub mod conn_flag {
    /// The three-way handshake completed.
    pub const ESTABLISHED: u32 = 1 << 0;
    /// `tgid`/`comm`/`cgroup_id` were taken in the owning process's context.
    pub const ATTRIBUTED: u32 = 1 << 1;
    /// An `Open` event was sent for this connection.
    pub const ANNOUNCED: u32 = 1 << 2;
    /// The local side sent a reset.
    pub const RESET_SENT: u32 = 1 << 3;
    /// The peer sent a reset.
    pub const RESET_RECEIVED: u32 = 1 << 4;
    /// The local side sent payload after the peer had started closing (keep-alive race).
    pub const SENT_AFTER_PEER_CLOSE: u32 = 1 << 5;
    /// No request was waiting for its response when the close started (the connection was
    /// idle between exchanges, or had none).
    pub const IDLE_AT_CLOSE: u32 = 1 << 6;
}

/// Addresses and ports of a socket, ports in host order. IPv4 addresses use the first
/// four bytes of each address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoints {
    pub family: u16,
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u16,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}
const _: () = assert!(size_of::<Endpoints>() == 40);

/// Per-socket state kept in the kernel for a connection's whole life (map value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conn {
    /// When the connection was first seen (SYN_SENT for clients, ESTABLISHED for servers).
    /// With the socket address it identifies the connection.
    pub open_ns: u64,
    /// When the handshake completed (0 until then).
    pub established_ns: u64,
    pub cgroup_id: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub last_send_ns: u64,
    pub last_recv_ns: u64,
    /// When the first FIN or reset was seen (0 while open).
    pub close_start_ns: u64,
    /// Exchanges (request/response turns) started on this connection.
    pub exchanges: u32,
    pub tgid: u32,
    /// [`conn_flag`] bits.
    pub flags: u32,
    pub role: u8,
    pub closed_by: u8,
    pub close_kind: u8,
    pub last_direction: u8,
    pub comm: [u8; COMM_LEN],
    pub endpoints: Endpoints,
}
const _: () = assert!(size_of::<Conn>() == 136);

/// Byte offsets of the `struct sock` fields the BTF tracepoint programs read, taken by the
/// agent from the running kernel's BTF (`/sys/kernel/btf/vmlinux`) and set as a global:
/// the programs then work on any kernel layout without being rebuilt.
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
}
const _: () = assert!(size_of::<SockLayout>() == 40);

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
}
const _: () = assert!(size_of::<FdLayout>() == 32);

/// Indexes of the `SETTINGS` array map, written by the agent after it attached the hooks.
pub mod setting {
    /// Count sends at the exit of write-like syscalls (no send hook on this kernel).
    pub const SYSCALL_SENDS: u32 = 0;
    /// Count receives at the exit of read-like syscalls (no receive hook on this kernel).
    pub const SYSCALL_RECVS: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// Type tag of a ring buffer record.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A connection is established and attributed ([`ConnEvent`]).
    Open = 1,
    /// A connection's socket was destroyed ([`ConnEvent`], final state).
    Close = 2,
    /// A request or response turn started ([`TurnEvent`]).
    Turn = 3,
}

impl EventKind {
    pub const fn from_u32(value: u32) -> Option<Self> {
        match value {
            1 => Some(Self::Open),
            2 => Some(Self::Close),
            3 => Some(Self::Turn),
            _ => None,
        }
    }
}

/// First bytes of every ring buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// An [`EventKind`] as `u32`.
    pub kind: u32,
    pub _pad: u32,
    /// Kernel address of the `struct sock`.
    pub sock: u64,
    /// `bpf_ktime_get_ns()` when the event happened.
    pub ts_ns: u64,
}
const _: () = assert!(size_of::<EventHeader>() == 24);

/// `Open` and `Close` records: the connection's state at that moment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEvent {
    pub header: EventHeader,
    pub conn: Conn,
}
const _: () = assert!(size_of::<ConnEvent>() == 160);

/// A new turn: the first payload of a request (client send / server receive) or of a
/// response (client receive / server send) after the other direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TurnEvent {
    pub header: EventHeader,
    /// Identifies the connection together with `header.sock`.
    pub open_ns: u64,
    /// Time since the previous payload in the other direction (0 for the first turn).
    pub gap_ns: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub exchanges: u32,
    /// How many bytes of `head` are valid.
    pub head_len: u32,
    pub tgid: u32,
    /// [`direction`] of this turn's payload.
    pub direction: u8,
    pub role: u8,
    pub _pad: [u8; 2],
    pub comm: [u8; COMM_LEN],
    pub head: [u8; HEAD_LEN],
}
const _: () = assert!(size_of::<TurnEvent>() == 600);

/// A turn record is sent with only `head_len` bytes of `head`: this is its fixed part.
pub const TURN_FIXED_LEN: usize = size_of::<TurnEvent>() - HEAD_LEN;

/// Index into the per-CPU loss counters (`LOST` map).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LostReason {
    /// The ring buffer had no room for an event.
    RingbufFull = 0,
    /// The per-socket map was full: a connection was not tracked.
    MapFull = 1,
    /// Payload on a socket opened before the agent started (not tracked).
    UntrackedSocket = 2,
    /// The payload head could not be read from the caller's memory.
    PayloadUnreadable = 3,
}

impl LostReason {
    pub const COUNT: u32 = 4;
    pub const ALL: [Self; Self::COUNT as usize] =
        [Self::RingbufFull, Self::MapFull, Self::UntrackedSocket, Self::PayloadUnreadable];

    /// The `reason` label value.
    pub const fn label(self) -> &'static str {
        match self {
            Self::RingbufFull => "ringbuf_full",
            Self::MapFull => "map_full",
            Self::UntrackedSocket => "untracked_socket",
            Self::PayloadUnreadable => "payload_unreadable",
        }
    }
}

/// The character a byte of a task's `comm` becomes in the `process` label: label-safe
/// ASCII is kept, anything else (spaces, quotes, control bytes, non-ASCII) becomes `_`.
pub const fn process_label_byte(byte: u8) -> u8 {
    match byte {
        b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'_' | b':' | b'+' | b'-' => byte,
        _ => b'_',
    }
}

/// System calls whose user buffer is stashed for payload heads, in the order of the
/// `PAYLOAD_SYSCALLS` global the agent fills with this architecture's numbers.
pub mod payload_syscall {
    pub const COUNT: usize = 8;
    pub const NAMES: [&str; COUNT] =
        ["read", "write", "recvfrom", "sendto", "readv", "writev", "recvmsg", "sendmsg"];
    /// `(fd, buf, len)`: the buffer is the second argument.
    pub const FLAT_END: usize = 4;
    /// `(fd, iov, iovcnt)`: the first iovec describes the buffer.
    pub const VECTORED_END: usize = 6;
    // The rest take `(fd, msghdr, flags)`.
}

/// Map names shared by both sides.
pub mod map_name {
    pub const CONNS: &str = "CONNS";
    pub const EVENTS: &str = "EVENTS";
    pub const LOST: &str = "LOST";
    pub const SETTINGS: &str = "SETTINGS";
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` data with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::Conn {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EventHeader {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockLayout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FdLayout {}
}
