//! In-kernel cost per program: `kernel.bpf_stats_enabled` run time and count of each of the
//! agent's programs during one keep-alive and one `Connection: close` wrk run.
//!
//! The kernel keeps 15 characters of a program name, so several programs can share a row.
//! Each row is labelled with the hooks of the programs it stands for, read from the agent's
//! eBPF object (ELF section per program), and classed by what those hooks see: send/receive,
//! state change, system call, or other lifecycle hooks.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::Context as _;
use connscope_tests::{Agent, procfs::program_ids};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, SymbolKind};
use serde_json::{Value, json};

use super::{
    Settings,
    floor::Floor,
    report::{Figure, Part, Target},
    round,
    wrk::wrk,
};

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// The kernel's program name length (BPF_OBJ_NAME_LEN) without the NUL.
const KERNEL_NAME_LEN: usize = 15;

/// `kernel.bpf_stats_enabled=1` while alive; the previous value is restored when dropped.
pub struct BpfStats {
    previous: String,
}

impl BpfStats {
    pub fn enable() -> anyhow::Result<Self> {
        let previous =
            std::fs::read_to_string(SYSCTL).context("reading kernel.bpf_stats_enabled")?;
        std::fs::write(SYSCTL, "1").context("sysctl kernel.bpf_stats_enabled=1")?;
        Ok(Self { previous: previous.trim().to_owned() })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(SYSCTL, &self.previous);
    }
}

/// (run time ns, run count) per program name, for the given ids.
pub fn program_stats(ids: &BTreeSet<u32>) -> BTreeMap<String, (u64, u64)> {
    let mut stats = BTreeMap::new();
    for info in aya::programs::loaded_programs().flatten() {
        if ids.contains(&info.id()) {
            let name = info.name_as_str().unwrap_or("?").to_owned();
            let entry = stats.entry(name).or_insert((0, 0));
            entry.0 += info.run_time().as_nanos() as u64;
            entry.1 += info.run_count();
        }
    }
    stats
}

/// What a program's hook sees, for the per-class figures.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Class {
    SendReceive,
    StateChange,
    SystemCall,
    Lifecycle,
    /// A row whose programs are of different classes, or whose hooks are unknown.
    Mixed,
}

impl Class {
    fn of_hook(hook: &str) -> Self {
        // The hooked function or tracepoint (`tcp_send_reset` is a lifecycle hook).
        let hook = hook.rsplit(['/', ' ']).next().unwrap_or(hook);
        if ["sendmsg", "recvmsg", "send_length", "recv_length"].iter().any(|h| hook.contains(h)) {
            Self::SendReceive
        } else if hook.contains("set_state") {
            Self::StateChange
        } else if hook.contains("sys_enter") || hook.contains("sys_exit") {
            Self::SystemCall
        } else {
            Self::Lifecycle
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::SendReceive => "send/receive",
            Self::StateChange => "state change",
            Self::SystemCall => "system call",
            Self::Lifecycle => "lifecycle",
            Self::Mixed => "mixed",
        }
    }
}

/// `(function name, hook)` of every program in the eBPF object: the hook is the ELF section
/// (`tp_btf/sock_send_length`, `fexit/tcp_recvmsg`), with the function name when the section
/// names no hook (classic tracepoints are attached by name at run time).
pub(super) fn object_programs(object: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let data = std::fs::read(object)?;
    let file = object::File::parse(&*data)?;
    let mut programs = Vec::new();
    for symbol in file.symbols() {
        if symbol.kind() != SymbolKind::Text || !symbol.is_global() {
            continue;
        }
        let (Ok(name), Some(index)) = (symbol.name(), symbol.section_index()) else { continue };
        let Ok(section) = file.section_by_index(index).and_then(|s| s.name().map(str::to_owned))
        else {
            continue;
        };
        if section.starts_with(".text") {
            continue; // a helper function, not a program
        }
        let hook = if section.contains('/') { section } else { format!("{section} {name}") };
        programs.push((name.to_owned(), hook));
    }
    Ok(programs)
}

