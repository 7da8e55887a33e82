//! Fetches `/metrics` over HTTP or HTTPS, with the client side of `--web.config.file`:
//! a CA, a client certificate, basic auth.

use std::{path::PathBuf, sync::Arc};

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use http_body_util::{BodyExt as _, Empty};
use hyper::{
    Request, Uri,
    body::Bytes,
    header::{ACCEPT, AUTHORIZATION, HOST},
};
use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _},
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

use crate::exposition::web::{config::read_certs, crypto_provider};

/// How long one scrape may take, connect to last byte.
const SCRAPE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// CA certificate (PEM) to check the agent's certificate against (https).
    #[arg(long = "tls.ca-file", env = "CONNSCOPE_FLOWS_TLS_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for agents that ask for one.
    #[arg(long = "tls.cert-file", env = "CONNSCOPE_FLOWS_TLS_CERT_FILE", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// Key of --tls.cert-file (PEM).
    #[arg(long = "tls.key-file", env = "CONNSCOPE_FLOWS_TLS_KEY_FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// Name to check the certificate against (default: the URL's host).
    #[arg(long = "tls.server-name", env = "CONNSCOPE_FLOWS_TLS_SERVER_NAME")]
    pub server_name: Option<String>,
    /// Do not check the agent's certificate at all.
    #[arg(long = "tls.insecure-skip-verify")]
    pub insecure_skip_verify: bool,
    /// Basic auth user.
    #[arg(long = "basic-auth.username", env = "CONNSCOPE_FLOWS_USERNAME")]
    pub username: Option<String>,
    /// Basic auth password (prefer the environment variable or --basic-auth.password-file).
    #[arg(
        long = "basic-auth.password",
        env = "CONNSCOPE_FLOWS_PASSWORD",
        hide_env_values = true,
        conflicts_with = "password_file"
    )]
    pub password: Option<String>,
    /// File holding the basic auth password (trailing newline ignored).
    #[arg(long = "basic-auth.password-file", env = "CONNSCOPE_FLOWS_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
}

/// A client for one URL, built once and used for every scrape.
pub struct MetricsClient {
    uri: Uri,
    host: String,
    port: u16,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    authorization: Option<String>,
}

impl MetricsClient {
    pub fn new(url: &str, args: &ClientArgs) -> anyhow::Result<Self> {
        // `host:port` alone means plain HTTP, as in Prometheus' targets.
        let full = if url.contains("://") { url.to_owned() } else { format!("http://{url}") };
        let uri: Uri = full.parse().with_context(|| format!("invalid --url {url:?}"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => bail!("invalid --url {url:?}: expected http://host:port or https://host:port"),
        };
        let host = uri.host().ok_or_else(|| anyhow!("invalid --url {url:?}: no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = match uri.path() {
            "" | "/" => "/metrics",
            path => path,
        };
        let uri: Uri =
            format!("{path}{}", uri.query().map(|q| format!("?{q}")).unwrap_or_default())
                .parse()
                .with_context(|| format!("invalid --url {url:?}"))?;
        let tls = if https {
            let name = args.server_name.clone().unwrap_or_else(|| host.clone());
            let name = ServerName::try_from(name.clone())
                .map_err(|_| anyhow!("invalid TLS server name {name:?}"))?;
            Some((TlsConnector::from(Arc::new(tls_config(args)?)), name))
        } else {
            None
        };
        Ok(Self { uri, host, port, tls, authorization: authorization(args)? })
    }

    /// The exposition text, or why there is none.
    pub async fn scrape(&self) -> anyhow::Result<String> {
        let address = format!("{}:{}", self.host, self.port);
        tokio::time::timeout(SCRAPE_TIMEOUT, self.fetch(&address))
            .await
            .map_err(|_| anyhow!("{address}: no answer within {SCRAPE_TIMEOUT:?}"))?
    }

    async fn fetch(&self, address: &str) -> anyhow::Result<String> {
        let stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("cannot connect to {address}"))?;
        match &self.tls {
            Some((connector, name)) => {
                let stream = connector
                    .connect(name.clone(), stream)
                    .await
                    .with_context(|| format!("TLS with {address}"))?;
                self.get(stream, address).await
            }
            None => self.get(stream, address).await,
        }
    }

    async fn get(
        &self,
        stream: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
        address: &str,
    ) -> anyhow::Result<String> {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let mut request = Request::get(self.uri.clone())
            .header(HOST, address)
            .header(ACCEPT, "application/openmetrics-text, text/plain");
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization);
        }
        let response = sender.send_request(request.body(Empty::<Bytes>::new())?).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            let hint = if status == hyper::StatusCode::UNAUTHORIZED {
                " (check --basic-auth.username and the password)"
            } else {
                ""
            };
            bail!("{address}{} answered {status}{hint}", self.uri);
        }
        String::from_utf8(body.to_vec()).map_err(|_| anyhow!("{address}: the body is not UTF-8"))
    }
}

fn authorization(args: &ClientArgs) -> anyhow::Result<Option<String>> {
    let password = match (&args.password, &args.password_file) {
        (Some(password), _) => Some(password.clone()),
        (None, Some(file)) => Some(
            std::fs::read_to_string(file)
                .with_context(|| {
                    format!("cannot read --basic-auth.password-file {}", file.display())
                })?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
        ),
        (None, None) => None,
    };
    Ok(match (&args.username, password) {
        (Some(user), password) => {
            let pair = format!("{user}:{}", password.unwrap_or_default());
            Some(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair)))
        }
        (None, Some(_)) => bail!("a basic auth password needs --basic-auth.username"),
        (None, None) => None,
    })
}

fn tls_config(args: &ClientArgs) -> anyhow::Result<ClientConfig> {
    let provider = crypto_provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?;
    let builder = if args.insecure_skip_verify {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(NoServerCheck(
            provider.signature_verification_algorithms,
        )))
    } else {
        let ca_file = args.ca_file.as_ref().ok_or_else(|| {
            anyhow!("https needs --tls.ca-file (the CA of the agent's certificate) or --tls.insecure-skip-verify")
        })?;
        let mut roots = RootCertStore::empty();
        for cert in read_certs(ca_file, "--tls.ca-file")? {
            roots.add(cert).map_err(|err| anyhow!("--tls.ca-file {}: {err}", ca_file.display()))?;
        }
        builder.with_root_certificates(roots)
    };
    match (&args.cert_file, &args.key_file) {
        (Some(cert_file), Some(key_file)) => {
            let certs = read_certs(cert_file, "--tls.cert-file")?;
            let key = PrivateKeyDer::from_pem_file(key_file)
                .map_err(|err| anyhow!("--tls.key-file {}: {err}", key_file.display()))?;
            builder.with_client_auth_cert(certs, key).context("--tls.cert-file / --tls.key-file")
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// `--tls.insecure-skip-verify`: any certificate, but the handshake signature still checked.
#[derive(Debug)]
struct NoServerCheck(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for NoServerCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
