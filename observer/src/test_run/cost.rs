//! `observer test-run cost`: what each tc program costs per packet and per new flow, as a ratio to
//! a floor and a minimal counter measured in the same run, interleaved, so a machine that is
//! slower this minute is slower for all of them (absolute times on a shared VM swing by 30 %).

use std::net::IpAddr;

use clap::Args;
use serde_json::json;

use super::{REF_COUNTER, REF_FLOOR, TC_PROGRAMS, check_passes, load, packets, run_once};

#[derive(Args, Debug)]
pub struct CostArgs {
    /// Runs per BPF_PROG_TEST_RUN call for the per-packet figures (the kernel reports their mean).
    #[arg(long, default_value_t = 1_000_000)]
    pub repeat: u32,
    /// Interleaved rounds, every program once per round and packet; min and median are over
    /// rounds.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Distinct new tuples, each run once through every program, for the new-flow p50 and p99.
    #[arg(long, default_value_t = 4000)]
    pub new_flows: u32,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

struct Case {
    what: &'static str,
    frame: Vec<u8>,
}

fn cases() -> Vec<Case> {
    let ip = |s: &str| s.parse::<IpAddr>().expect("literal");
    vec![
        Case {
            what: "IPv4 TCP ACK of a known flow (steady state)",
            frame: packets::tcp(
                ip("10.1.0.1"),
                40000,
                ip("10.2.0.1"),
                8443,
                packets::TCP_ACK,
            ),
        },
        Case {
            what: "IPv4 TCP SYN on its known key (a retransmit: the reuse check)",
            frame: packets::tcp(
                ip("10.1.0.2"),
                40001,
                ip("10.2.0.1"),
                8443,
                packets::TCP_SYN,
            ),
        },
        Case {
            what: "IPv6 TCP SYN on its known key",
            frame: packets::tcp(ip("fd00::1"), 40002, ip("fd00::2"), 8443, packets::TCP_SYN),
        },
    ]
}

fn programs() -> Vec<&'static str> {
    let mut p = TC_PROGRAMS.to_vec();
    p.extend([REF_COUNTER, REF_FLOOR]);
    p
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn run(args: CostArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(
        args.rounds > 0 && args.repeat > 0,
        "--rounds and --repeat must be > 0"
    );
    let programs = programs();
    let max_flows = observer_common::FLOWS_MAX_ENTRIES.max(args.new_flows * 4 + 64);
    let ebpf = load(max_flows, &programs)?;
    let cases = cases();

    // per_packet[case][program] = mean ns per run, one value per round.
    let mut per_packet = vec![vec![Vec::new(); programs.len()]; cases.len()];
    for round in 0..args.rounds {
        eprintln!(
            "per packet: round {}/{} ({} runs per program and packet)",
            round + 1,
            args.rounds,
            args.repeat
        );
        for (c, case) in cases.iter().enumerate() {
            // A different program first each round, so none always runs on a cold cache.
            for k in 0..programs.len() {
                let p = (k + round as usize) % programs.len();
                let (ret, took) = run_once(&ebpf, programs[p], &case.frame, args.repeat)?;
                check_passes(programs[p], ret)?;
                per_packet[c][p].push(took.as_nanos() as f64);
            }
        }
    }

    eprintln!(
        "per new flow: {} distinct tuples, one run each",
        args.new_flows
    );
    let mut new_flow = vec![Vec::new(); programs.len()];
    for i in 0..args.new_flows {
        let src = IpAddr::from([10, 100 + (i >> 16) as u8, (i >> 8) as u8, i as u8]);
        let frame = packets::tcp(
            src,
            10_000 + (i % 50_000) as u16,
            IpAddr::from([10, 99, 0, 1]),
            8443,
            packets::TCP_SYN,
        );
        for k in 0..programs.len() {
            let p = (k + i as usize) % programs.len();
            let (ret, took) = run_once(&ebpf, programs[p], &frame, 1)?;
            check_passes(programs[p], ret)?;
            new_flow[p].push(took.as_nanos() as f64);
        }
    }

    let report = report(&args, &programs, &cases, per_packet, new_flow);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_tables(&report);
    }
    Ok(0)
}

