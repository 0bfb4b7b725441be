//! Heads parsed once per node: when both ends of a connection run on this
//! node, the client's write of a request and the server's read of it carry
//! the same bytes (and so do the server's write of the response and the
//! client's read), and parsing them was a fifth of the agent's work per
//! request. A head that parsed whole is remembered, per thread, with its
//! bytes; the same bytes of the same kind of message, kept by the same
//! header rules, parse to the same head, so the next parse of them is a
//! copy. Bytes are compared in full, never only hashed.
//!
//! Bounded: [`SLOTS`] heads of at most [`MAX_BYTES`] bytes, direct-mapped by
//! a hash of the bytes (a newer head takes its slot). A head seen once
//! costs a hash and a copy of its bytes here.
use std::cell::RefCell;

use super::{head::KeptHeaders, Flow, Head};

/// Heads remembered per thread (a power of two).
const SLOTS: usize = 128;
/// Longest head remembered; longer ones are parsed every time.
pub const MAX_BYTES: usize = 1024;

struct Slot {
    flow: Option<Flow>,
    kept: KeptHeaders,
    bytes: Vec<u8>,
    head: Head,
}

struct Memo {
    hasher: foldhash::fast::FixedState,
    slots: Vec<Option<Slot>>,
}

thread_local! {
    static MEMO: RefCell<Memo> = RefCell::new(Memo {
        hasher: foldhash::fast::FixedState::default(),
        slots: Vec::new(),
    });
}

impl Memo {
    /// The slot of `bytes`.
    fn index(&self, bytes: &[u8]) -> usize {
        std::hash::BuildHasher::hash_one(&self.hasher, bytes) as usize % SLOTS
    }
}

/// Where a head [`get`] did not find goes ([`put`]): its slot, found once
/// (None: the head is too long to remember).
pub struct Miss(Option<usize>);

/// The head `bytes` (a whole head, blank line included) parsed to before,
/// as a message of `flow` keeping `kept`'s fields.
pub fn get(bytes: &[u8], flow: Option<Flow>, kept: &KeptHeaders) -> Result<Head, Miss> {
    if bytes.len() > MAX_BYTES {
        return Err(Miss(None));
    }
    MEMO.try_with(|m| {
        let m = m.borrow();
        let index = m.index(bytes);
        match m.slots.get(index).and_then(Option::as_ref) {
            Some(slot) if slot.flow == flow && slot.kept.same_rules(kept) && slot.bytes == bytes => {
                Ok(slot.head.pooled_clone())
            }
            _ => Err(Miss(Some(index))),
        }
    })
    .unwrap_or(Err(Miss(None)))
}

/// Remembers that `bytes` parsed to `head`, where [`get`] missed it.
pub fn put(miss: Miss, bytes: &[u8], flow: Option<Flow>, kept: &KeptHeaders, head: &Head) {
    let Miss(Some(index)) = miss else {
        return;
    };
    let _ = MEMO.try_with(|m| {
        let mut m = m.borrow_mut();
        if m.slots.is_empty() {
            m.slots.resize_with(SLOTS, || None);
        }
        match &mut m.slots[index] {
            Some(slot) => {
                slot.flow = flow;
                if !slot.kept.same_rules(kept) {
                    slot.kept = kept.clone();
                }
                slot.bytes.clear();
                slot.bytes.extend_from_slice(bytes);
                slot.head.clone_from_pooled(head);
            }
            empty => {
                *empty = Some(Slot {
                    flow,
                    kept: kept.clone(),
                    bytes: bytes.to_vec(),
                    head: head.pooled_clone(),
                })
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::{super::head, *};

    fn request(path: &str, extra: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n{extra}\r\nbody").into_bytes()
    }

    #[test]
    fn a_head_in_the_slot_of_another_is_parsed_as_itself() {
        // Two heads that hash to the same slot: the second must not be
        // taken for the first (the bytes are compared, not only hashed).
        let m = foldhash::fast::FixedState::default();
        let slot = |data: &[u8]| {
            let end = super::super::find_head_end(data).expect("whole");
            std::hash::BuildHasher::hash_one(&m, &data[..end]) as usize % SLOTS
        };
        let path = |i: usize| format!("/p{i}");
        let first = 0;
        let other = (1..10_000)
            .find(|&i| slot(&request(&path(i), "")) == slot(&request(&path(first), "")))
            .expect("a collision among 10 000 paths in 128 slots");
        let kept = KeptHeaders::all();
        for i in [first, other, first, other] {
            let data = request(&path(i), "");
            let (head, len) = head::parse_leading(&data, None, &kept).expect("a head");
            assert_eq!(len, data.len() - 4);
            assert_eq!(head.expect("valid").target(), Some(path(i).as_str()));
        }
    }

    #[test]
    fn the_same_bytes_under_other_rules_or_flow_are_not_taken_from_the_memo() {
        let data = request("/a", "X-Custom: 1\r\n");
        let all = KeptHeaders::all();
        let used = KeptHeaders::used_and([]);
        let (h, _) = head::parse_leading(&data, None, &all).expect("a head");
        assert_eq!(h.expect("valid").header("x-custom"), Some("1"));
        let (h, _) = head::parse_leading(&data, None, &used).expect("a head");
        assert_eq!(h.expect("valid").header("x-custom"), None, "kept by the other rules");
        let as_response = head::parse_leading(&data, Some(Flow::Responses), &all);
        assert!(
            !matches!(as_response, Some((Ok(_), _))),
            "a request line is no status line"
        );
    }

    proptest! {
        /// With the memo, a parse says what a parse without it says, over
        /// sequences that repeat heads, vary them slightly and mix flows
        /// and rules.
        #[test]
        fn parse_leading_says_what_a_fresh_parse_says(
            picks in proptest::collection::vec((0usize..6, 0usize..3, any::<bool>()), 1..60),
        ) {
            let heads: [&[u8]; 6] = [
                b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET /a HTTP/1.1\r\nHost: y\r\n\r\n",
                b"GET /a HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc",
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\n\r\nok",
                b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
                b"POST /b HTTP/1.0\r\nTransfer-Encoding: chunked\r\nTraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n",
            ];
            let rules = [KeptHeaders::all(), KeptHeaders::used_and(["x-a".to_owned()])];
            for (h, flow, strict) in picks {
                let flow = [None, Some(Flow::Requests), Some(Flow::Responses)][flow];
                let kept = &rules[usize::from(strict)];
                let got = head::parse_leading(heads[h], flow, kept);
                prop_assert_eq!(got, head::parse_leading_fresh(heads[h], flow, kept));
            }
        }
    }
}
