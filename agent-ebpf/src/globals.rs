//! Globals the agent writes before loading (`connscope_common::kernel_config`). They live in
//! `.rodata`, frozen at load: the verifier knows their values and skips code a kernel
//! cannot run (e.g. `bpf_task_pt_regs` on kernels older than 5.15).

use connscope_common::{FdLayout, PayloadSyscall, ProgramConfig, SockLayout, UserBuffers};

#[unsafe(no_mangle)]
static SOCK_LAYOUT: SockLayout = SockLayout {
    protocol: 0,
    protocol_size: 0,
    family: 0,
    dport: 0,
    num: 0,
    daddr: 0,
    rcv_saddr: 0,
    v6_daddr: 0,
    v6_rcv_saddr: 0,
    valid: 0,
    state: 0,
    net: 0,
    net_inum: 0,
    adopt: 0,
    copied_seq: 0,
    write_seq: 0,
    snd_una: 0,
    bytes_acked: 0,
    lrcvtime: 0,
    lrcvtime_shift: 0,
    lrcvtime_bits: 0,
    sk_err: 0,
    sport: 0,
    _pad: 0,
};

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
    file_inode: 0,
    inode_mode: 0,
};

#[unsafe(no_mangle)]
static PAYLOAD_SYSCALLS: [PayloadSyscall; PAYLOAD_SYSCALL_SLOTS] =
    [PayloadSyscall::UNUSED; PAYLOAD_SYSCALL_SLOTS];

/// This object's generation when state is pinned (`--bpf.pin-path`); 0: not pinned, the
/// programs always run.
#[unsafe(no_mangle)]
static GENERATION: u64 = 0;

#[unsafe(no_mangle)]
static PROGRAM_CONFIG: ProgramConfig = ProgramConfig { user_buffers: 0, libssl_calls: 0 };

// SAFETY (all readers): reads of globals the loader may have rewritten; volatile so the
// compiler does not fold in the defaults above.

#[inline(always)]
pub fn sock_layout() -> SockLayout {
    // SAFETY: see above.
    unsafe { core::ptr::read_volatile(&SOCK_LAYOUT) }
}

#[inline(always)]
pub fn generation() -> u64 {
    // SAFETY: see above.
    unsafe { core::ptr::read_volatile(&GENERATION) }
}

#[inline(always)]
pub fn fd_layout() -> FdLayout {
    // SAFETY: see above.
    unsafe { core::ptr::read_volatile(&FD_LAYOUT) }
}

#[inline(always)]
pub fn payload_syscall(slot: usize) -> PayloadSyscall {
    // SAFETY: see above; `slot` is checked by the caller's loop bound.
    unsafe { core::ptr::read_volatile(&PAYLOAD_SYSCALLS[slot]) }
}

pub const PAYLOAD_SYSCALL_SLOTS: usize = connscope_common::PAYLOAD_SYSCALLS.len();

#[inline(always)]
pub fn user_buffers() -> u32 {
    // SAFETY: see above.
    unsafe { core::ptr::read_volatile(&PROGRAM_CONFIG.user_buffers) }
}

/// Whether libssl calls can be in flight (`--tls.uprobes`).
#[inline(always)]
pub fn libssl_calls() -> bool {
    // SAFETY: see above.
    unsafe { core::ptr::read_volatile(&PROGRAM_CONFIG.libssl_calls) != 0 }
}

#[inline(always)]
pub fn heads_from_task_regs() -> bool {
    user_buffers() == UserBuffers::TaskPtRegs as u32
}

#[inline(always)]
pub fn heads_from_stash() -> bool {
    user_buffers() == UserBuffers::SyscallStash as u32
}
