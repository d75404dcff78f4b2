//! One line per record, for people: when, where, client -> Service -> backend, the verdict
//! and where it stopped; `wide` adds the evidence (who translated, how we know, what the wire
//! and the filter table saw, the process). `json` is the record as the agent wrote it.

use std::fmt::Write as _;

use clap::ValueEnum;

use super::filter::verdict;
use crate::record::{FlowRecord, PodRef, TupleView};

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// One line a connection, for people.
    Compact,
    /// The same with the evidence: translation, wire and filter views, process, counts.
    Wide,
    /// The record as the agent wrote it (one JSON object a line, for jq).
    Json,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Color {
    Auto,
    Always,
    Never,
}

/// `ns/pod ADDR:PORT`; `port` None for protocols without ports (ICMP).
fn endpoint(pod: Option<&PodRef>, ip: &str, port: Option<u16>) -> String {
    let addr = match port {
        None => ip.to_owned(),
        Some(port) if ip.contains(':') => format!("[{ip}]:{port}"),
        Some(port) => format!("{ip}:{port}"),
    };
    match pod {
        Some(p) => format!("{}/{} {addr}", p.namespace, p.name),
        None => addr,
    }
}

fn tuple(t: &TupleView, ports: bool) -> String {
    let p = |x| ports.then_some(x);
    format!(
        "{} -> {}",
        endpoint(None, &t.src, p(t.sport)),
        endpoint(None, &t.dst, p(t.dport))
    )
}

/// `HH:MM:SS.mmm` of an RFC 3339 time (UTC, as records are written).
fn clock(time: &str) -> &str {
    time.get(11..23).unwrap_or(time)
}

fn paint(s: &str, code: &str, color: bool) -> String {
    if color {
        format!("\x1b[{code}m{s}\x1b[0m")
    } else {
        s.to_owned()
    }
}

/// The line for `r` (no newline), or for `json` the record as it came.
pub fn line(r: &FlowRecord, raw: &str, out: Output, color: bool) -> String {
    if out == Output::Json {
        return raw.to_owned();
    }
    let mut s = format!("{} {} {} ", clock(&r.time), r.node, r.proto);
    let ports = !r.proto.starts_with("ICMP");
    let p = |x| ports.then_some(x);
    // The client's tuple; a record of replies only (no client packet here) names the first seen.
    let client = r
        .client_tuple()
        .or(r.wire_view.as_ref())
        .or(r.hops.first().map(|h| &h.tuple));
    match client {
        Some(c) => {
            s += &endpoint(r.src_pod.as_ref(), &c.src, p(c.sport));
            let dnat = r
                .translation
                .as_ref()
                .is_some_and(|t| t.kind.contains("dnat"));
            if dnat || r.service.is_some() {
                let svc = r
                    .service
                    .as_ref()
                    .map(|v| format!("{}/{} ", v.namespace, v.name))
                    .unwrap_or_default();
                let asked = r.pre_dnat.as_ref().unwrap_or(c);
                let _ = write!(s, " -> {svc}{}", endpoint(None, &asked.dst, p(asked.dport)));
                match r
                    .backend_tuple()
                    .filter(|b| (&b.dst, b.dport) != (&asked.dst, asked.dport))
                {
                    Some(b) => {
                        let _ = write!(
                            s,
                            " -> {}",
                            endpoint(r.dst_pod.as_ref(), &b.dst, p(b.dport))
                        );
                    }
                    None => s += " -> ?",
                }
            } else {
                let _ = write!(
                    s,
                    " -> {}",
                    endpoint(r.dst_pod.as_ref(), &c.dst, p(c.dport))
                );
            }
            let snat = r
                .translation
                .as_ref()
                .is_some_and(|t| t.kind.contains("snat"));
            if let Some(x) = r.post_dnat.as_ref().filter(|_| snat) {
                let _ = write!(s, " (source as {})", endpoint(None, &x.src, p(x.sport)));
            }
        }
        None => s += "?",
    }
    let v = verdict(r);
    let tag = match v {
        "dropped" => paint("DROPPED", "31", color),
        "open" => paint("OPEN", "33", color),
        _ => paint("FORWARDED", "32", color),
    };
    let _ = write!(s, " {tag} {}", r.state);
    match &r.drop {
        Some(d) => {
            let _ = write!(s, " ({} at {} {}", d.reason, d.node, d.point);
            if let Some(rule) = &d.rule {
                let _ = write!(s, ": {rule}");
            }
            s += ")";
        }
        None => {
            let _ = write!(s, " (last seen {})", r.last_seen.point);
        }
    }
    if r.incomplete.is_some() || r.gap.is_some() {
        s += &paint(" [partial]", "33", color);
    }
    if out == Output::Wide {
        wide(&mut s, r, ports);
    }
    s
}

fn wide(s: &mut String, r: &FlowRecord, ports: bool) {
    let _ = write!(s, " | as {}", r.observed_as.as_str());
    if let Some(t) = &r.translation {
        let _ = write!(
            s,
            " | {} on {} by {} ({})",
            t.kind,
            t.node,
            t.mechanism.as_deref().unwrap_or("?"),
            t.evidence
        );
    }
    if let Some(w) = &r.wire_view {
        let _ = write!(s, " | wire {}", tuple(w, ports));
    }
    if let Some(p) = &r.policy_view {
        let _ = write!(s, " | policy {} ({})", tuple(&p.tuple, ports), p.source);
    }
    if let Some(k) = &r.socket {
        let _ = write!(s, " | {}[{}]", k.comm, k.pid);
    }
    let t = &r.totals;
    let _ = write!(
        s,
        " | {}/{} pkts {}/{} B",
        t.packets, t.reply_packets, t.bytes, t.reply_bytes
    );
    if let Some(i) = &r.incomplete {
        let _ = write!(s, " | incomplete: {}", i.join(","));
    }
    if let Some(g) = &r.gap {
        let _ = write!(s, " | gap {} .. {} ({})", g.from, g.to, g.previous_agent);
    }
}
