//! `struct sock` field offsets from the running kernel's BTF, so the BTF tracepoint programs
//! read the right bytes on any kernel (the relocation a C loader would do with CO-RE).

use std::path::Path;

use anyhow::{Context as _, anyhow, bail};
use btf_rs::{Btf, Member, Struct, Type};
use connscope_common::{FdLayout, SockLayout, kernel_config::SOCK_COMMON_READ};

/// The kernel's type information, parsed once for every layout the programs need.
pub struct KernelTypes(Btf);

impl KernelTypes {
    pub fn read(vmlinux: &Path) -> anyhow::Result<Self> {
        Btf::from_file(vmlinux)
            .map(Self)
            .map_err(|err| anyhow!("{err}"))
            .with_context(|| format!("reading {}", vmlinux.display()))
    }

    pub fn sock_layout(&self) -> anyhow::Result<SockLayout> {
        sock_layout(&self.0)
    }

    pub fn fd_layout(&self) -> anyhow::Result<FdLayout> {
        fd_layout(&self.0)
    }

    /// How many parameters the kernel function `name` takes, from its BTF prototype.
    pub fn function_params(&self, name: &str) -> Option<usize> {
        self.0.resolve_types_by_name(name).ok()?.into_iter().find_map(|t| match t {
            Type::Func(func) => match self.0.resolve_chained_type(&func).ok()? {
                Type::FuncProto(proto) => Some(proto.parameters.len()),
                _ => None,
            },
            _ => None,
        })
    }
}

/// Offsets of the fields `agent-ebpf/src/sock.rs` reads.
fn sock_layout(btf: &Btf) -> anyhow::Result<SockLayout> {
    let sock = find_struct(btf, "sock")?;
    let (protocol_bits, bitfield, protocol_member) = find_member(btf, &sock, "sk_protocol")?;
    let protocol_size = match bitfield {
        Some(8) if protocol_bits % 8 == 0 => 1,
        Some(bits) => bail!("sk_protocol is a {bits}-bit field at bit {protocol_bits}"),
        None => int_size(btf, &protocol_member)?,
    };
    let byte = |name: &str| byte_offset(btf, &sock, name);
    let layout = SockLayout {
        protocol: protocol_bits / 8,
        protocol_size,
        family: byte("skc_family")?,
        dport: byte("skc_dport")?,
        num: byte("skc_num")?,
        daddr: byte("skc_daddr")?,
        rcv_saddr: byte("skc_rcv_saddr")?,
        v6_daddr: byte("skc_v6_daddr")?,
        v6_rcv_saddr: byte("skc_v6_rcv_saddr")?,
        valid: 1,
        // Optional: without them a restart can miss a receive or send in progress
        // (`Conn::recv_seq`, `Conn::send_seq`).
        copied_seq: tcp_sock_offset(btf, "copied_seq"),
        write_seq: tcp_sock_offset(btf, "write_seq"),
        // Optional: without it a request whose answer and FIN arrive before its send
        // returns (loopback) counts as a keep-alive race.
        snd_una: tcp_sock_offset(btf, "snd_una"),
        // Optional: without it a client that read its response and closed before the
        // server's send returned (loopback) leaves an `unknown` close, not `idle`.
        bytes_acked: tcp_sock_offset(btf, "bytes_acked"),
        // Optional: without it a failed connect's reason is `other` (or `no_local_port`).
        sk_err: byte("sk_err").unwrap_or(0),
        sport: struct_offset(btf, "inet_sock", "inet_sport"),
        ..SockLayout::default()
    };
    // Optional: without it a server end adopted at its response misses the request an
    // unseen receive read after the agent started.
    let (lrcvtime, lrcvtime_shift, lrcvtime_bits) = last_receive_time(btf).unwrap_or_default();
    let layout = SockLayout { lrcvtime, lrcvtime_shift, lrcvtime_bits, ..layout };
    // The endpoint fields are read in one copy of the start of the socket.
    let end = layout.v6_daddr.max(layout.v6_rcv_saddr) + 16;
    let end = end.max(layout.family.max(layout.dport).max(layout.num) + 2);
    if end as usize > SOCK_COMMON_READ {
        bail!("sock_common ends at byte {end}, past the {SOCK_COMMON_READ} the programs read");
    }
    match adoption_offsets(btf, &sock) {
        Ok((state, net, net_inum)) => Ok(SockLayout { state, net, net_inum, adopt: 1, ..layout }),
        Err(err) => {
            tracing::info!("connections older than the agent are not adopted: {err:#}");
            Ok(layout)
        }
    }
}

