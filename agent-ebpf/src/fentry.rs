//! fentry/fexit backend (BTF trampolines): the cheapest hooks, on kernels that allow them.
//! Arguments are typed by the kernel's BTF; the agent picks the `tcp_recvmsg` program that
//! matches the kernel's prototype (it lost its `nonblock` argument in 5.19, and `addr_len`
//! later).

use aya_ebpf::{
    macros::{fentry, fexit},
    programs::{FEntryContext, FExitContext},
};
use connscope_common::Direction;

use crate::{tracking, transfer};

/// `int tcp_connect(struct sock *sk)`, from `tcp_v4_connect` in `connect()`:
/// <https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/tcp_output.c#L4150>
#[fentry(function = "tcp_connect")]
pub fn connscope_fentry_tcp_connect(ctx: FEntryContext) -> i32 {
    tracking::on_process_context(ctx.arg(0));
    0
}

/// `void tcp_close(struct sock *sk, long timeout)`, from `close()` in the owning process:
/// <https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/tcp.c#L3298>
#[fentry(function = "tcp_close")]
pub fn connscope_fentry_tcp_close(ctx: FEntryContext) -> i32 {
    tracking::on_process_context(ctx.arg(0));
    0
}

/// `int tcp_sendmsg(struct sock *sk, struct msghdr *msg, size_t size)`:
/// <https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/tcp.c#L1383>
#[fexit(function = "tcp_sendmsg")]
pub fn connscope_fexit_tcp_sendmsg(ctx: FExitContext) -> i32 {
    let ret: i32 = ctx.arg(3);
    transfer::transfer_at_exit(ctx.arg(0), Direction::Send, i64::from(ret), 0);
    0
}

/// `int tcp_recvmsg(struct sock *sk, struct msghdr *msg, size_t len, int flags,
/// int *addr_len)` (5.19+):
/// <https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/tcp.c#L2930>
#[fexit(function = "tcp_recvmsg")]
pub fn connscope_fexit_tcp_recvmsg(ctx: FExitContext) -> i32 {
    let flags: i32 = ctx.arg(3);
    let ret: i32 = ctx.arg(5);
    transfer::transfer_at_exit(ctx.arg(0), Direction::Recv, i64::from(ret), flags);
    0
}

/// `int tcp_recvmsg(struct sock *sk, struct msghdr *msg, size_t len, int nonblock,
/// int flags, int *addr_len)` (before 5.19):
/// <https://elixir.bootlin.com/linux/v5.10/source/net/ipv4/tcp.c#L2519>
#[fexit(function = "tcp_recvmsg")]
pub fn connscope_fexit_tcp_recvmsg_nonblock(ctx: FExitContext) -> i32 {
    let flags: i32 = ctx.arg(4);
    let ret: i32 = ctx.arg(6);
    transfer::transfer_at_exit(ctx.arg(0), Direction::Recv, i64::from(ret), flags);
    0
}

/// `int tcp_recvmsg(struct sock *sk, struct msghdr *msg, size_t len, int flags)` (kernels
/// that dropped `addr_len`).
#[fexit(function = "tcp_recvmsg")]
pub fn connscope_fexit_tcp_recvmsg_no_addr_len(ctx: FExitContext) -> i32 {
    let flags: i32 = ctx.arg(3);
    let ret: i32 = ctx.arg(4);
    transfer::transfer_at_exit(ctx.arg(0), Direction::Recv, i64::from(ret), flags);
    0
}
