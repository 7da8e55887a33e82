//! Reading the bundled Grafana dashboards: their panels, queries and template variables.

use std::path::PathBuf;

use anyhow::{Context as _, ensure};
use serde_json::Value;

pub use crate::asset_files::repo_root;

/// Every dashboard in `dashboards/`, by file name, sorted.
pub fn dashboards() -> anyhow::Result<Vec<(String, Value)>> {
    let dir = repo_root().join("dashboards");
    let mut paths: Vec<PathBuf> =
        std::fs::read_dir(&dir)?.map(|e| e.map(|e| e.path())).collect::<std::io::Result<_>>()?;
    paths.sort();
    let mut out = vec![];
    for path in paths.into_iter().filter(|p| p.extension().is_some_and(|e| e == "json")) {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let value: Value =
            serde_json::from_str(&text).with_context(|| format!("{name} is not valid JSON"))?;
        out.push((name, value));
    }
    ensure!(!out.is_empty(), "no dashboards in dashboards/");
    Ok(out)
}

/// Every panel, including those nested in collapsed rows.
pub fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = vec![];
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(panel);
        out.extend(panel["panels"].as_array().into_iter().flatten());
    }
    out
}

/// `(panel title, expr)` of every panel target.
pub fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = vec![];
    for panel in panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or_default();
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push((title.to_owned(), expr.to_owned()));
            }
        }
    }
    out
}

/// Replaces the Grafana variables the dashboards use (`$__rate_interval`, `$job`,
/// `$instance`, `$namespace`, with or without braces) by the given values; fails on any
/// other variable.
pub fn substitute(
    expr: &str,
    rate_interval: &str,
    values: &[(&str, &str)],
) -> anyhow::Result<String> {
    let mut s = expr
        .replace("${__rate_interval}", rate_interval)
        .replace("$__rate_interval", rate_interval);
    for (var, value) in values {
        s = s.replace(&format!("${{{var}}}"), value).replace(&format!("${var}"), value);
    }
    ensure!(!s.contains('$'), "unknown Grafana variable in `{expr}`");
    Ok(s)
}
