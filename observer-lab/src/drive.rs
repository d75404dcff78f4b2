//! Drive a lab and its agents from outside: bring it up, start one agent per node, send
//! traffic from pods, read records, metrics and conntrack, and tear everything down on drop
//! (also when a test fails).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// Metrics/health port of every agent; each listens inside its own node namespace.
pub const AGENT_PORT: u16 = 9464;

pub struct Agent {
    pub node: String,
    pub child: Child,
    pub log: PathBuf,
    pub flow_log: PathBuf,
}

/// Where the two programs are: `observer` (the agent) and `observer-lab`.
#[derive(Clone, Debug)]
pub struct Bins {
    pub agent: PathBuf,
    pub lab: PathBuf,
}

impl Bins {
    /// Both programs in one build directory (`target/release`).
    pub fn in_dir(dir: &Path) -> Bins {
        Bins {
            agent: dir.join("observer"),
            lab: dir.join("observer-lab"),
        }
    }
}

pub struct LabRun {
    pub name: String,
    pub bins: Bins,
    pub dir: PathBuf,
    pub agents: Vec<Agent>,
}

/// A lab name unique to this process and call: `<prefix><pid><n>`, at most 12 characters.
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let mut s = format!("{prefix}{:x}{n:x}", std::process::id() & 0xffff);
    s.truncate(12);
    s
}

