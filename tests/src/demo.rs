//! Demo traffic: local nginx servers and clients with contrasting keep-alive behaviour, so
//! every connscope metric moves within a minute. Used by `cargo xtask demo` and by the
//! real-Prometheus dashboard test. Loopback only; every loop stops with the demo.
//!
//! Each client runs on a thread named after its behaviour; the agent labels connections
//! with the thread's name (`comm`), so the flows are easy to tell apart.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::TcpStream,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::{
    free_port, net,
    nginx::{Nginx, NginxConfig},
};

/// A running demo; stops its clients and servers when dropped.
pub struct Demo {
    stop: Arc<AtomicBool>,
    clients: Vec<JoinHandle<()>>,
    servers: Vec<Nginx>,
}

/// The servers of the demo, by role.
pub struct DemoServers {
    /// Keep-alive 30 s, 1000 requests per connection: well-behaved.
    pub steady: String,
    /// Keep-alive 1 s: shorter than the "racer" client's pool idle time.
    pub short_timeout: String,
    /// 3 requests per connection.
    pub limited: String,
    /// A loopback port nothing listens on: every connect to it is refused.
    pub closed: String,
    /// HTTP/2 in cleartext (nginx `listen … http2`), idle timeout 1 s.
    pub h2c: String,
}

impl Demo {
    pub fn start(until: Duration) -> anyhow::Result<(Self, DemoServers)> {
        let nginx = |timeout: Duration, requests: u32| {
            Nginx::start(NginxConfig {
                port: free_port(),
                keepalive_timeout: timeout,
                keepalive_requests: requests,
                workers: 1,
                advertise_keep_alive: true,
            })
        };
        let steady = nginx(Duration::from_secs(30), 1000)?;
        let short = nginx(Duration::from_secs(1), 1000)?;
        let limited = nginx(Duration::from_secs(30), 3)?;
        let h2c_port = free_port();
        let h2c = Nginx::start_with(
            NginxConfig {
                port: free_port(),
                keepalive_timeout: Duration::from_secs(30),
                keepalive_requests: 1000,
                workers: 1,
                advertise_keep_alive: false,
            },
            &format!(
                "server {{ listen 127.0.0.1:{h2c_port} http2; keepalive_timeout 1s; root html; }}\n"
            ),
        )?;
        let servers = DemoServers {
            steady: steady.server(),
            short_timeout: short.server(),
            limited: limited.server(),
            closed: format!("127.0.0.1:{}", free_port()),
            h2c: format!("127.0.0.1:{h2c_port}"),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + until;
        let mut clients = Vec::new();
        let mut spawn =
            |name: &str, server: &str, behaviour: fn(&str, &Running)| -> anyhow::Result<()> {
                let running = Running { stop: stop.clone(), deadline };
                let server = server.to_owned();
                clients.push(
                    thread::Builder::new()
                        .name(name.into())
                        .spawn(move || behaviour(&server, &running))?,
                );
                Ok(())
            };
        spawn("demo-pooled", &servers.steady, pooled)?;
        spawn("demo-oneshot", &servers.steady, one_request_per_connection)?;
        spawn("demo-http10", &servers.steady, http10)?;
        spawn("demo-racer", &servers.short_timeout, racer)?;
        spawn("demo-idler", &servers.short_timeout, idler)?;
        spawn("demo-burst", &servers.limited, burst)?;
        spawn("demo-aborter", &servers.steady, aborter)?;
        spawn("demo-refused", &servers.closed, refused)?;
        spawn("demo-h2c", &servers.h2c, http2_streams)?;
        Ok((Self { stop, clients, servers: vec![steady, short, limited, h2c] }, servers))
    }

    /// Waits for the clients to reach the deadline given to `start`.
    pub fn wait(mut self) {
        for client in self.clients.drain(..) {
            let _ = client.join();
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients.drain(..) {
            let _ = client.join();
        }
        self.servers.clear();
    }
}

struct Running {
    stop: Arc<AtomicBool>,
    deadline: Instant,
}

impl Running {
    fn on(&self) -> bool {
        !self.stop.load(Ordering::Relaxed) && Instant::now() < self.deadline
    }

    /// Sleeps up to `duration`, waking early when the demo stops.
    fn pause(&self, duration: Duration) {
        let until = Instant::now() + duration;
        while self.on() && Instant::now() < until {
            thread::sleep(
                Duration::from_millis(20).min(until.saturating_duration_since(Instant::now())),
            );
        }
    }
}

/// Sends one GET and reads the whole response; `Ok(true)` when the server closes after it.
fn get(stream: &mut TcpStream, version: &str, extra: &str) -> std::io::Result<bool> {
    stream.write_all(format!("GET / HTTP/{version}\r\nHost: demo\r\n{extra}\r\n").as_bytes())?;
    let mut response = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if response.len() >= end + 4 + length {
                return Ok(head.contains("connection: close"));
            }
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        response.extend_from_slice(&buf[..n]);
    }
}

fn connect(server: &str) -> Option<TcpStream> {
    let stream = TcpStream::connect(server).ok()?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    Some(stream)
}

/// Good reuse: one connection, a request every 50 ms, renewed every 40 requests.
fn pooled(server: &str, running: &Running) {
    while running.on() {
        let Some(mut stream) = connect(server) else {
            return running.pause(Duration::from_millis(200));
        };
        for _ in 0..40 {
            if !running.on() || get(&mut stream, "1.1", "").is_err() {
                break;
            }
            running.pause(Duration::from_millis(50));
        }
    }
}

/// No reuse: `Connection: close` on every request.
fn one_request_per_connection(server: &str, running: &Running) {
    while running.on() {
        if let Some(mut stream) = connect(server) {
            let _ = get(&mut stream, "1.1", "Connection: close\r\n");
        }
        running.pause(Duration::from_millis(100));
    }
}

/// An HTTP/1.0 client: the server closes after each response.
fn http10(server: &str, running: &Running) {
    while running.on() {
        if let Some(mut stream) = connect(server) {
            let _ = get(&mut stream, "1.0", "");
        }
        running.pause(Duration::from_millis(400));
    }
}

/// A pool whose idle time (1.2 s) outlives the server's keep-alive timeout (1 s): the reused
/// connection was closed by the server and the request is answered with a reset.
fn racer(server: &str, running: &Running) {
    while running.on() {
        let Some(mut stream) = connect(server) else {
            return running.pause(Duration::from_millis(200));
        };
        while running.on() && get(&mut stream, "1.1", "").is_ok() {
            running.pause(Duration::from_millis(1200));
        }
    }
}

/// A client that goes quiet until the server's idle timeout closes the connection.
fn idler(server: &str, running: &Running) {
    while running.on() {
        let Some(mut stream) = connect(server) else {
            return running.pause(Duration::from_millis(200));
        };
        let _ = get(&mut stream, "1.1", "");
        let _ = get(&mut stream, "1.1", "");
        // Wait for the server's FIN, then close our side.
        let mut sink = [0u8; 64];
        let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
        let _ = stream.read(&mut sink);
        running.pause(Duration::from_millis(100));
    }
}

/// Back-to-back requests until the server's request limit ends the connection.
fn burst(server: &str, running: &Running) {
    while running.on() {
        let Some(mut stream) = connect(server) else {
            return running.pause(Duration::from_millis(200));
        };
        while running.on() {
            match get(&mut stream, "1.1", "") {
                Ok(false) => {}
                Ok(true) | Err(_) => break,
            }
        }
        running.pause(Duration::from_millis(200));
    }
}

/// A client that aborts its connection with a reset after each response, as health
/// checkers and clients giving up on a timeout do.
fn aborter(server: &str, running: &Running) {
    while running.on() {
        if let Some(mut stream) = connect(server)
            && get(&mut stream, "1.1", "").is_ok()
        {
            let _ = net::set_linger_zero(&stream);
        }
        running.pause(Duration::from_millis(300));
    }
}

/// A client of a server that is down: its connects are refused (a reset answers the SYN).
fn refused(server: &str, running: &Running) {
    while running.on() {
        let _ = connect(server);
        running.pause(Duration::from_millis(500));
    }
}

/// HTTP/2 in cleartext: a connection opens streams three at a time (multiplexed), a few
/// batches, then idles until nginx's 1 s idle timeout closes it with `GOAWAY`.
fn http2_streams(server: &str, running: &Running) {
    use crate::http2::{PREFACE, frame_header};
    // `GET /` (HPACK static table) with `:authority`.
    let block = [&[0x82u8, 0x86, 0x84, 0x41, 9][..], b"127.0.0.1"].concat();
    while running.on() {
        let Ok(mut stream) = TcpStream::connect(server) else {
            running.pause(Duration::from_millis(200));
            continue;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
        let mut flight = [PREFACE, &frame_header(0, 0x4, 0, 0)].concat();
        let mut next = 1u32;
        for _ in 0..4 {
            for _ in 0..3 {
                flight.extend(frame_header(block.len() as u32, 0x1, 0x5, next));
                flight.extend(&block);
                next += 2;
            }
            if stream.write_all(&flight).is_err() {
                break;
            }
            flight.clear();
            drain(&mut stream, Duration::from_millis(100));
        }
        // Idle past nginx's timeout: it sends GOAWAY and closes.
        drain(&mut stream, Duration::from_millis(1500));
    }
}

/// Reads and drops what arrives for `duration` (or until the peer closes).
fn drain(stream: &mut TcpStream, duration: Duration) {
    let until = Instant::now() + duration;
    let mut buf = [0u8; 4096];
    while Instant::now() < until {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}
