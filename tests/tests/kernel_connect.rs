//! What churn costs, against the real kernel: the handshake time of each client connect
//! (`connect_duration_seconds`), the connects that fail (`connect_failures_total`), the
//! sockets left in TIME_WAIT and the local ports held per destination against the range,
//! from real sockets made here. Counts are exact: each test owns its server address (loopback,
//! or `127.0.28.x` inside a network namespace of its own) and its agent port.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::{fd::FromRawFd as _, unix::fs::MetadataExt as _},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use connscope_tests::{Agent, Scrape, kernel_test, net, serial};

const WAIT: Duration = Duration::from_secs(10);
/// The socket census runs every 5 s, later on a host with tens of thousands of sockets
/// (1% of a CPU at most): its gauges are waited for longer.
const CENSUS_WAIT: Duration = Duration::from_secs(30);
const DURATION: &str = "connscope_connect_duration_seconds";
const FAILURES: &str = "connscope_connect_failures_total";
const TIME_WAIT: &str = "connscope_connections_time_wait";
const UNATTRIBUTED: &str = "connscope_connections_time_wait_unattributed";
const PORTS: &str = "connscope_client_ports_in_use";
const RANGE: &str = "connscope_client_port_range_size";

/// This file's agents listen on ports of their own (29577 to 29583), below the ephemeral
/// range (see `free_port`); one in use now is replaced by a free port.
///
/// They may spend a whole CPU on the socket census: the tests check what a census counts,
/// and under emulation one takes over a second, so at the default 1% of a CPU the next
/// one came after the 60 s TIME_WAIT sockets it was to count were gone.
fn agent(port: u16) -> anyhow::Result<Agent> {
    const WHOLE_CPU_CENSUS: [&str; 2] = ["--census.budget", "1"];
    if TcpListener::bind(("127.0.0.1", port)).is_ok() {
        Agent::start_on(port, &WHOLE_CPU_CENSUS, None)
    } else {
        Agent::start(&WHOLE_CPU_CENSUS)
    }
}

fn bucket(scrape: &Scrape, server: &str, le: &str) -> f64 {
    let labels = [("role", "client"), ("server", server), ("le", le)];
    scrape.sum(&format!("{DURATION}_bucket"), &labels)
}

fn connects(scrape: &Scrape, server: &str) -> f64 {
    scrape.sum(&format!("{DURATION}_count"), &[("role", "client"), ("server", server)])
}

fn failures(scrape: &Scrape, server: &str, reason: &str) -> f64 {
    scrape.sum(FAILURES, &[("role", "client"), ("server", server), ("reason", reason)])
}

/// A listening socket on `address` with the given `listen()` backlog (std's is 128).
fn listen_with_backlog(address: SocketAddr, backlog: i32) -> anyhow::Result<TcpListener> {
    let SocketAddr::V4(v4) = address else { bail!("IPv4 only: {address}") };
    // SAFETY: plain socket calls on a descriptor this function owns until it hands it over.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let listener = TcpListener::from_raw_fd(fd);
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(*v4.ip()).to_be() },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::bind(fd, (&sin as *const libc::sockaddr_in).cast(), len) != 0
            || libc::listen(fd, backlog) != 0
        {
            bail!("bind/listen {address}: {}", std::io::Error::last_os_error());
        }
        Ok(listener)
    }
}

/// Sets a sysctl of the calling thread's network namespace.
fn sysctl(name: &str, value: &str) -> anyhow::Result<()> {
    let path = format!("/proc/sys/{}", name.replace('.', "/"));
    std::fs::write(&path, value).with_context(|| format!("writing {path}"))
}

