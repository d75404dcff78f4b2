//! `cargo xtask bench`: what observing costs, measured in one run against a baseline.
//!
//! - Throughput (iperf3 TCP, pod-a -> pod-b across both nodes: 4 tc hooks per packet per
//!   direction plus the cgroup_skb hook) and connection rate (short TCP connections through the
//!   lab client) without agents, then with one agent per node; the ratio is the cost.
//! - Per-packet and per-new-flow cost of each tc program next to a floor and a minimal counter,
//!   run by the kernel on crafted packets (`observer test-run cost`, `BPF_PROG_TEST_RUN`).
//! - Per-packet cost of each kernel program from the kernel's own accounting
//!   (`kernel.bpf_stats_enabled`: run time and run count per program).
//! - What two features cost, each against itself switched off in alternating runs: reading
//!   conntrack entries (`--no-nat-state`) and the netfilter hooks around the filter table
//!   (`--no-filter-hook`).
//! - Correlation throughput on synthetic input at 1k, 10k and 100k active connections.
//! - Agent resident memory and kernel map memory.
//! - The agent's memory for a large cluster's names (`kube_scale.rs`).
//! - A connection storm at fixed rates, every connection checked for its record (`storm.rs`).
//! - On request only (`--only soak`), minutes of load with the agents restarted every minute
//!   (`soak.rs`).
//!
//! Numbers come from a 2-core machine with everything (both nodes, both pods, iperf3) on it:
//! read them as ratios, not absolutes.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use observer_lab::drive::LabRun;
use serde_json::Value;

use crate::kube_scale::Cluster;

const LAB: &str = "bench";
const POD_B: &str = "10.244.2.10";
const CONNS: u32 = 2000;

fn iperf(lab: &LabRun, seconds: u32) -> anyhow::Result<f64> {
    let mut server = Command::new("ip")
        .args(["netns", "exec", &lab.ns("pod-b"), "iperf3", "-s", "-1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("iperf3 server")?;
    std::thread::sleep(Duration::from_millis(300));
    let out = lab.exec(
        "pod-a",
        &["iperf3", "-c", POD_B, "-t", &seconds.to_string(), "-J"],
    );
    let _ = server.kill();
    let _ = server.wait();
    let out = out?;
    let v: Value = serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("iperf3 reported no throughput")
}

fn conn_rate(lab: &LabRun) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let s = lab.client(
        "pod-a",
        &[
            "--to",
            &format!("{POD_B}:8443"),
            "--count",
            &CONNS.to_string(),
            "--concurrency",
            "20",
        ],
    )?;
    let took = t0.elapsed().as_secs_f64();
    if s["failed"] != 0 {
        bail!("connection-rate run had failures: {s}");
    }
    Ok(CONNS as f64 / took)
}

fn sysctl(kv: &str) -> anyhow::Result<()> {
    crate::run(Command::new("sysctl").args(["-qw", kv]))
}

fn bpf_stats_enabled() -> String {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "0".into())
}

/// (runs, ns) per program name, summed over both agents' copies.
fn prog_stats() -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let mut m: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for p in v.as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or_default();
        if !["tc_", "sock_", "nf_"].iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let e = m.entry(name.to_owned()).or_default();
        e.0 += p["run_cnt"].as_u64().unwrap_or(0);
        e.1 += p["run_time_ns"].as_u64().unwrap_or(0);
    }
    Ok(m)
}

fn map_memory() -> anyhow::Result<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "show"])
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter(|m| {
            let n = m["name"].as_str().unwrap_or_default();
            ["FLOWS", "SOCKS", "SOCKET_EVENTS", "STATS"].contains(&n)
        })
        .filter_map(|m| m["bytes_memlock"].as_u64())
        .sum())
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// What the storm part runs: rates (new connections/s) and seconds per rate.
pub struct Storm {
    pub rates: Vec<u32>,
    pub seconds: u32,
    /// The soak (`--only soak`, not part of a full run): minutes and connections/s.
    pub soak_minutes: u32,
    pub soak_rate: u32,
}

