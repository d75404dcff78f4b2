//! `cargo xtask bench --only storm`: a connection storm through a ClusterIP of the lab at fixed
//! rates, each connection checked for its own final record.
//!
//! Per rate, with fresh agents on both nodes: `observer-lab storm` in pod-a opens short TCP
//! connections to the "web" Service (100.64.0.10:443 -> pod-b 10.244.2.10:8443 on the other
//! node) and counts what it did, client port by client port. What the agents recorded is then
//! reconciled against three counts that are not the agent's: the generator's own, the DNAT rule
//! counters of node-a's nat table (netfilter consults the nat table once per new connection), and
//! the conntrack entries node-a holds for the Service. A connection missing its final record on
//! either node, and every loss the agents counted (ring buffer full, map full, pending events
//! refused, records not written, connections merged on a reused port), are reported per rate.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    io::BufRead as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use observer_lab::drive::LabRun;
use serde_json::Value;

const LAB: &str = "storm";
const CLIENT: &str = "10.244.1.10";
pub(crate) const VIP: &str = "100.64.0.10";
const BACKEND: &str = "10.244.2.10";
/// The agents' idle timeout: a record is final at the latest this long after its last packet.
const IDLE: Duration = Duration::from_secs(5);

/// What one rate did.
struct RateRun {
    rate: u32,
    generator: Value,
    /// New connections node-a's DNAT rules translated, and conntrack entries it held after.
    dnat: u64,
    conntrack: u64,
    /// conntrack's own refusals (`conntrack -S`: insert_failed, drop, early_drop).
    conntrack_refused: u64,
    /// Per node: (records matched, connections missing one, records no connection claims).
    nodes: Vec<(String, Reconciled)>,
    /// Per node: losses by the agent's metrics (name{labels} -> count), only those not zero.
    losses: Vec<(String, BTreeMap<String, f64>)>,
    /// Per node: races the agent repaired (reused ports whose next connection it put back).
    repaired: Vec<(String, BTreeMap<String, f64>)>,
    agent_cpu_s: f64,
    rss_max_kib: u64,
    /// Most flow-map entries seen on node-a (`observer_flow_observations_active`).
    map_max: f64,
}

/// A node's final records against the generator's connections.
#[derive(Default)]
pub(crate) struct Reconciled {
    pub matched: u64,
    /// Connections without a final record on the node.
    pub missing: u64,
    /// Final records no connection claims (a failed connection has one too).
    pub extra: u64,
    /// Records that say they are partial (`incomplete`) or cover a gap.
    pub flagged: u64,
    /// Lines that are no JSON (cut short by a killed agent).
    pub torn: u64,
}

pub fn run(rates: &[u32], seconds: u32, dir: &std::path::Path) -> anyhow::Result<String> {
    let bins = crate::bins();
    let _ = Command::new(&bins.lab)
        .args(["down", "--name", LAB])
        .output();
    let mut lab = LabRun::up(&bins, LAB, None, dir)?;
    let _pinned = match crate::bench::agent_cpus() {
        Some(cpus) => {
            println!("==> storm load on CPU 0, agents on CPUs {cpus} (taskset)");
            Some(crate::proc::pin_self(0)?)
        }
        None => None,
    };
    widen_ports(&lab)?;
    let mut runs = Vec::new();
    for &rate in rates {
        println!("==> storm: {rate} new connections/s for {seconds} s through {VIP}:443");
        runs.push(one_rate(&mut lab, rate, seconds)?);
        lab.stop_agents()?;
        lab.agents.clear();
    }
    Ok(report(&runs, seconds))
}

/// A running `observer-lab storm`, its output read on a thread of its own.
pub(crate) type Generator = std::thread::JoinHandle<std::io::Result<std::process::Output>>;

