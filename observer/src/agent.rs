//! `observer agent`: hooks -> events -> correlation -> exporters, in one event loop.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{Arc, RwLock, atomic::Ordering},
    time::Duration,
};

use aya::maps::{MapData, MapError, RingBuf};
use log::{debug, info, warn};
use observer_common::{FLOW_EVENT_NEW, FlowCounters, FlowKey, Point, STATS_LEN, Stat};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    time::{Instant, MissedTickBehavior, interval},
};

use crate::{
    cli::AgentArgs,
    clock::Clock,
    correlate::{self, Correlator, Counters, Flush},
    events,
    export::{
        http::{self, Health},
        json::{FlowLog, JsonError},
        metrics::Metrics,
    },
    hooks::{
        HookError, Hooks, KernelMaps, Role,
        drop::DropConfig,
        ifaces::{self, glob_match},
        pin::{self, PinDir, PinError},
        preflight::{self, PreflightError},
    },
    names::Names,
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    Hook(#[from] HookError),
    #[error(transparent)]
    Bind(#[from] http::BindError),
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error(transparent)]
    FlowLog(#[from] JsonError),
    #[error("names: {0}")]
    Names(#[from] crate::lab::LabError),
    #[error(transparent)]
    Kube(crate::names::kube::KubeError),
    #[error("no uplink found: no interface carries a gateway route here; pass --uplink IFACE")]
    NoUplink,
    #[error("entering network namespace {path} (needs CAP_SYS_ADMIN): {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("installing signal handlers: {0}")]
    Signal(std::io::Error),
    #[error("watching a ring buffer: {0}")]
    RingBuf(std::io::Error),
}

/// Move this thread (the agent is single-threaded) into another network namespace. Must run
/// before the runtime starts, so every socket and netlink query happens there.
pub fn enter_netns(spec: &str) -> Result<(), AgentError> {
    let path = if spec.contains('/') {
        PathBuf::from(spec)
    } else {
        PathBuf::from("/run/netns").join(spec)
    };
    let err = |source| AgentError::Netns {
        path: path.clone(),
        source,
    };
    let f = std::fs::File::open(&path).map_err(err)?;
    // SAFETY: setns on an fd we own.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Full map scans (to find keys whose "new flow" event was lost) happen this often at most.
const RESCAN_EVERY: Duration = Duration::from_secs(10);
const IFACE_SCAN_EVERY: Duration = Duration::from_secs(1);
/// Final records kept for /flows.
const RECENT_FLOWS: usize = 1000;

/// Names for records: from the lab, from Kubernetes (watched on a thread of its own, started
/// before `--netns` moves the agent, so it reaches the API from the host's network), or none.
pub fn names(args: &AgentArgs) -> Result<Arc<RwLock<Names>>, AgentError> {
    if let Some(lab) = &args.lab {
        return Ok(Arc::new(RwLock::new(Names::from_lab(lab)?)));
    }
    let shared = Arc::new(RwLock::new(Names::default()));
    if args.kubeconfig.is_none() && !args.kubernetes {
        return Ok(shared);
    }
    let path = args.kubeconfig.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let names = shared.clone();
    std::thread::Builder::new()
        .name("kube-names".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                match crate::names::kube::client(path.as_deref()).await {
                    Ok(c) => {
                        let _ = tx.send(Ok(()));
                        crate::names::kube::watch(c, names).await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        })
        .map_err(AgentError::Signal)?;
    match rx.recv() {
        Ok(Ok(())) => Ok(shared),
        Ok(Err(e)) => Err(AgentError::Kube(e)),
        Err(_) => Err(AgentError::Kube(crate::names::kube::KubeError::Config(
            "the Kubernetes thread stopped".into(),
        ))),
    }
}

/// The pin directory this agent owns, if it pins. Taken before `--netns` moves the agent, so
/// the ownership lock lives in the host's network namespace, where every agent sees it.
pub fn pin_dir(args: &AgentArgs) -> Result<Option<PinDir>, AgentError> {
    if args.no_pin {
        return Ok(None);
    }
    let dir = match &args.pin_dir {
        Some(d) => d.clone(),
        None => {
            let own = match &args.netns {
                Some(ns) => Path::new(ns)
                    .file_name()
                    .map_or_else(|| ns.clone(), |n| n.to_string_lossy().into_owned()),
                None => "host".to_owned(),
            };
            let dir = Path::new(pin::DEFAULT_ROOT).join(own);
            if !pin::on_bpffs(&dir) {
                warn!(
                    "{} is not on a bpf filesystem: open flows' counters will not survive a \
                     restart (mount bpffs there, or pass --pin-dir or --no-pin)",
                    dir.display()
                );
                return Ok(None);
            }
            dir
        }
    };
    let pin = PinDir::acquire(&dir, args.pin_wait)?;
    info!("flow map pinned in {}", pin.dir().display());
    Ok(Some(pin))
}

pub async fn run(
    args: AgentArgs,
    names: Arc<RwLock<Names>>,
    pin: Option<PinDir>,
) -> Result<(), AgentError> {
    preflight::check_capabilities()?;
    if !preflight::has_btf() {
        warn!(
            "/sys/kernel/btf/vmlinux is missing: this release works without it, drop tracing will not"
        );
    }
    let uplinks = if args.uplinks.is_empty() {
        ifaces::default_uplinks()
    } else {
        args.uplinks.clone()
    };
    if uplinks.is_empty() {
        return Err(AgentError::NoUplink);
    }
    for u in &uplinks {
        preflight::check_interface(u)?;
    }
    let cgroup: Option<PathBuf> = if args.no_socket_hooks {
        None
    } else {
        let path = match &args.cgroup {
            Some(p) => p.clone(),
            None => preflight::cgroup2_mount()?,
        };
        preflight::check_cgroup2(&path)?;
        Some(path)
    };
    let mut flow_log = FlowLog::open(&args.flow_log)?;
    let listener = http::bind(args.metrics_addr).await?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;

    let metrics = Arc::new(Metrics::new(&args.node));
    prime_metrics(&metrics);
    let health = Arc::new(Health {
        ready: false.into(),
    });
    let recent = Arc::new(http::RecentFlows::new(RECENT_FLOWS));
    tokio::spawn(http::serve(
        listener,
        metrics.clone(),
        health.clone(),
        recent.clone(),
    ));
    info!(
        "node {}: metrics on http://{}/metrics",
        args.node, args.metrics_addr
    );

    let drop_cfg = match DropConfig::from_kernel() {
        Ok(c) => Some(c),
        Err(e) => {
            warn!("drop tracing is off: {e}");
            None
        }
    };
    let (mut hooks, maps) = Hooks::load(
        args.max_flows,
        args.tc_mode,
        drop_cfg.as_ref(),
        pin.as_ref(),
    )?;
    let clock = Clock::new();
    let mut corr = Correlator::new(
        correlate::Config {
            node: args.node.clone(),
            idle_timeout_ns: args.idle_timeout.as_nanos() as u64,
            tcp_idle_timeout_ns: args.tcp_idle_timeout.as_nanos() as u64,
            flush_ns: args.flush_interval.as_nanos() as u64,
            linger_ns: Duration::from_secs(1).as_nanos() as u64,
            socket_ttl_ns: Duration::from_secs(120).as_nanos() as u64,
            pending_max: 65_536,
        },
        clock,
    );
    // Before anything is attached: what is in the map now was counted by a previous agent.
    let adopted = adopt(&maps.flows, &mut corr);
    if adopted > 0 {
        info!("adopted {adopted} pinned flow entries from the previous agent");
        metrics.flows_adopted.inc_by(adopted);
    }
    for u in &uplinks {
        hooks.attach_iface(u, Role::Uplink)?;
    }
    if let Some(cg) = &cgroup {
        hooks.attach_cgroup(cg)?;
        info!("socket hooks attached to cgroup {}", cg.display());
    }
    if drop_cfg.is_some() {
        hooks.attach_drops()?;
        info!("drop tracepoint attached (tp_btf/kfree_skb)");
    }
    let reasons = drop_cfg.map(|c| c.reasons).unwrap_or_default();
    let kallsyms = crate::kallsyms::Kallsyms::load();
    sync_ifaces(&mut hooks, &mut corr, &uplinks, &args.pod_iface, &metrics);
    health.ready.store(true, Ordering::Relaxed);
    info!(
        "ready: uplinks {:?}, pod interfaces matching {:?}",
        uplinks, args.pod_iface
    );

    let KernelMaps {
        mut flows,
        stats,
        flow_events,
        socket_events,
        drop_events,
    } = maps;
    let mut flow_events = watch(flow_events)?;
    let mut socket_events = watch(socket_events)?;
    let mut drop_events = watch(drop_events)?;
    let mut pending: HashSet<FlowKey> = HashSet::new();
    let mut kstats = KernelStats::default();
    let mut poll = interval(args.poll_interval);
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut iface_scan = interval(IFACE_SCAN_EVERY);
    iface_scan.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_rescan = Instant::now();

    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: {}", stopping(pin.as_ref())); break; }
            _ = sigint.recv() => { info!("SIGINT: {}", stopping(pin.as_ref())); break; }
            guard = flow_events.readable_mut() => {
                let mut guard = guard.map_err(AgentError::RingBuf)?;
                drain(guard.get_inner_mut(), |b| {
                    if let Some(ev) = events::decode_flow(b) {
                        if ev.kind == FLOW_EVENT_NEW { debug!("new flow key {:?}", ev.key); }
                        pending.insert(ev.key);
                    }
                });
                guard.clear_ready();
            }
            guard = socket_events.readable_mut() => {
                let mut guard = guard.map_err(AgentError::RingBuf)?;
                let now = Clock::mono_now();
                drain(guard.get_inner_mut(), |b| {
                    if let Some(ev) = events::decode_socket(b) {
                        metrics.socket_events.inc();
                        corr.add_socket(&ev, now);
                    }
                });
                guard.clear_ready();
            }
            guard = drop_events.readable_mut() => {
                let mut guard = guard.map_err(AgentError::RingBuf)?;
                let now = Clock::mono_now();
                drain(guard.get_inner_mut(), |b| {
                    if let Some(ev) = events::decode_drop(b) {
                        let reason = reasons
                            .get(&(ev.reason as i64))
                            .cloned()
                            .unwrap_or_else(|| ev.reason.to_string());
                        metrics.drops.with_label_values(&[reason.as_str()]).inc();
                        corr.add_drop(&ev, reason, kallsyms.resolve(ev.location), now);
                    }
                });
                guard.clear_ready();
            }
            _ = iface_scan.tick() => sync_ifaces(&mut hooks, &mut corr, &uplinks, &args.pod_iface, &metrics),
            _ = poll.tick() => {
                let lost_before = kstats.get(Stat::FlowEventsLost);
                kstats.read(&stats, &metrics);
                let rescan = last_rescan.elapsed() >= RESCAN_EVERY
                    || kstats.get(Stat::FlowEventsLost) != lost_before;
                if rescan {
                    last_rescan = Instant::now();
                    pending.extend(flows.keys().filter_map(Result::ok));
                }
                read_counters(&flows, &mut corr, &mut pending, &metrics);
                emit(&mut corr, &mut flows, &mut flow_log, &metrics, &recent, &names, Flush::Due);
            }
        }
    }

    pending.extend(flows.keys().filter_map(Result::ok));
    read_counters(&flows, &mut corr, &mut pending, &metrics);
    kstats.read(&stats, &metrics);
    emit(
        &mut corr,
        &mut flows,
        &mut flow_log,
        &metrics,
        &recent,
        &names,
        if pin.is_some() {
            Flush::Checkpoint
        } else {
            Flush::All
        },
    );
    health.ready.store(false, Ordering::Relaxed);
    hooks.shutdown();
    info!("detached; bye");
    Ok(())
}

fn watch(rb: RingBuf<MapData>) -> Result<AsyncFd<RingBuf<MapData>>, AgentError> {
    // SAFETY: the ring buffer owns its fd and keeps it open for as long as the AsyncFd lives.
    unsafe { AsyncFd::register(rb) }.map_err(|e| AgentError::RingBuf(e.into_parts().1))
}

fn drain(rb: &mut RingBuf<MapData>, mut f: impl FnMut(&[u8])) {
    while let Some(item) = rb.next() {
        f(&item);
    }
}

/// Attach to pod veths that appeared, forget the ones that went away.
fn sync_ifaces(
    hooks: &mut Hooks,
    corr: &mut Correlator,
    uplinks: &[String],
    pod_glob: &str,
    metrics: &Metrics,
) {
    let present = ifaces::list();
    for (idx, name) in &present {
        corr.set_ifname(*idx, name);
        if uplinks.contains(name) || !glob_match(pod_glob, name) {
            continue;
        }
        if let Err(e) = hooks.attach_iface(name, Role::Pod) {
            // It may have vanished since the listing; retried on the next scan otherwise.
            warn!("{e}");
        }
    }
    let pod_ifaces: Vec<&str> = hooks
        .attached()
        .iter()
        .filter(|(_, a)| a.role == Role::Pod)
        .map(|(n, _)| n.as_str())
        .collect();
    corr.set_local_pods(
        ifaces::pod_routes(&pod_ifaces)
            .into_iter()
            .map(|(ip, _)| ip),
    );
    let gone: Vec<String> = hooks
        .attached()
        .iter()
        .filter(|(name, a)| !present.iter().any(|(i, n)| n == *name && *i == a.ifindex))
        .map(|(name, _)| name.clone())
        .collect();
    for name in gone {
        info!("{name} went away; forgetting it");
        hooks.detach_iface(&name, true);
    }
    for role in [Role::Pod, Role::Uplink] {
        let n = hooks.attached().values().filter(|a| a.role == role).count();
        metrics
            .interfaces_attached
            .with_label_values(&[role.as_str()])
            .set(n as i64);
    }
}

fn sum(values: &[FlowCounters]) -> Counters {
    let mut c = Counters::default();
    for v in values {
        c.packets += v.packets;
        c.bytes += v.bytes;
        if v.first_ns != 0 && (c.first_ns == 0 || v.first_ns < c.first_ns) {
            c.first_ns = v.first_ns;
        }
        c.last_ns = c.last_ns.max(v.last_ns);
        c.tcp_flags |= v.tcp_flags;
        c.marks |= v.marks;
    }
    c
}

fn stopping(pin: Option<&PinDir>) -> String {
    match pin {
        Some(p) => format!(
            "writing open flows and detaching; their counters stay pinned in {}",
            p.dir().display()
        ),
        None => "flushing and detaching".to_owned(),
    }
}

/// Take the entries a previous agent left in the pinned map as the starting point of their
/// flows: their counts go into records, not again into the packet and byte metrics.
fn adopt(
    flows: &aya::maps::PerCpuHashMap<MapData, FlowKey, FlowCounters>,
    corr: &mut Correlator,
) -> u64 {
    let mut n = 0;
    for (key, values) in flows.iter().filter_map(Result::ok) {
        corr.observe(key, sum(&values));
        n += 1;
    }
    n
}

fn read_counters(
    flows: &aya::maps::PerCpuHashMap<MapData, FlowKey, FlowCounters>,
    corr: &mut Correlator,
    pending: &mut HashSet<FlowKey>,
    metrics: &Metrics,
) {
    let keys: Vec<FlowKey> = corr
        .known_keys()
        .copied()
        .chain(pending.drain())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    for key in keys {
        let Ok(values) = flows.get(&key, 0) else {
            continue;
        };
        let c = sum(&values);
        if let Some((point, d)) = corr.observe(key, c) {
            let proto = correlate::tuple::proto_name(key.proto);
            metrics
                .packets
                .with_label_values(&[point.as_str(), &proto])
                .inc_by(d.packets);
            metrics
                .bytes
                .with_label_values(&[point.as_str(), &proto])
                .inc_by(d.bytes);
        }
    }
    metrics.observations_active.set(corr.active() as i64);
}

fn emit(
    corr: &mut Correlator,
    flows: &mut aya::maps::PerCpuHashMap<MapData, FlowKey, FlowCounters>,
    log: &mut FlowLog,
    metrics: &Metrics,
    recent: &http::RecentFlows,
    names: &RwLock<Names>,
    flush: Flush,
) {
    let mut out = corr.collect(Clock::mono_now(), flush);
    if !out.records.is_empty() {
        let names = names.read().expect("not poisoned");
        for r in &mut out.records {
            names.enrich(r);
        }
    }
    metrics.correlation_ambiguous.inc_by(out.ambiguous);
    let refused = std::mem::take(&mut corr.refused);
    metrics
        .pending_refused
        .with_label_values(&["socket"])
        .inc_by(refused.sockets);
    metrics
        .pending_refused
        .with_label_values(&["drop"])
        .inc_by(refused.drops);
    metrics
        .socket_events_unmatched
        .inc_by(out.sockets_unmatched);
    for key in &out.finished {
        match flows.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => {
                debug!("removing finished flow: {e}");
                metrics.map_delete_errors.inc();
            }
        }
    }
    if out.records.is_empty() {
        return;
    }
    for r in &out.records {
        metrics.on_record(r);
        if r.is_final
            && let Ok(line) = serde_json::to_string(r)
        {
            recent.push(line);
        }
    }
    if let Err(e) = log.write(&out.records) {
        warn!("{e}");
        metrics.record_write_errors.inc();
    }
}

/// Last-read totals of the kernel's per-CPU STATS array, to turn them into counter increments.
#[derive(Default)]
struct KernelStats {
    last: [u64; STATS_LEN as usize],
}

impl KernelStats {
    fn get(&self, s: Stat) -> u64 {
        self.last[s as usize]
    }

    fn read(&mut self, stats: &aya::maps::PerCpuArray<MapData, u64>, m: &Metrics) {
        for s in Stat::ALL {
            let Ok(v) = stats.get(&(s as u32), 0) else {
                continue;
            };
            let total: u64 = v.iter().sum();
            let delta = total.saturating_sub(self.last[s as usize]);
            self.last[s as usize] = total;
            if delta > 0 {
                stat_counter(m, s).inc_by(delta);
            }
        }
    }
}

fn stat_counter(m: &Metrics, s: Stat) -> prometheus::IntCounter {
    match s {
        Stat::FlowEventsLost => m.kernel_events_lost.with_label_values(&["flow"]),
        Stat::SocketEventsLost => m.kernel_events_lost.with_label_values(&["socket"]),
        Stat::FlowMapFull => m.map_full.with_label_values(&["flows"]),
        Stat::SockMapFull => m.map_full.with_label_values(&["socks"]),
        Stat::Truncated => m.parse_errors.with_label_values(&["truncated"]),
        Stat::Malformed => m.parse_errors.with_label_values(&["malformed"]),
        Stat::NonIp => m.packets_untracked.with_label_values(&["non_ip"]),
        Stat::Fragment => m.packets_portless.with_label_values(&["fragment"]),
        Stat::Icmp => m.packets_portless.with_label_values(&["icmp"]),
        Stat::OtherL4 => m.packets_portless.with_label_values(&["other_l4"]),
        Stat::DropEventsLost => m.kernel_events_lost.with_label_values(&["drop"]),
    }
}

/// Make every bounded series visible from the start (at zero), so dashboards and alerts on
/// "events lost" or "map full" have a series to watch before the first loss.
fn prime_metrics(m: &Metrics) {
    for s in Stat::ALL {
        stat_counter(m, s);
    }
    for p in Point::ALL {
        for proto in ["TCP", "UDP"] {
            m.packets.with_label_values(&[p.as_str(), proto]);
            m.bytes.with_label_values(&[p.as_str(), proto]);
        }
    }
    for kind in ["final", "interim"] {
        m.records.with_label_values(&[kind]);
    }
    for kind in ["socket", "drop"] {
        m.pending_refused.with_label_values(&[kind]);
    }
}
