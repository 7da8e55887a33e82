//! Connections older than the agent. The kernel adopts an established socket at its first
//! send or receive (`agent-ebpf/src/conn.rs`, `adopt`) and tells its role from the listening
//! ports of its network namespace. The kernel keeps those ports current from the state
//! changes it sees; the ports that were already listening when the agent started are read
//! here, once, from `/proc/<pid>/net/tcp` and `tcp6` of one process per network namespace
//! (each file lists the sockets of the reader's namespace: no `setns` needed).
//!
//! Where the kernel cannot adopt (no BTF offsets, or sends and receives counted at system
//! call exit, which sees descriptors rather than sockets), the established connections the
//! scan finds are counted as skipped with `reason="backend"` instead.

use std::{collections::HashMap, io, path::Path, time::Instant};

use aya::maps::{HashMap as BpfHashMap, MapData};
use connscope_common::{ListenKey, names::map};

use crate::{
    exposition::metrics::Metrics,
    kernel::netns::{self, PerNamespace, Unusable},
    kernel::probes::Probes,
    kernel::proc_net_tcp::{self, TcpLine},
    model::label_sets::SkipReason,
};

/// Why an item of the scan was skipped (`connscope_adoption_skipped_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Skip {
    /// The process exited between listing and reading.
    ProcessVanished,
    /// A file could not be read (permissions, a kernel refusing).
    Unreadable,
    /// A namespace link or a socket line that does not parse.
    Unparsable,
    /// An established connection this kernel or hook backend cannot adopt.
    Backend,
}

impl Skip {
    pub const ALL: [Self; 4] =
        [Self::ProcessVanished, Self::Unreadable, Self::Unparsable, Self::Backend];

    pub const fn label(self) -> &'static str {
        match self {
            Self::ProcessVanished => "process_vanished",
            Self::Unreadable => "unreadable",
            Self::Unparsable => "unparsable",
            Self::Backend => "backend",
        }
    }
}

/// What the scan found: listening sockets per {namespace, port}, and what it skipped.
#[derive(Debug, Default)]
pub struct ListenScan {
    pub ports: HashMap<ListenKey, u32>,
    /// Established sockets (both ends of a connection on this host count twice).
    pub established: u64,
    pub namespaces: usize,
    pub skipped: HashMap<Skip, u64>,
}

impl ListenScan {
    fn skip(&mut self, reason: Skip) {
        *self.skipped.entry(reason).or_default() += 1;
    }

    /// Counts the established sockets as not adoptable (`Skip::Backend`).
    pub fn skip_established(&mut self) {
        *self.skipped.entry(Skip::Backend).or_default() += self.established;
    }
}

/// Scans the listening TCP ports of every network namespace that has a process under
/// `proc_root` (normally `/proc`). Nothing here is an error: what cannot be read is counted.
pub fn scan_listening(proc_root: &Path) -> ListenScan {
    let mut scan = ListenScan::default();
    scan.namespaces = netns::visit(proc_root, &mut scan);
    scan
}

impl From<Unusable> for Skip {
    fn from(why: Unusable) -> Self {
        match why {
            Unusable::ProcessVanished => Self::ProcessVanished,
            Unusable::Unreadable => Self::Unreadable,
            Unusable::Unparsable => Self::Unparsable,
        }
    }
}

impl PerNamespace for ListenScan {
    /// The namespace counts as scanned once its IPv4 table was read; a process that exits
    /// first leaves the namespace to the next process in it.
    fn read(&mut self, netns: u32, dir: &Path) -> io::Result<()> {
        read_table(&dir.join("net/tcp"), netns, self)?;
        match read_table(&dir.join("net/tcp6"), netns, self) {
            // No tcp6 file: IPv6 is off in this kernel.
            Err(err) if err.kind() == io::ErrorKind::NotFound && dir.exists() => {}
            Err(err) => self.skip(netns::classify(&err, dir).into()),
            Ok(()) => {}
        }
        Ok(())
    }

    fn unusable(&mut self, why: Unusable) {
        self.skip(why.into());
    }
}

/// A table counts whole or not at all: one that fails part way (its process exiting) is
/// read again from the namespace's next process, which must not count its ports twice.
fn read_table(path: &Path, netns: u32, scan: &mut ListenScan) -> io::Result<()> {
    let mut counts = TableCounts::default();
    proc_net_tcp::for_each_line(path, |line| match line.map(socket) {
        Some(Socket::Listening(port)) => counts.listening.push(port),
        Some(Socket::Established) => counts.established += 1,
        Some(Socket::Other) => {}
        None => counts.unparsable += 1,
    })?;
    counts.add_to(scan, netns);
    Ok(())
}

/// One table's lines, kept apart until the table was read to its end.
#[derive(Default)]
struct TableCounts {
    /// Few per namespace: the ports of its listening sockets.
    listening: Vec<u16>,
    established: u64,
    unparsable: u64,
}

impl TableCounts {
    fn add_to(self, scan: &mut ListenScan, netns: u32) {
        for port in self.listening {
            *scan.ports.entry(ListenKey::new(netns, port)).or_default() += 1;
        }
        scan.established += self.established;
        if self.unparsable > 0 {
            *scan.skipped.entry(Skip::Unparsable).or_default() += self.unparsable;
        }
    }
}

/// What a table's line is about.
#[derive(Debug, PartialEq, Eq)]
enum Socket {
    Listening(u16),
    Established,
    Other,
}

fn socket(line: TcpLine) -> Socket {
    match line.state {
        proc_net_tcp::LISTEN => Socket::Listening(line.local.1),
        proc_net_tcp::ESTABLISHED => Socket::Established,
        _ => Socket::Other,
    }
}

