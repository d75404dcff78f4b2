//! `observer explain` and `observer suggest`: read the agents' flow records, stitch the sending
//! and receiving nodes' records of one connection, say where it stopped and what fixes it, in
//! the terms of the layer that stopped it (targetPort, backend pods, post-DNAT wire tuple).

mod args;
mod fix;
mod render;
mod story;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

pub use crate::names::Names;
use crate::{
    flow_sources::{
        Line, agent,
        discover::{self, Agent},
        foreign_schema,
    },
    record::FlowRecord,
};
pub use args::{ExplainArgs, Format, SuggestArgs};
pub use story::{Endpoint, Story, stitch};

/// Records read from the given logs, and the lines that could not be read (file, line number).
#[derive(Debug, Default)]
struct Loaded {
    records: Vec<FlowRecord>,
    skipped: Vec<(String, usize)>,
}

impl Loaded {
    /// The records of one log or answer (`source` names it). A line that is not a record is
    /// skipped and kept; a record of another schema version is refused by name.
    fn add(&mut self, source: &str, text: &str) -> anyhow::Result<()> {
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            match Line::parse(line) {
                Line::Record(r) => self.records.push(*r),
                Line::Foreign(schema) => {
                    bail!(
                        "{}",
                        foreign_schema(&format!("{source}:{}", i + 1), &schema)
                    )
                }
                Line::Bad => self.skipped.push((source.to_owned(), i + 1)),
            }
        }
        Ok(())
    }

    /// The records, saying once per source which lines were skipped.
    fn reported(self) -> Vec<FlowRecord> {
        let mut by_source: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
        for (f, line) in &self.skipped {
            by_source.entry(f).or_default().push(*line);
        }
        for (f, lines) in by_source {
            log::warn!(
                "{f}: skipped {} line(s) that are not flow records (cut short or corrupt), first at line {}",
                lines.len(),
                lines[0]
            );
        }
        self.records
    }
}

/// Read every record. A line that is not a record (cut short when a node died mid-write, or
/// corrupt) is skipped and reported; a record of another schema version is refused by name,
/// since its fields cannot be trusted to mean what this version reads.
fn load(files: &[PathBuf], token: Option<&str>) -> anyhow::Result<Loaded> {
    let mut out = Loaded::default();
    for f in files {
        let text = match f.to_str().filter(|s| s.starts_with("http://")) {
            Some(url) => agent::fetch_blocking(url, token)?,
            None => {
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
            }
        };
        out.add(&f.display().to_string(), &text)?;
    }
    Ok(out)
}

/// Names from a names file if given, else the ones the agents put in the records (Kubernetes).
fn names(file: Option<&Path>, records: &[FlowRecord]) -> anyhow::Result<Names> {
    match file {
        Some(f) => Ok(Names::from_file(f)?),
        None => Ok(Names::from_records(records)),
    }
}

pub fn explain(args: ExplainArgs) -> anyhow::Result<i32> {
    print!("{}", answer(&args)?);
    Ok(0)
}

fn read_token(token_file: Option<&PathBuf>) -> anyhow::Result<Option<String>> {
    token_file
        .map(|f| {
            std::fs::read_to_string(f)
                .map(|t| t.trim().to_owned())
                .with_context(|| format!("reading --token-file {}", f.display()))
        })
        .transpose()
}

/// Ask each agent found through the API, in parallel, adding their records to `out`: the
/// nodes whose agents answered (one that answered with no record is evidence too). One that
/// does not answer is named on stderr; the others still count.
fn ask_agents(
    agents: &[Agent],
    token: Option<&str>,
    out: &mut Loaded,
) -> anyhow::Result<Vec<String>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let answers = rt.block_on(futures_util::future::join_all(
        agents
            .iter()
            .map(|a| async move { agent::fetch(&a.endpoint()?, token).await }),
    ));
    let mut nodes = Vec::new();
    for (a, answer) in agents.iter().zip(answers) {
        match answer {
            Ok(body) => {
                eprintln!("explain: {} ({}): answered", a.node, a.url);
                nodes.push(a.node.clone());
                out.add(&a.url, &body)?;
            }
            Err(e) => eprintln!("explain: {} ({}): did not answer: {e:#}", a.node, a.url),
        }
    }
    if nodes.is_empty() {
        bail!("no agent answered");
    }
    Ok(nodes)
}

