//! HTTP/1.x heads, parsed with `httparse` from the first bytes of a turn.
//!
//! Only what the metrics need is kept: the version, the `Connection` tokens, the
//! `Keep-Alive` parameters, and how many complete request heads a turn carried (pipelining).
//! Methods, paths, other headers and bodies are never stored, logged or exported.

use connscope_common::HEAD_LEN;

use crate::model::http_version::Version;

/// The version of an `httparse` head from its minor version (`HTTP/1.<minor>`).
fn version_of(minor: u8) -> Version {
    if minor == 0 { Version::Http10 } else { Version::Http11 }
}

/// Tokens of the `Connection` header that matter for persistence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionHeader {
    pub close: bool,
    pub keep_alive: bool,
}

/// `Keep-Alive: timeout=N, max=M` parameters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeepAlive {
    pub timeout_seconds: Option<u32>,
    pub max_requests: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub version: Version,
    pub connection: ConnectionHeader,
    pub keep_alive: KeepAlive,
    /// Complete heads found back to back (pipelined requests without bodies); at least 1.
    pub count: u32,
}

impl Head {
    /// Whether this side asks for the connection to stay open after this exchange
    /// (HTTP/1.1: unless `close`; HTTP/1.0: only with `keep-alive`).
    pub fn wants_persistence(&self) -> bool {
        match self.version {
            Version::Http11 => !self.connection.close,
            Version::Http10 => self.connection.keep_alive && !self.connection.close,
        }
    }
}

const MAX_HEADERS: usize = 32;
/// Pipelined heads counted in one captured buffer at most.
const MAX_PIPELINED: u32 = 64;

/// Parses a request head (client send, server receive). `None` if it is not HTTP/1.x.
pub fn parse_request(bytes: &[u8]) -> Option<Head> {
    parse(bytes, |buf| {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let status = request.parse(buf).ok()?;
        let version = version_of(request.version?);
        // A method is a token but not every token is a method: keep to the registered ones
        // so binary protocols that happen to look like a request line are not counted.
        if !is_known_method(request.method?) {
            return None;
        }
        Some((status, version, summarise(request.headers)))
    })
}

/// Parses a response head (client receive, server send). `None` if it is not HTTP/1.x.
pub fn parse_response(bytes: &[u8]) -> Option<Head> {
    parse(bytes, |buf| {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let status = response.parse(buf).ok()?;
        let version = version_of(response.version?);
        response.code?;
        Some((status, version, summarise(response.headers)))
    })
}

type Parsed = (httparse::Status<usize>, Version, (ConnectionHeader, KeepAlive));

fn parse(bytes: &[u8], parse_one: impl Fn(&[u8]) -> Option<Parsed>) -> Option<Head> {
    let (status, version, (connection, keep_alive)) = match parse_one(bytes)? {
        (httparse::Status::Partial, ..) => {
            // The capture ended inside the head: parse the complete lines seen so far. The
            // result stays Partial: its length is that of the completed copy, not of `bytes`.
            let mut completed = [0; HEAD_LEN + 2];
            let (_, version, fields) = parse_one(complete_lines(bytes, &mut completed)?)?;
            (httparse::Status::Partial, version, fields)
        }
        complete => complete,
    };
    let mut count = 1;
    if let httparse::Status::Complete(mut offset) = status {
        // Pipelined heads right after this one (a body in between ends the count).
        while count < MAX_PIPELINED {
            match bytes.get(offset..).and_then(&parse_one) {
                Some((httparse::Status::Complete(len), ..)) => {
                    offset += len;
                    count += 1;
                }
                _ => break,
            }
        }
    }
    Some(Head { version, connection, keep_alive, count })
}

/// The captured bytes (at most a kernel capture, [`HEAD_LEN`]) up to the last complete
/// line, terminated as a complete head in `out`; `None` when not even the start line is
/// complete.
fn complete_lines<'a>(bytes: &[u8], out: &'a mut [u8; HEAD_LEN + 2]) -> Option<&'a [u8]> {
    let captured = &bytes[..bytes.len().min(HEAD_LEN)];
    let end = captured.windows(2).rposition(|w| w == b"\r\n")? + 2;
    out[..end].copy_from_slice(&captured[..end]);
    out[end..end + 2].copy_from_slice(b"\r\n");
    Some(&out[..end + 2])
}

fn is_known_method(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE" | "PATCH"
    )
}

