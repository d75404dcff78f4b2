//! `--lb socket`: a socket-level load balancer like Cilium's and Calico's eBPF kube-proxy
//! replacements, IPv4 and IPv6. cgroup programs (`observer-lab-ebpf`) attached at the cgroup v2
//! root rewrite a
//! ClusterIP:port to a backend in connect() and sendmsg() and show UDP replies as coming from the
//! ClusterIP in recvmsg(), so no packet ever carries the ClusterIP and conntrack knows nothing of
//! it. They act only in the lab's pod namespaces (by netns cookie). kube-proxy's iptables rules
//! stay for what does not pass a pod's socket (a NodePort from outside, a node's own processes),
//! as with Cilium's socket LB beside kube-proxy.
//!
//! The links and maps are pinned in a bpf filesystem of the lab's own, mounted in its state
//! directory (`/run/observer-lab/<lab>/bpf`), so they outlive `observer-lab up`; `down` removes
//! the pins, which detaches the programs, and unmounts it.

use std::{
    fs::File,
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData},
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};

#[path = "../../observer-lab-ebpf/src/types.rs"]
#[allow(dead_code, reason = "the kernel side's sizes, shared by path")]
mod types;

use types::{LbAddr, LbBackendKey, LbService};

use crate::{LabError, config::LabConfig, model::Protocol};

// SAFETY: plain-old-data, repr(C), explicit padding.
unsafe impl aya::Pod for LbAddr {}
unsafe impl aya::Pod for LbService {}
unsafe impl aya::Pod for LbBackendKey {}

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer-lab-ebpf"));

const PROGRAMS: [&str; 6] = [
    "lb_connect4",
    "lb_connect6",
    "lb_sendmsg4",
    "lb_sendmsg6",
    "lb_recvmsg4",
    "lb_recvmsg6",
];
const MAPS: [&str; 4] = ["LB_SERVICES", "LB_BACKENDS", "LB_REVERSE", "LB_NETNS"];

#[derive(Debug, thiserror::Error)]
pub enum SocketLbError {
    #[error(
        "this observer-lab was built without its kernel program (the eBPF toolchain was not \
         installed yet); `cargo xtask build` builds it"
    )]
    NotBuilt,
    #[error("loading the socket load balancer: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("socket load balancer program {0}: {1}")]
    Program(&'static str, aya::programs::ProgramError),
    #[error("socket load balancer map {0}: {1}")]
    Map(&'static str, aya::maps::MapError),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("netns cookie of {0}: {1}")]
    Cookie(String, std::io::Error),
}

fn pin_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("bpf")
}

/// The first cgroup v2 mount (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a hybrid host).
fn cgroup2_root() -> Result<PathBuf, SocketLbError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| SocketLbError::Io("/proc/self/mountinfo".into(), e))?;
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .ok_or_else(|| {
            SocketLbError::Io(
                "/proc/self/mountinfo".into(),
                std::io::Error::other("no cgroup v2 mount: the socket load balancer needs one"),
            )
        })
}

/// Load, fill and attach the balancer for the lab whose state lives in `state_dir`; pins
/// everything in a bpf filesystem mounted there.
pub fn up(state_dir: &Path, cfg: &LabConfig, namespaces: &[String]) -> Result<(), LabError> {
    if OBJECT.is_empty() {
        return Err(SocketLbError::NotBuilt.into());
    }
    let dir = pin_dir(state_dir);
    std::fs::create_dir_all(&dir).map_err(|e| SocketLbError::Io(dir.clone(), e))?;
    crate::netns::run(&["mount", "-t", "bpf", "bpf", &dir.to_string_lossy()])?;
    let mut ebpf = Ebpf::load(OBJECT).map_err(SocketLbError::Load)?;
    for name in MAPS {
        let map = ebpf.map_mut(name).expect("in the object");
        map.pin(dir.join(name))
            .map_err(|e| SocketLbError::Io(dir.join(name), std::io::Error::other(e)))?;
    }
    sync(state_dir, cfg, namespaces)?;
    let root = cgroup2_root()?;
    let cgroup = File::open(&root).map_err(|e| SocketLbError::Io(root.clone(), e))?;
    for name in PROGRAMS {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .expect("in the object")
            .try_into()
            .map_err(|e| SocketLbError::Program(name, e))?;
        prog.load().map_err(|e| SocketLbError::Program(name, e))?;
        let id = prog
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|e| SocketLbError::Program(name, e))?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(|e| SocketLbError::Program(name, e))?
            .try_into()
            .map_err(|e| SocketLbError::Io(dir.join(name), std::io::Error::other(e)))?;
        link.pin(dir.join(name))
            .map_err(|e| SocketLbError::Io(dir.join(name), std::io::Error::other(e)))?;
    }
    Ok(())
}

