//! HTTP/2 cleartext keep-alive: `h2load -c16 -m10` (nghttp2-client) against a local nginx
//! `listen … http2` server, without and with the agent, alternating per round. The agent
//! walks every frame header of every transfer of these connections (`h2.rs` in the eBPF
//! crate): the req/s ratio is what that costs, and from `kernel.bpf_stats_enabled` (one run
//! of its own after the timed rounds) the ns its send/receive programs spend per run on
//! this traffic, and their runs per request.

use std::{collections::BTreeSet, path::Path, process::Command};

use anyhow::{Context as _, ensure};
use connscope_tests::{Agent, free_port, nginx::Nginx, procfs::program_ids};
use serde_json::json;

use super::{
    Settings, bench_nginx,
    kernel_cost::{BpfStats, Class, describe, object_programs, program_stats},
    report::{Figure, Part, Target},
    round, spread, whole_rates,
};

/// An nginx with one h2c server.
fn h2c_nginx() -> anyhow::Result<(Nginx, String)> {
    let port = free_port();
    let extra = format!("server {{ listen 127.0.0.1:{port} http2; access_log off; root html; }}\n");
    let nginx = Nginx::start_with(bench_nginx(), &extra)?;
    Ok((nginx, format!("http://127.0.0.1:{port}/index.html")))
}

/// `h2load -c16 -m10 -D<seconds>`: req/s and requests done.
fn h2load(url: &str, seconds: u64) -> anyhow::Result<(f64, u64)> {
    let output = Command::new("h2load")
        .args(["-c16", "-m10", &format!("-D{seconds}"), url])
        .output()
        .context("running h2load (apt: nghttp2-client)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    ensure!(output.status.success(), "h2load failed: {}\n{text}", output.status);
    // "finished in 5.00s, 51234.00 req/s, 12.34MB/s"
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.trim_end_matches(" req/s").parse().ok())
        .with_context(|| format!("no req/s in h2load output:\n{text}"))?;
    // "requests: N total, N started, N done, N succeeded, 0 failed, 0 errored, 0 timeout"
    let line = text.lines().find(|l| l.starts_with("requests: ")).unwrap_or_default();
    let field = |name: &str| {
        line.split(", ")
            .find_map(|p| p.trim_start_matches("requests: ").strip_suffix(name))
            .and_then(|n| n.trim().parse::<u64>().ok())
    };
    let failed = field(" failed").unwrap_or(0) + field(" errored").unwrap_or(0);
    ensure!(failed == 0, "h2load: {failed} failed requests\n{text}");
    Ok((rps, field(" succeeded").unwrap_or(0)))
}

pub fn h2load_keepalive(settings: &Settings, object: &Path) -> anyhow::Result<Part> {
    let (nginx, url) = h2c_nginx()?;
    h2load(&url, 1)?;
    // The timed rounds run without the kernel's statistics: they cost time on every
    // program run themselves, so the agent's arm would pay for them too.
    let (mut none, mut with) = (Vec::new(), Vec::new());
    for round_index in 1..=settings.pairs {
        let (a, _) = h2load(&url, settings.seconds)?;
        let agent = Agent::start(&[])?;
        let (b, _) = h2load(&url, settings.seconds)?;
        let lost =
            agent.scrape()?.sum("connscope_events_lost_total", &[("reason", "http2_unparsed")]);
        let (code, _) = agent.stop()?;
        ensure!(code == Some(0), "the agent exited with {code:?}");
        ensure!(lost == 0.0, "h2load's connections lost their frame sync ({lost})");
        eprintln!(
            "bench: h2load round {round_index}: none {a:.0}, connscope {b:.0} req/s ({:.3})",
            b / a
        );
        none.push(a);
        with.push(b);
    }
    let kernel = kernel_cost(&url, settings.seconds, object)?;
    drop(nginx);
    let ratio = spread(&with.iter().zip(&none).map(|(w, n)| w / n).collect::<Vec<_>>());
    let ns_per_run = kernel.run_time_ns as f64 / kernel.runs.max(1) as f64;
    let runs_per_request = kernel.runs as f64 / kernel.requests.max(1) as f64;
    let details = json!({
        "h2load": format!("h2load -c16 -m10 -D{} {url}", settings.seconds),
        "rounds": settings.pairs,
        "none_rps": whole_rates(&none),
        "connscope_rps": whole_rates(&with),
        "connscope_over_none": ratio.to_json(),
        "transfer_program_runs": kernel.runs,
        "transfer_ns_per_run": round(ns_per_run, 1),
        "transfer_runs_per_request": round(runs_per_request, 2),
        "requests_in_the_kernel_cost_run": kernel.requests,
    });
    let figures = vec![
        ratio.figure(
            "h2c keep-alive req/s (h2load -c16 -m10), connscope / none",
            Target::AtLeast(0.95),
        ),
        Figure::new(
            "ns per send/receive program run, h2c traffic",
            ns_per_run,
            format!(
                "{ns_per_run:.0} ns over {} runs ({runs_per_request:.2} per request)",
                kernel.runs
            ),
            Target::None,
        ),
    ];
    Ok(Part { key: "h2load_keepalive", details, figures })
}

/// What the agent's send/receive programs did in one h2load run, from the kernel's
/// statistics (enabled for this run only).
struct KernelCost {
    runs: u64,
    run_time_ns: u64,
    requests: u64,
}

fn kernel_cost(url: &str, seconds: u64, object: &Path) -> anyhow::Result<KernelCost> {
    // The send/receive programs, told by their hooks (kernel names are truncated).
    let programs = object_programs(object)?;
    let agent = Agent::start(&[])?;
    let ids: BTreeSet<u32> = program_ids(agent.pid())?;
    let stats = BpfStats::enable()?;
    let before = program_stats(&ids);
    let (_, requests) = h2load(url, seconds)?;
    let after = program_stats(&ids);
    drop(stats);
    let (code, _) = agent.stop()?;
    ensure!(code == Some(0), "the agent exited with {code:?}");
    let (mut runs, mut run_time_ns) = (0, 0);
    for (name, (time, count)) in &after {
        if describe(name, &programs).1 == Class::SendReceive {
            let (time0, count0) = before.get(name).copied().unwrap_or((0, 0));
            run_time_ns += time - time0;
            runs += count - count0;
        }
    }
    Ok(KernelCost { runs, run_time_ns, requests })
}
