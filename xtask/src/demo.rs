//! `cargo xtask demo`: the story, measured. One connection from pod-a to Service
//! 100.64.0.10:443, followed through every layer of both nodes, told for a person.

use std::{fmt::Write as _, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, bail};
use observer_lab::drive::{CtEntry, LabRun, stdout_of, tuple_of};

use crate::demo_lab::{LAB, ep, flow, lab_cmd};
use serde_json::Value;

const VIP: &str = "100.64.0.10";

fn step(n: u32, text: &str) {
    println!("\n[{n}/8] {text}");
}

pub fn run(keep: bool, lb: &str) -> anyhow::Result<()> {
    let bins = crate::bins();
    let stamp = Command::new("date")
        .arg("-u")
        .arg("+%Y%m%dT%H%M%SZ")
        .output()?;
    let dir = crate::workspace_root()
        .join("demo-output")
        .join(String::from_utf8_lossy(&stamp.stdout).trim());

    // A demo lab left over from an interrupted run would make `up` refuse.
    let _ = Command::new(&bins.lab)
        .args(["down", "--name", LAB])
        .output();

    step(
        1,
        &format!("bringing up the lab: two nodes, five pods, the Services' load balancer: {lb}"),
    );
    let story = std::fs::read_to_string(crate::workspace_root().join("lab/story.toml"))?;
    let config = story.replacen(
        "load_balancer = \"iptables\"",
        &format!("load_balancer = \"{lb}\""),
        1,
    );
    let mut lab = LabRun::up(&bins, LAB, Some(&config), &dir)?;
    let status = Command::new(&bins.lab)
        .args(["status", "--name", LAB])
        .output()?;
    print!("{}", indent(&String::from_utf8_lossy(&status.stdout)));

    step(
        2,
        "starting one observer agent per node (tc on veths and the wire, cgroup socket hooks)",
    );
    for node in ["node-a", "node-b"] {
        lab.start_agent(node, AGENT_ARGS)?;
        println!(
            "      agent on {node}: ready (metrics on 127.0.0.1:9464 inside {}-{node})",
            LAB
        );
    }

    step(3, "driving real traffic from pod-a");
    traffic(&lab)?;

    step(4, "waiting for the agents' final records");
    let (story, arrived, post) = story_records(&lab)?;

    let (ct, evidence) = evidence(&lab, &dir, &post)?;

    step(5, "the story of one connection");
    let text = tell(&story, &arrived, &ct, &evidence);
    print!("{text}");
    std::fs::write(dir.join("story.txt"), &text)?;

    step(
        6,
        "where node-a's own IP is on the wire: NodePort from outside, hostNetwork client, egress SNAT",
    );
    print!("{}", crate::demo_node_ip::cases(&lab, &dir)?);

    step(
        7,
        "the two failures users meet, explained by `observer explain`, then fixed",
    );
    let mut explained = String::new();
    for (scenario, title) in [
        (
            "firewall-without-8443",
            "a firewall between the nodes that opens 443 instead of 8443",
        ),
        (
            "egress-service-port",
            "an egress NetworkPolicy that allows the Service port 443",
        ),
    ] {
        explained.push_str(&failure(&lab, &dir, scenario, title)?);
    }
    std::fs::write(dir.join("explain.txt"), &explained)?;

    step(8, "stopping the agents (SIGTERM: flush, detach, exit)");
    for (node, code, took) in lab.stop_agents()? {
        println!("      {node}: exit code {code:?} after {took:.2?}");
    }
    println!(
        "\nKept in {}: node-a.jsonl, node-b.jsonl (flow records), metrics-*.txt, conntrack-node-a.txt, iptables-nat-*.txt, story.txt, node-ip.txt, explain.txt",
        dir.display()
    );
    if keep {
        println!("The lab stays up (--keep): `observer-lab down --name {LAB}` removes it.");
        lab.agents.clear();
        std::mem::forget(lab);
    } else {
        drop(lab);
        println!("The lab is down again.");
    }
    Ok(())
}

