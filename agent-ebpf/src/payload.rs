//! Payload heads for turn starts.
//!
//! The socket layer's hooks see how many bytes moved but not where they came from, so the
//! system calls that move socket payload stash their user buffer per thread on entry, the
//! send/receive hook takes it and reads at most `HEAD_LEN` bytes when a turn starts, and the
//! syscall's exit drops anything left (a non-socket write, or a call that moved nothing).
//!
//! Raw `sys_enter`/`sys_exit` tracepoints (two attachments, detached without waiting for an
//! RCU grace period each) with the syscall numbers given by the agent for this architecture.

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel, bpf_probe_read_user, bpf_probe_read_user_buf},
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use connscope_common::{HEAD_LEN, LostReason, payload_syscall};

use crate::maps::{PENDING_PAYLOAD, count_lost};

/// Syscall numbers of `payload_syscall::NAMES`, set by the agent at load time.
#[unsafe(no_mangle)]
static PAYLOAD_SYSCALLS: [u64; payload_syscall::COUNT] = [u64::MAX; payload_syscall::COUNT];

/// A user buffer of a system call in progress.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingPayload {
    pub buf: u64,
    pub len: u64,
}

/// `struct iovec` as user space lays it out (stable ABI).
#[repr(C)]
#[derive(Clone, Copy)]
struct IoVec {
    base: u64,
    len: u64,
}

/// Offset of `msg_iov` in the user `struct msghdr` (after `msg_name` and `msg_namelen`).
const MSGHDR_IOV: u64 = 16;

/// Index of `nr` in `PAYLOAD_SYSCALLS`.
#[inline(always)]
fn slot_of(nr: u64) -> Option<usize> {
    for slot in 0..payload_syscall::COUNT {
        // SAFETY: read of a global the loader may have rewritten; volatile so the compiler
        // does not fold the default value.
        if unsafe { core::ptr::read_volatile(&PAYLOAD_SYSCALLS[slot]) } == nr {
            return Some(slot);
        }
    }
    None
}

/// Syscall argument `n` (0-based) and number from the user registers, per architecture.
#[cfg(bpf_target_arch = "x86_64")]
mod regs {
    use super::*;

    pub fn arg(regs: *const pt_regs, n: usize) -> Option<u64> {
        // SAFETY: field addresses of a kernel pointer, read through the probe helper.
        let field = unsafe {
            match n {
                1 => &raw const (*regs).rsi,
                2 => &raw const (*regs).rdx,
                _ => &raw const (*regs).rdi,
            }
        };
        // SAFETY: as above.
        unsafe { bpf_probe_read_kernel(field) }.ok()
    }

    pub fn nr(regs: *const pt_regs) -> Option<u64> {
        // SAFETY: as above.
        unsafe { bpf_probe_read_kernel(&raw const (*regs).orig_rax) }.ok()
    }
}

#[cfg(bpf_target_arch = "aarch64")]
mod regs {
    use super::*;

    pub fn arg(regs: *const pt_regs, n: usize) -> Option<u64> {
        // SAFETY: field addresses of a kernel pointer, read through the probe helper.
        unsafe { bpf_probe_read_kernel(&raw const (*regs).regs[n & 7]) }.ok()
    }

    pub fn nr(regs: *const pt_regs) -> Option<u64> {
        // SAFETY: as above.
        unsafe { bpf_probe_read_kernel(&raw const (*regs).syscallno) }.ok().map(|nr: i32| nr as u64)
    }
}

fn stash(buf: u64, len: u64) {
    if buf == 0 || len == 0 {
        return;
    }
    // Full table: the turn is still counted, only its head is missing.
    let _ = PENDING_PAYLOAD.insert(bpf_get_current_pid_tgid(), PendingPayload { buf, len }, 0);
}

fn stash_first_iovec(iov: u64) -> Option<()> {
    // SAFETY: user memory read through the fault-tolerant helper.
    let first: IoVec = unsafe { bpf_probe_read_user(iov as *const IoVec) }.ok()?;
    stash(first.base, first.len);
    Some(())
}

fn stash_syscall(slot: usize, regs: *const pt_regs) -> Option<()> {
    let second = regs::arg(regs, 1)?;
    if slot < payload_syscall::FLAT_END {
        stash(second, regs::arg(regs, 2)?);
        Some(())
    } else if slot < payload_syscall::VECTORED_END {
        stash_first_iovec(second)
    } else {
        // SAFETY: user memory read through the fault-tolerant helper.
        let iov: u64 = unsafe { bpf_probe_read_user((second + MSGHDR_IOV) as *const u64) }.ok()?;
        stash_first_iovec(iov)
    }
}

/// `raw_syscalls:sys_enter(struct pt_regs *regs, long id)`.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn connscope_sys_enter(ctx: RawTracePointContext) -> i32 {
    let nr: u64 = ctx.arg(1);
    if let Some(slot) = slot_of(nr) {
        let regs: *const pt_regs = ctx.arg(0);
        let _ = stash_syscall(slot, regs);
    }
    0
}

/// `raw_syscalls:sys_exit(struct pt_regs *regs, long ret)`.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn connscope_sys_exit(ctx: RawTracePointContext) -> i32 {
    let regs: *const pt_regs = ctx.arg(0);
    if regs::nr(regs).and_then(slot_of).is_some() {
        discard();
    }
    0
}

/// Takes this thread's stashed buffer, if any.
#[inline(always)]
pub fn take() -> Option<PendingPayload> {
    let key = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let pending = unsafe { PENDING_PAYLOAD.get(key) }.copied();
    if pending.is_some() {
        let _ = PENDING_PAYLOAD.remove(key);
    }
    pending
}

/// Drops this thread's stashed buffer.
#[inline(always)]
pub fn discard() {
    let _ = PENDING_PAYLOAD.remove(bpf_get_current_pid_tgid());
}

/// Copies up to `want` bytes (at most `HEAD_LEN`) of the stashed buffer into `dst`;
/// returns how many are valid.
#[inline(always)]
pub fn read_head(pending: &PendingPayload, want: usize, dst: &mut [u8; HEAD_LEN]) -> u32 {
    let available = if pending.len < want as u64 { pending.len as usize } else { want };
    let Some(dst) = dst.get_mut(..available) else { return 0 };
    // SAFETY: user memory of the calling thread's own system call, read through the
    // fault-tolerant helper into a bounded slice.
    match unsafe { bpf_probe_read_user_buf(pending.buf as *const u8, dst) } {
        Ok(()) => available as u32,
        Err(_) => {
            count_lost(LostReason::PayloadUnreadable);
            0
        }
    }
}
