//! Connections that outlive an agent (issue 10), on every backend (the VM tier runs this
//! binary once per backend): connections older than the agent, in the host namespace and
//! in a network namespace, adopted at their first send or receive (or, where the backend
//! cannot adopt, counted as skipped); a restart under traffic with pinned state; `connscope
//! cleanup`; pinned state of another layout replaced. Each test that pins does so in a BPF
//! filesystem mounted for it alone. Servers and clients are the tests' own (the VM carries
//! no nginx; `adoption` and `restart` are the nginx variants, host tier).

use std::{
    fs::File,
    net::{TcpListener, TcpStream},
};

use anyhow::{Context as _, bail};
use connscope_tests::{
    Agent, Scrape,
    continuity::{
        BpfFs, Restarted, SHORT, Stop, WAIT, assert_nothing_lost, assert_opened_before_the_agent,
        both_closed, cleanup, restart_with, scrape_after_restart,
    },
    http_server, kernel_test, net, own_process_label,
};

/// Requests made before the agent starts, and after.
const BEFORE: u64 = 5;
const AFTER: u64 = 20;
const SERVER_THREAD: &str = "cs-http-server";
/// Long enough for a connection's records to be in the ring buffer after its last call.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(300);

/// A connection with `BEFORE` requests made before the agent starts (the listener, server
/// and client socket made by `setup`), then `AFTER` requests and the client's close.
fn opened_before_the_agent(
    setup: impl FnOnce() -> anyhow::Result<(
        String,
        std::thread::JoinHandle<anyhow::Result<()>>,
        TcpStream,
    )>,
) -> anyhow::Result<()> {
    let (server, server_thread, mut client) = setup()?;
    let agent = Agent::start(&[])?;
    for _ in 0..AFTER {
        http_server::request(&mut client, "1.1", "")?;
    }
    drop(client);
    net::join(server_thread)?;
    let scrape = agent.scrape_until(WAIT, both_closed(&server))?;
    assert_opened_before_the_agent(&scrape, &server, &own_process_label(), SERVER_THREAD, AFTER);
    for reason in ["process_vanished", "unreadable", "unparsable", "backend"] {
        let labels = [("reason", reason)];
        let series = scrape.matching("connscope_adoption_skipped_total", &labels).count();
        assert_eq!(series, 1, "{reason}");
    }
    Ok(())
}

/// Listener on `address`, its one-connection server and a client with `BEFORE` requests.
fn server_and_client(
    address: &str,
) -> anyhow::Result<(String, std::thread::JoinHandle<anyhow::Result<()>>, TcpStream)> {
    let listener = TcpListener::bind(address)?;
    let server = listener.local_addr()?.to_string();
    let thread = http_server::serve(listener, 1, http_server::ServerBehaviour::default());
    let mut client = TcpStream::connect(&server)?;
    for _ in 0..BEFORE {
        http_server::request(&mut client, "1.1", "")?;
    }
    Ok((server, thread, client))
}

kernel_test!(
    fn connection_opened_before_the_agent_is_adopted() -> anyhow::Result<()> {
        opened_before_the_agent(|| server_and_client("127.0.0.81:0"))
    }
);

kernel_test!(
    fn connection_in_a_network_namespace_opened_before_the_agent_is_adopted() -> anyhow::Result<()>
    {
        let ns = net::NetNs::create("adoption")?;
        let _holder = net::NamespaceHolder::start(&ns)?;
        // The listener, its server thread and the client socket all live in the namespace;
        // the sockets stay there after the thread that made them returns.
        opened_before_the_agent(|| ns.run(|| server_and_client("127.0.0.78:0"))?)
    }
);

