//! Fixtures of the tests of connections that outlive an agent (issue 10): a BPF filesystem
//! of one test's own for `--bpf.pin-path`, `connscope cleanup`, what an adopted connection
//! must report, and the restart-under-traffic scenario. Used by `kernel_continuity` (every
//! backend, also in the VM tier) and the host tier's nginx variants (`adoption`, `restart`).

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::bail;

use crate::{Agent, Scrape, agent_binary, http_server, net};

/// How long events may take to reach a scrape.
pub const WAIT: Duration = Duration::from_secs(5);

/// A private BPF filesystem, unmounted on drop (which also detaches whatever a failed test
/// left pinned there).
pub struct BpfFs {
    pub mount: PathBuf,
}

impl BpfFs {
    pub fn mount(tag: &str) -> anyhow::Result<Self> {
        let mount =
            std::env::temp_dir().join(format!("connscope-bpffs-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&mount)?;
        net::run("mount", &["-t", "bpf", "bpf", &mount.to_string_lossy()])?;
        Ok(Self { mount })
    }

    pub fn pin_path(&self) -> String {
        self.mount.join("connscope").to_string_lossy().into_owned()
    }

    /// An agent pinning its state here.
    pub fn agent(&self) -> anyhow::Result<Agent> {
        Agent::start(&["--bpf.pin-path", &self.pin_path()])
    }

    /// The names pinned under `<pin path>/<under>`, sorted.
    pub fn pinned(&self, under: &str) -> Vec<String> {
        let dir = self.mount.join("connscope").join(under);
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|entries| {
                entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The link generations pinned once the agent has detached the previous ones (it
    /// keeps them attached for a second after its takeover; emulated kernels are slower).
    pub fn link_generations_settled(&self) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(3) * crate::wait_scale();
        loop {
            let pinned = self.pinned("links");
            if pinned.len() <= 1 || std::time::Instant::now() > deadline {
                return pinned;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = net::run("umount", &[&self.mount.to_string_lossy()]);
        let _ = std::fs::remove_dir(&self.mount);
    }
}

/// `connscope cleanup --bpf.pin-path <pin_path>`; returns what it logged.
pub fn cleanup(pin_path: &str) -> anyhow::Result<String> {
    let out =
        Command::new(agent_binary()).args(["cleanup", "--bpf.pin-path", pin_path]).output()?;
    if !out.status.success() {
        bail!("connscope cleanup failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The backend `connscope_probe_info` reports for `hook` ("" when absent).
fn hook_attach(scrape: &Scrape, hook: &str) -> String {
    scrape
        .matching("connscope_probe_info", &[("hook", hook)])
        .find_map(|s| s.labels.get("attach").cloned())
        .unwrap_or_default()
}

/// Whether the agent can adopt a connection older than it, from what the kernel offers,
/// independently of what the agent claims: with BTF, on every backend (at system call exit,
/// before `sock_send_length` in Linux 6.3, a descriptor is told a socket by its inode).
pub fn backend_adopts() -> bool {
    Path::new("/sys/kernel/btf/vmlinux").exists()
}

/// The running kernel's (major, minor).
fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Kprobes are perf events that cannot be pinned before 5.15: while no agent runs, sends
/// and receives on the kprobe backend are not counted.
pub fn transfers_stop_without_an_agent(scrape: &Scrape) -> bool {
    let send_attach = hook_attach(scrape, "tcp_sendmsg");
    send_attach == "kprobe" && kernel_version() < (5, 15)
}

fn flow<'a>(role: &'a str, server: &'a str, process: &'a str) -> [(&'a str, &'a str); 3] {
    [("role", role), ("server", server), ("process", process)]
}

/// What both ends of one connection opened before the agent report after `requests` more
/// requests and the client's close. Where the backend adopts: `requests` requests,
/// adopted once, never opened, closed once by the client with a FIN while idle, and no
/// histogram sample (partial figures stay out of the histograms users read as exact).
/// Where it cannot: nothing of the connection, and both ends counted as skipped.
pub fn assert_opened_before_the_agent(
    scrape: &Scrape,
    server: &str,
    client_process: &str,
    server_process: &str,
    requests: u64,
) {
    let skipped = scrape.sum("connscope_adoption_skipped_total", &[("reason", "backend")]);
    if !backend_adopts() {
        assert!(skipped >= 2.0, "both ends skipped as not adoptable: {}", scrape.text);
        for metric in [
            "connscope_connections_adopted_total",
            "connscope_connections_opened_total",
            "connscope_connections_closed_total",
            "connscope_http_requests_total",
        ] {
            assert_eq!(scrape.sum(metric, &[("server", server)]), 0.0, "{metric}: {}", scrape.text);
        }
        return;
    }
    assert_eq!(skipped, 0.0, "{}", scrape.text);
    for (role, process, closed_by) in
        [("client", client_process, "local"), ("server", server_process, "peer")]
    {
        let labels = flow(role, server, process);
        let context = format!("{role} {process}\n{}", scrape.text);
        let adopted = scrape.sum("connscope_connections_adopted_total", &labels);
        assert_eq!(adopted, 1.0, "adopted {context}");
        assert_eq!(scrape.sum("connscope_connections_opened_total", &labels), 0.0, "{context}");
        // Exact on every backend: where the receive hook runs at `tcp_recvmsg`'s exit, the
        // server's receive was already waiting when the agent started and no hook saw it
        // return, its request is counted at the response (`lrcvtime` after the start).
        let counted = scrape.sum("connscope_http_requests_total", &labels);
        assert_eq!(counted, requests as f64, "requests {context}");
        let closed = [
            ("role", role),
            ("server", server),
            ("process", process),
            ("closed_by", closed_by),
            ("close_kind", "fin"),
            ("reason", "idle"),
        ];
        assert_eq!(scrape.sum("connscope_connections_closed_total", &closed), 1.0, "{context}");
        let all_closed = scrape.sum("connscope_connections_closed_total", &[("server", server)]);
        assert_eq!(all_closed, 2.0, "{context}");
        for histogram in
            ["connscope_connection_duration_seconds_count", "connscope_connection_requests_count"]
        {
            assert_eq!(scrape.sum(histogram, &[("server", server)]), 0.0, "{histogram} {context}");
        }
    }
}

/// Whether both ends of the connection to `server` were seen closed, or the backend
/// cannot adopt it (then there is nothing to wait for).
pub fn both_closed(server: &str) -> impl Fn(&Scrape) -> bool + '_ {
    move |s| {
        !backend_adopts()
            || s.sum("connscope_connections_closed_total", &[("server", server)]) >= 2.0
    }
}

/// Short connections opened and closed while no agent runs, and their requests each.
pub const SHORT: usize = 5;
pub const SHORT_REQUESTS: u64 = 3;

/// What [`restart_with`] leaves: the second agent, the first one's last answer to
/// `/metrics` (scraped until it stopped), and the pooled connection's requests.
pub struct Restarted {
    pub second: Agent,
    pub first_last: Scrape,
    pub pooled_requests: u64,
}

/// How the first agent of [`restart_with`] ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM: it hands over.
    Graceful,
    /// SIGKILL, right after a scrape: the next agent recovers from its checkpoint.
    Crash,
}

/// Restart under traffic against the HTTP server at `server` (which serves `/resource`
/// with a 2-byte body, for `SHORT + 1` connections): a pooled connection sends a request
/// every 20 ms across an agent restart (the first agent ending as `stop_how` says), and
/// `SHORT` connections of `SHORT_REQUESTS` requests each open and close while no agent runs.
pub fn restart_with(fs: &BpfFs, server: &str, stop_how: Stop) -> anyhow::Result<Restarted> {
    let first = fs.agent()?;
    let stop = Arc::new(AtomicBool::new(false));
    let pooled = {
        let (server, stop) = (server.to_owned(), stop.clone());
        std::thread::spawn(move || {
            let mut client = TcpStream::connect(&server)?;
            let mut requests = 0u64;
            // Bounded: the test stops it within seconds; 30 s at most.
            while !stop.load(Ordering::Relaxed) && requests < 1500 {
                http_server::request(&mut client, "1.1", "")?;
                requests += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            anyhow::Ok(requests)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let first_last = match stop_how {
        Stop::Graceful => {
            let (first_last, code) = first.stop_scraping()?;
            anyhow::ensure!(code == Some(0), "the first agent exited with {code:?}");
            first_last
        }
        Stop::Crash => {
            // Killed once a scrape shows the pooled requests (a slow host may answer the
            // first scrapes before it counted any): only then can a reset show.
            let pooled_counted =
                |s: &Scrape| s.sum("connscope_http_requests_total", &[("server", server)]) > 0.0;
            first.scrape_until(WAIT, pooled_counted)?;
            let (first_last, signal) = first.kill_after_scrape()?;
            anyhow::ensure!(signal == Some(libc::SIGKILL), "the first agent ended with {signal:?}");
            first_last
        }
    };
    for _ in 0..SHORT {
        let mut client = TcpStream::connect(server)?;
        for _ in 0..SHORT_REQUESTS {
            http_server::request(&mut client, "1.1", "")?;
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let second = fs.agent()?;
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let pooled_requests =
        pooled.join().map_err(|_| anyhow::anyhow!("pooled client panicked"))??;
    Ok(Restarted { second, first_last, pooled_requests })
}

fn requests_per_connection(scrape: &Scrape, role: &str, server: &str) -> (f64, f64) {
    let labels = [("role", role), ("server", server)];
    (
        scrape.sum("connscope_connection_requests_count", &labels),
        scrape.sum("connscope_connection_requests_sum", &labels),
    )
}

/// Waits until the second agent of [`restart_with`] saw every connection close
/// (in every family: `/metrics` encodes them one after the other while events arrive).
pub fn scrape_after_restart(agent: &Agent, server: &str) -> anyhow::Result<Scrape> {
    let closed = (SHORT + 1) as f64;
    agent.scrape_until(WAIT, |s| {
        ["client", "server"].iter().all(|role| {
            let labels = [("role", *role), ("server", server)];
            requests_per_connection(s, role, server).0 >= closed
                && s.sum("connscope_connections_closed_total", &labels) >= closed
        })
    })
}

/// What the second agent reports: every connection with its full request count on both
/// ends, as if no restart had happened, and its counters go on from the first's last
/// answer (`first_last`, scraped until it stopped): a Prometheus sees neither a reset nor
/// a gap, so the second's `http_requests_total` alone is every request. The pooled
/// connection was opened under the first agent: the second counts only the short ones as
/// opened on top of the first's count, and adopts none. Where kprobes cannot stay
/// attached ([`transfers_stop_without_an_agent`]), the short connections are counted with
/// 0 requests each (their opens and closes come from pinned tracepoints). Exact on fexit
/// too: a call in flight while a trampoline is updated runs no fexit program, and the turn
/// it was is recovered at the connection's next call (`PinSlot::TakeoverEndNs`).
pub fn assert_nothing_lost(scrape: &Scrape, first_last: &Scrape, server: &str, pooled: u64) {
    let closed = (SHORT + 1) as f64;
    let all = (closed, (SHORT as u64 * SHORT_REQUESTS + pooled) as f64);
    let gap_uncounted = transfers_stop_without_an_agent(scrape);
    for role in ["client", "server"] {
        let labels = [("role", role), ("server", server)];
        let requests = scrape.sum("connscope_http_requests_total", &labels);
        let context = || format!("{role}: first\n{}\nsecond\n{}", first_last.text, scrape.text);
        let before = first_last.sum("connscope_http_requests_total", &labels);
        assert!(before > 0.0 && requests >= before, "carried on: {}", context());
        if gap_uncounted {
            assert!(requests < all.1, "{}", context());
        } else {
            assert_eq!(requests, all.1, "http_requests_total: {}", context());
        }
        let (count, sum) = requests_per_connection(scrape, role, server);
        if gap_uncounted {
            assert_eq!(count, closed, "{role}: {}", scrape.text);
            assert!(sum < all.1, "{role}: {}", scrape.text);
            let zero = [("role", role), ("server", server), ("le", "0.0")];
            let none = scrape.sum("connscope_connection_requests_bucket", &zero);
            assert_eq!(none, SHORT as f64, "{role}: {}", scrape.text);
        } else {
            assert_eq!(count, all.0, "{role}: {}", scrape.text);
            assert_eq!(sum, all.1, "{role}: requests per connection sum: {}", scrape.text);
        }
        let opened = scrape.sum("connscope_connections_opened_total", &labels);
        let opened_before = first_last.sum("connscope_connections_opened_total", &labels);
        assert_eq!((opened_before, opened), (1.0, 1.0 + SHORT as f64), "{role}: {}", context());
        let adopted = scrape.sum("connscope_connections_adopted_total", &labels);
        assert_eq!(adopted, 0.0, "{role}: {}", scrape.text);
        let closes = scrape.sum("connscope_connections_closed_total", &labels);
        assert_eq!(closes, closed, "{role}: {}", scrape.text);
    }
}
