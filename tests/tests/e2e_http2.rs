//! HTTP/2 reuse with real clients and servers: a Python `grpcio` channel (h2c) making unary
//! and concurrent streaming calls, a gRPC server's `max_connection_age` ending connections
//! with `GOAWAY`, gRPC over TLS named `http2` by its ALPN, and nginx closing an idle h2c
//! connection with `GOAWAY`. Streams per
//! connection, concurrency and close reasons are exact against the calls made.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;
use connscope_tests::{
    Agent,
    exchange_counts::{ROLES, WAIT, side},
    free_port,
    http2::{PREFACE, frame_header},
    kernel_test,
    metrics_text::Scrape,
    nginx::{Nginx, NginxConfig, SelfSignedTls},
};

/// A gRPC server (`server <port> <max_connection_age_ms>`, 0: no age limit) or client
/// (`calls <port>`: 100 unary calls then 3 concurrent streaming ones on one channel;
/// `age <port>`: a call, 3 s idle, a call) with `grpcio`'s generic handlers: bytes in,
/// bytes out, no generated code. With `GRPC_TLS_DIR` (`cert.pem`, `key.pem` for
/// `localhost`) both speak TLS, through the BoringSSL grpcio links in (no libssl).
const GRPC_PEER: &str = r#"
import os, sys, threading, time
from concurrent import futures
import grpc

mode, port = sys.argv[1], int(sys.argv[2])
same = lambda b: b
tls = os.environ.get("GRPC_TLS_DIR")
read = lambda name: open(os.path.join(tls, name), "rb").read()

def unary(request, context):
    return request

def stream(request, context):
    for _ in range(3):
        time.sleep(0.3)
        yield request

if mode == "server":
    age = int(sys.argv[3])
    options = [("grpc.max_connection_age_ms", age), ("grpc.max_connection_age_grace_ms", 500)] if age else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=options)
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, same, same),
        "Stream": grpc.unary_stream_rpc_method_handler(stream, same, same),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", handlers),))
    if tls:
        server.add_secure_port(f"127.0.0.1:{port}", grpc.ssl_server_credentials([(read("key.pem"), read("cert.pem"))]))
    else:
        server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    sys.stdin.readline()
    server.stop(None)
