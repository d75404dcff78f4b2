//! What the demo's steps share: the lab's name, `observer-lab` itself, and tuples for a person.

use observer_lab::drive::stdout_of;
use serde_json::Value;

/// The demo's lab.
pub const LAB: &str = "demo";

pub fn lab_cmd(args: &[&str]) -> anyhow::Result<String> {
    stdout_of(&crate::bins().lab, args)
}

pub fn ep(t: &Value) -> String {
    let ip = t["dst"].as_str().unwrap_or("?");
    if ip.contains(':') {
        format!("[{ip}]:{}", t["dport"])
    } else {
        format!("{ip}:{}", t["dport"])
    }
}

pub fn flow(t: &Value) -> String {
    format!(
        "{}:{} -> {}",
        t["src"].as_str().unwrap_or("?"),
        t["sport"],
        ep(t)
    )
}
