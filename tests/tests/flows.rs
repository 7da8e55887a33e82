//! `connscope flows` against a real agent watching known traffic on real sockets: the printed
//! requests per connection, close sides and TIME_WAIT sockets equal what the test did, and
//! `--output json` parses.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use connscope_tests::{
    Agent, agent_binary,
    http_server::{self, ServerBehaviour},
    kernel_test, own_process_label,
};
use serde_json::Value;

/// Requests per connection; the server advertises this as `Keep-Alive: max` and closes first.
const REQUESTS: u32 = 3;

fn flows(agent: &Agent, args: &[&str]) -> anyhow::Result<Output> {
    let url = format!("http://{}", agent.address);
    Ok(Command::new(agent_binary()).args(["flows", "--url", &url]).args(args).output()?)
}

/// One connection carrying `REQUESTS` requests; the server closes it after the last one.
fn connection(server: SocketAddr) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(server)?;
    for index in 1..=REQUESTS {
        let closing = http_server::request(&mut stream, "1.1", "")?;
        if closing != (index == REQUESTS) {
            bail!("request {index}: unexpected Connection: close = {closing}");
        }
    }
    // Wait for the server's FIN so the server is the side that closed first.
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut stream, &mut rest)?;
    Ok(())
}

/// An agent and a server that closes each of its `connections` after `REQUESTS` requests.
fn agent_and_server(
    connections: usize,
) -> anyhow::Result<(Agent, SocketAddr, std::thread::JoinHandle<anyhow::Result<()>>)> {
    let agent = Agent::start(&[])?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let server = listener.local_addr()?;
    let behaviour = ServerBehaviour { max_requests: Some(REQUESTS), ..Default::default() };
    Ok((agent, server, http_server::serve(listener, connections, behaviour)))
}

fn flow<'a>(json: &'a Value, role: &str, process: &str, server: &str) -> anyhow::Result<&'a Value> {
    json["flows"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|row| row["role"] == role && row["process"] == process && row["server"] == server)
        .with_context(|| format!("no {role}/{process}/{server} flow in {json}"))
}

kernel_test!(
    fn flows_shows_requests_per_connection_and_close_sides() -> anyhow::Result<()> {
        const CONNECTIONS: usize = 8;
        let (agent, server, serving) = agent_and_server(CONNECTIONS)?;
        for _ in 0..CONNECTIONS {
            connection(server)?;
        }
        connscope_tests::net::join(serving)?;
        let server_label = server.to_string();
        let closed = CONNECTIONS as f64 * 2.0;
        let labels = [("server", server_label.as_str())];
        agent.scrape_until(Duration::from_secs(10), |scrape| {
            scrape.sum("connscope_connection_requests_count", &labels) >= closed
        })?;
        // The server closed first, so its sockets wait in TIME_WAIT (60 s): counted by the
        // agent's socket census, every 5 s or more.
        let served_labels = [("server", server_label.as_str()), ("role", "server")];
        agent.scrape_until(Duration::from_secs(30), |scrape| {
            scrape.sum("connscope_connections_time_wait", &served_labels) >= CONNECTIONS as f64
        })?;

        let output = flows(&agent, &["--interval", "0", "--output", "json"])?;
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let json: Value = serde_json::from_slice(&output.stdout).context("--output json parses")?;
        assert_eq!(json["interval_seconds"], Value::Null);
        let client = flow(&json, "client", &own_process_label(), &server_label)?;
        let served = flow(&json, "server", "cs-http-server", &server_label)?;
        for row in [client, served] {
            assert_eq!(row["opened"], CONNECTIONS as f64, "{row}");
            assert_eq!(row["requests_per_connection"], f64::from(REQUESTS), "{row}");
            assert_eq!(row["one_request_share"], 0.0, "{row}");
            assert_eq!(row["races"], 0.0, "{row}");
        }
        // The server holds the TIME_WAIT sockets; the client no port once its sockets closed.
        assert_eq!(served["time_wait"], CONNECTIONS as f64, "{served}");
        assert_eq!(client["time_wait"], 0.0, "{client}");
        assert_eq!(client["ports_in_use"].as_f64().unwrap_or(0.0), 0.0, "{client}");
        assert_eq!(served["ports_in_use"], Value::Null, "{served}");
        // The server closes first: "local" on its side, "peer" on the client's.
        assert_eq!(
            client["closes"],
            serde_json::json!({"peer": {"max_requests": CONNECTIONS as f64}})
        );
        assert_eq!(
            served["closes"],
            serde_json::json!({"local": {"max_requests": CONNECTIONS as f64}})
        );

        let output = flows(&agent, &["--interval", "0"])?;
        let table = String::from_utf8_lossy(&output.stdout);
        let line = table
            .lines()
            .find(|line| line.starts_with("client") && line.contains(&server_label))
            .with_context(|| format!("no client row in:\n{table}"))?;
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[3..6], [CONNECTIONS.to_string().as_str(), "3.00", "0%"], "{table}");
        assert!(line.contains(&format!("peer: max_requests={CONNECTIONS}")), "{table}");
        let served_line = table
            .lines()
            .find(|line| line.starts_with("server") && line.contains(&server_label))
            .with_context(|| format!("no server row in:\n{table}"))?;
        // `… RACES TIME_WAIT PORTS TLS`: 0 races, the TIME_WAIT sockets, no ports, no TLS.
        let cells: Vec<&str> = served_line.split_whitespace().rev().take(4).collect();
        assert_eq!(cells, ["-", "-", CONNECTIONS.to_string().as_str(), "0"], "{table}");
        Ok(())
    }
);

