//! Metric values carried from a stopping agent to the next (with pinned state). Without
//! them every restart resets the counters, and what the old agent counted after
//! Prometheus' last scrape of it is exported by no agent: a gap on every dashboard at each
//! rollout. With them, the next agent's counters and histograms go on from where the old
//! one's ended, as if one agent had run throughout.
//!
//! The stopping agent writes its exposition text, gzipped, into the pinned
//! `CARRIED_METRICS` map before the handover's header. The next agent reads it when it
//! takes the handover (so a stale or missing handover carries nothing either), empties the
//! map, and adds each value of the families in [`carried`] to its own series:
//! counters and histograms, and the servers' advertised keep-alive limits. Gauges of the
//! moment (open connections, probes) are rebuilt, not carried. Bounded by the map's size;
//! what does not fit or does not parse is logged, and those series start from 0.

use std::{
    collections::{BTreeSet, HashMap as StdHashMap},
    io::{Read as _, Write as _},
};

use crate::{
    exposition::{
        family::{CarriedValue, Carry},
        metrics::Metrics,
    },
    model::metric_table::PREFIX,
};
use aya::maps::{HashMap, MapData};
use connscope_common::{CARRIED_CHUNKS, CarriedChunk, handover::CARRIED_CHUNK_BYTES};
use flate2::{Compression, read::GzDecoder, write::GzEncoder};
use prometheus_client::registry::Registry;
use prometheus_parse::{Scrape, Value};

/// Largest exposition text a next agent accepts, decompressed (the label caps' defaults
/// filled make about 10 MiB).
const MAX_TEXT_BYTES: u64 = 64 << 20;

/// What a starting agent took over.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Carried {
    pub series: usize,
    /// Series of carried families whose labels or values did not fit.
    pub skipped: usize,
    /// `server` and `process` label values of the carried series.
    pub servers: BTreeSet<String>,
    pub processes: BTreeSet<String>,
}

/// The exposition text of `metrics`, gzipped.
pub fn encode(metrics: &Metrics) -> anyhow::Result<Vec<u8>> {
    let mut registry = Registry::with_prefix(PREFIX);
    metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    let mut gzip = GzEncoder::new(Vec::new(), Compression::fast());
    gzip.write_all(text.as_bytes())?;
    Ok(gzip.finish()?)
}

/// `blob` cut into chunks, in order; an error when it needs more than the map holds.
pub fn chunked(blob: &[u8]) -> anyhow::Result<Vec<CarriedChunk>> {
    let chunks = blob.chunks(CARRIED_CHUNK_BYTES);
    if chunks.len() > CARRIED_CHUNKS as usize {
        anyhow::bail!(
            "{} bytes of metrics do not fit the {} chunks of {} bytes",
            blob.len(),
            CARRIED_CHUNKS,
            CARRIED_CHUNK_BYTES
        );
    }
    Ok(chunks
        .map(|piece| {
            let mut chunk = CarriedChunk::zeroed();
            chunk.len = piece.len() as u32;
            chunk.bytes[..piece.len()].copy_from_slice(piece);
            chunk
        })
        .collect())
}

/// Writes `blob` in chunks keyed from 0; the map is emptied first. Fails, leaving nothing,
/// when it does not fit.
pub fn write(map: &mut HashMap<MapData, u32, CarriedChunk>, blob: &[u8]) -> anyhow::Result<()> {
    clear(map);
    for (index, chunk) in chunked(blob)?.into_iter().enumerate() {
        if let Err(err) = map.insert(index as u32, chunk, 0) {
            clear(map);
            anyhow::bail!("writing chunk {index}: {err}");
        }
    }
    Ok(())
}

fn clear(map: &mut HashMap<MapData, u32, CarriedChunk>) {
    let keys: Vec<u32> = map.keys().filter_map(Result::ok).collect();
    for key in keys {
        let _ = map.remove(&key);
    }
}

