//! HTTPS keep-alive: what the libssl uprobes cost, and what the decryption budget keeps of
//! it. wrk over `https://` (Debian's wrk links libssl3, as nginx does, so both ends can be
//! decrypted) against a local nginx `ssl` server, in four arms per round: no observer;
//! connscope with `--tls.uprobes=false` (undecrypted counting); connscope with its defaults
//! (the decryption budget), measured in steady state once nginx has left decryption, whose
//! reaction time from the load's start is reported too; and connscope with `--tls.budget 0`
//! (every process decrypted: informational), with its uprobe hits per request per side
//! from the agent's own `tls_uprobe_hits_total`. Reported: req/s ratios per round (median,
//! min, max); then, from one more run of the undecrypted and the all-decrypted arm with
//! `kernel.bpf_stats_enabled` (not during the timed rounds: the statistics cost every
//! program run time of their own, which would be charged to the agent's arms), the BPF time
//! per request undecrypted and the ns per uprobe program run. BPF run time leaves out the
//! trap into the kernel that every uprobe hit costs first, so the throughput ratio is the
//! figure that tells the whole cost.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

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
    round, spread, whole_rates,
    wrk::{interrupt, spawn, wrk},
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

/// Uprobe runs and their run time during wrk runs with an agent, with
/// `kernel.bpf_stats_enabled`; and the run time of all of its programs.
#[derive(Default)]
struct UprobeLoad {
    runs: u64,
    run_time_ns: u64,
    all_run_time_ns: u64,
    requests: u64,
}

/// What one agent arm measured.
struct Arm {
    requests_per_second: f64,
    /// The budget's reaction: from the warm-up load's start to nginx's worker leaving
    /// decryption.
    reaction: Option<Duration>,
    /// Uprobe hits per request by side (`nginx`, `wrk`), from the agent's metrics.
    hits_per_request: [f64; 2],
}

/// Runs wrk once with an agent started with `flags`. `warm_until_left`: first load nginx
/// until the budget has taken it out of decryption (the arm measures the steady state).
/// `load`: where to add the programs' run time, for a run with `kernel.bpf_stats_enabled`.
fn agent_arm(
    url: &str,
    seconds: u64,
    flags: &[&str],
    warm_until_left: bool,
    load: Option<&mut UprobeLoad>,
) -> anyhow::Result<Arm> {
    let agent = Agent::start(flags)?;
    let reaction = if warm_until_left { Some(wait_until_nginx_left(&agent, url)?) } else { None };
    let programs: BTreeSet<u32> = program_ids(agent.pid())?;
    let before = load.is_some().then(|| program_stats(&programs));
    let hits_before = hits_by_side(&agent)?;
    let result = wrk(url, seconds, false)?;
    let after = load.is_some().then(|| program_stats(&programs));
    let hits_after = hits_by_side(&agent)?;
    let (code, _) = agent.stop()?;
    ensure!(code == Some(0), "the agent exited with {code:?}");
    ensure!(result.errors == 0, "wrk over https: {} errors", result.errors);
    if let (Some(load), Some(before), Some(after)) = (load, before, after) {
        for (name, (time, runs)) in &after {
            let (time0, runs0) = before.get(name).copied().unwrap_or((0, 0));
            load.all_run_time_ns += time - time0;
            if name.starts_with(UPROBE_PREFIX) {
                load.run_time_ns += time - time0;
                load.runs += runs - runs0;
            }
        }
        load.requests += result.requests;
    }
    let requests = result.requests.max(1) as f64;
    let hits_per_request = [0, 1].map(|side| (hits_after[side] - hits_before[side]) / requests);
    Ok(Arm { requests_per_second: result.requests_per_second, reaction, hits_per_request })
}

/// `tls_uprobe_hits_total` of nginx and of wrk.
fn hits_by_side(agent: &Agent) -> anyhow::Result<[f64; 2]> {
    let scrape = agent.scrape()?;
    Ok(["nginx", "wrk"]
        .map(|process| scrape.sum("connscope_tls_uprobe_hits_total", &[("process", process)])))
}

/// Loads nginx until the agent says a `nginx` process left decryption under the budget;
/// returns how long that took from the load's start.
fn wait_until_nginx_left(agent: &Agent, url: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let warm = spawn(url, 30, false)?;
    let left = |agent: &Agent| -> anyhow::Result<bool> {
        let scrape = agent.scrape()?;
        let labels = [("process", "nginx"), ("state", "ciphertext_budget")];
        Ok(scrape.sum("connscope_tls_decryption_processes", &labels) >= 1.0)
    };
    while !left(agent)? {
        ensure!(started.elapsed() < Duration::from_secs(20), "nginx never left decryption");
        std::thread::sleep(Duration::from_millis(20));
    }
    let reaction = started.elapsed();
    // Let the uprobes' removal finish before the measured run.
    std::thread::sleep(Duration::from_secs(1));
    interrupt(warm)?;
    Ok(reaction)
}

