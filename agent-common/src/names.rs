//! Names by which the agent finds programs, maps and globals in the eBPF object. The
//! programs are Rust functions and maps are statics of the same names in `connscope-ebpf`;
//! a unit test of the agent checks every name here against the object it embeds, so a
//! rename fails `cargo test`, not a load on some host.

/// Program (function) names.
pub mod program {
    // Lifecycle: BTF tracepoints where the kernel has BTF, classic tracepoints otherwise.
    pub const BTF_INET_SOCK_SET_STATE: &str = "connscope_btf_inet_sock_set_state";
    pub const BTF_TCP_DESTROY_SOCK: &str = "connscope_btf_tcp_destroy_sock";
    pub const BTF_TCP_RECEIVE_RESET: &str = "connscope_btf_tcp_receive_reset";
    pub const BTF_TCP_SEND_RESET: &str = "connscope_btf_tcp_send_reset";
    pub const INET_SOCK_SET_STATE: &str = "connscope_inet_sock_set_state";
    pub const TCP_DESTROY_SOCK: &str = "connscope_tcp_destroy_sock";
    pub const TCP_RECEIVE_RESET: &str = "connscope_tcp_receive_reset";
    pub const TCP_SEND_RESET: &str = "connscope_tcp_send_reset";
    // Send/receive, tracepoint backend.
    pub const BTF_SOCK_SEND_LENGTH: &str = "connscope_btf_sock_send_length";
    pub const BTF_SOCK_RECV_LENGTH: &str = "connscope_btf_sock_recv_length";
    pub const SOCK_SEND_LENGTH: &str = "connscope_sock_send_length";
    pub const SOCK_RECV_LENGTH: &str = "connscope_sock_recv_length";
    // fentry/fexit backend.
    pub const FENTRY_TCP_CONNECT: &str = "connscope_fentry_tcp_connect";
    pub const FENTRY_TCP_CLOSE: &str = "connscope_fentry_tcp_close";
    pub const FEXIT_TCP_SENDMSG: &str = "connscope_fexit_tcp_sendmsg";
    /// `tcp_recvmsg(sk, msg, len, flags, addr_len)`, 5.19 and later.
    pub const FEXIT_TCP_RECVMSG: &str = "connscope_fexit_tcp_recvmsg";
    /// `tcp_recvmsg(sk, msg, len, nonblock, flags, addr_len)`, before 5.19.
    pub const FEXIT_TCP_RECVMSG_NONBLOCK: &str = "connscope_fexit_tcp_recvmsg_nonblock";
    /// `tcp_recvmsg(sk, msg, len, flags)`, kernels without `addr_len` (6.18 has it so).
    pub const FEXIT_TCP_RECVMSG_NO_ADDR_LEN: &str = "connscope_fexit_tcp_recvmsg_no_addr_len";
    // kprobe/kretprobe backend.
    pub const KPROBE_TCP_CONNECT: &str = "connscope_kprobe_tcp_connect";
    pub const KPROBE_TCP_CLOSE: &str = "connscope_kprobe_tcp_close";
    pub const KPROBE_TCP_SENDMSG: &str = "connscope_kprobe_tcp_sendmsg";
    pub const KRETPROBE_TCP_SENDMSG: &str = "connscope_kretprobe_tcp_sendmsg";
    pub const KPROBE_TCP_RECVMSG: &str = "connscope_kprobe_tcp_recvmsg";
    pub const KPROBE_TCP_RECVMSG_NONBLOCK: &str = "connscope_kprobe_tcp_recvmsg_nonblock";
    pub const KRETPROBE_TCP_RECVMSG: &str = "connscope_kretprobe_tcp_recvmsg";
    // System calls (older kernels only).
    pub const SYS_ENTER_STASH: &str = "connscope_sys_enter";
    pub const SYS_EXIT_TRANSFER: &str = "connscope_sys_exit";
    // The benchmark's floor arm (`connscope bench-floor`): names unique in the kernel's
    // 15 characters, so the bench reads each program's run time apart.
    pub const FLOOR_SEND: &str = "floor_sock_send";
    pub const FLOOR_RECV: &str = "floor_sock_recv";
    pub const FLOOR_STATE: &str = "floor_set_state";
    pub const FLOOR_DESTROY: &str = "floor_destroy";
    // libssl uprobes (`--tls.uprobes`): entries of `SSL_write`, `SSL_write_ex`, `SSL_read`,
    // `SSL_read_ex`, `SSL_do_handshake`, and one return probe for the reads and the handshake.
    pub const SSL_WRITE: &str = "connscope_ssl_write";
    pub const SSL_WRITE_EX: &str = "connscope_ssl_write_ex";
    pub const SSL_READ: &str = "connscope_ssl_read";
    pub const SSL_READ_EX: &str = "connscope_ssl_read_ex";
    pub const SSL_DO_HANDSHAKE: &str = "connscope_ssl_do_handshake";
    pub const SSL_RETURN: &str = "connscope_ssl_return";
    /// Attached to a function of the agent itself, in its own process only, while it
    /// measures what one uprobe hit costs (the decryption budget's unit).
    pub const CALIBRATION_ENTRY: &str = "connscope_calibration_entry";
    pub const CALIBRATION_RETURN: &str = "connscope_calibration_return";
    /// Never attached: run once by the agent (`BPF_PROG_TEST_RUN`) before it attaches the
    /// hooks, to stamp `PinSlot::AdoptionStartJiffies`.
    pub const ADOPTION_START: &str = "connscope_adoption_start";

