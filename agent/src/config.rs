//! The command line (exporter-style flags, each with an environment variable), the optional
//! YAML `--config.file`, and the subcommands.
//!
//! Every agent setting is described once, in [`settings!`] below: its flag (also its file
//! key), environment variable, type and default. Precedence: flag > environment variable >
//! `--config.file` > built-in default.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::PathBuf,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
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

/// How much the agent logs (node_exporter's `--log.level`): an unknown level is an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub const fn directive(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "connscope",
    version,
    about = "eBPF agent: HTTP connection reuse, idle time, who closes and why, churn; Prometheus metrics",
    // `connscope` alone runs the agent with these flags; a subcommand takes its own.
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Optional YAML file with the agent's settings (keys as in the flags, e.g. `web.listen-address`).
    #[arg(long = "config.file", env = "CONNSCOPE_CONFIG_FILE")]
    pub config_file: Option<PathBuf>,

    #[command(flatten)]
    pub settings: Settings,
}

/// What `connscope` does besides running the agent (adding one: a variant here, an arm in main.rs).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a running agent's flows, sorted by churn (reads its /metrics twice for rates).
    Flows(Box<crate::flows::FlowsArgs>),
    /// The benchmark's floor arm (`cargo xtask bench`): the same tp_btf hooks, each program
    /// only looking the socket up and adding its bytes, until SIGTERM.
    #[command(hide = true)]
    BenchFloor,
    /// Remove everything the agent pinned (programs detach, maps are freed): uninstall.
    Cleanup(PinPathArgs),
    /// Mount a BPF filesystem on /sys/fs/bpf for the pin path unless one is there: what a
    /// sandboxed deployment runs on the host first (the agent mounts one itself when it
    /// runs in the host's mount namespace; in its own, that mount would end with it).
    MountBpffs(PinPathArgs),
}

#[derive(Debug, clap::Args)]
pub struct PinPathArgs {
    /// The agent's --bpf.pin-path ("" means nothing is pinned).
    #[arg(long = "bpf.pin-path", env = "CONNSCOPE_BPF_PIN_PATH", default_value = DEFAULT_PIN_PATH)]
    pin_path: String,
}

impl PinPathArgs {
    pub fn pin_path(self) -> anyhow::Result<Option<PathBuf>> {
        PinPath::from_setting(self.pin_path).map(|path| path.0)
    }
}

/// A setting's raw value (as clap and serde read it) turned into the type the agent uses.
trait FromSetting<Raw>: Sized {
    fn from_setting(raw: Raw) -> anyhow::Result<Self>;
}

impl<T> FromSetting<T> for T {
    fn from_setting(raw: T) -> anyhow::Result<T> {
        Ok(raw)
    }
}

impl FromSetting<String> for SocketAddr {
    fn from_setting(raw: String) -> anyhow::Result<Self> {
        parse_listen_address(&raw)
    }
}

/// Where the kernel state is pinned; `None`: pinning off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinPath(pub Option<PathBuf>);

/// The default `--bpf.pin-path`.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/connscope";

impl PinPath {
    pub fn as_deref(&self) -> Option<&std::path::Path> {
        self.0.as_deref()
    }
}

impl FromSetting<String> for PinPath {
    fn from_setting(raw: String) -> anyhow::Result<Self> {
        Ok(Self((!raw.is_empty()).then(|| PathBuf::from(raw))))
    }
}

impl FromSetting<String> for Option<String> {
    fn from_setting(raw: String) -> anyhow::Result<Self> {
        Ok(Some(raw))
    }
}

impl FromSetting<PathBuf> for Option<PathBuf> {
    fn from_setting(raw: PathBuf) -> anyhow::Result<Self> {
        Ok(Some(raw))
    }
}

