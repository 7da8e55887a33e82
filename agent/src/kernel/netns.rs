//! One process per network namespace under `/proc`: the files of `/proc/<pid>/net/` show
//! that process's network namespace whoever reads them, so reading them for one process of
//! each namespace covers every namespace that has a process in it, with no `setns`. Used by
//! the start-up scan of listening ports (`adoption`), the listen queue counters
//! (`listen_queues`) and the socket census (`socket_census`). A namespace no process is in
//! (only bind-mounted, as `ip netns add` leaves it) is not seen.

use std::{
    collections::HashSet,
    fs::File,
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

/// Namespaces exported with a `netns` label of their own; the figures of any beyond are
/// summed under `other` (a host runs a namespace per pod, far fewer than this).
pub const MAX_NAMESPACES: usize = 1024;

/// How long the processes found for the namespaces are used before `/proc` is walked again
/// (new namespaces show up within this).
pub const REWALK_AFTER: Duration = Duration::from_secs(30);

/// The `netns` label of the namespace `netns`, the `index`th in inode order.
pub fn label(index: usize, netns: u32) -> String {
    if index < MAX_NAMESPACES { netns.to_string() } else { "other".to_owned() }
}

/// Why an entry of `/proc` could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unusable {
    /// The process exited between listing and reading.
    ProcessVanished,
    /// A file could not be read (permissions, a kernel refusing).
    Unreadable,
    /// A namespace link that does not parse.
    Unparsable,
}

/// What is read from one process of each namespace.
pub trait PerNamespace {
    /// Reads the namespace `netns` through `process_dir` (`/proc/<pid>`). An error leaves
    /// the namespace to its next process, so a read must count nothing until it succeeds.
    fn read(&mut self, netns: u32, process_dir: &Path) -> io::Result<()>;
    /// An entry that could not be used, or a read that failed.
    fn unusable(&mut self, why: Unusable);
}

/// Reads every network namespace that has a process under `proc_root` (normally `/proc`)
/// once, through the first of its processes whose read succeeds; returns how many were read.
pub fn visit(proc_root: &Path, visitor: &mut impl PerNamespace) -> usize {
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        visitor.unusable(Unusable::Unreadable);
        return 0;
    };
    let mut done = HashSet::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_str().is_some_and(|pid| pid.bytes().all(|b| b.is_ascii_digit())) {
            continue;
        }
        let dir = entry.path();
        let netns = match of_process(&dir) {
            Ok(Some(inode)) => inode,
            Ok(None) => {
                visitor.unusable(Unusable::Unparsable);
                continue;
            }
            Err(err) => {
                visitor.unusable(classify(&err, &dir));
                continue;
            }
        };
        if done.contains(&netns) {
            continue;
        }
        match visitor.read(netns, &dir) {
            Ok(()) => {
                done.insert(netns);
            }
            Err(err) => visitor.unusable(classify(&err, &dir)),
        }
    }
    done.len()
}

/// One process per namespace, found by a walk of `/proc` (about 6 ms at 1000 processes,
/// docs/performance.md) at most every [`REWALK_AFTER`]: reads in between go to the processes
/// it found (a walk is due sooner when one of them exits or fails to read).
#[derive(Debug)]
pub struct NamespaceProcesses {
    proc_root: PathBuf,
    found: Mutex<Found>,
}

/// What the last walk of `/proc` found.
#[derive(Debug, Default)]
struct Found {
    /// `(netns, /proc/<pid>)`: the process read for each namespace, in inode order.
    processes: Vec<(u32, PathBuf)>,
    walked: Option<Instant>,
}

/// A walk's visitor: `read` through the first process of each namespace that reads.
struct Walk<T, F> {
    read: F,
    rows: Vec<(u32, PathBuf, T)>,
}

impl<T, F: FnMut(&Path) -> io::Result<T>> PerNamespace for Walk<T, F> {
    fn read(&mut self, netns: u32, dir: &Path) -> io::Result<()> {
        let value = (self.read)(dir)?;
        self.rows.push((netns, dir.to_owned(), value));
        Ok(())
    }

