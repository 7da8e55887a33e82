//! SIGTERM/SIGINT as one future, so every task stops on the same signal.
use tokio::signal::unix::{SignalKind, signal};

/// Resolves on the first SIGTERM or SIGINT and returns its name.
pub async fn signal_received() -> &'static str {
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::warn!("cannot listen for SIGTERM: {err}; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}
