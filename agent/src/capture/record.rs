//! Recordings of the raw ring-buffer stream (development, `--record`), the
//! input of the replay benchmark: an 8-byte magic, then per record its
//! length (u32, little endian) and its bytes exactly as the kernel wrote
//! them (header + captured payload).
use std::{fs::File, io::Write, path::Path};

use tracing::warn;

/// First bytes of a recording (format version 2: records carry the
/// 184-byte header with `sent_ns`; version 1 had 176 bytes).
pub const MAGIC: &[u8; 8] = b"MLREC002";

/// Why a recording could not be read.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RecordingError {
    #[error("not a meshless recording (magic {MAGIC:?} missing)")]
    Magic,
    #[error("a recording of an older format ({0}): record it again with this agent's --record")]
    Version(String),
    #[error("recording cut in the middle of record {0}")]
    Cut(usize),
}

/// Appends records to a file.
pub struct Recorder {
    out: Option<std::io::BufWriter<File>>,
}

impl Recorder {
    pub fn create(path: &Path) -> std::io::Result<Recorder> {
        let mut out = std::io::BufWriter::new(File::create(path)?);
        out.write_all(MAGIC)?;
        Ok(Recorder { out: Some(out) })
    }

    /// Appends one record; on a write error recording stops (logged once).
    pub fn write(&mut self, record: &[u8]) {
        let Some(out) = &mut self.out else { return };
        let len = (record.len() as u32).to_le_bytes();
        if let Err(error) = out.write_all(&len).and_then(|()| out.write_all(record)) {
            warn!(%error, "recording stopped");
            self.out = None;
        }
    }

    /// Writes what is buffered (after each drain: a killed agent leaves a
    /// usable file).
    pub fn flush(&mut self) {
        if let Some(Err(error)) = self.out.as_mut().map(Write::flush) {
            warn!(%error, "recording stopped");
            self.out = None;
        }
    }
}

/// The records of a recording, in order.
pub fn records(bytes: &[u8]) -> Result<Vec<&[u8]>, RecordingError> {
    let Some(mut rest) = bytes.strip_prefix(MAGIC.as_slice()) else {
        return Err(match bytes.get(..8) {
            Some(magic) if magic.starts_with(b"MLREC") => {
                RecordingError::Version(String::from_utf8_lossy(magic).into_owned())
            }
            _ => RecordingError::Magic,
        });
    };
    let mut out = Vec::new();
    while !rest.is_empty() {
        let cut = RecordingError::Cut(out.len());
        let (len, tail) = rest.split_first_chunk::<4>().ok_or(cut.clone())?;
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            return Err(cut);
        }
        let (record, tail) = tail.split_at(len);
        out.push(record);
        rest = tail;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_what_was_recorded_and_rejects_a_cut_file() {
        let path = std::env::temp_dir().join(format!("meshless-rec-{}", std::process::id()));
        let mut r = Recorder::create(&path).expect("create");
        r.write(b"first");
        r.write(b"");
        r.write(b"third record");
        r.flush();
        let bytes = std::fs::read(&path).expect("read");
        let _ = std::fs::remove_file(&path);
        let got = records(&bytes).expect("valid");
        assert_eq!(got, vec![&b"first"[..], b"", b"third record"]);
        assert_eq!(records(&bytes[..bytes.len() - 1]), Err(RecordingError::Cut(2)));
        assert_eq!(records(b"nonsense"), Err(RecordingError::Magic));
        assert_eq!(records(b"MLREC001"), Err(RecordingError::Version("MLREC001".into())));
    }
}
