//! The encoded `/metrics` body, kept between scrapes when encoding is slow.
//!
//! With the label caps filled the exposition is ~100k samples (12 MB) and takes ~55 ms to
//! encode. Then (encode above [`SLOW_ENCODE`]) scrapes get the latest body, at most
//! [`MAX_STALENESS`] old, and `server::refresh_while_scraped` re-encodes it in the background every
//! [`REFRESH_EVERY`] for as long as scrapes keep coming ([`SCRAPER_GONE_AFTER`]); the first
//! scrape after a quiet spell encodes in place. Small expositions are encoded fresh per scrape.
//! Cached bodies are also kept gzipped once a scraper asks for gzip (Prometheus does): 12 MB
//! become well under 1 MB on the wire, compressed in the background too.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hyper::body::Bytes;
use prometheus_client::registry::Registry;

/// Encodes faster than this are done for every scrape (always fresh).
pub const SLOW_ENCODE: Duration = Duration::from_millis(2);
/// How often the background task re-encodes while someone scrapes.
pub const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// The oldest body a scrape is given (two refreshes, so one late refresh is tolerated).
pub const MAX_STALENESS: Duration = Duration::from_secs(2);
/// No scrape for this long: stop refreshing and free the body.
pub const SCRAPER_GONE_AFTER: Duration = Duration::from_secs(120);

#[derive(Debug)]
pub struct ScrapeCache {
    state: Mutex<CacheState>,
    /// Encodes at least this slow are cached ([`SLOW_ENCODE`]; tests lower it).
    slow: Duration,
    /// Set when the counts stop changing (the agent is stopping, its handover written):
    /// from then on every scrape is encoded afresh, so none is given a body from before.
    final_counts: AtomicBool,
    /// Scrapes answered with the final counts.
    final_answers: AtomicU64,
}

impl Default for ScrapeCache {
    fn default() -> Self {
        Self::caching_encodes_over(SLOW_ENCODE)
    }
}

#[derive(Debug, Default)]
struct CacheState {
    /// The latest body and when its encoding started.
    body: Option<(Instant, Bytes)>,
    /// The same body gzipped, once a scraper asked for gzip.
    gzipped: Option<Bytes>,
    gzip_wanted: bool,
    /// How long the latest encode took.
    encode_cost: Duration,
    last_scrape: Option<Instant>,
}

impl ScrapeCache {
    pub fn caching_encodes_over(slow: Duration) -> Self {
        Self {
            state: Mutex::default(),
            slow,
            final_counts: AtomicBool::new(false),
            final_answers: AtomicU64::new(0),
        }
    }

    /// The registry's counts are final: no later scrape gets a cached body.
    pub fn counts_final(&self) {
        self.final_counts.store(true, Ordering::Release);
    }

    /// How many scrapes were answered with the final counts.
    pub fn final_answers(&self) -> u64 {
        self.final_answers.load(Ordering::Acquire)
    }

    /// Whether someone scraped after `since`.
    pub fn scraped_since(&self, since: Instant) -> bool {
        self.state.lock().is_ok_and(|state| state.last_scrape.is_some_and(|at| at > since))
    }

    /// The body for a scrape now, and whether it is gzipped (only if `gzip_ok`): the cached
    /// one if encoding is slow and it is recent enough.
    pub fn body(
        &self,
        registry: &Registry,
        gzip_ok: bool,
    ) -> Result<(Bytes, bool), std::fmt::Error> {
        let now = Instant::now();
        if self.final_counts.load(Ordering::Acquire) {
            let body = self.encode(registry)?;
            self.final_answers.fetch_add(1, Ordering::AcqRel);
            return Ok((body, false));
        }
        if let Ok(mut state) = self.state.lock() {
            state.last_scrape = Some(now);
            state.gzip_wanted |= gzip_ok;
            if state.encode_cost >= self.slow
                && let Some((encoded_at, body)) = &state.body
                && now.duration_since(*encoded_at) <= MAX_STALENESS
            {
                return Ok(match (&state.gzipped, gzip_ok) {
                    (Some(gzipped), true) => (gzipped.clone(), true),
                    _ => (body.clone(), false),
                });
            }
        }
        Ok((self.encode(registry)?, false))
    }

    /// Encodes and keeps the result (when encoding is slow, gzipped too if wanted); returns
    /// the plain body.
    pub fn encode(&self, registry: &Registry) -> Result<Bytes, std::fmt::Error> {
        let started = Instant::now();
        let mut text = String::with_capacity(self.capacity_hint());
        prometheus_client::encoding::text::encode(&mut text, registry)?;
        let body = Bytes::from(text);
        let cost = started.elapsed();
        let gzip_wanted = self.state.lock().map(|state| state.gzip_wanted).unwrap_or(false);
        let gzipped = (cost >= self.slow && gzip_wanted).then(|| gzip(&body)).flatten();
        if let Ok(mut state) = self.state.lock() {
            state.encode_cost = cost;
            state.body = (cost >= self.slow).then(|| (started, body.clone()));
            state.gzipped = gzipped;
        }
        Ok(body)
    }

