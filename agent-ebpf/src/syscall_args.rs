//! The user buffer of the system call a send/receive hook runs in.
//!
//! The socket layer's hooks see how many bytes moved, not where from. On kernels with
//! `bpf_task_pt_regs` (5.15+, with BTF) the hook reads the syscall's number and arguments
//! from the task's saved user registers: no syscall hook, so processes that never touch the
//! network pay nothing. Older kernels fall back to a `sys_enter` stash (`syscall_stash`); which
//! of the two a transfer's buffer comes from is `payload_source`'s choice.

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{bpf_probe_read_kernel, bpf_probe_read_user},
};
use connscope_common::BufferLayout;

use crate::{
    globals::{PAYLOAD_SYSCALL_SLOTS, payload_syscall},
    maps::UserBuffer,
};

/// A payload system call: its direction, descriptor and buffer arguments.
#[derive(Clone, Copy)]
pub struct PayloadCall {
    pub direction: u8,
    pub layout: u8,
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

/// Offset of `msg_iov` in the user `struct msghdr` (after `msg_name` and `msg_namelen`);
/// `msg_iovlen` follows it.
const MSGHDR_IOV: u64 = 16;

/// The `PAYLOAD_SYSCALLS` entry of syscall `nr`: `(direction, layout)`.
#[inline(always)]
pub fn payload_syscall_of(nr: u64) -> Option<(u8, u8)> {
    for slot in 0..PAYLOAD_SYSCALL_SLOTS {
        let entry = payload_syscall(slot);
        if entry.nr == nr {
            return Some((entry.direction, entry.layout));
        }
    }
    None
}

/// The syscall number and first three arguments from saved user registers.
#[cfg(bpf_target_arch = "x86_64")]
fn registers(regs: u64) -> Option<[u64; 4]> {
    // `rdx`, `rsi`, `rdi`, `orig_rax` are adjacent: one read.
    let start = core::mem::offset_of!(pt_regs, rdx) as u64;
    // SAFETY: kernel memory read through the fault-tolerant helper.
    let [len, buf, fd, nr]: [u64; 4] =
        unsafe { bpf_probe_read_kernel((regs + start) as *const [u64; 4]) }.ok()?;
    Some([nr, fd, buf, len])
}

#[cfg(bpf_target_arch = "aarch64")]
fn registers(regs: u64) -> Option<[u64; 4]> {
    let args = core::mem::offset_of!(pt_regs, regs) as u64;
    let nr = core::mem::offset_of!(pt_regs, syscallno) as u64;
    // SAFETY: kernel memory read through the fault-tolerant helper.
    let [fd, buf, len]: [u64; 3] =
        unsafe { bpf_probe_read_kernel((regs + args) as *const [u64; 3]) }.ok()?;
    // SAFETY: as above.
    let nr: i32 = unsafe { bpf_probe_read_kernel((regs + nr) as *const i32) }.ok()?;
    Some([nr as u64, fd, buf, len])
}

/// The payload system call whose user registers are at `regs`, if it is one.
#[inline(always)]
pub fn payload_call(regs: u64) -> Option<PayloadCall> {
    let [nr, fd, buf, len] = registers(regs)?;
    let (direction, layout) = payload_syscall_of(nr)?;
    Some(PayloadCall { direction, layout, fd, buf, len })
}

/// Where a call's payload lies in user memory: one buffer, or an iovec array.
#[derive(Clone, Copy)]
pub enum Segments {
    Flat(UserBuffer),
    /// `count` iovecs at `iov`.
    Vectored {
        iov: u64,
        count: u64,
    },
}

/// The iovec at `addr`, as a buffer.
#[inline(always)]
pub fn read_iovec(addr: u64) -> Option<UserBuffer> {
    // SAFETY: user memory read through the fault-tolerant helper.
    let vec: IoVec = unsafe { bpf_probe_read_user(addr as *const IoVec) }.ok()?;
    Some(UserBuffer { addr: vec.base, len: vec.len })
}

/// Size of a user `struct iovec`.
pub const IOVEC_SIZE: u64 = core::mem::size_of::<IoVec>() as u64;

/// The buffer holding the call's payload head (the first iovec of vectored calls).
#[inline(always)]
pub fn head_buffer(call: &PayloadCall) -> Option<UserBuffer> {
    let iov = match call.layout {
        layout if layout == BufferLayout::Flat as u8 => {
            return Some(UserBuffer { addr: call.buf, len: call.len });
        }
        layout if layout == BufferLayout::Vectored as u8 => call.buf,
        // SAFETY: user memory read through the fault-tolerant helper.
        _ => unsafe { bpf_probe_read_user((call.buf + MSGHDR_IOV) as *const u64) }.ok()?,
    };
    read_iovec(iov)
}

/// The segments holding the call's payload.
#[inline(always)]
pub fn segments(call: &PayloadCall) -> Option<Segments> {
    match call.layout {
        layout if layout == BufferLayout::Flat as u8 => {
            Some(Segments::Flat(UserBuffer { addr: call.buf, len: call.len }))
        }
        layout if layout == BufferLayout::Vectored as u8 => {
            Some(Segments::Vectored { iov: call.buf, count: call.len })
        }
        _ => {
            // SAFETY: user memory read through the fault-tolerant helper.
            let [iov, count]: [u64; 2] =
                unsafe { bpf_probe_read_user((call.buf + MSGHDR_IOV) as *const [u64; 2]) }.ok()?;
            Some(Segments::Vectored { iov, count })
        }
    }
}
