//! HPACK (RFC 7541) decoding for a passive observer.
//!
//! Written here rather than taken whole from a crate: the decoders on
//! crates.io (`hpack`, `loona-hpack`, `httlib-hpack`) return a list of
//! fields, but an observer that may have started mid-connection or missed a
//! header block must know *which* fields came from a dynamic-table entry it
//! never saw, and must bound what a hostile block decodes to. The Huffman
//! code is taken from `loona-hpack` (maintained, tested against the RFC's
//! examples).
//!
//! Why a table that started late stays right: entries are numbered newest
//! first, so every entry this decoder inserted has the same index in the
//! encoder's table; an index past our table names an entry we never saw and
//! decodes to "unknown". That holds only while no header block was missed,
//! so a miss empties our table ([`Decoder::lose_sync`]): only entries
//! inserted after it are trusted again. Evicting more than the encoder
//! (our table is bounded, or a size is unknown) only turns references
//! unknown; keeping entries it evicted is harmless (it never names them).
use std::collections::VecDeque;

use loona_hpack::huffman::HuffmanDecoder;

/// Largest dynamic table kept per direction (the encoder may use more;
/// entries past this decode as unknown, never wrong).
pub const MAX_TABLE_BYTES: usize = 64 * 1024;
/// Decoded name+value bytes kept per header block (an HPACK bomb repeats
/// one large entry many times); decoding goes on, to keep the table in sync.
pub const MAX_LIST_BYTES: usize = 64 * 1024;
/// Fields kept per header block.
pub const MAX_FIELDS: usize = 128;
/// Longest value kept per field.
const MAX_VALUE: usize = 4096;

/// One decoded field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Known(String, String),
    /// The name is known but the value came from a dynamic entry never seen.
    UnknownValue(String),
    /// Neither name nor value can be known.
    Unknown,
}

/// A decoded header block.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Block {
    pub fields: Vec<Field>,
    /// Fields or bytes not kept because of the limits above.
    pub limited: bool,
}

impl Block {
    /// The value of `name`: Some(Some(v)) known, Some(None) present but
    /// unknown, None absent (or possibly hidden in an unknown field).
    pub fn get(&self, name: &str) -> Option<Option<&str>> {
        self.fields.iter().find_map(|f| match f {
            Field::Known(n, v) if n == name => Some(Some(v.as_str())),
            Field::UnknownValue(n) if n == name => Some(None),
            _ => None,
        })
    }

    /// Some field of this block could not be decoded.
    pub fn has_unknown(&self) -> bool {
        self.fields.iter().any(|f| !matches!(f, Field::Known(..)))
    }
}

/// Why a block could not be decoded at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    #[error("hpack: integer overflows")]
    Integer,
    #[error("hpack: block ends inside a field")]
    Truncated,
    #[error("hpack: bad huffman string")]
    Huffman,
    #[error("hpack: index 0")]
    ZeroIndex,
}

/// An entry's name/value; None when unknown.
type Entry = (Option<String>, Option<String>);

