//! Hooks: load the kernel programs, attach them, follow pod veths as they come and go, detach.
//!
//! Ownership rule: every attachment is a kernel link (tcx or cgroup `bpf_link`) held by this
//! process, so the kernel detaches it when the agent exits, even on a crash. In clsact mode the
//! filters are removed explicitly, and the qdisc too when this agent added it. Only the flow map
//! outlives the agent, pinned (see [`pin`]).

mod btf;
mod cgroup;
pub mod drop;
pub mod filter;
pub mod follow;
pub mod ifaces;
pub mod nat;
pub mod netlink;
mod object;
pub mod pin;
pub mod preflight;
mod tc;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf},
};
use log::{info, warn};
use observer_common::{FlowCounters, FlowKey, Point};

pub use object::load_detached;
pub use tc::TcAttachment;

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("loading the kernel programs failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("loading program {name} failed: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching {hook} to {target} failed: {source}")]
    Attach {
        hook: &'static str,
        target: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("kernel map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// How tc programs are attached (`--tc-mode`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcMode {
    /// tcx links where the kernel has them (6.6+), clsact otherwise.
    Auto,
    /// tcx links only.
    Tcx,
    /// clsact qdisc + direct-action filters (netlink); the qdisc is removed on exit if we added it.
    Clsact,
}

/// Maps the agent reads; taken out of the [`Ebpf`] so they can live in other tasks.
pub struct KernelMaps {
    pub flows: PerCpuHashMap<MapData, FlowKey, FlowCounters>,
    pub stats: PerCpuArray<MapData, u64>,
    pub socket_events: RingBuf<MapData>,
    pub drop_events: RingBuf<MapData>,
    /// Conntrack's original tuple of each new flow key at egress points.
    pub ct_orig: aya::maps::HashMap<MapData, FlowKey, observer_common::CtOrig>,
}

/// Whether the filter table's own view is measured (netfilter programs linked) or, when they
/// could not be, derived from the tc points around it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FilterStatus {
    Measured,
    /// Why not.
    Derived(String),
}

impl FilterStatus {
    pub fn measured(&self) -> bool {
        *self == FilterStatus::Measured
    }
}

/// What an interface is to us.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Role {
    Pod,
    Uplink,
}

impl Role {
    /// The name in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Pod => "pod",
            Role::Uplink => "uplink",
        }
    }

    /// (ingress point, egress point) for this role.
    pub fn points(self) -> [Point; 2] {
        match self {
            Role::Pod => [Point::PodIngress, Point::PodEgress],
            Role::Uplink => [Point::UplinkIngress, Point::UplinkEgress],
        }
    }
}

pub struct Hooks {
    ebpf: Ebpf,
    tc_mode: TcMode,
    /// Attached interfaces by name.
    attached: BTreeMap<String, TcAttachment>,
    /// cgroup links made outside aya (ordered first); closing them detaches.
    cgroup_links: Vec<std::os::fd::OwnedFd>,
    /// The netfilter programs around the filter table, when they could be linked.
    filter: Option<filter::FilterHooks>,
}

impl Hooks {
    /// Load the programs into the kernel and take the maps out.
    pub fn load(
        max_flows: u32,
        tc_mode: TcMode,
        drops: Option<&drop::DropConfig>,
        nat: Option<&nat::NatOffsets>,
        filter_offsets: Option<&filter::FilterOffsets>,
        pin: Option<&pin::PinDir>,
    ) -> Result<(Hooks, KernelMaps, FilterStatus), HookError> {
        let mut ebpf = object::load(max_flows, drops, nat, filter_offsets, pin)?;
        tc::load_all(&mut ebpf)?;
        // Loaded now, while every map is still in the object to relocate against.
        let (filter, filter_status) = match filter_offsets {
            None => (None, FilterStatus::Derived("no kernel offsets".into())),
            Some(_) => match filter::load(object::OBJECT, &ebpf) {
                Ok(f) => (Some(f), FilterStatus::Measured),
                Err(e) => (None, FilterStatus::Derived(e.to_string())),
            },
        };
        let maps = KernelMaps {
            flows: take_map(&mut ebpf, "FLOWS")?,
            stats: take_map(&mut ebpf, "STATS")?,
            socket_events: take_map(&mut ebpf, "SOCKET_EVENTS")?,
            drop_events: take_map(&mut ebpf, "DROP_EVENTS")?,
            ct_orig: take_map(&mut ebpf, "CT_ORIG")?,
        };
        let tc_mode = match tc_mode {
            TcMode::Auto if tc::tcx_supported() => TcMode::Tcx,
            TcMode::Auto => TcMode::Clsact,
            m => m,
        };
        info!("tc attach mode: {tc_mode:?}");
        Ok((
            Hooks {
                ebpf,
                tc_mode,
                attached: BTreeMap::new(),
                cgroup_links: Vec::new(),
                filter,
            },
            maps,
            filter_status,
        ))
    }

    /// Attach the socket hooks to `cgroup` in multi-program mode, so several agents (one per lab
    /// node) and other tools can share the cgroup root.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<(), HookError> {
        self.cgroup_links = cgroup::attach(&mut self.ebpf, cgroup)?;
        Ok(())
    }

    /// Link the netfilter programs around the filter table, if they were loaded. On failure
    /// they are unloaded and the status says why.
    pub fn attach_filter(&mut self, status: &mut FilterStatus) {
        if let Some(f) = &mut self.filter
            && let Err(e) = f.link()
        {
            *status = FilterStatus::Derived(e.to_string());
            self.filter = None;
        }
    }

    /// Attach the drop tracepoint (`tp_btf/kfree_skb`); the object must have been loaded with a
    /// [`drop::DropConfig`].
    pub fn attach_drops(&mut self) -> Result<(), HookError> {
        drop::attach(&mut self.ebpf)
    }

    pub fn attach_iface(&mut self, iface: &str, role: Role) -> Result<(), HookError> {
        if self.attached.contains_key(iface) {
            return Ok(());
        }
        let a = tc::attach(&mut self.ebpf, iface, role, self.tc_mode)?;
        info!(
            "attached {} programs to {iface} (ifindex {}, {:?})",
            role.as_str(),
            a.ifindex,
            self.tc_mode
        );
        self.attached.insert(iface.to_owned(), a);
        Ok(())
    }

    /// Forget an interface. `gone` says the kernel already removed it (and with it our links).
    pub fn detach_iface(&mut self, iface: &str, gone: bool) {
        if let Some(a) = self.attached.remove(iface)
            && let Err(e) = tc::detach(&mut self.ebpf, a, gone)
        {
            warn!("detaching from {iface}: {e}");
        }
    }

    pub fn attached(&self) -> &BTreeMap<String, TcAttachment> {
        &self.attached
    }

    /// Names of the pod interfaces attached now.
    pub fn pod_ifaces(&self) -> Vec<&str> {
        self.attached
            .iter()
            .filter(|(_, a)| a.role == Role::Pod)
            .map(|(n, _)| n.as_str())
            .collect()
    }
}

/// Every way a [`Hooks`] goes (an orderly stop, an error, a panic in the task that holds it)
/// detaches: clsact filters explicitly, links and the cgroup programs with the object.
impl Drop for Hooks {
    fn drop(&mut self) {
        let names: Vec<String> = self.attached.keys().cloned().collect();
        for name in names {
            self.detach_iface(&name, false);
        }
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, HookError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(HookError::MissingMap(name))?;
    T::try_from(map).map_err(|source| HookError::Map { name, source })
}
