//! A protobuf writer for the few OTLP messages the agent sends. Written by
//! hand (prost's derive would need the messages as owned structs: a
//! `String` or `Vec` per attribute per span); this writes straight from
//! the spans into one reused buffer.
//!
//! Nested messages are length-delimited, and their length is known only
//! once written: [`Writer::begin`] reserves the most a length can take,
//! [`Writer::end`] writes it and moves the body back over what it did
//! not need (a short copy of bytes that are already in cache).

/// Wire types used here.
const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;
/// Bytes reserved for a nested message's length (messages < 32 GiB).
const LEN_ROOM: usize = 5;

/// Protobuf bytes under construction.
#[derive(Debug, Default)]
pub struct Writer {
    pub buf: Vec<u8>,
    open: Vec<usize>,
}

#[inline]
fn varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

impl Writer {
    pub fn written(&self) -> usize {
        self.buf.len()
    }

    /// Forgets everything written (keeps the allocation).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.open.clear();
    }

    /// Drops what was written after `len` bytes (a message that did not
    /// fit); nested messages begun after it are forgotten.
    pub fn truncate(&mut self, len: usize) {
        self.buf.truncate(len);
        while self.open.last().is_some_and(|&at| at >= len) {
            self.open.pop();
        }
    }

    #[inline]
    fn tag(&mut self, field: u32, wire: u32) {
        varint(&mut self.buf, u64::from(field << 3 | wire));
    }

    /// Starts nested message (or string) `field`; close it with [`Self::end`].
    #[inline]
    pub fn begin(&mut self, field: u32) {
        self.tag(field, LEN);
        self.open.push(self.buf.len());
        self.buf.extend_from_slice(&[0; LEN_ROOM]);
    }

    /// Ends the innermost message begun.
    pub fn end(&mut self) {
        let Some(at) = self.open.pop() else { return };
        let body = at + LEN_ROOM;
        let mut len = (self.buf.len() - body) as u64;
        let mut n = 0;
        while len >= 0x80 {
            self.buf[at + n] = (len as u8) | 0x80;
            len >>= 7;
            n += 1;
        }
        self.buf[at + n] = len as u8;
        n += 1;
        self.buf.copy_within(body.., at + n);
        self.buf.truncate(self.buf.len() - (LEN_ROOM - n));
    }

    #[inline]
    pub fn bytes(&mut self, field: u32, v: &[u8]) {
        self.tag(field, LEN);
        varint(&mut self.buf, v.len() as u64);
        self.buf.extend_from_slice(v);
    }

    #[inline]
    pub fn string(&mut self, field: u32, v: &str) {
        self.bytes(field, v.as_bytes());
    }

    /// An int32/int64/uint/enum/bool field.
    #[inline]
    pub fn varint(&mut self, field: u32, v: u64) {
        self.tag(field, VARINT);
        varint(&mut self.buf, v);
    }

    #[inline]
    pub fn fixed64(&mut self, field: u32, v: u64) {
        self.tag(field, FIXED64);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    #[inline]
    pub fn fixed32(&mut self, field: u32, v: u32) {
        self.tag(field, FIXED32);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// The header of a length-delimited field whose `len` is known.
    #[inline]
    pub fn len_prefix(&mut self, field: u32, len: usize) {
        self.tag(field, LEN);
        varint(&mut self.buf, len as u64);
    }

    /// Raw bytes already encoded (a cached message body).
    #[inline]
    pub fn raw(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
}

/// Writes string content between [`Writer::begin`] and [`Writer::end`].
impl std::fmt::Write for Writer {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.buf.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_lengths_take_their_shortest_form() {
        let mut w = Writer::default();
        w.begin(1);
        w.string(2, "hi");
        w.begin(3);
        w.raw(&[7; 200]);
        w.end();
        w.end();
        // Field 1 holds the 4-byte "hi" field and field 3 (3-byte header,
        // 200 bytes): 207, a two-byte varint.
        assert_eq!(&w.buf[..3], &[0x0a, 0xcf, 0x01]);
        assert_eq!(&w.buf[3..7], &[0x12, 2, b'h', b'i']);
        assert_eq!(&w.buf[7..10], &[0x1a, 0xc8, 0x01]);
        assert_eq!(w.written(), 210);
    }
}
