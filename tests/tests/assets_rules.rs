//! Checks of the Prometheus recording rules, alerts and example config in
//! deploy/prometheus: every query against the metric contract, every alert unit-tested
//! firing and silent, and promtool's own checks (installed by `cargo xtask setup`).

#[path = "shared/metric_contract.rs"]
mod metric_contract;

use std::collections::BTreeSet;
use std::fs;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use connscope_tests::asset_files::{repo_root, report, scratch, str_at, yaml_file};
use connscope_tests::external_tools::{output, require_tool, run_ok};
use connscope_tests::prometheus_rules::{Rules, load_rules};
use metric_contract::{Contract, check_promql};
use serde_json::{Value, json};

#[test]
fn rules_parse_and_use_contract_metrics() -> Result<()> {
    let Rules { records, alerts, exprs, document } = load_rules()?;
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
    for rule in document["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
    {
        let Some(alert) = rule["alert"].as_str() else { continue };
        if !alert.starts_with("Connscope") {
            problems.push(format!("alert `{alert}` should start with Connscope"));
        }
        if !matches!(str_at(rule, "/labels/severity"), "info" | "warning" | "critical") {
            problems.push(format!("alert `{alert}` has no severity info|warning|critical"));
        }
        if str_at(rule, "/annotations/summary").is_empty() {
            problems.push(format!("alert `{alert}` has no summary"));
        }
        if str_at(rule, "/annotations/description").len() < 150 {
            problems.push(format!("alert `{alert}` needs a description that says what to check"));
        }
    }
    report("deploy/prometheus/connscope-rules.yml", &problems)
}

#[test]
fn every_alert_is_unit_tested_firing_and_silent() -> Result<()> {
    let alerts = load_rules()?.alerts;
    let tests = yaml_file(&repo_root().join("deploy/prometheus/connscope-rules_test.yml"))?;
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
    let dir = repo_root().join("deploy/prometheus");
    for (verb, kind, file) in [
        ("check", "rules", "connscope-rules.yml"),
        ("test", "rules", "connscope-rules_test.yml"),
        ("check", "config", "prometheus.yml"),
    ] {
        let out = run_ok(Command::new("promtool").current_dir(&dir).args([verb, kind, file]))?;
        ensure!(out.contains("SUCCESS"), "promtool {verb} {kind} said: {out}");
    }

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
