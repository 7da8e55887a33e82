//! Which processes the agent decrypts: the decryption budget applied to each process that
//! calls libssl, the opt-in and opt-out selectors, the kernel's view of it
//! (`UNDECRYPTED_PROCESSES`, `UPROBE_HITS`), and its metrics. The uprobes' attachments
//! follow the changes this module decides (`tls_uprobes`).

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap},
};
use connscope_common::{SslCall, names::map};
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    config::{Config, ProcessSelectors},
    exposition::{
        labels::{LabelCap, SharedLabelCap, process_label},
        metrics,
    },
    kernel::decryption_budget::{Budget, ProcessCost, Sample},
    model::{
        decryption_state::DecryptionState,
        label_sets::{ProcessDecryption, ProcessLabel},
        metric_table,
        tls_requests::TlsRequests,
    },
};

/// A change the attachments must follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Stop decrypting the process: over the budget, or opted out.
    Leave(u32, DecryptionState),
    /// Decrypt it again.
    Rejoin(u32),
}

#[derive(Debug)]
struct Process {
    /// Its name, as the `process` label shows it (within the cap at export).
    comm: String,
    state: DecryptionState,
    /// `--tls.always-decrypt` selects it: the budget does not apply.
    opted_in: bool,
    cost: ProcessCost,
    /// Its cumulative uprobe hits when last read.
    hits: u64,
    /// Hits per second over the last tick (for `/`).
    hits_per_second: f64,
}

impl Process {
    /// A process just found, with no hits counted yet.
    fn new(comm: String, state: DecryptionState, opted_in: bool) -> Self {
        Self { comm, state, opted_in, cost: ProcessCost::default(), hits: 0, hits_per_second: 0.0 }
    }
}

