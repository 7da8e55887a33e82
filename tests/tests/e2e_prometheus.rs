//! A real Prometheus (Debian's package) scrapes the real agent on loopback while the demo
//! traffic runs; every dashboard query and every recording rule must return data.

use std::time::Duration;

use connscope_tests::{Agent, demo::Demo, grafana, kernel_tests_enabled, prometheus::Prometheus};

/// Prometheus scrapes every 2 s; Grafana would pick 4 scrape intervals or more.
const RATE_INTERVAL: &str = "20s";

#[test]
fn every_dashboard_query_and_recording_rule_returns_data() -> anyhow::Result<()> {
    if !kernel_tests_enabled("every_dashboard_query_and_recording_rule_returns_data") {
        return Ok(());
    }
    let agent = Agent::start(&[])?;
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
