//! `cargo xtask demo`: the agent plus local servers and clients with contrasting keep-alive
//! behaviour (good reuse, one request per connection, HTTP/1.0, a pool idle time longer
//! than the server's timeout, a request limit), then a summary of what connscope saw.

use std::{process::Command, time::Duration};

use anyhow::Context as _;
use connscope_tests::{Scrape, demo::Demo, http_get};

use crate::{is_root, setup};

const LISTEN: &str = "127.0.0.1:9477";

pub fn run(duration: Duration, no_agent: bool) -> anyhow::Result<()> {
    let mut agent = None;
    if !no_agent {
        anyhow::ensure!(
            is_root(),
            "the demo starts the agent, which needs root: `sudo -E cargo xtask demo`"
        );
        setup::run()?;
        let binary = crate::binaries::release_agent()?;
        agent = Some(
            Command::new(binary)
                .args(["--web.listen-address", LISTEN, "--log.level", "warn"])
                .spawn()
                .context("starting connscope")?,
        );
        wait_ready()?;
    }
    let (demo, servers) = Demo::start(duration)?;
    eprintln!(
        "demo running for {} s; metrics at http://{LISTEN}/metrics\n  steady server {}  (pooled, one-shot, HTTP/1.0 clients)\n  \
         1 s keep-alive {}  (racer, idler)\n  3 requests/connection {}  (burst)",
        duration.as_secs(),
        servers.steady,
        servers.short_timeout,
        servers.limited
    );
    demo.wait();
    summary()?;
    if let Some(mut agent) = agent {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
        let _ = agent.wait();
    }
    Ok(())
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
