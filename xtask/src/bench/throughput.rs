//! Throughput with and without the agent (wrk against a local nginx, keep-alive and
//! `Connection: close`, alternating), events lost at that rate and the agent's CPU time.

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context as _, ensure};
use connscope_tests::{Agent, procfs::cpu_seconds};
use serde_json::{Value, json};

use super::{Settings, median, real_losses, round};

pub struct WrkResult {
    requests_per_second: f64,
    requests: u64,
    errors: u64,
}

pub fn wrk(url: &str, seconds: u64, close: bool) -> anyhow::Result<WrkResult> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", "-c16", &format!("-d{seconds}s")]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let output =
        cmd.arg(url).stderr(Stdio::inherit()).output().context("running wrk (apt: wrk)")?;
    ensure!(output.status.success(), "wrk failed: {}", output.status);
    let text = String::from_utf8_lossy(&output.stdout);
    let requests_per_second = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))?;
    let requests = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ").map(|(n, _)| n.trim().to_owned()))
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no request count in wrk output:\n{text}"))?;
    // "Socket errors: connect 0, read 0, write 0, timeout 0" and non-2xx responses.
    let mut errors = 0;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Socket errors:") {
            errors += rest
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
        if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().unwrap_or(0);
        }
    }
    Ok(WrkResult { requests_per_second, requests, errors })
}

pub fn throughput(settings: &Settings, url: &str, close: bool) -> anyhow::Result<Value> {
    let mode = if close { "Connection: close" } else { "keep-alive" };
    // Warm-up (page cache, nginx, TCP) before the measured runs.
    wrk(url, 1, close)?;
    let (mut without, mut with, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cpu_total, mut requests_total, mut errors) = (0.0, 0u64, 0u64);
    let mut losses: BTreeMap<String, f64> = BTreeMap::new();
    for pair in 0..settings.pairs {
        let a = wrk(url, settings.seconds, close)?;
        let agent = Agent::start(&[])?;
        let before = agent.scrape()?;
        let cpu_before = cpu_seconds(agent.pid())?;
        let b = wrk(url, settings.seconds, close)?;
        let cpu_after = cpu_seconds(agent.pid())?;
        // Let the agent drain what the kernel queued before reading its loss counters.
        thread::sleep(Duration::from_millis(300));
        let after = agent.scrape()?;
        let (code, _) = agent.stop()?;
        ensure!(code == Some(0), "the agent exited with {code:?}");
        let before_losses = real_losses(&before);
        for (reason, value) in real_losses(&after) {
            *losses.entry(reason.clone()).or_default() +=
                value - before_losses.get(&reason).copied().unwrap_or(0.0);
        }
        cpu_total += cpu_after - cpu_before;
        requests_total += b.requests;
        errors += a.errors + b.errors;
        eprintln!(
            "bench: {mode} pair {}: without {:.0} req/s, with {:.0} req/s, ratio {:.3}",
            pair + 1,
            a.requests_per_second,
            b.requests_per_second,
            b.requests_per_second / a.requests_per_second
        );
        without.push(a.requests_per_second);
        with.push(b.requests_per_second);
        ratios.push(b.requests_per_second / a.requests_per_second);
    }
    let ratio = median(&ratios);
    let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let max = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let goal = if close { 0.97 } else { 0.98 };
    let per_10k = cpu_total / requests_total.max(1) as f64 * 10_000.0;
    let lost_total: f64 = losses.values().sum();
    Ok(json!({
        "mode": mode,
        "wrk": format!("wrk -t1 -c16 -d{}s{} {url}", settings.seconds, if close { " -H 'Connection: close'" } else { "" }),
        "pairs": settings.pairs,
        "without_agent_rps": without.iter().map(|v| round(*v, 0)).collect::<Vec<_>>(),
        "with_agent_rps": with.iter().map(|v| round(*v, 0)).collect::<Vec<_>>(),
        "median_without_rps": round(median(&without), 0),
        "median_with_rps": round(median(&with), 0),
        "ratio_median": round(ratio, 4),
        "ratio_min": round(min, 4),
        "ratio_max": round(max, 4),
        "goal": goal,
        "goal_met": ratio >= goal,
        "wrk_errors": errors,
        "requests_with_agent": requests_total,
        // In close mode every request is a connection.
        "agent_cpu_seconds_per_10k": round(per_10k, 4),
        "agent_cpu_per_10k_unit": if close { "connections (one request each)" } else { "requests" },
        "events_lost": losses,
        "events_lost_total": lost_total,
    }))
}
