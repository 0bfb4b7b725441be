//! meshless kernel programs: syscall tracepoints that follow HTTP sockets
//! and copy a bounded prefix of every payload into one ring buffer.
//!
//! Tracepoint arguments are read by dereferencing the context pointer (not
//! with `bpf_probe_read_kernel`) so the programs also load on kernels locked
//! down to confidentiality.
#![no_std]
#![no_main]

mod capture;
mod context;
mod detect;
mod follow;
mod golang;
mod h2;
mod maps;
mod mem;
mod probes;
mod sock;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
