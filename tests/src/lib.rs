//! Test harness: start the real `connscope` binary, scrape its real `/metrics` over HTTP,
//! and read exact values. Every kernel test runs its own agent and its own servers on
//! ports (or loopback addresses) of its own, so tests run in parallel without sharing counts.

pub mod asset_files;
pub mod continuity;
pub mod demo;
pub mod exchange_counts;
pub mod existing_connections;
pub mod external_tools;
pub mod framing_server;
pub mod grafana;
pub mod grafana_schema;
pub mod http2;
pub mod http_server;
pub mod kubernetes;
pub mod metrics_text;
pub mod net;
pub mod nginx;
pub mod procfs;
pub mod prometheus;
pub mod prometheus_rules;
pub mod serial;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

pub use crate::metrics_text::Scrape;

/// A kernel test: a `#[test]` that runs only when [`kernel_tests_enabled`] says so (as root;
/// in CI not being root fails it, elsewhere it skips with the reason printed). The function's
/// doc comments and attributes are kept; its name is the test's name.
///
/// ```text
/// kernel_test!(
///     /// What the test shows.
///     fn client_closes_first() -> anyhow::Result<()> {
///         let agent = Agent::start(&[])?;
///         Ok(())
///     }
/// );
/// ```
///
/// Parentheses rather than braces around the function: rustfmt formats it then.
#[macro_export]
macro_rules! kernel_test {
    ($(#[$attribute:meta])* fn $name:ident() -> anyhow::Result<()> $body:block) => {
        $(#[$attribute])*
        #[test]
        fn $name() -> ::anyhow::Result<()> {
            if !$crate::kernel_tests_enabled(stringify!($name)) {
                return Ok(());
            }
            $body
        }
    };
}

/// Whether kernel tests can run. In CI (`CI=true`) they must: not being root is a failure.
/// Elsewhere they skip with the reason printed.
pub fn kernel_tests_enabled(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: kernel tests must run as root in CI"
    );
    eprintln!("skipping {test}: kernel tests need root (run `sudo -E cargo xtask test`)");
    false
}

/// The agent binary: `$CONNSCOPE_BIN`, else the workspace's release (or debug) build.
pub fn agent_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CONNSCOPE_BIN") {
        return PathBuf::from(path);
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let release = workspace.join("target/release/connscope");
    let path = if release.exists() { release } else { workspace.join("target/debug/connscope") };
    assert!(path.exists(), "{} missing: build it first (`cargo xtask test` does)", path.display());
    path
}

/// How long [`Agent::scrape_until`] waits for a later body than the first that satisfied it:
/// past the 2 s an agent whose encoding is slow may serve one cached body for.
pub const SETTLE: Duration = Duration::from_millis(2500);

