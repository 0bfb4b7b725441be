use super::*;

pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn block(headers: &[(&str, &str)]) -> Vec<u8> {
    loona_hpack::Encoder::new().encode(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
}

fn feed(s: &mut FrameStream, bytes: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    s.push(bytes, 0, 1, &mut out);
    out
}

fn path_of(f: &Frame) -> Option<String> {
    match f {
        Frame::Headers { block: Some(b), .. } => b.get(":path").flatten().map(str::to_owned),
        _ => None,
    }
}

#[test]
fn reads_a_request_after_the_preface_split_byte_by_byte() {
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(4, 0, 0, &[0, 3, 0, 0, 0, 100]));
    bytes.extend(frame(
        1,
        END_HEADERS | END_STREAM,
        1,
        &block(&[(":method", "GET"), (":path", "/a")]),
    ));
    let mut s = FrameStream::new(true);
    let mut out = Vec::new();
    for b in &bytes {
        s.push(std::slice::from_ref(b), 0, 1, &mut out);
    }
    assert_eq!(out.len(), 1);
    assert_eq!(path_of(&out[0]).as_deref(), Some("/a"));
    assert!(matches!(
        out[0],
        Frame::Headers {
            stream: 1,
            end_stream: true,
            ..
        }
    ));
}

#[test]
fn a_server_direction_without_preface_is_read_as_frames() {
    let mut s = FrameStream::new(true);
    let out = feed(&mut s, &frame(1, END_HEADERS, 1, &block(&[(":status", "200")])));
    assert_eq!(out.len(), 1);
}

#[test]
fn assembles_continuation_frames_and_strips_padding_and_priority() {
    let b = block(&[(":method", "POST"), (":path", "/svc/M"), ("x-long", &"v".repeat(300))]);
    let (first, rest) = b.split_at(10);
    let mut headers = vec![4u8]; // pad length
    headers.extend_from_slice(&[0, 0, 0, 3, 16]); // priority
    headers.extend_from_slice(first);
    headers.extend_from_slice(&[0; 4]);
    let mut bytes = frame(1, PADDED | PRIORITY, 3, &headers);
    let (mid, last) = rest.split_at(100);
    bytes.extend(frame(9, 0, 3, mid));
    bytes.extend(frame(9, END_HEADERS, 3, last));
    let mut s = FrameStream::new(false);
    let out = feed(&mut s, &bytes);
    assert_eq!(out.len(), 1);
    assert_eq!(path_of(&out[0]).as_deref(), Some("/svc/M"));
}

#[test]
fn data_bodies_not_captured_cost_no_framing() {
    let mut s = FrameStream::new(false);
    let data = frame(0, END_STREAM, 1, &[7u8; 5000]);
    let mut out = Vec::new();
    // Only the first 100 bytes of the DATA frame were captured.
    s.push(&data[..100], (data.len() - 100) as u64, 5, &mut out);
    assert_eq!(out, vec![Frame::DataEnd { stream: 1, ktime_ns: 5 }]);
    let next = frame(3, 0, 1, &8u32.to_be_bytes());
    s.push(&next, 0, 6, &mut out);
    assert_eq!(
        out[1],
        Frame::Reset {
            stream: 1,
            code: 8,
            ktime_ns: 6
        }
    );
}

#[test]
fn a_frame_header_lost_in_uncaptured_bytes_resyncs_at_the_next_frame() {
    let mut s = FrameStream::new(false);
    let mut out = Vec::new();
    s.push(&frame(0, 0, 1, &[1, 2, 3]), 50, 1, &mut out);
    assert_eq!(out, vec![Frame::Lost { ktime_ns: 1 }]);
    s.push(b"garbage that is not a frame", 0, 2, &mut out);
    assert_eq!(out.len(), 1, "garbage is skipped");
    s.push(
        &frame(7, 0, 0, &[0, 0, 0, 5, 0, 0, 0, 0, b'd', b'b', b'g']),
        0,
        3,
        &mut out,
    );
    assert_eq!(
        out[1],
        Frame::GoAway {
            last_stream: 5,
            code: 0,
            ktime_ns: 3
        }
    );
}

#[test]
fn an_oversized_header_block_is_dropped_and_counted() {
    let mut s = FrameStream::new(false);
    let mut bytes = frame(1, 0, 1, &[0x40, 0x01, b'a']);
    for _ in 0..(MAX_BLOCK_BYTES / 16_000 + 1) {
        bytes.extend(frame(9, 0, 1, &[0u8; 16_000]));
    }
    bytes.extend(frame(9, END_HEADERS, 1, &[0u8; 10]));
    let out = feed(&mut s, &bytes);
    assert!(matches!(out[..], [Frame::Headers { block: None, .. }]));
    assert_eq!(s.faults.limited, 1);
    assert!(s.state_bytes() < 2 * MAX_BLOCK_BYTES);
}

#[test]
fn a_stray_continuation_loses_framing() {
    let mut s = FrameStream::new(false);
    let out = feed(&mut s, &frame(9, END_HEADERS, 1, &[0x82]));
    assert!(matches!(out[..], [Frame::Lost { .. }]));
    assert_eq!(s.faults.malformed, 1);
}

