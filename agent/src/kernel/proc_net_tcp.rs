//! `/proc/<pid>/net/tcp` and `tcp6`: every TCP socket of the reader's network namespace, a
//! line each (`  0: 0100007F:1F90 0100007F:A000 01 ...`: local address, remote address,
//! state, all hex). Read by the start-up adoption scan and the socket census.

use std::{
    io::{self, BufRead as _},
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

/// `st` of a listening socket.
pub const LISTEN: u8 = 0x0A;
/// `st` of an established one.
pub const ESTABLISHED: u8 = 0x01;
/// `st` of a socket in TIME_WAIT (a timewait socket's substate; `ss state time-wait`).
pub const TIME_WAIT: u8 = 0x06;
/// `st` of a closed one (bound, never connected, or done).
pub const CLOSE: u8 = 0x07;
/// procfs hands out a table a page or so per read.
const TABLE_READ_BUFFER: usize = 64 * 1024;

/// One socket's line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpLine {
    /// IPv4 addresses in their IPv4-mapped IPv6 form.
    pub local: (Ipv6Addr, u16),
    pub remote: (Ipv6Addr, u16),
    pub state: u8,
}

/// A table's line, `None` when it does not parse.
pub fn parse(line: &str) -> Option<TcpLine> {
    let mut fields = line.split_whitespace().skip(1);
    let (local, remote, state) = (fields.next()?, fields.next()?, fields.next()?);
    Some(TcpLine {
        local: endpoint(local)?,
        remote: endpoint(remote)?,
        state: u8::from_str_radix(state, 16).ok()?,
    })
}

/// `0100007F:1F90`: the address as the kernel prints it (each 32-bit word of the network
/// order address in host order), then the port.
fn endpoint(field: &str) -> Option<(Ipv6Addr, u16)> {
    let (address, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes);
    let address = match address.len() {
        8 => Ipv4Addr::from(word(address)?).to_ipv6_mapped(),
        32 => {
            let mut bytes = [0; 16];
            for (chunk, out) in bytes.chunks_exact_mut(4).enumerate() {
                out.copy_from_slice(&word(address.get(chunk * 8..chunk * 8 + 8)?)?);
            }
            Ipv6Addr::from(bytes)
        }
        _ => return None,
    };
    Some((address, port))
}

/// Streams the table at `path` a line at a time (`None` for a line that does not parse): a
/// busy namespace's table (150 bytes per socket, TIME_WAIT ones included) read whole would
/// grow the agent's heap by megabytes. A caller that must count a table whole or not at all
/// keeps what it sees apart until this returns `Ok`.
pub fn for_each_line(path: &Path, mut each: impl FnMut(Option<TcpLine>)) -> io::Result<()> {
    let mut table = io::BufReader::with_capacity(TABLE_READ_BUFFER, std::fs::File::open(path)?);
    let mut line = String::new();
    // The header line.
    table.read_line(&mut line)?;
    loop {
        line.clear();
        if table.read_line(&mut line)? == 0 {
            return Ok(());
        }
        each(parse(&line));
    }
}

/// Both tables of the namespace `process_dir` (`/proc/<pid>`) shows: `tcp`, then `tcp6`
/// where IPv6 is on (a missing `tcp6` of a process still there is not an error).
pub fn for_each_socket(
    process_dir: &Path,
    mut each: impl FnMut(Option<TcpLine>),
) -> io::Result<()> {
    for_each_line(&process_dir.join("net/tcp"), &mut each)?;
    match for_each_line(&process_dir.join("net/tcp6"), &mut each) {
        Err(err) if err.kind() == io::ErrorKind::NotFound && process_dir.exists() => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_or_are_rejected() {
        let line = parse("  0: 0100007F:1F90 0200007F:A000 06 00000000:00000000 03:00000000 0");
        let loopback = |last: u8| Ipv4Addr::new(127, 0, 0, last).to_ipv6_mapped();
        assert_eq!(
            line,
            Some(TcpLine { local: (loopback(1), 8080), remote: (loopback(2), 40960), state: 6 })
        );
        // tcp6: `::1` and a v4-mapped `::ffff:127.0.0.1`, each word in host order.
        let six = parse(
            "0: 00000000000000000000000001000000:0050 0000000000000000FFFF00000100007F:9C40 01",
        );
        let mapped = TcpLine {
            local: (Ipv6Addr::LOCALHOST, 80),
            remote: (loopback(1), 40000),
            state: ESTABLISHED,
        };
        assert_eq!(six, Some(mapped));
        assert_eq!(parse("0: 0100007F:ZZZZ 00000000:0000 0A"), None);
        assert_eq!(parse("0: 0100007F:1F90 00000000:0000 XY"), None);
        assert_eq!(parse("0: 01007F:1F90 00000000:0000 0A"), None);
        assert_eq!(parse("0: 0100007F:1F90"), None);
    }
}
