// SPDX-License-Identifier: GPL-2.0

//! The ring devices, `/dev/xen/blktap-2/blktapN`, and the shared ring behind them.
//!
//! A tapdisk opens the ring of its tap exclusively (`EBUSY` for a second opener, `ENXIO` for an
//! unallocated minor), maps it once per open (1 + 32 x 11 pages at offset 0), creates the disk
//! with `CREATE_DEVICE`, polls for requests and answers with `RESPOND`. See
//! `Documentation/blktap2.rst` for the protocol and its memory-ordering argument.
//!
//! # Hostile peer
//!
//! Everything tapdisk writes into the ring is read once, into a local copy, and validated before
//! use: `rsp_prod` may not run ahead of the requests given out; each response must name a slot
//! (< 32) with a request pending, with the same operation. A bad response is refused with a log
//! line and never completes anything.
//!
//! # Lock order
//!
//! `Tap::inner` (mutex) before `Tap::ring` (spinlock, `blktap_ring`). The spinlock is never held
//! across page allocation, a user copy, an mm operation, or the end of a request.

use core::ptr;

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
        Request, //
    },
    chrdev::CharDevice,
    device,
    request::{
        self,
        BadResponse, //
    },
    tap::Tap,
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

    /// Reads `rsp_prod` once; the entries it covers are read after it.
    fn read_rsp_prod(&self) -> u32 {
        // SAFETY: `rsp_prod` is at offset 8 of the header.
        let v = unsafe { ptr::read_volatile(self.header_u32(8)) };
        smp_mb(Read);
        v
    }
}

/// A request given to tapdisk.
struct Pending {
    rq: Request,
    op: u8,
    bytes: u32,
}

/// The I/O state of a tap's ring, under `Tap::ring`.
///
/// # Invariants
///
/// - `slots[t]` holds the request with tag `t` between `queue_rq` and its response (or the
///   ring's death); requests are never kept when `live` is false.
/// - `rsp_cons <= published <= req_prod_pvt` in ring (wrapping) order, at most 32 apart.
pub(crate) struct RingState {
    /// The ring is mapped by a tapdisk that is alive.
    live: bool,
    /// Identity of the mapping process's mm (compared, never dereferenced); 0 when unmapped.
    mm: usize,
    /// The shared pages while mapped.
    pages: Option<Arc<RingPages>>,
    req_prod_pvt: u32,
    published: u32,
    polled: u32,
    rsp_cons: u32,
    slots: [Option<Pending>; uapi::RING_SIZE],
    /// The disk is being removed: new requests fail at once.
    removing: bool,
    /// Requests answered, refused responses, for `debug`.
    pub(crate) completed: u64,
    pub(crate) refused: u64,
}

impl RingState {
    pub(crate) fn new() -> Self {
        Self {
            live: false,
            mm: 0,
            pages: None,
            req_prod_pvt: 0,
            published: 0,
            polled: 0,
            rsp_cons: 0,
            slots: [const { None }; uapi::RING_SIZE],
            removing: false,
            completed: 0,
            refused: 0,
        }
    }

    /// Requests given to tapdisk and not yet answered.
    pub(crate) fn pending(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    pub(crate) fn is_mapped(&self) -> bool {
        self.mm != 0
    }

    /// Starts removing the disk: new requests fail at once from now on.
    ///
    /// # Errors
    ///
    /// `EBUSY` if requests are on the ring.
    pub(crate) fn start_removing(&mut self) -> Result {
        if self.pending() > 0 {
            return Err(EBUSY);
        }
        self.removing = true;
        Ok(())
    }

    /// The disk is gone; a new one may take requests.
    pub(crate) fn end_removing(&mut self) {
        self.removing = false;
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

    /// Takes every request out (the ring died); the caller ends them.
    fn take_all(&mut self, out: &mut [Option<Pending>; uapi::RING_SIZE]) {
        for (o, s) in out.iter_mut().zip(self.slots.iter_mut()) {
            *o = s.take();
        }
    }
}

impl Tap {
    /// Queues a request on the ring (from `queue_rq`). Ends it at once if the ring is not live
    /// or the request cannot go on the ring.
    pub(crate) fn queue(&self, pages: &RingPages, rq: Request, last: bool) {
        let op = match rq.op() {
            Op::Read => uapi::OP_READ,
            Op::Write => uapi::OP_WRITE,
            // Old tapdisks know READ and WRITE only; nothing else is ever sent.
            _ => return rq.end(Err(EOPNOTSUPP)),
        };
        let bytes = rq.bytes();
        let tag = rq.tag() as usize;
        let (seg, nr_segments) = match request::segments(bytes) {
            Ok(s) if tag < uapi::RING_SIZE => s,
            _ => return rq.end(Err(EIO)),
        };
        // The slot's pages belong to this request alone (its tag): no lock needed.
        if op == uapi::OP_WRITE
            && rq.copy_to_pages(pages.slot(tag), bytes as usize) != bytes as usize
        {
            return rq.end(Err(EIO));
        }
        let entry = uapi::Request {
            operation: op,
            nr_segments,
            id: tag as u64,
            sector_number: rq.sector(),
            seg,
            ..Default::default()
        };
        let (wake, refused) = {
            let mut ring = self.ring.lock();
            if !ring.live || ring.removing || ring.slots[tag].is_some() {
                (false, Some(rq))
            } else {
                pages.write_request(ring.req_prod_pvt, &entry);
                ring.req_prod_pvt = ring.req_prod_pvt.wrapping_add(1);
                ring.slots[tag] = Some(Pending { rq, op, bytes });
                (last && ring.publish(), None)
            }
        };
        if let Some(rq) = refused {
            return rq.end(Err(EIO));
        }
        if wake {
            self.poll.notify_all();
        }
    }

    /// Publishes a batch (from `commit_rqs`).
    pub(crate) fn commit(&self) {
        if self.ring.lock().publish() {
            self.poll.notify_all();
        }
    }

    /// `RESPOND`: consumes tapdisk's responses.
    fn respond(&self) -> Result {
        let mut done: [Option<(Pending, i16)>; uapi::RING_SIZE] = [const { None }; uapi::RING_SIZE];
        let mut bad = 0u32;
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
                let checked =
                    request::check_response(&rsp, |s| ring.slots[s].as_ref().map(|p| p.op));
                match checked {
                    Ok(slot) => {
                        if let Some(p) = ring.slots[slot].take() {
                            done[slot] = Some((p, rsp.status));
                        }
                    }
                    Err(why) => {
                        bad += 1;
                        ring.refused += 1;
                        if bad == 1 && worth_logging(ring.refused) {
                            report_bad(self.minor(), &rsp, why);
                        }
                    }
                }
            }
            ring.rsp_cons = ring.rsp_cons.wrapping_add(n);
            ring.completed += u64::from(n - bad);
            pages
        };
        for (slot, d) in done.iter_mut().enumerate() {
            let Some((p, status)) = d.take() else {
                continue;
            };
            let len = p.bytes as usize;
            let ok = status == uapi::RSP_OKAY
                && (p.op != uapi::OP_READ || p.rq.copy_from_pages(pages.slot(slot), len) == len);
            p.rq.end(if ok { Ok(()) } else { Err(EIO) });
        }
        if bad > 0 {
            return Err(EINVAL);
        }
        Ok(())
    }

