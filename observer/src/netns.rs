//! Entering a network namespace by `ip netns` name or path: the agent's `--netns`, and the
//! record readers' (`observe`, `explain`) when the agents are reachable only from inside one.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[error("entering network namespace {path} (needs CAP_SYS_ADMIN): {source}")]
pub struct NetnsError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Move the calling thread into the network namespace `spec` (a name under /run/netns, or a
/// path). Threads started afterwards by this one are there too; others are not, so the agent
/// calls it before its runtime starts.
pub fn enter(spec: &str) -> Result<(), NetnsError> {
    let path = if spec.contains('/') {
        PathBuf::from(spec)
    } else {
        PathBuf::from("/run/netns").join(spec)
    };
    let err = |source| NetnsError {
        path: path.clone(),
        source,
    };
    let f = std::fs::File::open(&path).map_err(err)?;
    // SAFETY: setns on an fd we own.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}