/// Writes the scan into the kernel's `LISTEN_PORTS`. A port the kernel already counted
/// (a `listen()` between attaching and the scan) keeps the larger count.
pub fn seed(map: &mut BpfHashMap<MapData, ListenKey, u32>, scan: &ListenScan) -> usize {
    let mut written = 0;
    for (key, &count) in &scan.ports {
        let current = map.get(key, 0).unwrap_or(0);
        if let Err(err) = map.insert(key, count.max(current), 0) {
            tracing::warn!("listening ports: {} of {} written: {err}", written, scan.ports.len());
            break;
        }
        written += 1;
    }
    written
}

/// Gives the kernel the ports that were listening before it attached, so connections older
/// than the agent are adopted with the right role (see `adoption`); where they cannot be
/// adopted, counts them as skipped (`reason="backend"`) and says why in one line.
pub fn read_existing_connections(probes: &mut Probes, metrics: &Metrics) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut scan = scan_listening(Path::new("/proc"));
    let written = match probes.no_adoption {
        None => {
            let mut ports = BpfHashMap::try_from(probes.take_map(map::LISTEN_PORTS)?)?;
            seed(&mut ports, &scan)
        }
        Some(why) => {
            tracing::warn!(
                connections = scan.established,
                "connections older than the agent are not adopted: {why}"
            );
            scan.skip_established();
            0
        }
    };
    for reason in Skip::ALL {
        let skipped = scan.skipped.get(&reason).copied().unwrap_or(0);
        let labels = SkipReason { reason: reason.label().into() };
        metrics.adoption_skipped.get_or_create(&labels).inc_by(skipped);
    }
    tracing::info!(
        namespaces = scan.namespaces,
        ports = written,
        skipped = scan.skipped.values().sum::<u64>(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "listening ports read for adopting older connections"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    const HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";

    fn process(root: &Path, pid: u32, netns: &str, tcp: Option<&str>) -> anyhow::Result<()> {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(dir.join("ns"))?;
        std::fs::create_dir_all(dir.join("net"))?;
        symlink(netns, dir.join("ns/net"))?;
        if let Some(tcp) = tcp {
            std::fs::write(dir.join("net/tcp"), format!("{HEADER}{tcp}"))?;
        }
        Ok(())
    }

    #[test]
    fn one_process_per_namespace_and_every_bad_entry_counted() -> anyhow::Result<()> {
        let root = std::env::temp_dir().join(format!("connscope-proc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        let listen = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1\n\
                      1: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 2\n\
                      2: 0100007F:A000 0100007F:1F90 01 00000000:00000000 00:00000000 00000000 0 0 3\n";
        process(&root, 10, "net:[111]", Some(listen))?;
        // Same namespace, same table: read once (the counts would double otherwise).
        process(&root, 11, "net:[111]", Some(listen))?;
        process(&root, 20, "net:[222]", Some("   0: 00000000:0016 00000000:0000 0A\n  1: bad\n"))?;
        std::fs::write(
            root.join("20/net/tcp6"),
            format!(
                "{HEADER}   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A\n"
            ),
        )?;
        // A process that vanished (no ns link), a namespace link that does not parse, and
        // a table that cannot be read (a directory in its place).
        std::fs::create_dir_all(root.join("30"))?;
        process(&root, 40, "mnt:[1]", None)?;
        process(&root, 50, "net:[555]", None)?;
        std::fs::create_dir_all(root.join("50/net/tcp"))?;
        std::fs::create_dir_all(root.join("self"))?;

        let scan = scan_listening(&root);
        assert_eq!(scan.namespaces, 2);
        let expected = HashMap::from([
            (ListenKey::new(111, 8080), 1),
            (ListenKey::new(111, 80), 1),
            (ListenKey::new(222, 22), 2),
        ]);
        assert_eq!(scan.ports, expected);
        // Namespace 111's table once.
        assert_eq!(scan.established, 1);
        assert_eq!(scan.skipped.get(&Skip::Unparsable), Some(&2), "{:?}", scan.skipped);
        // `30` has no ns link although its directory exists (unreadable, not vanished), and
        // `50`'s table is a directory.
        assert_eq!(scan.skipped.get(&Skip::Unreadable), Some(&2));
        assert_eq!(scan.skipped.get(&Skip::ProcessVanished), None);
        std::fs::remove_dir_all(&root)?;
        Ok(())
    }

    #[test]
    fn a_table_that_fails_part_way_counts_nothing() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("connscope-proc-part-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let listen =
            "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1\n";
        // The listening line, then bytes that end the read with an error.
        let mut broken = format!("{HEADER}{listen}").into_bytes();
        broken.extend_from_slice(b"   1: \xff\xfe\n");
        std::fs::write(dir.join("broken"), broken)?;
        std::fs::write(dir.join("whole"), format!("{HEADER}{listen}"))?;

        let mut scan = ListenScan::default();
        assert!(read_table(&dir.join("broken"), 111, &mut scan).is_err());
        assert!(scan.ports.is_empty(), "{:?}", scan.ports);
        // The namespace's next process reads the same table again.
        read_table(&dir.join("whole"), 111, &mut scan)?;
        assert_eq!(scan.ports, HashMap::from([(ListenKey::new(111, 8080), 1)]));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn lines_are_told_apart_by_state() {
        let line = |text: &str| proc_net_tcp::parse(text).map(socket);
        assert_eq!(line("0: 0100007F:1F90 00000000:0000 0A x"), Some(Socket::Listening(8080)));
        assert_eq!(line("0: 0100007F:1F90 0100007F:0050 01"), Some(Socket::Established));
        assert_eq!(line("0: 0100007F:1F90 0100007F:0050 06"), Some(Socket::Other));
        assert_eq!(line("0: 0100007F:ZZZZ 00000000:0000 0A"), None);
    }
}