/// The hooks and class of a kernel (truncated) program name.
pub(super) fn describe(kernel_name: &str, programs: &[(String, String)]) -> (Vec<String>, Class) {
    let hooks: Vec<String> = programs
        .iter()
        .filter(|(name, _)| name.get(..KERNEL_NAME_LEN).unwrap_or(name) == kernel_name)
        .map(|(_, hook)| hook.clone())
        .collect();
    let classes: BTreeSet<_> = hooks.iter().map(|h| Class::of_hook(h) as u8).collect();
    let class = match (classes.len(), hooks.first()) {
        (1, Some(hook)) => Class::of_hook(hook),
        _ => Class::Mixed,
    };
    (hooks, class)
}

type Stats = BTreeMap<String, (u64, u64)>;

/// Program statistics of `pid`'s programs before, between and after one keep-alive and
/// one `Connection: close` wrk run (per-request hooks and per-connection hooks).
fn program_stats_across_load(
    pid: u32,
    settings: &Settings,
    url: &str,
) -> anyhow::Result<[Stats; 3]> {
    let ids = program_ids(pid)?;
    let before = program_stats(&ids);
    wrk(url, settings.seconds, false)?;
    let keep_alive = program_stats(&ids);
    wrk(url, settings.seconds, true)?;
    Ok([before, keep_alive, program_stats(&ids)])
}

/// Σ run time and Σ runs per class between two statistics.
fn class_totals(
    before: &Stats,
    after: &Stats,
    programs: &[(String, String)],
) -> BTreeMap<&'static str, (u64, u64)> {
    let mut classes = BTreeMap::new();
    for (name, (time, count)) in after {
        let (time0, count0) = before.get(name).copied().unwrap_or((0, 0));
        let entry = classes.entry(describe(name, programs).1.label()).or_insert((0, 0));
        entry.0 += time - time0;
        entry.1 += count - count0;
    }
    classes
}

fn per_run(classes: &BTreeMap<&'static str, (u64, u64)>, class: Class) -> f64 {
    let (time, runs) = classes.get(class.label()).copied().unwrap_or((0, 0));
    if runs == 0 { f64::NAN } else { time as f64 / runs as f64 }
}