/// Read the logs, saying once per file which lines were skipped.
fn read(files: &[PathBuf], token: Option<&str>) -> anyhow::Result<Vec<FlowRecord>> {
    Ok(load(files, token)?.reported())
}

/// What `explain` prints for `args`.
pub fn answer(args: &ExplainArgs) -> anyhow::Result<String> {
    let token = read_token(args.token_file.as_ref())?;
    let agents = discover::agents_and_netns(&args.discover)?;
    let mut loaded = load(&args.files, token.as_deref())?;
    let answered = match agents.is_empty() {
        true => vec![],
        false => ask_agents(&agents, token.as_deref(), &mut loaded)?,
    };
    let records = loaded.reported();
    let lab_names = args.discover.lab.as_deref().map(crate::lab::names_path);
    let names = names(args.names.as_deref().or(lab_names.as_deref()), &records)?;
    let stories = select(&records, args, &names)?;
    let mut nodes = nodes(&records, &args.files);
    nodes.extend(answered);
    nodes.sort();
    nodes.dedup();
    let verdicts: Vec<_> = stories
        .iter()
        .map(|s| (s, s.verdict(&nodes, &names)))
        .collect();
    Ok(match args.format {
        Format::Text => verdicts
            .iter()
            .map(|(s, v)| render::text(s, v, &names))
            .collect(),
        Format::Json => {
            let all: Vec<_> = verdicts.iter().map(|(s, v)| render::json(s, v)).collect();
            serde_json::to_string_pretty(&all)? + "\n"
        }
        Format::Mermaid => verdicts
            .iter()
            .map(|(s, v)| render::mermaid(s, v, &names))
            .collect(),
    })
}

/// The connections the selection names, oldest first; only the latest unless `--all`.
fn select(records: &[FlowRecord], args: &ExplainArgs, names: &Names) -> anyhow::Result<Vec<Story>> {
    let pod_ips = args.pod.as_deref().map(|p| names.ips_of(p));
    if pod_ips.as_ref().is_some_and(Vec::is_empty) {
        bail!(
            "no pod {:?} is named in the names file or the records",
            args.pod.clone().unwrap_or_default()
        );
    }
    let mut stories: Vec<Story> = stitch(records)
        .into_iter()
        .filter(|s| s.matches(args.service.as_ref(), args.client.as_ref()))
        .filter(|s| pod_ips.as_ref().is_none_or(|ips| s.involves(ips)))
        .collect();
    if stories.is_empty() {
        bail!(
            "no connection in {} record(s) matches the selection",
            records.len()
        );
    }
    stories.sort_by(|a, b| a.end().cmp(b.end()));
    if !args.all {
        stories.drain(..stories.len() - 1);
    }
    Ok(stories)
}

/// Nodes whose agents' logs were given: named by their records, or by the file when an agent
/// wrote none (its silence is evidence too).
fn nodes(records: &[FlowRecord], files: &[PathBuf]) -> Vec<String> {
    let mut n: Vec<String> = records.iter().map(|r| r.node.clone()).collect();
    for f in files {
        if std::fs::metadata(f).is_ok_and(|m| m.len() == 0) {
            n.push(
                f.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
        }
    }
    n.sort();
    n.dedup();
    n
}

pub fn suggest(args: SuggestArgs) -> anyhow::Result<i32> {
    let records = read(&args.files, None)?;
    let names = Names::from_file(&args.names)?;
    let stories = stitch(&records);
    let yaml = fix::suggest_policies(&stories, &names);
    if yaml.is_empty() {
        bail!("no connection between pods the names file knows in these records");
    }
    print!("{yaml}");
    Ok(0)
}
