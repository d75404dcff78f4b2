//! `cargo xtask bench --only soak`: a steady connection load for minutes while both agents are
//! restarted every minute (SIGTERM and SIGKILL in turn), their flow maps pinned on a bpf
//! filesystem of the soak's own so each new agent adopts the open flows.
//!
//! Read with bpftool after every restart and at the end: the programs, links and maps of the
//! agents (nothing may pile up: one agent's worth per node while they run, none of their programs
//! or links once they are gone, only the pinned maps until the pins go, then nothing). Each
//! minute's agents' largest RSS. At the end every connection the generator made is looked up in
//! both nodes' flow logs, as in the storm.

use std::{
    collections::HashSet,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use observer_lab::drive::LabRun;
use serde_json::Value;

use crate::storm;

const LAB: &str = "soak";

/// The agents' kernel objects by bpftool: programs and links of ours, and maps that are ours
/// by name or used by one of our programs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Objects {
    progs: usize,
    links: usize,
    maps: usize,
}

const PROGRAM_PREFIXES: &[&str] = &["tc_", "sock_", "nf_", "trace_kfree"];
const MAP_NAMES: &[&str] = &[
    "FLOWS",
    "CT_ORIG",
    "SOCKS",
    "SOCKET_EVENTS",
    "DROP_EVENTS",
    "FILTER_SEEN",
    "STATS",
];

fn bpftool(what: &str) -> anyhow::Result<Vec<Value>> {
    let out = Command::new("bpftool")
        .args(["-j", what, "show"])
        .output()
        .context("bpftool")?;
    Ok(serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default())
}

fn objects() -> anyhow::Result<Objects> {
    let progs: Vec<Value> = bpftool("prog")?
        .into_iter()
        .filter(|p| {
            let n = p["name"].as_str().unwrap_or_default();
            PROGRAM_PREFIXES.iter().any(|x| n.starts_with(x))
        })
        .collect();
    let prog_ids: HashSet<u64> = progs.iter().filter_map(|p| p["id"].as_u64()).collect();
    let used: HashSet<u64> = progs
        .iter()
        .flat_map(|p| p["map_ids"].as_array().cloned().unwrap_or_default())
        .filter_map(|m| m.as_u64())
        .collect();
    let links = bpftool("link")?
        .iter()
        .filter(|l| {
            l["prog_id"]
                .as_u64()
                .is_some_and(|id| prog_ids.contains(&id))
        })
        .count();
    let maps = bpftool("map")?
        .iter()
        .filter(|m| {
            m["id"].as_u64().is_some_and(|id| used.contains(&id))
                || MAP_NAMES.contains(&m["name"].as_str().unwrap_or_default())
        })
        .count();
    Ok(Objects {
        progs: progs.len(),
        links,
        maps,
    })
}