/// Step 3: the story's curl, and UDP, two-endpoint and IPv6 exchanges beside it.
fn traffic(lab: &LabRun) -> anyhow::Result<()> {
    let curl = lab.exec(
        "pod-a",
        &["curl", "-sS", "-m", "5", &format!("http://{VIP}:443/")],
    )?;
    println!(
        "      curl http://{VIP}:443/            -> answered by {}",
        String::from_utf8_lossy(&curl.stdout).trim()
    );
    if !curl.status.success() {
        bail!("curl failed: {}", String::from_utf8_lossy(&curl.stderr));
    }
    for (label, args) in [
        (
            "UDP 100.64.0.53:53 x3",
            vec!["--to", "100.64.0.53:53", "--proto", "udp", "--count", "3"],
        ),
        (
            "TCP 100.64.0.20:80 x20 (two endpoints)",
            vec![
                "--to",
                "100.64.0.20:80",
                "--count",
                "20",
                "--concurrency",
                "5",
            ],
        ),
        (
            "TCP [fd00:100:64::10]:443 x2 (IPv6)",
            vec!["--to", "[fd00:100:64::10]:443", "--count", "2"],
        ),
    ] {
        let s = lab.client("pod-a", &args)?;
        println!("      {label:<38} -> {}", s["answers"]);
    }
    Ok(())
}

type Tuple4 = (String, u16, String, u16);

/// Step 4: the curl's final record on node-a, and the same connection's record on node-b.
/// The demo's agents; `--trace-drop-rules`: explain names the rule behind each drop it tells of.
const AGENT_ARGS: &[&str] = &[
    "--idle-timeout",
    "2s",
    "--flush-interval",
    "5s",
    "--trace-drop-rules",
];

fn story_records(lab: &LabRun) -> anyhow::Result<(Value, Value, Tuple4)> {
    let is_story = |r: &Value| {
        r["final"] == true && r["socket"]["comm"] == "curl" && r["pre_dnat"]["dst"] == VIP
    };
    let a = lab.wait_records("node-a", Duration::from_secs(15), |rs| {
        rs.iter().any(is_story)
    })?;
    let story = a
        .iter()
        .find(|r| is_story(r))
        .expect("waited for it")
        .clone();
    let post = tuple_of(&story["post_dnat"]).context("story record has no post_dnat")?;
    let b = lab.wait_records("node-b", Duration::from_secs(15), |rs| {
        rs.iter()
            .any(|r| r["final"] == true && tuple_of(&r["post_dnat"]).as_ref() == Some(&post))
    })?;
    let arrived = b
        .iter()
        .find(|r| tuple_of(&r["post_dnat"]).as_ref() == Some(&post))
        .expect("waited for it")
        .clone();
    Ok((story, arrived, post))
}

/// Independent evidence: conntrack's NAT mapping, and kube-proxy's DNAT rule counters (kept
/// in the demo's folder with the metrics).
fn evidence(lab: &LabRun, dir: &Path, post: &Tuple4) -> anyhow::Result<(Vec<CtEntry>, String)> {
    let ct = lab.conntrack("node-a")?;
    let mut evidence = String::new();
    for node in ["node-a", "node-b"] {
        let m = lab.metrics(node)?;
        std::fs::write(dir.join(format!("metrics-{node}.txt")), &m)?;
        let save = lab.exec(node, &["iptables-save", "-c", "-t", "nat"])?;
        let save = String::from_utf8_lossy(&save.stdout).into_owned();
        std::fs::write(dir.join(format!("iptables-nat-{node}.txt")), &save)?;
        let dnat = dnat_counter(&save, &format!("{}:{}", post.2, post.3));
        let _ = writeln!(
            evidence,
            "      kube-proxy DNAT rule to {}:{} on {node}: {} packets",
            post.2, post.3, dnat
        );
    }
    let ct_text = lab.exec("node-a", &["conntrack", "-L"])?;
    std::fs::write(dir.join("conntrack-node-a.txt"), &ct_text.stdout)?;
    Ok((ct, evidence))
}

