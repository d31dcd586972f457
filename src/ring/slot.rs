// SPDX-License-Identifier: GPL-2.0

//! The ring's slots, and the requests that wait for one.
//!
//! A slot is an id tapdisk answers with (0..32) and the data pages that go with it (11, or as many
//! as a mapping for large requests has per slot). Its life:
//!
//! ```text
//!            reserve             put_on_ring                answer              complete
//!   Free ------------> Reserved -------------> OnRing ---------------> Completing ---------> Free
//!     ^                 |  ^  |                 |  |
//!     |      cancel     |  |  | stage           |  | time_out (tapdisk alive)
//!     +-----------------+  |  v                 |  +----------------------------> Late
//!     |              take_staged                |                                 |
//!     |                  Staged                 |                                 |
//!     |  time_out /        |                    |                                 |
//!     |  take_on_ring      |                    |                                 |
//!     +--------------------+                    |                                 |
//!     +---- time_out (no tapdisk) / take_on_ring+      answer (dropped) / free_late |
//!     +---------------------------------------------------------------------------+
//! ```
//!
//! - `Reserved`: the request that reserved the slot copies its write data into the slot's pages,
//!   without the ring lock; nobody else touches them.
//! - `Staged` (disks with staged writes): a write waits for tapdisk's context to copy its data.
//!   Tapdisk has not seen it and cannot answer it; `take_staged` makes the slot `Reserved` again
//!   for the call (in tapdisk's context) that copies the data and puts it on the ring.
//! - `OnRing`: the entry is on the ring (or kept for a recovering tapdisk); tapdisk owns the
//!   pages until it answers.
//! - `Completing`: tapdisk answered; `RESPOND` copies the read data out of the pages, without the
//!   lock, then frees the slot and only then ends the request.
//! - `Late`: the request timed out and has ended; tapdisk may still write into the pages, so the
//!   slot stays taken until it answers (the answer is dropped) or the ring goes away.
//!
//! So the pages of a slot are written or read by the kernel only while one request owns the slot,
//! and never while tapdisk may. Every transition is made under `Tap::ring`.
//!
//! A request that finds no free slot (every slot is late: tapdisk stopped answering) waits in
//! [`Parked`], within its deadline, and goes on the ring when a slot frees.

use kernel::prelude::*;

use crate::uapi::RING_SIZE;

/// A slot's state; `P` is the request on the ring.
pub(crate) enum Slot<P> {
    Free,
    Reserved,
    Staged { op: u8, req: P },
    OnRing { op: u8, req: P },
    Completing,
    Late { op: u8 },
}

/// What an answer from tapdisk did to a slot.
pub(crate) enum Answer<P> {
    /// The request is the caller's to complete; its slot is `Completing`.
    Done(P),
    /// The request had timed out: the answer is dropped and the slot is free again.
    Late,
    /// The slot has no request tapdisk may answer; nothing changed.
    NotPending,
}

/// The slots of a ring.
///
/// # Invariants
///
/// Each slot follows the life in the module documentation: a slot leaves `Reserved` only by
/// [`Slots::put_on_ring`], [`Slots::stage`] or [`Slots::cancel`], and `Completing` only by
/// [`Slots::complete`].
pub(crate) struct Slots<P> {
    slots: [Slot<P>; RING_SIZE],
}

impl<P> Slots<P> {
    /// All slots free.
    pub(crate) const fn new() -> Self {
        Self {
            slots: [const { Slot::Free }; RING_SIZE],
        }
    }

    /// `Free -> Reserved`: reserves the lowest free slot.
    pub(crate) fn reserve(&mut self) -> Option<usize> {
        let slot = self.slots.iter().position(|s| matches!(s, Slot::Free))?;
        self.slots[slot] = Slot::Reserved;
        Some(slot)
    }

    /// `Reserved -> Free`: the request that reserved `slot` does not go on the ring.
    pub(crate) fn cancel(&mut self, slot: usize) {
        if matches!(self.slots[slot], Slot::Reserved) {
            self.slots[slot] = Slot::Free;
        }
    }

