// SPDX-License-Identifier: GPL-2.0

//! A blk-mq disk served by a Rust driver, with what `kernel::block::mq` lacks in Linux 7.3:
//! queue limits on segments, read-only disks, a devtmpfs node name, and requests whose sector,
//! operation and data the driver reads and copies, and that it may end with an error.
//!
//! - [`TagSet`]: one hardware queue with a fixed number of tags;
//! - [`Operations`]: the driver's `queue_rq` (which may hand a request back when it has no
//!   room), `commit_rqs` and `timeout`;
//! - [`Request`]: an owned, started request; it ends exactly once, by [`Request::end`] or, if
//!   the driver drops it, with an I/O error; [`RequestRef`] names one the timeout handler sees;
//! - [`Disk`]: a gendisk on a tag set, with a write cache, FUA and discard when asked, a request
//!   timeout, and dispatch that can be stopped (quiesced); removed on drop.
//!
//! Field accesses go through small C helpers (`rust/helpers.c`) that follow the C compiler's
//! layout.
//!
//! C header: [`include/linux/blk-mq.h`](srctree/include/linux/blk-mq.h)

use core::{
    marker::PhantomData,
    mem::ManuallyDrop,
    ptr::NonNull, //
};

use kernel::{
    bindings,
    error::{
        to_result,
        VTABLE_DEFAULT_ERROR, //
    },
    ffi::{
        c_char,
        c_int, //
    },
    module::this_module,
    page::Page,
    prelude::*,
    str::CString,
    sync::Arc,
    types::{
        ForeignOwnable,
        Opaque, //
    },
};

mod ffi {
    use kernel::{
        bindings,
        ffi::{
            c_char,
            c_int,
            c_void, //
        },
    };

    // Only pointers cross this boundary; some pointees contain zero-sized C structs.
    #[allow(improper_ctypes, reason = "opaque pointers only")]
    extern "C" {
        pub(super) fn blktap_rq_pos(rq: *mut bindings::request) -> u64;
        pub(super) fn blktap_rq_bytes(rq: *mut bindings::request) -> u32;
        pub(super) fn blktap_rq_op(rq: *mut bindings::request) -> u32;
        pub(super) fn blktap_rq_tag(rq: *mut bindings::request) -> c_int;
        pub(super) fn blktap_rq_fua(rq: *mut bindings::request) -> bool;
        pub(super) fn blktap_rq_queuedata(rq: *mut bindings::request) -> *mut c_void;
        pub(super) fn blktap_rq_copy(
            rq: *mut bindings::request,
            pages: *const *mut bindings::page,
            npages: u32,
            skip: usize,
            len: usize,
            to_pages: bool,
        ) -> usize;
        pub(super) fn blktap_hctx_queuedata(hctx: *mut bindings::blk_mq_hw_ctx) -> *mut c_void;
        pub(super) fn blktap_disk_queuedata(disk: *mut bindings::gendisk) -> *mut c_void;
        pub(super) fn blktap_disk_openers(disk: *mut bindings::gendisk) -> c_int;
        pub(super) fn blktap_disk_quiesce(disk: *mut bindings::gendisk, quiesce: bool);
        pub(super) fn blktap_disk_set_timeout(disk: *mut bindings::gendisk, msecs: u32);
        pub(super) fn blktap_tag_set_alloc(
            set: *mut bindings::blk_mq_tag_set,
            ops: *const bindings::blk_mq_ops,
            depth: u32,
            flags: u32,
        ) -> c_int;
        pub(super) fn blktap_disk_limits_size() -> usize;
        pub(super) fn blktap_alloc_disk(
            set: *mut bindings::blk_mq_tag_set,
            queuedata: *mut c_void,
            fops: *const bindings::block_device_operations,
            major: c_int,
            first_minor: c_int,
            name: *const c_char,
            limits: *const super::CLimits,
        ) -> *mut bindings::gendisk;
    }
}

// From `include/linux/blk_types.h`.
const BLK_STS_OK: u8 = 0;
const BLK_STS_NOTSUPP: u8 = 1;
const BLK_STS_IOERR: u8 = 10;
const BLK_STS_RESOURCE: u8 = 9;

