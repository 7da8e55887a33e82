//! Ring buffer records. Each starts with an [`EventHeader`] whose `kind` ([`EventKind`])
//! tells which struct follows; the agent checks the length of every record before reading it.
//!
//! | kind | struct | when |
//! |---|---|---|
//! | `Open` | [`OpenEvent`] | a connection is established (endpoints; the process for clients) |
//! | `Attribute` | [`AttributeEvent`] | an accepted socket is first used by its process, with no head to carry it |
//! | `Head` | [`HeadEvent`] | a request or response head differs from the last one sent (and an accepted socket's process, at its first use); an undecrypted TLS connection's first hello in each direction |
//! | `Progress` | [`SnapshotEvent`] | counts the agent could otherwise miss (idle restart, bucket wrap) |
//! | `Close` | [`SnapshotEvent`] | the socket is destroyed: its final state |
//! | `ConnectFailed` | [`ConnectFailedEvent`] | a client's connect ended before establishment |
//! | `Http2Close` | [`Http2CloseEvent`] | an HTTP/2 connection's socket is destroyed, before its `Close` |

use core::mem::size_of;

use crate::{Conn, ConnectFailure, Direction, EventKind, Role, h2_frames::CONCURRENCY_BUCKETS};

/// Length of a task's `comm` (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;
/// Bytes of payload read at the start of a request or response head: enough for an HTTP/1.x
/// head's start line and the headers that matter; the rest is never read.
pub const HEAD_LEN: usize = 512;

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

impl EventHeader {
    pub const fn new(kind: EventKind, sock: u64, ts_ns: u64) -> Self {
        Self { kind: kind as u32, _pad: 0, sock, ts_ns }
    }
}

/// Addresses and ports of a socket, ports in host order. IPv4 addresses use the first
/// four bytes of each address. `align(8)` changes neither its size nor its offsets; it lets
/// the kernel fill the addresses with word stores.
#[repr(C, align(8))]
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
const _: () = assert!(core::mem::offset_of!(OpenEvent, endpoints) == 32);

/// The process that owns a socket, taken in its own context (never from softirq).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attribution {
    pub cgroup_id: u64,
    pub tgid: u32,
    /// Non-zero when the fields were filled in.
    pub valid: u32,
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(size_of::<Attribution>() == 32);

/// A `connect()` in progress (the `CONNECTS_IN_FLIGHT` map's value, by socket): its
/// process and when it entered `SYN_SENT`, kept out of [`Conn`] until the handshake ends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectInFlight {
    pub owner: Attribution,
    /// `bpf_ktime_get_ns()` at `CLOSE` → `SYN_SENT` (in `tcp_v4_connect`/`tcp_v6_connect`,
    /// just before the SYN is sent).
    pub syn_ns: u64,
}
const _: () = assert!(size_of::<ConnectInFlight>() == 40);

/// The character a byte of a task's `comm` becomes in the `process` label: label-safe
/// ASCII is kept, anything else (spaces, quotes, control bytes, non-ASCII) becomes `_`.
pub const fn process_label_byte(byte: u8) -> u8 {
    match byte {
        b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'_' | b':' | b'+' | b'-' => byte,
        _ => b'_',
    }
}

/// `Open`: a connection is established.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenEvent {
    pub header: EventHeader,
    /// When the connection was established (or adopted); its low bits are the
    /// connection's [`Conn::open_token`].
    pub open_ns: u64,
    pub endpoints: Endpoints,
    /// Valid for clients (taken in `connect()`); accepted sockets get an `Attribute` later.
    pub attribution: Attribution,
    /// A [`Role`] as `u8`.
    pub role: u8,
    /// Non-zero for a connection established before the agent started (adopted at its first
    /// send or receive; `open_ns` is the adoption time).
    pub adopted: u8,
    pub _pad: [u8; 6],
    /// Clients: nanoseconds from `SYN_SENT` to `ESTABLISHED` (the handshake, SYN
    /// retransmits included); 0 when the connect's start was not seen (servers, adopted
    /// connections, a connect begun before the agent).
    pub connect_ns: u64,
}
const _: () = assert!(size_of::<OpenEvent>() == 120);

impl OpenEvent {
    pub const fn role(&self) -> Option<Role> {
        Role::from_wire(self.role)
    }
}

