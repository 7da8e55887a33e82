//! A raw HTTP/1.1 server for the framing tests. It reads request bodies (`Content-Length`
//! or chunked, answering `Expect: 100-continue` first) with small reads, and answers the way
//! a test asks: `103 Early Hints` before the response, a body written in pieces, a chunked
//! body, or `101 Switching Protocols` followed by an echo of whatever the peer sends.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, bail};

/// How the server answers each request.
#[derive(Clone, Copy, Debug)]
pub enum Reply {
    /// `200` with a 2-byte body, in one write.
    Plain,
    /// `103 Early Hints`, then the `200`: in one write, or two writes a moment apart.
    EarlyHints { one_write: bool },
    /// `200` whose head and `Content-Length` body go out in `pieces` writes.
    Pieces(usize),
    /// `200` with a chunked body of `chunks` chunks, one write each, then the last chunk.
    Chunked(usize),
    /// `101 Switching Protocols`, then every read is echoed back until the peer closes.
    Upgrade,
}

/// Pause between the writes of one response, so they leave as separate segments.
const PIECE_GAP: Duration = Duration::from_millis(2);
/// Reads are this small so a body arrives in many of them.
const READ_SIZE: usize = 4096;

/// Serves `connections` connections one after the other; returns how many request heads
/// it answered (the ground truth a test compares with).
pub fn serve(
    listener: TcpListener,
    connections: usize,
    reply: Reply,
) -> JoinHandle<anyhow::Result<u64>> {
    let spawned = thread::Builder::new().name("cs-framing".into()).spawn(move || {
        let mut requests = 0;
        for _ in 0..connections {
            let (stream, _) = listener.accept()?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            requests += HttpStream::new(stream).serve(reply)?;
        }
        Ok(requests)
    });
    spawned.unwrap_or_else(|err| panic!("cannot spawn the server thread: {err}"))
}

/// One end of an HTTP/1.1 connection that reads messages with small reads.
pub struct HttpStream {
    pub stream: TcpStream,
    /// Bytes read but not consumed yet (pipelined messages, the start of a body).
    buffered: Vec<u8>,
}

impl HttpStream {
    pub fn new(stream: TcpStream) -> Self {
        Self { stream, buffered: Vec::new() }
    }

    /// Reads the next message, head and body; returns its head (`None`: the peer closed
    /// between messages).
    pub fn read_message(&mut self) -> anyhow::Result<Option<String>> {
        let Some(head) = self.read_head()? else { return Ok(None) };
        self.skip_body(&head)?;
        Ok(Some(head))
    }

    /// Skips the body `head` announces (`Content-Length` or chunked).
    fn skip_body(&mut self, head: &str) -> anyhow::Result<()> {
        let lower = head.to_ascii_lowercase();
        if lower.contains("\r\ntransfer-encoding: chunked") {
            self.skip_chunked_body()
        } else {
            self.skip(content_length(&lower).unwrap_or(0))
        }
    }

    fn serve(&mut self, reply: Reply) -> anyhow::Result<u64> {
        let mut requests = 0;
        while let Some(head) = self.read_head()? {
            requests += 1;
            if head.to_ascii_lowercase().contains("\r\nexpect: 100-continue") {
                self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            }
            self.skip_body(&head)?;
            self.reply(reply)?;
            if matches!(reply, Reply::Upgrade) {
                self.echo()?;
                break;
            }
        }
        Ok(requests)
    }

    /// Reads more bytes into the buffer; false at end of stream.
    fn fill(&mut self) -> anyhow::Result<bool> {
        let mut chunk = [0u8; READ_SIZE];
        let n = self.stream.read(&mut chunk).context("reading the request")?;
        self.buffered.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// The next request head; `None` when the peer closed between requests.
    fn read_head(&mut self) -> anyhow::Result<Option<String>> {
        loop {
            if let Some(end) = find(&self.buffered, b"\r\n\r\n") {
                let head: Vec<u8> = self.buffered.drain(..end + 4).collect();
                return Ok(Some(String::from_utf8_lossy(&head).into_owned()));
            }
            if !self.fill()? {
                if self.buffered.is_empty() {
                    return Ok(None);
                }
                bail!("connection closed inside a request head");
            }
        }
    }

    fn line(&mut self) -> anyhow::Result<String> {
        loop {
            if let Some(end) = find(&self.buffered, b"\r\n") {
                let line: Vec<u8> = self.buffered.drain(..end + 2).collect();
                return Ok(String::from_utf8_lossy(&line[..end]).into_owned());
            }
            if !self.fill()? {
                bail!("connection closed inside a chunked body");
            }
        }
    }

    fn skip(&mut self, mut length: usize) -> anyhow::Result<()> {
        loop {
            let taken = length.min(self.buffered.len());
            self.buffered.drain(..taken);
            length -= taken;
            if length == 0 {
                return Ok(());
            }
            if !self.fill()? {
                bail!("connection closed inside a request body");
            }
        }
    }

    fn skip_chunked_body(&mut self) -> anyhow::Result<()> {
        loop {
            let size_line = self.line()?;
            let size = size_line.split(';').next().unwrap_or_default().trim();
            let size =
                usize::from_str_radix(size, 16).with_context(|| format!("chunk size {size:?}"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !self.line()?.is_empty() {}
                return Ok(());
            }
            self.skip(size + 2)?;
        }
    }

    fn write_pieces(&mut self, pieces: &[&[u8]]) -> anyhow::Result<()> {
        for (index, piece) in pieces.iter().enumerate() {
            if index > 0 {
                thread::sleep(PIECE_GAP);
            }
            self.stream.write_all(piece)?;
        }
        Ok(())
    }

    fn reply(&mut self, reply: Reply) -> anyhow::Result<()> {
        const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        const HINTS: &[u8] = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n";
        match reply {
            Reply::Plain => self.write_pieces(&[OK]),
            Reply::EarlyHints { one_write: true } => self.write_pieces(&[&[HINTS, OK].concat()]),
            Reply::EarlyHints { one_write: false } => self.write_pieces(&[HINTS, OK]),
            Reply::Pieces(pieces) => {
                let body = vec![b'p'; 1000 * pieces];
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                let mut all: Vec<&[u8]> = vec![head.as_bytes()];
                all.extend(body.chunks(1000));
                self.write_pieces(&all)
            }
            Reply::Chunked(chunks) => {
                let head: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
                let chunk: &[u8] = b"100\r\n";
                let data = [vec![b'c'; 0x100], b"\r\n".to_vec()].concat();
                let one = [chunk, &data].concat();
                let mut all: Vec<&[u8]> = vec![head];
                all.extend(std::iter::repeat_n(one.as_slice(), chunks));
                all.push(b"0\r\n\r\n");
                self.write_pieces(&all)
            }
            Reply::Upgrade => self.write_pieces(&[
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
            ]),
        }
    }

    /// After an upgrade: echoes every read until the peer closes.
    fn echo(&mut self) -> anyhow::Result<()> {
        if !self.buffered.is_empty() {
            let early = std::mem::take(&mut self.buffered);
            self.stream.write_all(&early)?;
        }
        let mut chunk = [0u8; READ_SIZE];
        loop {
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            self.stream.write_all(&chunk[..n])?;
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

fn content_length(lower_head: &str) -> Option<usize> {
    lower_head
        .split("\r\n")
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
}
