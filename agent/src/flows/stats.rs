//! From the exposition to one row per flow: counters summed per (role, process, server) over
//! every other label (placement, versions, labels added later), differences between two
//! scrapes, and PromQL-style `histogram_quantile` over the idle-gap buckets.

use std::collections::{BTreeMap, HashMap};

use prometheus_parse::{Scrape, Value};
use serde::Serialize;

use crate::model::metric_table::{self as table, Metric};

const OPENED: &str = table::CONNECTIONS_OPENED.name;
const CLOSED: &str = table::CONNECTIONS_CLOSED.name;
const REQUESTS: &str = table::CONNECTION_REQUESTS.name;
const IDLE: &str = table::CONNECTION_IDLE.name;
const RACES: &str = table::KEEPALIVE_RACES.name;
const DECRYPTION: &str = table::TLS_DECRYPTION_PROCESSES.name;
const TIME_WAIT: &str = table::CONNECTIONS_TIME_WAIT.name;
const PORTS: &str = table::CLIENT_PORTS_IN_USE.name;
const PORT_RANGE: &str = table::CLIENT_PORT_RANGE_SIZE.name;

/// A sample's part of its metric: the value itself, or a histogram's sum or count.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Value,
    Sum,
    Count,
}

/// The table row and part of each sample name the agent exposes.
fn sample_rows() -> HashMap<String, (&'static str, Part)> {
    let mut rows = HashMap::new();
    for row in table::ALL {
        let row: &Metric = row;
        rows.insert(row.sample(), (row.name, Part::Value));
        rows.insert(format!("{}_sum", row.family()), (row.name, Part::Sum));
        rows.insert(format!("{}_count", row.family()), (row.name, Part::Count));
    }
    rows
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct FlowKey {
    pub role: String,
    pub process: String,
    pub server: String,
}

/// A histogram summed over series: cumulative count per upper bound, sum and count.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Buckets {
    pub cumulative: BTreeMap<OrderedBound, f64>,
    pub sum: f64,
    pub count: f64,
}

/// A bucket bound as a map key (bounds are finite or +Inf, never NaN).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OrderedBound(pub f64);
impl Eq for OrderedBound {}
impl Ord for OrderedBound {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}
impl PartialOrd for OrderedBound {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// One flow's counters at one scrape (or their increase between two).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FlowCounters {
    pub opened: f64,
    pub races: f64,
    pub requests: Buckets,
    pub idle: Buckets,
    /// (closed_by, reason) to connections closed.
    pub closes: BTreeMap<(String, String), f64>,
    /// The decryption states of the flow's process (`tls_decryption_processes`), now.
    pub decryption: Vec<String>,
    /// Sockets in TIME_WAIT now (a gauge).
    pub time_wait: f64,
    /// Clients: ports held now, by network namespace, and the namespaces' port ranges.
    pub ports: BTreeMap<String, f64>,
    pub port_ranges: BTreeMap<String, f64>,
}

/// Every flow of one scrape.
pub fn flows(scrape: &Scrape) -> BTreeMap<FlowKey, FlowCounters> {
    let mut flows: BTreeMap<FlowKey, FlowCounters> = BTreeMap::new();
    let mut decryption: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut port_ranges: BTreeMap<String, f64> = BTreeMap::new();
    let rows = sample_rows();
    for sample in &scrape.samples {
        let Some(&(row, part)) = rows.get(&sample.metric) else { continue };
        let labels = &sample.labels;
        if row == DECRYPTION {
            if let (Some(process), Some(state), Value::Gauge(count)) =
                (labels.get("process"), labels.get("state"), &sample.value)
                && *count > 0.0
            {
                decryption.entry(process.into()).or_default().push(state.into());
            }
            continue;
        }
        if row == PORT_RANGE {
            if let (Some(netns), Value::Gauge(size)) = (labels.get("netns"), &sample.value) {
                port_ranges.insert(netns.into(), *size);
            }
            continue;
        }
        let (Some(role), Some(process), Some(server)) =
            (labels.get("role"), labels.get("process"), labels.get("server"))
        else {
            continue;
        };
        let key = FlowKey { role: role.into(), process: process.into(), server: server.into() };
        let flow = flows.entry(key).or_default();
        let value = match &sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => {
                let target = match row {
                    REQUESTS => &mut flow.requests,
                    IDLE => &mut flow.idle,
                    _ => continue,
                };
                for bucket in buckets {
                    *target.cumulative.entry(OrderedBound(bucket.less_than)).or_default() +=
                        bucket.count;
                }
                continue;
            }
            Value::Summary(_) => continue,
        };
        match (row, part) {
            (OPENED, Part::Value) => flow.opened += value,
            (RACES, Part::Value) => flow.races += value,
            (TIME_WAIT, Part::Value) => flow.time_wait += value,
            (PORTS, Part::Value) => {
                let netns = labels.get("netns").unwrap_or("unknown").to_owned();
                *flow.ports.entry(netns).or_default() += value;
            }
            (CLOSED, Part::Value) => {
                let side = labels.get("closed_by").unwrap_or("unknown").to_owned();
                let reason = labels.get("reason").unwrap_or("unknown").to_owned();
                *flow.closes.entry((side, reason)).or_default() += value;
            }
            (REQUESTS, Part::Sum) => flow.requests.sum += value,
            (REQUESTS, Part::Count) => flow.requests.count += value,
            (IDLE, Part::Sum) => flow.idle.sum += value,
            (IDLE, Part::Count) => flow.idle.count += value,
            _ => {}
        }
    }
    for (key, flow) in &mut flows {
        flow.decryption = decryption.get(&key.process).cloned().unwrap_or_default();
        flow.port_ranges = flow
            .ports
            .keys()
            .filter_map(|netns| Some((netns.clone(), *port_ranges.get(netns)?)))
            .collect();
    }
    flows
}

