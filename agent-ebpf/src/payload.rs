//! Payload heads for turn starts.
//!
//! The socket layer's hooks see how many bytes moved but not where they came from, so the
//! system calls that move socket payload stash their user buffer per thread on entry
//! (syscall tracepoints: a stable ABI on every kernel), the send/receive hook takes it and
//! reads at most `HEAD_LEN` bytes when a turn starts, and the syscall's exit drops anything
//! left (a non-socket write, or a socket call that moved nothing).
//!
//! Syscall tracepoint records: `__syscall_nr` at 8, then each argument in 8 bytes from 16
//! (see /sys/kernel/tracing/events/syscalls/sys_enter_write/format).

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, bpf_probe_read_user_buf},
    macros::tracepoint,
    programs::TracePointContext,
};
use connscope_common::{HEAD_LEN, LostReason};

use crate::maps::{PENDING_PAYLOAD, count_lost};

/// A user buffer of a system call in progress.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingPayload {
    pub buf: u64,
    pub len: u64,
}

const ARG1: usize = 24;
const ARG2: usize = 32;

/// `struct iovec` as user space lays it out (stable ABI).
#[repr(C)]
#[derive(Clone, Copy)]
struct IoVec {
    base: u64,
    len: u64,
}

/// Offset of `msg_iov` in the user `struct msghdr` (after `msg_name` and `msg_namelen`).
const MSGHDR_IOV: u64 = 16;

fn stash(buf: u64, len: u64) {
    if buf == 0 || len == 0 {
        return;
    }
    let key = bpf_get_current_pid_tgid();
    // Full table: the turn is still counted, only its head is missing (counted on take).
    let _ = PENDING_PAYLOAD.insert(key, PendingPayload { buf, len }, 0);
}

fn stash_flat(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: offsets of the syscall tracepoint record, read through the probe helper.
    let buf: u64 = unsafe { ctx.read_at(ARG1) }.map_err(i64::from)?;
    // SAFETY: as above.
    let len: u64 = unsafe { ctx.read_at(ARG2) }.map_err(i64::from)?;
    stash(buf, len);
    Ok(())
}

fn stash_first_iovec(iov: u64) -> Result<(), i64> {
    // SAFETY: user memory read through the fault-tolerant helper.
    let first: IoVec = unsafe { bpf_probe_read_user(iov as *const IoVec) }?;
    stash(first.base, first.len);
    Ok(())
}

fn stash_vectored(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: as in `stash_flat`.
    let iov: u64 = unsafe { ctx.read_at(ARG1) }.map_err(i64::from)?;
    stash_first_iovec(iov)
}

fn stash_msghdr(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: as in `stash_flat`.
    let msg: u64 = unsafe { ctx.read_at(ARG1) }.map_err(i64::from)?;
    // SAFETY: user memory read through the fault-tolerant helper.
    let iov: u64 = unsafe { bpf_probe_read_user((msg + MSGHDR_IOV) as *const u64) }?;
    stash_first_iovec(iov)
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

macro_rules! stash_program {
    ($name:ident, $stash:ident) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            let _ = $stash(&ctx);
            0
        }
    };
}

stash_program!(connscope_enter_write, stash_flat);
stash_program!(connscope_enter_read, stash_flat);
stash_program!(connscope_enter_sendto, stash_flat);
stash_program!(connscope_enter_recvfrom, stash_flat);
stash_program!(connscope_enter_writev, stash_vectored);
stash_program!(connscope_enter_readv, stash_vectored);
stash_program!(connscope_enter_sendmsg, stash_msghdr);
stash_program!(connscope_enter_recvmsg, stash_msghdr);

/// Attached to the exit of every syscall above.
#[tracepoint]
pub fn connscope_exit_payload_syscall(_ctx: TracePointContext) -> u32 {
    discard();
    0
}
