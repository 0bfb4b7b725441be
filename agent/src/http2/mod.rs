//! HTTP/2 (h2c) parsing: frames, HPACK, and pairing by stream id.
use meshless_common::Direction;

use crate::correlate::protocol::Protocol;

/// Not wired yet: HTTP/2 connections stay with the HTTP/1 fallback.
pub fn detect(_first: &[u8], _direction: Direction) -> Option<Box<dyn Protocol>> {
    None
}
