//! Memory at many idle tracked connections: agent RSS and BPF map memory per tracked socket.

use std::{
    collections::BTreeMap,
    io::Read as _,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use connscope_tests::{Agent, Scrape, procfs::rss_bytes};
use serde_json::{Value, json};

use super::{
    real_losses,
    report::{Figure, Part, Target},
    round,
};

/// `memlock` of every BPF map a process holds, by map name.
fn map_memory(pid: u32) -> anyhow::Result<BTreeMap<String, Value>> {
    let mut maps = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(info) = std::fs::read_to_string(entry?.path()) else { continue };
        let field = |key: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) else { continue };
        let name = aya::maps::MapInfo::from_id(id as u32)
            .ok()
            .and_then(|m| m.name_as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("map{id}"));
        maps.insert(
            name,
            json!({ "memlock_bytes": memlock, "max_entries": field("max_entries:"), "map_type": field("map_type:") }),
        );
    }
    Ok(maps)
}

fn tracked(scrape: &Scrape) -> f64 {
    scrape.sum("connscope_tracked_connections", &[])
}

/// Holds `n` idle loopback connections (both ends) in one process, attributing each
/// accepted socket with a non-blocking read; prints "ready" and waits for stdin to close.
/// Several of these share the load: RLIMIT_NOFILE (hard 20000 here, and raising it needs
/// CAP_SYS_RESOURCE) bounds one process to about 9k connections.
const IDLE_HOLDER: &str = r#"
import socket, sys
n, base = int(sys.argv[1]), sys.argv[2]
listeners = []
for i in range(4):
    l = socket.socket()
    l.bind((base % (i + 1), 0))
    l.listen(4096)
    l.setblocking(False)
    listeners.append(l)
clients, servers = [], []
def drain():
    for l in listeners:
        while True:
            try:
                s, _ = l.accept()
            except BlockingIOError:
                break
            s.setblocking(False)
            try:
                s.recv(1)
            except BlockingIOError:
                pass
            servers.append(s)
for i in range(n):
    clients.append(socket.create_connection(listeners[i % 4].getsockname()))
    if i % 64 == 0:
        drain()
while len(servers) < n:
    drain()
print("ready", flush=True)
sys.stdin.read()
"#;

