//! The periodic census of TCP sockets behind `connections_time_wait`,
//! `connections_time_wait_unattributed`, `client_ports_in_use` and
//! `client_port_range_size`. No hook sees a TIME_WAIT socket (the full socket is destroyed
//! as it enters TIME_WAIT), so every [`INTERVAL`] (longer when a census costs more than
//! `--census.budget` of a CPU: [`next_after`]) the sockets of each network namespace are
//! read through `NETLINK_SOCK_DIAG` in it (`sock_diag`; where that cannot be used, from
//! `/proc/<pid>/net/tcp{,6}` of one process in it: `netns::NamespaceProcesses`), off the
//! agent's event loop; the pipeline attributes them to flows by four-tuple. The
//! same pass reads each namespace's ephemeral port range (`port_range`), exported at scrape
//! time by [`PortRangeCollector`]. docs/performance.md has the cost.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, gauge::ConstGauge},
};

use crate::{
    kernel::{
        netns::{self, NamespaceProcesses},
        port_range,
        proc_net_tcp::{self, TcpLine},
        sock_diag,
    },
    model::{
        clock,
        metric_table::CLIENT_PORT_RANGE_SIZE,
        socket_census::{Census, Held, TupleKey},
    },
};

/// How often the sockets are counted at most: TIME_WAIT lasts 60 s, so a gauge within 5 s
/// of it.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// The longest wait between two censuses, whatever the last one took.
pub const LONGEST_INTERVAL: Duration = Duration::from_secs(300);

/// When the census after one that took `took` is due, for the census to spend at most
/// `budget` of a CPU (`--census.budget`, above 0). A census costs about 7 ms per namespace
/// and 1.5 µs per socket here (docs/performance.md): at the default 1%, one every 5 s up to
/// about 30,000 sockets in a few namespaces.
pub fn next_after(took: Duration, budget: f64) -> Duration {
    Duration::try_from_secs_f64(took.as_secs_f64() / budget)
        .unwrap_or(LONGEST_INTERVAL)
        .clamp(INTERVAL, LONGEST_INTERVAL)
}

/// One namespace's sockets that hold a local port, and its lines that did not parse.
#[derive(Debug, Default)]
struct Sockets {
    held: Vec<(TupleKey, bool)>,
    unparsable: u64,
}

impl Sockets {
    fn add(&mut self, line: Option<TcpLine>) {
        match line {
            Some(TcpLine { state: proc_net_tcp::LISTEN | proc_net_tcp::CLOSE, .. }) => {}
            Some(line) => self.held.push((
                TupleKey::new(line.local, line.remote),
                line.state == proc_net_tcp::TIME_WAIT,
            )),
            None => self.unparsable += 1,
        }
    }
}

/// Each namespace's usable port range, by `netns` label.
type Ranges = Arc<Mutex<Vec<(String, u32)>>>;

/// Takes censuses; cheap to share with the blocking thread that runs each.
#[derive(Debug)]
pub struct SocketCensus {
    namespaces: NamespaceProcesses,
    ranges: Ranges,
    /// Whether a range that could not be read, and lines that did not parse, were reported.
    range_warned: AtomicBool,
    unparsable_warned: AtomicBool,
    netlink_warned: AtomicBool,
}

impl SocketCensus {
    /// The census, and the collector that exports the port ranges it reads.
    pub fn new(proc_root: impl Into<PathBuf>) -> (Self, PortRangeCollector) {
        let ranges = Ranges::default();
        let census = Self {
            namespaces: NamespaceProcesses::new(proc_root),
            ranges: ranges.clone(),
            range_warned: AtomicBool::new(false),
            unparsable_warned: AtomicBool::new(false),
            netlink_warned: AtomicBool::new(false),
        };
        (census, PortRangeCollector { ranges })
    }

    /// Reads a namespace's sockets through `sock_diag`, or else both of its `/proc` tables
    /// (one warning the first time, naming why); a failed read (its process exiting) counts
    /// nothing, and the namespace is read again through its next process.
    fn read_sockets(&self, process_dir: &Path) -> io::Result<Sockets> {
        let mut sockets = Sockets::default();
        let Err(err) = sock_diag::for_each_socket(process_dir, |line| sockets.add(line)) else {
            return Ok(sockets);
        };
        let message = "the socket census reads /proc/<pid>/net/tcp (slower under churn) where \
                       NETLINK_SOCK_DIAG cannot be used";
        if warn_once(&self.netlink_warned) {
            tracing::warn!(process = %process_dir.display(), "{message}: {err}");
        } else {
            tracing::debug!(process = %process_dir.display(), "{message}: {err}");
        }
        let mut sockets = Sockets::default();
        proc_net_tcp::for_each_socket(process_dir, |line| sockets.add(line))?;
        Ok(sockets)
    }

    /// Counts the sockets of every namespace now, and reads their port ranges.
    pub fn take(&self) -> Census {
        let mut census = Census { taken_ns: clock::monotonic_ns(), ..Census::default() };
        let read = self.namespaces.read_each(|dir| Ok((self.read_sockets(dir)?, dir.to_owned())));
        let mut unparsable = 0;
        let mut dirs = Vec::with_capacity(read.len());
        for (index, (netns, (sockets, dir))) in read.into_iter().enumerate() {
            let label = netns::label(index, netns);
            let namespace = match census.namespaces.iter().position(|l| *l == label) {
                Some(known) => known,
                None => {
                    census.namespaces.push(label);
                    census.namespaces.len() - 1
                }
            } as u32;
            for (tuple, time_wait) in sockets.held {
                census.sockets.entry(tuple).or_insert(Held { namespace, time_wait });
            }
            unparsable += sockets.unparsable;
            dirs.push((namespace, dir));
        }
        if unparsable > 0 {
            let message = "socket table lines that do not parse were skipped";
            if warn_once(&self.unparsable_warned) {
                tracing::warn!(lines = unparsable, "{message}");
            } else {
                tracing::debug!(lines = unparsable, "{message}");
            }
        }
        self.read_ranges(&census.namespaces, dirs);
        census
    }

