//! Exchange counting per protocol against the real kernel and the real agent: HTTP/1.x
//! framings (interim responses, bodies in pieces, chunked, pipelined), WebSocket upgrades,
//! undecrypted TLS 1.2 and 1.3 (nginx `ssl`, curl, Python), HTTP/2 in cleartext, and
//! hostile records. Counts are exact against the traffic each test made or nginx's log.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::Context as _;
use connscope_tests::{
    Agent, Scrape,
    framing_server::{self, HttpStream, Reply},
    free_port, kernel_tests_enabled,
    nginx::{Nginx, NginxConfig},
};

const WAIT: Duration = Duration::from_secs(10);
const ROLES: [&str; 2] = ["client", "server"];
/// Every value the `protocol` label may take.
const PROTOCOLS: [&str; 5] = ["http1", "http2", "tls", "websocket", "other"];
const REQUEST_BUCKETS: [f64; 11] =
    [1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

fn bind_loopback() -> anyhow::Result<(TcpListener, String)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let server = listener.local_addr()?.to_string();
    Ok((listener, server))
}

/// Runs a program to success; returns its stdout and stderr.
fn run(program: &str, args: &[&str]) -> anyhow::Result<(String, String)> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    anyhow::ensure!(output.status.success(), "{program} {args:?}: {}: {stderr}", output.status);
    Ok((String::from_utf8_lossy(&output.stdout).into_owned(), stderr))
}

fn closes(scrape: &Scrape, server: &str) -> f64 {
    scrape.sum("connscope_connections_closed_total", &[("server", server)])
}

/// Waits until both ends of `connections` connections to `server` were closed.
fn scrape_closed(agent: &Agent, server: &str, connections: f64) -> anyhow::Result<Scrape> {
    agent.scrape_until(WAIT, |s| closes(s, server) >= 2.0 * connections)
}

fn side<'a>(server: &'a str, role: &'a str) -> [(&'a str, &'a str); 2] {
    [("server", server), ("role", role)]
}

/// Per role: connections observed in `connscope_connection_requests`, the requests they
/// carried, HTTP requests and idle gaps.
fn assert_counts(
    scrape: &Scrape,
    server: &str,
    protocol: &str,
    connections: f64,
    requests: f64,
    http_requests: f64,
) {
    for role in ROLES {
        let labels = side(server, role);
        let with_protocol = [labels[0], labels[1], ("protocol", protocol)];
        let observed = scrape.sum("connscope_connection_requests_count", &labels);
        assert_eq!(
            scrape.sum("connscope_connection_requests_count", &with_protocol),
            connections,
            "{role}: connections with protocol {protocol} (all protocols: {observed}): {}",
            scrape.text
        );
        assert_eq!(observed, connections, "{role}: connections of other protocols");
        assert_eq!(
            scrape.sum("connscope_connection_requests_sum", &with_protocol),
            requests,
            "{role}: requests per connection: {}",
            scrape.text
        );
        assert_eq!(
            scrape.sum("connscope_http_requests_total", &labels),
            http_requests,
            "{role}: HTTP requests"
        );
        assert_eq!(
            scrape.sum("connscope_connection_idle_seconds_count", &labels),
            requests - connections,
            "{role}: idle gaps between requests"
        );
    }
}

/// curl with `-v`: its stderr shows the interim responses it got.
fn curl_verbose(args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["-sS", "-v"];
    all.extend_from_slice(args);
    Ok(run("curl", &all)?.1)
}

fn count_lines(text: &str, prefix: &str) -> usize {
    text.lines().filter(|line| line.starts_with(prefix)).count()
}

fn nginx_config(port: u16, keepalive_requests: u32) -> NginxConfig {
    NginxConfig {
        port,
        keepalive_timeout: Duration::from_secs(30),
        keepalive_requests,
        workers: 1,
        advertise_keep_alive: false,
    }
}

