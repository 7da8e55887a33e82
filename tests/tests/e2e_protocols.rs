//! Exchange counting for real servers and clients: nginx answering `100 Continue` (early
//! and after reading the body), nginx `ssl` with curl and Python over TLS 1.3 and 1.2
//! (decrypted through the libssl uprobes: HTTP/1.x figures; undecrypted with
//! `--tls.uprobes=false`: requests, not handshake flights), and HTTP/2 in cleartext, in
//! decrypted TLS and, named by its ALPN, in undecrypted TLS. Counts are exact against nginx's own log and the requests the clients made.

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use connscope_tests::{
    Agent,
    exchange_counts::{
        ROLES, WAIT, assert_counts, distribution, expected_distribution, scrape_closed, side,
    },
    free_port, kernel_test,
    nginx::{Nginx, NginxConfig, SelfSignedTls},
    serial,
};

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

kernel_test!(
    /// `curl --data-binary @file` with a body over 1 MB sends `Expect: 100-continue`; nginx
    /// answers `100 Continue`. `/early` (`return 200`) sends the final response before reading
    /// the body, `/proxied` reads the whole body first (to pass it upstream). Each POST is one
    /// request, on both sides, whichever way.
    fn expect_100_continue_bodies_are_one_exchange() -> anyhow::Result<()> {
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
);

kernel_test!(
    /// HTTPS decrypted by the libssl uprobes (nginx `ssl` with Debian's libssl3, self-signed;
    /// curl with 3 URLs; Python's `http.client` over `ssl`, 7 requests with
    /// `keepalive_requests 5`): the connections are `http1` with the requests, HTTP versions
    /// and close reasons of plaintext, equal to nginx's log on both sides, TLS 1.3 and 1.2.
    /// curl and nginx call `SSL_read`/`SSL_write`, Python the `_ex` forms.
    fn tls_plaintext_gets_http1_figures() -> anyhow::Result<()> {
        tls_requests_per_connection(Decryption::Uprobes)
    }
);

kernel_test!(
    /// Undecrypted TLS (`--tls.uprobes=false`; the same traffic): requests per connection equal
    /// nginx's `$connection_requests` on both sides, not the handshake flights nor TLS 1.3's
    /// encrypted `close_notify`; the connections are `tls`, without HTTP figures.
    fn undecrypted_tls_counts_requests_not_handshakes() -> anyhow::Result<()> {
        tls_requests_per_connection(Decryption::Off)
    }
);

kernel_test!(
    /// Undecrypted TLS close reasons, from the gap before the close alone (no header is
    /// read), on both ends, TLS 1.3 and 1.2, nginx `keepalive_timeout 2s` and
    /// `keepalive_requests 5`:
    /// - `after_response`: curl closing after its last answer; nginx closing at its request
    ///   limit (the client reads the answer after the FIN); Python closing after its last one;
    /// - `idle`: Python closing after 0.8 s without a request; nginx closing a connection
    ///   idle for its 2 s timeout. Both sides' `close_notify` is not taken for activity.
    fn undecrypted_tls_close_reasons_follow_the_gap_before_the_close() -> anyhow::Result<()> {
        let (nginx, servers) = two_tls_servers(
            "gaps",
            "$connection $connection_requests",
            "keepalive_timeout 2s; keepalive_requests 5;",
        )?;
        let agent = Agent::start(&["--tls.uprobes=false"])?;
        for TlsServer { port, log, .. } in servers {
            let log = log.as_str();
            let url = format!("https://127.0.0.1:{port}/index.html");
            run("curl", &["-sS", "-k", "-o", "/dev/null", &url, "-o", "/dev/null", &url])?;
            let script = format!(
                "import http.client, ssl, time\n\
                 def connect():\n    return http.client.HTTPSConnection('127.0.0.1', {port}, \
                 context=ssl._create_unverified_context())\n\
                 def get(c):\n    c.request('GET', '/index.html'); c.getresponse().read()\n\
                 c = connect()\nfor _ in range(7): get(c)\nc.close()\n\
                 c = connect(); get(c); time.sleep(0.8); c.close()\n\
                 c = connect(); get(c); time.sleep(3.0); c.close()\n"
            );
            run("python3", &["-c", &script])?;
            let truth = logged_requests(&nginx, log, 2 + 7 + 1 + 1)?;
            let mut sizes: Vec<u64> = truth.values().copied().collect();
            sizes.sort();
            assert_eq!(sizes, [1, 1, 2, 2, 5], "{log}");
            let server = format!("127.0.0.1:{port}");
            let scrape = scrape_closed(&agent, &server, 5.0)?;
            for role in ROLES {
                let reason = |reason: &str| {
                    scrape.sum(
                        "connscope_connections_closed_total",
                        &[("server", &server), ("role", role), ("reason", reason)],
                    )
                };
                assert_eq!(reason("after_response"), 3.0, "{log} {role}: {}", scrape.text);
                assert_eq!(reason("idle"), 2.0, "{log} {role}: {}", scrape.text);
            }
        }
        Ok(())
    }
);

/// One `ssl` server of [`two_tls_servers`]: its port, its access log and the version it
/// negotiates with curl and Python.
struct TlsServer {
    port: u16,
    log: String,
    version: &'static str,
}

/// nginx (`keepalive_requests 5`) with two `ssl` servers, one offering TLS 1.3 (and 1.2),
/// one TLS 1.2 only; each logs `log_format` to `<name>13.log` or `<name>12.log`, with
/// `directives` added to both.
fn two_tls_servers(
    name: &str,
    log_format: &str,
    directives: &str,
) -> anyhow::Result<(Nginx, [TlsServer; 2])> {
    let tls = SelfSignedTls::new(name)?;
    let servers = [("TLSv1.2 TLSv1.3", "13", "TLSv1.3"), ("TLSv1.2", "12", "TLSv1.2")].map(
        |(protocols, suffix, version)| {
            let server =
                TlsServer { port: free_port(), log: format!("{name}{suffix}.log"), version };
            (protocols, server)
        },
    );
    let mut extra = format!("log_format {name} '{log_format}';\n");
    for (protocols, server) in &servers {
        extra.push_str(&format!(
            "server {{ listen 127.0.0.1:{port} ssl; ssl_protocols {protocols};\n\
               {directives}\n{tls}\n\
               access_log {log} {name}; root html; }}\n",
            port = server.port,
            tls = tls.directives,
            log = server.log,
        ));
    }
    let nginx = Nginx::start_with(nginx_config(free_port(), 5), &extra)?;
    Ok((nginx, servers.map(|(_, server)| server)))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Decryption {
    Uprobes,
    Off,
}

fn tls_requests_per_connection(decryption: Decryption) -> anyhow::Result<()> {
    let (nginx, servers) =
        two_tls_servers("tls", "$connection $connection_requests $ssl_protocol", "")?;
    let (flags, protocol, attach): (&[&str], _, _) = match decryption {
        Decryption::Uprobes => (&[], "http1", "uprobe"),
        Decryption::Off => (&["--tls.uprobes=false"], "tls", "off"),
    };
    let agent = Agent::start(flags)?;
    let info =
        agent.scrape()?.sum("connscope_probe_info", &[("hook", "libssl"), ("attach", attach)]);
    assert_eq!(info, 1.0, "probe_info libssl {attach}");
    let (_, page) = agent.get("/")?;
    let listed = page.contains("libssl.so.3</td><td>attached");
    assert_eq!(listed, decryption == Decryption::Uprobes, "/ lists the attached libssl: {page}");
    for TlsServer { port, log, version } in servers {
        let log = log.as_str();
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
        let http_requests = if decryption == Decryption::Uprobes { 10.0 } else { 0.0 };
        assert_counts(&scrape, &server, protocol, 3.0, 10.0, http_requests);
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
        // Close sides agree: a side says `peer` only when the other sent the first FIN.
        // When nginx ends a connection at its request limit and Python closes at once, the
        // FINs may cross and both sides say `local` (as in e2e_nginx). Nobody is `unknown`.
        let closed = |role: &str, by: &str| {
            scrape.sum(
                "connscope_connections_closed_total",
                &[("server", &server), ("role", role), ("closed_by", by)],
            )
        };
        assert!(closed("server", "peer") <= closed("client", "local"), "{}", scrape.text);
        assert!(closed("client", "peer") <= closed("server", "local"), "{}", scrape.text);
        for role in ROLES {
            assert_eq!(closed(role, "local") + closed(role, "peer"), 3.0, "{role}");
        }
        if decryption == Decryption::Uprobes {
            assert_close_reasons(&scrape, &server, &truth, 5);
        }
    }
    Ok(())
}

/// Close reasons of decrypted HTTPS, from nginx's log: the connection that reached
/// `keepalive_requests` got nginx's `Connection: close`; the clients closed the others idle;
/// no keep-alive race.
fn assert_close_reasons(
    scrape: &connscope_tests::Scrape,
    server: &str,
    truth: &BTreeMap<u64, u64>,
    keepalive_requests: u64,
) {
    let at_limit = truth.values().filter(|&&n| n == keepalive_requests).count() as f64;
    let others = truth.len() as f64 - at_limit;
    for role in ROLES {
        let reason = |reason: &str| {
            scrape.sum(
                "connscope_connections_closed_total",
                &[("server", server), ("role", role), ("reason", reason)],
            )
        };
        assert_eq!(reason("connection_close"), at_limit, "{role}: {}", scrape.text);
        assert_eq!(reason("idle"), others, "{role}: {}", scrape.text);
        // Every request was answered (nginx logged it): a close_notify sent after the
        // peer's FIN is no request on a closing connection.
        let races = scrape.sum("connscope_keepalive_races_total", &side(server, role));
        assert_eq!(races, 0.0, "{role}: keep-alive races");
    }
}

kernel_test!(
    /// HTTP/2 in cleartext (nginx `listen … http2`, curl `--http2-prior-knowledge`): the
    /// connection is `http2`, and its requests are its streams (from the frame headers),
    /// not HTTP/1.x requests nor direction changes.
    fn http2_cleartext_counts_streams() -> anyhow::Result<()> {
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
                &[
                    "-sS",
                    "--http2-prior-knowledge",
                    "-w",
                    "%{http_version}",
                    "-o",
                    "/dev/null",
                    &url,
                ],
            )?;
            assert_eq!(version, "2", "curl spoke HTTP/2");
        }
        let truth = logged_requests(&nginx, "h2c.log", CONNECTIONS)?;
        assert_eq!(truth.len(), CONNECTIONS, "{truth:?}");
        assert_http2_streams(&agent, &format!("127.0.0.1:{h2c}"), CONNECTIONS, 1)
    }
);

