//! `observer agent`: a pipeline of stages, each a task with one job, joined by bounded channels:
//!
//! ```text
//! hooks::follow (attach, follow veths) --interfaces--> correlate::stage --records--> export::stage
//! readers (ring buffers) ------------------events-----^   (reads the flow map)         (names, metrics,
//!                                                                                       /flows, log writer)
//! ```
//!
//! Every way out (a signal, a stage that fails or panics, an error in `run` itself) goes through
//! [`Pipeline::stop`] or, failing that, its `Drop`: the hooks detach, correlation writes what it
//! holds (final records, or interim ones when the counters stay pinned for the next agent), and
//! the writer finishes the log.

mod setup;

use std::{
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use log::{error, info, warn};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};

pub use setup::{FromKubernetes, check_flows_args, names, pin_dir, with_lab};

use crate::{
    cli::AgentArgs,
    clock::Clock,
    correlate::{
        self, Correlator, Flush,
        stage::{Stage, Wires},
    },
    export::{
        flows_auth::FlowsAuth,
        http::{self, Health},
        json::{FlowLog, JsonError},
        metrics::Metrics,
        recent::RecentFlows,
        stage::Exporter,
    },
    hooks::{
        FilterStatus, HookError, Hooks, KernelMaps, Role,
        drop::{DropConfig, Kallsyms},
        filter::{FilterHooks, FilterOffsets},
        follow::{Follower, Interfaces, PodIfaces},
        nat::NatOffsets,
        pin::{PinDir, PinError},
        preflight::PreflightError,
    },
    readers::{self, DropNamer, KernelFlows, Rings, rule_trace::RuleTracer},
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
    #[error(transparent)]
    Names(#[from] crate::names::NamesError),
    #[error(transparent)]
    Kube(crate::names::kube::KubeError),
    #[error("no uplink found: no interface carries a gateway route here; pass --uplink IFACE")]
    NoUplink,
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error("installing signal handlers: {0}")]
    Signal(std::io::Error),
    #[error("starting the Kubernetes names thread: {0}")]
    Thread(std::io::Error),
    #[error("watching a ring buffer: {0}")]
    RingBuf(std::io::Error),
    #[error("the {stage} stage stopped: {why}")]
    Stage { stage: &'static str, why: String },
    #[error("{0}")]
    FlowsArgs(String),
    #[error("{0}")]
    Otlp(String),
    #[error("--flows-token-file {path}: {why}")]
    FlowsToken { path: PathBuf, why: String },
}

/// Final records kept for /flows.
const RECENT_FLOWS: usize = 1000;
/// Kernel events waiting for correlation; beyond it the reader waits and the rings fill.
const EVENT_QUEUE: usize = 8192;
/// How often losses (events, map inserts, records) are said in the log, if there were any.
const LOSS_WARN_EVERY: Duration = Duration::from_secs(10);
/// Record batches waiting for the exporters.
const RECORD_QUEUE: usize = 64;

/// /flows on its own listener, for whom `reviewer` (Kubernetes) or the token file lets in.
fn serve_flows(
    args: &AgentArgs,
    listener: tokio::net::TcpListener,
    reviewer: Option<crate::export::flows_auth::Reviewer>,
    recent: &Arc<RecentFlows>,
    metrics: &Arc<Metrics>,
) -> Result<(), AgentError> {
    let auth = match (reviewer, &args.flows_token_file) {
        (Some(r), _) => FlowsAuth::Kubernetes(r),
        (None, Some(f)) => FlowsAuth::TokenFile(f.clone()),
        (None, None) => {
            return Err(AgentError::FlowsArgs(
                "/flows: no token file and no Kubernetes reviewer".into(),
            ));
        }
    };
    info!(
        "node {}: flow records on http://{}/flows, {}",
        args.node,
        args.flows_addr.expect("bound"),
        auth.describe()
    );
    tokio::spawn(http::serve_flows(
        listener,
        recent.clone(),
        Arc::new(auth),
        metrics.clone(),
    ));
    let (recent, metrics) = (recent.clone(), metrics.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            metrics.flows_followers.set(recent.followers() as i64);
        }
    });
    Ok(())
}