/// `curl --data-binary @file` with a body over 1 MB sends `Expect: 100-continue`; nginx
/// answers `100 Continue`. `/early` (`return 200`) sends the final response before reading
/// the body, `/proxied` reads the whole body first (to pass it upstream). Each POST is one
/// request, on both sides, whichever way.
#[test]
fn expect_100_continue_bodies_are_one_exchange() -> anyhow::Result<()> {
    if !kernel_tests_enabled("expect_100_continue_bodies_are_one_exchange") {
        return Ok(());
    }
    let (early, proxied, upstream) = (free_port(), free_port(), free_port());
    let extra = format!(
        "client_max_body_size 16m;\n\
         server {{ listen 127.0.0.1:{early}; access_log early.log ground_truth;\n\
           location / {{ return 200 \"ok\\n\"; }} }}\n\
         server {{ listen 127.0.0.1:{proxied}; access_log proxied.log ground_truth;\n\
           location / {{ proxy_pass http://127.0.0.1:{upstream}; }} }}\n\
         server {{ listen 127.0.0.1:{upstream}; access_log off; return 200 \"ok\\n\"; }}\n"
    );
    let nginx = Nginx::start_with(nginx_config(free_port(), 100), &extra)?;
    let agent = Agent::start(&[])?;
    let body = nginx.dir.join("body.bin");
    std::fs::write(&body, vec![b'b'; 2 << 20])?;
    let data = format!("@{}", body.display());
    const POSTS: usize = 3;
    for (port, log) in [(early, "early.log"), (proxied, "proxied.log")] {
        let url = format!("http://127.0.0.1:{port}/upload");
        let mut args = vec![];
        for _ in 0..POSTS {
            args.extend(["-o", "/dev/null", "--data-binary", data.as_str(), url.as_str()]);
        }
        let trace = curl_verbose(&args)?;
        assert_eq!(count_lines(&trace, "> Expect: 100-continue"), POSTS, "{trace}");
        assert_eq!(count_lines(&trace, "< HTTP/1.1 100 Continue"), POSTS, "{trace}");
        assert_eq!(count_lines(&trace, "< HTTP/1.1 200"), POSTS, "{trace}");
        let truth = logged_requests(&nginx, log, POSTS)?;
        assert_eq!(truth.values().copied().collect::<Vec<_>>(), [POSTS as u64], "{log}");
        let server = format!("127.0.0.1:{port}");
        let scrape = scrape_closed(&agent, &server, 1.0)?;
        assert_counts(&scrape, &server, "http1", 1.0, POSTS as f64, POSTS as f64);
    }
    Ok(())
}

/// `103 Early Hints` then `200`, written apart or in one write: one request each.
#[test]
fn early_hints_then_final_response_is_one_request() -> anyhow::Result<()> {
    if !kernel_tests_enabled("early_hints_then_final_response_is_one_request") {
        return Ok(());
    }
    let agent = Agent::start(&[])?;
    for one_write in [false, true] {
        let (listener, server) = bind_loopback()?;
        let serving = framing_server::serve(listener, 1, Reply::EarlyHints { one_write });
        let url = format!("http://{server}/page");
        let trace = curl_verbose(&["-o", "/dev/null", "-o", "/dev/null", &url, &url])?;
        assert_eq!(count_lines(&trace, "< HTTP/1.1 103 Early Hints"), 2, "{trace}");
        let served = join(serving)?;
        assert_eq!(served, 2);
        let scrape = scrape_closed(&agent, &server, 1.0)?;
        assert_counts(&scrape, &server, "http1", 1.0, 2.0, 2.0);
    }
    Ok(())
}

