//! Restart loss (issue 10; crashes, issue 29): under wrk load against nginx, keep-alive,
//! `Connection: close` and HTTPS keep-alive (decrypted by the libssl uprobes, whose links
//! are pinned too), the agent is stopped with SIGTERM (graceful) or SIGKILL (a crash) and
//! started again, `restarts` times each, with its
//! kernel state pinned under a private path in /sys/fs/bpf (removed with `connscope
//! cleanup` at the end; where /sys/fs/bpf is no BPF filesystem, in one mounted for the
//! part alone). Each agent's counters go on from the one before it (`agent/src/exposition/carry.rs`),
//! so the last agent's counts are the whole run's; they are compared with nginx's own:
//! requests from its access log, connections from its `stub_status` (accepted connections,
//! also those that closed before sending a request). Also: the gap per restart, from
//! SIGTERM to the next agent answering `/readyz`, and the restarts at which a counter went
//! back (the next agent's first answer below the old one's last: a reset, which makes a
//! Prometheus lose what the old agent counted after its last scrape of it).
//!
//! An agent's last counts are its last answer to `/metrics`: it keeps answering while it
//! flushes the ring buffer and writes the handover after SIGTERM, and the bench scrapes it
//! until it stops. What it counted after the scrape just before SIGTERM is reported apart
//! (`counted_after_last_scrape_before_sigterm`): what a reset would have lost.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use connscope_tests::{
    Agent, Scrape,
    continuity::{BpfFs, cleanup},
    free_port, http_get,
    nginx::{Nginx, SelfSignedTls},
};
use serde_json::{Value, json};

use super::{
    Settings, bench_nginx, real_losses,
    report::{Figure, Part, Target},
    round, spread, wrk,
};

const ROLES: [&str; 2] = ["client", "server"];
/// How long the last agent may take to see every connection of the load closed.
const SETTLE: Duration = Duration::from_secs(10);

/// What one agent counted for the load's server, per role (client, server).
#[derive(Clone, Copy, Default)]
struct Counts {
    requests: [f64; 2],
    /// The requests-per-connection histogram's sum (closed connections).
    requests_of_closed: [f64; 2],
    /// Opened plus adopted: every connection the agent started to track.
    connections: [f64; 2],
    adopted: [f64; 2],
    closed: [f64; 2],
}

impl Counts {
    fn of(scrape: &Scrape, server: &str) -> Self {
        let mut counts = Self::default();
        for (i, role) in ROLES.iter().enumerate() {
            let labels = [("role", *role), ("server", server)];
            counts.requests[i] = scrape.sum("connscope_http_requests_total", &labels);
            counts.requests_of_closed[i] = scrape.sum("connscope_connection_requests_sum", &labels);
            counts.adopted[i] = scrape.sum("connscope_connections_adopted_total", &labels);
            counts.connections[i] =
                scrape.sum("connscope_connections_opened_total", &labels) + counts.adopted[i];
            counts.closed[i] = scrape.sum("connscope_connections_closed_total", &labels);
        }
        counts
    }

    fn fields(&self) -> [&[f64; 2]; 5] {
        [&self.requests, &self.requests_of_closed, &self.connections, &self.adopted, &self.closed]
    }

    /// Each count combined with `other`'s by `f`.
    fn combine(&self, other: &Self, f: impl Fn(f64, f64) -> f64) -> Self {
        let mut out = *self;
        let theirs = other.fields();
        let mine = [
            &mut out.requests,
            &mut out.requests_of_closed,
            &mut out.connections,
            &mut out.adopted,
            &mut out.closed,
        ];
        for (mine, theirs) in mine.into_iter().zip(theirs) {
            for i in 0..2 {
                mine[i] = f(mine[i], theirs[i]);
            }
        }
        out
    }

    fn add(&mut self, other: &Self) {
        *self = self.combine(other, |a, b| a + b);
    }

    /// Whether any count is below `earlier`'s: a counter reset.
    fn went_back_from(&self, earlier: &Self) -> bool {
        self.minus(earlier).fields().iter().copied().flatten().any(|d| *d < 0.0)
    }

