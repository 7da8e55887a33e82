//! Every dashboard the project ships type-checks against Grafana's own schema
//! (`@grafana/schema`, with the panel plugins' option types) under the TypeScript compiler,
//! and the check rejects dashboards broken on purpose: unknown fields and wrong types, at
//! the top, in variables, in panels' common fields, in plugin options and field config, and
//! in targets. tests/node/grafana-dashboard.ts says what the types cover.

use anyhow::{Context, Result, ensure};
use connscope_tests::asset_files::report;
use connscope_tests::grafana_schema::{Source, shipped_dashboards, type_check};
use serde_json::{Value, json};

#[test]
fn shipped_dashboards_satisfy_grafana_schema() -> Result<()> {
    let sources = shipped_dashboards()?;
    ensure!(sources.len() >= 4, "found only {} dashboards", sources.len());
    let Some(problems) = type_check("shipped", &sources)? else { return Ok(()) };
    let all: Vec<String> = problems.into_values().flatten().collect();
    report("dashboards against @grafana/schema", &all)
}

/// Which of the two types must reject a broken copy.
#[derive(Clone, Copy, PartialEq)]
enum Layer {
    /// Grafana's `Dashboard` type itself.
    Grafana,
    /// The panel plugin types (options, custom field config, Prometheus targets).
    Plugin,
}

/// One deliberate mistake: set `key` in the object at `parent` (a JSON pointer; `{ts}`,
/// `{stat}` stand for the first timeseries and stat panel) to `value`.
struct Breakage {
    what: &'static str,
    parent: &'static str,
    key: &'static str,
    value: Value,
    layer: Layer,
}

fn breakages() -> Vec<Breakage> {
    use Layer::{Grafana, Plugin};
    let stat_thresholds = "{stat}/fieldConfig/defaults/thresholds";
    let cases = [
        ("unknown top-level field", "", "refreshInterval", json!("30s"), Grafana),
        ("wrong type at the top", "", "graphTooltip", json!("shared"), Grafana),
        ("unknown variable field", "/templating/list/1", "defintion", json!("x"), Grafana),
        ("impossible variable type", "/templating/list/1", "type", json!("promql"), Grafana),
        ("wrong type in gridPos", "{ts}/gridPos", "w", json!("12"), Grafana),
        ("unknown field config default", "{ts}/fieldConfig/defaults", "units", json!("s"), Grafana),
        ("impossible thresholds mode", stat_thresholds, "mode", json!("relative"), Grafana),
        (
            "unknown timeseries custom field",
            "{ts}/fieldConfig/defaults/custom",
            "lineWidht",
            json!(1),
            Plugin,
        ),
        (
            "wrong type in timeseries legend",
            "{ts}/options/legend",
            "showLegend",
            json!("yes"),
            Plugin,
        ),
        ("unknown stat option", "{stat}/options", "colourMode", json!("value"), Plugin),
        ("impossible stat option value", "{stat}/options", "colorMode", json!("rainbow"), Plugin),
        ("unknown target field", "{ts}/targets/0", "legendFromat", json!("x"), Plugin),
        ("wrong target type", "{ts}/targets/0", "instant", json!("false"), Plugin),
        ("panel type without plugin types", "{stat}", "type", json!("piechart"), Plugin),
    ];
    cases
        .into_iter()
        .map(|(what, parent, key, value, layer)| Breakage { what, parent, key, value, layer })
        .collect()
}

/// The JSON pointer of the first panel of type `kind`.
fn first_panel(dashboard: &Value, kind: &str) -> Result<String> {
    let panels = dashboard["panels"].as_array().context("no panels")?;
    let index = panels.iter().position(|p| p["type"] == kind).context("no such panel")?;
    Ok(format!("/panels/{index}"))
}

#[test]
fn grafana_schema_check_rejects_broken_dashboards() -> Result<()> {
    let shipped = shipped_dashboards()?;
    let original = shipped
        .iter()
        .find(|s| s.label.ends_with("connscope-overview.json"))
        .context("no overview dashboard")?;
    let dashboard: Value = serde_json::from_str(&original.json)?;
    let (timeseries, stat) =
        (first_panel(&dashboard, "timeseries")?, first_panel(&dashboard, "stat")?);
    // The unbroken dashboard, pretty-printed the same way, is the control.
    let mut sources = vec![Source {
        label: "control".to_string(),
        json: serde_json::to_string_pretty(&dashboard)?,
    }];
    let cases = breakages();
    for case in &cases {
        let mut broken = dashboard.clone();
        let parent = case.parent.replace("{ts}", &timeseries).replace("{stat}", &stat);
        let object = broken
            .pointer_mut(&parent)
            .and_then(Value::as_object_mut)
            .with_context(|| format!("{}: no object at {parent}", case.what))?;
        object.insert(case.key.to_string(), case.value.clone());
        sources.push(Source {
            label: case.what.to_string(),
            json: serde_json::to_string_pretty(&broken)?,
        });
    }
    let Some(problems) = type_check("broken", &sources)? else { return Ok(()) };

    let mut failures = vec![];
    if let Some(control) = problems.get("control").filter(|p| !p.is_empty()) {
        failures.push(format!("the unbroken copy fails: {control:?}"));
    }
    for (case, source) in cases.iter().zip(&sources[1..]) {
        let found = problems.get(case.what).cloned().unwrap_or_default();
        let against = match case.layer {
            Layer::Grafana => "(against Grafana's Dashboard type)",
            Layer::Plugin => "(against the panel plugin types)",
        };
        // The error points at the line of the broken field.
        let lines: Vec<&str> = source.json.lines().collect();
        let field = format!("\"{}\": {}", case.key, case.value);
        let pinpointed = found.iter().any(|message| {
            let line = message.split(':').nth(1).and_then(|l| l.parse::<usize>().ok());
            message.contains(against)
                && line.and_then(|l| lines.get(l - 1)).is_some_and(|l| l.contains(&field))
        });
        if !pinpointed {
            failures.push(format!(
                "{}: tsc did not reject `{field}` {against} on its line; it said {found:#?}",
                case.what
            ));
        }
    }
    report("the Grafana schema check on broken dashboards", &failures)
}
