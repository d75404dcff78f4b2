//! Kernel timestamps (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) to wall-clock time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// realtime - monotonic, in ns, sampled once at start.
    offset_ns: i128,
}

fn gettime(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the struct we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

impl Clock {
    pub fn new() -> Clock {
        let mono = gettime(libc::CLOCK_MONOTONIC);
        let real = gettime(libc::CLOCK_REALTIME);
        Clock {
            offset_ns: real - mono,
        }
    }

    /// Now, on the kernel's clock.
    pub fn mono_now() -> u64 {
        gettime(libc::CLOCK_MONOTONIC) as u64
    }

    pub fn wall(&self, mono_ns: u64) -> SystemTime {
        let ns = (mono_ns as i128 + self.offset_ns).max(0) as u128;
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    }

    /// RFC 3339 with nanoseconds, UTC.
    pub fn rfc3339(&self, mono_ns: u64) -> String {
        humantime::format_rfc3339_nanos(self.wall(mono_ns)).to_string()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}
