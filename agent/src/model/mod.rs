//! The vocabulary every stage shares, with no logic of its own: label sets and label
//! values, why a connection closed, HTTP versions, whether a process is decrypted, the
//! TLS requests each process made, the sockets a census found, the kernel's clock, and the
//! metric table.

pub mod clock;
pub mod close_reason;
pub mod decryption_state;
pub mod http_version;
pub mod label_sets;
pub mod metric_table;
pub mod placement;
pub mod socket_census;
pub mod tls_requests;
