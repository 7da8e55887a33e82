//! A private nginx (Debian's package) on loopback, with the keep-alive settings a test sets
//! and an access log of `$connection $connection_requests` as ground truth.

use std::{
    collections::BTreeMap,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

#[derive(Clone, Copy, Debug)]
pub struct NginxConfig {
    pub port: u16,
    pub keepalive_timeout: Duration,
    pub keepalive_requests: u32,
    /// Worker processes (1 keeps the log's `$connection` numbers unique and dense).
    pub workers: u32,
    /// Send `Keep-Alive: timeout=<s>, max=<requests>` on keep-alive responses, as Apache
    /// does (nginx itself sends none by default).
    pub advertise_keep_alive: bool,
}

/// A running nginx; stopped (and its temp dir removed) on drop.
pub struct Nginx {
    child: Child,
    pub dir: PathBuf,
    pub port: u16,
}

impl Nginx {
    pub fn start(config: NginxConfig) -> anyhow::Result<Self> {
        Self::start_with(config, "")
    }

    /// Like [`Nginx::start`], with `extra` added to the `http` block (more `server`s, e.g.
    /// with `ssl` or `http2`, each with an access log of its own).
    pub fn start_with(config: NginxConfig, extra: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "connscope-nginx-{}-{}",
            std::process::id(),
            config.port
        ));
        std::fs::create_dir_all(dir.join("html"))?;
        std::fs::write(dir.join("html/index.html"), "hello from nginx\n")?;
        std::fs::write(dir.join("html/big.bin"), vec![b'x'; 64 * 1024])?;
        let conf = render_config(&dir, config, extra);
        std::fs::write(dir.join("nginx.conf"), conf)?;
        let child = Command::new("nginx")
            .args(["-c", &dir.join("nginx.conf").to_string_lossy(), "-p", &dir.to_string_lossy()])
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting nginx (apt: nginx)")?;
        let nginx = Self { child, dir, port: config.port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", config.port)).is_err() {
            if Instant::now() > deadline {
                bail!("nginx did not listen on port {}", config.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(nginx)
    }

    /// The master's pid and its workers'.
    pub fn pids(&self) -> Vec<u32> {
        let master = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
            .unwrap_or_default();
        std::iter::once(master)
            .chain(children.split_whitespace().filter_map(|pid| pid.parse().ok()))
            .collect()
    }

    pub fn server(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Requests per connection from nginx's own log, keyed by `$connection`, excluding the
    /// connection the readiness probe above made (it sent no request).
    pub fn requests_per_connection(&self) -> anyhow::Result<BTreeMap<u64, u64>> {
        self.requests_per_connection_in("access.log")
    }

    /// nginx's error log (level `warn`), to explain a failed request in a test's error.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log"))
            .unwrap_or_else(|err| format!("no error.log: {err}"))
    }

    /// The same from the `ground_truth` access log `log` in [`Nginx::dir`].
    pub fn requests_per_connection_in(&self, log: &str) -> anyhow::Result<BTreeMap<u64, u64>> {
        let log = std::fs::read_to_string(self.dir.join(log))?;
        let mut per_connection = BTreeMap::new();
        for line in log.lines() {
            let mut fields = line.split_whitespace();
            let (Some(connection), Some(requests)) = (fields.next(), fields.next()) else {
                continue;
            };
            let connection: u64 = connection.parse()?;
            let requests: u64 = requests.parse()?;
            let entry = per_connection.entry(connection).or_insert(0);
            *entry = (*entry).max(requests);
        }
        Ok(per_connection)
    }
}

/// A self-signed certificate for `localhost` in a temporary directory of its own, removed
/// when dropped, and the nginx directives that serve it (for `ssl` servers).
pub struct SelfSignedTls {
    pub dir: PathBuf,
    /// `ssl_certificate …; ssl_certificate_key …;`
    pub directives: String,
}

impl SelfSignedTls {
    /// `name` tells the directory apart (with the process id).
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("connscope-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        // Made first, so a failure below still removes the directory.
        let mut tls = Self { dir, directives: String::new() };
        let (cert, key) = self_signed_certificate(&tls.dir)?;
        tls.directives =
            format!("ssl_certificate {}; ssl_certificate_key {};", cert.display(), key.display());
        Ok(tls)
    }
}

impl Drop for SelfSignedTls {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A self-signed certificate and key for `localhost` in `dir`.
fn self_signed_certificate(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let output = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"])
        // The name also as a subjectAltName: gRPC's BoringSSL checks that, not the CN.
        .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdin(Stdio::null())
        .output()
        .context("making the self-signed certificate with openssl (Debian package openssl)")?;
    if !output.status.success() {
        bail!("openssl req failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok((cert, key))
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SAFETY: signalling our own child (SIGQUIT: graceful shutdown).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGQUIT) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn render_config(dir: &Path, config: NginxConfig, extra: &str) -> String {
    let dir = dir.display();
    let NginxConfig { port, keepalive_timeout, keepalive_requests, workers, advertise_keep_alive } =
        config;
    let timeout_ms = keepalive_timeout.as_millis();
    let advertise = if advertise_keep_alive {
        format!(
            "add_header Keep-Alive \"timeout={}, max={keepalive_requests}\";",
            keepalive_timeout.as_secs()
        )
    } else {
        String::new()
    };
    format!(
        "worker_processes {workers};\n\
         pid {dir}/nginx.pid;\n\
         error_log {dir}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
           log_format ground_truth '$connection $connection_requests $status';\n\
           access_log {dir}/access.log ground_truth;\n\
           client_body_temp_path {dir}/body;\n\
           proxy_temp_path {dir}/proxy;\n\
           fastcgi_temp_path {dir}/fastcgi;\n\
           uwsgi_temp_path {dir}/uwsgi;\n\
           scgi_temp_path {dir}/scgi;\n\
           keepalive_timeout {timeout_ms}ms;\n\
           keepalive_requests {keepalive_requests};\n\
           server {{\n\
             listen 127.0.0.1:{port};\n\
             root {dir}/html;\n\
             {advertise}\n\
           }}\n\
           {extra}\n\
         }}\n"
    )
}
