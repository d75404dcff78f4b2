//! The DaemonSet on a real kubelet (`cargo xtask cluster check`, part of `cargo xtask test`):
//! `kubectl apply -k deploy/base` on the one-node cluster, the agent ready with exactly its
//! declared capabilities, seccomp profile and read-only root; a client pod calling a Service
//! (443 -> targetPort 8443) of a two-replica Deployment; the agent's records, read with `kubectl
//! logs`, name the client, the Service and the backend from the real API; deleting the DaemonSet
//! leaves no program attached on the node.

use std::{collections::BTreeSet, process::Command};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::cluster::{self, BUSYBOX, NODE_IP, NS, kubectl, wait_for};

/// What the headless metrics Service is called in cluster DNS (deploy/prometheus/scrape.yml).
const METRICS_NAME: &str = "observer-metrics.observer.svc.cluster.local";

/// Lines the streamer sends, one each 100 ms: long enough for a rolling update in between.
const STREAM_LINES: u32 = 600;

/// CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF (linux/capability.h): the DaemonSet's `add`.
const AGENT_CAPS: u64 = (1 << 12) | (1 << 38) | (1 << 39);

fn app(cluster_ip: Option<&str>) -> String {
    let backend = format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: payments}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: shop}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: payments}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers:
      - name: web
        image: {BUSYBOX}
        imagePullPolicy: Never
        command: ["/bin/sh", "-c", "mkdir -p /www && echo $HOSTNAME > /www/index.html && exec httpd -f -p 8443 -h /www"]
        ports: [{{containerPort: 8443}}]
      # Reads each connection to its end (nc's own stdin would end it at once).
      - name: sink
        image: {BUSYBOX}
        imagePullPolicy: Never
        command: ["nc", "-ll", "-p", "9000", "-e", "/bin/sh", "-c", "cat > /dev/null"]
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: payments}}
spec:
  selector: {{app: web}}
  ports: [{{name: https, port: 443, targetPort: 8443}}, {{name: sink, port: 9000, targetPort: 9000}}]
"#
    );
    match cluster_ip {
        None => backend,
        // One short connection a second to the Service's cluster IP (busybox nc: its static
        // wget crashes resolving even an address without NSS libraries in the image).
        Some(ip) => format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: shop, labels: {{app: client}}}}
spec:
  containers:
  - name: client
    image: {BUSYBOX}
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "while true; do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} 443; sleep 1; done"]
"#
        ),
    }
}

/// One connection of [`STREAM_LINES`] lines to the Service's sink, started when it is applied
/// (not with the client: a slow Prometheus check before the update must not outlast it).
fn streamer(ip: &str) -> String {
    format!(
        r#"# One connection of {STREAM_LINES} lines, one each 100 ms, through a rolling update of the agent;
# 3 s after the pod starts, so the count is about the handover alone.
apiVersion: v1
kind: Pod
metadata: {{name: streamer, namespace: shop, labels: {{app: streamer}}}}
spec:
  containers:
  - name: streamer
    image: {BUSYBOX}
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "sleep 3; i=0; while [ $i -lt {STREAM_LINES} ]; do echo $i; sleep 0.1; i=$((i+1)); done | nc {ip} 9000; sleep 3600"]
"#
    )
}

/// The agent's record lines so far (its flow log is stdout: `kubectl logs`).
fn agent_records() -> Vec<Value> {
    kubectl(
        &[
            "logs",
            "-n",
            "observer",
            "daemonset/observer",
            "-c",
            "agent",
        ],
        None,
    )
    .unwrap_or_default()
    .lines()
    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
    .filter(|v| v["schema"].is_string())
    .collect()
}

/// The BPF links the agent's process holds (its fds' `link_id`, /proc/PID/fdinfo): its tc(x)
/// attachments on the node's interfaces, its cgroup hooks, its tracepoint.
fn agent_links(pid: i32) -> BTreeSet<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return BTreeSet::new();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("link_id:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect()
}

/// Every BPF link the kernel has, as bpftool lists them.
fn live_links() -> anyhow::Result<BTreeSet<u64>> {
    let out = Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()
        .context("bpftool link show")?;
    let v: Value = serde_json::from_slice(&out.stdout).context("bpftool's JSON")?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["id"].as_u64())
        .collect())
}

