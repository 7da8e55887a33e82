//! Loads the kernel programs and attaches one backend per hook.
//!
//! `tcp_connect`, `tcp_close`, `tcp_sendmsg` and `tcp_recvmsg` each try fentry/fexit, then
//! kprobes, then tracepoints (or only the backend forced by `--probe.backend`). The lifecycle
//! tracepoints (state changes, resets, destruction) are attached on every kernel: they are
//! the one stable source of TCP state transitions. Tracepoints are attached as BTF
//! tracepoints (`tp_btf`) when the kernel has BTF, as classic ones otherwise.

use std::{fmt, path::Path};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, MapData},
    programs::{BtfTracePoint, FEntry, FExit, KProbe, Program, RawTracePoint, TracePoint},
};
use connscope_common::{map_name, payload_syscall, setting};

use crate::{
    config::{Backend, Config},
    kernel_layout::KernelTypes,
    preflight,
};

/// How a hook ended up attached (`attach` label of `connscope_probe_info`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    Fentry,
    Kprobe,
    TpBtf,
    Tracepoint,
}

impl Attach {
    pub const fn label(self) -> &'static str {
        match self {
            Self::Fentry => "fentry",
            Self::Kprobe => "kprobe",
            Self::TpBtf => "tp_btf",
            Self::Tracepoint => "tracepoint",
        }
    }
}

impl fmt::Display for Attach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// One hook and the backend that serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookAttach {
    pub hook: &'static str,
    pub attach: Attach,
}

/// A hook with its programs per backend: `(program, kernel function)` for fentry/fexit and
/// kprobe/kretprobe, `(program, category, event)` for tracepoints.
struct Hook {
    name: &'static str,
    fentry: &'static [(&'static str, &'static str)],
    kprobe: &'static [(&'static str, &'static str)],
    /// Empty when the always-attached lifecycle tracepoints already cover the hook.
    tp_btf: &'static [(&'static str, &'static str)],
    tracepoint: &'static [(&'static str, &'static str, &'static str)],
    /// Last resort of the tracepoint backend on kernels without `sock_send_length` and
    /// `sock_recv_length` (before 6.3): count at syscall exit (`setting` index).
    syscall_fallback: Option<u32>,
}

const HOOKS: [Hook; 4] = [
    Hook {
        name: "tcp_connect",
        fentry: &[("connscope_fentry_tcp_connect", "tcp_connect")],
        kprobe: &[("connscope_kprobe_tcp_connect", "tcp_connect")],
        // CLOSE -> SYN_SENT in sock:inet_sock_set_state runs inside connect().
        tp_btf: &[],
        tracepoint: &[],
        syscall_fallback: None,
    },
    Hook {
        name: "tcp_close",
        fentry: &[("connscope_fentry_tcp_close", "tcp_close")],
        kprobe: &[("connscope_kprobe_tcp_close", "tcp_close")],
        // State changes plus tcp:tcp_destroy_sock carry the close.
        tp_btf: &[],
        tracepoint: &[],
        syscall_fallback: None,
    },
    Hook {
        name: "tcp_sendmsg",
        fentry: &[("connscope_fexit_tcp_sendmsg", "tcp_sendmsg")],
        kprobe: &[
            ("connscope_kprobe_tcp_sendmsg", "tcp_sendmsg"),
            ("connscope_kretprobe_tcp_sendmsg", "tcp_sendmsg"),
        ],
        tp_btf: &[("connscope_btf_sock_send_length", "sock_send_length")],
        tracepoint: &[("connscope_sock_send_length", "sock", "sock_send_length")],
        syscall_fallback: Some(setting::SYSCALL_SENDS),
    },
    Hook {
        name: "tcp_recvmsg",
        fentry: &[("connscope_fexit_tcp_recvmsg", "tcp_recvmsg")],
        kprobe: &[
            ("connscope_kprobe_tcp_recvmsg", "tcp_recvmsg"),
            ("connscope_kretprobe_tcp_recvmsg", "tcp_recvmsg"),
        ],
        tp_btf: &[("connscope_btf_sock_recv_length", "sock_recv_length")],
        tracepoint: &[("connscope_sock_recv_length", "sock", "sock_recv_length")],
        syscall_fallback: Some(setting::SYSCALL_RECVS),
    },
];

