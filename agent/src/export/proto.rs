//! A protobuf writer for the few OTLP messages the agent sends. Written by
//! hand (prost's derive would need the messages as owned structs: a
//! `String` or `Vec` per attribute per span); this writes straight from
//! the spans into one reused buffer.
//!
//! Nested messages are length-delimited, and their length is known only
//! once written: [`Writer::begin`] reserves the bytes its caller expects
//! the length to take, [`Writer::end`] writes it and moves the body only
//! when the length took fewer or more (a span of a few hundred bytes
//! reserves two and is never moved; a batch of spans reserves three, so
//! requests of 16 KiB to 2 MiB are not moved either).

/// Wire types used here.
const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;
/// Protobuf bytes under construction.
#[derive(Debug, Default)]
pub struct Writer {
    pub buf: Vec<u8>,
    /// Nested messages begun: where their length goes, and the bytes
    /// reserved for it.
    open: Vec<(usize, u8)>,
}

/// Bytes a varint of `v` takes.
#[inline]
pub fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
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
        while self.open.last().is_some_and(|&(at, _)| at >= len) {
            self.open.pop();
        }
    }

    #[inline]
    fn tag(&mut self, field: u32, wire: u32) {
        varint(&mut self.buf, u64::from(field << 3 | wire));
    }

    /// Starts nested message (or string) `field`, reserving `room` bytes
    /// for its length (1: under 128 bytes, 2: under 16 KiB, 3: under
    /// 2 MiB; any guess is correct, a wrong one costs a move); close it
    /// with [`Self::end`].
    #[inline]
    pub fn begin(&mut self, field: u32, room: u8) {
        self.tag(field, LEN);
        self.open.push((self.buf.len(), room));
        self.buf.resize(self.buf.len() + usize::from(room), 0);
    }

    /// Ends the innermost message begun.
    #[inline]
    pub fn end(&mut self) {
        let Some((at, room)) = self.open.pop() else { return };
        let body = at + usize::from(room);
        let len = self.buf.len() - body;
        let n = varint_len(len as u64);
        if n != usize::from(room) {
            // The length takes more or fewer bytes than reserved: move
            // the body to just after it.
            if n > usize::from(room) {
                self.buf.resize(self.buf.len() + n - usize::from(room), 0);
            }
            self.buf.copy_within(body..body + len, at + n);
            self.buf.truncate(at + n + len);
        }
        let mut v = len as u64;
        for b in &mut self.buf[at..at + n - 1] {
            *b = (v as u8) | 0x80;
            v >>= 7;
        }
        self.buf[at + n - 1] = v as u8;
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

    /// Two length prefixes in a row: a message's, then its first field's.
    /// When each tag and length fits a byte (most attributes) they are one
    /// 4-byte write: four single-byte pushes each cost a capacity check.
    #[inline]
    pub fn len_prefixes(&mut self, outer: u32, outer_len: usize, inner: u32, inner_len: usize) {
        if outer < 16 && inner < 16 && outer_len < 128 && inner_len < 128 {
            self.buf.extend_from_slice(&[
                (outer << 3 | LEN) as u8,
                outer_len as u8,
                (inner << 3 | LEN) as u8,
                inner_len as u8,
            ]);
        } else {
            self.long_len_prefixes(outer, outer_len, inner, inner_len);
        }
    }

    /// [`Self::len_prefixes`] when one does not fit a byte: kept out of
    /// line so the short path inlines (with both inline it was called, and
    /// the replay cost 1.2 M instructions a pass more).
    #[cold]
    #[inline(never)]
    fn long_len_prefixes(&mut self, outer: u32, outer_len: usize, inner: u32, inner_len: usize) {
        self.len_prefix(outer, outer_len);
        self.len_prefix(inner, inner_len);
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
        w.begin(1, 3);
        w.string(2, "hi");
        w.begin(3, 1);
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

    /// A message tree for the property below: raw bytes, or nested
    /// messages each with a guess of the room for its length.
    #[derive(Debug, Clone)]
    enum Node {
        Raw(usize),
        Nested(u8, Vec<Node>),
    }

    fn node() -> impl proptest::strategy::Strategy<Value = Node> {
        use proptest::prelude::*;
        let leaf = (0usize..20_000).prop_map(Node::Raw);
        leaf.prop_recursive(3, 24, 4, |inner| {
            (1u8..=5, proptest::collection::vec(inner, 0..4)).prop_map(|(room, kids)| Node::Nested(room, kids))
        })
    }

    fn write(w: &mut Writer, n: &Node) {
        match n {
            Node::Raw(len) => w.raw(&vec![(*len % 251) as u8; *len]),
            Node::Nested(room, kids) => {
                w.begin(4, *room);
                kids.iter().for_each(|k| write(w, k));
                w.end();
            }
        }
    }

    /// The same message built inside out: each body first, then its
    /// length in front of it.
    fn reference(n: &Node) -> Vec<u8> {
        match n {
            Node::Raw(len) => vec![(*len % 251) as u8; *len],
            Node::Nested(_, kids) => {
                let body: Vec<u8> = kids.iter().flat_map(reference).collect();
                let mut out = vec![4 << 3 | LEN as u8];
                varint(&mut out, body.len() as u64);
                out.extend(body);
                out
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn any_guess_of_a_length_gives_the_shortest_encoding(tree in node()) {
            let mut w = Writer::default();
            w.raw(b"x");
            write(&mut w, &tree);
            let mut want = b"x".to_vec();
            want.extend(reference(&tree));
            proptest::prop_assert!(w.buf == want);
        }
    }
}
