// SPDX-License-Identifier: GPL-2.0

//! The I/O state of a tap's ring, kept under the tap's `blktap_ring` spinlock: the mapping, the
//! ring indices, the slots and the requests waiting for one, and the counters `debug` shows.
//!
//! Every method is a named transition or a query; nothing here ends a request, copies data or
//! sleeps: the caller (`tap/io.rs`) does that with the lock dropped, on what a transition hands
//! it.

use kernel::{
    prelude::*,
    sync::Arc, //
};

use crate::{
    blk_mq::Request,
    protocol::{
        self,
        BadResponse,
        RingRequest, //
    },
    ring::{
        pages::RingPages,
        slot::{
            Answer,
            Parked,
            Slots, //
        },
    },
    task::MmId,
    uapi,
};

/// A request given to tapdisk, or kept for the next one while the tap recovers.
pub(crate) struct Pending {
    pub(crate) rq: Request,
    /// What its ring entry says, to write the entry (again, when a new tapdisk maps the ring).
    pub(crate) req: RingRequest,
}

/// A request waiting for a free slot, with its ring operation.
pub(crate) struct Waiting {
    pub(crate) rq: Request,
    pub(crate) op: u8,
}

/// Requests taken off a ring, to be ended outside its lock.
pub(crate) struct Taken {
    on_ring: [Option<Pending>; uapi::RING_SIZE],
    parked: [Option<Waiting>; uapi::RING_SIZE],
}

impl Taken {
    /// None yet.
    pub(crate) const fn new() -> Self {
        Self {
            on_ring: [const { None }; uapi::RING_SIZE],
            parked: [const { None }; uapi::RING_SIZE],
        }
    }

    /// Ends every request taken with an I/O error; returns how many.
    pub(crate) fn fail_all(&mut self) -> usize {
        let on_ring = self
            .on_ring
            .iter_mut()
            .filter_map(|p| p.take().map(|p| p.rq));
        let parked = self
            .parked
            .iter_mut()
            .filter_map(|w| w.take().map(|w| w.rq));
        let mut n = 0;
        for rq in Iterator::chain(on_ring, parked) {
            rq.end(Err(EIO));
            n += 1;
        }
        n
    }
}

/// Requests tapdisk answered, by slot, with tapdisk's status; their slots are `Completing`.
pub(crate) type Answered = [Option<(Pending, i16)>; uapi::RING_SIZE];

/// What `RESPOND` consumed.
pub(crate) struct Consumed {
    /// Responses refused as malformed.
    pub(crate) bad: u32,
}

/// Counters for the tap's `debug` attribute.
#[derive(Clone, Copy, Default)]
pub(crate) struct Counters {
    /// Responses accepted.
    pub(crate) completed: u64,
    /// Responses and `RESPOND` calls refused.
    pub(crate) refused: u64,
    /// Requests failed at their deadline.
    pub(crate) timed_out: u64,
    /// Answers to those, dropped.
    pub(crate) late_answers: u64,
    /// Kept requests given to a recovering tapdisk.
    pub(crate) reissued: u64,
    /// Tapdisks a recovery tap lost.
    pub(crate) lost: u64,
    /// Publications and staged writes that did not signal tapdisk: its `req_event` said it
    /// polls the ring (disks with `BLKTAP_DEVICE_REQ_EVENT`).
    pub(crate) quiet: u64,
}

/// What poll sees.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Readiness {
    /// No tapdisk maps the ring.
    Unmapped,
    /// Nothing for tapdisk.
    Idle,
    /// A request tapdisk has not answered, or a message.
    Readable,
}

/// What became of a timed-out request.
pub(crate) enum TimedOut {
    /// It was on the ring, in `slot`; the slot is late if a tapdisk maps the ring (`live`), else
    /// free.
    OnRing {
        rq: Request,
        op: u8,
        slot: usize,
        live: bool,
    },
    /// It was a staged write, in `slot` (now free): tapdisk never saw it.
    Staged { rq: Request, op: u8, slot: usize },
    /// It was waiting for a slot.
    Parked { rq: Request, op: u8 },
    /// The driver does not hold it: it is being filled or answered, and ends soon.
    NotHeld,
}

/// What the ring's loss did.
pub(crate) enum Unmapped {
    /// Recovery: `n` requests are kept for the next tapdisk; `log` if worth a log line.
    Kept { n: usize, log: bool },
    /// Every request was taken out, to fail.
    Failed,
}

