//! The libssl uprobes (`--tls.uprobes`): attaching them to every OpenSSL the host runs, and
//! reporting where they are attached (`connscope_probe_info{hook="libssl"}`,
//! `connscope_tls_uprobe_targets`, the `/` page).
//!
//! Each file is attached once, for all processes (`tls_targets`): the system's libssl at
//! start, so clients started later are covered from their first call. Other copies (a
//! container's libssl, a binary with OpenSSL inside) are found in `/proc/<pid>/maps`: at
//! start, then every [`RESCAN_INTERVAL`] for processes not seen before, and every
//! [`FULL_RESCAN_EVERY`] rescans for all (a process may load libssl late, as Python's
//! `import ssl` does). A periodic scan was chosen over an exec hook: no kernel cost per exec,
//! no event path, and its cost is bounded by the number of new processes (a `maps` read each;
//! a file's symbols are read once per file). The price: the first seconds of a process
//! whose OpenSSL copy is new to the host are not decrypted (counted as undecrypted TLS).
//! A file that cannot be attached is logged once and counted, never fatal.

use std::{
    collections::HashSet,
    fs,
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
    kernel::tls_targets::{self, FileId, REQUIRED_SYMBOL, Target},
    kernel::uprobe_links::UprobeLinks,
    model::{label_sets::Probe, metric_table},
};

/// The `hook` label of the uprobes' `connscope_probe_info` row.
pub const HOOK: &str = "libssl";

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
        Ok(uprobes) => {
            status.set_attach(uprobes.attach_state());
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
    /// Processes looked at by the previous scan.
    scanned: HashSet<u32>,
    rescans: u64,
    attached: usize,
    status: Arc<TlsStatus>,
    /// `None`: the links stay with their programs and detach with the agent.
    links: Option<UprobeLinks>,
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
            scanned: HashSet::new(),
            rescans: 0,
            attached: 0,
            status,
            links,
        };
        let started = std::time::Instant::now();
        for target in tls_targets::system_libraries() {
            uprobes.consider(ebpf, target, true);
        }
        uprobes.scan(ebpf, true);
        tracing::info!(
            attached = uprobes.attached,
            files = uprobes.known.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "TLS uprobe targets scanned"
        );
        Ok(uprobes)
    }

    /// This agent's takeover is done: the uprobes' links are pinned in `dir` from now on.
    pub fn pin_links(&mut self, dir: std::path::PathBuf) {
        if let Some(links) = &mut self.links {
            links.pin_in(dir);
        }
    }

    fn attach_state(&self) -> TlsAttach {
        if self.attached > 0 { TlsAttach::Uprobe } else { TlsAttach::None }
    }

    /// The periodic rescan (see the module docs).
    pub fn rescan(&mut self, ebpf: &mut Ebpf) {
        self.rescans += 1;
        self.scan(ebpf, self.rescans.is_multiple_of(FULL_RESCAN_EVERY));
        self.status.set_attach(self.attach_state());
    }

    fn scan(&mut self, ebpf: &mut Ebpf, all: bool) {
        let Ok(entries) = fs::read_dir("/proc") else { return };
        let own = std::process::id();
        let mut seen = HashSet::with_capacity(self.scanned.len());
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok())
            else {
                continue;
            };
            seen.insert(pid);
            if pid == own || (!all && self.scanned.contains(&pid)) {
                continue;
            }
            // A process that exited meanwhile has no maps: nothing to do.
            let Ok(maps) = fs::read_to_string(format!("/proc/{pid}/maps")) else { continue };
            let exe = tls_targets::file_id(format!("/proc/{pid}/exe").as_ref());
            for target in tls_targets::candidates(pid, &maps, exe, &self.known) {
                let is_libssl = exe != Some(target.id);
                self.consider(ebpf, target, is_libssl);
            }
        }
        self.scanned = seen;
    }

    /// Attaches `target` if it carries OpenSSL; remembered either way.
    fn consider(&mut self, ebpf: &mut Ebpf, target: Target, is_libssl: bool) {
        if !self.known.insert(target.id) {
            return;
        }
        if !is_libssl && !tls_targets::exports(&target.path, REQUIRED_SYMBOL) {
            return;
        }
        let outcome = attach(ebpf, &target, self.links.as_mut()).map_err(|err| format!("{err:#}"));
        match &outcome {
            Ok(()) => {
                self.attached += 1;
                tracing::info!(file = %target.shown, "TLS uprobes attached");
            }
            Err(err) => {
                tracing::warn!(file = %target.shown, "TLS uprobes not attached: {err}");
            }
        }
        self.status.record(&target.shown, outcome);
    }
}

fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut UProbe> {
    let program = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the object"))?;
    Ok(program.try_into()?)
}

/// Attaches every probe to one file, or none: a return probe before its entry, so no read
/// is stashed without being finished. Their links then go to `kept`, if the links outlive
/// the agent.
fn attach(ebpf: &mut Ebpf, target: &Target, kept: Option<&mut UprobeLinks>) -> anyhow::Result<()> {
    let mut links: Vec<(&'static str, UProbeLinkId)> = Vec::new();
    let result = attach_all(ebpf, target, &mut links);
    if result.is_err() {
        for (name, link) in links.into_iter().rev() {
            if let Ok(probe) = uprobe(ebpf, name) {
                let _ = probe.detach(link);
            }
        }
        return result;
    }
    if let Some(kept) = kept {
        for (name, id) in links {
            let link = FdLink::try_from(uprobe(ebpf, name)?.take_link(id)?)?;
            kept.keep(name, link)?;
        }
    }
    Ok(())
}

fn attach_all(
    ebpf: &mut Ebpf,
    target: &Target,
    links: &mut Vec<(&'static str, UProbeLinkId)>,
) -> anyhow::Result<()> {
    for (entry, symbol, required, returns) in SYMBOLS {
        let first = if returns { program::SSL_RETURN } else { entry };
        let link =
            match uprobe(ebpf, first)?.attach(symbol, &target.path, UProbeScope::AllProcesses) {
                Ok(link) => link,
                Err(_) if !required => continue,
                Err(err) => return Err(err).with_context(|| format!("{first} on {symbol}")),
            };
        links.push((first, link));
        if returns {
            let link = uprobe(ebpf, entry)?
                .attach(symbol, &target.path, UProbeScope::AllProcesses)
                .with_context(|| format!("{entry} on {symbol}"))?;
            links.push((entry, link));
        }
    }
    Ok(())
}
