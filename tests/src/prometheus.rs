//! A real Prometheus (Debian's package) on loopback, scraping every 2 s, with the instant
//! query API.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{free_port, http_get};

pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Prometheus {
    /// Starts Prometheus with one scrape job `connscope`; `job_extra` is YAML added to the job
    /// (indented by four spaces: `scheme`, `tls_config`, `basic_auth`...).
    pub fn start(
        tag: &str,
        target: &str,
        job_extra: &str,
        rule_files: &[&Path],
    ) -> anyhow::Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("connscope-prometheus-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let rules: String =
            rule_files.iter().map(|rule| format!("  - {}\n", rule.display())).collect();
        let config = format!(
            "global:\n  scrape_interval: 2s\n  scrape_timeout: 2s\n  evaluation_interval: 2s\n\
             rule_files:\n{rules}\
             scrape_configs:\n  - job_name: connscope\n{job_extra}    static_configs:\n      - targets: ['{target}']\n"
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

    pub fn address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Instant query: the result vector, or the error Prometheus gave.
    pub fn query(&self, promql: &str) -> anyhow::Result<Vec<Value>> {
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
