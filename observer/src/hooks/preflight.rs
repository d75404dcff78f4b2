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
        "no cgroup v2 mount found in /proc/self/mountinfo (`ip netns exec` remounts /sys: use `observer agent --netns NAME` instead), or pass --cgroup PATH or --no-socket-hooks"
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

/// The first cgroup v2 mount point.
pub fn cgroup2_mount() -> Result<PathBuf, PreflightError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .find_map(|l| {
            // `... mountpoint options - fstype source superopts`
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .ok_or(PreflightError::NoCgroup2)
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
