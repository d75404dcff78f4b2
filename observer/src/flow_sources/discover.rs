//! Finding the agents: the DaemonSet's pods through the Kubernetes API (the Hubble Relay idea,
//! without a server of its own). Each running pod with a container port named `flows` is an
//! agent serving /flows on its pod IP (the node's, with hostNetwork). In a lab that
//! `observer-lab` built, its names file says where each node's agent is (`--lab`).

use anyhow::{Context as _, bail};
use clap::Args;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::ListParams};

use super::agent::AgentUrl;

#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "Finding the agents")]
pub struct DiscoverArgs {
    /// Find the agents through the Kubernetes API with this kubeconfig (the DaemonSet's pods).
    #[arg(long, conflicts_with_all = ["kubernetes", "lab"])]
    pub kubeconfig: Option<String>,
    /// Find the agents through the Kubernetes API, in-cluster (service account).
    #[arg(long, conflicts_with = "lab")]
    pub kubernetes: bool,
    /// Find the agents of the lab `observer-lab up --name NAME` built (`observer agent --lab
    /// NAME`): its names file says where each node's agent listens, in which network namespace,
    /// and the token it wants.
    #[arg(long, value_name = "NAME")]
    pub lab: Option<String>,
    /// Namespace of the agents' DaemonSet.
    #[arg(long, default_value = "observer", value_name = "NS")]
    pub agents_namespace: String,
    /// Label selector of the agents' pods.
    #[arg(
        long,
        default_value = "app.kubernetes.io/name=observer",
        value_name = "SELECTOR"
    )]
    pub agents_selector: String,
    /// Reach the agents from inside this network namespace (`ip netns` name or path); the
    /// Kubernetes API is still asked from the one observer started in.
    #[arg(long, value_name = "NETNS")]
    pub netns: Option<String>,
}

impl DiscoverArgs {
    pub fn wanted(&self) -> bool {
        self.kubeconfig.is_some() || self.kubernetes || self.lab.is_some()
    }
}

/// An agent found through the API or a lab's names file.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Agent {
    pub node: String,
    /// Its pod (the API), or empty (a lab).
    pub pod: String,
    pub url: String,
    /// The network namespace it is reached in, if not the reader's.
    pub netns: Option<String>,
    /// The token it wants, if its discovery knows it (a lab's token file).
    pub token: Option<String>,
}

impl Agent {
    /// Where and how to ask it.
    pub fn endpoint(&self) -> anyhow::Result<AgentUrl> {
        let mut u = AgentUrl::parse(&self.url)?;
        u.netns = self.netns.clone();
        u.token = self.token.clone();
        Ok(u)
    }
}

/// The agents a lab's names file lists, each with its token.
fn lab_agents(lab: &str) -> anyhow::Result<Vec<Agent>> {
    crate::lab::agents(lab)?
        .into_iter()
        .map(|(node, a)| {
            let token = match &a.token_file {
                Some(f) => Some(
                    std::fs::read_to_string(f)
                        .with_context(|| format!("lab {lab}: reading the agents' token {f}"))?
                        .trim()
                        .to_owned(),
                ),
                None => None,
            };
            eprintln!(
                "observer: agent on {node}: {} (network namespace {})",
                a.flows,
                a.netns.as_deref().unwrap_or("this one")
            );
            Ok(Agent {
                node,
                pod: String::new(),
                url: a.flows,
                netns: a.netns,
                token,
            })
        })
        .collect()
}

