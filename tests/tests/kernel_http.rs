//! HTTP keep-alive behaviour against the real kernel and the real agent: requests per
//! connection, idle gaps, close reasons, races, and protocol-agnostic exchange counting.
//! The gap-timing test holds `serial::exclusive`, the rest `serial::shared`.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    thread,
    time::Duration,
};

use connscope_tests::{
    Agent, Scrape,
    http_server::{self, ServerBehaviour},
    kernel_test,
    net::join,
    serial,
};

const WAIT: Duration = Duration::from_secs(5);

fn listener() -> anyhow::Result<(TcpListener, String)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let server = listener.local_addr()?.to_string();
    Ok((listener, server))
}

fn closes(scrape: &Scrape, server: &str) -> f64 {
    scrape.sum("connscope_connections_closed_total", &[("server", server)])
}

fn closed(scrape: &Scrape, server: &str, role: &str, by: &str, reason: &str) -> f64 {
    scrape.sum(
        "connscope_connections_closed_total",
        &[("server", server), ("role", role), ("closed_by", by), ("reason", reason)],
    )
}

kernel_test!(
    fn requests_per_connection_and_idle_gaps() -> anyhow::Result<()> {
        let _serial = serial::shared();
        let agent = Agent::start(&[])?;
        let (listener, server) = listener()?;
        let serving = http_server::serve(listener, 1, ServerBehaviour::default());
        const K: u32 = 4;
        const GAP: Duration = Duration::from_millis(200);
        let mut client = TcpStream::connect(&server)?;
        for n in 0..K {
            if n > 0 {
                thread::sleep(GAP);
            }
            http_server::request(&mut client, "1.1", "")?;
        }
        drop(client);
        join(serving)?;

        let scrape = agent.scrape_until(WAIT, |s| closes(s, &server) >= 2.0)?;
        for role in ["client", "server"] {
            let labels = [("server", server.as_str()), ("role", role)];
            assert_eq!(
                scrape.sum("connscope_connection_requests_count", &labels),
                1.0,
                "{role}: {}",
                scrape.text
            );
            assert_eq!(
                scrape.sum("connscope_connection_requests_sum", &labels),
                f64::from(K),
                "{role}"
            );
            assert_eq!(
                scrape.sum("connscope_http_requests_total", &labels),
                f64::from(K),
                "{role}"
            );
            assert_eq!(
                scrape.sum("connscope_connection_idle_seconds_count", &labels),
                f64::from(K - 1),
                "{role}"
            );
            let idle = scrape.sum("connscope_connection_idle_seconds_sum", &labels);
            let expected = GAP.as_secs_f64() * f64::from(K - 1);
            assert!(
                (idle - expected).abs() < 0.005 * f64::from(K - 1),
                "{role}: idle {idle} s, slept {expected} s"
            );
        }
        // Client closed first while idle; the server saw its peer close.
        assert_eq!(closed(&scrape, &server, "client", "local", "idle"), 1.0);
        assert_eq!(closed(&scrape, &server, "server", "peer", "idle"), 1.0);
        assert_eq!(
            scrape
                .sum("connscope_http_keepalive_advertised_timeout_seconds", &[("server", &server)]),
            60.0
        );
        Ok(())
    }
);

kernel_test!(
    fn connection_close_request() -> anyhow::Result<()> {
        let _serial = serial::shared();
        let agent = Agent::start(&[])?;
        let (listener, server) = listener()?;
        let serving = http_server::serve(listener, 1, ServerBehaviour::default());
        let mut client = TcpStream::connect(&server)?;
        assert!(http_server::request(&mut client, "1.1", "Connection: close\r\n")?);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest)?;
        drop(client);
        join(serving)?;

        let scrape = agent.scrape_until(WAIT, |s| closes(s, &server) >= 2.0)?;
        assert_eq!(
            closed(&scrape, &server, "server", "local", "connection_close"),
            1.0,
            "{}",
            scrape.text
        );
        assert_eq!(closed(&scrape, &server, "client", "peer", "connection_close"), 1.0);
        Ok(())
    }
);

