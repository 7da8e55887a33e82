//! Network fixtures: network namespaces made by the test, and socket options.

use std::{
    fs::File,
    io::Read as _,
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    process::{Child, Command, Stdio},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// A network namespace created for one test (with loopback up), deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn create(tag: &str) -> anyhow::Result<Self> {
        let name = format!("connscope-{tag}-{}", std::process::id());
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        run("ip", &["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `f` on a new thread that has entered this namespace (setns only moves that
    /// thread, so the rest of the test process stays where it was).
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let file =
            File::open(format!("/run/netns/{}", self.name)).context("opening the namespace")?;
        let handle = std::thread::spawn(move || {
            // SAFETY: valid fd of a network namespace; affects only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(anyhow::anyhow!("setns: {}", std::io::Error::last_os_error()));
            }
            Ok(f())
        });
        handle.join().map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "delete", &self.name]);
    }
}

/// A process that lives in the namespace, as a pod's pause container does: the agent reads
/// the namespace's files (listening ports, `netstat` counters) through it.
pub struct NamespaceHolder(Child);

impl NamespaceHolder {
    pub fn start(ns: &NetNs) -> anyhow::Result<Self> {
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "sleep", "120"])
            .stdin(Stdio::null())
            .spawn()?;
        // Until `sleep` runs inside the namespace.
        let deadline = Instant::now() + Duration::from_secs(10) * crate::wait_scale();
        let holder = Self(child);
        while !holder.in_namespace()? {
            anyhow::ensure!(Instant::now() < deadline, "the namespace holder did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(holder)
    }

    /// The process's id (its `/proc/<pid>/net/` shows the namespace).
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    fn in_namespace(&self) -> anyhow::Result<bool> {
        let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", self.0.id()))?;
        Ok(comm.trim() == "sleep" && ns(&self.0.id().to_string()) != ns("self"))
    }
}

impl Drop for NamespaceHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let status =
        Command::new(program).args(args).status().with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {args:?} failed: {status}");
    }
    Ok(())
}

/// SO_LINGER with a zero timeout: close() then aborts the connection with a reset.
pub fn set_linger_zero(stream: &TcpStream) -> anyhow::Result<()> {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: valid socket fd and a pointer to a properly sized linger struct.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("SO_LINGER: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Accepts `connections` connections and reads each to EOF (the client closes first), on a
/// thread named `name` (the agent labels the accepting side with it).
pub fn drain_server(
    listener: TcpListener,
    connections: usize,
    name: &str,
) -> JoinHandle<anyhow::Result<()>> {
    let spawned = thread::Builder::new().name(name.into()).spawn(move || {
        for _ in 0..connections {
            let (mut stream, _) = listener.accept()?;
            let mut sink = Vec::new();
            stream.read_to_end(&mut sink)?;
        }
        Ok(())
    });
    spawned.unwrap_or_else(|err| panic!("cannot spawn the server thread: {err}"))
}

/// `connections` connections to `listener` that each send `payload` and close first, the
/// server (a thread named `name`) reading each to EOF; returns once the server read them
/// all (each client socket then waits in TIME_WAIT).
pub fn closed_by_client(
    listener: TcpListener,
    connections: usize,
    name: &str,
    payload: &[u8],
) -> anyhow::Result<()> {
    let server = listener.local_addr()?;
    let acceptor = drain_server(listener, connections, name);
    for _ in 0..connections {
        let mut client = TcpStream::connect(server)?;
        std::io::Write::write_all(&mut client, payload)?;
    }
    join(acceptor)
}

/// Joins a server thread, turning its panic into an error.
pub fn join(handle: JoinHandle<anyhow::Result<()>>) -> anyhow::Result<()> {
    handle.join().map_err(|_| anyhow::anyhow!("server thread panicked"))?
}
