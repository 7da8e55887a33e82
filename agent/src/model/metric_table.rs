//! The metric table: every metric the agent exports, declared once. Registration
//! (`exposition::metrics`), the carry across restarts (`exposition::carry`), the `connscope
//! flows` client, the metric contract that holds the dashboards and rules to it
//! (`tests/tests/shared/metric_contract.rs`) and README's metric table (checked by
//! `tests/tests/assets_metric_table.rs`) all read it.
//!
//! Adding a metric: one row here, its README row, its family in `exposition::metrics` and
//! the code that produces the value.

use std::sync::LazyLock;

use connscope_common::conn::IDLE_BOUNDS_NS;

/// Prefix of every metric name.
pub const PREFIX: &str = "connscope";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Seconds,
}

impl Unit {
    pub const fn suffix(self) -> &'static str {
        match self {
            Self::Seconds => "seconds",
        }
    }
}

/// Histogram bucket bounds (without `+Inf`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Buckets {
    None,
    Fixed(&'static [f64]),
    /// The kernel's idle-gap buckets (`connscope_common::conn::IDLE_BOUNDS_NS`), in seconds.
    IdleGaps,
}

impl Buckets {
    pub fn bounds(self) -> &'static [f64] {
        match self {
            Self::None => &[],
            Self::Fixed(bounds) => bounds,
            Self::IdleGaps => &IDLE_BOUNDS,
        }
    }
}

/// Idle gaps: the kernel's bucket bounds in seconds, 1 ms to 300 s with the common
/// keep-alive timeouts (5, 15, 60, 75 s) as bounds.
static IDLE_BOUNDS: LazyLock<Vec<f64>> =
    LazyLock::new(|| IDLE_BOUNDS_NS.iter().map(|&ns| ns as f64 / 1e9).collect());

/// A label and the values it can take: a closed set, or values bounded by the label caps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Label {
    pub name: &'static str,
    /// `None`: open values (capped and sanitised, `other` past the caps).
    pub values: Option<&'static [&'static str]>,
}

const fn open(name: &'static str) -> Label {
    Label { name, values: None }
}

const fn closed(name: &'static str, values: &'static [&'static str]) -> Label {
    Label { name, values: Some(values) }
}

pub const ROLE: Label = closed("role", &["client", "server"]);
pub const PROCESS: Label = open("process");
pub const SERVER: Label = open("server");
pub const NAMESPACE: Label = open("namespace");
pub const POD: Label = open("pod");
pub const CONTAINER: Label = open("container");
pub const CLOSED_BY: Label = closed("closed_by", &["local", "peer", "unknown"]);
pub const CLOSE_KIND: Label = closed("close_kind", &["fin", "reset"]);
pub const CLOSE_REASON: Label = closed(
    "reason",
    &[
        "connection_close",
        "http10",
        "max_requests",
        "idle",
        "after_response",
        "reset",
        "error",
        "unknown",
        "server_goaway",
        "server_goaway_error",
        "server_goaway_other",
        "client_goaway",
        "client_goaway_error",
        "client_goaway_other",
    ],
);
pub const CONNECT_FAILURE: Label =
    closed("reason", &["refused", "timeout", "unreachable", "no_local_port", "abandoned", "other"]);
pub const OPEN_STATE: Label = closed("state", &["active", "idle"]);
/// What a connection spoke (`connection_requests`, `connections_closed_total`).
pub const PROTOCOL: Label = closed("protocol", &["http1", "http2", "tls", "websocket", "other"]);
pub const HTTP_VERSION: Label = closed("http_version", &["1.0", "1.1", "2", "unread"]);
pub const DECRYPTION_STATE: Label = closed(
    "state",
    &["decrypted", "ciphertext_budget", "ciphertext_unsupported", "ciphertext_opt_out"],
);
pub const HOOK: Label = closed(
    "hook",
    &["tcp_connect", "tcp_close", "tcp_sendmsg", "tcp_recvmsg", "inet_sock_set_state", "libssl"],
);
pub const ATTACH: Label = closed(
    "attach",
    &["fentry", "kprobe", "tp_btf", "tracepoint", "sock_ops", "uprobe", "off", "none"],
);
pub const TARGET_STATE: Label = closed("state", &["attached", "failed"]);
pub const VERSION: Label = open("version");
pub const EVENT_KIND: Label = closed(
    "kind",
    &["open", "attribute", "head", "progress", "close", "connect_failed", "http2_close"],
);
pub const LOST_REASON: Label = closed(
    "reason",
    &[
        "ringbuf_full",
        "map_full",
        "untracked_socket",
        "payload_unreadable",
        "http2_unparsed",
        "decode_error",
        "startup_backlog_full",
    ],
);
/// A network namespace's inode number (`ls -L -i /proc/<pid>/ns/net`), `other` past
/// `kernel::netns::MAX_NAMESPACES`.
pub const NETNS: Label = open("netns");
pub const CAPPED_LABEL: Label = closed("label", &["server", "process"]);
pub const SKIP_REASON: Label =
    closed("reason", &["process_vanished", "unreadable", "unparsable", "backend"]);

/// One metric: everything about it but the code that produces its value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Metric {
    /// Registered name, without the prefix, the unit or `_total`.
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Option<Unit>,
    pub help: &'static str,
    pub labels: &'static [Label],
    /// Labels present only on some series: the pod's, where the process runs in a pod.
    pub optional_labels: &'static [Label],
    pub buckets: Buckets,
    /// Whether a starting agent goes on from the previous agent's value (`exposition::carry`):
    /// counters, histograms and the servers' advertised limits. Gauges of the moment are
    /// rebuilt instead.
    pub carried: bool,
}