/// Attached on every kernel, whatever the backend: `(tp_btf program, classic program,
/// category, event)`.
const LIFECYCLE: [(&str, &str, &str, &str); 4] = [
    (
        "connscope_btf_inet_sock_set_state",
        "connscope_inet_sock_set_state",
        "sock",
        "inet_sock_set_state",
    ),
    ("connscope_btf_tcp_receive_reset", "connscope_tcp_receive_reset", "tcp", "tcp_receive_reset"),
    ("connscope_btf_tcp_send_reset", "connscope_tcp_send_reset", "tcp", "tcp_send_reset"),
    ("connscope_btf_tcp_destroy_sock", "connscope_tcp_destroy_sock", "tcp", "tcp_destroy_sock"),
];

/// This architecture's numbers of `payload_syscall::NAMES`, in that order.
const PAYLOAD_SYSCALL_NUMBERS: [u64; payload_syscall::COUNT] = [
    libc::SYS_read as u64,
    libc::SYS_write as u64,
    libc::SYS_recvfrom as u64,
    libc::SYS_sendto as u64,
    libc::SYS_readv as u64,
    libc::SYS_writev as u64,
    libc::SYS_recvmsg as u64,
    libc::SYS_sendmsg as u64,
];

static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/connscope"));

/// The loaded programs. Dropping it detaches everything.
pub struct Probes {
    pub ebpf: Ebpf,
    pub attached: Vec<HookAttach>,
}

pub fn load_and_attach(config: &Config) -> anyhow::Result<Probes> {
    let btf = if preflight::has_btf() { Btf::from_sys_fs().ok() } else { None };
    if config.backend == Backend::Fentry && btf.is_none() {
        return Err(preflight::PreflightError::NoBtf.into());
    }
    let types = btf.as_ref().and_then(|_| {
        KernelTypes::read(Path::new(preflight::BTF_VMLINUX))
            .inspect_err(|err| tracing::info!("kernel BTF unreadable for field offsets: {err:#}"))
            .ok()
    });
    // BTF tracepoints need the struct sock layout; without it, classic tracepoints.
    let layout = types.as_ref().and_then(|types| {
        types
            .sock_layout()
            .inspect_err(|err| {
                tracing::info!("BTF tracepoints unavailable, using classic ones: {err:#}")
            })
            .ok()
    });
    // The syscall-exit fallback needs the fd -> socket pointer chain, and the stash programs.
    let fd_layout = types.as_ref().filter(|_| config.capture_heads).and_then(|types| {
        types
            .fd_layout()
            .inspect_err(|err| tracing::debug!("no syscall-exit fallback: {err:#}"))
            .ok()
    });
    let mut ebpf = EbpfLoader::new()
        .btf(btf.as_ref())
        .map_max_entries(map_name::CONNS, config.max_connections)
        .map_max_entries(map_name::EVENTS, config.ringbuf_bytes)
        .override_global("PAYLOAD_SYSCALLS", &PAYLOAD_SYSCALL_NUMBERS, true)
        .override_global("SOCK_LAYOUT", &layout.unwrap_or_default(), true)
        .override_global("FD_LAYOUT", &fd_layout.unwrap_or_default(), true)
        .load(PROGRAMS)
        .context("loading the eBPF programs")?;
    let btf_tracepoints = btf.as_ref().filter(|_| layout.is_some());

    let lifecycle = attach_lifecycle(&mut ebpf, btf_tracepoints)?;
    if config.capture_heads {
        attach_payload_stash(&mut ebpf)?;
    }
    let mut attached = Vec::with_capacity(HOOKS.len() + 1);
    attached.push(HookAttach { hook: "inet_sock_set_state", attach: lifecycle });
    let fallback = fd_layout.is_some();
    for hook in &HOOKS {
        let attach =
            attach_hook(&mut ebpf, hook, config.backend, btf.as_ref(), btf_tracepoints, fallback)?;
        tracing::info!(hook = hook.name, backend = %attach, "hook attached");
        attached.push(HookAttach { hook: hook.name, attach });
    }
    Ok(Probes { ebpf, attached })
}

