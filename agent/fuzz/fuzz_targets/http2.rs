//! The HTTP/2 framing, HPACK and stream matcher on arbitrary frames split
//! into arbitrary syscalls.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::http2(data));