/// Request bodies in many writes (with `Content-Length` and chunked), responses in many
/// writes (plain and chunked): each request counts once. Pipelined requests in one write
/// count each.
#[test]
fn bodies_in_pieces_chunked_and_pipelined_requests() -> anyhow::Result<()> {
    if !kernel_tests_enabled("bodies_in_pieces_chunked_and_pipelined_requests") {
        return Ok(());
    }
    let agent = Agent::start(&[])?;
    const REQUESTS: usize = 3;
    const PIECES: usize = 8;
    let piece = [b'q'; 1000];

    // Content-Length bodies in PIECES writes, answered in PIECES writes.
    let (listener, server) = bind_loopback()?;
    let serving = framing_server::serve(listener, 1, Reply::Pieces(PIECES));
    let mut client = HttpStream::new(TcpStream::connect(&server)?);
    for _ in 0..REQUESTS {
        let head = format!(
            "POST /in-pieces HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
            piece.len() * PIECES
        );
        client.stream.write_all(head.as_bytes())?;
        for _ in 0..PIECES {
            thread::sleep(Duration::from_millis(2));
            client.stream.write_all(&piece)?;
        }
        read_response(&mut client)?;
    }
    drop(client);
    assert_eq!(join(serving)?, REQUESTS as u64);
    let scrape = scrape_closed(&agent, &server, 1.0)?;
    assert_counts(&scrape, &server, "http1", 1.0, REQUESTS as f64, REQUESTS as f64);

    // Chunked request bodies, one chunk per write; chunked responses, one chunk per write.
    let (listener, server) = bind_loopback()?;
    let serving = framing_server::serve(listener, 1, Reply::Chunked(PIECES));
    let mut client = HttpStream::new(TcpStream::connect(&server)?);
    for _ in 0..REQUESTS {
        client.stream.write_all(
            b"POST /chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n",
        )?;
        for _ in 0..PIECES {
            thread::sleep(Duration::from_millis(2));
            client.stream.write_all(&[b"3e8\r\n".as_slice(), &piece, b"\r\n"].concat())?;
        }
        client.stream.write_all(b"0\r\n\r\n")?;
        read_response(&mut client)?;
    }
    drop(client);
    assert_eq!(join(serving)?, REQUESTS as u64);
    let scrape = scrape_closed(&agent, &server, 1.0)?;
    assert_counts(&scrape, &server, "http1", 1.0, REQUESTS as f64, REQUESTS as f64);

    // Pipelining: ROUNDS writes of REQUESTS requests each.
    const ROUNDS: usize = 2;
    let (listener, server) = bind_loopback()?;
    let serving = framing_server::serve(listener, 1, Reply::Plain);
    let mut client = HttpStream::new(TcpStream::connect(&server)?);
    let pipelined = "GET /p HTTP/1.1\r\nHost: t\r\n\r\n".repeat(REQUESTS);
    for _ in 0..ROUNDS {
        client.stream.write_all(pipelined.as_bytes())?;
        for _ in 0..REQUESTS {
            read_response(&mut client)?;
        }
    }
    drop(client);
    let total = (REQUESTS * ROUNDS) as u64;
    assert_eq!(join(serving)?, total);
    let scrape = scrape_closed(&agent, &server, 1.0)?;
    for role in ROLES {
        let labels = side(&server, role);
        assert_eq!(
            scrape.sum("connscope_http_requests_total", &labels),
            total as f64,
            "{role}: {}",
            scrape.text
        );
        assert_eq!(scrape.sum("connscope_connection_requests_sum", &labels), total as f64);
    }
    Ok(())
}

