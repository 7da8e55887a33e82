//! The metric contract: every series the agent exposes (agent/src/metrics.rs, described in
//! docs/architecture.md), with its labels and their closed value sets, and a PromQL checker
//! that holds the dashboards' and the rules' queries to it. Every series also has job and
//! instance.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::time::Duration;

use promql_parser::label::{MatchOp, Matcher};
use promql_parser::parser::{Expr, VectorSelector};
use promql_parser::util::{ExprVisitor, walk_expr};

/// Every `reason` of `connscope_events_lost_total` (the agent exports each from the start).
pub const EVENTS_LOST_REASONS: [&str; 6] = [
    "ringbuf_full",
    "map_full",
    "untracked_socket",
    "payload_unreadable",
    "decode_error",
    "startup_backlog_full",
];

const FLOW: &[&str] = &["role", "process", "server"];
const K8S: &[&str] = &["namespace", "pod", "container"];

enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// (name as exposed, kind, labels). Counters are listed with their `_total` name.
fn contract_families() -> Vec<(&'static str, Kind, Vec<&'static str>)> {
    let flow = || FLOW.to_vec();
    let with = |extra: &[&'static str]| [FLOW, extra].concat();
    vec![
        ("connscope_connections_opened_total", Kind::Counter, with(K8S)),
        (
            "connscope_connections_closed_total",
            Kind::Counter,
            with(&["closed_by", "close_kind", "reason", "namespace", "pod", "container"]),
        ),
        ("connscope_http_requests_total", Kind::Counter, with(&["http_version"])),
        ("connscope_keepalive_races_total", Kind::Counter, flow()),
        ("connscope_bytes_sent_total", Kind::Counter, flow()),
        ("connscope_bytes_received_total", Kind::Counter, flow()),
        ("connscope_events_lost_total", Kind::Counter, vec!["reason"]),
        ("connscope_connections_open", Kind::Gauge, with(&["state"])),
        ("connscope_http_keepalive_advertised_timeout_seconds", Kind::Gauge, vec!["server"]),
        ("connscope_http_keepalive_advertised_max_requests", Kind::Gauge, vec!["server"]),
        ("connscope_tracked_connections", Kind::Gauge, vec![]),
        ("connscope_tracked_connections_capacity", Kind::Gauge, vec![]),
        ("connscope_probe_info", Kind::Gauge, vec!["hook", "attach"]),
        ("connscope_tls_uprobe_targets", Kind::Gauge, vec!["state"]),
        ("connscope_build_info", Kind::Gauge, vec!["version"]),
        ("connscope_connection_duration_seconds", Kind::Histogram, flow()),
        ("connscope_connection_requests", Kind::Histogram, flow()),
        ("connscope_connection_idle_seconds", Kind::Histogram, flow()),
        ("connscope_connection_close_idle_seconds", Kind::Histogram, with(&["closed_by"])),
    ]
}

/// Closed sets of label values; a matcher naming another value selects nothing.
fn label_values(metric: &str, label: &str) -> Option<&'static [&'static str]> {
    Some(match label {
        "role" => &["client", "server"],
        "closed_by" => &["local", "peer", "unknown"],
        "close_kind" => &["fin", "reset"],
        "state" if metric == "connscope_tls_uprobe_targets" => &["attached", "failed"],
        "state" => &["active", "idle"],
        "hook" => &[
            "tcp_connect",
            "tcp_close",
            "tcp_sendmsg",
            "tcp_recvmsg",
            "inet_sock_set_state",
            "libssl",
        ],
        "attach" => {
            &["fentry", "kprobe", "tp_btf", "tracepoint", "sock_ops", "uprobe", "off", "none"]
        }
        "reason" if metric == "connscope_events_lost_total" => &EVENTS_LOST_REASONS,
        "reason" => {
            &["connection_close", "http10", "max_requests", "idle", "reset", "error", "unknown"]
        }
        _ => return None,
    })
}

/// Series a query may select, with the labels each one has. `None`: any label (recording
/// rules, whose labels are whatever their expression keeps).
pub struct Contract {
    series: HashMap<String, Option<BTreeSet<String>>>,
}

