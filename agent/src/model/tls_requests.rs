//! TLS requests by process, from the pipeline to the decryption budget: what a process
//! does per second, decrypted or not. The budget divides its uprobe hits by them while it
//! decrypts, and estimates its cost from them while it does not.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

/// Requests (exchanges) counted on TLS connections since the last [`TlsRequests::take`],
/// by process id. Shared: the pipeline adds, the budget takes.
#[derive(Clone, Debug, Default)]
pub struct TlsRequests(Arc<Mutex<HashMap<u32, u64>>>);

impl TlsRequests {
    pub fn add(&self, pid: u32, requests: u64) {
        if pid == 0 || requests == 0 {
            return;
        }
        if let Ok(mut counts) = self.0.lock() {
            *counts.entry(pid).or_default() += requests;
        }
    }

    /// The counts since the last call, emptied.
    pub fn take(&self) -> HashMap<u32, u64> {
        self.0.lock().map(|mut counts| std::mem::take(&mut *counts)).unwrap_or_default()
    }
}