/// An HTTP/1.1 Upgrade answered `101 Switching Protocols`, then 20 WebSocket frames each
/// way and raw request lines: one HTTP request, and the connection is `websocket`.
#[test]
fn websocket_upgrade_ends_http_counting() -> anyhow::Result<()> {
    if !kernel_tests_enabled("websocket_upgrade_ends_http_counting") {
        return Ok(());
    }
    let agent = Agent::start(&[])?;
    let (listener, server) = bind_loopback()?;
    let serving = framing_server::serve(listener, 1, Reply::Upgrade);
    let mut client = TcpStream::connect(&server)?;
    client.set_read_timeout(Some(Duration::from_secs(10)))?;
    client.write_all(
        b"GET /chat HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )?;
    // Read as clients do, into a buffer: the kernel looks for `101` in the first read.
    let mut reader = HttpStream::new(client.try_clone()?);
    let head = reader.read_message()?.context("closed before the 101")?;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    const FRAMES: usize = 20;
    for n in 0..FRAMES {
        // A masked binary frame (RFC 6455 §5.2); the server echoes it.
        let payload = format!("frame {n}");
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut frame = vec![0x82, 0x80 | payload.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(payload.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        echo(&mut client, &frame)?;
    }
    // Garbage after the upgrade that looks like HTTP/1.x requests is not counted either.
    for _ in 0..5 {
        echo(&mut client, b"GET /not-http HTTP/1.1\r\nHost: t\r\n\r\n")?;
    }
    drop((client, reader));
    assert_eq!(join(serving)?, 1);
    let scrape = scrape_closed(&agent, &server, 1.0)?;
    assert_counts(&scrape, &server, "websocket", 1.0, 1.0, 1.0);
    Ok(())
}

/// Undecrypted TLS (nginx `ssl`, self-signed): requests per connection equal nginx's
/// `$connection_requests` on both sides, not the handshake flights nor TLS 1.3's encrypted
/// `close_notify`, for TLS 1.3 and 1.2, with curl (3 URLs) and Python's `http.client`
/// (7 requests with `keepalive_requests 5`: connections of 5 and 2).
#[test]
fn undecrypted_tls_counts_requests_not_handshakes() -> anyhow::Result<()> {
    if !kernel_tests_enabled("undecrypted_tls_counts_requests_not_handshakes") {
        return Ok(());
    }
    let (tls13, tls12) = (free_port(), free_port());
    let cert_dir = std::env::temp_dir().join(format!("connscope-tls-{}", std::process::id()));
    std::fs::create_dir_all(&cert_dir)?;
    let (cert, key) = self_signed_certificate(&cert_dir)?;
    let log_format = "log_format tls '$connection $connection_requests $ssl_protocol';";
    let server = |port: u16, protocols: &str, log: &str| {
        format!(
            "server {{ listen 127.0.0.1:{port} ssl; ssl_protocols {protocols};\n\
               ssl_certificate {cert}; ssl_certificate_key {key};\n\
               access_log {log} tls; root html; }}\n",
            cert = cert.display(),
            key = key.display(),
        )
    };
    let extra = format!(
        "{log_format}\n{}{}",
        server(tls13, "TLSv1.2 TLSv1.3", "tls13.log"),
        server(tls12, "TLSv1.2", "tls12.log")
    );
    let nginx = Nginx::start_with(nginx_config(free_port(), 5), &extra);
    let _ = std::fs::remove_dir_all(&cert_dir);
    let nginx = nginx?;
    let agent = Agent::start(&[])?;
    for (port, log, version) in [(tls13, "tls13.log", "TLSv1.3"), (tls12, "tls12.log", "TLSv1.2")] {
        let url = format!("https://127.0.0.1:{port}/index.html");
        let mut args = vec!["-sS", "-k"];
        for _ in 0..3 {
            args.extend(["-o", "/dev/null", url.as_str()]);
        }
        run("curl", &args)?;
        let script = format!(
            "import http.client, ssl\n\
             c = http.client.HTTPSConnection('127.0.0.1', {port}, context=ssl._create_unverified_context())\n\
             for _ in range(7):\n    c.request('GET', '/index.html')\n    c.getresponse().read()\n\
             c.close()\n"
        );
        run("python3", &["-c", &script])?;

        let truth = logged_requests(&nginx, log, 10)?;
        let log_text = std::fs::read_to_string(nginx.dir.join(log))?;
        assert!(
            !log_text.is_empty() && log_text.lines().all(|line| line.ends_with(version)),
            "{log}: not all {version}: {log_text}"
        );
        let mut sizes: Vec<u64> = truth.values().copied().collect();
        sizes.sort();
        assert_eq!(sizes, [2, 3, 5], "{log}");
        let server = format!("127.0.0.1:{port}");
        let scrape = scrape_closed(&agent, &server, 3.0)?;
        assert_counts(&scrape, &server, "tls", 3.0, 10.0, 0.0);
        for role in ROLES {
            assert_eq!(
                distribution(&scrape, &server, role),
                expected_distribution(&truth),
                "{version} {role}: requests per connection"
            );
            assert_eq!(
                scrape.sum("connscope_connections_opened_total", &side(&server, role)),
                3.0,
                "{version} {role}: connections"
            );
        }
        // Close sides agree: whoever sent the first FIN, the other side saw it as the peer.
        let closed = |role: &str, by: &str| {
            scrape.sum(
                "connscope_connections_closed_total",
                &[("server", &server), ("role", role), ("closed_by", by)],
            )
        };
        assert_eq!(closed("server", "local"), closed("client", "peer"), "{}", scrape.text);
        assert_eq!(closed("server", "peer"), closed("client", "local"));
        assert_eq!(closed("server", "unknown") + closed("client", "unknown"), 0.0);
    }
    Ok(())
}

/// HTTP/2 in cleartext (nginx `listen … http2`, curl `--http2-prior-knowledge`): the
/// connection is `http2`, so neither HTTP/1.x requests nor requests per connection are
/// reported for it (streams are not direction changes).
#[test]
fn http2_cleartext_is_not_counted_as_http1() -> anyhow::Result<()> {
    if !kernel_tests_enabled("http2_cleartext_is_not_counted_as_http1") {
        return Ok(());
    }
    let h2c = free_port();
    let extra = format!(
        "server {{ listen 127.0.0.1:{h2c} http2; access_log h2c.log ground_truth;\n\
           root html; }}\n"
    );
    let nginx = Nginx::start_with(nginx_config(free_port(), 100), &extra)?;
    let agent = Agent::start(&[])?;
    let url = format!("http://127.0.0.1:{h2c}/index.html");
    // One stream per connection: curl 7.88 fails reusing a prior-knowledge connection.
    const CONNECTIONS: usize = 3;
    for _ in 0..CONNECTIONS {
        let (version, _) = run(
            "curl",
            &["-sS", "--http2-prior-knowledge", "-w", "%{http_version}", "-o", "/dev/null", &url],
        )?;
        assert_eq!(version, "2", "curl spoke HTTP/2");
    }
    let truth = logged_requests(&nginx, "h2c.log", CONNECTIONS)?;
    assert_eq!(truth.len(), CONNECTIONS, "{truth:?}");
    let server = format!("127.0.0.1:{h2c}");
    let scrape = scrape_closed(&agent, &server, CONNECTIONS as f64)?;
    for role in ROLES {
        let labels = side(&server, role);
        let opened = scrape.sum("connscope_connections_opened_total", &labels);
        assert_eq!(opened, CONNECTIONS as f64, "{role}");
        assert_eq!(scrape.sum("connscope_http_requests_total", &labels), 0.0, "{role}");
        assert_eq!(
            scrape.sum("connscope_connection_requests_count", &labels),
            0.0,
            "{role}: HTTP/2 has no requests-per-connection observation: {}",
            scrape.text
        );
    }
    Ok(())
}

/// Truncated, oversized and alert-shaped TLS records after a ClientHello-like first flight,
/// and garbage answers: exactly the turns that start with application data count, labels
/// stay within the known protocols, and the agent keeps serving.
#[test]
fn hostile_tls_records_are_counted_by_their_headers() -> anyhow::Result<()> {
    if !kernel_tests_enabled("hostile_tls_records_are_counted_by_their_headers") {
        return Ok(());
    }
    let agent = Agent::start(&[])?;
    let (listener, server) = bind_loopback()?;
    let app_data_beyond = [&b"\x17\x03\x03\xff\xff"[..], &[0xab; 50]].concat();
    let alert_sized = [&b"\x17\x03\x03\x00\x13"[..], &[0xcd; 19]].concat();
    let (alert_header, alert_body) = alert_sized.split_at(5);
    let at_once: &[u8] =
        b"\x14\x03\x03\x00\x01\x01\x17\x03\x03\x00\x02\x09\x09\x17\x03\x03\x00\x04\x01\x02\x03\x04";
    // Each turn: the writes the client makes, and whether it carries application data.
    let turns: Vec<(Vec<&[u8]>, bool)> = vec![
        // A ClientHello-like first flight: the connection is TLS.
        (vec![b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x03"], false),
        // Application data whose length runs past the data.
        (vec![&app_data_beyond], true),
        // Shaped like TLS 1.3's encrypted close_notify, whole or header first.
        (vec![&alert_sized], false),
        (vec![alert_header, alert_body], false),
        // ChangeCipherSpec whose length runs past the data; a truncated Finished header.
        (vec![b"\x14\x03\x03\xff\xff"], false),
        (vec![b"\x14\x03\x03\x00\x01\x01\x17\x03"], false),
        // CCS, Finished and application data read at once.
        (vec![at_once], true),
        // A TLS 1.2 alert, one byte of application data, bytes that are no record.
        (vec![b"\x15\x03\x03\x00\x02\x01\x00"], false),
        (vec![b"\x17"], true),
        (vec![&[0xff; 3000]], false),
    ];
    let expected = turns.iter().filter(|(_, request)| *request).count() as f64;
    let sizes: Vec<usize> =
        turns.iter().map(|(writes, _)| writes.iter().map(|w| w.len()).sum()).collect();
    let serving = thread::spawn(move || {
        let (mut stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        for size in sizes {
            let mut turn = vec![0u8; size];
            stream.read_exact(&mut turn)?;
            stream.write_all(b"\x17\x03\x03\x00\x04\xde\xad\xbe\xef")?;
        }
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest)?;
        anyhow::Ok(())
    });
    let mut client = TcpStream::connect(&server)?;
    client.set_read_timeout(Some(Duration::from_secs(10)))?;
    for (writes, _) in &turns {
        for (index, write) in writes.iter().enumerate() {
            if index > 0 {
                // The peer may still read both writes at once: either way the same count.
                thread::sleep(Duration::from_millis(20));
            }
            client.write_all(write)?;
        }
        let mut reply = [0u8; 9];
        client.read_exact(&mut reply)?;
    }
    drop(client);
    serving.join().map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    let scrape = scrape_closed(&agent, &server, 1.0)?;
    assert_counts(&scrape, &server, "tls", 1.0, expected, 0.0);
    for protocol in scrape.label_values("connscope_connection_requests_count", "protocol") {
        assert!(PROTOCOLS.contains(&protocol.as_str()), "unknown protocol label {protocol}");
    }
    assert_eq!(agent.get("/healthz")?.0, 200);
    Ok(())
}

/// nginx's requests per connection from `log`, once it holds `requests` requests (nginx
/// logs a request when it is done with it, which may be after the client has finished:
/// a body it answered early is still read and discarded).
fn logged_requests(
    nginx: &Nginx,
    log: &str,
    requests: usize,
) -> anyhow::Result<BTreeMap<u64, u64>> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let truth = nginx.requests_per_connection_in(log)?;
        if truth.values().sum::<u64>() >= requests as u64 || std::time::Instant::now() > deadline {
            return Ok(truth);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn self_signed_certificate(dir: &Path) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &key.to_string_lossy(),
            "-out",
            &cert.to_string_lossy(),
        ],
    )
    .context("openssl makes the test's self-signed certificate")?;
    Ok((cert, key))
}

/// Reads one `200` response (with a length or a chunked body) from the framing server.
fn read_response(client: &mut HttpStream) -> anyhow::Result<()> {
    let head = client.read_message()?.context("closed before the response")?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200 "), "unexpected response {head}");
    Ok(())
}

/// Writes `bytes` and reads as many back (the server echoes).
fn echo(stream: &mut TcpStream, bytes: &[u8]) -> anyhow::Result<()> {
    stream.write_all(bytes)?;
    let mut back = vec![0u8; bytes.len()];
    stream.read_exact(&mut back)?;
    anyhow::ensure!(back == bytes, "echo differs");
    Ok(())
}

fn join(handle: thread::JoinHandle<anyhow::Result<u64>>) -> anyhow::Result<u64> {
    handle.join().map_err(|_| anyhow::anyhow!("server thread panicked"))?
}

fn bucket_label(bound: f64) -> String {
    format!("{bound:.1}")
}

/// Cumulative bucket counts of connscope's requests-per-connection histogram.
fn distribution(scrape: &Scrape, server: &str, role: &str) -> Vec<(String, f64)> {
    REQUEST_BUCKETS
        .iter()
        .map(|&bound| {
            let le = bucket_label(bound);
            let labels = [("server", server), ("role", role), ("le", le.as_str())];
            (le.clone(), scrape.sum("connscope_connection_requests_bucket", &labels))
        })
        .collect()
}

/// The same buckets from nginx's log.
fn expected_distribution(truth: &BTreeMap<u64, u64>) -> Vec<(String, f64)> {
    REQUEST_BUCKETS
        .iter()
        .map(|&bound| {
            let within = truth.values().filter(|&&n| n as f64 <= bound).count();
            (bucket_label(bound), within as f64)
        })
        .collect()
}