/// The decoding side of one direction of a connection.
#[derive(Debug)]
pub struct Decoder {
    /// Newest first; a name may be unknown (it came from an entry we never
    /// saw), the slot still counts for the indices after it.
    table: VecDeque<(Option<String>, String)>,
    size: usize,
    max: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

thread_local! {
    // Building the code table allocates; one per thread, reused.
    static HUFFMAN: std::cell::RefCell<HuffmanDecoder> = std::cell::RefCell::new(HuffmanDecoder::new());
}

impl Decoder {
    pub fn new() -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max: 4096,
        }
    }

    /// A header block of this direction was not seen (or not decodable):
    /// entries it inserted would shift every index, so nothing older than
    /// what comes next is trusted.
    pub fn lose_sync(&mut self) {
        self.table.clear();
        self.size = 0;
    }

    /// Approximate heap bytes held.
    pub fn state_bytes(&self) -> usize {
        self.size + self.table.capacity() * std::mem::size_of::<(Option<String>, String)>()
    }

    /// Decodes one complete header block.
    pub fn decode(&mut self, mut buf: &[u8]) -> Result<Block, HpackError> {
        let mut block = Block::default();
        let mut kept = 0usize;
        while let Some(&first) = buf.first() {
            let (name, value) = if first & 0x80 != 0 {
                let index = integer(&mut buf, 7)?;
                self.entry(index)?
            } else if first & 0x40 != 0 {
                let (n, v) = self.literal(&mut buf, 6)?;
                self.insert(n.clone(), v.clone());
                (n, v)
            } else if first & 0x20 != 0 {
                let size = integer(&mut buf, 5)?;
                self.resize(size);
                continue;
            } else {
                // Without indexing (0000) and never indexed (0001).
                self.literal(&mut buf, 4)?
            };
            let field = match (name, value) {
                (Some(n), Some(v)) => Field::Known(n, v),
                (Some(n), None) => Field::UnknownValue(n),
                _ => Field::Unknown,
            };
            let bytes = match &field {
                Field::Known(n, v) => n.len() + v.len(),
                Field::UnknownValue(n) => n.len(),
                Field::Unknown => 0,
            };
            if block.fields.len() >= MAX_FIELDS || kept + bytes > MAX_LIST_BYTES {
                block.limited = true;
                continue;
            }
            kept += bytes;
            block.fields.push(field);
        }
        Ok(block)
    }

    /// A literal field: name (indexed or literal), then a literal value.
    fn literal(&mut self, buf: &mut &[u8], prefix: u8) -> Result<Entry, HpackError> {
        let index = integer(buf, prefix)?;
        let name = if index == 0 {
            Some(string(buf)?)
        } else {
            self.entry(index)?.0
        };
        let value = string(buf)?;
        Ok((name, Some(value)))
    }

    fn entry(&self, index: usize) -> Result<Entry, HpackError> {
        if index == 0 {
            return Err(HpackError::ZeroIndex);
        }
        if let Some((n, v)) = STATIC.get(index - 1) {
            return Ok((Some((*n).to_owned()), Some((*v).to_owned())));
        }
        Ok(self
            .table
            .get(index - STATIC.len() - 1)
            .map_or((None, None), |(n, v)| (n.clone(), Some(v.clone()))))
    }

    /// Adds an entry (an unknown name still takes its slot).
    fn insert(&mut self, name: Option<String>, value: Option<String>) {
        let value = value.unwrap_or_default();
        let size = entry_size(name.as_deref(), &value);
        self.evict_to(self.max.saturating_sub(size));
        if size <= self.max {
            self.size += size;
            self.table.push_front((name, value));
        } else {
            // Too big for the encoder's table (it empties it) or only for
            // ours (it keeps it): either way nothing older is trusted.
            self.lose_sync();
        }
    }

    /// Dynamic table size update. Our bound is applied on top; a table we
    /// keep smaller than the encoder's only turns old references unknown.
    fn resize(&mut self, size: usize) {
        self.max = size.min(MAX_TABLE_BYTES);
        self.evict_to(self.max);
    }

    fn evict_to(&mut self, limit: usize) {
        while self.size > limit {
            let Some((n, v)) = self.table.pop_back() else {
                self.size = 0;
                break;
            };
            self.size = self.size.saturating_sub(entry_size(n.as_deref(), &v));
        }
    }
}

/// RFC 7541 section 4.1; an unknown name counts as empty (we then keep
/// more than the encoder, which is harmless).
fn entry_size(name: Option<&str>, value: &str) -> usize {
    name.map_or(0, str::len) + value.len() + 32
}

/// An HPACK integer with an N-bit prefix (RFC 7541 section 5.1).
fn integer(buf: &mut &[u8], prefix: u8) -> Result<usize, HpackError> {
    let (&first, rest) = buf.split_first().ok_or(HpackError::Truncated)?;
    *buf = rest;
    let max = (1usize << prefix) - 1;
    let mut value = usize::from(first) & max;
    if value < max {
        return Ok(value);
    }
    let mut shift = 0u32;
    loop {
        let (&b, rest) = buf.split_first().ok_or(HpackError::Truncated)?;
        *buf = rest;
        if shift > 28 {
            return Err(HpackError::Integer);
        }
        value = value
            .checked_add(usize::from(b & 0x7f) << shift)
            .ok_or(HpackError::Integer)?;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
}

/// A string literal (RFC 7541 section 5.2), cut to `MAX_VALUE` bytes.
fn string(buf: &mut &[u8]) -> Result<String, HpackError> {
    let huffman = buf.first().is_some_and(|b| b & 0x80 != 0);
    let len = integer(buf, 7)?;
    if len > buf.len() {
        return Err(HpackError::Truncated);
    }
    let (raw, rest) = buf.split_at(len);
    *buf = rest;
    let bytes = if huffman {
        HUFFMAN
            .with(|h| h.borrow_mut().decode(raw))
            .map_err(|_| HpackError::Huffman)?
    } else {
        raw.to_vec()
    };
    let mut s = String::from_utf8_lossy(&bytes).into_owned();
    if s.len() > MAX_VALUE {
        let mut end = MAX_VALUE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    Ok(s)
}

/// The static table (RFC 7541 Appendix A).
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

#[cfg(test)]
mod tests;
