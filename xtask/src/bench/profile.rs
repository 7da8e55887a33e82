//! Where the time of `Connection: close` churn goes, the load whose cost targets are the
//! hardest: one wrk run with the agent under `perf record` and `kernel.bpf_stats_enabled`,
//! then the same run with the floor. It reports, per connection (both ends on this host), the
//! agent's CPU and the BPF run time of connscope's programs and of the floor's, and the
//! agent's functions by share of perf's samples (kept in `target/bench/agent-close.perf.data`: its own code, the libraries and the kernel
//! work it asks for, such as reading `/proc/<pid>/net/tcp` for the socket census).

use std::{
    collections::BTreeSet, os::unix::process::ExitStatusExt as _, path::Path, process::Command,
};

use anyhow::{Context as _, ensure};
use connscope_tests::{
    Agent,
    procfs::{cpu_seconds, program_ids},
};
use serde_json::json;

use super::{
    Settings,
    floor::Floor,
    kernel_cost::{BpfStats, program_stats},
    report::{Figure, Part, Target},
    round,
    wrk::wrk,
};
use crate::workspace_root;

/// Functions listed: those with at least this share of the agent's samples.
const PERCENT_LIMIT: f64 = 1.5;

/// Σ BPF run time of the programs `ids` across one `Connection: close` wrk run, and the
/// connections the run made.
fn bpf_time_across_close_load(
    ids: &BTreeSet<u32>,
    settings: &Settings,
    url: &str,
) -> anyhow::Result<(u64, u64)> {
    let total =
        |ids: &BTreeSet<u32>| program_stats(ids).values().map(|(time, _)| time).sum::<u64>();
    let before = total(ids);
    let result = wrk(url, settings.seconds, true)?;
    Ok((total(ids) - before, result.requests))
}

pub fn agent_profile(settings: &Settings, url: &str) -> anyhow::Result<Part> {
    // Kept for `perf report -i` beside report.json.
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let data = dir.join("agent-close.perf.data");
    let stats = BpfStats::enable()?;
    let agent = Agent::start(&[])?;
    let ids = program_ids(agent.pid())?;
    let mut perf = Command::new("perf")
        .args(["record", "--quiet", "-F", "999", "-p", &agent.pid().to_string(), "-o"])
        .arg(&data)
        .spawn()
        .context("running perf (apt: linux-perf)")?;
    let cpu_before = cpu_seconds(agent.pid())?;
    let (bpf_ns, connections) = bpf_time_across_close_load(&ids, settings, url)?;
    let agent_cpu = cpu_seconds(agent.pid())? - cpu_before;
    // SAFETY: signalling our own child; perf writes its data file on SIGINT, then dies of
    // the signal again, as an interrupted command does.
    unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
    let status = perf.wait()?;
    ensure!(
        status.success() || status.signal() == Some(libc::SIGINT),
        "perf record failed: {status}"
    );
    agent.stop()?;
    let floor = Floor::start()?;
    let (floor_bpf_ns, floor_connections) =
        bpf_time_across_close_load(&program_ids(floor.pid())?, settings, url)?;
    floor.stop()?;
    drop(stats);

    let functions = top_functions(&data)?;
    let per_connection = |ns: u64, n: u64| ns as f64 / n.max(1) as f64;
    let (bpf, floor_bpf) =
        (per_connection(bpf_ns, connections), per_connection(floor_bpf_ns, floor_connections));
    let agent_us = agent_cpu * 1e6 / connections.max(1) as f64;
    let mut figures = vec![Figure::new(
        "where Connection: close time goes, per connection (profile run)",
        agent_us,
        format!(
            "agent {agent_us:.2} µs of CPU; BPF {:.2} µs (floor arm {:.2} µs)",
            bpf / 1e3,
            floor_bpf / 1e3
        ),
        Target::None,
    )];
    for (share, function) in &functions {
        figures.push(Figure::new(
            format!("  agent samples in {function}"),
            *share,
            format!("{share:.1}%"),
            Target::None,
        ));
    }
    let details = json!({
        "connections": connections,
        "agent_cpu_seconds": round(agent_cpu, 4),
        "agent_us_per_connection": round(agent_us, 3),
        "bpf_ns_per_connection": round(bpf, 1),
        "floor_bpf_ns_per_connection": round(floor_bpf, 1),
        "agent_functions": functions
            .iter()
            .map(|(share, function)| json!({ "function": function, "percent": share }))
            .collect::<Vec<_>>(),
    });
    Ok(Part { key: "profile", details, figures })
}

/// The functions with at least [`PERCENT_LIMIT`] of the samples in `data`, largest first.
fn top_functions(data: &Path) -> anyhow::Result<Vec<(f64, String)>> {
    let output = Command::new("perf")
        .args(["report", "--stdio", "--no-children", "--sort", "symbol", "--percent-limit"])
        .arg(PERCENT_LIMIT.to_string())
        .arg("-i")
        .arg(data)
        .output()
        .context("running perf report")?;
    ensure!(
        output.status.success(),
        "perf report failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(parse_report(&String::from_utf8_lossy(&output.stdout)))
}

/// `perf report --stdio --sort symbol` rows: `  13.75%  [.] some::function`, `[k]` for the
/// kernel's; comments (`#`) and blank lines are skipped.
fn parse_report(text: &str) -> Vec<(f64, String)> {
    text.lines()
        .filter_map(|line| {
            let (share, rest) = line.trim().split_once('%')?;
            let share: f64 = share.trim().parse().ok()?;
            let rest = rest.trim();
            let kernel = rest.starts_with("[k]");
            // Columns perf adds after the symbol (`-  -`) are set off by wide spacing.
            let name = rest.get(3..)?.trim().split("  ").next()?;
            Some((share, if kernel { format!("{name} (kernel)") } else { name.to_owned() }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_rows_are_read_and_comments_skipped() {
        let text = "# Samples: 1K of event 'cpu-clock'\n#\n    13.75%  [.] connscope::pipeline::table::ConnectionTable::handle   -      -\n     6.48%  [k] established_get_first\n\n";
        assert_eq!(
            parse_report(text),
            vec![
                (13.75, "connscope::pipeline::table::ConnectionTable::handle".to_owned()),
                (6.48, "established_get_first (kernel)".to_owned()),
            ]
        );
    }
}
