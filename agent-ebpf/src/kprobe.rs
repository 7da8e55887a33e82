//! kprobe/kretprobe backend, for kernels without fentry (no BTF trampolines). Return values
//! need a kretprobe, which cannot see the arguments, so the entry probe remembers the socket
//! (and receive flags) per thread.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{kprobe, kretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use connscope_common::Direction;

use crate::{maps::CALLS_IN_FLIGHT, tracking, transfer};

/// `tcp_connect(sk)`, see `fentry.rs`.
#[kprobe(function = "tcp_connect")]
pub fn connscope_kprobe_tcp_connect(ctx: ProbeContext) -> u32 {
    if let Some(sock) = ctx.arg::<u64>(0) {
        tracking::on_process_context(sock);
    }
    0
}

/// `tcp_close(sk, timeout)`, see `fentry.rs`.
#[kprobe(function = "tcp_close")]
pub fn connscope_kprobe_tcp_close(ctx: ProbeContext) -> u32 {
    if let Some(sock) = ctx.arg::<u64>(0) {
        tracking::on_process_context(sock);
    }
    0
}

fn remember_call(ctx: &ProbeContext, flags_arg: Option<usize>) {
    let Some(sock) = ctx.arg::<u64>(0) else { return };
    let flags = flags_arg.and_then(|n| ctx.arg::<u64>(n)).unwrap_or(0);
    let _ = CALLS_IN_FLIGHT.insert(&bpf_get_current_pid_tgid(), &[sock, flags], 0);
}

fn finish_call(ctx: &RetProbeContext, direction: Direction) {
    let key = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let Some([sock, flags]) = (unsafe { CALLS_IN_FLIGHT.get(&key) }).copied() else { return };
    let _ = CALLS_IN_FLIGHT.remove(&key);
    let ret = i64::from(ctx.ret::<i32>());
    transfer::transfer_at_exit(sock, direction, ret, flags as i32);
}

#[kprobe(function = "tcp_sendmsg")]
pub fn connscope_kprobe_tcp_sendmsg(ctx: ProbeContext) -> u32 {
    remember_call(&ctx, None);
    0
}

#[kretprobe(function = "tcp_sendmsg")]
pub fn connscope_kretprobe_tcp_sendmsg(ctx: RetProbeContext) -> u32 {
    finish_call(&ctx, Direction::Send);
    0
}

/// `tcp_recvmsg(sk, msg, len, flags, addr_len)` (5.19+).
#[kprobe(function = "tcp_recvmsg")]
pub fn connscope_kprobe_tcp_recvmsg(ctx: ProbeContext) -> u32 {
    remember_call(&ctx, Some(3));
    0
}

/// `tcp_recvmsg(sk, msg, len, nonblock, flags, addr_len)` (before 5.19).
#[kprobe(function = "tcp_recvmsg")]
pub fn connscope_kprobe_tcp_recvmsg_nonblock(ctx: ProbeContext) -> u32 {
    remember_call(&ctx, Some(4));
    0
}

#[kretprobe(function = "tcp_recvmsg")]
pub fn connscope_kretprobe_tcp_recvmsg(ctx: RetProbeContext) -> u32 {
    finish_call(&ctx, Direction::Recv);
    0
}
