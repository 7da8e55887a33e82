//! Type-checks dashboard JSON against Grafana's own types (`@grafana/schema`) with the
//! TypeScript compiler, both installed by `cargo xtask setup` into target/node-tools at the
//! versions tests/node/package-lock.json pins. The types, and what they do and do not
//! check, are in tests/node/grafana-dashboard.ts.
//!
//! Each dashboard becomes a .ts file holding its JSON twice as object literals, one
//! `satisfies GrafanaDashboard` and one `satisfies ConnscopeDashboard`: checking literals (not
//! a JSON import, not an assignment of a variable) makes TypeScript reject unknown fields at
//! every level. tsc's positions are mapped back to lines of the JSON.

use std::collections::BTreeMap;
use std::fs;
use std::process::Command;

use anyhow::{Context as _, bail, ensure};

use crate::asset_files::{files_with_extension, fresh_dir, repo_root};
use crate::external_tools::{combined_output, output, require_tool, skip_or_fail};

/// Where `cargo xtask setup` installs the npm tools (xtask/src/node_tools.rs).
const NODE_TOOLS: &str = "target/node-tools";
const TYPES_FILE: &str = "grafana-dashboard.ts";
/// Lines before the first copy of the JSON: the import and the source comment.
const PRELUDE_LINES: usize = 2;

/// A dashboard to check: `label` names it in messages, `json` is its text.
pub struct Source {
    pub label: String,
    pub json: String,
}

/// What tsc reported, by source label (every source has an entry; empty means it passed).
pub type Problems = BTreeMap<String, Vec<String>>;

/// Type-checks `sources` in one tsc run in a fresh directory named `name`. `None`: the
/// tools are missing and this is not CI (the skip is printed).
pub fn type_check(name: &str, sources: &[Source]) -> anyhow::Result<Option<Problems>> {
    let check = "the Grafana schema check of the dashboards";
    let tools = repo_root().join(NODE_TOOLS);
    let tsc = tools.join("node_modules/.bin/tsc");
    if !require_tool("node", check)? {
        return Ok(None);
    }
    if !tsc.exists() && !skip_or_fail(check, &format!("{} is missing", tsc.display()))? {
        return Ok(None);
    }
    // Below target/node-tools, so that the imports resolve to its node_modules.
    let dir = tools.join("checks").join(name);
    fresh_dir(&dir)?;
    fs::copy(repo_root().join("tests/node").join(TYPES_FILE), dir.join(TYPES_FILE))
        .with_context(|| format!("copying tests/node/{TYPES_FILE}"))?;
    let mut files = vec![];
    for (i, source) in sources.iter().enumerate() {
        let file = format!("dashboard-{i}.ts");
        fs::write(dir.join(&file), typescript_module(source))?;
        files.push(file);
    }
    let out = output(
        Command::new(&tsc)
            .current_dir(&dir)
            .args(["--noEmit", "--strict", "--pretty", "false", "--skipLibCheck"])
            .args(["--target", "es2022", "--module", "nodenext"])
            .args(["--moduleResolution", "nodenext", "--allowImportingTsExtensions"])
            .args(["--types", ""])
            .args(&files),
    )?;
    let text = combined_output(&out);
    let problems = map_diagnostics(&text, sources)?;
    let found = problems.values().any(|p| !p.is_empty());
    ensure!(found != out.status.success(), "tsc exited {} saying:\n{text}", out.status);
    Ok(Some(problems))
}

/// The .ts module of one dashboard (see the module comment).
fn typescript_module(source: &Source) -> String {
    let json = source.json.trim_end();
    // `satisfies` must stand on the literal's last line: a line break before it ends the
    // statement.
    format!(
        "import type {{ ConnscopeDashboard, GrafanaDashboard }} from './{TYPES_FILE}';\n\
         // {}\n\
         export const grafana = {json} satisfies GrafanaDashboard;\n\
         export const connscope = {json} satisfies ConnscopeDashboard;\n",
        source.label
    )
}

/// tsc's `dashboard-N.ts(LINE,COL): error ...` lines (with their indented continuation
/// lines) as `label:JSON_LINE:COL: message (against which type)`. Anything tsc says about
/// another file is a broken check, not a broken dashboard: an error.
fn map_diagnostics(text: &str, sources: &[Source]) -> anyhow::Result<Problems> {
    let mut problems: Problems = sources.iter().map(|s| (s.label.clone(), vec![])).collect();
    // The source of the last message, which continuation lines extend.
    let mut last: Option<&str> = None;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let previous = last.and_then(|label| problems.get_mut(label)).and_then(|p| p.last_mut());
        if let (true, Some(message)) = (line.starts_with(' '), previous) {
            message.push_str("\n    ");
            message.push_str(line.trim());
            continue;
        }
        let Some((index, ts_line, column, message)) = parse_diagnostic(line) else {
            bail!("tsc reported a problem outside the dashboards:\n{text}");
        };
        let Some(source) = sources.get(index) else { bail!("tsc names no dashboard: {line}") };
        let json_lines = source.json.trim_end().lines().count();
        let first = ts_line.checked_sub(PRELUDE_LINES).filter(|l| *l >= 1);
        let Some(offset) = first else { bail!("tsc error in the prelude:\n{text}") };
        let (json_line, against) = if offset <= json_lines {
            (offset, "Grafana's Dashboard type")
        } else {
            (offset - json_lines, "the panel plugin types")
        };
        let label = source.label.as_str();
        let message = format!("{label}:{json_line}:{column}: {message} (against {against})");
        problems.entry(label.to_string()).or_default().push(message);
        last = Some(label);
    }
    Ok(problems)
}

/// `dashboard-N.ts(LINE,COL): MESSAGE` as (N, LINE, COL, MESSAGE).
fn parse_diagnostic(line: &str) -> Option<(usize, usize, usize, String)> {
    let rest = line.strip_prefix("dashboard-")?;
    let (index, rest) = rest.split_once(".ts(")?;
    let (position, message) = rest.split_once("): ")?;
    let (ts_line, column) = position.split_once(',')?;
    Some((index.parse().ok()?, ts_line.parse().ok()?, column.parse().ok()?, message.to_string()))
}

/// Every dashboard the project ships: dashboards/*.json and any dashboard JSON (an object
/// with `schemaVersion` and `panels`) under deploy/.
pub fn shipped_dashboards() -> anyhow::Result<Vec<Source>> {
    let root = repo_root();
    let mut paths = files_with_extension(&root.join("dashboards"), "json")?;
    paths.extend(files_with_extension(&root.join("deploy"), "json")?);
    let mut sources = vec![];
    for path in paths {
        let json =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let value: serde_json::Value = serde_json::from_str(&json)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        if value.get("schemaVersion").is_some() && value.get("panels").is_some() {
            let label = path.strip_prefix(&root).unwrap_or(&path).display().to_string();
            sources.push(Source { label, json });
        }
    }
    Ok(sources)
}
