//! What /proc says about a process: its resident memory and the BPF programs it holds.

use std::collections::BTreeSet;

use anyhow::Context as _;

/// Resident set of a process in bytes (`VmRSS` of /proc/PID/status).
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024)
}

/// Ids of the BPF programs a process holds open (`prog_id:` in /proc/PID/fdinfo/*).
pub fn program_ids(pid: u32) -> anyhow::Result<BTreeSet<u32>> {
    let mut ids = BTreeSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(info) = std::fs::read_to_string(entry?.path()) else { continue };
        if let Some(id) = info.lines().find_map(|l| l.strip_prefix("prog_id:")) {
            ids.insert(id.trim().parse()?);
        }
    }
    Ok(ids)
}
