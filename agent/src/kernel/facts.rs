//! What the running kernel offers, found once before loading: its BTF and the field
//! offsets read from it, whether perf-event programs attach through pinnable links, the
//! prototype of `tcp_recvmsg`, where payload heads come from, and this architecture's
//! numbers of the payload system calls.

use std::path::Path;

use aya::Btf;
use connscope_common::{
    FdLayout, PAYLOAD_SYSCALLS, PayloadSyscall, SockLayout, UserBuffers, names::program,
};

use crate::{config::Config, kernel::layout::KernelTypes, kernel::preflight};

/// What the running kernel offers, found once before loading.
pub(crate) struct Kernel {
    pub btf: Option<Btf>,
    /// BTF usable for tp_btf programs (the `struct sock` layout was found).
    pub sock_layout: Option<SockLayout>,
    pub fd_layout: Option<FdLayout>,
    /// kprobes and classic tracepoints attach through BPF links (pinnable) since 5.15;
    /// before, through perf events that only their program can hold.
    pub perf_event_links: bool,
    /// Parameters of `tcp_recvmsg` in this kernel's BTF: 6 before 5.19 (`nonblock`), 5
    /// after, 4 once `addr_len` was dropped.
    pub recvmsg_params: Option<usize>,
    pub user_buffers: UserBuffers,
}

impl Kernel {
    pub fn inspect(config: &Config) -> Self {
        let btf = if preflight::has_btf() { Btf::from_sys_fs().ok() } else { None };
        let types = btf.as_ref().and_then(|_| {
            KernelTypes::read(Path::new(preflight::BTF_VMLINUX))
                .inspect_err(|err| {
                    tracing::info!("kernel BTF unreadable for field offsets: {err:#}")
                })
                .ok()
        });
        let sock_layout = types.as_ref().and_then(|types| {
            types
                .sock_layout()
                .inspect_err(|err| {
                    tracing::info!("BTF tracepoints unavailable, using classic ones: {err:#}")
                })
                .ok()
        });
        let fd_layout = types.as_ref().and_then(|types| {
            types
                .fd_layout()
                .inspect_err(|err| tracing::debug!("no syscall-exit fallback: {err:#}"))
                .ok()
        });
        let recvmsg_params = types.as_ref().and_then(|types| types.function_params("tcp_recvmsg"));
        // `bpf_task_pt_regs` and `bpf_get_current_task_btf`: 5.15, with BTF.
        let task_regs = btf.is_some() && preflight::kernel_version().is_some_and(|v| v >= (5, 15));
        let user_buffers = match (config.capture_heads, task_regs) {
            (false, _) => UserBuffers::Off,
            (true, true) => UserBuffers::TaskPtRegs,
            (true, false) => UserBuffers::SyscallStash,
        };
        let perf_event_links = preflight::kernel_version().is_some_and(|v| v >= (5, 15));
        Self { btf, sock_layout, fd_layout, perf_event_links, recvmsg_params, user_buffers }
    }

    /// BTF for tp_btf programs, when the `struct sock` layout is known.
    pub fn btf_tracepoints(&self) -> Option<&Btf> {
        self.btf.as_ref().filter(|_| self.sock_layout.is_some())
    }

    /// The program that fits this kernel's prototype of the hooked function.
    pub fn program_for(&self, program: &'static str) -> &'static str {
        match (program, self.recvmsg_params) {
            (program::FEXIT_TCP_RECVMSG, Some(6)) => program::FEXIT_TCP_RECVMSG_NONBLOCK,
            (program::FEXIT_TCP_RECVMSG, Some(4)) => program::FEXIT_TCP_RECVMSG_NO_ADDR_LEN,
            (program::KPROBE_TCP_RECVMSG, Some(6)) => program::KPROBE_TCP_RECVMSG_NONBLOCK,
            (other, _) => other,
        }
    }
}

/// This architecture's numbers of the payload syscalls, by name.
pub(crate) fn payload_syscall_table() -> [PayloadSyscall; PAYLOAD_SYSCALLS.len()] {
    PAYLOAD_SYSCALLS.map(|spec| {
        let nr = match spec.name {
            "read" => libc::SYS_read,
            "write" => libc::SYS_write,
            "recvfrom" => libc::SYS_recvfrom,
            "sendto" => libc::SYS_sendto,
            "readv" => libc::SYS_readv,
            "writev" => libc::SYS_writev,
            "recvmsg" => libc::SYS_recvmsg,
            "sendmsg" => libc::SYS_sendmsg,
            _ => return PayloadSyscall::UNUSED,
        };
        PayloadSyscall::new(nr as u64, &spec)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_payload_syscall_has_a_number() {
        for entry in payload_syscall_table() {
            assert_ne!(entry, PayloadSyscall::UNUSED);
        }
    }
}
