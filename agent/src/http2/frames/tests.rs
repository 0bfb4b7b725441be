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
