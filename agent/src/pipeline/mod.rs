//! From the ring buffer to the metrics: decoding records, the connection table, HTTP heads
//! and sessions, close classification, the socket census attributed to flows (TIME_WAIT,
//! ports), and the state handed from one agent to the next.

pub mod backlog;
pub mod checkpoint;
pub mod classify;
pub mod driver;
pub mod events;
pub mod handover;
pub mod head_memo;
pub mod http;
pub mod http_session;
pub mod map_batch;
pub mod pod_resolver;
pub mod recent_closes;
pub mod ring_reader;
pub mod socket_count;
pub mod table;
pub mod tls_hello;