/// A live mapping of the ring by a tapdisk.
struct Mapping {
    /// The mapping process's mm (compared only).
    mm: MmId,
    pages: Arc<RingPages>,
    /// Live vmas of the mapping: 1, and 2 while `mremap` holds a copy it will close.
    vmas: u32,
}

/// The I/O state of a tap's ring.
///
/// # Invariants
///
/// - A slot is `OnRing` from the publication of the request with its id (or, while the tap
///   recovers, from the request's arrival) until tapdisk's answer, its timeout or the ring's
///   death; requests are kept without a `mapping` only if `recovery` (see `slot.rs`).
/// - `parked` holds requests only while no slot was free for them.
/// - `staged` is the number of `Staged` slots, and the ring header's `staged` says so while
///   mapped.
/// - `rsp_cons <= published <= req_prod_pvt` in ring (wrapping) order, at most 32 apart.
pub(crate) struct RingState {
    mapping: Option<Mapping>,
    req_prod_pvt: u32,
    published: u32,
    rsp_cons: u32,
    slots: Slots<Pending>,
    parked: Parked<Waiting>,
    /// Writes staged (disks with staged writes): their data is not copied yet.
    staged: u32,
    /// The disk is paused (`PAUSE`): no waiting request goes on the ring.
    paused: bool,
    /// The disk is being removed: new requests fail at once.
    removing: bool,
    /// The disk was made with `BLKTAP_DEVICE_RECOVERY`: requests outlive the tapdisk.
    recovery: bool,
    /// The disk was made with `BLKTAP_DEVICE_REQ_EVENT`: tapdisk is signalled of new requests
    /// only when the header's `req_event` asks for it.
    req_event: bool,
    /// Seconds a request may stay unanswered (`deadline` in sysfs).
    deadline: u32,
    counters: Counters,
}

/// Whether the `n`th event of a kind is logged: the first eight, then every power of two, so a
/// hostile tapdisk cannot flood the log.
pub(crate) fn worth_logging(n: u64) -> bool {
    n <= 8 || n.is_power_of_two()
}

fn report_bad(minor: u32, rsp: &uapi::Response, why: BadResponse) {
    let id = rsp.id;
    let op = rsp.operation;
    match why {
        BadResponse::BadId => pr_warn!("blktap{minor}: refused response: bad id {id}\n"),
        BadResponse::NotPending => {
            pr_warn!("blktap{minor}: refused response: slot {id} has no request\n")
        }
        BadResponse::WrongOp => {
            pr_warn!("blktap{minor}: refused response: wrong op {op} for slot {id}\n")
        }
    }
}

impl RingState {
    pub(crate) fn new(deadline: u32) -> Self {
        Self {
            mapping: None,
            req_prod_pvt: 0,
            published: 0,
            rsp_cons: 0,
            slots: Slots::new(),
            parked: Parked::new(),
            staged: 0,
            paused: false,
            removing: false,
            recovery: false,
            req_event: false,
            deadline,
            counters: Counters::default(),
        }
    }

    // ---- queries -----------------------------------------------------------------------------

    /// Requests given to tapdisk (or kept for one) and not yet answered.
    pub(crate) fn pending(&self) -> usize {
        self.slots.pending()
    }

    /// Slots held by requests that timed out and that tapdisk has not answered.
    pub(crate) fn late_slots(&self) -> usize {
        self.slots.late()
    }

    /// Writes staged, waiting for tapdisk's context to copy their data.
    pub(crate) fn staged(&self) -> u32 {
        self.staged
    }

    /// Requests waiting for a free slot.
    pub(crate) fn parked(&self) -> usize {
        self.parked.len()
    }

    /// Whether a tapdisk maps the ring now.
    pub(crate) fn is_mapped(&self) -> bool {
        self.mapping.is_some()
    }

    /// Whether `mm` is the mapping process's.
    pub(crate) fn is_mapper(&self, mm: MmId) -> bool {
        mm.is_some() && self.mapping.as_ref().is_some_and(|m| m.mm == mm)
    }

    /// The shared pages, while mapped.
    pub(crate) fn pages(&self) -> Option<Arc<RingPages>> {
        self.mapping.as_ref().map(|m| m.pages.clone())
    }