kernel_test!(
    fn flows_rates_come_from_two_scrapes() -> anyhow::Result<()> {
        const MAX_CONNECTIONS: usize = 300;
        // The server thread is left waiting for connections that never come when the test ends.
        let (agent, server, _serving) = agent_and_server(MAX_CONNECTIONS)?;
        let url = format!("http://{}", agent.address);
        let mut child = Command::new(agent_binary())
            .args(["flows", "--url", &url, "--interval", "2", "--output", "json"])
            .stdout(Stdio::piped())
            .spawn()?;
        // Steady traffic through the whole interval: every connection the same, so the ratios
        // over any window are exact.
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut made = 0;
        while child.try_wait()?.is_none() && made < MAX_CONNECTIONS && Instant::now() < deadline {
            connection(server)?;
            made += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        let output = child.wait_with_output()?;
        assert!(output.status.success());
        let json: Value = serde_json::from_slice(&output.stdout)?;
        let interval = json["interval_seconds"].as_f64().unwrap_or(0.0);
        assert!((2.0..4.0).contains(&interval), "{json}");
        let client = flow(&json, "client", &own_process_label(), &server.to_string())?;
        let rate = client["opened_per_second"].as_f64().unwrap_or(0.0);
        assert!(
            rate > 5.0 && rate * interval <= made as f64,
            "{rate}/s over {interval} s, {made} made"
        );
        assert_eq!(client["requests_per_connection"], f64::from(REQUESTS), "{client}");

        // --watch: one JSON document per refresh, each over the last N seconds.
        let mut watching = Command::new(agent_binary())
            .args(["flows", "--url", &url, "--watch", "1", "--output", "json"])
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = watching.stdout.take().context("no stdout")?;
        let documents: Vec<Value> = std::io::BufRead::lines(std::io::BufReader::new(stdout))
            .take(2)
            .map(|line| Ok(serde_json::from_str(&line?)?))
            .collect::<anyhow::Result<_>>()?;
        watching.kill()?;
        watching.wait()?;
        assert_eq!(documents.len(), 2);
        for document in &documents {
            let interval = document["interval_seconds"].as_f64().unwrap_or(0.0);
            assert!((1.0..3.0).contains(&interval), "{document}");
        }
        Ok(())
    }
);
