//! Counting at syscall exit: the last resort of the tracepoint backend on kernels without
//! `sock_send_length`/`sock_recv_length` (before 6.3) when neither fentry nor kprobes work.
//! The exit of a read/write-like call on a tracked socket is a transfer. With the syscall
//! stash it also drops the stashed buffer of calls that were not socket transfers.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use connscope_common::{Direction, Setting};

use crate::{
    conn,
    fd_socket::fd_sock,
    globals::heads_from_stash,
    maps::{CONNS, setting_on},
    syscall_args::payload_call,
    syscall_stash,
};

/// `raw_syscalls:sys_exit(struct pt_regs *regs, long ret)`.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn connscope_sys_exit(ctx: RawTracePointContext) -> i32 {
    let regs: u64 = ctx.arg(0);
    if let Some(call) = payload_call(regs) {
        let (direction, setting) = if call.direction == Direction::Send as u8 {
            (Direction::Send, Setting::SyscallSends)
        } else {
            (Direction::Recv, Setting::SyscallRecvs)
        };
        let ret: i64 = ctx.arg(1);
        if ret > 0 && setting_on(setting) {
            // Only tracked TCP sockets: files, pipes and other sockets are not in the map.
            if let Some(sock) = fd_sock(call.fd).filter(|sock| CONNS.get_ptr(sock).is_some()) {
                conn::transfer(sock, direction, ret, 0, || true);
            }
        }
    }
    if heads_from_stash() {
        syscall_stash::discard();
    }
    0
}
