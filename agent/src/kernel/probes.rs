//! Loads the kernel programs and attaches one backend per hook.
//!
//! `tcp_connect`, `tcp_close`, `tcp_sendmsg` and `tcp_recvmsg` each try fentry/fexit, then
//! kprobes, then tracepoints (or only the backend forced by `--probe.backend`). The lifecycle
//! tracepoints (state changes, resets, destruction) are attached on every kernel: they are
//! the one stable source of TCP state transitions, as BTF tracepoints (`tp_btf`) when the
//! kernel has BTF, classic ones otherwise. Every program, map and global is named by a
//! constant of `connscope_common::names`.

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, MapData},
    programs::{
        BtfTracePoint, FEntry, FExit, KProbe, Program, RawTracePoint, RawTracePointRunOptions,
        TestRun as _, TracePoint, links::FdLink,
    },
};
use connscope_common::{
    ProgramConfig, Setting, UserBuffers,
    checkpoint::CHECKPOINT_SLOTS,
    names::{global, map, program},
};

pub use crate::kernel::hooks::{Attach, HookAttach};
use crate::{
    config::{Backend, Config},
    kernel::facts::{Kernel, payload_syscall_table},
    kernel::hooks::{Attachment, FLOOR, HOOKS, Hook, LIFECYCLE, Target},
    kernel::pinning::Pins,
    kernel::preflight,
};

pub static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/connscope"));

/// The loaded programs. Dropping it detaches everything that is not pinned.
pub struct Probes {
    pub ebpf: Ebpf,
    /// Links of the attached programs: until the takeover with pinned state, for the
    /// agent's life without (dropping one detaches it).
    links: Vec<(String, FdLink)>,
    /// Where the state is pinned (`--bpf.pin-path`), if it is.
    pub pins: Option<Pins>,
    /// Kprobes, tracepoints and uprobes attach through BPF links (pinnable): Linux 5.15.
    perf_event_links: bool,
    pub attached: Vec<HookAttach>,
    /// Where payload heads come from on this kernel.
    pub user_buffers: UserBuffers,
    /// Why established sockets that predate the agent are not adopted; `None` when they
    /// are (the kernel's BTF gave the offsets of their state and network namespace, and
    /// sends and receives are seen with their socket).
    pub no_adoption: Option<&'static str>,
}

fn load(config: &Config, kernel: &Kernel, pins: Option<&Pins>) -> anyhow::Result<Ebpf> {
    let libssl_calls = config.tls_uprobes && config.capture_heads;
    let program_config = ProgramConfig {
        user_buffers: kernel.user_buffers as u32,
        libssl_calls: u32::from(libssl_calls),
    };
    let mut loader = EbpfLoader::new();
    // Pinned maps are reused when they exist, created and pinned otherwise.
    for (name, path) in pins.iter().flat_map(|pins| pins.map_paths()) {
        loader.map_pin_path(name, path);
    }
    let generation = pins.map_or(0, |pins| pins.generation);
    loader
        .btf(kernel.btf.as_ref())
        .override_global(global::GENERATION, &generation, true)
        .map_max_entries(map::CONNS, config.max_connections)
        .map_max_entries(map::HANDOVER, config.max_connections + 1)
        .map_max_entries(map::CHECKPOINT_CONNS, CHECKPOINT_SLOTS * config.max_connections)
        .map_max_entries(map::JOURNAL, config.journal_chunks())
        .map_max_entries(map::EVENTS, config.ringbuf_bytes)
        .override_global(global::PAYLOAD_SYSCALLS, &payload_syscall_table(), true)
        .override_global(global::SOCK_LAYOUT, &kernel.sock_layout.unwrap_or_default(), true)
        .override_global(global::FD_LAYOUT, &kernel.fd_layout.unwrap_or_default(), true)
        .override_global(global::PROGRAM_CONFIG, &program_config, true)
        .load(PROGRAMS)
        .context("loading the eBPF programs")
}