/// The kernel frees a dead agent's objects shortly after it exits: read until two reads agree.
fn settled() -> anyhow::Result<Objects> {
    let mut last = objects()?;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        let now = objects()?;
        if now == last {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

/// A bpf filesystem of the soak's own, unmounted when dropped.
struct Bpffs(PathBuf);

impl Bpffs {
    fn mount(path: PathBuf) -> anyhow::Result<Bpffs> {
        std::fs::create_dir_all(&path)?;
        crate::run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&path))?;
        Ok(Bpffs(path))
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// One restart: when, how, and what the kernel held once the new agents were up.
struct Restart {
    minute: u32,
    signal: &'static str,
    objects: Objects,
    /// The largest RSS of the agents that ran the minute before, per node (KiB).
    rss_kib: Vec<u64>,
}

pub fn run(minutes: u32, rate: u32, dir: &Path) -> anyhow::Result<String> {
    let bins = crate::bins();
    let _ = Command::new(&bins.lab)
        .args(["down", "--name", LAB])
        .output();
    let mut lab = LabRun::up(&bins, LAB, None, dir)?;
    for node in ["node-a", "node-b"] {
        let _ = std::fs::remove_file(dir.join(format!("{node}.jsonl")));
    }
    let _pinned = match crate::bench::agent_cpus() {
        Some(cpus) => {
            println!("==> soak load on CPU 0, agents on CPUs {cpus} (taskset)");
            Some(crate::proc::pin_self(0)?)
        }
        None => None,
    };
    storm::widen_ports(&lab)?;
    let before = settled()?;
    let bpffs = Bpffs::mount(dir.join("bpffs"))?;
    for node in ["node-a", "node-b"] {
        start_pinned(&mut lab, &bpffs, node)?;
    }
    let running = settled()?;
    println!(
        "==> soak: {rate} new connections/s for {minutes} min, both agents restarted every minute (SIGTERM, SIGKILL in turn)"
    );
    let generator = storm::start_generator(&lab, rate, minutes * 60)?;
    let restarts = restart_every_minute(&mut lab, &bpffs, minutes)?;
    let generator = storm::generator_report(generator)?;
    storm::drain(&lab, &mut || {})?;
    let nodes = storm::reconcile_nodes(&lab, &storm::sent_ports(&generator))?;
    lab.stop_agents()?;
    let stopped = settled()?;
    let pins: Vec<String> = walk(&bpffs.0);
    drop(bpffs);
    let unpinned = settled()?;
    drop(lab);
    Ok(report(&Soak {
        minutes,
        rate,
        before,
        running,
        restarts,
        stopped,
        pins,
        unpinned,
        generator,
        nodes,
    }))
}

/// An agent on `node` with its flow map pinned in the soak's own bpffs.
fn start_pinned(lab: &mut LabRun, bpffs: &Bpffs, node: &str) -> anyhow::Result<()> {
    let dir = bpffs.0.join(node).to_string_lossy().into_owned();
    crate::bench::start_agents_on(lab, &[node], &["--pin-dir", &dir])
}

/// Until the last minute: at each full minute both agents go (SIGTERM and SIGKILL in turn) and
/// new ones start; meanwhile each second the agents' RSS is sampled.
fn restart_every_minute(
    lab: &mut LabRun,
    bpffs: &Bpffs,
    minutes: u32,
) -> anyhow::Result<Vec<Restart>> {
    let t0 = Instant::now();
    let mut restarts = Vec::new();
    for minute in 1..minutes {
        let mut rss = vec![0u64; lab.agents.len()];
        while t0.elapsed() < Duration::from_secs(u64::from(minute) * 60) {
            for (i, a) in lab.agents.iter().rev().take(2).enumerate() {
                rss[i] = rss[i].max(crate::proc::memory_kib(a.child.id()).0);
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        let signal = if minute % 2 == 1 {
            "SIGTERM"
        } else {
            "SIGKILL"
        };
        for node in ["node-a", "node-b"] {
            if signal == "SIGTERM" {
                lab.stop_agent(node)?;
            } else {
                lab.kill_agent(node)?;
            }
            start_pinned(lab, bpffs, node)?;
        }
        let objects = settled()?;
        println!("    minute {minute}: {signal}, restarted; kernel objects {objects:?}");
        rss.truncate(2);
        restarts.push(Restart {
            minute,
            signal,
            objects,
            rss_kib: rss,
        });
    }
    Ok(restarts)
}

/// What a soak saw, for its report.
struct Soak {
    minutes: u32,
    rate: u32,
    before: Objects,
    running: Objects,
    restarts: Vec<Restart>,
    stopped: Objects,
    pins: Vec<String>,
    unpinned: Objects,
    generator: Value,
    nodes: Vec<(String, storm::Reconciled)>,
}

fn report(s: &Soak) -> String {
    let Soak {
        minutes,
        rate,
        before,
        running,
        stopped,
        unpinned,
        ..
    } = s;
    let mut text = String::new();
    let _ = writeln!(
        text,
        "\nsoak: {rate} new connections/s for {minutes} min through {}:443, both agents restarted every minute",
        storm::VIP
    );
    let _ = writeln!(
        text,
        "  kernel objects of the agents (bpftool: programs, links, maps)\n  before any agent {before:?}\n  both running      {running:?}"
    );
    for r in &s.restarts {
        let _ = writeln!(
            text,
            "  minute {:>2} {}: {:?}{}; RSS of the agents before it: {}",
            r.minute,
            r.signal,
            r.objects,
            if r.objects == *running {
                ""
            } else {
                " (NOT as at start)"
            },
            r.rss_kib
                .iter()
                .map(|k| format!("{:.1} MiB", *k as f64 / 1024.0))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(
        text,
        "  all stopped       {stopped:?} (pins left: {})\n  pins removed      {unpinned:?}{}",
        s.pins.join(", "),
        if unpinned == before {
            " = as before any agent"
        } else {
            " (NOT as before: leaked)"
        }
    );
    let g = &s.generator;
    let _ = writeln!(
        text,
        "  connections: {} answered, failed {}, not started {}",
        g["answered"].as_u64().unwrap_or(0),
        g["failed"],
        g["not_started"].as_u64().unwrap_or(0)
    );
    for (node, r) in &s.nodes {
        let _ = writeln!(
            text,
            "  {node}: {} with their final record, {} missing, {} records no connection claims, {} flagged (gap or incomplete), {} lines cut short",
            r.matched, r.missing, r.extra, r.flagged, r.torn
        );
    }
    text
}

/// Files under a directory, relative to it.
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(
                walk(&p)
                    .into_iter()
                    .map(|f| format!("{}/{f}", e.file_name().to_string_lossy())),
            );
        } else {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out
}
