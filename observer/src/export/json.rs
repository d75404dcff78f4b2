//! JSON flow log: one record a line, to stdout or appended to a file.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
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

enum Sink {
    Stdout(io::Stdout),
    File {
        path: PathBuf,
        w: BufWriter<File>,
        /// (device, inode) of the open file: another one at `path` means it was rotated.
        id: (u64, u64),
    },
}

/// The flow log. A file follows rotation by itself: renamed or deleted away (logrotate's
/// default), it is created again at its path before the next batch; truncated in place
/// (`copytruncate`), writes go on at its new end (`O_APPEND`); SIGHUP reopens it too. A batch
/// that cannot be written (disk full) is reported to the caller, who counts it, and the next one
/// starts on a line of its own, so a line cut short stays one bad line that readers skip.
pub struct FlowLog {
    sink: Sink,
    reopen: Arc<AtomicBool>,
    line_cut: bool,
}

fn open_file(path: &Path) -> Result<(BufWriter<File>, (u64, u64)), JsonError> {
    let err = |source| JsonError::Open {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    Ok((BufWriter::new(file), (meta.dev(), meta.ino())))
}

impl FlowLog {
    /// `-` is stdout; anything else a file, created if needed (mode 0640: records name pods,
    /// processes and peers, which are not for every local user) and appended to.
    pub fn open(target: &str) -> Result<FlowLog, JsonError> {
        let sink = if target == "-" {
            Sink::Stdout(io::stdout())
        } else {
            let path = PathBuf::from(target);
            let (w, id) = open_file(&path)?;
            Sink::File { path, w, id }
        };
        Ok(FlowLog {
            sink,
            reopen: Arc::default(),
            line_cut: false,
        })
    }

    /// Set it (on SIGHUP) to have the file opened again before the next batch.
    pub fn reopen_flag(&self) -> Arc<AtomicBool> {
        self.reopen.clone()
    }

    /// Open the path again if asked to, or if it no longer names the file being written.
    fn follow_rotation(&mut self) -> Result<(), JsonError> {
        let Sink::File { path, w, id } = &mut self.sink else {
            return Ok(());
        };
        let asked = self.reopen.swap(false, Ordering::Relaxed);
        let moved = std::fs::metadata(&*path).map_or(true, |m| (m.dev(), m.ino()) != *id);
        if asked || moved {
            let _ = w.flush();
            let (nw, nid) = open_file(path)?;
            log::info!(
                "flow log {}: opened again ({})",
                path.display(),
                if asked { "SIGHUP" } else { "rotated away" }
            );
            (*w, *id) = (nw, nid);
            self.line_cut = false;
        }
        Ok(())
    }

    /// Write a batch and flush it, so a reader tailing the log sees whole lines promptly.
    pub fn write(&mut self, records: &[FlowRecord]) -> Result<(), JsonError> {
        self.follow_rotation()?;
        let result = self.write_lines(records);
        if result.is_err() {
            self.line_cut = true;
            if let Sink::File { w, .. } = &mut self.sink {
                // Drop what did not reach the file: it is counted as lost, not written later.
                let fresh = BufWriter::new(w.get_ref().try_clone()?);
                let old = std::mem::replace(w, fresh);
                let _ = old.into_parts();
            }
        }
        result
    }

    fn write_lines(&mut self, records: &[FlowRecord]) -> Result<(), JsonError> {
        let mut w: Box<dyn Write + '_> = match &mut self.sink {
            Sink::Stdout(s) => Box::new(s.lock()),
            Sink::File { w, .. } => Box::new(w),
        };
        if self.line_cut {
            w.write_all(b"\n")?;
        }
        for r in records {
            serde_json::to_writer(&mut w, r).map_err(io::Error::from)?;
            w.write_all(b"\n")?;
        }
        w.flush()?;
        drop(w);
        self.line_cut = false;
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

    fn one_record() -> Vec<FlowRecord> {
        let text = include_str!("../../testdata/explain/answered/node-a.jsonl");
        vec![serde_json::from_str(text.lines().next().unwrap()).unwrap()]
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_rotated_log_is_followed_renamed_truncated_or_on_sighup() {
        let dir = std::env::temp_dir().join(format!("observer-rot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flows.jsonl");
        let _ = std::fs::remove_file(&path);
        let mut log = FlowLog::open(path.to_str().unwrap()).unwrap();
        log.write(&one_record()).unwrap();
        // logrotate's default: renamed away; the next batch goes to a new file at the path.
        std::fs::rename(&path, dir.join("flows.jsonl.1")).unwrap();
        log.write(&one_record()).unwrap();
        assert_eq!(lines(&dir.join("flows.jsonl.1")).len(), 1);
        assert_eq!(lines(&path).len(), 1);
        // copytruncate: emptied in place; the next line starts at the new end, no hole.
        log.write(&one_record()).unwrap();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        log.write(&one_record()).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains('\0'), "no hole of zeros before the line");
        assert_eq!(lines(&path).len(), 1);
        // SIGHUP: opened again even though the path did not change.
        log.reopen_flag().store(true, Ordering::Relaxed);
        log.write(&one_record()).unwrap();
        assert!(!log.reopen.load(Ordering::Relaxed));
        assert_eq!(lines(&path).len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_full_disk_is_an_error_for_the_batch_and_the_next_line_starts_clean() {
        let mut log = FlowLog::open("/dev/full").unwrap();
        assert!(log.write(&one_record()).is_err(), "ENOSPC is reported");
        assert!(log.line_cut, "the next batch starts on a line of its own");
        assert!(log.write(&one_record()).is_err());
    }
}