pub async fn run(
    args: AgentArgs,
    kube: FromKubernetes,
    pin: Option<PinDir>,
) -> Result<(), AgentError> {
    let FromKubernetes { names, reviewer } = kube;
    let targets = setup::preflight(&args)?;
    let flow_log = FlowLog::open(&args.flow_log)?;
    let listener = http::bind(args.metrics_addr).await?;
    let flows_listener = match args.flows_addr {
        Some(addr) => Some(http::bind(addr).await?),
        None => None,
    };
    let mut sigterm = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(AgentError::Signal)?;
    let reopen = flow_log.reopen_flag();
    tokio::spawn(async move {
        while sighup.recv().await.is_some() {
            info!("SIGHUP: the flow log is opened again before the next batch");
            reopen.store(true, Ordering::Relaxed);
        }
    });

    let metrics = Arc::new(Metrics::new(&args.node));
    let health = Arc::new(Health {
        ready: false.into(),
        hooks: Default::default(),
    });
    let recent = {
        let m = metrics.clone();
        Arc::new(RecentFlows::new(
            RECENT_FLOWS,
            args.flows_follow_queue,
            move || m.flows_followers_dropped.inc(),
        ))
    };
    tokio::spawn(crate::export::metrics::warn_losses(
        metrics.clone(),
        LOSS_WARN_EVERY,
    ));
    tokio::spawn(http::serve(listener, metrics.clone(), health.clone()));
    info!(
        "node {}: metrics on http://{}/metrics",
        args.node, args.metrics_addr
    );
    if let Some(l) = flows_listener {
        serve_flows(&args, l, reviewer, &recent, &metrics)?;
    }

    let otlp = match &args.otlp_endpoint {
        Some(e) => Some(
            crate::export::otlp::Otlp::start(e, &args.node, args.otlp_queue, metrics.clone())
                .map_err(|e| AgentError::Otlp(e.to_string()))?,
        ),
        None => None,
    };
    let exporter = Exporter {
        names,
        metrics: metrics.clone(),
        recent,
        otlp,
    };
    let (mut pipeline, hooks) =
        Pipeline::start(&args, targets, pin.as_ref(), metrics, exporter, flow_log)?;
    let _ = health.hooks.set(hooks);
    // Loading parsed the kernel's BTF (several MiB, for the drop tracer, the NAT offsets and
    // aya's relocations) and freed it: give those pages back rather than hold them for ever.
    // SAFETY: malloc_trim only releases free memory.
    unsafe { libc::malloc_trim(0) };
    // Every stage runs and every ring is registered: only now is the agent ready.
    health.ready.store(true, Ordering::Relaxed);
    let outcome = tokio::select! {
        _ = sigterm.recv() => { info!("SIGTERM: {}", stopping(pin.as_ref())); Ok(()) }
        _ = sigint.recv() => { info!("SIGINT: {}", stopping(pin.as_ref())); Ok(()) }
        e = pipeline.failure() => Err(e),
    };
    health.ready.store(false, Ordering::Relaxed);
    if let Err(e) = &outcome {
        error!("{e}; {}", stopping(pin.as_ref()));
    }
    pipeline
        .stop(if pin.is_some() {
            Flush::Checkpoint
        } else {
            Flush::All
        })
        .await;
    info!("detached; bye");
    outcome
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

/// A stage that ended, and how: sent by a guard in each stage task, also when it panics.
struct Ended {
    stage: &'static str,
    why: String,
}

struct EndGuard {
    stage: &'static str,
    tx: mpsc::UnboundedSender<Ended>,
    why: Option<String>,
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        let why = if std::thread::panicking() {
            "it panicked".to_owned()
        } else {
            self.why.take().unwrap_or_else(|| "it ended".to_owned())
        };
        let _ = self.tx.send(Ended {
            stage: self.stage,
            why,
        });
    }
}