/// A `tcp_sock` field's byte offset, 0 when the BTF does not have it.
fn tcp_sock_offset(btf: &Btf, field: &str) -> u32 {
    struct_offset(btf, "tcp_sock", field)
}

/// The byte offset of `field` in the kernel's `struct <name>`, 0 when the BTF has neither.
fn struct_offset(btf: &Btf, name: &str, field: &str) -> u32 {
    find_struct(btf, name).and_then(|outer| byte_offset(btf, &outer, field)).unwrap_or(0)
}

/// Where `icsk_ack.lrcvtime` lies in a `tcp_sock`: the byte offset of the 32-bit word that
/// holds it, its bit shift in that word and its width (a plain `__u32` in the kernels of the
/// matrix; read from its word should a kernel make it a bitfield).
fn last_receive_time(btf: &Btf) -> Option<(u32, u32, u32)> {
    let tcp = find_struct(btf, "tcp_sock").ok()?;
    let (bits, bitfield, member) = find_member(btf, &tcp, "lrcvtime").ok()?;
    let width = match bitfield {
        Some(width) => width,
        None => int_size(btf, &member).ok()? * 8,
    };
    let (word, shift) = (bits / 32 * 4, bits % 32);
    (word != 0 && (1..=32).contains(&width) && shift + width <= 32).then_some((word, shift, width))
}

/// `skc_state`, `skc_net` (in the `sock_common` copy) and `struct net`'s `ns.inum`: what
/// adopting an established socket takes (`agent-ebpf/src/sock.rs`, `state_and_port`).
fn adoption_offsets(btf: &Btf, sock: &Struct) -> anyhow::Result<(u32, u32, u32)> {
    let state = byte_offset(btf, sock, "skc_state")?;
    // `possible_net_t` holds only the pointer (none at all without CONFIG_NET_NS).
    let net = byte_offset(btf, sock, "skc_net")?;
    let (net_struct, ns) = (find_struct(btf, "net")?, find_struct(btf, "ns_common")?);
    let inum = byte_offset(btf, &net_struct, "ns")? + byte_offset(btf, &ns, "inum")?;
    if (state + 1).max(net + 8) as usize > SOCK_COMMON_READ {
        bail!("skc_state or skc_net lies past the {SOCK_COMMON_READ} bytes the programs read");
    }
    Ok((state, net, inum))
}

/// Offsets of the pointer chain from a file descriptor to its socket
/// (`agent-ebpf/src/fd_socket.rs`).
fn fd_layout(btf: &Btf) -> anyhow::Result<FdLayout> {
    let offset =
        |structure: &str, member: &str| byte_offset(btf, &find_struct(btf, structure)?, member);
    // Optional: without them a socket older than the agent is not adopted at syscall exit.
    let (file_inode, inode_mode) = match (offset("file", "f_inode"), offset("inode", "i_mode")) {
        (Ok(file_inode), Ok(inode_mode)) if file_inode != 0 => (file_inode, inode_mode),
        _ => (0, 0),
    };
    Ok(FdLayout {
        task_files: offset("task_struct", "files")?,
        files_fdt: offset("files_struct", "fdt")?,
        fdt_max_fds: offset("fdtable", "max_fds")?,
        fdt_fd: offset("fdtable", "fd")?,
        file_private_data: offset("file", "private_data")?,
        socket_sk: offset("socket", "sk")?,
        valid: 1,
        _pad: 0,
        file_inode,
        inode_mode,
    })
}

fn byte_offset(btf: &Btf, outer: &Struct, name: &str) -> anyhow::Result<u32> {
    let (bits, bitfield, _) = find_member(btf, outer, name)?;
    if bitfield.is_some() || bits % 8 != 0 {
        bail!("{name} is not byte-aligned");
    }
    Ok(bits / 8)
}

fn find_struct(btf: &Btf, name: &str) -> anyhow::Result<Struct> {
    btf.resolve_types_by_name(name)
        .map_err(|err| anyhow!("{err}"))?
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
        .with_context(|| format!("no struct {name} in the kernel BTF"))
}

