// SPDX-License-Identifier: GPL-2.0

//! The ring devices, `/dev/xen/blktap-2/blktapN`, and the shared ring behind them.
//!
//! A tapdisk opens the ring of its tap exclusively (`EBUSY` for a second opener, `ENXIO` for an
//! unallocated minor; an opener waits while the last user's disk is removed), maps it once per open (1 + 32 x 11 pages at offset 0), creates the disk
//! with `CREATE_DEVICE`, polls for requests and answers with `RESPOND`. See
//! `Documentation/blktap2.rst` for the protocol and its memory-ordering argument.
//!
//! # Hostile peer
//!
//! Everything tapdisk writes into the ring is read once, into a local copy, and validated before
//! use: `rsp_prod` may not run ahead of the requests given out; each response must name a slot
//! (< 32) with a request pending, with the same operation. A bad response is refused with a log
//! line and never completes anything. The slots' life is in `slot.rs`.
//!
//! # Lock order
//!
//! `Tap::inner` (mutex) before `Tap::ring` (spinlock, `blktap_ring`). The spinlock is never held
//! across page allocation, a user copy, an mm operation, or the end of a request.

use core::{
    mem::ManuallyDrop,
    ptr, //
};

use kernel::{
    bindings,
    fs::File,
    mm::virt::VmaNew,
    page::{
        Page,
        PAGE_SIZE, //
    },
    prelude::*,
    sync::{
        barrier::{
            smp_mb,
            Read,
            Write, //
        },
        poll::PollTable,
        Arc,
    },
    uaccess::{
        UserPtr,
        UserSlice, //
    },
};

use crate::{
    blk_mq::{
        Op,
        Queued,
        Request,
        RequestRef,
        TimeoutAction, //
    },
    chrdev::CharDevice,
    device,
    request::{
        self,
        BadResponse, //
    },
    slot::{
        Answer,
        Parked,
        Slots, //
    },
    tap::{
        RingUser,
        Tap, //
    },
    uapi,
    Blktap, //
};

mod ffi {
    use kernel::{
        bindings,
        ffi::c_void, //
    };

    // Only pointers cross this boundary; some pointees contain zero-sized C structs.
    #[allow(improper_ctypes, reason = "opaque pointers only")]
    extern "C" {
        pub(super) fn blktap_current_mm() -> *const c_void;
        pub(super) fn blktap_current_tgid() -> i32;
        pub(super) fn blktap_page_address(page: *mut bindings::page) -> *mut c_void;
        pub(super) fn blktap_vma_set_ops(
            vma: *mut bindings::vm_area_struct,
            ops: *const bindings::vm_operations_struct,
            private_data: *mut c_void,
        );
        pub(super) fn blktap_vma_private(vma: *mut bindings::vm_area_struct) -> *mut c_void;
        pub(super) fn blktap_vma_start(vma: *mut bindings::vm_area_struct) -> usize;
        pub(super) fn blktap_vma_size(vma: *mut bindings::vm_area_struct) -> usize;
        pub(super) fn blktap_vma_pgoff(vma: *mut bindings::vm_area_struct) -> usize;
        pub(super) fn blktap_vma_mm(vma: *mut bindings::vm_area_struct) -> *const c_void;
    }
}

const POLLIN: u32 = bindings::POLLIN;
const POLLRDNORM: u32 = bindings::POLLRDNORM;
const POLLERR: u32 = bindings::POLLERR;

/// The pages shared with tapdisk: the ring page and 32 x 11 data pages. Allocated at a tap's
/// first mapping and kept until the tap is freed.
///
/// # Invariants
///
/// `ring_addr` is the kernel address of `ring`, a lowmem page; `data` holds 32 x 11 pages.
pub(crate) struct RingPages {
    ring: Page,
    ring_addr: *mut u8,
    data: KVec<Page>,
}

// SAFETY: The pages are owned; `ring_addr` is only used through `&self` methods with volatile or
// barrier-ordered accesses, as the memory is shared with user space anyway.
unsafe impl Send for RingPages {}
// SAFETY: As above.
unsafe impl Sync for RingPages {}

impl RingPages {
    fn new() -> Result<Self> {
        let ring = Page::alloc_page(GFP_KERNEL | __GFP_ZERO)?;
        let mut data = KVec::with_capacity(uapi::RING_SIZE * uapi::SEGMENT_MAX, GFP_KERNEL)?;
        for _ in 0..uapi::RING_SIZE * uapi::SEGMENT_MAX {
            data.push(Page::alloc_page(GFP_KERNEL | __GFP_ZERO)?, GFP_KERNEL)?;
        }
        // SAFETY: `ring` is a live page allocated without `__GFP_HIGHMEM`.
        let ring_addr = unsafe { ffi::blktap_page_address(ring.as_ptr()) }.cast::<u8>();
        // INVARIANT: `ring_addr` is `ring`'s address; `data` holds all data pages.
        Ok(Self {
            ring,
            ring_addr,
            data,
        })
    }

    /// The data pages of slot `slot` (< 32).
    pub(crate) fn slot(&self, slot: usize) -> &[Page] {
        let first = slot * uapi::SEGMENT_MAX;
        &self.data[first..first + uapi::SEGMENT_MAX]
    }

