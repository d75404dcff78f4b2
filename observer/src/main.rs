//! observer: eBPF live flow observer for Kubernetes nodes.
//!
//! Pipeline: `hooks` (attach kernel programs) -> `events` (ring buffers) -> `correlate`
//! (pre-DNAT <-> post-DNAT <-> hops) -> `export` (JSON flow log, Prometheus, /flows); `observe`
//! and `explain` read the records (`flow_sources`). The lab to watch it in is a program of its own (`observer-lab`).

mod agent;
mod cli;
mod clock;
mod correlate;
mod explain;
mod export;
mod flow_sources;
mod hooks;
mod lab;
mod names;
mod netns;
mod observe;
mod readers;
mod record;
mod test_run;

use clap::Parser as _;
use cli::{Cli, Command};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse_from(cli::as_kubectl_plugin(std::env::args_os().collect()));
    let code = match cli.command {
        Command::Agent(mut args) => {
            if let Err(e) = agent::with_lab(&mut args) {
                log::error!("{e:#}");
                std::process::exit(2);
            }
            if let Err(e) = agent::check_flows_args(&args) {
                log::error!("{}", error_chain(&e));
                std::process::exit(2);
            }
            let kube = match agent::names(&args) {
                Ok(n) => n,
                Err(e) => {
                    log::error!("{}", error_chain(&e));
                    std::process::exit(1);
                }
            };
            let pin = match agent::pin_dir(&args) {
                Ok(p) => p,
                Err(e) => {
                    log::error!("{}", error_chain(&e));
                    std::process::exit(1);
                }
            };
            if let Some(ns) = &args.netns
                && let Err(e) = netns::enter(ns)
            {
                log::error!("{}", error_chain(&e));
                std::process::exit(1);
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            match rt.block_on(agent::run(*args, kube, pin)) {
                Ok(()) => 0,
                Err(e) => {
                    log::error!("{}", error_chain(&e));
                    1
                }
            }
        }
        Command::Observe(args) => report(observe::observe(*args)),
        Command::Explain(args) => report(explain::explain(*args)),
        Command::Suggest(args) => report(explain::suggest(args)),
        Command::TestRun(args) => report(test_run::run(args)),
    };
    std::process::exit(code);
}

fn report(r: anyhow::Result<i32>) -> i32 {
    r.unwrap_or_else(|e| {
        log::error!("{e:#}");
        1
    })
}

/// "outer: inner: innermost", so a kernel errno is not hidden behind a summary.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