    /// Each namespace's range; past the label cap, `other` gets the smallest (the first
    /// to run out). A namespace whose range cannot be read is left out.
    fn read_ranges(&self, labels: &[String], dirs: Vec<(u32, PathBuf)>) {
        let (namespaces, dirs): (Vec<u32>, Vec<PathBuf>) = dirs.into_iter().unzip();
        let mut ranges: Vec<(String, u32)> = Vec::with_capacity(labels.len());
        for (namespace, size) in namespaces.into_iter().zip(port_range::read(dirs)) {
            let label = &labels[namespace as usize];
            let size = match size {
                Ok(size) => size,
                Err(err) => {
                    self.range_unreadable(label, &err);
                    continue;
                }
            };
            match ranges.iter_mut().find(|(known, _)| known == label) {
                Some((_, smallest)) => *smallest = (*smallest).min(size),
                None => ranges.push((label.clone(), size)),
            }
        }
        if let Ok(mut shared) = self.ranges.lock() {
            *shared = ranges;
        }
    }

    /// Says why a namespace's range is missing: as a warning the first time, then at debug
    /// level (the census repeats every few seconds).
    fn range_unreadable(&self, netns: &str, err: &io::Error) {
        let hint = if err.raw_os_error() == Some(libc::EPERM) {
            ": entering another network namespace needs CAP_SYS_ADMIN"
        } else {
            ""
        };
        let message = "client_port_range_size is left out for a namespace";
        if warn_once(&self.range_warned) {
            tracing::warn!(netns, "{message}: {err}{hint}");
        } else {
            tracing::debug!(netns, "{message}: {err}{hint}");
        }
    }
}

/// True the first time it is asked about `warned`.
fn warn_once(warned: &AtomicBool) -> bool {
    !warned.swap(true, Ordering::Relaxed)
}

/// `connscope_client_port_range_size{netns}`, as the last census read it.
#[derive(Debug)]
pub struct PortRangeCollector {
    ranges: Ranges,
}

impl Collector for PortRangeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let row = &CLIENT_PORT_RANGE_SIZE;
        let mut family = encoder.encode_descriptor(row.name, row.help, None, MetricType::Gauge)?;
        let Ok(ranges) = self.ranges.lock() else { return Ok(()) };
        for (netns, size) in ranges.iter() {
            let labels = [("netns", netns.as_str())];
            ConstGauge::new(i64::from(*size)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn a_slow_census_spaces_the_next_one_out() {
        assert_eq!(next_after(Duration::from_millis(20), 0.01), INTERVAL);
        assert_eq!(next_after(Duration::from_millis(120), 0.01), Duration::from_secs(12));
        assert_eq!(next_after(Duration::from_millis(120), 0.1), INTERVAL);
        assert_eq!(next_after(Duration::MAX, 0.01), LONGEST_INTERVAL);
        assert_eq!(next_after(Duration::from_secs(1), f64::MIN_POSITIVE), LONGEST_INTERVAL);
    }

    const HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue\n";

    #[test]
    fn sockets_holding_a_port_are_counted_once_per_tuple() -> anyhow::Result<()> {
        let root = std::env::temp_dir().join(format!("connscope-census-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let tables = [
            // A listener (left out), a TIME_WAIT client socket, an established one, a line
            // that does not parse.
            (
                10,
                111,
                "0: 0100007F:1F90 00000000:0000 0A\n1: 0100007F:9C40 0100007F:1F90 06\n2: 0100007F:9C41 0100007F:1F90 01\n3: bad\n",
            ),
            // The same tuple in another namespace: kept once, from the first.
            (20, 222, "0: 0100007F:9C40 0100007F:1F90 01\n1: 0100007F:9C42 0100007F:1F90 07\n"),
        ];
        for (pid, netns, tcp) in tables {
            let dir = root.join(pid.to_string());
            std::fs::create_dir_all(dir.join("ns"))?;
            std::fs::create_dir_all(dir.join("net"))?;
            symlink(format!("net:[{netns}]"), dir.join("ns/net"))?;
            std::fs::write(dir.join("net/tcp"), format!("{HEADER}{tcp}"))?;
        }
        let (census, _) = SocketCensus::new(&root);
        let taken = census.take();
        assert_eq!(taken.namespaces, ["111", "222"]);
        let loopback = |port| (std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped(), port);
        let tuple = |port| TupleKey::new(loopback(port), loopback(8080));
        assert_eq!(taken.sockets.len(), 2, "{:?}", taken.sockets);
        assert_eq!(taken.sockets.get(&tuple(40000)), Some(&Held { namespace: 0, time_wait: true }));
        let established = Held { namespace: 0, time_wait: false };
        assert_eq!(taken.sockets.get(&tuple(40001)), Some(&established));
        std::fs::remove_dir_all(&root)?;
        Ok(())
    }
}
