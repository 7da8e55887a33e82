//! HTTPS keep-alive: what the libssl uprobes cost. wrk over `https://` (Debian's wrk links
//! libssl3, as nginx does, so both ends are decrypted) against a local nginx `ssl` server, in
//! three arms per round: no observer, connscope with `--tls.uprobes=false` (undecrypted
//! counting) and connscope with the uprobes. Reported: req/s ratios per round (median, min,
//! max), and from `kernel.bpf_stats_enabled` the ns per uprobe program run and the runs per
//! request. BPF run time leaves out the trap into the kernel that every uprobe hit costs
//! first, so the throughput ratio is the figure that tells the whole cost.

use std::collections::BTreeSet;

use anyhow::ensure;
use connscope_tests::{
    Agent, free_port,
    nginx::{Nginx, SelfSignedTls},
    procfs::program_ids,
};
use serde_json::json;

use super::{
    Settings, bench_nginx,
    kernel_cost::{BpfStats, program_stats},
    report::{Figure, Part, Target},
    round, spread,
    wrk::wrk,
};

/// The uprobe programs' kernel names start so (`connscope_ssl_write`, `…_return`, truncated
/// to 15 characters by the kernel).
const UPROBE_PREFIX: &str = "connscope_ssl_";

/// An nginx with one `ssl` keep-alive server; the certificate lives in its directory.
fn https_nginx() -> anyhow::Result<(Nginx, String)> {
    let port = free_port();
    let tls = SelfSignedTls::new("bench-tls")?;
    let extra = format!(
        "server {{ listen 127.0.0.1:{port} ssl; {} access_log off; root html; }}\n",
        tls.directives
    );
    let nginx = Nginx::start_with(bench_nginx(), &extra)?;
    Ok((nginx, format!("https://127.0.0.1:{port}/index.html")))
}

/// Uprobe runs and their run time during one wrk run with an agent.
#[derive(Default)]
struct UprobeLoad {
    runs: u64,
    run_time_ns: u64,
    requests: u64,
}

fn agent_arm(
    url: &str,
    seconds: u64,
    flags: &[&str],
    load: &mut UprobeLoad,
) -> anyhow::Result<f64> {
    let agent = Agent::start(flags)?;
    let uprobes: BTreeSet<u32> = program_ids(agent.pid())?;
    let before = program_stats(&uprobes);
    let result = wrk(url, seconds, false)?;
    let after = program_stats(&uprobes);
    let (code, _) = agent.stop()?;
    ensure!(code == Some(0), "the agent exited with {code:?}");
    ensure!(result.errors == 0, "wrk over https: {} errors", result.errors);
    for (name, (time, runs)) in after.iter().filter(|(name, _)| name.starts_with(UPROBE_PREFIX)) {
        let (time0, runs0) = before.get(name).copied().unwrap_or((0, 0));
        load.run_time_ns += time - time0;
        load.runs += runs - runs0;
    }
    load.requests += result.requests;
    Ok(result.requests_per_second)
}

pub fn https_keepalive(settings: &Settings) -> anyhow::Result<Part> {
    let (nginx, url) = https_nginx()?;
    let stats = BpfStats::enable()?;
    wrk(&url, 1, false)?;
    let (mut none, mut undecrypted, mut uprobes) = (Vec::new(), Vec::new(), Vec::new());
    let mut load = UprobeLoad::default();
    let mut off_load = UprobeLoad::default();
    for round in 1..=settings.pairs {
        let a = wrk(&url, settings.seconds, false)?.requests_per_second;
        let off = agent_arm(&url, settings.seconds, &["--tls.uprobes=false"], &mut off_load)?;
        let on = agent_arm(&url, settings.seconds, &[], &mut load)?;
        eprintln!(
            "bench: https keep-alive round {round}: none {a:.0}, undecrypted {off:.0}, uprobes {on:.0} req/s; uprobes/none {:.3}, uprobes/undecrypted {:.3}",
            on / a,
            on / off
        );
        none.push(a);
        undecrypted.push(off);
        uprobes.push(on);
    }
    drop(stats);
    drop(nginx);
    ensure!(off_load.runs == 0, "uprobes ran with --tls.uprobes=false");
    let ratio = |over: &[f64], under: &[f64]| -> Vec<f64> {
        over.iter().zip(under).map(|(o, u)| o / u).collect()
    };
    let vs_none = spread(&ratio(&uprobes, &none));
    let vs_undecrypted = spread(&ratio(&uprobes, &undecrypted));
    let undecrypted_vs_none = spread(&ratio(&undecrypted, &none));
    let ns_per_hit = load.run_time_ns as f64 / load.runs.max(1) as f64;
    let hits_per_request = load.runs as f64 / load.requests.max(1) as f64;
    let rps = |values: &[f64]| values.iter().map(|v| round(*v, 0)).collect::<Vec<_>>();
    let details = json!({
        "wrk": format!("wrk -t1 -c16 -d{}s {url}", settings.seconds),
        "rounds": settings.pairs,
        "none_rps": rps(&none),
        "undecrypted_rps": rps(&undecrypted),
        "uprobes_rps": rps(&uprobes),
        "uprobes_over_none": vs_none.to_json(),
        "uprobes_over_undecrypted": vs_undecrypted.to_json(),
        "undecrypted_over_none": undecrypted_vs_none.to_json(),
        "uprobe_runs": load.runs,
        "uprobe_run_time_ns": load.run_time_ns,
        "uprobe_ns_per_run": round(ns_per_hit, 1),
        "uprobe_runs_per_request": round(hits_per_request, 3),
    });
    let figures = vec![
        vs_none.figure("https keep-alive req/s, connscope (uprobes) / none", Target::None),
        vs_undecrypted
            .figure("https keep-alive req/s, uprobes / --tls.uprobes=false", Target::None),
        undecrypted_vs_none
            .figure("https keep-alive req/s, --tls.uprobes=false / none", Target::None),
        Figure::new(
            "ns per uprobe program run (BPF time only)",
            ns_per_hit,
            format!("{ns_per_hit:.0} ns, {hits_per_request:.2} runs per request"),
            Target::None,
        ),
    ];
    Ok(Part { key: "https_keepalive", details, figures })
}
