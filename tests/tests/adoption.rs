//! Connections established before the agent started, with nginx and at scale: adopted at
//! their first send or receive, with the right role, server, process and close, and counted
//! as adopted (not opened, and outside the lifetime and requests-per-connection
//! histograms). The same in the host namespace and a network namespace with the tests' own
//! HTTP server is in `kernel_continuity`, which the VM tier runs on every backend.
//!
//! Host tier only (not `kernel_*`, so not in `cargo xtask vm-test`): they drive nginx and
//! thousands of sockets, which the VM's initramfs does not carry. They run one at a time
//! (`serial::exclusive`): in CI nginx once reset the other test's connection while 20,000
//! sockets were being opened beside it.

use std::{
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use connscope_tests::{
    Agent, Scrape,
    continuity::{WAIT, assert_opened_before_the_agent, both_closed},
    existing_connections::ExistingConnections,
    free_port, http_server, kernel_test,
    nginx::{Nginx, NginxConfig},
    own_process_label, serial,
};

/// Requests made before the agent starts, and after.
const BEFORE: u64 = 5;
const AFTER: u64 = 20;

kernel_test!(
    fn nginx_connection_opened_before_the_agent_is_adopted() -> anyhow::Result<()> {
        let _serial = serial::exclusive();
        let nginx = Nginx::start(NginxConfig {
            port: free_port(),
            keepalive_timeout: Duration::from_secs(60),
            keepalive_requests: 1000,
            workers: 1,
            advertise_keep_alive: false,
        })?;
        // `http_server::request` reads a 2-byte body.
        std::fs::write(nginx.dir.join("html/resource"), "ok")?;
        let server = nginx.server();
        let mut client = TcpStream::connect(&server)?;
        for _ in 0..BEFORE {
            http_server::request(&mut client, "1.1", "")
                .with_context(|| format!("before the agent; nginx: {}", nginx.error_log()))?;
        }

        let agent = Agent::start(&[])?;
        for _ in 0..AFTER {
            http_server::request(&mut client, "1.1", "")
                .with_context(|| format!("after the agent; nginx: {}", nginx.error_log()))?;
        }
        drop(client);
        let scrape = agent.scrape_until(WAIT, both_closed(&server))?;
        assert_opened_before_the_agent(&scrape, &server, &own_process_label(), "nginx", AFTER);
        // nginx's own count covers the whole connection.
        let counts: Vec<u64> = nginx.requests_per_connection()?.into_values().collect();
        assert_eq!(counts, vec![BEFORE + AFTER]);
        Ok(())
    }
);

kernel_test!(
    /// The target: 10,000 connections that predate the agent, both ends adopted at their next
    /// send or receive (20,000 sockets). Prints the agent's start-up time and how long adopting
    /// all took.
    fn ten_thousand_existing_connections_are_adopted() -> anyhow::Result<()> {
        let _serial = serial::exclusive();
        const CONNECTIONS: usize = 10_000;
        let mut connections = ExistingConnections::open(CONNECTIONS, "127.0.0.79")?;
        let server = connections.server.clone();
        let started = Instant::now();
        let agent = Agent::start(&[])?;
        let ready = started.elapsed();
        let adopting = Instant::now();
        connections.first_exchange()?;
        let adopted = |s: &Scrape| {
            s.sum("connscope_connections_adopted_total", &[("server", server.as_str())])
        };
        let all = 2.0 * CONNECTIONS as f64;
        let scrape = agent.scrape_until(Duration::from_secs(30), |s| adopted(s) >= all)?;
        let adoption = adopting.elapsed();
        eprintln!(
            "adoption of {CONNECTIONS} existing connections: agent ready in {:.3} s, both ends of all adopted {:.3} s after the first send",
            ready.as_secs_f64(),
            adoption.as_secs_f64()
        );
        assert_eq!(adopted(&scrape), all, "{}", scrape.text);
        for (role, process) in [("client", own_process_label()), ("server", "python3".to_owned())] {
            let labels =
                [("role", role), ("server", server.as_str()), ("process", process.as_str())];
            assert_eq!(
                scrape.sum("connscope_connections_adopted_total", &labels),
                CONNECTIONS as f64,
                "{role}"
            );
        }
        Ok(())
    }
);
