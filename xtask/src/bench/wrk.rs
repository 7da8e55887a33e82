//! One wrk run against the local nginx: req/s, requests and errors.

use std::process::{Command, Stdio};

use anyhow::{Context as _, ensure};

pub struct WrkResult {
    pub requests_per_second: f64,
    pub requests: u64,
    pub errors: u64,
}

/// `wrk -t1 -c16 -d<seconds>s` (with `Connection: close` when `close`).
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