/// `connections` HTTP/2 connections to `server` were opened and closed, on both sides, each
/// with `streams` streams: `protocol="http2"` on the closes and the requests per connection,
/// `http_version="2"` requests, no HTTP/1.x ones, no frame sync lost.
fn assert_http2_streams(
    agent: &Agent,
    server: &str,
    connections: usize,
    streams: usize,
) -> anyhow::Result<()> {
    let scrape = scrape_closed(agent, server, connections as f64)?;
    let http2 = [("protocol", "http2")];
    for role in ROLES {
        let labels = side(server, role);
        let with = |extra: &[(&'static str, &'static str)]| -> Vec<(&str, &str)> {
            labels.iter().chain(extra).copied().collect()
        };
        let opened = scrape.sum("connscope_connections_opened_total", &labels);
        assert_eq!(opened, connections as f64, "{role}");
        let closed = scrape.sum("connscope_connections_closed_total", &with(&http2));
        assert_eq!(closed, connections as f64, "{role}: closes say http2: {}", scrape.text);
        let observed = scrape.sum("connscope_connection_requests_count", &with(&http2));
        assert_eq!(observed, connections as f64, "{role}: {}", scrape.text);
        let carried = scrape.sum("connscope_connection_requests_sum", &with(&http2));
        assert_eq!(carried, (connections * streams) as f64, "{role}: streams: {}", scrape.text);
        let version = scrape.sum("connscope_http_requests_total", &with(&[("http_version", "2")]));
        assert_eq!(version, (connections * streams) as f64, "{role}: {}", scrape.text);
        let all = scrape.sum("connscope_http_requests_total", &labels);
        assert_eq!(all, version, "{role}: only HTTP/2 requests");
    }
    let lost = scrape.sum("connscope_events_lost_total", &[("reason", "http2_unparsed")]);
    assert_eq!(lost, 0.0, "frame sync kept");
    Ok(())
}