impl Buckets {
    /// The increase since `before` (a series that restarted counts from zero).
    fn since(&self, before: &Self) -> Self {
        let delta = |now: f64, then: f64| if now >= then { now - then } else { now };
        Self {
            cumulative: self
                .cumulative
                .iter()
                .map(|(bound, count)| {
                    (*bound, delta(*count, before.cumulative.get(bound).copied().unwrap_or(0.0)))
                })
                .collect(),
            sum: delta(self.sum, before.sum),
            count: delta(self.count, before.count),
        }
    }

    /// Like PromQL's `histogram_quantile`: linear interpolation inside the bucket that holds
    /// the rank; the lowest bucket starts at 0; a rank in +Inf gives the highest finite bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.cumulative.get(&OrderedBound(f64::INFINITY)).copied()?;
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let (mut lower, mut below) = (0.0, 0.0);
        for (&OrderedBound(upper), &count) in &self.cumulative {
            if count >= rank {
                if upper.is_infinite() {
                    return Some(lower);
                }
                if count == below {
                    return Some(upper);
                }
                return Some(lower + (upper - lower) * (rank - below) / (count - below));
            }
            (lower, below) = (upper, count);
        }
        None
    }

    /// Observations at most `bound` (the cumulative count of that bucket).
    pub fn at_most(&self, bound: f64) -> f64 {
        self.cumulative.get(&OrderedBound(bound)).copied().unwrap_or(0.0)
    }
}

impl FlowCounters {
    pub fn since(&self, before: &Self) -> Self {
        let delta = |now: f64, then: f64| if now >= then { now - then } else { now };
        Self {
            opened: delta(self.opened, before.opened),
            races: delta(self.races, before.races),
            requests: self.requests.since(&before.requests),
            idle: self.idle.since(&before.idle),
            closes: self
                .closes
                .iter()
                .map(|(key, now)| {
                    (key.clone(), delta(*now, before.closes.get(key).copied().unwrap_or(0.0)))
                })
                .collect(),
            decryption: self.decryption.clone(),
            // Gauges: what they are now.
            time_wait: self.time_wait,
            ports: self.ports.clone(),
            port_ranges: self.port_ranges.clone(),
        }
    }
}

/// What `connscope flows` prints for one flow.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FlowRow {
    #[serde(flatten)]
    pub flow: FlowKey,
    /// Connections opened per second over the interval (None: a single scrape).
    pub opened_per_second: Option<f64>,
    pub opened: f64,
    /// Mean requests per connection closed (None: none closed).
    pub requests_per_connection: Option<f64>,
    /// Share of closed connections that carried at most one request (bucket `le="1"`, as the
    /// churn dashboard counts them).
    pub one_request_share: Option<f64>,
    pub idle_p50_seconds: Option<f64>,
    pub idle_p90_seconds: Option<f64>,
    /// `closed_by` to `reason` to connections.
    pub closes: BTreeMap<String, BTreeMap<String, f64>>,
    pub races: f64,
    /// Whether the flow's process is decrypted (its processes' states; empty: no TLS).
    pub decryption: Vec<String>,
    /// Sockets in TIME_WAIT now.
    pub time_wait: f64,
    /// Clients: local ports held toward the server now (None: none reported).
    pub ports_in_use: Option<f64>,
    /// The largest share of a namespace's port range the flow holds (None: range unknown).
    pub port_range_share: Option<f64>,
}

