//! Kernel networking constants the programs compare with and the agent decodes: TCP states,
//! address families and the TCP protocol number.

/// TCP states, as in the kernel's `include/net/tcp_states.h`.
pub mod tcp_state {
    pub const ESTABLISHED: i32 = 1;
    pub const SYN_SENT: i32 = 2;
    pub const SYN_RECV: i32 = 3;
    pub const FIN_WAIT1: i32 = 4;
    pub const FIN_WAIT2: i32 = 5;
    pub const TIME_WAIT: i32 = 6;
    pub const CLOSE: i32 = 7;
    pub const CLOSE_WAIT: i32 = 8;
    pub const LAST_ACK: i32 = 9;
    pub const LISTEN: i32 = 10;
    pub const CLOSING: i32 = 11;
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// The socket errors (`sk_err`) a failed connect can leave, as in the kernel's
/// `include/uapi/asm-generic/errno.h` (the same numbers on every architecture Linux runs
/// these programs on).
pub mod errno {
    /// `ENONET`: ICMP host isolated.
    pub const ENONET: i32 = 64;
    /// ICMP network unreachable or unknown.
    pub const ENETUNREACH: i32 = 101;
    /// SYN retries exhausted (`tcp_write_err`).
    pub const ETIMEDOUT: i32 = 110;
    /// A reset answered the SYN (`tcp_reset`), or ICMP port unreachable.
    pub const ECONNREFUSED: i32 = 111;
    /// ICMP host unknown.
    pub const EHOSTDOWN: i32 = 112;
    /// ICMP host unreachable, or administratively filtered.
    pub const EHOSTUNREACH: i32 = 113;
}
