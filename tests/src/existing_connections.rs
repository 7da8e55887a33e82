//! Many loopback connections established before an agent starts, for the adoption test
//! and bench: the accepted ends live in a `python3` process of their own (one process's
//! file descriptor limit cannot hold both ends), the client ends in this one.

use std::{
    io::{BufRead as _, BufReader, Lines, Write as _},
    net::TcpStream,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use anyhow::Context as _;

/// Accepts `argv[1]` connections on `argv[2]`, then reads one byte from each on request.
const HOLDER: &str = r#"
import socket, sys
listener = socket.socket()
listener.bind((sys.argv[2], 0))
listener.listen(4096)
print(listener.getsockname()[1], flush=True)
accepted = [listener.accept()[0] for _ in range(int(sys.argv[1]))]
print("accepted", flush=True)
sys.stdin.readline()
for conn in accepted:
    conn.recv(1)
print("read", flush=True)
sys.stdin.readline()
"#;

/// Established connections to a `python3` server (its `comm` is `python3`); closed when
/// dropped.
pub struct ExistingConnections {
    holder: Child,
    to_holder: ChildStdin,
    from_holder: Lines<BufReader<ChildStdout>>,
    clients: Vec<TcpStream>,
    /// The server end, `ip:port`.
    pub server: String,
}

impl ExistingConnections {
    /// Opens `count` connections to a server on `ip` and waits until all are accepted.
    pub fn open(count: usize, ip: &str) -> anyhow::Result<Self> {
        let mut holder = Command::new("python3")
            .args(["-c", HOLDER, &count.to_string(), ip])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting python3")?;
        let (Some(to_holder), Some(from_holder)) = (holder.stdin.take(), holder.stdout.take())
        else {
            anyhow::bail!("no pipes to the holder");
        };
        let mut this = Self {
            holder,
            to_holder,
            from_holder: BufReader::new(from_holder).lines(),
            clients: Vec::with_capacity(count),
            server: String::new(),
        };
        this.server = format!("{ip}:{}", this.next_line()?);
        for _ in 0..count {
            this.clients.push(TcpStream::connect(&this.server)?);
        }
        anyhow::ensure!(this.next_line()? == "accepted", "the holder did not accept");
        Ok(this)
    }

    fn next_line(&mut self) -> anyhow::Result<String> {
        Ok(self.from_holder.next().transpose()?.unwrap_or_default())
    }

    /// Each client sends one byte and the server end reads it: the first send and receive
    /// of both ends since the connections were opened.
    pub fn first_exchange(&mut self) -> anyhow::Result<()> {
        for client in &mut self.clients {
            client.write_all(b"x")?;
        }
        writeln!(self.to_holder)?;
        anyhow::ensure!(self.next_line()? == "read", "the holder did not read");
        Ok(())
    }
}

impl Drop for ExistingConnections {
    fn drop(&mut self) {
        self.clients.clear();
        let _ = writeln!(self.to_holder);
        let _ = self.holder.wait();
    }
}
