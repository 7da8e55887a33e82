//! `tracing` set-up. aya-log and other `log` records reach it through the `log` bridge
//! that `tracing-subscriber` installs.
use tracing_subscriber::EnvFilter;

/// `level` is a `--log.level` value (error, warn, info, debug, trace) or a full
/// `EnvFilter` directive; `RUST_LOG` wins when set.
pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