    pub(crate) fn recovery(&self) -> bool {
        self.recovery
    }

    pub(crate) fn deadline(&self) -> u32 {
        self.deadline
    }

    pub(crate) fn counters(&self) -> Counters {
        self.counters
    }

    /// The level-triggered truth poll reports: no side effects.
    pub(crate) fn readiness(&self) -> Readiness {
        let Some(m) = &self.mapping else {
            return Readiness::Unmapped;
        };
        // A late request counts too: tapdisk may not have read it yet (a stopped tapdisk wakes
        // up after its deadline), and until it answers, its slot stays taken.
        if self.pending() > 0 || self.late_slots() > 0 || m.pages.msg() != 0 {
            Readiness::Readable
        } else {
            Readiness::Idle
        }
    }

    /// New requests go on the ring, or are kept for a recovering tapdisk.
    fn accepts(&self) -> bool {
        !self.removing && (self.mapping.is_some() || self.recovery)
    }

    // ---- settings ----------------------------------------------------------------------------

    pub(crate) fn set_deadline(&mut self, secs: u32) {
        self.deadline = secs;
    }

    /// A new disk starts; `recovery` if it asked to outlive its tapdisk, `req_event` if its
    /// tapdisk is signalled only when it asks.
    pub(crate) fn disk_created(&mut self, recovery: bool, req_event: bool) {
        self.recovery = recovery;
        self.req_event = req_event;
        self.paused = false;
    }

    /// `PAUSE` (`true`) or `RESUME` (`false`) of the disk.
    pub(crate) fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// Clears a pause or resume message (the `PAUSE` and `RESUME` ioctls answer it).
    pub(crate) fn clear_pause_message(&self) {
        if let Some(m) = &self.mapping {
            let msg = m.pages.msg();
            if msg == uapi::RING_MSG_PAUSE || msg == uapi::RING_MSG_RESUME {
                m.pages.set_msg(0);
            }
        }
    }

    /// Sets the ring's message for tapdisk.
    ///
    /// # Errors
    ///
    /// `ENXIO` if no tapdisk maps the ring.
    pub(crate) fn post_message(&self, msg: u8) -> Result {
        self.mapping.as_ref().ok_or(ENXIO)?.pages.set_msg(msg);
        Ok(())
    }

    // ---- the mapping -------------------------------------------------------------------------

    /// A tapdisk mapped the ring: the indices start again, and a recovering tap's kept requests
    /// are written again as fresh entries, ids unchanged, and published (staged writes stay
    /// staged, and the header says how many). Returns how many were written.
    pub(crate) fn map(&mut self, mm: MmId, pages: Arc<RingPages>) -> u32 {
        self.req_prod_pvt = 0;
        self.published = 0;
        self.rsp_cons = 0;
        let mut n = 0u32;
        for (slot, p) in self.slots.on_ring() {
            pages.write_request(self.req_prod_pvt, &p.req.entry(slot));
            self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
            n += 1;
        }
        if self.staged > 0 {
            pages.set_staged(self.staged);
        }
        self.mapping = Some(Mapping { mm, pages, vmas: 1 });
        self.counters.reissued += u64::from(n);
        self.publish();
        n
    }

    /// The mm copied a vma of the mapping.
    pub(crate) fn vma_opened(&mut self) {
        if let Some(m) = &mut self.mapping {
            m.vmas += 1;
        }
    }

    /// A vma of the mapping closed; true if it was the last.
    pub(crate) fn vma_closed(&mut self) -> bool {
        match &mut self.mapping {
            Some(m) => {
                m.vmas = m.vmas.saturating_sub(1);
                m.vmas == 0
            }
            None => false,
        }
    }

    /// The mapping went away (munmap or the process died). Late slots are freed: no tapdisk is
    /// left to write into them. With recovery the requests stay; otherwise every request goes
    /// to `out`, to fail.
    pub(crate) fn unmap(&mut self, out: &mut Taken) -> Unmapped {
        self.mapping = None;
        if self.recovery {
            self.slots.free_late();
            self.counters.lost += 1;
            Unmapped::Kept {
                n: self.pending(),
                log: worth_logging(self.counters.lost),
            }
        } else {
            self.take_all(out);
            Unmapped::Failed
        }
    }

    // ---- the disk's removal ------------------------------------------------------------------

