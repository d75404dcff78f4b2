//! `observer-lab`: build, change and remove the two-node lab; the server and client its pods run.

use clap::Parser as _;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let code =
        observer_lab::command::run(observer_lab::cli::Cli::parse().command).unwrap_or_else(|e| {
            log::error!("{e:#}");
            1
        });
    std::process::exit(code);
}
