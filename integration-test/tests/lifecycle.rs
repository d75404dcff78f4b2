//! Agent lifecycle against the real kernel: flush and detach on SIGTERM, clsact mode cleanup,
//! and the errors a user can act on.

use std::os::unix::fs::MetadataExt as _;
use std::{
    collections::HashSet,
    process::{Command, Output},
    time::Duration,
};

use integration_test::*;
use serde_json::Value;

const OUR_PROGRAMS: [&str; 10] = [
    "tc_pod_ingress",
    "tc_pod_egress",
    "tc_uplink_ingress",
    "tc_uplink_egress",
    "sock_connect4",
    "sock_connect6",
    "sock_sendmsg4",
    "sock_sendmsg6",
    "sock_egress",
    "trace_kfree_skb",
];

fn bpftool_json(args: &[&str]) -> Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("bpftool");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]))
}

/// Kernel links (tcx and cgroup) whose program is one of ours, by bpftool, independently of aya.
fn our_links() -> usize {
    let progs = bpftool_json(&["prog", "show"]);
    let ours: HashSet<u64> = progs
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| OUR_PROGRAMS.iter().any(|n| p["name"] == *n))
        .filter_map(|p| p["id"].as_u64())
        .collect();
    bpftool_json(&["link", "show"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|id| ours.contains(&id)))
        .count()
}

/// The kernel frees a link shortly after its process exits: wait for the count to settle.
fn settled_links() -> usize {
    let mut last = our_links();
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(100));
        let now = our_links();
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

#[test]
fn sigterm_flushes_open_flows_and_leaves_no_attachment() {
    let mut lab = lab("stop", None);
    let before = settled_links();
    // A long idle timeout: the UDP flow is still open when the agent is told to stop.
    lab.start_agent("node-a", &["--idle-timeout", "10m", "--no-pin"])
        .unwrap();
    // 2 uplink + 2 per pod veth (2 pods on node-a) + 5 cgroup + the drop tracepoint.
    assert_eq!(
        our_links() - before,
        2 + 4 + 5 + 1,
        "tcx, cgroup and tracing links while running"
    );
    let s = lab
        .client("pod-a", &["--to", "100.64.0.53:53", "--proto", "udp"])
        .unwrap();
    assert_eq!(s["ok"], 1);
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        lab.records("node-a").unwrap().is_empty(),
        "nothing written before the flow ends"
    );

    let (code, took) = lab.stop_agent("node-a").unwrap();
    assert_eq!(code, Some(0));
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    let recs = lab.records("node-a").unwrap();
    let dns = find(&recs, |r| r["pre_dnat"]["dst"] == "100.64.0.53");
    assert_eq!(
        dns.len(),
        1,
        "the open flow was flushed at shutdown: {recs:?}"
    );
    assert_eq!(dns[0]["final"], true);
    assert_eq!(
        settled_links(),
        before,
        "no tcx, cgroup or tracing link left behind"
    );
    let log = std::fs::read_to_string(lab.dir.join("agent-node-a.log")).unwrap();
    assert!(log.contains("SIGTERM: flushing and detaching"), "{log}");
}

/// Records of one connection (by client port), in the order they were written.
fn of_port(recs: &[Value], sport: &Value) -> Vec<Value> {
    recs.iter()
        .filter(|r| r["pre_dnat"]["sport"] == *sport)
        .cloned()
        .collect()
}