fn report(
    args: &CostArgs,
    programs: &[&str],
    cases: &[Case],
    mut per_packet: Vec<Vec<Vec<f64>>>,
    mut new_flow: Vec<Vec<f64>>,
) -> serde_json::Value {
    let counter = programs
        .iter()
        .position(|p| *p == REF_COUNTER)
        .expect("listed");
    let floor = programs
        .iter()
        .position(|p| *p == REF_FLOOR)
        .expect("listed");
    let mut packet_rows = Vec::new();
    for (c, case) in cases.iter().enumerate() {
        let medians: Vec<f64> = per_packet[c].iter_mut().map(|v| median(v)).collect();
        for (p, name) in programs.iter().enumerate() {
            let min = per_packet[c][p]
                .iter()
                .copied()
                .fold(f64::INFINITY, f64::min);
            packet_rows.push(json!({
                "case": case.what,
                "program": name,
                "median_ns": medians[p],
                "min_ns": min,
                "x_counter": medians[p] / medians[counter],
                // The run's own cost (the floor) taken out of both.
                "x_counter_above_floor":
                    (medians[p] - medians[floor]) / (medians[counter] - medians[floor]).max(1.0),
            }));
        }
    }
    for v in &mut new_flow {
        v.sort_by(f64::total_cmp);
    }
    let (c50, c99) = (
        percentile(&new_flow[counter], 0.5),
        percentile(&new_flow[counter], 0.99),
    );
    let flow_rows: Vec<_> = programs
        .iter()
        .zip(&new_flow)
        .map(|(name, v)| {
            let (p50, p99) = (percentile(v, 0.5), percentile(v, 0.99));
            json!({
                "program": name,
                "p50_ns": p50,
                "p99_ns": p99,
                "x_counter_p50": p50 / c50,
                "x_counter_p99": p99 / c99,
            })
        })
        .collect();
    json!({
        "kernel": kernel_release(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "repeat": args.repeat,
        "rounds": args.rounds,
        "new_flows": args.new_flows,
        "per_packet": packet_rows,
        "new_flow": flow_rows,
    })
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn print_tables(r: &serde_json::Value) {
    println!(
        "BPF_PROG_TEST_RUN on Linux {}, {} CPUs: {} rounds of {} runs per program and packet",
        r["kernel"].as_str().unwrap_or("?"),
        r["cpus"],
        r["rounds"],
        r["repeat"]
    );
    let mut case = "";
    for row in r["per_packet"].as_array().into_iter().flatten() {
        let this = row["case"].as_str().unwrap_or_default();
        if this != case {
            case = this;
            println!("\n{case}");
            println!(
                "  {:<18} {:>10} {:>8} {:>10} {:>22}",
                "program", "median ns", "min ns", "x counter", "x counter above floor"
            );
        }
        println!(
            "  {:<18} {:>10.0} {:>8.0} {:>10.2} {:>22.2}",
            row["program"].as_str().unwrap_or_default(),
            row["median_ns"].as_f64().unwrap_or(0.0),
            row["min_ns"].as_f64().unwrap_or(0.0),
            row["x_counter"].as_f64().unwrap_or(0.0),
            row["x_counter_above_floor"].as_f64().unwrap_or(0.0),
        );
    }
    println!(
        "\nA new flow: the first packet of {} distinct tuples, one run each",
        r["new_flows"]
    );
    println!(
        "  {:<18} {:>8} {:>8} {:>14} {:>14}",
        "program", "p50 ns", "p99 ns", "p50 x counter", "p99 x counter"
    );
    for row in r["new_flow"].as_array().into_iter().flatten() {
        println!(
            "  {:<18} {:>8.0} {:>8.0} {:>14.2} {:>14.2}",
            row["program"].as_str().unwrap_or_default(),
            row["p50_ns"].as_f64().unwrap_or(0.0),
            row["p99_ns"].as_f64().unwrap_or(0.0),
            row["x_counter_p50"].as_f64().unwrap_or(0.0),
            row["x_counter_p99"].as_f64().unwrap_or(0.0),
        );
    }
}
