//! From a file descriptor of the current task to its `struct sock`
//! (`current->files->fdt->fd[fd]->private_data->sk`), at offsets from the kernel's BTF.

use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel};

use crate::globals::fd_layout;

/// Reads a kernel pointer-sized value at `base + offset`; `None` for NULL.
#[inline(always)]
fn read_pointer(base: u64, offset: u32) -> Option<u64> {
    // SAFETY: kernel memory read through the fault-tolerant helper.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const u64) }
        .ok()
        .filter(|&value| value != 0)
}

/// `S_IFMT` and `S_IFSOCK` of `inode.i_mode`.
const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;

/// What `fd` of the current task leads to.
pub struct FdSock {
    file: u64,
    /// `private_data->sk` of its file: a `struct sock` only for a socket.
    pub sock: u64,
}

impl FdSock {
    /// The file is a socket (its inode is `S_IFSOCK`); false also when the kernel's BTF did
    /// not give the offsets to tell. Two reads: asked only of sockets not tracked.
    pub fn is_socket(&self) -> bool {
        let layout = fd_layout();
        layout.file_inode != 0
            && read_pointer(self.file, layout.file_inode).is_some_and(|inode| {
                // SAFETY: kernel memory read through the fault-tolerant helper.
                let mode = unsafe {
                    bpf_probe_read_kernel((inode + u64::from(layout.inode_mode)) as *const u16)
                };
                mode.is_ok_and(|mode| mode & S_IFMT == S_IFSOCK)
            })
    }
}

/// The socket behind `fd`, if `fd` is open (any kind of file: the caller checks the result
/// against the tracked sockets, or asks [`FdSock::is_socket`]).
pub fn fd_sock(fd: u64) -> Option<FdSock> {
    let layout = fd_layout();
    if layout.valid == 0 {
        return None;
    }
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let files = read_pointer(task, layout.task_files)?;
    let fdt = read_pointer(files, layout.files_fdt)?;
    // SAFETY: kernel memory read through the fault-tolerant helper.
    let max_fds: u32 =
        unsafe { bpf_probe_read_kernel((fdt + u64::from(layout.fdt_max_fds)) as *const u32) }
            .ok()?;
    if fd >= u64::from(max_fds) {
        return None;
    }
    let fds = read_pointer(fdt, layout.fdt_fd)?;
    let file = read_pointer(fds + fd * 8, 0)?;
    let socket = read_pointer(file, layout.file_private_data)?;
    Some(FdSock { file, sock: read_pointer(socket, layout.socket_sk)? })
}
