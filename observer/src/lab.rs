//! A lab that `observer-lab up` built, as the agent and the record readers see it: its names
//! file, which says for each node where that node's agent serves /flows (`nodes[].agent`). So
//! `observer agent --lab NAME --node N` knows where to run and listen, and `observe`/`explain
//! --lab NAME` where to ask, the way a cluster's DaemonSet pods say it through the API.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use observer_common::names::{AgentEntry, NamesFile};

/// The lab's names file.
pub fn names_path(lab: &str) -> PathBuf {
    Path::new(observer_common::LAB_STATE_ROOT)
        .join(lab)
        .join("names.yaml")
}

pub fn read(lab: &str) -> anyhow::Result<NamesFile> {
    let path = names_path(lab);
    if !path.exists() {
        bail!(
            "lab {lab:?} is not up: no {} (observer-lab up --name {lab})",
            path.display()
        );
    }
    Ok(crate::names::read_file(&path)?)
}

/// Each node of the lab with its agent's entry.
pub fn agents(lab: &str) -> anyhow::Result<Vec<(String, AgentEntry)>> {
    let file = read(lab)?;
    let agents: Vec<_> = file
        .nodes
        .into_iter()
        .filter_map(|n| Some((n.name, n.agent?)))
        .collect();
    if agents.is_empty() {
        bail!(
            "lab {lab:?}: its names file says where no agent is (written by an older observer-lab?)"
        );
    }
    Ok(agents)
}

/// The entry of `node`'s agent.
pub fn agent_of(lab: &str, node: &str) -> anyhow::Result<AgentEntry> {
    let agents = agents(lab)?;
    let known: Vec<_> = agents.iter().map(|(n, _)| n.as_str()).collect();
    let known = known.join(", ");
    agents
        .into_iter()
        .find(|(n, _)| n == node)
        .map(|(_, a)| a)
        .with_context(|| format!("lab {lab:?} has no node {node:?} (its nodes: {known})"))
}

/// The address an agent listens on for its `flows` URL (`http://HOST:PORT/flows`).
pub fn listen_addr(entry: &AgentEntry) -> anyhow::Result<std::net::SocketAddr> {
    let rest = entry
        .flows
        .strip_prefix("http://")
        .with_context(|| format!("{}: only http:// URLs", entry.flows))?;
    let host = rest.split('/').next().unwrap_or_default();
    host.parse()
        .with_context(|| format!("{}: not an IP:PORT to listen on", entry.flows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_listens_where_its_url_points() {
        let e = |flows: &str| AgentEntry {
            flows: flows.into(),
            netns: None,
            token_file: None,
        };
        assert_eq!(
            listen_addr(&e("http://127.0.0.1:9465/flows")).unwrap(),
            "127.0.0.1:9465".parse().unwrap()
        );
        assert_eq!(
            listen_addr(&e("http://[fd00::1]:9465/flows")).unwrap(),
            "[fd00::1]:9465".parse().unwrap()
        );
        assert!(listen_addr(&e("http://node-a:9465/flows")).is_err());
        assert!(listen_addr(&e("https://127.0.0.1:9465/flows")).is_err());
    }
}
