//! Flags (exporter style, each with an environment variable) and the optional YAML file.
//!
//! Precedence: flag > environment variable > `--config.file` > built-in default.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::PathBuf,
};

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};
use serde::Deserialize;

/// Which hook mechanism to use for `tcp_connect`, `tcp_close`, `tcp_sendmsg`, `tcp_recvmsg`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// fentry/fexit where the kernel allows, else kprobes, else tracepoints (per hook).
    Auto,
    Fentry,
    Kprobe,
    Tracepoint,
}

#[derive(Debug, Parser)]
#[command(
    name = "connscope",
    version,
    about = "eBPF agent: HTTP connection reuse, idle time, who closes and why, churn; Prometheus metrics"
)]
pub struct Cli {
    /// Address to serve /metrics, /healthz, /readyz and / on (":9477" means all addresses).
    #[arg(long = "web.listen-address", env = "CONNSCOPE_WEB_LISTEN_ADDRESS")]
    pub listen_address: Option<String>,

    /// Log level: error, warn, info, debug or trace.
    #[arg(long = "log.level", env = "CONNSCOPE_LOG_LEVEL")]
    pub log_level: Option<String>,

    /// Optional YAML file with the same settings (keys as in the flags, e.g. `web.listen-address`).
    #[arg(long = "config.file", env = "CONNSCOPE_CONFIG_FILE")]
    pub config_file: Option<PathBuf>,

    /// Hook backend: auto picks fentry, then kprobe, then tracepoint for each hook.
    #[arg(long = "probe.backend", env = "CONNSCOPE_PROBE_BACKEND", value_enum)]
    pub backend: Option<Backend>,

    /// Connections tracked at once in the kernel map; beyond it new ones are counted in
    /// connscope_events_lost_total{reason="map_full"}.
    #[arg(long = "bpf.max-connections", env = "CONNSCOPE_BPF_MAX_CONNECTIONS")]
    pub max_connections: Option<u32>,

    /// Size of the kernel-to-agent ring buffer in bytes (a power of two, at least 4096).
    #[arg(long = "bpf.ringbuf-bytes", env = "CONNSCOPE_BPF_RINGBUF_BYTES")]
    pub ringbuf_bytes: Option<u32>,

    /// BPF filesystem directory where the kernel state is pinned, so programs stay attached
    /// and counting while no agent runs and the next agent takes over; "" turns pinning
    /// off (the programs detach when the agent exits).
    #[arg(long = "bpf.pin-path", env = "CONNSCOPE_BPF_PIN_PATH")]
    pub pin_path: Option<String>,

    /// Distinct `server` label values: the first ones seen keep their label, the rest are
    /// reported as "other" (a strict bound on the number of series).
    #[arg(long = "metrics.max-servers", env = "CONNSCOPE_METRICS_MAX_SERVERS")]
    pub max_servers: Option<usize>,

    /// Distinct `process` label values; the rest are reported as "other".
    #[arg(long = "metrics.max-processes", env = "CONNSCOPE_METRICS_MAX_PROCESSES")]
    pub max_processes: Option<usize>,

    /// Read the first bytes of each request/response turn to parse HTTP/1.x heads. Off: only
    /// protocol-agnostic exchange counting (no payload is read at all).
    #[arg(long = "http.capture-heads", env = "CONNSCOPE_HTTP_CAPTURE_HEADS")]
    pub capture_heads: Option<bool>,

    /// cgroup v2 mount used to resolve pod and container of a connection's process.
    #[arg(long = "path.cgroup", env = "CONNSCOPE_PATH_CGROUP")]
    pub cgroup_path: Option<PathBuf>,

    /// Directory holding the kubelet's `pods/` and `containers/` log trees (usually /var/log).
    #[arg(long = "path.kubelet-logs", env = "CONNSCOPE_PATH_KUBELET_LOGS")]
    pub kubelet_logs_path: Option<PathBuf>,
}

/// `--config.file` contents; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(rename = "web.listen-address")]
    listen_address: Option<String>,
    #[serde(rename = "log.level")]
    log_level: Option<String>,
    #[serde(rename = "probe.backend")]
    backend: Option<Backend>,
    #[serde(rename = "bpf.max-connections")]
    max_connections: Option<u32>,
    #[serde(rename = "bpf.ringbuf-bytes")]
    ringbuf_bytes: Option<u32>,
    #[serde(rename = "bpf.pin-path")]
    pin_path: Option<String>,
    #[serde(rename = "metrics.max-servers")]
    max_servers: Option<usize>,
    #[serde(rename = "metrics.max-processes")]
    max_processes: Option<usize>,
    #[serde(rename = "http.capture-heads")]
    capture_heads: Option<bool>,
    #[serde(rename = "path.cgroup")]
    cgroup_path: Option<PathBuf>,
    #[serde(rename = "path.kubelet-logs")]
    kubelet_logs_path: Option<PathBuf>,
}

/// Validated settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen_address: SocketAddr,
    pub log_level: String,
    pub backend: Backend,
    pub max_connections: u32,
    pub ringbuf_bytes: u32,
    /// `None`: pinning off.
    pub pin_path: Option<PathBuf>,
    pub max_servers: usize,
    pub max_processes: usize,
    pub capture_heads: bool,
    pub cgroup_path: PathBuf,
    pub kubelet_logs_path: PathBuf,
}

