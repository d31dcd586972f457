//! A simulated kernel for tests: it produces requests into a ring the way the blktap module
//! does, consumes the responses, and plays the ring ioctls: `CREATE_DEVICE` (refusing flags it
//! does not know with `EINVAL`), `REMOVE_DEVICE`, `PAUSE` and `RESUME` (requests submitted while
//! paused wait in a backlog, as in the block layer, and reach the ring on resume; both clear a
//! PAUSE/RESUME message), and the recovery re-attach (the ring page is zeroed and every request
//! not answered is published again from index 0). The ring's data pages per slot are chosen by
//! the "mapping" ([`SimKernel::with_pages_per_slot`], [`RingDevice::remap`]): more than 11 only
//! up to [`SimState::max_pages`] and with `LARGE_REQUESTS`, which needs more than 11, as in the
//! module. On a disk created with staged writes, a write
//! submitted waits, staged (counted in the header's `staged`), until `RESPOND`, `PAUSE` or
//! `REMOVE_DEVICE` puts it on the ring, as the module does (its poll does too: not simulated).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ptr::NonNull;
use std::rc::Rc;

use blktap_abi::{self as abi, blktap_request, blktap_request_discard, blktap_response};
use nix::errno::Errno;

use crate::ring::request::SECTORS_PER_PAGE;
use crate::ring::{
    DiskParams, RingDevice, RingMemory, SharedRing, EXTENSION_FLAGS, PAGE_SIZE, RING_MESSAGE_PAUSE,
    RING_MESSAGE_RESUME,
};
use crate::testkit::AnonRing;
use crate::{Error, Result};

/// The kernel's view of a tap.
#[derive(Debug, Default)]
pub struct SimState {
    /// Extension flags CREATE_DEVICE accepts.
    pub known_flags: u64,
    /// The disk: capacity and flags.
    pub disk: Option<(u64, u64)>,
    /// The data pages per slot of the ring when the disk was created.
    pub disk_pages: usize,
    /// The most data pages per slot a mapping may have (11: a kernel without large requests,
    /// which refuses any other mapping).
    pub max_pages: usize,
    /// The pages per slot of every mapping made again ([`RingDevice::remap`]).
    pub remaps: Vec<usize>,
    /// Whether requests are held back.
    pub paused: bool,
    /// The flags of every CREATE_DEVICE call.
    pub creates: Vec<u64>,
    /// PAUSE and RESUME calls.
    pub pauses: u32,
    pub resumes: u32,
    req_prod_pvt: u32,
    rsp_cons: u32,
    /// Requests on the ring not answered yet, in ring order.
    pending: Vec<blktap_request>,
    /// Requests waiting in the block layer while paused.
    backlog: VecDeque<blktap_request>,
    /// Writes staged (disks with staged writes), not on the ring yet.
    staged: Vec<blktap_request>,
    /// `RESPOND` calls that put staged writes on the ring.
    pub drained: u32,
}

/// A tap's ring device, simulated.
#[derive(Debug)]
pub struct SimDevice {
    /// Memory for the largest mapping; `pages` of it are the ring's.
    ring: AnonRing,
    pages: Cell<usize>,
    minor: u32,
    pub st: RefCell<SimState>,
    kicks: Cell<u64>,
}

impl SimDevice {
    /// How many times responses were signalled.
    pub fn kicks(&self) -> u64 {
        self.kicks.get()
    }