fn summarise(headers: &[httparse::Header<'_>]) -> (ConnectionHeader, KeepAlive) {
    let mut connection = ConnectionHeader::default();
    let mut keep_alive = KeepAlive::default();
    for header in headers {
        if header.name.eq_ignore_ascii_case("connection") {
            for token in header.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                connection.close |= token.eq_ignore_ascii_case(b"close");
                connection.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if header.name.eq_ignore_ascii_case("keep-alive") {
            keep_alive = parse_keep_alive(header.value);
        }
    }
    (connection, keep_alive)
}

/// `timeout=5, max=1000`; values that are not plain non-negative integers are ignored.
fn parse_keep_alive(value: &[u8]) -> KeepAlive {
    let mut keep_alive = KeepAlive::default();
    for param in value.split(|&b| b == b',') {
        let Some((name, number)) = std::str::from_utf8(param).ok().and_then(|p| p.split_once('='))
        else {
            continue;
        };
        let number = number.trim();
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(number) = number.parse::<u32>() else { continue };
        match name.trim().to_ascii_lowercase().as_str() {
            "timeout" => keep_alive.timeout_seconds = Some(number),
            "max" => keep_alive.max_requests = Some(number),
            _ => {}
        }
    }
    keep_alive
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn http11_request_defaults_to_keep_alive() {
        let head = parse_request(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n").expect("not parsed");
        assert_eq!(head.version, Version::Http11);
        assert!(head.wants_persistence());
        assert_eq!(head.count, 1);
    }

    #[test]
    fn connection_close_and_http10() {
        let close = parse_request(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n");
        assert_eq!(close.map(|h| h.wants_persistence()), Some(false));
        let old = parse_request(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n");
        assert_eq!(old.map(|h| (h.version, h.wants_persistence())), Some((Version::Http10, false)));
        let old_ka = parse_request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert_eq!(old_ka.map(|h| h.wants_persistence()), Some(true));
        let tokens = parse_request(b"GET / HTTP/1.1\r\nConnection: Upgrade, close\r\n\r\n");
        assert_eq!(tokens.map(|h| h.connection.close), Some(true));
    }

    #[test]
    fn response_keep_alive_parameters() {
        let head = parse_response(
            b"HTTP/1.1 200 OK\r\nServer: nginx\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5, max=100\r\n\r\nbody",
        );
        let head = head.expect("not parsed");
        assert_eq!(
            head.keep_alive,
            KeepAlive { timeout_seconds: Some(5), max_requests: Some(100) }
        );
        assert!(head.wants_persistence());
    }

    #[test]
    fn hostile_keep_alive_values_are_ignored() {
        for value in ["timeout=-1", "timeout=abc, max=", "timeout=99999999999", "max=1e3", "=5"] {
            let raw = format!("HTTP/1.1 200 OK\r\nKeep-Alive: {value}\r\n\r\n");
            let head = parse_response(raw.as_bytes()).expect("not parsed");
            assert_eq!(head.keep_alive, KeepAlive::default(), "{value}");
        }
    }

    #[test]
    fn partial_head_uses_complete_lines() {
        let head = parse_response(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Ty");
        assert_eq!(head.map(|h| h.connection.close), Some(true));
        assert_eq!(parse_request(b"GET /very/long/pa"), None);
    }

    #[test]
    fn a_partial_head_longer_than_a_capture_is_read_up_to_one() {
        let mut raw = b"HTTP/1.1 200 OK\r\nConnection: close\r\n".to_vec();
        raw.resize(HEAD_LEN + 100, b'x');
        let head = parse_response(&raw);
        assert_eq!(head.map(|h| h.connection.close), Some(true));
    }

    #[test]
    fn head_split_after_the_request_line_does_not_panic() {
        // Found by fuzzing: the completed copy is longer than the capture.
        let head = parse_request(b"GET / HTTP/1.1\r\n");
        assert_eq!(head.map(|h| (h.version, h.count)), Some((Version::Http11, 1)));
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\n").map(|h| h.count), Some(1));
    }

    #[test]
    fn pipelined_requests_are_counted() {
        let head = parse_request(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\nGET /c HTTP/1.1\r\n\r\n");
        assert_eq!(head.map(|h| h.count), Some(3));
    }

    #[test]
    fn non_http_is_rejected() {
        assert_eq!(parse_request(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"), None);
        assert_eq!(parse_request(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), None);
        assert_eq!(parse_request(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), None);
        assert_eq!(parse_request(b"FROB / HTTP/1.1\r\n\r\n"), None);
        assert_eq!(parse_response(b"+OK\r\n"), None);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_request(&bytes);
            let _ = parse_response(&bytes);
        }

        #[test]
        fn arbitrary_header_values_never_panic(value in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut raw = b"HTTP/1.1 200 OK\r\nKeep-Alive: ".to_vec();
            raw.extend(value.iter().filter(|&&b| b != b'\r' && b != b'\n'));
            raw.extend_from_slice(b"\r\nConnection: x\r\n\r\n");
            let _ = parse_response(&raw);
        }
    }
}
