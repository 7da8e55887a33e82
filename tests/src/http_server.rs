//! A small HTTP/1.x server and client for kernel tests, with the keep-alive behaviours a
//! test needs to control exactly: idle timeout, a request limit advertised in `Keep-Alive`,
//! `Connection: close`, HTTP/1.0.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, bail};

#[derive(Clone, Copy, Debug, Default)]
pub struct ServerBehaviour {
    /// Close a connection that stays idle this long after a response.
    pub idle_timeout: Option<Duration>,
    /// Serve at most this many requests per connection, advertising the requests left in
    /// `Keep-Alive: max=` and ending with `Connection: close`.
    pub max_requests: Option<u32>,
}

/// Serves `connections` connections on `listener` (one thread each), then returns.
pub fn serve(
    listener: TcpListener,
    connections: usize,
    behaviour: ServerBehaviour,
) -> JoinHandle<anyhow::Result<()>> {
    let spawn = thread::Builder::new().name("cs-http-server".into());
    let handle = spawn.spawn(move || {
        let mut workers = Vec::new();
        for _ in 0..connections {
            let (stream, _) = listener.accept()?;
            let worker = thread::Builder::new()
                .name("cs-http-server".into())
                .spawn(move || handle(stream, behaviour))?;
            workers.push(worker);
        }
        for worker in workers {
            worker.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
        }
        Ok(())
    });
    handle.unwrap_or_else(|err| panic!("cannot spawn the server thread: {err}"))
}

fn handle(mut stream: TcpStream, behaviour: ServerBehaviour) -> anyhow::Result<()> {
    stream.set_read_timeout(behaviour.idle_timeout)?;
    let mut served = 0u32;
    loop {
        let head = match read_head(&mut stream) {
            Ok(Some(head)) => head,
            // Peer closed, or our idle timeout fired: close (this side first, if idle).
            Ok(None) => return Ok(()),
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ok(());
            }
            Err(err) if err.kind() == ErrorKind::ConnectionReset => return Ok(()),
            Err(err) => return Err(err.into()),
        };
        served += 1;
        let lower = head.to_ascii_lowercase();
        let http10 = lower.contains(" http/1.0\r\n");
        let asks_close = lower.contains("\r\nconnection: close");
        let asks_keep_alive = lower.contains("\r\nconnection: keep-alive");
        let left = behaviour.max_requests.map(|max| max.saturating_sub(served));
        let close = asks_close || (http10 && !asks_keep_alive) || left == Some(0);
        let version = if http10 { "1.0" } else { "1.1" };
        let mut response = format!("HTTP/{version} 200 OK\r\nContent-Length: 2\r\n");
        if close {
            response.push_str("Connection: close\r\n");
        } else {
            if http10 {
                response.push_str("Connection: keep-alive\r\n");
            }
            let timeout = behaviour.idle_timeout.map_or(60, |t| t.as_secs().max(1));
            match behaviour.max_requests {
                Some(_) => response.push_str(&format!(
                    "Keep-Alive: timeout={timeout}, max={}\r\n",
                    left.unwrap_or(0)
                )),
                None => response.push_str(&format!("Keep-Alive: timeout={timeout}\r\n")),
            }
        }
        response.push_str("\r\nok");
        stream.write_all(response.as_bytes())?;
        if close {
            return Ok(());
        }
    }
}

/// Reads one request head with buffer-sized reads, as real servers do (the agent captures
/// the head from the first read of a turn). Tests send no bodies.
fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(Some(String::from_utf8_lossy(&head).into_owned()))
}

/// Sends one request and reads its response (this server's responses carry a 2-byte body).
/// Returns whether the server announced it closes the connection.
pub fn request(stream: &mut TcpStream, version: &str, extra_headers: &str) -> anyhow::Result<bool> {
    stream.write_all(
        format!("GET /resource HTTP/{version}\r\nHost: test\r\n{extra_headers}\r\n").as_bytes(),
    )?;
    let mut response = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    // The head and the 2-byte body.
    loop {
        if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n")
            && response.len() >= end + 4 + 2
        {
            break;
        }
        let n = stream.read(&mut buf).context("reading the response")?;
        if n == 0 {
            bail!("connection closed before the response");
        }
        response.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&response).to_ascii_lowercase().contains("connection: close"))
}