kernel_test!(
    fn http10_closes_after_each_response() -> anyhow::Result<()> {
        let _serial = serial::shared();
        let agent = Agent::start(&[])?;
        let (listener, server) = listener()?;
        let serving = http_server::serve(listener, 2, ServerBehaviour::default());
        for _ in 0..2 {
            let mut client = TcpStream::connect(&server)?;
            assert!(http_server::request(&mut client, "1.0", "")?);
            let mut rest = Vec::new();
            client.read_to_end(&mut rest)?;
        }
        join(serving)?;

        let scrape = agent.scrape_until(WAIT, |s| closes(s, &server) >= 4.0)?;
        assert_eq!(closed(&scrape, &server, "server", "local", "http10"), 2.0, "{}", scrape.text);
        assert_eq!(closed(&scrape, &server, "client", "peer", "http10"), 2.0);
        assert_eq!(
            scrape.sum(
                "connscope_http_requests_total",
                &[("server", &server), ("role", "client"), ("http_version", "1.0")]
            ),
            2.0
        );
        Ok(())
    }
);

kernel_test!(
    fn server_idle_timeout_and_max_requests() -> anyhow::Result<()> {
        let _serial = serial::shared();
        let agent = Agent::start(&[])?;
        let (listener, server) = listener()?;
        let behaviour = ServerBehaviour {
            idle_timeout: Some(Duration::from_millis(300)),
            max_requests: Some(3),
        };
        let serving = http_server::serve(listener, 2, behaviour);
        // Connection 1: one request, then the server's idle timeout closes it.
        let mut idle = TcpStream::connect(&server)?;
        assert!(!http_server::request(&mut idle, "1.1", "")?);
        let mut rest = Vec::new();
        idle.read_to_end(&mut rest)?;
        drop(idle);
        // Connection 2: three requests, the third answered with max=0 and Connection: close.
        let mut limited = TcpStream::connect(&server)?;
        for n in 1..=3 {
            let closing = http_server::request(&mut limited, "1.1", "")?;
            assert_eq!(closing, n == 3);
        }
        limited.read_to_end(&mut rest)?;
        drop(limited);
        join(serving)?;

        let scrape = agent.scrape_until(WAIT, |s| closes(s, &server) >= 4.0)?;
        assert_eq!(closed(&scrape, &server, "client", "peer", "idle"), 1.0, "{}", scrape.text);
        assert_eq!(closed(&scrape, &server, "server", "local", "idle"), 1.0);
        assert_eq!(closed(&scrape, &server, "client", "peer", "max_requests"), 1.0);
        assert_eq!(closed(&scrape, &server, "server", "local", "max_requests"), 1.0);
        assert_eq!(
            scrape.sum(
                "connscope_connection_requests_sum",
                &[("server", &server), ("role", "client")]
            ),
            4.0
        );
        Ok(())
    }
);

kernel_test!(
    /// A client reuses a connection the server has already closed for idleness: the classic
    /// keep-alive race. The request goes out after the server's FIN and is answered by a reset.
    fn request_on_a_connection_the_server_closed_is_a_race() -> anyhow::Result<()> {
        let _serial = serial::shared();
        let agent = Agent::start(&[])?;
        let (listener, server) = listener()?;
        let behaviour =
            ServerBehaviour { idle_timeout: Some(Duration::from_millis(200)), max_requests: None };
        let serving = http_server::serve(listener, 1, behaviour);
        let mut client = TcpStream::connect(&server)?;
        http_server::request(&mut client, "1.1", "")?;
        // Longer than the server's idle timeout, shorter than a pool's: the FIN has arrived.
        thread::sleep(Duration::from_millis(500));
        client.write_all(b"GET /again HTTP/1.1\r\nHost: test\r\n\r\n")?;
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest);
        drop(client);
        join(serving)?;

        let scrape = agent.scrape_until(WAIT, |s| {
            closes(s, &server) >= 2.0
                && s.sum("connscope_keepalive_races_total", &[("server", &server)]) >= 1.0
        })?;
        assert_eq!(
            scrape
                .sum("connscope_keepalive_races_total", &[("server", &server), ("role", "client")]),
            1.0,
            "{}",
            scrape.text
        );
        // The close itself was the server's idle timeout.
        assert_eq!(closed(&scrape, &server, "client", "peer", "idle"), 1.0);
        assert_eq!(closed(&scrape, &server, "server", "local", "idle"), 1.0);
        Ok(())
    }
);

