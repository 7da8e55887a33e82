//! Map capacities both sides size: the defaults the agent's options may change, and the
//! fixed ones.

/// Default capacity of the per-socket map (`--bpf.max-connections`).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 65_536;
/// Default size of the kernel → agent ring buffer (`--bpf.ringbuf-bytes`).
pub const DEFAULT_RINGBUF_BYTES: u32 = 4 << 20;
/// Capacity of the per-thread maps that live for one call (connects in progress, kprobe
/// arguments, the syscall stash): threads inside such a call at once, host-wide.
pub const IN_FLIGHT_CALLS: u32 = 16_384;
/// Capacity of `LISTEN_PORTS`: listening ports, host-wide (all network namespaces).
pub const MAX_LISTEN_PORTS: u32 = 16_384;
/// Capacity of the per-process decryption maps (uprobe hits by process, processes the
/// agent stopped decrypting): processes that call libssl, host-wide. Past it the oldest
/// process's hit count is dropped (LRU), and it is counted again from its next hit.
pub const MAX_TLS_PROCESSES: u32 = 4_096;
/// Capacity of `H2_CONNS`: HTTP/2 connections followed frame by frame at once, host-wide.
/// Past it a new HTTP/2 connection is counted as `http2_unparsed`.
pub const MAX_H2_CONNECTIONS: u32 = 16_384;