/// Reads and empties the map: the chunks in order, if any.
pub fn take(map: &mut HashMap<MapData, u32, CarriedChunk>) -> Option<Vec<u8>> {
    let mut chunks: Vec<(u32, CarriedChunk)> = map.iter().filter_map(Result::ok).collect();
    clear(map);
    chunks.sort_by_key(|(index, _)| *index);
    if chunks.is_empty() {
        return None;
    }
    if chunks.iter().enumerate().any(|(position, (index, _))| position as u32 != *index) {
        tracing::warn!(chunks = chunks.len(), "carried metrics with a missing chunk skipped");
        return None;
    }
    Some(chunks.iter().flat_map(|(_, chunk)| chunk.used()).copied().collect())
}

/// The text in a gzipped `blob`; `None` (logged) when it is damaged or too large.
pub fn decompress(blob: &[u8]) -> Option<String> {
    let mut text = String::new();
    let read = GzDecoder::new(blob).take(MAX_TEXT_BYTES + 1).read_to_string(&mut text);
    match read {
        Ok(n) if n as u64 <= MAX_TEXT_BYTES => Some(text),
        Ok(_) => {
            tracing::warn!("carried metrics over {MAX_TEXT_BYTES} bytes skipped");
            None
        }
        Err(err) => {
            tracing::warn!("carried metrics skipped: {err}");
            None
        }
    }
}

/// Adds the values of `text` (an exposition of [`encode`]) to `metrics`' carried families.
pub fn seed(metrics: &Metrics, text: &str) -> Carried {
    let Ok(scrape) = Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))) else {
        return Carried::default();
    };
    let families: StdHashMap<String, &dyn Carry> =
        metrics.carried().into_iter().map(|(row, family)| (row.sample(), family)).collect();
    let family = |name: &str| families.get(name).copied();
    // A histogram's sum is a sample of its own: joined to its buckets by name and labels.
    let mut sums: StdHashMap<(String, String), f64> = StdHashMap::new();
    for sample in &scrape.samples {
        if let (Some(base), Value::Untyped(sum)) =
            (sample.metric.strip_suffix("_sum"), &sample.value)
        {
            sums.insert((base.to_owned(), sample.labels.to_string()), *sum);
        }
    }
    let mut carried = Carried::default();
    for sample in &scrape.samples {
        let value = match &sample.value {
            Value::Histogram(buckets) => {
                let key = (sample.metric.clone(), sample.labels.to_string());
                CarriedValue::Buckets {
                    cumulative: buckets.iter().map(|b| (b.less_than, b.count)).collect(),
                    sum: sums.get(&key).copied().unwrap_or_default(),
                }
            }
            Value::Counter(n) | Value::Gauge(n) | Value::Untyped(n) => CarriedValue::Number(*n),
            Value::Summary(_) => continue,
        };
        let Some(family) = family(&sample.metric) else { continue };
        let labels: serde_json::Map<String, serde_json::Value> = sample
            .labels
            .iter()
            .map(|(name, value)| (name.clone(), serde_json::Value::String(value.clone())))
            .collect();
        if family.carry(serde_json::Value::Object(labels), &value) {
            carried.series += 1;
            carried.servers.extend(sample.labels.get("server").map(str::to_owned));
            carried.processes.extend(sample.labels.get("process").map(str::to_owned));
        } else {
            carried.skipped += 1;
        }
    }
    carried
}

#[cfg(test)]
mod tests {
    use connscope_common::conn::GAP_BUCKETS;

    use super::*;
    use crate::model::label_sets::{Closed, Flow, FlowProtocol, HttpRequest, PlacedFlow, Server};
    use crate::model::placement::Placement;

    fn flow(process: &str) -> Flow {
        Flow { role: "client".into(), process: process.into(), server: "10.0.0.1:80".into() }
    }

    fn exposition(metrics: &Metrics) -> String {
        decompress(&encode(metrics).expect("encoding")).expect("decompressing")
    }

    /// The carried families' lines of an exposition (what the next agent must export).
    fn carried_lines(text: &str) -> Vec<&str> {
        let names: Vec<String> =
            Metrics::new().carried().iter().map(|(row, _)| row.sample()).collect();
        text.lines()
            .filter(|line| {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                names.iter().map(String::as_str).any(|n| {
                    name == n
                        || name
                            .strip_prefix(n)
                            .is_some_and(|rest| ["_bucket", "_sum", "_count"].contains(&rest))
                })
            })
            .collect()
    }