/// Rewrite the maps from the lab's description: every IPv4 Service port with endpoints, and
/// the pod namespaces the balancer acts in.
pub fn sync(state_dir: &Path, cfg: &LabConfig, namespaces: &[String]) -> Result<(), LabError> {
    let dir = pin_dir(state_dir);
    let mut services: HashMap<MapData, LbAddr, LbService> = emptied(&dir, "LB_SERVICES")?;
    let mut backends: HashMap<MapData, LbBackendKey, LbAddr> = emptied(&dir, "LB_BACKENDS")?;
    let mut reverse: HashMap<MapData, LbAddr, LbAddr> = emptied(&dir, "LB_REVERSE")?;
    let mut netns: HashMap<MapData, u64, u8> = emptied(&dir, "LB_NETNS")?;
    let mut id = 0u32;
    for s in &cfg.services {
        let eps = cfg.endpoint_ips(s, s.cluster_ip.is_ipv6());
        for p in &s.ports {
            let proto = match p.protocol {
                Protocol::Tcp => 6,
                Protocol::Udp => 17,
            };
            let front = addr(s.cluster_ip, p.port, proto);
            for (index, ep) in eps.iter().enumerate() {
                let back = addr(*ep, p.target_port, proto);
                backends
                    .insert(
                        LbBackendKey {
                            id,
                            index: index as u32,
                        },
                        back,
                        0,
                    )
                    .map_err(|e| SocketLbError::Map("LB_BACKENDS", e))?;
                if proto == 17 {
                    reverse
                        .insert(back, front, 0)
                        .map_err(|e| SocketLbError::Map("LB_REVERSE", e))?;
                }
            }
            services
                .insert(
                    front,
                    LbService {
                        id,
                        count: eps.len() as u32,
                    },
                    0,
                )
                .map_err(|e| SocketLbError::Map("LB_SERVICES", e))?;
            id += 1;
        }
    }
    for ns in namespaces {
        netns
            .insert(cookie(ns)?, 1, 0)
            .map_err(|e| SocketLbError::Map("LB_NETNS", e))?;
    }
    Ok(())
}

/// The pinned hash map `name`, opened and emptied.
fn emptied<K: aya::Pod, V: aya::Pod>(
    dir: &Path,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, SocketLbError> {
    let data = MapData::from_pin(dir.join(name)).map_err(|e| SocketLbError::Map(name, e))?;
    let mut m: HashMap<MapData, K, V> =
        HashMap::try_from(Map::HashMap(data)).map_err(|e| SocketLbError::Map(name, e))?;
    let keys: Vec<K> = m.keys().filter_map(Result::ok).collect();
    for k in keys {
        let _ = m.remove(&k);
    }
    Ok(m)
}

/// As `bpf_sock_addr` holds them: the address's bytes in memory order (`user_ip4`, or the four
/// words of `user_ip6`), the port in network order.
fn addr(ip: IpAddr, port: u16, proto: u8) -> LbAddr {
    let word = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    let (ip, family) = match ip {
        IpAddr::V4(v) => ([word(&v.octets()), 0, 0, 0], 4),
        IpAddr::V6(v) => {
            let o = v.octets();
            (
                [
                    word(&o[0..4]),
                    word(&o[4..8]),
                    word(&o[8..12]),
                    word(&o[12..16]),
                ],
                6,
            )
        }
    };
    LbAddr {
        ip,
        port: port.to_be(),
        proto,
        family,
    }
}

/// The kernel's cookie of network namespace `ns` (`SO_NETNS_COOKIE`, Linux 5.14), from a socket
/// made inside it on a thread of its own (setns changes only the calling thread).
fn cookie(ns: &str) -> Result<u64, SocketLbError> {
    let path = Path::new("/run/netns").join(ns);
    let err = |e: std::io::Error| SocketLbError::Cookie(ns.to_owned(), e);
    let f = File::open(&path).map_err(err)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: plain syscalls on fds we own; the thread ends right after.
            unsafe {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
                if sock < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let mut cookie = 0u64;
                let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
                const SO_NETNS_COOKIE: libc::c_int = 71;
                let r = libc::getsockopt(
                    sock,
                    libc::SOL_SOCKET,
                    SO_NETNS_COOKIE,
                    (&mut cookie as *mut u64).cast(),
                    &mut len,
                );
                libc::close(sock);
                if r != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(cookie)
            }
        })
        .join()
        .expect("the cookie thread does not panic")
    })
    .map_err(err)
}

/// Remove the pins (the links go, and with them the programs) and the lab's bpf filesystem.
pub fn down(state_dir: &Path) {
    let dir = pin_dir(state_dir);
    if !dir.exists() {
        return;
    }
    for name in PROGRAMS.iter().chain(MAPS.iter()) {
        let _ = std::fs::remove_file(dir.join(name));
    }
    let _ = crate::netns::run(&["umount", &dir.to_string_lossy()]);
    let _ = std::fs::remove_dir(&dir);
}
