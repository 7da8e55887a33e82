//! The kernel's half of the decryption budget: what each process's libssl uprobes cost
//! (`UPROBE_HITS`, read by the agent every 0.5 s), and which processes the agent stopped
//! decrypting (`UNDECRYPTED_PROCESSES`, written by the agent before it removes their
//! uprobes). A connection of such a process is counted from its ciphertext: the send and
//! receive hooks ignore its libssl calls still in flight (`tls_calls::ciphertext`).

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::map,
    maps::{HashMap, LruPerCpuHashMap},
};
use connscope_common::MAX_TLS_PROCESSES;

/// Uprobe hits (entries and returns) by process (tgid), cumulative, per CPU (exact without
/// atomics; the agent sums them). LRU: exited processes age out; the agent takes
/// differences, and a dropped entry restarts from its next hit.
#[map]
pub static UPROBE_HITS: LruPerCpuHashMap<u32, u64> =
    LruPerCpuHashMap::with_max_entries(MAX_TLS_PROCESSES, 0);

/// Processes (tgid) counted from ciphertext: over the decryption budget, or opted out.
/// Written only by the agent.
#[map]
pub static UNDECRYPTED_PROCESSES: HashMap<u32, u8> =
    HashMap::with_max_entries(MAX_TLS_PROCESSES, 0);

/// The current process (tgid).
#[inline(always)]
pub fn current_process() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// Counts one uprobe hit for the current process.
#[inline(always)]
pub fn count_hit() {
    let process = current_process();
    match UPROBE_HITS.get_ptr_mut(&process) {
        // SAFETY: this CPU's value, from a successful lookup; no other CPU writes it.
        Some(hits) => unsafe { *hits += 1 },
        None => {
            let _ = UPROBE_HITS.insert(&process, &1, 0);
        }
    }
}

/// Whether the current process is counted from ciphertext.
#[inline(always)]
pub fn current_undecrypted() -> bool {
    // SAFETY: only tested for presence.
    unsafe { UNDECRYPTED_PROCESSES.get(&current_process()) }.is_some()
}
