//! The agent's life: checks, listen, load and attach, drain events until a signal, detach.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use aya::maps::{HashMap, Map, PerCpuArray};
use connscope_common::{conn::SWEEP_INTERVAL_NS, names::map};
use prometheus_client::registry::Registry;
use tokio::{
    io::unix::AsyncFd,
    net::TcpListener,
    sync::{mpsc, watch},
};

use crate::{
    config::Config,
    exposition::{
        kernel_stats::{LossCollector, UserLosses},
        listen,
        metrics::Metrics,
        server::{self, AppState},
    },
    kernel::{
        adoption, decryption_budget,
        hooks::HookAttach,
        listen_queues::ListenQueueCollector,
        pin_owner::OwnerStillRunning,
        pinning::Pins,
        preflight, probes,
        socket_census::{self, SocketCensus},
        tls_uprobes::{self, TlsUprobes},
    },
    model::{
        label_sets::{Build, Probe},
        metric_table::PREFIX,
        socket_census::Census,
        tls_requests::TlsRequests,
    },
    pipeline::{
        backlog::{Drained, StartupDrain},
        checkpoint::{CheckpointMetrics, Checkpointer},
        driver::{EventCounters, Pipeline, release_freed_memory},
        pod_resolver::KubeletPlacement,
        ring_reader::RingReader,
        table::ConnectionTable,
    },
    shutdown,
};

/// How long queued events may wait before the agent reads them on a quiet host.
const DRAIN_INTERVAL: Duration = Duration::from_millis(100);

/// Everything the agent runs with, built before it starts serving (linkerd2-proxy's
/// `Config::build → App → spawn`): privileges checked, port bound, programs attached.
pub struct Agent {
    config: Config,
    listener: TcpListener,
    web: Arc<crate::exposition::web::WebSettings>,
    probes: probes::Probes,
    state: Arc<AppState>,
    pipeline: Pipeline,
    /// The libssl uprobes, rescanned for new OpenSSL copies while the agent runs.
    tls: Option<TlsUprobes>,
    census: SocketCensus,
}

impl Agent {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let web =
            Arc::new(crate::exposition::web::WebSettings::load(config.web_config_file.as_deref())?);
        preflight::check_privileges()?;
        // Bind first: a busy port is reported before anything is loaded into the kernel.
        let listener = listen::bind(config.listen_address).await?;
        preflight::ensure_tracefs()?;
        preflight::raise_memlock_limit();