    /// Every program of the object.
    pub const ALL: [&str; 40] = [
        BTF_INET_SOCK_SET_STATE,
        BTF_TCP_DESTROY_SOCK,
        BTF_TCP_RECEIVE_RESET,
        BTF_TCP_SEND_RESET,
        INET_SOCK_SET_STATE,
        TCP_DESTROY_SOCK,
        TCP_RECEIVE_RESET,
        TCP_SEND_RESET,
        BTF_SOCK_SEND_LENGTH,
        BTF_SOCK_RECV_LENGTH,
        SOCK_SEND_LENGTH,
        SOCK_RECV_LENGTH,
        FENTRY_TCP_CONNECT,
        FENTRY_TCP_CLOSE,
        FEXIT_TCP_SENDMSG,
        FEXIT_TCP_RECVMSG,
        FEXIT_TCP_RECVMSG_NONBLOCK,
        FEXIT_TCP_RECVMSG_NO_ADDR_LEN,
        KPROBE_TCP_CONNECT,
        KPROBE_TCP_CLOSE,
        KPROBE_TCP_SENDMSG,
        KRETPROBE_TCP_SENDMSG,
        KPROBE_TCP_RECVMSG,
        KPROBE_TCP_RECVMSG_NONBLOCK,
        KRETPROBE_TCP_RECVMSG,
        SYS_ENTER_STASH,
        SYS_EXIT_TRANSFER,
        FLOOR_SEND,
        FLOOR_RECV,
        FLOOR_STATE,
        FLOOR_DESTROY,
        SSL_WRITE,
        SSL_WRITE_EX,
        SSL_READ,
        SSL_READ_EX,
        SSL_DO_HANDSHAKE,
        SSL_RETURN,
        CALIBRATION_ENTRY,
        CALIBRATION_RETURN,
        ADOPTION_START,
    ];
}

