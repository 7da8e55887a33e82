//! The agent's per-connection state passed from a stopping agent to the next through the
//! pinned `HANDOVER` map (`connscope_common::handover`). The kernel keeps the counts of a
//! connection, but not its labels nor what the agent already exported: without this, a
//! connection that spans a restart could not be labelled by the next agent.
//!
//! Bounded: at most the map's capacity, written within [`WRITE_BUDGET`]; read back once and
//! emptied. A handover older than [`MAX_AGE`] (a stopped agent that was never restarted)
//! or without its header is logged and skipped.

use std::time::{Duration, Instant};

use aya::maps::{HashMap, MapData};
use connscope_common::{Handover, handover_flag};

use crate::{
    model::{clock::monotonic_ns, http_version::Version},
    pipeline::http_session::HttpSession,
};

/// How long a stopping agent may spend writing the handover.
pub const WRITE_BUDGET: Duration = Duration::from_secs(2);
/// A handover older than this describes connections long gone: it is skipped.
pub const MAX_AGE: Duration =
    Duration::from_nanos(connscope_common::kernel_config::PINNED_STATE_MAX_AGE_NS);
/// Key of the header entry.
const HEADER: u64 = 0;

/// Copies `label` into a fixed field; false when it does not fit.
pub fn put_label(field: &mut [u8], label: &str) -> Option<u8> {
    let bytes = label.as_bytes();
    let len = u8::try_from(bytes.len()).ok().filter(|&len| usize::from(len) <= field.len())?;
    field[..bytes.len()].copy_from_slice(bytes);
    Some(len)
}

pub fn label(field: &[u8], len: u8) -> Option<&str> {
    field.get(..usize::from(len)).and_then(|bytes| std::str::from_utf8(bytes).ok())
}

fn max_to_wire(max: Option<u32>) -> u32 {
    max.unwrap_or(u32::MAX)
}

fn max_from_wire(max: u32) -> Option<u32> {
    (max != u32::MAX).then_some(max)
}

/// Writes an HTTP session into `entry`.
pub fn put_session(entry: &mut Handover, session: &HttpSession) {
    let (last, accounted) = session.resumable();
    entry.flags |= handover_flag::HTTP;
    if session.connection_close {
        entry.flags |= handover_flag::CONNECTION_CLOSE;
    }
    if session.http10_close {
        entry.flags |= handover_flag::HTTP10_CLOSE;
    }
    if let Some((version, count)) = last {
        entry.last_request_count = count;
        if version == Version::Http10 {
            entry.flags |= handover_flag::LAST_REQUEST_HTTP10;
        }
    }
    entry.http_requests = session.requests;
    entry.http_accounted = accounted;
    entry.first_advertised_max = max_to_wire(session.first_advertised_max);
    entry.last_advertised_max = max_to_wire(session.last_advertised_max);
}

/// The HTTP session in `entry`, if it has one. Whether an HTTP/1.0 request asked for
/// keep-alive is not carried: the next request head says it again.
pub fn session(entry: &Handover) -> Option<HttpSession> {
    if !entry.has(handover_flag::HTTP) {
        return None;
    }
    let version = if entry.has(handover_flag::LAST_REQUEST_HTTP10) {
        Version::Http10
    } else {
        Version::Http11
    };
    let last = (entry.last_request_count > 0).then_some((version, entry.last_request_count));
    let mut session = HttpSession::default().resume(last, entry.http_accounted);
    session.requests = entry.http_requests;
    session.connection_close = entry.has(handover_flag::CONNECTION_CLOSE);
    session.http10_close = entry.has(handover_flag::HTTP10_CLOSE);
    session.first_advertised_max = max_from_wire(entry.first_advertised_max);
    session.last_advertised_max = max_from_wire(entry.last_advertised_max);
    Some(session)
}

/// Writes `entries` and then the header; returns how many were written.
pub fn write(
    map: &mut HashMap<MapData, u64, Handover>,
    entries: impl Iterator<Item = (u64, Handover)>,
) -> usize {
    let deadline = Instant::now() + WRITE_BUDGET;
    let mut written = 0u32;
    for (sock, entry) in entries {
        if Instant::now() > deadline {
            tracing::warn!(written, "handover cut short after {WRITE_BUDGET:?}");
            break;
        }
        if let Err(err) = map.insert(sock, entry, 0) {
            tracing::warn!(written, "handover cut short: {err}");
            break;
        }
        written += 1;
    }
    let header = Handover { open_ns: monotonic_ns(), exchanges: written, ..Handover::zeroed() };
    if let Err(err) = map.insert(HEADER, header, 0) {
        tracing::warn!("handover not written: {err}");
        return 0;
    }
    written as usize
}

/// Whether a complete handover waits in `map` (its header is written last).
pub fn has_header(map: &HashMap<MapData, u64, Handover>) -> bool {
    map.get(&HEADER, 0).is_ok()
}

/// Reads and empties the handover: the connections it holds, or `None` when it is missing,
/// incomplete or stale (logged).
pub fn take(map: &mut HashMap<MapData, u64, Handover>) -> Option<Vec<(u64, Handover)>> {
    let entries: Vec<(u64, Handover)> = map.iter().filter_map(Result::ok).collect();
    for (sock, _) in &entries {
        let _ = map.remove(sock);
    }
    let Some(header) = entries.iter().find(|(sock, _)| *sock == HEADER).map(|(_, h)| *h) else {
        if !entries.is_empty() {
            tracing::warn!(entries = entries.len(), "handover without its header skipped");
        }
        return None;
    };
    let age = Duration::from_nanos(monotonic_ns().saturating_sub(header.open_ns));
    let connections: Vec<_> = entries.into_iter().filter(|(sock, _)| *sock != HEADER).collect();
    if age > MAX_AGE || connections.len() != header.exchanges as usize {
        tracing::warn!(
            age_s = age.as_secs(),
            found = connections.len(),
            expected = header.exchanges,
            "stale or incomplete handover skipped"
        );
        return None;
    }
    Some(connections)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::http;

    #[test]
    fn a_session_survives_the_handover() {
        let head = http::parse_request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        let head = head.expect("not a request");
        let mut session = HttpSession::default();
        session.on_request(&head, 3);
        session.last_advertised_max = Some(7);
        let mut entry = Handover::zeroed();
        put_session(&mut entry, &session);
        let mut restored = super::session(&entry).expect("no session");
        assert_eq!(restored, session);
        // Exchanges 4..=10 repeat the last head, as they would have before.
        assert_eq!(restored.repeat_until(10).http11, 7);
        assert_eq!(restored.requests, 8);
    }

    #[test]
    fn labels_round_trip_and_overlong_ones_are_refused() {
        let mut field = [0u8; 48];
        let len = put_label(&mut field, "[::1]:8080");
        assert_eq!(len.and_then(|len| label(&field, len)), Some("[::1]:8080"));
        assert_eq!(put_label(&mut [0u8; 4], "toolong"), None);
    }
}
