//! `cargo xtask demo` and `cargo xtask run --demo`: the agent plus local servers and clients
//! with contrasting keep-alive behaviour (good reuse, one request per connection, HTTP/1.0, a
//! pool idle time longer than the server's timeout, a request limit), and a per-flow summary
//! of what connscope saw: at the end, and every `summary_every` while it runs.

use std::{
    os::unix::process::CommandExt as _,
    process::{Child, Command},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use connscope_tests::{Scrape, demo::Demo, http_get};

use crate::{is_root, setup};

const LISTEN: &str = "127.0.0.1:9477";

/// How a demo runs.
pub struct DemoRun {
    /// How long the traffic runs (Ctrl-C ends it earlier).
    pub duration: Duration,
    /// Start an agent on 127.0.0.1:9477 (otherwise one is already running there).
    pub start_agent: bool,
    /// Print the summary every so often while the traffic runs, not only at the end.
    pub summary_every: Option<Duration>,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

pub fn run(demo_run: &DemoRun) -> anyhow::Result<()> {
    let mut agent = None;
    if demo_run.start_agent {
        anyhow::ensure!(
            is_root(),
            "the demo starts the agent, which needs root: `sudo -E cargo xtask demo`"
        );
        setup::run()?;
        let binary = crate::binaries::release_agent()?;
        agent = Some(AgentChild(
            Command::new(binary)
                .args(["--web.listen-address", LISTEN, "--log.level", "warn"])
                // Its own process group: Ctrl-C reaches the demo, which stops it after the
                // last summary.
                .process_group(0)
                .spawn()
                .context("starting connscope")?,
        ));
        wait_ready()?;
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { libc::signal(libc::SIGINT, on_interrupt as *const () as libc::sighandler_t) };
    let (demo, servers) = Demo::start(demo_run.duration)?;
    eprintln!(
        "demo running for {} s (Ctrl-C stops it); metrics at http://{LISTEN}/metrics\n  \
         steady server {}  (pooled, one-shot, HTTP/1.0 clients)\n  \
         1 s keep-alive {}  (racer, idler)\n  3 requests/connection {}  (burst)\n  \
         nothing listening {}  (refused)",
        demo_run.duration.as_secs(),
        servers.steady,
        servers.short_timeout,
        servers.limited,
        servers.closed
    );
    let started = Instant::now();
    let mut last_summary = started;
    while started.elapsed() < demo_run.duration && !INTERRUPTED.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if demo_run.summary_every.is_some_and(|every| last_summary.elapsed() >= every) {
            last_summary = Instant::now();
            println!("\nafter {} s:", started.elapsed().as_secs());
            summary()?;
        }
    }
    // Stops the clients and the servers.
    drop(demo);
    println!("\nafter {} s (traffic stopped):", started.elapsed().as_secs());
    summary()?;
    drop(agent);
    Ok(())
}

/// The agent, stopped with SIGTERM when dropped.
struct AgentChild(Child);

impl Drop for AgentChild {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn wait_ready() -> anyhow::Result<()> {
    let address = LISTEN.parse()?;
    for _ in 0..300 {
        if matches!(http_get(address, "/readyz"), Ok((200, _))) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("connscope did not become ready on {LISTEN}")
}
/// What the agent saw, per client flow.
fn summary() -> anyhow::Result<()> {
    let (_, body) = http_get(LISTEN.parse()?, "/metrics")?;
    let scrape = Scrape::parse(&body)?;
    println!(
        "{:<14} {:>11} {:>9} {:>12} {:>6}  closes (by, reason)",
        "client", "connections", "requests", "req/conn", "races"
    );
    for process in scrape.label_values("connscope_connections_opened_total", "process") {
        if !process.starts_with("demo-") {
            continue;
        }
        let flow = [("process", process.as_str()), ("role", "client")];
        let connections = scrape.sum("connscope_connection_requests_count", &flow);
        let requests = scrape.sum("connscope_connection_requests_sum", &flow);
        let mut closes: Vec<String> = scrape
            .matching("connscope_connections_closed_total", &flow)
            .map(|s| format!("{}/{}={}", s.labels["closed_by"], s.labels["reason"], s.value))
            .collect();
        closes.sort();
        println!(
            "{process:<14} {connections:>11} {requests:>9} {:>12.1} {:>6}  {}",
            if connections > 0.0 { requests / connections } else { 0.0 },
            scrape.sum("connscope_keepalive_races_total", &flow),
            closes.join(" ")
        );
    }
    Ok(())
}
