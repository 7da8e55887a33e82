//! `cargo xtask bench`: what the agent costs the host it watches, measured side by side in
//! one run (a benchmark, not a test: it prints a table and writes `target/bench/report.json`).
//!
//! 1. wrk against a local nginx, keep-alive and `Connection: close`, agent attached (B) or
//!    not (A), alternating A B A B ...: medians, ratio B/A per pair and its spread.
//! 2. Events lost at the highest connection rate (the `Connection: close` runs) and the
//!    agent's CPU time (utime + stime) per 10k requests and per 10k connections.
//! 3. In-kernel cost per program (`kernel.bpf_stats_enabled`): ns per run.
//! 4. Memory at 100k tracked idle connections: agent RSS and BPF map memory.
//! 5. `/metrics` latency with the default label caps filled.
//!
//! Root is needed (the agent loads BPF programs). Everything runs on loopback, bounded in
//! time and count, and is cleaned up.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use connscope_tests::{
    Agent, Scrape, free_port, http_get, net,
    nginx::{Nginx, NginxConfig},
    procfs::{program_ids, rss_bytes},
};
use serde_json::{Value, json};

use crate::{cargo, is_root, run_checked, setup, workspace_root};

/// Knobs (environment variables) so a quick run is possible; defaults are the documented run.
struct Settings {
    pairs: usize,
    seconds: u64,
    idle_connections: usize,
}

impl Settings {
    fn from_env() -> Self {
        let get = |name: &str, default: u64| {
            std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
        };
        Self {
            pairs: get("CONNSCOPE_BENCH_PAIRS", 5) as usize,
            seconds: get("CONNSCOPE_BENCH_SECONDS", 5),
            // Connections; both ends are on this host, so twice as many sockets are tracked.
            idle_connections: get("CONNSCOPE_BENCH_IDLE_CONNECTIONS", 50_000) as usize,
        }
    }
}

pub fn run() -> anyhow::Result<()> {
    if !is_root() {
        bail!("the benchmark loads BPF programs: run it as root (`sudo -E cargo xtask bench`)");
    }
    setup::run()?;
    run_checked(cargo().args(["build", "--release", "--package", "connscope"]))?;
    let binary = workspace_root().join("target/release/connscope");
    // SAFETY: set before any thread of ours starts; read by the test harness.
    unsafe { std::env::set_var("CONNSCOPE_BIN", &binary) };
    let settings = Settings::from_env();
    let mut report = serde_json::Map::new();
    report.insert("machine".into(), machine());

    let nginx = Nginx::start(NginxConfig {
        port: free_port(),
        keepalive_timeout: Duration::from_secs(60),
        keepalive_requests: 1_000_000,
        workers: 1,
        advertise_keep_alive: false,
    })?;
    let url = nginx.url("/index.html");
    let keep_alive = throughput(&settings, &url, false)?;
    let close = throughput(&settings, &url, true)?;
    report.insert("throughput_keepalive".into(), keep_alive.clone());
    report.insert("throughput_close".into(), close.clone());
    let kernel = kernel_cost(&settings, &url)?;
    report.insert("bpf_programs".into(), kernel.clone());
    drop(nginx);
    let memory = idle_memory(settings.idle_connections)?;
    report.insert("memory".into(), memory.clone());
    let metrics = metrics_latency()?;
    report.insert("metrics_endpoint".into(), metrics.clone());

    let report = Value::Object(report);
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    print_table(&report);
    eprintln!("bench: report written to {}", path.display());
    Ok(())
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let kernel =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    json!({ "cpu": cpu, "cpus": thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "kernel": kernel })
}

// ---------------------------------------------------------------------------------------
// 1 and 2: throughput, losses, agent CPU

struct WrkResult {
    requests_per_second: f64,
    requests: u64,
    errors: u64,
}