    fn shared(&self) -> SharedRing<'_> {
        SharedRing::new(self)
    }

    fn clear_msg(&self) {
        let ring = self.shared();
        if matches!(ring.msg(), RING_MESSAGE_PAUSE | RING_MESSAGE_RESUME) {
            ring.set_msg(0);
        }
    }

    fn produce(&self, req: &blktap_request) {
        let mut st = self.st.borrow_mut();
        self.shared().write_request(st.req_prod_pvt, req);
        st.req_prod_pvt = st.req_prod_pvt.wrapping_add(1);
        st.pending.push(*req);
    }

    fn publish(&self) {
        let prod = self.st.borrow().req_prod_pvt;
        self.shared().set_req_prod(prod);
    }

    /// Puts the staged writes on the ring and publishes them.
    fn drain_staged(&self) {
        let staged = std::mem::take(&mut self.st.borrow_mut().staged);
        if staged.is_empty() {
            return;
        }
        self.st.borrow_mut().drained += 1;
        for req in &staged {
            self.produce(req);
        }
        self.shared().set_staged(0);
        self.publish();
    }
}

// SAFETY: the ring memory is the AnonRing's, which lives as long as the device and holds the
// largest mapping (128 pages per slot), so it is valid for any `pages` (kept in 11..=128).
unsafe impl RingMemory for SimDevice {
    fn base(&self) -> NonNull<u8> {
        self.ring.base()
    }

    fn pages_per_slot(&self) -> usize {
        self.pages.get()
    }

    fn kick(&self) -> Result<()> {
        self.kicks.set(self.kicks.get() + 1);
        self.drain_staged();
        Ok(())
    }
}

fn errno(what: &str, e: Errno) -> Error {
    Error::ioctl(what.to_string(), e)
}

impl RingDevice for SimDevice {
    fn minor(&self) -> u32 {
        self.minor
    }

    fn create_device(&self, params: &DiskParams) -> Result<()> {
        let mut st = self.st.borrow_mut();
        st.creates.push(params.flags);
        if st.disk.is_some() {
            return Err(errno("create", Errno::EEXIST));
        }
        if params.flags & !EXTENSION_FLAGS != 0 || params.flags & !st.known_flags != 0 {
            return Err(errno("create", Errno::EINVAL));
        }
        // Large requests need a larger mapping, and a larger mapping is only for them.
        let large = params.flags & abi::DEVICE_LARGE_REQUESTS != 0;
        if large != (self.pages.get() > abi::SEGMENT_MAX) {
            return Err(errno("create", Errno::EINVAL));
        }
        st.disk = Some((params.capacity, params.flags));
        st.disk_pages = self.pages.get();
        Ok(())
    }

    fn remove_device(&self) -> Result<()> {
        self.drain_staged();
        let mut st = self.st.borrow_mut();
        if st.disk.take().is_none() {
            return Err(errno("remove", Errno::ENODEV));
        }
        Ok(())
    }

    fn pause(&self) -> Result<()> {
        let mut st = self.st.borrow_mut();
        if st.disk.is_none() {
            return Err(errno("pause", Errno::ENODEV));
        }
        st.paused = true;
        st.pauses += 1;
        drop(st);
        self.drain_staged();
        self.clear_msg();
        Ok(())
    }

    fn resume(&self) -> Result<()> {
        let mut st = self.st.borrow_mut();
        if st.disk.is_none() {
            return Err(errno("resume", Errno::ENODEV));
        }
        st.paused = false;
        st.resumes += 1;
        let backlog: Vec<_> = st.backlog.drain(..).collect();
        drop(st);
        self.clear_msg();
        for req in &backlog {
            self.produce(req);
        }
        self.publish();
        Ok(())
    }

    fn existing_disk(&self) -> Result<Option<u64>> {
        Ok(self.st.borrow().disk.map(|(capacity, _)| capacity))
    }

    unsafe fn remap(&self, pages_per_slot: usize) -> Result<()> {
        let mut st = self.st.borrow_mut();
        st.remaps.push(pages_per_slot);
        let known = pages_per_slot == abi::SEGMENT_MAX
            || (pages_per_slot > abi::SEGMENT_MAX && pages_per_slot <= st.max_pages);
        let fits_disk = st.disk.is_none() || st.disk_pages == pages_per_slot;
        if !known || !fits_disk || pages_per_slot > abi::SEGMENT_MAX_LARGE {
            return Err(errno("mmap", Errno::EINVAL));
        }
        self.pages.set(pages_per_slot);
        // Each mapping starts with a zeroed ring page.
        self.shared().clear();
        Ok(())
    }
}