/// Splits a direction's bytes into records as the kernel's frame walk does
/// (ebpf/src/h2.rs), for syscalls of the given sizes: each record's captured
/// bytes are a prefix of its range, records hold at most 2 KiB, and DATA
/// payloads over 256 bytes are not captured (a skipped payload ends a
/// record's captured part). Returns (captured, bytes moved) per record.
fn walk_records(stream: &[u8], syscalls: &[usize]) -> Vec<(Vec<u8>, u64)> {
    const CAP: usize = 2048;
    let mut records = Vec::new();
    let (mut pos, mut left, mut skip, mut hdr) = (PREFACE.len(), 0usize, false, Vec::new());
    records.push((PREFACE.to_vec(), PREFACE.len() as u64));
    let mut sizes = syscalls.iter().cycle();
    while pos < stream.len() {
        let end = (pos + sizes.next().copied().unwrap_or(1)).min(stream.len());
        let (mut cap, mut len, mut gap) = (Vec::new(), 0u64, false);
        while pos < end {
            let b = stream[pos];
            let skipped = left > 0 && skip;
            if !skipped && (gap || cap.len() >= CAP) {
                records.push((std::mem::take(&mut cap), len));
                (len, gap) = (0, false);
            }
            if skipped {
                gap = true;
                left -= 1;
            } else {
                cap.push(b);
                if left > 0 {
                    left -= 1;
                } else {
                    hdr.push(b);
                    if hdr.len() == HEADER {
                        left = u32::from_be_bytes([0, hdr[0], hdr[1], hdr[2]]) as usize;
                        skip = hdr[3] == DATA && left > 256;
                        hdr.clear();
                    }
                }
            }
            len += 1;
            pos += 1;
        }
        records.push((cap, len));
    }
    records
}

#[test]
fn records_shaped_like_the_kernel_frame_walk_decode_every_header_block() {
    // Header blocks sharing one HPACK table, between DATA frames big and
    // small, cut into syscalls of awkward sizes (inside frame headers too).
    let mut enc = loona_hpack::Encoder::new();
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(4, 0, 0, &[]));
    for i in 0..60u32 {
        let path = format!("/walk/{i}");
        let fields = [
            (":method", "POST"),
            (":path", path.as_str()),
            ("x-pad", "padding-that-is-indexed"),
        ];
        let block = enc.encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
        bytes.extend(frame(1, END_HEADERS, 2 * i + 1, &block));
        let body = vec![b'd'; if i % 3 == 0 { 40 } else { 5000 }];
        bytes.extend(frame(0, END_STREAM, 2 * i + 1, &body));
        if i % 7 == 0 {
            bytes.extend(frame(8, 0, 0, &[0, 0, 1, 0]));
        }
    }
    let records = walk_records(&bytes, &[16384, 7, 3000, 5, 9000, 1]);
    let captured: usize = records.iter().map(|(c, _)| c.len()).sum();
    let moved: u64 = records.iter().map(|(_, l)| l).sum();
    assert_eq!(moved, bytes.len() as u64, "the records' lengths add up");
    assert!(captured * 3 < bytes.len(), "big DATA payloads were not captured");
    let mut s = FrameStream::new(true);
    let mut out = Vec::new();
    for (cap, len) in &records {
        s.push(cap, len - cap.len() as u64, 1, &mut out);
    }
    assert!(!out.iter().any(|f| matches!(f, Frame::Lost { .. })), "framing kept");
    let paths: Vec<String> = out.iter().filter_map(path_of).collect();
    let want: Vec<String> = (0..60).map(|i| format!("/walk/{i}")).collect();
    assert_eq!(paths, want, "every header block decoded, in order");
    let ends = out.iter().filter(|f| matches!(f, Frame::DataEnd { .. })).count();
    assert_eq!(ends, 60, "every DATA frame header seen");
}

#[test]
fn a_record_cut_short_inside_a_header_block_loses_framing_and_the_table() {
    let mut enc = loona_hpack::Encoder::new();
    let fields = [(":method", "GET"), (":path", "/kept"), ("x-new", "only-in-the-table")];
    let first = enc.encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
    let second = enc.encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
    let mut s = FrameStream::new(false);
    let mut out = Vec::new();
    let f1 = frame(1, END_HEADERS | END_STREAM, 1, &first);
    // The walk ran out of steps: the rest of the syscall is not captured.
    s.push(&f1[..12], (f1.len() - 12) as u64, 1, &mut out);
    assert!(matches!(out.as_slice(), [Frame::Lost { .. }]));
    out.clear();
    s.push(&frame(1, END_HEADERS | END_STREAM, 3, &second), 0, 2, &mut out);
    match out.as_slice() {
        [Frame::Headers { block: Some(b), .. }] => assert!(b.has_unknown(), "fields from the lost table are unknown"),
        other => panic!("{other:?}"),
    }
}
