//! BTF tracepoints (`tp_btf`): the same kernel tracepoints as `tracepoints.rs`, attached as
//! raw tracepoint links. They skip building the trace record, and detaching them does not
//! wait for an RCU grace period per tracepoint, so the agent stops within a second even
//! under load. The arguments are the tracepoints' `TP_PROTO`; `struct sock` fields are read
//! at offsets the agent took from the kernel's BTF (`SOCK_LAYOUT`).

use aya_ebpf::{
    helpers::bpf_probe_read_kernel, macros::btf_tracepoint, programs::BtfTracePointContext,
};
use connscope_common::{AF_INET, AF_INET6, Endpoints, IPPROTO_TCP, SockLayout, direction};

use crate::{conn, tracepoints::transfer};

/// Set by the agent before loading (see `agent/src/kernel_layout.rs`).
#[unsafe(no_mangle)]
static SOCK_LAYOUT: SockLayout = SockLayout {
    protocol: 0,
    protocol_size: 0,
    family: 0,
    dport: 0,
    num: 0,
    daddr: 0,
    rcv_saddr: 0,
    v6_daddr: 0,
    v6_rcv_saddr: 0,
    valid: 0,
};

#[inline(always)]
fn layout() -> SockLayout {
    // SAFETY: a global the loader rewrites; volatile so the default is not folded in.
    unsafe { core::ptr::read_volatile(&SOCK_LAYOUT) }
}

/// Reads a `T` at `offset` bytes into the socket.
#[inline(always)]
fn field<T>(sock: u64, offset: u32) -> Option<T> {
    // SAFETY: kernel memory read through the fault-tolerant helper.
    unsafe { bpf_probe_read_kernel((sock + u64::from(offset)) as *const T) }.ok()
}

#[inline(always)]
fn is_tcp(sock: u64, layout: &SockLayout) -> bool {
    let protocol = if layout.protocol_size == 1 {
        field::<u8>(sock, layout.protocol).map(u16::from)
    } else {
        field::<u16>(sock, layout.protocol)
    };
    layout.valid != 0 && protocol == Some(IPPROTO_TCP)
}

fn endpoints(sock: u64, layout: &SockLayout) -> Option<Endpoints> {
    let family: u16 = field(sock, layout.family)?;
    let dport: u16 = field(sock, layout.dport)?;
    let mut endpoints = Endpoints {
        family,
        local_port: field(sock, layout.num)?,
        remote_port: u16::from_be(dport),
        ..Endpoints::default()
    };
    match family {
        AF_INET => {
            let local: [u8; 4] = field(sock, layout.rcv_saddr)?;
            let remote: [u8; 4] = field(sock, layout.daddr)?;
            endpoints.local_addr[..4].copy_from_slice(&local);
            endpoints.remote_addr[..4].copy_from_slice(&remote);
        }
        AF_INET6 => {
            endpoints.local_addr = field(sock, layout.v6_rcv_saddr)?;
            endpoints.remote_addr = field(sock, layout.v6_daddr)?;
        }
        _ => return None,
    }
    Some(endpoints)
}

/// `inet_sock_set_state(const struct sock *sk, const int oldstate, const int newstate)`.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn connscope_btf_inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    let sock: u64 = ctx.arg(0);
    let layout = layout();
    if !is_tcp(sock, &layout) {
        return 0;
    }
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    if let Some(endpoints) = endpoints(sock, &layout) {
        conn::on_state_change(sock, old, new, &endpoints);
    }
    0
}

/// `tcp_destroy_sock(struct sock *sk)`.
#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn connscope_btf_tcp_destroy_sock(ctx: BtfTracePointContext) -> i32 {
    conn::on_destroy(ctx.arg(0));
    0
}

/// `tcp_receive_reset(struct sock *sk)`.
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn connscope_btf_tcp_receive_reset(ctx: BtfTracePointContext) -> i32 {
    conn::on_reset(ctx.arg(0), false);
    0
}

/// `tcp_send_reset(const struct sock *sk, const struct sk_buff *skb, ...)`: the socket may
/// be NULL for a reset answering a segment that matched none.
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn connscope_btf_tcp_send_reset(ctx: BtfTracePointContext) -> i32 {
    let sock: u64 = ctx.arg(0);
    if sock != 0 {
        conn::on_reset(sock, true);
    }
    0
}

/// `sock_send_length(struct sock *sk, int ret, int flags)`, from `sock_sendmsg`.
#[btf_tracepoint(function = "sock_send_length")]
pub fn connscope_btf_sock_send_length(ctx: BtfTracePointContext) -> i32 {
    sock_length(&ctx, direction::SEND);
    0
}

/// `sock_recv_length(struct sock *sk, int ret, int flags)`, from `sock_recvmsg`.
#[btf_tracepoint(function = "sock_recv_length")]
pub fn connscope_btf_sock_recv_length(ctx: BtfTracePointContext) -> i32 {
    sock_length(&ctx, direction::RECV);
    0
}

#[inline(always)]
fn sock_length(ctx: &BtfTracePointContext, dir: u8) {
    let sock: u64 = ctx.arg(0);
    if !is_tcp(sock, &layout()) {
        return;
    }
    let ret: i32 = ctx.arg(1);
    let flags: i32 = ctx.arg(2);
    transfer(sock, dir, i64::from(ret), flags);
}