/// Declares [`Settings`] (as given: clap flags + `--config.file` keys, all optional) and
/// [`Config`] (resolved: every value filled). One entry per setting:
/// `docs, attributes; field: RawType [as ConfigType] = default, "flag.name", "ENV_VAR";`
macro_rules! settings {
    (@typed $raw:ty) => { $raw };
    (@typed $raw:ty, $typed:ty) => { $typed };
    ($(
        $(#[$attr:meta])*
        $field:ident: $raw:ty $(as $typed:ty)? = $default:expr, $key:literal, $env:literal;
    )*) => {
        /// The agent's settings as given on the command line, in the environment or in
        /// `--config.file` (whose keys are the flag names).
        #[derive(Debug, Default, clap::Args, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct Settings {
            $(
                $(#[$attr])*
                #[arg(long = $key, env = $env)]
                #[serde(rename = $key, default)]
                pub $field: Option<$raw>,
            )*
        }

        /// Validated settings.
        #[derive(Clone, Debug)]
        pub struct Config {
            $(pub $field: settings!(@typed $raw $(, $typed)?),)*
        }

        impl Settings {
            /// Each value of `self`, else the one of `fallback`.
            fn or(self, fallback: Self) -> Self {
                Self { $($field: self.$field.or(fallback.$field),)* }
            }

            fn resolve(self) -> anyhow::Result<Config> {
                Ok(Config {
                    $($field: match self.$field {
                        Some(raw) => FromSetting::from_setting(raw)?,
                        None => $default,
                    },)*
                })
            }
        }
    };
}

settings! {
    /// Address to serve /metrics, /healthz, /readyz and / on (":9477" means all addresses).
    listen_address: String as SocketAddr =
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 9477),
        "web.listen-address", "CONNSCOPE_WEB_LISTEN_ADDRESS";

    /// Exporter-toolkit web configuration (YAML): TLS, client certificates, basic auth,
    /// as node_exporter's --web.config.file. Re-read when it or its certificates change.
    web_config_file: PathBuf as Option<PathBuf> = None,
        "web.config.file", "CONNSCOPE_WEB_CONFIG_FILE";

    /// Log level: error, warn, info, debug or trace.
    #[arg(value_enum)]
    log_level: LogLevel = LogLevel::Info, "log.level", "CONNSCOPE_LOG_LEVEL";

    /// A `tracing` filter directive (`info,connscope::kernel=debug`) used instead of
    /// --log.level; one that does not parse is an error.
    log_filter: String as Option<String> = None, "log.filter", "CONNSCOPE_LOG_FILTER";

    /// Hook backend: auto picks fentry, then kprobe, then tracepoint for each hook.
    #[arg(value_enum)]
    backend: Backend = Backend::Auto, "probe.backend", "CONNSCOPE_PROBE_BACKEND";

    /// Connections tracked at once in the kernel map; beyond it new ones are counted in
    /// connscope_events_lost_total{reason="map_full"}.
    max_connections: u32 = connscope_common::DEFAULT_MAX_CONNECTIONS,
        "bpf.max-connections", "CONNSCOPE_BPF_MAX_CONNECTIONS";

    /// Size of the kernel-to-agent ring buffer in bytes (a power of two, at least 4096).
    ringbuf_bytes: u32 = connscope_common::DEFAULT_RINGBUF_BYTES,
        "bpf.ringbuf-bytes", "CONNSCOPE_BPF_RINGBUF_BYTES";

    /// BPF filesystem directory where the kernel state is pinned, so programs stay attached
    /// and counting while no agent runs and the next agent takes over; "" turns pinning
    /// off (the programs detach when the agent exits).
    pin_path: String as PinPath = PinPath(Some(PathBuf::from(DEFAULT_PIN_PATH))),
        "bpf.pin-path", "CONNSCOPE_BPF_PIN_PATH";

    /// Distinct `server` label values: the first ones seen keep their label, the rest are
    /// reported as "other" (a strict bound on the number of series).
    max_servers: usize = 100, "metrics.max-servers", "CONNSCOPE_METRICS_MAX_SERVERS";

    /// Distinct `process` label values; the rest are reported as "other".
    max_processes: usize = 100, "metrics.max-processes", "CONNSCOPE_METRICS_MAX_PROCESSES";

    /// Read the first bytes of each request/response turn to parse HTTP/1.x heads. Off: only
    /// protocol-agnostic exchange counting (no payload is read at all).
    capture_heads: bool = true, "http.capture-heads", "CONNSCOPE_HTTP_CAPTURE_HEADS";

    /// Read HTTPS plaintext through uprobes on libssl (`SSL_read`/`SSL_write` and their `_ex`
    /// forms, OpenSSL 1.1 and 3) in every process that maps it, so TLS connections get the
    /// HTTP/1.x figures of plaintext. Off (or with --http.capture-heads=false): TLS is
    /// counted undecrypted (requests by records, protocol "tls").
    tls_uprobes: bool = true, "tls.uprobes", "CONNSCOPE_TLS_UPROBES";

    /// Decryption budget: the share of one CPU a process's libssl uprobes may cost (its hits
    /// per second times the cost of one hit, measured at start) before the process is
    /// counted from its ciphertext instead; 0 turns the budget off (decrypt every process).
    tls_budget: f64 = DEFAULT_TLS_BUDGET, "tls.budget", "CONNSCOPE_TLS_BUDGET";

    /// Processes always decrypted, over the budget too: comma-separated process names (as
    /// /proc/<pid>/comm shows them) and `cgroup:<path>` (the cgroup v2 path or a parent).
    tls_always_decrypt: String as ProcessSelectors = ProcessSelectors::default(),
        "tls.always-decrypt", "CONNSCOPE_TLS_ALWAYS_DECRYPT";

    /// Processes never decrypted (counted from ciphertext), in the form of
    /// --tls.always-decrypt; a process both lists select is not decrypted.
    tls_never_decrypt: String as ProcessSelectors = ProcessSelectors::default(),
        "tls.never-decrypt", "CONNSCOPE_TLS_NEVER_DECRYPT";

    /// Share of one CPU the socket census (TIME_WAIT sockets and ports per flow, port
    /// ranges) may spend: it runs every 5 s, or less often when the last one took more than
    /// this share of that (0 to 1; 0 turns it off, and those metrics with it).
    census_budget: f64 = DEFAULT_CENSUS_BUDGET, "census.budget", "CONNSCOPE_CENSUS_BUDGET";

    /// cgroup v2 mount used to resolve pod and container of a connection's process.
    cgroup_path: PathBuf = default_cgroup_path(), "path.cgroup", "CONNSCOPE_PATH_CGROUP";

    /// Directory holding the kubelet's `pods/` and `containers/` log trees (usually /var/log).
    kubelet_logs_path: PathBuf = PathBuf::from("/var/log"),
        "path.kubelet-logs", "CONNSCOPE_PATH_KUBELET_LOGS";
}

