//! Agent restarts with pinned kernel state (`--bpf.pin-path`): the programs keep counting
//! while no agent runs, the next agent takes over, `connscope cleanup` removes everything,
//! and pinned state of another layout is replaced. Each test pins in a BPF filesystem
//! mounted for it alone (unmounting it detaches whatever a failed test left attached).
//!
//! Host tier only (not `kernel_*`, so not in `cargo xtask vm-test`): they drive nginx and
//! thousands of sockets, which the VM's initramfs does not carry.

use std::{
    fs::File,
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use connscope_tests::{
    Agent, Scrape, agent_binary, free_port, http_get, http_server, kernel_tests_enabled, net,
    nginx::{Nginx, NginxConfig},
};

const WAIT: Duration = Duration::from_secs(5);

/// A private BPF filesystem, unmounted on drop.
struct BpfFs {
    mount: PathBuf,
}

impl BpfFs {
    fn mount(tag: &str) -> anyhow::Result<Self> {
        let mount =
            std::env::temp_dir().join(format!("connscope-bpffs-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&mount)?;
        net::run("mount", &["-t", "bpf", "bpf", &mount.to_string_lossy()])?;
        Ok(Self { mount })
    }

    fn pin_path(&self) -> String {
        self.mount.join("connscope").to_string_lossy().into_owned()
    }

    fn agent(&self) -> anyhow::Result<Agent> {
        Agent::start(&["--bpf.pin-path", &self.pin_path()])
    }

    fn pinned(&self, under: &str) -> Vec<String> {
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

fn cleanup(pin_path: &str) -> anyhow::Result<String> {
    let out =
        Command::new(agent_binary()).args(["cleanup", "--bpf.pin-path", pin_path]).output()?;
    if !out.status.success() {
        bail!("connscope cleanup failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_stopped_agent_leaves_its_state_pinned_and_cleanup_removes_it() -> anyhow::Result<()> {
    if !kernel_tests_enabled("a_stopped_agent_leaves_its_state_pinned_and_cleanup_removes_it") {
        return Ok(());
    }
    let fs = BpfFs::mount("cleanup")?;
    let (code, _) = fs.agent()?.stop()?;
    assert_eq!(code, Some(0));
    let maps = [
        "CONNECTS_IN_FLIGHT",
        "CONNS",
        "EVENTS",
        "HANDOVER",
        "LISTEN_PORTS",
        "LOST",
        "PIN_STATE",
        "SETTINGS",
    ];
    assert_eq!(fs.pinned("maps"), maps.map(String::from).to_vec());
    // One generation of links, one per attached program.
    assert_eq!(fs.pinned("links"), vec!["1".to_owned()]);
    assert!(fs.pinned("links/1").iter().any(|p| p.contains("inet_sock_set_state")));

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

/// The agent with its log in a file, for tests that read what it logged.
fn logged_agent(pin_path: &str, log: &File) -> anyhow::Result<(Child, SocketAddr)> {
    let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let child = Command::new(agent_binary())
        .args(["--web.listen-address", &address.to_string(), "--bpf.pin-path", pin_path])
        .env("CONNSCOPE_LOG_LEVEL", "warn")
        .stdin(Stdio::null())
        .stderr(log.try_clone()?)
        .stdout(log.try_clone()?)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(http_get(address, "/readyz"), Ok((200, _))) {
        if Instant::now() > deadline {
            bail!("connscope not ready");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((child, address))
}

#[test]
fn pinned_state_of_another_layout_is_replaced_with_one_log_line() -> anyhow::Result<()> {
    if !kernel_tests_enabled("pinned_state_of_another_layout_is_replaced_with_one_log_line") {
        return Ok(());
    }
    let fs = BpfFs::mount("stale")?;
    std::fs::create_dir_all(fs.mount.join("connscope/maps"))?;
    pin_hash_map(&fs.mount.join("connscope/maps/CONNS").to_string_lossy(), 8, 4)?;
    let log_path = fs.mount.with_extension("log");
    let log = File::create(&log_path)?;
    let (mut child, address) = logged_agent(&fs.pin_path(), &log)?;

    // The replaced state counts: one connection, both ends.
    let listener = std::net::TcpListener::bind("127.0.0.80:0")?;
    let server = listener.local_addr()?.to_string();
    let acceptor = net::drain_server(listener, 1, "cs-acceptor");
    let mut client = TcpStream::connect(&server)?;
    std::io::Write::write_all(&mut client, b"x")?;
    drop(client);
    net::join(acceptor)?;
    let deadline = Instant::now() + WAIT;
    let closed = loop {
        let (_, body) = http_get(address, "/metrics")?;
        let scrape = Scrape::parse(&body)?;
        let closed = scrape.sum("connscope_connections_closed_total", &[("server", &server)]);
        if closed >= 2.0 || Instant::now() > deadline {
            break closed;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait()?;
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

fn requests_per_connection(scrape: &Scrape, role: &str, server: &str) -> (f64, f64) {
    let labels = [("role", role), ("server", server)];
    (
        scrape.sum("connscope_connection_requests_count", &labels),
        scrape.sum("connscope_connection_requests_sum", &labels),
    )
}

/// Restart under traffic: a pooled connection sends a request every 20 ms across an agent
/// restart, and 5 short connections of 3 requests each open and close while no agent runs.
/// The second agent reports all of them in full, equal to nginx's own counts.
#[test]
fn restart_under_traffic_loses_no_connection_and_no_request() -> anyhow::Result<()> {
    if !kernel_tests_enabled("restart_under_traffic_loses_no_connection_and_no_request") {
        return Ok(());
    }
    let fs = BpfFs::mount("restart")?;
    let nginx = Nginx::start(NginxConfig {
        port: free_port(),
        keepalive_timeout: Duration::from_secs(60),
        keepalive_requests: 100_000,
        workers: 1,
        advertise_keep_alive: false,
    })?;
    std::fs::write(nginx.dir.join("html/resource"), "ok")?;
    let server = nginx.server();
    let first = fs.agent()?;

    let stop = Arc::new(AtomicBool::new(false));
    let pooled = {
        let (server, stop) = (server.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut client = TcpStream::connect(&server)?;
            let mut requests = 0u64;
            // Bounded: the test stops it within seconds; 30 s at most.
            while !stop.load(Ordering::Relaxed) && requests < 1500 {
                http_server::request(&mut client, "1.1", "")?;
                requests += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            anyhow::Ok(requests)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    first.stop()?;

    const SHORT: usize = 5;
    const REQUESTS: u64 = 3;
    for _ in 0..SHORT {
        let mut client = TcpStream::connect(&server)?;
        for _ in 0..REQUESTS {
            http_server::request(&mut client, "1.1", "")?;
        }
    }
    std::thread::sleep(Duration::from_millis(200));

    let second = fs.agent()?;
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let pooled_requests =
        pooled.join().map_err(|_| anyhow::anyhow!("pooled client panicked"))??;
    let closed = (SHORT + 1) as f64;
    let scrape = second.scrape_until(WAIT, |s| {
        requests_per_connection(s, "server", &server).0 >= closed
            && requests_per_connection(s, "client", &server).0 >= closed
    })?;

    let mut truth: Vec<u64> = nginx.requests_per_connection()?.into_values().collect();
    truth.sort_unstable();
    let mut expected = vec![REQUESTS; SHORT];
    expected.push(pooled_requests);
    expected.sort_unstable();
    assert_eq!(truth, expected, "nginx's $connection_requests");
    let all = (closed, (SHORT as u64 * REQUESTS + pooled_requests) as f64);
    for role in ["client", "server"] {
        let labels = [("role", role), ("server", server.as_str())];
        assert_eq!(requests_per_connection(&scrape, role, &server), all, "{role}: {}", scrape.text);
        // The pooled connection was opened under the first agent: the second counts only
        // the short ones as opened, and adopts none.
        assert_eq!(scrape.sum("connscope_connections_opened_total", &labels), SHORT as f64);
        assert_eq!(scrape.sum("connscope_connections_adopted_total", &labels), 0.0);
        assert_eq!(scrape.sum("connscope_connections_closed_total", &labels), closed);
    }
    assert_eq!(fs.pinned("links"), vec!["2".to_owned()]);
    eprintln!(
        "restart under traffic: {pooled_requests} pooled requests and {SHORT} short connections, 0 lost"
    );
    Ok(())
}
