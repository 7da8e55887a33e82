//! Connections established before the agent started: adopted at their first send or
//! receive, with the right role, server, process and close, and counted as adopted (not
//! opened, and outside the lifetime and requests-per-connection histograms).
//!
//! Host tier only (not `kernel_*`, so not in `cargo xtask vm-test`): they drive nginx and
//! thousands of sockets, which the VM's initramfs does not carry.

use std::{
    io::Write as _,
    net::{TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use connscope_tests::{
    Agent, Scrape, free_port, http_server, kernel_tests_enabled, net,
    nginx::{Nginx, NginxConfig},
    own_process_label,
};

const WAIT: Duration = Duration::from_secs(5);
/// Requests made before the agent starts, and after.
const BEFORE: u64 = 5;
const AFTER: u64 = 20;

fn flow<'a>(role: &'a str, server: &'a str, process: &'a str) -> [(&'a str, &'a str); 3] {
    [("role", role), ("server", server), ("process", process)]
}

/// What both ends of one adopted connection must report: `AFTER` requests, adopted once,
/// never opened, closed once by the client with a FIN while idle, and no histogram sample.
fn assert_adopted_pair(scrape: &Scrape, server: &str, client_process: &str, server_process: &str) {
    for (role, process, closed_by) in
        [("client", client_process, "local"), ("server", server_process, "peer")]
    {
        let labels = flow(role, server, process);
        let context = format!("{role} {process}\n{}", scrape.text);
        assert_eq!(
            scrape.sum("connscope_connections_adopted_total", &labels),
            1.0,
            "adopted {context}"
        );
        assert_eq!(scrape.sum("connscope_connections_opened_total", &labels), 0.0, "{context}");
        assert_eq!(
            scrape.sum("connscope_http_requests_total", &labels),
            AFTER as f64,
            "requests {context}"
        );
        let closed = [
            ("role", role),
            ("server", server),
            ("process", process),
            ("closed_by", closed_by),
            ("close_kind", "fin"),
            ("reason", "idle"),
        ];
        assert_eq!(scrape.sum("connscope_connections_closed_total", &closed), 1.0, "{context}");
        assert_eq!(
            scrape.sum("connscope_connections_closed_total", &[("server", server)]),
            2.0,
            "{context}"
        );
        // Partial figures stay out of the histograms users read as exact.
        for histogram in
            ["connscope_connection_duration_seconds_count", "connscope_connection_requests_count"]
        {
            assert_eq!(scrape.sum(histogram, &[("server", server)]), 0.0, "{histogram} {context}");
        }
    }
}

fn both_closed(server: &str) -> impl Fn(&Scrape) -> bool + '_ {
    move |s| s.sum("connscope_connections_closed_total", &[("server", server)]) >= 2.0
}

#[test]
fn nginx_connection_opened_before_the_agent_is_adopted() -> anyhow::Result<()> {
    if !kernel_tests_enabled("nginx_connection_opened_before_the_agent_is_adopted") {
        return Ok(());
    }
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
        http_server::request(&mut client, "1.1", "")?;
    }

    let agent = Agent::start(&[])?;
    for _ in 0..AFTER {
        http_server::request(&mut client, "1.1", "")?;
    }
    drop(client);
    let scrape = agent.scrape_until(WAIT, both_closed(&server))?;
    assert_adopted_pair(&scrape, &server, &own_process_label(), "nginx");
    // nginx's own count covers the whole connection.
    let counts: Vec<u64> = nginx.requests_per_connection()?.into_values().collect();
    assert_eq!(counts, vec![BEFORE + AFTER]);
    Ok(())
}

/// A process that lives in the namespace, as a pod's pause container does: the agent reads
/// the namespace's listening ports through it.
struct NamespaceHolder(Child);

impl NamespaceHolder {
    fn start(ns: &net::NetNs) -> anyhow::Result<Self> {
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "sleep", "120"])
            .stdin(Stdio::null())
            .spawn()?;
        // Until `sleep` runs inside the namespace.
        let deadline = Instant::now() + WAIT;
        let holder = Self(child);
        while !holder.in_namespace()? {
            anyhow::ensure!(Instant::now() < deadline, "the namespace holder did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(holder)
    }

    fn in_namespace(&self) -> anyhow::Result<bool> {
        let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", self.0.id()))?;
        Ok(comm.trim() == "sleep" && ns(&self.0.id().to_string()) != ns("self"))
    }
}

