//! Real-kernel integration tests of observer (in `tests/`) and what they share: a lab per test
//! (unique name, torn down on drop, also on failure), the built programs, schema validation,
//! metric parsing, and a real kube-apiserver (`kube`).
//!
//! The tests drive the built binaries (`observer`, `observer-lab`) as a user would; `cargo xtask
//! test` builds them first. Like aya's `integration-test` crate, this one is a workspace member
//! of its own, so neither product depends on the other or on test code.

pub mod api_faults;
pub mod kube;
pub use observer_lab::otlp_receiver as otlp;

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

pub use observer_lab::drive::{
    Bins, CtEntry, LabRun, client_summary, parse_conntrack, stdout_of, tuple_of, unique_name,
};
use serde_json::Value;

/// The programs under test: beside the test binary's `deps/` directory, where cargo builds the
/// workspace's binaries for the same profile.
pub fn bins() -> Bins {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>");
    let bins = Bins::in_dir(dir);
    for b in [&bins.agent, &bins.lab] {
        assert!(
            b.exists(),
            "{} is not built: run the tests through `cargo xtask test`",
            b.display()
        );
    }
    bins
}

/// `observer`, the agent and explain.
pub fn bin() -> PathBuf {
    bins().agent
}

pub fn require_root() {
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "real-kernel tests load eBPF programs and create network namespaces: run them as root (`cargo xtask test`)"
    );
}

/// A fresh lab with the built-in story (or `config`), agents not started.
pub fn lab(prefix: &str, config: Option<&str>) -> LabRun {
    require_root();
    let name = unique_name(prefix);
    let dir = std::env::temp_dir().join(format!("observer-test-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    LabRun::up(&bins(), &name, config, &dir).expect("lab up")
}

/// A lab with an agent on each node; flows end after `idle` without packets.
pub fn lab_with_agents(prefix: &str, idle: &str) -> LabRun {
    lab_with_agents_in(prefix, idle, None)
}

/// The same, from a lab description of the test's own.
pub fn lab_with_agents_in(prefix: &str, idle: &str, config: Option<&str>) -> LabRun {
    lab_with_agent_args(prefix, idle, config, &[])
}

/// The same, with more agent flags.
pub fn lab_with_agent_args(
    prefix: &str,
    idle: &str,
    config: Option<&str>,
    extra: &[&str],
) -> LabRun {
    let mut l = lab(prefix, config);
    for node in ["node-a", "node-b"] {
        let names = l.names_file().to_string_lossy().into_owned();
        let mut args = vec![
            "--idle-timeout",
            idle,
            "--poll-interval",
            "200ms",
            "--names",
            &names,
        ];
        args.extend_from_slice(extra);
        l.start_agent(node, &args).expect("agent starts");
    }
    l
}

/// Add pod `pod` with `ip` on `node` of the lab (`observer-lab add-pod`); returns the name of its
/// node-side veth.
pub fn add_pod(lab: &LabRun, pod: &str, node: &str, ip: &str) -> String {
    let added = lab_cmd(&[
        "add-pod", pod, "--name", &lab.name, "--node", node, "--ip", ip,
    ]);
    added
        .split("node iface ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .expect("add-pod names the node-side veth")
        .to_owned()
}

/// An Ethernet frame to the broadcast address with `vlan_tags` (each a TPID; VIDs 100, 101, ...)
/// before `ethertype` and `payload`.
pub fn ethernet(vlan_tags: &[u16], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    for (i, tpid) in vlan_tags.iter().enumerate() {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&(100 + i as u16).to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Where lab agents serve /flows in tests (`--flows-addr`, inside each node's namespace).
pub const FLOWS_ADDR: &str = "127.0.0.1:9465";

/// A /flows token file (mode 0600, beside the built binaries) for `--flows-token-file` and
/// `explain --token-file`.
pub fn flows_token_file() -> String {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = bins().agent.with_file_name("lab-flows-token");
    if !path.exists() {
        // Test binaries run side by side: each writes its own file and renames it into place.
        let tmp = path.with_extension(std::process::id().to_string());
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"lab-flows-token-0123456789\n"))
            .expect("writing the token file");
        std::fs::rename(&tmp, &path).expect("placing the token file");
    }
    path.to_string_lossy().into_owned()
}

pub fn t(src: &str, sport: u16, dst: &str, dport: u16) -> (String, u16, String, u16) {
    (src.to_owned(), sport, dst.to_owned(), dport)
}

/// Validate every record against docs/flow-schema.json.
pub fn validate_schema(records: &[Value]) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/flow-schema.json");
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("schema file"))
        .expect("schema JSON");
    let validator = jsonschema::validator_for(&schema).expect("valid JSON Schema");
    assert!(!records.is_empty(), "no records to validate");
    for r in records {
        let errors: Vec<String> = validator.iter_errors(r).map(|e| e.to_string()).collect();
        assert!(
            errors.is_empty(),
            "record violates the schema: {errors:?}\n{r}"
        );
    }
}

/// `promtool check metrics` on an exposition; returns its complaints (empty when clean).
pub fn promtool_check(text: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is installed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Value of the sample `name{labels...}` (labels given must all match; others are ignored).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let rest = l.strip_prefix(name).unwrap_or("x");
            rest.starts_with(" ") || rest.starts_with("{")
        })
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

pub fn find(records: &[Value], pred: impl Fn(&Value) -> bool) -> Vec<&Value> {
    records.iter().filter(|r| pred(r)).collect()
}

pub fn hop<'a>(r: &'a Value, point: &str, dir: &str) -> Option<&'a Value> {
    r["hops"]
        .as_array()?
        .iter()
        .find(|h| h["point"] == point && h["dir"] == dir)
}

