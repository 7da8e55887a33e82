//! The agent's life: checks, listen, load and attach, drain events until a signal, detach.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use aya::maps::{PerCpuArray, RingBuf};
use connscope_common::map_name;
use prometheus_client::{metrics::counter::Counter, registry::Registry};
use tokio::{io::unix::AsyncFd, net::TcpListener, sync::watch};

use crate::{
    config::Config,
    events::{self, Event},
    kernel_stats::LossCollector,
    metrics::{Build, EventKindLabel, Metrics, Probe, UserLosses},
    placement::KubeletPlacement,
    preflight, probes,
    server::{self, AppState},
    shutdown,
    table::ConnectionTable,
};

/// How long queued events may wait before the agent reads them on a quiet host.
const DRAIN_INTERVAL: Duration = Duration::from_millis(100);

pub async fn run(config: Config) -> anyhow::Result<()> {
    let web = Arc::new(crate::web::WebSettings::load(config.web_config_file.as_deref())?);
    preflight::check_privileges()?;
    // Bind first: a busy port is reported before anything is loaded into the kernel.
    let listener = bind(config.listen_address).await?;
    preflight::ensure_tracefs()?;
    raise_memlock_limit();

    let mut probes = probes::load_and_attach(&config)?;
    let metrics = Metrics::new();
    metrics.capacity.set(i64::from(config.max_connections));
    metrics.build.get_or_create(&Build { version: env!("CARGO_PKG_VERSION").into() }).set(1);
    for hook in &probes.attached {
        metrics
            .probes
            .get_or_create(&Probe { hook: hook.hook.into(), attach: hook.attach.label().into() })
            .set(1);
    }

    let losses = Arc::new(UserLosses::default());
    let lost_map =
        probes.ebpf.take_map(map_name::LOST).ok_or_else(|| anyhow!("LOST map missing"))?;
    let mut registry = Registry::with_prefix("connscope");
    metrics.register(&mut registry);
    registry.register_collector(Box::new(LossCollector::new(
        PerCpuArray::try_from(lost_map)?,
        losses.clone(),
    )));

    let state = Arc::new(AppState::new(registry));
    if let Ok(mut hooks) = state.hooks.write() {
        hooks.clone_from(&probes.attached);
    }
    let events_map =
        probes.ebpf.take_map(map_name::EVENTS).ok_or_else(|| anyhow!("EVENTS map missing"))?;
    // SAFETY: the ring buffer owns its map fd and keeps it open until the AsyncFd drops it.
    let mut ring = unsafe { AsyncFd::register(RingBuf::try_from(events_map)?) }
        .map_err(|err| anyhow!("polling the ring buffer: {}", err.into_parts().1))?;
    let placement =
        KubeletPlacement::new(config.cgroup_path.clone(), config.kubelet_logs_path.clone());
    let counters = EventCounters::new(&metrics);
    let mut table = ConnectionTable::new(
        metrics,
        config.max_servers,
        config.max_processes,
        Box::new(placement),
    );

    let (stop_server, server_stopped) = watch::channel(false);
    let server = tokio::spawn(server::serve(listener, web, state.clone(), server_stopped));
    state.ready.store(true, Ordering::Release);
    tracing::info!(
        address = %config.listen_address,
        "connscope ready: metrics on http://{}/metrics",
        display_address(config.listen_address)
    );

    let signal = shutdown::signal_received();
    tokio::pin!(signal);
    // The kernel wakes us only when enough is queued (agent-ebpf/src/maps.rs); the timer
    // drains what a quiet host leaves behind.
    let mut drain_timer = tokio::time::interval(DRAIN_INTERVAL);
    drain_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            name = &mut signal => {
                tracing::info!("{name} received, stopping");
                break;
            }
            _ = drain_timer.tick() => drain(ring.get_mut(), &mut table, &counters, &losses),
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting for events")?;
                drain(guard.get_inner_mut(), &mut table, &counters, &losses);
                guard.clear_ready();
            }
        }
    }
    // Flush what the kernel already queued, then detach by dropping the programs.
    drain(ring.get_mut(), &mut table, &counters, &losses);
    drop(ring);
    drop(probes);
    let _ = stop_server.send(true);
    let _ = tokio::time::timeout(Duration::from_millis(500), server).await;
    Ok(())
}

/// `events_received_total` per kind, looked up once.
struct EventCounters {
    open: Counter,
    turn: Counter,
    close: Counter,
}

impl EventCounters {
    fn new(metrics: &Metrics) -> Self {
        let counter =
            |kind: &str| metrics.events.get_or_create_owned(&EventKindLabel { kind: kind.into() });
        Self { open: counter("open"), turn: counter("turn"), close: counter("close") }
    }

    fn count(&self, event: &Event) {
        match event {
            Event::Open(_) => self.open.inc(),
            Event::Turn(_) => self.turn.inc(),
            Event::Close(_) => self.close.inc(),
        };
    }
}

fn drain(
    ring: &mut RingBuf<aya::maps::MapData>,
    table: &mut ConnectionTable,
    counters: &EventCounters,
    losses: &UserLosses,
) {
    while let Some(record) = ring.next() {
        match events::decode(&record) {
            Ok(event) => {
                counters.count(&event);
                table.handle(&event);
            }
            Err(err) => {
                losses.decode_error.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("dropping a ring buffer record: {err}");
            }
        }
    }
}

async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
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

fn display_address(address: SocketAddr) -> String {
    if address.ip().is_unspecified() {
        format!("localhost:{}", address.port())
    } else {
        address.to_string()
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones ignore it.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid pointer to a local struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK: {}", io::Error::last_os_error());
    }
}
