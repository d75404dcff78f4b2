//! `observer observe`: the live view. Records from flow logs (followed like `tail -F`) and from
//! agents' `/flows` (streamed with `?follow=1`), merged, filtered on their own fields, one line
//! each. History first (sorted by time, the last N if asked), then what happens.

mod args;
mod filter;
mod render;
#[cfg(test)]
mod tests;

use std::{
    io::{IsTerminal as _, Write as _},
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use tokio::sync::mpsc;

pub use args::ObserveArgs;
use filter::Filter;
pub use render::{Color, Output};

use crate::flow_sources::{Line, agent, discover, foreign_schema, tail::Tail};

/// How often a followed file is looked at for new lines and rotation.
const FILE_POLL: Duration = Duration::from_millis(200);
/// Wait before following an agent again after its stream ended (a restart, a rolling update).
const RECONNECT_AFTER: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
enum Source {
    File(PathBuf),
    /// An agent, with its node when found through the API.
    Agent(agent::AgentUrl, Option<String>),
}

impl Source {
    fn parse(s: &str) -> anyhow::Result<Source> {
        if s.starts_with("http://") || s.starts_with("https://") {
            return Ok(Source::Agent(agent::AgentUrl::parse(s)?, None));
        }
        let p = PathBuf::from(s);
        std::fs::metadata(&p).with_context(|| format!("{s}: no such flow log"))?;
        Ok(Source::File(p))
    }

    fn name(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Agent(u, None) => u.to_string(),
            Source::Agent(u, Some(node)) => format!("{node} ({u})"),
        }
    }
}

/// What a source's reader hands the printer.
enum Event {
    /// A line already written when observe started (line number in its source).
    History(usize, usize, String),
    /// The source has no more history.
    HistoryDone,
    /// A line written since.
    Live(usize, usize, String),
    /// Said once on stderr (a source that failed, ended or came back).
    Note(usize, String),
    /// The source failed and is given up on.
    Failed(usize, String),
}

pub fn observe(args: ObserveArgs) -> anyhow::Result<i32> {
    let filter = Filter::from_args(&args.filters, SystemTime::now())?;
    let mut sources: Vec<Source> = args
        .sources
        .iter()
        .map(|s| Source::parse(s))
        .collect::<anyhow::Result<_>>()?;
    for a in discover::agents_and_netns(&args.discover)? {
        sources.push(Source::Agent(a.endpoint()?, Some(a.node)));
    }
    let token = args
        .token_file
        .as_ref()
        .map(|f| {
            std::fs::read_to_string(f)
                .map(|t| t.trim().to_owned())
                .with_context(|| format!("reading --token-file {}", f.display()))
        })
        .transpose()?;
    let color = match args.color {
        Color::Auto => std::io::stdout().is_terminal(),
        Color::Always => true,
        Color::Never => false,
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(args, filter, sources, token, color))
}

/// History the user asked for: all of it without `-f`, else only with `--last`.
fn history_wanted(args: &ObserveArgs) -> Option<usize> {
    match (args.follow, args.last) {
        (_, Some(n)) => Some(n),
        (false, None) => None,
        (true, None) => Some(0),
    }
}

async fn run(
    args: ObserveArgs,
    filter: Filter,
    sources: Vec<Source>,
    token: Option<String>,
    color: bool,
) -> anyhow::Result<i32> {
    let (tx, mut rx) = mpsc::channel::<Event>(4096);
    let want = history_wanted(&args);
    for (i, s) in sources.iter().enumerate() {
        let tx = tx.clone();
        match s.clone() {
            Source::File(p) => {
                let follow = args.follow;
                std::thread::spawn(move || read_file(i, &p, follow, &tx));
            }
            Source::Agent(u, _) => {
                let (token, follow) = (token.clone(), args.follow);
                tokio::spawn(async move { read_agent(i, u, token, follow, want, tx).await });
            }
        }
    }
    drop(tx);

    let mut out = Printer {
        args: &args,
        filter: &filter,
        sources: &sources,
        color,
        skipped: vec![(0, None); sources.len()],
        foreign: vec![None; sources.len()],
        failed: 0,
    };
    // History: every source's, sorted by time, the last `want` of it.
    let mut history: Vec<(String, Box<crate::record::FlowRecord>, String)> = Vec::new();
    let mut pending = sources.len();
    while pending > 0 {
        let Some(ev) = rx.recv().await else { break };
        match ev {
            Event::History(i, n, line) => {
                if let Some(r) = out.parse(i, n, &line).filter(|r| filter.matches(r)) {
                    history.push((r.time.clone(), r, line));
                }
            }
            Event::HistoryDone => pending -= 1,
            Event::Failed(i, e) => {
                out.fail(i, &e);
                pending -= 1;
            }
            Event::Note(i, e) => eprintln!("observe: {}: {e}", sources[i].name()),
            // Not expected before a source's history is done; printed in order anyway.
            Event::Live(i, n, line) => {
                out.print(i, n, &line)?;
            }
        }
    }
    history.sort_by(|a, b| a.0.cmp(&b.0));
    let skip = want.map_or(0, |n| history.len().saturating_sub(n));
    for (_, r, raw) in history.iter().skip(skip) {
        if !out.write(r, raw)? {
            return Ok(0);
        }
    }
    if args.follow {
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Live(i, n, line) | Event::History(i, n, line) => {
                    if !out.print(i, n, &line)? {
                        return Ok(0);
                    }
                }
                Event::Note(i, e) => eprintln!("observe: {}: {e}", sources[i].name()),
                Event::Failed(i, e) => out.fail(i, &e),
                Event::HistoryDone => {}
            }
        }
    }
    out.report();
    Ok(i32::from(out.failed > 0))
}

