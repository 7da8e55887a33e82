//! Ground truth from a real nginx: its access log (`$connection $connection_requests`) must
//! agree exactly with what connscope measured, for real clients: curl with several URLs,
//! Python's http.client, wrk (bounded), and an HTTP/1.0 client.

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    time::Duration,
};

use connscope_tests::{
    Agent, Scrape, free_port, kernel_test,
    nginx::{Nginx, NginxConfig},
};

const KEEPALIVE_REQUESTS: u32 = 5;
const REQUEST_BUCKETS: [f64; 11] =
    [1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];
/// wrk may open a last connection as its run ends and close it unused: nginx logs only
/// connections that carried a request, connscope counts it in the `le="0.0"` bucket.
const UNUSED_ALLOWED: f64 = 4.0;

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(program).args(args).stdout(Stdio::null()).status()?;
    anyhow::ensure!(status.success(), "{program} {args:?}: {status}");
    Ok(())
}

fn le_label(bound: f64) -> String {
    format!("{bound:.1}")
}

kernel_test!(
    fn connscope_agrees_with_nginx_access_log() -> anyhow::Result<()> {
        // nginx first: its readiness probe connection is not part of the comparison.
        let nginx = Nginx::start(NginxConfig {
            port: free_port(),
            keepalive_timeout: Duration::from_millis(800),
            keepalive_requests: KEEPALIVE_REQUESTS,
            workers: 1,
            advertise_keep_alive: false,
        })?;
        let agent = Agent::start(&[])?;
        let server = nginx.server();

        // curl, several URLs on one command line: one connection, three requests.
        let (a, b, c) = (nginx.url("/"), nginx.url("/index.html"), nginx.url("/big.bin"));
        run("curl", &["-s", "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null", &a, &b, &c])?;
        // HTTP/1.0: one request per connection.
        for _ in 0..3 {
            run("curl", &["-s", "-0", "-o", "/dev/null", &a])?;
        }
        // Python's http.client: 7 requests; nginx ends the connection after 5 and the client
        // reconnects on its own.
        let script = format!(
            "import http.client\nc = http.client.HTTPConnection('127.0.0.1', {})\n\
         for _ in range(7):\n    c.request('GET', '/')\n    c.getresponse().read()\nc.close()\n",
            nginx.port
        );
        run("python3", &["-c", &script])?;
        // wrk: bounded in time and connections.
        run("wrk", &["-t1", "-c2", "-d1s", &a])?;
        // Idle keep-alive connections end with nginx's timeout.
        std::thread::sleep(Duration::from_millis(1500));

        let truth = nginx.requests_per_connection()?;
        let connections = truth.len() as f64;
        let requests: u64 = truth.values().sum();
        let scrape = agent.scrape_until(Duration::from_secs(10), |s| {
            s.sum("connscope_connection_requests_count", &[("server", &server), ("role", "server")])
                >= connections
                && s.sum(
                    "connscope_connection_requests_count",
                    &[("server", &server), ("role", "client")],
                ) >= connections
        })?;
        eprintln!("nginx: {} connections, {requests} requests", truth.len());
        assert!(truth.len() >= 8 && requests >= 20, "too little traffic to compare: {truth:?}");

        // Sockets older than the agent (untracked_socket) are not this traffic; nothing else may be lost.
        for reason in [
            "ringbuf_full",
            "map_full",
            "decode_error",
            "payload_unreadable",
            "startup_backlog_full",
        ] {
            assert_eq!(
                scrape.sum("connscope_events_lost_total", &[("reason", reason)]),
                0.0,
                "{reason}: {}",
                scrape.text
            );
        }
        for role in ["server", "client"] {
            let labels = [("server", server.as_str()), ("role", role)];
            let unused = bucket(&scrape, &server, role, "0.0");
            assert!(unused <= UNUSED_ALLOWED, "{role}: {unused} connections without a request");
            assert_eq!(
                scrape.sum("connscope_connections_opened_total", &labels),
                connections + unused,
                "{role} connections"
            );
            assert_eq!(
                scrape.sum("connscope_connection_requests_count", &labels),
                connections + unused,
                "{role} closes"
            );
            assert_eq!(
                scrape.sum("connscope_connection_requests_sum", &labels),
                requests as f64,
                "{role} requests"
            );
            assert_eq!(
                scrape.sum("connscope_http_requests_total", &labels),
                requests as f64,
                "{role} HTTP requests"
            );
            let measured: Vec<(String, f64)> = distribution(&scrape, &server, role)
                .into_iter()
                .map(|(le, n)| (le, n - unused))
                .collect();
            assert_eq!(measured, expected_distribution(&truth), "{role} requests per connection");
        }
        // Who closed: every server-side close matches the client side's view.
        let closed = |role: &str, by: &str| {
            scrape.sum(
                "connscope_connections_closed_total",
                &[("server", &server), ("role", role), ("closed_by", by)],
            )
        };
        // A side says `peer` only when the other sent the first FIN. When nginx answers
        // `Connection: close` and the client closes at once, the FINs cross (simultaneous close)
        // and both sides truly closed first: both say `local`. Nobody is left `unknown`.
        assert!(closed("server", "peer") <= closed("client", "local"), "{}", scrape.text);
        assert!(closed("client", "peer") <= closed("server", "local"));
        assert_eq!(closed("server", "unknown") + closed("client", "unknown"), 0.0);
        assert_eq!(
            closed("server", "local") + closed("server", "peer"),
            connections + bucket(&scrape, &server, "server", "0.0")
        );
        // nginx ends every connection that reached keepalive_requests with Connection: close,
        // and every HTTP/1.0 one after its response.
        let at_limit =
            truth.values().filter(|&&n| n == u64::from(KEEPALIVE_REQUESTS)).count() as f64;
        let reason = |reason: &str| {
            scrape.sum(
                "connscope_connections_closed_total",
                &[("server", &server), ("role", "server"), ("reason", reason)],
            )
        };
        assert_eq!(reason("connection_close"), at_limit, "{}", scrape.text);
        assert_eq!(reason("http10"), 3.0);
        assert_eq!(
            scrape.sum(
                "connscope_http_requests_total",
                &[("server", &server), ("role", "client"), ("http_version", "1.0")]
            ),
            3.0
        );
        Ok(())
    }
);

fn bucket(scrape: &Scrape, server: &str, role: &str, le: &str) -> f64 {
    scrape.sum(
        "connscope_connection_requests_bucket",
        &[("server", server), ("role", role), ("le", le)],
    )
}

/// Cumulative bucket counts of connscope's requests-per-connection histogram.
fn distribution(scrape: &Scrape, server: &str, role: &str) -> Vec<(String, f64)> {
    REQUEST_BUCKETS
        .iter()
        .map(|&bound| {
            let le = le_label(bound);
            let count = bucket(scrape, server, role, &le);
            (le, count)
        })
        .collect()
}

/// The same buckets computed from nginx's log.
fn expected_distribution(truth: &BTreeMap<u64, u64>) -> Vec<(String, f64)> {
    REQUEST_BUCKETS
        .iter()
        .map(|&bound| {
            (le_label(bound), truth.values().filter(|&&n| n as f64 <= bound).count() as f64)
        })
        .collect()
}
