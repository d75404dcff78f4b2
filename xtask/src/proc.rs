//! What the benches read about a running process.

/// (VmRSS, VmHWM) of a process, in KiB.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU time (user + system) a process has used so far, all its threads, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// This process (and what it starts meanwhile) runs on one CPU until the guard is dropped,
/// which gives it back the CPUs it had.
pub struct PinnedSelf(libc::cpu_set_t);

fn set_affinity(set: &libc::cpu_set_t) -> std::io::Result<()> {
    // SAFETY: a cpu_set_t we own, passed by pointer with its size.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Run this process (and what it starts from now on) on `cpu` only, until the guard goes.
pub fn pin_self(cpu: usize) -> std::io::Result<PinnedSelf> {
    // SAFETY: zeroed cpu_set_t values filled by the kernel and by CPU_SET.
    let (before, one) = unsafe {
        let mut before: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut before) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        (before, one)
    };
    set_affinity(&one)?;
    Ok(PinnedSelf(before))
}

impl Drop for PinnedSelf {
    fn drop(&mut self) {
        let _ = set_affinity(&self.0);
    }
}

/// Move every thread of process `pid` to `cpus` (a taskset list, e.g. "1").
pub fn pin_process(pid: u32, cpus: &str) -> anyhow::Result<()> {
    crate::run(
        std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", cpus, &pid.to_string()])
            .stdout(std::process::Stdio::null()),
    )
}