kernel_test!(
    /// Loopback handshakes take microseconds: they land in the lowest bucket (100 µs). The
    /// handshake lies within the `connect()` call, so every call the client timed within
    /// 100 µs must be there (exact); a call preempted past it may be in another bucket.
    fn loopback_connects_land_in_the_lowest_bucket() -> anyhow::Result<()> {
        let _serial = serial::shared();
        let agent = agent(29577)?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let server = listener.local_addr()?.to_string();
        const N: usize = 20;
        let acceptor = net::drain_server(listener, N, "cc-acceptor");
        let (mut fast_calls, mut calls_took) = (0, Duration::ZERO);
        for _ in 0..N {
            let started = Instant::now();
            let mut client = TcpStream::connect(&server)?;
            let took = started.elapsed();
            calls_took += took;
            fast_calls += usize::from(took <= Duration::from_micros(100));
            client.write_all(b"x")?;
        }
        net::join(acceptor)?;

        let scrape = agent.scrape_until(WAIT, |s| connects(s, &server) >= N as f64)?;
        assert_eq!(connects(&scrape, &server), N as f64, "{}", scrape.text);
        let fast = bucket(&scrape, &server, "0.0001");
        assert!(fast >= fast_calls as f64, "{fast} in the lowest bucket, {fast_calls} calls");
        let sum = scrape.sum(&format!("{DURATION}_sum"), &[("server", server.as_str())]);
        assert!(sum > 0.0 && sum <= calls_took.as_secs_f64(), "{sum} s, calls {calls_took:?}");
        // No server end has a connect time, and nothing failed.
        let server_side = [("role", "server"), ("server", server.as_str())];
        assert_eq!(scrape.sum(&format!("{DURATION}_count"), &server_side), 0.0);
        assert_eq!(scrape.sum(FAILURES, &[("server", server.as_str())]), 0.0);
        // A wall-clock bound, last: the VM tier reports it, rather than fails it, under
        // software emulation (its `^loopback connects took ` form).
        assert!(
            fast_calls * 2 >= N,
            "loopback connects took over 100 µs: {fast_calls} of {N} calls within"
        );
        Ok(())
    }
);

kernel_test!(
    /// A full listen queue drops the SYN: the client retransmits it after the initial 1 s
    /// timeout, so its connect takes just over 1 s and lands in the (1 s, 3 s] bucket.
    fn a_syn_dropped_by_a_full_listen_queue_costs_a_second() -> anyhow::Result<()> {
        let _serial = serial::shared();
        let agent = agent(29578)?;
        // listen(0): one connection fits in the accept queue, the next one's SYN is dropped.
        let listener = listen_with_backlog("127.0.0.1:0".parse()?, 0)?;
        let server = listener.local_addr()?.to_string();
        let first = TcpStream::connect(&server)?;
        let second_server = server.clone();
        let second = thread::spawn(move || {
            let started = Instant::now();
            let stream = TcpStream::connect(&second_server)?;
            anyhow::Ok((stream, started.elapsed()))
        });
        // Accepts late: after the second SYN was dropped (its client had 700 ms to send it,
        // slow emulation included), before its retransmit 1 s after it.
        thread::sleep(Duration::from_millis(700));
        let accepted_first = listener.accept()?;
        let second = second.join().map_err(|_| anyhow::anyhow!("client panicked"))?;
        let (second, took) = second?;
        let accepted_second = listener.accept()?;
        ensure!(took >= Duration::from_secs(1), "the second connect took only {took:?}");
        ensure!(took < Duration::from_secs(3), "the second connect took {took:?}");
        drop((first, second, accepted_first, accepted_second));

        let scrape = agent.scrape_until(WAIT, |s| connects(s, &server) >= 2.0)?;
        assert_eq!(connects(&scrape, &server), 2.0, "{}", scrape.text);
        assert_eq!(bucket(&scrape, &server, "1.0"), 1.0, "{}", scrape.text);
        assert_eq!(bucket(&scrape, &server, "3.0"), 2.0, "{}", scrape.text);
        let sum = scrape.sum(&format!("{DURATION}_sum"), &[("server", server.as_str())]);
        assert!(sum >= 1.0 && sum < took.as_secs_f64() + 1.0, "sum {sum}, took {took:?}");
        assert_eq!(scrape.sum(FAILURES, &[("server", server.as_str())]), 0.0);
        Ok(())
    }
);

kernel_test!(
    /// A connect to a port nothing listens on is answered by a reset: `refused`, once per
    /// attempt, on the connecting process's flow.
    fn a_connect_to_a_closed_port_is_refused_once_per_attempt() -> anyhow::Result<()> {
        let _serial = serial::shared();
        let agent = agent(29579)?;
        let server = TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string();
        const ATTEMPTS: usize = 3;
        for _ in 0..ATTEMPTS {
            let error = TcpStream::connect(&server).err().context("a connect succeeded")?;
            ensure!(error.kind() == ErrorKind::ConnectionRefused, "{error}");
        }
        let me = connscope_tests::own_process_label();

        let scrape = agent.scrape_until(WAIT, |s| failures(s, &server, "refused") >= 3.0)?;
        let labels = [("server", server.as_str()), ("process", &me), ("reason", "refused")];
        assert_eq!(scrape.sum(FAILURES, &labels), ATTEMPTS as f64, "{}", scrape.text);
        assert_eq!(scrape.sum(FAILURES, &[("server", server.as_str())]), ATTEMPTS as f64);
        assert_eq!(connects(&scrape, &server), 0.0);
        Ok(())
    }
);