    /// `Reserved -> OnRing`: the request is on the ring, with operation `op`.
    ///
    /// # Errors
    ///
    /// Gives the request back if `slot` is not reserved (a caller's bug; it must end it).
    pub(crate) fn put_on_ring(&mut self, slot: usize, op: u8, req: P) -> Result<(), P> {
        match self.slots[slot] {
            Slot::Reserved => {
                self.slots[slot] = Slot::OnRing { op, req };
                Ok(())
            }
            _ => Err(req),
        }
    }

    /// `Reserved -> Staged`: the write waits for tapdisk's context to copy its data.
    ///
    /// # Errors
    ///
    /// Gives the request back if `slot` is not reserved (a caller's bug; it must end it).
    pub(crate) fn stage(&mut self, slot: usize, op: u8, req: P) -> Result<(), P> {
        match self.slots[slot] {
            Slot::Reserved => {
                self.slots[slot] = Slot::Staged { op, req };
                Ok(())
            }
            _ => Err(req),
        }
    }

    /// `Staged -> Reserved` for up to `out.len()` slots, lowest first: each staged request goes
    /// to `out` with its slot and operation, for the caller to copy and put on the ring (or
    /// cancel). Returns how many.
    pub(crate) fn take_staged(&mut self, out: &mut [Option<(usize, u8, P)>]) -> usize {
        let mut n = 0;
        for (slot, s) in self.slots.iter_mut().enumerate() {
            if n == out.len() {
                break;
            }
            if let Slot::Staged { op, .. } = *s {
                if let Slot::Staged { req, .. } = core::mem::replace(s, Slot::Reserved) {
                    out[n] = Some((slot, op, req));
                    n += 1;
                }
            }
        }
        n
    }

    /// The operation tapdisk must echo for `slot`, if it may answer it now.
    pub(crate) fn answerable_op(&self, slot: usize) -> Option<u8> {
        match self.slots.get(slot)? {
            Slot::OnRing { op, .. } | Slot::Late { op } => Some(*op),
            Slot::Free | Slot::Reserved | Slot::Staged { .. } | Slot::Completing => None,
        }
    }

    /// Tapdisk answered `slot`: `OnRing -> Completing` (the request is returned), or
    /// `Late -> Free`.
    pub(crate) fn answer(&mut self, slot: usize) -> Answer<P> {
        let Some(s) = self.slots.get_mut(slot) else {
            return Answer::NotPending;
        };
        match s {
            Slot::OnRing { .. } => match core::mem::replace(s, Slot::Completing) {
                Slot::OnRing { req, .. } => Answer::Done(req),
                // Matched as `OnRing` just above.
                _ => Answer::NotPending,
            },
            Slot::Late { .. } => {
                *s = Slot::Free;
                Answer::Late
            }
            Slot::Free | Slot::Reserved | Slot::Staged { .. } | Slot::Completing => {
                Answer::NotPending
            }
        }
    }

    /// `Completing -> Free`: the answered request's data is copied; it may end.
    pub(crate) fn complete(&mut self, slot: usize) {
        if matches!(self.slots[slot], Slot::Completing) {
            self.slots[slot] = Slot::Free;
        }
    }

    /// Whether `slot` holds a staged write.
    pub(crate) fn is_staged(&self, slot: usize) -> bool {
        matches!(self.slots.get(slot), Some(Slot::Staged { .. }))
    }

    /// The slot whose request on the ring, or staged, `is` names.
    pub(crate) fn find_held(&self, is: impl Fn(&P) -> bool) -> Option<usize> {
        self.slots.iter().position(|s| match s {
            Slot::OnRing { req, .. } | Slot::Staged { req, .. } => is(req),
            _ => false,
        })
    }

