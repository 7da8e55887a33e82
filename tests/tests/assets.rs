//! Checks of everything connscope ships besides the binary: Grafana dashboards and
//! provisioning, Prometheus rules, alerts and example config, Kubernetes manifests, the
//! systemd unit and the Dockerfile.
//!
//! External tools (promtool, kubectl, python3 with kubernetes-validate and jsonschema,
//! systemd-analyze) are installed by `cargo xtask setup`. With CI set they must be present;
//! elsewhere a test whose tool is missing prints why and returns early.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use promql_parser::label::{MatchOp, Matcher};
use promql_parser::parser::{Expr, VectorSelector};
use promql_parser::util::{ExprVisitor, walk_expr};
use serde_json::{Value, json};

/// Kubernetes version whose schemas kubernetes-validate ships and the manifests target.
const K8S_VERSION: &str = "1.32.0";
const NAMESPACE: &str = "connscope";

// ---------------------------------------------------------------------------------------
// Metric contract (design.md §3). Every series also has job and instance.

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
        "state" => &["active", "idle"],
        "hook" => {
            &["tcp_connect", "tcp_close", "tcp_sendmsg", "tcp_recvmsg", "inet_sock_set_state"]
        }
        "attach" => &["fentry", "kprobe", "tp_btf", "tracepoint", "sock_ops"],
        "reason" if metric == "connscope_events_lost_total" => {
            &["ringbuf_full", "map_full", "untracked_socket", "payload_unreadable", "decode_error"]
        }
        "reason" => {
            &["connection_close", "http10", "max_requests", "idle", "reset", "error", "unknown"]
        }
        _ => return None,
    })
}

/// Series a query may select, with the labels each one has. `None`: any label (recording
/// rules, whose labels are whatever their expression keeps).
struct Contract {
    series: HashMap<String, Option<BTreeSet<String>>>,
}

