//! Checks that turn kernel refusals into one line a user can act on.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "missing capabilities: {0}. Run as root, or grant them (DaemonSet: securityContext.capabilities.add)"
    )]
    Capabilities(String),
    #[error(
        "{0} is not a cgroup v2 directory (mount cgroup2, or pass --cgroup with a cgroup v2 path)"
    )]
    NotCgroup2(PathBuf),
    #[error(
        "no cgroup v2 mount found in /proc/self/mountinfo, nor the host's through /proc/1/root, and none could be mounted here (in a container, mount the host's /sys/fs/cgroup, or share the host's PID namespace), or pass --cgroup PATH or --no-socket-hooks"
    )]
    NoCgroup2,
    #[error("interface {0} does not exist in this network namespace")]
    NoInterface(String),
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// CAP_BPF (load programs, create maps), CAP_PERFMON (pointer arithmetic in programs, reading
/// kernel time), CAP_NET_ADMIN (tc and cgroup attachment). CAP_SYS_ADMIN stands in for BPF and
/// PERFMON on older kernels.
pub fn check_capabilities() -> Result<(), PreflightError> {
    let eff = effective_caps();
    let has = |c: u32| eff & (1u64 << c) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PreflightError::Capabilities(missing.join(", ")))
    }
}

/// The first mount point of `fstype` in a mountinfo table (proc(5)).
pub fn mount_of(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        // `... mountpoint options - fstype source superopts`
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next()? == fstype)
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// `path` of the host's mount namespace (init's), reached through /proc/1/root: what a process
/// in a mount namespace of its own (`ip netns exec`, a container sharing the host's PID
/// namespace) sees of the host's mounts.
pub fn host_path(path: &Path) -> PathBuf {
    Path::new("/proc/1/root").join(path.strip_prefix("/").unwrap_or(path))
}

/// The cgroup v2 hierarchy: the first cgroup2 mount here, else the host's. `ip netns exec`
/// mounts a sysfs of its own over /sys, hiding /sys/fs/cgroup; the hierarchy is the same one
/// through the host's mount (cgroup namespaces aside).
pub fn cgroup2_mount() -> Result<PathBuf, PreflightError> {
    let own = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if let Some(p) = mount_of(&own, "cgroup2") {
        return Ok(p);
    }
    let host = std::fs::read_to_string("/proc/1/mountinfo").unwrap_or_default();
    if let Some(p) = mount_of(&host, "cgroup2").map(|m| host_path(&m))
        && check_cgroup2(&p).is_ok()
    {
        log::info!(
            "no cgroup v2 mount here (ip netns exec?); using the host's: {}",
            p.display()
        );
        return Ok(p);
    }
    mount_own_cgroup2()
}

/// In a mount namespace of its own (`ip netns exec` makes one, whose mounts do not propagate
/// back), mount the cgroup v2 hierarchy where it belongs: the mount goes with the namespace and
/// the host's mounts are untouched. Never in the parent's namespace.
fn mount_own_cgroup2() -> Result<PathBuf, PreflightError> {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() }.to_string();
    let own = ns("self");
    if own.is_none() || own == ns(&parent) {
        return Err(PreflightError::NoCgroup2);
    }
    let dir = Path::new("/sys/fs/cgroup");
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (fstype, target) = (c("cgroup2"), c("/sys/fs/cgroup"));
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: mount(2) with NUL-terminated strings we own and no data.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        log::warn!(
            "mounting cgroup2 on /sys/fs/cgroup in this mount namespace: {}",
            std::io::Error::last_os_error()
        );
        return Err(PreflightError::NoCgroup2);
    }
    log::info!(
        "no cgroup v2 mount here (ip netns exec?): mounted it on /sys/fs/cgroup in this process's own mount namespace"
    );
    check_cgroup2(dir)?;
    Ok(dir.to_owned())
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

pub fn check_cgroup2(path: &Path) -> Result<(), PreflightError> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| PreflightError::NotCgroup2(path.to_owned()))?;
    // SAFETY: statfs writes into the zeroed struct we pass.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 || st.f_type as i64 != CGROUP2_SUPER_MAGIC {
        return Err(PreflightError::NotCgroup2(path.to_owned()));
    }
    Ok(())
}

pub fn check_interface(name: &str) -> Result<(), PreflightError> {
    super::ifaces::index_of(name)
        .map(|_| ())
        .ok_or_else(|| PreflightError::NoInterface(name.to_owned()))
}

/// BTF is not needed by this release's programs (no CO-RE, no BTF tracepoints), but the drop
/// tracepoint planned next will need it; report its absence early.
pub fn has_btf() -> bool {
    Path::new("/sys/kernel/btf/vmlinux").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_by_type() {
        let info = "22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw\n\
                    30 22 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                    31 22 0:27 / /sys/fs/bpf rw - bpf bpf rw,mode=700\n";
        assert_eq!(
            mount_of(info, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(mount_of(info, "bpf"), Some(PathBuf::from("/sys/fs/bpf")));
        assert_eq!(mount_of(info, "tmpfs"), None);
        assert_eq!(
            host_path(Path::new("/sys/fs/cgroup")),
            PathBuf::from("/proc/1/root/sys/fs/cgroup")
        );
    }
}
