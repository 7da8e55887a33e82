//! Where the bytes of a transfer can be read: the calling system call's user buffer (the
//! socket layer's hooks), or a buffer a library call handed over (libssl's plaintext, from
//! the `SSL_read`/`SSL_write` uprobes). The head rules of `head` and `exchange` read
//! through it, so plaintext and cleartext go through the same code.

use aya_ebpf::helpers::{bpf_get_current_task_btf, bpf_task_pt_regs};
use connscope_common::Direction;

use crate::{
    globals::{heads_from_stash, heads_from_task_regs},
    maps::UserBuffer,
    syscall_args::{PayloadCall, Segments, head_buffer, payload_call, segments},
    syscall_stash,
};

#[derive(Clone, Copy)]
pub enum PayloadSource {
    /// The current system call's buffer (looked up only when a head is needed).
    Syscall,
    /// A known user buffer holding the transfer's bytes.
    Buffer(UserBuffer),
    /// A past transfer no hook saw: its bytes are gone.
    Unreadable,
}

impl PayloadSource {
    /// The buffer holding the head of a transfer moving payload in `direction` (a vectored
    /// call's first iovec), if it can be read.
    #[inline(always)]
    pub fn buffer(self, direction: Direction) -> Option<UserBuffer> {
        // Not through `segments`: the enum's match left a path the 5.10 verifier saw with
        // an unset register ("R1 !read_ok") in the TLS record check that reads this buffer.
        match self {
            Self::Syscall => current_call(direction, head_buffer, syscall_stash::head),
            Self::Buffer(buffer) => Some(buffer),
            Self::Unreadable => None,
        }
    }

    /// Where all of a transfer's bytes lie (the iovecs of a vectored call).
    #[inline(always)]
    pub fn segments(self, direction: Direction) -> Option<Segments> {
        match self {
            Self::Syscall => current_call(direction, segments, syscall_stash::get),
            Self::Buffer(buffer) => Some(Segments::Flat(buffer)),
            Self::Unreadable => None,
        }
    }
}

/// What the current system call moving payload in `direction` says of its buffers:
/// `from_call` of its arguments (read from the task's registers), or `from_stash` of those
/// `sys_enter` stashed.
#[inline(always)]
fn current_call<T>(
    direction: Direction,
    from_call: impl FnOnce(&PayloadCall) -> Option<T>,
    from_stash: impl FnOnce(Direction) -> Option<T>,
) -> Option<T> {
    if heads_from_task_regs() {
        // SAFETY: helpers without preconditions; the task is the current one.
        let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) };
        let call = payload_call(regs as u64)?;
        if call.direction != direction as u8 {
            return None;
        }
        from_call(&call)
    } else if heads_from_stash() {
        from_stash(direction)
    } else {
        None
    }
}
