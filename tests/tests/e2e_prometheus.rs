//! A real Prometheus (Debian's package) scrapes the real agent on loopback while the demo
//! traffic runs; every dashboard query and every recording rule must return data. And a
//! Prometheus that scrapes the agent across a restart, or across a SIGKILL, sees no counter
//! reset and no gap.

use std::{
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use connscope_tests::{
    Agent,
    continuity::{BpfFs, Stop},
    demo::Demo,
    free_port, grafana, http_server, kernel_test, net,
    prometheus::Prometheus,
};

/// Prometheus scrapes every 2 s; Grafana would pick 4 scrape intervals or more.
const RATE_INTERVAL: &str = "20s";

kernel_test!(
    fn every_dashboard_query_and_recording_rule_returns_data() -> anyhow::Result<()> {
        // With pinned state, as deployed: the crash checkpoint's panel has data then.
        let fs = BpfFs::mount("prometheus-dashboards")?;
        let agent = fs.agent()?;
        let target = agent.address.to_string();
        let rule_file = grafana::repo_root().join("deploy/prometheus/connscope-rules.yml");
        let prometheus = Prometheus::start("dashboards", &target, "", &[&rule_file])?;
        let (demo, _servers) = Demo::start(Duration::from_secs(45))?;
        demo.wait();

        let values = [("job", "connscope"), ("instance", target.as_str()), ("namespace", ".*")];
        let mut checked = 0;
        let mut empty = vec![];
        for (dashboard, json) in grafana::dashboards()? {
            for (panel, expr) in grafana::panel_queries(&json) {
                let promql = grafana::substitute(&expr, RATE_INTERVAL, &values)?;
                checked += 1;
                match prometheus.query(&promql) {
                    Ok(result) if !result.is_empty() => {}
                    Ok(_) => empty.push(format!("{dashboard} / {panel}: empty: {promql}")),
                    Err(err) => empty.push(format!("{dashboard} / {panel}: error {err}: {promql}")),
                }
            }
        }
        let rules: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&rule_file)?)?;
        for group in rules["groups"].as_sequence().into_iter().flatten() {
            for rule in group["rules"].as_sequence().into_iter().flatten() {
                if let Some(record) = rule["record"].as_str() {
                    checked += 1;
                    match prometheus.query(record) {
                        Ok(result) if !result.is_empty() => {}
                        Ok(_) => empty.push(format!("recording rule {record}: empty")),
                        Err(err) => empty.push(format!("recording rule {record}: {err}")),
                    }
                }
            }
        }
        eprintln!("{checked} queries evaluated by Prometheus, {} without data", empty.len());
        assert!(checked > 50, "only {checked} queries found");
        assert!(empty.is_empty(), "queries without data:\n{}", empty.join("\n"));
        Ok(())
    }
);

/// The one value of an instant query that returns a single series, if it returned one.
fn single_value(prometheus: &Prometheus, promql: &str) -> anyhow::Result<Option<f64>> {
    let result = prometheus.query(promql)?;
    Ok(match result.as_slice() {
        [series] => series["value"][1].as_str().and_then(|v| v.parse().ok()),
        _ => None,
    })
}

kernel_test!(
    /// An agent restarted with pinned state at the same address, under a pooled connection's
    /// requests: the counters Prometheus scraped go on from the first agent's values
    /// (`resets()` 0), and the last value is every request the client made, those the first
    /// agent counted after Prometheus' last scrape of it included. Without carried values the
    /// last value would be the second agent's requests alone, and `resets()` 1.
    fn a_prometheus_scraping_across_a_restart_sees_every_request_and_no_reset() -> anyhow::Result<()>
    {
        scraped_across("restart", Stop::Graceful)
    }
);

kernel_test!(
    /// The same across a SIGKILL: no handover, the second agent recovers the first's
    /// counters and the requests it counted after its last scrape from its checkpoint.
    fn a_prometheus_scraping_across_a_crash_sees_every_request_and_no_reset() -> anyhow::Result<()>
    {
        scraped_across("crash", Stop::Crash)
    }
);

/// A Prometheus scraping an agent that `stop_how` ends under a pooled connection's
/// requests, and its successor at the same address: it sees every request and no reset.
fn scraped_across(name: &str, stop_how: Stop) -> anyhow::Result<()> {
    // 20 ms apart: 3 s, longer than Prometheus' 2 s scrape interval.
    const PER_AGENT: u64 = 150;
    let fs = BpfFs::mount(&format!("prometheus-{name}"))?;
    let pin_path = fs.pin_path();
    let pinned = ["--bpf.pin-path", pin_path.as_str()];
    let port = free_port();
    let first = Agent::start_on(port, &pinned, None)?;
    let prometheus = Prometheus::start(name, &first.address.to_string(), "", &[])?;
    let listener = TcpListener::bind(match stop_how {
        Stop::Graceful => "127.0.0.86:0",
        Stop::Crash => "127.0.0.87:0",
    })?;
    let server = listener.local_addr()?.to_string();
    let server_thread = http_server::serve(listener, 1, http_server::ServerBehaviour::default());
    let mut client = TcpStream::connect(&server)?;
    let requests = |client: &mut TcpStream| -> anyhow::Result<()> {
        for _ in 0..PER_AGENT {
            http_server::request(client, "1.1", "")?;
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    };
    let client_series =
        format!("connscope_http_requests_total{{role=\"client\",server=\"{server}\"}}");
    requests(&mut client)?;
    // Prometheus has scraped the first agent's counts (so a reset would show)...
    let deadline = Instant::now() + Duration::from_secs(15);
    while single_value(&prometheus, &client_series)?.is_none_or(|v| v == 0.0) {
        anyhow::ensure!(Instant::now() < deadline, "Prometheus never scraped the first agent");
        std::thread::sleep(Duration::from_millis(200));
    }
    // ... and the first agent is stopped right after more requests: those after
    // Prometheus' last scrape of it are exported only by the next agent.
    requests(&mut client)?;
    match stop_how {
        Stop::Graceful => {
            let (code, _) = first.stop()?;
            anyhow::ensure!(code == Some(0), "the first agent exited with {code:?}");
        }
        Stop::Crash => {
            let (_, signal) = first.kill_after_scrape()?;
            anyhow::ensure!(signal == Some(libc::SIGKILL), "the first agent ended with {signal:?}");
        }
    }
    let second = Agent::start_on(port, &pinned, None)?;
    requests(&mut client)?;
    drop(client);
    net::join(server_thread)?;

    let total = (3 * PER_AGENT) as f64;
    for role in ["client", "server"] {
        let series =
            format!("connscope_http_requests_total{{role=\"{role}\",server=\"{server}\"}}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = single_value(&prometheus, &series)?;
        while last != Some(total) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            last = single_value(&prometheus, &series)?;
        }
        let context = || {
            format!(
                "{role}: the agent says\n{}",
                second.scrape().map(|s| s.text).unwrap_or_default()
            )
        };
        assert_eq!(last, Some(total), "last value Prometheus scraped: {}", context());
        let resets = single_value(&prometheus, &format!("resets({series}[5m])"))?;
        assert_eq!(resets, Some(0.0), "{}", context());
    }
    Ok(())
}