    /// Starts removing the disk: new requests fail at once from now on.
    ///
    /// # Errors
    ///
    /// `EBUSY` if requests are on the ring or wait for a slot.
    pub(crate) fn start_removing(&mut self) -> Result {
        if self.pending() > 0 || !self.parked.is_empty() {
            return Err(EBUSY);
        }
        self.removing = true;
        Ok(())
    }

    /// Removes the disk whatever it holds (its ring is closing): new requests fail at once.
    pub(crate) fn force_removing(&mut self) {
        self.removing = true;
    }

    /// Fails every request at once and makes new ones fail (the disk is being removed without a
    /// tapdisk). The requests go to `out`, to fail.
    pub(crate) fn abandon(&mut self, out: &mut Taken) {
        self.removing = true;
        self.take_all(out);
    }

    /// The disk is gone; a new one may take requests.
    pub(crate) fn end_removing(&mut self) {
        self.removing = false;
        self.recovery = false;
        self.req_event = false;
        self.paused = false;
    }

    fn take_all(&mut self, out: &mut Taken) {
        self.slots.free_late();
        self.slots.take_on_ring(&mut out.on_ring);
        self.parked.take_all(&mut out.parked);
        self.set_staged(0);
    }

    /// Counts the staged writes, in the ring header too.
    fn set_staged(&mut self, n: u32) {
        self.staged = n;
        if let Some(m) = &self.mapping {
            m.pages.set_staged(n);
        }
    }

    // ---- the I/O path ------------------------------------------------------------------------

    /// Reserves a slot for a new request: `Ok(Some(slot))`; or parks it if every slot is taken
    /// (`Ok(None)`); or gives it back if the ring takes no requests.
    pub(crate) fn admit(
        &mut self,
        rq: Request,
        op: u8,
    ) -> Result<Option<(usize, Request)>, Request> {
        if !self.accepts() {
            return Err(rq);
        }
        match self.slots.reserve() {
            Some(slot) => Ok(Some((slot, rq))),
            // Never refused: a waiting request holds one of the ring's 32 tags.
            None => self
                .parked
                .push(Waiting { rq, op })
                .map(|()| None)
                .map_err(|w| w.rq),
        }
    }

    /// Takes the oldest waiting request and a free slot for it, unless the disk is paused. If
    /// the ring takes no more requests, the waiting ones go to `failed`.
    pub(crate) fn next_parked(&mut self, failed: &mut Taken) -> Option<(usize, Waiting)> {
        if self.parked.is_empty() || self.paused {
            return None;
        }
        if !self.accepts() {
            self.parked.take_all(&mut failed.parked);
            return None;
        }
        let slot = self.slots.reserve()?;
        match self.parked.pop_oldest() {
            Some(w) => Some((slot, w)),
            None => {
                self.slots.cancel(slot);
                None
            }
        }
    }

    /// Whether requests wait for a slot (whether they may have one now, paused or not, is
    /// [`Self::next_parked`]'s to say: the one place that decides).
    pub(crate) fn has_waiting(&self) -> bool {
        !self.parked.is_empty()
    }

    /// Puts the request filled into reserved `slot` on the ring (or keeps it while the tap
    /// recovers), and with `publish` publishes the batch: `Ok(true)` if tapdisk must be woken.
    /// Gives the request back, to fail, and frees the slot, if the ring takes no more requests.
    pub(crate) fn put_on_ring(
        &mut self,
        slot: usize,
        p: Pending,
        publish: bool,
    ) -> Result<bool, Request> {
        if !self.accepts() {
            self.slots.cancel(slot);
            return Err(p.rq);
        }
        if let Some(m) = &self.mapping {
            m.pages.write_request(self.req_prod_pvt, &p.req.entry(slot));
            self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        }
        self.slots
            .put_on_ring(slot, p.req.op(), p)
            .map_err(|p| p.rq)?;
        Ok(publish && self.publish())
    }

