//! A simulated kernel for tests: it produces requests into an [`AnonRing`] the way the blktap
//! module does, and consumes the responses.

use std::rc::Rc;

use blktap_abi::{blktap_request, blktap_response};

use crate::ring::{AnonRing, SharedRing, PAGE_SIZE};

/// The kernel's side of a ring.
pub struct SimKernel {
    pub mem: Rc<AnonRing>,
    req_prod_pvt: u32,
    rsp_cons: u32,
}

impl SimKernel {
    /// A fresh ring; hand `mem` (a clone) to the server.
    pub fn new() -> Self {
        Self {
            mem: Rc::new(AnonRing::new().unwrap()),
            req_prod_pvt: 0,
            rsp_cons: 0,
        }
    }

    pub fn ring(&self) -> SharedRing<'_> {
        SharedRing::new(&*self.mem)
    }

    /// Writes a request into the next entry (not published yet).
    pub fn push(&mut self, op: u8, id: u64, sector: u64, segs: &[(u8, u8)]) {
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
        self.push_raw(&req);
    }

    pub fn push_raw(&mut self, req: &blktap_request) {
        self.ring().write_request(self.req_prod_pvt, req);
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
    }

    /// Publishes the requests written so far.
    pub fn publish(&self) {
        self.ring().set_req_prod(self.req_prod_pvt);
    }

    /// The responses published since the last call.
    pub fn responses(&mut self) -> Vec<blktap_response> {
        let ring = SharedRing::new(&*self.mem);
        let rsp_prod = ring.rsp_prod();
        let mut out = Vec::new();
        while self.rsp_cons != rsp_prod {
            out.push(ring.read_response(self.rsp_cons));
            self.rsp_cons = self.rsp_cons.wrapping_add(1);
        }
        out
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