    fn zero_ring(&self) {
        // SAFETY: `ring_addr` is a page of ours.
        unsafe { ptr::write_bytes(self.ring_addr, 0, PAGE_SIZE) };
    }

    fn header_u32(&self, offset: usize) -> *mut u32 {
        // SAFETY: `offset` is a field of the 64-byte header, inside the page, 4-aligned.
        unsafe { self.ring_addr.add(offset).cast::<u32>() }
    }

    fn entry(&self, index: u32) -> *mut u8 {
        let slot = index as usize % uapi::RING_SIZE;
        // SAFETY: Entries 0..32 of 112 bytes after the 64-byte header fit in the page.
        unsafe {
            self.ring_addr
                .add(uapi::RING_HEADER_SIZE + slot * uapi::RING_ENTRY_SIZE)
        }
    }

    /// Writes request entry `index`.
    fn write_request(&self, index: u32, req: &uapi::Request) {
        // SAFETY: The entry is inside the ring page; an entry is 8-aligned (64 + 112 * k).
        unsafe { ptr::write_volatile(self.entry(index).cast::<uapi::Request>(), *req) };
    }

    /// Copies response entry `index` out of the ring: the one read of it.
    fn read_response(&self, index: u32) -> uapi::Response {
        // SAFETY: The entry is inside the ring page and 8-aligned; any bit pattern is a valid
        // `Response`.
        unsafe { ptr::read_volatile(self.entry(index).cast::<uapi::Response>()) }
    }

    /// Publishes `req_prod`: the entries written before are visible to tapdisk first.
    fn publish_req_prod(&self, req_prod: u32) {
        smp_mb(Write);
        // SAFETY: `req_prod` is at offset 0 of the header.
        unsafe { ptr::write_volatile(self.header_u32(0), req_prod) };
    }

    /// The `msg` byte of the header.
    fn msg(&self) -> u8 {
        // SAFETY: `msg` is a byte of the ring page.
        unsafe { ptr::read_volatile(self.ring_addr.add(uapi::RING_MSG_OFFSET)) }
    }

    /// Sets the `msg` byte of the header.
    fn set_msg(&self, msg: u8) {
        // SAFETY: `msg` is a byte of the ring page.
        unsafe { ptr::write_volatile(self.ring_addr.add(uapi::RING_MSG_OFFSET), msg) };
    }

    /// Reads `rsp_prod` once; the entries it covers are read after it.
    fn read_rsp_prod(&self) -> u32 {
        // SAFETY: `rsp_prod` is at offset 8 of the header.
        let v = unsafe { ptr::read_volatile(self.header_u32(8)) };
        smp_mb(Read);
        v
    }
}

/// A request given to tapdisk, or kept for the next one while the tap recovers.
pub(crate) struct Pending {
    rq: Request,
    /// The ring entry as written, to write again when a new tapdisk maps the ring.
    entry: uapi::Request,
    bytes: u32,
}

/// A request waiting for a free slot, with its ring operation.
pub(crate) struct Waiting {
    rq: Request,
    op: u8,
}

/// What the negotiated extensions let the kernel send.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub(crate) struct Features {
    pub(crate) flush: bool,
    pub(crate) fua: bool,
    pub(crate) discard: bool,
}

/// The I/O state of a tap's ring, under `Tap::ring`.
///
/// # Invariants
///
/// - A slot is `OnRing` from the publication of the request with its id (or, while the tap
///   recovers, from the request's arrival) until tapdisk's answer, its timeout or the ring's
///   death; requests are kept while `!live` only if `recovery` (see [`crate::slot`]).
/// - `parked` holds requests only while no slot was free for them.
/// - `rsp_cons <= published <= req_prod_pvt` in ring (wrapping) order, at most 32 apart.
pub(crate) struct RingState {
    /// The ring is mapped by a tapdisk that is alive.
    live: bool,
    /// Identity of the mapping process's mm (compared, never dereferenced); 0 when unmapped.
    mm: usize,
    /// The shared pages while mapped.
    pages: Option<Arc<RingPages>>,
    /// Live vmas of the mapping: 1, and 2 while `mremap` holds a copy it will close.
    vmas: u32,
    req_prod_pvt: u32,
    published: u32,
    rsp_cons: u32,
    slots: Slots<Pending>,
    /// Requests waiting for a slot (every slot was late when they came).
    parked: Parked<Waiting>,
    /// The disk is paused (`PAUSE`): no waiting request goes on the ring.
    paused: bool,
    /// The disk is being removed: new requests fail at once.
    removing: bool,
    /// The disk was made with `BLKTAP_DEVICE_RECOVERY`: requests outlive the tapdisk.
    pub(crate) recovery: bool,
    /// Seconds a request may stay unanswered (`deadline` in sysfs).
    pub(crate) deadline: u32,
    /// Counters for `debug`: requests answered, responses refused, requests timed out, late
    /// answers dropped, requests given again to a recovering tapdisk, tapdisks lost by a
    /// recovery tap.
    pub(crate) completed: u64,
    pub(crate) refused: u64,
    pub(crate) timed_out: u64,
    pub(crate) late: u64,
    pub(crate) reissued: u64,
    lost: u64,
}

