//! Struct copies and zeroing a word at a time. BPF has no memcpy or memset
//! instruction: where the compiler does not expand one inline it calls
//! aya-ebpf's, a byte loop of about five instructions per byte, and such
//! calls ran on every traced syscall (the 104-byte connection state, the
//! 48-byte addresses of every event header, 40-byte trace contexts).
use core::{
    mem::{MaybeUninit, align_of, size_of},
    ptr::{read_volatile, write_volatile},
};

/// `*dst = *src`, eight (or four) bytes at a time. The accesses are
/// volatile so that the compiler cannot fold them back into a call.
#[inline(always)]
pub fn copy<T: Copy>(dst: &mut T, src: &T) {
    // SAFETY: both are valid, aligned `T`s.
    unsafe { copy_raw(dst, src) }
}

/// # Safety
/// `dst` and `src` point to valid, aligned, non-overlapping `T`s.
#[inline(always)]
pub unsafe fn copy_raw<T: Copy>(dst: *mut T, src: *const T) {
    const { assert!(align_of::<T>() >= 4 && size_of::<T>() % 4 == 0) };
    if align_of::<T>() >= 8 && size_of::<T>() % 8 == 0 {
        let (d, s) = (dst.cast::<u64>(), src.cast::<u64>());
        for i in 0..size_of::<T>() / 8 {
            // SAFETY: `i` stays inside both (see the caller's contract).
            unsafe { write_volatile(d.add(i), read_volatile(s.add(i))) };
        }
    } else {
        let (d, s) = (dst.cast::<u32>(), src.cast::<u32>());
        for i in 0..size_of::<T>() / 4 {
            // SAFETY: as above, four bytes at a time.
            unsafe { write_volatile(d.add(i), read_volatile(s.add(i))) };
        }
    }
}

/// Zeroes `slot` in place, as [`zero`] does, and returns it (`T` must be a
/// plain-data type for which all zeroes is a valid value). In place: a
/// zeroed value returned and moved into a variable is copied, and the
/// compiler, knowing it is zeroes, turns the copy into a memset call.
#[inline(always)]
pub fn zeroed_in<T: Copy>(slot: &mut MaybeUninit<T>) -> &mut T {
    // SAFETY: every byte of `slot` is written; all zeroes is a valid `T`.
    unsafe {
        zero_raw(slot.as_mut_ptr());
        slot.assume_init_mut()
    }
}

/// Sets every byte of `*dst` to zero, four bytes at a time (`T` must be a
/// plain-data type for which all zeroes is a valid value).
#[inline(always)]
pub fn zero<T: Copy>(dst: &mut T) {
    // SAFETY: `dst` is a valid, aligned `T`.
    unsafe { zero_raw(dst) }
}

/// # Safety
/// `dst` points to a valid (or writable, uninitialised), aligned `T`.
#[inline(always)]
pub unsafe fn zero_raw<T: Copy>(dst: *mut T) {
    const { assert!(align_of::<T>() >= 4 && size_of::<T>() % 4 == 0) };
    let d = dst.cast::<u32>();
    for i in 0..size_of::<T>() / 4 {
        // SAFETY: `i` stays inside `*dst`.
        unsafe { write_volatile(d.add(i), 0) };
    }
}
