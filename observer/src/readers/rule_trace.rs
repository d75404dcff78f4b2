//! Which netfilter rule dropped a connection, from the kernel's own trace (opt-in:
//! `--trace-drop-rules`).
//!
//! On a netfilter drop, the next packets from the same client address to the same backend and
//! port are marked for nftables tracing (`meta nftrace set 1`, in a table of the agent's own just
//! before the filter table, removed right after), and `nft monitor trace` reports every rule
//! they meet (kernel `net/netfilter/nf_tables_trace.c`). The rule whose verdict is drop is named
//! with its chain and its comment, where kube-proxy and Calico write the Service or the policy.
//! The agent's table only sets the trace mark: it has no verdict of its own. One trace at a time,
//! each target at most once a minute. Works for nftables rules and for iptables-nft ones (whose
//! comments `iptables -S` shows); the legacy iptables backend has no such trace.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Write as _},
    net::IpAddr,
    process::{Command, Stdio},
    sync::mpsc as std_mpsc,
    time::{Duration, Instant},
};

use observer_common::{DropEvent, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};
use tokio::sync::mpsc;

use super::KernelEvent;
use crate::{correlate::tuple::addr, record::DropRule};

/// How long a trace waits for the next packet of the target.
const TRACE_FOR: Duration = Duration::from_secs(5);
/// A target traced once is not traced again for this long.
const AGAIN_AFTER: Duration = Duration::from_secs(60);
const TABLE: &str = "observer_drop_trace";

/// What to trace: the client's address to the backend's address and port, as the dropped packet
/// carried them (the client's port changes from one attempt to the next).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub dport: u16,
}

impl Target {
    pub fn of(ev: &DropEvent) -> Target {
        Target {
            proto: ev.proto,
            src: addr(ev.family, &ev.src),
            dst: addr(ev.family, &ev.dst),
            dport: ev.dport,
        }
    }

    /// The nft match for it.
    fn matcher(&self) -> String {
        let fam = if self.src.is_ipv4() { "ip" } else { "ip6" };
        let l4 = match self.proto {
            IPPROTO_TCP | IPPROTO_UDP => format!(
                "meta l4proto {} th dport {}",
                if self.proto == IPPROTO_TCP {
                    "tcp"
                } else {
                    "udp"
                },
                self.dport
            ),
            IPPROTO_ICMP => "meta l4proto icmp".to_owned(),
            IPPROTO_ICMPV6 => "meta l4proto ipv6-icmp".to_owned(),
            p => format!("meta l4proto {p}"),
        };
        format!("{fam} saddr {} {fam} daddr {} {l4}", self.src, self.dst)
    }
}

/// Hands targets to the tracing thread; full or busy means not traced (counted).
#[derive(Clone)]
pub struct RuleTracer {
    tx: std_mpsc::SyncSender<Target>,
}

impl RuleTracer {
    /// Start the tracing thread; named rules go to `events`.
    pub fn start(events: mpsc::Sender<KernelEvent>) -> RuleTracer {
        let (tx, rx) = std_mpsc::sync_channel(16);
        std::thread::Builder::new()
            .name("rule-trace".into())
            .spawn(move || run(rx, events))
            .expect("spawn the rule tracing thread");
        RuleTracer { tx }
    }

    /// Ask for the rule that drops `ev`'s packets; false if the tracer is busy.
    pub fn request(&self, ev: &DropEvent) -> bool {
        self.tx.try_send(Target::of(ev)).is_ok()
    }
}

