//! The in-flight window: events sent and not yet durable, numbered by
//! ticket in the order they were sent, bounded in events and bytes.
//!
//! Tickets are handed out consecutively; a slot is emptied when its event
//! becomes durable, and the window's front advances over emptied slots, so
//! out-of-order verdicts cost nothing and the window's memory follows the
//! oldest event still in flight.

use std::collections::VecDeque;

/// A window of in-flight items of type `T`.
#[derive(Debug)]
pub(super) struct Window<T> {
    slots: VecDeque<Option<(usize, T)>>,
    /// Ticket of `slots[0]`.
    base: u64,
    events: usize,
    bytes: usize,
    max_events: usize,
    max_bytes: usize,
}

impl<T> Window<T> {
    /// An empty window holding at most `max_events` events and about
    /// `max_bytes` bytes (the event that crosses the byte limit is let in).
    pub(super) fn new(max_events: usize, max_bytes: usize) -> Self {
        Window {
            slots: VecDeque::new(),
            base: 0,
            events: 0,
            bytes: 0,
            max_events,
            max_bytes,
        }
    }

    /// True while another event may be let in.
    pub(super) fn has_room(&self) -> bool {
        self.events < self.max_events && self.bytes < self.max_bytes
    }

    /// Events in flight.
    pub(super) fn len(&self) -> usize {
        self.events
    }

    /// Lets an event of `bytes` bytes in; returns its ticket.
    pub(super) fn push(&mut self, bytes: usize, item: T) -> u64 {
        let ticket = self.base + self.slots.len() as u64;
        self.slots.push_back(Some((bytes, item)));
        self.events += 1;
        self.bytes += bytes;
        ticket
    }

    fn index(&self, ticket: u64) -> Option<usize> {
        usize::try_from(ticket.checked_sub(self.base)?).ok()
    }

    /// The item with `ticket`, while it is in flight.
    pub(super) fn get(&self, ticket: u64) -> Option<&T> {
        let slot = self.slots.get(self.index(ticket)?)?;
        slot.as_ref().map(|(_, item)| item)
    }

    /// The item with `ticket`, mutably, while it is in flight.
    pub(super) fn get_mut(&mut self, ticket: u64) -> Option<&mut T> {
        let i = self.index(ticket)?;
        let slot = self.slots.get_mut(i)?;
        slot.as_mut().map(|(_, item)| item)
    }

    /// Takes the item with `ticket` out (it became durable). `None` when
    /// it is not in flight (already released, or never sent).
    pub(super) fn release(&mut self, ticket: u64) -> Option<T> {
        let i = self.index(ticket)?;
        let (bytes, item) = self.slots.get_mut(i)?.take()?;
        self.events -= 1;
        self.bytes -= bytes;
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            self.base += 1;
        }
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_order_releases_free_the_front_only_when_it_is_done() {
        let mut w = Window::new(3, usize::MAX);
        let a = w.push(10, 'a');
        let b = w.push(10, 'b');
        let c = w.push(10, 'c');
        assert!(!w.has_room(), "three events fill a window of three");
        assert_eq!(w.release(c), Some('c'));
        assert_eq!(w.release(b), Some('b'));
        assert_eq!(w.len(), 1);
        assert_eq!(w.slots.len(), 3, "the front still waits for a");
        assert_eq!(w.release(b), None, "a ticket is released once");
        assert_eq!(w.release(a), Some('a'));
        assert_eq!(w.slots.len(), 0);
        assert_eq!(w.push(1, 'd'), 3, "tickets keep counting");
        assert_eq!(w.get(3), Some(&'d'));
        assert_eq!(w.get(0), None);
    }

    #[test]
    fn the_byte_limit_closes_the_window_too() {
        let mut w = Window::new(100, 25);
        w.push(10, ());
        w.push(10, ());
        assert!(w.has_room());
        let t = w.push(10, ());
        assert!(!w.has_room(), "30 bytes of 25");
        w.release(t);
        assert!(w.has_room());
    }
}
