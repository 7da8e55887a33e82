//! Connection attempts dropped at full listen queues: the kernel's `TcpExt` counters
//! `ListenOverflows` (a SYN, or the ACK that completes a handshake, dropped because the
//! listening socket's accept queue was full) and `ListenDrops` (every drop at a listening
//! socket, overflows included), per network namespace, read at scrape time from
//! `/proc/<pid>/net/netstat` of one process per namespace (`netns::NamespaceProcesses`:
//! `/proc` is walked at most every 30 s, scrapes in between read the files of the processes
//! it found).
//!
//! Per namespace rather than per listening port: the kernel counts these drops only in the
//! namespace's SNMP counters, and no tracepoint marks them on the kernels connscope runs on
//! (a per-port figure would need a hook on every dropped packet). The values are the
//! kernel's own (since the namespace was made), so they are never carried across restarts.

use std::{
    io,
    path::{Path, PathBuf},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter},
};

use crate::{
    kernel::netns::{self, MAX_NAMESPACES, NamespaceProcesses},
    model::metric_table::{self, Metric},
};

/// One namespace's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenDrops {
    pub overflows: u64,
    pub drops: u64,
}

fn read_counters(process_dir: &Path) -> io::Result<ListenDrops> {
    let file = std::fs::File::open(process_dir.join("net/netstat"))?;
    parse_netstat(io::BufReader::new(file))
}

/// `ListenOverflows` and `ListenDrops` from a `netstat` file: a `TcpExt:` line of names
/// followed by a `TcpExt:` line of values. A file without them (an old kernel) reads as 0;
/// one whose values do not parse is an error.
fn parse_netstat(reader: impl io::BufRead) -> io::Result<ListenDrops> {
    let mut names: Option<String> = None;
    for line in reader.lines() {
        let line = line?;
        let Some(rest) = line.strip_prefix("TcpExt:") else { continue };
        let Some(header) = names.take() else {
            names = Some(rest.to_owned());
            continue;
        };
        let mut counters = ListenDrops::default();
        for (name, value) in header.split_whitespace().zip(rest.split_whitespace()) {
            let slot = match name {
                "ListenOverflows" => &mut counters.overflows,
                "ListenDrops" => &mut counters.drops,
                _ => continue,
            };
            *slot = value.parse().map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        }
        return Ok(counters);
    }
    Ok(ListenDrops::default())
}

/// `connscope_listen_overflows_total{netns}` and `connscope_listen_drops_total{netns}`.
#[derive(Debug)]
pub struct ListenQueueCollector {
    namespaces: NamespaceProcesses,
}

impl ListenQueueCollector {
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        Self { namespaces: NamespaceProcesses::new(proc_root) }
    }

    /// Every namespace's counters now, in inode order.
    pub fn read_all(&self) -> Vec<(u32, ListenDrops)> {
        self.namespaces.read_each(read_counters)
    }
}

/// The labelled rows of `read_all`'s result: the first `MAX_NAMESPACES` by inode, the
/// rest summed under `other`.
fn capped(all: Vec<(u32, ListenDrops)>) -> Vec<(String, ListenDrops)> {
    let mut rows: Vec<(String, ListenDrops)> = Vec::with_capacity(all.len().min(MAX_NAMESPACES));
    let mut other: Option<ListenDrops> = None;
    for (index, (netns, counters)) in all.into_iter().enumerate() {
        if index < MAX_NAMESPACES {
            rows.push((netns::label(index, netns), counters));
        } else {
            let sum = other.get_or_insert_default();
            sum.overflows += counters.overflows;
            sum.drops += counters.drops;
        }
    }
    rows.extend(other.map(|sum| ("other".to_owned(), sum)));
    rows
}

fn encode_family(
    encoder: &mut DescriptorEncoder,
    row: &Metric,
    rows: &[(String, ListenDrops)],
    value: fn(&ListenDrops) -> u64,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(row.name, row.help, None, MetricType::Counter)?;
    for (netns, counters) in rows {
        let labels = [("netns", netns.as_str())];
        ConstCounter::new(value(counters)).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for ListenQueueCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let rows = capped(self.read_all());
        encode_family(&mut encoder, &metric_table::LISTEN_OVERFLOWS, &rows, |c| c.overflows)?;
        encode_family(&mut encoder, &metric_table::LISTEN_DROPS, &rows, |c| c.drops)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    const NETSTAT: &str = "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPHPHits\n\
                           TcpExt: 0 18 20 7\n\
                           IpExt: InNoRoutes\n\
                           IpExt: 0\n";

    #[test]
    fn netstat_counters_are_read_by_name() -> io::Result<()> {
        let counters = parse_netstat(NETSTAT.as_bytes())?;
        assert_eq!(counters, ListenDrops { overflows: 18, drops: 20 });
        assert_eq!(parse_netstat("IpExt: A\nIpExt: 1\n".as_bytes())?, ListenDrops::default());
        assert!(parse_netstat("TcpExt: ListenDrops\nTcpExt: x\n".as_bytes()).is_err());
        Ok(())
    }

    #[test]
    fn one_process_per_namespace_is_read_and_the_rest_capped() -> anyhow::Result<()> {
        let root = std::env::temp_dir().join(format!("connscope-netstat-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (pid, netns) in [(10, 111), (11, 111), (20, 222)] {
            let dir = root.join(pid.to_string());
            std::fs::create_dir_all(dir.join("ns"))?;
            std::fs::create_dir_all(dir.join("net"))?;
            symlink(format!("net:[{netns}]"), dir.join("ns/net"))?;
            std::fs::write(dir.join("net/netstat"), NETSTAT)?;
        }
        let collector = ListenQueueCollector::new(&root);
        let counters = ListenDrops { overflows: 18, drops: 20 };
        assert_eq!(collector.read_all(), [(111, counters), (222, counters)]);
        // Until the next walk only the processes found are read: a new namespace waits,
        // a changed counter does not.
        let dir = root.join("30");
        std::fs::create_dir_all(dir.join("ns"))?;
        std::fs::create_dir_all(dir.join("net"))?;
        symlink("net:[333]", dir.join("ns/net"))?;
        std::fs::write(dir.join("net/netstat"), NETSTAT)?;
        let found = collector.read_all().iter().map(|(netns, _)| *netns).collect::<Vec<_>>();
        assert_eq!(found, [111, 222]);
        // A process that is gone makes the next read a walk, which finds every namespace.
        std::fs::remove_dir_all(root.join("20"))?;
        let found = collector.read_all().iter().map(|(netns, _)| *netns).collect::<Vec<_>>();
        assert_eq!(found, [111, 333]);
        std::fs::remove_dir_all(&root)?;

        let many = (0..MAX_NAMESPACES as u32 + 2).map(|netns| (netns, counters)).collect();
        let rows = capped(many);
        assert_eq!(rows.len(), MAX_NAMESPACES + 1);
        let other = ListenDrops { overflows: 36, drops: 40 };
        assert_eq!(rows.last(), Some(&("other".to_owned(), other)));
        Ok(())
    }
}
