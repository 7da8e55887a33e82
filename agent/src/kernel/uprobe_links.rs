//! Where the libssl uprobes' links go when they outlive the agent: with pinned state, on
//! Linux 5.15 and later (where a uprobe is a BPF link, not a perf event). They are taken from
//! their programs and held until this agent's takeover, then pinned with its generation's
//! other links (`<pin-path>/links/<generation>/tls/`), so decrypted HTTPS is counted while no
//! agent runs, and the next agent's takeover removes them with the rest of the generation
//! (`pinning`). Otherwise their programs hold them and they detach with the agent.
//!
//! Each kept link has an id, so that the decryption budget can remove it again (a file
//! going from one all-process uprobe to per-process ones, a process leaving decryption).

use std::{collections::HashMap, path::PathBuf};

use anyhow::Context as _;
use aya::programs::links::FdLink;

/// A kept link.
pub type KeptId = u64;

enum State {
    /// Taken from their programs, until this agent's takeover.
    Held(HashMap<KeptId, FdLink>),
    /// Pinned in `dir` as `<id>-<program>`.
    Pinned { dir: PathBuf },
}

pub struct UprobeLinks {
    state: State,
    /// Each kept link's program.
    programs: HashMap<KeptId, &'static str>,
    next: KeptId,
}

impl Default for UprobeLinks {
    fn default() -> Self {
        Self { state: State::Held(HashMap::new()), programs: HashMap::new(), next: 0 }
    }
}

impl UprobeLinks {
    /// Keeps the link of `program`: held, or pinned once the takeover is done.
    pub fn keep(&mut self, program: &'static str, link: FdLink) -> anyhow::Result<KeptId> {
        let id = self.next;
        self.next += 1;
        match &mut self.state {
            State::Held(links) => {
                links.insert(id, link);
            }
            State::Pinned { dir } => {
                let path = dir.join(format!("{id}-{program}"));
                link.pin(&path).with_context(|| format!("pinning {}", path.display()))?;
            }
        }
        self.programs.insert(id, program);
        Ok(id)
    }

    /// Removes a kept link: returned to be dropped (which detaches it) where its cost does
    /// not hold up the caller; a pinned one is unpinned.
    pub fn remove(&mut self, id: KeptId) -> Option<FdLink> {
        let program = self.programs.remove(&id)?;
        match &mut self.state {
            State::Held(links) => links.remove(&id),
            State::Pinned { dir } => {
                let path = dir.join(format!("{id}-{program}"));
                let link = aya::programs::links::PinnedLink::from_pin(&path)
                    .map_err(|err| err.to_string())
                    .and_then(|pinned| pinned.unpin().map_err(|err| err.to_string()));
                match link {
                    Ok(link) => Some(link),
                    Err(err) => {
                        tracing::warn!("removing the TLS uprobe {}: {err}", path.display());
                        None
                    }
                }
            }
        }
    }

    /// This agent's takeover is done: pins the links held so far, and every later one, in
    /// `dir`. A link that cannot be pinned is detached (logged).
    pub fn pin_in(&mut self, dir: PathBuf) {
        let State::Held(held) = &mut self.state else { return };
        if let Err(err) = std::fs::create_dir_all(&dir) {
            tracing::warn!("TLS uprobes detach with the agent: creating {}: {err}", dir.display());
            return;
        }
        let held = std::mem::take(held);
        for (id, link) in held {
            let Some(program) = self.programs.get(&id) else { continue };
            let path = dir.join(format!("{id}-{program}"));
            if let Err(err) = link.pin(&path) {
                tracing::warn!("a TLS uprobe is detached: pinning {}: {err}", path.display());
                self.programs.remove(&id);
            }
        }
        self.state = State::Pinned { dir };
    }
}