fn check(out: Output, what: &str) -> anyhow::Result<Output> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Run `bin ARGS...`, which must succeed; its stdout.
pub fn stdout_of(bin: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    let out = check(out, &format!("{} {args:?}", bin.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One conntrack entry: the original tuple and the reply tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtEntry {
    pub proto: String,
    pub orig: (String, u16, String, u16),
    pub reply: (String, u16, String, u16),
}

impl CtEntry {
    /// The reply tuple turned round: what left the node in the client's direction, NAT done.
    pub fn reply_reversed(&self) -> (String, u16, String, u16) {
        let r = &self.reply;
        (r.2.clone(), r.3, r.0.clone(), r.1)
    }
}

impl LabRun {
    /// `observer-lab up --name NAME [--config FILE]`; `dir` receives logs and records.
    pub fn up(bins: &Bins, name: &str, config: Option<&str>, dir: &Path) -> anyhow::Result<LabRun> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let run = LabRun {
            name: name.to_owned(),
            bins: bins.clone(),
            dir: dir.to_owned(),
            agents: Vec::new(),
        };
        let mut cmd = Command::new(&bins.lab);
        cmd.args(["up", "--name", name]);
        if let Some(text) = config {
            let path = dir.join("lab.toml");
            std::fs::write(&path, text)?;
            cmd.arg("--config").arg(path);
        }
        // From here on, Drop takes the lab down even if `up` failed half way.
        check(cmd.output()?, "observer-lab up")?;
        Ok(run)
    }

    pub fn ns(&self, member: &str) -> String {
        format!("{}-{member}", self.name)
    }

    /// The lab's names file, for `observer agent --names` and `observer explain --names`.
    pub fn names_file(&self) -> PathBuf {
        crate::Lab {
            name: self.name.clone(),
        }
        .names_path()
    }

    /// `observer-lab ARGS...`, checked.
    pub fn lab(&self, args: &[&str]) -> anyhow::Result<Output> {
        check(
            Command::new(&self.bins.lab).args(args).output()?,
            &format!("observer-lab {args:?}"),
        )
    }

    /// Start `observer agent` for `node` and wait until it reports ready.
    pub fn start_agent(&mut self, node: &str, extra: &[&str]) -> anyhow::Result<()> {
        let log = self.dir.join(format!("agent-{node}.log"));
        let flow_log = self.dir.join(format!("{node}.jsonl"));
        let child = Command::new(&self.bins.agent)
            .args(["agent", "--netns", &self.ns(node), "--node", node])
            .arg("--flow-log")
            .arg(&flow_log)
            .args(["--metrics-addr", &format!("127.0.0.1:{AGENT_PORT}")])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Appended: a restarted agent's log follows the previous one's.
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)?,
            )
            .spawn()
            .context("starting observer agent")?;
        self.agents.push(Agent {
            node: node.to_owned(),
            child,
            log: log.clone(),
            flow_log,
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self
                .http(node, "/readyz")
                .is_ok_and(|b| b.contains("ready"))
            {
                return Ok(());
            }
            let agent = self.agents.last_mut().expect("just pushed");
            if let Some(status) = agent.child.try_wait()? {
                bail!(
                    "agent for {node} exited with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent for {node} not ready after 20 s: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// GET a path from a node's agent (inside the node namespace).
    pub fn http(&self, node: &str, path: &str) -> anyhow::Result<String> {
        let out = self.exec(
            node,
            &[
                "curl",
                "-sf",
                "-m",
                "5",
                &format!("http://127.0.0.1:{AGENT_PORT}{path}"),
            ],
        )?;
        Ok(String::from_utf8_lossy(&check(out, "curl")?.stdout).into_owned())
    }

    pub fn metrics(&self, node: &str) -> anyhow::Result<String> {
        self.http(node, "/metrics")
    }

    /// Run a command in a lab pod or node.
    pub fn exec(&self, member: &str, args: &[&str]) -> anyhow::Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(member)])
            .args(args)
            .output()
            .with_context(|| format!("ip netns exec {} {args:?}", self.ns(member)))
    }

    /// `observer-lab client` from a pod; returns its JSON summary.
    pub fn client(&self, pod: &str, args: &[&str]) -> anyhow::Result<Value> {
        client_summary(self.spawn_client(pod, args)?)
    }

    /// `observer-lab client` from a pod, in the background (for connections held open while
    /// the test does something else); [`client_summary`] waits for its JSON summary.
    pub fn spawn_client(&self, pod: &str, args: &[&str]) -> anyhow::Result<Child> {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(pod)])
            .arg(&self.bins.lab)
            .arg("client")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting observer-lab client")
    }

    /// SIGTERM the agent of `node` and wait for it; returns (exit code, time to exit).
    pub fn stop_agent(&mut self, node: &str) -> anyhow::Result<(Option<i32>, Duration)> {
        self.signal_agent(node, libc::SIGTERM)
    }

    /// SIGKILL the agent of `node` (a crash) and wait for it.
    pub fn kill_agent(&mut self, node: &str) -> anyhow::Result<()> {
        self.signal_agent(node, libc::SIGKILL).map(|_| ())
    }

    /// Signal the latest agent started for `node` and wait for it to exit.
    fn signal_agent(&mut self, node: &str, signal: i32) -> anyhow::Result<(Option<i32>, Duration)> {
        let a = self
            .agents
            .iter_mut()
            .rev()
            .find(|a| a.node == node)
            .with_context(|| format!("no agent for {node}"))?;
        let t0 = Instant::now();
        if let Some(s) = a.child.try_wait()? {
            // Already gone (and reaped): its pid may be someone else's by now.
            return Ok((s.code(), Duration::ZERO));
        }
        // SAFETY: plain kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(a.child.id() as i32, signal) };
        let deadline = t0 + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = a.child.try_wait()? {
                break Some(s);
            }
            if Instant::now() > deadline {
                let _ = a.child.kill();
                break a.child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok((status.and_then(|s| s.code()), t0.elapsed()))
    }

    /// SIGTERM every agent; returns (node, exit code, time to exit).
    pub fn stop_agents(&mut self) -> anyhow::Result<Vec<(String, Option<i32>, Duration)>> {
        let mut nodes: Vec<String> = self.agents.iter().map(|a| a.node.clone()).collect();
        nodes.dedup();
        nodes
            .into_iter()
            .map(|n| self.stop_agent(&n).map(|(c, d)| (n, c, d)))
            .collect()
    }

    /// All records a node's agent wrote.
    pub fn records(&self, node: &str) -> anyhow::Result<Vec<Value>> {
        let path = self.dir.join(format!("{node}.jsonl"));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("bad JSON line: {l}")))
            .collect()
    }

    /// Wait until `pred` holds for the records of `node` (agents write when flows end).
    pub fn wait_records(
        &self,
        node: &str,
        timeout: Duration,
        pred: impl Fn(&[Value]) -> bool,
    ) -> anyhow::Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let recs = self.records(node)?;
            if pred(&recs) {
                return Ok(recs);
            }
            if Instant::now() > deadline {
                bail!(
                    "records of {node} did not reach the expected state within {timeout:?}; have {}:\n{}",
                    recs.len(),
                    recs.iter()
                        .map(|r| r.to_string())
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `conntrack -L` in a node, parsed.
    pub fn conntrack(&self, node: &str) -> anyhow::Result<Vec<CtEntry>> {
        let out = check(self.exec(node, &["conntrack", "-L"])?, "conntrack -L")?;
        Ok(parse_conntrack(&String::from_utf8_lossy(&out.stdout)))
    }
}

impl Drop for LabRun {
    fn drop(&mut self) {
        for a in &mut self.agents {
            if a.child.try_wait().ok().flatten().is_none() {
                // SAFETY: plain kill(2) on our own child.
                unsafe { libc::kill(a.child.id() as i32, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(5);
                while a.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = a.child.kill();
                let _ = a.child.wait();
            }
        }
        let _ = Command::new(&self.bins.lab)
            .args(["down", "--name", &self.name])
            .stdout(Stdio::null())
            .status();
    }
}

/// Wait for a client started by [`LabRun::spawn_client`]; its JSON summary.
pub fn client_summary(child: Child) -> anyhow::Result<Value> {
    let out = child
        .wait_with_output()
        .context("waiting for the lab client")?;
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("client output: {}", String::from_utf8_lossy(&out.stderr)))
}

/// Parse `conntrack -L` lines: `tcp 6 118 TIME_WAIT src=.. dst=.. sport=.. dport=.. src=.. ...`.
pub fn parse_conntrack(text: &str) -> Vec<CtEntry> {
    text.lines()
        .filter_map(|l| {
            let proto = l.split_whitespace().next()?.to_owned();
            let kv: Vec<(&str, &str)> = l
                .split_whitespace()
                .filter_map(|w| w.split_once('='))
                .collect();
            let get = |key: &str, nth: usize| {
                kv.iter()
                    .filter(|(k, _)| *k == key)
                    .nth(nth)
                    .map(|(_, v)| (*v).to_owned())
            };
            let tuple = |n: usize| -> Option<(String, u16, String, u16)> {
                Some((
                    get("src", n)?,
                    get("sport", n)?.parse().ok()?,
                    get("dst", n)?,
                    get("dport", n)?.parse().ok()?,
                ))
            };
            Some(CtEntry {
                proto,
                orig: tuple(0)?,
                reply: tuple(1)?,
            })
        })
        .collect()
}

/// The `{src, sport, dst, dport}` object of a record as a tuple.
pub fn tuple_of(v: &Value) -> Option<(String, u16, String, u16)> {
    Some((
        v.get("src")?.as_str()?.to_owned(),
        v.get("sport")?.as_u64()? as u16,
        v.get("dst")?.as_str()?.to_owned(),
        v.get("dport")?.as_u64()? as u16,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conntrack_lines_parse() {
        let text = "tcp      6 118 TIME_WAIT src=10.244.1.10 dst=100.64.0.10 sport=40000 dport=443 src=10.244.2.10 dst=10.244.1.10 sport=8443 dport=40000 [ASSURED] mark=0 use=1\n\
                    udp      17 28 src=10.244.1.10 dst=100.64.0.53 sport=5000 dport=53 src=10.244.2.53 dst=10.244.1.10 sport=5353 dport=5000 mark=0 use=1\n\
                    conntrack v1.4.7 (conntrack-tools): 2 flow entries have been shown.\n";
        let e = parse_conntrack(text);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].proto, "tcp");
        assert_eq!(
            e[0].orig,
            ("10.244.1.10".into(), 40000, "100.64.0.10".into(), 443)
        );
        assert_eq!(
            e[0].reply,
            ("10.244.2.10".into(), 8443, "10.244.1.10".into(), 40000)
        );
        assert_eq!(e[1].reply.1, 5353);
    }

    #[test]
    fn unique_names_fit_the_lab_limit() {
        let a = unique_name("t");
        let b = unique_name("t");
        assert_ne!(a, b);
        assert!(
            a.len() <= 12
                && a.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
    }
}
