//! The bundled Prometheus recording and alerting rules (deploy/prometheus).

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::asset_files::{repo_root, yaml_file};

pub fn rules_path() -> PathBuf {
    repo_root().join("deploy/prometheus/connscope-rules.yml")
}

pub struct Rules {
    pub records: Vec<String>,
    pub alerts: Vec<String>,
    /// (record or alert name, expr) of every rule.
    pub exprs: Vec<(String, String)>,
    /// The file as parsed.
    pub document: Value,
}

pub fn load_rules() -> anyhow::Result<Rules> {
    let document = yaml_file(&rules_path())?;
    let (mut records, mut alerts, mut exprs) = (vec![], vec![], vec![]);
    for group in document["groups"].as_array().context("no groups")? {
        for rule in group["rules"].as_array().context("group without rules")? {
            let expr = rule["expr"].as_str().context("rule without expr")?.to_string();
            if let Some(record) = rule["record"].as_str() {
                records.push(record.to_string());
                exprs.push((record.to_string(), expr));
            } else if let Some(alert) = rule["alert"].as_str() {
                alerts.push(alert.to_string());
                exprs.push((alert.to_string(), expr));
            } else {
                bail!("rule is neither record nor alert: {rule}");
            }
        }
    }
    Ok(Rules { records, alerts, exprs, document })
}
