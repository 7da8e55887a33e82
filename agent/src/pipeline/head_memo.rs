//! What the last few distinct heads parsed to, so a head seen again is not parsed again.
//!
//! Heads repeat across connections far more than within one: a client sends the same
//! request on each of its short connections, a server the same response, and with both ends
//! on the host the agent receives every head twice (the sender's write and the receiver's
//! read). Under `Connection: close` churn every connection's heads are new to the kernel,
//! which sends them all; parsing them was about a quarter of the agent's CPU. A repeat now
//! costs one hash of its bytes.
//!
//! Heads are remembered by their length and a seeded 64-bit hash of their bytes (foldhash's
//! quality variant, a random seed per agent, so a collision cannot be aimed at), never by
//! the bytes themselves: the agent keeps no copy of a path or a cookie.

use std::hash::BuildHasher;

use foldhash::quality::RandomState;

use crate::pipeline::http::{self, Head};

/// Distinct heads remembered per direction: a few clients and servers churning at once.
const SLOTS: usize = 8;

#[derive(Clone, Copy)]
struct Entry {
    len: usize,
    hash: u64,
    parsed: Option<Head>,
}

/// The last [`SLOTS`] distinct heads of one direction, replaced round-robin.
struct Recent {
    entries: [Option<Entry>; SLOTS],
    next: usize,
}

impl Recent {
    const fn new() -> Self {
        Self { entries: [None; SLOTS], next: 0 }
    }

    fn parse(&mut self, bytes: &[u8], hash: u64, parse: fn(&[u8]) -> Option<Head>) -> Option<Head> {
        let len = bytes.len();
        let known = self.entries.iter().flatten().find(|e| e.len == len && e.hash == hash);
        if let Some(entry) = known {
            return entry.parsed;
        }
        let parsed = parse(bytes);
        self.entries[self.next] = Some(Entry { len, hash, parsed });
        self.next = (self.next + 1) % SLOTS;
        parsed
    }
}

/// Request and response heads, parsed once per distinct head.
pub struct HeadMemo {
    keys: RandomState,
    requests: Recent,
    responses: Recent,
}

impl Default for HeadMemo {
    fn default() -> Self {
        Self { keys: RandomState::default(), requests: Recent::new(), responses: Recent::new() }
    }
}

impl HeadMemo {
    /// [`http::parse_request`] of `bytes`.
    pub fn request(&mut self, bytes: &[u8]) -> Option<Head> {
        let hash = self.keys.hash_one(bytes);
        self.requests.parse(bytes, hash, http::parse_request)
    }

    /// [`http::parse_response`] of `bytes`.
    pub fn response(&mut self, bytes: &[u8]) -> Option<Head> {
        let hash = self.keys.hash_one(bytes);
        self.responses.parse(bytes, hash, http::parse_response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::http_version::Version;

    #[test]
    fn a_repeated_head_parses_as_it_did_and_distinct_heads_stay_distinct() {
        let mut memo = HeadMemo::default();
        let close = b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n";
        let keep = b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
        for _ in 0..3 {
            assert_eq!(memo.request(close), http::parse_request(close));
            assert_eq!(memo.request(keep), http::parse_request(keep));
        }
        assert!(memo.request(close).is_some_and(|head| head.connection.close));
        assert_eq!(memo.request(keep).map(|head| head.version), Some(Version::Http10));
        // The same bytes as a response are not a response.
        assert_eq!(memo.response(close), None);
        assert_eq!(memo.request(b"\x16\x03\x01 binary"), None);
    }

    #[test]
    fn more_distinct_heads_than_slots_are_each_parsed_right() {
        let mut memo = HeadMemo::default();
        let heads: Vec<String> = (0..3 * SLOTS)
            .map(|i| format!("HTTP/1.{} 200 OK\r\nKeep-Alive: max={i}\r\n\r\n", i % 2))
            .collect();
        for _ in 0..2 {
            for head in &heads {
                assert_eq!(memo.response(head.as_bytes()), http::parse_response(head.as_bytes()));
            }
        }
    }
}
