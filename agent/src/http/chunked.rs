//! Following `Transfer-Encoding: chunked` framing, byte by byte, across
//! segment boundaries and across chunk data that was never captured.
//! (httparse's `parse_chunk_size` needs the whole size line in one buffer,
//! which split captures do not give us.)

/// Longest chunk-size line (with extensions) we accept.
const MAX_LINE: usize = 1024;

#[derive(Debug, Default)]
enum Phase {
    /// Reading the hex size line.
    #[default]
    Size,
    /// Skipping chunk extensions up to the line end.
    Extension,
    Data(u64),
    /// The CRLF after chunk data.
    DataEnd,
    /// Trailer section after the last chunk; `blank` when the line so far is empty.
    Trailer {
        blank: bool,
    },
}

#[derive(Debug, Default)]
pub struct Chunked {
    phase: Phase,
    size: u64,
    digits: usize,
    line: usize,
}

/// Outcome of feeding bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkStep {
    More,
    Done,
    /// The framing cannot be followed any more.
    Lost,
}

impl Chunked {
    /// Consumes bytes; returns how many were used and whether the body ended.
    pub fn feed(&mut self, data: &[u8]) -> (usize, ChunkStep) {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match &mut self.phase {
                Phase::Data(remaining) => {
                    let take = (*remaining).min((data.len() - i) as u64);
                    *remaining -= take;
                    i += take as usize;
                    if *remaining == 0 {
                        self.phase = Phase::DataEnd;
                        self.line = 0;
                    }
                    continue;
                }
                Phase::Size => match hex(b) {
                    Some(d) if self.digits < 16 => {
                        self.size = self.size * 16 + d;
                        self.digits += 1;
                    }
                    _ if self.digits == 0 => return (i, ChunkStep::Lost),
                    _ if b == b';' || b == b' ' || b == b'\t' => self.phase = Phase::Extension,
                    _ if b == b'\r' => self.phase = Phase::Extension,
                    _ if b == b'\n' => {
                        i += 1;
                        self.end_size_line();
                        continue;
                    }
                    _ => return (i, ChunkStep::Lost),
                },
                Phase::Extension => {
                    self.line += 1;
                    if self.line > MAX_LINE {
                        return (i, ChunkStep::Lost);
                    }
                    if b == b'\n' {
                        i += 1;
                        self.end_size_line();
                        continue;
                    }
                }
                Phase::DataEnd => {
                    if b == b'\n' {
                        self.phase = Phase::Size;
                    } else if b != b'\r' || self.line > 0 {
                        return (i, ChunkStep::Lost);
                    } else {
                        self.line = 1;
                    }
                }
                Phase::Trailer { blank } => {
                    if b == b'\n' {
                        if *blank {
                            return (i + 1, ChunkStep::Done);
                        }
                        *blank = true;
                    } else if b != b'\r' {
                        *blank = false;
                    }
                }
            }
            i += 1;
        }
        (i, ChunkStep::More)
    }

    /// Accounts for `missing` bytes that were moved but not captured;
    /// returns how many were consumed.
    pub fn skip(&mut self, missing: u64) -> (u64, ChunkStep) {
        let mut left = missing;
        if let Phase::Data(remaining) = &mut self.phase {
            let take = left.min(*remaining);
            *remaining -= take;
            left -= take;
            if *remaining == 0 {
                self.phase = Phase::DataEnd;
                self.line = 0;
            }
        }
        // The CRLF after chunk data is the only other thing we can skip blind.
        if left > 0 && matches!(self.phase, Phase::DataEnd) {
            let crlf_left = 2 - self.line as u64;
            if left <= crlf_left {
                self.line += left as usize;
                if self.line == 2 {
                    self.phase = Phase::Size;
                    self.line = 0;
                }
                return (missing, ChunkStep::More);
            }
        }
        if left == 0 {
            (missing, ChunkStep::More)
        } else {
            (missing, ChunkStep::Lost)
        }
    }

    fn end_size_line(&mut self) {
        self.phase = if self.size == 0 {
            Phase::Trailer { blank: true }
        } else {
            Phase::Data(self.size)
        };
        self.size = 0;
        self.digits = 0;
        self.line = 0;
    }
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}