/// Map (static) names.
pub mod map {
    pub const CONNS: &str = "CONNS";
    pub const EVENTS: &str = "EVENTS";
    pub const LOST: &str = "LOST";
    pub const SETTINGS: &str = "SETTINGS";
    pub const CONNECTS_IN_FLIGHT: &str = "CONNECTS_IN_FLIGHT";
    pub const HEAD_SCRATCH: &str = "HEAD_SCRATCH";
    pub const CONN_SCRATCH: &str = "CONN_SCRATCH";
    pub const SOCK_SCRATCH: &str = "SOCK_SCRATCH";
    pub const SYSCALL_STASH: &str = "SYSCALL_STASH";
    pub const CALLS_IN_FLIGHT: &str = "CALLS_IN_FLIGHT";
    pub const FLOOR_BYTES: &str = "FLOOR_BYTES";
    pub const LISTEN_PORTS: &str = "LISTEN_PORTS";
    pub const PIN_STATE: &str = "PIN_STATE";
    pub const HANDOVER: &str = "HANDOVER";
    pub const CARRIED_METRICS: &str = "CARRIED_METRICS";
    pub const LAST_WAKEUP: &str = "LAST_WAKEUP";
    pub const TLS_CALLS: &str = "TLS_CALLS";
    pub const TLS_SOCKETS: &str = "TLS_SOCKETS";
    pub const UPROBE_HITS: &str = "UPROBE_HITS";
    pub const UNDECRYPTED_PROCESSES: &str = "UNDECRYPTED_PROCESSES";
    pub const CHECKPOINT: &str = "CHECKPOINT";
    pub const CHECKPOINT_CONNS: &str = "CHECKPOINT_CONNS";
    pub const CHECKPOINT_METRICS: &str = "CHECKPOINT_METRICS";
    pub const JOURNAL: &str = "JOURNAL";
    pub const H2_CONNS: &str = "H2_CONNS";
    pub const H2_SCRATCH: &str = "H2_SCRATCH";
    pub const H2_CURSOR: &str = "H2_CURSOR";

    /// Maps kept pinned across agent restarts (`--bpf.pin-path`): the connections, the
    /// records waiting for the next agent, and what the programs share.
    pub const PINNED: [&str; 16] = [
        CONNS,
        EVENTS,
        LOST,
        SETTINGS,
        CONNECTS_IN_FLIGHT,
        LISTEN_PORTS,
        PIN_STATE,
        HANDOVER,
        CARRIED_METRICS,
        TLS_CALLS,
        TLS_SOCKETS,
        CHECKPOINT,
        CHECKPOINT_CONNS,
        CHECKPOINT_METRICS,
        JOURNAL,
        H2_CONNS,
    ];

    pub const ALL: [&str; 27] = [
        CONNS,
        EVENTS,
        LOST,
        SETTINGS,
        CONNECTS_IN_FLIGHT,
        HEAD_SCRATCH,
        CONN_SCRATCH,
        SOCK_SCRATCH,
        SYSCALL_STASH,
        CALLS_IN_FLIGHT,
        FLOOR_BYTES,
        LISTEN_PORTS,
        PIN_STATE,
        HANDOVER,
        CARRIED_METRICS,
        LAST_WAKEUP,
        TLS_CALLS,
        TLS_SOCKETS,
        UPROBE_HITS,
        UNDECRYPTED_PROCESSES,
        CHECKPOINT,
        CHECKPOINT_CONNS,
        CHECKPOINT_METRICS,
        JOURNAL,
        H2_CONNS,
        H2_SCRATCH,
        H2_CURSOR,
    ];
}

/// Globals the agent sets before loading (see [`crate::kernel_config`]).
pub mod global {
    pub const SOCK_LAYOUT: &str = "SOCK_LAYOUT";
    pub const FD_LAYOUT: &str = "FD_LAYOUT";
    pub const PAYLOAD_SYSCALLS: &str = "PAYLOAD_SYSCALLS";
    pub const PROGRAM_CONFIG: &str = "PROGRAM_CONFIG";
    pub const GENERATION: &str = "GENERATION";

    pub const ALL: [&str; 5] =
        [SOCK_LAYOUT, FD_LAYOUT, PAYLOAD_SYSCALLS, PROGRAM_CONFIG, GENERATION];
}
