//! Where `explain` and `observe` read flow records from: flow-log files (followed across
//! rotation by `tail`) and agents' `/flows` (`agent`; found through the Kubernetes API by
//! `discover`), one JSON record a line.

pub mod agent;
pub mod discover;
pub mod tail;

use crate::record::{FlowRecord, SCHEMA_READ};

/// One line of a flow log or of an agent's answer.
#[derive(Debug)]
pub enum Line {
    Record(Box<FlowRecord>),
    /// A record of a schema version this build does not read: its fields cannot be trusted to
    /// mean what this version reads.
    Foreign(String),
    /// Not a record: cut short when a node died mid-write, or corrupt.
    Bad,
}

impl Line {
    /// Parsed once; the schema is looked at on its own only when the line is no record.
    pub fn parse(line: &str) -> Line {
        let schema = match serde_json::from_str::<FlowRecord>(line) {
            Ok(r) if SCHEMA_READ.contains(&r.schema.as_str()) => return Line::Record(Box::new(r)),
            Ok(r) => Some(r.schema),
            Err(_) => serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("schema")?.as_str().map(str::to_owned)),
        };
        match schema {
            Some(s) if !SCHEMA_READ.contains(&s.as_str()) => Line::Foreign(s),
            _ => Line::Bad,
        }
    }
}

/// What a foreign-schema line is refused with.
pub fn foreign_schema(at: &str, schema: &str) -> String {
    format!(
        "{at}: a record of schema {schema:?}; this observer reads {} (use the observer release that wrote it)",
        SCHEMA_READ.join(", ")
    )
}