/// Attaches the lifecycle tracepoints as BTF tracepoints when `btf` is usable for them,
/// as classic ones otherwise; returns which.
fn attach_lifecycle(ebpf: &mut Ebpf, btf: Option<&Btf>) -> anyhow::Result<Attach> {
    for (btf_program, classic_program, category, event) in LIFECYCLE {
        match btf {
            Some(btf) => attach_tp_btf(ebpf, btf_program, event, btf)?,
            None => attach_tracepoint(ebpf, classic_program, category, event)?,
        };
    }
    Ok(if btf.is_some() { Attach::TpBtf } else { Attach::Tracepoint })
}

fn candidates(backend: Backend, btf: Option<&Btf>) -> Vec<Attach> {
    match backend {
        Backend::Auto => {
            let mut order = Vec::with_capacity(4);
            if btf.is_some() {
                order.push(Attach::Fentry);
            }
            if preflight::has_kprobes() {
                order.push(Attach::Kprobe);
            }
            order.extend([Attach::TpBtf, Attach::Tracepoint]);
            order
        }
        Backend::Fentry => vec![Attach::Fentry],
        Backend::Kprobe => vec![Attach::Kprobe],
        Backend::Tracepoint => vec![Attach::TpBtf, Attach::Tracepoint],
    }
}

fn attach_hook(
    ebpf: &mut Ebpf,
    hook: &Hook,
    backend: Backend,
    btf: Option<&Btf>,
    btf_tracepoints: Option<&Btf>,
    syscall_fallback: bool,
) -> anyhow::Result<Attach> {
    let mut failures = Vec::new();
    for attach in candidates(backend, btf) {
        let result = match attach {
            Attach::Fentry => btf.ok_or_else(|| anyhow!("no kernel BTF")).and_then(|btf| {
                attach_all(ebpf, hook.fentry, |ebpf, (p, f)| attach_btf(ebpf, p, f, btf))
            }),
            Attach::Kprobe => {
                attach_all(ebpf, hook.kprobe, |ebpf, (p, f)| attach_kprobe(ebpf, p, f))
            }
            // The lifecycle tracepoints came in one form; a hook's must match it.
            Attach::TpBtf => btf_tracepoints
                .ok_or_else(|| anyhow!("no usable kernel BTF for tp_btf"))
                .and_then(|btf| {
                    attach_all(ebpf, hook.tp_btf, |ebpf, (p, e)| attach_tp_btf(ebpf, p, e, btf))
                }),
            Attach::Tracepoint if btf_tracepoints.is_some() && hook.tracepoint.is_empty() => {
                Err(anyhow!("covered by the tp_btf lifecycle tracepoints"))
            }
            Attach::Tracepoint => attach_all(ebpf, hook.tracepoint, |ebpf, (p, c, e)| {
                attach_tracepoint(ebpf, p, c, e)
            })
            .or_else(|err| match hook.syscall_fallback.filter(|_| syscall_fallback) {
                Some(index) => {
                    tracing::info!(hook = hook.name, "{err:#}; counting at syscall exit instead");
                    enable_setting(ebpf, index)
                }
                None => Err(err),
            }),
        };
        match result {
            Ok(()) => return Ok(attach),
            Err(err) => {
                tracing::info!(hook = hook.name, backend = %attach, "backend unavailable: {err:#}");
                failures.push(format!("{attach}: {err:#}"));
            }
        }
    }
    bail!("cannot attach {} with any backend ({})", hook.name, failures.join("; "))
}