kernel_test!(
    /// A server blocked in its receive across a whole takeover (the second agent's attach, and
    /// the first's links removed a second later): fexit and kretprobe programs do not run for
    /// that call, and the request it returns is still counted, from the socket's stream
    /// position at the server's next call. Exact on every backend.
    fn a_receive_blocked_across_a_takeover_is_counted() -> anyhow::Result<()> {
        const REQUESTS: u64 = 4;
        let fs = BpfFs::mount("blocked")?;
        let listener = TcpListener::bind("127.0.0.83:0")?;
        let server = listener.local_addr()?.to_string();
        let server_thread =
            http_server::serve(listener, 1, http_server::ServerBehaviour::default());
        let first = fs.agent()?;
        let mut client = TcpStream::connect(&server)?;
        http_server::request(&mut client, "1.1", "")?;
        // The server now waits for the next request.
        let (first_last, code) = first.stop_scraping()?;
        anyhow::ensure!(code == Some(0), "the first agent exited with {code:?}");
        let second = fs.agent()?;
        assert_eq!(fs.link_generations_settled(), vec!["2".to_owned()]);
        for _ in 1..REQUESTS {
            http_server::request(&mut client, "1.1", "")?;
        }
        drop(client);
        net::join(server_thread)?;
        let scrape = second.scrape_until(WAIT, |s| {
            s.sum("connscope_connections_closed_total", &[("server", &server)]) >= 2.0
        })?;
        for role in ["client", "server"] {
            let labels = [("role", role), ("server", server.as_str())];
            // The second agent's counters go on from the first's.
            let before = first_last.sum("connscope_http_requests_total", &labels);
            let requests = scrape.sum("connscope_http_requests_total", &labels);
            assert_eq!(requests, REQUESTS as f64, "{role}: {}", scrape.text);
            assert!((1.0..=requests).contains(&before), "{role}: {}", first_last.text);
            let per_connection = scrape.sum("connscope_connection_requests_sum", &labels);
            assert_eq!(per_connection, REQUESTS as f64, "{role}: {}", scrape.text);
        }
        Ok(())
    }
);

/// Restart under traffic against the tests' own server, on `address`, the first agent
/// ending as `stop` says; the client's counts are the truth. The second agent's last
/// scrape.
fn against_own_server(tag: &str, address: &str, stop: Stop) -> anyhow::Result<Scrape> {
    let fs = BpfFs::mount(tag)?;
    let listener = TcpListener::bind(address)?;
    let server = listener.local_addr()?.to_string();
    let server_thread =
        http_server::serve(listener, SHORT + 1, http_server::ServerBehaviour::default());
    let Restarted { second, first_last, pooled_requests } = restart_with(&fs, &server, stop)?;
    net::join(server_thread)?;
    let scrape = scrape_after_restart(&second, &server)?;
    assert_nothing_lost(&scrape, &first_last, &server, pooled_requests);
    assert_eq!(fs.link_generations_settled(), vec!["2".to_owned()]);
    Ok(scrape)
}

kernel_test!(
    fn restart_under_traffic_loses_nothing() -> anyhow::Result<()> {
        against_own_server("restart-own", "127.0.0.82:0", Stop::Graceful).map(drop)
    }
);

kernel_test!(
    /// The same, the first agent killed with SIGKILL right after a scrape: no handover is
    /// written, and the second recovers from the first's checkpoint (its last base, the
    /// journal of the records it consumed since, then the ring buffer after them). Every
    /// request is counted once and no counter goes back.
    fn a_crash_under_traffic_loses_nothing() -> anyhow::Result<()> {
        let scrape = against_own_server("crash-own", "127.0.0.83:0", Stop::Crash)?;
        assert_eq!(scrape.sum("connscope_checkpoint_covered", &[]), 1.0, "{}", scrape.text);
        Ok(())
    }
);

/// Opens the pinned map `name` of the agent pinned under `fs`.
fn pinned_map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    fs: &BpfFs,
    name: &str,
) -> anyhow::Result<T> {
    let path = fs.mount.join("connscope/maps").join(name);
    let data = aya::maps::MapData::from_pin(&path).with_context(|| format!("{path:?}"))?;
    Ok(T::try_from(aya::maps::Map::from_map_data(data)?)?)
}

