//! Stable tracepoints: the lifecycle source on every kernel, and the fallback backend for
//! `tcp_connect`, `tcp_close`, `tcp_sendmsg` and `tcp_recvmsg` where neither fentry nor
//! kprobes are available. Offsets come from each event's `format` file under
//! /sys/kernel/tracing/events; these layouts are unchanged from 4.16 (inet_sock_set_state)
//! and 6.3 (sock_send_length / sock_recv_length) to today.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use connscope_common::{AF_INET, AF_INET6, Endpoints, IPPROTO_TCP, direction};

use crate::conn;

/// `sock:inet_sock_set_state`, fired by `inet_sk_state_store`/`tcp_set_state`:
/// <https://elixir.bootlin.com/linux/v6.18/source/include/trace/events/sock.h#L141>
#[tracepoint]
pub fn connscope_inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = try_inet_sock_set_state(&ctx);
    0
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i32> {
    // SAFETY (all reads below): offsets of the tracepoint's format, read via the helper.
    let protocol: u16 = unsafe { ctx.read_at(30) }?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let sock: u64 = unsafe { ctx.read_at(8) }?;
    let old: i32 = unsafe { ctx.read_at(16) }?;
    let new: i32 = unsafe { ctx.read_at(20) }?;
    let family: u16 = unsafe { ctx.read_at(28) }?;
    let mut endpoints = Endpoints {
        family,
        local_port: unsafe { ctx.read_at(24) }?,
        remote_port: unsafe { ctx.read_at(26) }?,
        ..Endpoints::default()
    };
    match family {
        AF_INET => {
            let local: [u8; 4] = unsafe { ctx.read_at(32) }?;
            let remote: [u8; 4] = unsafe { ctx.read_at(36) }?;
            endpoints.local_addr[..4].copy_from_slice(&local);
            endpoints.remote_addr[..4].copy_from_slice(&remote);
        }
        AF_INET6 => {
            endpoints.local_addr = unsafe { ctx.read_at(40) }?;
            endpoints.remote_addr = unsafe { ctx.read_at(56) }?;
        }
        _ => return Ok(()),
    }
    conn::on_state_change(sock, old, new, &endpoints);
    Ok(())
}

/// `tcp:tcp_destroy_sock`, fired by `tcp_v4_destroy_sock` once the socket is closed by its
/// owner and done in the kernel:
/// <https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/tcp_ipv4.c#L2513>
#[tracepoint]
pub fn connscope_tcp_destroy_sock(ctx: TracePointContext) -> u32 {
    // SAFETY: `skaddr` offset of the format.
    if let Ok(sock) = unsafe { ctx.read_at::<u64>(8) } {
        conn::on_destroy(sock);
    }
    0
}

/// `tcp:tcp_receive_reset` (`tcp_reset`, before the socket moves to CLOSE).
#[tracepoint]
pub fn connscope_tcp_receive_reset(ctx: TracePointContext) -> u32 {
    // SAFETY: `skaddr` offset of the format.
    if let Ok(sock) = unsafe { ctx.read_at::<u64>(8) } {
        conn::on_reset(sock, false);
    }
    0
}

/// `tcp:tcp_send_reset` (`tcp_send_active_reset` and replies to bad segments).
#[tracepoint]
pub fn connscope_tcp_send_reset(ctx: TracePointContext) -> u32 {
    // SAFETY: `skaddr` offset of the format (after `skbaddr`).
    if let Ok(sock) = unsafe { ctx.read_at::<u64>(16) } {
        if sock != 0 {
            conn::on_reset(sock, true);
        }
    }
    0
}

/// `sock:sock_send_length`, fired by `sock_sendmsg` in the sending process after the
/// protocol's sendmsg returned: the tracepoint backend of `tcp_sendmsg`.
/// <https://elixir.bootlin.com/linux/v6.18/source/net/socket.c#L730>
#[tracepoint]
pub fn connscope_sock_send_length(ctx: TracePointContext) -> u32 {
    let _ = try_sock_length(&ctx, direction::SEND);
    0
}

/// `sock:sock_recv_length`, fired by `sock_recvmsg` in the receiving process: the
/// tracepoint backend of `tcp_recvmsg`.
#[tracepoint]
pub fn connscope_sock_recv_length(ctx: TracePointContext) -> u32 {
    let _ = try_sock_length(&ctx, direction::RECV);
    0
}

const MSG_PEEK: i32 = 2;

fn try_sock_length(ctx: &TracePointContext, dir: u8) -> Result<(), i32> {
    // SAFETY (all reads): offsets of the shared `sock_msg_length` format.
    let protocol: u16 = unsafe { ctx.read_at(18) }?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let sock: u64 = unsafe { ctx.read_at(8) }?;
    let ret: i32 = unsafe { ctx.read_at(20) }?;
    let flags: i32 = unsafe { ctx.read_at(24) }?;
    transfer(sock, dir, ret as i64, flags);
    Ok(())
}

/// Common tail of every send/receive backend: `ret` is the call's return value.
#[inline(always)]
pub fn transfer(sock: u64, dir: u8, ret: i64, flags: i32) {
    if ret <= 0 || (dir == direction::RECV && flags & MSG_PEEK != 0) {
        // An error, EOF or a peek moved no payload; still a process-context touch.
        conn::on_process_context(sock);
        return;
    }
    conn::on_transfer(sock, dir, ret as u64);
}
