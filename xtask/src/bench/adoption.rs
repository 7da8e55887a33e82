//! Adoption at start (issue 10): `adoption_connections` loopback connections (default
//! 10,000) established before the agent starts, both ends on this host (a `python3` server
//! holds the accepted ends). Per round: the agent's start-up, from its exec to `/readyz`
//! answering (it scans the listening ports in `/proc` meanwhile), and the adoption, from
//! the first send on each connection to every end counted in
//! `connscope_connections_adopted_total` (20,000 sockets: adopted in the kernel at their
//! first send or receive, announced and attributed by the agent). Rounds as
//! `CONNSCOPE_BENCH_PAIRS`, each with fresh connections and a fresh agent.

use std::time::{Duration, Instant};

use connscope_tests::{Agent, Scrape, existing_connections::ExistingConnections};
use serde_json::json;

use super::{
    Settings,
    report::{Part, Target},
    spread,
};

pub fn adoption(settings: &Settings) -> anyhow::Result<Part> {
    let count = settings.adoption_connections;
    let (mut ready, mut adoption) = (Vec::new(), Vec::new());
    for round in 1..=settings.pairs {
        let mut connections = ExistingConnections::open(count, "127.0.0.79")?;
        let server = connections.server.clone();
        let adopted = |s: &Scrape| {
            s.sum("connscope_connections_adopted_total", &[("server", server.as_str())])
        };
        let started = Instant::now();
        let agent = Agent::start(&[])?;
        let ready_after = started.elapsed();
        let first_send = Instant::now();
        connections.first_exchange()?;
        let all = 2.0 * count as f64;
        let scrape = agent.scrape_until(Duration::from_secs(60), |s| adopted(s) >= all)?;
        let adopted_after = first_send.elapsed();
        anyhow::ensure!(adopted(&scrape) == all, "adopted {} of {all}", adopted(&scrape));
        agent.stop()?;
        eprintln!(
            "bench: adoption round {round}: ready {:.3} s after start, {all} sockets adopted {:.3} s after the first send",
            ready_after.as_secs_f64(),
            adopted_after.as_secs_f64()
        );
        ready.push(ready_after.as_secs_f64());
        adoption.push(adopted_after.as_secs_f64());
    }
    let (ready, adoption) = (spread(&ready), spread(&adoption));
    let details = json!({
        "connections": count,
        "sockets": 2 * count,
        "rounds": settings.pairs,
        "ready_seconds": ready.to_json(),
        "adoption_seconds": adoption.to_json(),
    });
    let figures = vec![
        adoption.figure(
            format!(
                "adoption of {count} existing connections (both ends), s after their first send"
            ),
            Target::AtMost(1.0),
        ),
        ready.figure(
            format!("agent ready with {count} existing connections, s after start"),
            Target::AtMost(2.0),
        ),
    ];
    Ok(Part { key: "adoption", details, figures })
}