/// Attaches every program of one backend, or none: on failure the ones already attached
/// are unloaded so a later backend does not count the same calls twice.
fn attach_all<T: Copy>(
    ebpf: &mut Ebpf,
    programs: &[T],
    mut attach_one: impl FnMut(&mut Ebpf, T) -> anyhow::Result<&'static str>,
) -> anyhow::Result<()> {
    let mut done = Vec::new();
    for &program in programs {
        match attach_one(ebpf, program) {
            Ok(name) => done.push(name),
            Err(err) => {
                for name in done {
                    unload(ebpf, name);
                }
                return Err(err);
            }
        }
    }
    Ok(())
}

/// Turns on one of the kernel side's `SETTINGS` switches.
fn enable_setting(ebpf: &mut Ebpf, index: u32) -> anyhow::Result<()> {
    let map = ebpf.map_mut(map_name::SETTINGS).ok_or_else(|| anyhow!("SETTINGS map missing"))?;
    let mut settings: Array<&mut MapData, u32> = Array::try_from(map)?;
    settings.set(index, 1, 0).context("writing SETTINGS")?;
    Ok(())
}

fn unload(ebpf: &mut Ebpf, name: &str) {
    let result = match ebpf.program_mut(name) {
        Some(Program::FEntry(p)) => p.unload(),
        Some(Program::FExit(p)) => p.unload(),
        Some(Program::KProbe(p)) => p.unload(),
        Some(Program::TracePoint(p)) => p.unload(),
        Some(Program::BtfTracePoint(p)) => p.unload(),
        _ => Ok(()),
    };
    if let Err(err) = result {
        tracing::warn!(program = name, "unloading after a failed attach: {err}");
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Program> {
    ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))
}

fn attach_btf(
    ebpf: &mut Ebpf,
    name: &'static str,
    function: &str,
    btf: &Btf,
) -> anyhow::Result<&'static str> {
    match program(ebpf, name)? {
        Program::FEntry(p) => {
            let p: &mut FEntry = p;
            p.load(function, btf).with_context(|| format!("loading fentry/{function}"))?;
            p.attach().with_context(|| format!("attaching fentry/{function}"))?;
        }
        Program::FExit(p) => {
            let p: &mut FExit = p;
            p.load(function, btf).with_context(|| format!("loading fexit/{function}"))?;
            p.attach().with_context(|| format!("attaching fexit/{function}"))?;
        }
        _ => bail!("{name} is not an fentry/fexit program"),
    }
    Ok(name)
}

fn attach_kprobe(
    ebpf: &mut Ebpf,
    name: &'static str,
    function: &str,
) -> anyhow::Result<&'static str> {
    let p: &mut KProbe = program(ebpf, name)?.try_into()?;
    p.load().with_context(|| format!("loading kprobe {name}"))?;
    p.attach(function, 0).with_context(|| format!("attaching kprobe to {function}"))?;
    Ok(name)
}

fn attach_tp_btf(
    ebpf: &mut Ebpf,
    name: &'static str,
    event: &str,
    btf: &Btf,
) -> anyhow::Result<&'static str> {
    let p: &mut BtfTracePoint = program(ebpf, name)?.try_into()?;
    p.load(event, btf).with_context(|| format!("loading tp_btf/{event}"))?;
    p.attach().with_context(|| format!("attaching tp_btf/{event}"))?;
    Ok(name)
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    name: &'static str,
    category: &str,
    event: &str,
) -> anyhow::Result<&'static str> {
    let p: &mut TracePoint = program(ebpf, name)?.try_into()?;
    p.load().with_context(|| format!("loading {name}"))?;
    p.attach(category, event)
        .with_context(|| format!("attaching tracepoint {category}:{event}"))?;
    Ok(name)
}

/// Raw `sys_enter`/`sys_exit`: they stash and drop the user buffers of socket I/O calls.
fn attach_payload_stash(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    for (name, event) in [("connscope_sys_enter", "sys_enter"), ("connscope_sys_exit", "sys_exit")]
    {
        let program: &mut RawTracePoint = program(ebpf, name)?.try_into()?;
        program.load().with_context(|| format!("loading {name}"))?;
        program.attach(event).with_context(|| format!("attaching raw tracepoint {event}"))?;
    }
    Ok(())
}