/// `observer-lab storm` in pod-a to the Service at `rate` for `seconds`. Its report (every
/// client port) is larger than a pipe, so it is read while the storm runs.
pub(crate) fn start_generator(lab: &LabRun, rate: u32, seconds: u32) -> anyhow::Result<Generator> {
    let child = Command::new("ip")
        .args(["netns", "exec", &lab.ns("pod-a")])
        .arg(&lab.bins.lab)
        .args(["storm", "--to", &format!("{VIP}:443")])
        .args(["--rate", &rate.to_string()])
        .args(["--duration", &format!("{seconds}s")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting observer-lab storm")?;
    Ok(std::thread::spawn(move || child.wait_with_output()))
}

/// The JSON report of an `observer-lab storm` whose output `waiting` reads.
pub(crate) fn generator_report(waiting: Generator) -> anyhow::Result<Value> {
    let out = waiting
        .join()
        .map_err(|_| anyhow::anyhow!("the storm's reader panicked"))??;
    if !out.status.success() {
        bail!(
            "observer-lab storm failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("observer-lab storm's report")
}

/// Many connections from one client: the whole port range, so a port comes back as late as it
/// can (a reused port is a new connection on an old 4-tuple; it is counted, not avoided).
pub(crate) fn widen_ports(lab: &LabRun) -> anyhow::Result<()> {
    crate::run(
        Command::new("ip")
            .args(["netns", "exec", &lab.ns("pod-a")])
            .args(["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"]),
    )
}

fn one_rate(lab: &mut LabRun, rate: u32, seconds: u32) -> anyhow::Result<RateRun> {
    for node in ["node-a", "node-b"] {
        let _ = std::fs::remove_file(lab.dir.join(format!("{node}.jsonl")));
    }
    // Entries of the previous rate would be counted again; none of their connections is open.
    let _ = lab.exec("node-a", &["conntrack", "-F"]);
    crate::bench::start_agents(lab, &["--no-pin"])?;
    let dnat_before = dnat_count(lab)?;
    let refused_before = conntrack_refused(lab)?;
    let cpu_before = crate::bench::agents_cpu(lab);

    let generator = start_generator(lab, rate, seconds)?;
    let (mut rss_max_kib, mut map_max) = (0u64, 0f64);
    let sample = |rss: &mut u64, map: &mut f64| {
        for a in &lab.agents {
            *rss = (*rss).max(crate::proc::memory_kib(a.child.id()).0);
        }
        if let Ok(m) = lab.metrics("node-a") {
            *map = map.max(crate::bench::metric_sum(
                &m,
                "observer_flow_observations_active",
            ));
        }
    };
    while !generator.is_finished() {
        sample(&mut rss_max_kib, &mut map_max);
        std::thread::sleep(Duration::from_secs(1));
    }
    let generator = generator_report(generator)?;
    let dnat = dnat_count(lab)?.saturating_sub(dnat_before);
    let conntrack = conntrack_entries(lab)?;
    let conntrack_refused = conntrack_refused(lab)?.saturating_sub(refused_before);
    // Every connection has ended: its records are final within the idle timeout and a poll.
    drain(lab, &mut || sample(&mut rss_max_kib, &mut map_max))?;
    let agent_cpu_s = crate::bench::agents_cpu(lab) - cpu_before;

    let nodes = reconcile_nodes(lab, &sent_ports(&generator))?;
    let (mut losses, mut repaired) = (Vec::new(), Vec::new());
    for n in ["node-a", "node-b"] {
        let m = lab.metrics(n)?;
        losses.push((n.to_owned(), nonzero(&m, LOSSES)));
        repaired.push((n.to_owned(), nonzero(&m, REPAIRED)));
    }
    Ok(RateRun {
        rate,
        generator,
        dnat,
        conntrack,
        conntrack_refused,
        nodes,
        losses,
        repaired,
        agent_cpu_s,
        rss_max_kib,
        map_max,
    })
}

/// Wait until both agents' final-record counts stop growing (at least the idle timeout and two
/// polls after the storm), sampling memory meanwhile.
pub(crate) fn drain(lab: &LabRun, sample: &mut dyn FnMut()) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let finals = || -> f64 {
        ["node-a", "node-b"]
            .iter()
            .filter_map(|n| lab.metrics(n).ok())
            .map(|m| crate::bench::metric_sum(&m, "observer_records_total{kind=\"final\"}"))
            .sum()
    };
    let mut last = finals();
    let mut still_since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        sample();
        let now = finals();
        if now != last {
            last = now;
            still_since = Instant::now();
        }
        if t0.elapsed() > IDLE + Duration::from_secs(3)
            && still_since.elapsed() >= Duration::from_secs(4)
        {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("the agents were still writing final records 120 s after the storm");
        }
    }
}

/// Both nodes' final records against the connections: node-a by the tuple the client asked
/// for, node-b by the one that reached the backend.
pub(crate) fn reconcile_nodes(
    lab: &LabRun,
    sent: &HashMap<u16, u64>,
) -> anyhow::Result<Vec<(String, Reconciled)>> {
    Ok(vec![
        (
            "node-a".to_owned(),
            reconcile(&lab.dir.join("node-a.jsonl"), sent, |r| {
                tuple_port(&r["pre_dnat"], CLIENT, VIP, 443)
            })?,
        ),
        (
            "node-b".to_owned(),
            reconcile(&lab.dir.join("node-b.jsonl"), sent, |r| {
                tuple_port(&r["post_dnat"], CLIENT, BACKEND, 8443)
            })?,
        ),
    ])
}

/// Answered connections per client port, from the generator's report.
pub(crate) fn sent_ports(generator: &Value) -> HashMap<u16, u64> {
    generator["ports"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(p, n)| Some((p.parse().ok()?, n.as_u64()?)))
        .collect()
}

fn tuple_port(t: &Value, src: &str, dst: &str, dport: u16) -> Option<u16> {
    (t["src"] == src && t["dst"] == dst && t["dport"] == dport)
        .then(|| t["sport"].as_u64().map(|p| p as u16))
        .flatten()
}

/// Match a node's final records to the connections, port by port (a port used n times must have
/// n records).
fn reconcile(
    flow_log: &std::path::Path,
    sent: &HashMap<u16, u64>,
    port_of: impl Fn(&Value) -> Option<u16>,
) -> anyhow::Result<Reconciled> {
    let mut recorded: HashMap<u16, u64> = HashMap::new();
    let mut rec = Reconciled::default();
    let file =
        std::fs::File::open(flow_log).with_context(|| format!("opening {}", flow_log.display()))?;
    for line in std::io::BufReader::new(file).lines() {
        // A SIGKILLed agent may leave its last line cut short: that line is no record.
        let Ok(r) = serde_json::from_str::<Value>(&line?) else {
            rec.torn += 1;
            continue;
        };
        if r["final"] != true || r["proto"] != "TCP" {
            continue;
        }
        let Some(port) = port_of(&r) else { continue };
        *recorded.entry(port).or_default() += 1;
        if !r["incomplete"].is_null() || !r["gap"].is_null() {
            rec.flagged += 1;
        }
    }
    for (port, &n) in sent {
        let got = recorded.get(port).copied().unwrap_or(0);
        rec.matched += n.min(got);
        rec.missing += n.saturating_sub(got);
    }
    for (port, &got) in &recorded {
        rec.extra += got.saturating_sub(sent.get(port).copied().unwrap_or(0));
    }
    Ok(rec)
}

/// Packets the nat table's DNAT rules of node-a matched: one per new connection to a Service.
fn dnat_count(lab: &LabRun) -> anyhow::Result<u64> {
    let out = lab.exec("node-a", &["iptables-save", "-c", "-t", "nat"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.contains("-j DNAT") && l.contains(&format!("--to-destination {BACKEND}:8443"))
        })
        .filter_map(|l| {
            let c = l.strip_prefix('[')?.split(']').next()?;
            c.split(':').next()?.parse::<u64>().ok()
        })
        .sum())
}

/// conntrack entries of node-a for the Service (every storm connection is one, in TIME_WAIT
/// for two minutes after it ends).
fn conntrack_entries(lab: &LabRun) -> anyhow::Result<u64> {
    let out = lab.exec(
        "node-a",
        &[
            "conntrack",
            "-L",
            "-p",
            "tcp",
            "--orig-dst",
            VIP,
            "--dport",
            "443",
        ],
    )?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("src={CLIENT}")))
        .count() as u64)
}