kernel_test!(
    /// HTTP/2 in TLS (nginx `listen … ssl http2`, curl `--http2` negotiating `h2` by ALPN, 2
    /// URLs per connection): the uprobes see the client preface in the plaintext, so the
    /// connections are `http2` with 2 streams each, on both sides (nginx sends its SETTINGS
    /// before it reads the preface).
    fn http2_in_tls_counts_streams() -> anyhow::Result<()> {
        let _serial = serial::shared();
        let h2 = free_port();
        let tls = SelfSignedTls::new("h2")?;
        let extra = format!(
            "server {{ listen 127.0.0.1:{h2} ssl http2; access_log h2.log ground_truth;\n\
           {} root html; }}\n",
            tls.directives
        );
        let nginx = Nginx::start_with(nginx_config(free_port(), 100), &extra)?;
        let agent = Agent::start(&[])?;
        let url = format!("https://127.0.0.1:{h2}/index.html");
        const CONNECTIONS: usize = 3;
        for _ in 0..CONNECTIONS {
            let (versions, _) = run(
                "curl",
                &[
                    "-sSk",
                    "--http2",
                    "-w",
                    "%{http_version} ",
                    "-o",
                    "/dev/null",
                    &url,
                    "-o",
                    "/dev/null",
                    &url,
                ],
            )?;
            assert_eq!(versions, "2 2 ", "curl spoke HTTP/2 twice on one connection");
        }
        let truth = logged_requests(&nginx, "h2.log", 2 * CONNECTIONS)?;
        assert_eq!(truth.values().copied().collect::<Vec<_>>(), [2; CONNECTIONS], "{truth:?}");
        assert_http2_streams(&agent, &format!("127.0.0.1:{h2}"), CONNECTIONS, 2)
    }
);