fn run(rx: std_mpsc::Receiver<Target>, events: mpsc::Sender<KernelEvent>) {
    let mut recent: HashMap<Target, Instant> = HashMap::new();
    let mut warned = false;
    while let Ok(t) = rx.recv() {
        recent.retain(|_, at| at.elapsed() < AGAIN_AFTER);
        if recent.contains_key(&t) {
            continue;
        }
        recent.insert(t.clone(), Instant::now());
        let outcome = match trace(&t) {
            Ok(Some(rule)) => {
                log::info!("{} -> {}:{} is dropped by {rule}", t.src, t.dst, t.dport);
                if events
                    .blocking_send(KernelEvent::DropRule { target: t, rule })
                    .is_err()
                {
                    return;
                }
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = outcome
            && !std::mem::replace(&mut warned, true)
        {
            log::warn!("tracing which rule drops a connection failed (said once): {e:#}");
        }
    }
}

fn nft(script: &str) -> anyhow::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("running nft (install nftables): {e}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Mark the target's next packets for tracing, read the trace until a rule drops one, and take
/// the mark away again.
fn trace(t: &Target) -> anyhow::Result<Option<DropRule>> {
    let mut monitor = Command::new("nft")
        .args(["monitor", "trace"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("running nft monitor trace: {e}"))?;
    let stdout = monitor.stdout.take().expect("piped");
    let (lines_tx, lines) = std_mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let m = t.matcher();
    // The mark goes on after DNAT (prerouting's, and output's at -100) and before any filter
    // chain at priority 0: forward and input see the backend already, output from -95 on.
    let installed = nft(&format!(
        "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n\
         chain forward {{ type filter hook forward priority -300; {m} meta nftrace set 1; }}\n\
         chain input {{ type filter hook input priority -300; {m} meta nftrace set 1; }}\n\
         chain output {{ type filter hook output priority -95; {m} meta nftrace set 1; }}\n}}\n"
    ));
    let found = installed.map(|_| {
        let deadline = Instant::now() + TRACE_FOR;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(hit) = TraceLine::parse(&line).filter(TraceLine::drops) {
                        break Some(hit);
                    }
                }
                Err(_) => break None,
            }
        }
    });
    let _ = monitor.kill();
    let _ = monitor.wait();
    let _ = nft(&format!("delete table inet {TABLE}\n"));
    Ok(found?.map(|hit| hit.named()))
}

/// One line of `nft monitor trace`: `trace id ID FAMILY TABLE CHAIN rule TEXT (verdict V)` or
/// `... CHAIN policy V`.
#[derive(Debug, PartialEq, Eq)]
struct TraceLine {
    family: String,
    table: String,
    chain: String,
    /// The rule as nft prints it (without counters), or `policy drop`.
    rule: String,
    verdict: String,
}

impl TraceLine {
    fn parse(line: &str) -> Option<TraceLine> {
        let mut w = line.strip_prefix("trace id ")?.splitn(5, ' ');
        let (_id, family, table, chain, rest) =
            (w.next()?, w.next()?, w.next()?, w.next()?, w.next()?);
        let (rule, verdict) = if let Some(v) = rest.strip_prefix("policy ") {
            (format!("policy {}", v.trim()), v.trim().to_owned())
        } else {
            let text = rest.strip_prefix("rule ")?;
            let (text, v) = text.rsplit_once(" (verdict ")?;
            (normalize(text), v.trim_end_matches(')').trim().to_owned())
        };
        Some(TraceLine {
            family: family.into(),
            table: table.into(),
            chain: chain.into(),
            rule,
            verdict,
        })
    }

    fn drops(&self) -> bool {
        self.table != TABLE && (self.verdict == "drop" || self.verdict.starts_with("reject"))
    }

    /// The rule with its comment: from `iptables -S` for a table iptables-nft manages (nft does
    /// not print iptables' comments), else from nft's own listing.
    fn named(self) -> DropRule {
        let (listing, warnings) = run_out(
            "nft",
            &["list", "chain", &self.family, &self.table, &self.chain],
        );
        let rule_lines: Vec<&str> = listing.lines().filter(|l| is_rule_line(l)).collect();
        let position = rule_lines.iter().position(|l| normalize(l) == self.rule);
        // nft warns on stderr: "table ip filter is managed by iptables-nft, do not touch!"
        let iptables = warnings.contains("managed by iptables-nft");
        let (rule, comment) = match position {
            Some(i) if iptables => {
                let bin = if self.family == "ip6" {
                    "ip6tables"
                } else {
                    "iptables"
                };
                let (rules, _) = run_out(bin, &["-t", &self.table, "-S", &self.chain]);
                match rules.lines().filter(|l| l.starts_with("-A ")).nth(i) {
                    Some(r) => (r.to_owned(), iptables_comment(r)),
                    None => (self.rule.clone(), None),
                }
            }
            Some(i) => (self.rule.clone(), nft_comment(rule_lines[i])),
            None => (self.rule.clone(), None),
        };
        DropRule {
            table: format!("{} {}", self.family, self.table),
            chain: self.chain,
            rule,
            comment,
        }
    }
}

/// (stdout, stderr) of a command; empty when it cannot run.
fn run_out(bin: &str, args: &[&str]) -> (String, String) {
    Command::new(bin)
        .args(args)
        .output()
        .map(|o| {
            (
                String::from_utf8_lossy(&o.stdout).into_owned(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .unwrap_or_default()
}

fn is_rule_line(l: &str) -> bool {
    let t = l.trim();
    !(t.is_empty()
        || t.starts_with('#')
        || t.starts_with("table ")
        || t.starts_with("chain ")
        || t.starts_with("type ")
        || t == "}")
}

/// A rule's text without its counter values, handle, comment or extra spaces, as the trace and
/// the listing both print it.
fn normalize(rule: &str) -> String {
    let rule = rule.split(" # handle").next().unwrap_or(rule);
    let rule = match rule.find(" comment \"") {
        Some(i) => &rule[..i],
        None => rule,
    };
    let mut out: Vec<&str> = Vec::new();
    let mut words = rule.split_whitespace().peekable();
    while let Some(w) = words.next() {
        if w == "counter" {
            // counter packets N bytes M
            if words.peek() == Some(&"packets") {
                for _ in 0..4 {
                    words.next();
                }
            }
            out.push("counter");
        } else {
            out.push(w);
        }
    }
    out.join(" ")
}

fn nft_comment(line: &str) -> Option<String> {
    let rest = &line[line.find(" comment \"")? + 10..];
    Some(rest[..rest.find('"')?].to_owned())
}

/// `--comment "a b"` or `--comment word` in an `iptables -S` line.
fn iptables_comment(line: &str) -> Option<String> {
    let rest = &line[line.find("--comment ")? + 10..];
    match rest.strip_prefix('"') {
        Some(q) => {
            let mut out = String::new();
            let mut chars = q.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => out.extend(chars.next()),
                    '"' => return Some(out),
                    c => out.push(c),
                }
            }
            Some(out)
        }
        None => rest.split_whitespace().next().map(str::to_owned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_lines_name_the_dropping_rule() {
        let l = TraceLine::parse(
            "trace id 6f72947a ip filter OBS-TW-pod-api-1 rule  counter packets 2 bytes 120 drop (verdict drop)",
        )
        .unwrap();
        assert_eq!(
            (l.family.as_str(), l.table.as_str(), l.chain.as_str()),
            ("ip", "filter", "OBS-TW-pod-api-1")
        );
        assert_eq!(l.rule, "counter drop");
        assert!(l.drops());
        let jump = TraceLine::parse(
            "trace id 6f72947a ip filter FORWARD rule counter packets 2 bytes 120 jump OBS-FORWARD (verdict jump OBS-FORWARD)",
        )
        .unwrap();
        assert!(!jump.drops());
        let policy = TraceLine::parse("trace id 1 ip filter FORWARD policy drop ").unwrap();
        assert_eq!(policy.rule, "policy drop");
        assert!(policy.drops());
        assert!(TraceLine::parse("trace id 1 ip filter FORWARD packet: iif \"x\"").is_none());
    }

    #[test]
    fn listing_and_trace_agree_once_counters_and_handles_go() {
        assert_eq!(
            normalize(
                "\t\tip saddr 10.244.2.10  counter packets 0 bytes 0 meta mark set mark or 0x10000 # handle 16"
            ),
            "ip saddr 10.244.2.10 counter meta mark set mark or 0x10000"
        );
        assert_eq!(
            normalize(
                "tcp dport 8443 counter packets 3 bytes 180 drop comment \"deny web\" # handle 4"
            ),
            "tcp dport 8443 counter drop"
        );
        assert_eq!(
            nft_comment("tcp dport 8443 drop comment \"deny web\" # handle 4").as_deref(),
            Some("deny web")
        );
    }

    #[test]
    fn comments_come_out_of_iptables_lines() {
        assert_eq!(
            iptables_comment(
                "-A OBS-TW-pod-api-1 -m comment --comment \"default deny: ingress policies select payments/pod-api-1\" -j DROP"
            )
            .as_deref(),
            Some("default deny: ingress policies select payments/pod-api-1")
        );
        assert_eq!(
            iptables_comment("-A cali-tw-x -m comment --comment cali:abc -j DROP").as_deref(),
            Some("cali:abc")
        );
        assert_eq!(iptables_comment("-A X -j DROP"), None);
    }

    #[test]
    fn targets_match_the_backend_and_port() {
        let t = Target {
            proto: IPPROTO_TCP,
            src: "10.244.1.10".parse().unwrap(),
            dst: "10.244.2.10".parse().unwrap(),
            dport: 8443,
        };
        assert_eq!(
            t.matcher(),
            "ip saddr 10.244.1.10 ip daddr 10.244.2.10 meta l4proto tcp th dport 8443"
        );
    }
}
