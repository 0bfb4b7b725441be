//! The consumer side of the kernel's BPF ring buffer, with its data area
//! mapped once.
//!
//! Why not aya's `RingBuf`: it maps the data area twice in a row (as
//! libbpf does) so that a record wrapping past the end reads contiguously,
//! and the kernel maps every page of a ring buffer at `mmap`, so an 8 MiB
//! ring counts 16 MiB in the agent's RSS from the first moment
//! (docs/bench/memory.md). Mapped once it counts 8; the rare record that
//! wraps is copied into a scratch buffer instead. The protocol (positions,
//! header bits, memory ordering, the wakeup fence) is aya's, which is
//! libbpf's (tools/lib/bpf/ringbuf.c).
use std::{
    ops::Deref,
    os::fd::{AsFd, AsRawFd, RawFd},
    sync::atomic::{fence, AtomicU32, AtomicU64, Ordering},
};

use aya::maps::{Map, MapData};

/// Why the ring buffer cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("map is not a ring buffer")]
    NotRing,
    #[error("ring buffer size {0} is not a power of two of at least a page")]
    Size(u32),
    #[error("mapping the ring buffer: {0}")]
    Map(#[source] std::io::Error),
}

/// `BPF_RINGBUF_BUSY_BIT`, `BPF_RINGBUF_DISCARD_BIT`, `BPF_RINGBUF_HDR_SZ`.
const BUSY: u32 = 1 << 31;
const DISCARD: u32 = 1 << 30;
const HEADER: u64 = 8;

/// A shared mapping of part of the map, unmapped on drop.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(fd: RawFd, len: usize, prot: libc::c_int, offset: usize) -> std::io::Result<Mapping> {
        let offset = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks
        // the range against the ring buffer's pages.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, offset) };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what mmap returned.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

// SAFETY: the mapping is plain shared memory; access goes through atomics
// (positions, headers) or reads of committed records.
unsafe impl Send for Mapping {}

/// Where this consumer is: its position and the kernel-visible copy.
struct Consumer {
    pos: u64,
    page: Mapping,
    needs_wakeup: bool,
}

impl Consumer {
    fn shared(&self) -> &AtomicU64 {
        // SAFETY: the consumer page is page-aligned, at least 8 bytes, and
        // lives as long as self; the kernel reads it atomically too.
        unsafe { &*self.page.ptr.cast::<AtomicU64>() }
    }

    fn consume(&mut self, len: u32) {
        self.pos += (HEADER + u64::from(len)).next_multiple_of(8);
        self.shared().store(self.pos, Ordering::Release);
        self.needs_wakeup = true;
    }
}

/// The kernel's ring buffer of events, read record by record.
pub struct Ring {
    map: MapData,
    consumer: Consumer,
    /// The producer page, then the data area once.
    producer: Mapping,
    page: usize,
    size: u64,
    producer_pos: u64,
    /// A record that wraps past the end of the data area, made contiguous.
    scratch: Vec<u8>,
}