kernel_test!(
    /// The mirror of the race: the server reads the last request, answers it and closes at
    /// once. On loopback its answer and FIN often arrive before the client's send hook runs
    /// (313 of 2,000 connections here when the state at the send's end decided), and that is
    /// no race: the server had read the request.
    fn request_answered_before_the_servers_fin_is_no_race() -> anyhow::Result<()> {
        let behaviour = ServerBehaviour { idle_timeout: None, max_requests: Some(SHORT_REQUESTS) };
        let (scrape, server) = short_connections(behaviour, true)?;
        assert_closes(&scrape, &server, ("peer", "local"), "max_requests");
        Ok(())
    }
);

kernel_test!(
    /// A client that closes as soon as it has read its last response: on loopback its FIN can
    /// reach the server before the server's send hook ran for that response, and the server
    /// still saw an idle close (the response was acknowledged).
    fn client_closing_right_after_its_response_is_an_idle_close() -> anyhow::Result<()> {
        let (scrape, server) = short_connections(ServerBehaviour::default(), false)?;
        assert_closes(&scrape, &server, ("local", "peer"), "idle");
        Ok(())
    }
);

const SHORT_CONNECTIONS: usize = 2000;
const SHORT_REQUESTS: u32 = 3;

/// `SHORT_CONNECTIONS` connections of `SHORT_REQUESTS` requests each, one after the other,
/// against a server with `behaviour`. The client waits for the server's FIN when
/// `server_closes`, else closes after its last response. Returns the scrape once every
/// close arrived (or the last one), and the server label.
fn short_connections(
    behaviour: ServerBehaviour,
    server_closes: bool,
) -> anyhow::Result<(connscope_tests::Scrape, String)> {
    let _serial = serial::shared();
    let agent = Agent::start(&[])?;
    let (listener, server) = listener()?;
    let serving = http_server::serve(listener, SHORT_CONNECTIONS, behaviour);
    for _ in 0..SHORT_CONNECTIONS {
        let mut client = TcpStream::connect(&server)?;
        for _ in 0..SHORT_REQUESTS {
            http_server::request(&mut client, "1.1", "")?;
        }
        if server_closes {
            let mut rest = Vec::new();
            client.read_to_end(&mut rest)?;
        }
    }
    join(serving)?;
    let all = 2.0 * SHORT_CONNECTIONS as f64;
    let scrape = agent.scrape_until(WAIT, |s| closes(s, &server) >= all)?;
    Ok((scrape, server))
}

/// Every short connection closed by (`client`, `server`) = `by` with `reason`, and no race.
fn assert_closes(scrape: &connscope_tests::Scrape, server: &str, by: (&str, &str), reason: &str) {
    let connections = SHORT_CONNECTIONS as f64;
    let closes: Vec<_> = scrape
        .text
        .lines()
        .filter(|l| l.starts_with("connscope_connections_closed_total"))
        .collect();
    assert_eq!(closed(scrape, server, "client", by.0, reason), connections, "{closes:#?}");
    assert_eq!(closed(scrape, server, "server", by.1, reason), connections, "{closes:#?}");
    assert_eq!(scrape.sum("connscope_keepalive_races_total", &[("server", server)]), 0.0);
}