#[test]
fn a_restart_or_a_crash_keeps_the_counters_of_open_flows() {
    let bpffs = BpfFs::mount("restart");
    let pin = bpffs.path.join("node-a");
    let pin_arg = pin.to_string_lossy().into_owned();
    let mut lab = lab("rst", None);
    let before = settled_links();
    let args = [
        "--pin-dir",
        pin_arg.as_str(),
        "--flush-interval",
        "1s",
        "--poll-interval",
        "200ms",
    ];
    let held = |secs: &str| {
        [
            "--to",
            "100.64.0.10:443",
            "--hold",
            secs,
            "--timeout",
            "20s",
        ]
        .map(str::to_owned)
    };
    lab.start_agent("node-a", &args).unwrap();
    let links_running = our_links() - before;

    // Connection 1 is open (handshake done, request not yet sent) when agent 1 gets SIGTERM.
    let c1 = lab
        .spawn_client("pod-a", &held("7s").each_ref().map(String::as_str))
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let (code, _) = lab.stop_agent("node-a").unwrap();
    assert_eq!(code, Some(0));
    let at_stop = lab.records("node-a").unwrap();
    let checkpoint = at_stop
        .iter()
        .rfind(|r| r["pre_dnat"]["dport"] == 443)
        .cloned()
        .unwrap_or_else(|| panic!("agent 1 wrote the open connection at SIGTERM: {at_stop:?}"));
    assert_eq!(checkpoint["final"], false, "{checkpoint}");
    let sport1 = checkpoint["pre_dnat"]["sport"].clone();
    assert!(pin.join("FLOWS").exists(), "the flow map stays pinned");
    assert!(
        pin.join("CT_ORIG").exists(),
        "and its keys' conntrack tuples"
    );
    // Owners and modes as docs/config.md says: root's alone.
    for (path, want) in [(pin.clone(), 0o700), (pin.join("FLOWS"), 0o600)] {
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(
            (meta.uid(), meta.mode() & 0o777),
            (0, want),
            "{}",
            path.display()
        );
    }
    let log_mode = std::fs::metadata(lab.dir.join("node-a.jsonl"))
        .unwrap()
        .mode()
        & 0o777;
    assert_eq!(
        log_mode & 0o027,
        0,
        "the flow log is not for others: {log_mode:o}"
    );

    // Agent 2 adopts it; connection 2 opens under agent 2, which then crashes.
    lab.start_agent("node-a", &args).unwrap();
    assert_eq!(
        settled_links() - before,
        links_running,
        "the new agent attaches once; nothing of the old one is left"
    );
    let adopted = metric(
        &lab.metrics("node-a").unwrap(),
        "observer_flows_adopted_total",
        &[],
    );
    assert!(
        adopted >= Some(4.0),
        "4 observations of connection 1: {adopted:?}"
    );
    let c2 = lab
        .spawn_client("pod-a", &held("5s").each_ref().map(String::as_str))
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let before_crash = lab.records("node-a").unwrap();
    lab.kill_agent("node-a").unwrap();
    let interim2 = before_crash
        .iter()
        .rfind(|r| r["pre_dnat"]["dport"] == 443 && r["pre_dnat"]["sport"] != sport1)
        .cloned()
        .unwrap_or_else(|| {
            panic!("agent 2 wrote connection 2 while it was open: {before_crash:?}")
        });
    let sport2 = interim2["pre_dnat"]["sport"].clone();

    // Agent 3 adopts both and sees them close.
    lab.start_agent("node-a", &args).unwrap();
    for c in [c1, c2] {
        let s = client_summary(c).unwrap();
        assert_eq!(s["ok"], 1, "{s}");
    }
    let recs = lab
        .wait_records("node-a", WAIT, |rs| {
            [&sport1, &sport2].iter().all(|p| {
                rs.iter()
                    .any(|r| r["final"] == true && r["pre_dnat"]["sport"] == **p)
            })
        })
        .unwrap();
    validate_schema(&recs);
    for (sport, earlier, how) in [
        (&sport1, &checkpoint, "SIGTERM"),
        (&sport2, &interim2, "SIGKILL"),
    ] {
        let conn = of_port(&recs, sport);
        let last = conn.last().unwrap();
        assert_eq!(last["final"], true, "{how}: {conn:?}");
        assert_eq!(
            conn.iter().filter(|r| r["final"] == true).count(),
            1,
            "one final record across agents ({how}): {conn:?}"
        );
        assert_eq!(
            last["first_seen"], earlier["first_seen"],
            "the final record starts where the kernel started counting ({how})"
        );
        assert_eq!(last["state"], "closed", "SYN seen before the {how}: {last}");
        assert_eq!(
            last["translation"]["evidence"], "conntrack",
            "the adopted keys' conntrack tuples were pinned with them ({how}): {last}"
        );
        let (p_then, p_now) = (
            earlier["totals"]["packets"].as_u64().unwrap(),
            last["totals"]["packets"].as_u64().unwrap(),
        );
        assert!(
            p_now > p_then,
            "packets before the {how} ({p_then}) are in the final count ({p_now})"
        );
    }
    // Each record of an adopted connection says when nobody counted: agent 2's interim records
    // of connection 1 the window after agent 1's orderly stop, the final ones the window after
    // agent 2's crash.
    let gap_of = |r: &Value| {
        let g = &r["gap"];
        assert!(g["from"].as_str() <= g["to"].as_str(), "{g}");
        g["previous_agent"].as_str().map(str::to_owned)
    };
    assert!(
        of_port(&recs, &sport1)
            .iter()
            .any(|r| gap_of(r).as_deref() == Some("stopped")),
        "agent 2 marked the gap after agent 1's SIGTERM"
    );
    for sport in [&sport1, &sport2] {
        let last = of_port(&recs, sport).last().cloned().unwrap();
        assert_eq!(gap_of(&last).as_deref(), Some("crashed"), "{last}");
    }
    assert!(
        of_port(&recs, &sport2)
            .iter()
            .any(|r| r.get("gap").is_none()),
        "connection 2 before the crash had no gap"
    );
    lab.stop_agent("node-a").unwrap();
    assert_eq!(settled_links(), before, "no link left after the last agent");
}