pub fn run(
    seconds: u32,
    only: Option<&str>,
    cluster: Cluster,
    storm: &Storm,
) -> anyhow::Result<()> {
    let dir = crate::workspace_root().join("target/bench");
    let mut out = String::new();
    let part = |name: &str| only.is_none() || only == Some(name);
    if part("programs") {
        out += &programs()?;
    }
    if part("userspace") {
        out += &userspace()?;
    }
    if part("datapath") {
        out += &datapath(seconds, &dir)?;
    }
    if part("storm") {
        out += &crate::storm::run(&storm.rates, storm.seconds, &dir)?;
    }
    if only == Some("soak") {
        out += &crate::soak::run(storm.soak_minutes, storm.soak_rate, &dir)?;
    }
    if part("kube") {
        out += &crate::kube_scale::run(cluster)?;
    }
    print!("{out}");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("bench.txt"), &out)?;
    println!("\n(kept in {})", dir.join("bench.txt").display());
    Ok(())
}

/// Each tc program next to the reference programs, run by the kernel on crafted packets
/// (`observer test-run cost`): the per-packet and per-new-flow figures, free of the lab's noise.
fn programs() -> anyhow::Result<String> {
    println!(
        "==> each tc program next to a floor and a minimal counter (BPF_PROG_TEST_RUN, about a minute)"
    );
    let table = report_of(
        Command::new(&crate::bins().agent).args(["test-run", "cost"]),
        "observer test-run cost",
    )?;
    Ok(format!("\n`observer test-run cost`\n{table}"))
}