        let pins = match config.pin_path.as_deref().map(|dir| Pins::prepare(dir, &config)) {
            None => None,
            Some(Ok(pins)) => Some(pins),
            // Running beside the owner, even unpinned, would count everything twice.
            Some(Err(err)) if err.is::<OwnerStillRunning>() => return Err(err),
            Some(Err(err)) => {
                tracing::warn!("kernel state will not outlive this agent: {err:#}");
                None
            }
        };
        // Before anything slow: records the pinned programs queue meanwhile would
        // otherwise overflow the ring buffer during start-up.
        let startup_drain = match &pins {
            Some(pins) if pins.previous.is_some() => {
                StartupDrain::start(pins.dir(), config.ringbuf_bytes).unwrap_or_else(|err| {
                    tracing::warn!(
                        "the pinned ring buffer is read once the agent is ready: {err:#}"
                    );
                    None
                })
            }
            _ => None,
        };
        let mut probes = probes::load_and_attach(&config, pins)?;
        release_freed_memory();
        let metrics = Metrics::new();
        metrics.capacity.set(i64::from(config.max_connections));
        metrics.build.get_or_create(&Build { version: env!("CARGO_PKG_VERSION").into() }).set(1);
        for hook in &probes.attached {
            metrics
                .probes
                .get_or_create(&Probe {
                    hook: hook.hook.into(),
                    attach: hook.attach.label().into(),
                })
                .set(1);
        }
        let outlive = probes.links_outlive_agent();
        let tls_requests = TlsRequests::default();
        let (mut tls, tls_status) = tls_uprobes::start(
            &config,
            &mut probes.ebpf,
            metrics.probes.clone(),
            outlive,
            tls_requests.clone(),
        );
        if let Some(links) = probes.take_over()?
            && let Some(tls) = &mut tls
        {
            tls.pin_links(links.join("tls"));
        }
        adoption::read_existing_connections(&mut probes, &metrics)?;
        let losses = Arc::new(UserLosses::default());
        let mut registry = Registry::with_prefix(PREFIX);
        metrics.register(&mut registry);
        tls_status.register(&mut registry);
        if let Some(tls) = &tls {
            tls.register(&mut registry);
        }
        registry.register_collector(Box::new(ListenQueueCollector::new("/proc")));
        let (census, port_ranges) = SocketCensus::new("/proc");
        registry.register_collector(Box::new(port_ranges));
        registry.register_collector(Box::new(LossCollector::new(
            PerCpuArray::try_from(probes.take_map(map::LOST)?)?,
            losses.clone(),
        )));
        let checkpoint_metrics = CheckpointMetrics::default();
        // Only where there is a checkpoint: `checkpoint_covered` 0 means one is failing.
        if config.checkpoints() && probes.pins.is_some() {
            checkpoint_metrics.register(&mut registry);
        }
        let state = Arc::new(AppState::new(registry));
        let _ = state.tls.set(tls_status.report.clone());
        if let Ok(mut hooks) = state.hooks.write() {
            *hooks = probes.attached.iter().map(HookAttach::row).collect();
        }
        let drained = startup_drain.map(StartupDrain::finish).transpose()?;
        let (events, backlog) = match drained {
            // The same ring buffer, read on from where the drain stopped.
            Some(Drained { ring, backlog }) => (ring, Some(backlog)),
            None => match probes.take_map(map::EVENTS)? {
                Map::RingBuf(data) => (RingReader::new(data)?, None),
                _ => anyhow::bail!("{} is not a ring buffer", map::EVENTS),
            },
        };
        // SAFETY: the reader owns its map fd and keeps it open until the AsyncFd drops it.
        let ring = unsafe { AsyncFd::register(events) }
            .map_err(|err| anyhow!("polling the ring buffer: {}", err.into_parts().1))?;
        let conns = HashMap::try_from(probes.take_map(map::CONNS)?)?;
        let placement =
            KubeletPlacement::new(config.cgroup_path.clone(), config.kubelet_logs_path.clone());
        let counters = EventCounters::new(&metrics);
        let mut table = ConnectionTable::new(
            metrics,
            config.max_connections as usize,
            config.max_servers,
            config.max_processes,
            Box::new(placement),
        );
        table.count_tls_requests_in(tls_requests);
        if let Some(tls) = &mut tls {
            tls.share_process_labels(table.process_labels());
        }
        let (handover, carried) = match &probes.pins {
            Some(_) => (
                Some(HashMap::try_from(probes.take_map(map::HANDOVER)?)?),
                Some(HashMap::try_from(probes.take_map(map::CARRIED_METRICS)?)?),
            ),
            None => (None, None),
        };
        let checkpoint = match &probes.pins {
            Some(pins) if config.checkpoints() => {
                Checkpointer::open(pins.dir(), config.checkpoint_budget, checkpoint_metrics)
                    .map_err(|err| tracing::warn!("no crash checkpoint: {err:#}"))
                    .ok()
            }
            _ => None,
        };
        let mut pipeline =
            Pipeline::new(ring, conns, table, counters, losses, handover, carried, checkpoint);
        if probes.pins.as_ref().is_some_and(|pins| pins.previous.is_some()) {
            pipeline.take_over_connections(backlog);
        } else {
            pipeline.start_checkpoint_afresh();
        }
        Ok(Self { config, listener, web, probes, state, pipeline, tls, census })
    }

    /// Serves and drains events until SIGTERM/SIGINT, then detaches.
    pub async fn run(self) -> anyhow::Result<()> {
        let Self { config, listener, web, mut probes, state, mut pipeline, mut tls, census } = self;
        let mut censuses = take_censuses(census, config.census_budget);
        let (stop_server, server_stopped) = watch::channel(false);
        let server = tokio::spawn(server::serve(listener, web, state.clone(), server_stopped));
        let signal = shutdown::signal_received();
        tokio::pin!(signal);
        // Polled once before /readyz says ready, so the handlers are installed: a SIGTERM
        // right after would otherwise end the agent with the default action (no handover).
        let mut early = None;
        tokio::select! {
            biased;
            name = &mut signal => early = Some(name),
            () = std::future::ready(()) => {}
        }
        state.ready.store(true, Ordering::Release);
        tracing::info!(
            address = %config.listen_address,
            "connscope ready: metrics on http://{}/metrics",
            listen::display_address(config.listen_address)
        );

        // The kernel wakes us only when enough is queued (agent-ebpf/src/maps.rs); the timer
        // drains what a quiet host leaves behind.
        let mut drain_timer = tokio::time::interval(DRAIN_INTERVAL);
        drain_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut sweep_timer = tokio::time::interval(Duration::from_nanos(SWEEP_INTERVAL_NS));
        sweep_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut tls_timer = tokio::time::interval_at(
            tokio::time::Instant::now() + tls_uprobes::RESCAN_INTERVAL,
            tls_uprobes::RESCAN_INTERVAL,
        );
        tls_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut budget_timer = tokio::time::interval(decryption_budget::TICK);
        budget_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        match early {
            Some(name) => tracing::info!("{name} received, stopping"),
            None => loop {
                tokio::select! {
                    name = &mut signal => {
                        tracing::info!("{name} received, stopping");
                        break;
                    }
                    _ = drain_timer.tick() => pipeline.drain(),
                    _ = sweep_timer.tick() => {
                        pipeline.sweep();
                        probes.heartbeat();
                    }
                    Some(census) = next_census(&mut censuses) => pipeline.count_sockets(&census),
                    _ = tls_timer.tick(), if tls.is_some() => {
                        if let Some(tls) = &mut tls {
                            tls.rescan(&mut probes.ebpf);
                        }
                    }
                    _ = budget_timer.tick(), if tls.is_some() => {
                        if let Some(tls) = &mut tls {
                            tls.budget_tick(&mut probes.ebpf);
                        }
                    }
                    guard = pipeline.ring.readable_mut() => {
                        let mut guard = guard.context("waiting for events")?;
                        guard.clear_ready();
                        pipeline.drain();
                    }
                }
            },
        }
        // Drop the programs (detached unless pinned) while still reading the ring buffer:
        // detaching the libssl uprobes takes over a second on a busy host, and the records
        // of that time would otherwise wait in the ring for the next agent. Then flush what
        // the kernel queued and leave the connections to the next agent.
        let signalled = Instant::now();
        drop(tls);
        let detach = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            drop(probes);
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "programs dropped (pinned ones stay attached)"
            );
        });
        tokio::pin!(detach);
        loop {
            tokio::select! {
                _ = &mut detach => break,
                _ = drain_timer.tick() => pipeline.drain(),
                guard = pipeline.ring.readable_mut() => match guard {
                    Ok(mut guard) => {
                        guard.clear_ready();
                        pipeline.drain();
                    }
                    // The handover below must still be written: wait for the detach, flush once.
                    Err(err) => {
                        tracing::warn!("waiting for events while stopping: {err}");
                        (&mut detach).await.ok();
                        break;
                    }
                },
            }
        }
        pipeline.drain();
        pipeline.hand_over();
        state.scrapes.counts_final();
        drop(pipeline);
        server::serve_final_counts(&state, signalled).await;
        let _ = stop_server.send(true);
        let _ = tokio::time::timeout(Duration::from_millis(500), server).await;
        Ok(())
    }
}

