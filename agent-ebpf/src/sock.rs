//! Reading `struct sock` at the offsets the agent took from the kernel's BTF.

use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf};
use connscope_common::{
    AF_INET, AF_INET6, ClosedBy, Conn, Direction, Endpoints, IPPROTO_TCP, ListenKey, SockLayout,
    kernel_config::SOCK_COMMON_READ,
};

use crate::{
    fill::{self, Addresses},
    globals::sock_layout,
    maps::SOCK_SCRATCH,
};

/// What a lifecycle hook can tell about the socket it fires for. Each backend reads it its
/// own way (BTF offsets or a tracepoint's record); only the transitions that start tracking
/// ask, so other state changes cost no reads.
pub trait SocketView {
    fn is_tcp(&self) -> bool;
    /// Fills `out` (a record in the ring buffer: no copy on the small stack); false when
    /// the socket is not IPv4/IPv6 or cannot be read.
    fn endpoints(&self, out: &mut Endpoints) -> bool;
    /// The {network namespace, local port} of a socket entering or leaving `LISTEN`; `None`
    /// where the namespace cannot be read (no BTF: adoption is off).
    fn listen_key(&self) -> Option<ListenKey> {
        None
    }
    /// The local port a connect picked (`inet_sport`, host order; 0: none); `None` where
    /// it cannot be read.
    fn source_port(&self) -> Option<u16>;
}

/// A socket read through the BTF offsets in `SOCK_LAYOUT`.
pub struct BtfSocket {
    pub sock: u64,
}

#[inline(always)]
fn read<T>(address: u64) -> Option<T> {
    // SAFETY: kernel memory read through the fault-tolerant helper.
    unsafe { bpf_probe_read_kernel(address as *const T) }.ok()
}

/// A `T` at `offset` in a copy of the start of the socket; `None` past the copy.
#[inline(always)]
fn field<T: Copy>(bytes: &[u8; SOCK_COMMON_READ], offset: u32) -> Option<T> {
    let offset = offset as usize;
    if offset > SOCK_COMMON_READ - core::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: in bounds (checked above); any bit pattern is a valid `T` (plain integers).
    Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().add(offset).cast::<T>()) })
}

impl SocketView for BtfSocket {
    fn is_tcp(&self) -> bool {
        let layout = sock_layout();
        let address = self.sock + u64::from(layout.protocol);
        let protocol = if layout.protocol_size == 1 {
            read::<u8>(address).map(u16::from)
        } else {
            read::<u16>(address)
        };
        layout.valid != 0 && protocol == Some(IPPROTO_TCP)
    }

    fn endpoints(&self, out: &mut Endpoints) -> bool {
        fill_endpoints(self.sock, out).is_some()
    }

    fn listen_key(&self) -> Option<ListenKey> {
        state_and_port(self.sock).map(|(_, key)| key)
    }

    fn source_port(&self) -> Option<u16> {
        let offset = sock_layout().sport;
        if offset == 0 {
            return None;
        }
        read::<u16>(self.sock + u64::from(offset)).map(u16::from_be)
    }
}

/// The TCP state of `sock` and its {network namespace, local port}: what adopting it
/// takes, from one copy of `sock_common` and one read of the namespace's inode number.
/// `None` without the adoption offsets (`SockLayout::adopt`).
pub fn state_and_port(sock: u64) -> Option<(u8, ListenKey)> {
    let layout = sock_layout();
    if layout.adopt == 0 {
        return None;
    }
    let bytes = sock_common(sock)?;
    let state: u8 = field(bytes, layout.state)?;
    let port: u16 = field(bytes, layout.num)?;
    let net: u64 = field(bytes, layout.net)?;
    let netns: u32 = read(net + u64::from(layout.net_inum))?;
    Some((state, ListenKey::new(netns, port)))
}

/// `tcp_sock.copied_seq` (how far the reader has consumed the stream) for a receive,
/// `tcp_sock.write_seq` (how far the writer has queued it) for a send; `None` when the
/// kernel's BTF did not give its offset.
#[inline(always)]
pub fn stream_seq(sock: u64, direction: Direction) -> Option<u32> {
    let layout = sock_layout();
    let offset = if direction == Direction::Send { layout.write_seq } else { layout.copied_seq };
    if offset == 0 {
        return None;
    }
    read(sock + u64::from(offset))
}

