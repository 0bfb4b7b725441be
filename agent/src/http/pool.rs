//! Header buffers reused per thread: a message head is parsed, paired and
//! dropped on the correlator's thread, so its buffer goes back to a short
//! free list there and the next head takes it instead of allocating.
//! Bounded: at most [`KEEP`] buffers of at most [`KEEP_CAPACITY`] bytes
//! each are kept per thread; anything else is freed as usual.
use std::cell::RefCell;

/// Buffers kept per thread (more than the heads a thread holds at once in
/// a replay of 4 connections, far fewer than a busy node's pending heads).
const KEEP: usize = 64;
/// Largest buffer kept; a buffer grown by a big header block is freed.
const KEEP_CAPACITY: usize = 2048;

thread_local! {
    static FREE: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with room for `bytes`, reused when one is free.
pub fn take(bytes: usize) -> String {
    let reused = FREE.try_with(|f| f.borrow_mut().pop()).ok().flatten();
    match reused {
        Some(mut text) => {
            text.clear();
            text.reserve(bytes);
            text
        }
        // Sized to the head: a floor (512 bytes was tried) multiplied the
        // memory of the many heads a connection flood holds.
        None => String::with_capacity(bytes),
    }
}

/// Gives a buffer back (kept if the list has room and it is not large).
pub fn give(text: String) {
    if text.capacity() == 0 || text.capacity() > KEEP_CAPACITY {
        return;
    }
    // During thread teardown the list may be gone: the buffer is freed.
    let _ = FREE.try_with(|f| {
        let mut free = f.borrow_mut();
        if free.len() < KEEP {
            free.push(text);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_is_taken_again_empty_and_large_ones_are_not_kept() {
        let mut text = take(10);
        text.push_str("host: a");
        let ptr = text.as_ptr();
        give(text);
        let again = take(10);
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), ptr);
        give(again);
        let big = String::with_capacity(KEEP_CAPACITY + 1);
        let big_ptr = big.as_ptr();
        give(big);
        let taken = take(10);
        assert_ne!(taken.as_ptr(), big_ptr);
    }
}