/// `$CONNSCOPE_TEST_WAIT_SCALE` (default 1): how much longer to wait for the agent's counts.
/// The VM tier sets it under software emulation, where a busy 2-core host runs the guest
/// 10-50x slower and the agent's records can take seconds to show in `/metrics` (which may
/// also serve a body up to 2 s old). Only waits scale: every assertion stays exact.
pub fn wait_scale() -> u32 {
    std::env::var("CONNSCOPE_TEST_WAIT_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|scale| *scale > 0)
        .unwrap_or(1)
}

/// Ports [`free_port`] hands out: below the kernel's default ephemeral range (32768 on).
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A free TCP port on 127.0.0.1, outside the ephemeral range. A port in that range can be
/// taken between this check and its listener's bind by a connection's source port, even
/// by a connect to the port itself (TCP's self-connect, when nothing listens there yet):
/// an agent slow to start under emulation once found its port so taken by its own
/// readiness polls. Each call of a test binary gets another port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    let seed = std::process::id().wrapping_mul(7919);
    for _ in 0..span {
        let offset = seed.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = TEST_PORTS.start + offset as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {TEST_PORTS:?}")
}

/// A running agent; stopped with SIGTERM when dropped.
pub struct Agent {
    child: Child,
    pub address: SocketAddr,
}

impl Agent {
    /// Starts the agent with `extra` flags and waits until its probes are attached.
    pub fn start(extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_logging(extra, None)
    }

    /// [`Agent::start`], with the agent's output (its log) written to `log` when given, for
    /// tests that read what it logged.
    pub fn start_logging(extra: &[&str], log: Option<&std::fs::File>) -> anyhow::Result<Self> {
        Self::start_on(free_port(), extra, log)
    }

    /// [`Agent::start_logging`] on a given loopback port: a restarted agent that a scraper
    /// keeps scraping at the same address.
    pub fn start_on(
        port: u16,
        extra: &[&str],
        log: Option<&std::fs::File>,
    ) -> anyhow::Result<Self> {
        Self::spawn(Command::new(agent_binary()), port, extra, log)
    }

    /// [`Agent::start_logging`] in a mount namespace of its own where nothing is mounted
    /// on `/sys/fs/bpf`: a host without a BPF filesystem, whatever this one has (the VM
    /// guests mount one at boot). The namespace, and what the agent mounts in it, end with
    /// the agent (same pid: `unshare` and the shell exec it).
    pub fn start_without_bpf_fs(
        extra: &[&str],
        log: Option<&std::fs::File>,
    ) -> anyhow::Result<Self> {
        let mut command = Command::new("unshare");
        command.args(["--mount", "--propagation", "private", "sh", "-c"]);
        command.arg("umount /sys/fs/bpf 2>/dev/null; exec \"$0\" \"$@\"").arg(agent_binary());
        Self::spawn(command, free_port(), extra, log)
    }

    /// Runs `command` (the agent, or what execs it) with the tests' flags and `extra`.
    fn spawn(
        mut command: Command,
        port: u16,
        extra: &[&str],
        log: Option<&std::fs::File>,
    ) -> anyhow::Result<Self> {
        let address: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let listen = address.to_string();
        let mut args = vec!["--web.listen-address", &listen, "--metrics.max-servers", "100000"];
        args.extend_from_slice(extra);
        command
            .args(&args)
            .env("CONNSCOPE_LOG_LEVEL", "warn")
            // Tests run agents in parallel: none shares pinned state unless it asks to.
            .env("CONNSCOPE_BPF_PIN_PATH", "")
            .stdin(Stdio::null());
        if let Some(log) = log {
            command.stdout(log.try_clone()?).stderr(log.try_clone()?);
        }
        let child = command.spawn().context("starting connscope")?;
        let mut agent = Self { child, address };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = agent.get("/readyz") {
                return Ok(agent);
            }
            if let Some(status) = agent.child.try_wait()? {
                bail!("connscope exited during start-up: {status}");
            }
            if Instant::now() > deadline {
                bail!("connscope not ready after 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `GET path` over a fresh HTTP/1.0 connection: (status, body).
    pub fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(self.address, path)
    }

    pub fn scrape(&self) -> anyhow::Result<Scrape> {
        let (status, body) = self.get("/metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Scrape::parse(&body)
    }

    /// Scrapes until `done` holds for the scrape (events reach the agent asynchronously),
    /// at most `timeout` (times [`wait_scale`]); returns the last scrape either way so the
    /// caller asserts on it.
    ///
    /// The agent encodes `/metrics` family by family while it goes on applying records, so
    /// the body in which `done` first holds can show an earlier family (`connections_opened`
    /// comes first) without records that a later one (the closes `done` waits for) already
    /// counts; seen under emulation as 2 of 3 opens beside 3 closes. The body returned is the
    /// next different one (a later encode: the agent's own scrape connections change every
    /// encode) for which `done` still holds, within [`SETTLE`].
    pub fn scrape_until(
        &self,
        timeout: Duration,
        done: impl Fn(&Scrape) -> bool,
    ) -> anyhow::Result<Scrape> {
        let deadline = Instant::now() + timeout * wait_scale();
        loop {
            let scrape = self.scrape()?;
            if done(&scrape) {
                return self.later_body(scrape, &done);
            }
            if Instant::now() > deadline {
                return Ok(scrape);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The first body after `first` that differs from it and satisfies `done`; `first`
    /// when none comes within [`SETTLE`].
    fn later_body(&self, first: Scrape, done: impl Fn(&Scrape) -> bool) -> anyhow::Result<Scrape> {
        let deadline = Instant::now() + SETTLE;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            let scrape = self.scrape()?;
            if scrape.text != first.text && done(&scrape) {
                return Ok(scrape);
            }
        }
        Ok(first)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How long SIGTERM to exit may take: a second, plus what the kernel takes to remove the
    /// libssl uprobes of an agent without pinned state. Each removal waits for RCU grace
    /// periods under a kernel-wide lock (about 0.1 s each on 6.18), and a file has up to ten
    /// (five entries, five returns).
    pub fn stop_bound(&self) -> anyhow::Result<Duration> {
        let files = self.scrape()?.sum("connscope_tls_uprobe_targets", &[("state", "attached")]);
        Ok(Duration::from_secs(1) + Duration::from_millis(1500).mul_f64(files))
    }

    /// Sends SIGTERM and waits for the exit; returns the exit code and how long it took.
    pub fn stop(mut self) -> anyhow::Result<(Option<i32>, Duration)> {
        let started = Instant::now();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait()?;
        Ok((status.code(), started.elapsed()))
    }
}

impl Agent {
    /// Sends SIGTERM and scrapes until the agent stops answering (10 s at most): its last
    /// answer (a stopping agent waits for a polling scraper to get its final counts) and
    /// its exit code.
    pub fn stop_scraping(mut self) -> anyhow::Result<(Scrape, Option<i32>)> {
        let mut last = self.scrape()?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match self.scrape() {
                Ok(scrape) => last = scrape,
                Err(_) => break,
            }
        }
        let status = self.child.wait()?;
        Ok((last, status.code()))
    }
}

impl Agent {
    /// Scrapes once, then kills the agent with SIGKILL (a crash: no handover is written):
    /// that last answer and the exit status's signal.
    pub fn kill_after_scrape(mut self) -> anyhow::Result<(Scrape, Option<i32>)> {
        let last = self.scrape()?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let status = self.child.wait()?;
        Ok((last, std::os::unix::process::ExitStatusExt::signal(&status)))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
    }
}

/// Minimal HTTP/1.0 GET (the agent closes after the response).
pub fn http_get(address: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("bad HTTP response: {response:.80}"))?;
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// The current thread's `comm`, sanitised as the agent does for its `process` label.
pub fn own_process_label() -> String {
    let comm = std::fs::read("/proc/thread-self/comm").unwrap_or_default();
    let comm: Vec<u8> = comm.into_iter().filter(|&b| b != b'\n').collect();
    comm.iter().take(16).map(|&b| char::from(connscope_common::process_label_byte(b))).collect()
}
