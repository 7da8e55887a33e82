//! Connection lifecycle against the real kernel: real loopback sockets made here, the real
//! agent binary, its real /metrics. Counts are exact: each test owns its server port.
//! The SIGTERM-time test holds `serial::exclusive`: the kernel removes uprobes one at a
//! time host-wide, so agents stopping beside it would stretch its exit (3.0 s against its
//! 2.5 s bound once in CI).

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use connscope_tests::{Agent, Scrape, kernel_test, net, serial};

const WAIT: Duration = Duration::from_secs(5);

fn listener(host: &str) -> anyhow::Result<(TcpListener, String)> {
    let listener = TcpListener::bind(format!("{host}:0"))?;
    let server = listener.local_addr()?.to_string();
    Ok((listener, server))
}

fn closed(scrape: &Scrape, role: &str, server: &str, by: &str, kind: &str) -> f64 {
    scrape.sum(
        "connscope_connections_closed_total",
        &[("role", role), ("server", server), ("closed_by", by), ("close_kind", kind)],
    )
}

fn opened(scrape: &Scrape, role: &str, server: &str) -> f64 {
    scrape.sum("connscope_connections_opened_total", &[("role", role), ("server", server)])
}

kernel_test!(
    /// N connections where the client writes, closes first, and the server reads to EOF.
    fn client_closes_first() -> anyhow::Result<()> {
        let _serial = serial::shared();
        let agent = Agent::start(&[])?;
        let (listener, server) = listener("127.0.0.1")?;
        const N: usize = 5;
        net::closed_by_client(listener, N, "cs-acceptor", b"ping")?;

        let scrape = agent.scrape_until(WAIT, |s| {
            closed(s, "client", &server, "local", "fin") >= N as f64
                && closed(s, "server", &server, "peer", "fin") >= N as f64
        })?;
        assert_eq!(opened(&scrape, "client", &server), N as f64, "{}", scrape.text);
        assert_eq!(opened(&scrape, "server", &server), N as f64, "{}", scrape.text);
        assert_eq!(closed(&scrape, "client", &server, "local", "fin"), N as f64, "{}", scrape.text);
        assert_eq!(closed(&scrape, "server", &server, "peer", "fin"), N as f64);
        // Nothing else closed on this flow.
        assert_eq!(
            scrape.sum("connscope_connections_closed_total", &[("server", &server)]),
            2.0 * N as f64
        );
        assert_eq!(
            scrape.sum(
                "connscope_connection_duration_seconds_count",
                &[("server", &server), ("role", "client")]
            ),
            N as f64
        );
        Ok(())
    }
);

kernel_test!(
    fn server_closes_first() -> anyhow::Result<()> {
        let _serial = serial::shared();
        let agent = Agent::start(&[])?;
        let (listener, server) = listener("127.0.0.1")?;
        let acceptor = thread::spawn(move || {
            let (mut stream, _) = listener.accept()?;
            stream.write_all(b"bye")?;
            anyhow::Ok(())
            // dropped here: the server closes first
        });
        let mut client = TcpStream::connect(&server)?;
        let mut sink = Vec::new();
        client.read_to_end(&mut sink)?;
        net::join(acceptor)?;
        drop(client);

        let scrape = agent.scrape_until(WAIT, |s| {
            closed(s, "client", &server, "peer", "fin") >= 1.0
                && closed(s, "server", &server, "local", "fin") >= 1.0
        })?;
        assert_eq!(closed(&scrape, "client", &server, "peer", "fin"), 1.0, "{}", scrape.text);
        assert_eq!(closed(&scrape, "server", &server, "local", "fin"), 1.0);
        assert_eq!(scrape.sum("connscope_connections_closed_total", &[("server", &server)]), 2.0);
        Ok(())
    }
);

kernel_test!(
    fn linger_zero_close_is_a_reset() -> anyhow::Result<()> {
        let _serial = serial::shared();
        let agent = Agent::start(&[])?;
        let (listener, server) = listener("127.0.0.1")?;
        let acceptor = thread::spawn(move || {
            let (mut stream, _) = listener.accept()?;
            let mut sink = Vec::new();
            // The reset ends the read with ECONNRESET.
            let _ = stream.read_to_end(&mut sink);
            anyhow::Ok(())
        });
        let mut client = TcpStream::connect(&server)?;
        client.write_all(b"x")?;
        thread::sleep(Duration::from_millis(50));
        net::set_linger_zero(&client)?;
        drop(client);
        net::join(acceptor)?;

        let scrape = agent.scrape_until(WAIT, |s| {
            closed(s, "client", &server, "local", "reset") >= 1.0
                && closed(s, "server", &server, "peer", "reset") >= 1.0
        })?;
        assert_eq!(closed(&scrape, "client", &server, "local", "reset"), 1.0, "{}", scrape.text);
        assert_eq!(closed(&scrape, "server", &server, "peer", "reset"), 1.0);
        assert_eq!(
            scrape.sum(
                "connscope_connections_closed_total",
                &[("server", &server), ("reason", "reset")]
            ),
            2.0
        );
        Ok(())
    }
);

