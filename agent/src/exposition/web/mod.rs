//! `--web.config.file`: TLS and basic auth for every endpoint, as node_exporter does it
//! (exporter-toolkit). The file and the certificates it names are read again when one of
//! them changes (checked on each new connection and request), or on SIGHUP, so renewed
//! certificates need no restart.

mod any_client_cert;
pub mod auth;
pub mod config;

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

pub use self::config::{WebConfig, crypto_provider};

/// Size, mtime and inode of each file: a Kubernetes Secret update swaps the file, a
/// certificate renewal rewrites it; either changes one of these.
type Stamps = Vec<Option<(u64, i64, i64, u64)>>;

fn stamps(files: &[PathBuf]) -> Stamps {
    files
        .iter()
        .map(|file| {
            std::fs::metadata(file)
                .ok()
                .map(|meta| (meta.len(), meta.mtime(), meta.mtime_nsec(), meta.ino()))
        })
        .collect()
}

/// The web configuration in force, and how to tell it is out of date.
pub struct WebSettings {
    path: Option<PathBuf>,
    current: RwLock<(Arc<WebConfig>, Stamps)>,
    pub auth: auth::AuthCache,
}

impl WebSettings {
    /// Loads `path` (None: plain HTTP, no auth); a bad file is an error for the caller to report.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let config = match path {
            Some(path) => WebConfig::load(path)?,
            None => WebConfig::default(),
        };
        let stamps = stamps(&config.files);
        Ok(Self {
            path: path.map(Path::to_path_buf),
            current: RwLock::new((Arc::new(config), stamps)),
            auth: auth::AuthCache::default(),
        })
    }

    /// Reads the files again on the next use, changed or not (SIGHUP).
    pub fn reload_on_next_use(&self) {
        if let Ok(mut current) = self.current.write() {
            current.1.clear();
        }
    }

    /// The configuration for a new connection, read again first if a file changed. A file
    /// that no longer loads keeps the last good configuration (and says why in the log).
    pub fn current(&self) -> Arc<WebConfig> {
        let Ok(current) = self.current.read() else { return Arc::new(WebConfig::default()) };
        let Some(path) = &self.path else { return current.0.clone() };
        let (config, old_stamps) = &*current;
        let new_stamps = stamps(&config.files);
        if *old_stamps == new_stamps {
            return config.clone();
        }
        let config = config.clone();
        drop(current);
        let reloaded = WebConfig::load(path);
        let Ok(mut current) = self.current.write() else { return config };
        match reloaded {
            Ok(fresh) => {
                tracing::info!("{} changed: web configuration reloaded", path.display());
                let fresh_stamps = stamps(&fresh.files);
                *current = (Arc::new(fresh), fresh_stamps);
            }
            Err(err) => {
                tracing::error!("{err:#}; keeping the previous web configuration");
                // Do not retry on every connection until a file changes again.
                current.1 = new_stamps;
            }
        }
        current.0.clone()
    }
}
