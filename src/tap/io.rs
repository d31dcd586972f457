// SPDX-License-Identifier: GPL-2.0

//! A tap's I/O path: requests from blk-mq onto the ring (`queue`, `commit`), tapdisk's answers
//! back (`respond`), deadlines (`timed_out`), requests that wait for a slot (`dispatch_parked`)
//! and, on disks with staged writes, writes whose data tapdisk's context copies
//! (`drain_staged`). Data is copied only while the request owns its slot (`ring/slot.rs`), with
//! the spinlock dropped; requests end with it dropped too.
//!
//! Where write data is copied: by default in `queue_rq`, on the submitter's CPU, as the old
//! driver did. A tapdisk that negotiates `BLKTAP_DEVICE_STAGED_WRITES` has it copied in its own
//! context instead: `queue_rq` stages the write (its slot reserved, nothing copied, tapdisk
//! woken), and the next poll of the ring, `RESPOND`, `PAUSE` or `REMOVE_DEVICE` copies every
//! staged write's data and puts it on the ring. The submitter then pays for the request, not
//! for its data, as with ublk, whose server copies.

use kernel::{
    prelude::*,
    sync::Arc, //
};

use super::Tap;
use crate::{
    blk_mq::{
        Queued,
        Request,
        RequestRef,
        TimeoutAction, //
    },
    protocol::{
        self,
        Features,
        RingRequest, //
    },
    ring::{
        pages::RingPages,
        state::{
            worth_logging,
            Answered,
            Pending,
            Taken,
            TimedOut, //
        },
    },
    uapi,
};

/// A disk's way into its tap: what the disk's queue holds (`disk.rs`). It keeps the tap and the
/// ring pages the disk's requests are copied through alive for the disk's life, and carries the
/// features the disk was created with; the disk sees neither the pages nor the ring.
pub(crate) struct DiskLink {
    tap: Arc<Tap>,
    pages: Arc<RingPages>,
    features: Features,
}

impl DiskLink {
    pub(super) fn new(tap: Arc<Tap>, pages: Arc<RingPages>, features: Features) -> Self {
        Self {
            tap,
            pages,
            features,
        }
    }

    /// The tap's minor.
    pub(crate) fn minor(&self) -> u32 {
        self.tap.minor()
    }

    /// The most pages a request may have: the slots' pages with large requests, else 11.
    pub(crate) fn request_pages(&self) -> usize {
        if self.features.large {
            self.pages.per_slot()
        } else {
            uapi::SEGMENT_MAX
        }
    }

    /// `queue_rq`: as [`Tap::queue`].
    pub(crate) fn queue(&self, rq: Request, last: bool) -> Queued {
        self.tap.queue(&self.pages, self.features, rq, last)
    }

    /// `commit_rqs`: as [`Tap::commit`].
    pub(crate) fn commit(&self) {
        self.tap.commit()
    }

    /// blk-mq's timeout handler: as [`Tap::timed_out`].
    pub(crate) fn timed_out(&self, rq: RequestRef<'_>) -> TimeoutAction {
        self.tap.timed_out(&self.pages, rq)
    }
}

impl Tap {
    /// Queues a request on the ring (from `queue_rq`). Ends it at once if the ring takes no
    /// requests or the request cannot go on the ring. If no slot is free (every one is held by a
    /// request that timed out and that tapdisk has not answered), the request waits for one,
    /// within its deadline.
    fn queue(&self, pages: &RingPages, features: Features, rq: Request, last: bool) -> Queued {
        let Some(op) = protocol::ring_op(rq.op(), rq.is_fua(), features) else {
            rq.end(Err(EOPNOTSUPP));
            return Queued::Taken;
        };
        let admitted = self.ring.lock().admit(rq, op);
        match admitted {
            Ok(Some((slot, rq))) => {
                let stage = features.staged_writes && protocol::carries_write_data(op);
                if self.fill(pages, slot, rq, op, last, stage) {
                    self.poll.notify_all();
                }
            }
            // Parked or refused: the batch's earlier requests are on the ring, unpublished, and
            // blk-mq calls no `commit_rqs` after a request it handed over; publish them now.
            Ok(None) => {
                if last {
                    self.commit();
                }
            }
            Err(rq) => {
                rq.end(Err(EIO));
                if last {
                    self.commit();
                }
            }
        }
        Queued::Taken
    }