kernel_test!(
    /// HTTP/2 in TLS the agent does not decrypt (`--tls.uprobes=false`): the hello's ALPN
    /// names the protocol. Over TLS 1.2 nginx's ServerHello selects `h2` in the clear, so 3
    /// curl `--http2` connections (2 URLs each) are `http2` on both ends, with no requests
    /// per connection and no HTTP/2 requests: their streams are encrypted. Over TLS 1.3 the
    /// server's choice is encrypted and curl offers `h2` and `http/1.1`, so the connection
    /// stays `tls`: the agent does not guess.
    fn http2_in_undecrypted_tls_is_named_by_its_alpn() -> anyhow::Result<()> {
        // Not beside the decrypted HTTP/2 test: with both curls in TLS at once, that test's
        // agent once counted 2 of its 3 curl connections from ciphertext (cause not found;
        // every agent's uprobes see every process's libssl calls).
        let _serial = serial::exclusive();
        let h2 = free_port();
        let tls = SelfSignedTls::new("alpn")?;
        let extra = format!(
            "server {{ listen 127.0.0.1:{h2} ssl http2; access_log alpn.log ground_truth;\n\
           ssl_protocols TLSv1.2 TLSv1.3; {} root html; }}\n",
            tls.directives
        );
        let nginx = Nginx::start_with(nginx_config(free_port(), 100), &extra)?;
        let agent = Agent::start(&["--tls.uprobes=false"])?;
        let server = format!("127.0.0.1:{h2}");
        let url = format!("https://{server}/index.html");
        let curl = |tls_version: &[&str]| -> anyhow::Result<String> {
            let mut args = vec!["-sSk", "--http2", "-w", "%{http_version} "];
            args.extend_from_slice(tls_version);
            args.extend_from_slice(&["-o", "/dev/null", &url, "-o", "/dev/null", &url]);
            Ok(run("curl", &args)?.0)
        };
        const CONNECTIONS: usize = 3;
        for _ in 0..CONNECTIONS {
            assert_eq!(curl(&["--tlsv1.2", "--tls-max", "1.2"])?, "2 2 ", "HTTP/2 twice");
        }
        let scrape = scrape_closed(&agent, &server, CONNECTIONS as f64)?;
        let http2 = [("protocol", "http2")];
        for role in ROLES {
            let labels = side(&server, role);
            let with = |extra: &[(&'static str, &'static str)]| -> Vec<(&str, &str)> {
                labels.iter().chain(extra).copied().collect()
            };
            let closed = scrape.sum("connscope_connections_closed_total", &with(&http2));
            assert_eq!(closed, CONNECTIONS as f64, "{role}: closes say http2: {}", scrape.text);
            let all = scrape.sum("connscope_connections_closed_total", &labels);
            assert_eq!(all, CONNECTIONS as f64, "{role}");
            let observed = scrape.sum("connscope_connection_requests_count", &labels);
            assert_eq!(observed, 0.0, "{role}: no stream count from ciphertext: {}", scrape.text);
            let requests = scrape.sum("connscope_http_requests_total", &labels);
            assert_eq!(requests, 0.0, "{role}: no request read: {}", scrape.text);
        }

        assert_eq!(curl(&["--tlsv1.3"])?, "2 2 ", "HTTP/2 twice");
        let scrape = scrape_closed(&agent, &server, CONNECTIONS as f64 + 1.0)?;
        for role in ROLES {
            let labels = side(&server, role);
            let closes = |protocol| {
                let labels: Vec<_> =
                    labels.iter().copied().chain([("protocol", protocol)]).collect();
                scrape.sum("connscope_connections_closed_total", &labels)
            };
            assert_eq!(closes("tls"), 1.0, "{role}: TLS 1.3 hides the choice: {}", scrape.text);
            assert_eq!(closes("http2"), CONNECTIONS as f64, "{role}");
        }
        let truth = logged_requests(&nginx, "alpn.log", 2 * CONNECTIONS + 2)?;
        assert_eq!(truth.values().copied().collect::<Vec<_>>(), [2; CONNECTIONS + 1], "{truth:?}");
        Ok(())
    }
);

