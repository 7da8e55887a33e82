//! The connscope agent as a library: `main.rs` only parses flags and calls [`agent::run`].
//!
//! Data flow: [`probes`] loads and attaches the kernel programs; [`agent`] drains their ring
//! buffer through [`events`] (decoding) into [`table`] (one entry per live connection, HTTP
//! heads parsed by [`http`]), which updates [`metrics`]; [`server`] serves them.

pub mod adoption;
pub mod agent;
pub mod backlog;
pub mod bucket_histogram;
pub mod carry;
pub mod classify;
pub mod config;
pub mod events;
pub mod flow_series;
pub mod flows;
pub mod handover;
pub mod hooks;
pub mod http;
pub mod http_session;
pub mod kernel_facts;
pub mod kernel_layout;
pub mod kernel_stats;
pub mod labels;
pub mod logging;
pub mod metrics;
pub mod pinning;
pub mod placement;
pub mod preflight;
pub mod probes;
pub mod scrape_cache;
pub mod server;
pub mod shutdown;
pub mod table;
pub mod tls_targets;
pub mod tls_uprobes;
pub mod uprobe_links;
pub mod web;
