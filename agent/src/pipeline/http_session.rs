//! HTTP/1.x persistence rules for one connection: what its heads said, and the requests
//! its repeated heads carried.
//!
//! The kernel sends a head only when it differs from the previous one in its direction and
//! counts the repeats (exchanges). Identical heads have identical effects, so an exchange
//! without a head of its own carried what the last request head carried.

use crate::{model::http_version::Version, pipeline::http};

/// HTTP requests to add, by version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestCounts {
    pub http10: u64,
    pub http11: u64,
    pub http2: u64,
    pub unread: u64,
}

impl RequestCounts {
    fn add(&mut self, version: Version, requests: u64) {
        match version {
            Version::Http10 => self.http10 += requests,
            Version::Http11 => self.http11 += requests,
        }
    }
}

/// What the last request head carried per exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RequestShape {
    version: Version,
    /// Pipelined requests in the head.
    count: u32,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct HttpSession {
    /// HTTP requests counted (pipelined ones included).
    pub requests: u64,
    /// A `Connection: close` from either side.
    pub connection_close: bool,
    /// An HTTP/1.0 exchange without keep-alive on both sides.
    pub http10_close: bool,
    /// `Keep-Alive: max=` of the first and of the latest response. Servers either repeat a
    /// fixed limit or count down the requests left (Apache); both reach their end.
    pub first_advertised_max: Option<u32>,
    pub last_advertised_max: Option<u32>,
    /// Whether the last request was HTTP/1.0 asking for keep-alive (for the response check).
    http10_request_keep_alive: Option<bool>,
    last_request: Option<RequestShape>,
    /// Exchanges whose requests are counted.
    accounted_exchanges: u32,
}

impl HttpSession {
    /// Counts exchanges up to `exchanges` that had no head of their own as repeats of the
    /// last request head.
    pub fn repeat_until(&mut self, exchanges: u32) -> RequestCounts {
        let mut counts = RequestCounts::default();
        if exchanges <= self.accounted_exchanges {
            return counts;
        }
        if let Some(shape) = self.last_request {
            let repeats = u64::from(exchanges - self.accounted_exchanges);
            let requests = repeats * u64::from(shape.count);
            counts.add(shape.version, requests);
            self.requests += requests;
        }
        self.accounted_exchanges = exchanges;
        counts
    }

    /// Counts exchanges up to `exchanges` as requests whose version was not read: the
    /// connection is counted from its ciphertext now (its process left decryption).
    pub fn unread_until(&mut self, exchanges: u32) -> RequestCounts {
        let mut counts = RequestCounts::default();
        if exchanges > self.accounted_exchanges {
            let requests = u64::from(exchanges - self.accounted_exchanges);
            counts.unread += requests;
            self.requests += requests;
            self.accounted_exchanges = exchanges;
        }
        counts
    }

    /// A request head that starts exchange `exchange` (repeats before it counted first).
    pub fn on_request(&mut self, request: &http::Head, exchange: u32) -> RequestCounts {
        let mut counts = self.repeat_until(exchange.saturating_sub(1));
        self.last_request = Some(RequestShape { version: request.version, count: request.count });
        if exchange > self.accounted_exchanges {
            counts.add(request.version, u64::from(request.count));
            self.requests += u64::from(request.count);
            self.accounted_exchanges = exchange;
        }
        self.record_persistence(request);
        self.http10_request_keep_alive =
            (request.version == Version::Http10).then(|| request.wants_persistence());
        counts
    }

    pub fn on_response(&mut self, response: &http::Head) {
        // A request no head was read for (a server end adopted at its response, whose
        // receive was in flight when the agent started): it counts in its response's version.
        self.last_request.get_or_insert(RequestShape { version: response.version, count: 1 });
        self.record_persistence(response);
        // HTTP/1.0 persists only when both sides said keep-alive.
        if self.http10_request_keep_alive == Some(true)
            && response.version == Version::Http10
            && !response.wants_persistence()
        {
            self.http10_close = true;
        }
        if let Some(max) = response.keep_alive.max_requests {
            self.first_advertised_max.get_or_insert(max);
            self.last_advertised_max = Some(max);
        }
    }

