//! The house rules of the source tree, checked on the files themselves:
//! - the agent's stages import one way (docs/architecture.md, "Module map");
//! - every module file is in docs/architecture.md's module map, and every file the map
//!   names exists;
//! - no `connscope_` metric name is spelled outside the metric table in the agent's code;
//! - README's metric table lists exactly the metric table's metrics, with their types.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::{Context as _, ensure};
use connscope::model::metric_table::{self, Kind};
use connscope_tests::asset_files::{files_with_extension, read, repo_root as workspace, report};

/// Every `.rs` file below `dir`, as paths relative to it.
fn rust_files(dir: &Path) -> anyhow::Result<BTreeSet<String>> {
    files_with_extension(dir, "rs")?
        .iter()
        .map(|path| Ok(path.strip_prefix(dir)?.to_string_lossy().into_owned()))
        .collect()
}

/// A file's code before its test module, without comment lines: what the build ships.
fn shipped_code(text: &str) -> String {
    text.lines()
        .take_while(|line| !line.starts_with("#[cfg(test)]"))
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules a file names through `crate::`, in paths and `use crate::{…}` groups.
fn crate_modules(code: &str) -> BTreeSet<String> {
    let mut modules = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.trim_start().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect()
    };
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The top-level items of the group: split on commas outside nested braces.
            let mut depth = 0;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        modules.insert(ident(&group[i..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            modules.insert(ident(rest));
        }
    }
    modules.remove("");
    modules
}

/// Which stages (and top-level modules) each stage of `agent/src` may import: each only
/// those below it (docs/architecture.md, "Module map").
fn allowed_imports(stage: &str) -> Option<&'static [&'static str]> {
    Some(match stage {
        "model" => &["model"],
        "exposition" => &["model", "exposition"],
        "kernel" => &["model", "exposition", "kernel", "config"],
        "pipeline" => &["model", "exposition", "pipeline"],
        "flows" => &["model", "exposition", "flows"],
        _ => return None,
    })
}

#[test]
fn agent_stages_import_one_way() -> anyhow::Result<()> {
    let src = workspace().join("agent/src");
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in rust_files(&src)? {
        let stage = file.split('/').next().unwrap_or_default();
        let Some(allowed) = allowed_imports(stage) else { continue };
        let code = shipped_code(&read(&src.join(&file))?);
        checked += 1;
        for module in crate_modules(&code) {
            if !allowed.contains(&module.as_str()) {
                problems.push(format!("agent/src/{file} imports crate::{module}"));
            }
        }
    }
    ensure!(checked > 30, "only {checked} stage files found");
    report("imports against the stage order", &problems)
}

#[test]
fn the_import_reader_sees_groups_and_paths() {
    let code =
        "use crate::{\n    model::{a, b::c},\n    pipeline::x,\n};\nlet t = crate::kernel::y();";
    let found: Vec<String> = crate_modules(code).into_iter().collect();
    assert_eq!(found, ["kernel", "model", "pipeline"]);
}

/// The `.rs` names in the first column of the module map's table rows under `heading`
/// (up to the next `###` or `##` heading).
fn mapped_files(architecture: &str, heading: &str) -> anyhow::Result<BTreeSet<String>> {
    let start = architecture.find(heading).with_context(|| format!("no `{heading}` section"))?;
    let section = &architecture[start + heading.len()..];
    let end = section.find("\n#").unwrap_or(section.len());
    let mut files = BTreeSet::new();
    for line in section[..end].lines().filter(|line| line.starts_with('|')) {
        let mut cells = line.split('|').skip(1);
        // Tables with a layer column name their modules in the second column.
        let first = cells.next().unwrap_or_default();
        let cell = if first.trim().parse::<u32>().is_ok() {
            cells.next().unwrap_or_default()
        } else {
            first
        };
        for name in cell.split('`').skip(1).step_by(2) {
            if name.ends_with(".rs") {
                files.insert(name.to_string());
            }
        }
    }
    Ok(files)
}

#[test]
fn the_module_map_lists_every_module_file() -> anyhow::Result<()> {
    let root = workspace();
    let architecture = read(&root.join("docs/architecture.md"))?;
    let mut problems = Vec::new();
    for (crate_dir, heading) in [
        ("agent", "### `agent` (userspace)"),
        ("agent-ebpf", "### `agent-ebpf` (kernel programs)"),
        ("agent-common", "### `agent-common` (the kernel ↔ user contract)"),
    ] {
        let files = rust_files(&root.join(crate_dir).join("src"))?;
        let mapped = mapped_files(&architecture, heading)?;
        for missing in files.difference(&mapped) {
            problems.push(format!("{crate_dir}/src/{missing} is not in the module map"));
        }
        for stale in mapped.difference(&files) {
            problems.push(format!("the module map names {crate_dir}/src/{stale}, which is gone"));
        }
    }
    report("docs/architecture.md's module map", &problems)
}

#[test]
fn metric_names_are_spelled_only_in_the_metric_table() -> anyhow::Result<()> {
    let src = workspace().join("agent/src");
    let mut problems = Vec::new();
    for file in rust_files(&src)? {
        if file == "model/metric_table.rs" {
            continue;
        }
        let code = shipped_code(&read(&src.join(&file))?);
        let spelled = |line: &&str| {
            metric_table::ALL
                .iter()
                .any(|row| line.contains(&format!("{}_{}", metric_table::PREFIX, row.name)))
        };
        for line in code.lines().filter(spelled) {
            problems.push(format!("agent/src/{file}: `{}`", line.trim()));
        }
    }
    report("metric names outside the table", &problems)
}

/// README's metric table: the names in each row's first column (backticked, without the
/// prefix) and the row's type.
fn readme_metrics(readme: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let header = "| metric | type | what it tells |";
    let start = readme.find(header).context("README has no metric table")?;
    let mut metrics = BTreeMap::new();
    for line in readme[start..].lines().skip(2).take_while(|line| line.starts_with('|')) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (Some(names), Some(kind)) = (cells.get(1), cells.get(2)) else { continue };
        for name in names.split('`').skip(1).step_by(2) {
            metrics.insert(name.to_string(), kind.to_string());
        }
    }
    Ok(metrics)
}

#[test]
fn readme_lists_exactly_the_metric_table() -> anyhow::Result<()> {
    let readme = read(&workspace().join("README.md"))?;
    let listed = readme_metrics(&readme)?;
    let prefix = format!("{}_", metric_table::PREFIX);
    let table: BTreeMap<String, String> = metric_table::ALL
        .iter()
        .map(|row| {
            let kind = match row.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            let sample = row.sample();
            (sample.strip_prefix(&prefix).unwrap_or(&sample).to_string(), kind.to_string())
        })
        .collect();
    ensure!(
        listed == table,
        "README's metric table differs from the metric table:\nREADME: {listed:?}\ntable:  {table:?}"
    );
    Ok(())
}
