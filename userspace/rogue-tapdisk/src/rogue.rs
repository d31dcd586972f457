//! The misbehaving back end: answers requests wrongly on purpose, one way per mode.

use blktap::ring::{validate, RingMemory, SharedRing, ENTRY_SIZE};
use blktap_abi::{self as abi, blktap_request, blktap_response};
use clap::ValueEnum;

use blktap::rng::Rng;

/// How to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Answer with an id that is no data slot (1000).
    BadId,
    /// Answer with the id of a slot that has no request pending.
    FreeSlot,
    /// Answer with the other operation than the request's.
    WrongOp,
    /// Answer the same request twice.
    Duplicate,
    /// Move rsp_prod 1000 entries ahead of the responses written.
    RspAhead,
    /// Random bytes over the response entries (those of the requests consumed and not
    /// answered) and a random rsp_prod.
    Garbage,
    /// Answer correctly (reads return [`pattern`], writes are dropped).
    Good,
    /// Seeded random actions (see `chaos.rs`): good, bad and garbage answers, random rsp_prod,
    /// message bytes, duplicates, delayed or missing RESPONDs; `--count` of them, then settles.
    Random,
}

impl Mode {
    /// Whether the request is still pending in the kernel after this mode's bad answer.
    pub fn leaves_request_pending(self) -> bool {
        !matches!(self, Mode::Duplicate | Mode::Good | Mode::Random)
    }
}

/// The back end of a ring, with its own (possibly wrong) view of the indices.
pub struct Rogue<M: RingMemory> {
    mem: M,
    sectors: u64,
    req_cons: u32,
    rsp_prod_pvt: u32,
    pending: [bool; abi::RING_SIZE],
    rng: Rng,
}

/// What a good answer reads at `sector`: each 512-byte sector holds its own number with
/// `0x5a5a` in the top 16 bits, as 64 little-endian `u64`s. A test checks that what the
/// application reads is this, not what a refused answer left in the pages.
pub fn pattern(sector: u64) -> [u8; 512] {
    let word = (sector | 0x5a5a << 48).to_le_bytes();
    let mut out = [0u8; 512];
    for chunk in out.chunks_exact_mut(8) {
        chunk.copy_from_slice(&word);
    }
    out
}

/// The byte a bad answer leaves in a read's data pages before the kernel refuses it.
pub const BAD_BYTE: u8 = 0xba;

/// One line about a request.
pub fn describe(req: &blktap_request) -> String {
    let op = match req.operation {
        abi::OP_READ => "read".to_string(),
        abi::OP_WRITE => "write".to_string(),
        other => format!("op {other}"),
    };
    format!(
        "request id={} {op} sector={} segments={}",
        req.id, req.sector_number, req.nr_segments
    )
}

impl<M: RingMemory> Rogue<M> {
    /// A back end over `mem`, for a disk of `sectors` sectors.
    pub fn new(mem: M, sectors: u64, seed: u64) -> Self {
        let start = SharedRing::new(&mem).rsp_prod();
        Self {
            mem,
            sectors,
            req_cons: start,
            rsp_prod_pvt: start,
            pending: [false; abi::RING_SIZE],
            rng: Rng::new(seed),
        }
    }

