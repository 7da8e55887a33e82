//! fentry/fexit backend (BTF trampolines): the cheapest hooks, on kernels that allow them.
//! Arguments are typed by the kernel's BTF, so only the socket pointer and return values are
//! used here and the programs load unchanged on any kernel with these functions.

use aya_ebpf::{
    macros::{fentry, fexit},
    programs::{FEntryContext, FExitContext},
};
use connscope_common::direction;

use crate::{conn, tracepoints::transfer};

/// `int tcp_connect(struct sock *sk)`, called from `tcp_v4_connect` in `connect()`:
/// <https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/tcp_output.c#L4150>
#[fentry(function = "tcp_connect")]
pub fn connscope_fentry_tcp_connect(ctx: FEntryContext) -> i32 {
    let sock: u64 = ctx.arg(0);
    conn::on_process_context(sock);
    0
}

/// `void tcp_close(struct sock *sk, long timeout)`, from `close()` in the owning process:
/// <https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/tcp.c#L3298>
#[fentry(function = "tcp_close")]
pub fn connscope_fentry_tcp_close(ctx: FEntryContext) -> i32 {
    let sock: u64 = ctx.arg(0);
    conn::on_process_context(sock);
    0
}

/// `int tcp_sendmsg(struct sock *sk, struct msghdr *msg, size_t size)`:
/// <https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/tcp.c#L1383>
#[fexit(function = "tcp_sendmsg")]
pub fn connscope_fexit_tcp_sendmsg(ctx: FExitContext) -> i32 {
    let sock: u64 = ctx.arg(0);
    let ret: i32 = ctx.arg(3);
    transfer(sock, direction::SEND, ret as i64, 0);
    0
}

/// `int tcp_recvmsg(struct sock *sk, struct msghdr *msg, size_t len, int flags,
/// int *addr_len)` (5.19+ signature):
/// <https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/tcp.c#L2930>
#[fexit(function = "tcp_recvmsg")]
pub fn connscope_fexit_tcp_recvmsg(ctx: FExitContext) -> i32 {
    let sock: u64 = ctx.arg(0);
    let flags: i32 = ctx.arg(3);
    let ret: i32 = ctx.arg(5);
    transfer(sock, direction::RECV, ret as i64, flags);
    0
}