/// A request's operation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Op {
    /// `REQ_OP_READ`.
    Read,
    /// `REQ_OP_WRITE`.
    Write,
    /// `REQ_OP_FLUSH`.
    Flush,
    /// `REQ_OP_DISCARD`.
    Discard,
    /// Any other operation, by number.
    Other(u32),
}

impl Op {
    fn from_raw(op: u32) -> Self {
        match op {
            0 => Op::Read,
            1 => Op::Write,
            2 => Op::Flush,
            3 => Op::Discard,
            n => Op::Other(n),
        }
    }
}

/// A started request the driver owns.
///
/// # Invariants
///
/// `ptr` is a request of a [`TagSet`] that was started with `blk_mq_start_request()` and has not
/// been ended; it is ended exactly once, by [`Request::end`] or by [`Drop`].
pub struct Request {
    ptr: NonNull<bindings::request>,
}

// SAFETY: A started request may be ended from any context.
unsafe impl Send for Request {}

impl Request {
    /// The request's tag: unique among the tag set's requests in flight, below its depth.
    pub fn tag(&self) -> u32 {
        // SAFETY: By the type invariants, `ptr` is a live, started request.
        let tag = unsafe { ffi::blktap_rq_tag(self.ptr.as_ptr()) };
        // CAST: A started request's tag is non-negative.
        tag as u32
    }

    /// The first sector (512 bytes).
    pub fn sector(&self) -> u64 {
        // SAFETY: By the type invariants, `ptr` is a live, started request.
        unsafe { ffi::blktap_rq_pos(self.ptr.as_ptr()) }
    }

    /// The request's data length in bytes.
    pub fn bytes(&self) -> u32 {
        // SAFETY: By the type invariants, `ptr` is a live, started request.
        unsafe { ffi::blktap_rq_bytes(self.ptr.as_ptr()) }
    }

    /// The request's operation.
    pub fn op(&self) -> Op {
        // SAFETY: By the type invariants, `ptr` is a live, started request.
        Op::from_raw(unsafe { ffi::blktap_rq_op(self.ptr.as_ptr()) })
    }

    /// A write that must be durable when it ends (`REQ_FUA`). Only set on disks made with
    /// [`DiskParams::fua`].
    pub fn is_fua(&self) -> bool {
        // SAFETY: By the type invariants, `ptr` is a live, started request.
        unsafe { ffi::blktap_rq_fua(self.ptr.as_ptr()) }
    }

    /// Whether `other` names this request.
    pub fn is(&self, other: &RequestRef<'_>) -> bool {
        self.ptr == other.ptr
    }

    /// Copies the first `len` bytes of the request's data into `pages`, as one linear buffer.
    /// Returns the bytes copied: less than `len` if the request or the pages are shorter.
    pub fn copy_to_pages(&self, pages: &[Page], len: usize) -> usize {
        self.copy(pages, len, true)
    }

    /// Copies `len` bytes from `pages`, as one linear buffer, into the request's data.
    /// Returns the bytes copied: less than `len` if the request or the pages are shorter.
    pub fn copy_from_pages(&self, pages: &[Page], len: usize) -> usize {
        self.copy(pages, len, false)
    }

    fn copy(&self, pages: &[Page], len: usize, to_pages: bool) -> usize {
        /// Pages handed to the helper at a time (their pointers are on the stack).
        const CHUNK: usize = 16;
        let mut done = 0;
        for chunk in pages.chunks(CHUNK) {
            if done == len {
                break;
            }
            let mut raw = [core::ptr::null_mut::<bindings::page>(); CHUNK];
            for (slot, page) in raw.iter_mut().zip(chunk) {
                *slot = page.as_ptr();
            }
            let want = (len - done).min(chunk.len() * kernel::page::PAGE_SIZE);
            // SAFETY: By the type invariants the request is live; `raw[..chunk.len()]` are valid
            // pages that `pages` keeps alive during the call.
            // CAST: `chunk.len() <= 16`.
            let n = unsafe {
                ffi::blktap_rq_copy(
                    self.ptr.as_ptr(),
                    raw.as_ptr(),
                    chunk.len() as u32,
                    done,
                    want,
                    to_pages,
                )
            };
            done += n;
            if n < want {
                break;
            }
        }
        done
    }