impl RingState {
    pub(crate) fn new(deadline: u32) -> Self {
        Self {
            live: false,
            mm: 0,
            pages: None,
            vmas: 0,
            req_prod_pvt: 0,
            published: 0,
            rsp_cons: 0,
            slots: Slots::new(),
            parked: Parked::new(),
            paused: false,
            removing: false,
            recovery: false,
            deadline,
            completed: 0,
            refused: 0,
            timed_out: 0,
            late: 0,
            reissued: 0,
            lost: 0,
        }
    }

    /// Requests given to tapdisk (or kept for one) and not yet answered.
    pub(crate) fn pending(&self) -> usize {
        self.slots.pending()
    }

    /// Slots held by requests that timed out and that tapdisk has not answered.
    pub(crate) fn late_slots(&self) -> usize {
        self.slots.late()
    }

    /// Requests waiting for a free slot.
    pub(crate) fn parked(&self) -> usize {
        self.parked.len()
    }

    pub(crate) fn is_mapped(&self) -> bool {
        self.mm != 0
    }

    /// Whether a tapdisk serves the ring now.
    pub(crate) fn is_live(&self) -> bool {
        self.live
    }

    /// New requests go on the ring, or are kept for a recovering tapdisk.
    fn accepts(&self) -> bool {
        !self.removing && (self.live || self.recovery)
    }

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

    /// The disk is gone; a new one may take requests.
    pub(crate) fn end_removing(&mut self) {
        self.removing = false;
        self.recovery = false;
        self.paused = false;
    }

    /// Publishes the requests written since the last call; true if tapdisk must be woken.
    fn publish(&mut self) -> bool {
        if self.published == self.req_prod_pvt {
            return false;
        }
        if let Some(pages) = &self.pages {
            pages.publish_req_prod(self.req_prod_pvt);
        }
        self.published = self.req_prod_pvt;
        true
    }

    /// Takes every request out, on the ring and waiting; the caller ends them. Late slots are
    /// freed: no tapdisk is left to write into them.
    fn take_all(&mut self, out: &mut Taken) {
        self.slots.free_late();
        self.slots.take_on_ring(&mut out.on_ring);
        self.parked.take_all(&mut out.parked);
    }

    /// Fails every request at once and makes new ones fail (the disk is being removed without a
    /// tapdisk). The caller ends the requests taken.
    pub(crate) fn abandon(&mut self, out: &mut Taken) {
        self.removing = true;
        self.take_all(out);
    }
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

/// The ring operation for a block request, given the negotiated features.
fn ring_op(op: Op, fua: bool, features: Features) -> Option<u8> {
    match op {
        Op::Read => Some(uapi::OP_READ),
        Op::Write if fua && features.fua => Some(uapi::OP_WRITE_FUA),
        Op::Write => Some(uapi::OP_WRITE),
        Op::Flush if features.flush => Some(uapi::OP_FLUSH),
        Op::Discard if features.discard => Some(uapi::OP_DISCARD),
        // Nothing else is ever sent; old tapdisks know READ and WRITE only.
        _ => None,
    }
}

/// The ring entry of a request of `bytes` bytes at `sector`, in slot `slot`.
fn ring_entry(op: u8, slot: usize, sector: u64, bytes: u32) -> Result<uapi::Request> {
    match op {
        uapi::OP_READ | uapi::OP_WRITE | uapi::OP_WRITE_FUA => {
            let (seg, nr_segments) = request::segments(bytes)?;
            Ok(uapi::Request {
                operation: op,
                nr_segments,
                id: slot as u64,
                sector_number: sector,
                seg,
                ..Default::default()
            })
        }
        uapi::OP_FLUSH => Ok(uapi::Request {
            operation: op,
            id: slot as u64,
            ..Default::default()
        }),
        uapi::OP_DISCARD => {
            let sectors = bytes / request::SECTOR_SIZE;
            if sectors == 0
                || bytes % request::SECTOR_SIZE != 0
                || sectors > uapi::DISCARD_MAX_SECTORS
            {
                return Err(EINVAL);
            }
            Ok(uapi::Request::from_discard(&uapi::RequestDiscard {
                operation: op,
                nr_segments: 0,
                pad: 0,
                pad2: 0,
                id: slot as u64,
                sector_number: sector,
                nr_sectors: u64::from(sectors),
                pad3: [0; uapi::RING_ENTRY_SIZE - 32],
            }))
        }
        _ => Err(EINVAL),
    }
}

impl Tap {
    /// Queues a request on the ring (from `queue_rq`). Ends it at once if the ring takes no
    /// requests or the request cannot go on the ring. If no slot is free (every one is held by a
    /// request that timed out and that tapdisk has not answered), the request waits for one,
    /// within its deadline.
    pub(crate) fn queue(
        &self,
        pages: &RingPages,
        features: Features,
        rq: Request,
        last: bool,
    ) -> Queued {
        let Some(op) = ring_op(rq.op(), rq.is_fua(), features) else {
            rq.end(Err(EOPNOTSUPP));
            return Queued::Taken;
        };
        let slot = {
            let mut ring = self.ring.lock();
            if !ring.accepts() {
                drop(ring);
                rq.end(Err(EIO));
                return Queued::Taken;
            }
            match ring.slots.reserve() {
                Some(slot) => slot,
                None => {
                    let refused = ring.parked.push(Waiting { rq, op }).err();
                    drop(ring);
                    // Never: a waiting request holds one of the ring's 32 tags.
                    if let Some(w) = refused {
                        w.rq.end(Err(EIO));
                    }
                    return Queued::Taken;
                }
            }
        };
        if self.fill(pages, slot, rq, op, last) {
            self.poll.notify_all();
        }
        Queued::Taken
    }