    /// The request in `slot` timed out: `OnRing -> Late` while a tapdisk may still answer it
    /// (`tapdisk_alive`), else `OnRing -> Free`; `Staged -> Free` (tapdisk never saw it).
    /// Returns the request, for the caller to end, and whether the slot is free now.
    pub(crate) fn time_out(&mut self, slot: usize, tapdisk_alive: bool) -> Option<(P, bool)> {
        let s = &mut self.slots[slot];
        let next = match *s {
            Slot::OnRing { op, .. } if tapdisk_alive => Slot::Late { op },
            Slot::OnRing { .. } | Slot::Staged { .. } => Slot::Free,
            _ => return None,
        };
        let freed = matches!(next, Slot::Free);
        match core::mem::replace(s, next) {
            Slot::OnRing { req, .. } | Slot::Staged { req, .. } => Some((req, freed)),
            // Matched as one of those just above.
            other => {
                *s = other;
                None
            }
        }
    }

    /// `Late -> Free` for every slot: the tapdisk that could answer them is gone.
    pub(crate) fn free_late(&mut self) {
        for s in self.slots.iter_mut() {
            if matches!(s, Slot::Late { .. }) {
                *s = Slot::Free;
            }
        }
    }

    /// `OnRing -> Free` and `Staged -> Free` for every slot; the requests go to `out` (by slot)
    /// for the caller to end. `Reserved` and `Completing` slots stay with the call that holds
    /// them.
    pub(crate) fn take_on_ring(&mut self, out: &mut [Option<P>; RING_SIZE]) {
        for (o, s) in out.iter_mut().zip(self.slots.iter_mut()) {
            if matches!(s, Slot::OnRing { .. } | Slot::Staged { .. }) {
                if let Slot::OnRing { req, .. } | Slot::Staged { req, .. } =
                    core::mem::replace(s, Slot::Free)
                {
                    *o = Some(req);
                }
            }
        }
    }

    /// The requests on the ring, by slot.
    pub(crate) fn on_ring(&self) -> impl Iterator<Item = (usize, &P)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| match s {
            Slot::OnRing { req, .. } => Some((i, req)),
            _ => None,
        })
    }

    /// Requests on the ring (or kept for recovery) or staged, not yet answered.
    pub(crate) fn pending(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s, Slot::OnRing { .. } | Slot::Staged { .. }))
            .count()
    }

    /// Slots held by requests that timed out and that tapdisk has not answered.
    pub(crate) fn late(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s, Slot::Late { .. }))
            .count()
    }
}

/// Requests waiting for a free slot, oldest first. There are never more than the tag set's
/// depth (a request waits with its tag), which is the ring's size.
///
/// # Invariants
///
/// `len` is the number of occupied entries; sequence numbers increase with each `push`.
pub(crate) struct Parked<R> {
    entries: [Option<(u64, R)>; RING_SIZE],
    next: u64,
    len: usize,
}

impl<R> Parked<R> {
    /// None waiting.
    pub(crate) const fn new() -> Self {
        Self {
            entries: [const { None }; RING_SIZE],
            next: 0,
            len: 0,
        }
    }

    /// Number of requests waiting.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether none waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a request behind the others.
    ///
    /// # Errors
    ///
    /// Gives it back if `RING_SIZE` requests wait already.
    pub(crate) fn push(&mut self, r: R) -> Result<(), R> {
        let Some(e) = self.entries.iter_mut().find(|e| e.is_none()) else {
            return Err(r);
        };
        *e = Some((self.next, r));
        self.next = self.next.wrapping_add(1);
        self.len += 1;
        Ok(())
    }

    /// Takes the request that waited longest.
    pub(crate) fn pop_oldest(&mut self) -> Option<R> {
        let i = self
            .entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|(seq, _)| (i, *seq)))
            .min_by_key(|&(_, seq)| seq)?
            .0;
        self.take(i)
    }

    /// Takes the request `is` names.
    pub(crate) fn remove(&mut self, is: impl Fn(&R) -> bool) -> Option<R> {
        let i = self
            .entries
            .iter()
            .position(|e| matches!(e, Some((_, r)) if is(r)))?;
        self.take(i)
    }

    /// Takes every request, into `out`.
    pub(crate) fn take_all(&mut self, out: &mut [Option<R>; RING_SIZE]) {
        for (o, e) in out.iter_mut().zip(self.entries.iter_mut()) {
            if let Some((_, r)) = e.take() {
                *o = Some(r);
            }
        }
        self.len = 0;
    }

    fn take(&mut self, i: usize) -> Option<R> {
        let (_, r) = self.entries[i].take()?;
        self.len -= 1;
        Some(r)
    }
}

