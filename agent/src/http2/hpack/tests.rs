use super::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn known(name: &str, value: &str) -> Field {
    Field::Known(name.to_owned(), value.to_owned())
}

/// RFC 7541 C.4.1 and C.4.2: requests with Huffman strings, the second
/// naming `:authority` through the dynamic table.
const C41: &str = "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff";
const C42: &str = "8286 84be 5886 a8eb 1064 9cbf";

#[test]
fn decodes_the_rfc_huffman_examples_through_the_dynamic_table() {
    let mut d = Decoder::new();
    let first = d.decode(&hex(C41)).expect("c.4.1");
    assert_eq!(
        first.fields,
        vec![
            known(":method", "GET"),
            known(":scheme", "http"),
            known(":path", "/"),
            known(":authority", "www.example.com"),
        ]
    );
    let second = d.decode(&hex(C42)).expect("c.4.2");
    assert_eq!(second.fields[3], known(":authority", "www.example.com"));
    assert_eq!(second.fields[4], known("cache-control", "no-cache"));
}

#[test]
fn a_decoder_started_mid_connection_marks_unseen_entries_unknown() {
    let mut d = Decoder::new();
    let block = d.decode(&hex(C42)).expect("c.4.2");
    assert_eq!(block.fields[0], known(":method", "GET"), "static entries are known");
    assert_eq!(block.fields[3], Field::Unknown, "index 62 was never seen");
    assert_eq!(
        block.fields[4],
        known("cache-control", "no-cache"),
        "literals are known"
    );
    assert!(block.has_unknown());
}

#[test]
fn a_missed_block_never_lets_a_stale_entry_answer() {
    let mut d = Decoder::new();
    // ":path: /a" then ":path: /b", both inserted (literal, indexed name 4).
    d.decode(&[0x44, 0x02, b'/', b'a']).expect("a");
    // The block inserting /b is lost: the encoder's index 62 is now /b,
    // ours would still be /a.
    d.lose_sync();
    let block = d.decode(&[0xbe]).expect("index 62");
    assert_eq!(block.fields, vec![Field::Unknown], "never the stale /a");
}

#[test]
fn entries_inserted_after_a_loss_are_trusted_again() {
    let mut encoder = loona_hpack::Encoder::new();
    let mut d = Decoder::new();
    encoder.encode([(&b"x-old"[..], &b"1"[..])]);
    d.lose_sync();
    let fresh = encoder.encode([(&b"x-new"[..], &b"2"[..])]);
    let again = encoder.encode([(&b"x-new"[..], &b"2"[..]), (&b"x-old"[..], &b"1"[..])]);
    d.decode(&fresh).expect("fresh");
    let block = d.decode(&again).expect("again");
    assert_eq!(block.fields, vec![known("x-new", "2"), Field::Unknown]);
}

#[test]
fn an_hpack_bomb_is_bounded_and_counted() {
    let mut block = Vec::new();
    // One 4000-byte entry inserted, then referenced 10,000 times.
    block.push(0x40);
    block.push(0x01);
    block.push(b'x');
    block.extend_from_slice(&[0x7f, 0xa1, 0x1e]); // 127 + 3873 = 4000
    block.extend(std::iter::repeat_n(b'v', 4000));
    block.extend(std::iter::repeat_n(0xbe, 10_000)); // index 62
    let mut d = Decoder::new();
    let decoded = d.decode(&block).expect("bomb");
    assert!(decoded.limited);
    let kept: usize = decoded
        .fields
        .iter()
        .map(|f| match f {
            Field::Known(n, v) => n.len() + v.len(),
            _ => 0,
        })
        .sum();
    assert!(kept <= MAX_LIST_BYTES && decoded.fields.len() <= MAX_FIELDS);
}

#[test]
fn a_huge_table_size_update_is_capped() {
    let mut d = Decoder::new();
    // Size update to 2^30, then 1000 distinct 1 KB entries.
    let mut block = vec![0x3f, 0xe1, 0xff, 0xff, 0xff, 0x03];
    for i in 0..1000u32 {
        block.extend_from_slice(&[0x40, 0x04]);
        block.extend_from_slice(format!("h{i:03}").as_bytes());
        block.extend_from_slice(&[0x7f, 0x81, 0x07]); // 127 + 897 = 1024
        block.extend(std::iter::repeat_n(b'v', 1024));
    }
    d.decode(&block).expect("entries");
    assert!(d.state_bytes() < MAX_TABLE_BYTES + 64 * 1024, "{}", d.state_bytes());
}

#[test]
fn malformed_blocks_are_errors_not_panics() {
    let mut d = Decoder::new();
    assert_eq!(d.decode(&[0x80]), Err(HpackError::ZeroIndex));
    assert_eq!(d.decode(&[0xff, 0xff]), Err(HpackError::Truncated));
    assert_eq!(
        d.decode(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]),
        Err(HpackError::Integer)
    );
    assert_eq!(d.decode(&[0x40, 0x05, b'a']), Err(HpackError::Truncated));
    assert_eq!(d.decode(&[0x40, 0x81, 0xff, 0x00]), Err(HpackError::Huffman));
}