    /// Puts `rq` in `slot`, which the caller reserved for it: copies a write's data into the
    /// slot's pages (without the lock: the reserved slot is the request's alone), then puts its
    /// entry on the ring, or keeps it while the tap recovers; or, with `stage` (a write on a
    /// disk with staged writes), stages it without copying. Ends the request with an I/O error
    /// if it cannot go. With `publish`, publishes the batch; returns whether to wake tapdisk.
    fn fill(
        &self,
        pages: &RingPages,
        slot: usize,
        rq: Request,
        op: u8,
        publish: bool,
        stage: bool,
    ) -> bool {
        let per_slot = pages.per_slot();
        let ready = RingRequest::new(op, rq.sector(), rq.bytes(), per_slot).and_then(|req| {
            let len = req.bytes() as usize;
            if !stage && req.carries_write_data() && rq.copy_to_pages(pages.slot(slot), len) != len
            {
                return Err(EIO);
            }
            Ok(req)
        });
        let put = match ready {
            Ok(req) if stage => {
                let p = Pending { rq, req };
                self.ring.lock().stage(slot, p, publish)
            }
            Ok(req) => {
                let p = Pending { rq, req };
                self.ring.lock().put_on_ring(slot, p, publish)
            }
            Err(_) => {
                self.ring.lock().cancel(slot);
                Err(rq)
            }
        };
        match put {
            Ok(wake) => wake,
            Err(rq) => {
                rq.end(Err(EIO));
                false
            }
        }
    }

    /// Moves waiting requests into free slots, oldest first, and publishes them; fails them if
    /// the ring takes no more requests. Nothing moves while the disk is paused.
    pub(super) fn dispatch_parked(&self, pages: &RingPages) {
        let mut failed = Taken::new();
        loop {
            let next = self.ring.lock().next_parked(&mut failed);
            let Some((slot, w)) = next else {
                break;
            };
            // Copied here, in the context that freed the slot: no staging.
            self.fill(pages, slot, w.rq, w.op, false, false);
        }
        failed.fail_all();
        if self.ring.lock().publish() {
            self.poll.notify_all();
        }
    }

    /// Copies the data of every staged write into its slot and puts it on the ring, then
    /// publishes them (disks with staged writes; from tapdisk's context: the ring's poll,
    /// `RESPOND`, `PAUSE`, `REMOVE_DEVICE`). Nothing happens while no tapdisk maps the ring:
    /// the writes stay staged for the next one. A write that cannot go ends with an I/O error.
    pub(crate) fn drain_staged(&self) {
        /// Writes taken per lock: the batch lives on the stack.
        const BATCH: usize = 8;
        loop {
            let mut batch: [Option<(usize, u8, Pending)>; BATCH] = [const { None }; BATCH];
            let (pages, n) = {
                let mut ring = self.ring.lock();
                if ring.staged() == 0 {
                    return;
                }
                let Some(pages) = ring.pages() else {
                    return;
                };
                let n = ring.take_staged(&mut batch);
                (pages, n)
            };
            if n == 0 {
                return;
            }
            // Their slots are `Reserved`: the pages are these requests' alone.
            let mut copied = [false; BATCH];
            for (ok, b) in copied.iter_mut().zip(batch.iter()) {
                if let Some((slot, _, p)) = b {
                    let len = p.req.bytes() as usize;
                    *ok = p.rq.copy_to_pages(pages.slot(*slot), len) == len;
                }
            }
            let mut failed: [Option<Request>; BATCH] = [const { None }; BATCH];
            {
                let mut ring = self.ring.lock();
                for ((b, ok), f) in batch.iter_mut().zip(copied).zip(failed.iter_mut()) {
                    let Some((slot, _, p)) = b.take() else {
                        continue;
                    };
                    if ok {
                        *f = ring.put_on_ring(slot, p, false).err();
                    } else {
                        ring.cancel(slot);
                        *f = Some(p.rq);
                    }
                }
                // No wake-up: staging woke tapdisk, and the ring stays readable until it
                // answers; the caller is tapdisk's context, which looks at the ring next.
                ring.publish();
            }
            for rq in failed.into_iter().flatten() {
                rq.end(Err(EIO));
            }
            if n < BATCH {
                return;
            }
        }
    }

