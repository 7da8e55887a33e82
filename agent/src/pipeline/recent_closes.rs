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
/// which the kernel makes no TIME_WAIT socket either. 41 bytes each in the map (a 32-byte
/// entry and a control byte in a table at most 7/8 full) and 16 in the order queue, each
/// container up to twice that just after it grew: 21 MiB at the bound.
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
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;
    use crate::{
        exposition::{flow_series::FlowCache, labels::LabelId, metrics::Metrics},
        model::placement::NoPlacement,
    };

    /// A distinct tuple for each `n` below 2^32.
    fn tuple(n: usize) -> TupleKey {
        let (local, remote) = ((n & 0xffff) as u16, (n >> 16) as u16);
        TupleKey::new((Ipv6Addr::LOCALHOST, local), (Ipv6Addr::LOCALHOST, remote))
    }

    #[test]
    fn closes_are_forgotten_after_the_time_wait_length_or_past_the_bound() {
        let metrics = Metrics::new();
        let mut flows = FlowCache::new(&metrics, 10, 10, Box::new(NoPlacement));
        let series = flows.series(&metrics, Role::Client, LabelId::UNKNOWN, None);
        let mut closes = RecentCloses::default();
        closes.insert(tuple(1), series.clone(), Role::Client, 1_000);
        closes.insert(tuple(2), series.clone(), Role::Client, 2_000);
        // The same tuple closed again: kept from its later close.
        closes.insert(tuple(1), series.clone(), Role::Client, 3_000);
        closes.expire(2_000 + KEPT_NS + 1);
        assert!(closes.contains(&tuple(1)) && !closes.contains(&tuple(2)));
        closes.expire(3_000 + KEPT_NS + 1);
        assert_eq!(closes.iter().count(), 0);
        // Past the bound the oldest goes first.
        for n in 0..=MAX_KEPT {
            closes.insert(tuple(n), series.clone(), Role::Client, 10_000 + n as u64);
        }
        assert_eq!((closes.order.len(), closes.by_tuple.len()), (MAX_KEPT, MAX_KEPT));
        assert!(!closes.contains(&tuple(0)) && closes.contains(&tuple(1)));
    }
}