/// The record against conntrack's NAT mapping on node-a, then the rule counters.
fn checked_against(ct: &[CtEntry], pre: &Value, post: &Value, evidence: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n  Independent evidence:");
    let want = tuple_of(pre);
    match ct.iter().find(|e| Some(&e.orig) == want.as_ref()) {
        Some(e) => {
            let reversed = e.reply_reversed();
            let ok = tuple_of(post) == Some(reversed);
            let _ = writeln!(
                s,
                "      conntrack on node-a: original {}:{} -> {}:{}, reply {}:{} -> {}:{}  ({})",
                e.orig.0,
                e.orig.1,
                e.orig.2,
                e.orig.3,
                e.reply.0,
                e.reply.1,
                e.reply.2,
                e.reply.3,
                if ok {
                    "matches the record's pre_dnat/post_dnat"
                } else {
                    "DOES NOT match the record"
                }
            );
        }
        None => match ct.iter().find(|e| Some(&e.orig) == tuple_of(post).as_ref()) {
            // A socket load balancer: conntrack only ever saw the backend tuple.
            Some(e) => {
                let _ = writeln!(
                    s,
                    "      conntrack on node-a: no entry for {}; original {}:{} -> {}:{} (the backend: it never saw the Service address)",
                    ep(pre),
                    e.orig.0,
                    e.orig.1,
                    e.orig.2,
                    e.orig.3
                );
            }
            None => {
                let _ = writeln!(s, "      conntrack on node-a: entry not found (expired?)");
            }
        },
    }
    s.push_str(evidence);

    s
}

/// What the story means for policy and firewalls, from its own tuples.
fn meaning(pre: &Value, post: &Value) -> String {
    let mut s = String::new();
    let port = post["dport"].clone();
    let pod_ip = post["dst"].as_str().unwrap_or("?");
    let _ = writeln!(s, "\n  What this means:");
    let _ = writeln!(
        s,
        "  - The rewrite {} -> {pod_ip}:{port} happened on node-a, the SENDING node. node-b did no DNAT.",
        ep(pre)
    );
    let _ = writeln!(
        s,
        "  - NetworkPolicy is enforced after that rewrite (egress of pod-a on node-a, ingress of pod-b on node-b),"
    );
    let _ = writeln!(
        s,
        "    so it matches pod-b's IP and the targetPort {port}: a rule for the Service IP range or for port {} is",
        pre["dport"]
    );
    let _ = writeln!(
        s,
        "    neither needed nor effective (an egress rule limited to port {} would block this flow).",
        pre["dport"]
    );
    let _ = writeln!(
        s,
        "  - The wire between the nodes carried {}: a firewall between nodes must allow the pod range to",
        flow(post)
    );
    let _ = writeln!(
        s,
        "    port {port}, not {} and not the Service IP.",
        pre["dport"]
    );
    s
}

fn observer(args: &[&str]) -> anyhow::Result<String> {
    stdout_of(&crate::bins().agent, args)
}

fn curl_ok(lab: &LabRun, timeout: &str) -> anyhow::Result<bool> {
    Ok(lab
        .exec(
            "pod-a",
            &["curl", "-sS", "-m", timeout, &format!("http://{VIP}:443/")],
        )?
        .status
        .success())
}