    /// A namespace whose processes cannot be read is left out; nothing else is counted.
    fn unusable(&mut self, _: Unusable) {}
}

impl NamespaceProcesses {
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        Self { proc_root: proc_root.into(), found: Mutex::default() }
    }

    /// `read` of every namespace now, in inode order: through the processes the last walk
    /// found, or a new walk when that is older than [`REWALK_AFTER`] or one of them is gone
    /// (or its process id is another namespace's now).
    pub fn read_each<T>(&self, mut read: impl FnMut(&Path) -> io::Result<T>) -> Vec<(u32, T)> {
        let Ok(mut found) = self.found.lock() else { return Vec::new() };
        if found.walked.is_some_and(|at| at.elapsed() < REWALK_AFTER) {
            let mut rows = Vec::with_capacity(found.processes.len());
            for (netns, dir) in &found.processes {
                if of_process(dir).ok().flatten() != Some(*netns) {
                    break;
                }
                let Ok(value) = read(dir) else { break };
                rows.push((*netns, value));
            }
            if rows.len() == found.processes.len() {
                return rows;
            }
        }
        let mut walk = Walk { read, rows: Vec::new() };
        visit(&self.proc_root, &mut walk);
        walk.rows.sort_unstable_by_key(|(netns, _, _)| *netns);
        found.processes = walk.rows.iter().map(|(netns, dir, _)| (*netns, dir.clone())).collect();
        found.walked = Some(Instant::now());
        walk.rows.into_iter().map(|(netns, _, value)| (netns, value)).collect()
    }
}

/// Moves the calling thread into the network namespace of the process at `process_dir`
/// (`/proc/<pid>`), unless it is in it already (entering needs `CAP_SYS_ADMIN`; staying in
/// its own does not). For a thread of its own: `/proc/sys/net/` and new sockets belong to
/// the thread's namespace.
pub fn enter(process_dir: &Path) -> io::Result<()> {
    let here = std::fs::read_link("/proc/thread-self/ns/net")?;
    if std::fs::read_link(process_dir.join("ns/net"))? == here {
        return Ok(());
    }
    let namespace = File::open(process_dir.join("ns/net"))?;
    // SAFETY: a valid namespace descriptor; setns with CLONE_NEWNET moves only this thread.
    if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The network namespace of the process at `process_dir` (`/proc/<pid>`); `None` when its
/// link does not parse.
pub fn of_process(process_dir: &Path) -> io::Result<Option<u32>> {
    let link = std::fs::read_link(process_dir.join("ns/net"))?;
    Ok(parse_link(&link.to_string_lossy()))
}

/// What a failed read of `process_dir`'s files means.
pub fn classify(err: &io::Error, process_dir: &Path) -> Unusable {
    // ESRCH: the process is exiting; ENOENT once it is gone.
    if err.raw_os_error() == Some(libc::ESRCH)
        || (err.kind() == io::ErrorKind::NotFound && !process_dir.exists())
    {
        Unusable::ProcessVanished
    } else {
        Unusable::Unreadable
    }
}

/// `net:[4026531840]` → the namespace's inode number.
fn parse_link(link: &str) -> Option<u32> {
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_process_counts_as_vanished() {
        let err = io::Error::from(io::ErrorKind::NotFound);
        let vanished = Unusable::ProcessVanished;
        assert_eq!(classify(&err, Path::new("/proc/no-such-process")), vanished);
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::ESRCH), Path::new("/")), vanished);
        assert_eq!(
            classify(&io::Error::from_raw_os_error(libc::EACCES), Path::new("/")),
            Unusable::Unreadable
        );
    }

    #[test]
    fn links_parse_or_are_rejected() {
        assert_eq!(parse_link("net:[4026531840]"), Some(4026531840));
        assert_eq!(parse_link("net:[x]"), None);
        assert_eq!(parse_link("mnt:[1]"), None);
    }
}