impl Metric {
    /// The family name as exposed, with prefix and unit (`connscope_connection_idle_seconds`).
    pub fn family(&self) -> String {
        match self.unit {
            Some(unit) => format!("{PREFIX}_{}_{}", self.name, unit.suffix()),
            None => format!("{PREFIX}_{}", self.name),
        }
    }

    /// The sample name of a counter or gauge (counters end in `_total`); a histogram's
    /// family name, to which `_bucket`, `_sum` and `_count` are added.
    pub fn sample(&self) -> String {
        match self.kind {
            Kind::Counter => format!("{}_total", self.family()),
            Kind::Gauge | Kind::Histogram => self.family(),
        }
    }

    /// Every label a series can have, optional ones included.
    pub fn all_labels(&self) -> impl Iterator<Item = &'static Label> {
        self.labels.iter().chain(self.optional_labels)
    }
}

/// Declares each row as a constant and `ALL` with every row, in exposition order.
macro_rules! metric_table {
    ($(
        $(#[$doc:meta])*
        $id:ident = $kind:ident $name:literal $(in $unit:ident)?, $help:literal,
            labels [$($label:expr),* $(,)?]
            $(, pod [$($pod:expr),*])?
            $(, buckets $buckets:expr)?
            $(, carried: $carried:literal)?;
    )+) => {
        $(
            $(#[$doc])*
            pub const $id: Metric = Metric {
                name: $name,
                kind: Kind::$kind,
                unit: metric_table!(@unit $($unit)?),
                help: $help,
                labels: &[$($label),*],
                optional_labels: &[$($($pod),*)?],
                buckets: metric_table!(@buckets $($buckets)?),
                carried: metric_table!(@carried $($carried)?),
            };
        )+
        /// Every metric, in the order the registry exposes them.
        pub const ALL: &[Metric] = &[$($id),+];
    };
    (@unit) => { None };
    (@unit $unit:ident) => { Some(Unit::$unit) };
    (@buckets) => { Buckets::None };
    (@buckets $buckets:expr) => { $buckets };
    (@carried) => { false };
    (@carried $carried:literal) => { $carried };
}

metric_table! {
    CONNECTIONS_OPENED = Counter "connections_opened", "TCP connections established, by flow",
        labels [ROLE, PROCESS, SERVER], pod [NAMESPACE, POD, CONTAINER], carried: true;
    CONNECTIONS_ADOPTED = Counter "connections_adopted",
        "TCP connections established before the agent started, tracked from their first send or receive on (not in connections_opened, connection_duration or connection_requests)",
        labels [ROLE, PROCESS, SERVER], pod [NAMESPACE, POD, CONTAINER], carried: true;
    ADOPTION_SKIPPED = Counter "adoption_skipped",
        "Entries of the start-up scan of listening ports that were skipped: process_vanished, unreadable, unparsable; backend: established connections this kernel or hook backend cannot adopt",
        labels [SKIP_REASON], carried: true;
    CONNECTIONS_CLOSED = Counter "connections_closed",
        "TCP connections closed: who closed first (closed_by), by FIN or reset (close_kind), why (reason), and what they spoke (protocol)",
        labels [ROLE, PROCESS, SERVER, CLOSED_BY, CLOSE_KIND, CLOSE_REASON, PROTOCOL],
        pod [NAMESPACE, POD, CONTAINER], carried: true;
    CONNECTIONS_OPEN = Gauge "connections_open",
        "Connections open now: active (an exchange in progress) or idle",
        labels [ROLE, PROCESS, SERVER, OPEN_STATE];
    CONNECTION_DURATION = Histogram "connection_duration" in Seconds,
        "Lifetime of closed connections, from establishment to destruction",
        labels [ROLE, PROCESS, SERVER],
        buckets Buckets::Fixed(&[
            0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
            1800.0, 3600.0,
        ]), carried: true;
    /// Bounds from a loopback handshake (tens of µs) through a cross-region one (100-300 ms)
    /// to the SYN retransmits: with the initial 1 s timeout doubling, a connect whose first,
    /// second, third... SYN was lost completes just past 1, 3, 7, 15, 31 s.
    CONNECT_DURATION = Histogram "connect_duration" in Seconds,
        "Time a client's connect took, from the SYN (SYN_SENT) to ESTABLISHED, SYN retransmits included",
        labels [ROLE, PROCESS, SERVER], pod [NAMESPACE, POD, CONTAINER],
        buckets Buckets::Fixed(&[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
            1.0, 3.0, 7.0, 15.0, 31.0,
        ]), carried: true;
    CONNECT_FAILURES = Counter "connect_failures",
        "Client connects that ended before ESTABLISHED, by reason: refused (reset), timeout (SYN retries exhausted), unreachable (ICMP), no_local_port (EADDRNOTAVAIL), abandoned (closed by the application), other",
        labels [ROLE, PROCESS, SERVER, CONNECT_FAILURE], pod [NAMESPACE, POD, CONTAINER],
        carried: true;
    /// Counted every 5 s from each network namespace's socket tables
    /// (`kernel::socket_census`), each TIME_WAIT socket attributed by its four-tuple to the
    /// connection the agent saw close (`pipeline::socket_count`).
    CONNECTIONS_TIME_WAIT = Gauge "connections_time_wait",
        "Sockets of the flow in TIME_WAIT now (its connections this side closed first), counted every 5 s from each network namespace's socket table",
        labels [ROLE, PROCESS, SERVER], pod [NAMESPACE, POD, CONTAINER];
    TIME_WAIT_UNATTRIBUTED = Gauge "connections_time_wait_unattributed",
        "TIME_WAIT sockets no flow accounts for (closed before the agent started, or by a connection it did not see close), per network namespace (netns: its inode number)",
        labels [NETNS];
    CLIENT_PORTS_IN_USE = Gauge "client_ports_in_use",
        "Local ports the client flow holds toward its server now, open or in TIME_WAIT, per network namespace (netns): against client_port_range_size, how near the flow is to no_local_port",
        labels [ROLE, PROCESS, SERVER, NETNS], pod [NAMESPACE, POD, CONTAINER];
    /// Read with the census (`kernel::port_range`), exported at scrape time.
    CLIENT_PORT_RANGE_SIZE = Gauge "client_port_range_size",
        "Local ports a client connect can pick toward one destination: net.ipv4.ip_local_port_range less net.ipv4.ip_local_reserved_ports, per network namespace (netns: its inode number)",
        labels [NETNS];
    /// 0 marks connections opened and never used, 1 the one-request connections that
    /// cause churn.
    CONNECTION_REQUESTS = Histogram "connection_requests",
        "Requests carried per connection, observed at close, by protocol (http1: HTTP/1.x requests; http2: streams the client opened; other: request/response exchanges; tls: TLS application-data exchanges)",
        labels [ROLE, PROCESS, SERVER, PROTOCOL],
        buckets Buckets::Fixed(&[0.0, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]), carried: true;
    /// The kernel's buckets (`h2_frames::CONCURRENCY_BOUNDS`); observed at close.
    HTTP2_CONCURRENT_STREAMS = Histogram "http2_concurrent_streams",
        "Streams in flight on an HTTP/2 connection at each stream's opening (itself included), observed at the connection's close: 1 throughout is a connection used like HTTP/1.1",
        labels [ROLE, PROCESS, SERVER],
        buckets Buckets::Fixed(&[1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 50.0, 100.0]), carried: true;
    CONNECTION_IDLE = Histogram "connection_idle" in Seconds,
        "Idle gap on a kept-alive connection between the end of one exchange and the next request (http2: with no stream open)",
        labels [ROLE, PROCESS, SERVER], buckets Buckets::IdleGaps, carried: true;
    CONNECTION_CLOSE_IDLE = Histogram "connection_close_idle" in Seconds,
        "Idle time from the last exchange to the start of the close",
        labels [ROLE, PROCESS, SERVER, CLOSED_BY], buckets Buckets::IdleGaps, carried: true;
    HTTP_REQUESTS = Counter "http_requests",
        "HTTP requests seen, by version (2: HTTP/2 streams the client opened; unread: counted from the TLS ciphertext of a process seen speaking HTTP, after it left decryption)",
        labels [ROLE, PROCESS, SERVER, HTTP_VERSION], carried: true;
    HTTP_KEEPALIVE_ADVERTISED_TIMEOUT = Gauge "http_keepalive_advertised_timeout" in Seconds,
        "Last Keep-Alive timeout advertised by the server", labels [SERVER], carried: true;
    HTTP_KEEPALIVE_ADVERTISED_MAX_REQUESTS = Gauge "http_keepalive_advertised_max_requests",
        "Last Keep-Alive max advertised by the server", labels [SERVER], carried: true;
    KEEPALIVE_RACES = Counter "keepalive_races",
        "Requests sent on a connection the peer was closing, or reset right after a request on a reused connection",
        labels [ROLE, PROCESS, SERVER], carried: true;
    BYTES_SENT = Counter "bytes_sent", "Payload bytes sent", labels [ROLE, PROCESS, SERVER], carried: true;
    BYTES_RECEIVED = Counter "bytes_received", "Payload bytes received",
        labels [ROLE, PROCESS, SERVER], carried: true;
    TRACKED_CONNECTIONS = Gauge "tracked_connections", "Connections the agent is tracking now",
        labels [];
    TRACKED_CONNECTIONS_CAPACITY = Gauge "tracked_connections_capacity",
        "Connections the kernel map can track at once (--bpf.max-connections)", labels [];
    PROBE_INFO = Gauge "probe_info", "Hook backend in use for each hook", labels [HOOK, ATTACH];
    BUILD_INFO = Gauge "build_info", "connscope build", labels [VERSION];
    EVENTS_RECEIVED = Counter "events_received",
        "Events the kernel sent to the agent, by kind (open, attribute, head, progress, close, connect_failed): the agent's own load",
        labels [EVENT_KIND], carried: true;
    TLS_UPROBE_TARGETS = Gauge "tls_uprobe_targets",
        "Files (libssl, executables with OpenSSL) the TLS uprobes attached to, or failed to",
        labels [TARGET_STATE];
    TLS_DECRYPTION_PROCESSES = Gauge "tls_decryption_processes",
        "Processes calling TLS, by whether the agent reads their plaintext (the decryption budget, --tls.budget)",
        labels [PROCESS, DECRYPTION_STATE];
    TLS_UPROBE_HITS = Counter "tls_uprobe_hits",
        "libssl uprobe hits (entries and returns), by process: what decrypting it costs, in units of tls_uprobe_hit_seconds",
        labels [PROCESS];
    TLS_UPROBE_HIT = Gauge "tls_uprobe_hit" in Seconds,
        "What one uprobe hit costs on this host, measured at start (the decryption budget's unit)",
        labels [];
    TLS_DECRYPTION_BUDGET = Gauge "tls_decryption_budget",
        "Share of one CPU a process may spend on its libssl uprobes before it is counted from ciphertext (--tls.budget; 0: no budget)",
        labels [];
    /// The crash checkpoint (`pipeline::checkpoint`): the agent's own, never carried.
    CHECKPOINTS = Counter "checkpoints",
        "Bases of the crash checkpoint written (the metric values and live connections a killed agent's successor goes on from)",
        labels [];
    CHECKPOINT_WRITE = Counter "checkpoint_write" in Seconds,
        "Time spent writing the crash checkpoint: the journal of consumed records after each batch, and the bases (--checkpoint.budget)",
        labels [];
    CHECKPOINT_COVERED = Gauge "checkpoint_covered",
        "1 when a crash of the agent now would lose nothing (the checkpoint covers every record consumed); 0 while the journal is full and the budget allows no base yet",
        labels [];
    LABEL_VALUES = Gauge "label_values",
        "Distinct values of a capped label in use; once at its cap (--metrics.max-servers, --metrics.max-processes) new values are exported as other",
        labels [CAPPED_LABEL];
    /// Read from each network namespace's `/proc/<pid>/net/netstat` at scrape time
    /// (`kernel::listen_queues`): the kernel's own counts, never carried.
    LISTEN_OVERFLOWS = Counter "listen_overflows",
        "SYNs and handshake-completing ACKs dropped because a listening socket's accept queue was full (TcpExt ListenOverflows), per network namespace (netns: its inode number), the kernel's count since the namespace was made",
        labels [NETNS];
    LISTEN_DROPS = Counter "listen_drops",
        "Connection attempts dropped at a listening socket for any reason, accept queue overflows included (TcpExt ListenDrops), per network namespace (netns: its inode number), the kernel's count since the namespace was made",
        labels [NETNS];
    /// Read from the kernel's loss map at scrape time (`exposition::kernel_stats`): never
    /// carried, the map outlives the agent with pinned state.
    EVENTS_LOST = Counter "events_lost",
        "Events or connections that could not be recorded, by reason", labels [LOST_REASON];
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use connscope_common::{CloseKind, ClosedBy, ConnectFailure, EventKind, LostReason, Role};

    use super::*;
    use crate::{
        kernel::{adoption::Skip, hooks::Attach},
        model::{
            close_reason::CloseReason, decryption_state::DecryptionState,
            http_version::RequestVersion,
        },
    };

    fn values(label: Label) -> BTreeSet<&'static str> {
        label.values.unwrap_or_default().iter().copied().collect()
    }

    fn set<'a>(labels: impl IntoIterator<Item = &'a str>) -> BTreeSet<&'a str> {
        labels.into_iter().collect()
    }

    #[test]
    fn names_are_unique_and_kinds_follow_the_conventions() {
        let samples: BTreeSet<String> = ALL.iter().map(Metric::sample).collect();
        assert_eq!(samples.len(), ALL.len());
        for metric in ALL {
            assert!(!metric.name.ends_with("_total") && !metric.name.starts_with(PREFIX));
            let has_buckets = metric.buckets != Buckets::None;
            assert_eq!(has_buckets, metric.kind == Kind::Histogram, "{}", metric.name);
            let labels: BTreeSet<&str> = metric.all_labels().map(|l| l.name).collect();
            assert_eq!(labels.len(), metric.all_labels().count(), "{}: a label twice", metric.name);
        }
    }

    /// The closed label sets are the values the code's enums produce.
    #[test]
    fn closed_label_values_are_the_enums_labels() {
        assert_eq!(values(ROLE), set(Role::ALL.iter().map(|r| r.label())));
        assert_eq!(values(CLOSED_BY), set(ClosedBy::ALL.iter().map(|c| c.label())));
        let kinds = CloseKind::ALL.iter().filter(|k| **k != CloseKind::None);
        assert_eq!(values(CLOSE_KIND), set(kinds.map(|k| k.label())));
        assert_eq!(values(CLOSE_REASON), set(CloseReason::ALL.iter().map(|r| r.label())));
        assert_eq!(values(CONNECT_FAILURE), set(ConnectFailure::ALL.iter().map(|r| r.label())));
        assert_eq!(values(HTTP_VERSION), set(RequestVersion::ALL.map(RequestVersion::label)));
        assert_eq!(values(DECRYPTION_STATE), set(DecryptionState::ALL.map(DecryptionState::label)));
        assert_eq!(values(EVENT_KIND), set(EventKind::ALL.iter().map(|k| k.label())));
        let kernel_losses = set(LostReason::ALL.iter().map(|r| r.label()));
        assert!(kernel_losses.is_subset(&values(LOST_REASON)));
        assert_eq!(values(SKIP_REASON), set(Skip::ALL.iter().map(|r| r.label())));
        assert!(set(Attach::ALL.iter().map(|a| a.label())).is_subset(&values(ATTACH)));
    }

    #[test]
    fn concurrency_buckets_are_the_kernels() {
        use connscope_common::h2_frames::CONCURRENCY_BOUNDS;
        let bounds = HTTP2_CONCURRENT_STREAMS.buckets.bounds();
        assert_eq!(bounds, CONCURRENCY_BOUNDS.map(f64::from));
        assert_eq!(
            values(PROTOCOL),
            set(connscope_common::Protocol::ALL.iter().map(|p| p.label()))
        );
    }

    #[test]
    fn idle_buckets_are_the_kernels() {
        let bounds = Buckets::IdleGaps.bounds();
        assert_eq!(bounds.len(), IDLE_BOUNDS_NS.len());
        assert_eq!(bounds.first(), Some(&0.001));
        assert_eq!(CONNECTION_IDLE.sample(), "connscope_connection_idle_seconds");
        assert_eq!(BYTES_SENT.sample(), "connscope_bytes_sent_total");
    }
}
