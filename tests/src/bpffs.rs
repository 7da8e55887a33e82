//! A BPF filesystem of one test's own for `--bpf.pin-path`, and `connscope cleanup`.

use std::{path::PathBuf, process::Command};

use anyhow::bail;

use crate::{Agent, agent_binary, net};

/// A private BPF filesystem, unmounted on drop (which also detaches whatever a failed test
/// left pinned there).
pub struct BpfFs {
    pub mount: PathBuf,
}

impl BpfFs {
    pub fn mount(tag: &str) -> anyhow::Result<Self> {
        let mount =
            std::env::temp_dir().join(format!("connscope-bpffs-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&mount)?;
        net::run("mount", &["-t", "bpf", "bpf", &mount.to_string_lossy()])?;
        Ok(Self { mount })
    }

    pub fn pin_path(&self) -> String {
        self.mount.join("connscope").to_string_lossy().into_owned()
    }

    /// An agent pinning its state here.
    pub fn agent(&self) -> anyhow::Result<Agent> {
        Agent::start(&["--bpf.pin-path", &self.pin_path()])
    }

    /// The names pinned under `<pin path>/<under>`, sorted.
    pub fn pinned(&self, under: &str) -> Vec<String> {
        let dir = self.mount.join("connscope").join(under);
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|entries| {
                entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = net::run("umount", &[&self.mount.to_string_lossy()]);
        let _ = std::fs::remove_dir(&self.mount);
    }
}

/// `connscope cleanup --bpf.pin-path <pin_path>`; returns what it logged.
pub fn cleanup(pin_path: &str) -> anyhow::Result<String> {
    let out =
        Command::new(agent_binary()).args(["cleanup", "--bpf.pin-path", pin_path]).output()?;
    if !out.status.success() {
        bail!("connscope cleanup failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}
