//! What the agent settles before its pipeline starts: the network namespace it observes, the
//! names it writes into records, the pin directory it owns, and the node's uplinks and cgroup.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use log::{info, warn};

use super::AgentError;
use crate::{
    cli::{AgentArgs, FlowsAuthMode},
    export::flows_auth::{self, Reviewer},
    hooks::{
        ifaces,
        pin::{self, PinDir},
        preflight,
    },
    names::Names,
};

/// With `--lab NAME`: what the lab's names file says of this node's agent fills the flags not
/// given (its network namespace, the names file, where /flows listens and the token it wants).
pub fn with_lab(args: &mut AgentArgs) -> anyhow::Result<()> {
    let Some(lab) = &args.lab else {
        return Ok(());
    };
    let entry = crate::lab::agent_of(lab, &args.node)?;
    if args.netns.is_none() {
        args.netns = entry.netns.clone();
    }
    if args.names.is_none() && args.kubeconfig.is_none() && !args.kubernetes {
        args.names = Some(crate::lab::names_path(lab));
    }
    if args.flows_addr.is_none() {
        args.flows_addr = Some(crate::lab::listen_addr(&entry)?);
        if args.flows_token_file.is_none() {
            args.flows_token_file = entry.token_file.as_ref().map(PathBuf::from);
        }
    }
    info!(
        "lab {lab}, node {}: network namespace {}, /flows at {}",
        args.node,
        args.netns.as_deref().unwrap_or("(this one)"),
        entry.flows
    );
    Ok(())
}

/// The flags that go together for /flows, checked before anything starts.
pub fn check_flows_args(args: &AgentArgs) -> Result<(), AgentError> {
    let Some(addr) = args.flows_addr else {
        return Ok(());
    };
    let why = match (args.flows_auth, &args.flows_token_file) {
        (FlowsAuthMode::Token, None) => {
            "needs --flows-token-file (or --flows-auth kubernetes): /flows is never open to all"
        }
        (FlowsAuthMode::Kubernetes, Some(_)) => {
            "--flows-token-file is for --flows-auth token; with kubernetes the API server checks tokens"
        }
        (FlowsAuthMode::Kubernetes, None) if args.kubeconfig.is_none() && !args.kubernetes => {
            "--flows-auth kubernetes needs --kubernetes or --kubeconfig"
        }
        _ => return Ok(()),
    };
    Err(AgentError::FlowsArgs(format!("--flows-addr {addr}: {why}")))
}

/// What the Kubernetes thread serves the agent: names for records and, with `--flows-auth
/// kubernetes`, reviews of /flows readers' tokens.
pub struct FromKubernetes {
    pub names: Arc<RwLock<Names>>,
    pub reviewer: Option<Reviewer>,
}

