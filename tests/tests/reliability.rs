//! Reliability against the real kernel and the real agent: a full connection map, a bounded
//! soak of mixed churn, a restart under load, and hostile payloads.
//!
//! Every agent sees all of the host's traffic, and a tiny map (`--bpf.max-connections 8`)
//! or a soak's memory figure must not be disturbed by a neighbour test: the tests of this
//! file run one at a time (a lock), each with its own servers, so counts are exact.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use connscope_tests::{
    Agent, Scrape, agent_binary, free_port, http_get, kernel_test,
    nginx::{Nginx, NginxConfig},
    procfs::{program_ids, rss_bytes},
    serial::exclusive,
};

const WAIT: Duration = Duration::from_secs(10);

/// Losses that traffic made by a test must never cause (`untracked_socket` counts payload on
/// sockets older than the agent, which is not a loss of this traffic).
const REAL_LOSSES: [&str; 5] =
    ["ringbuf_full", "map_full", "payload_unreadable", "decode_error", "startup_backlog_full"];

fn lost(scrape: &Scrape, reason: &str) -> f64 {
    scrape.sum("connscope_events_lost_total", &[("reason", reason)])
}

fn tracked(scrape: &Scrape) -> f64 {
    scrape.sum("connscope_tracked_connections", &[])
}

fn opened(scrape: &Scrape, role: &str, server: &str) -> f64 {
    scrape.sum("connscope_connections_opened_total", &[("role", role), ("server", server)])
}

/// Connections of this role tracked from their start, or from their first transfer when
/// their `Open` found the map full (adopted then, once an entry was free).
fn tracked_ends(scrape: &Scrape, role: &str, server: &str) -> f64 {
    opened(scrape, role, server)
        + scrape.sum("connscope_connections_adopted_total", &[("role", role), ("server", server)])
}

fn closed(scrape: &Scrape, role: &str, server: &str) -> f64 {
    scrape.sum("connscope_connections_closed_total", &[("role", role), ("server", server)])
}

/// Whether a BPF program with this id is still loaded anywhere (BPF_PROG_GET_FD_BY_ID).
fn program_loaded(id: u32) -> bool {
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    // union bpf_attr for *_GET_FD_BY_ID: { u32 id; u32 next_id; u32 open_flags; }
    let mut attr = [0u32; 4];
    attr[0] = id;
    // SAFETY: bpf(2) with a properly sized, initialised attribute buffer.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_GET_FD_BY_ID,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd >= 0 {
        // SAFETY: a descriptor this call just returned.
        unsafe { libc::close(fd as i32) };
        return true;
    }
    std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT)
}

// ---------------------------------------------------------------------------------------
// HTTP/1.1 client for nginx, exact about what it sent and read.

/// Sends one `GET` and reads the whole response (head and `Content-Length` body).
fn exchange(stream: &mut TcpStream, path: &str, close: bool) -> anyhow::Result<()> {
    let connection = if close { "Connection: close\r\n" } else { "" };
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: soak\r\n{connection}\r\n").as_bytes())?;
    let mut response = Vec::with_capacity(512);
    let mut buf = [0u8; 4096];
    let body_start = loop {
        if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = stream.read(&mut buf)?;
        ensure!(n > 0, "connection closed before the response head");
        response.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&response[..body_start]).to_ascii_lowercase();
    ensure!(head.starts_with("http/1.1 200"), "unexpected response: {head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no Content-Length")?;
    while response.len() < body_start + length {
        let n = stream.read(&mut buf)?;
        ensure!(n > 0, "connection closed inside the body");
        response.extend_from_slice(&buf[..n]);
    }
    ensure!(response.len() == body_start + length, "more bytes than one response");
    Ok(())
}

/// One connection carrying `requests` requests; the last asks to close when `server_closes`
/// (nginx then closes first), else the client closes after reading the last response.
fn connection(server: &str, requests: u32, server_closes: bool) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(server)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    for i in 0..requests {
        exchange(&mut stream, "/index.html", server_closes && i + 1 == requests)?;
    }
    if server_closes {
        // Wait for nginx's FIN so this side closes second.
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest)?;
    }
    Ok(())
}

