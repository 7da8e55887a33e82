//! How long `/metrics` takes with the label caps filled (100 servers x 10 processes, both
//! roles): the encode itself, and a scrape served by the agent's body cache.
//!
//! `cargo run --release -p connscope --example metrics_at_full_caps`

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    sync::Arc,
    time::{Duration, Instant},
};

use connscope::{
    exposition::metrics::Metrics,
    exposition::server::{self, AppState},
    exposition::web::WebSettings,
    model::label_sets::{
        Closed, ClosedByLabels, Flow, FlowProtocol, HttpRequest, OpenState, PlacedFlow, Server,
    },
    model::placement::Placement,
};
use prometheus_client::registry::Registry;

fn fill(metrics: &Metrics) {
    for server in 0..100 {
        let server = format!("10.0.{}.{}:8080", server / 250, server % 250);
        metrics.advertised_timeout.get_or_create(&Server { server: server.clone() }).set(5);
        for process in 0..10 {
            let role = if process % 2 == 0 { "client" } else { "server" };
            let flow = Flow {
                role: role.into(),
                process: format!("process-{process}"),
                server: server.clone(),
            };
            let placed = PlacedFlow { flow: flow.clone(), placement: Placement::default() };
            metrics.opened.get_or_create(&placed).inc();
            for (closed_by, reason) in
                [("local", "idle"), ("peer", "max_requests"), ("peer", "idle")]
            {
                let closed = Closed {
                    flow: placed.clone(),
                    closed_by: closed_by.into(),
                    close_kind: "fin".into(),
                    reason: reason.into(),
                    protocol: "http1".into(),
                };
                metrics.closed.get_or_create(&closed).inc();
                metrics
                    .close_idle
                    .get_or_create(&ClosedByLabels {
                        flow: flow.clone(),
                        closed_by: closed_by.into(),
                    })
                    .observe(0.5);
            }
            for state in ["active", "idle"] {
                metrics
                    .open
                    .get_or_create(&OpenState { flow: flow.clone(), state: state.into() })
                    .set(1);
            }
            metrics.duration.get_or_create(&flow).observe(1.0);
            let protocol = FlowProtocol { flow: flow.clone(), protocol: "http1".into() };
            metrics.requests.get_or_create(&protocol).observe(3.0);
            let mut gaps = [0; connscope_common::conn::GAP_BUCKETS];
            gaps[connscope_common::conn::gap_bucket(200_000_000)] = 1;
            metrics.idle.get_or_create(&flow).add(&gaps, 0.2);
            for version in ["1.0", "1.1"] {
                let request = HttpRequest { flow: flow.clone(), http_version: version.into() };
                metrics.http_requests.get_or_create(&request).inc();
            }
            metrics.races.get_or_create(&flow).inc();
            metrics.bytes_sent.get_or_create(&flow).inc_by(100);
            metrics.bytes_received.get_or_create(&flow).inc_by(100);
        }
    }
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let mut registry = Registry::with_prefix("connscope");
    metrics.register(&mut registry);
    fill(&metrics);

    let mut body = String::new();
    let mut encodes = Vec::new();
    for _ in 0..9 {
        body.clear();
        let started = Instant::now();
        prometheus_client::encoding::text::encode(&mut body, &registry)?;
        encodes.push(started.elapsed());
    }
    let samples = body.lines().filter(|line| !line.starts_with('#')).count();
    let mut gzips = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(body.as_bytes())?;
        encoder.finish()?;
        gzips.push(started.elapsed());
    }
    println!(
        "full caps: {samples} samples, {:.1} MB; encode median {:?}, gzip (fast) median {:?}",
        body.len() as f64 / 1e6,
        median(encodes),
        median(gzips)
    );

    // Real scrapes over HTTP of the real server, 200 ms apart, as a busy scraper would.
    let state = Arc::new(AppState::new(registry));
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let address = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let web = Arc::new(WebSettings::load(None)?);
        tokio::spawn(server::serve(listener, web, state, stopped));
        anyhow::Ok(address)
    })?;
    for accept in ["identity", "gzip"] {
        let (mut scrapes, mut first_bytes, mut bytes) = (Vec::new(), Vec::new(), 0);
        let mut response = Vec::with_capacity(body.len() * 2);
        for _ in 0..12 {
            let started = Instant::now();
            let mut stream = TcpStream::connect(address)?;
            write!(stream, "GET /metrics HTTP/1.0\r\nAccept-Encoding: {accept}\r\n\r\n")?;
            response.clear();
            response.resize(64 * 1024, 0);
            let first = stream.read(&mut response)?;
            first_bytes.push(started.elapsed());
            response.truncate(first);
            stream.read_to_end(&mut response)?;
            scrapes.push(started.elapsed());
            bytes = response.len();
            std::thread::sleep(Duration::from_millis(200));
        }
        println!(
            "HTTP scrapes 200 ms apart, Accept-Encoding {accept}: first {:?}, then first byte \
             median {:?}, last byte median {:?}, max {:?}; {:.2} MB on the wire",
            scrapes[0],
            median(first_bytes[1..].to_vec()),
            median(scrapes[1..].to_vec()),
            scrapes[1..].iter().max().copied().unwrap_or_default(),
            bytes as f64 / 1e6,
        );
    }
    Ok(())
}