kernel_test!(
    /// A process started after the agent with its own copy of libssl (`LD_LIBRARY_PATH`, as a
    /// container or a bundled OpenSSL would be): the agent's rescan of `/proc` finds the new file
    /// and attaches it, and that process's HTTPS is then decrypted (`http1` on its side).
    fn libssl_copy_of_a_later_process_is_attached() -> anyhow::Result<()> {
        let port = free_port();
        // Its directory also holds the later process's libssl copy.
        let tls = SelfSignedTls::new("libssl")?;
        let dir = &tls.dir;
        let extra = format!(
            "server {{ listen 127.0.0.1:{port} ssl; {}\n\
           access_log late.log ground_truth; root html; }}\n",
            tls.directives
        );
        let nginx = Nginx::start_with(nginx_config(free_port(), 100), &extra)?;
        let system_libssl = ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib"]
            .iter()
            .map(|d| Path::new(d).join("libssl.so.3"))
            .find(|p| p.exists())
            .context("no libssl.so.3 (Debian package libssl3)")?;
        std::fs::copy(&system_libssl, dir.join("libssl.so.3"))?;
        let agent = Agent::start(&[])?;
        let attached = |scrape: &connscope_tests::Scrape| {
            scrape.sum("connscope_tls_uprobe_targets", &[("state", "attached")])
        };
        let before = attached(&agent.scrape()?);
        assert!(before >= 1.0, "the system's libssl is attached at start");
        const REQUESTS: u64 = 4;
        let script = format!(
            "import http.client, ssl, sys\n\
         print('ready', flush=True)\n\
         sys.stdin.readline()\n\
         c = http.client.HTTPSConnection('127.0.0.1', {port}, context=ssl._create_unverified_context())\n\
         for _ in range({REQUESTS}):\n    c.request('GET', '/index.html')\n    c.getresponse().read()\n\
         c.close()\n"
        );
        let mut python = Command::new("python3")
            .args(["-c", &script])
            .env("LD_LIBRARY_PATH", dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting python3")?;
        let result = (|| -> anyhow::Result<()> {
            let mut ready = String::new();
            let stdout = python.stdout.as_mut().context("python's stdout")?;
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut ready)?;
            anyhow::ensure!(ready.trim() == "ready", "python: {ready:?}");
            let maps = std::fs::read_to_string(format!("/proc/{}/maps", python.id()))?;
            anyhow::ensure!(maps.contains(&*dir.to_string_lossy()), "python maps the copy: {maps}");
            // The rescan runs every 10 s.
            let scrape = agent.scrape_until(Duration::from_secs(25), |s| attached(s) > before)?;
            anyhow::ensure!(
                attached(&scrape) > before,
                "the copy was not attached: {}",
                scrape.text
            );
            let stdin = python.stdin.as_mut().context("python's stdin")?;
            std::io::Write::write_all(stdin, b"go\n")?;
            let status = python.wait()?;
            anyhow::ensure!(status.success(), "python: {status}");
            Ok(())
        })();
        let _ = python.kill();
        let _ = python.wait();
        drop(tls);
        result?;
        let truth = logged_requests(&nginx, "late.log", REQUESTS as usize)?;
        assert_eq!(truth.values().copied().collect::<Vec<_>>(), [REQUESTS], "{truth:?}");
        let server = format!("127.0.0.1:{port}");
        let scrape = scrape_closed(&agent, &server, 1.0)?;
        let client = [("server", server.as_str()), ("role", "client"), ("protocol", "http1")];
        assert_eq!(
            scrape.sum("connscope_connection_requests_sum", &client),
            REQUESTS as f64,
            "{}",
            scrape.text
        );
        let client = side(&server, "client");
        assert_eq!(scrape.sum("connscope_http_requests_total", &client), REQUESTS as f64);
        Ok(())
    }
);

/// nginx's requests per connection from `log`, once it holds `requests` requests (nginx
/// logs a request when it is done with it, which may be after the client has finished:
/// a body it answered early is still read and discarded).
fn logged_requests(
    nginx: &Nginx,
    log: &str,
    requests: usize,
) -> anyhow::Result<BTreeMap<u64, u64>> {
    let deadline = Instant::now() + WAIT;
    loop {
        let truth = nginx.requests_per_connection_in(log)?;
        if truth.values().sum::<u64>() >= requests as u64 || Instant::now() > deadline {
            return Ok(truth);
        }
        thread::sleep(Duration::from_millis(50));
    }
}
