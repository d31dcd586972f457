//! The shared ring's memory: what it is made of, and safe, bounds-checked access to it.
//!
//! The memory is shared with the kernel, which may change it at any time, so nothing here hands
//! out Rust references into it: indices are atomics, entries are copied in and out with volatile
//! accesses, and data pages are raw pointers for I/O.

use std::marker::PhantomData;
use std::mem::{offset_of, size_of};
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};

use blktap_abi::{self as abi, blktap_request, blktap_response, blktap_ring_entry, blktap_sring};

use crate::Result;

/// Page size the ring layout is defined with.
pub const PAGE_SIZE: usize = 4096;
/// Size of the standard ring mapping: the ring page, then 32 x 11 data pages.
pub const MAP_SIZE: usize = abi::MMAP_PAGES * PAGE_SIZE;
/// Data pages per slot of the standard mapping (and the most pages of a request without
/// `DEVICE_LARGE_REQUESTS`).
pub const STANDARD_PAGES_PER_SLOT: usize = abi::SEGMENT_MAX;
/// The most data pages per slot a mapping may have (with `DEVICE_LARGE_REQUESTS`).
pub const MAX_PAGES_PER_SLOT: usize = abi::SEGMENT_MAX_LARGE;
/// Size of one ring entry (a request or a response).
pub const ENTRY_SIZE: usize = size_of::<blktap_ring_entry>();
/// Value of the header's `msg` byte by which the kernel asks tapdisk to shut the tap down.
pub const RING_MESSAGE_CLOSE: u8 = abi::RING_MESSAGE_CLOSE;
/// Value of the `msg` byte by which the kernel asks tapdisk to pause the tap.
pub const RING_MESSAGE_PAUSE: u8 = abi::RING_MESSAGE_PAUSE;
/// Value of the `msg` byte by which the kernel asks tapdisk to resume the tap.
pub const RING_MESSAGE_RESUME: u8 = abi::RING_MESSAGE_RESUME;

const REQ_PROD: usize = offset_of!(blktap_sring, req_prod);
const REQ_EVENT: usize = offset_of!(blktap_sring, req_event);
const RSP_PROD: usize = offset_of!(blktap_sring, rsp_prod);
const MSG: usize = offset_of!(blktap_sring, msg);
const STAGED: usize = offset_of!(blktap_sring, staged);
const ENTRIES: usize = offset_of!(blktap_sring, ring);

// The layout facts the code below relies on.
const _: () = assert!(ENTRIES == 64 && ENTRY_SIZE == 112);
const _: () = assert!(ENTRIES + abi::RING_SIZE * ENTRY_SIZE <= PAGE_SIZE);
const _: () = assert!(abi::RING_SIZE.is_power_of_two());
const _: () = assert!(ENTRY_SIZE & 7 == 0 && ENTRIES & 7 == 0);
const _: () = assert!(map_size(STANDARD_PAGES_PER_SLOT) == MAP_SIZE);
const _: () = assert!(MAX_PAGES_PER_SLOT <= u8::MAX as usize);

/// Whether a mapping may have `pages` data pages per slot: 11 (the standard mapping) up to
/// [`MAX_PAGES_PER_SLOT`] (with `DEVICE_LARGE_REQUESTS`).
pub const fn valid_pages_per_slot(pages: usize) -> bool {
    pages >= STANDARD_PAGES_PER_SLOT && pages <= MAX_PAGES_PER_SLOT
}

/// Size in bytes of a ring mapping with `pages_per_slot` data pages per slot: the ring page,
/// then 32 x `pages_per_slot` data pages.
pub const fn map_size(pages_per_slot: usize) -> usize {
    (1 + abi::RING_SIZE * pages_per_slot) * PAGE_SIZE
}

/// Index in the mapping of data page `page` of slot `slot`, for a mapping with
/// `pages_per_slot` pages per slot (`1 + pages_per_slot * slot + page`), or `None` if the slot
/// or the page is out of range.
pub const fn data_page_index(pages_per_slot: usize, slot: usize, page: usize) -> Option<usize> {
    if slot >= abi::RING_SIZE || page >= pages_per_slot {
        return None;
    }
    Some(1 + pages_per_slot * slot + page)
}

/// Memory laid out like a blktap ring mapping ([`map_size`]`(pages_per_slot())` bytes: ring
/// page, then data pages).
///
/// # Safety
///
/// Implementors guarantee that [`RingMemory::pages_per_slot`] is in 11..=128 (see
/// [`valid_pages_per_slot`]), that [`RingMemory::base`] is page-aligned and valid for reads and
/// writes of [`map_size`]`(pages_per_slot())` bytes for as long as the implementor lives (an
/// implementor that can be mapped anew documents when base and size may change, and makes that
/// an `unsafe` operation), and that no Rust reference to that memory exists (only raw pointers
/// and atomics reach it).
pub unsafe trait RingMemory {
    /// The first byte of the ring page.
    fn base(&self) -> NonNull<u8>;

