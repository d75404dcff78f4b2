//! `observer test-run`: the kernel programs run on crafted packets by the kernel itself
//! (`BPF_PROG_TEST_RUN`, net/bpf/test_run.c): nothing is attached and no traffic is touched, so
//! it answers, on this node's kernel, what each tc program records for a frame and what it costs
//! next to reference programs measured in the same run.
//!
//! The kernel builds an `sk_buff` on the loopback device around each frame (linear, all of it in
//! the head), runs the program `repeat` times and reports the mean time per run.

mod cost;
mod packets;
mod replay;

use std::time::Duration;

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use clap::{Args, Subcommand};

use crate::hooks::{self, nat::NatOffsets};

pub use cost::CostArgs;
pub use replay::FramesArgs;

#[derive(Args, Debug)]
pub struct TestRunArgs {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Subcommand, Debug)]
pub enum What {
    /// Per-packet and per-new-flow cost of each tc program, each as a ratio to two reference
    /// programs measured in the same run: a floor (returns at once) and a minimal flow counter.
    Cost(CostArgs),
    /// Run Ethernet frames (one hex string a line) through one tc program, one at a time; print
    /// for each, as a JSON line, what the program counted and the flow keys it created.
    Frames(FramesArgs),
}

pub fn run(args: TestRunArgs) -> anyhow::Result<i32> {
    match args.what {
        What::Cost(a) => cost::run(a),
        What::Frames(a) => replay::run(a),
    }
}

/// The observer's tc programs and the two references.
pub const TC_PROGRAMS: [&str; 4] = [
    "tc_pod_ingress",
    "tc_pod_egress",
    "tc_uplink_ingress",
    "tc_uplink_egress",
];
pub const REF_FLOOR: &str = "ref_floor";
pub const REF_COUNTER: &str = "ref_counter";

/// The object loaded as the agent loads it (flow map of `max_flows`, conntrack offsets from this
/// kernel's BTF when it has them), with `programs` loaded and nothing attached.
pub fn load(max_flows: u32, programs: &[&str]) -> anyhow::Result<Ebpf> {
    let nat = match NatOffsets::from_kernel() {
        Ok(n) => Some(n),
        Err(e) => {
            log::warn!("no conntrack offsets from BTF ({e}): the egress programs skip that read");
            None
        }
    };
    let mut ebpf = hooks::load_detached(max_flows, nat.as_ref()).context(
        "loading the kernel programs (needs root, or CAP_BPF with CAP_PERFMON and CAP_NET_ADMIN)",
    )?;
    for name in programs {
        let p: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name} in the object"))?
            .try_into()?;
        p.load().with_context(|| format!("loading {name}"))?;
    }
    Ok(ebpf)
}

/// One `BPF_PROG_TEST_RUN` of program `name` on `frame`, `repeat` times: (return value, mean
/// time per run).
pub fn run_once(
    ebpf: &Ebpf,
    name: &str,
    frame: &[u8],
    repeat: u32,
) -> anyhow::Result<(u32, Duration)> {
    let p: &SchedClassifier = ebpf
        .program(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()?;
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..Default::default()
        })
        .with_context(|| {
            format!(
                "BPF_PROG_TEST_RUN of {name} on a {}-byte frame",
                frame.len()
            )
        })?;
    Ok((r.return_value, r.duration))
}

/// The verdict every observer program must return: `TC_ACT_UNSPEC` (-1), "next program".
pub fn check_passes(name: &str, retval: u32) -> anyhow::Result<()> {
    if retval as i32 != -1 {
        bail!(
            "{name} returned {} instead of TC_ACT_UNSPEC (-1)",
            retval as i32
        );
    }
    Ok(())
}
