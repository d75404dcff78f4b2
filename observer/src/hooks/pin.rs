//! Flow counters that outlive the agent.
//!
//! `FLOWS` is pinned as `<pin dir>/FLOWS` on a bpf filesystem, so a restarted or crashed agent
//! adopts what the kernel counted before it. Programs are not pinned: their links die with the
//! agent, so nothing keeps running without it and nothing is ever attached twice.
//!
//! Ownership rule: one agent per pin directory, held through an abstract unix socket named after
//! the directory (the kernel releases it when the agent exits, even on a crash; a new agent
//! waits for it, as in a rolling update). A pinned map of another layout or size (an upgrade that
//! changed `FlowKey`, another `--max-flows`) is replaced, and the agent says so.

use std::{
    io,
    os::{
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixListener},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::maps::{MapInfo, MapType};
use log::{info, warn};
use observer_common::{CtOrig, FlowCounters, FlowKey, ct_orig_entries};

/// Where agents pin by default; one subdirectory per agent.
pub use observer_common::PIN_ROOT as DEFAULT_ROOT;
/// The pinned maps' file names (the maps' own names, as libbpf pins by name).
use observer_common::{CT_ORIG_PIN as CT_ORIG, FLOWS_PIN as FLOWS};
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "{0} is not on a bpf filesystem: mount one (`mount -t bpf bpf /sys/fs/bpf`) or pass --no-pin"
    )]
    NotBpffs(PathBuf),
    #[error("another agent still owns {dir} after {waited:?}: give each agent its own --pin-dir")]
    Busy { dir: PathBuf, waited: Duration },
    #[error("creating pin directory {dir}: {source}")]
    Create {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("taking ownership of {dir}: {source}")]
    Lock {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A pin directory this agent owns for as long as the value lives.
#[derive(Debug)]
pub struct PinDir {
    dir: PathBuf,
    _owner: UnixListener,
}

/// Whether `path`, or its closest existing ancestor, is on a bpf filesystem.
pub fn on_bpffs(path: &Path) -> bool {
    let Some(existing) = path.ancestors().find(|p| p.exists()) else {
        return false;
    };
    let Ok(c) = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills a struct we own; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

impl PinDir {
    /// Take ownership of `dir`, waiting up to `wait` for the agent that holds it to exit.
    pub fn acquire(dir: &Path, wait: Duration) -> Result<PinDir, PinError> {
        if !on_bpffs(dir) {
            return Err(PinError::NotBpffs(dir.to_owned()));
        }
        let lock_err = |source| PinError::Lock {
            dir: dir.to_owned(),
            source,
        };
        let addr = SocketAddr::from_abstract_name(lock_name(dir)).map_err(lock_err)?;
        let start = Instant::now();
        let mut told = false;
        let owner = loop {
            match UnixListener::bind_addr(&addr) {
                Ok(l) => break l,
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                    if start.elapsed() >= wait {
                        return Err(PinError::Busy {
                            dir: dir.to_owned(),
                            waited: wait,
                        });
                    }
                    if !told {
                        info!("waiting for the agent that owns {} to exit", dir.display());
                        told = true;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(lock_err(e)),
            }
        };
        // Only root reads or writes the pins: the directory is 0700 whatever the umask, and
        // the kernel creates each pinned map file 0600 (`bpf_obj_do_pin`, kernel/bpf/inode.c).
        let create = || -> io::Result<()> {
            use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            // fchmod on the open directory: chmod(2) by path is not in the DaemonSet's seccomp
            // profile (deploy/base/seccomp-observer.json), fchmod(2) is.
            std::fs::File::open(dir)?.set_permissions(std::fs::Permissions::from_mode(0o700))
        };
        create().map_err(|source| PinError::Create {
            dir: dir.to_owned(),
            source,
        })?;
        Ok(PinDir {
            dir: dir.to_owned(),
            _owner: owner,
        })
    }

    pub fn flows(&self) -> PathBuf {
        self.dir.join(FLOWS)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The conntrack tuples noted for the pinned flows' keys, pinned beside them so a restarted
    /// agent still joins what it adopts by the kernel's NAT state.
    pub fn ct_orig(&self) -> PathBuf {
        self.dir.join(CT_ORIG)
    }

    /// Remove a pinned flow map this build cannot use as it is, so the loader creates a new one.
    pub fn drop_incompatible_flows(&self, max_entries: u32) {
        self.drop_incompatible(
            &self.flows(),
            MapType::PerCpuHash,
            (
                size_of::<FlowKey>() as u32,
                size_of::<FlowCounters>() as u32,
                max_entries,
            ),
        );
    }

    /// The same for the pinned conntrack tuples.
    pub fn drop_incompatible_ct_orig(&self, max_flows: u32) {
        self.drop_incompatible(
            &self.ct_orig(),
            MapType::Hash,
            (
                size_of::<FlowKey>() as u32,
                size_of::<CtOrig>() as u32,
                ct_orig_entries(max_flows),
            ),
        );
    }

    fn drop_incompatible(&self, path: &Path, kind: MapType, want: (u32, u32, u32)) {
        let Ok(info) = MapInfo::from_pin(path) else {
            return;
        };
        let have = (info.key_size(), info.value_size(), info.max_entries());
        if info.map_type().is_ok_and(|t| t == kind) && have == want {
            return;
        }
        warn!(
            "replacing {}: pinned with (key, value, entries) = {have:?}, this agent needs {want:?}; \
             what it held is dropped",
            path.display()
        );
        if let Err(e) = std::fs::remove_file(path) {
            warn!("removing {}: {e}", path.display());
        }
    }
}

/// Abstract socket names are at most 107 bytes; long directories are hashed.
fn lock_name(dir: &Path) -> Vec<u8> {
    let d = dir.as_os_str().as_encoded_bytes();
    let mut name = b"observer-pin:".to_vec();
    if d.len() <= 90 {
        name.extend_from_slice(d);
    } else {
        // FNV-1a: stable across builds, unlike std's hasher.
        let h = d.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        name.extend_from_slice(format!("{h:016x}").as_bytes());
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_names_fit_an_abstract_socket() {
        let short = lock_name(Path::new("/sys/fs/bpf/observer/host"));
        assert_eq!(short, b"observer-pin:/sys/fs/bpf/observer/host");
        let long = lock_name(&Path::new("/sys/fs/bpf").join("x".repeat(200)));
        assert!(long.len() <= 107);
        assert_ne!(
            long,
            lock_name(&Path::new("/sys/fs/bpf").join("y".repeat(200)))
        );
    }

    #[test]
    fn a_plain_directory_is_not_bpffs() {
        assert!(!on_bpffs(Path::new("/tmp")));
    }
}