impl Cli {
    pub fn into_config(self) -> anyhow::Result<Config> {
        let file = match &self.config_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --config.file {}", path.display()))?;
                serde_yaml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("invalid --config.file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let listen = self.listen_address.or(file.listen_address).unwrap_or_else(|| ":9477".into());
        let config = Config {
            listen_address: parse_listen_address(&listen)?,
            log_level: self.log_level.or(file.log_level).unwrap_or_else(|| "info".into()),
            backend: self.backend.or(file.backend).unwrap_or(Backend::Auto),
            max_connections: self
                .max_connections
                .or(file.max_connections)
                .unwrap_or(connscope_common::DEFAULT_MAX_CONNECTIONS),
            ringbuf_bytes: self.ringbuf_bytes.or(file.ringbuf_bytes).unwrap_or(4 << 20),
            pin_path: Some(
                self.pin_path.or(file.pin_path).unwrap_or_else(|| DEFAULT_PIN_PATH.into()),
            )
            .filter(|path| !path.is_empty())
            .map(PathBuf::from),
            max_servers: self.max_servers.or(file.max_servers).unwrap_or(100),
            max_processes: self.max_processes.or(file.max_processes).unwrap_or(100),
            capture_heads: self.capture_heads.or(file.capture_heads).unwrap_or(true),
            cgroup_path: self.cgroup_path.or(file.cgroup_path).unwrap_or_else(default_cgroup_path),
            kubelet_logs_path: self
                .kubelet_logs_path
                .or(file.kubelet_logs_path)
                .unwrap_or_else(|| PathBuf::from("/var/log")),
        };
        config.validate()?;
        Ok(config)
    }
}

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/connscope";

/// cgroup v2 hierarchy: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones.
fn default_cgroup_path() -> PathBuf {
    let hybrid = PathBuf::from("/sys/fs/cgroup/unified");
    if hybrid.join("cgroup.procs").exists() { hybrid } else { PathBuf::from("/sys/fs/cgroup") }
}

impl Config {
    fn validate(&self) -> anyhow::Result<()> {
        if self.max_connections == 0 {
            bail!("--bpf.max-connections must be at least 1");
        }
        if self.ringbuf_bytes < 4096 || !self.ringbuf_bytes.is_power_of_two() {
            bail!(
                "--bpf.ringbuf-bytes must be a power of two of at least 4096 (got {})",
                self.ringbuf_bytes
            );
        }
        if self.max_servers == 0 || self.max_processes == 0 {
            bail!("--metrics.max-servers and --metrics.max-processes must be at least 1");
        }
        Ok(())
    }
}

/// Accepts `host:port`, `[v6]:port` and the exporter shorthand `:port` (all addresses).
pub fn parse_listen_address(value: &str) -> anyhow::Result<SocketAddr> {
    if let Some(port) = value.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .with_context(|| format!("invalid port in --web.listen-address {value:?}"))?;
        return Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port));
    }
    value.parse().with_context(|| {
        format!("invalid --web.listen-address {value:?}: expected host:port, [v6]:port or :port")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("connscope").chain(args.iter().copied()))
    }

    #[test]
    fn listen_address_forms() -> anyhow::Result<()> {
        assert_eq!(parse_listen_address(":9477")?.port(), 9477);
        assert_eq!(parse_listen_address("127.0.0.1:80")?, "127.0.0.1:80".parse()?);
        assert_eq!(parse_listen_address("[::1]:9")?, "[::1]:9".parse()?);
        assert!(parse_listen_address("9477").is_err());
        assert!(parse_listen_address(":99999").is_err());
        Ok(())
    }

    #[test]
    fn defaults_and_flags() -> anyhow::Result<()> {
        let config = cli(&[])?.into_config()?;
        assert_eq!(config.listen_address.port(), 9477);
        assert_eq!(config.backend, Backend::Auto);
        assert_eq!(config.pin_path, Some(PathBuf::from(DEFAULT_PIN_PATH)));
        assert_eq!(cli(&["--bpf.pin-path", ""])?.into_config()?.pin_path, None);
        let config =
            cli(&["--probe.backend", "tracepoint", "--metrics.max-servers", "7"])?.into_config()?;
        assert_eq!(config.backend, Backend::Tracepoint);
        assert_eq!(config.max_servers, 7);
        Ok(())
    }

    #[test]
    fn bad_flags_are_errors() -> anyhow::Result<()> {
        assert!(cli(&["--probe.backend", "ebpf"]).is_err());
        assert!(cli(&["--bpf.ringbuf-bytes", "5000"])?.into_config().is_err());
        assert!(cli(&["--bpf.max-connections", "0"])?.into_config().is_err());
        assert!(cli(&["--no-such-flag"]).is_err());
        Ok(())
    }

    #[test]
    fn file_settings_yield_to_flags() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("connscope-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("c.yaml");
        std::fs::write(&path, "metrics.max-servers: 3\nweb.listen-address: 127.0.0.1:1234\n")?;
        let path_str = path.to_string_lossy().into_owned();
        let config =
            cli(&["--config.file", &path_str, "--web.listen-address", ":5"])?.into_config()?;
        assert_eq!(config.max_servers, 3);
        assert_eq!(config.listen_address.port(), 5);
        std::fs::write(&path, "no.such.key: 1\n")?;
        assert!(cli(&["--config.file", &path_str])?.into_config().is_err());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
