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
/// Size of the whole ring mapping: the ring page, then 32 x 11 data pages.
pub const MAP_SIZE: usize = abi::MMAP_PAGES * PAGE_SIZE;
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

/// Memory laid out like a blktap ring mapping ([`MAP_SIZE`] bytes: ring page, then data pages).
///
/// # Safety
///
/// Implementors guarantee that [`RingMemory::base`] is page-aligned and valid for reads and
/// writes of [`MAP_SIZE`] bytes for as long as the implementor lives, and that no Rust reference
/// to that memory exists (only raw pointers and atomics reach it).
pub unsafe trait RingMemory {
    /// The first byte of the ring page.
    fn base(&self) -> NonNull<u8>;

    /// Tells the other side that new responses were published (the `RESPOND` ioctl on a device).
    fn kick(&self) -> Result<()>;
}

// SAFETY: `Rc` hands out the same memory as the `M` it owns, which lives as long as the `Rc`.
unsafe impl<M: RingMemory + ?Sized> RingMemory for Rc<M> {
    fn base(&self) -> NonNull<u8> {
        (**self).base()
    }

    fn kick(&self) -> Result<()> {
        (**self).kick()
    }
}

/// A view of a ring's memory, borrowed from its owner, with bounds-checked accessors.
#[derive(Clone, Copy)]
pub struct SharedRing<'a> {
    base: NonNull<u8>,
    _memory: PhantomData<&'a ()>,
}

impl<'a> SharedRing<'a> {
    /// A view of `memory`.
    pub fn new<M: RingMemory + ?Sized>(memory: &'a M) -> Self {
        Self {
            base: memory.base(),
            _memory: PhantomData,
        }
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

    /// The data page of segment `seg` of slot `slot`, or `None` if either is out of range.
    pub fn data_page(&self, slot: usize, seg: usize) -> Option<NonNull<u8>> {
        if slot >= abi::RING_SIZE || seg >= abi::SEGMENT_MAX {
            return None;
        }
        let page = 1 + slot * abi::SEGMENT_MAX + seg;
        debug_assert!(page < abi::MMAP_PAGES);
        // SAFETY: page < MMAP_PAGES, so the page lies inside the MAP_SIZE-byte mapping.
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
}
