//! `--web.config.file` as node_exporter users know it: a real Prometheus scrapes over TLS with
//! basic auth and a client certificate; curl checks 401/200 and that plain HTTP gets no
//! metrics; certificate and user changes apply without a restart; bad files fail clearly.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use connscope_tests::{agent_binary, free_port, kernel_test, prometheus::Prometheus};

/// Test certificates made with openssl: a CA, a server certificate for 127.0.0.1 and a
/// client certificate, all in a directory of their own.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn create(tag: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("connscope-pki-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let pki = Self { dir };
        pki.ca("ca")?;
        pki.signed("server", "ca", "subjectAltName=IP:127.0.0.1")?;
        pki.signed("client", "ca", "extendedKeyUsage=clientAuth")?;
        Ok(pki)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn openssl(&self, args: &[&str]) -> anyhow::Result<()> {
        let output = Command::new("openssl").args(args).current_dir(&self.dir).output()?;
        if !output.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(())
    }

    /// `openssl req` making a P-256 key `{name}.key` and, with `extra`, a request or a
    /// self-signed certificate.
    fn new_key(&self, name: &str, extra: &[&str]) -> anyhow::Result<()> {
        let (key, subject) = (format!("{name}.key"), format!("/CN={name}"));
        let curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let args = [&["req"], &curve[..], &["-keyout", &key, "-subj", &subject], extra].concat();
        self.openssl(&args)
    }

    fn ca(&self, name: &str) -> anyhow::Result<()> {
        self.new_key(name, &["-x509", "-days", "1", "-out", &format!("{name}.crt")])
    }

    fn signed(&self, name: &str, ca: &str, extension: &str) -> anyhow::Result<()> {
        let (csr, crt, ext) = (format!("{name}.csr"), format!("{name}.crt"), format!("{name}.ext"));
        std::fs::write(self.path(&ext), format!("{extension}\n"))?;
        self.new_key(name, &["-out", &csr])?;
        let (ca_crt, ca_key) = (format!("{ca}.crt"), format!("{ca}.key"));
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "1",
            "-extfile",
            &ext,
        ])
    }

    /// A web config serving `server.crt`, checking client certificates against `ca.crt` when
    /// given, with the users and passwords given (hashed with bcrypt as htpasswd does).
    fn web_config(&self, client_auth: &str, users: &[(&str, &str)]) -> anyhow::Result<PathBuf> {
        let mut yaml = format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  \
             client_ca_file: ca.crt\n  client_auth_type: {client_auth}\n  min_version: TLS12\n\
             basic_auth_users:\n"
        );
        for (user, password) in users {
            yaml.push_str(&format!("  {user}: '{}'\n", bcrypt::hash(password, 5)?));
        }
        let path = self.path("web.yml");
        // Write beside and rename, as a Secret update does: the agent never reads half a file.
        std::fs::write(self.path("web.yml.new"), yaml)?;
        std::fs::rename(self.path("web.yml.new"), &path)?;
        Ok(path)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An agent behind the web config; `Agent::start` polls plain HTTP, so this polls HTTPS.
struct TlsAgent {
    child: Child,
    port: u16,
}

