//! Verdicts for a person (text), for tools (JSON) and for diagrams (Mermaid).

use std::fmt::Write as _;

use super::{Names, Story, story::Verdict};
use crate::record::{FlowRecord, ObservedAs, PolicyView, TupleView};

fn t(v: &TupleView) -> String {
    let ep = |ip: &str, port: u16| {
        if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        }
    };
    format!("{} -> {}", ep(&v.src, v.sport), ep(&v.dst, v.dport))
}

fn hop<'a>(r: &'a FlowRecord, point: &str) -> Option<&'a crate::record::Hop> {
    r.hops
        .iter()
        .find(|h| h.point == point && h.dir == crate::record::Direction::Orig)
}

/// The rewrite as a step: what changed, to what, and who did it on the kernel's word.
fn rewrite(tr: &crate::record::Translation, post: &TupleView) -> (String, String, String) {
    let (label, to) = match tr.kind.as_str() {
        "snat" => ("SNAT", format!("from {}:{}", post.src, post.sport)),
        "dnat_snat" => ("DNAT+SNAT", format!("-> {}", t(post))),
        _ => ("DNAT", format!("-> {}:{}", post.dst, post.dport)),
    };
    let by = match (&tr.mechanism, tr.ct_zone) {
        (Some(m), _) if m == "socket" => {
            "by a socket load balancer in connect()/sendmsg(): no packet carried the address asked for,"
                .to_owned()
        }
        (Some(m), Some(z)) => format!("by {m} (its conntrack entry, zone {z})"),
        (Some(m), None) => format!("by {m}"),
        _ => "by the stack (inferred: no NAT state read)".into(),
    };
    (
        label.into(),
        to,
        format!(
            "{by} on {}, between {} and {}",
            tr.node, tr.after, tr.before
        ),
    )
}

/// What the filter table saw, and whether that was measured or inferred.
fn policy_step(p: &PolicyView, side: &str) -> (String, String, String) {
    let hook = match p.hook.as_deref() {
        Some(h) => format!("filter {}", h.to_uppercase()),
        None => "the filter table".to_owned(),
    };
    let how = match (p.packets, p.passed) {
        _ if !p.is_measured() => "inferred from the hops around it, not measured".to_owned(),
        (Some(n), Some(passed)) => format!("measured there: {n} packets in, {passed} let through"),
        _ => "measured: the packet it dropped".to_owned(),
    };
    (
        format!("policy{side} saw"),
        t(&p.tuple),
        format!("{hook} on {} ({how})", p.node),
    )
}

/// (step, tuple or note, where) along the path, from both nodes' records.
fn steps(s: &Story) -> Vec<(String, String, String)> {
    let mut v = Vec::new();
    if let Some(a) = &s.sender {
        if let Some(sock) = &a.socket {
            v.push((
                "app asked".into(),
                t(&sock.asked),
                format!("{} pid {} on {}", sock.comm, sock.pid, a.node),
            ));
        }
        let entered = hop(a, "pod_ingress").or_else(|| hop(a, "uplink_ingress"));
        if let (Some(_), Some(h)) = (&a.pre_dnat, entered) {
            // The packet as it entered: the pre-DNAT tuple, or already the backend when a socket
            // load balancer rewrote it in connect().
            let socket_lb = a
                .translation
                .as_ref()
                .is_some_and(|t| t.mechanism.as_deref() == Some("socket"));
            v.push((
                if socket_lb { "entered" } else { "pre-DNAT" }.into(),
                t(&h.tuple),
                format!(
                    "{} {} on {}",
                    h.point,
                    h.iface.clone().unwrap_or_default(),
                    a.node
                ),
            ));
        }
        if let (Some(tr), Some(post)) = (&a.translation, &a.post_dnat) {
            v.push(rewrite(tr, post));
        } else if let (Some(pre), Some(d)) = (&a.pre_dnat, &a.drop)
            && (pre.dst != d.tuple.dst || pre.dport != d.tuple.dport)
        {
            // It never left, but the dropped packet shows the rewrite.
            v.push((
                "DNAT".into(),
                format!("-> {}:{}", d.tuple.dst, d.tuple.dport),
                format!("on {}, before the filter that dropped it", a.node),
            ));
        }
        if let Some(p) = &a.policy_view {
            // Both pods here: one pass through the table evaluates both pods' policies.
            let side = if a.observed_as == ObservedAs::Local {
                ""
            } else {
                " egress"
            };
            v.push(policy_step(p, side));
        }
        if let Some(w) = &a.wire_view {
            v.push((
                "on the wire".into(),
                t(w),
                format!("uplink_egress on {}", a.node),
            ));
        }
    }
    if let Some(b) = &s.receiver {
        if let Some(w) = &b.wire_view {
            v.push((
                "arrived".into(),
                t(w),
                format!("uplink_ingress on {}", b.node),
            ));
        }
        if let Some(p) = &b.policy_view {
            v.push(policy_step(p, " ingress"));
        }
        if let Some(h) = hop(b, "pod_egress") {
            v.push((
                "delivered".into(),
                t(&h.tuple),
                format!(
                    "pod_egress {} on {}",
                    h.iface.clone().unwrap_or_default(),
                    b.node
                ),
            ));
        }
    }
    v
}

