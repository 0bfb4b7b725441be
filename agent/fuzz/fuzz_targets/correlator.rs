//! The correlator on exchanges with lost, duplicated, reordered, split and
//! closed events: no panic, no wrong pairing, no state left behind.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    harness::correlator(data, harness::Faults::ALL);
});