/// A member by name, looking through nested structs and unions (named ones like
/// `__sk_common` and anonymous ones): its bit offset from the start of `outer`, its
/// bitfield size, and the member itself.
fn find_member(
    btf: &Btf,
    outer: &Struct,
    name: &str,
) -> anyhow::Result<(u32, Option<u32>, Member)> {
    search(btf, outer, name, 0)
        .with_context(|| format!("no member {name} in the kernel BTF struct"))
}

fn search(btf: &Btf, outer: &Struct, name: &str, depth: u32) -> Option<(u32, Option<u32>, Member)> {
    for member in &outer.members {
        if btf.resolve_name(member).ok().as_deref() == Some(name) {
            // In a struct with bitfields, ordinary members have a bitfield size of 0.
            let bitfield = member.bitfield_size().filter(|&bits| bits != 0);
            return Some((member.bit_offset(), bitfield, member.clone()));
        }
    }
    if depth >= 4 {
        return None;
    }
    for member in &outer.members {
        if let Ok(Type::Struct(inner) | Type::Union(inner)) = btf.resolve_chained_type(member)
            && let Some((bits, bitfield, found)) = search(btf, &inner, name, depth + 1)
        {
            return Some((member.bit_offset() + bits, bitfield, found));
        }
    }
    None
}

/// Size in bytes of an integer member, through typedefs and qualifiers.
fn int_size(btf: &Btf, member: &Member) -> anyhow::Result<u32> {
    let mut current = btf.resolve_chained_type(member).map_err(|err| anyhow!("{err}"))?;
    for _ in 0..8 {
        current = match current {
            Type::Int(int) => return Ok(int.size() as u32),
            Type::Typedef(t) => btf.resolve_chained_type(&t),
            Type::Volatile(t) => btf.resolve_chained_type(&t),
            Type::Const(t) => btf.resolve_chained_type(&t),
            other => bail!("sk_protocol has type {}", other.name()),
        }
        .map_err(|err| anyhow!("{err}"))?;
    }
    bail!("sk_protocol's type chain is too long")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against this machine's kernel when it has BTF: the sock_common offsets have been the
    /// same for years, so they double as a check of the member search.
    #[test]
    fn running_kernel_layout() -> anyhow::Result<()> {
        let vmlinux = Path::new("/sys/kernel/btf/vmlinux");
        if !vmlinux.exists() {
            eprintln!("skipping: no kernel BTF");
            return Ok(());
        }
        let types = KernelTypes::read(vmlinux)?;
        let layout = types.sock_layout()?;
        assert_eq!(
            (layout.daddr, layout.rcv_saddr, layout.dport, layout.num, layout.family),
            (0, 4, 12, 14, 16)
        );
        assert_eq!(layout.protocol_size, 2);
        assert!(layout.protocol > 100 && layout.v6_daddr >= 40, "{layout:?}");
        assert_eq!((layout.adopt, layout.state), (1, 18), "{layout:?}");
        assert!(layout.net >= 24 && layout.net < layout.v6_daddr, "{layout:?}");
        // A plain `__u32` on 6.18 (1264 bytes in); a bitfield is read from its word.
        let width = (layout.lrcvtime_shift, layout.lrcvtime_bits);
        assert!(width == (0, 32) || width.0 + width.1 == 32, "{layout:?}");
        assert!(layout.lrcvtime > 1000 && layout.lrcvtime % 4 == 0, "{layout:?}");
        // `inet_sport` follows the whole `struct sock` in an `inet_sock`.
        assert!(
            layout.sk_err > 0 && layout.sport > layout.protocol.max(layout.sk_err),
            "{layout:?}"
        );
        let fds = types.fd_layout()?;
        assert_eq!(fds.valid, 1);
        // 6 parameters before 5.19 (`nonblock`), 5 after, 4 without `addr_len`.
        let params = types.function_params("tcp_recvmsg");
        assert!(matches!(params, Some(4..=6)), "{params:?}");
        assert_eq!(types.function_params("tcp_connect"), Some(1));
        assert!(fds.task_files > 0 && fds.fdt_fd > fds.fdt_max_fds.saturating_sub(8), "{fds:?}");
        // `i_mode` is the first member of `struct inode`.
        assert!(fds.file_inode > 0 && fds.inode_mode == 0, "{fds:?}");
        Ok(())
    }
}