/// Loads against `pins` (prepared by the caller: `Pins::prepare`) when state is pinned.
pub fn load_and_attach(config: &Config, pins: Option<Pins>) -> anyhow::Result<Probes> {
    let kernel = Kernel::inspect(config);
    if config.backend == Backend::Fentry && kernel.btf.is_none() {
        return Err(preflight::PreflightError::NoBtf.into());
    }
    let mut ebpf = load(config, &kernel, pins.as_ref())?;
    if let Some(pins) = &pins {
        pins.begin_takeover(&mut ebpf)?;
    }
    stamp_adoption_start(&mut ebpf);
    let mut loader = Attacher { ebpf: &mut ebpf, kernel: &kernel, links: Vec::new() };
    let lifecycle = loader.attach_lifecycle()?;
    if kernel.user_buffers == UserBuffers::SyscallStash {
        loader.attach_raw_tracepoint(program::SYS_ENTER_STASH, "sys_enter")?;
    }
    let mut attached = Vec::with_capacity(HOOKS.len() + 1);
    attached.push(HookAttach { hook: "inet_sock_set_state", attach: lifecycle });
    let mut exit_hook = kernel.user_buffers == UserBuffers::SyscallStash;
    let mut counted_at_exit = false;
    for hook in &HOOKS {
        let attach = match loader.attach_hook(hook, config.backend) {
            Ok((attach, syscall_exit)) => {
                exit_hook |= syscall_exit;
                counted_at_exit |= syscall_exit;
                tracing::info!(hook = hook.name, backend = %attach, "hook attached");
                attach
            }
            // Without send/receive hooks the agent still reports connections, closes and
            // durations (lifecycle-only), rather than nothing at all.
            Err(err) if config.backend == Backend::Auto => {
                tracing::warn!(
                    hook = hook.name,
                    "{err:#}; running without it: requests, bytes and idle gaps are not measured"
                );
                Attach::Unavailable
            }
            Err(err) => return Err(err),
        };
        attached.push(HookAttach { hook: hook.name, attach });
    }
    if exit_hook {
        loader.attach_raw_tracepoint(program::SYS_EXIT_TRANSFER, "sys_exit")?;
    }
    tracing::info!(heads = ?kernel.user_buffers, "payload heads");
    let links = std::mem::take(&mut loader.links);
    if pins.is_some()
        && !kernel.perf_event_links
        && attached.iter().any(|hook| hook.attach == Attach::Kprobe)
    {
        tracing::warn!(
            "kprobes cannot stay attached without an agent before Linux 5.15: what their hooks \
             see while no agent runs (sends, receives, process attribution) is not counted"
        );
    }
    let no_adoption = if kernel.sock_layout.is_none_or(|layout| layout.adopt == 0) {
        Some("the kernel's BTF does not give the socket fields adoption reads")
    } else if counted_at_exit && kernel.fd_layout.is_none_or(|layout| layout.file_inode == 0) {
        // agent-ebpf/src/syscall_exit.rs: without the inode's type, a descriptor is a socket
        // only when it is in CONNS already; nothing tells a socket from another file.
        Some(
            "sends and receives are counted at system call exit, and the kernel's BTF does not \
             tell a socket's descriptor from another file's",
        )
    } else {
        None
    };
    Ok(Probes {
        ebpf,
        links,
        pins,
        perf_event_links: kernel.perf_event_links,
        attached,
        user_buffers: kernel.user_buffers,
        no_adoption,
    })
}

impl Probes {
    /// Takes a map out of the loaded object, for the agent's own use.
    pub fn take_map(&mut self, name: &str) -> anyhow::Result<aya::maps::Map> {
        self.ebpf.take_map(name).ok_or_else(|| anyhow!("{name} map missing from the eBPF object"))
    }

    /// Whether links made after loading (the libssl uprobes) can outlive the agent.
    pub fn links_outlive_agent(&self) -> bool {
        self.pins.is_some() && self.perf_event_links
    }

    /// With pinned state, tells the programs this agent is alive (`Pins::heartbeat`).
    pub fn heartbeat(&mut self) {
        if let Some(pins) = &self.pins {
            pins.heartbeat(&mut self.ebpf);
        }
    }

    /// With pinned state, once the agent attached everything it attaches at start (the
    /// libssl uprobes too, so no HTTPS call goes uncounted): makes its programs the counting
    /// ones and pins their links (`Pins::take_over`). Returns the directory of this
    /// generation's links.
    pub fn take_over(&mut self) -> anyhow::Result<Option<std::path::PathBuf>> {
        let Some(pins) = &self.pins else { return Ok(None) };
        pins.take_over(&mut self.ebpf, std::mem::take(&mut self.links))?;
        Ok(Some(pins.own_links()))
    }
}

/// Loads the programs and attaches only the floor arm (`connscope bench-floor`); detached
/// when the result is dropped.
pub fn load_floor(config: &Config) -> anyhow::Result<(Ebpf, Vec<FdLink>)> {
    let kernel = Kernel::inspect(config);
    let btf = kernel.btf_tracepoints().ok_or_else(|| anyhow!("the floor arm needs kernel BTF"))?;
    let mut ebpf = load(config, &kernel, None)?;
    let mut links = Vec::new();
    for attachment in FLOOR {
        if let Target::BtfTracepoint(event) = attachment.target {
            links.push(attach_tp_btf(&mut ebpf, attachment.program, event, btf)?);
        }
    }
    Ok((ebpf, links))
}

