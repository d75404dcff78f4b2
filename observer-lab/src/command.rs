//! `observer-lab ...` subcommands.

use std::process::Command;

use anyhow::Context as _;

use crate::{
    Lab,
    cli::{LabAddPodArgs, LabApplyArgs, LabCommand},
    config::{self, LabConfig},
    traffic,
};

/// Returns the process exit code.
pub fn run(cmd: LabCommand) -> anyhow::Result<i32> {
    match cmd {
        LabCommand::Up(a) => {
            let lab = Lab::new(&a.lab.name)?;
            let text = match &a.config {
                Some(p) => std::fs::read_to_string(p)
                    .with_context(|| format!("reading lab description {}", p.display()))?,
                None => config::STORY.to_owned(),
            };
            let mut cfg = LabConfig::parse(&text)?;
            if let Some(lb) = a.lb {
                cfg.load_balancer = lb;
            }
            if let Some(names) = a.pod_ifaces {
                cfg.pod_ifaces = names;
            }
            lab.up(&cfg, &toml::to_string(&cfg)?)?;
            print!("{}", lab.status());
            Ok(0)
        }
        LabCommand::Down(a) => {
            let lab = Lab::new(&a.name)?;
            let n = lab.down()?;
            println!("lab {}: removed {n} namespaces", lab.name);
            Ok(0)
        }
        LabCommand::Status(a) => {
            let lab = Lab::new(&a.name)?;
            print!("{}", lab.status());
            Ok(0)
        }
        LabCommand::Exec(a) => {
            let lab = Lab::new(&a.lab.name)?;
            let cfg = lab.load_config()?;
            let ns = lab.target_ns(&cfg, &a.target)?;
            let status = Command::new("ip")
                .args(["netns", "exec", &ns])
                .args(&a.cmd)
                .status()
                .context("running ip netns exec")?;
            Ok(status.code().unwrap_or(1))
        }
        LabCommand::Apply(a) => apply(a),
        LabCommand::AddPod(a) => add_pod(a),
        LabCommand::DelPod(a) => {
            let lab = Lab::new(&a.lab.name)?;
            lab.del_pod_live(&a.pod)?;
            println!("lab {}: pod {} deleted", lab.name, a.pod);
            Ok(0)
        }
        LabCommand::Names(a) => {
            let lab = Lab::new(&a.name)?;
            lab.load_config()?;
            println!("{}", lab.names_path().display());
            Ok(0)
        }
        LabCommand::OtlpReceiver(a) => {
            let lab = Lab::new(&a.lab.name)?;
            let cfg = lab.load_config()?;
            let ns = lab.target_ns(&cfg, &a.node)?;
            let rx = crate::otlp_receiver::Receiver::start(&ns, &a.listen.to_string(), true)?;
            eprintln!(
                "OTLP/gRPC logs receiver on {} in {ns}: each record's body, a line each",
                a.listen
            );
            rx.wait();
            Ok(0)
        }
        LabCommand::Example => {
            print!("{}", config::STORY);
            Ok(0)
        }
        LabCommand::Client(a) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok(if rt.block_on(traffic::client(a)) {
                0
            } else {
                1
            })
        }
        LabCommand::Storm(a) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let report = rt.block_on(crate::storm::storm(a));
            println!("{}", serde_json::to_string(&report)?);
            Ok(0)
        }
        LabCommand::Serve(a) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(traffic::serve(a))?;
            Ok(0)
        }
    }
}

fn apply(a: LabApplyArgs) -> anyhow::Result<i32> {
    let lab = Lab::new(&a.lab.name)?;
    let yaml = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let p = lab.apply_policies(&yaml)?;
    let fw = p.firewall.map_or_else(
        || "GKE default (pod ranges -> all)".to_owned(),
        |f| {
            f.rules
                .iter()
                .map(|r| format!("{} {} {}", r.name, r.action, r.rules.join(",")))
                .collect::<Vec<_>>()
                .join("; ")
        },
    );
    println!(
        "lab {}: {} NetworkPolicies in force; VPC firewall: {fw}",
        lab.name,
        p.network_policies.len()
    );
    Ok(0)
}

fn add_pod(a: LabAddPodArgs) -> anyhow::Result<i32> {
    let lab = Lab::new(&a.lab.name)?;
    lab.add_pod_live(config::Pod {
        name: a.pod.clone(),
        namespace: a.namespace,
        node: a.node,
        ip: a.ip,
        ip6: a.ip6,
        labels: Default::default(),
        ports: Vec::new(),
    })?;
    println!(
        "lab {}: pod {} added (node iface {})",
        lab.name,
        a.pod,
        lab.load_config()?.host_veth(&a.pod)
    );
    Ok(0)
}