/// `sock.sk_err`, the socket's pending error (0: none); `None` without its offset.
#[inline(always)]
pub fn socket_error(sock: u64) -> Option<i32> {
    let offset = sock_layout().sk_err;
    if offset == 0 {
        return None;
    }
    read(sock + u64::from(offset))
}

/// Whether `sock` received its last data segment at most `window` jiffies before
/// `now_jiffies` (`icsk_ack.lrcvtime`, compared modulo its width); false without the offset.
#[inline(always)]
pub fn data_received_within(sock: u64, now_jiffies: u64, window: u64) -> bool {
    let layout = sock_layout();
    if layout.lrcvtime == 0 || layout.lrcvtime_bits == 0 {
        return false;
    }
    let Some(word) = read::<u32>(sock + u64::from(layout.lrcvtime)) else { return false };
    let mask = if layout.lrcvtime_bits >= 32 { u32::MAX } else { (1 << layout.lrcvtime_bits) - 1 };
    let received = (word >> (layout.lrcvtime_shift & 31)) & mask;
    let age = (now_jiffies as u32).wrapping_sub(received) & mask;
    u64::from(age) <= window
}

/// Whether the peer has acknowledged every byte queued on `sock` (`snd_una == write_seq`);
/// false when the kernel's BTF did not give both offsets.
#[inline(always)]
pub fn all_acknowledged(sock: u64) -> bool {
    let offset = sock_layout().snd_una;
    if offset == 0 {
        return false;
    }
    let acknowledged: Option<u32> = read(sock + u64::from(offset));
    acknowledged.is_some() && acknowledged == stream_seq(sock, Direction::Send)
}

/// The low 32 bits of the bytes the peer has acknowledged on `sock` (`tcp_sock.bytes_acked`,
/// counted from the connection's start), or `None` without the offset.
#[inline(always)]
pub fn bytes_acknowledged(sock: u64) -> Option<u32> {
    let offset = sock_layout().bytes_acked;
    if offset == 0 {
        return None;
    }
    read::<u64>(sock + u64::from(offset)).map(|bytes| bytes as u32)
}

/// The start of `sock` (the `sock_common` block), read at once into this CPU's scratch
/// space: one helper call instead of one per field, and off the small stack. Valid until
/// the next call in the same program.
#[inline(always)]
fn sock_common(sock: u64) -> Option<&'static [u8; SOCK_COMMON_READ]> {
    let bytes = SOCK_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot, used only until this program ends.
    let bytes = unsafe { &mut *bytes };
    // SAFETY: kernel memory read through the fault-tolerant helper into `bytes`.
    unsafe { bpf_probe_read_kernel_buf(sock as *const u8, bytes) }.ok()?;
    Some(bytes)
}

fn fill_endpoints(sock: u64, out: &mut Endpoints) -> Option<()> {
    let layout: SockLayout = sock_layout();
    let bytes = sock_common(sock)?;
    let family: u16 = field(bytes, layout.family)?;
    let dport: u16 = field(bytes, layout.dport)?;
    let addresses = match family {
        AF_INET => Addresses::V4 {
            local: field(bytes, layout.rcv_saddr)?,
            remote: field(bytes, layout.daddr)?,
        },
        AF_INET6 => Addresses::V6 {
            local: field(bytes, layout.v6_rcv_saddr)?,
            remote: field(bytes, layout.v6_daddr)?,
        },
        _ => return None,
    };
    // SAFETY: `out` is a valid, exclusive `Endpoints`.
    unsafe { fill::endpoints(out, field(bytes, layout.num)?, u16::from_be(dport), &addresses) };
    Some(())
}

/// Whether a send that just returned on `conn` went out after the peer closed: the hooks
/// run at the send's end, and on loopback the peer can read the request, answer it and
/// close before then. A peer that acknowledged every byte had read the request before its
/// FIN, so only bytes it never acknowledged make a keep-alive race.
#[inline(always)]
pub fn sent_after_peer_close(sock: u64, conn: &Conn) -> bool {
    conn.closed_by == ClosedBy::Peer as u8 && !all_acknowledged(sock)
}