else:
    if tls:
        credentials = grpc.ssl_channel_credentials(root_certificates=read("cert.pem"))
        override = [("grpc.ssl_target_name_override", "localhost")]
        channel = grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=override)
    else:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary("/t.T/Unary", same, same)
    streaming = channel.unary_stream("/t.T/Stream", same, same)
    if mode == "calls":
        for _ in range(100):
            assert call(b"x", timeout=10) == b"x"
        got = []
        threads = [threading.Thread(target=lambda: got.append(len(list(streaming(b"y", timeout=10))))) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert got == [3, 3, 3], got
    else:
        call(b"x", timeout=10)
        time.sleep(3)
        call(b"x", timeout=10)
    channel.close()
"#;

/// A running gRPC server; stopped (it sends its `GOAWAY`) when dropped.
struct GrpcServer(Child);

impl GrpcServer {
    fn start(port: u16, max_age_ms: u64, tls: Option<&Path>) -> anyhow::Result<Self> {
        let mut child = peer(tls)
            .args(["server", &port.to_string(), &max_age_ms.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the gRPC server (python3 with grpcio: cargo xtask setup)")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("server stdout")?).read_line(&mut line)?;
        anyhow::ensure!(line.trim() == "ready", "gRPC server said {line:?}");
        Ok(Self(child))
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// `python3` running [`GRPC_PEER`], over TLS with the certificate in `tls`.
fn peer(tls: Option<&Path>) -> Command {
    let mut command = Command::new("python3");
    command.args(["-c", GRPC_PEER]);
    if let Some(dir) = tls {
        command.env("GRPC_TLS_DIR", dir);
    }
    command
}

fn grpc_client(mode: &str, port: u16, tls: Option<&Path>) -> anyhow::Result<()> {
    let status = peer(tls)
        .args([mode, &port.to_string()])
        .stdin(Stdio::null())
        .status()
        .context("starting the gRPC client")?;
    anyhow::ensure!(status.success(), "gRPC client {mode} failed: {status}");
    Ok(())
}

fn with<'a>(
    labels: &[(&'a str, &'a str)],
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    labels.iter().chain(extra).copied().collect()
}

kernel_test!(
    /// One `grpcio` channel makes 100 unary calls, then 3 streaming calls at once: one
    /// connection carrying 103 streams on both ends (`protocol="http2"`, 103 requests of
    /// `http_version="2"`), whose streams-in-flight histogram saw more than one at a time.
    fn grpc_channel_streams_per_connection_and_concurrency() -> anyhow::Result<()> {
        let port = free_port();
        let server = format!("127.0.0.1:{port}");
        let agent = Agent::start(&[])?;
        let grpc = GrpcServer::start(port, 0, None)?;
        grpc_client("calls", port, None)?;
        let scrape = agent.scrape_until(WAIT, |s| {
            s.sum("connscope_connection_requests_count", &[("server", &server)]) >= 2.0
        })?;
        drop(grpc);
        for role in ROLES {
            let labels = side(&server, role);
            let http2 = with(&labels, &[("protocol", "http2")]);
            let observed = scrape.sum("connscope_connection_requests_count", &http2);
            assert_eq!(observed, 1.0, "{role}: one connection: {}", scrape.text);
            let streams = scrape.sum("connscope_connection_requests_sum", &http2);
            assert_eq!(streams, 103.0, "{role}: a stream per call: {}", scrape.text);
            let version = with(&labels, &[("http_version", "2")]);
            assert_eq!(scrape.sum("connscope_http_requests_total", &version), 103.0, "{role}");
            let openings = scrape.sum("connscope_http2_concurrent_streams_count", &labels);
            assert_eq!(openings, 103.0, "{role}: {}", scrape.text);
            let alone = scrape
                .sum("connscope_http2_concurrent_streams_bucket", &with(&labels, &[("le", "1")]));
            assert!(alone < openings, "{role}: some stream opened beside another: {}", scrape.text);
        }
        Ok(())
    }
);

kernel_test!(
    /// gRPC over TLS, which the agent cannot decrypt (grpcio's own BoringSSL): the client's
    /// hello offers `h2` alone, so the channel's one connection is `http2` on both ends,
    /// with no stream count (its frames are encrypted) and no request counted as HTTP/1.x.
    fn grpc_over_tls_is_http2_by_the_clients_alpn() -> anyhow::Result<()> {
        let port = free_port();
        let server = format!("127.0.0.1:{port}");
        let tls = SelfSignedTls::new("grpc")?;
        let agent = Agent::start(&["--tls.uprobes=false"])?;
        let grpc = GrpcServer::start(port, 0, Some(&tls.dir))?;
        grpc_client("calls", port, Some(&tls.dir))?;
        let closed =
            |s: &Scrape| s.sum("connscope_connections_closed_total", &[("server", &server)]);
        let scrape = agent.scrape_until(WAIT, |s| closed(s) >= 2.0)?;
        drop(grpc);
        for role in ROLES {
            let labels = side(&server, role);
            let http2 = with(&labels, &[("protocol", "http2")]);
            let closes = scrape.sum("connscope_connections_closed_total", &http2);
            assert_eq!(closes, 1.0, "{role}: one http2 connection: {}", scrape.text);
            let observed = scrape.sum("connscope_connection_requests_count", &labels);
            assert_eq!(observed, 0.0, "{role}: no stream count: {}", scrape.text);
            let requests = scrape.sum("connscope_http_requests_total", &labels);
            assert_eq!(requests, 0.0, "{role}: {}", scrape.text);
        }
        Ok(())
    }
);

kernel_test!(
    /// A gRPC server with `grpc.max_connection_age_ms` sends `GOAWAY` once a connection is
    /// that old: the close names the server's `GOAWAY` (graceful, `NO_ERROR`) on both ends,
    /// and the client's next call opens a new connection.
    fn grpc_max_connection_age_closes_with_the_servers_goaway() -> anyhow::Result<()> {
        let port = free_port();
        let server = format!("127.0.0.1:{port}");
        let agent = Agent::start(&[])?;
        let grpc = GrpcServer::start(port, 1000, None)?;
        grpc_client("age", port, None)?;
        let goaway = |s: &Scrape, role: &str| {
            let labels = with(&side(&server, role), &[("reason", "server_goaway")]);
            s.sum("connscope_connections_closed_total", &labels)
        };
        let scrape =
            agent.scrape_until(WAIT, |s| ROLES.iter().all(|role| goaway(s, role) >= 1.0))?;
        drop(grpc);
        for role in ROLES {
            assert!(goaway(&scrape, role) >= 1.0, "{role}: {}", scrape.text);
            let opened = scrape.sum("connscope_connections_opened_total", &side(&server, role));
            assert!(opened >= 2.0, "{role}: the next call reconnected: {}", scrape.text);
        }
        Ok(())
    }
);

kernel_test!(
    /// nginx `listen … http2` with a 1 s `keepalive_timeout` (its HTTP/2 idle timeout since
    /// 1.19.7): a prior-knowledge client sends one request and stays; nginx closes the idle
    /// connection with `GOAWAY`. The reason names the server's `GOAWAY` on both ends, nginx
    /// closed first, and the idle time before the close is the timeout's (between 0.5 and
    /// 2 s: idle means no stream open, not no frame).
    fn nginx_idle_h2c_connection_closes_with_goaway_after_its_timeout() -> anyhow::Result<()> {
        let h2c = free_port();
        let extra = format!(
            "server {{ listen 127.0.0.1:{h2c} http2; keepalive_timeout 1s; root html; }}\n"
        );
        let config = NginxConfig {
            port: free_port(),
            keepalive_timeout: Duration::from_secs(30),
            keepalive_requests: 100,
            workers: 1,
            advertise_keep_alive: false,
        };
        let _nginx = Nginx::start_with(config, &extra)?;
        let agent = Agent::start(&[])?;
        let server = format!("127.0.0.1:{h2c}");
        let mut client = TcpStream::connect(&server)?;
        client.set_read_timeout(Some(Duration::from_secs(10)))?;
        // `GET /` (HPACK static table: :method GET, :scheme http, :path /) and `:authority`.
        let block = [&[0x82u8, 0x86, 0x84, 0x41, 9][..], b"127.0.0.1"].concat();
        let request = [
            PREFACE,
            &frame_header(0, 0x4, 0, 0),
            &frame_header(block.len() as u32, 0x1, 0x5, 1),
            &block,
        ]
        .concat();
        client.write_all(&request)?;
        let mut answered = Vec::new();
        client.read_to_end(&mut answered).context("nginx closes the idle connection")?;
        anyhow::ensure!(answered.len() > 9, "nginx answered {} bytes", answered.len());
        drop(client);
        let reason = |s: &Scrape, role: &str| {
            let labels = with(&side(&server, role), &[("reason", "server_goaway")]);
            s.sum("connscope_connections_closed_total", &labels)
        };
        let scrape =
            agent.scrape_until(WAIT, |s| ROLES.iter().all(|role| reason(s, role) >= 1.0))?;
        for (role, by) in [("client", "peer"), ("server", "local")] {
            let labels = side(&server, role);
            assert_eq!(reason(&scrape, role), 1.0, "{role}: {}", scrape.text);
            let closed = with(&labels, &[("closed_by", by), ("protocol", "http2")]);
            assert_eq!(scrape.sum("connscope_connections_closed_total", &closed), 1.0, "{role}");
            let idle = |le: &'static str| {
                scrape.sum(
                    "connscope_connection_close_idle_seconds_bucket",
                    &with(&labels, &[("le", le)]),
                )
            };
            assert_eq!(
                (idle("0.5"), idle("2.0")),
                (0.0, 1.0),
                "{role}: idle ~1 s: {}",
                scrape.text
            );
            let streams = with(&labels, &[("protocol", "http2")]);
            assert_eq!(scrape.sum("connscope_connection_requests_sum", &streams), 1.0, "{role}");
        }
        Ok(())
    }
);