impl TlsAgent {
    /// Starts the agent and waits until `/readyz` answers 200 to curl with `credentials`.
    fn start(web_config: &Path, pki: &Pki, credentials: &[&str]) -> anyhow::Result<Self> {
        let port = free_port();
        let child = Command::new(agent_binary())
            .args(["--web.listen-address", &format!("127.0.0.1:{port}")])
            .arg("--web.config.file")
            .arg(web_config)
            .env("CONNSCOPE_LOG_LEVEL", "warn")
            // Agents of parallel tests share no pinned state (see `Agent::start`).
            .env("CONNSCOPE_BPF_PIN_PATH", "")
            .stdin(Stdio::null())
            .spawn()
            .context("starting connscope")?;
        let mut agent = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while agent.curl(pki, "/readyz", credentials)?.0 != 200 {
            if let Some(status) = agent.child.try_wait()? {
                bail!("connscope exited during start-up: {status}");
            }
            if Instant::now() > deadline {
                bail!("connscope not ready over TLS after 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(agent)
    }

    fn url(&self, scheme: &str, path: &str) -> String {
        format!("{scheme}://127.0.0.1:{}{path}", self.port)
    }

    /// `curl` over HTTPS trusting the test CA: (status, body); status 0 when no HTTP answer.
    fn curl(&self, pki: &Pki, path: &str, extra: &[&str]) -> anyhow::Result<(u16, String)> {
        curl(
            &[
                &["--cacert", &pki.path("ca.crt").to_string_lossy(), &self.url("https", path)],
                extra,
            ]
            .concat(),
        )
    }
}

impl Drop for TlsAgent {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn curl(args: &[&str]) -> anyhow::Result<(u16, String)> {
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .context("running curl (apt: curl)")?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    Ok((status.trim().parse().unwrap_or(0), body.to_owned()))
}

kernel_test!(
    fn prometheus_scrapes_over_tls_with_basic_auth_and_client_certificate() -> anyhow::Result<()> {
        let pki = Pki::create("prometheus")?;
        let web_config =
            pki.web_config("RequireAndVerifyClientCert", &[("prometheus", "s3cret")])?;
        let (client_crt, client_key) = (pki.path("client.crt"), pki.path("client.key"));
        let (client_crt, client_key) = (client_crt.to_string_lossy(), client_key.to_string_lossy());
        let credentials = ["--cert", &client_crt, "--key", &client_key, "-u", "prometheus:s3cret"];
        let agent = TlsAgent::start(&web_config, &pki, &credentials)?;
        // Without a client certificate the handshake fails: no HTTP answer at all.
        let (status, body) = agent.curl(&pki, "/metrics", &["-u", "prometheus:s3cret"])?;
        assert_eq!(status, 0, "no client certificate must be refused: {body}");

        let job = format!(
            "    scheme: https\n    tls_config:\n      ca_file: {}\n      cert_file: {client_crt}\n      key_file: {client_key}\n\
         \x20   basic_auth:\n      username: prometheus\n      password: s3cret\n",
            pki.path("ca.crt").display(),
        );
        let prometheus = Prometheus::start("tls", &format!("127.0.0.1:{}", agent.port), &job, &[])?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let up = loop {
            let up = prometheus.query("up{job=\"connscope\"}")?;
            let value =
                up.first().and_then(|sample| sample["value"][1].as_str()).map(str::to_owned);
            if value.as_deref() == Some("1") || Instant::now() > deadline {
                break value;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        assert_eq!(up.as_deref(), Some("1"), "Prometheus scraping over TLS + basic auth");
        let build = prometheus.query("connscope_build_info")?;
        assert_eq!(build.len(), 1, "the scrape carried the agent's metrics: {build:?}");
        Ok(())
    }
);

kernel_test!(
    fn tls_port_demands_credentials_and_refuses_plain_http() -> anyhow::Result<()> {
        let pki = Pki::create("auth")?;
        let web_config = pki.web_config("VerifyClientCertIfGiven", &[("prometheus", "s3cret")])?;
        let mut agent = TlsAgent::start(&web_config, &pki, &["-u", "prometheus:s3cret"])?;

        for path in ["/metrics", "/healthz", "/readyz", "/"] {
            let (status, _) = agent.curl(&pki, path, &[])?;
            assert_eq!(status, 401, "{path} without credentials");
            let (status, _) = agent.curl(&pki, path, &["-u", "prometheus:wrong"])?;
            assert_eq!(status, 401, "{path} with a wrong password");
            let (status, _) = agent.curl(&pki, path, &["-u", "nobody:s3cret"])?;
            assert_eq!(status, 401, "{path} with an unknown user");
        }
        let (status, headers) = agent.curl(&pki, "/metrics", &["-o", "/dev/null", "-D", "-"])?;
        assert_eq!(status, 401);
        assert!(headers.to_ascii_lowercase().contains("www-authenticate: basic"), "{headers}");
        let (status, body) = agent.curl(&pki, "/metrics", &["-u", "prometheus:s3cret"])?;
        assert_eq!(status, 200);
        assert!(body.contains("connscope_build_info{"), "metrics over TLS: {body:.200}");
        // Cached verdicts: a scrape with known credentials costs no bcrypt (cost 5 here, ~2 ms;
        // what matters is that repeated scrapes stay correct).
        for _ in 0..3 {
            assert_eq!(agent.curl(&pki, "/healthz", &["-u", "prometheus:s3cret"])?.0, 200);
            assert_eq!(agent.curl(&pki, "/healthz", &["-u", "prometheus:wrong"])?.0, 401);
        }

        // `connscope flows` with the client side of the same settings.
        let password_file = pki.path("password");
        std::fs::write(&password_file, "s3cret\n")?;
        let ca = pki.path("ca.crt");
        let flows = |extra: &[&str]| {
            Command::new(agent_binary())
                .args([
                    "flows",
                    "--url",
                    &agent.url("https", ""),
                    "--interval",
                    "0",
                    "--tls.ca-file",
                ])
                .arg(&ca)
                .args(["--basic-auth.username", "prometheus"])
                .args(extra)
                .output()
        };
        let output = flows(&["--basic-auth.password-file", &password_file.to_string_lossy()])?;
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        assert!(String::from_utf8_lossy(&output.stdout).contains("totals since the agent started"));
        let output = flows(&["--basic-auth.password", "wrong"])?;
        assert!(!output.status.success());
        assert!(String::from_utf8_lossy(&output.stderr).contains("401"), "{output:?}");

        // Plain HTTP on the TLS port: no HTTP answer, no metrics.
        let (status, body) = curl(&[&agent.url("http", "/metrics")])?;
        assert_ne!(status, 200);
        assert!(!body.contains("connscope_"), "plain HTTP must not get metrics: {body:.200}");

        // A new user in the file applies without a restart.
        pki.web_config(
            "VerifyClientCertIfGiven",
            &[("prometheus", "s3cret"), ("grafana", "other")],
        )?;
        assert_eq!(
            agent.curl(&pki, "/metrics", &["-o", "/dev/null", "-u", "grafana:other"])?.0,
            200
        );

        // A renewed certificate from another CA is served on the next connection.
        pki.ca("ca2")?;
        pki.signed("server", "ca2", "subjectAltName=IP:127.0.0.1")?;
        let ca2 = pki.path("ca2.crt").to_string_lossy().into_owned();
        let renewed = curl(&[
            "--cacert",
            &ca2,
            "-u",
            "prometheus:s3cret",
            "-o",
            "/dev/null",
            &agent.url("https", "/healthz"),
        ])?;
        assert_eq!(renewed.0, 200, "the renewed certificate is served");
        assert_eq!(
            agent.curl(&pki, "/healthz", &["-u", "prometheus:s3cret"])?.0,
            0,
            "old CA no longer matches"
        );
        // SIGHUP reads the files again and does not end the agent.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(agent.child.id() as i32, libc::SIGHUP) };
        std::thread::sleep(Duration::from_millis(300));
        assert!(agent.child.try_wait()?.is_none(), "SIGHUP must not stop the agent");
        let after_hangup =
            curl(&["--cacert", &ca2, "-u", "prometheus:s3cret", &agent.url("https", "/healthz")])?;
        assert_eq!(after_hangup.0, 200);
        Ok(())
    }
);

fn start_with(web_config: &Path) -> anyhow::Result<Output> {
    Ok(Command::new(agent_binary())
        .args(["--web.listen-address", "127.0.0.1:0", "--web.config.file"])
        .arg(web_config)
        .env("CONNSCOPE_LOG_LEVEL", "error")
        .env("CONNSCOPE_BPF_PIN_PATH", "")
        .output()?)
}

#[test]
fn bad_web_config_is_one_clear_line() -> anyhow::Result<()> {
    let pki = Pki::create("bad")?;
    let cases = [
        (
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  cipher_suites: []\n",
            "unknown field `cipher_suites`",
        ),
        ("tls_server_config:\n  cert_file: missing.crt\n  key_file: server.key\n", "missing.crt"),
        (
            "tls_server_config:\n  cert_file: server.crt\n",
            "cert_file and key_file must both be set",
        ),
        (
            "tls_server_config:\n  cert_file: server.key\n  key_file: server.key\n",
            "no certificate in it",
        ),
        (
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: Sometimes\n",
            "unknown variant `Sometimes`",
        ),
        (
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: RequireAndVerifyClientCert\n",
            "needs client_ca_file",
        ),
        ("basic_auth_users:\n  prometheus: s3cret\n", "is not a bcrypt hash"),
        ("tls_server_config: [\n", "invalid --web.config.file"),
    ];
    for (index, (yaml, expected)) in cases.iter().enumerate() {
        let path = pki.path(&format!("bad-{index}.yml"));
        std::fs::write(&path, yaml)?;
        let output = start_with(&path)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().last().unwrap_or_default();
        assert!(!output.status.success(), "{yaml}: should fail");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(last.contains(&path.display().to_string()), "the line names the file: {last}");
        assert!(last.contains(expected), "expected `{expected}` in: {last}");
    }
    let output = start_with(&pki.path("absent.yml"))?;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot read --web.config.file"));
    Ok(())
}

#[test]
fn kubernetes_overlay_mounts_the_secret_read_only() -> anyhow::Result<()> {
    let overlay =
        connscope_tests::grafana::repo_root().join("deploy/kubernetes/overlays/web-config");
    let output = Command::new("kubectl").arg("kustomize").arg(&overlay).output();
    let output = match output {
        Ok(output) => output,
        Err(err) => {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "kubectl missing in CI: {err}");
            eprintln!("skipping: kubectl missing ({err}); `cargo xtask setup` installs it");
            return Ok(());
        }
    };
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout)?;
    let daemonset = text
        .split("\n---\n")
        .map(serde_yaml::from_str::<serde_yaml::Value>)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .find(|doc| doc["kind"] == "DaemonSet")
        .context("no DaemonSet rendered")?;
    let pod = &daemonset["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let has = |list: &serde_yaml::Value, wanted: &serde_yaml::Value| {
        list.as_sequence().into_iter().flatten().any(|item| item == wanted)
    };
    let flag = serde_yaml::Value::from("--web.config.file=/etc/connscope/web/web-config.yml");
    assert!(has(&container["args"], &flag), "{container:?}");
    let mount: serde_yaml::Value =
        serde_yaml::from_str("{name: web-config, mountPath: /etc/connscope/web, readOnly: true}")?;
    assert!(has(&container["volumeMounts"], &mount), "{container:?}");
    let volumes = pod["volumes"].as_sequence().into_iter().flatten();
    let secret = volumes
        .filter(|volume| volume["name"] == "web-config")
        .map(|volume| &volume["secret"]["secretName"])
        .next();
    assert_eq!(secret, Some(&serde_yaml::Value::from("connscope-web-config")));
    // Every endpoint needs credentials the kubelet does not have: TCP probes.
    for probe in ["livenessProbe", "readinessProbe"] {
        assert!(container[probe]["httpGet"].is_null(), "{probe}: {:?}", container[probe]);
        assert_eq!(container[probe]["tcpSocket"]["port"], "metrics");
    }
    Ok(())
}
