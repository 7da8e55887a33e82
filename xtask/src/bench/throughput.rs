//! Throughput in three arms, alternating in one run: no observer, the floor
//! (`connscope bench-floor`) and connscope; keep-alive and `Connection: close`. In the
//! connscope arm: events lost at that rate, events per request and the agent's CPU time.

use std::{collections::BTreeMap, thread, time::Duration};

use anyhow::ensure;
use connscope_tests::{Agent, Scrape, procfs::cpu_seconds};
use serde_json::json;

use super::{
    Settings,
    floor::Floor,
    real_losses,
    report::{Figure, Part, Target},
    round, spread, whole_rates,
    wrk::{WrkResult, wrk},
};

/// CPU time (user + system) of our descendant processes named `comm` (the bench's nginx:
/// its master and workers), from `/proc`.
fn descendant_cpu_seconds(comm: &str) -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0.0 };
    let mut parent = BTreeMap::new();
    let mut named = Vec::new();
    for pid in entries.flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()) {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some((head, rest)) = stat.rsplit_once(')') else { continue };
        let Some(ppid) = rest.split_whitespace().nth(1).and_then(|v| v.parse::<u32>().ok()) else {
            continue;
        };
        parent.insert(pid, ppid);
        if head.split_once('(').is_some_and(|(_, name)| name == comm) {
            named.push(pid);
        }
    }
    let me = std::process::id();
    let descends = |mut pid: u32| {
        for _ in 0..64 {
            match parent.get(&pid) {
                Some(&ppid) if ppid == me => return true,
                Some(&ppid) if ppid > 1 => pid = ppid,
                _ => return false,
            }
        }
        false
    };
    named.into_iter().filter(|&pid| descends(pid)).filter_map(|pid| cpu_seconds(pid).ok()).sum()
}

/// One wrk run's throughput and the CPU per request of everything the run needs: nginx,
/// wrk and the observer (floor or agent, by pid). On a saturated host every cycle an
/// observer costs is a cycle nginx or wrk lacks, so `cpu_none / cpu_arm` is the throughput
/// ratio without the host's noise: CPU accounting leaves out time stolen by a hypervisor,
/// which wall-clock req/s do not.
struct Arm {
    cpu_per_request: f64,
}

fn measured_run(
    url: &str,
    seconds: u64,
    close: bool,
    observer: Option<u32>,
) -> anyhow::Result<(WrkResult, Arm)> {
    let observer_cpu = || observer.and_then(|pid| cpu_seconds(pid).ok()).unwrap_or(0.0);
    let (nginx_before, observer_before) = (descendant_cpu_seconds("nginx"), observer_cpu());
    let result = wrk(url, seconds, close)?;
    let cpu = descendant_cpu_seconds("nginx") - nginx_before + result.cpu_seconds + observer_cpu()
        - observer_before;
    let arm = Arm { cpu_per_request: cpu / result.requests.max(1) as f64 };
    Ok((result, arm))
}

/// What the connscope arm saw besides throughput.
#[derive(Default)]
struct AgentLoad {
    cpu_seconds: f64,
    requests: u64,
    events: f64,
    losses: BTreeMap<String, f64>,
}

fn events_received(scrape: &Scrape) -> f64 {
    scrape.sum("connscope_events_received_total", &[])
}

/// One wrk run with connscope attached, adding what it cost to `load`.
fn connscope_arm(
    url: &str,
    seconds: u64,
    close: bool,
    load: &mut AgentLoad,
) -> anyhow::Result<(WrkResult, Arm)> {
    let agent = Agent::start(&[])?;
    let before = agent.scrape()?;
    let cpu_before = cpu_seconds(agent.pid())?;
    let (result, arm) = measured_run(url, seconds, close, Some(agent.pid()))?;
    let cpu_after = cpu_seconds(agent.pid())?;
    // Let the agent drain what the kernel queued before reading its counters.
    thread::sleep(Duration::from_millis(300));
    let after = agent.scrape()?;
    let (code, _) = agent.stop()?;
    ensure!(code == Some(0), "the agent exited with {code:?}");
    let before_losses = real_losses(&before);
    for (reason, value) in real_losses(&after) {
        *load.losses.entry(reason.clone()).or_default() +=
            value - before_losses.get(&reason).copied().unwrap_or(0.0);
    }
    load.cpu_seconds += cpu_after - cpu_before;
    load.requests += result.requests;
    load.events += events_received(&after) - events_received(&before);
    Ok((result, arm))
}