    /// Data pages per slot of the mapping: 11 for the standard mapping, up to 128 for one made
    /// for `DEVICE_LARGE_REQUESTS`.
    fn pages_per_slot(&self) -> usize {
        STANDARD_PAGES_PER_SLOT
    }

    /// Tells the other side that new responses were published (the `RESPOND` ioctl on a device).
    fn kick(&self) -> Result<()>;
}

// SAFETY: `Rc` hands out the same memory as the `M` it owns, which lives as long as the `Rc`.
unsafe impl<M: RingMemory + ?Sized> RingMemory for Rc<M> {
    fn base(&self) -> NonNull<u8> {
        (**self).base()
    }

    fn pages_per_slot(&self) -> usize {
        (**self).pages_per_slot()
    }

    fn kick(&self) -> Result<()> {
        (**self).kick()
    }
}

/// A view of a ring's memory, borrowed from its owner, with bounds-checked accessors.
#[derive(Clone, Copy)]
pub struct SharedRing<'a> {
    base: NonNull<u8>,
    pages_per_slot: usize,
    _memory: PhantomData<&'a ()>,
}

impl<'a> SharedRing<'a> {
    /// A view of `memory`.
    pub fn new<M: RingMemory + ?Sized>(memory: &'a M) -> Self {
        Self {
            base: memory.base(),
            pages_per_slot: memory.pages_per_slot(),
            _memory: PhantomData,
        }
    }

    /// Data pages per slot of the mapping (see [`RingMemory::pages_per_slot`]).
    pub fn pages_per_slot(&self) -> usize {
        self.pages_per_slot
    }