fn wrk(url: &str, seconds: u64, close: bool) -> anyhow::Result<WrkResult> {
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

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the `(comm)`, which may contain spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("bad /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the comm.
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// Losses other than `untracked_socket` (payload on sockets older than the agent).
fn real_losses(scrape: &Scrape) -> BTreeMap<String, f64> {
    scrape
        .matching("connscope_events_lost_total", &[])
        .filter_map(|s| {
            let reason = s.labels.get("reason")?;
            (reason != "untracked_socket").then(|| (reason.clone(), s.value))
        })
        .collect()
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

fn throughput(settings: &Settings, url: &str, close: bool) -> anyhow::Result<Value> {
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

// ---------------------------------------------------------------------------------------
// 3: in-kernel cost per program

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

fn kernel_cost(settings: &Settings, url: &str) -> anyhow::Result<Value> {
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

// ---------------------------------------------------------------------------------------
// 4: memory at many idle tracked connections

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

fn idle_memory(connections: usize) -> anyhow::Result<Value> {
    const PER_HOLDER: usize = 8_500;
    let capacity = (2 * connections).next_power_of_two().max(1024);
    let agent = Agent::start(&["--bpf.max-connections", &capacity.to_string()])?;
    let rss_start = rss_bytes(agent.pid())?;
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
    let maps = map_memory(agent.pid())?;
    let conns_bytes = maps.get("CONNS").and_then(|m| m["memlock_bytes"].as_u64()).unwrap_or(0);
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
    Ok(json!({
        "connections": connections,
        "sockets_tracked": tracked_now,
        "map_capacity": capacity,
        "open_seconds": round(open_seconds, 1),
        "agent_rss_start_bytes": rss_start,
        "agent_rss_bytes": rss,
        "agent_rss_after_close_bytes": rss_after,
        "rss_goal_bytes": 30u64 << 20,
        "rss_goal_met": rss <= 30 << 20,
        "bpf_maps": maps,
        "bpf_map_bytes_total": total_bytes,
        "conns_map_bytes_per_tracked_connection": round(per_conn, 1),
        "all_maps_bytes_per_tracked_connection": round(per_conn_total, 1),
        "conns_map_bytes_per_slot": round(conns_bytes as f64 / capacity as f64, 1),
        "kernel_bytes_goal": 200,
        "kernel_bytes_goal_met": per_conn <= 200.0,
        "events_lost": lost,
        "tracked_after_close": tracked(&after),
    }))
}

// ---------------------------------------------------------------------------------------
// 5: /metrics latency with the label caps filled

struct RawAgent {
    child: Child,
    address: SocketAddr,
}

impl Drop for RawAgent {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// The agent with its default label caps (the harness's `Agent` lifts the server cap).
fn start_default_agent() -> anyhow::Result<RawAgent> {
    let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let child = Command::new(workspace_root().join("target/release/connscope"))
        .args(["--web.listen-address", &address.to_string()])
        .env("CONNSCOPE_LOG_LEVEL", "warn")
        // The arms without the agent must run without its programs: nothing stays pinned.
        .env("CONNSCOPE_BPF_PIN_PATH", "")
        .stdin(Stdio::null())
        .spawn()?;
    let agent = RawAgent { child, address };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(http_get(agent.address, "/readyz"), Ok((200, _))) {
        ensure!(Instant::now() < deadline, "connscope not ready after 30 s");
        thread::sleep(Duration::from_millis(50));
    }
    Ok(agent)
}

/// A keep-alive HTTP server answering every request head with a small response.
fn tiny_http_server(listener: TcpListener, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let _ = listener.set_nonblocking(true);
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut stream, _)) = listener.accept() else {
                thread::sleep(Duration::from_millis(2));
                continue;
            };
            let _ = stream.set_nonblocking(false);
            thread::spawn(move || {
                let mut pending = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        let response = b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5, max=100\r\nContent-Length: 2\r\n\r\nok";
                        if stream.write_all(response).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    })
}

fn metrics_latency() -> anyhow::Result<Value> {
    const SERVERS: usize = 100;
    const PROCESSES: usize = 10;
    let agent = start_default_agent()?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut servers = Vec::new();
    let mut handles = Vec::new();
    for i in 0..SERVERS {
        let listener = TcpListener::bind(format!("127.0.78.{}:0", i + 1))?;
        servers.push(listener.local_addr()?);
        handles.push(tiny_http_server(listener, stop.clone()));
    }
    // Every (process, server) flow: two requests per connection (idle gap observed), then
    // a client close; a second connection closed by a reset for more label sets.
    let servers = Arc::new(servers);
    let mut clients = Vec::new();
    for p in 0..PROCESSES {
        let servers = servers.clone();
        clients.push(thread::Builder::new().name(format!("cs-bench-p{p:02}")).spawn(
            move || -> anyhow::Result<()> {
                for server in servers.iter() {
                    for reset in [false, true] {
                        let mut stream = TcpStream::connect(server)?;
                        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                        for _ in 0..2 {
                            stream.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")?;
                            let mut response = Vec::new();
                            let mut buf = [0u8; 512];
                            while !response.ends_with(b"ok") {
                                let n = stream.read(&mut buf)?;
                                ensure!(n > 0, "closed early");
                                response.extend_from_slice(&buf[..n]);
                            }
                        }
                        if reset {
                            net::set_linger_zero(&stream)?;
                        }
                    }
                }
                Ok(())
            },
        )?);
    }
    for client in clients {
        client.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    thread::sleep(Duration::from_secs(1));
    let mut timings = Vec::new();
    let mut body_len = 0;
    let mut series = 0;
    let mut servers_seen = 0;
    for _ in 0..30 {
        let started = Instant::now();
        let (status, body) = http_get(agent.address, "/metrics")?;
        timings.push(started.elapsed().as_secs_f64() * 1000.0);
        ensure!(status == 200, "/metrics answered {status}");
        body_len = body.len();
        let scrape = Scrape::parse(&body)?;
        series = scrape.samples.len();
        servers_seen = scrape.label_values("connscope_connections_opened_total", "server").len();
    }
    stop.store(true, Ordering::Relaxed);
    for handle in handles {
        let _ = handle.join();
    }
    drop(agent);
    let p50 = median(&timings);
    let max = timings.iter().copied().fold(0.0, f64::max);
    Ok(json!({
        "servers": SERVERS,
        "processes": PROCESSES,
        "server_label_values": servers_seen,
        "samples": series,
        "body_bytes": body_len,
        "latency_ms_median": round(p50, 2),
        "latency_ms_max": round(max, 2),
        "goal_ms": 10,
        "goal_met": p50 <= 10.0,
    }))
}

// ---------------------------------------------------------------------------------------

fn print_table(report: &Value) {
    println!("\nconnscope benchmark ({})", report["machine"]["kernel"].as_str().unwrap_or("?"));
    println!("{:-<96}", "");
    for key in ["throughput_keepalive", "throughput_close"] {
        let t = &report[key];
        println!(
            "{:<22} without {:>8} req/s  with {:>8} req/s  ratio {:.3} (min {:.3}, max {:.3})  goal >= {}  {}",
            t["mode"].as_str().unwrap_or(""),
            t["median_without_rps"],
            t["median_with_rps"],
            t["ratio_median"].as_f64().unwrap_or(0.0),
            t["ratio_min"].as_f64().unwrap_or(0.0),
            t["ratio_max"].as_f64().unwrap_or(0.0),
            t["goal"],
            if t["goal_met"].as_bool() == Some(true) { "met" } else { "NOT met" }
        );
        println!(
            "{:<22} agent CPU {} s per 10k {}; events lost {} {}",
            "",
            t["agent_cpu_seconds_per_10k"],
            t["agent_cpu_per_10k_unit"].as_str().unwrap_or(""),
            t["events_lost_total"],
            t["events_lost"]
        );
    }
    println!("{:-<96}", "");
    if let Some(programs) = report["bpf_programs"].as_object() {
        for (name, p) in programs {
            println!(
                "{:<32} {:>10} runs {:>8} ns/run  goal <= {} ns ({})  {}",
                name,
                p["runs"],
                p["ns_per_run"],
                p["goal_ns"],
                p["kind"].as_str().unwrap_or(""),
                if p["goal_met"].as_bool() == Some(true) { "met" } else { "NOT met" }
            );
        }
    }
    println!("{:-<96}", "");
    let m = &report["memory"];
    println!(
        "{} idle connections ({} sockets tracked): agent RSS {:.1} MiB (goal <= 30: {}), CONNS map {} B per tracked socket ({} B per slot; all maps {} B) goal <= 200: {}",
        m["connections"],
        m["sockets_tracked"],
        m["agent_rss_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        if m["rss_goal_met"].as_bool() == Some(true) { "met" } else { "NOT met" },
        m["conns_map_bytes_per_tracked_connection"],
        m["conns_map_bytes_per_slot"],
        m["all_maps_bytes_per_tracked_connection"],
        if m["kernel_bytes_goal_met"].as_bool() == Some(true) { "met" } else { "NOT met" },
    );
    let e = &report["metrics_endpoint"];
    println!(
        "/metrics with {} servers x {} processes: {} samples, {} bytes, median {} ms, max {} ms (goal <= 10 ms: {})",
        e["servers"],
        e["processes"],
        e["samples"],
        e["body_bytes"],
        e["latency_ms_median"],
        e["latency_ms_max"],
        if e["goal_met"].as_bool() == Some(true) { "met" } else { "NOT met" }
    );
}