/// curl `http://100.64.0.10:443/` (the story's Service) from `pod`, with a timeout in seconds.
pub fn curl_web(lab: &LabRun, pod: &str, timeout_s: u32) -> std::process::Output {
    lab.exec(
        pod,
        &[
            "curl",
            "-sS",
            "-m",
            &timeout_s.to_string(),
            "http://100.64.0.10:443/",
        ],
    )
    .expect("curl runs")
}

/// Run `observer ARGS...`, which must succeed; returns its stdout.
/// `observer explain ARGS...` run inside `node` (where the agents' /flows listen); must
/// succeed. Its stdout.
pub fn explain_in(lab: &LabRun, node: &str, args: &[&str]) -> Vec<u8> {
    let bin_path = bin().to_string_lossy().into_owned();
    let argv: Vec<&str> = [bin_path.as_str(), "explain"]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    let out = lab.exec(node, &argv).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The HTTP status of a GET of `url` from inside `node`, with a bearer token if given.
pub fn http_status(lab: &LabRun, node: &str, url: &str, token: Option<&str>) -> String {
    let auth = token.map(|t| format!("Authorization: Bearer {t}"));
    let mut args = vec![
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-m",
        "10",
    ];
    if let Some(a) = &auth {
        args.extend(["-H", a.as_str()]);
    }
    args.push(url);
    let out = lab.exec(node, &args).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn observer(args: &[&str]) -> String {
    run_ok(&bin(), args)
}

/// Run `observer-lab ARGS...`, which must succeed; returns its stdout.
pub fn lab_cmd(args: &[&str]) -> String {
    run_ok(&bins().lab, args)
}

fn run_ok(bin: &std::path::Path, args: &[&str]) -> String {
    stdout_of(bin, args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The default lab description (`lab/story.toml`) with a different kube-proxy mode.
pub fn story_with_load_balancer(mode: &str) -> String {
    let story = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../lab/story.toml"))
        .expect("lab/story.toml");
    let line = "load_balancer = \"iptables\"";
    assert!(story.contains(line), "the story names its kube-proxy mode");
    story.replacen(line, &format!("load_balancer = \"{mode}\""), 1)
}

/// Path of a shipped lab scenario.
pub fn scenario(name: &str) -> String {
    format!(
        "{}/../lab/scenarios/{name}.yaml",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// `observer-lab apply` a policy file to the lab.
pub fn apply(lab: &LabRun, file: &str) {
    lab.lab(&["apply", "--name", &lab.name, file])
        .expect("observer-lab apply");
}

/// Wait until both nodes wrote the final records of an answered request to the story's Service.
pub fn wait_answered(lab: &LabRun) {
    lab.wait_records("node-b", WAIT, |rs| {
        rs.iter().any(|r| {
            r["final"] == true
                && r["post_dnat"]["dport"] == 8443
                && r["totals"]["reply_packets"].as_u64() > Some(0)
        })
    })
    .expect("node-b recorded the answered connection");
    lab.wait_records("node-a", WAIT, |rs| {
        rs.iter()
            .any(|r| r["final"] == true && r["pre_dnat"]["dport"] == 443 && r["state"] == "closed")
    })
    .expect("node-a recorded the answered connection");
}

pub const WAIT: Duration = Duration::from_secs(20);

/// A bpf filesystem of the test's own (each mount is a separate instance), unmounted on drop,
/// also on failure: pins made in it vanish with it.
pub struct BpfFs {
    pub path: PathBuf,
}

impl BpfFs {
    pub fn mount(prefix: &str) -> BpfFs {
        let path = std::env::temp_dir().join(format!("observer-bpffs-{}", unique_name(prefix)));
        std::fs::create_dir_all(&path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mount -t bpf bpf {}", path.display());
        BpfFs { path }
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// `curl -sS URL` from a lab member; it must succeed. Returns the answer (the serving pod's name).
pub fn curl_answer(lab: &LabRun, member: &str, url: &str) -> String {
    let out = lab
        .exec(member, &["curl", "-sS", "-m", "5", url])
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl {url} from {member}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Wait for the one final record of `node` that `pred` selects; returns it and all records.
pub fn one_final(lab: &LabRun, node: &str, pred: impl Fn(&Value) -> bool) -> (Value, Vec<Value>) {
    let is = |r: &Value| r["final"] == true && pred(r);
    let all = lab
        .wait_records(node, WAIT, |rs| rs.iter().any(is))
        .unwrap_or_else(|e| panic!("{node}: {e:#}"));
    let recs = find(&all, is);
    assert_eq!(
        recs.len(),
        1,
        "{node}: one record for the connection: {recs:#?}"
    );
    (recs[0].clone(), all.clone())
}

/// The record's `pre_dnat` is the original tuple of one of conntrack's entries `ct` and its
/// `post_dnat` that entry's reply tuple reversed (SNAT included); returns the entry.
pub fn assert_nat_matches<'a>(ct: &'a [CtEntry], r: &Value) -> &'a CtEntry {
    let pre = tuple_of(&r["pre_dnat"]).expect("pre_dnat");
    let e = ct
        .iter()
        .find(|e| e.orig == pre)
        .unwrap_or_else(|| panic!("no conntrack entry for {pre:?}: {r}"));
    assert_eq!(
        Some(e.reply_reversed()),
        tuple_of(&r["post_dnat"]),
        "post_dnat is conntrack's reply tuple reversed: {r:#}"
    );
    e
}

/// node-b's final record of the connection that left node-a as `post`.
pub fn arrived_on_b(lab: &LabRun, post: &Value) -> Value {
    let t = tuple_of(post);
    one_final(lab, "node-b", |x| tuple_of(&x["post_dnat"]) == t).0
}

/// tcpdump on a node's uplink: what the wire carried, independently of observer's programs.
pub struct WireCapture {
    child: std::process::Child,
    path: PathBuf,
}

impl WireCapture {
    /// Start capturing TCP on `node`'s eth0; gives tcpdump a moment to be ready.
    pub fn start(lab: &LabRun, node: &str) -> WireCapture {
        let path = lab.dir.join(format!("wire-{node}.txt"));
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.ns(node)])
            .args(["tcpdump", "-i", "eth0", "-nn", "-l", "-c", "2000", "tcp"])
            .stdout(std::fs::File::create(&path).expect("capture file"))
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump");
        std::thread::sleep(Duration::from_millis(800));
        WireCapture { child, path }
    }

    /// Stop and return tcpdump's lines.
    pub fn stop(mut self) -> String {
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.path).unwrap_or_default()
    }
}

/// tcpdump's text for a TCP tuple `src.sport > dst.dport` (IPv4).
pub fn wire_text(t: &Value) -> String {
    format!(
        "{}.{} > {}.{}:",
        t["src"].as_str().unwrap_or("?"),
        t["sport"],
        t["dst"].as_str().unwrap_or("?"),
        t["dport"]
    )
}
