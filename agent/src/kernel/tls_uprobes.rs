//! The libssl uprobes (`--tls.uprobes`): attaching them to every OpenSSL the host runs, and
//! reporting where they are attached (`connscope_probe_info{hook="libssl"}`,
//! `connscope_tls_uprobe_targets`, the `/` page).
//!
//! Each file is attached once, for all processes (`tls_targets`): the system's libssl at
//! start, so clients started later are covered from their first call. Other copies (a
//! container's libssl, a binary with OpenSSL inside) are found in `/proc/<pid>/maps`: at
//! start, then every [`RESCAN_INTERVAL`] for processes not seen before, and every
//! [`FULL_RESCAN_EVERY`] rescans for all (a process may load libssl late, as Python's
//! `import ssl` does). A process seen before is read again when its executable changed (a
//! scan can find a new process between its fork and its exec). A periodic scan was chosen
//! over an exec hook: no kernel cost per exec, no event path, and its cost is bounded by
//! the number of new processes (a `maps` read each, a `stat` of each process's executable;
//! a file's symbols are read once per file). The price: the first seconds of a process
//! whose OpenSSL copy is new to the host are not decrypted (counted as undecrypted TLS).
//! A file that cannot be attached is logged once and counted, never fatal.

use std::{
    collections::{HashMap, HashSet},
    fs,
    num::NonZeroU32,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{
        UProbe,
        links::FdLink,
        uprobe::{UProbeLinkId, UProbeScope},
    },
};
use connscope_common::names::program;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    config::Config,
    exposition::{metrics, status::UprobeReport},
    kernel::decryption::{Change, Decryption},
    kernel::tls_targets::{self, FileId, REQUIRED_SYMBOL, Target},
    kernel::uprobe_cost,
    kernel::uprobe_links::{KeptId, UprobeLinks},
    model::{
        decryption_state::DecryptionState, label_sets::Probe, metric_table,
        tls_requests::TlsRequests,
    },
};

/// The `hook` label of the uprobes' `connscope_probe_info` row.
pub const HOOK: &str = "libssl";

/// Rounds of reading every process's mappings when a file's uprobe for all processes is
/// replaced by per-process ones ([`TlsUprobes::per_process`]): each round attaches the
/// processes the last one did not know.
const MAX_USER_ROUNDS: usize = 4;

/// How often processes started since the last scan are looked at.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(10);
/// Every this many rescans, every process is looked at again.
const FULL_RESCAN_EVERY: u64 = 6;

/// `(entry program, symbol, required, return probe)`: `_ex` variants are missing from
/// OpenSSL before 1.1.1. One return program serves the reads and the handshake; writes have
/// none (their plaintext is counted with their first ciphertext, in the send hook), which
/// saves one uprobe hit per write.
const SYMBOLS: [(&str, &str, bool, bool); 5] = [
    (program::SSL_WRITE, "SSL_write", true, false),
    (program::SSL_READ, "SSL_read", true, true),
    (program::SSL_DO_HANDSHAKE, "SSL_do_handshake", true, true),
    (program::SSL_WRITE_EX, "SSL_write_ex", false, false),
    (program::SSL_READ_EX, "SSL_read_ex", false, true),
];

/// The `attach` label of `connscope_probe_info{hook="libssl"}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsAttach {
    /// At least one file is attached.
    Uprobe,
    /// `--tls.uprobes=false` (or heads are not captured).
    Off,
    /// The programs could not be loaded, or no file could be attached yet.
    None,
}

