//! Checks of the Kubernetes manifests (deploy/kubernetes): every variant renders with
//! kustomize, passes kubernetes-validate --strict (and the monitors our schema), and the
//! DaemonSet, Service and monitors are wired the way the agent needs them.

use std::collections::{BTreeSet, HashMap};

use anyhow::{Context, Result, ensure};
use connscope_tests::asset_files::{repo_root, report, scratch, str_at};
use connscope_tests::external_tools::{combined_output, require_python_modules, require_tool};
use connscope_tests::kubernetes::{
    K8S_VERSION, NAMESPACE, find, is_subset, kubernetes_validate, kustomize, validate_monitors,
};
use serde_json::{Value, json};

/// What the agent needs of its DaemonSet: the host PID namespace, every node, the
/// capabilities its probes need and no more, and read-only host mounts where its flags point.
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
        str_at(ds, "/spec/updateStrategy/type") == "RollingUpdate"
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
        str_at(c, "/livenessProbe/httpGet/path") == "/healthz"
            && str_at(c, "/livenessProbe/httpGet/port") == "metrics",
        "liveness probe GET /healthz on port metrics",
    );
    want(
        str_at(c, "/readinessProbe/httpGet/path") == "/readyz"
            && str_at(c, "/readinessProbe/httpGet/port") == "metrics",
        "readiness probe GET /readyz on port metrics",
    );
    for r in ["requests/cpu", "requests/memory", "limits/cpu", "limits/memory"] {
        want(
            !str_at(c, &format!("/resources/{r}")).is_empty(),
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
        .map(|v| (str_at(v, "/name"), str_at(v, "/hostPath/path")))
        .collect();
    let mounts: Vec<(&str, &str, bool)> = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                volumes.get(str_at(m, "/name")).copied().unwrap_or(""),
                str_at(m, "/mountPath"),
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
    // The pinned kernel state (--bpf.pin-path) is the one writable host mount.
    want(
        mounts.iter().any(|(h, path, ro)| *h == "/sys/fs/bpf" && *path == "/sys/fs/bpf" && !*ro),
        "needs a writable mount of /sys/fs/bpf (pinned state across restarts)",
    );
    want(
        mounts.iter().all(|(h, _, ro)| *ro || *h == "/sys/fs/bpf"),
        "every host mount but /sys/fs/bpf must be read-only",
    );
    // A host without a BPF filesystem gets one before the agent starts, from an init
    // container whose mount reaches the host (the agent's own would end with its container).
    let inits = pod["initContainers"].as_array().cloned().unwrap_or_default();
    want(
        inits.iter().any(|init| {
            let command: Vec<&str> = init["command"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let bidirectional = init["volumeMounts"].as_array().into_iter().flatten().any(|m| {
                volumes.get(str_at(m, "/name")) == Some(&"/sys/fs/bpf")
                    && str_at(m, "/mountPath") == "/sys/fs/bpf"
                    && str_at(m, "/mountPropagation") == "Bidirectional"
            });
            command.contains(&"mount-bpffs")
                && bidirectional
                && init["securityContext"]["privileged"] == json!(true)
        }),
        "needs a privileged init container running `connscope mount-bpffs` with /sys/fs/bpf \
         mounted Bidirectional",
    );
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
    let root = repo_root().join("deploy/kubernetes");
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
        let kinds: BTreeSet<&str> = docs.iter().map(|d| str_at(d, "/kind")).collect();
        let mut expected: BTreeSet<&str> =
            ["Namespace", "ServiceAccount", "DaemonSet", "Service"].into();
        expected.extend(monitor);
        if kinds != expected {
            problems.push(format!("{dir}: renders {kinds:?}, expected {expected:?}"));
        }
        for d in &docs {
            if d["kind"] != "Namespace" && str_at(d, "/metadata/namespace") != NAMESPACE {
                problems.push(format!(
                    "{dir}: {} {} is not in namespace {NAMESPACE}",
                    d["kind"], d["metadata"]["name"]
                ));
            }
        }
        let (core, monitors): (Vec<&Value>, Vec<&Value>) = docs
            .iter()
            .partition(|d| !str_at(d, "/apiVersion").starts_with("monitoring.coreos.com/"));
        let out = kubernetes_validate(&tmp, &label, &core)?;
        let text = combined_output(&out);
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
                problems.push(format!("{dir}: monitor schema:\n{}", combined_output(&out)));
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
            str_at(ns, "/metadata/labels/pod-security.kubernetes.io~1enforce") != "privileged"
        }) {
            problems.push(format!("{dir}: namespace must allow privileged pods (Pod Security)"));
        }
        for m in &monitors {
            let (endpoints, target_labels) = match str_at(m, "/kind") {
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
            let job = str_at(m, "/spec/jobLabel");
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