/// Apply a failing scenario, show `observer explain` for the request, apply its fix, show the
/// request working again, restore the default. Returns what was printed.
fn failure(lab: &LabRun, dir: &Path, scenario: &str, title: &str) -> anyhow::Result<String> {
    let root = crate::workspace_root();
    let file = root.join("lab/scenarios").join(format!("{scenario}.yaml"));
    let file = file.to_string_lossy().into_owned();
    let mut out = format!("\n  --- {title} ({scenario}.yaml) ---\n");
    lab_cmd(&["apply", "--name", LAB, &file])?;
    let before = lab.records("node-a")?.len();
    let failed = !curl_ok(lab, "2")?;
    let _ = writeln!(
        out,
        "  curl http://{VIP}:443/ from pod-a: {}",
        if failed {
            "FAILS"
        } else {
            "works (unexpected)"
        }
    );
    lab.wait_records("node-a", Duration::from_secs(15), |rs| rs.len() > before)?;
    std::thread::sleep(Duration::from_millis(2500));
    let logs = [dir.join("node-a.jsonl"), dir.join("node-b.jsonl")];
    let logs: Vec<String> = logs
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let names = lab.names_file().to_string_lossy().into_owned();
    let mut args = vec![
        "explain",
        &logs[0],
        &logs[1],
        "--service",
        "100.64.0.10:443",
        "--names",
        &names,
    ];
    let text = observer(&args)?;
    let _ = writeln!(
        out,
        "  $ observer explain node-a.jsonl node-b.jsonl --service 100.64.0.10:443 --names {names}"
    );
    out.push_str(&indent(&text));
    args.extend(["--format", "json"]);
    let v: Value = serde_json::from_str(&observer(&args)?)?;
    let fix = &v[0]["fix"];
    if let Some(nft) = fix["nft"].as_str() {
        let vpc = format!("{LAB}-vpc");
        let mut cmd = vec!["netns", "exec", vpc.as_str()];
        cmd.extend(nft.split_whitespace());
        crate::run(Command::new("ip").args(&cmd))?;
        let _ = writeln!(out, "  applied the lab's version of the fix: {nft}");
    } else if let Some(np) = fix["network_policy"].as_str() {
        let fixed = dir.join(format!("{scenario}-fixed.yaml"));
        std::fs::write(&fixed, std::fs::read_to_string(&file)? + np)?;
        lab_cmd(&["apply", "--name", LAB, &fixed.to_string_lossy()])?;
        let _ = writeln!(
            out,
            "  applied the scenario plus the suggested NetworkPolicy ({})",
            fixed.display()
        );
    }
    let works = curl_ok(lab, "5")?;
    let _ = writeln!(
        out,
        "  curl http://{VIP}:443/ from pod-a after the fix: {}",
        if works { "works" } else { "STILL FAILS" }
    );
    let none = root.join("lab/scenarios/none.yaml");
    lab_cmd(&["apply", "--name", LAB, &none.to_string_lossy()])?;
    print!("{out}");
    if !works || !failed {
        bail!("scenario {scenario} did not behave as documented");
    }
    Ok(out)
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("      {l}\n")).collect()
}

/// Packet counter of the DNAT rule to `dest` in `iptables-save -c` output.
fn dnat_counter(save: &str, dest: &str) -> u64 {
    save.lines()
        .filter(|l| l.contains("-j DNAT") && l.ends_with(&format!("--to-destination {dest}")))
        .filter_map(|l| {
            let c = l.strip_prefix('[')?.split(']').next()?;
            c.split(':').next()?.parse::<u64>().ok()
        })
        .sum()
}

fn hop<'a>(r: &'a Value, point: &str) -> Option<&'a Value> {
    r["hops"]
        .as_array()?
        .iter()
        .find(|h| h["point"] == point && h["dir"] == "orig")
}

