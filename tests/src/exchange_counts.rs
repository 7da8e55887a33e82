//! Shared checks of the protocol tests (`kernel_protocols`, `e2e_protocols`): exact
//! exchange counts per side of one server, and requests-per-connection distributions.

use std::{collections::BTreeMap, net::TcpListener, thread, time::Duration};

use crate::{Agent, Scrape};

pub const WAIT: Duration = Duration::from_secs(10);
pub const ROLES: [&str; 2] = ["client", "server"];
/// Every value the `protocol` label may take.
pub const PROTOCOLS: [&str; 5] = ["http1", "http2", "tls", "websocket", "other"];
const REQUEST_BUCKETS: [f64; 11] =
    [1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

pub fn bind_loopback() -> anyhow::Result<(TcpListener, String)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let server = listener.local_addr()?.to_string();
    Ok((listener, server))
}

fn closes(scrape: &Scrape, server: &str) -> f64 {
    scrape.sum("connscope_connections_closed_total", &[("server", server)])
}

/// Waits until both ends of `connections` connections to `server` were closed.
pub fn scrape_closed(agent: &Agent, server: &str, connections: f64) -> anyhow::Result<Scrape> {
    agent.scrape_until(WAIT, |s| closes(s, server) >= 2.0 * connections)
}

pub fn side<'a>(server: &'a str, role: &'a str) -> [(&'a str, &'a str); 2] {
    [("server", server), ("role", role)]
}

/// Per role: connections observed in `connscope_connection_requests`, the requests they
/// carried, HTTP requests and idle gaps.
pub fn assert_counts(
    scrape: &Scrape,
    server: &str,
    protocol: &str,
    connections: f64,
    requests: f64,
    http_requests: f64,
) {
    for role in ROLES {
        let labels = side(server, role);
        let with_protocol = [labels[0], labels[1], ("protocol", protocol)];
        let observed = scrape.sum("connscope_connection_requests_count", &labels);
        assert_eq!(
            scrape.sum("connscope_connection_requests_count", &with_protocol),
            connections,
            "{role}: connections with protocol {protocol} (all protocols: {observed}): {}",
            scrape.text
        );
        assert_eq!(observed, connections, "{role}: connections of other protocols");
        assert_eq!(
            scrape.sum("connscope_connection_requests_sum", &with_protocol),
            requests,
            "{role}: requests per connection: {}",
            scrape.text
        );
        assert_eq!(
            scrape.sum("connscope_http_requests_total", &labels),
            http_requests,
            "{role}: HTTP requests"
        );
        assert_eq!(
            scrape.sum("connscope_connection_idle_seconds_count", &labels),
            requests - connections,
            "{role}: idle gaps between requests"
        );
    }
}

pub fn join_counted(handle: thread::JoinHandle<anyhow::Result<u64>>) -> anyhow::Result<u64> {
    handle.join().map_err(|_| anyhow::anyhow!("server thread panicked"))?
}

fn bucket_label(bound: f64) -> String {
    format!("{bound:.1}")
}

/// Cumulative bucket counts of connscope's requests-per-connection histogram.
pub fn distribution(scrape: &Scrape, server: &str, role: &str) -> Vec<(String, f64)> {
    REQUEST_BUCKETS
        .iter()
        .map(|&bound| {
            let le = bucket_label(bound);
            let labels = [("server", server), ("role", role), ("le", le.as_str())];
            (le.clone(), scrape.sum("connscope_connection_requests_bucket", &labels))
        })
        .collect()
}

/// The same buckets from nginx's log.
pub fn expected_distribution(truth: &BTreeMap<u64, u64>) -> Vec<(String, f64)> {
    REQUEST_BUCKETS
        .iter()
        .map(|&bound| {
            let within = truth.values().filter(|&&n| n as f64 <= bound).count();
            (bucket_label(bound), within as f64)
        })
        .collect()
}
