//! Pod attribution: a real cgroup v2 directory shaped like the kubelet's, a process moved
//! into it, a fake kubelet log tree, and the agent's labels for that process's connections.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use connscope_tests::{Agent, kernel_test, net};

const UID: &str = "7a1c2e3f-4b5d-4e6f-8a9b-0c1d2e3f4a5b";
const NAMESPACE: &str = "shop";
const POD: &str = "checkout-5f7d8";
const CONTAINER: &str = "api";

/// The cgroup v2 mount (`/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid).
fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, target, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(target))
    })
}

struct CgroupDirs(Vec<PathBuf>);

impl Drop for CgroupDirs {
    fn drop(&mut self) {
        for dir in self.0.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

kernel_test!(
    fn connections_carry_namespace_pod_and_container() -> anyhow::Result<()> {
        let cgroup_root = cgroup2_mount().ok_or_else(|| anyhow::anyhow!("no cgroup2 mount"))?;
        let container_id: String =
            format!("{:064x}", u128::from(std::process::id()) * 0x9e37_79b9_7f4a_7c15);
        let tag = format!("connscope-test-{}", std::process::id());
        let base = cgroup_root.join(&tag).join("kubepods").join("burstable");
        let pod_dir = base.join(format!("pod{UID}"));
        let container_dir = pod_dir.join(&container_id);
        std::fs::create_dir_all(&container_dir)?;
        let _cleanup = CgroupDirs(vec![
            cgroup_root.join(&tag),
            cgroup_root.join(&tag).join("kubepods"),
            base.clone(),
            pod_dir.clone(),
            container_dir.clone(),
        ]);

        let logs = std::env::temp_dir().join(&tag);
        std::fs::create_dir_all(logs.join(format!("pods/{NAMESPACE}_{POD}_{UID}/{CONTAINER}")))?;
        std::fs::create_dir_all(logs.join("containers"))?;
        std::fs::write(
            logs.join(format!("containers/{POD}_{NAMESPACE}_{CONTAINER}-{container_id}.log")),
            "",
        )?;

        let cgroup_flag = cgroup_root.to_string_lossy().into_owned();
        let logs_flag = logs.to_string_lossy().into_owned();
        let agent =
            Agent::start(&["--path.cgroup", &cgroup_flag, "--path.kubelet-logs", &logs_flag])?;

        let listener = TcpListener::bind("127.0.0.1:0")?;
        let server = listener.local_addr()?.to_string();
        const N: usize = 3;
        let acceptor = net::drain_server(listener, N, "cs-acceptor");
        // The client process joins the container's cgroup before it connects.
        let port = server.rsplit(':').next().unwrap_or_default();
        let script = format!(
            "echo $$ > {procs} && exec python3 -c \"import socket\nfor _ in range({N}):\n s = socket.create_connection(('127.0.0.1', {port}))\n s.sendall(b'x')\n s.close()\"",
            procs = container_dir.join("cgroup.procs").display()
        );
        let status = Command::new("sh").args(["-c", &script]).status()?;
        anyhow::ensure!(status.success(), "client failed: {status}");
        net::join(acceptor)?;

        let placed = [
            ("server", server.as_str()),
            ("role", "client"),
            ("namespace", NAMESPACE),
            ("pod", POD),
            ("container", CONTAINER),
        ];
        let scrape = agent.scrape_until(Duration::from_secs(5), |s| {
            s.sum("connscope_connections_closed_total", &placed) >= N as f64
        })?;
        assert_eq!(
            scrape.sum("connscope_connections_opened_total", &placed),
            N as f64,
            "{}",
            scrape.text
        );
        assert_eq!(scrape.sum("connscope_connections_closed_total", &placed), N as f64);
        // The accepting side (this test process, not in a pod) carries no placement labels.
        let accepting = [("server", server.as_str()), ("role", "server")];
        for sample in scrape.matching("connscope_connections_opened_total", &accepting) {
            assert!(!sample.labels.contains_key("namespace"), "{sample:?}");
        }
        let _ = std::fs::remove_dir_all(&logs);
        let _ = wait_until_empty(&container_dir);
        Ok(())
    }
);

/// cgroup directories can be removed only once their processes are gone.
fn wait_until_empty(dir: &Path) -> anyhow::Result<()> {
    for _ in 0..50 {
        if std::fs::read_to_string(dir.join("cgroup.procs"))?.trim().is_empty() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