/// Names for records: from a names file, from Kubernetes (watched on a thread of its own, started
/// before `--netns` moves the agent, so it reaches the API from the host's network), or none.
/// The same thread asks the API about /flows readers' tokens.
pub fn names(args: &AgentArgs) -> Result<FromKubernetes, AgentError> {
    if let Some(file) = &args.names {
        return Ok(FromKubernetes {
            names: Arc::new(RwLock::new(Names::from_file(file)?)),
            reviewer: None,
        });
    }
    let shared = Arc::new(RwLock::new(Names::default()));
    if args.kubeconfig.is_none() && !args.kubernetes {
        return Ok(FromKubernetes {
            names: shared,
            reviewer: None,
        });
    }
    let (reviewer, reviews) = match (args.flows_addr, args.flows_auth) {
        (Some(_), FlowsAuthMode::Kubernetes) => {
            let (r, q) = flows_auth::reviewer(&args.flows_token_audience);
            (Some(r), Some(q))
        }
        _ => (None, None),
    };
    let path = args.kubeconfig.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let names = shared.clone();
    std::thread::Builder::new()
        .name("kube-names".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                match crate::names::kube::client(path.as_deref()).await {
                    Ok(c) => {
                        let _ = tx.send(Ok(()));
                        if let Some(q) = reviews {
                            tokio::spawn(flows_auth::serve_reviews(c.clone(), q));
                        }
                        crate::names::kube::watch(c, names).await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        })
        .map_err(AgentError::Thread)?;
    match rx.recv() {
        Ok(Ok(())) => Ok(FromKubernetes {
            names: shared,
            reviewer,
        }),
        Ok(Err(e)) => Err(AgentError::Kube(e)),
        Err(_) => Err(AgentError::Kube(crate::names::kube::KubeError::Config(
            "the Kubernetes thread stopped".into(),
        ))),
    }
}

/// The pin directory this agent owns, if it pins. Taken before `--netns` moves the agent, so
/// the ownership lock lives in the host's network namespace, where every agent sees it.
pub fn pin_dir(args: &AgentArgs) -> Result<Option<PinDir>, AgentError> {
    if args.no_pin {
        return Ok(None);
    }
    let dir = match &args.pin_dir {
        Some(d) => d.clone(),
        None => {
            let own = match &args.netns {
                Some(ns) => Path::new(ns)
                    .file_name()
                    .map_or_else(|| ns.clone(), |n| n.to_string_lossy().into_owned()),
                None => "host".to_owned(),
            };
            let mut dir = Path::new(pin::DEFAULT_ROOT).join(own);
            // Under `ip netns exec` /sys is a sysfs of its own: the host's bpffs is still there.
            let host = preflight::host_path(&dir);
            if !pin::on_bpffs(&dir) && pin::on_bpffs(&host) {
                info!("no bpf filesystem here (ip netns exec?); pinning in the host's");
                dir = host;
            }
            if !pin::on_bpffs(&dir) {
                warn!(
                    "{} is not on a bpf filesystem: open flows' counters will not survive a \
                     restart (mount bpffs there, or pass --pin-dir or --no-pin)",
                    dir.display()
                );
                return Ok(None);
            }
            dir
        }
    };
    let pin = PinDir::acquire(&dir, args.pin_wait)?;
    info!("flow map pinned in {}", pin.dir().display());
    Ok(Some(pin))
}

/// Where the agent attaches on this node.
pub struct Targets {
    pub uplinks: Vec<String>,
    /// The cgroup of the socket hooks, unless they are off.
    pub cgroup: Option<PathBuf>,
}

/// The /flows token must be there and not empty; one others can read is a warning (a mounted
/// Secret is 0644 unless its `defaultMode` says otherwise).
fn check_flows_token(path: &std::path::Path) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt as _;
    let err = |why: String| AgentError::FlowsToken {
        path: path.to_owned(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    if text.trim().len() < 16 {
        return Err(err(
            "the token must be at least 16 characters (e.g. `head -c 32 /dev/urandom | base64`)"
                .into(),
        ));
    }
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o004 != 0
    {
        warn!(
            "{} is readable by every user of this machine (mode {:o}): give it mode 0600 or 0640",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    Ok(())
}

/// Capabilities, the /flows token, BTF, the uplinks and the cgroup: everything that can be
/// refused with a clear error before anything is loaded.
pub fn preflight(args: &AgentArgs) -> Result<Targets, AgentError> {
    preflight::check_capabilities()?;
    if let Some(path) = &args.flows_token_file {
        check_flows_token(path)?;
    }
    if !preflight::has_btf() {
        warn!(
            "/sys/kernel/btf/vmlinux is missing: this release works without it, drop tracing will not"
        );
    }
    let uplinks = if args.uplinks.is_empty() {
        ifaces::default_uplinks()
    } else {
        args.uplinks.clone()
    };
    if uplinks.is_empty() {
        return Err(AgentError::NoUplink);
    }
    for u in &uplinks {
        preflight::check_interface(u)?;
    }
    let cgroup = if args.no_socket_hooks {
        None
    } else {
        let path = match &args.cgroup {
            Some(p) => p.clone(),
            None => preflight::cgroup2_mount()?,
        };
        preflight::check_cgroup2(&path)?;
        Some(path)
    };
    Ok(Targets { uplinks, cgroup })
}
