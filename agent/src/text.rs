//! Short text formatted on the stack: numbers, addresses, status codes.
//! Every span formats a few of these for its attributes and metric labels,
//! so building one allocates nothing and reading it back validates nothing.
use std::{fmt, net::IpAddr};

/// Up to `N` bytes of text. What does not fit is left out a whole piece at
/// a time (callers size it for the longest value they write).
///
/// Invariant: `buf[..len]` is always valid UTF-8. Only whole `&str`s
/// ([`fmt::Write::write_str`], which copies all of a piece or none of it)
/// and ASCII bytes ([`StackText::push_ascii`]) are ever copied in.
#[derive(Clone, Copy)]
pub struct StackText<const N: usize> {
    buf: [u8; N],
    len: usize,
}

/// Room for any IP address, number or status text the exporter writes.
pub type Text = StackText<64>;

impl<const N: usize> Default for StackText<N> {
    fn default() -> Self {
        Self { buf: [0; N], len: 0 }
    }
}

impl<const N: usize> StackText<N> {
    /// `v` as `Display` writes it (through `core::fmt`: for the rare values).
    pub fn of(v: impl fmt::Display) -> Self {
        let mut t = Self::default();
        let _ = fmt::Write::write_fmt(&mut t, format_args!("{v}"));
        t
    }

    /// `n` in decimal (without `core::fmt`).
    pub fn number(n: u64) -> Self {
        let mut t = Self::default();
        t.push_number(n);
        t
    }

    /// An IP address as `Display` writes it; IPv4 by hand (through
    /// `core::fmt`, one call per octet, it showed in the exporter's profile:
    /// a span formats two or three addresses).
    pub fn ip(ip: IpAddr) -> Self {
        let IpAddr::V4(v4) = ip else {
            return Self::of(ip);
        };
        let mut t = Self::default();
        for (i, octet) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                t.push_ascii(b'.');
            }
            // Byte by byte: a copy of one to three digits through
            // `write_str` was a `memcpy` call each.
            if octet >= 100 {
                t.push_ascii(b'0' + octet / 100);
            }
            if octet >= 10 {
                t.push_ascii(b'0' + octet / 10 % 10);
            }
            t.push_ascii(b'0' + octet % 10);
        }
        t
    }

    /// Appends `n` in decimal, or nothing if it does not fit.
    pub fn push_number(&mut self, n: u64) {
        let _ = fmt::Write::write_str(self, itoa::Buffer::new().format(n));
    }

    /// Appends one ASCII byte, or nothing if it is not ASCII or does not fit.
    fn push_ascii(&mut self, b: u8) {
        if b.is_ascii() && self.len < N {
            self.buf[self.len] = b;
            self.len += 1;
        }
    }

    pub fn as_str(&self) -> &str {
        let bytes = &self.buf[..self.len];
        debug_assert!(std::str::from_utf8(bytes).is_ok());
        // SAFETY: the type's invariant: only whole `&str`s and ASCII bytes
        // are copied in, so `buf[..len]` is valid UTF-8. Checking it again
        // cost ~80 instructions per value in the replay profile, several
        // times per span.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }
}

impl<const N: usize> fmt::Write for StackText<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        if end > N {
            return Err(fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl<const N: usize> fmt::Debug for StackText<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// `bytes` as text, as `std::str::from_utf8` reads them. Header values
/// and thread names are almost always ASCII, which a word at a time proves
/// faster than `from_utf8` does for short slices (~100 instructions per
/// value in the replay profile).
pub fn str_of(bytes: &[u8]) -> Result<&str, std::str::Utf8Error> {
    if bytes.is_ascii() {
        // SAFETY: ASCII is valid UTF-8.
        return Ok(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    std::str::from_utf8(bytes)
}

#[cfg(test)]
mod tests {
    use std::fmt::Write;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn ip_text_is_what_display_writes() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "192.168.100.9",
            "::1",
            "fe80::1:2",
        ] {
            let parsed: IpAddr = ip.parse().expect("ip");
            assert_eq!(Text::ip(parsed).as_str(), parsed.to_string());
        }
    }

    #[test]
    fn a_value_too_long_for_the_buffer_is_left_out_whole() {
        let mut t = StackText::<8>::default();
        t.push_number(12345);
        t.push_number(6789);
        assert_eq!(t.as_str(), "12345", "6789 did not fit and none of it was copied");
        t.push_ascii(b'!');
        t.push_ascii(0xC3);
        assert_eq!(t.as_str(), "12345!", "a non-ASCII byte is refused");
        assert_eq!(StackText::<2>::number(999).as_str(), "");
    }

    proptest! {
        /// The ASCII shortcut reads what `from_utf8` reads.
        #[test]
        fn str_of_reads_what_from_utf8_reads(
            bytes in prop_oneof![proptest::collection::vec(any::<u8>(), 0..48), "[ -~]{0,48}".prop_map(String::into_bytes)]
        ) {
            prop_assert_eq!(str_of(&bytes).ok(), std::str::from_utf8(&bytes).ok());
        }

        #[test]
        fn numbers_and_addresses_are_what_display_writes(n: u64, v4: [u8; 4], v6: [u16; 8]) {
            let (v4, v6) = (IpAddr::from(v4), IpAddr::from(v6));
            let (number, v4_text, v6_text) = (StackText::<20>::number(n), Text::ip(v4), Text::ip(v6));
            prop_assert_eq!(number.as_str(), n.to_string());
            prop_assert_eq!(v4_text.as_str(), v4.to_string());
            prop_assert_eq!(v6_text.as_str(), v6.to_string());
        }

        /// Whatever is written, the text is the pieces that fit, in order
        /// (so it is always whole UTF-8).
        #[test]
        fn the_text_is_the_pieces_that_fit(pieces in proptest::collection::vec(".{0,6}", 0..8)) {
            let mut t = StackText::<16>::default();
            let mut expected = String::new();
            for p in &pieces {
                if t.write_str(p).is_ok() {
                    expected.push_str(p);
                }
            }
            prop_assert!(expected.len() <= 16);
            prop_assert_eq!(t.as_str(), expected);
        }
    }
}
