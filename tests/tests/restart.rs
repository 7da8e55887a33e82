//! Restart under traffic against nginx, whose `$connection_requests` is the truth: the
//! second agent reports every connection in full (`continuity::restart_with`).
//! The same against the tests' own HTTP server, `connscope cleanup` and pinned state of
//! another layout are in `kernel_continuity`, which the VM tier runs on every backend.
//!
//! Host tier only (not `kernel_*`, so not in `cargo xtask vm-test`): the VM's initramfs
//! does not carry nginx.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use connscope_tests::{
    Scrape,
    continuity::{
        BpfFs, Restarted, SHORT, SHORT_REQUESTS, Stop, WAIT, assert_nothing_lost, restart_with,
        scrape_after_restart,
    },
    free_port, kernel_test,
    nginx::{Nginx, NginxConfig, SelfSignedTls},
};

/// Restart under traffic against nginx, the first agent ending as `stop` says; checked
/// against nginx's `$connection_requests`.
fn against_nginx(tag: &str, stop: Stop) -> anyhow::Result<()> {
    let fs = BpfFs::mount(tag)?;
    let nginx = Nginx::start(NginxConfig {
        port: free_port(),
        keepalive_timeout: Duration::from_secs(60),
        keepalive_requests: 100_000,
        workers: 1,
        advertise_keep_alive: false,
    })?;
    // `http_server::request` reads a 2-byte body.
    std::fs::write(nginx.dir.join("html/resource"), "ok")?;
    let server = nginx.server();
    let Restarted { second, first_last, pooled_requests } = restart_with(&fs, &server, stop)?;
    let scrape = scrape_after_restart(&second, &server)?;

    let mut truth: Vec<u64> = nginx.requests_per_connection()?.into_values().collect();
    truth.sort_unstable();
    let mut expected = vec![SHORT_REQUESTS; SHORT];
    expected.push(pooled_requests);
    expected.sort_unstable();
    assert_eq!(truth, expected, "nginx's $connection_requests");
    assert_nothing_lost(&scrape, &first_last, &server, pooled_requests);
    assert_eq!(fs.link_generations_settled(), vec!["2".to_owned()]);
    eprintln!(
        "{stop:?} under traffic: {pooled_requests} pooled requests and {SHORT} short connections, 0 lost"
    );
    Ok(())
}

kernel_test!(
    fn restart_under_traffic_loses_no_connection_and_no_request() -> anyhow::Result<()> {
        against_nginx("restart", Stop::Graceful)
    }
);

kernel_test!(
    /// The first agent killed with SIGKILL: the second recovers from its checkpoint.
    fn a_crash_under_traffic_loses_no_connection_and_no_request() -> anyhow::Result<()> {
        against_nginx("crash", Stop::Crash)
    }
);

kernel_test!(
    /// Decrypted HTTPS across a restart: a pooled Python `http.client` HTTPS connection makes a
    /// request every 20 ms while the first agent stops, no agent runs for half a second, and
    /// the second starts. The libssl uprobes' links are pinned with the rest, so their
    /// plaintext is counted while no agent runs, and during the takeover a libssl call is
    /// finished once, by whichever generation removes it from the pinned `TLS_CALLS` (a
    /// read's return probe, the send hook of a write's first ciphertext). The second agent
    /// reports the connection with nginx's `$connection_requests`, on both ends.
    fn decrypted_https_across_a_restart_loses_no_request() -> anyhow::Result<()> {
        let fs = BpfFs::mount("restart-tls")?;
        let tls = SelfSignedTls::new("restart-tls")?;
        let port = free_port();
        let extra = format!(
            "log_format tls '$connection $connection_requests';\n\
         server {{ listen 127.0.0.1:{port} ssl; {directives}\n\
           keepalive_timeout 60s; keepalive_requests 100000;\n\
           access_log tls.log tls; root html; }}\n",
            directives = tls.directives,
        );
        let nginx = Nginx::start_with(
            NginxConfig {
                port: free_port(),
                keepalive_timeout: Duration::from_secs(60),
                keepalive_requests: 100_000,
                workers: 1,
                advertise_keep_alive: false,
            },
            &extra,
        )?;
        let first = fs.agent()?;
        let stop = tls.dir.join("stop");
        // Bounded: stopped by the file within seconds; 1,500 requests (30 s) at most.
        let script = format!(
            "import http.client, os, ssl, time\n\
         c = http.client.HTTPSConnection('127.0.0.1', {port}, context=ssl._create_unverified_context())\n\
         n = 0\n\
         while not os.path.exists('{stop}') and n < 1500:\n\
         \x20   c.request('GET', '/index.html'); c.getresponse().read(); n += 1; time.sleep(0.02)\n\
         c.close()\n\
         print(n)\n",
            stop = stop.display(),
        );
        let client = Command::new("python3")
            .args(["-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(500));
        let (_, code) = first.stop_scraping()?;
        anyhow::ensure!(code == Some(0), "the first agent exited with {code:?}");
        std::thread::sleep(Duration::from_millis(500));
        let second = fs.agent()?;
        std::thread::sleep(Duration::from_millis(500));
        std::fs::write(&stop, "")?;
        let output = client.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        anyhow::ensure!(
            output.status.success(),
            "python client: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let requests: u64 = stdout.trim().parse()?;

        let truth: Vec<u64> = nginx.requests_per_connection_in("tls.log")?.into_values().collect();
        assert_eq!(truth, vec![requests], "nginx's $connection_requests");
        let server = format!("127.0.0.1:{port}");
        let closed = |s: &Scrape, role: &str| {
            s.sum("connscope_connections_closed_total", &[("server", &server), ("role", role)])
        };
        let scrape = second
            .scrape_until(WAIT, |s| closed(s, "client") >= 1.0 && closed(s, "server") >= 1.0)?;
        for role in ["client", "server"] {
            let labels = [("server", server.as_str()), ("role", role)];
            let counted = scrape.sum("connscope_http_requests_total", &labels);
            assert_eq!(counted, requests as f64, "{role}: {}", scrape.text);
            let connections = scrape.sum("connscope_connection_requests_sum", &labels);
            assert_eq!(connections, requests as f64, "{role} requests per connection");
        }
        eprintln!("decrypted HTTPS across a restart: {requests} requests, 0 lost");
        Ok(())
    }
);