#[kunit_tests(blktap_slots)]
mod tests {
    use super::*;

    const READ: u8 = 0;
    const WRITE: u8 = 1;

    #[test]
    fn a_request_owns_its_slot_until_it_completes() {
        let mut s = Slots::<u32>::new();
        assert_eq!(s.reserve(), Some(0));
        // A reserved slot is nobody else's, and tapdisk cannot answer it.
        assert_eq!(s.reserve(), Some(1));
        assert_eq!(s.answerable_op(0), None);
        assert!(matches!(s.answer(0), Answer::NotPending));
        assert!(s.put_on_ring(0, READ, 7).is_ok());
        assert_eq!(s.pending(), 1);
        assert_eq!(s.answerable_op(0), Some(READ));
        assert!(matches!(s.answer(0), Answer::Done(7)));
        // Completing: not free for a new request, and not answerable again.
        assert_eq!(s.reserve(), Some(2));
        assert_eq!(s.answerable_op(0), None);
        assert!(matches!(s.answer(0), Answer::NotPending));
        s.complete(0);
        assert_eq!(s.reserve(), Some(0));
    }

    #[test]
    fn cancel_and_misuse() {
        let mut s = Slots::<u32>::new();
        assert_eq!(s.reserve(), Some(0));
        s.cancel(0);
        assert_eq!(s.reserve(), Some(0));
        assert!(s.put_on_ring(0, WRITE, 1).is_ok());
        // Only a reserved slot takes a request, and only `Reserved`/`Completing` are left by
        // `cancel`/`complete`.
        assert_eq!(s.put_on_ring(0, WRITE, 2), Err(2));
        assert_eq!(s.put_on_ring(5, WRITE, 3), Err(3));
        s.cancel(0);
        s.complete(0);
        assert_eq!(s.pending(), 1);
        assert!(matches!(s.answer(32), Answer::NotPending));
        assert_eq!(s.answerable_op(32), None);
    }

    #[test]
    fn late_slots_stay_taken_until_answered() {
        let mut s = Slots::<u32>::new();
        for i in 0..RING_SIZE {
            assert_eq!(s.reserve(), Some(i));
            assert!(s.put_on_ring(i, WRITE, i as u32).is_ok());
        }
        assert_eq!(s.find_held(|&r| r == 5), Some(5));
        assert_eq!(s.time_out(5, true), Some((5, false)));
        assert_eq!(s.find_held(|&r| r == 5), None);
        assert_eq!(s.time_out(5, true), None);
        assert_eq!(s.late(), 1);
        assert_eq!(s.answerable_op(5), Some(WRITE));
        assert_eq!(s.reserve(), None);
        // The late answer is dropped and frees the slot.
        assert!(matches!(s.answer(5), Answer::Late));
        assert_eq!(s.late(), 0);
        assert_eq!(s.reserve(), Some(5));
        // Without a tapdisk, a timed-out slot is free at once.
        assert_eq!(s.time_out(6, false), Some((6, true)));
        assert_eq!(s.reserve(), Some(6));
    }

    #[test]
    fn every_slot_late_then_the_ring_goes() {
        let mut s = Slots::<u32>::new();
        for i in 0..RING_SIZE {
            assert_eq!(s.reserve(), Some(i));
            assert!(s.put_on_ring(i, READ, 0).is_ok());
            assert!(s.time_out(i, true).is_some());
        }
        assert_eq!(s.late(), RING_SIZE);
        assert_eq!(s.reserve(), None);
        s.free_late();
        assert_eq!(s.late(), 0);
        assert_eq!(s.reserve(), Some(0));
    }

