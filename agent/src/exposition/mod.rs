//! What Prometheus and people read: the metric families registered from the metric table,
//! the per-flow series, values read from maps at scrape time, the scrape cache and the web
//! server.

pub mod bucket_histogram;
pub mod carry;
pub mod family;
pub mod flow_series;
pub mod kernel_stats;
pub mod labels;
pub mod listen;
pub mod metrics;
pub mod scrape_cache;
pub mod server;
pub mod status;
pub mod web;
