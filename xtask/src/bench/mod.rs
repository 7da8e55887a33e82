//! `cargo xtask bench`: what the agent costs the host it watches, measured side by side in
//! one run (a benchmark, not a test: it prints one table of figures against their targets and
//! writes `target/bench/report.json`).
//!
//! 1. Throughput: wrk against a local nginx, keep-alive and `Connection: close`, in three arms
//!    per round (no observer, the floor `connscope bench-floor`, connscope), rounds repeated:
//!    ratios connscope/none and connscope/floor per round, median, min and max. In the
//!    connscope arm: events lost, events to userspace per request, agent CPU per 10k requests.
//! 2. In-kernel cost per program (`kernel.bpf_stats_enabled`): ns per run, by hook class.
//!    Then where `Connection: close` time goes: the agent's CPU and the BPF run time per
//!    connection, beside the floor's, and the agent's functions from `perf record`.
//! 3. No network at all: `dd bs=1` without and with the agent, and the ns connscope's
//!    programs spend per system call of it.
//! 4. Memory at 100k tracked idle sockets: agent RSS and kernel bytes per tracked socket.
//! 5. `/metrics` latency with the default label caps filled.
//! 6. Restart loss: requests and connections lost across consecutive agent restarts under
//!    wrk load, with the kernel state pinned, against nginx's own counts.
//! 7. HTTPS keep-alive (nginx `ssl`, wrk over https): no observer, undecrypted counting,
//!    the defaults (the decryption budget, in steady state, and its reaction time), and
//!    everything decrypted (`--tls.budget 0`: hits per request per side); ns per uprobe
//!    program run.
//! 8. HTTP/2 cleartext keep-alive (`h2load -c16 -m10` against nginx `listen … http2`),
//!    without and with the agent, alternating: req/s ratio, and ns per send/receive program
//!    run on that traffic (every frame header walked).
//!
//! Root is needed (the agent loads BPF programs). Everything runs on loopback, bounded in
//! time and count, and is cleaned up.

mod adoption;
mod floor;
mod h2load;
mod https;
mod kernel_cost;
mod memory;
mod metrics_latency;
mod no_network;
mod profile;
mod report;
mod restart_loss;
mod throughput;
mod wrk;

use std::{collections::BTreeMap, thread, time::Duration};

use anyhow::bail;
use connscope_tests::{
    Scrape, free_port,
    nginx::{Nginx, NginxConfig},
};
use serde_json::{Value, json};

use crate::{binaries, is_root, setup, workspace_root};

/// Knobs (environment variables) so a quick run is possible; defaults are the documented run.
struct Settings {
    /// Rounds of the alternating arms (each a pair or triple of runs).
    pairs: usize,
    /// Seconds per wrk run.
    seconds: u64,
    /// Connections; both ends are on this host, so twice as many sockets are tracked.
    idle_connections: usize,
    /// Bytes (= reads = writes) per dd run.
    dd_count: u64,
    /// Connections established before the agent starts, in the adoption part.
    adoption_connections: usize,
    /// Agent restarts under load, per load mode.
    restarts: usize,
    /// How long each agent runs under load before the next restart.
    restart_run_ms: u64,
    /// Parts to run (`CONNSCOPE_BENCH_PARTS`, comma-separated names of [`PARTS`]); all
    /// when unset.
    parts: Vec<String>,
}

/// The bench's parts, by the names `CONNSCOPE_BENCH_PARTS` takes.
const PARTS: [&str; 10] = [
    "throughput",
    "kernel-cost",
    "profile",
    "no-network",
    "memory",
    "metrics",
    "adoption",
    "restart-loss",
    "https",
    "h2load",
];

impl Settings {
    fn from_env() -> Self {
        let get = |name: &str, default: u64| {
            std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
        };
        Self {
            pairs: get("CONNSCOPE_BENCH_PAIRS", 7).max(1) as usize,
            seconds: get("CONNSCOPE_BENCH_SECONDS", 5).max(1),
            idle_connections: get("CONNSCOPE_BENCH_IDLE_CONNECTIONS", 50_000) as usize,
            dd_count: get("CONNSCOPE_BENCH_DD_COUNT", 4 << 20).max(1000),
            adoption_connections: get("CONNSCOPE_BENCH_ADOPTION_CONNECTIONS", 10_000).max(1)
                as usize,
            restarts: get("CONNSCOPE_BENCH_RESTARTS", 10).max(1) as usize,
            restart_run_ms: get("CONNSCOPE_BENCH_RESTART_RUN_MS", 1000).max(100),
            parts: std::env::var("CONNSCOPE_BENCH_PARTS")
                .map(|v| v.split(',').map(|p| p.trim().to_owned()).collect())
                .unwrap_or_else(|_| PARTS.iter().map(|p| (*p).to_owned()).collect()),
        }
    }

    fn runs(&self, part: &str) -> bool {
        self.parts.iter().any(|p| p == part)
    }
}

/// The nginx every part loads: one worker (its CPU is measured), keep-alive connections
/// never closed by the server during a run.
fn bench_nginx() -> NginxConfig {
    NginxConfig {
        port: free_port(),
        keepalive_timeout: Duration::from_secs(60),
        keepalive_requests: 1_000_000,
        workers: 1,
        advertise_keep_alive: false,
    }
}