impl Cli {
    /// The agent's settings: flags and environment over `--config.file` over defaults.
    pub fn into_config(self) -> anyhow::Result<Config> {
        let file = match &self.config_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --config.file {}", path.display()))?;
                serde_yaml::from_str::<Settings>(&text)
                    .with_context(|| format!("invalid --config.file {}", path.display()))?
            }
            None => Settings::default(),
        };
        let config = self.settings.or(file).resolve()?;
        config.validate()?;
        Ok(config)
    }
}

/// The default `--tls.budget`: 1% of one CPU per process.
pub const DEFAULT_TLS_BUDGET: f64 = 0.01;

/// The default `--census.budget`: 1% of one CPU.
pub const DEFAULT_CENSUS_BUDGET: f64 = 0.01;

/// Processes chosen by name or cgroup (`--tls.always-decrypt`, `--tls.never-decrypt`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessSelectors {
    names: Vec<String>,
    /// cgroup v2 paths (`/kubepods.slice/...`): a process in one of them or below matches.
    cgroups: Vec<String>,
}

/// The kernel's process names are at most 15 bytes (`TASK_COMM_LEN` 16 with its NUL).
const MAX_COMM_LEN: usize = 15;

impl FromSetting<String> for ProcessSelectors {
    fn from_setting(raw: String) -> anyhow::Result<Self> {
        let mut selectors = Self::default();
        for item in raw.split(',').map(str::trim).filter(|item| !item.is_empty()) {
            if let Some(path) = item.strip_prefix("cgroup:") {
                if !path.starts_with('/') {
                    bail!("invalid process selector {item:?}: a cgroup path starts with /");
                }
                selectors.cgroups.push(path.trim_end_matches('/').to_owned());
            } else if item.len() > MAX_COMM_LEN || item.contains('/') || item.contains(':') {
                bail!(
                    "invalid process selector {item:?}: expected a process name of at most \
                     {MAX_COMM_LEN} bytes (as /proc/<pid>/comm shows it) or cgroup:<path>"
                );
            } else {
                selectors.names.push(item.to_owned());
            }
        }
        Ok(selectors)
    }
}

