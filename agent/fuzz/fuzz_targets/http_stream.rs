//! The HTTP/1.x parser on arbitrary bytes split into arbitrary syscalls.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::http_stream(data));