/// Makes every SYN to `server` (`127.0.28.1:80`) in `ns` go unanswered: an nftables drop
/// rule where `nft` is installed (`cargo xtask setup` installs it; this kernel has
/// nf_tables), else a listener in `ns` whose accept queue is full, which drops SYNs too (the
/// VM tier's guests have neither `nft` nor the nf_tables module). The listener and the
/// connection it holds are returned: they keep that queue full.
fn drop_syns(
    ns: &net::NetNs,
    server: &'static str,
) -> anyhow::Result<Option<(TcpListener, TcpStream)>> {
    let nft = std::process::Command::new("nft").arg("--version").output();
    if nft.is_ok_and(|out| out.status.success()) {
        let rules = [
            "add table inet connscope_test",
            "add chain inet connscope_test input { type filter hook input priority 0 ; }",
            "add rule inet connscope_test input ip daddr 127.0.28.1 tcp dport 80 drop",
        ];
        for rule in rules {
            let mut args = vec!["netns", "exec", &ns.name, "nft"];
            args.extend(rule.split(' '));
            net::run("ip", &args)?;
        }
        return Ok(None);
    }
    ns.run(move || {
        // listen(0) holds one connection; it is never accepted.
        let listener = listen_with_backlog(server.parse()?, 0)?;
        let queued = TcpStream::connect(server)?;
        anyhow::Ok(Some((listener, queued)))
    })?
}

kernel_test!(
    /// SYNs dropped (an nftables rule in the test's own namespace, or a full listen queue)
    /// with `tcp_syn_retries=1`: the connect gives up after 3 s, `timeout`. A connect the
    /// application gives up first (its own 200 ms timeout) is `abandoned`.
    fn dropped_syns_time_out_and_a_given_up_connect_is_abandoned() -> anyhow::Result<()> {
        let _serial = serial::shared();
        let agent = agent(29580)?;
        let ns = net::NetNs::create("connect-timeout")?;
        let server = "127.0.28.1:80";
        let _dropping = drop_syns(&ns, server)?;
        let (timed_out, abandoned) = ns.run(move || {
            sysctl("net.ipv4.tcp_syn_retries", "1")?;
            let address: SocketAddr = server.parse()?;
            let started = Instant::now();
            let timed_out = TcpStream::connect(address).err().context("a connect succeeded")?;
            let took = started.elapsed();
            ensure!(took >= Duration::from_secs(2), "gave up after {took:?}: {timed_out}");
            let abandoned = TcpStream::connect_timeout(&address, Duration::from_millis(200))
                .err()
                .context("a connect succeeded")?;
            anyhow::Ok((timed_out.kind(), abandoned.kind()))
        })??;
        assert_eq!((timed_out, abandoned), (ErrorKind::TimedOut, ErrorKind::TimedOut));

        let scrape = agent.scrape_until(WAIT, |s| {
            failures(s, server, "timeout") >= 1.0 && failures(s, server, "abandoned") >= 1.0
        })?;
        assert_eq!(failures(&scrape, server, "timeout"), 1.0, "{}", scrape.text);
        assert_eq!(failures(&scrape, server, "abandoned"), 1.0, "{}", scrape.text);
        assert_eq!(scrape.sum(FAILURES, &[("server", server)]), 2.0, "{}", scrape.text);
        Ok(())
    }
);