    /// The ring's mapping went away (munmap or the process died): fails every pending request,
    /// and all new I/O until the disk is removed.
    fn ring_gone(&self) {
        let mut dead: [Option<Pending>; uapi::RING_SIZE] = [const { None }; uapi::RING_SIZE];
        {
            let mut ring = self.ring.lock();
            ring.live = false;
            ring.mm = 0;
            ring.pages = None;
            ring.take_all(&mut dead);
        }
        let mut failed = 0;
        for p in dead.iter_mut().filter_map(Option::take) {
            p.rq.end(Err(EIO));
            failed += 1;
        }
        if failed > 0 {
            pr_warn!(
                "blktap{}: ring unmapped; failed {failed} pending requests\n",
                self.minor()
            );
        }
        self.poll.notify_all();
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
/// `tap.inner.ring_open` is set for as long as this object exists.
pub(crate) struct RingFile {
    tap: Arc<Tap>,
    /// The driver, for the block major of the disk the ring creates.
    blktap: Arc<Blktap>,
    /// Mapped once already (a file is mapped at most once).
    mapped: core::sync::atomic::AtomicBool,
}

impl Drop for RingFile {
    fn drop(&mut self) {
        // The mapping (which holds the file) is gone: tear down what is left, outside locks.
        let disk = {
            let mut inner = self.tap.inner.lock();
            inner.ring_open = false;
            inner.ring_pid = None;
            inner.disk.take()
        };
        if disk.is_some() {
            pr_info!(
                "blktap{}: ring closed; removing its disk\n",
                self.tap.minor()
            );
        }
        drop(disk);
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
        {
            let mut ring = self.tap.ring.lock();
            // SAFETY: `vma` is being set up; its mm is compared only.
            ring.mm = unsafe { ffi::blktap_vma_mm(raw) } as usize;
            ring.live = true;
            ring.pages = Some(pages);
            ring.req_prod_pvt = 0;
            ring.published = 0;
            ring.polled = 0;
            ring.rsp_cons = 0;
        }
        drop(inner);
        Ok(())
    }

    fn poll(&self, file: &File, table: PollTable<'_>) -> u32 {
        table.register_wait(file, &self.tap.poll);
        let mut ring = self.tap.ring.lock();
        if !ring.is_mapped() {
            return POLLERR;
        }
        let msg = ring
            .pages
            .as_ref()
            // SAFETY: `msg` is a byte of the ring page.
            .map(|p| unsafe { ptr::read_volatile(p.ring_addr.add(uapi::RING_MSG_OFFSET)) })
            .unwrap_or(0);
        if ring.published != ring.polled || msg != 0 {
            ring.polled = ring.published;
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
            _ => return Err(ENOTTY),
        }
        Ok(0)
    }
}

/// # Safety
///
/// Called by the mm with a ring mapping set up by `RingFile::mmap`, once, as it goes away.
unsafe extern "C" fn vma_close(vma: *mut bindings::vm_area_struct) {
    // SAFETY: `mmap` stored an `Arc<Tap>` from `into_raw` as the private data; `close` runs once.
    let tap = unsafe { Arc::from_raw(ffi::blktap_vma_private(vma).cast::<Tap>().cast_const()) };
    tap.ring_gone();
}

/// # Safety
///
/// Called by the mm with a ring mapping.
unsafe extern "C" fn vma_may_split(_vma: *mut bindings::vm_area_struct, _addr: usize) -> i32 {
    // A ring mapping is all or nothing.
    EINVAL.to_errno()
}

static RING_VM_OPS: bindings::vm_operations_struct = bindings::vm_operations_struct {
    close: Some(vma_close),
    may_split: Some(vma_may_split),
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
        // INVARIANT: `open_ring` set `ring_open`. If the allocation fails, the `RingFile` is
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
