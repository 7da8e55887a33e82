//! What the socket census costs: `N` client sockets left in TIME_WAIT (default 20,000, in a
//! network namespace of this process's own, so the host's ranges and tables are left alone),
//! then the census of every namespace of the host (`SocketCensus::take`, the read of
//! `/proc/<pid>/net/tcp{,6}` and the port ranges) and its attribution to flows
//! (`ConnectionTable::count_sockets`, with the closes of those `N` connections known), 11
//! rounds each, median and range; the census's CPU time beside its wall time. As root:
//!
//! `cargo run --release -p connscope --example socket_census_cost -- 20000`

use std::{
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::ensure;
use connscope::{
    exposition::metrics::Metrics,
    kernel::socket_census::SocketCensus,
    model::{clock, placement::NoPlacement},
    pipeline::{events::Event, table::ConnectionTable},
};
use connscope_common::{
    AF_INET, Attribution, ClosedBy, Conn, EventHeader, EventKind, OpenEvent, Role, SnapshotEvent,
    conn::open_token, conn_flag,
};

const ROUNDS: usize = 11;

fn main() -> anyhow::Result<()> {
    let sockets: usize = std::env::args().nth(1).map_or(Ok(20_000), |n| n.parse())?;
    // SAFETY: unshare on this (still single-threaded) process; it affects only itself.
    ensure!(unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0, "unshare: run as root");
    let up = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status()?;
    ensure!(up.success(), "ip link set lo up");
    std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65000")?;
    std::fs::write("/proc/sys/net/ipv4/tcp_max_tw_buckets", (sockets + 1000).to_string())?;

    let listener = TcpListener::bind("127.0.0.1:8080")?;
    let server = listener.local_addr()?;
    let mut table = ConnectionTable::new(Metrics::new(), 1 << 17, 100, 100, Box::new(NoPlacement));
    for index in 0..sockets {
        let client = TcpStream::connect(server)?;
        let (accepted, _) = listener.accept()?;
        let local = client.local_addr()?;
        drop(client);
        drop(accepted);
        record_close(&mut table, index as u64, local, server);
    }
    // The last FINs' TIME_WAIT sockets.
    std::thread::sleep(Duration::from_millis(200));

    let (census, _ranges) = SocketCensus::new("/proc");
    let first = Instant::now();
    let taken = census.take();
    println!(
        "first census (a walk of /proc): {:?}, {} sockets holding a port in {} namespaces, {} in TIME_WAIT",
        first.elapsed(),
        taken.sockets.len(),
        taken.namespaces.len(),
        taken.sockets.values().filter(|held| held.time_wait).count()
    );
    let mut takes = Vec::with_capacity(ROUNDS);
    let mut cpu = Vec::with_capacity(ROUNDS);
    let mut counts = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let (started, cpu_before) = (Instant::now(), cpu_time());
        let taken = census.take();
        takes.push(started.elapsed());
        cpu.push(cpu_time().saturating_sub(cpu_before));
        let started = Instant::now();
        table.count_sockets(&taken);
        counts.push(started.elapsed());
    }
    report("census (tables and port ranges), wall", &mut takes);
    report("census, CPU (user + system, every thread)", &mut cpu);
    report("attribution to flows", &mut counts);
    Ok(())
}

/// The table learns of a client connection to `server` from `local` that this side
/// closed first, as the kernel's `Open` and `Close` records would tell it.
fn record_close(table: &mut ConnectionTable, index: u64, local: SocketAddr, server: SocketAddr) {
    let sock = 0xffff_0000_0000_0000 + index * 64;
    let open_ns = clock::monotonic_ns();
    let mut open = OpenEvent {
        header: EventHeader::new(EventKind::Open, sock, open_ns),
        open_ns,
        role: Role::Client as u8,
        attribution: Attribution { valid: 1, tgid: 1, ..Attribution::default() },
        ..OpenEvent::default()
    };
    open.attribution.comm[..6].copy_from_slice(b"census");
    let endpoints = &mut open.endpoints;
    endpoints.family = AF_INET;
    (endpoints.local_port, endpoints.remote_port) = (local.port(), server.port());
    for (address, out) in
        [(local.ip(), &mut endpoints.local_addr), (server.ip(), &mut endpoints.remote_addr)]
    {
        if let IpAddr::V4(v4) = address {
            out[..4].copy_from_slice(&v4.octets());
        }
    }
    table.handle(&Event::Open(open));
    let conn = Conn {
        open_token: open_token(open_ns),
        last_ns: open_ns,
        role: Role::Client as u8,
        flags: conn_flag::ATTRIBUTED,
        closed_by: ClosedBy::Local as u8,
        ..Conn::default()
    };
    let header = EventHeader::new(EventKind::Close, sock, clock::monotonic_ns());
    table.handle(&Event::Close(SnapshotEvent { header, conn }));
}

/// User and system time of this process so far (the port range reader's thread included).
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let time = |tv: libc::timeval| {
        Duration::from_secs(tv.tv_sec as u64) + Duration::from_micros(tv.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

fn report(what: &str, times: &mut [Duration]) {
    times.sort_unstable();
    let (Some(min), Some(max)) = (times.first(), times.last()) else { return };
    println!("{what}: median {:?} (min {min:?}, max {max:?})", times[times.len() / 2]);
}
