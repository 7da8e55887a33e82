//! Exchange counting per HTTP/1.x framing and for undecrypted TLS records, against the real
//! kernel and the real agent, with raw sockets only (so it also runs in `cargo xtask
//! vm-test`): interim responses, bodies in pieces, chunked, pipelined, a WebSocket upgrade,
//! hostile TLS records, hostile HTTP/2 frames. Counts are exact against the traffic each test made. Real servers
//! and clients (nginx, curl, Python) are in `e2e_protocols`.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    thread,
    time::Duration,
};

use anyhow::Context as _;
use connscope_tests::{
    Agent,
    exchange_counts::{
        PROTOCOLS, ROLES, assert_counts, bind_loopback, join_counted, scrape_closed, side,
    },
    framing_server::{self, HttpStream, Reply},
    http2::{PREFACE, frame_header},
    kernel_test,
};

kernel_test!(
    /// `103 Early Hints` then `200`, written apart or in one write: one request each, and the
    /// next request on the connection counts.
    fn early_hints_then_final_response_is_one_request() -> anyhow::Result<()> {
        let agent = Agent::start(&[])?;
        const REQUESTS: usize = 2;
        for one_write in [false, true] {
            let (listener, server) = bind_loopback()?;
            let serving = framing_server::serve(listener, 1, Reply::EarlyHints { one_write });
            let mut client = HttpStream::new(TcpStream::connect(&server)?);
            for _ in 0..REQUESTS {
                client.stream.write_all(b"GET /page HTTP/1.1\r\nHost: t\r\n\r\n")?;
                let hints = client.read_message()?.context("closed before the 103")?;
                assert!(hints.starts_with("HTTP/1.1 103 "), "{hints}");
                read_response(&mut client)?;
            }
            drop(client);
            assert_eq!(join_counted(serving)?, REQUESTS as u64);
            let scrape = scrape_closed(&agent, &server, 1.0)?;
            let requests = REQUESTS as f64;
            assert_counts(&scrape, &server, "http1", 1.0, requests, requests);
        }
        Ok(())
    }
);

kernel_test!(
    /// Request bodies in many writes (with `Content-Length` and chunked), responses in many
    /// writes (plain and chunked): each request counts once. Pipelined requests in one write
    /// count each.
    fn bodies_in_pieces_chunked_and_pipelined_requests() -> anyhow::Result<()> {
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
        assert_eq!(join_counted(serving)?, REQUESTS as u64);
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
        assert_eq!(join_counted(serving)?, REQUESTS as u64);
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
        assert_eq!(join_counted(serving)?, total);
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
);

kernel_test!(
    /// An HTTP/1.1 Upgrade answered `101 Switching Protocols`, then 20 WebSocket frames each
    /// way and raw request lines: one HTTP request, and the connection is `websocket`.
    fn websocket_upgrade_ends_http_counting() -> anyhow::Result<()> {
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
        assert_eq!(join_counted(serving)?, 1);
        let scrape = scrape_closed(&agent, &server, 1.0)?;
        assert_counts(&scrape, &server, "websocket", 1.0, 1.0, 1.0);
        Ok(())
    }
);

kernel_test!(
    /// Truncated, oversized and alert-shaped TLS records after a ClientHello-like first flight,
    /// and garbage answers: exactly the turns that start with application data count, labels
    /// stay within the known protocols, and the agent keeps serving.
    fn hostile_tls_records_are_counted_by_their_headers() -> anyhow::Result<()> {
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
);

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

kernel_test!(
    /// Hostile HTTP/2 after a real client preface, one connection each: random bytes, and a
    /// `GOAWAY` shorter than its 8 bytes of ids and code, lose the frame sync: counted once
    /// per end in `events_lost_total{reason="http2_unparsed"}` (both ends walk the bytes),
    /// with no stream count; a frame whose length runs past everything sent is passed over
    /// (its stream counted). Labels stay in their sets and the agent keeps serving.
    fn hostile_http2_frames_lose_sync_once_and_are_counted() -> anyhow::Result<()> {
        let agent = Agent::start(&[])?;
        let (listener, server) = bind_loopback()?;
        let settings = frame_header(0, 0x4, 0, 0);
        let headers = [frame_header(1, 0x1, 0x4, 1), vec![0x82]].concat();
        // Random-looking bytes (fixed, so the count is exact): the reserved bit is set.
        let noise: Vec<u8> = (0u8..64).map(|i| i.wrapping_mul(37) | 0x80).collect();
        let flights: Vec<Vec<u8>> = vec![
            [PREFACE, &settings, &noise].concat(),
            [PREFACE, &settings, &headers, &frame_header(0xff_ffff, 0x0, 0, 1), &[0u8; 100]]
                .concat(),
            [PREFACE, &settings, &frame_header(4, 0x7, 0, 0), &[0u8; 4]].concat(),
        ];
        let connections = flights.len();
        let serving = thread::spawn(move || {
            for _ in 0..connections {
                let (mut stream, _) = listener.accept()?;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut all = Vec::new();
                stream.read_to_end(&mut all)?;
            }
            anyhow::Ok(())
        });
        for flight in &flights {
            let mut client = TcpStream::connect(&server)?;
            client.write_all(flight)?;
            thread::sleep(Duration::from_millis(50));
        }
        serving.join().map_err(|_| anyhow::anyhow!("server thread panicked"))??;
        let scrape = scrape_closed(&agent, &server, connections as f64)?;
        let lost = scrape.sum("connscope_events_lost_total", &[("reason", "http2_unparsed")]);
        assert_eq!(lost, 4.0, "two connections, two ends each: {}", scrape.text);
        for role in ROLES {
            let labels = side(&server, role);
            let http2: Vec<(&str, &str)> =
                labels.iter().copied().chain([("protocol", "http2")]).collect();
            let closed = scrape.sum("connscope_connections_closed_total", &http2);
            assert_eq!(closed, connections as f64, "{role}: {}", scrape.text);
            // Only the connection that kept its sync is observed, with its one stream.
            let observed = scrape.sum("connscope_connection_requests_count", &http2);
            assert_eq!(observed, 1.0, "{role}: {}", scrape.text);
            assert_eq!(scrape.sum("connscope_connection_requests_sum", &http2), 1.0, "{role}");
        }
        for protocol in scrape.label_values("connscope_connections_closed_total", "protocol") {
            assert!(PROTOCOLS.contains(&protocol.as_str()), "unknown protocol label {protocol}");
        }
        assert_eq!(agent.get("/healthz")?.0, 200);
        Ok(())
    }
);
