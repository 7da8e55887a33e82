//! kprobe/kretprobe backend, for kernels without fentry (no BTF trampolines). Return values
//! need a kretprobe, which cannot see the arguments, so the entry probe remembers the socket
//! per thread.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{kprobe, kretprobe, map},
    maps::HashMap,
    programs::{ProbeContext, RetProbeContext},
};
use connscope_common::direction;

use crate::{conn, tracepoints::transfer};

/// Socket (and receive flags) of a `tcp_sendmsg`/`tcp_recvmsg` call in progress, by pid_tgid.
#[map(name = "CALL_IN_FLIGHT")]
static CALL_IN_FLIGHT: HashMap<u64, [u64; 2]> = HashMap::with_max_entries(16_384, 0);

/// `tcp_connect(sk)`, see `fentry.rs`.
#[kprobe(function = "tcp_connect")]
pub fn connscope_kprobe_tcp_connect(ctx: ProbeContext) -> u32 {
    if let Some(sock) = ctx.arg::<u64>(0) {
        conn::on_process_context(sock);
    }
    0
}

/// `tcp_close(sk, timeout)`, see `fentry.rs`.
#[kprobe(function = "tcp_close")]
pub fn connscope_kprobe_tcp_close(ctx: ProbeContext) -> u32 {
    if let Some(sock) = ctx.arg::<u64>(0) {
        conn::on_process_context(sock);
    }
    0
}

fn remember_call(ctx: &ProbeContext, flags_arg: Option<usize>) {
    let Some(sock) = ctx.arg::<u64>(0) else { return };
    let flags = flags_arg.and_then(|n| ctx.arg::<u64>(n)).unwrap_or(0);
    let _ = CALL_IN_FLIGHT.insert(bpf_get_current_pid_tgid(), [sock, flags], 0);
}

fn finish_call(ctx: &RetProbeContext, dir: u8) {
    let key = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let Some([sock, flags]) = (unsafe { CALL_IN_FLIGHT.get(key) }).copied() else { return };
    let _ = CALL_IN_FLIGHT.remove(key);
    let ret: i64 = ctx.ret::<i32>() as i64;
    transfer(sock, dir, ret, flags as i32);
}

#[kprobe(function = "tcp_sendmsg")]
pub fn connscope_kprobe_tcp_sendmsg(ctx: ProbeContext) -> u32 {
    remember_call(&ctx, None);
    0
}

#[kretprobe(function = "tcp_sendmsg")]
pub fn connscope_kretprobe_tcp_sendmsg(ctx: RetProbeContext) -> u32 {
    finish_call(&ctx, direction::SEND);
    0
}

#[kprobe(function = "tcp_recvmsg")]
pub fn connscope_kprobe_tcp_recvmsg(ctx: ProbeContext) -> u32 {
    remember_call(&ctx, Some(3));
    0
}

#[kretprobe(function = "tcp_recvmsg")]
pub fn connscope_kretprobe_tcp_recvmsg(ctx: RetProbeContext) -> u32 {
    finish_call(&ctx, direction::RECV);
    0
}
