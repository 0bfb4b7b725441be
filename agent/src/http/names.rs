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

/// Index in [`LOOKED_UP`] of `name` in any case, among the names of its
/// length only.
#[inline]
pub(super) fn looked_up_any_case(name: &str) -> Option<u32> {
    let bucket = BY_LENGTH.get(name.len())?;
    for &i in bucket {
        let i = usize::from(i.checked_sub(1)?);
        if LOOKED_UP[i].eq_ignore_ascii_case(name) {
            return Some(i as u32);
        }
    }
    None
}
