//! What the `/` page shows about the agent itself: each hook and how it is attached, and the
//! files the libssl uprobes are on. The kernel stage fills it in; the server only reads it.

use std::sync::RwLock;

/// One hook and the mechanism serving it (`probe_info`'s `hook` and `attach` labels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HookRow {
    pub hook: &'static str,
    pub attach: &'static str,
}

/// The libssl uprobes' state and files (paths are the agent's own knowledge, not traffic).
#[derive(Debug)]
pub struct UprobeReport {
    /// `probe_info{hook="libssl"}`'s `attach` label.
    pub attach: RwLock<&'static str>,
    /// `(path, "attached" or the error)`, per file.
    pub targets: RwLock<Vec<(String, String)>>,
    /// `("name (pid)", decryption state, uprobe hits per second)`, per process calling TLS.
    pub processes: RwLock<Vec<(String, &'static str, f64)>>,
}

impl UprobeReport {
    pub fn new(attach: &'static str) -> Self {
        Self {
            attach: RwLock::new(attach),
            targets: RwLock::default(),
            processes: RwLock::default(),
        }
    }
}
