//! Event loss, per connection: the kernel numbers each connection's events
//! (`EventHeader::seq`, both directions together) and uses up a number
//! even when the ring buffer is full, so a jump in the numbers is exactly
//! "events were lost here" — from the ring buffer or from the
//! capture→correlate queue alike. Pairing must restart there instead of
//! drifting.
//!
//! One counter for both directions (rather than one each) sees a lost
//! request or response at the very next event either way; the price is
//! that two events of one connection sent from different CPUs at the same
//! instant may arrive swapped, which reads as a loss too (spans dropped,
//! never paired wrong).

/// The last event number seen on one connection.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sequence {
    /// 0 until a numbered event was seen.
    last: u32,
}

/// Where an event stands in its connection's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// The next event (or an unnumbered one): use it.
    Next,
    /// Events before this one were lost: restart pairing, then use it.
    Gap,
    /// A number already seen: delivered after a later one, or taken twice
    /// (the kernel's counter is not atomic, so two threads on one socket
    /// at once can share one). Its bytes cannot be placed: pairing
    /// restarts and the event is skipped.
    Stale,
}

impl Sequence {
    /// Files event number `seq` (0: unnumbered).
    pub fn check(&mut self, seq: u32) -> Order {
        if seq == 0 {
            return Order::Next;
        }
        let prev = self.last;
        // The kernel's numbers wrap past 0, which it never hands out.
        let expected = match prev.wrapping_add(1) {
            0 => 1,
            n => n,
        };
        if seq == expected {
            self.last = seq;
            return Order::Next;
        }
        if prev != 0 && (seq.wrapping_sub(prev) as i32) <= 0 {
            return Order::Stale;
        }
        self.last = seq;
        Order::Gap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_numbers_are_in_order() {
        let mut s = Sequence::default();
        for n in 1..5 {
            assert_eq!(s.check(n), Order::Next);
        }
    }

    #[test]
    fn a_jump_is_a_gap_once_and_the_sequence_continues_after_it() {
        let mut s = Sequence::default();
        assert_eq!(s.check(1), Order::Next);
        assert_eq!(s.check(4), Order::Gap);
        assert_eq!(s.check(5), Order::Next);
    }

    #[test]
    fn a_connection_first_seen_past_its_first_event_starts_with_a_gap() {
        let mut s = Sequence::default();
        assert_eq!(s.check(3), Order::Gap);
        assert_eq!(s.check(4), Order::Next);
    }

    #[test]
    fn duplicates_and_late_events_are_stale() {
        let mut s = Sequence::default();
        assert_eq!(s.check(1), Order::Next);
        assert_eq!(s.check(2), Order::Next);
        assert_eq!(s.check(2), Order::Stale);
        assert_eq!(s.check(1), Order::Stale);
        assert_eq!(s.check(3), Order::Next);
    }

    #[test]
    fn unnumbered_events_pass_and_numbers_wrap_past_zero() {
        let mut s = Sequence::default();
        assert_eq!(s.check(0), Order::Next);
        assert_eq!(s.check(u32::MAX - 1), Order::Gap);
        assert_eq!(s.check(u32::MAX), Order::Next);
        assert_eq!(s.check(0), Order::Next);
        assert_eq!(s.check(1), Order::Next);
    }
}
