//! Demo step: where the node's own IP is on the wire. The explainer's "NodeA_IP -> NodeB_IP:8443"
//! holds only in corners; each is measured here beside the pod-to-Service story, with conntrack
//! as the independent evidence: a NodePort reached from outside (DNAT and SNAT on the entry
//! node), a hostNetwork client (its own IP, DNAT in nat OUTPUT), and a pod leaving the cluster
//! (SNAT only).

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::Context as _;
use observer_lab::drive::{CtEntry, LabRun, tuple_of};
use serde_json::Value;

use crate::demo_lab::{LAB, flow, lab_cmd};

struct Case {
    title: &'static str,
    from: &'static str,
    url: &'static str,
    /// Selects the connection's final record on node-a.
    pre_field: &'static str,
    pre_value: &'static str,
}

const CASES: [Case; 3] = [
    Case {
        title: "a NodePort reached from outside (externalTrafficPolicy: Cluster), from 192.0.2.10",
        from: "outside",
        url: "http://10.200.0.1:30443/",
        pre_field: "src",
        pre_value: "192.0.2.10",
    },
    Case {
        title: "a hostNetwork client: a process of node-a itself calls the Service",
        from: "node-a",
        url: "http://100.64.0.10:443/",
        pre_field: "src",
        pre_value: "10.200.0.1",
    },
    Case {
        title: "pod-a calls a host outside the cluster (ip-masq-agent's masquerade)",
        from: "pod-a",
        url: "http://192.0.2.10:80/",
        pre_field: "dst",
        pre_value: "192.0.2.10",
    },
];

/// Run the three cases and tell each from its records and conntrack; returns what was printed.
pub fn cases(lab: &LabRun, dir: &Path) -> anyhow::Result<String> {
    let root = crate::workspace_root();
    // The VPC firewall must let the node network reach the pod's targetPort, and the outside host
    // the NodePort; GKE's default opens only the pod range.
    let file = root.join("lab/scenarios/firewall-nodeport.yaml");
    lab_cmd(&["apply", "--name", LAB, &file.to_string_lossy()])?;
    let mut out = String::new();
    for case in &CASES {
        out.push_str(&one(lab, case)?);
    }
    let _ = writeln!(
        out,
        "\n  The destination is never node-b's IP: it is the pod's IP and targetPort (only a hostNetwork\n  backend would make it node-b's IP). The source is node-a's IP only after SNAT or for node-a's\n  own processes; a policy or firewall for those flows must name the node network, not the client."
    );
    let none = root.join("lab/scenarios/none.yaml");
    lab_cmd(&["apply", "--name", LAB, &none.to_string_lossy()])?;
    std::fs::write(dir.join("node-ip.txt"), &out)?;
    Ok(out)
}

fn one(lab: &LabRun, case: &Case) -> anyhow::Result<String> {
    let mut s = format!("\n  --- {} ---\n", case.title);
    let curl = lab.exec(case.from, &["curl", "-sS", "-m", "5", case.url])?;
    let _ = writeln!(
        s,
        "  curl {} from {}: answered by {}",
        case.url,
        case.from,
        String::from_utf8_lossy(&curl.stdout).trim()
    );
    let is_case = |r: &Value| {
        r["final"] == true && r["proto"] == "TCP" && r["pre_dnat"][case.pre_field] == case.pre_value
    };
    let a = lab.wait_records("node-a", Duration::from_secs(15), |rs| {
        rs.iter().any(is_case)
    })?;
    let r = a.iter().find(|r| is_case(r)).expect("waited for it");
    let t = &r["translation"];
    let _ = writeln!(
        s,
        "  node-a, {:<9} before NAT  {}",
        r["observed_as"].as_str().unwrap_or("?"),
        flow(&r["pre_dnat"])
    );
    let _ = writeln!(
        s,
        "                   after NAT   {}   ({}, by {} on the kernel's word: conntrack zone {})",
        flow(&r["post_dnat"]),
        t["kind"].as_str().unwrap_or("?"),
        t["mechanism"].as_str().unwrap_or("nobody"),
        t["ct_zone"]
    );
    let ct = lab.conntrack("node-a")?;
    s.push_str(&conntrack_line(&ct, r));
    let post = tuple_of(&r["post_dnat"]).context("no post_dnat")?;
    if post.2.starts_with("10.244.2.") {
        let b = lab.wait_records("node-b", Duration::from_secs(15), |rs| {
            rs.iter()
                .any(|x| x["final"] == true && tuple_of(&x["post_dnat"]).as_ref() == Some(&post))
        })?;
        if let Some(rb) = b
            .iter()
            .find(|x| tuple_of(&x["post_dnat"]).as_ref() == Some(&post))
        {
            let _ = writeln!(
                s,
                "  node-b, {:<9} policy saw {}",
                rb["observed_as"].as_str().unwrap_or("?"),
                flow(&rb["policy_view"]["tuple"])
            );
        }
    }
    Ok(s)
}

fn conntrack_line(ct: &[CtEntry], r: &Value) -> String {
    let want = tuple_of(&r["pre_dnat"]);
    match ct.iter().find(|e| Some(&e.orig) == want.as_ref()) {
        Some(e) => {
            let reversed = e.reply_reversed();
            format!(
                "  conntrack on node-a: reply {}:{} -> {}:{}  ({})\n",
                e.reply.0,
                e.reply.1,
                e.reply.2,
                e.reply.3,
                if tuple_of(&r["post_dnat"]) == Some(reversed) {
                    "reversed, it is the record's post_dnat"
                } else {
                    "DOES NOT match the record"
                }
            )
        }
        None => "  conntrack on node-a: entry not found (expired?)\n".to_owned(),
    }
}
