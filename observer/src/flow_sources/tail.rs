//! Follow a growing flow log like `tail -F`: complete lines only (a line being written is kept
//! until its newline), across rotation by rename or delete (logrotate's default: the old file is
//! read to its end, then the new one from its start) and by truncation in place (`copytruncate`:
//! read again from the start).

use std::{
    fs::File,
    io::{Read as _, Seek as _, SeekFrom},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

pub struct Tail {
    path: PathBuf,
    file: Option<File>,
    ino: u64,
    pos: u64,
    partial: Vec<u8>,
    /// Lines read so far from the current file (for messages).
    pub line_no: usize,
    /// Times the file was found rotated or truncated.
    pub rotations: u32,
}

/// A line longer than this is no record: it is dropped (counted as a skipped line) rather than
/// held.
const LINE_MAX: usize = 64 << 20;

impl Tail {
    /// Open `path` at its start; it must exist.
    pub fn open(path: &Path) -> std::io::Result<Tail> {
        let file = File::open(path)?;
        let ino = file.metadata()?.ino();
        Ok(Tail {
            path: path.to_owned(),
            file: Some(file),
            ino,
            pos: 0,
            partial: Vec::new(),
            line_no: 0,
            rotations: 0,
        })
    }

    /// The complete lines written since the last call, each with its line number; an empty
    /// answer means nothing new (the caller waits and asks again).
    pub fn read(&mut self) -> std::io::Result<Vec<(usize, String)>> {
        let mut out = Vec::new();
        self.drain(&mut out)?;
        if out.is_empty() {
            // Nothing new in the open file: has it been replaced or cut short?
            match std::fs::metadata(&self.path) {
                Ok(m) if m.ino() != self.ino => {
                    // Renamed away and created again: the old one was read to its end above.
                    if let Ok(f) = File::open(&self.path) {
                        self.switch_to(f, m.ino());
                        self.drain(&mut out)?;
                    }
                }
                Ok(m) if m.len() < self.pos => {
                    self.rotations += 1;
                    self.pos = 0;
                    self.line_no = 0;
                    self.partial.clear();
                    if let Some(f) = &mut self.file {
                        f.seek(SeekFrom::Start(0))?;
                    }
                    self.drain(&mut out)?;
                }
                // Same file, nothing new; or deleted and not yet created again.
                _ => {}
            }
        }
        Ok(out)
    }

    fn switch_to(&mut self, f: File, ino: u64) {
        self.rotations += 1;
        self.file = Some(f);
        self.ino = ino;
        self.pos = 0;
        self.line_no = 0;
        self.partial.clear();
    }

    fn drain(&mut self, out: &mut Vec<(usize, String)>) -> std::io::Result<()> {
        let Some(f) = &mut self.file else {
            return Ok(());
        };
        let mut buf = [0u8; 64 << 10];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            self.pos += n as u64;
            let mut chunk = &buf[..n];
            while let Some(i) = chunk.iter().position(|b| *b == b'\n') {
                self.partial.extend_from_slice(&chunk[..i]);
                self.line_no += 1;
                let line = String::from_utf8_lossy(&self.partial).into_owned();
                self.partial.clear();
                out.push((self.line_no, line));
                chunk = &chunk[i + 1..];
            }
            self.partial.extend_from_slice(chunk);
            if self.partial.len() > LINE_MAX {
                self.line_no += 1;
                out.push((self.line_no, "\u{fffd}".to_owned()));
                self.partial.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::Tail;

    fn append(p: &std::path::Path, s: &str) {
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(p)
            .unwrap()
            .write_all(s.as_bytes())
            .unwrap();
    }

    fn texts(v: Vec<(usize, String)>) -> Vec<String> {
        v.into_iter().map(|(_, l)| l).collect()
    }

    #[test]
    fn follows_growth_rename_and_copytruncate() {
        let dir = std::env::temp_dir().join(format!("observer-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("flows.jsonl");
        append(&p, "a\nb\npart");
        let mut t = Tail::open(&p).unwrap();
        assert_eq!(
            texts(t.read().unwrap()),
            ["a", "b"],
            "a line being written waits"
        );
        append(&p, "ial\n");
        assert_eq!(texts(t.read().unwrap()), ["partial"]);
        assert!(t.read().unwrap().is_empty());

        // logrotate's default: renamed away, then a new file; the old one's last lines first.
        append(&p, "c\n");
        std::fs::rename(&p, dir.join("flows.jsonl.1")).unwrap();
        append(&dir.join("flows.jsonl.1"), "d\n");
        assert_eq!(texts(t.read().unwrap()), ["c", "d"]);
        assert!(t.read().unwrap().is_empty(), "no new file yet");
        append(&p, "e\n");
        let got = t.read().unwrap();
        assert_eq!(
            got,
            [(1, "e".to_owned())],
            "the new file from its first line"
        );
        assert_eq!(t.rotations, 1);

        // copytruncate: cut to nothing in place, then written again.
        append(&p, "f\n");
        assert_eq!(texts(t.read().unwrap()), ["f"]);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(0)
            .unwrap();
        append(&p, "g\n");
        assert_eq!(texts(t.read().unwrap()), ["g"]);
        assert_eq!(t.rotations, 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