    /// Puts `rq` in `slot`, which the caller reserved for it: copies a write's data into the
    /// slot's pages (without the lock: the reserved slot is the request's alone), then writes its
    /// entry on the ring, or keeps it while the tap recovers. Ends the request with an I/O error
    /// if it cannot go. With `publish`, publishes the batch; returns whether to wake tapdisk.
    fn fill(&self, pages: &RingPages, slot: usize, rq: Request, op: u8, publish: bool) -> bool {
        let bytes = rq.bytes();
        let ready = ring_entry(op, slot, rq.sector(), bytes).and_then(|entry| {
            let data = op == uapi::OP_WRITE || op == uapi::OP_WRITE_FUA;
            if data && rq.copy_to_pages(pages.slot(slot), bytes as usize) != bytes as usize {
                return Err(EIO);
            }
            Ok(entry)
        });
        let (wake, refused) = {
            let mut ring = self.ring.lock();
            match ready {
                Ok(entry) if ring.accepts() => {
                    if ring.live {
                        pages.write_request(ring.req_prod_pvt, &entry);
                        ring.req_prod_pvt = ring.req_prod_pvt.wrapping_add(1);
                    }
                    let p = Pending { rq, entry, bytes };
                    match ring.slots.put_on_ring(slot, op, p) {
                        Ok(()) => (publish && ring.live && ring.publish(), None),
                        Err(p) => (false, Some(p.rq)),
                    }
                }
                _ => {
                    ring.slots.cancel(slot);
                    (false, Some(rq))
                }
            }
        };
        if let Some(rq) = refused {
            rq.end(Err(EIO));
        }
        wake
    }

    /// Moves waiting requests into free slots, oldest first, and publishes them; fails them if
    /// the ring takes no more requests. Nothing moves while the disk is paused.
    fn dispatch_parked(&self, pages: &RingPages) {
        let mut failed = Taken::new();
        loop {
            let (slot, w) = {
                let mut ring = self.ring.lock();
                if ring.parked.is_empty() || ring.paused {
                    break;
                }
                if !ring.accepts() {
                    ring.parked.take_all(&mut failed.parked);
                    break;
                }
                let Some(slot) = ring.slots.reserve() else {
                    break;
                };
                match ring.parked.pop_oldest() {
                    Some(w) => (slot, w),
                    None => {
                        ring.slots.cancel(slot);
                        break;
                    }
                }
            };
            self.fill(pages, slot, w.rq, w.op, false);
        }
        failed.fail_all();
        if self.ring.lock().publish() {
            self.poll.notify_all();
        }
    }

    /// Publishes a batch (from `commit_rqs`).
    pub(crate) fn commit(&self) {
        if self.ring.lock().publish() {
            self.poll.notify_all();
        }
    }

