//! The tax on processes that never touch the network: `dd if=/dev/zero of=/dev/null bs=1`
//! (millions of one-byte reads and writes), timed without and with the agent, alternating.
//! Then one more run with `kernel.bpf_stats_enabled` on (not during the timed runs: the
//! statistics cost time themselves): the run time of all of connscope's programs during it,
//! divided by the system calls dd made, is what a system call that moves no TCP payload costs.

use std::{process::Command, time::Instant};

use anyhow::{Context as _, ensure};
use connscope_tests::{Agent, procfs::program_ids};
use serde_json::json;

use super::{
    Settings,
    kernel_cost::{BpfStats, program_stats},
    report::{Figure, Part, Target},
    round, spread,
};

/// Seconds one dd run takes.
fn dd(count: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let status = Command::new("dd")
        .args(["if=/dev/zero", "of=/dev/null", "bs=1", &format!("count={count}"), "status=none"])
        .status()
        .context("running dd")?;
    ensure!(status.success(), "dd failed: {status}");
    Ok(started.elapsed().as_secs_f64())
}

pub fn no_network(settings: &Settings) -> anyhow::Result<Part> {
    let count = settings.dd_count;
    dd(count / 10)?; // warm-up
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for round in 1..=settings.pairs {
        let a = dd(count)?;
        let agent = Agent::start(&[])?;
        let b = dd(count)?;
        agent.stop()?;
        eprintln!(
            "bench: dd bs=1 count={count} round {round}: without {a:.2} s, with the agent {b:.2} s, ratio {:.3}",
            a / b
        );
        without.push(a);
        with.push(b);
    }
    let ratios: Vec<f64> = without.iter().zip(&with).map(|(a, b)| a / b).collect();
    let ratio = spread(&ratios);

    // The syscall cost, from the programs' own run time.
    let stats = BpfStats::enable()?;
    let agent = Agent::start(&[])?;
    let ids = program_ids(agent.pid())?;
    let before = program_stats(&ids);
    let seconds = dd(count)?;
    let after = program_stats(&ids);
    agent.stop()?;
    drop(stats);
    let run_ns: u64 =
        after.iter().map(|(name, (time, _))| time - before.get(name).map_or(0, |(t, _)| *t)).sum();
    let runs: u64 = after
        .iter()
        .map(|(name, (_, count))| count - before.get(name).map_or(0, |(_, c)| *c))
        .sum();
    // One read and one write per byte.
    let syscalls = 2 * count;
    let ns_per_syscall = run_ns as f64 / syscalls as f64;
    let details = json!({
        "command": format!("dd if=/dev/zero of=/dev/null bs=1 count={count}"),
        "rounds": settings.pairs,
        "without_agent_seconds": without.iter().map(|v| round(*v, 3)).collect::<Vec<_>>(),
        "with_agent_seconds": with.iter().map(|v| round(*v, 3)).collect::<Vec<_>>(),
        "time_without_over_with": ratio.to_json(),
        "stats_run_seconds": round(seconds, 3),
        "stats_run_program_runs": runs,
        "stats_run_program_ns": run_ns,
        "system_calls": syscalls,
        "ns_per_system_call": round(ns_per_syscall, 2),
    });
    let figures = vec![
        Figure::new(
            "ns per system call that moves no TCP payload",
            ns_per_syscall,
            format!("{ns_per_syscall:.1} ns ({runs} program runs)"),
            Target::AtMost(30.0),
        ),
        ratio.figure(
            "no-network workload (dd bs=1), time without / with agent",
            Target::AtLeast(0.97),
        ),
    ];
    Ok(Part { key: "no_network", details, figures })
}
