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
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_user,
        generated,
    },
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use core::ffi::c_void;

use connscope_common::{FdLayout, HEAD_LEN, LostReason, direction, payload_syscall, setting};

use crate::{
    maps::{CONNS, PENDING_PAYLOAD, count_lost, setting_on},
    tracepoints::transfer,
};

/// Syscall numbers of `payload_syscall::NAMES`, set by the agent at load time.
#[unsafe(no_mangle)]
static PAYLOAD_SYSCALLS: [u64; payload_syscall::COUNT] = [u64::MAX; payload_syscall::COUNT];

/// A user buffer of a system call in progress.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingPayload {
    pub fd: u64,
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

fn stash(fd: u64, buf: u64, len: u64) {
    // Full table: the turn is still counted, only its head is missing.
    let _ = PENDING_PAYLOAD.insert(bpf_get_current_pid_tgid(), PendingPayload { fd, buf, len }, 0);
}

fn stash_first_iovec(fd: u64, iov: u64) -> Option<()> {
    // SAFETY: user memory read through the fault-tolerant helper.
    let first: IoVec = unsafe { bpf_probe_read_user(iov as *const IoVec) }.ok()?;
    stash(fd, first.base, first.len);
    Some(())
}

fn stash_syscall(slot: usize, regs: *const pt_regs) -> Option<()> {
    let fd = regs::arg(regs, 0)?;
    let second = regs::arg(regs, 1)?;
    if slot < payload_syscall::FLAT_END {
        stash(fd, second, regs::arg(regs, 2)?);
        Some(())
    } else if slot < payload_syscall::VECTORED_END {
        stash_first_iovec(fd, second)
    } else {
        // SAFETY: user memory read through the fault-tolerant helper.
        let iov: u64 = unsafe { bpf_probe_read_user((second + MSGHDR_IOV) as *const u64) }.ok()?;
        stash_first_iovec(fd, iov)
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

/// `raw_syscalls:sys_exit(struct pt_regs *regs, long ret)`: drops the stashed buffer and,
/// on kernels without send/receive hooks, counts the transfer itself.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn connscope_sys_exit(ctx: RawTracePointContext) -> i32 {
    let regs: *const pt_regs = ctx.arg(0);
    let Some(slot) = regs::nr(regs).and_then(slot_of) else { return 0 };
    // Odd slots of `payload_syscall::NAMES` write, even ones read.
    let (dir, switch) = if slot % 2 == 1 {
        (direction::SEND, setting::SYSCALL_SENDS)
    } else {
        (direction::RECV, setting::SYSCALL_RECVS)
    };
    if setting_on(switch) {
        let ret: i64 = ctx.arg(1);
        if ret > 0 {
            count_syscall_transfer(dir, ret);
        }
    }
    discard();
    0
}

fn count_syscall_transfer(dir: u8, ret: i64) {
    let key = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out; the entry stays for the head read of a turn start.
    let Some(pending) = (unsafe { PENDING_PAYLOAD.get(key) }).copied() else { return };
    let Some(sock) = fd_sock(pending.fd) else { return };
    // Only tracked TCP sockets: files, pipes and other sockets are not in the map.
    if CONNS.get_ptr(sock).is_some() {
        transfer(sock, dir, ret, 0);
    }
}

/// Set by the agent before loading (see `agent/src/kernel_layout.rs`).
#[unsafe(no_mangle)]
static FD_LAYOUT: FdLayout = FdLayout {
    task_files: 0,
    files_fdt: 0,
    fdt_max_fds: 0,
    fdt_fd: 0,
    file_private_data: 0,
    socket_sk: 0,
    valid: 0,
    _pad: 0,
};

/// Reads a kernel pointer-sized value at `base + offset`.
#[inline(always)]
fn read_u64(base: u64, offset: u64) -> Option<u64> {
    // SAFETY: kernel memory read through the fault-tolerant helper.
    unsafe { bpf_probe_read_kernel((base + offset) as *const u64) }.ok().filter(|&v| v != 0)
}

/// `current->files->fdt->fd[fd]->private_data->sk`.
fn fd_sock(fd: u64) -> Option<u64> {
    // SAFETY: a global the loader rewrites; volatile so the default is not folded in.
    let layout = unsafe { core::ptr::read_volatile(&FD_LAYOUT) };
    if layout.valid == 0 {
        return None;
    }
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let files = read_u64(task, u64::from(layout.task_files))?;
    let fdt = read_u64(files, u64::from(layout.files_fdt))?;
    // SAFETY: kernel memory read through the fault-tolerant helper.
    let max_fds: u32 =
        unsafe { bpf_probe_read_kernel((fdt + u64::from(layout.fdt_max_fds)) as *const u32) }
            .ok()?;
    if fd >= u64::from(max_fds) {
        return None;
    }
    let fds = read_u64(fdt, u64::from(layout.fdt_fd))?;
    let file = read_u64(fds, fd * 8)?;
    let socket = read_u64(file, u64::from(layout.file_private_data))?;
    read_u64(socket, u64::from(layout.socket_sk))
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

/// Copies `len` bytes (at most `HEAD_LEN`) of the user buffer at `buf` into `dst`; returns
/// how many are valid.
///
/// Kept out of line and given its arguments by value: inlined into a large program, the
/// size could be spilled to the stack between its bound check and the helper call, and
/// verifiers before 6.13 then reject the call ("R2 min value is negative").
#[inline(never)]
pub fn read_head(buf: u64, len: u64, dst: &mut [u8; HEAD_LEN]) -> u32 {
    // The volatile read hides the caller's bound from LLVM, so the comparison below is
    // emitted right before the call, where the verifier needs it.
    // SAFETY: reading a local.
    let len = unsafe { core::ptr::read_volatile(&len) };
    let size = if len < HEAD_LEN as u64 { len as u32 } else { HEAD_LEN as u32 };
    // SAFETY: user memory of the calling thread's own system call, read through the
    // fault-tolerant helper into `dst`, which holds HEAD_LEN bytes (size is at most that).
    let rc = unsafe {
        generated::bpf_probe_read_user(dst.as_mut_ptr().cast(), size, buf as *const c_void)
    };
    if rc == 0 {
        size
    } else {
        count_lost(LostReason::PayloadUnreadable);
        0
    }
}