/// What `cmd` prints on stdout (its progress on stderr goes to the terminal); it must succeed.
fn report_of(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Correlation throughput on synthetic input at 1k, 10k and 100k active connections (a plain
/// timed loop, `observer/src/correlate/bench.rs`).
fn userspace() -> anyhow::Result<String> {
    println!("==> correlation throughput on synthetic input (1k, 10k, 100k active connections)");
    let out = report_of(
        crate::cargo().args([
            "test",
            "--release",
            "--quiet",
            "-p",
            "observer",
            "--bin",
            "observer",
            "bench_correlation",
            "--",
            "--ignored",
            "--nocapture",
        ]),
        "the correlation benchmark",
    )?;
    let table: String = out
        .lines()
        .filter(|l| l.starts_with("  "))
        .map(|l| format!("{l}\n"))
        .collect();
    Ok(format!(
        "\ncorrelation, one poll (observe every key, conntrack tuples, collect)\n{table}"
    ))
}

/// Rounds of each alternating with/without comparison.
const AB_ROUNDS: usize = 3;

/// Agents with a feature switched off (`off_flag`) and on, in alternating runs.
struct Alternating {
    off_flag: &'static str,
    off_rate: Vec<f64>,
    on_rate: Vec<f64>,
    off_tput: Vec<f64>,
    on_tput: Vec<f64>,
    /// Program costs over the first run without the feature (connection load only).
    off_progs: BTreeMap<String, (u64, u64)>,
}

/// [`AB_ROUNDS`] rounds of the connection load (and `seconds` of iperf3, unless 0) with agents
/// started with `off_flag`, then without it.
fn alternate(
    lab: &mut LabRun,
    off_flag: &'static str,
    seconds: u32,
) -> anyhow::Result<Alternating> {
    let mut a = Alternating {
        off_flag,
        off_rate: Vec::new(),
        on_rate: Vec::new(),
        off_tput: Vec::new(),
        on_tput: Vec::new(),
        off_progs: BTreeMap::new(),
    };
    for round in 0..AB_ROUNDS {
        for off in [true, false] {
            let flags: &[&str] = if off {
                std::slice::from_ref(&off_flag)
            } else {
                &[]
            };
            start_agents(lab, flags)?;
            let (tput, rate) = workloads(lab, 1, seconds)?;
            if off {
                a.off_rate.extend(rate);
                a.off_tput.extend(tput);
                if round == 0 {
                    a.off_progs = program_costs(lab, 0)?;
                }
            } else {
                a.on_rate.extend(rate);
                a.on_tput.extend(tput);
            }
            lab.stop_agents()?;
            lab.agents.clear();
        }
    }
    Ok(a)
}

fn datapath(seconds: u32, dir: &std::path::Path) -> anyhow::Result<String> {
    let bins = crate::bins();
    let _ = Command::new(&bins.lab)
        .args(["down", "--name", LAB])
        .output();
    let mut lab = LabRun::up(&bins, LAB, None, dir)?;
    let reps = 2;
    // Given back at the end, so the parts after this one run on every CPU again.
    let pinned_self = match agent_cpus() {
        Some(cpus) => {
            println!("==> load and lab traffic on CPU 0, agents on CPUs {cpus} (taskset)");
            Some(crate::proc::pin_self(0)?)
        }
        None => None,
    };
    let pinned = pinned_self.is_some();

    println!("==> baseline: no agent ({reps} x iperf3 {seconds}s, {reps} x {CONNS} connections)");
    let (base_tput, base_rate) = workloads(&lab, reps, seconds)?;

    // What a feature costs: agents with and without it, alternating, so that drift of this
    // shared machine falls on both alike.
    println!(
        "==> agents reading conntrack entries or not (--no-nat-state), alternating, {AB_ROUNDS} rounds"
    );
    let nat = alternate(&mut lab, "--no-nat-state", 0)?;
    println!(
        "==> agents with and without the filter hooks (--no-filter-hook), alternating, {AB_ROUNDS} rounds"
    );
    let filter = alternate(&mut lab, "--no-filter-hook", seconds)?;

    println!("==> with one agent per node");
    start_agents(&mut lab, &[])?;
    let (obs_tput, obs_rate) = workloads(&lab, reps, seconds)?;
    let cpu_before = agents_cpu(&lab);
    conn_rate(&lab)?;
    let agent_cpu_ms_per_1000 = (agents_cpu(&lab) - cpu_before) * 1e3 / (CONNS as f64 / 1000.0);
    // The kernel's counters add up while enabled: the second run's costs are the difference.
    let conn_progs = program_costs(&lab, 0)?;
    let both = program_costs(&lab, seconds)?;
    let progs = both
        .iter()
        .map(|(name, (runs, ns))| {
            let (r0, n0) = conn_progs.get(name).copied().unwrap_or((0, 0));
            (
                name.clone(),
                (runs.saturating_sub(r0), ns.saturating_sub(n0)),
            )
        })
        .collect();
    let rss: Vec<(String, u64)> = lab
        .agents
        .iter()
        .map(|a| (a.node.clone(), crate::proc::memory_kib(a.child.id()).0))
        .collect();
    let maps = map_memory()?;
    let metrics = lab.metrics("node-a")?;
    lab.stop_agents()?;
    drop(lab);
    Ok(report(&Datapath {
        pinned,
        agent_cpu_ms_per_1000,
        base_tput,
        base_rate,
        obs_tput,
        obs_rate,
        nat,
        filter,
        progs,
        conn_progs,
        rss,
        maps,
        metrics,
    }))
}

pub(crate) fn start_agents(lab: &mut LabRun, extra: &[&str]) -> anyhow::Result<()> {
    start_agents_on(lab, &["node-a", "node-b"], extra)
}

/// Start an agent on each of `nodes`, on the agents' CPUs.
pub(crate) fn start_agents_on(
    lab: &mut LabRun,
    nodes: &[&str],
    extra: &[&str],
) -> anyhow::Result<()> {
    for &node in nodes {
        let args: Vec<&str> = ["--idle-timeout", "5s"]
            .into_iter()
            .chain(extra.iter().copied())
            .collect();
        lab.start_agent(node, &args)?;
        if let Some(cpus) = agent_cpus() {
            let pid = lab.agents.last().expect("just started").child.id();
            crate::proc::pin_process(pid, &cpus)?;
        }
    }
    Ok(())
}

/// On a machine of two CPUs or more, the lab's traffic (this process and all it starts: the
/// client, iperf3, and the packets' softirq work, which runs where they are sent) is kept on CPU 0
/// and the agents on the others, so the connection rate shows what the agents cost the datapath,
/// not how the scheduler shares one core between them.
pub(crate) fn agent_cpus() -> Option<String> {
    let n = online_cpus();
    (n >= 2).then(|| format!("1-{}", n - 1))
}

/// The machine's CPUs (not this process's share: it runs on CPU 0 once pinned).
fn online_cpus() -> usize {
    // SAFETY: a plain sysconf query.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize
}

/// Both agents' CPU seconds so far.
pub(crate) fn agents_cpu(lab: &LabRun) -> f64 {
    lab.agents
        .iter()
        .map(|a| crate::proc::cpu_seconds(a.child.id()))
        .sum()
}

/// `reps` runs of iperf3 (none when `seconds` is 0) and of the connection load.
fn workloads(lab: &LabRun, reps: usize, seconds: u32) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (mut tput, mut rate) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        if seconds > 0 {
            tput.push(iperf(lab, seconds)?);
        }
        rate.push(conn_rate(lab)?);
    }
    Ok((tput, rate))
}