pub fn throughput(settings: &Settings, url: &str, close: bool) -> anyhow::Result<Part> {
    let mode = if close { "Connection: close" } else { "keep-alive" };
    // Warm-up (page cache, nginx, TCP) before the measured runs.
    wrk(url, 1, close)?;
    let (mut none, mut floor, mut connscope) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cpu_none, mut cpu_floor, mut cpu_connscope) = (Vec::new(), Vec::new(), Vec::new());
    let mut load = AgentLoad::default();
    let mut errors = 0;
    for round in 1..=settings.pairs {
        let (a, arm_none) = measured_run(url, settings.seconds, close, None)?;
        let running = Floor::start()?;
        let (f, arm_floor) = measured_run(url, settings.seconds, close, Some(running.pid()))?;
        running.stop()?;
        let (c, arm_connscope) = connscope_arm(url, settings.seconds, close, &mut load)?;
        cpu_none.push(arm_none.cpu_per_request);
        cpu_floor.push(arm_floor.cpu_per_request);
        cpu_connscope.push(arm_connscope.cpu_per_request);
        errors += a.errors + f.errors + c.errors;
        eprintln!(
            "bench: {mode} round {round}: none {:.0}, floor {:.0}, connscope {:.0} req/s; connscope/none {:.3}, connscope/floor {:.3}",
            a.requests_per_second,
            f.requests_per_second,
            c.requests_per_second,
            c.requests_per_second / a.requests_per_second,
            c.requests_per_second / f.requests_per_second
        );
        none.push(a.requests_per_second);
        floor.push(f.requests_per_second);
        connscope.push(c.requests_per_second);
    }
    let ratio = |over: &[f64], under: &[f64]| -> Vec<f64> {
        over.iter().zip(under).map(|(o, u)| o / u).collect()
    };
    // CPU per request: the ratio is none's cost over the arm's (higher is better, like req/s).
    let cpu_vs_none = spread(&ratio(&cpu_none, &cpu_connscope));
    let cpu_vs_floor = spread(&ratio(&cpu_floor, &cpu_connscope));
    let vs_none = spread(&ratio(&connscope, &none));
    let vs_floor = spread(&ratio(&connscope, &floor));
    let floor_vs_none = spread(&ratio(&floor, &none));
    let per_10k = load.cpu_seconds / load.requests.max(1) as f64 * 10_000.0;
    let events_per_request = load.events / load.requests.max(1) as f64;
    let lost_total: f64 = load.losses.values().sum();
    let details = json!({
        "mode": mode,
        "wrk": format!("wrk -t1 -c16 -d{}s{} {url}", settings.seconds, if close { " -H 'Connection: close'" } else { "" }),
        "rounds": settings.pairs,
        "none_rps": whole_rates(&none),
        "floor_rps": whole_rates(&floor),
        "connscope_rps": whole_rates(&connscope),
        "connscope_over_none": vs_none.to_json(),
        "connscope_over_floor": vs_floor.to_json(),
        "floor_over_none": floor_vs_none.to_json(),
        "cpu_us_per_request": {
            "none": cpu_none.iter().map(|v| round(v * 1e6, 3)).collect::<Vec<_>>(),
            "floor": cpu_floor.iter().map(|v| round(v * 1e6, 3)).collect::<Vec<_>>(),
            "connscope": cpu_connscope.iter().map(|v| round(v * 1e6, 3)).collect::<Vec<_>>(),
        },
        "cpu_none_over_connscope": cpu_vs_none.to_json(),
        "cpu_floor_over_connscope": cpu_vs_floor.to_json(),
        "wrk_errors": errors,
        "requests_with_agent": load.requests,
        "events_received_with_agent": load.events,
        "events_per_request": round(events_per_request, 4),
        // In close mode every request is a connection.
        "agent_cpu_seconds_per_10k": round(per_10k, 4),
        "agent_cpu_per_10k_unit": if close { "connections (one request each)" } else { "requests" },
        "events_lost": load.losses,
        "events_lost_total": lost_total,
    });
    let mut figures = vec![
        vs_none.figure(format!("{mode} req/s, connscope / none"), Target::AtLeast(0.95)),
        vs_floor.figure(
            format!("{mode} req/s, connscope / floor"),
            if close { Target::None } else { Target::AtLeast(0.97) },
        ),
        floor_vs_none.figure(format!("{mode} req/s, floor / none"), Target::None),
        cpu_vs_none.figure(
            format!("{mode} CPU per request (nginx + wrk + observer), none / connscope"),
            Target::AtLeast(0.95),
        ),
        cpu_vs_floor.figure(
            format!("{mode} CPU per request, floor / connscope"),
            if close { Target::None } else { Target::AtLeast(0.97) },
        ),
        Figure::new(
            format!("events lost at {mode} load"),
            lost_total,
            format!("{lost_total}"),
            Target::AtMost(0.0),
        ),
    ];
    if close {
        figures.push(Figure::new(
            "agent CPU per 10k connections (one request each)",
            per_10k,
            format!("{per_10k:.4} s"),
            Target::None,
        ));
    } else {
        figures.push(Figure::new(
            "events to userspace per steady keep-alive request",
            events_per_request,
            format!("{events_per_request:.3}"),
            Target::AtMost(0.1),
        ));
        figures.push(Figure::new(
            "agent CPU per 10k keep-alive requests",
            per_10k,
            format!("{per_10k:.4} s"),
            Target::AtMost(0.003),
        ));
    }
    let key = if close { "throughput_close" } else { "throughput_keepalive" };
    Ok(Part { key, details, figures })
}