    #[test]
    fn ring_death_takes_only_requests_on_the_ring() {
        let mut s = Slots::<u32>::new();
        for i in 0..4 {
            assert_eq!(s.reserve(), Some(i));
        }
        assert!(s.put_on_ring(0, READ, 10).is_ok());
        assert!(s.put_on_ring(1, READ, 11).is_ok());
        assert!(matches!(s.answer(1), Answer::Done(11)));
        assert!(s.put_on_ring(2, WRITE, 12).is_ok());
        assert!(s.time_out(2, true).is_some());
        let mut out = [const { None }; RING_SIZE];
        s.take_on_ring(&mut out);
        s.free_late();
        assert_eq!(out[0], Some(10));
        assert!(out[1..].iter().all(Option::is_none));
        // Slot 1 completes and slot 3 is filled by the calls that hold them.
        assert_eq!(s.reserve(), Some(0));
        assert_eq!(s.reserve(), Some(2));
        assert_eq!(s.reserve(), Some(4));
        assert!(s.put_on_ring(3, WRITE, 13).is_ok());
        s.complete(1);
        assert_eq!(s.on_ring().map(|(i, &r)| (i, r)).next(), Some((3, 13)));
    }

    #[test]
    fn staged_writes_wait_unanswerable_until_taken() {
        let mut s = Slots::<u32>::new();
        for i in 0..4 {
            assert_eq!(s.reserve(), Some(i));
        }
        assert!(s.stage(1, WRITE, 11).is_ok());
        assert!(s.stage(2, WRITE, 12).is_ok());
        assert!(s.stage(3, WRITE, 13).is_ok());
        // Only a reserved slot is staged; a staged one is pending, not answerable.
        assert_eq!(s.stage(1, WRITE, 99), Err(99));
        assert_eq!(s.pending(), 3);
        assert_eq!(s.answerable_op(1), None);
        assert!(matches!(s.answer(1), Answer::NotPending));
        assert_eq!(s.find_held(|&r| r == 12), Some(2));
        assert!(s.is_staged(2) && !s.is_staged(0) && !s.is_staged(RING_SIZE));
        // A staged request that times out frees its slot, tapdisk alive or not.
        assert_eq!(s.time_out(3, true), Some((13, true)));
        assert_eq!(s.pending(), 2);
        let mut out = [const { None }; 1];
        assert_eq!(s.take_staged(&mut out), 1);
        assert_eq!(out[0], Some((1, WRITE, 11)));
        // Taken: reserved for the copier, which puts it on the ring.
        assert_eq!(s.answerable_op(1), None);
        assert!(s.put_on_ring(1, WRITE, 11).is_ok());
        assert_eq!(s.answerable_op(1), Some(WRITE));
        let mut all = [const { None }; RING_SIZE];
        s.take_on_ring(&mut all);
        assert_eq!(all[1], Some(11));
        assert_eq!(all[2], Some(12));
        assert_eq!(s.pending(), 0);
        let mut none = [const { None }; 4];
        assert_eq!(s.take_staged(&mut none), 0);
    }

    #[test]
    fn parked_requests_leave_oldest_first() {
        let mut p = Parked::<u32>::new();
        assert!(p.is_empty());
        for r in 0..RING_SIZE as u32 {
            assert!(p.push(r).is_ok());
        }
        assert_eq!(p.push(99), Err(99));
        assert_eq!(p.len(), RING_SIZE);
        assert_eq!(p.remove(|&r| r == 3), Some(3));
        assert_eq!(p.remove(|&r| r == 3), None);
        assert_eq!(p.pop_oldest(), Some(0));
        assert!(p.push(100).is_ok());
        assert_eq!(p.pop_oldest(), Some(1));
        assert_eq!(p.pop_oldest(), Some(2));
        assert_eq!(p.pop_oldest(), Some(4));
        let mut out = [const { None }; RING_SIZE];
        p.take_all(&mut out);
        assert!(p.is_empty());
        assert_eq!(out.iter().flatten().count(), RING_SIZE - 4);
        assert!(out.iter().flatten().any(|&r| r == 100));
        assert_eq!(p.pop_oldest(), None);
    }
}
