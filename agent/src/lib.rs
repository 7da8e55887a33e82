//! The connscope agent as a library: `main.rs` only parses flags and calls [`agent::run`].
//!
//! Four stages, each a folder, importing only downwards (docs/architecture.md, "Module
//! map"):
//! - [`model`]: the vocabulary every stage shares: label sets, reasons, the metric table;
//! - [`exposition`]: the metric families, per-flow series, the scrape cache and the web
//!   server;
//! - [`kernel`]: checking, loading, attaching and pinning the kernel programs, the TLS
//!   uprobes and the start-up adoption scan;
//! - [`pipeline`]: ring buffer records → the connection table → the metrics.
//!
//! [`agent`] wires them ([`agent::Agent::build`], then `run`); [`flows`] is the `connscope
//! flows` client beside them.

pub mod agent;
pub mod config;
pub mod exposition;
pub mod flows;
pub mod kernel;
pub mod logging;
pub mod model;
pub mod pipeline;
pub mod shutdown;
