//! wrk against the local nginx: req/s, requests, errors and wrk's own CPU time, for a fixed
//! duration or until interrupted (wrk prints its summary on SIGINT too).

use std::{
    io::Read as _,
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, ensure};

pub struct WrkResult {
    pub requests_per_second: f64,
    pub requests: u64,
    pub errors: u64,
    /// CPU time (user + system) wrk itself used.
    pub cpu_seconds: f64,
}

/// `wrk -t1 -c16 -d<seconds>s` (with `Connection: close` when `close`).
pub fn wrk(url: &str, seconds: u64, close: bool) -> anyhow::Result<WrkResult> {
    finish(spawn(url, seconds, close)?)
}

/// The same run of at most `max_seconds`, ended earlier by [`interrupt`].
pub fn spawn(url: &str, max_seconds: u64, close: bool) -> anyhow::Result<Child> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", "-c16", &format!("-d{max_seconds}s")]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("running wrk (apt: wrk)")
}

/// Ends a [`spawn`]ed run with SIGINT and reads its summary.
pub fn interrupt(child: Child) -> anyhow::Result<WrkResult> {
    // SAFETY: signalling our own child, not reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    finish(child)
}

/// Reads the summary of a [`spawn`]ed run and reaps it.
fn finish(mut child: Child) -> anyhow::Result<WrkResult> {
    let mut text = String::new();
    child.stdout.take().context("wrk stdout")?.read_to_string(&mut text)?;
    let (status, cpu_seconds) = wait_with_cpu(child.id())?;
    ensure!(status == 0, "wrk failed: wait status {status}");
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
    Ok(WrkResult { requests_per_second, requests, errors, cpu_seconds })
}

/// Reaps our child `pid`: its wait status and the CPU time it used (`wait4`'s rusage).
fn wait_with_cpu(pid: u32) -> anyhow::Result<(i32, f64)> {
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to locals; `pid` is a child we spawned and did not reap.
    let rc = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut usage) };
    ensure!(rc == pid as i32, "wait4 on wrk: {}", std::io::Error::last_os_error());
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok((status, seconds(usage.ru_utime) + seconds(usage.ru_stime)))
}