impl TlsAttach {
    pub const fn label(self) -> &'static str {
        match self {
            Self::Uprobe => "uprobe",
            Self::Off => "off",
            Self::None => "none",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetState {
    /// `attached` or `failed`.
    pub state: String,
}

/// What the `/` page and the metrics show.
pub struct TlsStatus {
    attach: RwLock<TlsAttach>,
    /// The `/` page's part, shared with the server.
    pub report: Arc<UprobeReport>,
    pub counts: Family<TargetState, Gauge>,
    /// `connscope_probe_info`, whose `libssl` row follows `attach`.
    probe_info: Family<Probe, Gauge>,
}

impl TlsStatus {
    fn new(attach: TlsAttach, probe_info: Family<Probe, Gauge>) -> Self {
        let status = Self {
            attach: RwLock::new(attach),
            report: Arc::new(UprobeReport::new(attach.label())),
            counts: Family::default(),
            probe_info,
        };
        status.probe_info.get_or_create(&probe_row(attach)).set(1);
        status
    }

    fn set_attach(&self, attach: TlsAttach) {
        let Ok(mut current) = self.attach.write() else { return };
        if *current != attach {
            self.probe_info.remove(&probe_row(*current));
            self.probe_info.get_or_create(&probe_row(attach)).set(1);
            *current = attach;
            if let Ok(mut shown) = self.report.attach.write() {
                *shown = attach.label();
            }
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        metrics::register(registry, &metric_table::TLS_UPROBE_TARGETS, self.counts.clone());
    }

    fn record(&self, shown: &str, outcome: Result<(), String>) {
        let state = if outcome.is_ok() { "attached" } else { "failed" };
        self.counts.get_or_create(&TargetState { state: state.into() }).inc();
        if let Ok(mut targets) = self.report.targets.write() {
            targets.push((shown.to_owned(), outcome.err().unwrap_or_else(|| state.into())));
        }
    }
}

fn probe_row(attach: TlsAttach) -> Probe {
    Probe { hook: HOOK.into(), attach: attach.label().into() }
}

/// Starts the uprobes as `config` says. They need payload heads (`--http.capture-heads`):
/// reading plaintext is reading payload. Returns `None` when they are off or cannot run;
/// the status says which either way.
/// `links_outlive_agent`: the state is pinned and uprobes are BPF links (`UprobeLinks`).
pub fn start(
    config: &Config,
    ebpf: &mut Ebpf,
    probe_info: Family<Probe, Gauge>,
    links_outlive_agent: bool,
    requests: TlsRequests,
) -> (Option<TlsUprobes>, Arc<TlsStatus>) {
    if !config.tls_uprobes || !config.capture_heads {
        if config.tls_uprobes {
            tracing::info!("TLS uprobes off: --http.capture-heads=false reads no payload");
        }
        return (None, Arc::new(TlsStatus::new(TlsAttach::Off, probe_info)));
    }
    let status = Arc::new(TlsStatus::new(TlsAttach::None, probe_info));
    let links = links_outlive_agent.then(UprobeLinks::default);
    match TlsUprobes::start(ebpf, status.clone(), links) {
        Ok(mut uprobes) => {
            status.set_attach(uprobes.attach_state());
            uprobes.start_budget(ebpf, config, requests);
            (Some(uprobes), status)
        }
        Err(err) => {
            tracing::warn!("TLS uprobes unavailable, HTTPS is counted undecrypted: {err:#}");
            (None, status)
        }
    }
}

pub struct TlsUprobes {
    /// Files looked at: attached, failed, or without OpenSSL.
    known: HashSet<FileId>,
    /// Processes looked at by the previous scan, with their executable then.
    scanned: HashMap<u32, Option<FileId>>,
    rescans: u64,
    /// Files the uprobes are on, and for which processes.
    files: HashMap<FileId, AttachedFile>,
    /// The attached files each process maps, as its last read of `/proc/<pid>/maps` said.
    users: HashMap<u32, Vec<FileId>>,
    status: Arc<TlsStatus>,
    /// `None`: the links stay with their programs and detach with the agent.
    links: Option<UprobeLinks>,
    /// Which processes are decrypted (`None`: the budget could not start; all are).
    decryption: Option<Decryption>,
    /// Opt-outs exist: files keep per-process uprobes (a process to leave out may start
    /// at any time).
    per_process_only: bool,
}

/// One file's uprobes.
struct AttachedFile {
    target: Target,
    scope: FileScope,
}

/// A uprobe is on a file for all processes, or for one: a process can be left out only
/// when every other process that maps the file has uprobes of its own.
enum FileScope {
    /// One set of links for every process (and every process started later).
    All(Vec<LinkRef>),
    /// Links per decrypted process; a process started later is attached at the scan that
    /// finds it.
    PerProcess(HashMap<u32, Vec<LinkRef>>),
}

/// An attached uprobe: held by its program, or kept (`UprobeLinks`).
enum LinkRef {
    Program(&'static str, UProbeLinkId),
    Kept(KeptId),
}

impl TlsUprobes {
    /// Loads the programs and attaches the system's libssl and every copy running
    /// processes map. `Err` when the programs cannot be loaded (logged by the caller).
    fn start(
        ebpf: &mut Ebpf,
        status: Arc<TlsStatus>,
        links: Option<UprobeLinks>,
    ) -> anyhow::Result<Self> {
        for name in SYMBOLS.iter().map(|(name, ..)| *name).chain([program::SSL_RETURN]) {
            uprobe(ebpf, name)?.load().with_context(|| format!("loading {name}"))?;
        }
        let mut uprobes = Self {
            known: HashSet::new(),
            scanned: HashMap::new(),
            rescans: 0,
            files: HashMap::new(),
            users: HashMap::new(),
            status,
            links,
            decryption: None,
            per_process_only: false,
        };
        let started = std::time::Instant::now();
        for target in tls_targets::system_libraries() {
            uprobes.consider(ebpf, target, true);
        }
        uprobes.scan(ebpf, true);
        tracing::info!(
            attached = uprobes.files.len(),
            files = uprobes.known.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "TLS uprobe targets scanned"
        );
        Ok(uprobes)
    }

    /// Starts the decryption budget: measures what a hit costs, then judges every process
    /// found so far. Without it every process is decrypted (logged).
    fn start_budget(&mut self, ebpf: &mut Ebpf, config: &Config, requests: TlsRequests) {
        let started = std::time::Instant::now();
        let decryption = uprobe_cost::measure(ebpf).and_then(|hit| {
            tracing::info!(
                hit_ns = hit.as_nanos() as u64,
                budget = config.tls_budget,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "uprobe hit cost measured"
            );
            Decryption::new(ebpf, config, hit, requests)
        });
        match decryption {
            Ok(decryption) => {
                self.decryption = Some(decryption);
                let pids: Vec<u32> = self.users.keys().copied().collect();
                for pid in pids {
                    self.judge_found(ebpf, pid);
                }
                // A process to leave out may start at any time, and an uprobe for all
                // processes would decrypt it until a scan found it: with opt-outs, every
                // file has per-process uprobes from the start.
                if !config.tls_never_decrypt.is_empty() {
                    self.per_process_only = true;
                    let ids: Vec<FileId> = self.files.keys().copied().collect();
                    let removed: Vec<LinkRef> =
                        ids.into_iter().flat_map(|id| self.per_process(ebpf, id)).collect();
                    self.detach_now(ebpf, removed);
                }
            }
            Err(err) => {
                tracing::warn!("no decryption budget: every OpenSSL process is decrypted: {err:#}")
            }
        }
    }

    /// The `process` label's cap the flows use: the budget's metrics share it.
    pub fn share_process_labels(&mut self, labels: crate::exposition::labels::SharedLabelCap) {
        if let Some(decryption) = &mut self.decryption {
            decryption.share_process_labels(labels);
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        if let Some(decryption) = &self.decryption {
            decryption.register(registry);
        }
    }

    /// This agent's takeover is done: the uprobes' links are pinned in `dir` from now on.
    pub fn pin_links(&mut self, dir: std::path::PathBuf) {
        if let Some(links) = &mut self.links {
            links.pin_in(dir);
        }
    }

    fn attach_state(&self) -> TlsAttach {
        if self.files.is_empty() { TlsAttach::None } else { TlsAttach::Uprobe }
    }

    /// The periodic rescan (see the module docs).
    pub fn rescan(&mut self, ebpf: &mut Ebpf) {
        self.rescans += 1;
        self.scan(ebpf, self.rescans.is_multiple_of(FULL_RESCAN_EVERY));
        self.status.set_attach(self.attach_state());
    }

    /// The budget's tick (`decryption_budget::TICK`): processes over it leave
    /// decryption, processes back under it rejoin.
    pub fn budget_tick(&mut self, ebpf: &mut Ebpf) {
        let Some(decryption) = &mut self.decryption else { return };
        // A process left out that exited is forgotten now, not at the next scan: while it
        // is remembered, its files keep per-process uprobes.
        let exited: Vec<u32> = decryption
            .left_out()
            .filter(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
            .collect();
        if !exited.is_empty() {
            for pid in exited {
                self.forget(ebpf, pid);
            }
            self.settle_scopes(ebpf);
        }
        let Some(decryption) = &mut self.decryption else { return };
        let scanned = &self.scanned;
        let changes = decryption.tick(std::time::Instant::now(), |pid| scanned.contains_key(&pid));
        for change in changes {
            match change {
                Change::Leave(pid, state) => self.leave(ebpf, pid, state),
                Change::Rejoin(pid) => self.rejoin(ebpf, pid),
            }
        }
        if let Some(decryption) = &mut self.decryption {
            decryption.export_states();
            if let Ok(mut shown) = self.status.report.processes.write() {
                *shown = decryption.report();
            }
        }
    }

    fn scan(&mut self, ebpf: &mut Ebpf, all: bool) {
        let own = std::process::id();
        let mut seen = HashMap::with_capacity(self.scanned.len());
        for pid in tls_targets::process_ids() {
            let exe = tls_targets::file_id(format!("/proc/{pid}/exe").as_ref());
            seen.insert(pid, exe);
            // Read before with the same executable (one found between its fork and its
            // exec was not: its maps were its parent's).
            if pid == own || (!all && self.scanned.get(&pid) == Some(&exe)) {
                continue;
            }
            // A process that exited meanwhile has no maps: nothing to do.
            let Ok(maps) = fs::read_to_string(format!("/proc/{pid}/maps")) else { continue };
            for target in tls_targets::candidates(pid, &maps, exe, &self.known) {
                let is_libssl = exe != Some(target.id);
                self.consider(ebpf, target, is_libssl);
            }
            self.record_users(pid, &maps);
            self.judge_found(ebpf, pid);
        }
        let gone: Vec<u32> =
            self.users.keys().filter(|pid| !seen.contains_key(pid)).copied().collect();
        for pid in gone {
            self.forget(ebpf, pid);
        }
        self.settle_scopes(ebpf);
        self.scanned = seen;
    }

    /// Reads the mappings of every process again (judged at the next scan). The last scan's
    /// are not enough when a file's uprobe for all processes is replaced: a process that
    /// started since, was found before its exec, or was first seen by its hits (the budget
    /// counts them before a scan reads its maps) would lose its uprobes mid-connection,
    /// and its decrypted connections would count nothing until it left decryption too.
    fn record_all_users(&mut self) {
        let own = std::process::id();
        for pid in tls_targets::process_ids() {
            if pid == own {
                continue;
            }
            if let Ok(maps) = fs::read_to_string(format!("/proc/{pid}/maps")) {
                self.record_users(pid, &maps);
            }
        }
    }

    /// Remembers which attached files `pid` maps.
    fn record_users(&mut self, pid: u32, maps: &str) {
        let mut mapped: Vec<FileId> = Vec::new();
        for mapping in maps.lines().filter_map(tls_targets::executable_mapping) {
            if self.files.contains_key(&mapping.id) && !mapped.contains(&mapping.id) {
                mapped.push(mapping.id);
            }
        }
        if mapped.is_empty() {
            self.users.remove(&pid);
        } else {
            self.users.insert(pid, mapped);
        }
    }

    /// A process found mapping attached files: left out if it is opted out, else given
    /// uprobes of its own on the files that have per-process ones.
    fn judge_found(&mut self, ebpf: &mut Ebpf, pid: u32) {
        if !self.users.contains_key(&pid) {
            return;
        }
        let Some(decryption) = &mut self.decryption else { return };
        match decryption.found(pid) {
            (DecryptionState::Decrypted, _) => {
                self.attach_process(ebpf, pid);
            }
            (state, true) => self.leave(ebpf, pid, state),
            (_, false) => {}
        }
    }

    /// An exited process: its own uprobes are removed.
    fn forget(&mut self, ebpf: &mut Ebpf, pid: u32) {
        self.users.remove(&pid);
        if let Some(decryption) = &mut self.decryption {
            decryption.gone(pid);
        }
        let mut removed = Vec::new();
        for file in self.files.values_mut() {
            if let FileScope::PerProcess(per_process) = &mut file.scope
                && let Some(links) = per_process.remove(&pid)
            {
                removed.extend(links);
            }
        }
        self.detach(ebpf, removed);
    }

    /// Files with per-process uprobes whose processes are all decrypted go back to one
    /// uprobe for all processes (which also covers processes started later at once).
    fn settle_scopes(&mut self, ebpf: &mut Ebpf) {
        let Some(decryption) = &self.decryption else { return };
        if self.per_process_only {
            return;
        }
        let settled: Vec<FileId> =
            self.files
                .iter()
                .filter(|(id, file)| {
                    matches!(file.scope, FileScope::PerProcess(_))
                        && !self.users.iter().any(|(&pid, mapped)| {
                            mapped.contains(id) && !decryption.is_decrypted(pid)
                        })
                })
                .map(|(&id, _)| id)
                .collect();
        let mut removed = Vec::new();
        for id in settled {
            let Some(file) = self.files.get_mut(&id) else { continue };
            let all = UProbeScope::AllProcesses;
            if let Some(links) = attach_logged(ebpf, &file.target, all, self.links.as_mut())
                && let FileScope::PerProcess(per_process) =
                    std::mem::replace(&mut file.scope, FileScope::All(links))
            {
                removed.extend(per_process.into_values().flatten());
            }
        }
        self.detach(ebpf, removed);
    }

    /// Gives `pid` uprobes of its own on the files it maps that have per-process ones.
    /// Returns whether it attached any.
    fn attach_process(&mut self, ebpf: &mut Ebpf, pid: u32) -> bool {
        let Some(scope) = NonZeroU32::new(pid).map(UProbeScope::OneProcess) else { return false };
        let mut attached = false;
        for id in self.users.get(&pid).cloned().unwrap_or_default() {
            let Some(file) = self.files.get_mut(&id) else { continue };
            let FileScope::PerProcess(per_process) = &mut file.scope else { continue };
            if per_process.contains_key(&pid) {
                continue;
            }
            if let Some(links) = attach_logged(ebpf, &file.target, scope, self.links.as_mut()) {
                per_process.insert(pid, links);
                attached = true;
            }
        }
        attached
    }

    /// `pid` is counted from its ciphertext from now on: the kernel ignores its calls at
    /// once; then every other decrypted process that maps one of its files gets uprobes of
    /// its own, and the uprobes `pid` ran into are removed.
    fn leave(&mut self, ebpf: &mut Ebpf, pid: u32, state: DecryptionState) {
        let Some(decryption) = &mut self.decryption else { return };
        decryption.leave(pid, state);
        if let Ok(maps) = fs::read_to_string(format!("/proc/{pid}/maps")) {
            self.record_users(pid, &maps);
        }
        let started = std::time::Instant::now();
        let (mut shared, mut own) = (Vec::new(), Vec::new());
        let mut replaced_any = false;
        for id in self.users.get(&pid).cloned().unwrap_or_default() {
            let Some(file) = self.files.get_mut(&id) else { continue };
            match &mut file.scope {
                FileScope::All(_) => {
                    shared.extend(self.per_process(ebpf, id));
                    replaced_any = true;
                }
                FileScope::PerProcess(per_process) => {
                    own.extend(per_process.remove(&pid).unwrap_or_default());
                }
            }
        }
        self.detach_now(ebpf, shared);
        if replaced_any {
            self.attach_new_users(ebpf);
        }
        self.detach(ebpf, own);
        tracing::info!(
            pid,
            state = state.label(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "TLS decryption stopped for a process: counted from its ciphertext"
        );
    }

    /// Turns file `id`'s uprobe for all processes into one per decrypted process that maps
    /// it; returns the links to remove (they stay attached until the caller removes them).
    ///
    /// A process that starts while the per-process uprobes are attached (which takes up to
    /// a second on a cold cache) runs its first connections under the uprobe for all, and
    /// would lose its uprobes in their middle: its decrypted connections would count
    /// nothing until a scan found it. So the mappings are read again after each round of
    /// attachments, until a round attaches nothing (bounded: [`MAX_USER_ROUNDS`]); what is
    /// left is a process that maps the file between the last read and the removal.
    fn per_process(&mut self, ebpf: &mut Ebpf, id: FileId) -> Vec<LinkRef> {
        let Some(file) = self.files.get_mut(&id) else { return Vec::new() };
        if !matches!(file.scope, FileScope::All(_)) {
            return Vec::new();
        }
        let FileScope::All(shared) =
            std::mem::replace(&mut file.scope, FileScope::PerProcess(HashMap::new()))
        else {
            return Vec::new();
        };
        for _ in 0..MAX_USER_ROUNDS {
            if !self.attach_new_users(ebpf) {
                break;
            }
        }
        shared
    }

    /// Reads every process's mappings, and gives each decrypted process that maps a file
    /// with per-process uprobes its own where it has none yet ([`Self::per_process`], and
    /// once more after an uprobe for all processes was removed: a process that mapped its
    /// file after the last read gets them now, not at the next scan). Returns whether it
    /// attached any.
    fn attach_new_users(&mut self, ebpf: &mut Ebpf) -> bool {
        self.record_all_users();
        let Some(decryption) = &self.decryption else { return false };
        let decrypted: Vec<u32> =
            self.users.keys().copied().filter(|&pid| decryption.is_decrypted(pid)).collect();
        let mut attached = false;
        for pid in decrypted {
            attached |= self.attach_process(ebpf, pid);
        }
        attached
    }

    /// `pid` is decrypted again: its uprobes are attached (a file whose processes are all
    /// decrypted again goes back to one uprobe for all), then the kernel reads its calls.
    fn rejoin(&mut self, ebpf: &mut Ebpf, pid: u32) {
        self.attach_process(ebpf, pid);
        if let Some(decryption) = &mut self.decryption {
            decryption.rejoin(pid);
        }
        self.settle_scopes(ebpf);
        tracing::info!(pid, "TLS decryption resumed for a process");
    }

    /// Removes uprobes. Detaching one waits for the kernel, so the links are dropped on a
    /// thread of their own: they belong to processes the kernel already ignores (left
    /// out) or that exited. See [`Self::detach_now`] for the others.
    fn detach(&mut self, ebpf: &mut Ebpf, links: Vec<LinkRef>) {
        let dropped = self.take_links(ebpf, links);
        if !dropped.is_empty() {
            std::thread::spawn(move || drop(dropped));
        }
    }

    /// Removes uprobes before returning: an uprobe for all processes, replaced by
    /// per-process ones. A process no scan has seen yet would otherwise start a decrypted
    /// connection in the meantime and lose its uprobes in its middle.
    ///
    /// Each removal waits for the kernel's grace period (about 0.1 s here), so they are
    /// dropped on a thread each, together, and joined.
    fn detach_now(&mut self, ebpf: &mut Ebpf, links: Vec<LinkRef>) {
        let threads: Vec<_> = self
            .take_links(ebpf, links)
            .into_iter()
            .map(|link| std::thread::spawn(move || drop(link)))
            .collect();
        for thread in threads {
            let _ = thread.join();
        }
    }

    fn take_links(&mut self, ebpf: &mut Ebpf, links: Vec<LinkRef>) -> Vec<Box<dyn Send>> {
        let mut dropped: Vec<Box<dyn Send>> = Vec::new();
        for link in links {
            match link {
                LinkRef::Program(name, id) => {
                    if let Ok(link) = uprobe(ebpf, name).and_then(|p| Ok(p.take_link(id)?)) {
                        dropped.push(Box::new(link));
                    }
                }
                LinkRef::Kept(id) => {
                    if let Some(link) = self.links.as_mut().and_then(|links| links.remove(id)) {
                        dropped.push(Box::new(link));
                    }
                }
            }
        }
        dropped
    }

    /// Attaches `target` (for all processes) if it carries OpenSSL; remembered either way.
    fn consider(&mut self, ebpf: &mut Ebpf, target: Target, is_libssl: bool) {
        if !self.known.insert(target.id) {
            return;
        }
        if !is_libssl && !tls_targets::exports(&target.path, REQUIRED_SYMBOL) {
            return;
        }
        let outcome = attach(ebpf, &target, UProbeScope::AllProcesses, self.links.as_mut());
        let shown = target.shown.clone();
        let outcome = match outcome {
            Ok(links) => {
                tracing::info!(file = %target.shown, "TLS uprobes attached");
                self.files.insert(target.id, AttachedFile { target, scope: FileScope::All(links) });
                Ok(())
            }
            Err(err) => {
                tracing::warn!(file = %target.shown, "TLS uprobes not attached: {err:#}");
                Err(format!("{err:#}"))
            }
        };
        self.status.record(&shown, outcome);
    }
}

fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut UProbe> {
    let program = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the object"))?;
    Ok(program.try_into()?)
}

/// [`attach`], a failure logged: the processes it was for are counted from ciphertext.
fn attach_logged(
    ebpf: &mut Ebpf,
    target: &Target,
    scope: UProbeScope,
    kept: Option<&mut UprobeLinks>,
) -> Option<Vec<LinkRef>> {
    attach(ebpf, target, scope, kept)
        .inspect_err(|err| {
            tracing::warn!(file = %target.shown, ?scope, "TLS uprobes not attached: {err:#}");
        })
        .ok()
}

/// Attaches every probe to one file for `scope`, or none: a return probe before its entry,
/// so no read is stashed without being finished. Their links then go to `kept`, if the
/// links outlive the agent.
fn attach(
    ebpf: &mut Ebpf,
    target: &Target,
    scope: UProbeScope,
    kept: Option<&mut UprobeLinks>,
) -> anyhow::Result<Vec<LinkRef>> {
    let mut links: Vec<(&'static str, UProbeLinkId)> = Vec::new();
    if let Err(err) = attach_all(ebpf, target, scope, &mut links) {
        for (name, link) in links.into_iter().rev() {
            if let Ok(probe) = uprobe(ebpf, name) {
                let _ = probe.detach(link);
            }
        }
        return Err(err);
    }
    let Some(kept) = kept else {
        return Ok(links.into_iter().map(|(name, id)| LinkRef::Program(name, id)).collect());
    };
    let mut refs = Vec::with_capacity(links.len());
    for (name, id) in links {
        let link = FdLink::try_from(uprobe(ebpf, name)?.take_link(id)?)?;
        refs.push(LinkRef::Kept(kept.keep(name, link)?));
    }
    Ok(refs)
}

fn attach_all(
    ebpf: &mut Ebpf,
    target: &Target,
    scope: UProbeScope,
    links: &mut Vec<(&'static str, UProbeLinkId)>,
) -> anyhow::Result<()> {
    for (entry, symbol, required, returns) in SYMBOLS {
        let first = if returns { program::SSL_RETURN } else { entry };
        let link = match uprobe(ebpf, first)?.attach(symbol, &target.path, scope) {
            Ok(link) => link,
            Err(_) if !required => continue,
            Err(err) => return Err(err).with_context(|| format!("{first} on {symbol}")),
        };
        links.push((first, link));
        if returns {
            let link = uprobe(ebpf, entry)?
                .attach(symbol, &target.path, scope)
                .with_context(|| format!("{entry} on {symbol}"))?;
            links.push((entry, link));
        }
    }
    Ok(())
}