fn qdiscs(lab: &LabRun) -> String {
    let out = lab
        .exec("node-a", &["tc", "qdisc", "show", "dev", "eth0"])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn clsact_mode_works_and_removes_the_qdisc_it_added() {
    let mut lab = lab("cls", None);
    assert!(!qdiscs(&lab).contains("clsact"));
    lab.start_agent("node-a", &["--tc-mode", "clsact", "--idle-timeout", "2s"])
        .unwrap();
    assert!(qdiscs(&lab).contains("clsact"), "{}", qdiscs(&lab));
    let f = lab
        .exec("node-a", &["tc", "filter", "show", "dev", "eth0", "egress"])
        .unwrap();
    assert!(String::from_utf8_lossy(&f.stdout).contains("tc_uplink_egress"));
    let out = curl_web(&lab, "pod-a", 5);
    assert!(out.status.success());
    let recs = lab
        .wait_records("node-a", WAIT, |rs| {
            rs.iter()
                .any(|r| r["final"] == true && r["post_dnat"]["dport"] == 8443)
        })
        .unwrap();
    let r = find(&recs, |r| r["post_dnat"]["dport"] == 8443)[0];
    assert_eq!(r["pre_dnat"]["dport"], 443);
    assert_eq!(lab.stop_agent("node-a").unwrap().0, Some(0));
    assert!(
        !qdiscs(&lab).contains("clsact"),
        "clsact left behind: {}",
        qdiscs(&lab)
    );

    // clsact filters are not links: a crashed agent's stay, and the next agent removes them.
    let filters = |lab: &LabRun| {
        let f = lab
            .exec("node-a", &["tc", "filter", "show", "dev", "eth0", "egress"])
            .unwrap();
        String::from_utf8_lossy(&f.stdout)
            .matches("tc_uplink_egress")
            .count()
    };
    let clsact = ["--tc-mode", "clsact", "--no-pin"];
    lab.start_agent("node-a", &clsact).unwrap();
    lab.kill_agent("node-a").unwrap();
    assert_eq!(
        filters(&lab),
        1,
        "the crashed agent's filter is still there"
    );
    lab.start_agent("node-a", &clsact).unwrap();
    assert_eq!(filters(&lab), 1, "attached once after the restart");
    let log = std::fs::read_to_string(lab.dir.join("agent-node-a.log")).unwrap();
    assert!(
        log.contains("removed tc filter tc_uplink_egress on eth0, left by a previous agent"),
        "{log}"
    );
    assert_eq!(lab.stop_agent("node-a").unwrap().0, Some(0));
    assert_eq!(filters(&lab), 0);
}

fn agent(args: &[&str]) -> Output {
    Command::new(bin())
        .arg("agent")
        .args(args)
        .output()
        .unwrap()
}

fn one_error_line(out: &Output, want: &str) {
    assert!(!out.status.success(), "expected failure");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(want), "stderr should say {want:?}: {err}");
    assert_eq!(
        err.trim().lines().filter(|l| l.contains("ERROR")).count(),
        1,
        "{err}"
    );
}