    fn u32_at(&self, offset: usize) -> &'a AtomicU32 {
        debug_assert!(offset & 3 == 0 && offset < ENTRIES);
        // SAFETY: `offset` is one of the header's u32 fields: 4-aligned (the base is page-aligned)
        // and inside the mapping, which outlives `'a` (the `RingMemory` contract). The kernel
        // accesses these fields atomically as well.
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(offset).cast()) }
    }

    /// The kernel's request producer index, loaded with acquire semantics: every request entry
    /// before it is visible once this returns.
    pub fn req_prod(&self) -> u32 {
        self.u32_at(REQ_PROD).load(Ordering::Acquire)
    }

    /// Publishes requests up to `index` (release), as the kernel does. For simulations and tests.
    pub fn set_req_prod(&self, index: u32) {
        self.u32_at(REQ_PROD).store(index, Ordering::Release);
    }

    /// The response producer index, as last published.
    pub fn rsp_prod(&self) -> u32 {
        self.u32_at(RSP_PROD).load(Ordering::Acquire)
    }

    /// Publishes responses up to `index` (release): every response entry written before this
    /// call is visible to the kernel before the index is.
    pub fn set_rsp_prod(&self, index: u32) {
        self.u32_at(RSP_PROD).store(index, Ordering::Release);
    }

    /// The writes the kernel has staged (disks created with `DEVICE_STAGED_WRITES`): they reach
    /// the ring at the next `RESPOND` or poll of the ring.
    pub fn staged(&self) -> u32 {
        self.u32_at(STAGED).load(Ordering::Acquire)
    }

    /// Asks the kernel to signal the ring's poll queue once `req_prod` reaches `index` (a disk
    /// created with `DEVICE_REQ_EVENT`): set to `req_cons + 1` before sleeping, then
    /// [`fence`](std::sync::atomic::fence) and look at the ring once more.
    pub fn set_req_event(&self, index: u32) {
        self.u32_at(REQ_EVENT).store(index, Ordering::Release);
    }

    /// The header's `req_event`, as the kernel reads it. For simulations and tests.
    pub fn req_event(&self) -> u32 {
        self.u32_at(REQ_EVENT).load(Ordering::Acquire)
    }

    /// Sets the staged count, as the kernel does. For simulations and tests.
    pub fn set_staged(&self, n: u32) {
        self.u32_at(STAGED).store(n, Ordering::Release);
    }

    fn msg_byte(&self) -> &'a AtomicU8 {
        // SAFETY: `MSG` is a byte of the header, inside the mapping, which outlives `'a`.
        unsafe { AtomicU8::from_ptr(self.base.as_ptr().add(MSG)) }
    }

    /// The header's message byte (see [`RING_MESSAGE_CLOSE`]).
    pub fn msg(&self) -> u8 {
        self.msg_byte().load(Ordering::Acquire)
    }

    /// Sets the message byte, as the kernel does. For simulations and tests.
    pub fn set_msg(&self, msg: u8) {
        self.msg_byte().store(msg, Ordering::Release);
    }

    /// Pointer to the entry at free-running `index` (its slot is `index % 32`).
    fn entry(&self, index: u32) -> *mut u8 {
        let slot = index as usize % abi::RING_SIZE;
        // SAFETY: slot < 32, so the entry lies inside the ring page (checked by the assertions
        // at the top of this file).
        unsafe { self.base.as_ptr().add(ENTRIES + slot * ENTRY_SIZE) }
    }

    /// Copies the request at `index` out of the ring, once. The copy may hold anything: validate
    /// it before use.
    pub fn read_request(&self, index: u32) -> blktap_request {
        // SAFETY: the entry is inside the mapping and 8-aligned; every bit pattern is a valid
        // `blktap_request` (integers only). Volatile: the kernel may write it concurrently, and
        // the copy must be made exactly once.
        unsafe { self.entry(index).cast::<blktap_request>().read_volatile() }
    }

    /// Writes a request at `index`, as the kernel does. For simulations and tests.
    pub fn write_request(&self, index: u32, req: &blktap_request) {
        // SAFETY: the entry is inside the mapping and 8-aligned, written only through raw pointers.
        unsafe {
            self.entry(index)
                .cast::<blktap_request>()
                .write_volatile(*req)
        }
    }

    /// Copies the response at `index` out of the ring. For simulations and tests.
    pub fn read_response(&self, index: u32) -> blktap_response {
        // SAFETY: as `read_request`; responses are integers only as well.
        unsafe { self.entry(index).cast::<blktap_response>().read_volatile() }
    }

    /// Writes the response at `index`. Publish it with [`SharedRing::set_rsp_prod`] afterwards.
    pub fn write_response(&self, index: u32, rsp: &blktap_response) {
        // SAFETY: the entry is inside the mapping and 8-aligned, written only through raw pointers.
        unsafe {
            self.entry(index)
                .cast::<blktap_response>()
                .write_volatile(*rsp)
        }
    }

    /// Zeros the ring page (header and entries), as the kernel does when a recovering tapdisk
    /// maps the ring. For simulations and tests.
    pub fn clear(&self) {
        for i in 0..PAGE_SIZE {
            // SAFETY: i < PAGE_SIZE, inside the ring page.
            unsafe { self.base.as_ptr().add(i).write_volatile(0) }
        }
    }

    /// Overwrites the whole entry at `index` with `bytes` (for fault injection).
    pub fn write_entry_bytes(&self, index: u32, bytes: &[u8; ENTRY_SIZE]) {
        let entry = self.entry(index);
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: i < ENTRY_SIZE, so the byte is inside the entry.
            unsafe { entry.add(i).write_volatile(*b) }
        }
    }

    /// Data page `seg` of slot `slot` (mapping page `1 + pages_per_slot * slot + seg`), or
    /// `None` if either is out of range.
    pub fn data_page(&self, slot: usize, seg: usize) -> Option<NonNull<u8>> {
        let page = data_page_index(self.pages_per_slot, slot, seg)?;
        debug_assert!((page + 1) * PAGE_SIZE <= map_size(self.pages_per_slot));
        // SAFETY: slot < 32 and seg < pages_per_slot, so page < 1 + 32 * pages_per_slot: the
        // page lies inside the mapping of map_size(pages_per_slot) bytes (the `RingMemory`
        // contract).
        NonNull::new(unsafe { self.base.as_ptr().add(page * PAGE_SIZE) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::AnonRing;

    #[test]
    fn indices_and_entries_land_at_the_abi_offsets() {
        let mem = AnonRing::new().unwrap();
        let ring = SharedRing::new(&mem);
        let base = mem.base().as_ptr();
        ring.set_req_prod(0x0102_0304);
        ring.set_rsp_prod(7);
        ring.set_msg(RING_MESSAGE_CLOSE);
        // SAFETY: offsets inside the ring page; the test is the only user of the memory.
        unsafe {
            assert_eq!(base.cast::<u32>().read(), 0x0102_0304);
            assert_eq!(base.add(8).cast::<u32>().read(), 7);
            assert_eq!(base.add(16).read(), 3);
        }
        let rsp = blktap_response {
            id: 5,
            operation: 1,
            status: -1,
            ..Default::default()
        };
        // Slot 1.
        ring.write_response(33, &rsp);
        // SAFETY: entry 1 starts at 64 + 112; the fields at their ABI offsets, inside the ring page.
        unsafe {
            let e = base.add(64 + 112);
            assert_eq!(e.cast::<u64>().read(), 5);
            assert_eq!(e.add(8).read(), 1);
            assert_eq!(e.add(10).cast::<i16>().read(), -1);
        }
        assert_eq!(ring.read_response(1).id, 5);
    }

    #[test]
    fn raw_entries_and_clearing() {
        let mem = AnonRing::new().unwrap();
        let ring = SharedRing::new(&mem);
        let mut bytes = [0u8; ENTRY_SIZE];
        bytes[..8].copy_from_slice(&9u64.to_ne_bytes());
        bytes[ENTRY_SIZE - 1] = 0xee;
        ring.write_entry_bytes(34, &bytes); // slot 2
        assert_eq!(ring.read_response(2).id, 9);
        // SAFETY: the last byte of entry 2, inside the ring page `mem` maps for the whole test.
        let last = unsafe { mem.base().as_ptr().add(64 + 3 * 112 - 1).read() };
        assert_eq!(last, 0xee);
        ring.set_req_prod(3);
        ring.set_msg(RING_MESSAGE_CLOSE);
        ring.clear();
        assert_eq!(
            (ring.req_prod(), ring.msg(), ring.read_response(2).id),
            (0, 0, 0)
        );
        // SAFETY: as above: the last byte of entry 2, inside the mapped ring page.
        let last = unsafe { mem.base().as_ptr().add(64 + 3 * 112 - 1).read() };
        assert_eq!(last, 0);
    }

    #[test]
    fn data_pages_are_bounds_checked() {
        let mem = AnonRing::new().unwrap();
        let ring = SharedRing::new(&mem);
        let base = mem.base().as_ptr() as usize;
        let addr = |s, j| ring.data_page(s, j).map(|p| p.as_ptr() as usize - base);
        assert_eq!(addr(0, 0), Some(PAGE_SIZE));
        assert_eq!(addr(2, 3), Some((1 + 11 * 2 + 3) * PAGE_SIZE));
        assert_eq!(addr(31, 10), Some((abi::MMAP_PAGES - 1) * PAGE_SIZE));
        assert_eq!(addr(32, 0), None);
        assert_eq!(addr(0, 11), None);
    }

    #[test]
    fn data_page_addresses_follow_the_pages_per_slot() {
        // The standard mapping: 353 pages.
        assert_eq!(map_size(11), 353 * PAGE_SIZE);
        assert_eq!(map_size(11), MAP_SIZE);
        assert_eq!(data_page_index(11, 0, 0), Some(1));
        assert_eq!(data_page_index(11, 1, 0), Some(12));
        assert_eq!(data_page_index(11, 31, 10), Some(352));
        assert_eq!(data_page_index(11, 0, 11), None);
        // The largest: 1 + 32 * 128 pages (16 MiB of data).
        assert_eq!(map_size(128), (1 + 4096) * PAGE_SIZE);
        assert_eq!(data_page_index(128, 0, 127), Some(128));
        assert_eq!(data_page_index(128, 1, 0), Some(129));
        assert_eq!(data_page_index(128, 2, 5), Some(1 + 256 + 5));
        assert_eq!(data_page_index(128, 31, 127), Some(4096));
        assert_eq!(data_page_index(128, 0, 128), None);
        assert_eq!(data_page_index(128, 32, 0), None);
        assert!(!valid_pages_per_slot(10) && !valid_pages_per_slot(129));
        assert!(valid_pages_per_slot(11) && valid_pages_per_slot(12) && valid_pages_per_slot(128));

        // Through a view of memory mapped with 128 pages per slot.
        let mem = AnonRing::with_pages_per_slot(128).unwrap();
        let ring = SharedRing::new(&mem);
        assert_eq!(ring.pages_per_slot(), 128);
        let base = mem.base().as_ptr() as usize;
        let addr = |s, j| ring.data_page(s, j).map(|p| p.as_ptr() as usize - base);
        assert_eq!(addr(0, 0), Some(PAGE_SIZE));
        assert_eq!(addr(0, 11), Some(12 * PAGE_SIZE));
        assert_eq!(addr(3, 100), Some((1 + 128 * 3 + 100) * PAGE_SIZE));
        assert_eq!(addr(31, 127), Some(map_size(128) - PAGE_SIZE));
        assert_eq!(addr(0, 128), None);
        assert_eq!(addr(32, 0), None);
        // The last byte of the last page is writable.
        let last = ring.data_page(31, 127).unwrap().as_ptr();
        // SAFETY: the last byte of the mapping's last page, which `mem` maps for the test.
        unsafe { last.add(PAGE_SIZE - 1).write_volatile(1) };
    }
}