    /// A request has not ended within the tap's deadline (blk-mq's timeout handler): it ends
    /// with an I/O error. If a tapdisk serves the ring, its slot stays reserved until tapdisk
    /// answers. A request waiting for a slot ends the same way.
    pub(crate) fn timed_out(&self, pages: &RingPages, rq: RequestRef<'_>) -> TimeoutAction {
        let (rq, op, slot, live, log, deadline) = {
            let mut ring = self.ring.lock();
            let live = ring.live;
            let (rq, op, slot) = match ring.slots.find_on_ring(|p| p.rq.is(&rq)) {
                Some(slot) => match ring.slots.time_out(slot, live) {
                    Some(p) => (p.rq, p.entry.operation, Some(slot)),
                    None => return TimeoutAction::ResetTimer,
                },
                None => match ring.parked.remove(|w| w.rq.is(&rq)) {
                    Some(w) => (w.rq, w.op, None),
                    // Reserved (being filled) or completing (being answered): it ends soon.
                    None => return TimeoutAction::ResetTimer,
                },
            };
            ring.timed_out += 1;
            (
                rq,
                op,
                slot,
                live,
                worth_logging(ring.timed_out),
                ring.deadline,
            )
        };
        rq.end(Err(EIO));
        if log {
            let minor = self.minor();
            match (slot, live) {
                (None, _) => pr_warn!(
                    "blktap{minor}: request (op {op}) timed out after {deadline} s waiting for a \
                     slot (every slot is held by a late request); failed with EIO\n"
                ),
                (Some(slot), live) => {
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
            }
        }
        // Without a tapdisk the slot is free again: a waiting request may take it.
        if slot.is_some() && !live {
            self.dispatch_parked(pages);
        }
        TimeoutAction::Done
    }

    /// `RESPOND`: consumes tapdisk's responses.
    fn respond(&self) -> Result {
        let mut done: [Option<(Pending, i16)>; uapi::RING_SIZE] = [const { None }; uapi::RING_SIZE];
        let mut bad = 0u32;
        let mut late = 0u32;
        let pages = {
            let mut ring = self.ring.lock();
            let Some(pages) = ring.pages.clone() else {
                return Err(ENXIO);
            };
            let rsp_prod = pages.read_rsp_prod();
            let n = match request::new_responses(rsp_prod, ring.rsp_cons) {
                Ok(n) => n,
                Err(e) => {
                    ring.refused += 1;
                    let log = worth_logging(ring.refused);
                    let rsp_cons = ring.rsp_cons;
                    drop(ring);
                    if log {
                        pr_warn!(
                            "blktap{}: refused rsp_prod {rsp_prod}: more than a ring from \
                             rsp_cons {rsp_cons}\n",
                            self.minor()
                        );
                    }
                    return Err(e);
                }
            };
            for i in 0..n {
                let rsp = pages.read_response(ring.rsp_cons.wrapping_add(i));
                let checked = request::check_response(&rsp, |s| ring.slots.answerable_op(s));
                let why = match checked.map(|slot| (slot, ring.slots.answer(slot))) {
                    Ok((slot, Answer::Done(p))) => {
                        done[slot] = Some((p, rsp.status));
                        continue;
                    }
                    Ok((_, Answer::Late)) => {
                        late += 1;
                        ring.late += 1;
                        continue;
                    }
                    // The check found it answerable; kept for the type's sake.
                    Ok((_, Answer::NotPending)) => BadResponse::NotPending,
                    Err(why) => why,
                };
                bad += 1;
                ring.refused += 1;
                if bad == 1 && worth_logging(ring.refused) {
                    report_bad(self.minor(), &rsp, why);
                }
            }
            ring.rsp_cons = ring.rsp_cons.wrapping_add(n);
            ring.completed += u64::from(n - bad - late);
            if late > 0 && worth_logging(ring.late) {
                pr_info!(
                    "blktap{}: dropped {late} late answers to timed-out requests\n",
                    self.minor()
                );
            }
            pages
        };
        // The answered slots are `Completing`: their pages are ours until they are freed.
        let mut results: [Result; uapi::RING_SIZE] = [Ok(()); uapi::RING_SIZE];
        for (slot, d) in done.iter().enumerate() {
            let Some((p, status)) = d else {
                continue;
            };
            let len = p.bytes as usize;
            results[slot] = match *status {
                uapi::RSP_OKAY
                    if p.entry.operation != uapi::OP_READ
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
            for (slot, d) in done.iter().enumerate() {
                if d.is_some() {
                    ring.slots.complete(slot);
                }
            }
            !ring.parked.is_empty()
        };
        for (d, result) in done.iter_mut().zip(results) {
            if let Some((p, _)) = d.take() {
                p.rq.end(result);
            }
        }
        if waiting {
            self.dispatch_parked(&pages);
        }
        if bad > 0 {
            return Err(EINVAL);
        }
        Ok(())
    }

    /// The ring's mapping went away (munmap or the process died). Without recovery, fails every
    /// pending and waiting request, and all new I/O until the disk is removed. With recovery,
    /// keeps them for the next tapdisk.
    fn ring_gone(&self) {
        let mut dead = Taken::new();
        let kept = {
            let mut ring = self.ring.lock();
            ring.live = false;
            ring.mm = 0;
            ring.pages = None;
            if ring.recovery {
                ring.slots.free_late();
                ring.lost += 1;
                Some((ring.pending(), worth_logging(ring.lost)))
            } else {
                ring.take_all(&mut dead);
                None
            }
        };
        let failed = dead.fail_all();
        match kept {
            Some((n, true)) => pr_warn!(
                "blktap{}: ring unmapped; keeping the disk and {n} requests for recovery\n",
                self.minor()
            ),
            Some((_, false)) => {}
            None if failed > 0 => pr_warn!(
                "blktap{}: ring unmapped; failed {failed} pending requests\n",
                self.minor()
            ),
            None => {}
        }
        self.poll.notify_all();
    }

    /// `PAUSE` (`true`) and `RESUME` (`false`): stops or restarts handing requests to the ring,
    /// and clears a pause or resume message (also when there is no disk to pause).
    ///
    /// # Errors
    ///
    /// `ENODEV` if the tap has no disk.
    fn set_paused(&self, paused: bool) -> Result {
        let mut inner = self.inner.lock();
        if let Some(pages) = &self.ring.lock().pages {
            let msg = pages.msg();
            if msg == uapi::RING_MSG_PAUSE || msg == uapi::RING_MSG_RESUME {
                pages.set_msg(0);
            }
        }
        let disk = inner.disk.as_mut().ok_or(ENODEV)?;
        // Stopping waits for `queue_rq` calls in progress; none takes `inner`.
        disk.set_quiesced(paused);
        self.ring.lock().paused = paused;
        let pages = inner.pages.clone();
        drop(inner);
        if let (false, Some(pages)) = (paused, pages) {
            self.dispatch_parked(&pages);
        }
        Ok(())
    }

    /// Asks the ring's tapdisk to pause or resume (sysfs `pause`), through the ring's `msg`.
    ///
    /// # Errors
    ///
    /// `ENXIO` if no tapdisk maps the ring, `ENODEV` if the tap has no disk.
    pub(crate) fn request_pause(&self, paused: bool) -> Result {
        {
            let inner = self.inner.lock();
            let ring = self.ring.lock();
            let pages = ring.pages.as_ref().ok_or(ENXIO)?;
            // Without a disk there is nothing to pause, and the message would stay unanswered.
            if inner.disk.is_none() {
                return Err(ENODEV);
            }
            pages.set_msg(if paused {
                uapi::RING_MSG_PAUSE
            } else {
                uapi::RING_MSG_RESUME
            });
        }
        self.poll.notify_all();
        Ok(())
    }
}

/// Logs the first refusals of a tap, then every power of two, so a hostile tapdisk cannot flood
/// the log.
fn worth_logging(refused: u64) -> bool {
    refused <= 8 || refused.is_power_of_two()
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

/// An open ring.
///
/// # Invariants
///
/// `tap.inner.ring_user` is `Open` for as long as this object exists (`Closing` while it drops).
pub(crate) struct RingFile {
    tap: Arc<Tap>,
    /// The driver, for the block major of the disk the ring creates.
    blktap: Arc<Blktap>,
    /// Mapped once already (a file is mapped at most once).
    mapped: core::sync::atomic::AtomicBool,
}

impl Drop for RingFile {
    fn drop(&mut self) {
        // The mapping (which holds the file) is gone. The disk goes too, unless it waits for a
        // new tapdisk (recovery). Until it is gone the ring stays `Closing`: a new opener of the
        // minor and `FREE_TAP` wait, so no new disk or tap can meet the old disk's removal.
        let (kept, disk) = {
            let mut inner = self.tap.inner.lock();
            let mut ring = self.tap.ring.lock();
            if ring.recovery && inner.disk.is_some() {
                // The disk and its requests wait for a new tapdisk; a pause ends with the old one.
                ring.paused = false;
                drop(ring);
                if let Some(disk) = inner.disk.as_mut() {
                    disk.set_quiesced(false);
                }
                (true, None)
            } else {
                // New requests fail at once while the disk goes.
                ring.removing = true;
                drop(ring);
                inner.ring_user = RingUser::Closing;
                (false, inner.take_disk())
            }
        };
        if let Some(disk) = disk {
            pr_info!(
                "blktap{}: ring closed; removing its disk\n",
                self.tap.minor()
            );
            drop(disk);
        }
        {
            let mut inner = self.tap.inner.lock();
            if !kept {
                self.tap.ring.lock().end_removing();
            }
            inner.ring_user = RingUser::Closed;
        }
        self.tap.closed.notify_all();
    }
}

impl RingFile {
    /// Refuses ring ioctls from any process but the one that mapped the ring.
    fn check_caller(&self) -> Result {
        // SAFETY: Reads `current->mm`, compared only.
        let mm = unsafe { ffi::blktap_current_mm() } as usize;
        let ring = self.tap.ring.lock();
        if mm == 0 || ring.mm != mm {
            return Err(EACCES);
        }
        Ok(())
    }

    fn mmap(&self, vma: &VmaNew) -> Result {
        let raw = vma.as_ptr();
        // SAFETY: `vma` is being set up by this `mmap` call.
        let (size, pgoff) = unsafe { (ffi::blktap_vma_size(raw), ffi::blktap_vma_pgoff(raw)) };
        if size != uapi::MMAP_PAGES * PAGE_SIZE || pgoff != 0 {
            return Err(EINVAL);
        }
        if self
            .mapped
            .swap(true, core::sync::atomic::Ordering::Relaxed)
        {
            return Err(EBUSY);
        }
        let mut inner = self.tap.inner.lock();
        let pages = match &inner.pages {
            Some(p) => p.clone(),
            None => {
                let p = Arc::new(RingPages::new()?, GFP_KERNEL)?;
                inner.pages = Some(p.clone());
                p
            }
        };
        pages.zero_ring();
        vma.set_dontcopy();
        vma.set_dontexpand();
        vma.set_dontdump();
        let mixed = vma.set_mixedmap();
        // SAFETY: `vma` is being set up.
        let start = unsafe { ffi::blktap_vma_start(raw) };
        mixed.vm_insert_page(start, &pages.ring)?;
        for (i, page) in pages.data.iter().enumerate() {
            mixed.vm_insert_page(start + (i + 1) * PAGE_SIZE, page)?;
        }
        // The mapping holds a reference on the tap, dropped by `vma_close`.
        let private = Arc::into_raw(self.tap.clone()).cast_mut().cast();
        // SAFETY: `vma` is being set up; the ops are static; `private` is released in `close`.
        unsafe { ffi::blktap_vma_set_ops(raw, &RING_VM_OPS, private) };
        let reissued = {
            let mut ring = self.tap.ring.lock();
            // SAFETY: `vma` is being set up; its mm is compared only.
            ring.mm = unsafe { ffi::blktap_vma_mm(raw) } as usize;
            ring.live = true;
            ring.vmas = 1;
            ring.req_prod_pvt = 0;
            ring.published = 0;
            ring.rsp_cons = 0;
            // A recovering tap's kept requests go to the new tapdisk first, as fresh entries.
            let mut n = 0u32;
            let RingState {
                slots,
                req_prod_pvt,
                ..
            } = &mut *ring;
            for (_, p) in slots.on_ring() {
                pages.write_request(*req_prod_pvt, &p.entry);
                *req_prod_pvt = req_prod_pvt.wrapping_add(1);
                n += 1;
            }
            ring.pages = Some(pages.clone());
            ring.reissued += u64::from(n);
            ring.publish();
            n
        };
        drop(inner);
        if reissued > 0 {
            pr_info!(
                "blktap{}: ring mapped again; re-issued {reissued} kept requests\n",
                self.tap.minor()
            );
            self.tap.poll.notify_all();
        }
        // Then the requests that waited for a slot.
        self.tap.dispatch_parked(&pages);
        Ok(())
    }

    /// A query without side effects, level-triggered: readable while the ring holds a request
    /// tapdisk has not answered (timed-out ones aside) or a message; an error while unmapped.
    /// So a peer that registers late, re-arms (`EPOLL_CTL_MOD`) or polls through nested epoll
    /// sees the same answer each time.
    fn poll(&self, file: &File, table: PollTable<'_>) -> u32 {
        table.register_wait(file, &self.tap.poll);
        let ring = self.tap.ring.lock();
        if !ring.is_mapped() {
            return POLLERR;
        }
        let msg = ring.pages.as_ref().map_or(0, |p| p.msg());
        if ring.pending() > 0 || msg != 0 {
            return POLLIN | POLLRDNORM;
        }
        0
    }

    fn ioctl(&self, cmd: u32, arg: usize) -> Result<isize> {
        match cmd {
            uapi::IOCTL_RESPOND => {
                self.check_caller()?;
                self.tap.respond()?;
            }
            uapi::IOCTL_CREATE_DEVICE => {
                self.check_caller()?;
                let mut reader =
                    UserSlice::new(UserPtr::from_addr(arg), size_of::<uapi::BlktapDeviceInfo>())
                        .reader();
                let info: uapi::BlktapDeviceInfo = reader.read()?;
                device::create(
                    &self.blktap,
                    &self.tap,
                    &device::DeviceInfo::from_info(&info)?,
                )?;
            }
            uapi::IOCTL_CREATE_DEVICE_COMPAT => {
                self.check_caller()?;
                let mut reader =
                    UserSlice::new(UserPtr::from_addr(arg), size_of::<uapi::BlktapParams>())
                        .reader();
                let params: uapi::BlktapParams = reader.read()?;
                device::create(
                    &self.blktap,
                    &self.tap,
                    &device::DeviceInfo::from_params(&params)?,
                )?;
            }
            uapi::IOCTL_REMOVE_DEVICE => {
                self.check_caller()?;
                device::remove(&self.tap)?;
            }
            uapi::IOCTL_PAUSE | uapi::IOCTL_RESUME => {
                self.check_caller()?;
                self.tap.set_paused(cmd == uapi::IOCTL_PAUSE)?;
            }
            _ => return Err(ENOTTY),
        }
        Ok(0)
    }
}

// Each vma of a ring mapping holds a reference on the tap (its private data, from
// `Arc::into_raw`) and counts in `RingState::vmas`. The mm copies a vma only for `mremap`
// (`open` on the copy), which `vma_mremap` then refuses, so the copy is closed again; the ring is
// gone when the last vma closes.

/// # Safety
///
/// Called by the mm with a copy of a ring vma (`mremap`), whose private data is the original's.
unsafe extern "C" fn vma_open(vma: *mut bindings::vm_area_struct) {
    // SAFETY: The private data is an `Arc<Tap>` from `into_raw`, owned by the original vma,
    // which lives during this call; it is not dropped here.
    let tap = ManuallyDrop::new(unsafe {
        Arc::from_raw(ffi::blktap_vma_private(vma).cast::<Tap>().cast_const())
    });
    // The copy's own reference, released by its `close`.
    let _ = ManuallyDrop::new(Arc::clone(&tap));
    tap.ring.lock().vmas += 1;
}

/// # Safety
///
/// Called by the mm with a ring vma set up by `RingFile::mmap` or `vma_open`, once, as it goes
/// away.
unsafe extern "C" fn vma_close(vma: *mut bindings::vm_area_struct) {
    // SAFETY: Each ring vma holds one reference from `into_raw` (`mmap`) or `clone` (`open`) as
    // its private data; `close` runs once per vma.
    let tap = unsafe { Arc::from_raw(ffi::blktap_vma_private(vma).cast::<Tap>().cast_const()) };
    let last = {
        let mut ring = tap.ring.lock();
        ring.vmas = ring.vmas.saturating_sub(1);
        ring.vmas == 0
    };
    if last {
        tap.ring_gone();
    }
}

/// # Safety
///
/// Called by the mm with the copy of a ring vma that `mremap` made.
unsafe extern "C" fn vma_mremap(_vma: *mut bindings::vm_area_struct) -> i32 {
    // The ring stays where tapdisk mapped it; the mm closes the copy.
    EINVAL.to_errno()
}

/// # Safety
///
/// Called by the mm with a ring mapping.
unsafe extern "C" fn vma_may_split(_vma: *mut bindings::vm_area_struct, _addr: usize) -> i32 {
    // A ring mapping is all or nothing.
    EINVAL.to_errno()
}

static RING_VM_OPS: bindings::vm_operations_struct = bindings::vm_operations_struct {
    open: Some(vma_open),
    close: Some(vma_close),
    may_split: Some(vma_may_split),
    mremap: Some(vma_mremap),
    ..pin_init::zeroed()
};

/// The ring devices' file operations.
pub(crate) struct Ring;

#[vtable]
impl CharDevice for Ring {
    type Data = Arc<Blktap>;
    type Ptr = KBox<RingFile>;

    fn open(blktap: &Arc<Blktap>, minor: u32, _file: &File) -> Result<Self::Ptr> {
        // SAFETY: Reads the current task's tgid through the C helper.
        let pid = unsafe { ffi::blktap_current_tgid() };
        let tap = blktap.open_ring(minor, pid)?;
        // INVARIANT: `open_ring` set `ring_user` to `Open`. If the allocation fails, the `RingFile` is
        // dropped, which clears it again.
        KBox::new(
            RingFile {
                tap,
                blktap: blktap.clone(),
                mapped: core::sync::atomic::AtomicBool::new(false),
            },
            GFP_KERNEL,
        )
        .map_err(Into::into)
    }

    fn mmap(ring: &RingFile, _file: &File, vma: &VmaNew) -> Result {
        ring.mmap(vma)
    }

    fn poll(ring: &RingFile, file: &File, table: PollTable<'_>) -> u32 {
        ring.poll(file, table)
    }

    fn ioctl(ring: &RingFile, _file: &File, cmd: u32, arg: usize) -> Result<isize> {
        ring.ioctl(cmd, arg)
    }
}

#[kunit_tests(blktap_ring_ops)]
mod tests {
    use super::*;
    use kernel::transmute::AsBytes;

    const ALL: Features = Features {
        flush: true,
        fua: true,
        discard: true,
    };

    #[test]
    fn old_tapdisks_get_reads_and_writes_only() {
        let none = Features::default();
        assert_eq!(ring_op(Op::Read, false, none), Some(uapi::OP_READ));
        assert_eq!(ring_op(Op::Write, false, none), Some(uapi::OP_WRITE));
        assert_eq!(ring_op(Op::Write, true, none), Some(uapi::OP_WRITE));
        assert_eq!(ring_op(Op::Flush, false, none), None);
        assert_eq!(ring_op(Op::Discard, false, none), None);
        assert_eq!(ring_op(Op::Other(9), false, ALL), None);
    }

    #[test]
    fn negotiated_operations() {
        assert_eq!(ring_op(Op::Write, true, ALL), Some(uapi::OP_WRITE_FUA));
        assert_eq!(ring_op(Op::Flush, false, ALL), Some(uapi::OP_FLUSH));
        assert_eq!(ring_op(Op::Discard, false, ALL), Some(uapi::OP_DISCARD));
    }

    #[test]
    fn entries() -> Result {
        let e = ring_entry(uapi::OP_WRITE_FUA, 5, 100, 8192)?;
        assert_eq!(
            (e.operation, e.nr_segments, e.id, e.sector_number),
            (4, 2, 5, 100)
        );
        let e = ring_entry(uapi::OP_FLUSH, 3, 77, 0)?;
        assert_eq!(
            (e.operation, e.nr_segments, e.id, e.sector_number),
            (2, 0, 3, 0)
        );
        let e = ring_entry(uapi::OP_DISCARD, 31, 8, 1 << 20)?;
        assert_eq!((e.operation, e.nr_segments, e.id), (3, 0, 31));
        assert_eq!(&e.as_bytes()[24..32], &2048u64.to_ne_bytes());
        assert!(ring_entry(uapi::OP_DISCARD, 0, 0, 0).is_err());
        assert!(ring_entry(uapi::OP_DISCARD, 0, 0, 1000).is_err());
        assert!(ring_entry(
            uapi::OP_DISCARD,
            0,
            0,
            (uapi::DISCARD_MAX_SECTORS + 1) * 512
        )
        .is_err());
        assert!(ring_entry(uapi::OP_READ, 0, 0, 45 * 1024).is_err());
        assert!(ring_entry(9, 0, 0, 512).is_err());
        Ok(())
    }

    #[test]
    fn removal_refuses_new_requests_and_ends_a_pause() {
        let mut ring = RingState::new(120);
        ring.live = true;
        assert!(ring.start_removing().is_ok());
        assert!(!ring.accepts());
        ring.paused = true;
        ring.recovery = true;
        ring.end_removing();
        assert!(ring.accepts());
        assert!(!ring.paused && !ring.recovery);
    }

    #[test]
    fn requests_are_accepted_while_live_or_recovering() {
        let mut ring = RingState::new(120);
        assert!(!ring.accepts());
        ring.recovery = true;
        assert!(ring.accepts());
        ring.removing = true;
        assert!(!ring.accepts());
        ring.removing = false;
        ring.recovery = false;
        ring.live = true;
        assert!(ring.accepts());
    }
}