    /// Stages the write in reserved `slot` (disks with staged writes): it waits for tapdisk's
    /// context to copy its data ([`Self::take_staged`]). With `publish`, publishes the batch's
    /// earlier requests. Returns whether to wake tapdisk (always, unless `req_event` says it
    /// polls the ring). Gives the request back, to fail, and frees the slot, if the ring takes
    /// no more requests.
    pub(crate) fn stage(
        &mut self,
        slot: usize,
        p: Pending,
        publish: bool,
    ) -> Result<bool, Request> {
        if !self.accepts() {
            self.slots.cancel(slot);
            return Err(p.rq);
        }
        self.slots.stage(slot, p.req.op(), p).map_err(|p| p.rq)?;
        self.set_staged(self.staged + 1);
        let published = publish && self.publish();
        Ok(published || self.wake_for_staged())
    }

    /// Whether tapdisk must hear of a staged write: without `req_event`, always; with it, if
    /// tapdisk asked for the next request.
    fn wake_for_staged(&mut self) -> bool {
        let Some(m) = &self.mapping else {
            return false;
        };
        if !self.req_event {
            return true;
        }
        let wake = protocol::wake_for_staged(m.pages.read_req_event(), self.published);
        if !wake {
            self.counters.quiet += 1;
        }
        wake
    }

    /// Takes up to `out.len()` staged writes for the caller to copy and put on the ring (their
    /// slots `Reserved` meanwhile), while a tapdisk maps the ring. Returns how many.
    pub(crate) fn take_staged(&mut self, out: &mut [Option<(usize, u8, Pending)>]) -> usize {
        if self.staged == 0 || self.mapping.is_none() {
            return 0;
        }
        let n = self.slots.take_staged(out);
        // CAST: `n <= 32`.
        self.set_staged(self.staged.saturating_sub(n as u32));
        n
    }

    /// Frees reserved `slot`: its request does not go on the ring.
    pub(crate) fn cancel(&mut self, slot: usize) {
        self.slots.cancel(slot);
    }

    /// Publishes the requests written since the last call; true if tapdisk must be woken: if
    /// any were, unless `req_event` says tapdisk polls the ring.
    pub(crate) fn publish(&mut self) -> bool {
        let Some(m) = &self.mapping else {
            return false;
        };
        let old = self.published;
        if old == self.req_prod_pvt {
            return false;
        }
        m.pages.publish_req_prod(self.req_prod_pvt);
        self.published = self.req_prod_pvt;
        if !self.req_event {
            return true;
        }
        let wake = protocol::wake_for_requests(m.pages.read_req_event(), old, self.published);
        if !wake {
            self.counters.quiet += 1;
        }
        wake
    }

    /// A request's deadline passed: takes it from the ring (its slot late while a tapdisk maps
    /// the ring, else free), from the staged writes (its slot free) or from the waiting ones.
    pub(crate) fn time_out(&mut self, is: impl Fn(&Request) -> bool) -> TimedOut {
        let live = self.mapping.is_some();
        let found = match self.slots.find_held(|p| is(&p.rq)) {
            Some(slot) => {
                let staged = self.slots.is_staged(slot);
                match self.slots.time_out(slot, live) {
                    Some((p, _)) if staged => {
                        self.set_staged(self.staged.saturating_sub(1));
                        TimedOut::Staged {
                            op: p.req.op(),
                            rq: p.rq,
                            slot,
                        }
                    }
                    Some((p, _)) => TimedOut::OnRing {
                        op: p.req.op(),
                        rq: p.rq,
                        slot,
                        live,
                    },
                    None => TimedOut::NotHeld,
                }
            }
            None => match self.parked.remove(|w| is(&w.rq)) {
                Some(w) => TimedOut::Parked { rq: w.rq, op: w.op },
                None => TimedOut::NotHeld,
            },
        };
        if !matches!(found, TimedOut::NotHeld) {
            self.counters.timed_out += 1;
        }
        found
    }