fn nginx(keepalive_requests: u32) -> anyhow::Result<Nginx> {
    Nginx::start(NginxConfig {
        port: free_port(),
        keepalive_timeout: Duration::from_secs(60),
        keepalive_requests,
        workers: 1,
        advertise_keep_alive: false,
    })
}

/// Stops or pauses a load generator between connections.
#[derive(Default)]
struct Control {
    stop: AtomicBool,
    pause: AtomicBool,
    /// Threads waiting while paused.
    paused: AtomicU64,
}

impl Control {
    /// Pauses the load and waits until no connection is under way.
    fn pause(&self, threads: u64) {
        self.pause.store(true, Ordering::SeqCst);
        while self.paused.load(Ordering::SeqCst) < threads {
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }
}

/// Stops the load when a test ends, failed assertions included.
struct StopOnDrop(Arc<Control>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Relaxed);
        self.0.pause.store(false, Ordering::SeqCst);
    }
}

/// Traffic totals of a load generator.
#[derive(Default)]
struct Totals {
    connections: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
}

/// Mixed churn from `threads` threads until stopped: keep-alive connections of 1..=8
/// requests closed by the client, and one-request `Connection: close` connections closed
/// by nginx. Each connection is added to the `totals()` current when it started.
fn churn(
    server: String,
    threads: usize,
    control: Arc<Control>,
    totals: impl Fn() -> Arc<Totals> + Send + Sync + Clone + 'static,
) -> anyhow::Result<Vec<thread::JoinHandle<()>>> {
    (0..threads)
        .map(|t| {
            let (server, control, totals) = (server.clone(), control.clone(), totals.clone());
            thread::Builder::new()
                .name(format!("cs-churn-{t}"))
                .spawn(move || {
                    let mut n = 0u32;
                    while !control.stop.load(Ordering::Relaxed) {
                        if control.pause.load(Ordering::SeqCst) {
                            control.paused.fetch_add(1, Ordering::SeqCst);
                            while control.pause.load(Ordering::SeqCst)
                                && !control.stop.load(Ordering::Relaxed)
                            {
                                thread::sleep(Duration::from_millis(1));
                            }
                            control.paused.fetch_sub(1, Ordering::SeqCst);
                            continue;
                        }
                        n = n.wrapping_add(1);
                        let (requests, server_closes) = if n.is_multiple_of(3) {
                            (1, true)
                        } else {
                            (1 + (n + t as u32) % 8, false)
                        };
                        let totals = totals();
                        match connection(&server, requests, server_closes) {
                            Ok(()) => {
                                totals.connections.fetch_add(1, Ordering::Relaxed);
                                totals.requests.fetch_add(u64::from(requests), Ordering::Relaxed);
                            }
                            Err(err) => {
                                eprintln!("churn: {err:#}");
                                totals.errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
                .context("spawn")
        })
        .collect()
}

fn join_all(handles: Vec<thread::JoinHandle<()>>) -> anyhow::Result<()> {
    for handle in handles {
        handle.join().map_err(|_| anyhow::anyhow!("load thread panicked"))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------

kernel_test!(
    /// A map of 8 entries and 40 concurrent connections (80 sockets): the surplus is counted as
    /// `map_full`, every connection still carries its data, and once they close the agent
    /// tracks new connections exactly again.
    fn full_connection_map_is_counted_and_recovers() -> anyhow::Result<()> {
        let _serial = exclusive();
        let agent = Agent::start(&["--bpf.max-connections", "8"])?;
        let first = agent.scrape()?;
        assert_eq!(first.sum("connscope_tracked_connections_capacity", &[]), 8.0);
        let map_full_before = lost(&first, "map_full");

        const N: usize = 40;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let server = listener.local_addr()?.to_string();
        let acceptor = thread::spawn(move || {
            let mut accepted = Vec::with_capacity(N);
            for _ in 0..N {
                accepted.push(listener.accept()?.0);
            }
            // Echo one message per connection, then read to EOF.
            for stream in &mut accepted {
                let mut buf = [0u8; 64];
                let n = stream.read(&mut buf)?;
                stream.write_all(&buf[..n])?;
            }
            for stream in &mut accepted {
                let mut rest = Vec::new();
                stream.read_to_end(&mut rest)?;
            }
            anyhow::Ok(())
        });
        let mut clients = Vec::with_capacity(N);
        for _ in 0..N {
            clients.push(TcpStream::connect(&server)?);
        }
        // Traffic is unaffected: every connection echoes its own message.
        for (i, client) in clients.iter_mut().enumerate() {
            client.set_read_timeout(Some(Duration::from_secs(5)))?;
            let message = format!("message {i:04}");
            client.write_all(message.as_bytes())?;
            let mut echo = vec![0u8; message.len()];
            client.read_exact(&mut echo)?;
            assert_eq!(echo, message.as_bytes(), "connection {i}");
        }
        drop(clients);
        acceptor.join().map_err(|_| anyhow::anyhow!("acceptor panicked"))??;

        let scrape = agent.scrape_until(WAIT, |s| {
            let tracked_here =
                tracked_ends(s, "client", &server) + tracked_ends(s, "server", &server);
            let closed_here = closed(s, "client", &server) + closed(s, "server", &server);
            tracked_here > 0.0 && closed_here >= tracked_here
        })?;
        let tracked_here =
            tracked_ends(&scrape, "client", &server) + tracked_ends(&scrape, "server", &server);
        let map_full = lost(&scrape, "map_full") - map_full_before;
        eprintln!("map full: {tracked_here} of {} sockets tracked, map_full {map_full}", 2 * N);
        assert!((1.0..=8.0).contains(&tracked_here), "tracked {tracked_here}: {}", scrape.text);
        // Every socket of the batch was either tracked or counted as lost.
        assert!(
            map_full >= 2.0 * N as f64 - tracked_here,
            "map_full {map_full}, tracked {tracked_here}"
        );
        // Whatever was tracked was closed (no entry leaked).
        for role in ["client", "server"] {
            let tracked = tracked_ends(&scrape, role, &server);
            assert_eq!(closed(&scrape, role, &server), tracked, "{role}: {}", scrape.text);
        }

        // Load has dropped: the table empties and a fresh batch is counted exactly.
        let idle = agent.scrape_until(WAIT, |s| tracked(s) <= 2.0)?;
        assert!(
            tracked(&idle) <= 2.0,
            "tracked connections stay at {} (only the scrape's own may remain)",
            tracked(&idle)
        );
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let fresh = listener.local_addr()?.to_string();
        const FRESH: usize = 3;
        let acceptor = thread::spawn(move || {
            for _ in 0..FRESH {
                let (mut stream, _) = listener.accept()?;
                let mut rest = Vec::new();
                stream.read_to_end(&mut rest)?;
            }
            anyhow::Ok(())
        });
        for _ in 0..FRESH {
            let mut client = TcpStream::connect(&fresh)?;
            client.write_all(b"fresh")?;
            drop(client);
            // One connection at a time: two of the eight entries.
            thread::sleep(Duration::from_millis(20));
        }
        acceptor.join().map_err(|_| anyhow::anyhow!("acceptor panicked"))??;
        let scrape = agent.scrape_until(WAIT, |s| {
            closed(s, "client", &fresh) + closed(s, "server", &fresh) >= 2.0 * FRESH as f64
        })?;
        assert_eq!(opened(&scrape, "client", &fresh), FRESH as f64, "{}", scrape.text);
        assert_eq!(opened(&scrape, "server", &fresh), FRESH as f64);
        assert_eq!(closed(&scrape, "client", &fresh), FRESH as f64);
        assert_eq!(closed(&scrape, "server", &fresh), FRESH as f64);
        Ok(())
    }
);

/// What the agent's table of recent closes (`pipeline/recent_closes.rs`) allocates for
/// `closes` connections (one local FIN-first close each, both ends on this host), as its
/// containers size themselves: a `HashMap` of 8-byte keys and 24-byte values in a power of
/// two of buckets kept at most 7/8 full (a control byte each), and a `VecDeque` of 16-byte
/// entries doubling its capacity.
fn time_wait_table_bytes(closes: u64) -> u64 {
    let kept = closes.min(connscope::pipeline::recent_closes::MAX_KEPT as u64);
    if kept == 0 {
        return 0;
    }
    let buckets = (kept * 8 / 7 + 1).next_power_of_two().max(8);
    buckets * (32 + 1) + kept.next_power_of_two() * 16
}

kernel_test!(
    /// Bounded soak (`CONNSCOPE_SOAK_SECS`, default 60): mixed keep-alive and one-request churn
    /// against nginx. Counts are exact, nothing is lost, the agent's memory is flat after
    /// warm-up, and the table returns to its baseline.
    fn soak_mixed_churn_exact_counts_and_flat_memory() -> anyhow::Result<()> {
        let _serial = exclusive();
        let seconds: u64 =
            std::env::var("CONNSCOPE_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
        let nginx = nginx(1000)?;
        let agent = Agent::start(&[])?;
        let baseline = tracked(&agent.scrape()?);
        let server = nginx.server();

        let control = Arc::new(Control::default());
        let totals = Arc::new(Totals::default());
        let shared = totals.clone();
        let load = churn(server.clone(), 3, control.clone(), move || shared.clone())?;
        let _stop_load = StopOnDrop(control.clone());

        let warm_up = Duration::from_secs((seconds / 6).clamp(3, 15));
        thread::sleep(warm_up);
        // Memory after warm-up: the table, label sets and allocator pools have reached size.
        agent.scrape()?;
        let rss_warm = rss_bytes(agent.pid())?;
        let closes_warm = totals.connections.load(Ordering::Relaxed);
        let started = Instant::now();
        let mut rss_samples = vec![rss_warm];
        while started.elapsed() < Duration::from_secs(seconds).saturating_sub(warm_up) {
            thread::sleep(Duration::from_secs(5));
            let scrape = agent.scrape()?;
            assert_eq!(
                lost(&scrape, "ringbuf_full"),
                0.0,
                "ring buffer overflowed during the soak"
            );
            rss_samples.push(rss_bytes(agent.pid())?);
        }
        control.stop.store(true, Ordering::Relaxed);
        join_all(load)?;
        let connections = totals.connections.load(Ordering::Relaxed) as f64;
        let requests = totals.requests.load(Ordering::Relaxed) as f64;
        assert_eq!(totals.errors.load(Ordering::Relaxed), 0, "the load itself failed");

        let scrape = agent.scrape_until(WAIT, |s| {
            closed(s, "client", &server) >= connections
                && closed(s, "server", &server) >= connections
        })?;
        let rss_end = rss_bytes(agent.pid())?;
        eprintln!(
            "soak: {seconds} s, {connections} connections, {requests} requests; agent RSS warm {:.1} MiB, end {:.1} MiB, samples {:?} MiB",
            rss_warm as f64 / 1048576.0,
            rss_end as f64 / 1048576.0,
            rss_samples
                .iter()
                .map(|r| (*r as f64 / 1048576.0 * 10.0).round() / 10.0)
                .collect::<Vec<_>>()
        );
        assert!(connections >= 100.0, "too little traffic: {connections}");
        for reason in REAL_LOSSES {
            assert_eq!(lost(&scrape, reason), 0.0, "{reason}: {}", scrape.text);
        }
        for role in ["client", "server"] {
            assert_eq!(opened(&scrape, role, &server), connections, "{role} opened");
            assert_eq!(closed(&scrape, role, &server), connections, "{role} closed");
            assert_eq!(
                scrape.sum("connscope_http_requests_total", &[("role", role), ("server", &server)]),
                requests,
                "{role} requests"
            );
            assert_eq!(
                scrape.sum(
                    "connscope_connection_requests_sum",
                    &[("role", role), ("server", &server)]
                ),
                requests,
                "{role} requests per connection"
            );
        }
        // The one-request connections are nginx's closes, the rest the clients'.
        let server_closes = scrape.sum(
            "connscope_connections_closed_total",
            &[
                ("role", "server"),
                ("server", &server),
                ("closed_by", "local"),
                ("reason", "connection_close"),
            ],
        );
        assert!(server_closes > 0.0 && server_closes < connections, "{server_closes}");
        // nginx's own log agrees.
        let truth = nginx.requests_per_connection()?;
        assert_eq!(truth.len() as f64, connections, "nginx connections");
        assert_eq!(truth.values().sum::<u64>() as f64, requests, "nginx requests");

        let settled = agent.scrape_until(WAIT, |s| tracked(s) <= baseline)?;
        let open_now: Vec<String> = settled
            .samples
            .iter()
            .filter(|s| s.name == "connscope_connections_open" && s.value != 0.0)
            .map(|s| format!("{:?} {}", s.labels, s.value))
            .collect();
        assert!(
            tracked(&settled) <= baseline,
            "tracked {} > baseline {baseline}; open: {open_now:#?}",
            tracked(&settled)
        );
        // The TIME_WAIT table keeps each connection closed first with a FIN for 65 s, longer
        // than the soak: it grows with the closes by design, up to its bound, and is allowed
        // for. Anything else must stay within 4 MiB.
        let table_growth = time_wait_table_bytes(connections as u64)
            .saturating_sub(time_wait_table_bytes(closes_warm));
        let growth = rss_end.saturating_sub(rss_warm).saturating_sub(table_growth);
        assert!(
            growth <= 4 << 20,
            "agent RSS grew {:.1} MiB after warm-up, besides the TIME_WAIT table's {:.1} MiB",
            growth as f64 / 1048576.0,
            table_growth as f64 / 1048576.0
        );
        Ok(())
    }
);

kernel_test!(
    /// SIGTERM while traffic runs: exit 0 within a second, none of its programs left loaded;
    /// a new agent counts the traffic that follows exactly, and the traffic never failed.
    fn restart_under_load_detaches_and_counts_again() -> anyhow::Result<()> {
        let _serial = exclusive();
        let nginx = nginx(1000)?;
        let server = nginx.server();
        let first = Agent::start(&[])?;

        // Totals of the phase a connection started in: 1 once the new agent is ready.
        let phases = Arc::new([Arc::new(Totals::default()), Arc::new(Totals::default())]);
        let phase = Arc::new(AtomicU64::new(0));
        let control = Arc::new(Control::default());
        let (p, ph) = (phases.clone(), phase.clone());
        const THREADS: usize = 2;
        let load = churn(server.clone(), THREADS, control.clone(), move || {
            p[ph.load(Ordering::SeqCst) as usize].clone()
        })?;
        let _stop_load = StopOnDrop(control.clone());

        thread::sleep(Duration::from_secs(2));
        let programs = program_ids(first.pid())?;
        assert!(programs.len() >= 6, "the agent holds {} programs", programs.len());
        let bound = first.stop_bound()?;
        let (code, elapsed) = first.stop()?;
        assert_eq!(code, Some(0), "exit code after SIGTERM under load");
        assert!(elapsed < bound, "SIGTERM took {elapsed:?} (bound {bound:?})");
        // Links are unhooked when the agent exits; the kernel frees BTF tracepoint programs
        // after an RCU grace period, so give it a moment.
        let mut left: Vec<u32> = programs.iter().copied().collect();
        for _ in 0..40 {
            left.retain(|&id| program_loaded(id));
            if left.is_empty() {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        assert!(
            left.is_empty(),
            "programs {left:?} of the stopped agent are still loaded after 2 s"
        );

        // Traffic goes on without an agent, then pauses between connections while the new
        // agent starts, so every connection of phase 1 begins after it is ready.
        thread::sleep(Duration::from_millis(500));
        control.pause(THREADS as u64);
        let second = Agent::start(&[])?;
        phase.store(1, Ordering::SeqCst);
        control.resume();
        thread::sleep(Duration::from_secs(3));
        control.stop.store(true, Ordering::Relaxed);
        join_all(load)?;
        for (i, totals) in phases.iter().enumerate() {
            assert_eq!(totals.errors.load(Ordering::Relaxed), 0, "traffic failed in phase {i}");
        }
        let connections = phases[1].connections.load(Ordering::Relaxed) as f64;
        let requests = phases[1].requests.load(Ordering::Relaxed) as f64;
        assert!(phases[0].connections.load(Ordering::Relaxed) > 0 && connections > 0.0);

        let scrape = second.scrape_until(WAIT, |s| {
            closed(s, "client", &server) >= connections
                && closed(s, "server", &server) >= connections
        })?;
        eprintln!("restart: {connections} connections and {requests} requests after the restart");
        for reason in REAL_LOSSES {
            assert_eq!(lost(&scrape, reason), 0.0, "{reason}: {}", scrape.text);
        }
        for role in ["client", "server"] {
            assert_eq!(
                opened(&scrape, role, &server),
                connections,
                "{role} opened: {}",
                scrape.text
            );
            assert_eq!(closed(&scrape, role, &server), connections, "{role} closed");
            assert_eq!(
                scrape.sum("connscope_http_requests_total", &[("role", role), ("server", &server)]),
                requests,
                "{role} requests"
            );
        }
        Ok(())
    }
);

/// A separately spawned agent (the harness's `Agent` fixes `--metrics.max-servers`), with
/// its log kept to check that no payload reaches it.
struct CappedAgent {
    child: Child,
    address: SocketAddr,
    log: PathBuf,
}

impl CappedAgent {
    fn start(args: &[&str]) -> anyhow::Result<Self> {
        let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let log =
            std::env::temp_dir().join(format!("connscope-reliability-{}.log", std::process::id()));
        let child = Command::new(agent_binary())
            .arg("--web.listen-address")
            .arg(address.to_string())
            .args(args)
            .env("CONNSCOPE_LOG_LEVEL", "debug")
            // Unpinned unless `args` ask (the flag wins over the environment).
            .env("CONNSCOPE_BPF_PIN_PATH", "")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::options().append(true).open(&log)?)
            .spawn()
            .context("starting connscope")?;
        let mut agent = Self { child, address, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(http_get(agent.address, "/readyz"), Ok((200, _))) {
            if let Some(status) = agent.child.try_wait()? {
                bail!("connscope exited during start-up: {status}");
            }
            ensure!(Instant::now() < deadline, "connscope not ready after 30 s");
            thread::sleep(Duration::from_millis(50));
        }
        Ok(agent)
    }

    fn scrape(&self) -> anyhow::Result<Scrape> {
        let (status, body) = http_get(self.address, "/metrics")?;
        ensure!(status == 200, "/metrics answered {status}");
        Scrape::parse(&body)
    }
}

impl Drop for CappedAgent {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A server on `listener` answering each request head with a hostile response
/// (`Keep-Alive: timeout=-1`, invalid UTF-8, a huge header), until the client closes.
fn hostile_server(listener: TcpListener) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let mut pending = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        let mut response = b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=-1, max=-5\r\nX-Evil-Marker: \xc3\x28".to_vec();
                        response.extend_from_slice(&[b'a'; 2000]);
                        response.extend_from_slice(b"\r\nContent-Length: 2\r\n\r\nok");
                        if stream.write_all(&response).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    })
}

/// Reads one hostile response (head plus the 2-byte body).
fn read_hostile_response(stream: &mut TcpStream) -> anyhow::Result<()> {
    let mut response = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n")
            && response.len() >= end + 6
        {
            ensure!(response.len() == end + 6, "more than one response");
            return Ok(());
        }
        let n = stream.read(&mut buf)?;
        ensure!(n > 0, "closed before the response");
        response.extend_from_slice(&buf[..n]);
    }
}

kernel_test!(
    /// 10k requests with distinct fake methods, hosts and paths, huge headers and invalid
    /// UTF-8, to 60 server addresses from 150 differently named threads: label cardinality
    /// stays within the caps, no payload byte reaches a label or the log, the agent stays up.
    fn hostile_payloads_keep_labels_bounded() -> anyhow::Result<()> {
        let _serial = exclusive();
        const MAX_SERVERS: usize = 20;
        const MAX_PROCESSES: usize = 30;
        let agent = CappedAgent::start(&[
            "--metrics.max-servers",
            &MAX_SERVERS.to_string(),
            "--metrics.max-processes",
            &MAX_PROCESSES.to_string(),
        ])?;

        const SERVERS: usize = 60;
        const THREADS: usize = 150;
        const REQUESTS_PER_THREAD: usize = 67; // 10,050 requests in all
        // 127.0.98.x: an address range no other test uses.
        let mut servers = Vec::with_capacity(SERVERS);
        let mut acceptors = Vec::with_capacity(SERVERS);
        for i in 0..SERVERS {
            let listener = TcpListener::bind(format!("127.0.98.{}:0", i + 1))?;
            servers.push(listener.local_addr()?.to_string());
            acceptors.push(hostile_server(listener));
        }
        let failures = Arc::new(AtomicU64::new(0));
        for batch in 0..THREADS / 15 {
            let mut clients = Vec::new();
            for t in batch * 15..(batch + 1) * 15 {
                let server = servers[t % SERVERS].clone();
                let failures = failures.clone();
                clients.push(thread::Builder::new().name(format!("cs-hostile-{t:03}")).spawn(move || {
                let run = || -> anyhow::Result<()> {
                    let mut stream = TcpStream::connect(&server)?;
                    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                    for r in 0..REQUESTS_PER_THREAD {
                        let n = t * REQUESTS_PER_THREAD + r;
                        let mut request = match n % 4 {
                            // A fake method (a token httparse accepts, not a known method).
                            0 => format!("X-EVIL-{n:05} /evil/{n} HTTP/1.1\r\nHost: evil-{n}.example\r\n").into_bytes(),
                            // A known method, hostile host and path, huge header.
                            1 => format!("GET /evil/{n}/\"{{}}\\ HTTP/1.1\r\nHost: evil-{n}.example\r\nX-Big: {}\r\n", "b".repeat(16 * 1024)).into_bytes(),
                            // Invalid UTF-8 everywhere.
                            2 => [b"P\xffST /\xc3\x28 HTTP/1.1\r\nHost: \xfe\xfe-".as_slice(), n.to_string().as_bytes(), b"\r\n"].concat(),
                            // A hostile Keep-Alive and Connection from the client too.
                            _ => format!("GET /evil/{n} HTTP/1.0\r\nHost: evil-{n}.example\r\nConnection: keep-alive, \x01\r\nKeep-Alive: timeout=-1\r\n").into_bytes(),
                        };
                        request.extend_from_slice(b"\r\n");
                        stream.write_all(&request)?;
                        read_hostile_response(&mut stream)?;
                    }
                    Ok(())
                };
                if let Err(err) = run() {
                    eprintln!("hostile client {t}: {err:#}");
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            })?);
            }
            for client in clients {
                client.join().map_err(|_| anyhow::anyhow!("client panicked"))?;
            }
        }
        assert_eq!(failures.load(Ordering::Relaxed), 0, "hostile clients failed");

        let scrape = agent.scrape_until_closed(THREADS)?;
        let mut server_values = BTreeSet::new();
        let mut process_values = BTreeSet::new();
        for sample in &scrape.samples {
            if let Some(v) = sample.labels.get("server") {
                server_values.insert(v.clone());
            }
            if let Some(v) = sample.labels.get("process") {
                process_values.insert(v.clone());
            }
            for value in sample.labels.values() {
                assert!(
                    !value.contains("evil") && !value.contains("EVIL"),
                    "payload in a label: {value:?}"
                );
            }
        }
        eprintln!(
            "hostile: {} server values, {} process values",
            server_values.len(),
            process_values.len()
        );
        // The cap plus "other".
        assert!(
            server_values.len() <= MAX_SERVERS + 1,
            "{} server values: {server_values:?}",
            server_values.len()
        );
        // The cap plus "other" and "unknown".
        assert!(
            process_values.len() <= MAX_PROCESSES + 2,
            "{} process values: {process_values:?}",
            process_values.len()
        );
        assert!(
            server_values.contains("other") && process_values.contains("other"),
            "the caps were not reached"
        );
        // The agent says it held back: each capped label is at its cap.
        let in_use = |label| scrape.sum("connscope_label_values", &[("label", label)]);
        assert_eq!(in_use("server"), MAX_SERVERS as f64);
        assert_eq!(in_use("process"), MAX_PROCESSES as f64);
        assert!(
            !scrape.text.contains("evil") && !scrape.text.contains("EVIL"),
            "payload in /metrics"
        );
        // `Keep-Alive: timeout=-1` is not a timeout: no advertised value for these servers.
        for server in &servers {
            assert_eq!(
                scrape
                    .matching(
                        "connscope_http_keepalive_advertised_timeout_seconds",
                        &[("server", server)]
                    )
                    .count(),
                0,
                "{server}"
            );
        }
        assert_eq!(lost(&scrape, "decode_error"), 0.0);
        assert_eq!(http_get(agent.address, "/healthz")?.0, 200);
        let log = std::fs::read(&agent.log)?;
        let log = String::from_utf8_lossy(&log);
        assert!(
            !log.contains("evil") && !log.contains("EVIL") && !log.contains("bbbbbbbb"),
            "payload in the log:\n{log}"
        );
        assert!(!log.contains("panicked"), "{log}");
        drop(acceptors);
        Ok(())
    }
);

impl CappedAgent {
    /// Scrapes until at least `connections` client closes to the hostile servers are seen.
    fn scrape_until_closed(&self, connections: usize) -> anyhow::Result<Scrape> {
        let deadline = Instant::now() + WAIT;
        loop {
            let scrape = self.scrape()?;
            let done = scrape.sum("connscope_connections_closed_total", &[("role", "client")])
                >= connections as f64;
            if done || Instant::now() > deadline {
                return Ok(scrape);
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

kernel_test!(
    /// A request head written in pieces, the first ending at a line end ("GET / HTTP/1.1\r\n",
    /// then the headers): the turn's captured head is a partial head that ends exactly on a
    /// CRLF. Found by the `http_head` fuzz target; the agent must keep running and count it.
    fn head_split_at_a_line_end_does_not_stop_the_agent() -> anyhow::Result<()> {
        let _serial = exclusive();
        let agent = CappedAgent::start(&[])?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let server = listener.local_addr()?.to_string();
        const N: usize = 3;
        let acceptor = thread::spawn(move || {
            for _ in 0..N {
                let (mut stream, _) = listener.accept()?;
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.ends_with(b"\r\n\r\n") {
                    let n = stream.read(&mut buf)?;
                    ensure!(n > 0, "closed before the head ended");
                    head.extend_from_slice(&buf[..n]);
                }
                stream.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                )?;
            }
            anyhow::Ok(())
        });
        for _ in 0..N {
            let mut client = TcpStream::connect(&server)?;
            client.set_nodelay(true)?;
            client.write_all(b"GET / HTTP/1.1\r\n")?;
            thread::sleep(Duration::from_millis(20));
            client.write_all(b"Host: split\r\n\r\n")?;
            let mut response = Vec::new();
            client.read_to_end(&mut response)?;
        }
        acceptor.join().map_err(|_| anyhow::anyhow!("acceptor panicked"))??;
        thread::sleep(Duration::from_millis(300));
        let mut agent = agent;
        let exited = agent.child.try_wait()?;
        let log = String::from_utf8_lossy(&std::fs::read(&agent.log)?).into_owned();
        assert!(exited.is_none(), "the agent stopped ({exited:?}):\n{log}");
        let scrape = agent.scrape_until_closed_on(&server, 2 * N).with_context(|| {
            format!(
                "the agent stopped answering; its log:\n{}",
                String::from_utf8_lossy(&std::fs::read(&agent.log).unwrap_or_default())
            )
        })?;
        assert_eq!(opened(&scrape, "client", &server), N as f64, "{}", scrape.text);
        assert_eq!(
            scrape.sum("connscope_http_requests_total", &[("role", "client"), ("server", &server)]),
            N as f64
        );
        Ok(())
    }
);

impl CappedAgent {
    /// Scrapes until `closes` connections to `server` (both roles) have closed.
    fn scrape_until_closed_on(&self, server: &str, closes: usize) -> anyhow::Result<Scrape> {
        let deadline = Instant::now() + WAIT;
        loop {
            let scrape = self.scrape()?;
            let done = closed(&scrape, "client", server) + closed(&scrape, "server", server)
                >= closes as f64;
            if done || Instant::now() > deadline {
                return Ok(scrape);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}