    fn capacity_hint(&self) -> usize {
        let cached = self.state.lock().ok().and_then(|state| Some(state.body.as_ref()?.1.len()));
        cached.map_or(16 * 1024, |len| len + len / 8)
    }

    /// Whether the background task should encode now: encoding is slow and someone scraped
    /// recently. Frees the body once the scrapers are gone.
    pub fn wants_refresh(&self, now: Instant) -> bool {
        let Ok(mut state) = self.state.lock() else { return false };
        let scraped =
            state.last_scrape.is_some_and(|at| now.duration_since(at) < SCRAPER_GONE_AFTER);
        if !scraped {
            state.body = None;
            state.gzipped = None;
        }
        scraped && state.encode_cost >= self.slow
    }
}

/// Fastest level: the exposition is so repetitive that it still shrinks more than tenfold.
fn gzip(body: &[u8]) -> Option<Bytes> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 8),
        flate2::Compression::fast(),
    );
    encoder.write_all(body).ok()?;
    encoder.finish().ok().map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    fn registry() -> (Registry, Counter) {
        let mut registry = Registry::default();
        let counter: Counter = Counter::default();
        registry.register("scrapes", "An example", counter.clone());
        (registry, counter)
    }

    #[test]
    fn cheap_encodes_are_always_fresh() -> Result<(), std::fmt::Error> {
        let (registry, counter) = registry();
        let cache = ScrapeCache::caching_encodes_over(Duration::from_secs(3600));
        let text = |(body, gzipped): (Bytes, bool)| {
            assert!(!gzipped, "small bodies are never gzipped");
            String::from_utf8_lossy(&body).into_owned()
        };
        assert!(text(cache.body(&registry, true)?).contains("scrapes_total 0"));
        counter.inc();
        assert!(text(cache.body(&registry, true)?).contains("scrapes_total 1"));
        assert!(!cache.wants_refresh(Instant::now()), "nothing to refresh in the background");
        Ok(())
    }

    #[test]
    fn slow_encodes_are_served_from_the_cache_and_refreshed() -> Result<(), std::fmt::Error> {
        let (registry, counter) = registry();
        let cache = ScrapeCache::caching_encodes_over(Duration::ZERO);
        let text = |body: &[u8]| String::from_utf8_lossy(body).into_owned();
        assert!(text(&cache.body(&registry, false)?.0).contains("scrapes_total 0"));
        counter.inc();
        let (cached, gzipped) = cache.body(&registry, true)?;
        assert!(!gzipped, "gzip is made by the next encode");
        assert!(text(&cached).contains("scrapes_total 0"), "the cached body");
        assert!(cache.wants_refresh(Instant::now()), "scraped just now");
        cache.encode(&registry)?;
        assert!(text(&cache.body(&registry, false)?.0).contains("scrapes_total 1"));
        let (gzipped, is_gzip) = cache.body(&registry, true)?;
        assert!(is_gzip);
        let mut unzipped = String::new();
        std::io::Read::read_to_string(
            &mut flate2::read::GzDecoder::new(&gzipped[..]),
            &mut unzipped,
        )
        .map_err(|_| std::fmt::Error)?;
        assert!(unzipped.contains("scrapes_total 1"), "{unzipped}");
        // Scrapers gone: no more refreshes, and the body is freed.
        assert!(!cache.wants_refresh(Instant::now() + SCRAPER_GONE_AFTER));
        assert!(cache.state.lock().map(|state| state.body.is_none()).unwrap_or(false));
        Ok(())
    }

    /// A stopping agent's last counts reach the scraper, not a body cached before them.
    #[test]
    fn final_counts_are_never_served_from_the_cache() -> Result<(), std::fmt::Error> {
        let (registry, counter) = registry();
        let cache = ScrapeCache::caching_encodes_over(Duration::ZERO);
        let text = |body: &[u8]| String::from_utf8_lossy(body).into_owned();
        let before = Instant::now();
        assert!(!cache.scraped_since(before));
        assert!(text(&cache.body(&registry, false)?.0).contains("scrapes_total 0"));
        assert!(cache.scraped_since(before));
        counter.inc();
        cache.counts_final();
        assert_eq!(cache.final_answers(), 0);
        assert!(text(&cache.body(&registry, true)?.0).contains("scrapes_total 1"));
        assert_eq!(cache.final_answers(), 1);
        Ok(())
    }
}
