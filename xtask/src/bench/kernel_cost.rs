//! In-kernel cost per program: `kernel.bpf_stats_enabled` run time and count per program.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use connscope_tests::{Agent, procfs::program_ids};
use serde_json::{Value, json};

use super::{Settings, round, throughput::wrk};

/// (run time ns, run count) per program name, for the given ids.
fn program_stats(ids: &BTreeSet<u32>) -> BTreeMap<String, (u64, u64)> {
    let mut stats = BTreeMap::new();
    for info in aya::programs::loaded_programs().flatten() {
        if ids.contains(&info.id()) {
            let name = info.name_as_str().unwrap_or("?").to_owned();
            let entry = stats.entry(name).or_insert((0, 0));
            entry.0 += info.run_time().as_nanos() as u64;
            entry.1 += info.run_count();
        }
    }
    stats
}

/// Goal in ns per run for a program, by what it hooks. The kernel keeps 15 characters of
/// a name: `connscope_sock_` is sock_send_length/sock_recv_length, `connscope_sys_e`
/// sys_enter/sys_exit (the payload stash of every read/write system call), the others
/// the lifecycle hooks (state changes, resets, destruction).
fn program_goal(name: &str) -> (u64, &'static str) {
    if name.contains("send")
        || name.contains("recv")
        || name.contains("sock_")
        || name.contains("sys_e")
    {
        (100, "send/receive")
    } else {
        (200, "open/close")
    }
}

pub fn kernel_cost(settings: &Settings, url: &str) -> anyhow::Result<Value> {
    const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let previous = std::fs::read_to_string(SYSCTL).context("reading kernel.bpf_stats_enabled")?;
    std::fs::write(SYSCTL, "1").context("sysctl kernel.bpf_stats_enabled=1")?;
    let result = (|| {
        let agent = Agent::start(&[])?;
        let ids = program_ids(agent.pid())?;
        let before = program_stats(&ids);
        // Both traffic shapes: per-request hooks and per-connection hooks.
        wrk(url, settings.seconds, false)?;
        wrk(url, settings.seconds, true)?;
        let after = program_stats(&ids);
        agent.stop()?;
        let mut programs = serde_json::Map::new();
        for (name, (time, count)) in &after {
            let (time0, count0) = before.get(name).copied().unwrap_or((0, 0));
            let runs = count - count0;
            let ns = if runs == 0 { 0.0 } else { (time - time0) as f64 / runs as f64 };
            let (goal, kind) = program_goal(name);
            programs.insert(
                name.clone(),
                json!({ "runs": runs, "ns_per_run": round(ns, 1), "goal_ns": goal, "kind": kind, "goal_met": ns <= goal as f64 }),
            );
        }
        anyhow::Ok(Value::Object(programs))
    })();
    let _ = std::fs::write(SYSCTL, previous.trim());
    result
}