pub fn idle_memory(connections: usize) -> anyhow::Result<Part> {
    const PER_HOLDER: usize = 8_500;
    let capacity = (2 * connections).next_power_of_two().max(1024);
    let agent = Agent::start(&["--bpf.max-connections", &capacity.to_string()])?;
    let rss_start = rss_bytes(agent.pid())?;
    let rss_parts_start = rss_breakdown(agent.pid());
    let baseline = tracked(&agent.scrape()?);
    let started = Instant::now();
    let mut holders = Vec::new();
    let mut left = connections;
    let mut k = 0;
    while left > 0 {
        let n = left.min(PER_HOLDER);
        let child = Command::new("python3")
            .args(["-c", IDLE_HOLDER, &n.to_string(), &format!("127.77.{k}.%d")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting python3")?;
        holders.push(child);
        left -= n;
        k += 1;
    }
    for holder in &mut holders {
        let mut out = holder.stdout.take().context("holder stdout")?;
        let mut ready = [0u8; 6];
        out.read_exact(&mut ready).context("an idle-connection holder failed")?;
        ensure!(&ready == b"ready\n", "holder said {:?}", String::from_utf8_lossy(&ready));
    }
    let open_seconds = started.elapsed().as_secs_f64();
    let want = baseline + 2.0 * connections as f64;
    let scrape = agent.scrape_until(Duration::from_secs(60), |s| tracked(s) >= want)?;
    let tracked_now = tracked(&scrape);
    thread::sleep(Duration::from_secs(1));
    let rss = rss_bytes(agent.pid())?;
    let rss_parts = rss_breakdown(agent.pid());
    let largest = largest_mappings(agent.pid(), 8);
    let maps = map_memory(agent.pid())?;
    // The per-socket maps are the ones sized by --bpf.max-connections.
    let per_socket: Vec<&String> = maps
        .iter()
        .filter(|(_, m)| m["max_entries"].as_u64() == Some(capacity as u64))
        .map(|(name, _)| name)
        .collect();
    let conns_bytes: u64 =
        per_socket.iter().filter_map(|name| maps[*name]["memlock_bytes"].as_u64()).sum();
    let total_bytes: u64 = maps.values().filter_map(|m| m["memlock_bytes"].as_u64()).sum();
    let lost = real_losses(&scrape);
    // Clean up and check that the agent lets go of them all.
    for mut holder in holders {
        drop(holder.stdin.take());
        let _ = holder.wait();
    }
    let after = agent.scrape_until(Duration::from_secs(60), |s| tracked(s) <= baseline + 2.0)?;
    let rss_after = rss_bytes(agent.pid())?;
    agent.stop()?;
    let per_conn = conns_bytes as f64 / tracked_now.max(1.0);
    let per_conn_total = total_bytes as f64 / tracked_now.max(1.0);
    let details = json!({
        "connections": connections,
        "sockets_tracked": tracked_now,
        "map_capacity": capacity,
        "open_seconds": round(open_seconds, 1),
        "agent_rss_start_bytes": rss_start,
        "agent_rss_bytes": rss,
        "agent_rss_kib_by_kind": rss_parts,
        "agent_rss_kib_by_kind_at_start": rss_parts_start,
        "agent_largest_mappings_rss_kib": largest,
        "agent_rss_after_close_bytes": rss_after,
        "bpf_maps": maps,
        "bpf_map_bytes_total": total_bytes,
        "per_socket_maps": per_socket,
        "per_socket_map_bytes_per_tracked_socket": round(per_conn, 1),
        "all_maps_bytes_per_tracked_connection": round(per_conn_total, 1),
        "per_socket_map_bytes_per_slot": round(conns_bytes as f64 / capacity as f64, 1),
        "events_lost": lost,
        "tracked_after_close": tracked(&after),
    });
    let rss_mib = rss as f64 / f64::from(1 << 20);
    let ring_kib = mapping_rss_kib(&largest, "anon_inode:bpf-map");
    let own_mib = rss_mib - ring_kib as f64 / 1024.0;
    let figures = vec![
        Figure::new(
            "kernel bytes per tracked socket",
            per_conn,
            format!(
                "{per_conn:.0} B (maps {})",
                per_socket.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("+")
            ),
            Target::AtMost(150.0),
        ),
        Figure::new(
            format!("agent RSS at {tracked_now} tracked sockets"),
            rss_mib,
            format!("{rss_mib:.1} MiB (VmRSS)"),
            Target::AtMost(30.0),
        ),
        Figure::new(
            "  of which the ring buffer's kernel pages, mapped (data pages twice)",
            ring_kib as f64 / 1024.0,
            format!("{:.1} MiB (also counted in the maps' memory)", ring_kib as f64 / 1024.0),
            Target::None,
        ),
        Figure::new(
            "  agent RSS without the ring buffer mapping",
            own_mib,
            format!("{own_mib:.1} MiB"),
            Target::None,
        ),
    ];
    Ok(Part { key: "memory", details, figures })
}

/// `RssAnon`, `RssFile` and `RssShmem` (KiB) of `/proc/PID/status`: the ring buffer's pages
/// are mapped from the kernel, the agent's own heap is anonymous.
fn rss_breakdown(pid: u32) -> Value {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kinds: serde_json::Map<String, Value> = status
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            let kib: u64 = value.split_whitespace().next()?.parse().ok()?;
            name.starts_with("Rss").then(|| (name.to_owned(), Value::from(kib)))
        })
        .collect();
    Value::Object(kinds)
}

/// The `count` mappings of `/proc/PID/smaps` with the most resident memory, as
/// `[name, KiB]` (anonymous mappings are named `[anon]`).
fn largest_mappings(pid: u32, count: usize) -> Value {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut mappings: Vec<(String, u64)> = Vec::new();
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header line: range perms offset dev inode [name].
            let name = fields.nth(4).unwrap_or("[anon]").to_owned();
            mappings.push((name, 0));
        } else if first == "Rss:"
            && let (Some(last), Some(kib)) =
                (mappings.last_mut(), fields.next().and_then(|v| v.parse::<u64>().ok()))
        {
            last.1 = kib;
        }
    }
    mappings.sort_by_key(|m| std::cmp::Reverse(m.1));
    mappings.truncate(count);
    mappings.into_iter().map(|(name, kib)| json!([name, kib])).collect()
}

/// Resident KiB of the mapping named `name` in a [`largest_mappings`] list.
fn mapping_rss_kib(largest: &Value, name: &str) -> u64 {
    largest
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m[0].as_str() == Some(name))
        .filter_map(|m| m[1].as_u64())
        .sum()
}