impl Drop for NamespaceHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn connection_in_a_network_namespace_opened_before_the_agent_is_adopted() -> anyhow::Result<()> {
    if !kernel_tests_enabled("connection_in_a_network_namespace_opened_before_the_agent_is_adopted")
    {
        return Ok(());
    }
    let ns = net::NetNs::create("adoption")?;
    let _holder = NamespaceHolder::start(&ns)?;
    // The listener, its server thread and the client socket all live in the namespace;
    // the sockets stay there after the thread that made them returns.
    let (server, server_thread, mut client) = ns.run(|| {
        let listener = TcpListener::bind("127.0.0.78:0")?;
        let server = listener.local_addr()?.to_string();
        let thread = http_server::serve(listener, 1, http_server::ServerBehaviour::default());
        let mut client = TcpStream::connect(&server)?;
        for _ in 0..BEFORE {
            http_server::request(&mut client, "1.1", "")?;
        }
        anyhow::Ok((server, thread, client))
    })??;

    let agent = Agent::start(&[])?;
    for _ in 0..AFTER {
        http_server::request(&mut client, "1.1", "")?;
    }
    drop(client);
    net::join(server_thread)?;
    let scrape = agent.scrape_until(WAIT, both_closed(&server))?;
    assert_adopted_pair(&scrape, &server, &own_process_label(), "cs-http-server");
    for reason in ["process_vanished", "unreadable", "unparsable"] {
        let labels = [("reason", reason)];
        let series = scrape.matching("connscope_adoption_skipped_total", &labels).count();
        assert_eq!(series, 1, "{reason}");
    }
    Ok(())
}

/// Holds the accepted ends of `CONNECTIONS` connections in a process of its own (the fd
/// limit of one process cannot hold both ends), and reads one byte from each on request.
const HOLDER: &str = r#"
import socket, sys
listener = socket.socket()
listener.bind(("127.0.0.79", 0))
listener.listen(4096)
print(listener.getsockname()[1], flush=True)
accepted = [listener.accept()[0] for _ in range(int(sys.argv[1]))]
print("accepted", flush=True)
sys.stdin.readline()
for conn in accepted:
    conn.recv(1)
print("read", flush=True)
sys.stdin.readline()
"#;

/// The target: 10,000 connections that predate the agent, both ends adopted at their next
/// send or receive (20,000 sockets). Prints the agent's start-up time and how long adopting
/// all took.
#[test]
fn ten_thousand_existing_connections_are_adopted() -> anyhow::Result<()> {
    if !kernel_tests_enabled("ten_thousand_existing_connections_are_adopted") {
        return Ok(());
    }
    const CONNECTIONS: usize = 10_000;
    let mut holder = Command::new("python3")
        .args(["-c", HOLDER, &CONNECTIONS.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let (Some(mut to_holder), Some(from_holder)) = (holder.stdin.take(), holder.stdout.take())
    else {
        anyhow::bail!("no pipes to the holder");
    };
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(from_holder));
    let mut next_line = move || lines.next().transpose().map(Option::unwrap_or_default);
    let server = format!("127.0.0.79:{}", next_line()?);
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        clients.push(TcpStream::connect(&server)?);
    }
    anyhow::ensure!(next_line()? == "accepted", "the holder did not accept");

    let started = Instant::now();
    let agent = Agent::start(&[])?;
    let ready = started.elapsed();
    let adopting = Instant::now();
    for client in &mut clients {
        client.write_all(b"x")?;
    }
    writeln!(to_holder)?;
    anyhow::ensure!(next_line()? == "read", "the holder did not read");
    let adopted =
        |s: &Scrape| s.sum("connscope_connections_adopted_total", &[("server", server.as_str())]);
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
        let labels = flow(role, &server, &process);
        assert_eq!(
            scrape.sum("connscope_connections_adopted_total", &labels),
            CONNECTIONS as f64,
            "{role}"
        );
    }
    drop(to_holder);
    holder.wait()?;
    Ok(())
}