impl Contract {
    fn new(recorded: &[String]) -> Self {
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
        Contract { series }
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
fn check_promql(expr: &str, contract: &Contract, rate_range: Option<Duration>) -> Vec<String> {
    let parsed = match promql_parser::parser::parse(expr) {
        Ok(e) => e,
        Err(e) => return vec![format!("does not parse: {e}")],
    };
    let mut v = QueryCheck { contract, rate_range, problems: vec![] };
    // The visitor's error type is Infallible.
    let _ = walk_expr(&mut v, &parsed);
    v.problems
}

/// The value `$__rate_interval` stands for while parsing dashboard queries.
const RATE_INTERVAL: &str = "5m";

/// Replaces the Grafana variables by plain values, so that the query parses as PromQL.
fn substitute_grafana_vars(expr: &str) -> Result<String> {
    grafana::substitute(
        expr,
        RATE_INTERVAL,
        &[("job", "value"), ("instance", "value"), ("namespace", "value")],
    )
}

// ---------------------------------------------------------------------------------------
// Helpers

fn repo() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("tests/ has no parent")?;
    Ok(root.to_path_buf())
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

/// True when `tool` can be run. Missing: an error in CI, a printed skip elsewhere.
fn require_tool(tool: &str, check: &str) -> Result<bool> {
    if on_path(tool) {
        return Ok(true);
    }
    if in_ci() {
        bail!("{tool} is not installed but CI must run {check} (cargo xtask setup installs it)");
    }
    eprintln!("SKIP {check}: {tool} is not on PATH (cargo xtask setup installs it)");
    Ok(false)
}

fn require_python_modules(modules: &[&str], check: &str) -> Result<bool> {
    if !require_tool("python3", check)? {
        return Ok(false);
    }
    let out =
        Command::new("python3").arg("-c").arg(format!("import {}", modules.join(", "))).output()?;
    if out.status.success() {
        return Ok(true);
    }
    let why = format!(
        "python3 cannot import {}: {}",
        modules.join(", "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    if in_ci() {
        bail!("{why}; CI must run {check} (cargo xtask setup installs them with pip)");
    }
    eprintln!("SKIP {check}: {why} (pip install kubernetes-validate jsonschema)");
    Ok(false)
}

fn describe(cmd: &Command) -> String {
    let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    format!("{} {}", cmd.get_program().to_string_lossy(), args.join(" "))
}

fn output(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| format!("running {}", describe(cmd)))
}

/// Runs a command that must succeed; returns its stdout.
fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    ensure!(
        out.status.success(),
        "{} failed ({}):\n{}\n{}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> Result<PathBuf> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("assets-{name}"));
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn report(what: &str, problems: &[String]) -> Result<()> {
    ensure!(
        problems.is_empty(),
        "{what}: {} problem(s):\n  - {}",
        problems.len(),
        problems.join("\n  - ")
    );
    Ok(())
}

fn yaml_file(path: &Path) -> Result<Value> {
    let y: serde_yaml::Value = serde_yaml::from_str(&read(path)?)
        .with_context(|| format!("parsing {}", path.display()))?;
    Ok(serde_json::to_value(y)?)
}

fn yaml_stream(text: &str) -> Result<Vec<Value>> {
    let mut docs = vec![];
    let mut cur = String::new();
    for line in text.lines().chain(std::iter::once("---")) {
        if line == "---" {
            if !cur.trim().is_empty() {
                let y: serde_yaml::Value = serde_yaml::from_str(&cur)?;
                docs.push(serde_json::to_value(y)?);
            }
            cur.clear();
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    Ok(docs)
}

fn s<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

// ---------------------------------------------------------------------------------------
// Prometheus rules

fn rules_path() -> Result<PathBuf> {
    Ok(repo()?.join("deploy/prometheus/connscope-rules.yml"))
}

struct Rules {
    records: Vec<String>,
    alerts: Vec<String>,
    /// (record or alert name, expr) of every rule.
    exprs: Vec<(String, String)>,
}

fn load_rules() -> Result<Rules> {
    let doc = yaml_file(&rules_path()?)?;
    let (mut records, mut alerts, mut exprs) = (vec![], vec![], vec![]);
    for group in doc["groups"].as_array().context("no groups")? {
        for rule in group["rules"].as_array().context("group without rules")? {
            let expr = rule["expr"].as_str().context("rule without expr")?.to_string();
            if let Some(r) = rule["record"].as_str() {
                records.push(r.to_string());
                exprs.push((r.to_string(), expr));
            } else if let Some(a) = rule["alert"].as_str() {
                alerts.push(a.to_string());
                exprs.push((a.to_string(), expr));
            } else {
                bail!("rule is neither record nor alert: {rule}");
            }
        }
    }
    Ok(Rules { records, alerts, exprs })
}

#[test]
fn rules_parse_and_use_contract_metrics() -> Result<()> {
    let Rules { records, alerts, exprs } = load_rules()?;
    ensure!(
        !records.is_empty() && !alerts.is_empty(),
        "rules file has no recording rules or no alerts"
    );
    let contract = Contract::new(&records);
    let mut problems = vec![];
    for (name, expr) in &exprs {
        for p in check_promql(expr, &contract, None) {
            problems.push(format!("{name}: {p}"));
        }
    }
    // Recording-rule names follow level:metric:operations.
    for r in &records {
        if r.split(':').count() != 3 || !r.contains("connscope_") {
            problems.push(format!(
                "recording rule `{r}` is not named level:connscope_metric:operations"
            ));
        }
    }
    // Alerts: a severity, a summary and a description that says what to do.
    let doc = yaml_file(&rules_path()?)?;
    for rule in doc["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
    {
        let Some(alert) = rule["alert"].as_str() else { continue };
        if !alert.starts_with("Connscope") {
            problems.push(format!("alert `{alert}` should start with Connscope"));
        }
        if !matches!(s(rule, "/labels/severity"), "info" | "warning" | "critical") {
            problems.push(format!("alert `{alert}` has no severity info|warning|critical"));
        }
        if s(rule, "/annotations/summary").is_empty() {
            problems.push(format!("alert `{alert}` has no summary"));
        }
        if s(rule, "/annotations/description").len() < 150 {
            problems.push(format!("alert `{alert}` needs a description that says what to check"));
        }
    }
    report("deploy/prometheus/connscope-rules.yml", &problems)
}

#[test]
fn every_alert_is_unit_tested_firing_and_silent() -> Result<()> {
    let alerts = load_rules()?.alerts;
    let tests = yaml_file(&repo()?.join("deploy/prometheus/connscope-rules_test.yml"))?;
    let mut firing = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for t in tests["tests"].as_array().context("no tests")? {
        for a in t["alert_rule_test"].as_array().into_iter().flatten() {
            let name =
                a["alertname"].as_str().context("alert_rule_test without alertname")?.to_string();
            match a["exp_alerts"].as_array() {
                Some(v) if !v.is_empty() => firing.insert(name),
                _ => silent.insert(name),
            };
        }
    }
    let mut problems = vec![];
    for a in &alerts {
        if !firing.contains(a) {
            problems.push(format!("{a}: no unit test where it fires"));
        }
        if !silent.contains(a) {
            problems.push(format!("{a}: no unit test where it stays silent"));
        }
    }
    for a in firing.union(&silent) {
        if !alerts.contains(a) {
            problems.push(format!("unit test for unknown alert {a}"));
        }
    }
    report("deploy/prometheus/connscope-rules_test.yml", &problems)
}

#[test]
fn promtool_checks_and_unit_tests_pass() -> Result<()> {
    if !require_tool("promtool", "promtool check/test rules")? {
        return Ok(());
    }
    let dir = repo()?.join("deploy/prometheus");
    let out = run_ok(Command::new("promtool").current_dir(&dir).args([
        "check",
        "rules",
        "connscope-rules.yml",
    ]))?;
    ensure!(out.contains("SUCCESS"), "promtool check rules said: {out}");
    let out = run_ok(Command::new("promtool").current_dir(&dir).args([
        "test",
        "rules",
        "connscope-rules_test.yml",
    ]))?;
    ensure!(out.contains("SUCCESS"), "promtool test rules said: {out}");
    let out = run_ok(Command::new("promtool").current_dir(&dir).args([
        "check",
        "config",
        "prometheus.yml",
    ]))?;
    ensure!(out.contains("SUCCESS"), "promtool check config said: {out}");

    // The example config scrapes the agent's default address under the job the alerts select.
    let cfg = yaml_file(&dir.join("prometheus.yml"))?;
    let job = cfg["scrape_configs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|j| j["job_name"] == "connscope")
        .context("prometheus.yml has no job_name: connscope")?;
    ensure!(
        job.pointer("/static_configs/0/targets")
            .and_then(Value::as_array)
            .is_some_and(|t| t.contains(&json!("localhost:9477"))),
        "prometheus.yml does not scrape localhost:9477"
    );

    // Negative control: promtool really rejects a broken rule here.
    let tmp = scratch("promtool-negative")?;
    let bad = tmp.join("bad.yml");
    fs::write(
        &bad,
        "groups:\n  - name: x\n    rules:\n      - record: a:b:c\n        expr: sum(rate(x[5m])\n",
    )?;
    let out = output(Command::new("promtool").args(["check", "rules"]).arg(&bad))?;
    ensure!(!out.status.success(), "promtool accepted a rule with unbalanced parentheses");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Dashboards

const DASHBOARD_UIDS: &[&str] =
    &["connscope-overview", "connscope-keepalive", "connscope-churn", "connscope-agent"];

use connscope_tests::grafana::{self, dashboards, panels};

/// Any datasource reference other than the `datasource` variable (or Grafana's built-in
/// annotation source) is a hard-coded datasource.
fn hardcoded_datasources(v: &Value, path: &str, out: &mut Vec<String>) {
    let var = |s: &str| s == "${datasource}" || s == "$datasource";
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                let here = format!("{path}/{k}");
                if k == "datasource" {
                    let ok = match child {
                        Value::String(s) => var(s),
                        Value::Object(_) => {
                            var(s(child, "/uid"))
                                || (s(child, "/type") == "grafana"
                                    && s(child, "/uid") == "-- Grafana --")
                        }
                        _ => false,
                    };
                    if !ok {
                        out.push(format!("{here} = {child}"));
                    }
                } else {
                    hardcoded_datasources(child, &here, out);
                }
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                hardcoded_datasources(child, &format!("{path}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn dashboards_are_importable_grafana_json() -> Result<()> {
    let mut problems = vec![];
    let mut uids = BTreeSet::new();
    for (name, d) in dashboards()? {
        let uid = s(&d, "/uid");
        if uid.is_empty() || !uids.insert(uid.to_string()) {
            problems.push(format!("{name}: missing or duplicate uid `{uid}`"));
        }
        if d["schemaVersion"].as_u64().unwrap_or(0) < 41 {
            problems.push(format!("{name}: schemaVersion {} < 41", d["schemaVersion"]));
        }
        if d.get("id").is_some_and(|id| !id.is_null()) {
            problems.push(format!("{name}: a top-level id ties the file to one Grafana instance"));
        }
        for field in ["title", "description"] {
            if s(&d, &format!("/{field}")).is_empty() {
                problems.push(format!("{name}: no {field}"));
            }
        }
        let mut hard = vec![];
        hardcoded_datasources(&d, "", &mut hard);
        problems.extend(hard.into_iter().map(|h| format!("{name}: hard-coded datasource at {h}")));

        // Template variables.
        let vars: BTreeMap<&str, &Value> = d
            .pointer("/templating/list")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|v| (s(v, "/name"), v))
            .collect();
        match vars.get("datasource") {
            Some(v) if s(v, "/type") == "datasource" && s(v, "/query") == "prometheus" => {}
            _ => problems
                .push(format!("{name}: no `datasource` variable of type datasource (prometheus)")),
        }
        for var in ["job", "instance", "namespace"] {
            let Some(v) = vars.get(var) else {
                problems.push(format!("{name}: no `{var}` variable"));
                continue;
            };
            if s(v, "/type") != "query" || s(v, "/datasource/uid") != "${datasource}" {
                problems
                    .push(format!("{name}: `{var}` must be a query variable on ${{datasource}}"));
            }
            if !s(v, "/definition").starts_with("label_values(")
                || s(v, "/query/query") != s(v, "/definition")
            {
                problems.push(format!("{name}: `{var}` must be a label_values() query"));
            }
        }
        if let Some(ns) = vars.get("namespace") {
            // All must also match series without the label (plain hosts): `.*`, not `.+`.
            if ns["includeAll"] != json!(true) || s(ns, "/allValue") != ".*" {
                problems.push(format!("{name}: `namespace` needs includeAll with allValue \".*\""));
            }
        }

        // Panels.
        let mut ids = BTreeSet::new();
        for p in panels(&d) {
            let title = s(p, "/title");
            if !ids.insert(p["id"].as_u64().unwrap_or(0)) {
                problems.push(format!("{name}: panel `{title}` has a missing or duplicate id"));
            }
            let (x, w) = (
                p.pointer("/gridPos/x").and_then(Value::as_u64),
                p.pointer("/gridPos/w").and_then(Value::as_u64),
            );
            if !matches!((x, w), (Some(x), Some(w)) if w > 0 && x + w <= 24) {
                problems.push(format!("{name}: panel `{title}` has a bad gridPos"));
            }
            if s(p, "/type") == "row" {
                continue;
            }
            if title.is_empty() {
                problems.push(format!("{name}: panel {} has no title", p["id"]));
            }
            if s(p, "/description").is_empty() {
                problems.push(format!("{name}: panel `{title}` has no description"));
            }
            if s(p, "/fieldConfig/defaults/unit").is_empty() {
                problems.push(format!(
                    "{name}: panel `{title}` has no unit (fieldConfig.defaults.unit)"
                ));
            }
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            if targets.is_empty() {
                problems.push(format!("{name}: panel `{title}` has no query"));
            }
            let mut refs = BTreeSet::new();
            for t in &targets {
                if s(t, "/expr").trim().is_empty() {
                    problems.push(format!("{name}: panel `{title}` has a target without expr"));
                }
                if !refs.insert(s(t, "/refId").to_string()) {
                    problems.push(format!("{name}: panel `{title}` repeats refId {}", t["refId"]));
                }
            }
        }
    }
    for uid in DASHBOARD_UIDS {
        if !uids.contains(*uid) {
            problems.push(format!("dashboard `{uid}` is missing"));
        }
    }
    report("dashboards", &problems)
}

#[test]
fn dashboard_queries_parse_and_use_contract_metrics() -> Result<()> {
    let records = load_rules()?.records;
    let contract = Contract::new(&records);
    let rate_range =
        promql_parser::util::parse_duration(RATE_INTERVAL).map_err(anyhow::Error::msg)?;
    let mut problems = vec![];
    let mut checked = 0;
    let mut substituted = vec![];
    for (name, d) in dashboards()? {
        let mut queries: Vec<(String, String)> = vec![];
        for p in panels(&d) {
            for t in p["targets"].as_array().into_iter().flatten() {
                queries.push((format!("panel `{}`", s(p, "/title")), s(t, "/expr").to_string()));
            }
        }
        for v in d.pointer("/templating/list").and_then(Value::as_array).into_iter().flatten() {
            if s(v, "/type") != "query" {
                continue;
            }
            // label_values(selector, label): the selector is PromQL, the label must exist.
            let def = s(v, "/definition");
            let inner = def.strip_prefix("label_values(").and_then(|r| r.strip_suffix(')'));
            match inner.and_then(|i| i.rsplit_once(',')) {
                Some((sel, label)) => {
                    let label = label.trim();
                    queries.push((format!("variable `{}`", s(v, "/name")), sel.trim().to_string()));
                    let metric = sel.split('{').next().unwrap_or("").trim();
                    let known = contract
                        .series
                        .get(metric)
                        .and_then(|l| l.as_ref())
                        .is_some_and(|l| l.contains(label));
                    if !known {
                        problems.push(format!("{name}: variable `{}` reads label `{label}` that `{metric}` does not have", s(v, "/name")));
                    }
                }
                None => problems.push(format!(
                    "{name}: variable `{}` is not label_values(selector, label)",
                    s(v, "/name")
                )),
            }
        }
        for (what, raw) in queries {
            checked += 1;
            // Literal ranges would be indistinguishable from the substituted one below.
            if raw.contains(&format!("[{RATE_INTERVAL}")) {
                problems
                    .push(format!("{name}: {what}: literal range [{RATE_INTERVAL}] in `{raw}`"));
            }
            let expr = match substitute_grafana_vars(&raw) {
                Ok(e) => e,
                Err(e) => {
                    problems.push(format!("{name}: {what}: {e}"));
                    continue;
                }
            };
            for p in check_promql(&expr, &contract, Some(rate_range)) {
                problems.push(format!("{name}: {what}: {p}\n      in `{raw}`"));
            }
            substituted.push(expr);
        }
    }
    ensure!(checked > 40, "only {checked} dashboard queries found");
    report("dashboard queries", &problems)?;

    // Second opinion from Prometheus' own parser: every query as a recording rule.
    if !require_tool("promtool", "promtool parse of the dashboard queries")? {
        return Ok(());
    }
    let rules: Vec<Value> = substituted
        .iter()
        .enumerate()
        .map(|(i, e)| json!({"record": format!("dashboard_query_{i}"), "expr": e}))
        .collect();
    let file = scratch("dashboard-queries")?.join("queries.yml");
    let doc = json!({"groups": [{"name": "dashboards", "rules": rules}]});
    fs::write(&file, serde_yaml::to_string(&doc)?)?;
    let out = run_ok(Command::new("promtool").args(["check", "rules"]).arg(&file))?;
    ensure!(
        out.contains(&format!("SUCCESS: {} rules found", substituted.len())),
        "promtool: {out}"
    );
    Ok(())
}

#[test]
fn query_checks_catch_mistakes() -> Result<()> {
    // The checks above must be able to fail: feed them known-bad queries.
    let contract = Contract::new(&[]);
    let five = Some(Duration::from_secs(300));
    let bad = [
        "rate(connscope_connections_opened_total[1m])", // not $__rate_interval
        "sum(connscope_connections_open{namespace=\"x\"})", // label not on this metric
        "connscope_connections_closed_total{closed_by=\"client\"}", // impossible value
        "rate(connscope_requests_total[5m])",           // not in the contract
        "sum(rate(connscope_connections_opened_total[5m])", // does not parse
        "connscope_connection_requests_bucket{reason=~\"idle|later\"}", // label not on histogram
    ];
    for q in bad {
        ensure!(!check_promql(q, &contract, five).is_empty(), "no problem found in `{q}`");
    }
    ensure!(substitute_grafana_vars("up{job=~\"$cluster\"}").is_err(), "unknown variable accepted");
    let good = substitute_grafana_vars(
        "sum(rate(connscope_connection_requests_bucket{job=~\"$job\", le=~\"1|1.0\"}[$__rate_interval]))",
    )?;
    report("good query", &check_promql(&good, &contract, five))
}

#[test]
fn dashboards_match_their_generator() -> Result<()> {
    if !require_tool("python3", "the dashboard generator check")? {
        return Ok(());
    }
    let out = scratch("dashboards")?;
    let dir = repo()?.join("dashboards");
    run_ok(Command::new("python3").arg(dir.join("generate.py")).arg(&out))?;
    let mut problems = vec![];
    for (name, _) in dashboards()? {
        let generated = read(&out.join(&name)).unwrap_or_default();
        if generated != read(&dir.join(&name))? {
            problems.push(format!("{name} differs from `python3 dashboards/generate.py` output: edit the script, rerun it"));
        }
    }
    for e in fs::read_dir(&out)? {
        let n = e?.file_name().to_string_lossy().into_owned();
        if !dir.join(&n).exists() {
            problems.push(format!("generator writes {n}, which is not committed"));
        }
    }
    report("dashboards/generate.py", &problems)
}

#[test]
fn grafana_provisioning_is_consistent() -> Result<()> {
    let dir = repo()?.join("deploy/grafana/provisioning");
    let ds = yaml_file(&dir.join("datasources/connscope.yml"))?;
    ensure!(ds["apiVersion"] == json!(1), "datasource provisioning needs apiVersion: 1");
    ensure!(
        s(&ds, "/datasources/0/type") == "prometheus",
        "provisioned datasource must be prometheus"
    );
    let db = yaml_file(&dir.join("dashboards/connscope.yml"))?;
    ensure!(db["apiVersion"] == json!(1), "dashboard provisioning needs apiVersion: 1");
    let p = &db["providers"][0];
    ensure!(
        s(p, "/type") == "file" && s(p, "/options/path").starts_with('/'),
        "dashboard provider must be a file provider with an absolute path"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Kubernetes

/// Our own schema for the ServiceMonitor/PodMonitor fields we use (not the upstream CRD):
/// unknown fields are errors, so a typo such as `honorLabel` fails.
fn monitor_schema() -> Value {
    let duration = json!({"type": "string", "pattern": "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"});
    let string_map = json!({"type": "object", "additionalProperties": {"type": "string"}});
    let label_name = json!({"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"});
    let relabel = json!({
        "type": "object", "additionalProperties": false,
        "properties": {
            "sourceLabels": {"type": "array", "items": label_name},
            "separator": {"type": "string"},
            "targetLabel": {"type": "string"},
            "regex": {"type": "string"},
            "modulus": {"type": "integer", "minimum": 1},
            "replacement": {"type": "string"},
            "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
                                "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
                                "lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal", "KeepEqual",
                                "dropequal", "DropEqual"]}
        }
    });
    let endpoint = json!({
        "type": "object", "additionalProperties": false,
        "required": ["port"],
        "properties": {
            "port": {"type": "string", "minLength": 1},
            "path": {"type": "string", "pattern": "^/"},
            "scheme": {"enum": ["http", "https"]},
            "interval": duration,
            "scrapeTimeout": duration,
            "honorLabels": {"type": "boolean"},
            "honorTimestamps": {"type": "boolean"},
            "relabelings": {"type": "array", "items": relabel},
            "metricRelabelings": {"type": "array", "items": relabel}
        }
    });
    let selector = json!({
        "type": "object", "additionalProperties": false,
        "properties": {
            "matchLabels": string_map,
            "matchExpressions": {"type": "array", "items": {
                "type": "object", "additionalProperties": false, "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}}
                }
            }}
        }
    });
    let dns =
        json!({"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63});
    let spec = |endpoints_key: &str| {
        json!({
            "type": "object", "additionalProperties": false,
            "required": ["selector", endpoints_key],
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": selector,
                "namespaceSelector": {"type": "object", "additionalProperties": false, "properties": {
                    "any": {"type": "boolean"},
                    "matchNames": {"type": "array", "items": dns}
                }},
                endpoints_key: {"type": "array", "minItems": 1, "items": endpoint}
            }
        })
    };
    let object = |kind: &str, endpoints_key: &str| {
        json!({
            "type": "object", "additionalProperties": false,
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {
                "apiVersion": {"const": "monitoring.coreos.com/v1"},
                "kind": {"const": kind},
                "metadata": {"type": "object", "additionalProperties": false, "required": ["name", "namespace"],
                    "properties": {"name": dns, "namespace": dns, "labels": string_map, "annotations": string_map}},
                "spec": spec(endpoints_key)
            }
        })
    };
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "oneOf": [object("ServiceMonitor", "endpoints"), object("PodMonitor", "podMetricsEndpoints")]
    })
}

const VALIDATE_MONITORS: &str = r#"
import json, sys, jsonschema
schema = json.load(open(sys.argv[1]))
jsonschema.Draft202012Validator.check_schema(schema)
validator = jsonschema.Draft202012Validator(schema)
bad = 0
for doc in json.load(open(sys.argv[2])):
    for err in validator.iter_errors(doc):
        bad += 1
        print(doc.get("kind"), "/".join(map(str, err.absolute_path)), err.message)
sys.exit(1 if bad else 0)
"#;

fn kustomize(dir: &Path) -> Result<Vec<Value>> {
    let out = run_ok(Command::new("kubectl").arg("kustomize").arg(dir))?;
    yaml_stream(&out)
}

fn kubernetes_validate(tmp: &Path, name: &str, docs: &[&Value]) -> Result<Output> {
    let mut text = String::new();
    for d in docs {
        text.push_str("---\n");
        text.push_str(&serde_yaml::to_string(d)?);
    }
    let file = tmp.join(format!("{name}.yaml"));
    fs::write(&file, text)?;
    output(
        Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "-k", K8S_VERSION])
            .arg(&file),
    )
}

fn validate_monitors(tmp: &Path, name: &str, docs: &[&Value]) -> Result<Output> {
    let schema = tmp.join("monitor-schema.json");
    fs::write(&schema, serde_json::to_string_pretty(&monitor_schema())?)?;
    let file = tmp.join(format!("{name}-monitors.json"));
    fs::write(&file, serde_json::to_string(docs)?)?;
    output(Command::new("python3").arg("-c").arg(VALIDATE_MONITORS).arg(&schema).arg(&file))
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind)
}

fn is_subset(small: &Value, big: &Value) -> bool {
    small.as_object().is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| big.get(k) == Some(v)))
}

/// What the design asks of the agent's DaemonSet (design.md §5 and the deploy brief).
fn check_daemonset(ds: &Value, privileged: bool, problems: &mut Vec<String>) {
    let mut want = |ok: bool, what: &str| {
        if !ok {
            problems.push(format!("DaemonSet: {what}"));
        }
    };
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    want(pod["hostPID"] == json!(true), "hostPID must be true");
    want(
        pod["tolerations"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["operator"] == "Exists" && t.get("key").is_none())),
        "needs a toleration for all taints (operator: Exists, no key)",
    );
    want(
        s(ds, "/spec/updateStrategy/type") == "RollingUpdate"
            && !ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"].is_null(),
        "RollingUpdate with maxUnavailable",
    );
    want(
        is_subset(
            &ds["spec"]["selector"]["matchLabels"],
            &ds["spec"]["template"]["metadata"]["labels"],
        ),
        "selector must match the pod labels",
    );
    let args: Vec<&str> =
        c["args"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    for a in [
        "--web.listen-address=:9477",
        "--log.level=info",
        "--path.cgroup=/host/sys/fs/cgroup",
        "--path.kubelet-logs=/host/var/log",
    ] {
        want(args.contains(&a), &format!("container args lack {a}"));
    }
    want(
        c["ports"].as_array().is_some_and(|p| {
            p.iter().any(|p| p["name"] == "metrics" && p["containerPort"] == json!(9477))
        }),
        "container port 9477 named metrics",
    );
    want(
        s(c, "/livenessProbe/httpGet/path") == "/healthz"
            && s(c, "/livenessProbe/httpGet/port") == "metrics",
        "liveness probe GET /healthz on port metrics",
    );
    want(
        s(c, "/readinessProbe/httpGet/path") == "/readyz"
            && s(c, "/readinessProbe/httpGet/port") == "metrics",
        "readiness probe GET /readyz on port metrics",
    );
    for r in ["requests/cpu", "requests/memory", "limits/cpu", "limits/memory"] {
        want(
            !s(c, &format!("/resources/{r}")).is_empty(),
            &format!("resources.{}", r.replace('/', ".")),
        );
    }
    let sc = &c["securityContext"];
    let list = |p: &str| -> BTreeSet<String> {
        sc.pointer(p)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect()
    };
    let wanted_caps: BTreeSet<String> =
        ["BPF", "PERFMON", "SYS_RESOURCE", "SYS_PTRACE", "DAC_READ_SEARCH"]
            .map(String::from)
            .into();
    want(
        list("/capabilities/add") == wanted_caps,
        "capabilities.add must be exactly BPF PERFMON SYS_RESOURCE SYS_PTRACE DAC_READ_SEARCH",
    );
    want(
        list("/capabilities/drop") == BTreeSet::from(["ALL".to_string()]),
        "capabilities.drop must be [ALL]",
    );
    want(
        sc["privileged"] == json!(privileged),
        &format!("privileged must be {privileged} in this variant"),
    );
    want(sc["readOnlyRootFilesystem"] == json!(true), "readOnlyRootFilesystem");
    // Host paths, each mounted read-only.
    let volumes: HashMap<&str, &str> = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| (s(v, "/name"), s(v, "/hostPath/path")))
        .collect();
    let mounts: Vec<(&str, &str, bool)> = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                volumes.get(s(m, "/name")).copied().unwrap_or(""),
                s(m, "/mountPath"),
                m["readOnly"] == json!(true),
            )
        })
        .collect();
    for host in [
        "/sys/kernel/btf",
        "/sys/kernel/tracing",
        "/sys/fs/cgroup",
        "/var/log/pods",
        "/var/log/containers",
    ] {
        want(
            mounts.iter().any(|(h, _, ro)| *h == host && *ro),
            &format!("needs a read-only mount of {host}"),
        );
    }
    want(mounts.iter().all(|(_, _, ro)| *ro), "every host mount must be read-only");
    // The flags must point where the mounts are.
    want(
        mounts.iter().any(|(h, m, _)| *h == "/sys/fs/cgroup" && *m == "/host/sys/fs/cgroup"),
        "/sys/fs/cgroup at /host/sys/fs/cgroup",
    );
    want(
        mounts.iter().any(|(h, m, _)| *h == "/var/log/pods" && *m == "/host/var/log/pods"),
        "/var/log/pods at /host/var/log/pods",
    );
    want(
        mounts
            .iter()
            .any(|(h, m, _)| *h == "/var/log/containers" && *m == "/host/var/log/containers"),
        "/var/log/containers at /host/var/log/containers",
    );
}

