//! The kernel side: what the running kernel offers, loading and attaching the programs,
//! pinning them across restarts, the libssl uprobes, the start-up adoption scan, and the
//! per-namespace listen queue counters.

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
pub mod preflight;
pub mod probes;
pub mod tls_targets;
pub mod tls_uprobes;
pub mod uprobe_cost;
pub mod uprobe_links;