pub fn run() -> anyhow::Result<()> {
    if !is_root() {
        bail!("the benchmark loads BPF programs: run it as root (`sudo -E cargo xtask bench`)");
    }
    setup::run()?;
    let binary = binaries::release_agent()?;
    let object = binaries::release_ebpf_object()?;
    // SAFETY: set before any thread of ours starts; read by the test harness.
    unsafe { std::env::set_var("CONNSCOPE_BIN", &binary) };
    let settings = Settings::from_env();
    ensure_alone("before the bench")?;
    if let Some(unknown) = settings.parts.iter().find(|p| !PARTS.contains(&p.as_str())) {
        bail!("CONNSCOPE_BENCH_PARTS: unknown part {unknown:?} (parts: {})", PARTS.join(","));
    }

    let mut parts = Vec::new();
    let nginx = Nginx::start(bench_nginx())?;
    let url = nginx.url("/index.html");
    if settings.runs("throughput") {
        parts.push(throughput::throughput(&settings, &url, false)?);
        parts.push(throughput::throughput(&settings, &url, true)?);
    }
    if settings.runs("kernel-cost") {
        parts.push(kernel_cost::kernel_cost(&settings, &url, &object)?);
    }
    if settings.runs("profile") {
        parts.push(profile::agent_profile(&settings, &url)?);
    }
    drop(nginx);
    if settings.runs("no-network") {
        parts.push(no_network::no_network(&settings)?);
    }
    if settings.runs("memory") {
        parts.push(memory::idle_memory(settings.idle_connections)?);
    }
    if settings.runs("metrics") {
        parts.push(metrics_latency::metrics_latency()?);
    }
    if settings.runs("adoption") {
        parts.push(adoption::adoption(&settings)?);
    }
    if settings.runs("restart-loss") {
        parts.push(restart_loss::restart_loss(&settings)?);
    }
    if settings.runs("https") {
        parts.push(https::https_keepalive(&settings)?);
    }
    if settings.runs("h2load") {
        parts.push(h2load::h2load_keepalive(&settings, &object)?);
    }

    let machine = machine();
    let kernel = machine["kernel"].as_str().unwrap_or("?").to_owned();
    let figures: Vec<report::Figure> = parts.iter_mut().flat_map(|p| p.figures.drain(..)).collect();
    let mut report = serde_json::Map::new();
    report.insert("machine".into(), machine);
    report.insert("figures".into(), figures.iter().map(report::Figure::to_json).collect());
    for part in parts {
        report.insert(part.key.into(), part.details);
    }
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&Value::Object(report))?)?;
    report::print_table(&kernel, &figures);
    eprintln!("bench: report written to {}", path.display());
    // Programs that appeared meanwhile (an agent started by hand with its default pins)
    // ran beside some of the arms: the figures above are not to be trusted.
    ensure_alone("after the bench, so its figures are not to be trusted")
}

/// Fails while programs of an agent or a floor the bench did not start are loaded: a running
/// agent, or the pinned programs an agent stopped with SIGTERM leaves for its successor (its
/// `--bpf.pin-path`). They would run beside every arm and charge their cost to all of them.
/// The bench's own agents pin nothing, and their programs go when they exit (within a
/// moment: the kernel frees a detached program after a grace period).
fn ensure_alone(when: &str) -> anyhow::Result<()> {
    let foreign = || -> Vec<String> {
        aya::programs::loaded_programs()
            .flatten()
            .filter_map(|info| info.name_as_str().map(str::to_owned))
            .filter(|name| name.starts_with("connscope_") || name.starts_with("floor_"))
            .collect()
    };
    let mut found = foreign();
    for _ in 0..50 {
        if found.is_empty() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(100));
        found = foreign();
    }
    found.sort();
    found.dedup();
    bail!(
        "{when}: {} are loaded, from an agent the bench did not start (a running one, or one's \
         pinned programs: `connscope cleanup --bpf.pin-path <path>`, /sys/fs/bpf/connscope by \
         default); they run beside every arm and charge their cost to all of them",
        found.join(", ")
    )
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let kernel =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    json!({ "cpu": cpu, "cpus": thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "kernel": kernel })
}

/// Median, min and max of per-round values.
struct Spread {
    median: f64,
    min: f64,
    max: f64,
    values: Vec<f64>,
}

impl Spread {
    fn to_json(&self) -> Value {
        json!({
            "median": round(self.median, 4),
            "min": round(self.min, 4),
            "max": round(self.max, 4),
            "per_round": self.values.iter().map(|v| round(*v, 4)).collect::<Vec<_>>(),
        })
    }

    /// `0.733 (0.655-0.771)`.
    fn shown(&self, digits: usize) -> String {
        format!("{:.digits$} ({:.digits$}-{:.digits$})", self.median, self.min, self.max)
    }

    /// A report row of this spread: its median against `target`, shown with min and max.
    fn figure(&self, name: impl Into<String>, target: report::Target) -> report::Figure {
        report::Figure::new(name, self.median, self.shown(3), target)
    }
}

fn spread(values: &[f64]) -> Spread {
    Spread {
        median: median(values),
        min: values.iter().copied().fold(f64::INFINITY, f64::min),
        max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        values: values.to_vec(),
    }
}

/// Losses other than `untracked_socket` (payload on sockets older than the agent).
fn real_losses(scrape: &Scrape) -> BTreeMap<String, f64> {
    scrape
        .matching("connscope_events_lost_total", &[])
        .filter_map(|s| {
            let reason = s.labels.get("reason")?;
            (reason != "untracked_socket").then(|| (reason.clone(), s.value))
        })
        .collect()
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

/// Request rates of the rounds, to the request (as `report.json` lists them).
fn whole_rates(values: &[f64]) -> Vec<f64> {
    values.iter().map(|v| round(*v, 0)).collect()
}