pub struct Decryption {
    budget: Budget,
    always: ProcessSelectors,
    never: ProcessSelectors,
    processes: HashMap<u32, Process>,
    hits_map: PerCpuHashMap<MapData, u32, u64>,
    undecrypted: BpfHashMap<MapData, u32, u8>,
    /// libssl calls in flight (`TLS_CALLS`): a process decrypted again loses the stale
    /// entries its calls left while it was not.
    calls: BpfHashMap<MapData, u64, [u8; size_of::<SslCall>()]>,
    requests: TlsRequests,
    /// The flows' `process` cap: together the metrics stay within it.
    labels: SharedLabelCap,
    last_tick: Instant,
    states: Family<ProcessDecryption, Gauge>,
    /// The rows of `states` set at the last export.
    exported: HashSet<ProcessDecryption>,
    hits: Family<ProcessLabel, Counter>,
    hit_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    share: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Decryption {
    /// `hit`: what one uprobe hit costs here (`uprobe_cost::measure`).
    pub fn new(
        ebpf: &mut Ebpf,
        config: &Config,
        hit: Duration,
        requests: TlsRequests,
    ) -> anyhow::Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name).with_context(|| format!("{name} missing from the eBPF object"))
        };
        let decryption = Self {
            budget: Budget { share: config.tls_budget, hit_seconds: hit.as_secs_f64() },
            always: config.tls_always_decrypt.clone(),
            never: config.tls_never_decrypt.clone(),
            processes: HashMap::new(),
            hits_map: PerCpuHashMap::try_from(take(map::UPROBE_HITS)?)?,
            undecrypted: BpfHashMap::try_from(take(map::UNDECRYPTED_PROCESSES)?)?,
            calls: BpfHashMap::try_from(take(map::TLS_CALLS)?)?,
            requests,
            labels: SharedLabelCap::new(LabelCap::unreported(config.max_processes)),
            last_tick: Instant::now(),
            states: Family::default(),
            exported: HashSet::new(),
            hits: Family::default(),
            hit_seconds: Gauge::default(),
            share: Gauge::default(),
        };
        decryption.hit_seconds.set(hit.as_secs_f64());
        decryption.share.set(config.tls_budget);
        Ok(decryption)
    }

    /// Uses the flows' `process` cap from now on.
    pub fn share_process_labels(&mut self, labels: SharedLabelCap) {
        self.labels = labels;
    }

    pub fn register(&self, registry: &mut Registry) {
        metrics::register(registry, &metric_table::TLS_DECRYPTION_PROCESSES, self.states.clone());
        metrics::register(registry, &metric_table::TLS_UPROBE_HITS, self.hits.clone());
        metrics::register(registry, &metric_table::TLS_UPROBE_HIT, self.hit_seconds.clone());
        metrics::register(registry, &metric_table::TLS_DECRYPTION_BUDGET, self.share.clone());
    }

    pub fn is_decrypted(&self, pid: u32) -> bool {
        self.processes.get(&pid).is_none_or(|process| process.state == DecryptionState::Decrypted)
    }

    /// Processes not decrypted now.
    pub fn left_out(&self) -> impl Iterator<Item = u32> + '_ {
        self.processes
            .iter()
            .filter(|(_, process)| process.state != DecryptionState::Decrypted)
            .map(|(&pid, _)| pid)
    }

    /// A process found mapping an OpenSSL the uprobes are on: its state from now, and
    /// whether it is new (a new process `--tls.never-decrypt` selects is left out at once,
    /// by the caller).
    pub fn found(&mut self, pid: u32) -> (DecryptionState, bool) {
        if let Some(process) = self.processes.get(&pid) {
            return (process.state, false);
        }
        let (comm, cgroup) = identity(pid);
        let state = if self.never.selects(&comm, &cgroup) {
            DecryptionState::CiphertextOptOut
        } else {
            DecryptionState::Decrypted
        };
        let opted_in = self.always.selects(&comm, &cgroup);
        self.processes.insert(pid, Process::new(comm, state, opted_in));
        (state, true)
    }

    /// The process exited: nothing of it is kept (its hit count would make it found again).
    pub fn gone(&mut self, pid: u32) {
        if self.processes.remove(&pid).is_some() {
            let _ = self.undecrypted.remove(&pid);
            let _ = self.hits_map.remove(&pid);
        }
    }

    /// The process is counted from its ciphertext from now on (`state` says why): the
    /// kernel ignores its libssl calls before its uprobes are removed.
    pub fn leave(&mut self, pid: u32, state: DecryptionState) {
        if let Err(err) = self.undecrypted.insert(pid, state as u8, 0) {
            tracing::warn!(pid, "cannot mark a process undecrypted: {err}");
            return;
        }
        if let Some(process) = self.processes.get_mut(&pid) {
            process.state = state;
        }
    }

    /// The process is decrypted again, its uprobes attached: the calls it left stashed
    /// meanwhile are dropped, then the kernel reads its calls again (for its new
    /// connections: one counted from its ciphertext stays so).
    pub fn rejoin(&mut self, pid: u32) {
        let stale: Vec<u64> =
            self.calls.keys().flatten().filter(|key| (key >> 32) as u32 == pid).collect();
        for key in stale {
            let _ = self.calls.remove(&key);
        }
        let _ = self.undecrypted.remove(&pid);
        if let Some(process) = self.processes.get_mut(&pid) {
            process.state = DecryptionState::Decrypted;
        }
    }

    /// The budget's tick: reads each process's hits and requests since the last one, and
    /// returns the changes the budget asks for. `scanned`: processes whose mappings were
    /// read (one calling TLS without an OpenSSL the uprobes are on is `unsupported`).
    pub fn tick(&mut self, now: Instant, scanned: impl Fn(u32) -> bool) -> Vec<Change> {
        let elapsed = now.duration_since(self.last_tick);
        self.last_tick = now;
        let own = std::process::id();
        let mut samples: HashMap<u32, Sample> = HashMap::new();
        for (pid, per_cpu) in self.hits_map.iter().flatten() {
            if pid != own {
                let hits: u64 = per_cpu.iter().sum();
                samples.entry(pid).or_default().hits = hits;
            }
        }
        for (pid, requests) in self.requests.take() {
            samples.entry(pid).or_default().requests = requests;
        }
        let mut changes = Vec::new();
        for (&pid, sample) in &samples {
            if !self.processes.contains_key(&pid) {
                if sample.hits > 0 {
                    // Hit before a scan found it (an all-process uprobe): decrypted.
                    let (state, _) = self.found(pid);
                    if state != DecryptionState::Decrypted {
                        changes.push(Change::Leave(pid, state));
                    }
                } else if scanned(pid) {
                    self.unsupported(pid);
                    continue;
                } else {
                    continue;
                }
            }
            let Some(process) = self.processes.get_mut(&pid) else { continue };
            let hits = sample.hits.saturating_sub(process.hits);
            process.hits = process.hits.max(sample.hits);
            process.hits_per_second = hits as f64 / elapsed.as_secs_f64().max(1e-3);
            if hits > 0 {
                let process_label = self.labels.admitted(&process.comm);
                self.hits.get_or_create(&ProcessLabel { process: process_label }).inc_by(hits);
            }
            let tick = Sample { hits, requests: sample.requests };
            if process.state == DecryptionState::Decrypted
                && !process.opted_in
                && self.budget.over(&mut process.cost, tick, elapsed)
            {
                changes.push(Change::Leave(pid, DecryptionState::CiphertextBudget));
            }
        }
        // Left out by the budget: judged on their requests (none this tick: estimate 0).
        for (&pid, process) in &mut self.processes {
            let requests = samples.get(&pid).map_or(0, |sample| sample.requests);
            if process.state == DecryptionState::CiphertextBudget
                && self.budget.may_resume(&mut process.cost, requests, elapsed, now)
            {
                changes.push(Change::Rejoin(pid));
            }
        }
        changes
    }

    fn unsupported(&mut self, pid: u32) {
        let (comm, _) = identity(pid);
        let process = Process::new(comm, DecryptionState::CiphertextUnsupported, false);
        self.processes.insert(pid, process);
    }

    /// `tls_decryption_processes`: processes per (label, state), stale rows removed; each
    /// process's `tls_uprobe_hits_total`, at 0 until its first hit. After
    /// the tick's changes are applied, so a scrape sees a switch as soon as it is made.
    pub fn export_states(&mut self) {
        let mut counts: HashMap<ProcessDecryption, i64> = HashMap::new();
        for process in self.processes.values() {
            let key = ProcessDecryption {
                process: self.labels.admitted(&process.comm),
                state: process.state.label().to_owned(),
            };
            // Its hits counter exists from the start (at 0), so that its rate does too.
            drop(self.hits.get_or_create(&ProcessLabel { process: key.process.clone() }));
            *counts.entry(key).or_default() += 1;
        }
        let exported: HashSet<ProcessDecryption> = counts.keys().cloned().collect();
        for stale in self.exported.difference(&exported) {
            self.states.remove(stale);
        }
        self.exported = exported;
        for (key, count) in counts {
            self.states.get_or_create(&key).set(count);
        }
    }

    /// `(process label, state, hits per second)` of each process, for `/`.
    pub fn report(&self) -> Vec<(String, &'static str, f64)> {
        let mut rows: Vec<_> = self
            .processes
            .iter()
            .map(|(pid, process)| {
                let label = format!("{} ({pid})", process.comm);
                (label, process.state.label(), process.hits_per_second)
            })
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows
    }
}

/// A process's name (sanitised as the `process` label) and cgroup v2 path.
fn identity(pid: u32) -> (String, String) {
    let comm = std::fs::read(format!("/proc/{pid}/comm")).unwrap_or_default();
    let comm = process_label(comm.strip_suffix(b"\n").unwrap_or(&comm));
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let cgroup =
        cgroup.lines().find_map(|line| line.strip_prefix("0::")).unwrap_or_default().to_owned();
    (comm, cgroup)
}