/// Spawn a stage whose end (return, error or panic) is reported on `ended`.
fn spawn_stage<T: Send + 'static>(
    stage: &'static str,
    ended: &mpsc::UnboundedSender<Ended>,
    fut: impl Future<Output = T> + Send + 'static,
    describe: impl Fn(&T) -> Option<String> + Send + 'static,
) -> JoinHandle<T> {
    let mut guard = EndGuard {
        stage,
        tx: ended.clone(),
        why: None,
    };
    tokio::spawn(async move {
        let out = fut.await;
        guard.why = describe(&out);
        drop(guard);
        out
    })
}

/// The running stages and the handles to stop them in order.
struct Pipeline {
    follower: Option<JoinHandle<Hooks>>,
    follower_stop: watch::Sender<bool>,
    readers: Option<JoinHandle<std::io::Result<()>>>,
    correlation: Option<JoinHandle<()>>,
    correlation_stop: Option<oneshot::Sender<(Flush, u64)>>,
    exporter: Option<JoinHandle<()>>,
    ended: mpsc::UnboundedReceiver<Ended>,
}

/// What the kernel's BTF tells the drop tracer, the conntrack reads and the netfilter programs;
/// each one without its offsets (or turned off by a flag) is off, and the log says why.
fn kernel_offsets(
    args: &AgentArgs,
) -> (
    Option<DropConfig>,
    Option<NatOffsets>,
    Option<FilterOffsets>,
) {
    let drop_cfg = DropConfig::from_kernel()
        .inspect_err(|e| warn!("drop tracing is off: {e}"))
        .ok();
    let nat = if args.no_nat_state {
        info!(
            "--no-nat-state: conntrack entries are not read; pre/post-NAT pairs are joined by client endpoint only, and records say so"
        );
        None
    } else {
        NatOffsets::from_kernel()
            .inspect_err(|e| {
                warn!("no conntrack offsets ({e}): pre/post-NAT pairs are joined by client endpoint only, and records say so")
            })
            .ok()
    };
    let filter = if args.no_filter_hook {
        None
    } else {
        FilterOffsets::from_kernel()
            .inspect_err(|e| warn!("no offsets for the netfilter programs: {e}"))
            .ok()
    };
    (drop_cfg, nat, filter)
}