kernel_test!(
    /// What a kill in the middle of a base leaves: the slot being written has entries and
    /// even its header, but the commit word still names the other slot, which is used
    /// unchanged. A word naming a slot whose header is another base's (torn) is refused.
    fn a_torn_checkpoint_slot_falls_back_to_the_last_complete_one() -> anyhow::Result<()> {
        use aya::maps::{Array, HashMap};
        use connscope::pipeline::checkpoint::{CheckpointMaps, recover};
        use connscope_common::{
            CheckpointSlot, Handover, PinSlot,
            checkpoint::{Commit, connection_key},
        };

        let fs = BpfFs::mount("torn")?;
        let agent = fs.agent()?;
        let listener = TcpListener::bind("127.0.0.84:0")?;
        let server = listener.local_addr()?.to_string();
        let server_thread =
            http_server::serve(listener, 2, http_server::ServerBehaviour::default());
        let mut clients = vec![TcpStream::connect(&server)?, TcpStream::connect(&server)?];
        for client in &mut clients {
            http_server::request(client, "1.1", "")?;
        }
        let requests = |s: &Scrape| s.sum("connscope_http_requests_total", &[("server", &server)]);
        agent.scrape_until(WAIT, |s| requests(s) >= 4.0)?;
        let (_, signal) = agent.kill_after_scrape()?;
        assert_eq!(signal, Some(libc::SIGKILL));

        let maps = CheckpointMaps::open(&fs.mount.join("connscope"))?;
        let complete = recover(&maps).context("no checkpoint after the kill")?;
        // The base came at start; the connections and requests since are in the journal.
        assert!(!complete.journal.is_empty());
        let mut pin_state: Array<_, u64> = pinned_map(&fs, "PIN_STATE")?;
        let word = pin_state.get(&(PinSlot::Checkpoint as u32), 0)?;
        let commit = Commit::decode(word).context("no commit word")?;
        let other = 1 - commit.slot;

        // A base being written into the other slot when the kill came.
        let mut conns: HashMap<_, u64, Handover> = pinned_map(&fs, "CHECKPOINT_CONNS")?;
        for sock in 1..=3u64 {
            conns.insert(
                connection_key(0xffff_8880_0000_0000 + sock * 64, other),
                Handover::zeroed(),
                0,
            )?;
        }
        let mut slots: Array<_, CheckpointSlot> = pinned_map(&fs, "CHECKPOINT")?;
        let torn = CheckpointSlot {
            seq: u64::from(commit.seq) + 1,
            connections: 3,
            ..CheckpointSlot::default()
        };
        slots.set(other, torn, 0)?;
        let again = recover(&maps).context("the complete slot was not used")?;
        assert_eq!(again.connections.len(), complete.connections.len());
        assert_eq!(again.journal, complete.journal);
        assert_eq!(again.resume_pos, complete.resume_pos);
        assert_eq!(again.metrics_text, complete.metrics_text);

        // A word naming a slot that holds another base: not used.
        let wrong = Commit { slot: other, seq: commit.seq + 2, journal_bytes: 0 };
        pin_state.set(PinSlot::Checkpoint as u32, wrong.encode(), 0)?;
        assert!(recover(&maps).is_none());
        drop(clients);
        net::join(server_thread)?;
        Ok(())
    }
);