kernel_test!(
    /// A line protocol (Redis-like PING/PONG): no HTTP, but exchanges are still counted.
    fn non_http_exchanges_are_counted() -> anyhow::Result<()> {
        let _serial = serial::shared();
        let agent = Agent::start(&[])?;
        let (listener, server) = listener()?;
        const EXCHANGES: usize = 5;
        let serving = thread::spawn(move || {
            let (mut stream, _) = listener.accept()?;
            let mut buf = [0u8; 64];
            for _ in 0..EXCHANGES {
                stream.read_exact(&mut buf[..6])?;
                stream.write_all(b"+PONG\r\n")?;
            }
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest)?;
            anyhow::Ok(())
        });
        let mut client = TcpStream::connect(&server)?;
        let mut reply = [0u8; 7];
        for _ in 0..EXCHANGES {
            client.write_all(b"PING\r\n")?;
            client.read_exact(&mut reply)?;
        }
        drop(client);
        join(serving)?;

        let scrape = agent.scrape_until(WAIT, |s| closes(s, &server) >= 2.0)?;
        for role in ["client", "server"] {
            let labels = [("server", server.as_str()), ("role", role)];
            assert_eq!(
                scrape.sum("connscope_connection_requests_sum", &labels),
                EXCHANGES as f64,
                "{role}: {}",
                scrape.text
            );
            assert_eq!(scrape.sum("connscope_http_requests_total", &labels), 0.0, "{role}");
        }
        Ok(())
    }
);

kernel_test!(
    /// Binary garbage and hostile heads never break the agent nor reach labels.
    fn hostile_payloads_are_harmless() -> anyhow::Result<()> {
        let _serial = serial::shared();
        let agent = Agent::start(&[])?;
        let (listener, server) = listener()?;
        const CONNECTIONS: usize = 20;
        let serving = thread::spawn(move || {
            for _ in 0..CONNECTIONS {
                let (mut stream, _) = listener.accept()?;
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf)?;
                stream.write_all(b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=-1, max=\xff\xfe\r\nConnection: \x00close\r\n\r\n")?;
            }
            anyhow::Ok(())
        });
        for i in 0..CONNECTIONS {
            let mut client = TcpStream::connect(&server)?;
            let mut payload =
                format!("M{i}\"{{}}\\ /secret?token=abc HTTP/1.1\r\nHost: h{i}\r\nCookie: s=1\r\n")
                    .into_bytes();
            payload.extend_from_slice(&[0xff, 0x00, 0xc3, 0x28]);
            payload.extend(std::iter::repeat_n(b'A', 3000));
            client.write_all(&payload)?;
            let mut reply = Vec::new();
            let _ = client.read_to_end(&mut reply);
        }
        join(serving)?;

        let scrape =
            agent.scrape_until(WAIT, |s| closes(s, &server) >= 2.0 * CONNECTIONS as f64)?;
        assert_eq!(closes(&scrape, &server), 2.0 * CONNECTIONS as f64);
        for secret in ["secret", "token", "Cookie", "\\xff"] {
            assert!(!scrape.text.contains(secret), "{secret} leaked into /metrics");
        }
        assert_eq!(
            scrape.sum("connscope_http_requests_total", &[("server", &server)]),
            0.0,
            "unknown methods are not HTTP"
        );
        assert_eq!(
            scrape
                .sum("connscope_http_keepalive_advertised_timeout_seconds", &[("server", &server)]),
            0.0
        );
        assert_eq!(agent.get("/healthz")?.0, 200);
        Ok(())
    }
);