impl Pipeline {
    /// Load, adopt pinned counters, attach, and start every stage.
    fn start(
        args: &AgentArgs,
        targets: setup::Targets,
        pin: Option<&PinDir>,
        metrics: Arc<Metrics>,
        exporter: Exporter,
        flow_log: FlowLog,
    ) -> Result<(Pipeline, String), AgentError> {
        let (drop_cfg, nat, filter) = kernel_offsets(args);
        let (mut hooks, maps, mut filter_status) = Hooks::load(
            args.max_flows,
            args.tc_mode,
            drop_cfg.as_ref(),
            nat.as_ref(),
            filter.as_ref(),
            pin,
        )?;
        let KernelMaps {
            flows,
            stats,
            socket_events,
            drop_events,
            ct_orig,
        } = maps;
        let mut correlation = Stage::new(
            Correlator::new(correlation_config(args), Clock::new()),
            KernelFlows::new(flows, stats, ct_orig),
            metrics.clone(),
            args.poll_interval,
        );
        // Before anything is attached: what is in the map now was counted by a previous agent.
        let (adopted, stopped) = correlation.adopt();
        if adopted > 0 {
            info!("adopted {adopted} pinned flow entries from the previous agent");
        }
        attach(&mut hooks, &targets, drop_cfg.is_some())?;
        hooks.attach_filter(&mut filter_status);
        correlation
            .corr
            .set_filter_measured(filter_status.measured());
        say_filter_status(&filter_status, args.no_filter_hook);
        let rings = Rings::register(socket_events, drop_events).map_err(AgentError::RingBuf)?;
        let mut follower = Follower {
            hooks,
            uplinks: targets.uplinks.clone(),
            pods: PodIfaces::parse(&args.pod_iface),
            metrics: metrics.clone(),
        };
        let first = follower.sync();
        correlation.set_interfaces(&first);
        if adopted > 0 {
            // Their records say when nobody counted: from the previous agent's stop (or its
            // last packet, after a crash) until now, when the last of ours (the pods'
            // interfaces, found by the first sync) is attached.
            correlation.mark_gap(stopped, Clock::mono_now());
        }
        info!(
            "ready: uplinks {:?}; pod interfaces ({}): {:?}",
            targets.uplinks,
            follower.pods,
            follower.hooks.pod_ifaces()
        );
        let status = hook_status(&targets, drop_cfg.is_some(), &filter_status);
        let pipeline = Self::spawn(
            follower,
            first,
            rings,
            drop_cfg,
            correlation,
            exporter,
            flow_log,
            metrics,
            args.trace_drop_rules,
        );
        Ok((pipeline, status))
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "every stage and its wiring, once"
    )]
    fn spawn(
        follower: Follower,
        first: Interfaces,
        rings: Rings,
        drop_cfg: Option<DropConfig>,
        correlation: Stage<KernelFlows>,
        exporter: Exporter,
        flow_log: FlowLog,
        metrics: Arc<Metrics>,
        trace_rules: bool,
    ) -> Pipeline {
        let (ended_tx, ended) = mpsc::unbounded_channel();
        let (follower_stop, stop_rx) = watch::channel(false);
        let (ifaces_tx, ifaces) = watch::channel(first);
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let (out, batches) = mpsc::channel(RECORD_QUEUE);
        let (correlation_stop, stop) = oneshot::channel();
        let namer = DropNamer {
            reasons: drop_cfg.map(|c| c.reasons).unwrap_or_default(),
            kallsyms: Kallsyms::load(),
            tracer: trace_rules.then(|| RuleTracer::start(events_tx.clone())),
        };
        Pipeline {
            follower: Some(spawn_stage(
                "interface follower",
                &ended_tx,
                follower.run(ifaces_tx, stop_rx),
                no_reason,
            )),
            follower_stop,
            readers: Some(spawn_stage(
                "kernel readers",
                &ended_tx,
                readers::read_rings(rings, namer, metrics, events_tx),
                |r: &std::io::Result<()>| {
                    r.as_ref()
                        .err()
                        .map(|e| format!("a ring buffer failed: {e}"))
                },
            )),
            correlation: Some(spawn_stage(
                "correlation",
                &ended_tx,
                correlation.run(Wires {
                    events,
                    ifaces,
                    out,
                    stop,
                }),
                no_reason,
            )),
            correlation_stop: Some(correlation_stop),
            exporter: Some(spawn_stage(
                "exporter",
                &ended_tx,
                exporter.run(flow_log, batches),
                no_reason,
            )),
            ended,
        }
    }

    /// Wait for a stage to end before it was asked to: that is a failure of the agent.
    async fn failure(&mut self) -> AgentError {
        match self.ended.recv().await {
            Some(Ended { stage, why }) => AgentError::Stage { stage, why },
            None => AgentError::Stage {
                stage: "pipeline",
                why: "every stage is gone".into(),
            },
        }
    }

    /// Detach first (so the last read counts every packet the programs saw), then let
    /// correlation write what it holds, then let the writer finish the log.
    async fn stop(mut self, flush: Flush) {
        // Taken before the first program is detached: the next agent's gap starts here.
        let detaching = Clock::mono_now();
        let _ = self.follower_stop.send(true);
        if let Some(f) = self.follower.take() {
            match f.await {
                Ok(hooks) => drop(hooks),
                // Its hooks were dropped with the task, and detached there.
                Err(e) => warn!("interface follower: {e}"),
            }
        }
        let asked = self
            .correlation_stop
            .take()
            .is_some_and(|s| s.send((flush, detaching)).is_ok());
        if !asked {
            warn!(
                "correlation had stopped: open flows were not written (pinned counters stay for the next agent)"
            );
        }
        if let Some(c) = self.correlation.take()
            && let Err(e) = c.await
        {
            warn!("correlation: {e}");
        }
        if let Some(r) = self.readers.take() {
            r.abort();
        }
        if let Some(x) = self.exporter.take()
            && let Err(e) = x.await
        {
            warn!("exporter: {e}");
        }
    }
}

