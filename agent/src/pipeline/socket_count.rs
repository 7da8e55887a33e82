//! A socket census attributed to flows: each socket whose four-tuple is an open connection
//! of the table or one closed recently (`recent_closes`) counts for that connection's flow,
//! in `connections_time_wait` when it is in TIME_WAIT and, for clients, in
//! `client_ports_in_use` of its namespace. TIME_WAIT sockets no flow accounts for (closed
//! before the agent started, by a connection whose close it did not see, or forgotten past
//! `recent_closes::MAX_KEPT`) are `connections_time_wait_unattributed` of their namespace.

use std::{
    collections::{HashMap, hash_map::Entry},
    sync::Arc,
};

use connscope_common::Role;
use prometheus_client::metrics::gauge::Gauge;

use crate::{
    exposition::{flow_series::FlowSeries, metrics::Metrics},
    model::{
        label_sets::Netns,
        socket_census::{Census, TupleKey},
    },
};

/// What a gauge counts: a flow's TIME_WAIT sockets, its ports in a namespace, or a
/// namespace's unattributed TIME_WAIT sockets. Flows are never dropped from the flow cache,
/// so a flow's address names it for the agent's life.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Counted {
    TimeWait(usize),
    Ports(usize, String),
    Unattributed(String),
}

/// One census's counts, before they are published.
pub struct Tally<'a> {
    census: &'a Census,
    metrics: &'a Metrics,
    /// By (flow, namespace index): TIME_WAIT sockets, and ports.
    time_wait: HashMap<usize, (Gauge, i64)>,
    ports: HashMap<(usize, u32), (Gauge, i64)>,
    /// TIME_WAIT sockets per namespace index, less the attributed ones.
    unattributed: Vec<i64>,
}

impl<'a> Tally<'a> {
    pub fn new(census: &'a Census, metrics: &'a Metrics) -> Self {
        let mut unattributed = vec![0; census.namespaces.len()];
        for held in census.sockets.values().filter(|held| held.time_wait) {
            if let Some(count) = unattributed.get_mut(held.namespace as usize) {
                *count += 1;
            }
        }
        Self { census, metrics, time_wait: HashMap::new(), ports: HashMap::new(), unattributed }
    }

    /// Counts the socket of `tuple`, if the census found it, for the flow `series`.
    pub fn add(&mut self, tuple: TupleKey, series: &Arc<FlowSeries>, role: Role) {
        let Some(held) = self.census.sockets.get(&tuple) else { return };
        let flow = Arc::as_ptr(series) as usize;
        if held.time_wait {
            let (_, count) = self
                .time_wait
                .entry(flow)
                .or_insert_with(|| (series.time_wait(self.metrics).clone(), 0));
            *count += 1;
            if let Some(unattributed) = self.unattributed.get_mut(held.namespace as usize) {
                *unattributed -= 1;
            }
        }
        if role == Role::Client {
            let netns = &self.census.namespaces[held.namespace as usize];
            let entry = match self.ports.entry((flow, held.namespace)) {
                Entry::Occupied(entry) => entry.into_mut(),
                Entry::Vacant(entry) => {
                    let Some(gauge) = series.ports_in_use(self.metrics, netns) else { return };
                    entry.insert((gauge, 0))
                }
            };
            entry.1 += 1;
        }
    }

    /// Sets every gauge this census counted, and to 0 those the previous census set that
    /// counted nothing now.
    pub fn publish(self, published: &mut Published) {
        let namespaces = &self.census.namespaces;
        let mut now: HashMap<Counted, (Gauge, i64)> = HashMap::new();
        now.extend(
            self.time_wait.into_iter().map(|(flow, value)| (Counted::TimeWait(flow), value)),
        );
        now.extend(self.ports.into_iter().map(|((flow, namespace), value)| {
            (Counted::Ports(flow, namespaces[namespace as usize].clone()), value)
        }));
        for (netns, count) in namespaces.iter().zip(self.unattributed) {
            let gauge = self
                .metrics
                .time_wait_unattributed
                .get_or_create_owned(&Netns { netns: netns.clone() });
            now.insert(Counted::Unattributed(netns.clone()), (gauge, count.max(0)));
        }
        for (counted, gauge) in &published.0 {
            if !now.contains_key(counted) {
                gauge.set(0);
            }
        }
        for (gauge, value) in now.values() {
            gauge.set(*value);
        }
        published.0 = now.into_iter().map(|(counted, (gauge, _))| (counted, gauge)).collect();
    }
}

/// The gauges the last census set.
#[derive(Default)]
pub struct Published(HashMap<Counted, Gauge>);