    fn minus(&self, earlier: &Self) -> Self {
        self.combine(earlier, |a, b| a - b)
    }

    /// What Prometheus's `increase()` adds for this answer after `earlier`: the difference,
    /// or the whole count after a reset.
    fn increase_since(&self, earlier: &Self) -> Self {
        self.combine(earlier, |now, then| if now >= then { now - then } else { now })
    }

    fn to_json(self) -> Value {
        let by_role = |values: &[f64; 2]| json!({ "client": values[0], "server": values[1] });
        json!({
            "requests": by_role(&self.requests),
            "connection_requests_sum": by_role(&self.requests_of_closed),
            "connections_opened_or_adopted": by_role(&self.connections),
            "connections_adopted": by_role(&self.adopted),
            "connections_closed": by_role(&self.closed),
        })
    }
}

/// With the decryption budget off: the HTTPS mode compares `http_requests_total` with
/// nginx's log across restarts, and under the budget a saturating wrk leaves decryption
/// after each start (its requests then count as `unread` only once the new agent has seen
/// it speak HTTP decrypted). The budget's own exactness is `e2e_decryption_budget`'s.
fn start_agent(pin_path: &str) -> anyhow::Result<Agent> {
    Agent::start(&["--bpf.pin-path", pin_path, "--tls.budget", "0"])
}

/// How each agent is stopped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGTERM: the agent drains the ring buffer and leaves a handover.
    Graceful,
    /// SIGKILL: a crash (an OOM kill, an eviction, a panic).
    Crash,
}

impl Stop {
    const ALL: [Self; 2] = [Self::Graceful, Self::Crash];

    fn signal(self) -> i32 {
        match self {
            Self::Graceful => libc::SIGTERM,
            Self::Crash => libc::SIGKILL,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Graceful => "SIGTERM",
            Self::Crash => "SIGKILL",
        }
    }
}

/// What a stopped agent counted.
struct Stopped {
    /// At the scrape just before the signal.
    before: Counts,
    /// At its last answer.
    last: Counts,
    /// `events_lost_total` but `untracked_socket`, by reason, at its last answer (the
    /// kernel's part is pinned with the rest: the sum over the agents so far).
    losses: BTreeMap<String, f64>,
    /// SIGTERM to exit.
    took: Duration,
}

/// Signals the agent (`stop`), then scrapes until it stops answering (a killed one answers
/// no more: its last answer is the scrape before).
fn stop_agent(agent: Agent, server: &str, stop: Stop) -> anyhow::Result<Stopped> {
    let scrape = agent.scrape()?;
    let before = Counts::of(&scrape, server);
    let mut losses = real_losses(&scrape);
    let signalled = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.pid() as i32, stop.signal()) };
    let mut last = before;
    while let Ok(scrape) = agent.scrape() {
        last = Counts::of(&scrape, server);
        losses = real_losses(&scrape);
    }
    // Reaps the child (a SIGTERM to a stopping or killed agent changes nothing).
    let (code, _) = agent.stop()?;
    let took = signalled.elapsed();
    let expected = if stop == Stop::Graceful { Some(0) } else { None };
    ensure!(code == expected, "the agent exited with {code:?} after {}", stop.name());
    Ok(Stopped { before, last, losses, took })
}

/// nginx's `stub_status`: (accepted connections, requests), each including the status
/// request's own.
fn stub_status(address: SocketAddr) -> anyhow::Result<(f64, f64)> {
    let (status, body) = http_get(address, "/")?;
    ensure!(status == 200, "stub_status answered {status}");
    let mut lines = body.lines().skip_while(|l| !l.starts_with("server accepts"));
    let numbers: Vec<f64> = lines
        .nth(1)
        .map(|l| l.split_whitespace().filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_default();
    match numbers[..] {
        [accepts, _handled, requests] => Ok((accepts, requests)),
        _ => bail!("no counts in stub_status: {body:.200}"),
    }
}

/// `/sys/fs/bpf` when it is a BPF filesystem (as systemd mounts it), else a private one.
fn bpf_dir() -> anyhow::Result<(String, Option<BpfFs>)> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let path = c"/sys/fs/bpf";
    // SAFETY: statfs with a NUL-terminated path and a zeroed out-struct.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mounted = unsafe { libc::statfs(path.as_ptr(), &mut stat) } == 0
        && stat.f_type as i64 == BPF_FS_MAGIC;
    if mounted {
        return Ok(("/sys/fs/bpf".to_owned(), None));
    }
    let fs = BpfFs::mount("bench")?;
    Ok((fs.mount.to_string_lossy().into_owned(), Some(fs)))
}