impl Ring {
    /// Maps the ring buffer `map` of `size` bytes (its max_entries).
    pub fn new(map: Map, size: u32) -> Result<Ring, RingError> {
        let Map::RingBuf(map) = map else {
            return Err(RingError::NotRing);
        };
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let data = usize::try_from(size).map_err(|_| RingError::Size(size))?;
        if !size.is_power_of_two() || data < page {
            return Err(RingError::Size(size));
        }
        let fd = map.fd().as_fd().as_raw_fd();
        let page_map = Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0).map_err(RingError::Map)?;
        let producer = Mapping::new(fd, page + data, libc::PROT_READ, page).map_err(RingError::Map)?;
        let mut consumer = Consumer {
            pos: 0,
            page: page_map,
            needs_wakeup: false,
        };
        consumer.pos = consumer.shared().load(Ordering::Acquire);
        let mut ring = Ring {
            map,
            consumer,
            producer,
            page,
            size: u64::from(size),
            producer_pos: 0,
            scratch: Vec::new(),
        };
        ring.producer_pos = ring.load_producer_pos();
        Ok(ring)
    }

    fn load_producer_pos(&self) -> u64 {
        // SAFETY: the producer page starts the mapping, page-aligned.
        unsafe { &*self.producer.ptr.cast::<AtomicU64>() }.load(Ordering::Acquire)
    }

    fn data(&self) -> *const u8 {
        // SAFETY: the data area follows the producer page in the mapping.
        unsafe { self.producer.ptr.cast::<u8>().add(self.page) }
    }

    /// The next committed record, or None when none is ready; the record
    /// is consumed when the returned item drops.
    #[allow(clippy::should_implement_trait)] // an item borrows the ring: not an Iterator
    pub fn next(&mut self) -> Option<Record<'_>> {
        loop {
            if self.consumer.pos == self.producer_pos {
                if self.consumer.needs_wakeup {
                    // The kernel decides whether to wake us from the
                    // consumer position it sees: publish it before
                    // reading the producer's (libbpf does the same).
                    fence(Ordering::SeqCst);
                    self.consumer.needs_wakeup = false;
                }
                self.producer_pos = self.load_producer_pos();
                if self.consumer.pos == self.producer_pos {
                    return None;
                }
            }
            let mask = self.size - 1;
            let at = (self.consumer.pos & mask) as usize;
            // SAFETY: headers are 8-aligned inside the data area (every
            // record's length is rounded up to 8 and the size is a power
            // of two), written by the kernel with release semantics.
            let header = unsafe { &*self.data().add(at).cast::<AtomicU32>() }.load(Ordering::Acquire);
            if header & BUSY != 0 {
                if !self.consumer.needs_wakeup {
                    return None;
                }
                fence(Ordering::SeqCst);
                self.consumer.needs_wakeup = false;
                continue;
            }
            let len = header & !(BUSY | DISCARD);
            if header & DISCARD != 0 || u64::from(len) + HEADER > self.size {
                self.consumer.consume(len.min((self.size - HEADER) as u32));
                continue;
            }
            // SAFETY: the data area, `size` bytes after the producer page;
            // only committed records are read from it.
            let data = unsafe { std::slice::from_raw_parts(self.data(), self.size as usize) };
            let bytes = record_bytes(data, self.consumer.pos, len as usize, &mut self.scratch);
            return Some(Record {
                bytes,
                len,
                consumer: &mut self.consumer,
            });
        }
    }
}

/// The `len` bytes of the record whose header is at position `pos` of
/// the ring whose data area is `data`: borrowed, or copied into `scratch`
/// when they wrap past the end of the area.
fn record_bytes<'a>(data: &'a [u8], pos: u64, len: usize, scratch: &'a mut Vec<u8>) -> &'a [u8] {
    let size = data.len();
    let start = ((pos + HEADER) & (size as u64 - 1)) as usize;
    if start + len <= size {
        return &data[start..start + len];
    }
    let first = size - start;
    scratch.clear();
    scratch.extend_from_slice(&data[start..]);
    scratch.extend_from_slice(&data[..len - first]);
    scratch
}

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }
}

/// One record, borrowed from the ring buffer (or the scratch copy of one
/// that wraps); consumed on drop.
pub struct Record<'a> {
    bytes: &'a [u8],
    len: u32,
    consumer: &'a mut Consumer,
}

impl Deref for Record<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes
    }
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        self.consumer.consume(self.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_that_wraps_past_the_end_of_the_data_area_comes_out_whole() {
        let mut data = vec![0u8; 64];
        // Header at 48 (one lap on), bytes 56..64 then 0..8.
        data[56..].copy_from_slice(b"abcdefgh");
        data[..8].copy_from_slice(b"ijklmnop");
        let mut scratch = Vec::new();
        assert_eq!(record_bytes(&data, 64 + 48, 16, &mut scratch), b"abcdefghijklmnop");
    }

    #[test]
    fn a_record_inside_the_data_area_is_borrowed_not_copied_even_when_its_header_ends_the_area() {
        let mut data = vec![0u8; 64];
        data[..4].copy_from_slice(b"wxyz");
        data[16..20].copy_from_slice(b"abcd");
        let mut scratch = Vec::new();
        let got = record_bytes(&data, 56, 4, &mut scratch);
        assert_eq!(got, b"wxyz");
        assert!(std::ptr::eq(got.as_ptr(), data.as_ptr()));
        assert_eq!(record_bytes(&data, 8, 4, &mut scratch), b"abcd");
        assert!(scratch.is_empty());
    }
}