impl Contract {
    /// The contract's series plus the recording rules named in `recorded`.
    pub fn new(recorded: &[String]) -> Self {
        let mut series = HashMap::new();
        let mut add = |name: String, labels: &[&str]| {
            let mut set: BTreeSet<String> = labels.iter().map(|l| l.to_string()).collect();
            set.extend(["job".to_string(), "instance".to_string()]);
            series.insert(name, Some(set));
        };
        for (name, kind, labels) in contract_families() {
            match kind {
                Kind::Counter | Kind::Gauge => add(name.to_string(), &labels),
                Kind::Histogram => {
                    add(format!("{name}_sum"), &labels);
                    add(format!("{name}_count"), &labels);
                    add(format!("{name}_bucket"), &[labels.as_slice(), &["le"]].concat());
                }
            }
        }
        // Series Prometheus itself writes for every target.
        add("up".to_string(), &[]);
        add("scrape_samples_scraped".to_string(), &[]);
        for r in recorded {
            series.insert(r.clone(), None);
        }
        Self { series }
    }

    /// True when `metric` is a contract series with label `label`.
    pub fn has_label(&self, metric: &str, label: &str) -> bool {
        self.series.get(metric).and_then(|l| l.as_ref()).is_some_and(|l| l.contains(label))
    }

    /// Problems with one selector: unknown metric, unknown label, impossible label value.
    fn check_selector(&self, vs: &VectorSelector, problems: &mut Vec<String>) {
        let matchers: Vec<&Matcher> =
            vs.matchers.matchers.iter().chain(vs.matchers.or_matchers.iter().flatten()).collect();
        let name = vs.name.clone().or_else(|| {
            matchers
                .iter()
                .find(|m| m.name == "__name__" && matches!(m.op, MatchOp::Equal))
                .map(|m| m.value.clone())
        });
        let Some(name) = name else {
            problems.push(format!("selector `{vs}` names no metric"));
            return;
        };
        let Some(labels) = self.series.get(&name) else {
            problems.push(format!(
                "metric `{name}` is not in the metric contract nor a recording rule"
            ));
            return;
        };
        let Some(labels) = labels else { return };
        for m in matchers.iter().filter(|m| m.name != "__name__") {
            if !labels.contains(&m.name) {
                problems.push(format!("`{name}` has no label `{}` (matcher in `{vs}`)", m.name));
                continue;
            }
            let Some(allowed) = label_values(&name, &m.name) else { continue };
            // Plain values and alternations of plain values must all be possible values.
            let plain = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            let wanted: Vec<&str> = match &m.op {
                MatchOp::Equal | MatchOp::NotEqual => vec![m.value.as_str()],
                MatchOp::Re(_) | MatchOp::NotRe(_) if m.value.split('|').all(plain) => {
                    m.value.split('|').collect()
                }
                _ => vec![],
            };
            for w in wanted {
                if !allowed.contains(&w) {
                    problems.push(format!("`{name}` label `{}` never has the value `{w}`", m.name));
                }
            }
        }
    }
}

/// Walks a parsed expression: checks every selector against the contract and, when
/// `rate_range` is set, that rate()/increase()/irate() read exactly that range.
struct QueryCheck<'a> {
    contract: &'a Contract,
    rate_range: Option<Duration>,
    problems: Vec<String>,
}

impl ExprVisitor for QueryCheck<'_> {
    type Error = Infallible;

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, Infallible> {
        match expr {
            Expr::VectorSelector(vs) => self.contract.check_selector(vs, &mut self.problems),
            Expr::MatrixSelector(ms) => self.contract.check_selector(&ms.vs, &mut self.problems),
            Expr::Call(call) if matches!(call.func.name, "rate" | "increase" | "irate") => {
                if let Some(want) = self.rate_range {
                    for arg in &call.args.args {
                        match arg.as_ref() {
                            Expr::MatrixSelector(ms) if ms.range == want => {}
                            other => self.problems.push(format!(
                                "{}() must read [$__rate_interval], not `{other}`",
                                call.func.name
                            )),
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(true)
    }
}

/// Parses a PromQL expression and returns the contract problems found in it.
pub fn check_promql(expr: &str, contract: &Contract, rate_range: Option<Duration>) -> Vec<String> {
    let parsed = match promql_parser::parser::parse(expr) {
        Ok(e) => e,
        Err(e) => return vec![format!("does not parse: {e}")],
    };
    let mut v = QueryCheck { contract, rate_range, problems: vec![] };
    // The visitor's error type is Infallible.
    let _ = walk_expr(&mut v, &parsed);
    v.problems
}