/// conntrack's refusals in node-a so far (all CPUs): insert_failed, drop, early_drop.
fn conntrack_refused(lab: &LabRun) -> anyhow::Result<u64> {
    let out = lab.exec("node-a", &["conntrack", "-S"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| ["insert_failed", "drop", "early_drop"].contains(k))
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum())
}

/// The agent's loss counters.
const LOSSES: &[&str] = &[
    "observer_kernel_events_lost_total",
    "observer_map_full_total",
    "observer_pending_events_refused_total",
    "observer_records_lost_total",
    "observer_record_write_errors_total",
    "observer_tuple_reuses_total{outcome=\"merged\"}",
    "observer_reuse_races_total{outcome=\"start_lost\"}",
    "observer_packets_after_final_total",
];
/// What the agent repaired: nothing lost.
const REPAIRED: &[&str] = &["observer_reuse_races_total{outcome=\"restored\""];

/// The series of `names` in `metrics` that are not zero.
fn nonzero(metrics: &str, names: &[&str]) -> BTreeMap<String, f64> {
    metrics
        .lines()
        .filter(|l| names.iter().any(|n| l.starts_with(n)))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let v: f64 = v.parse().ok()?;
            (v > 0.0).then(|| (series.trim_start_matches("observer_").to_owned(), v))
        })
        .collect()
}

