//! The kernel↔user contract of connscope, shared by the eBPF programs (`connscope-ebpf`) and
//! the agent.
//!
//! - [`wire`]: the enums both sides read (`#[repr(u8)]`/`#[repr(u32)]`, checked conversions
//!   from the wire, one `label()` each), and which direction is a request.
//! - [`conn`]: the per-socket state kept in the kernel map.
//! - [`records`]: the ring buffer records (a tagged header, then one struct per kind).
//! - [`handover`]: what a stopping agent leaves for the next one.
//! - [`checkpoint`]: what a running agent keeps for the next one, should it crash.
//! - [`kernel_config`]: values the agent writes into the programs before loading them
//!   (struct offsets from the kernel's BTF, the syscall table, switches).
//! - [`capacity`]: map capacities.
//! - [`net`]: the kernel's TCP states, address families and protocol number.
//! - [`tls_record`]: the undecrypted-TLS record rule the kernel runs (fuzzed on the host).
//! - [`h2_frames`]: the HTTP/2 frame walk and stream state the kernel keeps (fuzzed on the
//!   host).
//! - [`names`]: program, map and global names, used by the programs' attributes' tests and by
//!   the loader alike.
//!
//! Every shared type is `#[repr(C)]` with fixed-width fields and explicit padding, and a
//! `const` assertion pins its size, so both sides agree byte for byte. Userspace reads them
//! from maps through `aya::Pod` (feature `user`), implemented beside each type.
#![no_std]

pub mod capacity;
pub mod checkpoint;
pub mod conn;
pub mod h2_frames;
pub mod handover;
pub mod kernel_config;
pub mod names;
pub mod net;
pub mod records;
pub mod tls_record;
pub mod wire;

pub use capacity::{
    DEFAULT_MAX_CONNECTIONS, DEFAULT_RINGBUF_BYTES, IN_FLIGHT_CALLS, MAX_H2_CONNECTIONS,
    MAX_LISTEN_PORTS, MAX_TLS_PROCESSES,
};
pub use checkpoint::{CheckpointSlot, JournalChunk};
pub use conn::{Conn, SslCall, conn_flag};
pub use handover::{CARRIED_CHUNKS, CarriedChunk, Handover, handover_flag};
pub use kernel_config::{
    BufferLayout, FdLayout, PAYLOAD_SYSCALLS, PayloadSyscall, PayloadSyscallSpec, PinSlot,
    ProgramConfig, Setting, SockLayout, UserBuffers,
};
pub use net::{AF_INET, AF_INET6, IPPROTO_TCP, tcp_state};
pub use records::{
    AttributeEvent, Attribution, COMM_LEN, ConnectFailedEvent, ConnectInFlight, Endpoints,
    EventHeader, HEAD_FIXED_LEN, HEAD_LEN, HeadEvent, Http2CloseEvent, ListenKey, OpenEvent,
    SnapshotEvent, process_label_byte,
};
pub use wire::{
    CloseKind, ClosedBy, ConnectFailure, Direction, EventKind, HeadContent, LostReason, Protocol,
    Role, is_request,
};
