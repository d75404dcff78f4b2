//! tc attachment: four classifier programs, two per interface (ingress + egress).

use aya::{
    Ebpf,
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions},
    },
    util::KernelVersion,
};
use log::warn;
use observer_common::Point;

use super::TcMode;
use super::{HookError, Role};

/// One attached interface: its links, and whether we added its clsact qdisc.
#[derive(Debug)]
pub struct TcAttachment {
    pub ifindex: u32,
    pub role: Role,
    links: Vec<(&'static str, TcAttachType, SchedClassifierLinkId)>,
    added_qdisc: bool,
    iface: String,
}

const PROGRAMS: [(Point, &str); 4] = [
    (Point::PodIngress, "tc_pod_ingress"),
    (Point::PodEgress, "tc_pod_egress"),
    (Point::UplinkIngress, "tc_uplink_ingress"),
    (Point::UplinkEgress, "tc_uplink_egress"),
];

fn program_name(point: Point) -> &'static str {
    PROGRAMS
        .iter()
        .find(|(p, _)| *p == point)
        .map(|(_, n)| *n)
        .expect("every point has a program")
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, HookError> {
    let prog = ebpf
        .program_mut(name)
        .ok_or(HookError::Program {
            name,
            source: ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(|source| HookError::Program { name, source })?;
    Ok(prog)
}

pub fn load_all(ebpf: &mut Ebpf) -> Result<(), HookError> {
    for (_, name) in PROGRAMS {
        classifier(ebpf, name)?
            .load()
            .map_err(|source| HookError::Program { name, source })?;
    }
    Ok(())
}

pub fn tcx_supported() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

pub fn attach(
    ebpf: &mut Ebpf,
    iface: &str,
    role: Role,
    mode: TcMode,
) -> Result<TcAttachment, HookError> {
    let ifindex = super::ifaces::index_of(iface).ok_or_else(|| HookError::Attach {
        hook: "tc",
        target: iface.to_owned(),
        source: ProgramError::IOError(std::io::Error::from_raw_os_error(libc::ENODEV)),
    })?;
    let mut added_qdisc = false;
    if mode == TcMode::Clsact {
        // EEXIST means someone else's clsact is there: use it, and leave it on exit.
        added_qdisc = tc::qdisc_add_clsact(iface).is_ok();
    }
    let mut a = TcAttachment {
        ifindex,
        role,
        links: Vec::with_capacity(2),
        added_qdisc,
        iface: iface.to_owned(),
    };
    let [ingress, egress] = role.points();
    for (point, attach_type) in [
        (ingress, TcAttachType::Ingress),
        (egress, TcAttachType::Egress),
    ] {
        let name = program_name(point);
        if mode == TcMode::Clsact {
            remove_leftover(iface, attach_type, name);
        }
        let options = match mode {
            TcMode::Clsact => TcAttachOptions::Netlink(NlOptions::default()),
            _ => TcAttachOptions::TcxOrder(LinkOrder::default()),
        };
        match classifier(ebpf, name)?.attach_with_options(iface, attach_type, options) {
            Ok(id) => a.links.push((name, attach_type, id)),
            Err(source) => {
                // Leave nothing half-attached behind.
                let _ = detach(ebpf, a, false);
                return Err(HookError::Attach {
                    hook: name,
                    target: iface.to_owned(),
                    source,
                });
            }
        }
    }
    Ok(a)
}

/// Remove our filters/links from the interface, and the qdisc if we added it.
pub fn detach(ebpf: &mut Ebpf, a: TcAttachment, gone: bool) -> Result<(), HookError> {
    for (name, _, id) in a.links {
        let res = classifier(ebpf, name)?.detach(id);
        if let Err(e) = res
            && !gone
        {
            warn!("detaching {name} from {}: {e}", a.iface);
        }
    }
    if a.added_qdisc && !gone {
        remove_clsact(&a.iface);
    }
    Ok(())
}

/// clsact filters are not links: a crashed agent's stay attached. A filter named after one of
/// our programs is ours (the ownership rule in clsact mode); remove it before attaching, so a
/// restart never runs a program twice.
fn remove_leftover(iface: &str, attach_type: TcAttachType, name: &str) {
    match tc::qdisc_detach_program(iface, attach_type, name) {
        Ok(()) => warn!("removed tc filter {name} on {iface}, left by a previous agent"),
        Err(tc::TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!("looking for a leftover {name} filter on {iface}: {e}"),
    }
}

/// aya has no qdisc delete; iproute2's `tc` does it.
fn remove_clsact(iface: &str) {
    match std::process::Command::new("tc")
        .args(["qdisc", "del", "dev", iface, "clsact"])
        .status()
    {
        Ok(s) if s.success() => {}
        Ok(s) => warn!("`tc qdisc del dev {iface} clsact` exited with {s}"),
        Err(e) => warn!("could not run `tc` to remove the clsact qdisc we added on {iface}: {e}"),
    }
}
