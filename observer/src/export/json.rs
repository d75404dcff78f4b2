//! JSON flow log: one record a line, to stdout or appended to a file.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    os::unix::fs::OpenOptionsExt,
    path::PathBuf,
};

use crate::record::FlowRecord;

#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("opening flow log {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing flow log: {0}")]
    Write(#[from] io::Error),
}

pub enum FlowLog {
    Stdout(io::Stdout),
    File(BufWriter<File>),
}

impl FlowLog {
    /// `-` is stdout; anything else a file, created if needed (mode 0640: records name pods,
    /// processes and peers, which are not for every local user) and appended to.
    pub fn open(target: &str) -> Result<FlowLog, JsonError> {
        if target == "-" {
            return Ok(FlowLog::Stdout(io::stdout()));
        }
        let path = PathBuf::from(target);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&path)
            .map_err(|source| JsonError::Open { path, source })?;
        Ok(FlowLog::File(BufWriter::new(file)))
    }

    /// Write a batch and flush it, so a reader tailing the log sees whole lines promptly.
    pub fn write(&mut self, records: &[FlowRecord]) -> Result<(), JsonError> {
        let mut w: Box<dyn Write + '_> = match self {
            FlowLog::Stdout(s) => Box::new(s.lock()),
            FlowLog::File(f) => Box::new(f),
        };
        for r in records {
            serde_json::to_writer(&mut w, r).map_err(io::Error::from)?;
            w.write_all(b"\n")?;
        }
        w.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_new_flow_log_is_not_readable_by_everyone() {
        let dir = std::env::temp_dir().join(format!("observer-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flows.jsonl");
        let _ = std::fs::remove_file(&path);
        FlowLog::open(path.to_str().unwrap()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o007, 0, "mode {mode:o}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
