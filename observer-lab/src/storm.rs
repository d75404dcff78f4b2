//! A connection storm: short TCP connections (or UDP exchanges) at a fixed rate for a fixed time,
//! each one counted by its outcome, so that what an agent recorded can be reconciled against
//! what was really sent.
//!
//! Connections start on a schedule (`rate` per second from the first tick), not when the previous
//! one ends: a slow server or a slow datapath shows as connections in flight, and past
//! `--max-in-flight` as connections not started (counted), never as a silently lower rate. Each
//! answered exchange's client port is kept: with the client's address it names the connection in
//! the flow records, and a port reused later names the next one (counted per port).

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{sync::Semaphore, task::JoinSet};

use crate::{
    cli::{ClientArgs, StormArgs},
    traffic::{Exchange, exchange},
};

/// What a storm did, printed as one JSON object.
#[derive(Debug, Default, serde::Serialize)]
pub struct StormReport {
    pub to: String,
    pub proto: String,
    /// Connections per second asked for, and for how long.
    pub rate: u32,
    pub seconds: f64,
    /// Connections the schedule called for.
    pub scheduled: u64,
    /// Of those, not started because `max_in_flight` were already open.
    pub not_started: u64,
    pub started: u64,
    pub answered: u64,
    /// Failed exchanges by error.
    pub failed: BTreeMap<String, u64>,
    /// From the first start to the last end.
    pub elapsed_s: f64,
    /// Answered exchanges per client port.
    pub ports: BTreeMap<u16, u32>,
}

pub async fn storm(args: StormArgs) -> StormReport {
    raise_fd_limit();
    let one = Arc::new(ClientArgs {
        to: args.to,
        proto: args.proto,
        count: 1,
        concurrency: 1,
        timeout: args.timeout,
        hold: Duration::ZERO,
        source_port: None,
    });
    let mut report = StormReport {
        to: args.to.to_string(),
        proto: format!("{:?}", args.proto).to_lowercase(),
        rate: args.rate,
        seconds: args.duration.as_secs_f64(),
        ..Default::default()
    };
    let gate = Arc::new(Semaphore::new(args.max_in_flight.max(1)));
    let mut running: JoinSet<Result<Exchange, String>> = JoinSet::new();
    // A tick a millisecond; each tick starts what the schedule says is due by then, so a late
    // tick catches up instead of lowering the rate.
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let t0 = Instant::now();
    loop {
        tick.tick().await;
        let since = t0.elapsed().min(args.duration);
        let due = (since.as_secs_f64() * f64::from(args.rate)) as u64;
        while report.scheduled < due {
            report.scheduled += 1;
            match gate.clone().try_acquire_owned() {
                Ok(permit) => {
                    report.started += 1;
                    let one = one.clone();
                    running.spawn(async move {
                        let r = exchange(&one).await;
                        drop(permit);
                        r
                    });
                }
                Err(_) => report.not_started += 1,
            }
        }
        while let Some(done) = running.try_join_next() {
            tally(&mut report, done);
        }
        if since >= args.duration {
            break;
        }
    }
    while let Some(done) = running.join_next().await {
        tally(&mut report, done);
    }
    report.elapsed_s = t0.elapsed().as_secs_f64();
    report
}

fn tally(report: &mut StormReport, done: Result<Result<Exchange, String>, tokio::task::JoinError>) {
    match done {
        Ok(Ok(x)) => {
            report.answered += 1;
            *report.ports.entry(x.local_port).or_default() += 1;
        }
        Ok(Err(e)) => *report.failed.entry(e).or_default() += 1,
        Err(e) => *report.failed.entry(e.to_string()).or_default() += 1,
    }
}

/// A storm holds up to `--max-in-flight` sockets: lift the soft open-files limit to the hard one.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}
