//! The kernel↔user contract of connscope, shared by the eBPF programs (`connscope-ebpf`) and
//! the agent.
//!
//! - [`wire`]: the enums both sides read (`#[repr(u8)]`/`#[repr(u32)]`, checked conversions
//!   from the wire, one `label()` each).
//! - [`conn`]: the per-socket state kept in the kernel map.
//! - [`records`]: the ring buffer records (a tagged header, then one struct per kind).
//! - [`kernel_config`]: values the agent writes into the programs before loading them
//!   (struct offsets from the kernel's BTF, the syscall table, switches).
//! - [`tls_record`]: the undecrypted-TLS record rule the kernel runs (fuzzed on the host).
//! - [`names`]: program, map and global names, used by the programs' attributes' tests and by
//!   the loader alike.
//!
//! Every shared type is `#[repr(C)]` with fixed-width fields and explicit padding, and a
//! `const` assertion pins its size, so both sides agree byte for byte.
#![no_std]

pub mod conn;
pub mod handover;
pub mod kernel_config;
pub mod names;
pub mod records;
pub mod tls_record;
pub mod wire;

pub use conn::{Conn, SslCall, conn_flag};
pub use handover::{CARRIED_CHUNKS, CarriedChunk, Handover, handover_flag};
pub use kernel_config::{
    BufferLayout, FdLayout, PAYLOAD_SYSCALLS, PayloadSyscall, PayloadSyscallSpec, PinSlot,
    ProgramConfig, Setting, SockLayout, UserBuffers,
};
pub use records::{
    AttributeEvent, Attribution, Endpoints, EventHeader, HEAD_FIXED_LEN, HeadEvent, ListenKey,
    OpenEvent, SnapshotEvent,
};
pub use wire::{CloseKind, ClosedBy, Direction, EventKind, LostReason, Protocol, Role};

/// Length of a task's `comm` (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;
/// Bytes of payload read at the start of a request or response head: enough for an HTTP/1.x
/// head's start line and the headers that matter; the rest is never read.
pub const HEAD_LEN: usize = 512;

/// Default capacity of the per-socket map (`--bpf.max-connections`).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 65_536;
/// Default size of the kernel → agent ring buffer (`--bpf.ringbuf-bytes`).
pub const DEFAULT_RINGBUF_BYTES: u32 = 4 << 20;
/// Capacity of the per-thread maps that live for one call (connects in progress, kprobe
/// arguments, the syscall stash): threads inside such a call at once, host-wide.
pub const IN_FLIGHT_CALLS: u32 = 16_384;
/// Capacity of `LISTEN_PORTS`: listening ports, host-wide (all network namespaces).
pub const MAX_LISTEN_PORTS: u32 = 16_384;

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

/// Whether payload moving in `direction` on a socket of `role` belongs to a request (client
/// sends, server receives) rather than a response.
pub const fn is_request(role: Role, direction: Direction) -> bool {
    matches!((role, direction), (Role::Client, Direction::Send) | (Role::Server, Direction::Recv))
}

/// The character a byte of a task's `comm` becomes in the `process` label: label-safe
/// ASCII is kept, anything else (spaces, quotes, control bytes, non-ASCII) becomes `_`.
pub const fn process_label_byte(byte: u8) -> u8 {
    match byte {
        b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'_' | b':' | b'+' | b'-' => byte,
        _ => b'_',
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (each): plain `#[repr(C)]` data with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::Conn {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockLayout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FdLayout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProgramConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PayloadSyscall {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ListenKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Handover {}
    // SAFETY: as above: a `u32` and bytes, no padding.
    unsafe impl aya::Pod for super::CarriedChunk {}
}
