use bytes::Bytes;
use proptest::prelude::*;

use super::*;

fn feed(stream: &mut HttpStream, chunks: &[&[u8]]) -> Vec<Item> {
    let mut out = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        stream.push(Bytes::copy_from_slice(c), 0, i as u64 + 1);
        while let Some(item) = stream.next_item() {
            out.push(item);
        }
    }
    out
}

fn heads(items: &[Item]) -> Vec<&Head> {
    items
        .iter()
        .filter_map(|i| if let Item::Head(h) = i { Some(h) } else { None })
        .collect()
}

fn ends(items: &[Item]) -> Vec<u64> {
    items
        .iter()
        .filter_map(|i| {
            if let Item::End { ktime_ns } = i {
                Some(*ktime_ns)
            } else {
                None
            }
        })
        .collect()
}

#[test]
fn parses_request_split_across_three_reads() {
    let mut s = HttpStream::new();
    let items = feed(
        &mut s,
        &[
            b"GET /a/b?x=1 HT",
            b"TP/1.1\r\nHost: h\r\ntraceparent: 00-ab",
            b"-cd\r\n\r\n",
        ],
    );
    let h = heads(&items);
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].method(), Some("GET"));
    assert_eq!(h[0].target(), Some("/a/b?x=1"));
    assert_eq!(h[0].header("traceparent"), Some("00-ab-cd"));
    assert_eq!(h[0].start_ktime_ns, 1);
    assert_eq!(ends(&items), vec![3]);
    assert_eq!(s.flow(), Some(Flow::Requests));
}

#[test]
fn parses_three_pipelined_requests_in_one_write() {
    let mut s = HttpStream::new();
    let items = feed(
        &mut s,
        &[b"GET /1 HTTP/1.1\r\n\r\nPOST /2 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /3 HTTP/1.1\r\n\r\n"],
    );
    let targets: Vec<_> = heads(&items).iter().map(|h| h.target().expect("a request")).collect();
    assert_eq!(targets, ["/1", "/2", "/3"]);
    assert_eq!(ends(&items).len(), 3);
}