kernel_test!(
    /// 20 local ports (`ip_local_port_range`), no TIME_WAIT reuse, 30 connections to one
    /// server that the client closes first: each holds its port in TIME_WAIT, so 20
    /// connect and the other 10 fail with `EADDRNOTAVAIL`, counted as `no_local_port`. The
    /// client flow then holds 20 ports (in TIME_WAIT) of its namespace's range of 20.
    fn an_exhausted_port_range_fails_connects_with_no_local_port() -> anyhow::Result<()> {
        let _serial = serial::shared();
        let ns = net::NetNs::create("connect-ports")?;
        ns.run(|| {
            sysctl("net.ipv4.ip_local_port_range", "40000 40019")?;
            sysctl("net.ipv4.tcp_tw_reuse", "0")
        })??;
        // The agent reads the namespace (its sockets, its range) through this process.
        let _holder = net::NamespaceHolder::start(&ns)?;
        let agent = agent(29581)?;
        let netns = std::fs::metadata(format!("/run/netns/{}", ns.name))?.ino().to_string();
        let server = "127.0.28.2:8080";
        const ATTEMPTS: usize = 30;
        let (connected, no_port) = ns.run(move || {
            let listener = TcpListener::bind(server)?;
            let (mut connected, mut no_port) = (0, 0);
            for _ in 0..ATTEMPTS {
                match TcpStream::connect(server) {
                    Ok(mut client) => {
                        client.write_all(b"x")?;
                        let (mut accepted, _) = listener.accept()?;
                        drop(client);
                        let mut sink = Vec::new();
                        accepted.read_to_end(&mut sink)?;
                        connected += 1;
                    }
                    Err(err) if err.kind() == ErrorKind::AddrNotAvailable => no_port += 1,
                    Err(err) => return Err(err.into()),
                }
            }
            anyhow::Ok((connected, no_port))
        })??;
        assert_eq!((connected, no_port), (20, ATTEMPTS - 20));

        let in_namespace = [("role", "client"), ("server", server), ("netns", netns.as_str())];
        let range = [("netns", netns.as_str())];
        let scrape = agent.scrape_until(CENSUS_WAIT, |s| {
            failures(s, server, "no_local_port") >= no_port as f64
                && connects(s, server) >= connected as f64
                && s.sum(PORTS, &in_namespace) >= connected as f64
                && s.sum(RANGE, &range) > 0.0
        })?;
        assert_eq!(failures(&scrape, server, "no_local_port"), no_port as f64, "{}", scrape.text);
        assert_eq!(scrape.sum(FAILURES, &[("server", server)]), no_port as f64);
        assert_eq!(connects(&scrape, server), connected as f64, "{}", scrape.text);
        assert_eq!(scrape.sum(PORTS, &in_namespace), 20.0, "{}", scrape.text);
        assert_eq!(scrape.sum(PORTS, &[("server", server)]), 20.0, "{}", scrape.text);
        assert_eq!(scrape.sum(RANGE, &range), 20.0, "{}", scrape.text);
        // Every port is held by a client socket in TIME_WAIT, all of that flow.
        assert_eq!(time_wait(&scrape, "client", server), 20.0, "{}", scrape.text);
        assert_eq!(scrape.sum(UNATTRIBUTED, &range), 0.0, "{}", scrape.text);
        Ok(())
    }
);

/// Sockets in TIME_WAIT toward `server` (`ip:port`) in the calling thread's namespace, as
/// `ss -tan` lists them.
fn ss_time_wait(server: &str) -> anyhow::Result<usize> {
    let out = std::process::Command::new("ss").args(["-H", "-t", "-a", "-n"]).output()?;
    ensure!(out.status.success(), "ss: {}", String::from_utf8_lossy(&out.stderr));
    let listing = String::from_utf8(out.stdout)?;
    Ok(listing
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|fields| fields.first() == Some(&"TIME-WAIT") && fields.get(4) == Some(&server))
        .count())
}

fn time_wait(scrape: &Scrape, role: &str, server: &str) -> f64 {
    scrape.sum(TIME_WAIT, &[("role", role), ("server", server)])
}