kernel_test!(
    fn bytes_match_what_was_written() -> anyhow::Result<()> {
        let _serial = serial::shared();
        let agent = Agent::start(&[])?;
        let (listener, server) = listener("127.0.0.1")?;
        const SENT: usize = 123_457;
        const REPLY: usize = 4_321;
        let acceptor = thread::spawn(move || {
            let (mut stream, _) = listener.accept()?;
            let mut received = vec![0u8; SENT];
            stream.read_exact(&mut received)?;
            stream.write_all(&vec![b'r'; REPLY])?;
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest)?;
            anyhow::Ok(())
        });
        let mut client = TcpStream::connect(&server)?;
        client.write_all(&vec![b'x'; SENT])?;
        let mut reply = vec![0u8; REPLY];
        client.read_exact(&mut reply)?;
        client.shutdown(Shutdown::Write)?;
        net::join(acceptor)?;
        drop(client);

        let scrape = agent.scrape_until(WAIT, |s| {
            s.sum("connscope_connections_closed_total", &[("server", &server)]) >= 2.0
        })?;
        let bytes =
            |name: &str, role: &str| scrape.sum(name, &[("role", role), ("server", &server)]);
        assert_eq!(bytes("connscope_bytes_sent_total", "client"), SENT as f64, "{}", scrape.text);
        assert_eq!(bytes("connscope_bytes_received_total", "server"), SENT as f64);
        assert_eq!(bytes("connscope_bytes_sent_total", "server"), REPLY as f64);
        assert_eq!(bytes("connscope_bytes_received_total", "client"), REPLY as f64);
        Ok(())
    }
);

kernel_test!(
    fn process_attribution_names_this_test() -> anyhow::Result<()> {
        let _serial = serial::shared();
        let agent = Agent::start(&[])?;
        let (listener, server) = listener("127.0.0.1")?;
        // The accepting thread has a name of its own so the server side is told apart.
        let acceptor = net::drain_server(listener, 1, "cs-acceptor");
        let mut client = TcpStream::connect(&server)?;
        client.write_all(b"hello")?;
        drop(client);
        net::join(acceptor)?;
        let me = connscope_tests::own_process_label();

        let scrape = agent.scrape_until(WAIT, |s| {
            s.sum("connscope_connections_closed_total", &[("server", &server)]) >= 2.0
        })?;
        assert_eq!(
            scrape.sum(
                "connscope_connections_opened_total",
                &[("server", &server), ("role", "client"), ("process", &me)]
            ),
            1.0,
            "{}",
            scrape.text
        );
        assert_eq!(
            scrape.sum(
                "connscope_connections_opened_total",
                &[("server", &server), ("role", "server"), ("process", "cs-acceptor")]
            ),
            1.0
        );
        Ok(())
    }
);

kernel_test!(
    fn connections_in_a_network_namespace_are_counted() -> anyhow::Result<()> {
        let _serial = serial::shared();
        let agent = Agent::start(&[])?;
        let ns = net::NetNs::create("lifecycle")?;
        // An address no host-side test uses, so the label is this namespace's alone.
        let server = ns.run(|| {
            let (listener, server) = listener("127.0.0.77")?;
            let target = server.clone();
            let acceptor = net::drain_server(listener, 3, "cs-acceptor");
            for _ in 0..3 {
                let mut client = TcpStream::connect(&target)?;
                client.write_all(b"in a namespace")?;
            }
            net::join(acceptor)?;
            anyhow::Ok(server)
        })??;

        let scrape = agent.scrape_until(WAIT, |s| {
            s.sum("connscope_connections_closed_total", &[("server", &server)]) >= 6.0
        })?;
        assert_eq!(opened(&scrape, "client", &server), 3.0, "{}", scrape.text);
        assert_eq!(opened(&scrape, "server", &server), 3.0);
        assert_eq!(closed(&scrape, "client", &server, "local", "fin"), 3.0);
        assert_eq!(closed(&scrape, "server", &server, "peer", "fin"), 3.0);
        Ok(())
    }
);

kernel_test!(
    fn agent_reports_probes_and_health() -> anyhow::Result<()> {
        let _serial = serial::exclusive();
        let agent = Agent::start(&[])?;
        let scrape = agent.scrape()?;
        for hook in
            ["tcp_connect", "tcp_close", "tcp_sendmsg", "tcp_recvmsg", "inet_sock_set_state"]
        {
            assert_eq!(
                scrape.sum("connscope_probe_info", &[("hook", hook)]),
                1.0,
                "{hook}: {}",
                scrape.text
            );
        }
        assert_eq!(scrape.sum("connscope_build_info", &[]), 1.0);
        assert_eq!(scrape.sum("connscope_tracked_connections_capacity", &[]), 65_536.0);
        let reasons = connscope::model::metric_table::LOST_REASON.values.unwrap_or_default();
        for reason in reasons {
            assert_eq!(
                scrape.matching("connscope_events_lost_total", &[("reason", reason)]).count(),
                1,
                "{reason}"
            );
        }
        assert_eq!(agent.get("/healthz")?.0, 200);
        assert!(agent.get("/")?.1.contains("tcp_sendmsg"));
        let bound = agent.stop_bound()?;
        let (code, elapsed) = agent.stop()?;
        assert_eq!(code, Some(0));
        assert!(elapsed < bound, "SIGTERM took {elapsed:?} (bound {bound:?})");
        Ok(())
    }
);

kernel_test!(
    fn ipv6_connections_are_labelled_with_brackets() -> anyhow::Result<()> {
        let _serial = serial::shared();
        let agent = Agent::start(&[])?;
        let (listener, server) = listener("[::1]")?;
        assert!(server.starts_with("[::1]:"), "{server}");
        let acceptor = net::drain_server(listener, 2, "cs-acceptor");
        for _ in 0..2 {
            let mut client = TcpStream::connect(&server)?;
            client.write_all(b"v6")?;
        }
        net::join(acceptor)?;

        let scrape =
            agent.scrape_until(WAIT, |s| closed(s, "server", &server, "peer", "fin") >= 2.0)?;
        assert_eq!(closed(&scrape, "client", &server, "local", "fin"), 2.0, "{}", scrape.text);
        assert_eq!(closed(&scrape, "server", &server, "peer", "fin"), 2.0);
        assert_eq!(
            scrape.sum("connscope_bytes_sent_total", &[("server", &server), ("role", "client")]),
            4.0
        );
        Ok(())
    }
);
