//! A real Prometheus (Debian's package) scrapes the real agent on loopback while the demo
//! traffic runs; every dashboard query and every recording rule must return data.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use connscope_tests::{Agent, demo::Demo, free_port, grafana, http_get, kernel_tests_enabled};
use serde_json::Value;

/// Prometheus scrapes every 2 s; Grafana would pick 4 scrape intervals or more.
const RATE_INTERVAL: &str = "20s";

struct Prometheus {
    child: Child,
    dir: std::path::PathBuf,
    port: u16,
}

impl Prometheus {
    fn start(target: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("connscope-prometheus-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let rules = grafana::repo_root().join("deploy/prometheus/connscope-rules.yml");
        let config = format!(
            "global:\n  scrape_interval: 2s\n  scrape_timeout: 2s\n  evaluation_interval: 2s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: connscope\n    static_configs:\n      - targets: ['{target}']\n",
            rules.display()
        );
        std::fs::write(dir.join("prometheus.yml"), config)?;
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting prometheus (apt: prometheus)")?;
        let prometheus = Self { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !matches!(http_get(prometheus.address(), "/-/ready"), Ok((200, _))) {
            if Instant::now() > deadline {
                bail!("prometheus not ready");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(prometheus)
    }

    fn address(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Instant query: the result vector, or the error Prometheus gave.
    fn query(&self, promql: &str) -> anyhow::Result<Vec<Value>> {
        let (status, body) =
            http_get(self.address(), &format!("/api/v1/query?query={}", url_encode(promql)))?;
        let reply: Value =
            serde_json::from_str(&body).with_context(|| format!("HTTP {status}: {body}"))?;
        if reply["status"] != "success" {
            bail!("{}", reply["error"]);
        }
        Ok(reply["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn url_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn every_dashboard_query_and_recording_rule_returns_data() -> anyhow::Result<()> {
    if !kernel_tests_enabled("every_dashboard_query_and_recording_rule_returns_data") {
        return Ok(());
    }
    let agent = Agent::start(&[])?;
    let target = agent.address.to_string();
    let prometheus = Prometheus::start(&target)?;
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
    let rules: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(
        grafana::repo_root().join("deploy/prometheus/connscope-rules.yml"),
    )?)?;
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
