//! BTF tracepoints (`tp_btf`): the lifecycle source wherever the kernel has BTF, and the
//! tracepoint backend of `tcp_sendmsg`/`tcp_recvmsg` (`sock_send_length`/`sock_recv_length`,
//! 6.3+). Attached as raw tracepoint links: no trace record is built, and detaching does not
//! wait for an RCU grace period per tracepoint. Arguments are the tracepoints' `TP_PROTO`;
//! `struct sock` fields are read at the agent's BTF offsets (`sock::BtfSocket`).
//! <https://elixir.bootlin.com/linux/v6.18/source/include/trace/events/sock.h>

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use connscope_common::{ClosedBy, Direction};

use crate::{
    lifecycle,
    sock::{BtfSocket, SocketView as _},
    transfer,
};

/// `inet_sock_set_state(const struct sock *sk, const int oldstate, const int newstate)`.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn connscope_btf_inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    let sock = BtfSocket { sock: ctx.arg(0) };
    lifecycle::on_state_change(sock.sock, ctx.arg(1), ctx.arg(2), &sock);
    0
}

/// `tcp_destroy_sock(struct sock *sk)`, from `tcp_v4_destroy_sock`.
#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn connscope_btf_tcp_destroy_sock(ctx: BtfTracePointContext) -> i32 {
    lifecycle::on_destroy(ctx.arg(0));
    0
}

/// `tcp_receive_reset(struct sock *sk)`.
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn connscope_btf_tcp_receive_reset(ctx: BtfTracePointContext) -> i32 {
    lifecycle::on_reset(ctx.arg(0), ClosedBy::Peer);
    0
}

/// `tcp_send_reset(const struct sock *sk, const struct sk_buff *skb, ...)`: the socket may
/// be NULL for a reset answering a segment that matched none.
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn connscope_btf_tcp_send_reset(ctx: BtfTracePointContext) -> i32 {
    let sock: u64 = ctx.arg(0);
    if sock != 0 {
        lifecycle::on_reset(sock, ClosedBy::Local);
    }
    0
}

/// `sock_send_length(struct sock *sk, int ret, int flags)`, from `sock_sendmsg`.
#[btf_tracepoint(function = "sock_send_length")]
pub fn connscope_btf_sock_send_length(ctx: BtfTracePointContext) -> i32 {
    sock_length(&ctx, Direction::Send);
    0
}

/// `sock_recv_length(struct sock *sk, int ret, int flags)`, from `sock_recvmsg`.
#[btf_tracepoint(function = "sock_recv_length")]
pub fn connscope_btf_sock_recv_length(ctx: BtfTracePointContext) -> i32 {
    sock_length(&ctx, Direction::Recv);
    0
}

#[inline(always)]
fn sock_length(ctx: &BtfTracePointContext, direction: Direction) {
    let sock = BtfSocket { sock: ctx.arg(0) };
    let ret: i32 = ctx.arg(1);
    let flags: i32 = ctx.arg(2);
    transfer::transfer(sock.sock, direction, i64::from(ret), flags, || sock.is_tcp());
}