kernel_test!(
    fn a_stopped_agent_leaves_its_state_pinned_and_cleanup_removes_it() -> anyhow::Result<()> {
        let fs = BpfFs::mount("cleanup")?;
        let (code, _) = fs.agent()?.stop()?;
        assert_eq!(code, Some(0));
        let maps = [
            "CARRIED_METRICS",
            "CHECKPOINT",
            "CHECKPOINT_CONNS",
            "CHECKPOINT_METRICS",
            "CONNECTS_IN_FLIGHT",
            "CONNS",
            "EVENTS",
            "H2_CONNS",
            "HANDOVER",
            "JOURNAL",
            "LISTEN_PORTS",
            "LOST",
            "PIN_STATE",
            "SETTINGS",
            "TLS_CALLS",
            "TLS_SOCKETS",
        ];
        assert_eq!(fs.pinned("maps"), maps.map(String::from).to_vec());
        // One generation of links, one per attached program.
        assert_eq!(fs.pinned("links"), vec!["1".to_owned()]);
        assert!(fs.pinned("links/1").iter().any(|p| p.contains("inet_sock_set_state")));
        // And the libssl uprobes' (the VMs carry no libssl): five entries, and returns for
        // the two reads and the handshake (writes have none).
        if std::path::Path::new("/lib/x86_64-linux-gnu/libssl.so.3").exists() {
            assert_eq!(fs.pinned("links/1/tls").len(), 8, "{:?}", fs.pinned("links/1/tls"));
        }

        let said = cleanup(&fs.pin_path())?;
        assert!(said.contains("removed"), "{said}");
        assert!(!fs.mount.join("connscope").exists());
        // Nothing of connscope is left in the file system, and cleanup is idempotent.
        let left: Vec<_> = std::fs::read_dir(&fs.mount)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| !name.ends_with(".debug"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        assert!(cleanup(&fs.pin_path())?.contains("nothing pinned"));
        Ok(())
    }
);

kernel_test!(
    /// A host with nothing mounted on `/sys/fs/bpf` (a fresh machine without systemd): the
    /// agent, a plain root process, mounts a BPF filesystem there, says so once, and pins
    /// its state in it at the default pin path.
    fn an_agent_mounts_a_bpf_filesystem_where_none_is() -> anyhow::Result<()> {
        let log_path = std::env::temp_dir().join(format!("connscope-bpffs-{}", std::process::id()));
        let log = File::create(&log_path)?;
        let extra = ["--bpf.pin-path", "/sys/fs/bpf/connscope", "--log.level", "info"];
        let agent = Agent::start_without_bpf_fs(&extra, Some(&log))?;
        let mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", agent.pid()))?;
        let bpf_fs =
            mounts.lines().filter(|l| l.contains(" /sys/fs/bpf ") && l.contains(" - bpf "));
        assert_eq!(bpf_fs.count(), 1, "{mounts}");
        // The agent's mount namespace, seen through its root.
        let pinned =
            std::path::PathBuf::from(format!("/proc/{}/root/sys/fs/bpf/connscope", agent.pid()));
        assert!(pinned.join("maps/CONNS").exists() && pinned.join("links/1").is_dir());
        let (code, _) = agent.stop()?;
        assert_eq!(code, Some(0));
        let logged = std::fs::read_to_string(&log_path)?;
        let _ = std::fs::remove_file(&log_path);
        let said = "mounted a BPF filesystem on /sys/fs/bpf (none was mounted)";
        assert_eq!(logged.matches(said).count(), 1, "{logged}");
        assert!(logged.contains("kernel state pinned in /sys/fs/bpf/connscope"), "{logged}");

        // What the deployments run on the host first: `connscope mount-bpffs`, twice.
        let script = "umount /sys/fs/bpf 2>/dev/null; \"$0\" mount-bpffs && \"$0\" mount-bpffs \
                      && grep -c ' /sys/fs/bpf bpf ' /proc/self/mounts";
        let output = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", script])
            .arg(connscope_tests::agent_binary())
            .output()?;
        let (out, err) =
            (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "{out}{err}");
        assert_eq!(out.trim(), "1", "{err}");
        assert_eq!(err.matches("mounted a BPF filesystem on /sys/fs/bpf").count(), 1, "{err}");
        assert_eq!(err.matches("a BPF filesystem is on /sys/fs/bpf already").count(), 1, "{err}");
        Ok(())
    }
);

kernel_test!(
    /// A second agent started on the same pinned state while the first still runs (a
    /// force-deleted pod's replacement) waits for the first to exit, then takes it over:
    /// the first counts on undisturbed, and no request is lost or counted twice.
    fn a_second_agent_waits_for_the_running_owner_of_the_pinned_state() -> anyhow::Result<()> {
        const EACH: u64 = 5;
        let fs = BpfFs::mount("owner")?;
        let listener = TcpListener::bind("127.0.0.84:0")?;
        let server = listener.local_addr()?.to_string();
        let server_thread =
            http_server::serve(listener, 1, http_server::ServerBehaviour::default());
        let first = fs.agent()?;
        let mut client = TcpStream::connect(&server)?;
        let requests = |client: &mut TcpStream| -> anyhow::Result<()> {
            for _ in 0..EACH {
                http_server::request(client, "1.1", "")?;
            }
            Ok(())
        };
        requests(&mut client)?;

        let log_path = std::env::temp_dir().join(format!("connscope-owner-{}", std::process::id()));
        let log = File::create(&log_path)?;
        let pin_path = fs.pin_path();
        let second = std::thread::spawn(move || {
            Agent::start_logging(&["--bpf.pin-path", &pin_path, "--log.level", "info"], Some(&log))
        });
        let waiting = "waiting for it to exit";
        let deadline = std::time::Instant::now() + WAIT * connscope_tests::wait_scale();
        while !std::fs::read_to_string(&log_path)?.contains(waiting) {
            anyhow::ensure!(std::time::Instant::now() < deadline, "the second agent never waited");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // The first still counts while the second waits.
        requests(&mut client)?;
        let labels = [("role", "server"), ("server", server.as_str())];
        let counted = |s: &Scrape| s.sum("connscope_http_requests_total", &labels);
        let scrape = first.scrape_until(WAIT, |s| counted(s) >= (2 * EACH) as f64)?;
        assert_eq!(counted(&scrape), (2 * EACH) as f64, "{}", scrape.text);
        let (_, code) = first.stop_scraping()?;
        assert_eq!(code, Some(0));
        let second =
            second.join().map_err(|_| anyhow::anyhow!("the second agent's start panicked"))??;
        requests(&mut client)?;
        drop(client);
        net::join(server_thread)?;

        let scrape = second.scrape_until(WAIT, |s| {
            ["client", "server"].iter().all(|role| {
                let labels = [("role", *role), ("server", server.as_str())];
                s.sum("connscope_connection_requests_count", &labels) >= 1.0
            })
        })?;
        for role in ["client", "server"] {
            let labels = [("role", role), ("server", server.as_str())];
            let per_connection = scrape.sum("connscope_connection_requests_sum", &labels);
            assert_eq!(per_connection, (3 * EACH) as f64, "{role}: {}", scrape.text);
            let requests = scrape.sum("connscope_http_requests_total", &labels);
            assert_eq!(requests, (3 * EACH) as f64, "{role}: {}", scrape.text);
        }
        let logged = std::fs::read_to_string(&log_path)?;
        let _ = std::fs::remove_file(&log_path);
        let took_over = logged.find("taking the pinned state over").context("no takeover line")?;
        let pinned = logged.find("kernel state pinned in").context("never pinned")?;
        assert!(logged.find(waiting) < Some(took_over) && took_over < pinned, "{logged}");
        Ok(())
    }
);

kernel_test!(
    /// An agent stopped for good (a deleted DaemonSet, no `connscope cleanup`) leaves its
    /// programs attached for a successor. Once its heartbeat is older than a successor may
    /// take over after (ten minutes, which the agent writes into the pinned state: here
    /// shortened to 200 ms there), the next connection on the host turns them off, and they
    /// send nothing more. The next agent replaces the orphaned state and counts afresh.
    fn pinned_programs_turn_themselves_off_once_their_agent_is_gone_for_good() -> anyhow::Result<()>
    {
        use aya::maps::Array;
        use connscope::{model::clock::monotonic_ns, pipeline::ring_reader::RingReader};
        use connscope_common::{
            PinSlot,
            kernel_config::{ORPHANED_GENERATION, PINNED_STATE_MAX_AGE_NS},
        };
        const SHORTENED_NS: u64 = 200_000_000;

        const REQUESTS: u64 = 3;
        let fs = BpfFs::mount("orphan")?;
        let (code, _) = fs.agent()?.stop()?;
        assert_eq!(code, Some(0));
        let mut pin_state: Array<_, u64> = pinned_map(&fs, "PIN_STATE")?;
        let heartbeat = pin_state.get(&(PinSlot::Heartbeat as u32), 0)?;
        assert!(heartbeat > 0 && heartbeat <= monotonic_ns());
        let limit = pin_state.get(&(PinSlot::OrphanAfterNs as u32), 0)?;
        assert_eq!(limit, PINNED_STATE_MAX_AGE_NS);
        let events = fs.mount.join("connscope/maps/EVENTS");
        let mut ring = RingReader::new(aya::maps::MapData::from_pin(&events)?)?;
        let mut records_waiting = || {
            let mut records = 0;
            while ring.next_record().is_some() {
                records += 1;
            }
            records
        };
        let listener = TcpListener::bind("127.0.0.86:0")?;
        let server = listener.local_addr()?.to_string();
        let server_thread =
            http_server::serve(listener, 3, http_server::ServerBehaviour::default());
        let connection = |requests: u64| -> anyhow::Result<()> {
            let mut client = TcpStream::connect(&server)?;
            for _ in 0..requests {
                http_server::request(&mut client, "1.1", "")?;
            }
            Ok(())
        };

        // A fresh heartbeat: the stopped agent's programs go on counting for a successor.
        records_waiting();
        connection(1)?;
        std::thread::sleep(SETTLE);
        assert!(records_waiting() > 0, "the pinned programs sent nothing for a successor");

        // The age limit shortened, and the heartbeat older than it (the stopped agent writes
        // none): the next connection turns the programs off.
        pin_state.set(PinSlot::OrphanAfterNs as u32, SHORTENED_NS, 0)?;
        std::thread::sleep(std::time::Duration::from_nanos(2 * SHORTENED_NS));
        assert!(monotonic_ns() - heartbeat > SHORTENED_NS);
        connection(0)?;
        std::thread::sleep(SETTLE);
        let active = pin_state.get(&(PinSlot::ActiveGeneration as u32), 0)?;
        assert_eq!(active, ORPHANED_GENERATION);
        records_waiting();
        connection(REQUESTS)?;
        std::thread::sleep(SETTLE);
        assert_eq!(records_waiting(), 0, "orphaned programs still sent records");
        net::join(server_thread)?;

        // The next agent replaces the orphaned state (generation 1 again) and counts afresh.
        let log_path =
            std::env::temp_dir().join(format!("connscope-orphan-{}", std::process::id()));
        let log = File::create(&log_path)?;
        let extra = ["--bpf.pin-path", &fs.pin_path(), "--log.level", "info"];
        let agent = Agent::start_logging(&extra, Some(&log))?;
        let logged = std::fs::read_to_string(&log_path)?;
        let _ = std::fs::remove_file(&log_path);
        assert!(
            logged.contains("replacing the pinned state") && logged.contains("orphaned"),
            "{logged}"
        );
        assert_eq!(fs.pinned("links"), vec!["1".to_owned()]);
        let listener = TcpListener::bind("127.0.0.86:0")?;
        let server = listener.local_addr()?.to_string();
        let server_thread =
            http_server::serve(listener, 1, http_server::ServerBehaviour::default());
        let mut client = TcpStream::connect(&server)?;
        for _ in 0..REQUESTS {
            http_server::request(&mut client, "1.1", "")?;
        }
        drop(client);
        net::join(server_thread)?;
        let scrape = agent.scrape_until(WAIT, both_closed(&server))?;
        for role in ["client", "server"] {
            let labels = [("role", role), ("server", server.as_str())];
            assert_eq!(scrape.sum("connscope_connections_opened_total", &labels), 1.0, "{role}");
            let requests = scrape.sum("connscope_http_requests_total", &labels);
            assert_eq!(requests, REQUESTS as f64, "{role}: {}", scrape.text);
        }
        Ok(())
    }
);

/// `BPF_MAP_CREATE` a hash map with the given value size and `BPF_OBJ_PIN` it at `path`:
/// what an older build with another `Conn` would have left.
fn pin_hash_map(path: &str, key_size: u32, value_size: u32) -> anyhow::Result<()> {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        rest: [u8; 112],
    }
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        rest: [u8; 112],
    }
    const BPF_MAP_CREATE: i64 = 0;
    const BPF_OBJ_PIN: i64 = 6;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    let create = MapCreate {
        map_type: BPF_MAP_TYPE_HASH,
        key_size,
        value_size,
        max_entries: 16,
        rest: [0; 112],
    };
    // SAFETY: the bpf syscall with a zero-padded attribute of the size passed.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, &create, size_of::<MapCreate>() as u32)
    };
    if fd < 0 {
        bail!("BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    }
    let path = std::ffi::CString::new(path)?;
    let pin =
        ObjPin { pathname: path.as_ptr() as u64, bpf_fd: fd as u32, file_flags: 0, rest: [0; 112] };
    // SAFETY: as above; `path` outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, &pin, size_of::<ObjPin>() as u32) };
    // SAFETY: closing the fd we created; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
    if rc != 0 {
        bail!("BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

kernel_test!(
    fn pinned_state_of_another_layout_is_replaced_with_one_log_line() -> anyhow::Result<()> {
        let fs = BpfFs::mount("stale")?;
        std::fs::create_dir_all(fs.mount.join("connscope/maps"))?;
        pin_hash_map(&fs.mount.join("connscope/maps/CONNS").to_string_lossy(), 8, 4)?;
        let log_path = fs.mount.with_extension("log");
        let log = File::create(&log_path)?;
        let agent = Agent::start_logging(&["--bpf.pin-path", &fs.pin_path()], Some(&log))?;

        // The replaced state counts: one connection, both ends.
        let listener = TcpListener::bind("127.0.0.80:0")?;
        let server = listener.local_addr()?.to_string();
        let acceptor = net::drain_server(listener, 1, "cs-acceptor");
        let mut client = TcpStream::connect(&server)?;
        std::io::Write::write_all(&mut client, b"x")?;
        drop(client);
        net::join(acceptor)?;
        let closes =
            |s: &Scrape| s.sum("connscope_connections_closed_total", &[("server", &server)]);
        let closed = closes(&agent.scrape_until(WAIT, |s| closes(s) >= 2.0)?);
        agent.stop()?;
        let text = std::fs::read_to_string(&log_path).context("reading the agent's log")?;
        let _ = std::fs::remove_file(&log_path);
        assert_eq!(closed, 2.0, "{text}");
        let replaced: Vec<&str> = text.lines().filter(|l| l.contains("pinned state")).collect();
        assert_eq!(replaced.len(), 1, "{text}");
        assert!(replaced[0].contains("CONNS"), "{text}");
        assert!(!text.contains("ERROR"), "{text}");
        assert_eq!(fs.pinned("links"), vec!["1".to_owned()]);
        Ok(())
    }
);
