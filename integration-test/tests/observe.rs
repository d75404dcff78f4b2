//! `observer observe`: the live view, from the lab's agents (streamed /flows) and flow logs
//! (followed across rotation), filtered; checked against the flow logs themselves.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::fd::AsRawFd as _,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use integration_test::{
    FLOWS_ADDR, LabRun, bin, curl_web, flows_token_file, lab_with_agent_args, lab_with_agents,
    metric,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);
const VIP: &str = "100.64.0.10";

/// `observer observe ARGS` (inside `node`'s namespace if given), its stdout lines arriving on a
/// channel.
struct Observe {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Observe {
    fn start(lab: &LabRun, node: Option<&str>, args: &[&str]) -> Observe {
        let mut cmd = match node {
            Some(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &lab.ns(n)]).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        let mut child = cmd
            .arg("observe")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("observe starts");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Observe {
            child,
            lines,
            seen: vec![],
        }
    }

    /// The first line from now on that `pred` accepts (every line is kept in `seen`).
    fn wait(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return l;
                    }
                }
                Err(_) => panic!("observe printed no {what}; it printed: {:#?}", self.seen),
            }
        }
    }

    /// Stop it; its stderr.
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let out = self.child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

fn json(l: &str) -> Value {
    serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))
}

/// A final record of a connection to the Service from client port other than those in `not`.
fn final_to_vip(v: &Value, not: &[u64]) -> bool {
    v["final"] == true
        && v["pre_dnat"]["dst"] == VIP
        && v["pre_dnat"]["dport"] == 443
        && !not.contains(&v["pre_dnat"]["sport"].as_u64().unwrap_or(0))
}

/// Agent flags the lab helpers give, plus /flows.
fn flows_args(token: &str) -> Vec<&str> {
    vec!["--flows-addr", FLOWS_ADDR, "--flows-token-file", token]
}

#[test]
fn observe_follows_an_agent_live_filtered_and_again_after_it_restarts() {
    let token = flows_token_file();
    let mut lab = lab_with_agent_args("obsa", "1s", None, &flows_args(&token));
    let url = format!("http://{FLOWS_ADDR}/flows");
    let mut obs = Observe::start(
        &lab,
        Some("node-a"),
        &[
            "-f",
            &url,
            "--token-file",
            &token,
            "--service",
            &format!("{VIP}:443"),
            "--verdict",
            "forwarded,open",
            "-o",
            "json",
        ],
    );
    assert!(curl_web(&lab, "pod-a", 5).status.success());
    let first = json(&obs.wait("final record of the curl", |l| final_to_vip(&json(l), &[])));
    assert_eq!(first["node"], "node-a");
    assert_eq!(first["translated"], true);
    assert_eq!(first["post_dnat"]["dport"], 8443);
    // It is the agent's own record, as its flow log has it.
    let logged = lab.records("node-a").unwrap();
    assert!(logged.contains(&first), "not in the flow log: {first:#}");

    // The agent restarts (a rolling update): observe follows the new one by itself.
    lab.stop_agent("node-a").unwrap();
    let names = lab.names_file().to_string_lossy().into_owned();
    let mut args = vec![
        "--idle-timeout",
        "1s",
        "--poll-interval",
        "200ms",
        "--names",
        &names,
    ];
    args.extend(flows_args(&token));
    lab.start_agent("node-a", &args).unwrap();
    let port = first["pre_dnat"]["sport"].as_u64().unwrap();
    assert!(curl_web(&lab, "pod-a", 5).status.success());
    let again = json(&obs.wait("record after the restart", |l| {
        final_to_vip(&json(l), &[port])
    }));
    assert_ne!(again["start"], first["start"]);
    // Everything it printed passed its filters.
    for l in &obs.seen {
        let v = json(l);
        assert_eq!(v["pre_dnat"]["dst"], VIP, "{v:#}");
        assert!(v["drop"].is_null(), "{v:#}");
    }
    let stderr = obs.stop();
    assert!(stderr.contains("following again"), "{stderr}");
}

/// Records of `files` that `pred` accepts, read here independently of observe.
fn independent(files: &[std::path::PathBuf], pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
        .filter(|v| pred(v))
        .collect()
}

