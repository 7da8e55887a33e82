//! Restart under traffic against nginx, whose `$connection_requests` is the truth: the
//! second agent reports every connection in full (`continuity::restart_under_traffic`).
//! The same against the tests' own HTTP server, `connscope cleanup` and pinned state of
//! another layout are in `kernel_continuity`, which the VM tier runs on every backend.
//!
//! Host tier only (not `kernel_*`, so not in `cargo xtask vm-test`): the VM's initramfs
//! does not carry nginx.

use std::time::Duration;

use connscope_tests::{
    continuity::{
        BpfFs, Restarted, SHORT, SHORT_REQUESTS, assert_nothing_lost, restart_under_traffic,
        scrape_after_restart,
    },
    free_port, kernel_tests_enabled,
    nginx::{Nginx, NginxConfig},
};

#[test]
fn restart_under_traffic_loses_no_connection_and_no_request() -> anyhow::Result<()> {
    if !kernel_tests_enabled("restart_under_traffic_loses_no_connection_and_no_request") {
        return Ok(());
    }
    let fs = BpfFs::mount("restart")?;
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
    let Restarted { second, first_last, pooled_requests } = restart_under_traffic(&fs, &server)?;
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
        "restart under traffic: {pooled_requests} pooled requests and {SHORT} short connections, 0 lost"
    );
    Ok(())
}
