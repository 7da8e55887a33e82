//! Where the libssl uprobes' links go when they outlive the agent: with pinned state, on
//! Linux 5.15 and later (where a uprobe is a BPF link, not a perf event). They are taken from
//! their programs and held until this agent's takeover, then pinned with its generation's
//! other links (`<pin-path>/links/<generation>/tls/`), so decrypted HTTPS is counted while no
//! agent runs, and the next agent's takeover removes them with the rest of the generation
//! (`pinning`). Otherwise their programs hold them and they detach with the agent.

use std::path::PathBuf;

use anyhow::Context as _;
use aya::programs::links::FdLink;

pub enum UprobeLinks {
    /// Taken from their programs, until this agent's takeover.
    Held(Vec<(&'static str, FdLink)>),
    /// Pinned in `dir` as they are made; `made` names the next one.
    Pinned { dir: PathBuf, made: usize },
}

impl Default for UprobeLinks {
    fn default() -> Self {
        Self::Held(Vec::new())
    }
}

impl UprobeLinks {
    /// Keeps the link of `program`: held, or pinned once the takeover is done.
    pub fn keep(&mut self, program: &'static str, link: FdLink) -> anyhow::Result<()> {
        match self {
            Self::Held(links) => links.push((program, link)),
            Self::Pinned { dir, made } => {
                *made += 1;
                let path = dir.join(format!("{made}-{program}"));
                link.pin(&path).with_context(|| format!("pinning {}", path.display()))?;
            }
        }
        Ok(())
    }

    /// This agent's takeover is done: pins the links held so far, and every later one, in
    /// `dir`. A link that cannot be pinned is detached (logged).
    pub fn pin_in(&mut self, dir: PathBuf) {
        let Self::Held(held) = self else { return };
        if let Err(err) = std::fs::create_dir_all(&dir) {
            tracing::warn!("TLS uprobes detach with the agent: creating {}: {err}", dir.display());
            return;
        }
        let held = std::mem::take(held);
        *self = Self::Pinned { dir, made: 0 };
        for (program, link) in held {
            if let Err(err) = self.keep(program, link) {
                tracing::warn!("a TLS uprobe is detached: {err:#}");
            }
        }
    }
}
