//! Rendering and validating the Kubernetes manifests (deploy/kubernetes): kustomize through
//! kubectl, kubernetes-validate for the core kinds, and our own JSON schema for the
//! prometheus-operator monitors (python3 jsonschema).

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::{Value, json};

use crate::asset_files::yaml_stream;
use crate::external_tools::{output, run_ok};

/// Kubernetes version whose schemas kubernetes-validate ships and the manifests target.
pub const K8S_VERSION: &str = "1.32.0";
pub const NAMESPACE: &str = "connscope";

/// Our own schema for the ServiceMonitor/PodMonitor fields we use (not the upstream CRD):
/// unknown fields are errors, so a typo such as `honorLabel` fails.
pub fn monitor_schema() -> Value {
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

/// `kubectl kustomize DIR`, as documents.
pub fn kustomize(dir: &Path) -> anyhow::Result<Vec<Value>> {
    let out = run_ok(Command::new("kubectl").arg("kustomize").arg(dir))?;
    yaml_stream(&out)
}

/// kubernetes-validate --strict over `docs`, written to `tmp/NAME.yaml`.
pub fn kubernetes_validate(tmp: &Path, name: &str, docs: &[&Value]) -> anyhow::Result<Output> {
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

/// [`monitor_schema`] over `docs`, written to `tmp/NAME-monitors.json`.
pub fn validate_monitors(tmp: &Path, name: &str, docs: &[&Value]) -> anyhow::Result<Output> {
    let schema = tmp.join("monitor-schema.json");
    fs::write(&schema, serde_json::to_string_pretty(&monitor_schema())?)?;
    let file = tmp.join(format!("{name}-monitors.json"));
    fs::write(&file, serde_json::to_string(docs)?)?;
    output(Command::new("python3").arg("-c").arg(VALIDATE_MONITORS).arg(&schema).arg(&file))
}

/// The first document of kind `kind`.
pub fn find<'a>(docs: &'a [Value], kind: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind)
}

/// True when `small` is a non-empty object whose every entry is in `big`.
pub fn is_subset(small: &Value, big: &Value) -> bool {
    small.as_object().is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| big.get(k) == Some(v)))
}