/// What the kernel says the agent's process runs with: capabilities, seccomp, no_new_privs, and
/// its root mount.
fn check_confinement(pid: i32) -> anyhow::Result<()> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    let eff = u64::from_str_radix(&field("CapEff:"), 16)?;
    if eff != AGENT_CAPS {
        bail!(
            "the agent's effective capabilities are {eff:#x}, not BPF|PERFMON|NET_ADMIN ({AGENT_CAPS:#x})"
        );
    }
    if field("Seccomp:") != "2" {
        bail!(
            "the agent runs without its seccomp filter (Seccomp: {})",
            field("Seccomp:")
        );
    }
    if field("NoNewPrivs:") != "1" {
        bail!("allowPrivilegeEscalation: false did not set no_new_privs");
    }
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    let root = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .context("no root mount")?;
    if !root
        .split_whitespace()
        .nth(5)
        .is_some_and(|o| o.split(',').any(|x| x == "ro"))
    {
        bail!("the agent's root filesystem is writable: {root}");
    }
    println!(
        "    agent pid {pid}: CapEff {eff:#x} (BPF, PERFMON, NET_ADMIN), seccomp filter, no_new_privs, read-only root"
    );
    Ok(())
}

/// The names under /run/netns.
fn named_netns() -> BTreeSet<String> {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Up, check, down (with `keep`, left up if the check fails).
pub fn run(keep: bool) -> anyhow::Result<()> {
    if !crate::image::exists(crate::image::IMAGE) {
        bail!(
            "{} is not built: `cargo xtask image` first",
            crate::image::IMAGE
        );
    }
    let netns_before = named_netns();
    cluster::up()?;
    let res = check();
    if res.is_err() {
        for what in ["pods -A -o wide", "events -A"] {
            let args: Vec<&str> = what.split(' ').collect();
            println!(
                "kubectl get {what}:\n{}",
                kubectl(&[&["get"], &args[..]].concat(), None).unwrap_or_default()
            );
        }
    }
    if keep && res.is_err() {
        println!("the cluster is left up: `cargo xtask cluster down` removes it");
        return res;
    }
    let cleaned = cluster::down().and_then(|()| {
        let left: Vec<_> = named_netns().difference(&netns_before).cloned().collect();
        if left.is_empty() {
            Ok(())
        } else {
            bail!("network namespaces left in /run/netns: {left:?}")
        }
    });
    res.and(cleaned)
}

/// The pid of the agent once the DaemonSet's rollout is done.
fn agent_rolled_out() -> anyhow::Result<i32> {
    kubectl(
        &[
            "-n",
            "observer",
            "rollout",
            "status",
            "daemonset/observer",
            "--timeout=180s",
        ],
        None,
    )?;
    cluster::node_process("observer").context("no agent process on the node")
}

/// The first of the agent's records `pred` accepts, waited for at most `secs`.
fn wait_record(what: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    let mut found = None;
    wait_for(
        what,
        secs,
        || {
            found = agent_records().into_iter().find(|r| pred(r));
            found.is_some()
        },
        || {
            format!(
                "records: {:#?}",
                agent_records().iter().take(5).collect::<Vec<_>>()
            )
        },
    )?;
    Ok(found.expect("found"))
}

fn check() -> anyhow::Result<()> {
    let deploy = crate::workspace_root().join("deploy/base");
    let deploy = deploy.to_string_lossy();
    let links = deploy_agent(&deploy)?;
    let vip = service_call_recorded()?;
    prometheus_scrapes()?;
    let links = rolling_update(&vip, &links)?;
    delete_leaves_nothing(&deploy, &links)
}

/// `kubectl apply -k deploy/base`: the agent ready and confined; the BPF links it holds.
fn deploy_agent(deploy: &str) -> anyhow::Result<BTreeSet<u64>> {
    println!("==> kubectl apply -k deploy/base");
    kubectl(&["apply", "-k", deploy], None)?;
    let pid = agent_rolled_out()?;
    check_confinement(pid)?;
    let links = agent_links(pid);
    let live = live_links()?;
    if links.is_empty() || !links.is_subset(&live) {
        bail!("the agent holds links {links:?}, the kernel lists {live:?}");
    }
    println!(
        "    the agent holds {} BPF links (tcx, cgroup, tracepoint)",
        links.len()
    );
    Ok(links)
}

/// The backends, their Service and a client calling it: the agent's record names all three
/// from the API, and its /metrics answers on the node IP. The Service's cluster IP.
fn service_call_recorded() -> anyhow::Result<String> {
    println!("==> a Deployment (2 replicas on 8443), Service web 443 -> 8443, a client pod");
    kubectl(&["apply", "-f", "-"], Some(&app(None)))?;
    kubectl(
        &[
            "-n",
            "payments",
            "rollout",
            "status",
            "deployment/web",
            "--timeout=120s",
        ],
        None,
    )?;
    let vip = kubectl(
        &[
            "-n",
            "payments",
            "get",
            "service",
            "web",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
        None,
    )?;
    let backends: BTreeSet<String> = kubectl(
        &[
            "-n",
            "payments",
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ],
        None,
    )?
    .split_whitespace()
    .map(str::to_owned)
    .collect();
    kubectl(&["apply", "-f", "-"], Some(&app(Some(&vip))))?;

    let r = wait_record("the agent's record of client -> web", 120, |r| {
        r["final"] == true
            && r["pre_dnat"]["dst"] == vip.as_str()
            && r["pre_dnat"]["dport"] == 443
            && r["post_dnat"]["dport"] == 8443
            && r["src_pod"]["name"] == "client"
    })?;
    let backend = r["dst_pod"]["name"].as_str().unwrap_or_default();
    if r["src_pod"]["namespace"] != "shop"
        || r["service"]["name"] != "web"
        || r["service"]["namespace"] != "payments"
        || r["service"]["target_port"] != 8443
        || !backends.contains(backend)
        || r["translated"] != true
    {
        bail!("the record does not name client, Service and backend from the API: {r:#}");
    }
    println!(
        "    record: shop/client {}:{} -> payments/web {vip}:443 -> payments/{backend} {}:8443, DNAT on {}",
        r["pre_dnat"]["src"].as_str().unwrap_or("?"),
        r["pre_dnat"]["sport"],
        r["post_dnat"]["dst"].as_str().unwrap_or("?"),
        r["translation"]["node"].as_str().unwrap_or("?"),
    );
    let metrics = on_node(&[
        "curl",
        "-s",
        "-m",
        "5",
        &format!("http://{NODE_IP}:9464/metrics"),
    ]);
    if !metrics.contains("observer_flows") {
        bail!("the agent's /metrics on the node IP answered no observer_ metrics");
    }
    Ok(vip)
}

/// `kubectl delete -k deploy/base`: the agent gone and none of `links` left in the kernel.
fn delete_leaves_nothing(deploy: &str, links: &BTreeSet<u64>) -> anyhow::Result<()> {
    println!("==> kubectl delete -k deploy/base");
    kubectl(&["delete", "-k", deploy, "--wait=true"], None)?;
    wait_for(
        "the agent's process gone",
        60,
        || cluster::node_process("observer").is_none(),
        String::new,
    )?;
    let left: Vec<_> = live_links()?.intersection(links).copied().collect();
    if !left.is_empty() {
        bail!("links left attached after the DaemonSet was deleted: {left:?}");
    }
    println!(
        "    none of its {} links is left in the kernel",
        links.len()
    );
    Ok(())
}

/// A packet count of a record's hop.
fn hop_packets(r: &Value, point: &str, dir: &str) -> u64 {
    r["hops"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| h["point"] == point && h["dir"] == dir)
        .and_then(|h| h["packets"].as_u64())
        .unwrap_or(0)
}

/// Run `argv` in the node's network namespace; its stdout ("" if it could not run).
fn on_node(argv: &[&str]) -> String {
    Command::new("ip")
        .args(["netns", "exec", NS])
        .args(argv)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// conntrack's entries of connections to port 9000 (the streamer's).
fn conntrack_9000() -> String {
    on_node(&["conntrack", "-L", "-p", "tcp", "--dport", "9000"])
}

/// conntrack's own count of the client's packets of its connection from `sport` to port 9000
/// (`nf_conntrack_acct`, on in the node), or None before it ended.
fn conntrack_packets(sport: u64) -> Option<u64> {
    let text = conntrack_9000();
    let line = text.lines().find(|l| {
        (l.contains("TIME_WAIT") || l.contains("CLOSE")) && l.contains(&format!(" sport={sport} "))
    })?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("packets="))
        .and_then(|n| n.parse().ok())
}

fn seconds_between(from: &Value, to: &Value) -> anyhow::Result<f64> {
    let t = |v: &Value| -> anyhow::Result<std::time::SystemTime> {
        Ok(humantime::parse_rfc3339(v.as_str().context("a time")?)?)
    };
    Ok(t(to)?.duration_since(t(from)?)?.as_secs_f64())
}

/// A new image tag rolled out while the streamer's connection is open: the new agent adopts the
/// counters the old one left pinned, so its final record counts every packet conntrack counted
/// but those of the gap it reports. The old agent's links are gone; the new agent's are
/// returned.
fn rolling_update(vip: &str, old_links: &BTreeSet<u64>) -> anyhow::Result<BTreeSet<u64>> {
    println!("==> a rolling update of the DaemonSet (observer:dev2) during a 60-s connection");
    let old_pid = cluster::node_process("observer").context("no agent")?;
    kubectl(&["apply", "-f", "-"], Some(&streamer(vip)))?;
    wait_for(
        "the streamer's connection established",
        60,
        || conntrack_9000().contains("ESTABLISHED"),
        String::new,
    )?;
    std::thread::sleep(std::time::Duration::from_secs(8));
    cluster::tag_agent_image("docker.io/library/observer:dev2")?;
    kubectl(
        &[
            "-n",
            "observer",
            "set",
            "image",
            "daemonset/observer",
            "agent=observer:dev2",
            "seccomp-profile=observer:dev2",
        ],
        None,
    )?;
    let pid = agent_rolled_out()?;
    if pid == old_pid {
        bail!("the agent's process did not change in the rolling update");
    }
    let links = agent_links(pid);
    let live = live_links()?;
    if let Some(l) = old_links.intersection(&live).next() {
        bail!("the old agent's link {l} is still attached after the rolling update");
    }
    let r = wait_record(
        "the new agent's final record of the streamer's connection",
        120,
        |r| {
            r["final"] == true
                && r["pre_dnat"]["dst"] == vip
                && r["pre_dnat"]["dport"] == 9000
                && r["src_pod"]["name"] == "streamer"
        },
    )?;
    let counted = hop_packets(&r, "pod_ingress", "orig");
    let sport = r["pre_dnat"]["sport"].as_u64().unwrap_or(0);
    let truth = conntrack_packets(sport).context("conntrack has no ended entry of the streamer")?;
    let gap = &r["gap"];
    if gap["previous_agent"] != "stopped" {
        bail!("the record says no handover from a stopped agent: {r:#}");
    }
    let gap_s = seconds_between(&gap["from"], &gap["to"])?;
    // One line each 100 ms, plus a few ACKs and a late start.
    let at_most_missed = (gap_s / 0.1).ceil() as u64 + 4;
    if counted > truth || truth - counted > at_most_missed {
        bail!(
            "pod_ingress counted {counted} client packets, conntrack {truth}: more than the {at_most_missed} the {gap_s:.1}-s gap can explain"
        );
    }
    println!(
        "    counted {counted} of conntrack's {truth} client packets across the update; the {} missed are in the record's {gap_s:.1}-s gap",
        truth - counted
    );
    Ok(links)
}

/// Debian's Prometheus with the shipped `deploy/prometheus/scrape.yml`, its resolver pointed at
/// the stand-in cluster DNS, finds the agent through the headless Service and scrapes it.
fn prometheus_scrapes() -> anyhow::Result<()> {
    println!("==> Prometheus with deploy/prometheus/scrape.yml (cluster DNS: a stand-in)");
    let ips = kubectl(
        &[
            "-n",
            "observer",
            "get",
            "endpoints",
            "observer-metrics",
            "-o",
            "jsonpath={.subsets[*].addresses[*].ip}",
        ],
        None,
    )?;
    let ips: Vec<std::net::Ipv4Addr> = ips
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    if ips.is_empty() {
        bail!("the headless Service observer-metrics has no endpoint");
    }
    let _dns = crate::cluster_dns::serve(NS, NODE_IP.parse()?, vec![(METRICS_NAME.into(), ips)])?;
    let resolv = cluster::state("resolv.conf");
    std::fs::write(&resolv, format!("nameserver {NODE_IP}\n"))?;
    let config = crate::workspace_root().join("deploy/prometheus/scrape.yml");
    let mut prometheus = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{NS}"))
        .args(["unshare", "-m", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount --bind {} /etc/resolv.conf && exec prometheus --config.file={} --storage.tsdb.path={} --web.listen-address=127.0.0.1:9090",
            resolv.display(),
            config.display(),
            cluster::state("prometheus").display()
        ))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(cluster::state("prometheus.log"))?)
        .spawn()
        .context("starting prometheus (Debian package prometheus)")?;
    let query = |q: &str| -> Value {
        let out = on_node(&[
            "curl",
            "-s",
            "-G",
            "--data-urlencode",
            &format!("query={q}"),
            "http://127.0.0.1:9090/api/v1/query",
        ]);
        serde_json::from_str::<Value>(&out).unwrap_or(Value::Null)["data"]["result"].clone()
    };
    // The shipped config scrapes every 30 s, the first time within one interval.
    let res = wait_for(
        "Prometheus scraping the agent",
        100,
        || {
            query("up{job=\"observer\"}")
                .as_array()
                .is_some_and(|r| r.iter().any(|s| s["value"][1] == "1"))
        },
        || std::fs::read_to_string(cluster::state("prometheus.log")).unwrap_or_default(),
    )
    .and_then(|()| {
        let series = query(&format!(
            "observer_interfaces_attached{{job=\"observer\",service=\"{METRICS_NAME}\"}}"
        ));
        match series.as_array().map_or(0, Vec::len) {
            0 => bail!("Prometheus has no observer_interfaces_attached from the agent"),
            n => {
                println!("    up{{job=\"observer\"}} = 1; {n} observer_interfaces_attached series, service={METRICS_NAME}");
                Ok(())
            }
        }
    });
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    res
}