/// The loads the restarts run under.
#[derive(Clone, Copy, PartialEq)]
enum Load {
    KeepAlive,
    Close,
    /// Keep-alive over TLS, which the libssl uprobes decrypt (wrk links the system's libssl).
    HttpsKeepAlive,
}

impl Load {
    const ALL: [Self; 3] = [Self::KeepAlive, Self::Close, Self::HttpsKeepAlive];

    fn label(self) -> &'static str {
        match self {
            Self::KeepAlive => "keep-alive",
            Self::Close => "Connection: close",
            Self::HttpsKeepAlive => "HTTPS keep-alive",
        }
    }

    /// The report's key for the mode's details.
    fn key(self) -> &'static str {
        match self {
            Self::KeepAlive => "keepalive",
            Self::Close => "close",
            Self::HttpsKeepAlive => "https_keepalive",
        }
    }
}

/// One load mode: the restarts, and the comparison with nginx.
struct ModeRun {
    mode: String,
    load: Load,
    stop: Stop,
    nginx_requests: f64,
    nginx_connections: f64,
    wrk_requests: u64,
    wrk_errors: u64,
    wrk_cpu_seconds: f64,
    /// The whole run's counts as Prometheus would have them, scraping each agent at its
    /// start and at its end: the sum of `increase()` over the answers, so a counter reset
    /// (a new agent starting from 0) keeps what came before it. Without resets, the last
    /// agent's last answer.
    counted: Counts,
    /// Each agent's last answer, in order.
    per_agent: Vec<Counts>,
    /// Restarts after which the next agent's first answer was below the old one's last.
    resets: usize,
    after_last_scrape: Counts,
    /// The last agent's losses (see [`Stopped::losses`]).
    losses: BTreeMap<String, f64>,
    stop_seconds: Vec<f64>,
    gap_seconds: Vec<f64>,
}

impl ModeRun {
    /// Largest difference over both roles: nginx's count against the last agent's.
    fn requests_lost(&self) -> f64 {
        self.counted.requests.iter().map(|c| (self.nginx_requests - c).abs()).fold(0.0, f64::max)
    }

    fn connections_lost(&self) -> f64 {
        self.counted
            .connections
            .iter()
            .chain(&self.counted.closed)
            .map(|c| (self.nginx_connections - c).abs())
            .fold(0.0, f64::max)
    }
}