fn tell(story: &Value, arrived: &Value, ct: &[CtEntry], evidence: &str) -> String {
    let mut s = String::new();
    let pre = &story["pre_dnat"];
    let post = &story["post_dnat"];
    let sock = &story["socket"];
    let veth_a = hop(story, "pod_ingress")
        .and_then(|h| h["iface"].as_str())
        .unwrap_or("?");
    let veth_b = hop(arrived, "pod_egress")
        .and_then(|h| h["iface"].as_str())
        .unwrap_or("?");
    let _ = writeln!(
        s,
        "\n  One TCP connection, as the kernel saw it on both nodes:\n"
    );
    let _ = writeln!(
        s,
        "  1. pod-a asked for        {:<44} connect() by {} (pid {})",
        ep(&sock["asked"]),
        sock["comm"].as_str().unwrap_or("?"),
        sock["pid"]
    );
    s.push_str(&tell_translation(story, veth_a));
    s.push_str(&policy_saw(story, "node-a"));
    let _ = writeln!(
        s,
        "  4. on the wire            {:<44} tc egress of node-a's uplink: what a firewall between nodes sees",
        flow(post)
    );
    let _ = writeln!(
        s,
        "  5. arrived on node-b      {:<44} tc ingress of node-b's uplink; node-b's record: observed_as={}, translated={}",
        flow(&arrived["post_dnat"]),
        arrived["observed_as"].as_str().unwrap_or("?"),
        arrived["translated"]
    );
    s.push_str(&policy_saw(arrived, "node-b"));
    let delivered = hop(arrived, "pod_egress")
        .map(|h| flow(&h["tuple"]))
        .unwrap_or_default();
    let _ = writeln!(
        s,
        "  6. delivered to pod-b     {delivered:<44} tc egress, node side of pod-b's veth {veth_b}"
    );
    let _ = writeln!(
        s,
        "     answered: {} packets / {} bytes each way in {}, state {}",
        story["totals"]["packets"],
        story["totals"]["bytes"],
        story["proto"].as_str().unwrap_or("?"),
        story["state"].as_str().unwrap_or("?")
    );

    s.push_str(&checked_against(ct, pre, post, evidence));

    s.push_str(&meaning(pre, post));
    s
}

/// What the filter table (NetworkPolicy) on `node` evaluated, and whether that was measured.
fn policy_saw(r: &Value, node: &str) -> String {
    let p = &r["policy_view"];
    if p.is_null() {
        return String::new();
    }
    let how = match p["source"].as_str() {
        Some("filter_hook") => format!(
            "measured at filter {}: {} packets in, {} let through",
            p["hook"].as_str().unwrap_or("?").to_uppercase(),
            p["packets"],
            p["passed"]
        ),
        Some(other) => format!("{other}, not measured by the filter hooks"),
        None => "?".into(),
    };
    format!(
        "     policy on {node} saw {:<44} {how}\n",
        flow(&p["tuple"])
    )
}

/// Steps 2 and 3 of the story: where the client's tuple entered and where it was rewritten, in
/// netfilter or in connect() by a socket load balancer.
fn tell_translation(story: &Value, veth_a: &str) -> String {
    let mut s = String::new();
    let pre = &story["pre_dnat"];
    let tr = &story["translation"];
    let entered = hop(story, "pod_ingress").map_or(pre, |h| &h["tuple"]);
    if tr["mechanism"] == "socket" {
        let _ = writeln!(
            s,
            "  2. rewritten in connect() on {}: a socket load balancer chose the backend before any packet existed;\n     no packet ever carried {}",
            tr["node"].as_str().unwrap_or("?"),
            ep(pre)
        );
        let _ = writeln!(
            s,
            "  3. entered node-a         {:<44} tc ingress, node side of pod-a's veth {veth_a}",
            flow(entered)
        );
    } else {
        let _ = writeln!(
            s,
            "  2. entered node-a         {:<44} tc ingress, node side of pod-a's veth {veth_a}",
            flow(entered)
        );
        let _ = writeln!(
            s,
            "  3. DNAT on {:<14} between {} and {}: inside node-a's IP stack (netfilter nat PREROUTING,",
            tr["node"].as_str().unwrap_or("?"),
            tr["after"].as_str().unwrap_or("?"),
            tr["before"].as_str().unwrap_or("?")
        );
        let _ = writeln!(
            s,
            "                            kube-proxy's Service rules, conntrack zone {})",
            tr["ct_zone"]
        );
    }
    let _ = writeln!(
        s,
        "                            pre/post joined by: {}",
        match tr["evidence"].as_str() {
            Some("conntrack") => {
                "the kernel's NAT state (the packet's conntrack entry names the pre-DNAT tuple as original)"
            }
            Some("socket") => {
                "the socket (the address of the connect() call, seen by the agent's cgroup hook running first, against its first packet)"
            }
            Some("client_endpoint") => "the unchanged client IP:port (inferred: no NAT state read)",
            Some(other) => other,
            None => "?",
        }
    );
    s
}
