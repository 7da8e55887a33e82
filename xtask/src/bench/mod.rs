//! `cargo xtask bench`: what the agent costs the host it watches, measured side by side in
//! one run (a benchmark, not a test: it prints a table and writes `target/bench/report.json`).
//!
//! 1. wrk against a local nginx, keep-alive and `Connection: close`, agent attached (B) or
//!    not (A), alternating A B A B ...: medians, ratio B/A per pair and its spread.
//! 2. Events lost at the highest connection rate (the `Connection: close` runs) and the
//!    agent's CPU time (utime + stime) per 10k requests and per 10k connections.
//! 3. In-kernel cost per program (`kernel.bpf_stats_enabled`): ns per run.
//! 4. Memory at 100k tracked idle connections: agent RSS and BPF map memory.
//! 5. `/metrics` latency with the default label caps filled.
//!
//! Root is needed (the agent loads BPF programs). Everything runs on loopback, bounded in
//! time and count, and is cleaned up.

mod kernel_cost;
mod memory;
mod metrics_latency;
mod report;
mod throughput;

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
    pairs: usize,
    seconds: u64,
    idle_connections: usize,
}

impl Settings {
    fn from_env() -> Self {
        let get = |name: &str, default: u64| {
            std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
        };
        Self {
            pairs: get("CONNSCOPE_BENCH_PAIRS", 5) as usize,
            seconds: get("CONNSCOPE_BENCH_SECONDS", 5),
            // Connections; both ends are on this host, so twice as many sockets are tracked.
            idle_connections: get("CONNSCOPE_BENCH_IDLE_CONNECTIONS", 50_000) as usize,
        }
    }
}

pub fn run() -> anyhow::Result<()> {
    if !is_root() {
        bail!("the benchmark loads BPF programs: run it as root (`sudo -E cargo xtask bench`)");
    }
    setup::run()?;
    let binary = binaries::release_agent()?;
    // SAFETY: set before any thread of ours starts; read by the test harness.
    unsafe { std::env::set_var("CONNSCOPE_BIN", &binary) };
    let settings = Settings::from_env();
    let mut report = serde_json::Map::new();
    report.insert("machine".into(), machine());

    let nginx = Nginx::start(NginxConfig {
        port: free_port(),
        keepalive_timeout: Duration::from_secs(60),
        keepalive_requests: 1_000_000,
        workers: 1,
        advertise_keep_alive: false,
    })?;
    let url = nginx.url("/index.html");
    let keep_alive = throughput::throughput(&settings, &url, false)?;
    let close = throughput::throughput(&settings, &url, true)?;
    report.insert("throughput_keepalive".into(), keep_alive.clone());
    report.insert("throughput_close".into(), close.clone());
    let kernel = kernel_cost::kernel_cost(&settings, &url)?;
    report.insert("bpf_programs".into(), kernel.clone());
    drop(nginx);
    let memory = memory::idle_memory(settings.idle_connections)?;
    report.insert("memory".into(), memory.clone());
    let metrics = metrics_latency::metrics_latency()?;
    report.insert("metrics_endpoint".into(), metrics.clone());

    let report = Value::Object(report);
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    report::print_table(&report);
    eprintln!("bench: report written to {}", path.display());
    Ok(())
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