kernel_test!(
    /// Steady keep-alive traffic stays in the kernel: one connection carries more than 1,000
    /// requests with gaps the test chooses across several bucket ranges. Requests, gap count,
    /// gap buckets and gap sum equal what the test did; while the connection is still open a
    /// scrape shows its requests and its idle state.
    fn long_connection_counts_requests_and_gaps_in_the_kernel() -> anyhow::Result<()> {
        let _serial = serial::exclusive();
        let agent = Agent::start(&[])?;
        let (listener, server) = listener()?;
        let serving = http_server::serve(listener, 1, ServerBehaviour::default());
        // (sleep before the request, how many): back-to-back, then one range per bucket span.
        let plan: [(Duration, u32); 5] = [
            (Duration::ZERO, 1000),
            (Duration::from_millis(2), 100),
            (Duration::from_millis(60), 40),
            (Duration::from_millis(120), 10),
            (Duration::from_millis(600), 3),
        ];
        let total: u32 = plan.iter().map(|(_, n)| n).sum();
        let mut client = TcpStream::connect(&server)?;
        let mut slept = 0.0;
        let mut first = true;
        let requests_began = std::time::Instant::now();
        for (pause, count) in plan {
            for _ in 0..count {
                if !first && !pause.is_zero() {
                    let start = std::time::Instant::now();
                    thread::sleep(pause);
                    slept += start.elapsed().as_secs_f64();
                }
                first = false;
                http_server::request(&mut client, "1.1", "")?;
            }
        }
        // Every gap lies between the first request and the end of the last response.
        let requests_took = requests_began.elapsed().as_secs_f64();
        // Still open: the agent's sweeps (every second) bring the kernel's counts and the
        // connection's state to /metrics.
        let open = agent.scrape_until(WAIT, |s| {
            ["client", "server"].iter().all(|role| {
                s.sum("connscope_http_requests_total", &[("server", &server), ("role", role)])
                    == f64::from(total)
                    && s.sum(
                        "connscope_connections_open",
                        &[("server", &server), ("role", role), ("state", "idle")],
                    ) == 1.0
            })
        })?;
        for role in ["client", "server"] {
            let labels = [("server", server.as_str()), ("role", role)];
            assert_eq!(
                open.sum("connscope_http_requests_total", &labels),
                f64::from(total),
                "{role}: {}",
                open.text
            );
            let idle = [("server", server.as_str()), ("role", role), ("state", "idle")];
            assert_eq!(
                open.sum("connscope_connections_open", &idle),
                1.0,
                "{role} open and idle: {:?}",
                open.text.lines().filter(|l| l.contains("connections_open")).collect::<Vec<_>>()
            );
        }
        drop(client);
        join(serving)?;

        let scrape = agent.scrape_until(WAIT, |s| closes(s, &server) >= 2.0)?;
        let gaps = f64::from(total - 1);
        for role in ["client", "server"] {
            let labels = [("server", server.as_str()), ("role", role)];
            assert_eq!(scrape.sum("connscope_connection_requests_sum", &labels), f64::from(total));
            assert_eq!(
                scrape.sum("connscope_connection_idle_seconds_count", &labels),
                gaps,
                "{role}"
            );
            let bucket = |le: &str| {
                scrape.sum(
                    "connscope_connection_idle_seconds_bucket",
                    &[("server", server.as_str()), ("role", role), ("le", le)],
                )
            };
            // Gaps are at least the sleeps (scheduling only adds): exact counts above the
            // bounds no shorter range can reach (each at least 40 ms past the sleep below it, as
            // a 2 ms sleep overran 10 ms on a loaded 2-core CI machine), a lower bound at 1 ms,
            // and the sum lies between the sleeps and the time all the requests took (under
            // software emulation a back-to-back gap takes milliseconds, not microseconds). These
            // depend on the scheduler honouring the sleeps; the message carries the `idle … s,
            // slept … s` form the VM tier reports as timing-only under software emulation.
            assert_eq!(bucket("+Inf"), gaps);
            let above = |le: &str| bucket("+Inf") - bucket(le);
            let spans = [above("0.5"), above("0.1"), above("0.05"), above("0.001")];
            let idle = scrape.sum("connscope_connection_idle_seconds_sum", &labels);
            let timed = spans[0] == 3.0
                && spans[1] == 13.0
                && spans[2] == 53.0
                && spans[3] >= 153.0
                && idle >= slept * 0.999
                && idle <= requests_took;
            assert!(
                timed,
                "{role} gaps above 0.5/0.1/0.05/0.001 s {spans:?}, expected [3, 13, 53, >=153]: idle {idle} s, slept {slept} s, requests took {requests_took} s"
            );
        }
        Ok(())
    }
);