/// Each program's run time from the kernel over one more run of the workloads. Kernel accounting
/// costs a little itself, so it is on only for this separate run.
fn program_costs(lab: &LabRun, seconds: u32) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    println!("    per-program cost: one more run with kernel.bpf_stats_enabled=1");
    let stats_before = bpf_stats_enabled();
    sysctl("kernel.bpf_stats_enabled=1")?;
    let measured = if seconds > 0 {
        iperf(lab, seconds).and_then(|_| conn_rate(lab))
    } else {
        conn_rate(lab)
    };
    let progs = prog_stats();
    sysctl(&format!("kernel.bpf_stats_enabled={stats_before}"))?;
    measured?;
    progs
}

/// What one datapath run measured.
struct Datapath {
    /// Load on CPU 0, agents on the others.
    pinned: bool,
    /// Both agents' CPU time per 1,000 short connections.
    agent_cpu_ms_per_1000: f64,
    base_tput: Vec<f64>,
    base_rate: Vec<f64>,
    obs_tput: Vec<f64>,
    obs_rate: Vec<f64>,
    /// Agents reading conntrack entries or not, and with the filter hooks or not.
    nat: Alternating,
    filter: Alternating,
    progs: BTreeMap<String, (u64, u64)>,
    /// Program costs over the connection load only.
    conn_progs: BTreeMap<String, (u64, u64)>,
    rss: Vec<(String, u64)>,
    maps: u64,
    metrics: String,
}

