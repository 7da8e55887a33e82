//! `tracing` set-up. aya-log and other `log` records reach it through the `log` bridge
//! that `tracing-subscriber` installs.
use tracing_subscriber::EnvFilter;

use crate::config::LogLevel;

/// `--log.filter` when given (validated with the settings), else `--log.level`; `RUST_LOG`
/// wins over both when set.
pub fn init(level: LogLevel, filter: Option<&str>) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter.unwrap_or(level.directive())))
        .unwrap_or_else(|_| EnvFilter::new(level.directive()));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