/// Takes a socket census on a blocking thread (netlink dumps, or files of `/proc`) every
/// `socket_census::INTERVAL`, or longer after a slow one (`socket_census::next_after`), and
/// hands each to the event loop; ends when the loop stops listening. None with a budget of 0.
fn take_censuses(census: SocketCensus, budget: f64) -> Option<mpsc::Receiver<Census>> {
    if budget <= 0.0 {
        tracing::info!("no socket census (--census.budget 0): no TIME_WAIT or port metrics");
        return None;
    }
    let (sender, receiver) = mpsc::channel(1);
    let census = Arc::new(census);
    tokio::spawn(async move {
        loop {
            let started = tokio::time::Instant::now();
            let census = census.clone();
            let Ok(taken) = tokio::task::spawn_blocking(move || census.take()).await else {
                tracing::warn!("the socket census stopped");
                return;
            };
            let took = started.elapsed();
            tracing::debug!(
                sockets = taken.sockets.len(),
                namespaces = taken.namespaces.len(),
                took_ms = took.as_secs_f64() * 1e3,
                "socket census"
            );
            let next = started + socket_census::next_after(took, budget);
            if sender.send(taken).await.is_err() {
                return;
            }
            tokio::time::sleep_until(next).await;
        }
    });
    Some(receiver)
}

/// The next census, or never without one.
async fn next_census(censuses: &mut Option<mpsc::Receiver<Census>>) -> Option<Census> {
    match censuses {
        Some(censuses) => censuses.recv().await,
        None => std::future::pending().await,
    }
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    Agent::build(config).await?.run().await
}

/// `connscope bench-floor`: the benchmark's floor arm, attached until SIGTERM/SIGINT.
pub async fn run_floor(config: Config) -> anyhow::Result<()> {
    preflight::check_privileges()?;
    preflight::raise_memlock_limit();
    let floor = probes::load_floor(&config)?;
    eprintln!(
        "connscope: floor attached (sock_send_length, sock_recv_length, inet_sock_set_state, tcp_destroy_sock)"
    );
    let name = shutdown::signal_received().await;
    tracing::info!("{name} received, detaching the floor arm");
    drop(floor);
    Ok(())
}
