//! Thin wrappers over iproute2 and friends. Every command runs inside a lab namespace (`-n NS` or
//! `ip netns exec NS`); nothing here touches the root namespace's addresses or routes.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("`{cmd}` failed: {stderr}")]
    Failed { cmd: String, stderr: String },
    #[error("cannot run `{cmd}`: {source} (is iproute2/iptables installed? `cargo xtask setup`)")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
}

/// Run a command, returning stdout; stderr goes into the error.
pub fn run(args: &[&str]) -> Result<String, CmdError> {
    run_with_input(args, None)
}

pub fn run_with_input(args: &[&str], input: Option<&str>) -> Result<String, CmdError> {
    let cmd = args.join(" ");
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CmdError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if let Some(text) = input {
        let mut stdin = child.stdin.take().expect("piped");
        stdin
            .write_all(text.as_bytes())
            .map_err(|source| CmdError::Spawn {
                cmd: cmd.clone(),
                source,
            })?;
    }
    let out = child.wait_with_output().map_err(|source| CmdError::Spawn {
        cmd: cmd.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(CmdError::Failed {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -n NS ARGS...`
pub fn ip(ns: &str, args: &[&str]) -> Result<String, CmdError> {
    let mut v = vec!["ip", "-n", ns];
    v.extend_from_slice(args);
    run(&v)
}

/// `ip netns exec NS ARGS...`
pub fn exec(ns: &str, args: &[&str]) -> Result<String, CmdError> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    run(&v)
}

pub fn sysctl(ns: &str, settings: &[&str]) -> Result<(), CmdError> {
    let mut v = vec!["sysctl", "-qw"];
    v.extend_from_slice(settings);
    exec(ns, &v).map(|_| ())
}

/// Names of all network namespaces (`ip netns list` prints `name (id: N)`).
pub fn list() -> Vec<String> {
    run(&["ip", "netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

pub fn pids(ns: &str) -> Vec<i32> {
    run(&["ip", "netns", "pids", ns])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}
