//! The agent's listening socket: bound before anything is loaded, so a busy port is
//! reported first, with the flag that changes it.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use anyhow::anyhow;
use tokio::net::TcpListener;

pub async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(address).await {
        Ok(listener) => Ok(listener),
        // ":port" means all addresses; hosts without IPv6 only have the IPv4 wildcard.
        Err(err)
            if address.ip().is_unspecified()
                && address.is_ipv6()
                && err.kind() != io::ErrorKind::AddrInUse =>
        {
            let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), address.port());
            TcpListener::bind(v4).await.map_err(|err| listen_error(v4, &err))
        }
        Err(err) => Err(listen_error(address, &err)),
    }
}

fn listen_error(address: SocketAddr, err: &io::Error) -> anyhow::Error {
    if err.kind() == io::ErrorKind::AddrInUse {
        anyhow!(
            "cannot listen on {address}: the port is already in use (another connscope?); \
             pick another with --web.listen-address"
        )
    } else {
        anyhow!("cannot listen on {address}: {err}")
    }
}

pub fn display_address(address: SocketAddr) -> String {
    if address.ip().is_unspecified() {
        format!("localhost:{}", address.port())
    } else {
        address.to_string()
    }
}
