//! The connections whose local side closed first with a FIN in the last TIME_WAIT length:
//! their sockets may be in TIME_WAIT now, which no record reports, so a census's TIME_WAIT
//! sockets are attributed to flows through their four-tuples kept here. Bounded in time
//! (the TIME_WAIT length and a margin) and in size; a socket whose entry is gone counts as
//! unattributed.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use connscope_common::Role;

use crate::{exposition::flow_series::FlowSeries, model::socket_census::TupleKey};

/// Linux keeps a socket in TIME_WAIT for a fixed 60 s (`TCP_TIMEWAIT_LEN`); the reaper's
/// timer may run a little late.
pub const KEPT_NS: u64 = 65 * 1_000_000_000;

/// Closes kept at most: the default `net.ipv4.tcp_max_tw_buckets` of a large host, past
/// which the kernel makes no TIME_WAIT socket either. About 40 bytes each.
pub const MAX_KEPT: usize = 262_144;

/// A closed connection's flow and role.
#[derive(Clone, Debug)]
pub struct ClosedFlow {
    pub series: Arc<FlowSeries>,
    pub role: Role,
    closed_ns: u64,
}

#[derive(Default)]
pub struct RecentCloses {
    by_tuple: HashMap<TupleKey, ClosedFlow, foldhash::fast::RandomState>,
    /// Close times in order, to forget the oldest first.
    order: VecDeque<(u64, TupleKey)>,
}

impl RecentCloses {
    /// A connection closed at `closed_ns` (`CLOCK_MONOTONIC`); a tuple used again replaces
    /// its earlier close.
    pub fn insert(&mut self, tuple: TupleKey, series: Arc<FlowSeries>, role: Role, closed_ns: u64) {
        if self.order.len() >= MAX_KEPT
            && let Some((at, oldest)) = self.order.pop_front()
        {
            self.forget(at, oldest);
        }
        self.by_tuple.insert(tuple, ClosedFlow { series, role, closed_ns });
        self.order.push_back((closed_ns, tuple));
    }

    /// Forgets the closes older than [`KEPT_NS`] at `now_ns`.
    pub fn expire(&mut self, now_ns: u64) {
        while let Some(&(at, tuple)) = self.order.front() {
            if at.saturating_add(KEPT_NS) >= now_ns {
                break;
            }
            self.order.pop_front();
            self.forget(at, tuple);
        }
    }

    /// Removes `tuple`'s entry unless a later close of the same tuple replaced it.
    fn forget(&mut self, at: u64, tuple: TupleKey) {
        if self.by_tuple.get(&tuple).is_some_and(|kept| kept.closed_ns == at) {
            self.by_tuple.remove(&tuple);
        }
    }

    pub fn contains(&self, tuple: &TupleKey) -> bool {
        self.by_tuple.contains_key(tuple)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&TupleKey, &ClosedFlow)> {
        self.by_tuple.iter()
    }

    pub fn len(&self) -> usize {
        self.by_tuple.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_tuple.is_empty()
    }
}