/// The kernel's side of a ring.
pub struct SimKernel {
    pub mem: Rc<SimDevice>,
}

impl Default for SimKernel {
    fn default() -> Self {
        Self::new()
    }
}

impl SimKernel {
    /// A fresh ring of tap 0 (the standard mapping), knowing every extension; hand `mem` (a
    /// clone) to the server.
    pub fn new() -> Self {
        Self::with_pages_per_slot(abi::SEGMENT_MAX)
    }

    /// A fresh ring of tap 0 mapped with `pages` data pages per slot (11..=128), knowing every
    /// extension.
    pub fn with_pages_per_slot(pages: usize) -> Self {
        assert!((abi::SEGMENT_MAX..=abi::SEGMENT_MAX_LARGE).contains(&pages));
        Self {
            mem: Rc::new(SimDevice {
                ring: AnonRing::with_pages_per_slot(abi::SEGMENT_MAX_LARGE).unwrap(),
                pages: Cell::new(pages),
                minor: 0,
                st: RefCell::new(SimState {
                    known_flags: EXTENSION_FLAGS,
                    max_pages: abi::SEGMENT_MAX_LARGE,
                    ..Default::default()
                }),
                kicks: Cell::new(0),
            }),
        }
    }

    pub fn ring(&self) -> SharedRing<'_> {
        self.mem.shared()
    }

    pub fn state(&self) -> std::cell::Ref<'_, SimState> {
        self.mem.st.borrow()
    }

    pub fn state_mut(&self) -> std::cell::RefMut<'_, SimState> {
        self.mem.st.borrow_mut()
    }

    /// A request.
    pub fn request(op: u8, id: u64, sector: u64, segs: &[(u8, u8)]) -> blktap_request {
        let mut req = blktap_request {
            operation: op,
            nr_segments: segs.len() as u8,
            id,
            sector_number: sector,
            ..Default::default()
        };
        for (s, &(first, last)) in req.seg.iter_mut().zip(segs) {
            s.first_sect = first;
            s.last_sect = last;
        }
        req
    }

    /// A read or write of `sectors` sectors (1..=1024) at `sector`, laid out as the kernel
    /// does: from the first byte of page 0 of the slot on, every page full but the last; more
    /// than 11 pages make a large request (`nr_segments` its pages, `nr_sectors` its sectors,
    /// the entry's 11 segments its first 11 pages).
    pub fn transfer(op: u8, id: u64, sector: u64, sectors: u16) -> blktap_request {
        let per_page = u16::from(SECTORS_PER_PAGE);
        let pages = sectors.div_ceil(per_page);
        let mut req = blktap_request {
            operation: op,
            nr_segments: pages as u8,
            nr_sectors: if usize::from(pages) > abi::SEGMENT_MAX {
                sectors
            } else {
                0
            },
            id,
            sector_number: sector,
            ..Default::default()
        };
        for (j, s) in req.seg.iter_mut().enumerate().take(usize::from(pages)) {
            let in_page = (sectors - j as u16 * per_page).min(per_page);
            s.first_sect = 0;
            s.last_sect = (in_page - 1) as u8;
        }
        req
    }

    /// A discard request of `n` sectors at `sector`.
    pub fn discard(id: u64, sector: u64, n: u64) -> blktap_request {
        let d = blktap_request_discard {
            operation: abi::OP_DISCARD,
            id,
            sector_number: sector,
            nr_sectors: n,
            ..Default::default()
        };
        let mut req = blktap_request::default();
        // SAFETY: the discard layout is a prefix of the request's, both plain integers.
        unsafe { std::ptr::write((&mut req as *mut blktap_request).cast(), d) };
        req
    }

    /// Writes a request into the next entry (not published yet).
    pub fn push(&mut self, op: u8, id: u64, sector: u64, segs: &[(u8, u8)]) {
        self.push_raw(&Self::request(op, id, sector, segs));
    }

    pub fn push_raw(&mut self, req: &blktap_request) {
        self.mem.produce(req);
    }

    /// Publishes the requests written so far.
    pub fn publish(&self) {
        self.mem.publish();
    }

    /// The block layer hands a request to the disk: onto the ring (published), or into the
    /// backlog while paused.
    pub fn submit(&mut self, req: &blktap_request) {
        let staging = self
            .state()
            .disk
            .is_some_and(|(_, flags)| flags & abi::DEVICE_STAGED_WRITES != 0);
        let write = matches!(req.operation, abi::OP_WRITE | abi::OP_WRITE_FUA);
        if self.state().paused {
            self.state_mut().backlog.push_back(*req);
        } else if staging && write {
            let n = {
                let mut st = self.state_mut();
                st.staged.push(*req);
                st.staged.len()
            };
            self.ring().set_staged(n as u32);
        } else {
            self.push_raw(req);
            self.publish();
        }
    }

    /// Requests held back by a pause.
    pub fn backlog(&self) -> usize {
        self.state().backlog.len()
    }

    /// Writes staged, not on the ring yet.
    pub fn staged(&self) -> usize {
        self.state().staged.len()
    }

    /// Requests on the ring not answered yet.
    pub fn pending(&self) -> usize {
        self.state().pending.len()
    }

    /// The operator writes the tap's sysfs `pause`: the message byte.
    pub fn set_msg(&self, msg: u8) {
        self.ring().set_msg(msg);
    }

    /// The responses published since the last call.
    pub fn responses(&mut self) -> Vec<blktap_response> {
        let ring = self.mem.shared();
        let rsp_prod = ring.rsp_prod();
        let mut out = Vec::new();
        let mut st = self.mem.st.borrow_mut();
        while st.rsp_cons != rsp_prod {
            let rsp = ring.read_response(st.rsp_cons);
            if let Some(i) = st.pending.iter().position(|r| r.id == rsp.id) {
                st.pending.remove(i);
            }
            out.push(rsp);
            st.rsp_cons = st.rsp_cons.wrapping_add(1);
        }
        out
    }

    /// A new tapdisk maps the ring of a disk created with RECOVERY: the ring page is zeroed and
    /// every request not answered is published again from index 0.
    pub fn reattach(&mut self) {
        let ring = self.mem.shared();
        ring.clear();
        let kept: Vec<blktap_request> = {
            let mut st = self.mem.st.borrow_mut();
            st.req_prod_pvt = 0;
            st.rsp_cons = 0;
            std::mem::take(&mut st.pending)
        };
        for req in &kept {
            self.mem.produce(req);
        }
        // Staged writes stay staged; the header says so again.
        let staged = self.staged();
        self.ring().set_staged(staged as u32);
        self.publish();
    }

    fn page_ptr(&self, slot: usize, seg: usize) -> *mut u8 {
        self.ring().data_page(slot, seg).unwrap().as_ptr()
    }

    /// Fills a data page with `f(byte offset)`.
    pub fn fill(&self, slot: usize, seg: usize, f: impl Fn(usize) -> u8) {
        let p = self.page_ptr(slot, seg);
        for i in 0..PAGE_SIZE {
            // SAFETY: i < PAGE_SIZE, inside the data page; the test is single-threaded.
            unsafe { p.add(i).write_volatile(f(i)) };
        }
    }

    /// A copy of a data page.
    pub fn page(&self, slot: usize, seg: usize) -> Vec<u8> {
        let p = self.page_ptr(slot, seg);
        (0..PAGE_SIZE)
            .map(|i| {
                // SAFETY: as `fill`.
                unsafe { p.add(i).read_volatile() }
            })
            .collect()
    }
}
