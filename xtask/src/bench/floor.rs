//! The floor arm: the agent binary's hidden `connscope bench-floor`, which attaches the same
//! tracepoints (tp_btf sock_send_length, sock_recv_length, inet_sock_set_state,
//! tcp_destroy_sock) with programs that only look the socket up and add its bytes. It prints
//! a line containing `floor attached` on stderr once attached and runs until SIGTERM. What an
//! observer of these hooks cannot avoid paying; connscope is compared with it.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};

const READY_LINE: &str = "floor attached";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running floor; stopped with SIGTERM by [`Floor::stop`] or when dropped.
pub struct Floor {
    child: Child,
    stderr: Option<thread::JoinHandle<Vec<String>>>,
}

impl Floor {
    pub fn start() -> anyhow::Result<Self> {
        let mut child = Command::new(connscope_tests::agent_binary())
            .arg("bench-floor")
            // Nothing may stay attached after the arm: no pinning.
            .env("CONNSCOPE_BPF_PIN_PATH", "")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting connscope bench-floor")?;
        let stderr = child.stderr.take().context("bench-floor stderr")?;
        let (ready_tx, ready_rx) = mpsc::channel();
        // Reads stderr to the end (so the pipe never fills) and keeps it for error messages.
        let reader = thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains(READY_LINE) {
                    let _ = ready_tx.send(());
                }
                lines.push(line);
            }
            lines
        });
        let mut floor = Self { child, stderr: Some(reader) };
        if ready_rx.recv_timeout(READY_TIMEOUT).is_err() {
            let status = floor.child.try_wait()?;
            let _ = floor.terminate();
            let said = floor.stderr.take().and_then(|r| r.join().ok()).unwrap_or_default();
            bail!(
                "`connscope bench-floor` did not print `{READY_LINE}` within {} s ({}): {}",
                READY_TIMEOUT.as_secs(),
                status.map_or("still running".to_owned(), |s| s.to_string()),
                said.last().map_or("no output", String::as_str)
            );
        }
        Ok(floor)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        if self.child.try_wait()?.is_none() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        }
        Ok(self.child.wait()?)
    }

    /// SIGTERM, and the floor must exit cleanly.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let status = self.terminate()?;
        ensure!(status.success(), "connscope bench-floor exited with {status}");
        Ok(())
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.terminate();
        if let Some(reader) = self.stderr.take() {
            let _ = reader.join();
        }
    }
}
