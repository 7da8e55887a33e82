//! Which program serves each hook on each backend: the send/receive and connect/close
//! hooks (fentry/fexit, kprobes, tracepoints, syscall exit), the lifecycle tracepoints
//! attached on every kernel, and the benchmark's floor arm. `probes` attaches them.

use std::fmt;

use connscope_common::{Setting, names::program};

use crate::exposition::status::HookRow;

/// How a hook ended up attached (`attach` label of `connscope_probe_info`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    Fentry,
    Kprobe,
    TpBtf,
    Tracepoint,
    /// No backend works on this kernel: the hook's figures are missing (lifecycle-only mode).
    Unavailable,
}

impl Attach {
    pub const ALL: [Self; 5] =
        [Self::Fentry, Self::Kprobe, Self::TpBtf, Self::Tracepoint, Self::Unavailable];

    pub const fn label(self) -> &'static str {
        match self {
            Self::Fentry => "fentry",
            Self::Kprobe => "kprobe",
            Self::TpBtf => "tp_btf",
            Self::Tracepoint => "tracepoint",
            Self::Unavailable => "none",
        }
    }
}

impl fmt::Display for Attach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// One hook and the backend that serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookAttach {
    pub hook: &'static str,
    pub attach: Attach,
}

impl HookAttach {
    /// The `/` page's row for this hook.
    pub fn row(&self) -> HookRow {
        HookRow { hook: self.hook, attach: self.attach.label() }
    }
}

/// Where a program attaches.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Target {
    /// fentry/fexit or kprobe/kretprobe on a kernel function.
    Function(&'static str),
    /// A BTF tracepoint (`tp_btf`) by event name.
    BtfTracepoint(&'static str),
    /// A classic tracepoint.
    Tracepoint { category: &'static str, event: &'static str },
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Attachment {
    pub program: &'static str,
    pub target: Target,
}

const fn function(program: &'static str, name: &'static str) -> Attachment {
    Attachment { program, target: Target::Function(name) }
}
const fn tp_btf(program: &'static str, event: &'static str) -> Attachment {
    Attachment { program, target: Target::BtfTracepoint(event) }
}
const fn tracepoint(
    program: &'static str,
    category: &'static str,
    event: &'static str,
) -> Attachment {
    Attachment { program, target: Target::Tracepoint { category, event } }
}

/// A hook with its programs per backend.
pub(crate) struct Hook {
    pub name: &'static str,
    pub fentry: &'static [Attachment],
    pub kprobe: &'static [Attachment],
    /// Empty when the always-attached lifecycle tracepoints already cover the hook.
    pub tp_btf: &'static [Attachment],
    pub tracepoint: &'static [Attachment],
    /// Last resort of the tracepoint backend on kernels without `sock_send_length` and
    /// `sock_recv_length` (before 6.3): count at syscall exit.
    pub syscall_fallback: Option<Setting>,
}

pub(crate) const HOOKS: [Hook; 4] = [
    Hook {
        name: "tcp_connect",
        fentry: &[function(program::FENTRY_TCP_CONNECT, "tcp_connect")],
        kprobe: &[function(program::KPROBE_TCP_CONNECT, "tcp_connect")],
        // CLOSE -> SYN_SENT in sock:inet_sock_set_state runs inside connect().
        tp_btf: &[],
        tracepoint: &[],
        syscall_fallback: None,
    },
    Hook {
        name: "tcp_close",
        fentry: &[function(program::FENTRY_TCP_CLOSE, "tcp_close")],
        kprobe: &[function(program::KPROBE_TCP_CLOSE, "tcp_close")],
        // State changes plus tcp:tcp_destroy_sock carry the close.
        tp_btf: &[],
        tracepoint: &[],
        syscall_fallback: None,
    },
    Hook {
        name: "tcp_sendmsg",
        fentry: &[function(program::FEXIT_TCP_SENDMSG, "tcp_sendmsg")],
        kprobe: &[
            function(program::KPROBE_TCP_SENDMSG, "tcp_sendmsg"),
            function(program::KRETPROBE_TCP_SENDMSG, "tcp_sendmsg"),
        ],
        tp_btf: &[tp_btf(program::BTF_SOCK_SEND_LENGTH, "sock_send_length")],
        tracepoint: &[tracepoint(program::SOCK_SEND_LENGTH, "sock", "sock_send_length")],
        syscall_fallback: Some(Setting::SyscallSends),
    },
    Hook {
        name: "tcp_recvmsg",
        fentry: &[function(program::FEXIT_TCP_RECVMSG, "tcp_recvmsg")],
        kprobe: &[
            function(program::KPROBE_TCP_RECVMSG, "tcp_recvmsg"),
            function(program::KRETPROBE_TCP_RECVMSG, "tcp_recvmsg"),
        ],
        tp_btf: &[tp_btf(program::BTF_SOCK_RECV_LENGTH, "sock_recv_length")],
        tracepoint: &[tracepoint(program::SOCK_RECV_LENGTH, "sock", "sock_recv_length")],
        syscall_fallback: Some(Setting::SyscallRecvs),
    },
];

/// Attached on every kernel, whatever the backend: `(tp_btf form, classic form)`.
pub(crate) const LIFECYCLE: [(Attachment, Attachment); 4] = [
    (
        tp_btf(program::BTF_INET_SOCK_SET_STATE, "inet_sock_set_state"),
        tracepoint(program::INET_SOCK_SET_STATE, "sock", "inet_sock_set_state"),
    ),
    (
        tp_btf(program::BTF_TCP_RECEIVE_RESET, "tcp_receive_reset"),
        tracepoint(program::TCP_RECEIVE_RESET, "tcp", "tcp_receive_reset"),
    ),
    (
        tp_btf(program::BTF_TCP_SEND_RESET, "tcp_send_reset"),
        tracepoint(program::TCP_SEND_RESET, "tcp", "tcp_send_reset"),
    ),
    (
        tp_btf(program::BTF_TCP_DESTROY_SOCK, "tcp_destroy_sock"),
        tracepoint(program::TCP_DESTROY_SOCK, "tcp", "tcp_destroy_sock"),
    ),
];

/// The benchmark's floor arm: the tp_btf hooks, counting bytes per socket only.
pub(crate) const FLOOR: [Attachment; 4] = [
    tp_btf(program::FLOOR_SEND, "sock_send_length"),
    tp_btf(program::FLOOR_RECV, "sock_recv_length"),
    tp_btf(program::FLOOR_STATE, "inet_sock_set_state"),
    tp_btf(program::FLOOR_DESTROY, "tcp_destroy_sock"),
];