struct Printer<'a> {
    args: &'a ObserveArgs,
    filter: &'a Filter,
    sources: &'a [Source],
    color: bool,
    /// Per source: lines that were no record, and the first of them.
    skipped: Vec<(usize, Option<usize>)>,
    /// Per source: a foreign schema seen (said once).
    foreign: Vec<Option<String>>,
    failed: usize,
}

impl Printer<'_> {
    fn parse(&mut self, i: usize, n: usize, line: &str) -> Option<Box<crate::record::FlowRecord>> {
        if line.trim().is_empty() {
            return None;
        }
        match Line::parse(line) {
            Line::Record(r) => Some(r),
            Line::Foreign(schema) => {
                if self.foreign[i].as_ref() != Some(&schema) {
                    let at = format!("{}:{n}", self.sources[i].name());
                    eprintln!(
                        "observe: {}; such records are skipped",
                        foreign_schema(&at, &schema)
                    );
                    self.foreign[i] = Some(schema);
                }
                None
            }
            Line::Bad => {
                let s = &mut self.skipped[i];
                s.0 += 1;
                if s.1.is_none() {
                    s.1 = Some(n);
                    if self.args.follow {
                        eprintln!(
                            "observe: {}:{n}: not a flow record (cut short or corrupt), skipped; such lines are counted at the end",
                            self.sources[i].name()
                        );
                    }
                }
                None
            }
        }
    }

    /// Print `line` if it is a record the filter admits; false once stdout is closed.
    fn print(&mut self, i: usize, n: usize, line: &str) -> anyhow::Result<bool> {
        match self.parse(i, n, line) {
            Some(r) if self.filter.matches(&r) => self.write(&r, line),
            _ => Ok(true),
        }
    }

    fn write(&self, r: &crate::record::FlowRecord, raw: &str) -> anyhow::Result<bool> {
        let text = render::line(r, raw, self.args.output, self.color);
        let mut stdout = std::io::stdout().lock();
        match writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
            Ok(()) => Ok(true),
            // `observe ... | head`: the reader is gone, so is the point of going on.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
            Err(e) => Err(e).context("writing to stdout"),
        }
    }

    fn fail(&mut self, i: usize, e: &str) {
        self.failed += 1;
        eprintln!("observe: {}: {e}", self.sources[i].name());
    }

    fn report(&self) {
        for (i, (n, first)) in self.skipped.iter().enumerate() {
            if let Some(first) = first {
                eprintln!(
                    "observe: {}: skipped {n} line(s) that are not flow records (cut short or corrupt), first at line {first}",
                    self.sources[i].name()
                );
            }
        }
    }
}