    /// Ends the request: success, or an error (`EOPNOTSUPP` is reported as not supported, any
    /// other as an I/O error).
    pub fn end(self, result: Result) {
        let status = match result {
            Ok(()) => BLK_STS_OK,
            Err(e) if e == EOPNOTSUPP => BLK_STS_NOTSUPP,
            Err(_) => BLK_STS_IOERR,
        };
        let this = ManuallyDrop::new(self);
        // SAFETY: By the type invariants the request is started and not ended; `this` is not
        // dropped, so this is the only end.
        unsafe { bindings::blk_mq_end_request(this.ptr.as_ptr(), status) };
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        // SAFETY: By the type invariants the request is started and not ended.
        unsafe { bindings::blk_mq_end_request(self.ptr.as_ptr(), BLK_STS_IOERR) };
    }
}

/// A request the driver owns, as blk-mq names it to the timeout handler: compared with the
/// driver's [`Request`]s ([`Request::is`]), never used otherwise.
pub struct RequestRef<'a> {
    ptr: NonNull<bindings::request>,
    _p: PhantomData<&'a ()>,
}

/// What `queue_rq` did with a request.
pub enum Queued {
    /// The driver took the request, and ends it (or has ended it).
    Taken,
    /// The driver has no room for it now: blk-mq keeps it and dispatches it again later
    /// (`BLK_STS_RESOURCE`).
    Busy(Request),
}

/// What the timeout handler did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TimeoutAction {
    /// The driver has ended the request, or is ending it (`BLK_EH_DONE`).
    Done,
    /// Wait another timeout (`BLK_EH_RESET_TIMER`).
    ResetTimer,
}

/// What a blk-mq driver implements.
#[vtable]
pub trait Operations: Sized {
    /// Data of each disk, kept as the queue's `queuedata`.
    type QueueData: ForeignOwnable + Send + Sync;

    /// Takes a started request. The driver keeps it until it ends it, ends it at once, or hands
    /// it back ([`Queued::Busy`]). `last` is false when more requests follow in the same batch.
    fn queue_rq(
        data: <Self::QueueData as ForeignOwnable>::Borrowed<'_>,
        rq: Request,
        last: bool,
    ) -> Queued;

    /// A request the driver took has not ended within the disk's timeout
    /// ([`Disk::set_timeout_ms`]). Runs in process context.
    fn timeout(
        _data: <Self::QueueData as ForeignOwnable>::Borrowed<'_>,
        _rq: RequestRef<'_>,
    ) -> TimeoutAction {
        build_error!(VTABLE_DEFAULT_ERROR)
    }

    /// Ends a batch whose last request was queued with `last == false`.
    fn commit_rqs(data: <Self::QueueData as ForeignOwnable>::Borrowed<'_>);

    /// The devtmpfs node of the disk, relative to `/dev`, and its mode.
    fn devnode(_data: <Self::QueueData as ForeignOwnable>::Borrowed<'_>) -> Option<(CString, u16)> {
        build_error!(VTABLE_DEFAULT_ERROR)
    }
}

/// A tag set with one hardware queue.
///
/// # Invariants
///
/// `set` was allocated with `blk_mq_alloc_tag_set()` for `T`'s operations, and is freed exactly
/// once, in [`Drop`], after every disk on it is gone (each [`Disk`] holds an `Arc` of it).
#[pin_data(PinnedDrop)]
pub struct TagSet<T: Operations> {
    #[pin]
    set: Opaque<bindings::blk_mq_tag_set>,
    _t: PhantomData<T>,
}

// SAFETY: The C tag set may be used and freed from any thread.
unsafe impl<T: Operations> Send for TagSet<T> {}
// SAFETY: The C tag set synchronises itself.
unsafe impl<T: Operations> Sync for TagSet<T> {}

impl<T: Operations> TagSet<T> {
    /// `queue_rq` may sleep (`BLK_MQ_F_BLOCKING`).
    pub const BLOCKING: u32 = bindings::BLK_MQ_F_BLOCKING;
    /// Disks on the set start without an I/O scheduler (`BLK_MQ_F_NO_SCHED_BY_DEFAULT`).
    pub const NO_SCHED_BY_DEFAULT: u32 = bindings::BLK_MQ_F_NO_SCHED_BY_DEFAULT;

