//! The in-flight table of one queue: every request taken from the available ring and not yet
//! put in the used ring, indexed by its descriptor head (unique while the request is in
//! flight). This is the one place request identity lives: the head, and the order in which
//! requests were taken (the counter QEMU's inflight region keeps per descriptor).

use std::time::Instant;

use vm_memory::GuestAddress;

use super::request::RequestType;

/// What the table keeps of a request in flight.
#[derive(Debug)]
pub struct Slot<T> {
    pub head: u16,
    /// Taken as the `order`-th request of this queue (from 0, per table).
    pub order: u64,
    pub started: Instant,
    pub kind: RequestType,
    pub data_len: u64,
    pub status: GuestAddress,
    /// The executor's own state of the request.
    pub state: T,
}

/// Why a request cannot enter the table.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum InflightError {
    #[error("descriptor head {0} is outside the queue")]
    OutOfRange(u16),
    #[error("descriptor head {0} is already in flight")]
    Busy(u16),
}

/// Requests in flight on one queue.
#[derive(Debug)]
pub struct InflightTable<T> {
    slots: Vec<Option<Slot<T>>>,
    next_order: u64,
    len: usize,
}

impl<T> InflightTable<T> {
    /// A table for a queue of `size` descriptors.
    pub fn new(size: usize) -> Self {
        InflightTable {
            slots: (0..size).map(|_| None).collect(),
            next_order: 0,
            len: 0,
        }
    }

    /// Enter a request taken now; returns its order number.
    pub fn insert(
        &mut self,
        head: u16,
        kind: RequestType,
        data_len: u64,
        status: GuestAddress,
        started: Instant,
        state: T,
    ) -> Result<u64, InflightError> {
        let slot = self
            .slots
            .get_mut(usize::from(head))
            .ok_or(InflightError::OutOfRange(head))?;
        if slot.is_some() {
            return Err(InflightError::Busy(head));
        }
        let order = self.next_order;
        self.next_order += 1;
        *slot = Some(Slot {
            head,
            order,
            started,
            kind,
            data_len,
            status,
            state,
        });
        self.len += 1;
        Ok(order)
    }

    pub fn get_mut(&mut self, head: u16) -> Option<&mut Slot<T>> {
        self.slots.get_mut(usize::from(head))?.as_mut()
    }

    /// Remove a finished request.
    pub fn remove(&mut self, head: u16) -> Option<Slot<T>> {
        let s = self.slots.get_mut(usize::from(head))?.take();
        if s.is_some() {
            self.len -= 1;
        }
        s
    }

    /// Requests in flight.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_unique_and_orders_count_up() {
        let mut t = InflightTable::<()>::new(4);
        let now = Instant::now();
        let a = GuestAddress(0);
        assert_eq!(t.insert(2, RequestType::In, 0, a, now, ()), Ok(0));
        assert_eq!(t.insert(0, RequestType::In, 0, a, now, ()), Ok(1));
        assert_eq!(
            t.insert(2, RequestType::In, 0, a, now, ()),
            Err(InflightError::Busy(2))
        );
        assert_eq!(
            t.insert(4, RequestType::In, 0, a, now, ()),
            Err(InflightError::OutOfRange(4))
        );
        assert_eq!(t.len(), 2);
        assert_eq!(t.remove(2).map(|s| s.order), Some(0));
        assert!(t.remove(2).is_none());
        assert_eq!(t.insert(2, RequestType::Out, 0, a, now, ()), Ok(2));
        assert_eq!(t.len(), 2);
    }
}
