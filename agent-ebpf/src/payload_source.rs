//! Where the bytes of a transfer can be read: the calling system call's user buffer (the
//! socket layer's hooks), or a buffer a library call handed over (libssl's plaintext, from
//! the `SSL_read`/`SSL_write` uprobes). The head rules of `head` and `exchange` read
//! through it, so plaintext and cleartext go through the same code.

use connscope_common::Direction;

use crate::{maps::UserBuffer, syscall_args::current_buffer};

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
    /// The buffer of a transfer moving payload in `direction`, if it can be read.
    #[inline(always)]
    pub fn buffer(self, direction: Direction) -> Option<UserBuffer> {
        match self {
            Self::Syscall => current_buffer(direction),
            Self::Buffer(buffer) => Some(buffer),
            Self::Unreadable => None,
        }
    }
}