fn run_mode(
    settings: &Settings,
    load: Load,
    stop: Stop,
    pin_path: &str,
) -> anyhow::Result<ModeRun> {
    let mode = format!("{}, {}", load.label(), stop.name());
    let status = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut extra =
        format!("server {{ listen {status}; access_log off; location / {{ stub_status; }} }}\n");
    // HTTPS: a TLS listener of the same nginx, logging to the same access log (the
    // certificate's directory lives as long as nginx).
    let https = if load == Load::HttpsKeepAlive {
        let (tls, port) = (SelfSignedTls::new("bench-restart")?, free_port());
        extra.push_str(&format!(
            "server {{ listen 127.0.0.1:{port} ssl; {} root html; }}\n",
            tls.directives
        ));
        Some((tls, format!("127.0.0.1:{port}")))
    } else {
        None
    };
    let nginx = Nginx::start_with(bench_nginx(), &extra)?;
    let (server, url) = match &https {
        Some((_, server)) => (server.clone(), format!("https://{server}/index.html")),
        None => (nginx.server(), nginx.url("/index.html")),
    };
    let run = Duration::from_millis(settings.restart_run_ms);
    cleanup(pin_path)?;
    let mut agent = start_agent(pin_path)?;
    ensure!(Path::new(pin_path).join("maps").is_dir(), "the agent pinned nothing under {pin_path}");
    // Prometheus's view: each agent's first and last answers, in order.
    let (mut counted, mut previous) = (Counts::default(), Counts::default());
    let mut observe = |answer: Counts| {
        counted.add(&answer.increase_since(&previous));
        previous = answer;
    };
    observe(Counts::of(&agent.scrape()?, &server));
    let (accepts_before, requests_before) = stub_status(status)?;
    // Bounded: interrupted after the restarts, at most this long in any case.
    let bound = settings.restarts as u64 * (settings.restart_run_ms / 1000 + 35) + 30;
    let wrk_load = wrk::spawn(&url, bound, load == Load::Close)?;
    let mut after_last_scrape = Counts::default();
    let (mut per_agent, mut resets) = (Vec::new(), 0);
    let (mut stop_seconds, mut gap_seconds) = (Vec::new(), Vec::new());
    for restart in 1..=settings.restarts {
        thread::sleep(run);
        let signalled = Instant::now();
        let stopped = stop_agent(agent, &server, stop)?;
        agent = start_agent(pin_path)?;
        let gap = signalled.elapsed();
        let first = Counts::of(&agent.scrape()?, &server);
        if first.went_back_from(&stopped.last) {
            resets += 1;
        }
        observe(stopped.before);
        observe(stopped.last);
        observe(first);
        per_agent.push(stopped.last);
        after_last_scrape.add(&stopped.last.minus(&stopped.before));
        stop_seconds.push(stopped.took.as_secs_f64());
        gap_seconds.push(gap.as_secs_f64());
        eprintln!(
            "bench: restart loss, {mode}, restart {restart}: exit {:.3} s, ready again {:.3} s after {}",
            stopped.took.as_secs_f64(),
            gap.as_secs_f64(),
            stop.name()
        );
    }
    thread::sleep(run);
    let result = wrk::interrupt(wrk_load)?;
    // Every connection of the load is closed now: wait until the last agent saw them all.
    let settled = |s: &Scrape| {
        ROLES.iter().all(|role| {
            s.sum("connscope_connections_open", &[("role", *role), ("server", &server)]) == 0.0
        })
    };
    agent.scrape_until(SETTLE, settled)?;
    // The last agent stops gracefully in either mode: its final counts are all there.
    let stopped = stop_agent(agent, &server, Stop::Graceful)?;
    observe(stopped.before);
    observe(stopped.last);
    per_agent.push(stopped.last);
    after_last_scrape.add(&stopped.last.minus(&stopped.before));
    let (accepts_after, requests_after) = stub_status(status)?;
    let logged = std::fs::read_to_string(nginx.dir.join("access.log"))
        .context("reading nginx's access log")?
        .lines()
        .count() as f64;
    // The later status request counts itself once in each.
    let (nginx_connections, status_requests) =
        (accepts_after - accepts_before - 1.0, requests_after - requests_before - 1.0);
    ensure!(
        status_requests == logged,
        "nginx's access log ({logged}) and stub_status ({status_requests}) disagree"
    );
    Ok(ModeRun {
        mode,
        load,
        stop,
        nginx_requests: logged,
        nginx_connections,
        wrk_requests: result.requests,
        wrk_errors: result.errors,
        wrk_cpu_seconds: result.cpu_seconds,
        counted,
        per_agent,
        resets,
        after_last_scrape,
        losses: stopped.losses,
        stop_seconds,
        gap_seconds,
    })
}