#[test]
fn kubernetes_manifests_render_and_validate() -> Result<()> {
    if !require_tool("kubectl", "kubectl kustomize")?
        || !require_python_modules(
            &["kubernetes_validate", "jsonschema"],
            "Kubernetes manifest validation",
        )?
    {
        return Ok(());
    }
    let root = repo()?.join("deploy/kubernetes");
    let tmp = scratch("kubernetes")?;
    // (directory, extra kinds beyond the base, privileged)
    let variants: [(&str, Option<&str>, bool); 4] = [
        (".", None, false),
        ("overlays/prometheus-operator", Some("ServiceMonitor"), false),
        ("overlays/podmonitor", Some("PodMonitor"), false),
        ("overlays/privileged", None, true),
    ];
    let mut problems = vec![];
    for (dir, monitor, privileged) in variants {
        let docs = kustomize(&root.join(dir))?;
        let label = if dir == "." { "base".to_string() } else { dir.replace('/', "-") };
        let kinds: BTreeSet<&str> = docs.iter().map(|d| s(d, "/kind")).collect();
        let mut expected: BTreeSet<&str> =
            ["Namespace", "ServiceAccount", "DaemonSet", "Service"].into();
        expected.extend(monitor);
        if kinds != expected {
            problems.push(format!("{dir}: renders {kinds:?}, expected {expected:?}"));
        }
        for d in &docs {
            if d["kind"] != "Namespace" && s(d, "/metadata/namespace") != NAMESPACE {
                problems.push(format!(
                    "{dir}: {} {} is not in namespace {NAMESPACE}",
                    d["kind"], d["metadata"]["name"]
                ));
            }
        }
        let (core, monitors): (Vec<&Value>, Vec<&Value>) =
            docs.iter().partition(|d| !s(d, "/apiVersion").starts_with("monitoring.coreos.com/"));
        let out = kubernetes_validate(&tmp, &label, &core)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success()
            || text.contains("ERROR")
            || text.contains("WARN")
            || text.matches("passed").count() != core.len()
        {
            problems.push(format!("{dir}: kubernetes-validate --strict -k {K8S_VERSION}:\n{text}"));
        }
        if !monitors.is_empty() {
            let out = validate_monitors(&tmp, &label, &monitors)?;
            if !out.status.success() {
                problems.push(format!(
                    "{dir}: monitor schema:\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }

        let Some(ds) = find(&docs, "DaemonSet") else { continue };
        check_daemonset(ds, privileged, &mut problems);
        let pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
        if let Some(svc) = find(&docs, "Service") {
            if svc["spec"]["clusterIP"] != "None"
                || !is_subset(&svc["spec"]["selector"], pod_labels)
            {
                problems.push(format!("{dir}: Service must be headless and select the agent pods"));
            }
            if !svc["spec"]["ports"].as_array().is_some_and(|p| {
                p.iter().any(|p| p["name"] == "metrics" && p["port"] == json!(9477))
            }) {
                problems.push(format!("{dir}: Service needs port metrics 9477"));
            }
        }
        if find(&docs, "Namespace").is_some_and(|ns| {
            s(ns, "/metadata/labels/pod-security.kubernetes.io~1enforce") != "privileged"
        }) {
            problems.push(format!("{dir}: namespace must allow privileged pods (Pod Security)"));
        }
        for m in &monitors {
            let (endpoints, target_labels) = match s(m, "/kind") {
                "ServiceMonitor" => {
                    ("endpoints", find(&docs, "Service").map(|s| &s["metadata"]["labels"]))
                }
                _ => ("podMetricsEndpoints", Some(pod_labels)),
            };
            if !target_labels.is_some_and(|l| is_subset(&m["spec"]["selector"]["matchLabels"], l)) {
                problems.push(format!("{dir}: {} selector does not select the agent", m["kind"]));
            }
            let eps = m["spec"][endpoints].as_array().cloned().unwrap_or_default();
            if eps.is_empty()
                || !eps.iter().all(|e| e["honorLabels"] == json!(true) && e["port"] == "metrics")
            {
                problems.push(format!(
                    "{dir}: {} endpoints need port metrics and honorLabels: true",
                    m["kind"]
                ));
            }
            if !m["spec"]["namespaceSelector"]["matchNames"]
                .as_array()
                .is_some_and(|n| n.contains(&json!(NAMESPACE)))
            {
                problems.push(format!("{dir}: {} must look in namespace {NAMESPACE}", m["kind"]));
            }
            // job="connscope" is what the alerts select.
            let job = s(m, "/spec/jobLabel");
            if target_labels.is_none_or(|l| l[job] != "connscope") {
                problems.push(format!(
                    "{dir}: {} jobLabel must name a label whose value is connscope",
                    m["kind"]
                ));
            }
        }
    }

    // Negative controls: the validators reject a typo.
    let docs = kustomize(&root.join("overlays/prometheus-operator"))?;
    let mut ds = find(&docs, "DaemonSet").cloned().context("no DaemonSet")?;
    ds["spec"]["template"]["spec"]["hostPid"] = json!(true);
    ensure!(
        !kubernetes_validate(&tmp, "negative", &[&ds])?.status.success(),
        "kubernetes-validate --strict accepted an unknown field"
    );
    let mut sm = find(&docs, "ServiceMonitor").cloned().context("no ServiceMonitor")?;
    sm["spec"]["endpoints"][0]["honorLabel"] = json!(true);
    ensure!(
        !validate_monitors(&tmp, "negative", &[&sm])?.status.success(),
        "monitor schema accepted an unknown field"
    );
    let mut sm = find(&docs, "ServiceMonitor").cloned().context("no ServiceMonitor")?;
    sm["spec"]["endpoints"][0]["interval"] = json!("15 seconds");
    ensure!(
        !validate_monitors(&tmp, "negative2", &[&sm])?.status.success(),
        "monitor schema accepted a bad duration"
    );

    report("deploy/kubernetes", &problems)
}

// ---------------------------------------------------------------------------------------
// systemd and Docker

#[test]
fn systemd_unit_verifies() -> Result<()> {
    let unit = read(&repo()?.join("deploy/systemd/connscope.service"))?;
    let mut problems = vec![];
    let value = |key: &str| -> Vec<String> {
        unit.lines().filter_map(|l| l.strip_prefix(&format!("{key}="))).map(String::from).collect()
    };
    let caps: BTreeSet<&str> =
        ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_RESOURCE", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"]
            .into();
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        let got: Vec<String> = value(key);
        let set: BTreeSet<&str> = got.iter().flat_map(|v| v.split_whitespace()).collect();
        if set != caps {
            problems.push(format!("{key} must be exactly {caps:?}, is {set:?}"));
        }
    }
    for (key, want) in
        [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes")]
    {
        if value(key) != [want] {
            problems.push(format!("{key}={want} expected"));
        }
    }
    let exec = value("ExecStart");
    let Some(exec) = exec.first() else { bail!("no ExecStart") };
    for flag in ["--web.listen-address=:9477", "--log.level=info"] {
        if !exec.contains(flag) {
            problems.push(format!("ExecStart lacks {flag}"));
        }
    }
    report("deploy/systemd/connscope.service", &problems)?;

    if !require_tool("systemd-analyze", "systemd-analyze verify")? {
        return Ok(());
    }
    // verify wants the binary to exist: point ExecStart at one that does, change nothing else.
    let binary = exec.split_whitespace().next().unwrap_or("");
    let tmp = scratch("systemd")?;
    let copy = tmp.join("connscope.service");
    fs::write(&copy, unit.replace(binary, "/bin/true"))?;
    let out = output(Command::new("systemd-analyze").arg("verify").arg(&copy))?;
    // It exits 0 on unknown keys and bad values, printing them: any line about our unit fails.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("connscope.service")).collect();
    ensure!(out.status.success() && ours.is_empty(), "systemd-analyze verify:\n{stderr}");

    // Negative control: a misspelt directive is reported.
    fs::write(
        &copy,
        unit.replace(binary, "/bin/true").replace("NoNewPrivileges=", "NoNewPrivilege="),
    )?;
    let out = output(Command::new("systemd-analyze").arg("verify").arg(&copy))?;
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("NoNewPrivilege"),
        "systemd-analyze verify did not report a misspelt key"
    );
    Ok(())
}

#[test]
fn dockerfile_is_a_two_stage_build_of_the_binary() -> Result<()> {
    let root = repo()?;
    let text = read(&root.join("deploy/Dockerfile"))?;
    // Instructions with their continuation lines joined, comments dropped.
    let mut instructions: Vec<String> = vec![];
    let mut cur = String::new();
    for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.is_empty()) {
        cur.push_str(line.trim_end_matches('\\'));
        cur.push(' ');
        if !line.ends_with('\\') {
            instructions.push(cur.trim().to_string());
            cur.clear();
        }
    }
    let froms: Vec<&String> = instructions.iter().filter(|i| i.starts_with("FROM ")).collect();
    ensure!(froms.len() == 2, "expected a builder and a runtime stage, found {froms:?}");
    ensure!(
        froms[0].starts_with("FROM debian:bookworm AS builder"),
        "builder must be debian:bookworm AS builder: {}",
        froms[0]
    );
    ensure!(
        froms[1] == "FROM debian:bookworm-slim",
        "runtime must be debian:bookworm-slim: {}",
        froms[1]
    );
    let split = instructions.iter().position(|i| i == froms[1].as_str()).unwrap_or(0);
    let (builder, runtime) = instructions.split_at(split);
    let runs =
        builder.iter().filter(|i| i.starts_with("RUN ")).cloned().collect::<Vec<_>>().join("\n");
    let setup = runs.find("cargo xtask setup");
    let build = runs.find("cargo build --release");
    ensure!(
        matches!((setup, build), (Some(a), Some(b)) if a < b),
        "builder must run `cargo xtask setup` then `cargo build --release`"
    );
    ensure!(
        builder.iter().any(|i| i == "COPY . ."),
        "the build context (repo root) must be copied in"
    );
    ensure!(
        !runtime.iter().any(|i| i.starts_with("RUN ") || i.starts_with("ADD ")),
        "runtime stage must only receive the binary"
    );
    let copies: Vec<&String> = runtime.iter().filter(|i| i.starts_with("COPY ")).collect();
    ensure!(
        copies.len() == 1
            && copies[0].starts_with("COPY --from=builder ")
            && copies[0].ends_with("/usr/local/bin/connscope"),
        "runtime stage must copy just the binary from the builder: {copies:?}"
    );
    ensure!(
        runtime
            .iter()
            .any(|i| i.starts_with("ENTRYPOINT") && i.contains("/usr/local/bin/connscope")),
        "ENTRYPOINT must be the binary"
    );
    ensure!(runtime.iter().any(|i| i == "EXPOSE 9477"), "EXPOSE 9477");
    let ignore = read(&root.join("deploy/Dockerfile.dockerignore"))?;
    ensure!(
        ignore.lines().any(|l| l.trim() == "target/"),
        "Dockerfile.dockerignore must keep target/ out of the context"
    );
    Ok(())
}