pub fn kernel_cost(settings: &Settings, url: &str, object: &Path) -> anyhow::Result<Part> {
    let programs = object_programs(object).unwrap_or_else(|err| {
        eprintln!("bench: cannot read program names from {}: {err:#}", object.display());
        Vec::new()
    });
    let stats = BpfStats::enable()?;
    let agent = Agent::start(&[])?;
    let [before, keep_alive, after] = program_stats_across_load(agent.pid(), settings, url)?;
    agent.stop()?;
    // The floor arm under the same load: what looking the socket up and adding its bytes
    // costs on this machine, for comparison.
    let floor = Floor::start()?;
    let [floor_before, floor_keep_alive, floor_after] =
        program_stats_across_load(floor.pid(), settings, url)?;
    floor.stop()?;
    drop(stats);
    let floor_classes = class_totals(&floor_before, &floor_after, &programs);
    let steady = per_run(&class_totals(&before, &keep_alive, &programs), Class::SendReceive);
    let floor_steady =
        per_run(&class_totals(&floor_before, &floor_keep_alive, &programs), Class::SendReceive);
    let churn = per_run(&class_totals(&keep_alive, &after, &programs), Class::SendReceive);

    let mut rows = serde_json::Map::new();
    let mut figures = Vec::new();
    // (time, runs) per class.
    let classes = class_totals(&before, &after, &programs);
    for (name, (time, count)) in &after {
        let (time0, count0) = before.get(name).copied().unwrap_or((0, 0));
        let (time, runs) = (time - time0, count - count0);
        let ns = if runs == 0 { 0.0 } else { time as f64 / runs as f64 };
        let (hooks, class) = describe(name, &programs);
        figures.push(Figure::new(
            format!("  {name} ({})", if hooks.is_empty() { "?".into() } else { hooks.join(", ") }),
            ns,
            format!("{ns:.0} ns/run, {runs} runs"),
            Target::None,
        ));
        rows.insert(
            name.clone(),
            json!({ "hooks": hooks, "class": class.label(), "runs": runs, "ns_per_run": round(ns, 1) }),
        );
    }
    let (send_receive, state_change) =
        (per_run(&classes, Class::SendReceive), per_run(&classes, Class::StateChange));
    let (floor_send_receive, floor_state_change) =
        (per_run(&floor_classes, Class::SendReceive), per_run(&floor_classes, Class::StateChange));
    let mut summary = vec![
        Figure::new(
            "ns per send/recv program run",
            send_receive,
            format!("{send_receive:.0} ns (floor arm: {floor_send_receive:.0} ns)"),
            Target::AtMost(120.0),
        ),
        Figure::new(
            "  keep-alive run only",
            steady,
            format!("{steady:.0} ns (floor arm: {floor_steady:.0} ns)"),
            Target::None,
        ),
        Figure::new(
            "  Connection: close run only (every turn reads its head)",
            churn,
            format!("{churn:.0} ns"),
            Target::None,
        ),
        Figure::new(
            "ns per state-change run",
            state_change,
            format!("{state_change:.0} ns (floor arm: {floor_state_change:.0} ns)"),
            Target::AtMost(150.0),
        ),
    ];
    summary.append(&mut figures);
    let class_json: BTreeMap<&str, Value> = classes
        .iter()
        .map(|(label, (time, runs))| (*label, json!({ "runs": runs, "run_time_ns": time })))
        .collect();
    let floor_json: BTreeMap<&str, Value> = floor_classes
        .iter()
        .map(|(label, (time, runs))| (*label, json!({ "runs": runs, "run_time_ns": time })))
        .collect();
    let details = json!({ "programs": rows, "classes": class_json, "floor_classes": floor_json });
    Ok(Part { key: "bpf_programs", details, figures: summary })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn programs() -> Vec<(String, String)> {
        [
            ("connscope_btf_sock_send_length", "tp_btf/sock_send_length"),
            ("connscope_btf_sock_recv_length", "tp_btf/sock_recv_length"),
            ("connscope_btf_inet_sock_set_state", "tp_btf/inet_sock_set_state"),
            ("connscope_btf_tcp_destroy_sock", "tp_btf/tcp_destroy_sock"),
            ("connscope_btf_tcp_send_reset", "tp_btf/tcp_send_reset"),
            ("connscope_kprobe_tcp_connect", "kprobe/tcp_connect"),
            ("connscope_kprobe_tcp_sendmsg", "kprobe/tcp_sendmsg"),
        ]
        .into_iter()
        .map(|(n, h)| (n.to_owned(), h.to_owned()))
        .collect()
    }

    #[test]
    fn truncated_names_find_their_programs_and_class() {
        let (hooks, class) = describe("connscope_btf_s", &programs());
        assert_eq!(hooks, ["tp_btf/sock_send_length", "tp_btf/sock_recv_length"]);
        assert_eq!(class, Class::SendReceive);
        assert_eq!(describe("connscope_btf_i", &programs()).1, Class::StateChange);
        // tcp_destroy_sock and tcp_send_reset share a row: both lifecycle hooks.
        let (hooks, class) = describe("connscope_btf_t", &programs());
        assert_eq!(hooks.len(), 2);
        assert_eq!(class, Class::Lifecycle);
        // kprobes on tcp_connect and tcp_sendmsg share a row of two classes.
        assert_eq!(describe("connscope_kprob", &programs()).1, Class::Mixed);
        assert_eq!(describe("unknown", &programs()), (Vec::new(), Class::Mixed));
    }
}
