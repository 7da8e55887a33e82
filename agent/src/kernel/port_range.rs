//! Each network namespace's ephemeral port range: `net.ipv4.ip_local_port_range` less the
//! `net.ipv4.ip_local_reserved_ports` inside it, the local ports a client's `connect()` can
//! pick toward one destination. Unlike `/proc/<pid>/net/`, `/proc/sys/net/` shows the reading
//! thread's own namespace, so the ranges are read on a thread of their own that enters each
//! namespace in turn (`setns` moves only that thread; it needs `CAP_SYS_ADMIN`, except for
//! the agent's own namespace) and ends with the read.

use std::{io, path::PathBuf};

use crate::kernel::netns;

const RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// `32768\t60999` → the inclusive bounds.
fn parse_range(text: &str) -> Option<(u16, u16)> {
    let mut bounds = text.split_whitespace().map(str::parse::<u16>);
    let (low, high) = (bounds.next()?.ok()?, bounds.next()?.ok()?);
    (bounds.next().is_none() && low <= high).then_some((low, high))
}

/// `8080,9000-9010` (or empty) → the inclusive ranges listed.
fn parse_reserved(text: &str) -> Option<Vec<(u16, u16)>> {
    text.trim()
        .split(',')
        .filter(|item| !item.is_empty())
        .map(|item| match item.split_once('-') {
            Some((low, high)) => {
                let (low, high) = (low.parse().ok()?, high.parse().ok()?);
                (low <= high).then_some((low, high))
            }
            None => item.parse().ok().map(|port| (port, port)),
        })
        .collect()
}

/// Ports of `range` not in `reserved` (whose ranges the kernel lists disjoint and sorted).
fn usable(range: (u16, u16), reserved: &[(u16, u16)]) -> u32 {
    let size = u32::from(range.1 - range.0) + 1;
    let taken: u32 = reserved
        .iter()
        .map(|&(low, high)| {
            let (low, high) = (low.max(range.0), high.min(range.1));
            if low <= high { u32::from(high - low) + 1 } else { 0 }
        })
        .sum();
    size.saturating_sub(taken)
}

/// The usable range of the calling thread's namespace.
fn read_here() -> io::Result<u32> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let range = parse_range(&std::fs::read_to_string(RANGE)?).ok_or_else(|| invalid(RANGE))?;
    let reserved =
        parse_reserved(&std::fs::read_to_string(RESERVED)?).ok_or_else(|| invalid(RESERVED))?;
    Ok(usable(range, &reserved))
}

/// The usable range of each namespace, read through its process (`/proc/<pid>`), in the
/// order given; a namespace that cannot be entered or read gives its error.
pub fn read(namespaces: Vec<PathBuf>) -> Vec<io::Result<u32>> {
    let count = namespaces.len();
    let read = std::thread::Builder::new()
        .name("port-ranges".into())
        .spawn(move || -> Vec<io::Result<u32>> {
            namespaces.iter().map(|dir| netns::enter(dir).and_then(|()| read_here())).collect()
        })
        .and_then(|reader| {
            reader.join().map_err(|_| io::Error::other("the port range reader panicked"))
        });
    read.unwrap_or_else(|err| {
        (0..count).map(|_| Err(io::Error::new(err.kind(), err.to_string()))).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_less_their_reserved_ports() {
        assert_eq!(parse_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_range("40000 40019"), Some((40000, 40019)));
        assert_eq!(parse_range("5 4"), None);
        assert_eq!(parse_range("1"), None);
        assert_eq!(parse_range("1 2 3"), None);
        assert_eq!(parse_reserved("\n"), Some(vec![]));
        assert_eq!(parse_reserved("8080,40010-40014\n"), Some(vec![(8080, 8080), (40010, 40014)]));
        assert_eq!(parse_reserved("x"), None);
        assert_eq!(parse_reserved("9-1"), None);
        assert_eq!(usable((32768, 60999), &[]), 28232);
        assert_eq!(usable((40000, 40019), &[(8080, 8080), (40010, 40014), (40019, 50000)]), 14);
        assert_eq!(usable((40000, 40000), &[(1, 65535)]), 0);
    }

    #[test]
    fn the_agents_own_namespace_reads() -> anyhow::Result<()> {
        let here = read_here();
        let through_self = read(vec![PathBuf::from("/proc/self")]);
        match (here, through_self.as_slice()) {
            // Its own namespace is read without entering it (no privilege needed).
            (Ok(here), [Ok(read)]) => assert_eq!(here, *read),
            (here, read) => anyhow::bail!("{here:?} {read:?}"),
        }
        Ok(())
    }
}