    /// Publishes a batch (from `commit_rqs`).
    fn commit(&self) {
        if self.ring.lock().publish() {
            self.poll.notify_all();
        }
    }

    /// A request has not ended within the tap's deadline (blk-mq's timeout handler): it ends
    /// with an I/O error. If a tapdisk serves the ring, its slot stays reserved until tapdisk
    /// answers. A request waiting for a slot ends the same way.
    fn timed_out(&self, pages: &RingPages, rq: RequestRef<'_>) -> TimeoutAction {
        let (found, log, deadline) = {
            let mut ring = self.ring.lock();
            let found = ring.time_out(|r| r.is(&rq));
            let c = ring.counters();
            (found, worth_logging(c.timed_out), ring.deadline())
        };
        let minor = self.minor;
        match found {
            // Reserved (being filled) or completing (being answered): it ends soon.
            TimedOut::NotHeld => return TimeoutAction::ResetTimer,
            TimedOut::Staged { rq, op, slot } => {
                rq.end(Err(EIO));
                if log {
                    pr_warn!(
                        "blktap{minor}: staged write in slot {slot} (op {op}) timed out after \
                         {deadline} s (tapdisk never fetched it); failed with EIO\n"
                    );
                }
                self.dispatch_parked(pages);
            }
            TimedOut::Parked { rq, op } => {
                rq.end(Err(EIO));
                if log {
                    pr_warn!(
                        "blktap{minor}: request (op {op}) timed out after {deadline} s waiting \
                         for a slot (every slot is held by a late request); failed with EIO\n"
                    );
                }
            }
            TimedOut::OnRing { rq, op, slot, live } => {
                rq.end(Err(EIO));
                if log {
                    let why = if live {
                        "tapdisk has not answered"
                    } else {
                        "no tapdisk attached"
                    };
                    pr_warn!(
                        "blktap{minor}: request in slot {slot} (op {op}) timed out after \
                         {deadline} s ({why}); failed with EIO\n"
                    );
                }
                // Without a tapdisk the slot is free again: a waiting request may take it.
                if !live {
                    self.dispatch_parked(pages);
                }
            }
        }
        TimeoutAction::Done
    }

    /// `RESPOND`: consumes tapdisk's responses. Read data is copied out while the answered
    /// slots are `Completing`; the slots are freed, and only then do the requests end.
    ///
    /// # Errors
    ///
    /// `ENXIO` if the ring is not mapped, `EIO` if `rsp_prod` is out of bounds (nothing is
    /// consumed), `EINVAL` if a response was refused (the others are consumed).
    pub(crate) fn respond(&self) -> Result {
        let mut done: Answered = [const { None }; uapi::RING_SIZE];
        let (pages, consumed): (Arc<RingPages>, _) = {
            let mut ring = self.ring.lock();
            let pages = ring.pages().ok_or(ENXIO)?;
            let consumed = ring.take_answers(self.minor, &pages, &mut done)?;
            (pages, consumed)
        };
        let mut results: [Result; uapi::RING_SIZE] = [Ok(()); uapi::RING_SIZE];
        for (slot, d) in done.iter().enumerate() {
            let Some((p, status)) = d else {
                continue;
            };
            let len = p.req.bytes() as usize;
            results[slot] = match *status {
                uapi::RSP_OKAY
                    if p.req.op() != uapi::OP_READ
                        || p.rq.copy_from_pages(pages.slot(slot), len) == len =>
                {
                    Ok(())
                }
                uapi::RSP_EOPNOTSUPP => Err(EOPNOTSUPP),
                _ => Err(EIO),
            };
        }
        let waiting = {
            let mut ring = self.ring.lock();
            ring.complete(&done);
            ring.has_waiting()
        };
        for (d, result) in done.iter_mut().zip(results) {
            if let Some((p, _)) = d.take() {
                p.rq.end(result);
            }
        }
        if waiting {
            self.dispatch_parked(&pages);
        }
        if consumed.bad > 0 {
            return Err(EINVAL);
        }
        Ok(())
    }
}
