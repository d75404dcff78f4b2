//! cgroup socket hooks: connect4/6 and sendmsg4/6 (what the app asked for) and cgroup_skb egress
//! (the socket's first packet, which carries the source port).

use std::{fs::File, path::Path};

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, ProgramError},
};

use super::HookError;

const SOCK_ADDR_PROGRAMS: [&str; 4] = [
    "sock_connect4",
    "sock_connect6",
    "sock_sendmsg4",
    "sock_sendmsg6",
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

/// Attached through `bpf_link` (kernel 5.7+), which the kernel always runs in multi-program mode
/// and which refuses any attach flag: `Single` is aya's "no flags". Other agents and tools on the
/// same cgroup keep their programs.
pub fn attach(ebpf: &mut Ebpf, path: &Path) -> Result<(), HookError> {
    let cgroup = File::open(path).map_err(|source| HookError::Cgroup {
        path: path.to_owned(),
        source,
    })?;
    let target = path.display().to_string();
    for name in SOCK_ADDR_PROGRAMS {
        let prog: &mut CgroupSockAddr = program(ebpf, name)?;
        prog.load()
            .map_err(|source| HookError::Program { name, source })?;
        prog.attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|source| HookError::Attach {
                hook: name,
                target: target.clone(),
                source,
            })?;
    }
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
    Ok(())
}