pub fn https_keepalive(settings: &Settings) -> anyhow::Result<Part> {
    let (nginx, url) = https_nginx()?;
    wrk(&url, 1, false)?;
    let (mut none, mut undecrypted, mut budget, mut all) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut reactions, mut hits_nginx, mut hits_wrk) = (Vec::new(), Vec::new(), Vec::new());
    let mut budget_hits = Vec::new();
    for round in 1..=settings.pairs {
        let a = wrk(&url, settings.seconds, false)?.requests_per_second;
        let off = agent_arm(&url, settings.seconds, &["--tls.uprobes=false"], false, None)?;
        let kept = agent_arm(&url, settings.seconds, &[], true, None)?;
        let on = agent_arm(&url, settings.seconds, &["--tls.budget", "0"], false, None)?;
        let reaction = kept.reaction.unwrap_or_default().as_secs_f64();
        eprintln!(
            "bench: https keep-alive round {round}: none {a:.0}, undecrypted {:.0}, default (budget) {:.0}, all decrypted {:.0} req/s; budget/none {:.3}, undecrypted/none {:.3}, all/none {:.3}; budget reacted in {reaction:.2} s; hits per request nginx {:.2}, wrk {:.2}",
            off.requests_per_second,
            kept.requests_per_second,
            on.requests_per_second,
            kept.requests_per_second / a,
            off.requests_per_second / a,
            on.requests_per_second / a,
            on.hits_per_request[0],
            on.hits_per_request[1],
        );
        none.push(a);
        undecrypted.push(off.requests_per_second);
        budget.push(kept.requests_per_second);
        all.push(on.requests_per_second);
        reactions.push(reaction);
        hits_nginx.push(on.hits_per_request[0]);
        hits_wrk.push(on.hits_per_request[1]);
        budget_hits.push(kept.hits_per_request[0] + kept.hits_per_request[1]);
    }
    let stats = BpfStats::enable()?;
    let mut off_load = UprobeLoad::default();
    agent_arm(&url, settings.seconds, &["--tls.uprobes=false"], false, Some(&mut off_load))?;
    let mut load = UprobeLoad::default();
    agent_arm(&url, settings.seconds, &["--tls.budget", "0"], false, Some(&mut load))?;
    drop(stats);
    drop(nginx);
    ensure!(off_load.runs == 0, "uprobes ran with --tls.uprobes=false");
    let ratio = |over: &[f64], under: &[f64]| -> Vec<f64> {
        over.iter().zip(under).map(|(o, u)| o / u).collect()
    };
    let budget_vs_none = spread(&ratio(&budget, &none));
    let all_vs_none = spread(&ratio(&all, &none));
    let undecrypted_vs_none = spread(&ratio(&undecrypted, &none));
    let reaction = spread(&reactions);
    let (nginx_hits, wrk_hits) = (spread(&hits_nginx), spread(&hits_wrk));
    let ns_per_hit = load.run_time_ns as f64 / load.runs.max(1) as f64;
    let hits_per_request = load.runs as f64 / load.requests.max(1) as f64;
    let budget_hits = spread(&budget_hits);
    let undecrypted_bpf_ns = off_load.all_run_time_ns as f64 / off_load.requests.max(1) as f64;
    let details = json!({
        "wrk": format!("wrk -t1 -c16 -d{}s {url}", settings.seconds),
        "rounds": settings.pairs,
        "none_rps": whole_rates(&none),
        "undecrypted_rps": whole_rates(&undecrypted),
        "default_budget_rps": whole_rates(&budget),
        "all_decrypted_rps": whole_rates(&all),
        "default_budget_over_none": budget_vs_none.to_json(),
        "all_decrypted_over_none": all_vs_none.to_json(),
        "undecrypted_over_none": undecrypted_vs_none.to_json(),
        "budget_reaction_seconds": reaction.to_json(),
        "all_decrypted_hits_per_request_nginx": nginx_hits.to_json(),
        "all_decrypted_hits_per_request_wrk": wrk_hits.to_json(),
        "default_budget_uprobe_hits_per_request": budget_hits.to_json(),
        "undecrypted_bpf_ns_per_request": round(undecrypted_bpf_ns, 1),
        "uprobe_runs": load.runs,
        "uprobe_run_time_ns": load.run_time_ns,
        "uprobe_ns_per_run": round(ns_per_hit, 1),
        "uprobe_runs_per_request": round(hits_per_request, 3),
    });
    let figures = vec![
        budget_vs_none.figure(
            "https keep-alive req/s, connscope defaults (budget) / none",
            Target::AtLeast(0.95),
        ),
        undecrypted_vs_none
            .figure("https keep-alive req/s, --tls.uprobes=false / none", Target::AtLeast(0.97)),
        all_vs_none
            .figure("https keep-alive req/s, --tls.budget 0 (all decrypted) / none", Target::None),
        reaction.figure(
            "decryption budget reaction, load start to nginx left (s)",
            Target::AtMost(2.0),
        ),
        nginx_hits
            .figure("uprobe hits per request, nginx side (all decrypted)", Target::AtMost(4.0)),
        wrk_hits.figure("uprobe hits per request, wrk side (all decrypted)", Target::AtMost(4.0)),
        Figure::new(
            "BPF ns per request, --tls.uprobes=false (both ends' programs)",
            undecrypted_bpf_ns,
            format!("{undecrypted_bpf_ns:.0} ns"),
            Target::None,
        ),
        Figure::new(
            "ns per uprobe program run (BPF time only)",
            ns_per_hit,
            format!("{ns_per_hit:.0} ns, {hits_per_request:.2} runs per request"),
            Target::None,
        ),
    ];
    Ok(Part { key: "https_keepalive", details, figures })
}