/// The agent a pod is, or why it is none.
fn agent_of(p: &Pod) -> Result<Agent, String> {
    let pod = p.metadata.name.clone().unwrap_or_default();
    let spec = p.spec.as_ref().ok_or("no spec")?;
    let node = spec.node_name.clone().ok_or("not scheduled to a node")?;
    let status = p.status.as_ref();
    if status.and_then(|s| s.phase.as_deref()) != Some("Running") {
        return Err(format!("on {node}: not running"));
    }
    let ip = status
        .and_then(|s| s.pod_ip.clone())
        .ok_or_else(|| format!("on {node}: no pod IP"))?;
    let port = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("flows"))
        .map(|p| p.container_port)
        .ok_or_else(|| {
            format!(
                "on {node}: no container port named flows (its agent serves no /flows: deploy/overlays/flows-kubernetes-auth)"
            )
        })?;
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip
    };
    Ok(Agent {
        node,
        pod,
        url: format!("http://{host}:{port}/flows"),
        ..Default::default()
    })
}

/// The agents the API names, each on stderr; a pod that is no agent is said and skipped.
pub fn discover(args: &DiscoverArgs) -> anyhow::Result<Vec<Agent>> {
    if let Some(lab) = &args.lab {
        return lab_agents(lab);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let pods = rt.block_on(async {
        let client = crate::names::kube::client(args.kubeconfig.as_deref()).await?;
        let lp = ListParams::default().labels(&args.agents_selector);
        let api: Api<Pod> = Api::namespaced(client, &args.agents_namespace);
        tokio::time::timeout(std::time::Duration::from_secs(10), api.list(&lp))
            .await
            .context("the Kubernetes API did not answer within 10 s")?
            .context("listing the agents' pods")
    })?;
    let mut agents = Vec::new();
    for p in &pods.items {
        match agent_of(p) {
            Ok(a) => {
                eprintln!("observer: agent on {} ({}): {}", a.node, a.pod, a.url);
                agents.push(a);
            }
            Err(why) => eprintln!(
                "observer: pod {} is no agent to ask: {why}",
                p.metadata.name.as_deref().unwrap_or("?")
            ),
        }
    }
    if agents.is_empty() {
        bail!(
            "no agent found: no running pod in namespace {} matches {} with a port named flows",
            args.agents_namespace,
            args.agents_selector
        );
    }
    agents.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(agents)
}

/// The agents to ask besides those given by URL (none without --kubeconfig/--kubernetes); then
/// into `--netns`, where they are reached from.
pub fn agents_and_netns(args: &DiscoverArgs) -> anyhow::Result<Vec<Agent>> {
    let agents = if args.wanted() {
        discover(args)?
    } else {
        vec![]
    };
    if let Some(ns) = &args.netns {
        crate::netns::enter(ns)?;
    }
    Ok(agents)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn a_running_pod_with_a_flows_port_is_an_agent() {
        let p = pod("metadata: {name: observer-x}\n\
             spec: {nodeName: node-a, containers: [{name: agent, ports: [{name: metrics, containerPort: 9464}, {name: flows, containerPort: 9465}]}]}\n\
             status: {phase: Running, podIP: 10.0.0.5}");
        assert_eq!(
            agent_of(&p).unwrap(),
            Agent {
                node: "node-a".into(),
                pod: "observer-x".into(),
                url: "http://10.0.0.5:9465/flows".into(),
                ..Default::default()
            }
        );
        let v6 = pod(
            "metadata: {name: y}\nspec: {nodeName: n, containers: [{name: a, ports: [{name: flows, containerPort: 9465}]}]}\nstatus: {phase: Running, podIP: 'fd00::5'}",
        );
        assert_eq!(agent_of(&v6).unwrap().url, "http://[fd00::5]:9465/flows");
        let no_port = pod(
            "metadata: {name: z}\nspec: {nodeName: n, containers: [{name: a}]}\nstatus: {phase: Running, podIP: 10.0.0.6}",
        );
        assert!(
            agent_of(&no_port)
                .unwrap_err()
                .contains("no container port named flows")
        );
        let pending = pod(
            "metadata: {name: w}\nspec: {nodeName: n, containers: [{name: a}]}\nstatus: {phase: Pending}",
        );
        assert!(agent_of(&pending).unwrap_err().contains("not running"));
    }
}