/// `ConnectFailed`: a client's socket left `SYN_SENT` for `CLOSE` (the connect failed or
/// was given up); never tracked in `CONNS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectFailedEvent {
    pub header: EventHeader,
    /// The server end is `remote`; the local port is 0 when none was picked.
    pub endpoints: Endpoints,
    /// The connecting process (invalid when the connect began before the agent).
    pub attribution: Attribution,
    /// A [`ConnectFailure`] as `u8`.
    pub reason: u8,
    pub _pad: [u8; 7],
}
const _: () = assert!(size_of::<ConnectFailedEvent>() == 104);

impl ConnectFailedEvent {
    pub const fn reason(&self) -> Option<ConnectFailure> {
        ConnectFailure::from_wire(self.reason)
    }
}

/// Key of the `LISTEN_PORTS` map: a listening port in one network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenKey {
    /// Inode number of the network namespace (`/proc/<pid>/ns/net`).
    pub netns: u32,
    /// Local port, host order.
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<ListenKey>() == 8);
// SAFETY: plain `#[repr(C)]` data with explicit padding; every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for ListenKey {}

impl ListenKey {
    pub const fn new(netns: u32, port: u16) -> Self {
        Self { netns, port, _pad: 0 }
    }
}

/// `Attribute`: the process of an accepted connection, at its first use by that process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttributeEvent {
    pub header: EventHeader,
    /// [`Conn::open_token`] of the connection.
    pub open_token: u32,
    pub _pad: u32,
    pub attribution: Attribution,
}
const _: () = assert!(size_of::<AttributeEvent>() == 64);

/// `Progress` and `Close`: the connection's state at that moment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotEvent {
    pub header: EventHeader,
    pub conn: Conn,
}
const _: () = assert!(size_of::<SnapshotEvent>() == 88);

/// `Head`: the first bytes of a request or response whose turn is not a steady repeat of
/// the last head read in that direction (repeats are counted in the kernel only: see
/// `Conn::request_len`). Sent with only `head_len` bytes of `head`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadEvent {
    pub header: EventHeader,
    /// [`Conn::open_token`] of the connection.
    pub open_token: u32,
    pub _pad0: u32,
    /// `Conn::exchanges` when the head was seen: the exchange a request head starts.
    pub exchanges: u32,
    /// How many bytes of `head` are valid.
    pub head_len: u32,
    /// A [`Direction`] as `u8`.
    pub direction: u8,
    /// A [`Role`] as `u8`.
    pub role: u8,
    /// A [`crate::HeadContent`] as `u8`.
    pub content: u8,
    pub _pad: [u8; 5],
    /// Valid in the first record of an accepted socket's first use by its process: the
    /// attribution an `Attribute` record would otherwise carry (one record less per
    /// connection; `Attribute` remains for a first use that sends no head).
    pub attribution: Attribution,
    pub head: [u8; HEAD_LEN],
}
const _: () = assert!(size_of::<HeadEvent>() == 80 + HEAD_LEN);

/// A head record is sent with only `head_len` bytes of `head`: this is its fixed part.
pub const HEAD_FIXED_LEN: usize = size_of::<HeadEvent>() - HEAD_LEN;

impl HeadEvent {
    pub const fn direction(&self) -> Direction {
        match Direction::from_wire(self.direction) {
            Some(direction) => direction,
            None => Direction::None,
        }
    }

    pub const fn role(&self) -> Option<Role> {
        Role::from_wire(self.role)
    }
}

/// `Http2Close`: what the frame walk of an HTTP/2 connection found (`h2_frames::H2State`),
/// sent just before its `Close`. Its stream count is `Conn::exchanges`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Http2CloseEvent {
    pub header: EventHeader,
    /// [`Conn::open_token`] of the connection.
    pub open_token: u32,
    /// The first `GOAWAY`'s error code.
    pub goaway_code: u32,
    /// Who sent it: a [`Role`] as `u8`, 0 when none was seen.
    pub goaway_by: u8,
    pub _pad: [u8; 3],
    /// Streams in flight at each stream's opening: counts per bucket of
    /// `h2_frames::CONCURRENCY_BOUNDS`, and their sum.
    pub concurrency_sum: u32,
    pub concurrency: [u32; CONCURRENCY_BUCKETS],
}
const _: () = assert!(size_of::<Http2CloseEvent>() == 80);
