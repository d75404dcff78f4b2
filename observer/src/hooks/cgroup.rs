//! cgroup socket hooks: connect4/6 and sendmsg4/6 (what the app asked for) and cgroup_skb egress
//! (the socket's first packet, which carries the source port).

use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, ProgramError},
};

use super::HookError;

/// With their `enum bpf_attach_type` (include/uapi/linux/bpf.h).
const SOCK_ADDR_PROGRAMS: [(&str, u32); 4] = [
    ("sock_connect4", 10),
    ("sock_connect6", 11),
    ("sock_sendmsg4", 14),
    ("sock_sendmsg6", 15),
];
const SKB_PROGRAM: &str = "sock_egress";

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, HookError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(HookError::Program {
            name,
            source: ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(|source| HookError::Program { name, source })
}

/// Attached through `bpf_link` (kernel 5.7+), which the kernel always runs in multi-program mode:
/// other agents and tools on the same cgroup keep their programs. The sock_addr programs go
/// first ([`first`]), so that what they see is what the application asked for. Returns the links
/// made that way (closing them detaches); the others live in the object.
pub fn attach(ebpf: &mut Ebpf, path: &Path) -> Result<Vec<OwnedFd>, HookError> {
    let cgroup = File::open(path).map_err(|source| HookError::Cgroup {
        path: path.to_owned(),
        source,
    })?;
    let target = path.display().to_string();
    let mut links = Vec::new();
    let mut order = Order::PreorderFirst;
    for (name, attach_type) in SOCK_ADDR_PROGRAMS {
        let prog: &mut CgroupSockAddr = program(ebpf, name)?;
        prog.load()
            .map_err(|source| HookError::Program { name, source })?;
        let fd = prog
            .fd()
            .map_err(|source| HookError::Program { name, source })?;
        match first(fd.as_fd(), cgroup.as_fd(), attach_type, &mut order) {
            Some(link) => links.push(link),
            // `Single` is aya's "no flags": a plain link after the others.
            None => {
                prog.attach(&cgroup, CgroupAttachMode::Single)
                    .map_err(|source| HookError::Attach {
                        hook: name,
                        target: target.clone(),
                        source,
                    })?;
            }
        }
    }
    log::info!("cgroup sock_addr programs: {}", order.describe());
    let prog: &mut CgroupSkb = program(ebpf, SKB_PROGRAM)?;
    prog.load().map_err(|source| HookError::Program {
        name: SKB_PROGRAM,
        source,
    })?;
    prog.attach(
        &cgroup,
        CgroupSkbAttachType::Egress,
        CgroupAttachMode::Single,
    )
    .map_err(|source| HookError::Attach {
        hook: SKB_PROGRAM,
        target,
        source,
    })?;
    Ok(links)
}

/// Where the sock_addr programs run among the cgroup's programs. A socket load balancer (Cilium's
/// or Calico's kube-proxy replacement) is a sock_addr program too; run after it, ours would see
/// the backend it chose, not the ClusterIP the application asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Order {
    /// `BPF_F_PREORDER | BPF_F_BEFORE` (Linux 6.15 and 6.16): before every program of the root
    /// and of the cgroups below it.
    PreorderFirst,
    /// `BPF_F_BEFORE` only: first among the root's programs; one on a deeper cgroup runs before.
    First,
    /// Older kernels: after the programs attached before the agent.
    Appended,
}

impl Order {
    fn describe(self) -> &'static str {
        match self {
            Order::PreorderFirst => {
                "first, before any other on this cgroup or below (BPF_F_PREORDER | BPF_F_BEFORE)"
            }
            Order::First => {
                "first among this cgroup's programs (BPF_F_BEFORE); a program on a deeper cgroup runs before"
            }
            Order::Appended => {
                "in attach order (this kernel has no BPF_F_BEFORE for cgroups): a socket load balancer attached before the agent hides what apps asked for"
            }
        }
    }
}

// include/uapi/linux/bpf.h
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_F_BEFORE: u32 = 1 << 3;
const BPF_F_PREORDER: u32 = 1 << 6;

/// `BPF_LINK_CREATE` for `prog` on `cgroup`, ordered first (kernel `kernel/bpf/cgroup.c`,
/// `cgroup_bpf_link_attach` with mprog's relative ordering; `relative_fd` 0 with
/// `BPF_F_BEFORE` is "before all"). Steps down `order` as the kernel refuses flags; `None` when
/// it refuses both.
fn first(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
    order: &mut Order,
) -> Option<OwnedFd> {
    loop {
        let flags = match order {
            Order::PreorderFirst => BPF_F_PREORDER | BPF_F_BEFORE,
            Order::First => BPF_F_BEFORE,
            Order::Appended => return None,
        };
        // link_create: prog_fd, target_fd, attach_type, flags, then cgroup.{relative_fd,
        // expected_revision}; the rest zero.
        let mut attr = [0u32; 16];
        attr[0] = prog.as_raw_fd() as u32;
        attr[1] = cgroup.as_raw_fd() as u32;
        attr[2] = attach_type;
        attr[3] = flags;
        // SAFETY: bpf(2) with a zeroed attr of the size we pass.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_LINK_CREATE,
                attr.as_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        if fd >= 0 {
            // SAFETY: the kernel returned a new fd that nothing else owns.
            return Some(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        }
        *order = match order {
            Order::PreorderFirst => Order::First,
            _ => Order::Appended,
        };
    }
}