/// Rows for the increase from `before` to `after`, `seconds` apart (`before` None: totals
/// since the agent started), most opened first.
pub fn rows(
    before: Option<&BTreeMap<FlowKey, FlowCounters>>,
    after: &BTreeMap<FlowKey, FlowCounters>,
    seconds: f64,
) -> Vec<FlowRow> {
    let mut rows: Vec<FlowRow> = after
        .iter()
        .map(|(key, now)| {
            let counters = match before.and_then(|before| before.get(key)) {
                Some(then) => now.since(then),
                None => now.clone(),
            };
            row(key, &counters, before.map(|_| seconds))
        })
        .collect();
    rows.sort_by(|a, b| {
        let churn = |row: &FlowRow| row.opened_per_second.unwrap_or(row.opened);
        churn(b).total_cmp(&churn(a)).then_with(|| a.flow.cmp(&b.flow))
    });
    rows
}

fn row(key: &FlowKey, counters: &FlowCounters, seconds: Option<f64>) -> FlowRow {
    let requests = &counters.requests;
    let closed = requests.count;
    let one_request = requests.at_most(1.0);
    let mut closes: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for ((side, reason), count) in &counters.closes {
        if *count > 0.0 {
            closes.entry(side.clone()).or_default().insert(reason.clone(), *count);
        }
    }
    FlowRow {
        flow: key.clone(),
        opened_per_second: seconds.filter(|s| *s > 0.0).map(|s| counters.opened / s),
        opened: counters.opened,
        requests_per_connection: (closed > 0.0).then(|| requests.sum / closed),
        one_request_share: (closed > 0.0).then(|| one_request / closed),
        idle_p50_seconds: counters.idle.quantile(0.5),
        idle_p90_seconds: counters.idle.quantile(0.9),
        closes,
        races: counters.races,
        decryption: counters.decryption.clone(),
        time_wait: counters.time_wait,
        ports_in_use: (!counters.ports.is_empty()).then(|| counters.ports.values().sum()),
        port_range_share: counters
            .ports
            .iter()
            .filter_map(|(netns, ports)| {
                let range = counters.port_ranges.get(netns).filter(|range| **range > 0.0)?;
                Some(ports / range)
            })
            .max_by(f64::total_cmp),
    }
}

