//! Counting at syscall exit: the last resort of the tracepoint backend on kernels without
//! `sock_send_length`/`sock_recv_length` (before 6.3) when neither fentry nor kprobes work.
//! The exit of a read/write-like call on a tracked socket is a transfer, and on an untracked
//! one (a descriptor whose inode is a socket) too: an established TCP socket older than the
//! agent is adopted there. With the syscall stash it also drops the stashed buffer of calls
//! that were not socket transfers.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use connscope_common::{Direction, Setting};

use crate::{
    fd_socket::fd_sock,
    globals::heads_from_stash,
    maps::{CONNS, setting_on},
    sock::{BtfSocket, SocketView},
    syscall_args::payload_call,
    syscall_stash, transfer,
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
            // Tracked TCP sockets, and sockets to adopt (`transfer::transfer` asks whether an
            // untracked one is TCP); files and pipes are neither.
            if let Some(fd) = fd_sock(call.fd)
                && (CONNS.get_ptr(&fd.sock).is_some() || fd.is_socket())
            {
                let sock = fd.sock;
                transfer::transfer(sock, direction, ret, 0, || BtfSocket { sock }.is_tcp());
            }
        }
    }
    if heads_from_stash() {
        syscall_stash::discard();
    }
    0
}