fn in_pod_range(ip: &Value) -> bool {
    ip.as_str().is_some_and(|s| s.starts_with("10.244."))
}

#[test]
fn observe_follows_a_rotated_flow_log_and_selects_what_an_independent_reading_does() {
    let mut lab = lab_with_agents("obsf", "1s");
    let log_b = lab.dir.join("node-b.jsonl");
    // Follows the receiving node's log from the root namespace: files need no network.
    let mut obs = Observe::start(
        &lab,
        None,
        &[
            "-f",
            &log_b.to_string_lossy(),
            "--namespace",
            "shop",
            "--port",
            "8443",
            "--observed-as",
            "!sender",
        ],
    );
    assert!(curl_web(&lab, "pod-a", 5).status.success());
    let line = obs.wait("compact line of the curl", |l| {
        l.contains(":8443") && l.contains("FORWARDED")
    });
    assert!(line.contains(" node-b "), "{line}");

    // logrotate's default: renamed away; the agent creates the file again, observe follows it.
    let rotated = lab.dir.join("node-b.jsonl.1");
    std::fs::rename(&log_b, &rotated).unwrap();
    let before = obs.seen.len();
    assert!(curl_web(&lab, "pod-a", 5).status.success());
    obs.wait("a line from the new file", |l| {
        l.contains(":8443") && l.contains("FORWARDED")
    });
    assert!(obs.seen.len() > before);
    let stderr = obs.stop();
    assert!(stderr.contains("rotated"), "{stderr}");
    // Let both agents close what is open, then stop them: the logs hold still while observe
    // and this test read them.
    std::thread::sleep(Duration::from_secs(3));
    lab.stop_agents().unwrap();

    // Without -f: every file, filters against a reading of the logs done here.
    let files = [lab.dir.join("node-a.jsonl"), rotated.clone(), log_b.clone()];
    let paths: Vec<String> = files
        .iter()
        .map(|f| f.to_string_lossy().into_owned())
        .collect();
    let observe = |extra: &[&str]| -> Vec<Value> {
        let mut args = vec!["observe", "-o", "json"];
        args.extend(paths.iter().map(String::as_str));
        args.extend_from_slice(extra);
        let out = Command::new(bin()).args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(json)
            .collect()
    };
    let tuples = |v: &Value| -> Vec<Value> {
        ["pre_dnat", "post_dnat", "wire_view"]
            .iter()
            .map(|k| v[k].clone())
            .filter(|t| !t.is_null())
            .collect()
    };
    let got = observe(&[
        "--ip",
        "10.244.0.0/16",
        "--protocol",
        "tcp",
        "--verdict",
        "forwarded",
    ]);
    let want = independent(&files, |v| {
        v["proto"] == "TCP"
            && v["drop"].is_null()
            && v["final"] == true
            && tuples(v)
                .iter()
                .any(|t| in_pod_range(&t["src"]) || in_pod_range(&t["dst"]))
    });
    assert!(
        want.len() >= 4,
        "two curls on two nodes at least: {}",
        want.len()
    );
    assert_eq!(got.len(), want.len());
    let not_a = observe(&["--node", "!node-a"]);
    assert!(!not_a.is_empty() && not_a.iter().all(|v| v["node"] == "node-b"));
    assert_eq!(
        not_a.len(),
        independent(&files, |v| v["node"] == "node-b").len()
    );
    // The latest by time across files.
    let last = observe(&["--last", "1"]);
    let mut all = independent(&files, |_| true);
    all.sort_by(|a, b| a["time"].as_str().cmp(&b["time"].as_str()));
    assert_eq!(last, all[all.len() - 1..]);
}

fn node_a_metric(lab: &LabRun, name: &str) -> f64 {
    metric(&lab.metrics("node-a").unwrap(), name, &[]).unwrap_or(0.0)
}