    /// A tag set of `depth` tags, with `flags` from the constants above.
    pub fn new(depth: u32, flags: u32) -> impl PinInit<Self, Error> {
        let flags = flags & (Self::BLOCKING | Self::NO_SCHED_BY_DEFAULT);
        try_pin_init!(Self {
            set <- Opaque::try_ffi_init(move |slot: *mut bindings::blk_mq_tag_set| {
                // SAFETY: `slot` is valid for writes; the helper initialises all of it. The ops
                // table is static.
                // INVARIANT: On success the tag set is allocated.
                to_result(unsafe {
                    ffi::blktap_tag_set_alloc(slot, OpsVTable::<T>::build(), depth, flags)
                })
            }),
            _t: PhantomData,
        })
    }
}

#[pinned_drop]
impl<T: Operations> PinnedDrop for TagSet<T> {
    fn drop(self: Pin<&mut Self>) {
        // SAFETY: By the type invariants the tag set is allocated and no disk uses it.
        unsafe { bindings::blk_mq_free_tag_set(self.set.get()) };
    }
}

/// `struct blktap_disk_limits` of `rust/helpers.h`; the helper's size is checked against it.
#[repr(C)]
#[derive(Clone, Copy)]
struct CLimits {
    capacity: u64,
    logical_block_size: u32,
    physical_block_size: u32,
    max_hw_sectors: u32,
    max_discard_sectors: u32,
    max_segments: u16,
    read_only: bool,
    write_cache: bool,
    fua: bool,
}

/// The size and queue limits of a [`Disk`], built step by step and checked by
/// [`QueueLimits::validate`] before a disk is made with them.
///
/// Every segment is at most a page and never crosses one.
#[derive(Clone, Copy)]
pub struct QueueLimits {
    c: CLimits,
}

/// The largest block size the block layer takes (`BLK_MAX_BLOCK_SIZE`).
pub const MAX_BLOCK_SIZE: u32 = 64 * 1024;

impl QueueLimits {
    /// A disk of `capacity` 512-byte sectors with `logical_block_size`-byte blocks (also the
    /// physical block size until set), requests of at most a page in one segment, writable,
    /// without write cache or discard.
    pub fn new(capacity: u64, logical_block_size: u32) -> Self {
        Self {
            c: CLimits {
                capacity,
                logical_block_size,
                physical_block_size: logical_block_size,
                // CAST: A page is 4096 bytes here: 8 sectors.
                max_hw_sectors: (kernel::page::PAGE_SIZE / 512) as u32,
                max_discard_sectors: 0,
                max_segments: 1,
                read_only: false,
                write_cache: false,
                fua: false,
            },
        }
    }

    /// The physical block size, in bytes.
    pub fn physical_block_size(mut self, bytes: u32) -> Self {
        self.c.physical_block_size = bytes;
        self
    }

    /// The largest request, in 512-byte sectors.
    pub fn max_hw_sectors(mut self, sectors: u32) -> Self {
        self.c.max_hw_sectors = sectors;
        self
    }

    /// The most segments (each at most a page, never crossing one) per request.
    pub fn max_segments(mut self, segments: u16) -> Self {
        self.c.max_segments = segments;
        self
    }

    /// Writes are refused.
    pub fn read_only(mut self) -> Self {
        self.c.read_only = true;
        self
    }

    /// The device has a volatile write cache: the driver gets `REQ_OP_FLUSH` requests, and with
    /// `fua` writes with `REQ_FUA` ([`Request::is_fua`]).
    pub fn write_cache(mut self, fua: bool) -> Self {
        self.c.write_cache = true;
        self.c.fua = fua;
        self
    }

