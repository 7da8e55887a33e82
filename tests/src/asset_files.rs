//! Reading the files connscope ships besides the binary (dashboards, rules, manifests,
//! units): paths, YAML, JSON pointers, and the problem lists the asset tests report.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, ensure};
use serde_json::Value;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every file below `dir` whose name ends in `.{extension}`, sorted.
pub fn files_with_extension(dir: &Path, extension: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = vec![];
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == extension) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

pub fn read(path: &Path) -> anyhow::Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// A fresh, empty scratch directory for one test, under `target/tmp`.
pub fn scratch(name: &str) -> anyhow::Result<PathBuf> {
    let dir = repo_root().join("target/tmp").join(format!("assets-{name}"));
    fresh_dir(&dir)?;
    Ok(dir)
}

/// Creates `dir`, removing whatever was there before.
pub fn fresh_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// Fails with every problem listed, one a line, when there is any.
pub fn report(what: &str, problems: &[String]) -> anyhow::Result<()> {
    ensure!(
        problems.is_empty(),
        "{what}: {} problem(s):\n  - {}",
        problems.len(),
        problems.join("\n  - ")
    );
    Ok(())
}

/// A YAML file as a JSON value, so that tests index it like JSON.
pub fn yaml_file(path: &Path) -> anyhow::Result<Value> {
    let yaml: serde_yaml::Value = serde_yaml::from_str(&read(path)?)
        .with_context(|| format!("parsing {}", path.display()))?;
    Ok(serde_json::to_value(yaml)?)
}

/// The documents of a multi-document YAML stream (`---` separated), as JSON values.
pub fn yaml_stream(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut docs = vec![];
    let mut current = String::new();
    for line in text.lines().chain(std::iter::once("---")) {
        if line == "---" {
            if !current.trim().is_empty() {
                let yaml: serde_yaml::Value = serde_yaml::from_str(&current)?;
                docs.push(serde_json::to_value(yaml)?);
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    Ok(docs)
}

/// The string at JSON pointer `pointer` in `value`; "" when absent or not a string.
pub fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}
