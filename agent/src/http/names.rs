//! The header names the agent looks up, and finding a field's name among
//! them (every field of every HTTP/1 head is looked up; most are none of
//! them).

/// Header names the agent looks up (all lower case); the first seven are
/// those framing and trace context need (`head::ESSENTIAL`).
pub(super) const LOOKED_UP: [&str; 16] = [
    "content-length",
    "transfer-encoding",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "user-agent",
    "x-b3-spanid",
    "x-b3-sampled",
    "upgrade",
    "host",
    "content-type",
    "grpc-timeout",
    "grpc-status",
    "grpc-message",
    "te",
];

/// Names of [`LOOKED_UP`] by length: `BY_LENGTH[len]` lists the indices
/// (plus one; 0 ends the list) of the names `len` bytes long, so a field
/// name is compared with the one to five names of its length instead of
/// all sixteen (a head's every field is looked up, and most are none of
/// them). Built at compile time: a name too long or a length shared by
/// too many names fails the build.
const BY_LENGTH: [[u8; 6]; 18] = by_length();

const fn by_length() -> [[u8; 6]; 18] {
    let mut table = [[0u8; 6]; 18];
    let mut i = 0;
    while i < LOOKED_UP.len() {
        let len = LOOKED_UP[i].len();
        let mut slot = 0;
        while table[len][slot] != 0 {
            slot += 1;
        }
        // The last slot stays 0, ending the list.
        assert!(slot < 5, "too many looked-up names of one length");
        table[len][slot] = i as u8 + 1;
        i += 1;
    }
    table
}

/// Index of `name` in [`LOOKED_UP`] (callers mostly pass a constant
/// name: inlined, this folds to a constant).
#[inline]
pub(super) fn looked_up(name: &str) -> Option<u32> {
    LOOKED_UP.iter().position(|n| *n == name).map(|i| i as u32)
}

/// Longest name in [`LOOKED_UP`], and the bytes each is stored in below.
const LONGEST: usize = BY_LENGTH.len() - 1;
const WIDTH: usize = LONGEST.next_multiple_of(8);

/// Each name of [`LOOKED_UP`] zero-padded to [`WIDTH`] bytes, and its case
/// mask: `0x20` where the name has a letter, 0 elsewhere. A byte `b`
/// matches a name's byte `n` in any case exactly when `b | mask == n`
/// (a letter's two cases differ only in that bit; a digit or `-` must be
/// itself). Built at compile time.
const FOLDED: [([u8; WIDTH], [u8; WIDTH]); LOOKED_UP.len()] = folded();

const fn folded() -> [([u8; WIDTH], [u8; WIDTH]); LOOKED_UP.len()] {
    let mut out = [([0u8; WIDTH], [0u8; WIDTH]); LOOKED_UP.len()];
    let mut i = 0;
    while i < LOOKED_UP.len() {
        let name = LOOKED_UP[i].as_bytes();
        let mut k = 0;
        while k < name.len() {
            let b = name[k];
            assert!(!b.is_ascii_uppercase(), "looked-up names are lower case");
            out[i].0[k] = b;
            out[i].1[k] = if b.is_ascii_lowercase() { 0x20 } else { 0 };
            k += 1;
        }
        i += 1;
    }
    out
}

/// Bytes `at..at + 8` of `b` as one word.
#[inline]
fn word(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Whether `name` is looked-up name `i` in any case; `name` is as long
/// as it. Compared a word at a time: the 1 to 17 bytes of a name are
/// read as overlapping words (or, under 8 bytes, byte by byte).
#[inline]
fn matches_any_case(name: &[u8], i: usize) -> bool {
    let (want, mask) = &FOLDED[i];
    let len = name.len();
    if len < 8 {
        return (0..len).all(|k| name[k] | mask[k] == want[k]);
    }
    let same = |at: usize| word(name, at) | word(mask, at) == word(want, at);
    // Words at 0, 8, ... and one ending at the last byte.
    (0..len - 8).step_by(8).all(same) && same(len - 8)
}

/// Index in [`LOOKED_UP`] of `name` in any case, among the names of its
/// length only.
#[inline]
pub(super) fn looked_up_any_case(name: &str) -> Option<u32> {
    let bucket = BY_LENGTH.get(name.len())?;
    for &i in bucket {
        let i = usize::from(i.checked_sub(1)?);
        if matches_any_case(name.as_bytes(), i) {
            return Some(i as u32);
        }
    }
    None
}