fn figures(run: &ModeRun, restarts: usize) -> Vec<Figure> {
    let (requests, connections) = (run.requests_lost(), run.connections_lost());
    let restarts = match run.stop {
        Stop::Graceful => format!("{restarts} restarts"),
        Stop::Crash => format!("{restarts} SIGKILLs"),
    };
    let gap = spread(&run.gap_seconds);
    let c = &run.counted;
    vec![
        Figure::new(
            format!("requests lost across {restarts} restarts, {}", run.mode),
            requests,
            format!(
                "{requests} (of {}; client {}, server {})",
                run.nginx_requests, c.requests[0], c.requests[1]
            ),
            Target::AtMost(0.0),
        ),
        Figure::new(
            format!("connections lost across {restarts} restarts, {}", run.mode),
            connections,
            format!(
                "{connections} (of {}; tracked {}/{}, closed {}/{})",
                run.nginx_connections, c.connections[0], c.connections[1], c.closed[0], c.closed[1]
            ),
            Target::AtMost(0.0),
        ),
        Figure::new(
            format!("counter resets across {restarts} restarts, {}", run.mode),
            run.resets as f64,
            format!(
                "{} (counted after the scrape before each {}: client {}, server {} requests)",
                run.resets,
                run.stop.name(),
                run.after_last_scrape.requests[0],
                run.after_last_scrape.requests[1]
            ),
            Target::AtMost(0.0),
        ),
        Figure::new(
            format!("restart gap (signal to next agent ready), {}", run.mode),
            gap.median,
            format!("{} s", gap.shown(3)),
            Target::None,
        ),
    ]
}

pub fn restart_loss(settings: &Settings) -> anyhow::Result<Part> {
    // Unmounted (if mounted here) when the part ends.
    let (dir, _private) = bpf_dir()?;
    let pin_path = format!("{dir}/connscope-bench-{}", std::process::id());
    let modes = Load::ALL.into_iter().flat_map(|load| Stop::ALL.map(|stop| (load, stop)));
    let runs: Vec<_> = modes
        .map(|(load, stop)| {
            let run = run_mode(settings, load, stop, &pin_path);
            // Nothing stays pinned or attached after the part, whatever happened.
            let cleaned = cleanup(&pin_path);
            run.and_then(|run| cleaned.map(|_| run))
        })
        .collect();
    let mut details = serde_json::Map::new();
    details.insert("pin_path".into(), json!(pin_path));
    details.insert("restarts".into(), json!(settings.restarts));
    details.insert("seconds_per_agent".into(), json!(settings.restart_run_ms as f64 / 1000.0));
    let mut all = Vec::new();
    for run in runs {
        let run = run?;
        all.extend(figures(&run, settings.restarts));
        let wrk = match run.load {
            Load::KeepAlive => "wrk -t1 -c16 http://…",
            Load::Close => "wrk -t1 -c16 -H 'Connection: close' http://…",
            Load::HttpsKeepAlive => "wrk -t1 -c16 https://…",
        };
        let key = match run.stop {
            Stop::Graceful => run.load.key().to_owned(),
            Stop::Crash => format!("{}_sigkill", run.load.key()),
        };
        details.insert(
            key,
            json!({
                "mode": run.mode,
                "wrk": format!("{wrk}, interrupted after the restarts"),
                "nginx_requests_logged": run.nginx_requests,
                "nginx_connections_accepted": run.nginx_connections,
                "wrk_requests": run.wrk_requests,
                "wrk_errors": run.wrk_errors,
                "wrk_cpu_seconds": round(run.wrk_cpu_seconds, 3),
                "requests_lost": run.requests_lost(),
                "connections_lost": run.connections_lost(),
                "counted_by_the_agents": run.counted.to_json(),
                "counter_resets": run.resets,
                "counted_by_each_agent": run.per_agent.iter().map(|c| c.to_json()).collect::<Vec<_>>(),
                "events_lost_by_reason": run.losses,
                "counted_after_last_scrape_before_signal": run.after_last_scrape.to_json(),
                "exit_seconds": run.stop_seconds.iter().map(|s| round(*s, 3)).collect::<Vec<_>>(),
                "gap_seconds": spread(&run.gap_seconds).to_json(),
            }),
        );
    }
    Ok(Part { key: "restart_loss", details: Value::Object(details), figures: all })
}