    /// Discards of at most `sectors` 512-byte sectors, at the physical block's granularity.
    pub fn max_discard_sectors(mut self, sectors: u32) -> Self {
        self.c.max_discard_sectors = sectors;
        self
    }

    /// Whether the disk has a write cache.
    pub fn has_write_cache(&self) -> bool {
        self.c.write_cache
    }

    /// Whether the disk takes FUA writes.
    pub fn has_fua(&self) -> bool {
        self.c.write_cache && self.c.fua
    }

    /// The largest request, in 512-byte sectors.
    pub fn request_sectors(&self) -> u32 {
        self.c.max_hw_sectors
    }

    /// The largest discard, in sectors (0: none).
    pub fn discard_sectors(&self) -> u32 {
        self.c.max_discard_sectors
    }

    /// Checks the limits as the block layer would.
    ///
    /// # Errors
    ///
    /// `EINVAL` for block sizes that are not powers of two in 512..=64 KiB, a capacity whose
    /// byte size does not fit `loff_t`, requests smaller than a page, or no segment.
    pub fn validate(self) -> Result<Self> {
        let c = &self.c;
        let block = |b: u32| b.is_power_of_two() && (512..=MAX_BLOCK_SIZE).contains(&b);
        // CAST: A page is 4096 bytes here.
        let page_sectors = (kernel::page::PAGE_SIZE / 512) as u32;
        if !block(c.logical_block_size)
            || !block(c.physical_block_size)
            || c.capacity > i64::MAX as u64 / 512
            || c.max_hw_sectors < page_sectors
            || c.max_segments == 0
        {
            return Err(EINVAL);
        }
        Ok(self)
    }
}

/// How to make a [`Disk`].
pub struct DiskParams<'a> {
    /// The disk's name (e.g. `tda`).
    pub name: &'a CStr,
    /// The block major.
    pub major: u32,
    /// The disk's minor.
    pub minor: u32,
    /// Its size and queue limits.
    pub limits: QueueLimits,
}

/// A disk on a [`TagSet`], in the VFS until dropped.
///
/// # Invariants
///
/// `disk` was allocated on `tagset` with `queuedata` from `T::QueueData::into_foreign()` and
/// added with `device_add_disk()`; [`Drop`] deletes it, puts it and drops the queue data, once.
/// Its queue is quiesced exactly when `quiesced` is true.
pub struct Disk<T: Operations> {
    disk: NonNull<bindings::gendisk>,
    tagset: Arc<TagSet<T>>,
    quiesced: bool,
}

// SAFETY: The gendisk may be removed from any thread; `T::QueueData` is `Send`.
unsafe impl<T: Operations> Send for Disk<T> {}
// SAFETY: `&self` methods only read through C helpers that are safe concurrently.
unsafe impl<T: Operations> Sync for Disk<T> {}

impl<T: Operations> Disk<T> {
    /// Makes and adds a disk.
    ///
    /// # Errors
    ///
    /// `EINVAL` for limits the block layer refuses ([`QueueLimits::validate`]), `ENOMEM`, or
    /// what `add_disk` returns.
    pub fn new(
        tagset: Arc<TagSet<T>>,
        params: &DiskParams<'_>,
        data: T::QueueData,
    ) -> Result<Self> {
        let limits = params.limits.validate()?;
        // SAFETY: The helper only reports a size.
        if unsafe { ffi::blktap_disk_limits_size() } != size_of::<CLimits>() {
            return Err(EINVAL);
        }
        let data = data.into_foreign();
        // SAFETY: The tag set is allocated; the fops table is static; `name` is copied; the
        // limits are read during the call (their layout matches, checked above).
        let disk = unsafe {
            ffi::blktap_alloc_disk(
                tagset.set.get(),
                data.cast(),
                &DiskVTable::<T>::FOPS,
                // CAST: Major and minor numbers fit `int`.
                params.major as c_int,
                params.minor as c_int,
                params.name.as_char_ptr(),
                &limits.c,
            )
        };
        let disk = match kernel::error::from_err_ptr(disk) {
            Ok(d) => d,
            Err(e) => {
                // SAFETY: `data` came from `into_foreign()` above and the disk does not hold it.
                drop(unsafe { T::QueueData::from_foreign(data) });
                return Err(e);
            }
        };
        // SAFETY: `disk` was just allocated and is not added yet.
        let ret = unsafe {
            bindings::device_add_disk(core::ptr::null_mut(), disk, core::ptr::null_mut())
        };
        if let Err(e) = to_result(ret) {
            // SAFETY: The disk was never added; putting it frees it. Then `data` is ours again.
            unsafe { bindings::put_disk(disk) };
            // SAFETY: `data` came from `into_foreign()` above.
            drop(unsafe { T::QueueData::from_foreign(data) });
            return Err(e);
        }
        // INVARIANT: The disk is allocated with `data` and added.
        Ok(Self {
            // SAFETY: `from_err_ptr` returned a valid pointer.
            disk: unsafe { NonNull::new_unchecked(disk) },
            tagset,
            quiesced: false,
        })
    }