kernel_test!(
    /// 200 short connections the client closes first each leave its socket in TIME_WAIT:
    /// the client flow's gauge equals what `ss` lists for that destination at the same
    /// moment (the server closed after the client, so it holds none), and falls back to 0
    /// once the 60 s TIME_WAIT length has passed.
    fn time_wait_sockets_count_on_the_flow_that_closed_first() -> anyhow::Result<()> {
        let _serial = serial::shared();
        let agent = agent(29583)?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let server = listener.local_addr()?.to_string();
        const N: usize = 200;
        net::closed_by_client(listener, N, "tw-acceptor", b"x")?;
        let closed = Instant::now();

        let scrape =
            agent.scrape_until(CENSUS_WAIT, |s| time_wait(s, "client", &server) >= N as f64)?;
        let listed = ss_time_wait(&server)?;
        assert_eq!(time_wait(&scrape, "client", &server), listed as f64, "{}", scrape.text);
        assert_eq!(listed, N);
        assert_eq!(time_wait(&scrape, "server", &server), 0.0, "{}", scrape.text);
        // The client flow's ports: each TIME_WAIT socket holds one.
        let ports = scrape.sum(PORTS, &[("role", "client"), ("server", server.as_str())]);
        assert_eq!(ports, N as f64, "{}", scrape.text);

        thread::sleep(Duration::from_secs(61).saturating_sub(closed.elapsed()));
        let scrape = agent.scrape_until(CENSUS_WAIT, |s| time_wait(s, "client", &server) == 0.0)?;
        assert_eq!(time_wait(&scrape, "client", &server), 0.0, "{}", scrape.text);
        assert_eq!(ss_time_wait(&server)?, 0);
        let ports = scrape.sum(PORTS, &[("role", "client"), ("server", server.as_str())]);
        assert_eq!(ports, 0.0, "{}", scrape.text);
        Ok(())
    }
);

/// `ListenOverflows` and `ListenDrops` of the namespace `/proc/<pid>/net/netstat` shows.
fn listen_counters(pid: u32) -> anyhow::Result<(f64, f64)> {
    let netstat = std::fs::read_to_string(format!("/proc/{pid}/net/netstat"))?;
    let mut tcp_ext = netstat.lines().filter_map(|line| line.strip_prefix("TcpExt:"));
    let (names, values) =
        (tcp_ext.next().context("no TcpExt")?, tcp_ext.next().context("no values")?);
    let pairs: Vec<(&str, &str)> =
        names.split_whitespace().zip(values.split_whitespace()).collect();
    let value = |name: &str| -> anyhow::Result<f64> {
        let (_, value) = pairs.iter().find(|(n, _)| *n == name).context("no such counter")?;
        Ok(value.parse()?)
    };
    Ok((value("ListenOverflows")?, value("ListenDrops")?))
}

kernel_test!(
    /// A server with `listen(backlog=1)` that never accepts, and 20 clients that give up
    /// after 250 ms: two fill its accept queue, the other SYNs are dropped. The drops the
    /// agent reports for the namespace equal the namespace's own `ListenOverflows` and
    /// `ListenDrops` (from 0: the namespace is new).
    fn listen_queue_drops_equal_the_namespaces_listen_overflows() -> anyhow::Result<()> {
        let _serial = serial::shared();
        let ns = net::NetNs::create("listen-queue")?;
        let holder = net::NamespaceHolder::start(&ns)?;
        // Started after the namespace has its process: an agent finds new namespaces at its
        // next walk of /proc, up to 30 s later.
        let agent = agent(29582)?;
        let netns = std::fs::metadata(format!("/run/netns/{}", ns.name))?.ino().to_string();
        const CLIENTS: usize = 20;
        let (connected, listener) = ns.run(move || {
            let address: SocketAddr = "127.0.28.3:8080".parse()?;
            let listener = listen_with_backlog(address, 1)?;
            let mut connected = Vec::new();
            for _ in 0..CLIENTS {
                match TcpStream::connect_timeout(&address, Duration::from_millis(250)) {
                    Ok(stream) => connected.push(stream),
                    Err(err) if err.kind() == ErrorKind::TimedOut => {}
                    Err(err) => return Err(err.into()),
                }
            }
            anyhow::Ok((connected, listener))
        })??;
        let (overflows, drops) = listen_counters(holder.pid())?;
        let timed_out = (CLIENTS - connected.len()) as f64;
        ensure!(overflows >= timed_out && drops >= overflows, "{overflows} {drops} {timed_out}");

        let labels = [("netns", netns.as_str())];
        let scrape = agent.scrape_until(WAIT, |s| {
            s.sum("connscope_listen_overflows_total", &labels) >= overflows
        })?;
        let reported = |name: &str| scrape.sum(name, &labels);
        assert_eq!(reported("connscope_listen_overflows_total"), overflows, "{}", scrape.text);
        assert_eq!(reported("connscope_listen_drops_total"), drops, "{}", scrape.text);
        // Nothing was dropped since: the figures are the namespace's at the scrape.
        assert_eq!(listen_counters(holder.pid())?, (overflows, drops));
        drop((connected, listener));
        Ok(())
    }
);
