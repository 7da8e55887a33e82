//! The kernel side: what the running kernel offers, loading and attaching the programs,
//! pinning them across restarts, the libssl uprobes, the start-up adoption scan, the
//! per-namespace listen queue counters, and the socket census (TIME_WAIT, ports, port ranges).

pub mod adoption;
pub mod bpffs;
pub mod decryption;
pub mod decryption_budget;
pub mod facts;
pub mod hooks;
pub mod layout;
pub mod listen_queues;
pub mod netns;
pub mod pin_owner;
pub mod pinning;
pub mod port_range;
pub mod preflight;
pub mod probes;
pub mod proc_net_tcp;
pub mod sock_diag;
pub mod socket_census;
pub mod tls_targets;
pub mod tls_uprobes;
pub mod uprobe_cost;
pub mod uprobe_links;