    /// Stops (`true`) or restarts (`false`) dispatching requests to the driver. While stopped,
    /// new requests wait in the block layer; those the driver holds are unaffected. Stopping
    /// waits for `queue_rq` calls in progress to return, so it may sleep.
    pub fn set_quiesced(&mut self, quiesced: bool) {
        if self.quiesced == quiesced {
            return;
        }
        // SAFETY: By the type invariants the disk is live, and its queue is quiesced exactly
        // when `self.quiesced`, so calls balance.
        unsafe { ffi::blktap_disk_quiesce(self.disk.as_ptr(), quiesced) };
        // INVARIANT: The queue's state changed with the call above.
        self.quiesced = quiesced;
    }

    /// Whether dispatching is stopped.
    pub fn is_quiesced(&self) -> bool {
        self.quiesced
    }

    /// Sets how long a request the driver took may run before [`Operations::timeout`].
    pub fn set_timeout_ms(&self, msecs: u32) {
        // SAFETY: By the type invariants the disk is live.
        unsafe { ffi::blktap_disk_set_timeout(self.disk.as_ptr(), msecs) };
    }

    /// How many times the block device is open.
    pub fn openers(&self) -> u32 {
        // SAFETY: By the type invariants the disk is live.
        let n = unsafe { ffi::blktap_disk_openers(self.disk.as_ptr()) };
        // CAST: An open count is non-negative.
        n.max(0) as u32
    }

    /// The tag set the disk is on.
    pub fn tagset(&self) -> &Arc<TagSet<T>> {
        &self.tagset
    }
}

impl<T: Operations> Drop for Disk<T> {
    fn drop(&mut self) {
        // Requests waiting on a stopped queue would keep the deletion below waiting forever.
        self.set_quiesced(false);
        let disk = self.disk.as_ptr();
        // SAFETY: By the type invariants the disk is live, with our queue data.
        let data = unsafe { ffi::blktap_disk_queuedata(disk) };
        // SAFETY: By the type invariants the disk was added; this removes it, failing further
        // I/O and waiting for requests in flight to end.
        unsafe { bindings::del_gendisk(disk) };
        // SAFETY: `del_gendisk()` was called; this drops our reference.
        unsafe { bindings::put_disk(disk) };
        // SAFETY: `data` came from `into_foreign()` in `new`, and no callback can run any more.
        drop(unsafe { T::QueueData::from_foreign(data.cast()) });
    }
}

struct OpsVTable<T: Operations>(PhantomData<T>);