/// Wait until node-a's metric `name` is at least `at_least`.
fn wait_metric(lab: &LabRun, name: &str, at_least: f64, what: &str) {
    let deadline = Instant::now() + WAIT;
    while node_a_metric(lab, name) < at_least {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Connect to the agent's /flows inside `ns`, ask to follow, then read nothing.
fn stalled_follower(ns: &str, token: &str) -> std::net::TcpStream {
    let (tx, rx) = mpsc::channel();
    let (path, token) = (format!("/run/netns/{ns}"), token.to_owned());
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("netns file");
        // SAFETY: setns on this thread only, with a namespace file we hold open.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        // A small window, so the agent's side fills soon.
        s.set_recv_buffer_size(4096).unwrap();
        s.connect(&FLOWS_ADDR.parse::<std::net::SocketAddr>().unwrap().into())
            .unwrap();
        let mut s: std::net::TcpStream = s.into();
        let tok = std::fs::read_to_string(&token).unwrap();
        write!(
            s,
            "GET /flows?follow=1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
            tok.trim()
        )
        .unwrap();
        tx.send(s).unwrap();
    });
    rx.recv_timeout(WAIT).expect("connected")
}

#[test]
fn a_follower_that_stops_reading_is_dropped_and_counted_and_one_that_reads_is_not() {
    let token = flows_token_file();
    // A short queue per follower, so a small storm overruns the stalled one.
    let mut agent_args = flows_args(&token);
    agent_args.extend(["--flows-follow-queue", "256"]);
    let lab = lab_with_agent_args("obss", "1s", None, &agent_args);
    let url = format!("http://{FLOWS_ADDR}/flows");
    let reader = Observe::start(
        &lab,
        Some("node-a"),
        &[
            "-f",
            &url,
            "--token-file",
            &token,
            "-o",
            "json",
            "--verdict",
            "forwarded",
        ],
    );
    let mut stalled = stalled_follower(&lab.ns("node-a"), &token);
    wait_metric(
        &lab,
        "observer_flows_followers",
        2.0,
        "two followers counted",
    );
    // More records than the stalled client's queue and socket buffers hold.
    let storm = lab
        .exec(
            "pod-a",
            &[
                &integration_test::bins().lab.to_string_lossy(),
                "storm",
                "--to",
                &format!("{VIP}:443"),
                "--rate",
                "300",
                "--duration",
                "5s",
            ],
        )
        .unwrap();
    assert!(
        storm.status.success(),
        "{}",
        String::from_utf8_lossy(&storm.stderr)
    );
    let made: Value = serde_json::from_slice(&storm.stdout).unwrap();
    assert!(
        made["answered"].as_u64().unwrap() > 1000,
        "{}",
        made["answered"]
    );
    let dropped = || node_a_metric(&lab, "observer_flows_followers_dropped_total");
    wait_metric(
        &lab,
        "observer_flows_followers_dropped_total",
        1.0,
        "the stalled follower dropped",
    );
    // Its connection is closed: what was in flight, then the end.
    stalled
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0usize;
    loop {
        match stalled.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => panic!("the stalled follower's connection stayed open ({total} bytes): {e}"),
        }
    }
    // The reading follower kept up: it got every final record the agent wrote for the storm.
    assert!(
        made["answered"].as_u64().unwrap() > 1000,
        "{}",
        made["answered"]
    );
    // Read while the agent writes: a last line being written is not counted yet.
    let log_a = [lab.dir.join("node-a.jsonl")];
    let logged = || independent(&log_a, |v| final_to_vip(v, &[])).len();
    let mut written = logged();
    loop {
        std::thread::sleep(Duration::from_secs(3));
        let now = logged();
        if now == written {
            break;
        }
        written = now;
    }
    let deadline = Instant::now() + WAIT;
    let mut finals = 0;
    while finals < written {
        let l = reader
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()));
        let Ok(l) = l else {
            panic!(
                "the reading follower got {finals} of the {written} records written; followers dropped: {}",
                dropped()
            );
        };
        if final_to_vip(&json(&l), &[]) {
            finals += 1;
        }
    }
    assert_eq!(dropped(), 1.0, "only the stalled one was dropped");
    let stderr = reader.stop();
    assert!(
        !stderr.contains("following again"),
        "a stream that keeps up is never cut, however long it lasts: {stderr}"
    );
}