impl ProcessSelectors {
    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.cgroups.is_empty()
    }

    /// Whether the process named `comm`, in cgroup v2 path `cgroup`, is selected.
    pub fn selects(&self, comm: &str, cgroup: &str) -> bool {
        self.names.iter().any(|name| name == comm)
            || self.cgroups.iter().any(|path| {
                cgroup
                    .strip_prefix(path.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || path.is_empty())
            })
    }
}

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
        if let Some(filter) = &self.log_filter {
            tracing_subscriber::EnvFilter::try_new(filter)
                .with_context(|| format!("invalid --log.filter {filter:?}"))?;
        }
        if !(0.0..=1.0).contains(&self.tls_budget) {
            bail!(
                "--tls.budget is a share of one CPU, from 0 (no budget) to 1 (got {})",
                self.tls_budget
            );
        }
        if !(0.0..=1.0).contains(&self.census_budget) {
            bail!(
                "--census.budget is a share of one CPU, from 0 (no census) to 1 (got {})",
                self.census_budget
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
        assert_eq!(config.pin_path.as_deref(), Some(std::path::Path::new(DEFAULT_PIN_PATH)));
        assert_eq!(cli(&["--bpf.pin-path", ""])?.into_config()?.pin_path, PinPath(None));
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
        // A level is a level: `loud` used to be read as a filter directive that silenced all.
        assert!(cli(&["--log.level", "loud"]).is_err());
        assert_eq!(cli(&["--log.level", "debug"])?.into_config()?.log_level, LogLevel::Debug);
        assert!(cli(&["--log.filter", "info,connscope=[[["])?.into_config().is_err());
        assert!(cli(&["--tls.budget", "2"])?.into_config().is_err());
        assert!(cli(&["--tls.budget", "NaN"])?.into_config().is_err());
        assert!(cli(&["--tls.budget", "lots"]).is_err());
        assert!(cli(&["--census.budget=-0.1"])?.into_config().is_err());
        assert!(cli(&["--census.budget", "NaN"])?.into_config().is_err());
        assert!(cli(&["--tls.never-decrypt", "a-process-name-too-long"])?.into_config().is_err());
        assert!(cli(&["--tls.always-decrypt", "cgroup:kubepods"])?.into_config().is_err());
        assert!(cli(&["--tls.always-decrypt", "usr/bin/curl"])?.into_config().is_err());
        let filter = cli(&["--log.filter", "warn,connscope::kernel=debug"])?.into_config()?;
        assert_eq!(filter.log_filter.as_deref(), Some("warn,connscope::kernel=debug"));
        Ok(())
    }

    #[test]
    fn process_selectors() -> anyhow::Result<()> {
        let config = cli(&["--tls.never-decrypt", "nginx, cgroup:/system.slice/app.service/"])?
            .into_config()?;
        let never = &config.tls_never_decrypt;
        assert!(never.selects("nginx", "/"));
        assert!(!never.selects("nginx2", "/"));
        assert!(never.selects("curl", "/system.slice/app.service"));
        assert!(never.selects("curl", "/system.slice/app.service/worker"));
        assert!(!never.selects("curl", "/system.slice/app.service2"));
        assert!(config.tls_always_decrypt.is_empty());
        assert_eq!(config.tls_budget, DEFAULT_TLS_BUDGET);
        assert_eq!(cli(&["--tls.budget", "0"])?.into_config()?.tls_budget, 0.0);
        assert_eq!(config.census_budget, DEFAULT_CENSUS_BUDGET);
        assert_eq!(cli(&["--census.budget", "0"])?.into_config()?.census_budget, 0.0);
        Ok(())
    }

    #[test]
    fn every_agent_flag_is_a_file_key() -> anyhow::Result<()> {
        use clap::CommandFactory as _;
        let command = Cli::command();
        let keys: Vec<&str> = command
            .get_arguments()
            .filter_map(|arg| arg.get_long())
            .filter(|long| !["config.file", "help", "version"].contains(long))
            .collect();
        assert!(keys.len() >= 11, "{keys:?}");
        for key in keys {
            let parsed = serde_yaml::from_str::<Settings>(&format!("{key}: null\n"));
            assert!(parsed.is_ok(), "--{key} is not accepted in --config.file: {parsed:?}");
        }
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