#[test]
fn content_length_body_ends_at_the_last_byte() {
    let mut s = HttpStream::new();
    let items = feed(
        &mut s,
        &[b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345", b"678", b"90"],
    );
    assert_eq!(heads(&items)[0].status(), Some(200));
    assert_eq!(ends(&items), vec![3]);
}

#[test]
fn body_bytes_that_were_not_captured_still_count() {
    let mut s = HttpStream::new();
    s.push(
        Bytes::from_static(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\nab"),
        4998,
        7,
    );
    assert!(matches!(s.next_item(), Some(Item::Head(_))));
    assert_eq!(s.next_item(), Some(Item::End { ktime_ns: 7 }));
    assert_eq!(s.next_item(), None);
}

#[test]
fn chunked_response_ends_at_the_last_chunk() {
    let mut s = HttpStream::new();
    let items = feed(
        &mut s,
        &[
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"5\r\nhello\r\n",
            b"6;ext=1\r\n world\r\n",
            b"0\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
        ],
    );
    assert_eq!(heads(&items).len(), 2);
    assert_eq!(ends(&items), vec![4, 4]);
}

#[test]
fn chunked_body_with_uncaptured_chunk_data_keeps_framing() {
    let mut s = HttpStream::new();
    s.push(
        Bytes::from_static(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
        0,
        1,
    );
    s.push(Bytes::from_static(b"1000\r\nxx"), 4096 - 2 + 2, 2);
    s.push(Bytes::from_static(b"0\r\n\r\n"), 0, 3);
    let mut items = Vec::new();
    while let Some(i) = s.next_item() {
        items.push(i);
    }
    assert_eq!(ends(&items), vec![3]);
}

#[test]
fn header_block_larger_than_the_capture_keeps_method_and_path() {
    let mut s = HttpStream::new();
    let mut big = b"GET /big/path HTTP/1.1\r\nHost: x\r\nX-Fill: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 3000));
    s.push(Bytes::copy_from_slice(&big[..2048]), (big.len() - 2048) as u64 + 4, 1);
    let Some(Item::Head(h)) = s.next_item() else {
        panic!("no head")
    };
    assert!(h.truncated);
    assert_eq!(h.method(), Some("GET"));
    assert_eq!(h.header("host"), Some("x"));
    // Whatever followed the head is unknown: say so.
    assert_eq!(s.next_item(), Some(Item::Gap { sent_ns: 1 }));
    assert_eq!(s.next_item(), None);
    // The next request resyncs the stream and ends the truncated one.
    s.push(Bytes::from_static(b"GET /next HTTP/1.1\r\n\r\n"), 0, 2);
    assert_eq!(s.next_item(), Some(Item::End { ktime_ns: 1 }));
    let Some(Item::Head(h)) = s.next_item() else {
        panic!("no second head")
    };
    assert_eq!(h.method(), Some("GET"));
    assert_eq!(h.target(), Some("/next"));
}

#[test]
fn after_lost_framing_a_method_split_across_writes_is_not_read_as_a_shorter_method() {
    let mut s = HttpStream::new();
    // A malformed head loses the framing.
    let items = feed(
        &mut s,
        &[
            b"GET /a HTTP/1.1\r\nbad header line\r\n\r\n",
            b"PU",
            b"T /b HTTP/1.1\r\n\r\n",
        ],
    );
    assert!(matches!(items.first(), Some(Item::Malformed(_))), "{items:?}");
    assert!(heads(&items).iter().all(|h| h.method() != Some("T")), "{items:?}");
    // The next message that follows a clean boundary resyncs.
    let items = feed(&mut s, &[b"GET /c HTTP/1.1\r\n\r\n"]);
    assert_eq!(heads(&items).first().and_then(|h| h.method()), Some("GET"), "{items:?}");
}

#[test]
fn response_to_head_request_has_no_body() {
    let mut s = HttpStream::new();
    s.push(
        Bytes::from_static(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ),
        0,
        1,
    );
    assert!(matches!(s.next_item(), Some(Item::Head(_))));
    s.expect_no_body();
    assert_eq!(s.next_item(), Some(Item::End { ktime_ns: 1 }));
    assert!(matches!(s.next_item(), Some(Item::Head(_))));
    assert_eq!(s.next_item(), Some(Item::End { ktime_ns: 1 }));
}

#[test]
fn response_without_length_ends_at_close() {
    let mut s = HttpStream::new();
    let items = feed(&mut s, &[b"HTTP/1.0 200 OK\r\n\r\nbody", b"more"]);
    assert_eq!(heads(&items).len(), 1);
    assert!(ends(&items).is_empty());
    assert_eq!(s.close(), Some(Item::End { ktime_ns: 2 }));
}

#[test]
fn garbage_is_reported_and_skipped_until_a_message_starts() {
    let mut s = HttpStream::new();
    let items = feed(
        &mut s,
        &[
            b"GET / HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
            b"GET /ok HTTP/1.1\r\n\r\n",
        ],
    );
    assert!(items.iter().any(|i| matches!(i, Item::Malformed(_))));
    assert_eq!(heads(&items).len(), 2);
}

#[test]
fn tls_client_hello_gives_no_head() {
    let mut s = HttpStream::new();
    let hello = [0x16u8, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03];
    let items = feed(&mut s, &[&hello, &hello]);
    assert!(heads(&items).is_empty());
}

#[test]
fn any_method_token_is_a_request() {
    let mut s = HttpStream::new();
    let items = feed(
        &mut s,
        &[b"REPORT /cal HTTP/1.1\r\n\r\n", b"m-search* * HTTP/1.1\r\n\r\n"],
    );
    let methods: Vec<_> = heads(&items).iter().map(|h| h.method().map(str::to_owned)).collect();
    assert_eq!(methods, [Some("REPORT".to_owned()), Some("m-search*".to_owned())]);
}

#[test]
fn a_request_after_empty_lines_is_parsed_even_after_lost_framing() {
    let mut s = HttpStream::new();
    let items = feed(
        &mut s,
        &[
            b"\r\n\r\nGET /a HTTP/1.1\r\n\r\n",
            b"\x00garbage\r\n\r\n",
            b"\r\nPURGE /b HTTP/1.1\r\n\r\n",
        ],
    );
    let targets: Vec<_> = heads(&items).iter().map(|h| h.target().unwrap_or_default()).collect();
    assert_eq!(targets, ["/a", "/b"]);
}

#[test]
fn a_message_boundary_in_uncaptured_bytes_is_reported_as_a_gap() {
    let mut s = HttpStream::new();
    // A 10-byte body, 4 bytes captured; 20 more bytes after it were moved.
    s.push(
        Bytes::from_static(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd"),
        26,
        7,
    );
    assert!(matches!(s.next_item(), Some(Item::Head(_))));
    assert_eq!(s.next_item(), Some(Item::End { ktime_ns: 7 }));
    assert_eq!(s.next_item(), Some(Item::Gap { sent_ns: 7 }));
    assert_eq!(s.next_item(), None);
}

#[test]
fn a_head_with_more_fields_than_kept_keeps_the_first_and_says_some_were_dropped() {
    // Past MAX_HEADERS fields httparse stops with an error; the fields it
    // read before are kept (parsed again into zeroed headers).
    for start in ["GET /many HTTP/1.1\r\n", "HTTP/1.1 200 OK\r\n"] {
        let mut block = start.to_string();
        for i in 0..MAX_HEADERS + 6 {
            block.push_str(&format!("X-F{i}: v{i}\r\n"));
        }
        block.push_str("Content-Length: 0\r\n\r\n");
        let mut s = HttpStream::new();
        let items = feed(&mut s, &[block.as_bytes()]);
        let h = heads(&items)[0];
        assert_eq!(h.headers.len(), MAX_HEADERS, "{start}");
        assert_eq!(h.headers_dropped, 1, "{start}");
        assert_eq!(h.header("x-f0"), Some("v0"));
        assert_eq!(h.header("x-f63"), Some("v63"));
        assert_eq!(h.header("x-f64"), None);
    }
}

#[test]
fn header_buffer_shrinks_back_after_a_big_header_block() {
    let mut s = HttpStream::new();
    let mut big = b"GET / HTTP/1.1\r\nX-Fill: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 40_000));
    big.extend_from_slice(b"\r\n\r\n");
    for chunk in big.chunks(2048) {
        s.push(Bytes::copy_from_slice(chunk), 0, 1);
        while s.next_item().is_some() {}
    }
    assert!(s.state_bytes() <= 8 * 1024, "{} bytes kept", s.state_bytes());
}

#[test]
fn overlong_targets_are_cut_to_a_bound() {
    let mut s = HttpStream::new();
    let mut req = b"GET /".to_vec();
    req.extend(std::iter::repeat_n(b'p', 20_000));
    req.extend_from_slice(b" HTTP/1.1\r\n\r\n");
    let items = feed(&mut s, &[&req]);
    let h = heads(&items)[0];
    let target = h.target().expect("a request");
    assert_eq!(target.len(), head::MAX_TARGET);
}

#[test]
fn heads_keep_only_the_fields_the_agent_reads_and_the_captured_ones() {
    let wire = b"POST /a HTTP/1.1\r\nHost: x\r\nAccept: */*\r\nX-Request-Id: 7\r\nTraceParent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nContent-Length: 2\r\nCookie: secret\r\n\r\nokGET /b HTTP/1.1\r\n\r\n";
    let mut s = HttpStream::keeping(KeptHeaders::used_and(["x-request-id".to_owned()]));
    let items = feed(&mut s, &[wire]);
    let hs = heads(&items);
    assert_eq!(hs.len(), 2, "framing still follows Content-Length: {items:?}");
    let names: Vec<&str> = hs[0].headers.iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["host", "x-request-id", "traceparent", "content-length"]);
    assert_eq!(hs[0].header("x-request-id"), Some("7"));
    assert_eq!(hs[0].header("accept"), None);
    assert_eq!(hs[0].header("cookie"), None);
    assert_eq!(hs[1].target(), Some("/b"));
    // Keeping all (the default) keeps every field.
    let all = feed(&mut HttpStream::new(), &[wire]);
    assert_eq!(heads(&all)[0].headers.len(), 6);
    assert_eq!(heads(&all)[0].header("accept"), Some("*/*"));
}

#[test]
fn a_head_is_read_alike_whole_or_split_whatever_its_line_ends() {
    // A head parsed where it lies (its end found by the parse) must give
    // what the buffered path (its end found by searching for CRLFCRLF)
    // gives: bare LF line ends, a blank LF line before a CRLF one, bytes
    // after the head.
    for wire in [
        &b"GET /a HTTP/1.1\nHost: x\n\n"[..],
        b"GET /b HTTP/1.1\r\nA: b\n\nXYZ\r\n\r\nGET /c HTTP/1.1\r\n\r\n",
        b"GET /d HTTP/1.1\r\nHost: y\r\nContent-Length: 3\r\n\r\nabcGET /e HTTP/1.1\r\n\r\n",
        // Complete but refused: a request line glued inside the header
        // block, a method token past the limit.
        b"GET /f HTTP/1.1\r\nX: GET /g HTTP/1.1\r\n\r\nGET /h HTTP/1.1\r\n\r\n",
        b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA /i HTTP/1.1\r\n\r\n",
    ] {
        let whole = feed(&mut HttpStream::new(), &[wire]);
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        let split = feed(&mut HttpStream::new(), &bytes);
        let strip = |items: Vec<Item>| -> Vec<Item> {
            // Times differ (one per chunk); what was read must not.
            items
                .into_iter()
                .map(|i| match i {
                    Item::Head(mut h) => {
                        h.start_ktime_ns = 0;
                        h.at_segment_start = false;
                        h.in_one_segment = false;
                        Item::Head(h)
                    }
                    Item::End { .. } => Item::End { ktime_ns: 0 },
                    Item::Gap { .. } => Item::Gap { sent_ns: 0 },
                    other => other,
                })
                .collect()
        };
        let whole = strip(whole);
        assert!(
            !whole.is_empty() || wire.starts_with(b"GET /a"),
            "{}",
            String::from_utf8_lossy(wire)
        );
        assert_eq!(whole, strip(split), "{}", String::from_utf8_lossy(wire));
    }
}

#[test]
fn a_looked_up_field_past_the_255th_is_found_by_a_scan() {
    let mut fields = vec![("x", "y"); 300];
    fields.extend([("host", "far"), ("host", "farther")]);
    let h = Headers::request("/", fields);
    assert_eq!(h.get("host"), Some("far"));
    assert_eq!(h.get("te"), None);
}

#[test]
fn a_lookup_of_an_absent_field_finds_nothing_and_of_a_present_one_its_first_value() {
    let h = Headers::request("/", [("te", "trailers"), ("b3", "1"), ("x", "y"), ("b3", "2")]);
    assert_eq!(h.get("b3"), Some("1"));
    assert_eq!(h.get("te"), Some("trailers"));
    assert_eq!(h.get("x"), Some("y"));
    assert_eq!(h.get("traceparent"), None);
    assert_eq!(h.get("content-length"), None);
}

proptest! {
    #[test]
    fn a_lookup_finds_the_first_field_of_its_name_however_far_down(
        names in proptest::collection::vec(prop_oneof![Just("host"), Just("te"), Just("b3"), Just("x"), Just("user-agent")], 0..300),
    ) {
        // Random names appear early: the unit test above covers a first
        // field too far down for its position to fit a byte.
        let fields: Vec<(String, String)> = names.iter().enumerate().map(|(i, n)| (n.to_string(), i.to_string())).collect();
        let h = Headers::request("/", fields.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        for name in ["host", "te", "b3", "x", "user-agent", "traceparent"] {
            let model = fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
            prop_assert_eq!(h.get(name), model, "{}", name);
        }
    }
}

proptest! {
    #[test]
    fn never_panics_on_arbitrary_segments(segs in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..300), 0u64..5000), 0..12)) {
        let mut s = HttpStream::new();
        for (i, (data, missing)) in segs.into_iter().enumerate() {
            s.push(Bytes::from(data), missing, i as u64);
            let mut guard = 0;
            while s.next_item().is_some() {
                guard += 1;
                prop_assert!(guard < 10_000);
            }
        }
        let _ = s.close();
    }

    #[test]
    fn any_split_of_valid_traffic_gives_the_same_messages(cuts in proptest::collection::vec(0usize..200, 0..8)) {
        let wire: &[u8] = b"POST /x HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcdGET /y HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /z HTTP/1.1\r\n\r\n";
        let mut points: Vec<usize> = cuts.into_iter().map(|c| c % wire.len()).collect();
        points.sort_unstable();
        points.dedup();
        let mut chunks = Vec::new();
        let mut last = 0;
        for p in points { chunks.push(&wire[last..p]); last = p; }
        chunks.push(&wire[last..]);
        let mut s = HttpStream::new();
        let items = feed(&mut s, &chunks);
        prop_assert_eq!(heads(&items).len(), 3);
        prop_assert_eq!(ends(&items).len(), 3);
        // A head parsed where it lies (whole in one read) and one gathered
        // from several reads are the same head.
        let whole = feed(&mut HttpStream::new(), &[wire]);
        let facts = |items: &[Item]| -> Vec<(HeadKind, u8, Headers)> {
            heads(items).iter().map(|h| (h.kind.clone(), h.version, h.headers.clone())).collect()
        };
        prop_assert_eq!(facts(&items), facts(&whole));
    }

    #[test]
    fn hostile_header_values_never_panic(name in "[a-zA-Z-]{1,20}", value in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let mut wire = format!("GET / HTTP/1.1\r\n{name}: ").into_bytes();
        wire.extend(value);
        wire.extend(b"\r\n\r\n");
        let mut s = HttpStream::new();
        let _ = feed(&mut s, &[&wire]);
    }
}

#[test]
fn every_looked_up_name_is_found_among_those_of_its_length() {
    for (i, name) in names::LOOKED_UP.iter().enumerate() {
        let upper = name.to_ascii_uppercase();
        assert_eq!(names::looked_up(name), Some(i as u32), "{name}");
        assert_eq!(names::looked_up_any_case(name), Some(i as u32), "{name}");
        assert_eq!(names::looked_up_any_case(&upper), Some(i as u32), "{upper}");
        assert_eq!(names::looked_up(&upper), None, "exact case: {upper}");
    }
    for other in [
        "",
        "accept",
        "date",
        "x-b3-flags",
        "content-lengths",
        "a-field-name-longer-than-any",
    ] {
        assert_eq!(names::looked_up_any_case(other), None, "{other}");
    }
}

proptest! {
    /// The by-length lookup finds what a scan of every name finds.
    #[test]
    fn looked_up_by_length_is_a_scan_of_every_name(
        name in prop_oneof![
            "[a-zA-Z0-9-]{0,24}",
            (0..16usize, any::<u64>()).prop_map(|(i, flips)| {
                names::LOOKED_UP[i]
                    .chars()
                    .enumerate()
                    .map(|(k, c)| if flips >> (k % 64) & 1 == 1 { c.to_ascii_uppercase() } else { c })
                    .collect::<String>()
            }),
            // Any byte flipped in the case bit: only a letter's flip is
            // the same name (`-` and digits become other characters).
            (0..16usize, any::<u64>()).prop_map(|(i, flips)| {
                names::LOOKED_UP[i]
                    .bytes()
                    .enumerate()
                    .map(|(k, b)| char::from(if flips >> (k % 64) & 1 == 1 { b ^ 0x20 } else { b }))
                    .collect::<String>()
            }),
        ]
    ) {
        let scan = names::LOOKED_UP.iter().position(|l| l.eq_ignore_ascii_case(&name)).map(|i| i as u32);
        prop_assert_eq!(names::looked_up_any_case(&name), scan);
        let exact = names::LOOKED_UP.iter().position(|l| *l == name).map(|i| i as u32);
        prop_assert_eq!(names::looked_up(&name), exact);
    }
}