#[test]
fn errors_a_user_can_act_on() {
    let mut lab = lab("err", None);
    let ns = lab.ns("node-a");
    one_error_line(
        &agent(&[
            "--netns",
            &ns,
            "--uplink",
            "nope0",
            "--metrics-addr",
            "127.0.0.1:0",
        ]),
        "interface nope0 does not exist",
    );
    one_error_line(
        &agent(&[
            "--netns",
            &ns,
            "--cgroup",
            "/tmp",
            "--metrics-addr",
            "127.0.0.1:0",
        ]),
        "/tmp is not a cgroup v2 directory",
    );
    one_error_line(
        &agent(&[
            "--netns",
            "no-such-netns-here",
            "--metrics-addr",
            "127.0.0.1:0",
        ]),
        "entering network namespace /run/netns/no-such-netns-here",
    );
    one_error_line(
        &agent(&["--netns", &ns, "--pin-dir", "/tmp/observer-not-bpffs"]),
        "/tmp/observer-not-bpffs is not on a bpf filesystem",
    );
    // The port is taken by a running agent in the same namespace.
    let bpffs = BpfFs::mount("err");
    let pin = bpffs.path.join("node-a").to_string_lossy().into_owned();
    lab.start_agent("node-a", &["--pin-dir", &pin]).unwrap();
    one_error_line(
        &agent(&[
            "--netns",
            &ns,
            "--metrics-addr",
            "127.0.0.1:9464",
            "--no-pin",
        ]),
        "cannot listen on 127.0.0.1:9464",
    );
    // Its pin directory too: a second agent waits for it, then says whose it is.
    let t0 = std::time::Instant::now();
    one_error_line(
        &agent(&["--netns", &ns, "--pin-dir", &pin, "--pin-wait", "1s"]),
        &format!("another agent still owns {pin} after 1s"),
    );
    assert!(t0.elapsed() >= Duration::from_secs(1), "it waited first");
    // Missing capabilities: root without CAP_BPF/CAP_PERFMON/CAP_SYS_ADMIN in its bounding set
    // (`ip netns exec` enters the namespace first, since setns itself needs CAP_SYS_ADMIN).
    let out = Command::new("ip")
        .args(["netns", "exec", &ns, "setpriv"])
        .args([
            "--bounding-set",
            "-bpf,-sys_admin,-perfmon",
            "--inh-caps",
            "-bpf,-sys_admin,-perfmon",
        ])
        .arg(bin())
        .args([
            "agent",
            "--no-socket-hooks",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    one_error_line(&out, "missing capabilities: CAP_BPF, CAP_PERFMON");
    // Malformed flags are clap's: exit code 2 and a usage hint.
    let out = agent(&["--flush-interval", "banana"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("examples: 500ms, 10s, 1m"));
}

#[test]
fn lab_up_refuses_a_second_time_and_down_is_idempotent() {
    let lab = lab("idem", None);
    let out = Command::new(bins().lab)
        .args(["up", "--name", &lab.name])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already up"));
    let out = Command::new(bins().lab)
        .args(["status", "--name", &lab.name])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains("payments/web") && status.contains("100.64.0.10:443"),
        "{status}"
    );
    let bad = Command::new(bins().lab)
        .args(["up", "--name", "Bad-Name"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("use 1-12 of [a-z0-9]"));
    let name = lab.name.clone();
    drop(lab);
    let out = Command::new(bins().lab)
        .args(["down", "--name", &name])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed 0 namespaces"));
    let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&left.stdout).contains(&format!("{name}-")));
}

#[test]
fn long_connections_get_interim_records_before_the_final_one() {
    let mut lab = lab("long", None);
    lab.start_agent(
        "node-a",
        &[
            "--flush-interval",
            "1s",
            "--idle-timeout",
            "2s",
            "--poll-interval",
            "200ms",
        ],
    )
    .unwrap();
    // Each connection stays open 3 s before its request.
    let s = lab
        .client(
            "pod-a",
            &[
                "--to",
                "100.64.0.10:443",
                "--hold",
                "3s",
                "--timeout",
                "10s",
            ],
        )
        .unwrap();
    assert_eq!(s["ok"], 1, "{s}");
    let recs = lab
        .wait_records("node-a", WAIT, |rs| {
            rs.iter()
                .any(|r| r["final"] == true && r["pre_dnat"]["dport"] == 443)
        })
        .unwrap();
    let conn: Vec<_> = find(&recs, |r| r["pre_dnat"]["dport"] == 443);
    let interim: Vec<_> = conn.iter().filter(|r| r["final"] == false).collect();
    assert!(
        !interim.is_empty(),
        "an interim record while the connection was open: {conn:?}"
    );
    assert_ne!(interim[0]["state"], "closed", "still open then: {conn:?}");
    let last = conn.last().unwrap();
    assert_eq!(last["final"], true);
    assert_eq!(last["state"], "closed");
    assert!(last["totals"]["packets"].as_u64() >= interim[0]["totals"]["packets"].as_u64());
    assert_eq!(conn.iter().filter(|r| r["final"] == true).count(), 1);
}

#[test]
fn a_full_flow_map_is_counted_not_fatal() {
    let mut lab = lab("full", None);
    // Room for a handful of flow keys only: 20 connections need 4 keys each on node-a.
    lab.start_agent(
        "node-a",
        &[
            "--max-flows",
            "8",
            "--idle-timeout",
            "1s",
            "--poll-interval",
            "200ms",
        ],
    )
    .unwrap();
    let s = lab
        .client(
            "pod-a",
            &[
                "--to",
                "100.64.0.10:443",
                "--count",
                "20",
                "--concurrency",
                "20",
                "--hold",
                "500ms",
            ],
        )
        .unwrap();
    assert_eq!(s["ok"], 20, "observing never breaks traffic: {s}");
    std::thread::sleep(Duration::from_millis(800));
    let m = lab.metrics("node-a").unwrap();
    assert!(
        metric(&m, "observer_map_full_total", &[("map", "flows")]).unwrap() > 0.0,
        "{m}"
    );
    assert_eq!(lab.http("node-a", "/healthz").unwrap().trim(), "ok");
    // The records of connections that ran while the map was full say theirs may lack a hop.
    let recs = lab
        .wait_records("node-a", WAIT, |rs| {
            rs.iter().any(|r| r["incomplete"][0] == "flow_map_full")
        })
        .unwrap();
    validate_schema(&recs);
    assert_eq!(lab.stop_agent("node-a").unwrap().0, Some(0));
}

/// The DaemonSet grants CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN only: with exactly those the
/// agent attaches everything and records the story.
#[test]
fn runs_with_only_bpf_perfmon_and_net_admin() {
    let lab = lab("caps", None);
    let bpffs = BpfFs::mount("caps");
    let pin = bpffs.path.join("node-a");
    let flow_log = lab.dir.join("caps.jsonl");
    let caps = "-all,+bpf,+perfmon,+net_admin";
    let mut agent = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.ns("node-a")))
        .args(["setpriv", "--reuid", "0"])
        .args([
            "--bounding-set",
            caps,
            "--inh-caps",
            caps,
            "--ambient-caps",
            caps,
        ])
        .arg(bin())
        .args([
            "agent",
            "--node",
            "node-a",
            "--idle-timeout",
            "2s",
            "--metrics-addr",
            "127.0.0.1:9464",
        ])
        .arg("--flow-log")
        .arg(&flow_log)
        .arg("--pin-dir")
        .arg(&pin)
        .stderr(std::fs::File::create(lab.dir.join("caps.log")).unwrap())
        .spawn()
        .unwrap();
    let ready = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        lab.http("node-a", "/readyz").is_ok()
    });
    let log = || std::fs::read_to_string(lab.dir.join("caps.log")).unwrap();
    assert!(ready, "not ready: {}", log());
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.id())).unwrap();
    assert!(status.contains("CapEff:\t000000c000001000"), "{status}");
    assert!(curl_web(&lab, "pod-a", 5).status.success());
    let found = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(200));
        std::fs::read_to_string(&flow_log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("\"comm\":\"curl\"") && l.contains("\"dport\":8443"))
    });
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    assert_eq!(agent.wait().unwrap().code(), Some(0), "{}", log());
    assert!(found, "no record with the socket and the DNAT: {}", log());
    assert!(
        pin.join("FLOWS").exists(),
        "pinning needs no capability beyond these: {}",
        log()
    );
}