    /// `RESPOND`: consumes tapdisk's responses from `pages`. Each answered request goes to
    /// `done` (its slot `Completing`, for the caller to copy and free); late answers are dropped
    /// (their slots free again); bad responses are refused, counted and logged.
    ///
    /// # Errors
    ///
    /// `EIO` (nothing consumed) if `rsp_prod` is more than a ring from `rsp_cons`.
    pub(crate) fn take_answers(
        &mut self,
        minor: u32,
        pages: &RingPages,
        done: &mut Answered,
    ) -> Result<Consumed> {
        let rsp_prod = pages.read_rsp_prod();
        let n = match protocol::new_responses(rsp_prod, self.rsp_cons) {
            Ok(n) => n,
            Err(e) => {
                self.counters.refused += 1;
                if worth_logging(self.counters.refused) {
                    pr_warn!(
                        "blktap{minor}: refused rsp_prod {rsp_prod}: more than a ring from \
                         rsp_cons {}\n",
                        self.rsp_cons
                    );
                }
                return Err(e);
            }
        };
        let (mut bad, mut late) = (0u32, 0u32);
        for i in 0..n {
            let rsp = pages.read_response(self.rsp_cons.wrapping_add(i));
            let checked = protocol::check_response(&rsp, |s| self.slots.answerable_op(s));
            let why = match checked.map(|slot| (slot, self.slots.answer(slot))) {
                Ok((slot, Answer::Done(p))) => {
                    done[slot] = Some((p, rsp.status));
                    continue;
                }
                Ok((_, Answer::Late)) => {
                    late += 1;
                    self.counters.late_answers += 1;
                    continue;
                }
                // The check found it answerable; kept for the type's sake.
                Ok((_, Answer::NotPending)) => BadResponse::NotPending,
                Err(why) => why,
            };
            bad += 1;
            self.counters.refused += 1;
            if bad == 1 && worth_logging(self.counters.refused) {
                report_bad(minor, &rsp, why);
            }
        }
        self.rsp_cons = self.rsp_cons.wrapping_add(n);
        self.counters.completed += u64::from(n - bad - late);
        if late > 0 && worth_logging(self.counters.late_answers) {
            pr_info!("blktap{minor}: dropped {late} late answers to timed-out requests\n");
        }
        Ok(Consumed { bad })
    }

    /// Frees the slots of the answered requests in `done`, whose data is copied: they may end.
    pub(crate) fn complete(&mut self, done: &Answered) {
        for (slot, d) in done.iter().enumerate() {
            if d.is_some() {
                self.slots.complete(slot);
            }
        }
    }
}

#[kunit_tests(blktap_ring_state)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_accepted_while_mapped_or_recovering() -> Result {
        let anchor = 0u8;
        let mm = MmId::from_ptr(core::ptr::from_ref(&anchor));
        let mut ring = RingState::new(120);
        assert!(!ring.accepts());
        assert_eq!(ring.readiness(), Readiness::Unmapped);
        ring.disk_created(true, false);
        assert!(ring.accepts());
        ring.force_removing();
        assert!(!ring.accepts());
        ring.end_removing();
        assert!(!ring.recovery() && !ring.accepts());
        let pages = Arc::new(RingPages::new(crate::uapi::SEGMENT_MAX)?, GFP_KERNEL)?;
        assert_eq!(ring.map(mm, pages), 0);
        assert!(ring.accepts());
        assert_eq!(ring.readiness(), Readiness::Idle);
        assert!(ring.is_mapper(mm));
        assert!(!ring.is_mapper(MmId::NONE));
        ring.post_message(uapi::RING_MSG_PAUSE)?;
        assert_eq!(ring.readiness(), Readiness::Readable);
        // Readiness is a query: asking again gives the same answer.
        assert_eq!(ring.readiness(), Readiness::Readable);
        ring.clear_pause_message();
        assert_eq!(ring.readiness(), Readiness::Idle);
        Ok(())
    }

    #[test]
    fn the_last_vma_ends_the_mapping() -> Result {
        let anchor = 0u8;
        let mut ring = RingState::new(120);
        let pages = Arc::new(RingPages::new(crate::uapi::SEGMENT_MAX)?, GFP_KERNEL)?;
        ring.map(MmId::from_ptr(core::ptr::from_ref(&anchor)), pages);
        ring.vma_opened();
        assert!(!ring.vma_closed());
        assert!(ring.vma_closed());
        let mut out = Taken::new();
        assert!(matches!(ring.unmap(&mut out), Unmapped::Failed));
        assert!(!ring.is_mapped() && !ring.accepts());
        assert_eq!(out.fail_all(), 0);
        Ok(())
    }

    #[test]
    fn removal_refuses_new_requests_and_ends_a_pause() {
        let mut ring = RingState::new(120);
        ring.disk_created(true, false);
        assert!(ring.start_removing().is_ok());
        assert!(!ring.accepts());
        ring.set_paused(true);
        ring.end_removing();
        assert!(!ring.paused && !ring.recovery);
        assert!(!worth_logging(9) && worth_logging(16) && worth_logging(3));
    }
}
