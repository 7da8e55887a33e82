//! Every TCP socket of a network namespace through `NETLINK_SOCK_DIAG`, as `ss` reads them:
//! a binary dump that the kernel resumes where it stopped, so its cost is linear in the
//! sockets. The text of `/proc/<pid>/net/tcp` (`proc_net_tcp`, the fallback) costs a
//! formatted line per socket, and under churn its page-sized reads often start the walk of
//! the hash table over: 0.1–0.9 s for 42,000 TIME_WAIT sockets here, where this takes
//! 0.06 s (docs/performance.md). The netlink socket belongs to the namespace it is opened
//! in, so it is opened on a thread of its own that enters the namespace first
//! (`netns::enter`, which needs `CAP_SYS_ADMIN` for a namespace other than the agent's).

use std::{
    io,
    net::{IpAddr, Ipv6Addr},
    path::{Path, PathBuf},
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use crate::kernel::{netns, proc_net_tcp::TcpLine};

/// A dump arrives in datagrams of at most a page or so of messages each; a larger buffer
/// takes any the kernel sends.
const RECEIVE_BUFFER: usize = 64 * 1024;

/// A `NETLINK_SOCK_DIAG` socket in the namespace of the process at `process_dir`.
fn open_in(process_dir: &Path) -> io::Result<Socket> {
    let dir: PathBuf = process_dir.to_owned();
    let open = std::thread::Builder::new().name("sock-diag-open".into()).spawn(move || {
        netns::enter(&dir)?;
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(socket)
    })?;
    open.join().map_err(|_| io::Error::other("opening the sock_diag socket panicked"))?
}

/// Calls `each` for every TCP socket, IPv4 then IPv6, of the namespace of the process at
/// `process_dir` but the listening and closed ones (`None` for a message that does not
/// decode). An error (no `inet_diag` in the kernel, a namespace that cannot be entered)
/// may come after some sockets were given: the caller keeps them apart until `Ok`.
pub fn for_each_socket(
    process_dir: &Path,
    mut each: impl FnMut(Option<TcpLine>),
) -> io::Result<()> {
    let mut socket = open_in(process_dir)?;
    let mut buffer = vec![0; RECEIVE_BUFFER];
    for family in [AF_INET, AF_INET6] {
        dump(&mut socket, family, &mut buffer, &mut each)?;
    }
    Ok(())
}

/// One family's dump.
fn dump(
    socket: &mut Socket,
    family: u8,
    buffer: &mut Vec<u8>,
    each: &mut impl FnMut(Option<TcpLine>),
) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() };
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all() & !(StateFlags::LISTEN | StateFlags::CLOSE),
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut bytes = vec![0; request.buffer_len()];
    request.serialize(&mut bytes);
    socket.send(&bytes, 0)?;
    loop {
        buffer.clear();
        let received = socket.recv(buffer, 0)?;
        if received == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "sock_diag dump cut short"));
        }
        let mut offset = 0;
        while offset < received {
            let message = match NetlinkMessage::<SockDiagMessage>::deserialize(&buffer[offset..]) {
                Ok(message) => message,
                Err(_) => {
                    // The length is the header's first field; without it the rest of the
                    // datagram cannot be split.
                    let length = buffer
                        .get(offset..offset + 4)
                        .map_or(0, |l| u32::from_ne_bytes([l[0], l[1], l[2], l[3]]) as usize);
                    each(None);
                    if length == 0 {
                        break;
                    }
                    offset += align(length);
                    continue;
                }
            };
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(error) => {
                    let code = error.code.map_or(0, |code| -code.get());
                    return Err(io::Error::from_raw_os_error(code));
                }
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    let header = &response.header;
                    let id = &header.socket_id;
                    each(Some(TcpLine {
                        local: (mapped(id.source_address), id.source_port),
                        remote: (mapped(id.destination_address), id.destination_port),
                        state: header.state,
                    }));
                }
                _ => {}
            }
            let length = message.header.length as usize;
            if length == 0 {
                break;
            }
            offset += align(length);
        }
    }
}

/// Netlink messages start at 4-byte boundaries.
fn align(length: usize) -> usize {
    length.div_ceil(4) * 4
}

/// IPv4 addresses in their IPv4-mapped IPv6 form, as [`TcpLine`] has them.
fn mapped(address: IpAddr) -> Ipv6Addr {
    match address {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;
    use crate::kernel::proc_net_tcp;

    /// A connection made here is in the dump with both ends (an unprivileged test run
    /// reads its own namespace), as `/proc/self/net/tcp` shows it.
    #[test]
    fn the_dump_lists_what_proc_lists() -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let client = TcpStream::connect(listener.local_addr()?)?;
        let (_server, _) = listener.accept()?;
        let key = |line: &TcpLine| (line.local, line.remote, line.state);
        let (local, remote) = (client.local_addr()?, client.peer_addr()?);
        let wanted = |line: &TcpLine| {
            line.local.1 == local.port() && line.remote.1 == remote.port()
                || line.local.1 == remote.port() && line.remote.1 == local.port()
        };
        let mut dumped = Vec::new();
        for_each_socket(Path::new("/proc/self"), |line| {
            dumped.extend(line.filter(|l| wanted(l)).as_ref().map(key))
        })?;
        let mut listed = Vec::new();
        proc_net_tcp::for_each_socket(Path::new("/proc/self"), |line| {
            listed.extend(line.filter(|l| wanted(l)).as_ref().map(key))
        })?;
        dumped.sort();
        listed.sort();
        assert_eq!(dumped.len(), 2, "{dumped:?}");
        assert_eq!(dumped, listed);
        assert!(dumped.iter().all(|(_, _, state)| *state == proc_net_tcp::ESTABLISHED));
        Ok(())
    }
}
