//! The exporter-toolkit web configuration file (node_exporter's `--web.config.file`):
//! the same keys, the same checks, the same client auth policies.

use std::{collections::BTreeMap, path::Path, path::PathBuf, sync::Arc};

use anyhow::{Context as _, bail};
use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
    version::{TLS12, TLS13},
};
use serde::Deserialize;

use super::any_client_cert::AnyClientCert;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebConfigFile {
    #[serde(default)]
    tls_server_config: Option<TlsServerConfig>,
    /// User name to bcrypt hash.
    #[serde(default)]
    basic_auth_users: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsServerConfig {
    #[serde(default)]
    cert_file: Option<PathBuf>,
    #[serde(default)]
    key_file: Option<PathBuf>,
    #[serde(default)]
    client_ca_file: Option<PathBuf>,
    #[serde(default)]
    client_auth_type: Option<ClientAuth>,
    #[serde(default)]
    min_version: Option<TlsVersion>,
    #[serde(default)]
    max_version: Option<TlsVersion>,
}

/// Go's `tls.ClientAuthType` names, as exporter-toolkit spells them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum ClientAuth {
    #[default]
    NoClientCert,
    RequestClientCert,
    RequireAnyClientCert,
    VerifyClientCertIfGiven,
    RequireAndVerifyClientCert,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub enum TlsVersion {
    TLS12,
    TLS13,
}

/// A loaded web configuration: what the server enforces.
#[derive(Debug, Default)]
pub struct WebConfig {
    /// None: plain HTTP (basic auth may still apply, as in exporter-toolkit).
    pub tls: Option<Arc<ServerConfig>>,
    /// User name to bcrypt hash; empty: no authentication.
    pub users: BTreeMap<String, String>,
    /// Every file read, so the server can tell when to read them again.
    pub files: Vec<PathBuf>,
}

impl WebConfig {
    /// Reads and checks `path` and every file it names; errors name the file and the problem.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --web.config.file {}", path.display()))?;
        let file: WebConfigFile = serde_yaml::from_str(&text)
            .with_context(|| format!("invalid --web.config.file {}", path.display()))?;
        Self::build(file, path)
            .with_context(|| format!("invalid --web.config.file {}", path.display()))
    }

    fn build(file: WebConfigFile, path: &Path) -> anyhow::Result<Self> {
        // Relative paths are relative to the web config file, as in exporter-toolkit.
        let base = path.parent().unwrap_or(Path::new("."));
        let mut files = vec![path.to_path_buf()];
        let users = file.basic_auth_users.unwrap_or_default();
        for (user, hash) in &users {
            if hash.parse::<bcrypt::HashParts>().is_err() {
                bail!("basic_auth_users: the hash of user {user:?} is not a bcrypt hash");
            }
        }
        let tls = match file.tls_server_config {
            Some(tls) if tls.cert_file.is_some() || tls.key_file.is_some() => {
                Some(Arc::new(tls.server_config(base, &mut files)?))
            }
            Some(tls) if tls.client_ca_file.is_some() || tls.client_auth_type.is_some() => {
                bail!("tls_server_config: cert_file and key_file are required")
            }
            _ => None,
        };
        Ok(Self { tls, users, files })
    }
}

impl TlsServerConfig {
    fn server_config(self, base: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<ServerConfig> {
        let (Some(cert_file), Some(key_file)) = (&self.cert_file, &self.key_file) else {
            bail!("tls_server_config: cert_file and key_file must both be set");
        };
        let cert_file = base.join(cert_file);
        let key_file = base.join(key_file);
        let certs = read_certs(&cert_file, "cert_file")?;
        let key = PrivateKeyDer::from_pem_file(&key_file)
            .map_err(|err| anyhow::anyhow!("key_file {}: {err}", key_file.display()))?;
        files.extend([cert_file.clone(), key_file.clone()]);

        let provider = crypto_provider();
        let auth = self.client_auth_type.unwrap_or_default();
        let verifier = match (&self.client_ca_file, auth) {
            (Some(_), ClientAuth::NoClientCert) => {
                bail!(
                    "tls_server_config: client_ca_file is set but client_auth_type is NoClientCert"
                )
            }
            (
                None,
                ClientAuth::VerifyClientCertIfGiven | ClientAuth::RequireAndVerifyClientCert,
            ) => {
                bail!("tls_server_config: client_auth_type {auth:?} needs client_ca_file")
            }
            (_, ClientAuth::NoClientCert) => None,
            (_, ClientAuth::RequestClientCert) => Some(AnyClientCert::verifier(&provider, false)),
            (_, ClientAuth::RequireAnyClientCert) => Some(AnyClientCert::verifier(&provider, true)),
            (Some(ca_file), verify) => {
                let ca_file = base.join(ca_file);
                let roots = read_roots(&ca_file)?;
                files.push(ca_file);
                let builder =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
                let builder = if verify == ClientAuth::VerifyClientCertIfGiven {
                    builder.allow_unauthenticated()
                } else {
                    builder
                };
                Some(builder.build().context("client_ca_file")?)
            }
        };

        let min = self.min_version.unwrap_or(TlsVersion::TLS12);
        let max = self.max_version.unwrap_or(TlsVersion::TLS13);
        if min > max {
            bail!("tls_server_config: min_version {min:?} is above max_version {max:?}");
        }
        let versions: Vec<_> = [(TlsVersion::TLS12, &TLS12), (TlsVersion::TLS13, &TLS13)]
            .into_iter()
            .filter(|(version, _)| (min..=max).contains(version))
            .map(|(_, version)| version)
            .collect();
        let builder = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&versions)
            .context("tls_server_config: TLS versions")?;
        let builder = match verifier {
            Some(verifier) => builder.with_client_cert_verifier(verifier),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|err| {
            anyhow::anyhow!(
                "cert_file {} / key_file {}: {err}",
                cert_file.display(),
                key_file.display()
            )
        })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

fn read_roots(ca_file: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca_file, "client_ca_file")? {
        roots
            .add(cert)
            .map_err(|err| anyhow::anyhow!("client_ca_file {}: {err}", ca_file.display()))?;
    }
    Ok(roots)
}

/// Every certificate of a PEM file (at least one); `what` names the setting in errors.
pub fn read_certs(path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| anyhow::anyhow!("{what} {}: {err}", path.display()))?;
    if certs.is_empty() {
        bail!("{what} {}: no certificate in it", path.display());
    }
    Ok(certs)
}

/// The provider every TLS config of the agent uses (ring).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