/// A tmpfs of its own for the flow log, unmounted and removed however the test ends.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(name: &str, size: &str) -> SmallDisk {
        let dir = std::env::temp_dir().join(format!("observer-disk-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs at {}", dir.display());
        SmallDisk(dir)
    }

    /// Fill it to the last byte.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = vec![0x5au8; 4096];
        while std::io::Write::write_all(&mut f, &block).is_ok() {}
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_full_disk_loses_records_counted_and_rotation_is_followed() {
    let mut lab = lab("disk", None);
    let disk = SmallDisk::mount(&lab.name, "512k");
    let log = disk.0.join("flows.jsonl");
    // The agent writes where the lab reads: its flow log path points into the small disk.
    std::os::unix::fs::symlink(&log, lab.dir.join("node-a.jsonl")).unwrap();
    lab.start_agent(
        "node-a",
        &["--idle-timeout", "1s", "--poll-interval", "200ms"],
    )
    .unwrap();
    // Whole records in the log; a line cut short by the full disk is no record.
    let finals = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r["final"] == true)
            .count()
    };
    let wait_final = |path: &std::path::Path, more_than: usize| {
        let deadline = std::time::Instant::now() + WAIT;
        while finals(path) <= more_than {
            assert!(std::time::Instant::now() < deadline, "no new final record");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert!(curl_web(&lab, "pod-a", 5).status.success());
    wait_final(&log, 0);

    // Disk full: what cannot be written is counted, and the agent goes on.
    disk.fill();
    let lost = |lab: &LabRun| {
        metric(
            &lab.metrics("node-a").unwrap(),
            "observer_records_lost_total",
            &[("reason", "write_failed")],
        )
        .unwrap_or(0.0)
    };
    let deadline = std::time::Instant::now() + WAIT;
    while lost(&lab) < 1.0 {
        assert!(std::time::Instant::now() < deadline, "no loss was counted");
        assert!(curl_web(&lab, "pod-a", 5).status.success());
        std::thread::sleep(Duration::from_millis(1500));
    }
    // Room again: writing resumes by itself, and every whole line is a record.
    std::fs::remove_file(disk.0.join("filler")).unwrap();
    let before = finals(&log);
    assert!(curl_web(&lab, "pod-a", 5).status.success());
    wait_final(&log, before);
    let text = std::fs::read_to_string(&log).unwrap();
    let bad = text
        .lines()
        .filter(|l| !l.is_empty() && serde_json::from_str::<Value>(l).is_err())
        .count();
    assert!(
        bad <= 1,
        "at most the one line cut short by the full disk: {bad}"
    );
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["final"], true);

    // logrotate's default: renamed away, then a new file at the same path.
    std::fs::rename(&log, disk.0.join("flows.jsonl.1")).unwrap();
    assert!(curl_web(&lab, "pod-a", 5).status.success());
    wait_final(&log, 0);
    // SIGHUP reopens and does not stop the agent.
    let pid = lab.agents[0].child.id() as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        lab.agents[0].child.try_wait().unwrap().is_none(),
        "still running"
    );
    assert_eq!(lab.stop_agent("node-a").unwrap().0, Some(0));
    drop(disk);
}