/// An exit that skipped [`Pipeline::stop`] (a panic in `run`): stop every task, which drops the
/// hooks, and they detach.
impl Drop for Pipeline {
    fn drop(&mut self) {
        for h in [self.correlation.take(), self.exporter.take()]
            .into_iter()
            .flatten()
        {
            h.abort();
        }
        if let Some(h) = self.follower.take() {
            h.abort();
        }
        if let Some(h) = self.readers.take() {
            h.abort();
        }
    }
}

fn no_reason<T>(_: &T) -> Option<String> {
    None
}

fn attach(hooks: &mut Hooks, targets: &setup::Targets, drops: bool) -> Result<(), AgentError> {
    for u in &targets.uplinks {
        hooks.attach_iface(u, Role::Uplink)?;
    }
    if let Some(cg) = &targets.cgroup {
        hooks.attach_cgroup(cg)?;
        info!("socket hooks attached to cgroup {}", cg.display());
    }
    if drops {
        hooks.attach_drops()?;
        info!("drop tracepoint attached (tp_btf/kfree_skb)");
    }
    Ok(())
}

/// Once, at start: whether `policy_view` is measured, and why not.
fn say_filter_status(status: &FilterStatus, asked_off: bool) {
    match status {
        FilterStatus::Measured => info!("filter view measured: {}", FilterHooks::describe()),
        FilterStatus::Derived(_) if asked_off => info!(
            "--no-filter-hook: policy_view is derived from the tc points around the filter table, and records say so"
        ),
        FilterStatus::Derived(why) => warn!(
            "netfilter programs not linked ({why}): policy_view is derived from the tc points around the filter table, and records say so"
        ),
    }
}

/// What runs, for /readyz: one line per hook, and whether the filter view is measured.
fn hook_status(targets: &setup::Targets, drops: bool, filter: &FilterStatus) -> String {
    let mut lines = vec![format!(
        "tc: uplinks {:?} and pod interfaces as they appear",
        targets.uplinks
    )];
    if let Some(cg) = &targets.cgroup {
        lines.push(format!("cgroup socket hooks: {}", cg.display()));
    }
    lines.push(if drops {
        "drops: tp_btf/kfree_skb".to_owned()
    } else {
        "drops: off (no drop reasons)".to_owned()
    });
    lines.push(match filter {
        FilterStatus::Measured => format!("filter view: measured ({})", FilterHooks::describe()),
        FilterStatus::Derived(why) => format!("filter view: derived ({why})"),
    });
    lines.join("\n")
}

fn correlation_config(args: &AgentArgs) -> correlate::Config {
    correlate::Config {
        node: args.node.clone(),
        idle_timeout_ns: args.idle_timeout.as_nanos() as u64,
        tcp_idle_timeout_ns: args.tcp_idle_timeout.as_nanos() as u64,
        flush_ns: args.flush_interval.as_nanos() as u64,
        linger_ns: Duration::from_secs(1).as_nanos() as u64,
        socket_ttl_ns: Duration::from_secs(120).as_nanos() as u64,
        pending_max: 65_536,
        filter_measured: false,
    }
}