/// A process killed when the test ends, also by a failed assertion.
struct Stopped(Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The newcomer's path: agents started with `--lab NAME` are found by `observe --lab NAME` and
/// `explain --lab NAME` from the host, nobody typing an address, a namespace or a token.
#[test]
fn observe_and_explain_find_the_labs_agents_by_the_labs_name() {
    let mut lab = integration_test::lab("olab", None);
    let name = lab.name.clone();
    // The lab's own OTLP receiver in node-a, printing what node-a's agent exports.
    let mut receiver = Stopped(
        Command::new(&integration_test::bins().lab)
            .args(["otlp-receiver", "--name", &name, "--node", "node-a"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("otlp-receiver starts"),
    );
    let mut said = String::new();
    BufReader::new(receiver.0.stderr.take().unwrap())
        .read_line(&mut said)
        .unwrap();
    assert!(said.contains("receiver on 127.0.0.1:4317"), "{said}");
    let (tx, exported) = mpsc::channel();
    let out = receiver.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    for node in ["node-a", "node-b"] {
        let mut args = vec![
            "--lab",
            &name,
            "--idle-timeout",
            "1s",
            "--poll-interval",
            "200ms",
        ];
        if node == "node-a" {
            args.extend(["--otlp-endpoint", "http://127.0.0.1:4317"]);
        }
        lab.start_agent(node, &args).expect("agent starts");
    }
    let mut obs = Observe::start(
        &lab,
        None,
        &["-f", "--lab", &name, "--namespace", "shop", "-o", "json"],
    );
    assert!(curl_web(&lab, "pod-a", 5).status.success());
    // Both nodes' records of the connection, named from the lab's names file.
    let a = json(&obs.wait("node-a's final record", |l| {
        let v = json(l);
        v["node"] == "node-a" && final_to_vip(&v, &[])
    }));
    let port = a["pre_dnat"]["sport"].clone();
    let of_b = |l: &str| {
        let v = json(l);
        v["node"] == "node-b" && v["final"] == true && v["post_dnat"]["sport"] == port
    };
    // The nodes' records come in either order.
    let b = match obs.seen.iter().find(|l| of_b(l)) {
        Some(l) => json(l),
        None => json(&obs.wait("node-b's final record", of_b)),
    };
    assert_eq!(a["src_pod"]["name"], "pod-a", "{a:#}");
    assert_eq!(b["dst_pod"]["name"], "pod-b", "{b:#}");
    // The agent streams a record to /flows as it hands it to its file writer (a thread of its
    // own): the file may have it a moment later.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !lab.records("node-b").unwrap().contains(&b) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(lab.records("node-b").unwrap().contains(&b));
    let stderr = obs.stop();
    for node in ["node-a", "node-b"] {
        assert!(
            stderr.contains(&format!("agent on {node}: http://127.0.0.1:9465/flows")),
            "{stderr}"
        );
    }

    // The same record reached the OTLP receiver, whole.
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let l = exported
            .recv_timeout(left)
            .expect("node-a's record reached the OTLP receiver");
        if serde_json::from_str::<Value>(&l).is_ok_and(|v| v == a) {
            break;
        }
    }
    drop(receiver);

    let out =
        integration_test::observer(&["explain", "--lab", &name, "--service", "100.64.0.10:443"]);
    // Both nodes' records stitched, pods named from the lab's names file.
    assert!(out.contains("TCP connection from shop/pod-a"), "{out}");
    assert!(out.contains("uplink_ingress on node-b"), "{out}");
    assert!(
        out.contains(&format!("10.244.1.10:{port} -> 100.64.0.10:443")),
        "{out}"
    );

    // Without the lab's token /flows is shut, as any agent's.
    let status = integration_test::http_status(&lab, "node-a", "http://127.0.0.1:9465/flows", None);
    assert_eq!(status, "401");
    // An unknown node or lab is refused in one line.
    let wrong = std::process::Command::new(integration_test::bin())
        .args(["agent", "--lab", &name, "--node", "node-z"])
        .output()
        .unwrap();
    assert_eq!(wrong.status.code(), Some(2));
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        err.contains("has no node \"node-z\" (its nodes: node-a, node-b)"),
        "{err}"
    );
}
