//! `/metrics` latency with the default label caps filled (100 servers x 10 processes).

use std::{
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

use anyhow::ensure;
use connscope_tests::{Scrape, free_port, http_get, net};
use serde_json::json;

use super::{
    median,
    report::{Figure, Part, Target},
    round,
};

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
    let child = Command::new(connscope_tests::agent_binary())
        .args(["--web.listen-address", &address.to_string()])
        .env("CONNSCOPE_LOG_LEVEL", "warn")
        // The arms after this one must run without its programs: nothing stays pinned.
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

pub fn metrics_latency() -> anyhow::Result<Part> {
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
    // The agent keeps a gzipped body once a scraper has asked for one (from its next
    // background encode on), as Prometheus does at every scrape.
    gzip_scrape(agent.address)?;
    thread::sleep(Duration::from_secs(3));
    let mut gzip_timings = Vec::new();
    let mut gzip_len = 0;
    for _ in 0..30 {
        let (ms, len, gzipped) = gzip_scrape(agent.address)?;
        ensure!(gzipped, "/metrics did not answer gzip to a scraper that asks for it");
        gzip_timings.push(ms);
        gzip_len = len;
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
    let gzip_p50 = median(&gzip_timings);
    let gzip_max = gzip_timings.iter().copied().fold(0.0, f64::max);
    let details = json!({
        "servers": SERVERS,
        "processes": PROCESSES,
        "server_label_values": servers_seen,
        "samples": series,
        "body_bytes": body_len,
        "latency_ms_median": round(p50, 2),
        "latency_ms_max": round(max, 2),
        "gzip_body_bytes": gzip_len,
        "gzip_latency_ms_median": round(gzip_p50, 2),
        "gzip_latency_ms_max": round(gzip_max, 2),
    });
    let figures = vec![
        Figure::new(
            "/metrics at full caps, as Prometheus scrapes (gzip)",
            gzip_p50,
            format!(
                "{gzip_p50:.1} ms median, {gzip_max:.1} ms max ({series} samples, {} KiB)",
                gzip_len / 1024
            ),
            Target::AtMost(10.0),
        ),
        Figure::new(
            "/metrics at full caps, uncompressed (read into a String and parsed)",
            p50,
            format!("{p50:.1} ms median, {max:.1} ms max ({} MiB)", body_len >> 20),
            Target::None,
        ),
    ];
    Ok(Part { key: "metrics_endpoint", details, figures })
}

/// One scrape the way Prometheus asks for it (`Accept-Encoding: gzip`), timed from connect
/// to the last byte: (milliseconds, response bytes, whether it came gzipped).
fn gzip_scrape(address: SocketAddr) -> anyhow::Result<(f64, usize, bool)> {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {address}\r\nAccept-Encoding: gzip\r\n\r\n")?;
    let mut response = Vec::with_capacity(4 << 20);
    stream.read_to_end(&mut response)?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let head_end = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0);
    let head = String::from_utf8_lossy(&response[..head_end]).to_ascii_lowercase();
    ensure!(
        head.starts_with("http/1.1 200") || head.starts_with("http/1.0 200"),
        "gzip /metrics: {head:.60}"
    );
    Ok((ms, response.len(), head.contains("content-encoding: gzip")))
}