    fn busy_metrics() -> Metrics {
        let metrics = Metrics::new();
        let placed = PlacedFlow {
            flow: flow("curl"),
            placement: Placement {
                namespace: Some("shop".into()),
                pod: Some("web-0".into()),
                container: None,
            },
        };
        metrics.opened.get_or_create(&placed).inc_by(7);
        metrics.adopted.get_or_create(&placed).inc();
        let closed = Closed {
            flow: placed,
            closed_by: "peer".into(),
            close_kind: "fin".into(),
            reason: "idle".into(),
            protocol: "http1".into(),
        };
        metrics.closed.get_or_create(&closed).inc_by(5);
        let version = HttpRequest { flow: flow("curl"), http_version: "1.1".into() };
        metrics.http_requests.get_or_create(&version).inc_by(1_234_567);
        metrics.bytes_sent.get_or_create(&flow("curl")).inc_by(u64::from(u32::MAX) * 3);
        let requests = FlowProtocol { flow: flow("curl"), protocol: "http1".into() };
        for n in [0.0, 1.0, 3.0, 250.0, 5000.0] {
            metrics.requests.get_or_create(&requests).observe(n);
        }
        metrics.duration.get_or_create(&flow("python3")).observe(0.25);
        let mut gaps = [0u64; GAP_BUCKETS];
        gaps[2] = 4;
        gaps[GAP_BUCKETS - 1] = 1;
        metrics.idle.get_or_create(&flow("curl")).add(&gaps, 400.125);
        metrics.advertised_timeout.get_or_create(&Server { server: "10.0.0.1:80".into() }).set(75);
        metrics.tracked.set(3);
        metrics
    }

    /// A next agent seeded with an agent's exposition exports the same carried series.
    #[test]
    fn carried_families_round_trip() {
        let before = busy_metrics();
        let text = exposition(&before);
        let after = Metrics::new();
        let carried = seed(&after, &text);
        assert_eq!((carried.series, carried.skipped), (9, 0));
        assert_eq!(carried.processes, BTreeSet::from(["curl".into(), "python3".into()]));
        let again = exposition(&after);
        assert_eq!(carried_lines(&again), carried_lines(&text));
        // Gauges of the moment are not carried.
        assert_eq!(after.tracked.get(), 0);
        assert!(carried_lines(&text).len() > 40);
    }

    /// Seeding adds: what the next agent counts goes on from the carried value.
    #[test]
    fn counting_goes_on_from_the_carried_value() {
        let after = Metrics::new();
        seed(&after, &exposition(&busy_metrics()));
        let version = HttpRequest { flow: flow("curl"), http_version: "1.1".into() };
        after.http_requests.get_or_create(&version).inc();
        assert_eq!(after.http_requests.get_or_create(&version).get(), 1_234_568);
        let requests = FlowProtocol { flow: flow("curl"), protocol: "http1".into() };
        let histogram = after.requests.get_or_create(&requests);
        histogram.observe(2.0);
        assert_eq!((histogram.count(), histogram.sum()), (6, 5256.0));
    }

    #[test]
    fn damaged_or_foreign_input_is_skipped() {
        assert_eq!(decompress(b"not gzip"), None);
        let text = "# TYPE connscope_connections_opened counter\n\
                    connscope_connections_opened_total{role=\"client\"} 3\n\
                    connscope_connections_opened_total{role=\"client\",process=\"a\",server=\"s\"} -1\n\
                    # TYPE connscope_connection_requests histogram\n\
                    connscope_connection_requests_bucket{role=\"client\",process=\"a\",server=\"s\",protocol=\"http1\",le=\"1.0\"} 3\n\
                    connscope_connection_requests_bucket{role=\"client\",process=\"a\",server=\"s\",protocol=\"http1\",le=\"+Inf\"} 3\n\
                    some_other_metric 4\n";
        let metrics = Metrics::new();
        let carried = seed(&metrics, text);
        assert_eq!((carried.series, carried.skipped), (0, 3));
        assert_eq!(seed(&metrics, "\u{0}\u{1}binary"), Carried::default());
    }
}
