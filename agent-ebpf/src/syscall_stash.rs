//! The syscall stash, for kernels without `bpf_task_pt_regs` (before 5.15) or without BTF:
//! `sys_enter` keeps the user buffer of read/write-like system calls per thread, the
//! send/receive hook reads it (an HTTP/2 transfer twice: its head, then its frames), and
//! `sys_exit` drops it.
//! This costs every such system call of the host a hash update, which is why kernels with
//! the helper do not attach it.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::raw_tracepoint, programs::RawTracePointContext,
};
use connscope_common::Direction;

use crate::{
    maps::{SYSCALL_STASH, UserBuffer},
    syscall_args::{Segments, payload_call, payload_syscall_of, read_iovec, segments},
};

/// A stashed buffer also records its direction in the top bit of `len` (lengths never
/// reach it), so a hook of the other direction does not take it.
const SEND_BIT: u64 = 1 << 63;
/// And whether it is an iovec array (`addr`) and its count (`len`).
const VECTORED_BIT: u64 = 1 << 62;

/// `raw_syscalls:sys_enter(struct pt_regs *regs, long id)`.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn connscope_sys_enter(ctx: RawTracePointContext) -> i32 {
    let nr: u64 = ctx.arg(1);
    // Cheap reject first: most system calls move no payload.
    if payload_syscall_of(nr).is_none() {
        return 0;
    }
    let regs: u64 = ctx.arg(0);
    let Some(call) = payload_call(regs) else { return 0 };
    let Some(segments) = segments(&call) else { return 0 };
    let mut buffer = match segments {
        Segments::Flat(buffer) => buffer,
        Segments::Vectored { iov, count } => UserBuffer { addr: iov, len: count | VECTORED_BIT },
    };
    if call.direction == Direction::Send as u8 {
        buffer.len |= SEND_BIT;
    }
    // A full table only loses this call's head; the transfer is still counted.
    let _ = SYSCALL_STASH.insert(&bpf_get_current_pid_tgid(), &buffer, 0);
    0
}

/// The head buffer of this thread's stashed call if it is for `direction` (a vectored
/// call's first iovec; left for `sys_exit`).
#[inline(always)]
pub fn head(direction: Direction) -> Option<UserBuffer> {
    let key = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out at once.
    let buffer = unsafe { SYSCALL_STASH.get(&key) }.copied()?;
    if (buffer.len & SEND_BIT != 0) != (direction == Direction::Send) {
        return None;
    }
    if buffer.len & VECTORED_BIT != 0 {
        return read_iovec(buffer.addr);
    }
    Some(UserBuffer { addr: buffer.addr, len: buffer.len & !SEND_BIT })
}

/// This thread's stashed segments if they are for `direction` (left for `sys_exit`).
#[inline(always)]
pub fn get(direction: Direction) -> Option<Segments> {
    let key = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out at once.
    let buffer = unsafe { SYSCALL_STASH.get(&key) }.copied()?;
    let is_send = buffer.len & SEND_BIT != 0;
    if is_send != (direction == Direction::Send) {
        return None;
    }
    let len = buffer.len & !(SEND_BIT | VECTORED_BIT);
    Some(if buffer.len & VECTORED_BIT != 0 {
        Segments::Vectored { iov: buffer.addr, count: len }
    } else {
        Segments::Flat(UserBuffer { addr: buffer.addr, len })
    })
}

/// Drops this thread's stashed buffer (at syscall exit).
#[inline(always)]
pub fn discard() {
    let _ = SYSCALL_STASH.remove(&bpf_get_current_pid_tgid());
}