/// Parses an exposition (Prometheus text or OpenMetrics).
pub fn parse(text: &str) -> anyhow::Result<Scrape> {
    Ok(Scrape::parse(text.lines().map(|line| Ok(line.to_owned())))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two series of one flow that differ in labels `flows` must sum over (a pod and a
    /// future `protocol`), a second flow, and families without flow labels.
    const BEFORE: &str = r#"# HELP connscope_connections_opened Connections.
# TYPE connscope_connections_opened counter
connscope_connections_opened_total{role="client",process="curl",server="10.0.0.1:80",namespace="a",pod="p1"} 10
connscope_connections_opened_total{role="client",process="curl",server="10.0.0.1:80",namespace="a",pod="p2"} 5
connscope_connections_opened_total{role="server",process="nginx",server="10.0.0.1:80"} 1
# TYPE connscope_connections_closed counter
connscope_connections_closed_total{role="client",process="curl",server="10.0.0.1:80",pod="p1",closed_by="local",close_kind="fin",reason="idle"} 4
connscope_connections_closed_total{role="client",process="curl",server="10.0.0.1:80",pod="p2",closed_by="peer",close_kind="fin",reason="max_requests"} 2
# TYPE connscope_connection_requests histogram
connscope_connection_requests_bucket{role="client",process="curl",server="10.0.0.1:80",protocol="http1",le="0.0"} 0
connscope_connection_requests_bucket{role="client",process="curl",server="10.0.0.1:80",protocol="http1",le="1.0"} 1
connscope_connection_requests_bucket{role="client",process="curl",server="10.0.0.1:80",protocol="http1",le="+Inf"} 6
connscope_connection_requests_sum{role="client",process="curl",server="10.0.0.1:80",protocol="http1"} 20.0
connscope_connection_requests_count{role="client",process="curl",server="10.0.0.1:80",protocol="http1"} 6
# TYPE connscope_connection_idle_seconds histogram
# UNIT connscope_connection_idle_seconds seconds
connscope_connection_idle_seconds_bucket{role="client",process="curl",server="10.0.0.1:80",le="0.001"} 0
connscope_connection_idle_seconds_bucket{role="client",process="curl",server="10.0.0.1:80",le="0.005"} 0
connscope_connection_idle_seconds_bucket{role="client",process="curl",server="10.0.0.1:80",le="0.01"} 0
connscope_connection_idle_seconds_bucket{role="client",process="curl",server="10.0.0.1:80",le="+Inf"} 0
connscope_connection_idle_seconds_sum{role="client",process="curl",server="10.0.0.1:80"} 0.0
connscope_connection_idle_seconds_count{role="client",process="curl",server="10.0.0.1:80"} 0
# TYPE connscope_keepalive_races counter
connscope_keepalive_races_total{role="client",process="curl",server="10.0.0.1:80"} 1
# TYPE connscope_tracked_connections gauge
connscope_tracked_connections 3
# TYPE connscope_connections_time_wait gauge
connscope_connections_time_wait{role="client",process="curl",server="10.0.0.1:80",pod="p1"} 3
connscope_connections_time_wait{role="client",process="curl",server="10.0.0.1:80",pod="p2"} 1
# TYPE connscope_client_ports_in_use gauge
connscope_client_ports_in_use{role="client",process="curl",server="10.0.0.1:80",netns="1",pod="p1"} 5
connscope_client_ports_in_use{role="client",process="curl",server="10.0.0.1:80",netns="2",pod="p2"} 3
# TYPE connscope_client_port_range_size gauge
connscope_client_port_range_size{netns="1"} 100
connscope_client_port_range_size{netns="2"} 10
# EOF
"#;

    /// `BEFORE` 10 s later: 20 more opened, 10 more closed carrying 30 requests (4 with at
    /// most one), idle gaps 2 ≤ 1 ms, 6 ≤ 5 ms, 10 ≤ 10 ms; one more race.
    const AFTER: &str = r#"# TYPE connscope_connections_opened counter
connscope_connections_opened_total{role="client",process="curl",server="10.0.0.1:80",namespace="a",pod="p1"} 25
connscope_connections_opened_total{role="client",process="curl",server="10.0.0.1:80",namespace="a",pod="p2"} 10
connscope_connections_opened_total{role="server",process="nginx",server="10.0.0.1:80"} 1
# TYPE connscope_connections_closed counter
connscope_connections_closed_total{role="client",process="curl",server="10.0.0.1:80",pod="p1",closed_by="local",close_kind="fin",reason="idle"} 11
connscope_connections_closed_total{role="client",process="curl",server="10.0.0.1:80",pod="p2",closed_by="peer",close_kind="fin",reason="max_requests"} 5
# TYPE connscope_connection_requests histogram
connscope_connection_requests_bucket{role="client",process="curl",server="10.0.0.1:80",protocol="http1",le="0.0"} 1
connscope_connection_requests_bucket{role="client",process="curl",server="10.0.0.1:80",protocol="http1",le="1.0"} 5
connscope_connection_requests_bucket{role="client",process="curl",server="10.0.0.1:80",protocol="http1",le="+Inf"} 16
connscope_connection_requests_sum{role="client",process="curl",server="10.0.0.1:80",protocol="http1"} 50.0
connscope_connection_requests_count{role="client",process="curl",server="10.0.0.1:80",protocol="http1"} 16
# TYPE connscope_connection_idle_seconds histogram
connscope_connection_idle_seconds_bucket{role="client",process="curl",server="10.0.0.1:80",le="0.001"} 2
connscope_connection_idle_seconds_bucket{role="client",process="curl",server="10.0.0.1:80",le="0.005"} 6
connscope_connection_idle_seconds_bucket{role="client",process="curl",server="10.0.0.1:80",le="0.01"} 10
connscope_connection_idle_seconds_bucket{role="client",process="curl",server="10.0.0.1:80",le="+Inf"} 10
connscope_connection_idle_seconds_sum{role="client",process="curl",server="10.0.0.1:80"} 0.04
connscope_connection_idle_seconds_count{role="client",process="curl",server="10.0.0.1:80"} 10
# TYPE connscope_keepalive_races counter
connscope_keepalive_races_total{role="client",process="curl",server="10.0.0.1:80"} 2
# EOF
"#;

    fn curl() -> FlowKey {
        FlowKey { role: "client".into(), process: "curl".into(), server: "10.0.0.1:80".into() }
    }

    fn parsed(text: &str) -> BTreeMap<FlowKey, FlowCounters> {
        flows(&parse(text).expect("fixture"))
    }

    #[test]
    fn series_of_one_flow_are_summed_over_extra_labels() {
        let flows = parsed(BEFORE);
        assert_eq!(flows.len(), 2, "{flows:?}");
        let curl = &flows[&curl()];
        assert_eq!(curl.opened, 15.0);
        assert_eq!(curl.requests.count, 6.0);
        assert_eq!(curl.requests.sum, 20.0);
        assert_eq!(curl.requests.at_most(1.0), 1.0);
        assert_eq!(curl.closes[&("local".to_owned(), "idle".to_owned())], 4.0);
        assert_eq!(curl.races, 1.0);
        assert_eq!(curl.time_wait, 4.0);
        let ports: Vec<(&str, f64)> = curl.ports.iter().map(|(n, p)| (n.as_str(), *p)).collect();
        assert_eq!(ports, [("1", 5.0), ("2", 3.0)]);
    }

    #[test]
    fn gauges_are_shown_as_they_are_now() {
        let rows = rows(Some(&parsed(BEFORE)), &parsed(BEFORE), 10.0);
        let row = rows.iter().find(|row| row.flow == curl()).expect("curl's row");
        assert_eq!((row.time_wait, row.ports_in_use), (4.0, Some(8.0)));
        // Namespace 2's 3 of 10 ports is the fuller range.
        assert_eq!(row.port_range_share, Some(0.3));
        let nginx = rows.iter().find(|row| row.flow.role == "server").expect("nginx's row");
        assert_eq!(
            (nginx.time_wait, nginx.ports_in_use, nginx.port_range_share),
            (0.0, None, None)
        );
    }

    #[test]
    fn rows_over_an_interval() {
        let rows = rows(Some(&parsed(BEFORE)), &parsed(AFTER), 10.0);
        assert_eq!(rows.len(), 2);
        let row = &rows[0];
        assert_eq!(row.flow, curl(), "most churn first");
        assert_eq!(row.opened_per_second, Some(2.0));
        assert_eq!(row.requests_per_connection, Some(3.0));
        assert_eq!(row.one_request_share, Some(0.4));
        assert_eq!(row.races, 1.0);
        let closes = |side: &str, reason: &str| row.closes[side][reason];
        assert_eq!((closes("local", "idle"), closes("peer", "max_requests")), (7.0, 3.0));
        // Ranks 5 and 9 of 10: inside the 1–5 ms and 5–10 ms buckets, linearly.
        assert!((row.idle_p50_seconds.unwrap_or(0.0) - 0.004).abs() < 1e-12, "{row:?}");
        assert!((row.idle_p90_seconds.unwrap_or(0.0) - 0.00875).abs() < 1e-12, "{row:?}");
        let nginx = &rows[1];
        assert_eq!(nginx.opened_per_second, Some(0.0));
        assert_eq!(nginx.requests_per_connection, None);
        assert_eq!(nginx.idle_p50_seconds, None);
    }

    #[test]
    fn one_scrape_gives_totals() {
        let rows = rows(None, &parsed(AFTER), 0.0);
        assert_eq!(rows[0].opened_per_second, None);
        assert_eq!(rows[0].opened, 35.0);
        assert_eq!(rows[0].requests_per_connection, Some(50.0 / 16.0));
    }

    #[test]
    fn quantile_edges() {
        let buckets = |pairs: &[(f64, f64)]| Buckets {
            cumulative: pairs.iter().map(|&(le, n)| (OrderedBound(le), n)).collect(),
            ..Buckets::default()
        };
        // Everything above the highest finite bound: that bound, as histogram_quantile.
        assert_eq!(buckets(&[(1.0, 0.0), (f64::INFINITY, 4.0)]).quantile(0.5), Some(1.0));
        // The lowest bucket starts at 0.
        assert_eq!(buckets(&[(2.0, 4.0), (f64::INFINITY, 4.0)]).quantile(0.5), Some(1.0));
        assert_eq!(buckets(&[(2.0, 0.0), (f64::INFINITY, 0.0)]).quantile(0.5), None);
        assert_eq!(buckets(&[(2.0, 1.0)]).quantile(0.5), None, "no +Inf bucket");
    }

    #[test]
    fn a_restarted_agent_counts_from_zero() {
        let rows = rows(Some(&parsed(AFTER)), &parsed(BEFORE), 10.0);
        let curl = rows.iter().find(|row| row.flow == curl()).map(|row| row.opened);
        assert_eq!(curl, Some(15.0));
    }
}
