//! Kubernetes placement without the Kubernetes API (docs/architecture.md, "Pod attribution").
//!
//! cgroup id (the cgroup v2 directory's inode, as `bpf_get_current_cgroup_id` reports it)
//! → cgroup path → pod UID and container id → names from the kubelet's log tree:
//! `pods/<namespace>_<pod>_<uid>/<container>/` and
//! `containers/<pod>_<namespace>_<container>-<container id>.log`.
//! Everything is cached; an unknown id triggers a rescan, at most once per second.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::model::{
    clock::coarse_monotonic_ns,
    placement::{Placement, PlacementResolver},
};

/// At most one rescan per second (ns of the coarse monotonic clock: checked for every
/// connection of an unknown cgroup, which on a host without pods is every connection).
const RESCAN_INTERVAL_NS: u64 = 1_000_000_000;
/// Directory depth searched below the cgroup root (kubepods trees are 3 to 5 deep).
const MAX_DEPTH: usize = 8;

pub struct KubeletPlacement {
    cgroup_root: PathBuf,
    logs_root: PathBuf,
    resolved: HashMap<u64, Placement>,
    last_scan_ns: Option<u64>,
}

impl KubeletPlacement {
    pub fn new(cgroup_root: PathBuf, logs_root: PathBuf) -> Self {
        Self { cgroup_root, logs_root, resolved: HashMap::new(), last_scan_ns: None }
    }

    fn rescan(&mut self) {
        self.last_scan_ns = Some(coarse_monotonic_ns());
        let pods = read_pod_dirs(&self.logs_root.join("pods"));
        if pods.is_empty() {
            // Not a Kubernetes node (or no pods yet): nothing to match the cgroups against.
            self.resolved.clear();
            return;
        }
        let containers = read_container_logs(&self.logs_root.join("containers"));
        let mut found = HashMap::new();
        walk_cgroups(&self.cgroup_root, 0, &mut |path, id| {
            if let Some(placement) = placement_of(path, &pods, &containers) {
                found.insert(id, placement);
            }
        });
        self.resolved = found;
    }
}

impl PlacementResolver for KubeletPlacement {
    fn resolve(&mut self, cgroup_id: u64) -> Option<&Placement> {
        if !self.resolved.contains_key(&cgroup_id)
            && self
                .last_scan_ns
                .is_none_or(|at| coarse_monotonic_ns().saturating_sub(at) >= RESCAN_INTERVAL_NS)
        {
            self.rescan();
        }
        self.resolved.get(&cgroup_id)
    }
}

fn walk_cgroups(dir: &Path, depth: usize, visit: &mut dyn FnMut(&Path, u64)) {
    if depth > MAX_DEPTH {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let Ok(metadata) = entry.metadata() else { continue };
        if metadata.is_dir() {
            let path = entry.path();
            visit(&path, metadata.ino());
            walk_cgroups(&path, depth + 1, visit);
        }
    }
}

/// Pod UID → (namespace, pod) from `pods/<namespace>_<pod>_<uid>`.
fn read_pod_dirs(dir: &Path) -> HashMap<String, (String, String)> {
    let mut pods = HashMap::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let mut parts = name.splitn(3, '_');
        if let (Some(namespace), Some(pod), Some(uid)) = (parts.next(), parts.next(), parts.next())
        {
            pods.insert(uid.to_owned(), (namespace.to_owned(), pod.to_owned()));
        }
    }
    pods
}

/// Container id → container name from `containers/<pod>_<namespace>_<container>-<id>.log`.
fn read_container_logs(dir: &Path) -> HashMap<String, String> {
    let mut containers = HashMap::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".log") else { continue };
        let Some((rest, id)) = stem.rsplit_once('-') else { continue };
        let Some(container) = rest.splitn(3, '_').nth(2) else { continue };
        containers.insert(id.to_owned(), container.to_owned());
    }
    containers
}

/// Pod UID and container id in a kubepods cgroup path, for the systemd driver
/// (`kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope`) and the
/// cgroupfs driver (`kubepods/burstable/pod<uid>/<id>`).
pub fn ids_from_cgroup_path(path: &Path) -> Option<(String, Option<String>)> {
    let mut uid = None;
    let mut container = None;
    for component in path.iter().map(|c| c.to_string_lossy()) {
        if let Some(at) = component.rfind("pod") {
            let candidate = component[at + 3..].trim_end_matches(".slice").replace('_', "-");
            if is_uid(&candidate) {
                uid = Some(candidate);
                continue;
            }
        }
        if uid.is_some() {
            let trimmed = component.trim_end_matches(".scope");
            let id = trimmed.rsplit(['-', ':']).next().unwrap_or(trimmed);
            if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                container = Some(id.to_owned());
            }
        }
    }
    uid.map(|uid| (uid, container))
}

fn is_uid(value: &str) -> bool {
    value.len() == 36 && value.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

fn placement_of(
    path: &Path,
    pods: &HashMap<String, (String, String)>,
    containers: &HashMap<String, String>,
) -> Option<Placement> {
    let (uid, container_id) = ids_from_cgroup_path(path)?;
    let (namespace, pod) = pods.get(&uid)?;
    Some(Placement {
        namespace: Some(namespace.clone()),
        pod: Some(pod.clone()),
        container: container_id.and_then(|id| containers.get(&id).cloned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f3c6a2e-8d3b-4f6e-9c1a-2b7d5e4f6a8c";
    const CID: &str = "3b1f0c9e7d6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c";

    #[test]
    fn ids_from_systemd_and_cgroupfs_paths() {
        let systemd = PathBuf::from(format!(
            "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope",
            UID.replace('-', "_")
        ));
        assert_eq!(ids_from_cgroup_path(&systemd), Some((UID.to_owned(), Some(CID.to_owned()))));
        let cgroupfs = PathBuf::from(format!("/sys/fs/cgroup/kubepods/besteffort/pod{UID}/{CID}"));
        assert_eq!(ids_from_cgroup_path(&cgroupfs), Some((UID.to_owned(), Some(CID.to_owned()))));
        let pod_only = PathBuf::from(format!("/sys/fs/cgroup/kubepods/pod{UID}"));
        assert_eq!(ids_from_cgroup_path(&pod_only), Some((UID.to_owned(), None)));
        assert_eq!(
            ids_from_cgroup_path(Path::new("/sys/fs/cgroup/system.slice/ssh.service")),
            None
        );
    }

    #[test]
    fn names_from_the_kubelet_log_tree() -> std::io::Result<()> {
        let root = std::env::temp_dir().join(format!("connscope-placement-{}", std::process::id()));
        let logs = root.join("logs");
        let cgroup = root
            .join("cgroup")
            .join("kubepods")
            .join("burstable")
            .join(format!("pod{UID}"))
            .join(CID);
        std::fs::create_dir_all(logs.join(format!("pods/shop_checkout-7d9f_{UID}/api")))?;
        std::fs::create_dir_all(logs.join("containers"))?;
        std::fs::write(logs.join(format!("containers/checkout-7d9f_shop_api-{CID}.log")), "")?;
        std::fs::create_dir_all(&cgroup)?;
        let id = std::fs::metadata(&cgroup)?.ino();

        let mut resolver = KubeletPlacement::new(root.join("cgroup"), logs);
        let placement = resolver.resolve(id).cloned().unwrap_or_default();
        assert_eq!(placement.namespace.as_deref(), Some("shop"));
        assert_eq!(placement.pod.as_deref(), Some("checkout-7d9f"));
        assert_eq!(placement.container.as_deref(), Some("api"));
        assert_eq!(resolver.resolve(1), None);
        std::fs::remove_dir_all(&root)
    }
}