impl<T: Operations> OpsVTable<T> {
    /// # Safety
    ///
    /// Called by blk-mq with a hardware context of a disk made by [`Disk::new`] and a request
    /// it hands over.
    unsafe extern "C" fn queue_rq(
        hctx: *mut bindings::blk_mq_hw_ctx,
        bd: *const bindings::blk_mq_queue_data,
    ) -> bindings::blk_status_t {
        // SAFETY: `bd` is valid for the call.
        let (rq, last) = unsafe { ((*bd).rq, (*bd).last) };
        // SAFETY: `rq` is a request handed to the driver; starting it makes it ours.
        unsafe { bindings::blk_mq_start_request(rq) };
        // SAFETY: The queue data was set by `Disk::new` and lives until the disk is deleted,
        // which waits for `queue_rq` calls to return.
        let data = unsafe { T::QueueData::borrow(ffi::blktap_hctx_queuedata(hctx).cast()) };
        // SAFETY: blk-mq passes a valid, non-null request.
        let ptr = unsafe { NonNull::new_unchecked(rq) };
        // INVARIANT: The request is started and not ended.
        let rq = Request { ptr };
        match T::queue_rq(data, rq, last) {
            Queued::Taken => BLK_STS_OK,
            Queued::Busy(rq) => {
                // blk-mq takes the request back, started, and requeues it; it must not end.
                let _ = ManuallyDrop::new(rq);
                BLK_STS_RESOURCE
            }
        }
    }

    /// # Safety
    ///
    /// Called by blk-mq with a request of a disk made by [`Disk::new`] that the driver took.
    unsafe extern "C" fn timeout(rq: *mut bindings::request) -> bindings::blk_eh_timer_return {
        // SAFETY: The queue data lives until the disk is deleted, which waits for timeout
        // handlers.
        let data = unsafe { T::QueueData::borrow(ffi::blktap_rq_queuedata(rq).cast()) };
        let rq = RequestRef {
            // SAFETY: blk-mq passes a valid, non-null request.
            ptr: unsafe { NonNull::new_unchecked(rq) },
            _p: PhantomData,
        };
        match T::timeout(data, rq) {
            TimeoutAction::Done => bindings::blk_eh_timer_return_BLK_EH_DONE,
            TimeoutAction::ResetTimer => bindings::blk_eh_timer_return_BLK_EH_RESET_TIMER,
        }
    }

    /// # Safety
    ///
    /// Called by blk-mq with a hardware context of a disk made by [`Disk::new`].
    unsafe extern "C" fn commit_rqs(hctx: *mut bindings::blk_mq_hw_ctx) {
        // SAFETY: As in `queue_rq`.
        let data = unsafe { T::QueueData::borrow(ffi::blktap_hctx_queuedata(hctx).cast()) };
        T::commit_rqs(data);
    }

    const OPS: bindings::blk_mq_ops = bindings::blk_mq_ops {
        queue_rq: Some(Self::queue_rq),
        commit_rqs: Some(Self::commit_rqs),
        timeout: if T::HAS_TIMEOUT {
            Some(Self::timeout)
        } else {
            None
        },
        ..pin_init::zeroed()
    };

    const fn build() -> &'static bindings::blk_mq_ops {
        &Self::OPS
    }
}

struct DiskVTable<T: Operations>(PhantomData<T>);

impl<T: Operations> DiskVTable<T> {
    /// # Safety
    ///
    /// Called by the driver core with a disk made by [`Disk::new`].
    unsafe extern "C" fn devnode(disk: *mut bindings::gendisk, mode: *mut u16) -> *mut c_char {
        // SAFETY: The disk is live during the call, with our queue data.
        let data = unsafe { T::QueueData::borrow(ffi::blktap_disk_queuedata(disk).cast()) };
        let Some((path, m)) = T::devnode(data) else {
            return core::ptr::null_mut();
        };
        if !mode.is_null() {
            // SAFETY: `mode` is valid for writes when not null.
            unsafe { *mode = m };
        }
        // SAFETY: `path` is a valid C string; the driver core frees the copy with `kfree()`.
        unsafe { bindings::kstrdup(path.as_char_ptr(), bindings::GFP_KERNEL) }
    }

    const FOPS: bindings::block_device_operations = bindings::block_device_operations {
        devnode: if T::HAS_DEVNODE {
            Some(Self::devnode)
        } else {
            None
        },
        owner: this_module::<T::OwnerModule>().as_ptr(),
        ..pin_init::zeroed()
    };
}