/// A flow log: its lines so far as history, then (`-f`) what is appended, across rotation.
fn read_file(i: usize, path: &std::path::Path, follow: bool, tx: &mpsc::Sender<Event>) {
    let mut t = match Tail::open(path) {
        Ok(t) => t,
        Err(e) => {
            let _ = tx.blocking_send(Event::Failed(i, format!("opening: {e}")));
            return;
        }
    };
    let send_all = |lines: Vec<(usize, String)>, live: bool| {
        lines.into_iter().all(|(n, l)| {
            let ev = if live {
                Event::Live(i, n, l)
            } else {
                Event::History(i, n, l)
            };
            tx.blocking_send(ev).is_ok()
        })
    };
    match t.read() {
        Ok(lines) => {
            if !send_all(lines, false) {
                return;
            }
        }
        Err(e) => {
            let _ = tx.blocking_send(Event::Failed(i, format!("reading: {e}")));
            return;
        }
    }
    if tx.blocking_send(Event::HistoryDone).is_err() || !follow {
        return;
    }
    let mut rotations = t.rotations;
    loop {
        std::thread::sleep(FILE_POLL);
        match t.read() {
            Ok(lines) => {
                if t.rotations != rotations {
                    rotations = t.rotations;
                    let _ =
                        tx.blocking_send(Event::Note(i, "rotated; following the new file".into()));
                }
                if !send_all(lines, true) {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.blocking_send(Event::Failed(i, format!("reading: {e}")));
                return;
            }
        }
    }
}

/// An agent's /flows: its recent records as history; with `-f`, then every new one, followed
/// again (after the last record seen) when the stream is cut.
async fn read_agent(
    i: usize,
    url: agent::AgentUrl,
    token: Option<String>,
    follow: bool,
    want: Option<usize>,
    tx: mpsc::Sender<Event>,
) {
    let token = token.as_deref();
    let mut stream = AgentStream {
        i,
        tx,
        line_no: 0,
        seen: None,
        history_done: false,
    };
    if !follow {
        match agent::fetch(&url, token).await {
            Ok(body) => {
                for l in body.lines() {
                    if !stream.send(l.to_owned(), true).await {
                        return;
                    }
                }
                stream.end_history().await;
            }
            Err(e) => {
                stream
                    .say(Event::Failed(i, format!("did not answer: {e:#}")))
                    .await
            }
        }
        return;
    }
    loop {
        // First what the user asked for; after a cut, what came after the last record seen.
        let (last, since) = match (&stream.seen, stream.history_done) {
            (_, false) => (want, None),
            (Some(t), true) => (None, Some(t.clone())),
            (None, true) => (Some(0), None),
        };
        match agent::follow(&url, token, last, since.as_deref()).await {
            Ok(f) => {
                if stream.history_done {
                    let from = stream.seen.as_deref().unwrap_or("now").to_owned();
                    stream
                        .say(Event::Note(i, format!("following again, from {from}")))
                        .await;
                }
                let Some(ended) = stream.take(f).await else {
                    return;
                };
                stream.end_history().await;
                let note = format!(
                    "{ended}; following again in {RECONNECT_AFTER:?}, from the last record seen (the agent keeps its last 1000)"
                );
                stream.say(Event::Note(i, note)).await;
            }
            Err(e) if !stream.history_done => {
                // Said once; the others go on, and this one is tried again.
                let why = format!("{e:#}; trying again every {RECONNECT_AFTER:?}");
                stream.say(Event::Note(i, why)).await;
                stream.end_history().await;
            }
            Err(_) => {}
        }
        tokio::time::sleep(RECONNECT_AFTER).await;
    }
}

/// One agent's lines on their way to the printer, across reconnections.
struct AgentStream {
    i: usize,
    tx: mpsc::Sender<Event>,
    line_no: usize,
    /// The newest record time seen: a cut stream is picked up after it.
    seen: Option<String>,
    history_done: bool,
}

impl AgentStream {
    async fn say(&self, ev: Event) {
        let _ = self.tx.send(ev).await;
    }

    async fn end_history(&mut self) {
        if !self.history_done {
            self.history_done = true;
            self.say(Event::HistoryDone).await;
        }
    }

    /// Hand on one line; false once the printer is gone.
    async fn send(&mut self, line: String, history: bool) -> bool {
        self.line_no += 1;
        if let Some(t) = agent::time_of(&line)
            && self.seen.as_deref().is_none_or(|s| t > s)
        {
            self.seen = Some(t.to_owned());
        }
        let ev = if history {
            Event::History(self.i, self.line_no, line)
        } else {
            Event::Live(self.i, self.line_no, line)
        };
        self.tx.send(ev).await.is_ok()
    }

    /// Hand on a followed stream's lines until it ends: why it ended, or None once the
    /// printer is gone.
    async fn take(&mut self, mut f: agent::Followed) -> Option<String> {
        let mut history = f.history;
        loop {
            if history == 0 {
                self.end_history().await;
            }
            match f.lines().await {
                Ok(Some(lines)) => {
                    for l in lines {
                        let h = history > 0;
                        history = history.saturating_sub(1);
                        if !self.send(l, h).await {
                            return None;
                        }
                    }
                }
                Ok(None) => return Some("the agent ended the stream".to_owned()),
                Err(e) => {
                    return Some(format!(
                        "the stream was cut ({e:#}): the agent stopped, or dropped this client for falling behind (observer_flows_followers_dropped_total)"
                    ));
                }
            }
        }
    }
}
