//! Checks of the Grafana dashboards (dashboards/, written by dashboards/generate.py) and
//! their provisioning (deploy/grafana): importable JSON that follows the conventions
//! generate.py states, every query parsed and held to the metric contract (and parsed again
//! by promtool), and the committed JSON equal to the generator's output. Grafana's own
//! schema is checked in assets_grafana_schema.rs.

#[path = "shared/metric_contract.rs"]
mod metric_contract;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, ensure};
use connscope_tests::asset_files::{read, repo_root, report, scratch, str_at, yaml_file};
use connscope_tests::external_tools::{require_tool, run_ok};
use connscope_tests::grafana::{self, dashboards, panels};
use connscope_tests::prometheus_rules::load_rules;
use metric_contract::{Contract, check_promql};
use serde_json::{Value, json};

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

const DASHBOARD_UIDS: &[&str] =
    &["connscope-overview", "connscope-keepalive", "connscope-churn", "connscope-agent"];

/// Any datasource reference other than the `datasource` variable (or Grafana's built-in
/// annotation source) is a hard-coded datasource.
fn hardcoded_datasources(v: &Value, path: &str, out: &mut Vec<String>) {
    let is_variable = |name: &str| name == "${datasource}" || name == "$datasource";
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                let here = format!("{path}/{k}");
                if k == "datasource" {
                    let ok = match child {
                        Value::String(name) => is_variable(name),
                        Value::Object(_) => {
                            is_variable(str_at(child, "/uid"))
                                || (str_at(child, "/type") == "grafana"
                                    && str_at(child, "/uid") == "-- Grafana --")
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
        let uid = str_at(&d, "/uid");
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
            if str_at(&d, &format!("/{field}")).is_empty() {
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
            .map(|v| (str_at(v, "/name"), v))
            .collect();
        match vars.get("datasource") {
            Some(v)
                if str_at(v, "/type") == "datasource" && str_at(v, "/query") == "prometheus" => {}
            _ => problems
                .push(format!("{name}: no `datasource` variable of type datasource (prometheus)")),
        }
        for var in ["job", "instance", "namespace"] {
            let Some(v) = vars.get(var) else {
                problems.push(format!("{name}: no `{var}` variable"));
                continue;
            };
            if str_at(v, "/type") != "query" || str_at(v, "/datasource/uid") != "${datasource}" {
                problems
                    .push(format!("{name}: `{var}` must be a query variable on ${{datasource}}"));
            }
            // The Prometheus variable editor's form: qryType 1 is "label values". (Grafana's
            // schema has no `definition` field, so the query is only here.)
            if !str_at(v, "/query/query").starts_with("label_values(")
                || v["query"]["qryType"] != json!(1)
            {
                problems.push(format!("{name}: `{var}` must be a label_values() query"));
            }
        }
        if let Some(ns) = vars.get("namespace") {
            // All must also match series without the label (plain hosts): `.*`, not `.+`.
            if ns["includeAll"] != json!(true) || str_at(ns, "/allValue") != ".*" {
                problems.push(format!("{name}: `namespace` needs includeAll with allValue \".*\""));
            }
        }

        // Panels.
        let mut ids = BTreeSet::new();
        for p in panels(&d) {
            let title = str_at(p, "/title");
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
            if str_at(p, "/type") == "row" {
                continue;
            }
            if title.is_empty() {
                problems.push(format!("{name}: panel {} has no title", p["id"]));
            }
            if str_at(p, "/description").is_empty() {
                problems.push(format!("{name}: panel `{title}` has no description"));
            }
            if str_at(p, "/fieldConfig/defaults/unit").is_empty() {
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
                if str_at(t, "/expr").trim().is_empty() {
                    problems.push(format!("{name}: panel `{title}` has a target without expr"));
                }
                if !refs.insert(str_at(t, "/refId").to_string()) {
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
                queries.push((
                    format!("panel `{}`", str_at(p, "/title")),
                    str_at(t, "/expr").to_string(),
                ));
            }
        }
        for v in d.pointer("/templating/list").and_then(Value::as_array).into_iter().flatten() {
            if str_at(v, "/type") != "query" {
                continue;
            }
            // label_values(selector, label): the selector is PromQL, the label must exist.
            let def = str_at(v, "/query/query");
            let inner = def.strip_prefix("label_values(").and_then(|r| r.strip_suffix(')'));
            match inner.and_then(|i| i.rsplit_once(',')) {
                Some((sel, label)) => {
                    let label = label.trim();
                    queries.push((
                        format!("variable `{}`", str_at(v, "/name")),
                        sel.trim().to_string(),
                    ));
                    let metric = sel.split('{').next().unwrap_or("").trim();
                    if !contract.has_label(metric, label) {
                        problems.push(format!("{name}: variable `{}` reads label `{label}` that `{metric}` does not have", str_at(v, "/name")));
                    }
                }
                None => problems.push(format!(
                    "{name}: variable `{}` is not label_values(selector, label)",
                    str_at(v, "/name")
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
    let dir = repo_root().join("dashboards");
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
    let dir = repo_root().join("deploy/grafana/provisioning");
    let ds = yaml_file(&dir.join("datasources/connscope.yml"))?;
    ensure!(ds["apiVersion"] == json!(1), "datasource provisioning needs apiVersion: 1");
    ensure!(
        str_at(&ds, "/datasources/0/type") == "prometheus",
        "provisioned datasource must be prometheus"
    );
    let db = yaml_file(&dir.join("dashboards/connscope.yml"))?;
    ensure!(db["apiVersion"] == json!(1), "dashboard provisioning needs apiVersion: 1");
    let p = &db["providers"][0];
    ensure!(
        str_at(p, "/type") == "file" && str_at(p, "/options/path").starts_with('/'),
        "dashboard provider must be a file provider with an absolute path"
    );
    Ok(())
}