    /// The ring memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    fn ring(&self) -> SharedRing<'_> {
        SharedRing::new(&self.mem)
    }

    /// Copies the new requests out of the ring (at most 32; a larger jump is reported and
    /// skipped over).
    pub fn fetch(&mut self, notes: &mut Vec<String>) -> Vec<blktap_request> {
        let req_prod = self.ring().req_prod();
        let mut n = req_prod.wrapping_sub(self.req_cons);
        if n > abi::RING_SIZE as u32 {
            notes.push(format!(
                "req_prod {req_prod} is {n} past req_cons {}: taking the last 32",
                self.req_cons
            ));
            self.req_cons = req_prod.wrapping_sub(abi::RING_SIZE as u32);
            n = abi::RING_SIZE as u32;
        }
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let req = self.ring().read_request(self.req_cons);
            self.req_cons = self.req_cons.wrapping_add(1);
            if let Some(p) = self.pending.get_mut(req.id as usize) {
                *p = true;
            }
            out.push(req);
        }
        out
    }

    fn push(&mut self, id: u64, operation: u8, status: i16) {
        let rsp = blktap_response {
            id,
            operation,
            status,
            ..Default::default()
        };
        self.ring().write_response(self.rsp_prod_pvt, &rsp);
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
    }

    /// Publishes the responses written (rsp_prod = our producer) and kicks.
    pub fn publish(&mut self) -> String {
        self.ring().set_rsp_prod(self.rsp_prod_pvt);
        self.kick()
    }

    fn kick(&self) -> String {
        match self.mem.kick() {
            Ok(()) => "RESPOND ok".into(),
            Err(e) => format!("RESPOND failed: {e}"),
        }
    }

    /// Fills the data pages of a valid read with [`pattern`] (`bad`: with [`BAD_BYTE`]).
    fn fill_read(&self, req: &blktap_request, bad: bool) {
        let Ok(valid) = validate(req, self.sectors) else {
            return;
        };
        if valid.op != blktap::ring::Op::Read {
            return;
        }
        let ring = self.ring();
        let mut sector = valid.sector;
        for (j, seg) in valid.segments().enumerate() {
            let Some(page) = ring.data_page(valid.slot, j) else {
                continue;
            };
            for k in 0..seg.sectors() as usize {
                let bytes = if bad {
                    [BAD_BYTE; 512]
                } else {
                    pattern(sector)
                };
                // SAFETY: a validated segment lies inside its data page, which is inside the
                // ring mapping; only raw pointers reach it.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        page.as_ptr().add(seg.page_offset() + k * 512),
                        512,
                    )
                };
                sector += 1;
            }
        }
    }

    /// Writes the correct answer to `req` (not published): [`pattern`] for a valid read.
    pub fn answer(&mut self, req: &blktap_request) -> i16 {
        let status = match validate(req, self.sectors) {
            Ok(_) => {
                self.fill_read(req, false);
                abi::RSP_OKAY
            }
            Err(invalid) => invalid.status(),
        };
        if let Some(p) = self.pending.get_mut(req.id as usize) {
            *p = false;
        }
        self.push(req.id, req.operation, status);
        status
    }

    /// Answers `req` correctly and publishes; returns the line to print.
    pub fn good(&mut self, req: &blktap_request) -> String {
        let status = self.answer(req);
        let kick = self.publish();
        format!(
            "good: {} answered with status {status}; {kick}",
            describe(req)
        )
    }

    /// Answers `req` the way `mode` says, publishes and kicks; returns the line to print.
    pub fn bad(&mut self, mode: Mode, req: &blktap_request) -> String {
        let what = describe(req);
        // What the application would read if the kernel took the bad answer for a good one.
        if mode.leaves_request_pending() {
            self.fill_read(req, true);
        }
        match mode {
            Mode::BadId => {
                self.push(1000, req.operation, abi::RSP_OKAY);
                format!("bad-id: {what} answered as id 1000; {}", self.publish())
            }
            Mode::FreeSlot => {
                let free = (0..abi::RING_SIZE as u64)
                    .find(|&i| i != req.id && !self.pending[i as usize])
                    .unwrap_or(0);
                self.push(free, req.operation, abi::RSP_OKAY);
                format!(
                    "free-slot: {what} answered as id {free}, which has no request; {}",
                    self.publish()
                )
            }
            Mode::WrongOp => {
                let op = if req.operation == abi::OP_READ {
                    abi::OP_WRITE
                } else {
                    abi::OP_READ
                };
                self.push(req.id, op, abi::RSP_OKAY);
                format!("wrong-op: {what} answered with op {op}; {}", self.publish())
            }
            Mode::Duplicate => {
                let status = self.answer(req);
                self.push(req.id, req.operation, status);
                format!(
                    "duplicate: {what} answered twice with status {status}; {}",
                    self.publish()
                )
            }
            Mode::RspAhead => {
                let ahead = self.rsp_prod_pvt.wrapping_add(1000);
                self.ring().set_rsp_prod(ahead);
                format!(
                    "rsp-ahead: {what} left unanswered, rsp_prod set to {ahead} ({} + 1000); {}",
                    self.rsp_prod_pvt,
                    self.kick()
                )
            }
            Mode::Garbage => {
                // Only the entries responses may use now (requests consumed and unanswered):
                // the others may hold requests the kernel is writing.
                // After more answers than requests (earlier bad answers), there are none.
                let mut entries = self.req_cons.wrapping_sub(self.rsp_prod_pvt);
                if entries > abi::RING_SIZE as u32 {
                    entries = 0;
                }
                let mut entry = [0u8; ENTRY_SIZE];
                for k in 0..entries {
                    self.rng.fill(&mut entry);
                    self.ring()
                        .write_entry_bytes(self.rsp_prod_pvt.wrapping_add(k), &entry);
                }
                let rsp_prod = self.rng.next_u64() as u32;
                self.ring().set_rsp_prod(rsp_prod);
                format!(
                    "garbage: {what} left unanswered, random bytes over the {entries} \
                     response entries, rsp_prod set to {rsp_prod}; {}",
                    self.kick()
                )
            }
            // The random peer is `chaos::Chaos`; here it answers well.
            Mode::Good | Mode::Random => self.good(req),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use blktap::testkit::AnonRing;

    use super::*;

    fn request(id: u64, op: u8) -> blktap_request {
        let mut r = blktap_request {
            operation: op,
            nr_segments: 1,
            id,
            ..Default::default()
        };
        r.seg[0].last_sect = 7;
        r
    }

    fn setup(reqs: &[blktap_request]) -> (Rc<AnonRing>, Rogue<Rc<AnonRing>>, Vec<blktap_request>) {
        let mem = Rc::new(AnonRing::new().unwrap());
        let kernel = SharedRing::new(&*mem);
        for (i, r) in reqs.iter().enumerate() {
            kernel.write_request(i as u32, r);
        }
        kernel.set_req_prod(reqs.len() as u32);
        let mut rogue = Rogue::new(Rc::clone(&mem), 2048, 1);
        let mut notes = Vec::new();
        let fetched = rogue.fetch(&mut notes);
        assert!(notes.is_empty());
        (mem, rogue, fetched)
    }

    #[test]
    fn each_mode_answers_as_documented() {
        let (mem, mut rogue, reqs) = setup(&[request(3, 0), request(4, 1)]);
        let ring = SharedRing::new(&*mem);

        let line = rogue.bad(Mode::BadId, &reqs[0]);
        assert!(line.starts_with("bad-id: request id=3 read"), "{line}");
        assert!(line.ends_with("RESPOND ok"));
        assert_eq!(ring.rsp_prod(), 1);
        assert_eq!(ring.read_response(0).id, 1000);

        rogue.bad(Mode::FreeSlot, &reqs[0]);
        let rsp = ring.read_response(1);
        assert!(rsp.id != 3 && rsp.id != 4 && rsp.id < 32, "{rsp:?}");

        rogue.bad(Mode::WrongOp, &reqs[1]);
        let rsp = ring.read_response(2);
        assert_eq!((rsp.id, rsp.operation), (4, 0));

        rogue.bad(Mode::Duplicate, &reqs[0]);
        assert_eq!(ring.read_response(3).id, 3);
        assert_eq!(ring.read_response(4).id, 3);
        assert_eq!(ring.rsp_prod(), 5);

        rogue.bad(Mode::RspAhead, &reqs[1]);
        assert_eq!(ring.rsp_prod(), 1005);
        // Then answering correctly brings rsp_prod back to the real responses.
        let line = rogue.good(&reqs[1]);
        assert!(line.contains("status 0"), "{line}");
        assert_eq!(ring.rsp_prod(), 6);
        assert_eq!(ring.read_response(5).id, 4);

        // More answers than requests by now: no entry is the rogue's to overwrite.
        let line = rogue.bad(Mode::Garbage, &reqs[1]);
        assert!(line.contains("the 0 response entries"), "{line}");
        assert_ne!(ring.rsp_prod(), 6);
        assert_eq!(ring.read_response(5).id, 4);
        assert_eq!(mem.kicks(), 7);
    }

    #[test]
    fn garbage_covers_only_the_unanswered_entries() {
        let (mem, mut rogue, reqs) = setup(&[request(3, 0), request(4, 1)]);
        let ring = SharedRing::new(&*mem);
        let free = request(9, 0);
        ring.write_request(2, &free);
        let line = rogue.bad(Mode::Garbage, &reqs[0]);
        assert!(line.contains("the 2 response entries"), "{line}");
        assert_ne!(ring.read_request(0).id, 3);
        assert_ne!(ring.read_request(1).id, 4);
        assert_eq!(ring.read_request(2).id, 9);
        assert_eq!(mem.kicks(), 1);
    }

    #[test]
    fn good_answers_fill_reads_with_the_pattern_and_refuse_invalid_requests() {
        let mut bad = request(5, 0);
        bad.nr_segments = 0;
        let (mem, mut rogue, reqs) = setup(&[request(2, 0), bad]);
        let ring = SharedRing::new(&*mem);
        let page = ring.data_page(2, 0).unwrap().as_ptr();
        rogue.bad(Mode::WrongOp, &reqs[0]);
        // SAFETY: inside the data page; the test is single-threaded.
        assert!((0..4096).all(|i| unsafe { page.add(i).read() } == BAD_BYTE));
        rogue.good(&reqs[0]);
        for s in 0..8 {
            // SAFETY: as above.
            let got = unsafe { std::slice::from_raw_parts(page.add(s * 512), 512) };
            assert_eq!(got, &pattern(s as u64)[..], "sector {s}");
        }
        rogue.good(&reqs[1]);
        assert_eq!(ring.read_response(2).status, -1);
        assert!(Mode::BadId.leaves_request_pending());
        assert!(!Mode::Duplicate.leaves_request_pending());
    }

    #[test]
    fn a_req_prod_jump_is_reported() {
        let mem = Rc::new(AnonRing::new().unwrap());
        SharedRing::new(&*mem).set_req_prod(500);
        let mut rogue = Rogue::new(Rc::clone(&mem), 2048, 1);
        let mut notes = Vec::new();
        assert_eq!(rogue.fetch(&mut notes).len(), 32);
        assert_eq!(notes.len(), 1);
        assert!(rogue.fetch(&mut notes).is_empty());
        assert!(rogue.memory().kicks() == 0);
    }
}