    fn record_persistence(&mut self, head: &http::Head) {
        if head.connection.close {
            self.connection_close = true;
        } else if head.version == Version::Http10 && !head.connection.keep_alive {
            self.http10_close = true;
        }
    }

    /// What the next agent needs to carry on after a restart (`crate::pipeline::handover`):
    /// (last request's version and count, exchanges accounted).
    pub fn resumable(&self) -> (Option<(Version, u32)>, u32) {
        (self.last_request.map(|shape| (shape.version, shape.count)), self.accounted_exchanges)
    }

    /// Carries on a session from what [`Self::resumable`] gave (and its public fields).
    pub fn resume(mut self, last_request: Option<(Version, u32)>, accounted: u32) -> Self {
        self.last_request = last_request.map(|(version, count)| RequestShape { version, count });
        self.accounted_exchanges = accounted;
        self
    }

    /// An exchange said this connection ends: the request limit, HTTP/1.0, or
    /// `Connection: close`.
    pub fn announced_close(&self) -> bool {
        self.limit_reached() || self.http10_close || self.connection_close
    }

    /// The server's advertised request limit was reached.
    pub fn limit_reached(&self) -> bool {
        self.last_advertised_max.is_some_and(|left| left <= 1)
            || self
                .first_advertised_max
                .is_some_and(|max| max > 1 && self.requests >= u64::from(max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(raw: &[u8]) -> http::Head {
        http::parse_request(raw).expect("not a request")
    }

    /// One head per exchange, or one head and the kernel's repeat count: the same requests.
    #[test]
    fn repeats_count_like_heads() {
        let get = request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        let mut every = HttpSession::default();
        let mut total = RequestCounts::default();
        for exchange in 1..=1000 {
            total.http11 += every.on_request(&get, exchange).http11;
        }
        let mut repeated = HttpSession::default();
        let mut counted = repeated.on_request(&get, 1);
        counted.http11 += repeated.repeat_until(1000).http11;
        assert_eq!((counted, repeated.requests), (total, every.requests));
        assert_eq!(repeated.requests, 1000);
    }

    #[test]
    fn a_new_head_ends_the_repeats_of_the_previous_one() {
        let keep = request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        let pipelined = request(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n");
        let mut session = HttpSession::default();
        let first = session.on_request(&keep, 1);
        // Exchanges 2..=4 repeated the HTTP/1.0 head; exchange 5 has two pipelined requests.
        let fifth = session.on_request(&pipelined, 5);
        assert_eq!(first, RequestCounts { http10: 1, http11: 0, unread: 0, http2: 0 });
        assert_eq!(fifth, RequestCounts { http10: 3, http11: 2, unread: 0, http2: 0 });
        // A head for an exchange already counted (seen late) changes no count.
        assert_eq!(session.on_request(&pipelined, 5), RequestCounts::default());
        assert_eq!(session.requests, 6);
    }

    /// An exchange whose request head no hook read is counted once its response is seen,
    /// in that response's version; a request head read later takes over.
    #[test]
    fn a_request_without_a_head_counts_in_its_responses_version() {
        let response = http::parse_response(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
            .expect("not a response");
        let mut session = HttpSession::default();
        session.on_response(&response);
        let get = request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        let second = session.on_request(&get, 2);
        assert_eq!(second, RequestCounts { http10: 1, http11: 1, unread: 0, http2: 0 });
        assert_eq!(
            session.repeat_until(3),
            RequestCounts { http10: 0, http11: 1, unread: 0, http2: 0 }
        );
        assert_eq!(session.requests, 3);
    }

    #[test]
    fn exchanges_counted_from_ciphertext_are_unread_requests() {
        let mut session = HttpSession::default();
        let get = request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        session.on_request(&get, 1);
        assert_eq!(
            session.repeat_until(2),
            RequestCounts { http10: 0, http11: 1, unread: 0, http2: 0 }
        );
        // The process left decryption: exchanges 3..=5 came from its ciphertext.
        assert_eq!(
            session.unread_until(5),
            RequestCounts { http10: 0, http11: 0, unread: 3, http2: 0 }
        );
        assert_eq!(session.unread_until(5), RequestCounts::default());
        assert_eq!(session.repeat_until(5), RequestCounts::default());
        assert_eq!(session.requests, 5);
    }
}