fn report(runs: &[RateRun], seconds: u32) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nconnection storm through {VIP}:443 (pod-a -> pod-b across nodes), {seconds} s per rate, one agent per node"
    );
    let _ = writeln!(
        out,
        "  offered/s  made/s   answered  failed  not-started  dnat     conntrack  ct-refused  node-a rec  missing  extra  node-b rec  missing  extra  flagged  agents CPU  RSS max  map max"
    );
    for r in runs {
        let g = &r.generator;
        let failed: u64 = g["failed"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(_, n)| n.as_u64())
            .sum();
        let answered = g["answered"].as_u64().unwrap_or(0);
        let made = answered as f64 / g["elapsed_s"].as_f64().unwrap_or(1.0).max(1e-3);
        let (a, b) = (&r.nodes[0].1, &r.nodes[1].1);
        let _ = writeln!(
            out,
            "  {:>9}  {made:>6.0}  {answered:>9}  {failed:>6}  {:>11}  {:>7}  {:>9}  {:>10}  {:>10}  {:>7}  {:>5}  {:>10}  {:>7}  {:>5}  {:>7}  {:>6.2} s  {:>4.0} MiB  {:>7.0}",
            r.rate,
            g["not_started"].as_u64().unwrap_or(0),
            r.dnat,
            r.conntrack,
            r.conntrack_refused,
            a.matched,
            a.missing,
            a.extra,
            b.matched,
            b.missing,
            b.extra,
            a.flagged + b.flagged,
            r.agent_cpu_s,
            r.rss_max_kib as f64 / 1024.0,
            r.map_max,
        );
    }
    let _ = writeln!(
        out,
        "\n  losses the agents counted (their metrics), per rate"
    );
    for r in runs {
        for (node, l) in &r.losses {
            let _ = writeln!(out, "  {:>6}/s {node}: {}", r.rate, series(l));
        }
        let errs = &r.generator["failed"];
        if errs.as_object().is_some_and(|m| !m.is_empty()) {
            let _ = writeln!(out, "  {:>6}/s generator errors: {errs}", r.rate);
        }
    }
    let _ = writeln!(
        out,
        "\n  reused ports repaired by the agents (nothing lost), per rate"
    );
    for r in runs {
        for (node, l) in &r.repaired {
            let _ = writeln!(out, "  {:>6}/s {node}: {}", r.rate, series(l));
        }
    }
    out
}

fn series(l: &BTreeMap<String, f64>) -> String {
    if l.is_empty() {
        return "none".to_owned();
    }
    l.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}