fn report(d: &Datapath) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nobserver bench ({} CPUs; everything on one machine)",
        online_cpus()
    );
    let _ = writeln!(
        out,
        "\n  workload                         no agent      with agents   ratio"
    );
    let (bt, ot) = (mean(&d.base_tput), mean(&d.obs_tput));
    let (br, or) = (mean(&d.base_rate), mean(&d.obs_rate));
    let _ = writeln!(
        out,
        "  iperf3 TCP pod-a -> pod-b        {bt:>7.2} Gb/s  {ot:>7.2} Gb/s  {:>5.3}",
        ot / bt
    );
    let _ = writeln!(
        out,
        "  short TCP connections / s        {br:>7.0}       {or:>7.0}       {:>5.3}",
        or / br
    );
    let _ = writeln!(
        out,
        "  agents' CPU per 1,000 short connections: {:.0} ms (both nodes){}",
        d.agent_cpu_ms_per_1000,
        if d.pinned {
            "; load on CPU 0, agents on the other CPUs"
        } else {
            "; one CPU: load and agents share it"
        }
    );
    for (what, a) in [
        ("reading conntrack", &d.nat),
        ("with the filter hooks", &d.filter),
    ] {
        out += &alternating_rows(what, a);
    }
    let _ = writeln!(
        out,
        "\n  the conntrack read at the egress points, once per new key (connection load only, ns/run)"
    );
    let _ = writeln!(out, "  program              without read  with read");
    for name in ["tc_pod_egress", "tc_uplink_egress"] {
        let _ = writeln!(
            out,
            "  {name:<20} {:>12.1}  {:>9.1}",
            ns_per_run(&d.nat.off_progs, name),
            ns_per_run(&d.conn_progs, name)
        );
    }
    let _ = writeln!(
        out,
        "\n  kernel program cost (kernel.bpf_stats_enabled, one run of each workload, both agents' copies)"
    );
    let _ = writeln!(out, "  program              runs          ns/run");
    for (name, (runs, _)) in &d.progs {
        let per = ns_per_run(&d.progs, name);
        let _ = writeln!(out, "  {name:<20} {runs:>12}  {per:>8.1}");
    }
    let per = |name: &str| ns_per_run(&d.progs, name);
    // The kernel keeps 15 characters of a program's name.
    let nf = per("nf_forward") + per("nf_forward_pass");
    let _ = writeln!(
        out,
        "  filter hooks per routed packet (nf_forward + nf_forward_passed): {nf:.1} ns, {:.2}x tc_pod_ingress",
        nf / per("tc_pod_ingress")
    );
    let _ = writeln!(out, "\n  memory");
    for (node, kib) in &d.rss {
        let _ = writeln!(
            out,
            "  agent {node} RSS      {:>8.1} MiB",
            *kib as f64 / 1024.0
        );
    }
    let _ = writeln!(
        out,
        "  kernel maps (both agents) {:>6.1} MiB (bytes_memlock; flow map preallocated for {} entries per agent)",
        d.maps as f64 / 1048576.0,
        observer_common::FLOWS_MAX_ENTRIES
    );
    let lost = metric_sum(&d.metrics, "observer_kernel_events_lost_total");
    let full = metric_sum(&d.metrics, "observer_map_full_total");
    let _ = writeln!(out, "  node-a: events lost {lost}, map full {full}");
    out
}

/// A program's mean run time in ns from (runs, ns) totals; 0 when it never ran.
fn ns_per_run(progs: &BTreeMap<String, (u64, u64)>, name: &str) -> f64 {
    progs
        .get(name)
        .filter(|(runs, _)| *runs > 0)
        .map_or(0.0, |(runs, ns)| *ns as f64 / *runs as f64)
}

/// The rows of one with/without comparison.
fn alternating_rows(what: &str, a: &Alternating) -> String {
    let mut out = String::new();
    let rounds = |v: &[f64]| v.iter().map(|r| r.round()).collect::<Vec<_>>();
    let (off, on) = (mean(&a.off_rate), mean(&a.on_rate));
    let _ = writeln!(
        out,
        "  short TCP connections / s, agents {what} or not ({}; alternating runs): {on:.0} / {off:.0}, ratio {:.3} (runs: {:?} / {:?})",
        a.off_flag,
        on / off,
        rounds(&a.on_rate),
        rounds(&a.off_rate)
    );
    if !a.on_tput.is_empty() {
        let (off, on) = (mean(&a.off_tput), mean(&a.on_tput));
        let _ = writeln!(
            out,
            "  iperf3 Gb/s, agents {what} or not: {on:.2} / {off:.2}, ratio {:.3}",
            on / off
        );
    }
    out
}

pub(crate) fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