/// Attaches programs of the loaded object.
struct Attacher<'a> {
    ebpf: &'a mut Ebpf,
    kernel: &'a Kernel,
    /// Every link made, by program name: pinned, or held until the agent exits.
    links: Vec<(String, FdLink)>,
}

impl Attacher<'_> {
    /// The lifecycle tracepoints as BTF tracepoints when the kernel allows, classic ones
    /// otherwise; returns which.
    fn attach_lifecycle(&mut self) -> anyhow::Result<Attach> {
        let btf = self.kernel.btf_tracepoints().is_some();
        for (btf_form, classic_form) in LIFECYCLE {
            self.attach(if btf { btf_form } else { classic_form })?;
        }
        Ok(if btf { Attach::TpBtf } else { Attach::Tracepoint })
    }

    fn candidates(&self, backend: Backend) -> Vec<Attach> {
        match backend {
            Backend::Auto => {
                let mut order = Vec::with_capacity(4);
                if self.kernel.btf.is_some() {
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

    /// Attaches `hook` with the first backend that works; also says whether it needs the
    /// syscall-exit program.
    fn attach_hook(&mut self, hook: &Hook, backend: Backend) -> anyhow::Result<(Attach, bool)> {
        let mut failures = Vec::new();
        for attach in self.candidates(backend) {
            let result = match attach {
                Attach::Fentry => self.attach_all(hook.fentry).map(|()| false),
                Attach::Kprobe => self.attach_all(hook.kprobe).map(|()| false),
                // The lifecycle tracepoints came in one form; a hook's must match it.
                Attach::TpBtf if self.kernel.btf_tracepoints().is_none() => {
                    Err(anyhow!("no usable kernel BTF for tp_btf"))
                }
                Attach::TpBtf => self.attach_all(hook.tp_btf).map(|()| false),
                Attach::Unavailable => Err(anyhow!("not a backend")),
                Attach::Tracepoint
                    if self.kernel.btf_tracepoints().is_some() && hook.tracepoint.is_empty() =>
                {
                    Err(anyhow!("covered by the tp_btf lifecycle tracepoints"))
                }
                Attach::Tracepoint => {
                    self.attach_all(hook.tracepoint).map(|()| false).or_else(|err| {
                        match hook.syscall_fallback.filter(|_| self.kernel.fd_layout.is_some()) {
                            Some(setting) => {
                                tracing::info!(
                                    hook = hook.name,
                                    "{err:#}; counting at syscall exit instead"
                                );
                                self.enable(setting).map(|()| true)
                            }
                            None => Err(err),
                        }
                    })
                }
            };
            match result {
                Ok(syscall_exit) => return Ok((attach, syscall_exit)),
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
    fn attach_all(&mut self, attachments: &[Attachment]) -> anyhow::Result<()> {
        let before = self.links.len();
        for (done, &attachment) in attachments.iter().enumerate() {
            if let Err(err) = self.attach(attachment) {
                // Dropping the links detaches them.
                self.links.truncate(before);
                for &earlier in &attachments[..done] {
                    unload(self.ebpf, self.kernel.program_for(earlier.program));
                }
                return Err(err);
            }
        }
        Ok(())
    }

    fn attach(&mut self, attachment: Attachment) -> anyhow::Result<()> {
        let name = self.kernel.program_for(attachment.program);
        let link = match attachment.target {
            Target::Function(function) => {
                let btf = self.kernel.btf.as_ref();
                attach_function(self.ebpf, name, function, btf, self.kernel.perf_event_links)
            }
            Target::BtfTracepoint(event) => {
                let btf = self.kernel.btf_tracepoints().ok_or_else(|| anyhow!("no kernel BTF"))?;
                attach_tp_btf(self.ebpf, name, event, btf).map(Some)
            }
            Target::Tracepoint { category, event } => {
                let p: &mut TracePoint = program_mut(self.ebpf, name)?.try_into()?;
                p.load().with_context(|| format!("loading {name}"))?;
                let id = p
                    .attach(category, event)
                    .with_context(|| format!("attaching tracepoint {category}:{event}"))?;
                if self.kernel.perf_event_links {
                    FdLink::try_from(p.take_link(id)?).map(Some).map_err(anyhow::Error::from)
                } else {
                    Ok(None)
                }
            }
        }?;
        if let Some(link) = link {
            self.links.push((name.to_owned(), link));
        }
        Ok(())
    }

    fn attach_raw_tracepoint(&mut self, name: &str, event: &str) -> anyhow::Result<()> {
        let p: &mut RawTracePoint = program_mut(self.ebpf, name)?.try_into()?;
        p.load().with_context(|| format!("loading {name}"))?;
        let id = p.attach(event).with_context(|| format!("attaching raw tracepoint {event}"))?;
        self.links.push((name.to_owned(), p.take_link(id)?.into()));
        Ok(())
    }

    /// Turns on one of the kernel side's `SETTINGS` switches.
    fn enable(&mut self, setting: Setting) -> anyhow::Result<()> {
        let map =
            self.ebpf.map_mut(map::SETTINGS).ok_or_else(|| anyhow!("SETTINGS map missing"))?;
        let mut settings: Array<&mut MapData, u32> = Array::try_from(map)?;
        settings.set(setting as u32, 1, 0).context("writing SETTINGS")?;
        Ok(())
    }
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

/// Stamps `PinSlot::AdoptionStartJiffies` with the kernel's jiffies, by one test run of
/// the `ADOPTION_START` program, just before the hooks are attached. Where that fails
/// (raw tracepoint test runs came in 5.10) a server end adopted at its response on the
/// fentry or kprobe backend misses the request its receive was waiting for at start.
fn stamp_adoption_start(ebpf: &mut Ebpf) {
    let mut stamp = || -> anyhow::Result<()> {
        let p: &mut RawTracePoint = program_mut(ebpf, program::ADOPTION_START)?.try_into()?;
        p.load()?;
        p.test_run(RawTracePointRunOptions::new())?;
        Ok(())
    };
    if let Err(err) = stamp() {
        tracing::info!(
            "no start time for adoption ({err:#}): with fexit or kretprobe receive hooks, a \
             server blocked in a receive when the agent starts misses that one request"
        );
    }
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Program> {
    ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))
}

/// Attaches a function hook. Its link is returned to be pinned when it is a BPF link; a
/// kprobe on kernels before 5.15 is a perf event that cannot be pinned, so it stays owned by
/// its program (detached when the agent exits).
fn attach_function(
    ebpf: &mut Ebpf,
    name: &str,
    function: &str,
    btf: Option<&Btf>,
    perf_event_links: bool,
) -> anyhow::Result<Option<FdLink>> {
    Ok(Some(match program_mut(ebpf, name)? {
        Program::FEntry(p) => {
            let btf = btf.ok_or_else(|| anyhow!("no kernel BTF"))?;
            let p: &mut FEntry = p;
            p.load(function, btf).with_context(|| format!("loading fentry/{function}"))?;
            let id = p.attach().with_context(|| format!("attaching fentry/{function}"))?;
            p.take_link(id)?.into()
        }
        Program::FExit(p) => {
            let btf = btf.ok_or_else(|| anyhow!("no kernel BTF"))?;
            let p: &mut FExit = p;
            p.load(function, btf).with_context(|| format!("loading fexit/{function}"))?;
            let id = p.attach().with_context(|| format!("attaching fexit/{function}"))?;
            p.take_link(id)?.into()
        }
        Program::KProbe(p) => {
            let p: &mut KProbe = p;
            p.load().with_context(|| format!("loading kprobe {name}"))?;
            let id =
                p.attach(function, 0).with_context(|| format!("attaching kprobe to {function}"))?;
            if !perf_event_links {
                return Ok(None);
            }
            FdLink::try_from(p.take_link(id)?)?
        }
        _ => bail!("{name} is not an fentry/fexit or kprobe program"),
    }))
}

fn attach_tp_btf(ebpf: &mut Ebpf, name: &str, event: &str, btf: &Btf) -> anyhow::Result<FdLink> {
    let p: &mut BtfTracePoint = program_mut(ebpf, name)?.try_into()?;
    p.load(event, btf).with_context(|| format!("loading tp_btf/{event}"))?;
    let id = p.attach().with_context(|| format!("attaching tp_btf/{event}"))?;
    Ok(p.take_link(id)?.into())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use connscope_common::names;
    use object::{Object as _, ObjectSymbol as _};

    use super::*;

    /// Every name of the contract is in the object, and every program of the object is in
    /// the contract: a rename fails here, not at load time on some host.
    #[test]
    fn object_matches_the_names_of_the_contract() -> anyhow::Result<()> {
        let object = aya_obj::Object::parse(PROGRAMS)?;
        let programs: BTreeSet<&str> = object.programs.keys().map(String::as_str).collect();
        let expected: BTreeSet<&str> = names::program::ALL.into_iter().collect();
        assert_eq!(programs, expected);
        for name in names::map::ALL {
            assert!(object.maps.contains_key(name), "map {name} missing");
        }
        let elf = object::File::parse(PROGRAMS)?;
        let symbols: BTreeSet<&str> =
            elf.symbols().filter_map(|symbol| symbol.name().ok()).collect();
        for name in names::global::ALL {
            assert!(symbols.contains(name), "global {name} missing");
        }
        Ok(())
    }
}
