//! `observer test-run frames`: each frame through one tc program, with what it counted (the
//! STATS map's change) and the flow keys it created, so a corpus of malformed frames can be
//! checked against the real programs: counted under the right stat, never a wrong tuple.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
};

use anyhow::Context as _;
use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};
use clap::Args;
use observer_common::{FlowCounters, FlowKey, STATS_LEN, Stat};
use serde_json::json;

use super::{TC_PROGRAMS, check_passes, load, run_once};
use crate::correlate::tuple::Tuple;

#[derive(Args, Debug)]
pub struct FramesArgs {
    /// File of frames, one hex-encoded Ethernet frame a line (an empty line is a zero-length
    /// frame; a line starting with `#` is a comment); `-` reads stdin.
    pub file: PathBuf,
    /// The tc program to run them through.
    #[arg(long, default_value = "tc_pod_ingress", value_parser = TC_PROGRAMS)]
    pub program: String,
}

pub fn run(args: FramesArgs) -> anyhow::Result<i32> {
    let input: Box<dyn std::io::Read> = if args.file.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(
            std::fs::File::open(&args.file)
                .with_context(|| format!("opening {}", args.file.display()))?,
        )
    };
    let program: &'static str = TC_PROGRAMS
        .into_iter()
        .find(|p| *p == args.program)
        .expect("checked by clap");
    let mut ebpf = load(observer_common::FLOWS_MAX_ENTRIES, &[program])?;
    let stats: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(ebpf.take_map("STATS").context("no STATS map")?)?;
    let mut flows: PerCpuHashMap<MapData, FlowKey, FlowCounters> =
        PerCpuHashMap::try_from(ebpf.take_map("FLOWS").context("no FLOWS map")?)?;

    for (n, line) in BufReader::new(input).lines().enumerate() {
        let line = line.context("reading frames")?;
        let text = line.trim();
        if text.starts_with('#') {
            continue;
        }
        let frame = hex(text).with_context(|| format!("line {}: not a hex string", n + 1))?;
        let before = totals(&stats)?;
        let out = match run_once(&ebpf, program, &frame, 1) {
            Ok((ret, _)) => {
                check_passes(program, ret)?;
                let after = totals(&stats)?;
                // By index: not every index has a Stat (0 is unused).
                let counted: serde_json::Map<_, _> = Stat::ALL
                    .iter()
                    .map(|&s| (s, before[s as usize], after[s as usize]))
                    .filter(|(_, b, a)| a > b)
                    .map(|(s, b, a)| (format!("{s:?}"), json!(a - b)))
                    .collect();
                json!({"line": n + 1, "len": frame.len(), "stats": counted, "keys": take_keys(&mut flows)?})
            }
            // The kernel refuses some frames itself (e.g. shorter than an Ethernet header).
            Err(e) => json!({"line": n + 1, "len": frame.len(), "refused": format!("{e:#}")}),
        };
        println!("{out}");
    }
    Ok(0)
}

fn hex(s: &str) -> anyhow::Result<Vec<u8>> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    anyhow::ensure!(s.len().is_multiple_of(2), "odd number of hex digits");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(Into::into))
        .collect()
}

fn totals(stats: &PerCpuArray<MapData, u64>) -> anyhow::Result<Vec<u64>> {
    (0..STATS_LEN)
        .map(|i| Ok(stats.get(&i, 0)?.iter().sum()))
        .collect()
}

/// The keys in the flow map, removed so the next frame starts from an empty map.
fn take_keys(
    flows: &mut PerCpuHashMap<MapData, FlowKey, FlowCounters>,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let keys: Vec<FlowKey> = flows.keys().collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for k in keys {
        let counters = flows.get(&k, 0)?;
        let tuple = Tuple::from_key(&k);
        out.push(json!({
            "proto": k.proto,
            "family": k.family,
            "src": tuple.src.to_string(),
            "dst": tuple.dst.to_string(),
            "point": k.point,
            "packets": counters.iter().map(|c| c.packets).sum::<u64>(),
            "bytes": counters.iter().map(|c| c.bytes).sum::<u64>(),
            "tcp_flags": counters.iter().fold(0, |f, c| f | c.tcp_flags),
        }));
        flows.remove(&k)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_strings_decode_and_bad_ones_are_refused() {
        assert_eq!(super::hex("0a ff 10").unwrap(), vec![0x0a, 0xff, 0x10]);
        assert!(super::hex("abc").is_err());
        assert!(super::hex("zz").is_err());
    }
}