pub fn text(s: &Story, v: &Verdict, names: &Names) -> String {
    let mut out = String::new();
    let r = s
        .sender
        .as_ref()
        .or(s.receiver.as_ref())
        .expect("non-empty");
    let asked = s.asked().map(t).unwrap_or_default();
    let client = s.asked().map(|a| names.label(&a.src)).unwrap_or_default();
    let _ = writeln!(
        out,
        "{} connection from {client}: {asked} ({}, {} {})",
        r.proto,
        r.state,
        if s.open() { "last packet" } else { "ended" },
        r.end
    );
    for (step, what, where_) in steps(s) {
        // What filter evaluated before kube-proxy rejected it was no policy's view.
        let step = if v.layer.as_deref() == Some("service") && step.starts_with("policy") {
            "kube-proxy saw".to_owned()
        } else {
            step
        };
        let _ = writeln!(out, "  {step:<20} {what:<46} {where_}");
    }
    if let Some(d) = s
        .sender
        .as_ref()
        .and_then(|a| a.drop.as_ref())
        .or(s.receiver.as_ref().and_then(|b| b.drop.as_ref()))
    {
        let _ = writeln!(
            out,
            "  {:<20} {:<46} {} at {} on {}",
            "DROPPED",
            t(&d.tuple),
            d.reason,
            d.location,
            d.node
        );
    }
    let _ = writeln!(
        out,
        "last seen: {} on {}",
        v.last_seen.point, v.last_seen.node
    );
    let _ = writeln!(
        out,
        "outcome:   {}{}",
        v.outcome,
        v.layer
            .as_ref()
            .map(|l| format!(" (layer: {l})"))
            .unwrap_or_default()
    );
    if s.open() {
        let _ = writeln!(
            out,
            "open:      still open when its agent last wrote (an interim record; the outcome is so far)"
        );
    }
    let _ = writeln!(out, "why:       {}", v.explanation);
    if let Some(f) = &v.fix {
        let _ = writeln!(out, "fix:       {}", f.summary);
        for (label, body) in [
            ("NetworkPolicy", &f.network_policy),
            ("gcloud", &f.gcloud),
            ("lab (nft)", &f.nft),
            ("kubectl", &f.kubectl),
            ("on the node", &f.inspect),
        ] {
            if let Some(b) = body {
                let _ = writeln!(out, "  {label}:");
                for l in b.lines() {
                    let _ = writeln!(out, "    {l}");
                }
            }
        }
    }
    out.push('\n');
    out
}

pub fn json(s: &Story, v: &Verdict) -> serde_json::Value {
    let pick = |f: fn(&FlowRecord) -> serde_json::Value| {
        serde_json::json!({
            "sender": s.sender.as_ref().map(f),
            "receiver": s.receiver.as_ref().map(f),
        })
    };
    serde_json::json!({
        "asked": s.asked(),
        "backend": s.backend(),
        "outcome": v.outcome,
        "open": s.open(),
        "layer": v.layer,
        "explanation": v.explanation,
        "last_seen": v.last_seen,
        "drop": pick(|r| serde_json::to_value(&r.drop).expect("serialisable")),
        "policy_view": pick(|r| serde_json::to_value(&r.policy_view).expect("serialisable")),
        "wire_view": pick(|r| serde_json::to_value(&r.wire_view).expect("serialisable")),
        "fix": v.fix,
        "steps": steps(s).into_iter().map(|(step, what, at)| serde_json::json!({"step": step, "tuple": what, "at": at})).collect::<Vec<_>>(),
    })
}

pub fn mermaid(s: &Story, v: &Verdict, names: &Names) -> String {
    let mut m = String::from("sequenceDiagram\n");
    let asked = s.asked();
    let backend = s.backend();
    let client = asked
        .map(|a| names.label(&a.src))
        .unwrap_or_else(|| "client".into());
    let server = backend
        .as_ref()
        .map(|b| names.label(&b.dst))
        .unwrap_or_else(|| "server".into());
    let na = s
        .sender
        .as_ref()
        .map(|r| r.node.clone())
        .unwrap_or_else(|| "client node".into());
    let nb = s
        .receiver
        .as_ref()
        .map(|r| r.node.clone())
        .unwrap_or_else(|| "server node".into());
    let _ = writeln!(m, "    participant C as {client}");
    let _ = writeln!(m, "    participant A as {na}");
    let _ = writeln!(m, "    participant W as wire / VPC");
    let _ = writeln!(m, "    participant B as {nb}");
    let _ = writeln!(m, "    participant S as {server}");
    if let Some(a) = &s.sender {
        if let Some(pre) = &a.pre_dnat {
            let _ = writeln!(m, "    C->>A: {} (pod_ingress)", t(pre));
        }
        if let (Some(_), Some(post)) = (&a.translation, &a.post_dnat) {
            let _ = writeln!(m, "    Note over A: DNAT to {}:{}", post.dst, post.dport);
        }
        if let Some(d) = &a.drop {
            let _ = writeln!(
                m,
                "    Note over A: dropped: {} (filter saw {})",
                d.reason,
                t(&d.tuple)
            );
        }
        if let Some(w) = &a.wire_view {
            let _ = writeln!(m, "    A->>W: {} (uplink_egress)", t(w));
        }
    }
    match &s.receiver {
        Some(b) => {
            if let Some(w) = &b.wire_view {
                let _ = writeln!(m, "    W->>B: {} (uplink_ingress)", t(w));
            }
            if let Some(d) = &b.drop {
                let _ = writeln!(
                    m,
                    "    Note over B: dropped: {} (filter saw {})",
                    d.reason,
                    t(&d.tuple)
                );
            }
            if let Some(h) = hop(b, "pod_egress") {
                let _ = writeln!(m, "    B->>S: {} (pod_egress)", t(&h.tuple));
            }
        }
        None if v.outcome == "lost_between_nodes" => {
            let _ = writeln!(m, "    W-xB: never arrived (firewall between nodes)");
        }
        None => {}
    }
    if v.outcome == "answered" {
        let _ = writeln!(m, "    S-->>C: reply");
    }
    m
}
