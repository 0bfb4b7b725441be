//! HTTP/2 (h2c) behind the protocol seam: frames and HPACK per direction
//! ([`frames`], [`hpack`]), requests paired with responses by stream id,
//! gRPC facts from `:path`, `content-type` and trailers ([`grpc`]).
pub mod frames;
mod grpc;
pub mod hpack;
mod streams;

use meshless_common::Direction;

pub use frames::PREFACE;
pub use streams::Http2;

use crate::correlate::protocol::Protocol;

/// Claims a connection whose first bytes are the client preface, or (an
/// agent started on a live connection) an HTTP/2 frame header no HTTP/1
/// message could start with.
pub fn detect(first: &[u8], direction: Direction, _kept: &crate::http::KeptHeaders) -> Option<Box<dyn Protocol>> {
    if first.len() >= 4 && PREFACE.starts_with(&first[..first.len().min(PREFACE.len())]) {
        return Some(Box::new(Http2::new(Some(direction))));
    }
    if looks_like_frames(first) {
        return Some(Box::new(Http2::new(None)));
    }
    None
}

/// A frame header (length < 64 KiB, a known type, reserved bit clear)
/// whose first byte is 0: never the first byte of an HTTP/1 message.
fn looks_like_frames(b: &[u8]) -> bool {
    b.len() >= 9 && b[0] == 0 && b[3] <= 9 && b[5] & 0x80 == 0
}

#[cfg(test)]
mod tests;
