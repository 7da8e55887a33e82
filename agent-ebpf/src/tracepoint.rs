//! Classic tracepoints: the lifecycle source on kernels without BTF, and the tracepoint
//! backend of `tcp_sendmsg`/`tcp_recvmsg` there. Offsets come from each event's `format`
//! file under /sys/kernel/tracing/events; these layouts are unchanged from 4.16
//! (inet_sock_set_state) and 6.3 (sock_send_length / sock_recv_length) to today.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use connscope_common::{AF_INET, AF_INET6, ClosedBy, Direction, Endpoints, IPPROTO_TCP};

use crate::{
    fill::{self, Addresses},
    lifecycle,
    sock::SocketView,
    transfer,
};

/// The `inet_sock_set_state` record, which carries the socket's protocol and endpoints.
struct StateRecord<'a>(&'a TracePointContext);

impl StateRecord<'_> {
    fn read<T>(&self, offset: usize) -> Option<T> {
        // SAFETY: offsets of the tracepoint's format, read through the helper.
        unsafe { self.0.read_at(offset) }.ok()
    }
}

impl SocketView for StateRecord<'_> {
    fn is_tcp(&self) -> bool {
        self.read::<u16>(30) == Some(IPPROTO_TCP)
    }

    fn endpoints(&self, out: &mut Endpoints) -> bool {
        self.fill_endpoints(out).is_some()
    }

    /// The record's `sport` is `inet_sport`.
    fn source_port(&self) -> Option<u16> {
        self.read(24)
    }
}

impl StateRecord<'_> {
    fn fill_endpoints(&self, out: &mut Endpoints) -> Option<()> {
        let addresses = match self.read::<u16>(28)? {
            AF_INET => Addresses::V4 { local: self.read(32)?, remote: self.read(36)? },
            AF_INET6 => Addresses::V6 { local: self.read(40)?, remote: self.read(56)? },
            _ => return None,
        };
        // SAFETY: `out` is a valid, exclusive `Endpoints`.
        unsafe { fill::endpoints(out, self.read(24)?, self.read(26)?, &addresses) };
        Some(())
    }
}

/// `sock:inet_sock_set_state`, fired by `inet_sk_state_store`/`tcp_set_state`.
#[tracepoint]
pub fn connscope_inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let record = StateRecord(&ctx);
    if let (Some(sock), Some(old), Some(new)) =
        (record.read::<u64>(8), record.read::<i32>(16), record.read::<i32>(20))
    {
        lifecycle::on_state_change(sock, old, new, &record);
    }
    0
}

/// The `skaddr` field of the `tcp:*` events.
fn skaddr(ctx: &TracePointContext, offset: usize) -> Option<u64> {
    // SAFETY: offset of the format, read through the helper.
    unsafe { ctx.read_at::<u64>(offset) }.ok().filter(|&sock| sock != 0)
}

/// `tcp:tcp_destroy_sock`, fired by `tcp_v4_destroy_sock` once the socket is done.
#[tracepoint]
pub fn connscope_tcp_destroy_sock(ctx: TracePointContext) -> u32 {
    if let Some(sock) = skaddr(&ctx, 8) {
        lifecycle::on_destroy(sock);
    }
    0
}

/// `tcp:tcp_receive_reset` (`tcp_reset`, before the socket moves to CLOSE).
#[tracepoint]
pub fn connscope_tcp_receive_reset(ctx: TracePointContext) -> u32 {
    if let Some(sock) = skaddr(&ctx, 8) {
        lifecycle::on_reset(sock, ClosedBy::Peer);
    }
    0
}

/// `tcp:tcp_send_reset` (`skaddr` after `skbaddr`).
#[tracepoint]
pub fn connscope_tcp_send_reset(ctx: TracePointContext) -> u32 {
    if let Some(sock) = skaddr(&ctx, 16) {
        lifecycle::on_reset(sock, ClosedBy::Local);
    }
    0
}

/// `sock:sock_send_length`, from `sock_sendmsg` in the sending process.
#[tracepoint]
pub fn connscope_sock_send_length(ctx: TracePointContext) -> u32 {
    sock_length(&ctx, Direction::Send);
    0
}

/// `sock:sock_recv_length`, from `sock_recvmsg` in the receiving process.
#[tracepoint]
pub fn connscope_sock_recv_length(ctx: TracePointContext) -> u32 {
    sock_length(&ctx, Direction::Recv);
    0
}

fn sock_length(ctx: &TracePointContext, direction: Direction) {
    // SAFETY (all reads): offsets of the shared `sock_msg_length` format.
    let protocol: Option<u16> = unsafe { ctx.read_at(18) }.ok();
    if protocol != Some(IPPROTO_TCP) {
        return;
    }
    let (Ok(sock), Ok(ret), Ok(flags)) =
        (unsafe { ctx.read_at::<u64>(8) }, unsafe { ctx.read_at::<i32>(20) }, unsafe {
            ctx.read_at::<i32>(24)
        })
    else {
        return;
    };
    transfer::transfer(sock, direction, i64::from(ret), flags, || true);
}
