//! Mode `random`: a seeded hostile peer. Each action, chosen at random, answers some requests
//! correctly or with bad statuses, writes garbage responses (bad ids, wrong or unknown ops),
//! moves `rsp_prod` anywhere, sets the message byte, answers twice, delays or skips the
//! `RESPOND`, or does nothing. After `count` actions it settles: it answers every request it
//! knows of correctly, and when idle it fails every slot blindly (each slot's READ and WRITE
//! answered with an error) so that a request whose ring entry was lost to the garbage ends too.

use std::time::{Duration, Instant};

use blktap::ring::{validate, Op, RingMemory, SharedRing, ENTRY_SIZE};
use blktap_abi::{self as abi, blktap_request, blktap_response};

use blktap::rng::Rng;

const RING: u32 = abi::RING_SIZE as u32;
/// Most blind sweeps in the settled phase (each is two RESPONDs).
const MAX_SWEEPS: u32 = 20;
/// Idle time before a sweep.
const SWEEP_IDLE: Duration = Duration::from_millis(300);

/// The random peer's state.
pub struct Chaos<M: RingMemory> {
    mem: M,
    sectors: u64,
    rng: Rng,
    req_cons: u32,
    /// The kernel's `rsp_cons` as far as the answers to RESPOND tell.
    kernel_cons: u32,
    /// Where the next response goes.
    rsp_prod_pvt: u32,
    /// The `rsp_prod` last stored.
    published: u32,
    /// Requests fetched and not answered (by us, as far as we know).
    pending: Vec<blktap_request>,
    /// A `rsp_prod` was stored without a RESPOND after it.
    unkicked: bool,
    actions: u64,
    count: u64,
    sweeps: u32,
    last_activity: Instant,
}

impl<M: RingMemory> Chaos<M> {
    /// A random peer over `mem` for a disk of `sectors` sectors, giving `count` random actions.
    pub fn new(mem: M, sectors: u64, seed: u64, count: u64) -> Self {
        let start = SharedRing::new(&mem).rsp_prod();
        Self {
            mem,
            sectors,
            rng: Rng::new(seed),
            req_cons: start,
            kernel_cons: start,
            rsp_prod_pvt: start,
            published: start,
            pending: Vec::new(),
            unkicked: false,
            actions: 0,
            count,
            sweeps: 0,
            last_activity: Instant::now(),
        }
    }

    /// The ring memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Whether the random actions are all given.
    pub fn settled(&self) -> bool {
        self.actions >= self.count
    }

    /// Random actions given so far.
    pub fn actions(&self) -> u64 {
        self.actions
    }

    fn ring(&self) -> SharedRing<'_> {
        SharedRing::new(&self.mem)
    }

    /// Copies new requests out of the ring; returns how many.
    fn fetch(&mut self, notes: &mut Vec<String>) -> u32 {
        let req_prod = self.ring().req_prod();
        let mut n = req_prod.wrapping_sub(self.req_cons);
        if n > RING {
            notes.push(format!(
                "req_prod {req_prod} is {n} past req_cons: taking the last 32"
            ));
            self.req_cons = req_prod.wrapping_sub(RING);
            n = RING;
        }
        for _ in 0..n {
            let req = self.ring().read_request(self.req_cons);
            self.req_cons = self.req_cons.wrapping_add(1);
            // A slot's new request means its old one ended (answered by some earlier garbage).
            self.pending.retain(|p| p.id != req.id);
            self.pending.push(req);
        }
        if n > 0 {
            self.last_activity = Instant::now();
        }
        n
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

    /// Writes the correct answer to `req` (zeros for a read), with `status` if given.
    fn answer(&mut self, req: &blktap_request, status: Option<i16>) {
        let good = match validate(req, self.sectors) {
            Ok(valid) => {
                if valid.op == Op::Read {
                    let ring = self.ring();
                    for (j, seg) in valid.segments().enumerate() {
                        if let Some(page) = ring.data_page(valid.slot, j) {
                            // SAFETY: a validated segment lies inside its data page, inside the
                            // ring mapping; only raw pointers reach it.
                            unsafe {
                                std::ptr::write_bytes(
                                    page.as_ptr().add(seg.page_offset()),
                                    0,
                                    seg.len(),
                                )
                            };
                        }
                    }
                }
                abi::RSP_OKAY
            }
            Err(invalid) => invalid.status(),
        };
        self.push(req.id, req.operation, status.unwrap_or(good));
    }

    fn store_rsp_prod(&mut self, prod: u32) {
        self.ring().set_rsp_prod(prod);
        self.published = prod;
        self.unkicked = true;
    }

    /// RESPOND; learns where the kernel's `rsp_cons` is from the answer.
    fn kick(&mut self) -> String {
        self.unkicked = false;
        let answer = match self.mem.kick() {
            Ok(()) => 0,
            Err(e) => e.errno(),
        };
        // OK and EINVAL: the kernel consumed up to rsp_prod; EIO: nothing.
        if answer == 0 || answer == libc::EINVAL {
            self.kernel_cons = self.published;
        }
        self.rsp_prod_pvt = self.kernel_cons;
        match answer {
            0 => "RESPOND ok".into(),
            e => format!("RESPOND: {}", nix::errno::Errno::from_raw(e)),
        }
    }

    /// Takes up to `n` random pending requests.
    fn take_some(&mut self, n: usize) -> Vec<blktap_request> {
        let mut out = Vec::new();
        while out.len() < n && !self.pending.is_empty() {
            let i = self.rng.below(self.pending.len() as u64) as usize;
            out.push(self.pending.swap_remove(i));
        }
        out
    }

    /// After a wake-up (or a timeout): fetches, then acts; returns lines to print.
    pub fn step(&mut self, timed_out: bool) -> Vec<String> {
        let mut notes = Vec::new();
        let fetched = self.fetch(&mut notes);
        if self.settled() {
            self.settle(timed_out, &mut notes);
        } else if fetched > 0 || !self.pending.is_empty() || self.unkicked || timed_out {
            // Every 10 ms at least: the actions run out, so the peer settles, even with no
            // request it knows of (one may have been lost to garbage in the ring).
            if timed_out && self.unkicked && self.rng.chance(1, 2) {
                let k = self.kick();
                notes.push(format!("late kick: {k}"));
            } else {
                let line = self.act();
                notes.push(line);
            }
        }
        notes
    }

    /// Settled: answers what is pending; when idle, sweeps.
    fn settle(&mut self, timed_out: bool, notes: &mut Vec<String>) {
        if !self.pending.is_empty() {
            let reqs = std::mem::take(&mut self.pending);
            for r in &reqs {
                self.answer(r, None);
            }
            let prod = self.rsp_prod_pvt;
            self.store_rsp_prod(prod);
            let k = self.kick();
            notes.push(format!("settled: {} request(s) answered; {k}", reqs.len()));
            self.last_activity = Instant::now();
        } else if self.unkicked {
            let k = self.kick();
            notes.push(format!("settled: kick; {k}"));
        } else if timed_out
            && self.sweeps < MAX_SWEEPS
            && self.last_activity.elapsed() >= SWEEP_IDLE
        {
            self.sweeps += 1;
            for op in [abi::OP_READ, abi::OP_WRITE] {
                for slot in 0..u64::from(RING) {
                    self.push(slot, op, abi::RSP_ERROR);
                }
                let prod = self.rsp_prod_pvt;
                self.store_rsp_prod(prod);
                let k = self.kick();
                notes.push(format!(
                    "settled: swept every slot's op {op} with errors; {k}"
                ));
            }
            self.last_activity = Instant::now();
        }
    }

    /// One random action.
    fn act(&mut self) -> String {
        self.actions += 1;
        let n = self.actions;
        match self.rng.below(20) {
            0..=6 => {
                let k = 1 + self.rng.below(self.pending.len().max(1) as u64) as usize;
                let reqs = self.take_some(k);
                if self.rng.chance(1, 4) {
                    std::thread::sleep(Duration::from_micros(self.rng.below(5000)));
                }
                for r in &reqs {
                    self.answer(r, None);
                }
                let prod = self.rsp_prod_pvt;
                self.store_rsp_prod(prod);
                format!(
                    "#{n} answered {} request(s) well; {}",
                    reqs.len(),
                    self.kick()
                )
            }
            7..=8 => {
                let k = 1 + self.rng.below(self.pending.len().max(1) as u64) as usize;
                let reqs = self.take_some(k);
                for r in &reqs {
                    let status = self.rng.pick(&[-1i16, -2, 1, i16::MIN, i16::MAX, 0]);
                    self.answer(r, Some(status));
                }
                let prod = self.rsp_prod_pvt;
                self.store_rsp_prod(prod);
                format!(
                    "#{n} answered {} request(s) with random statuses; {}",
                    reqs.len(),
                    self.kick()
                )
            }
            9..=11 => {
                let k = 1 + self.rng.below(8) as u32;
                for _ in 0..k {
                    let id = match self.rng.below(6) {
                        0 => 1000,
                        1 => self.rng.next_u64(),
                        2 => u64::from(RING),
                        _ => self.rng.below(u64::from(RING)),
                    };
                    let op = self.rng.pick(&[0u8, 1, 2, 3, 4, 5, 255]);
                    let status = self.rng.pick(&[0i16, -1, -2, 7]);
                    if self.rng.chance(1, 3) {
                        let mut raw = [0u8; ENTRY_SIZE];
                        self.rng.fill(&mut raw);
                        self.ring().write_entry_bytes(self.rsp_prod_pvt, &raw);
                        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
                    } else {
                        self.push(id, op, status);
                    }
                }
                let prod = self.rsp_prod_pvt;
                self.store_rsp_prod(prod);
                format!("#{n} {k} garbage response(s); {}", self.kick())
            }
            12..=13 => {
                let prod = match self.rng.below(4) {
                    0 => self.rng.next_u64() as u32,
                    1 => self
                        .kernel_cons
                        .wrapping_add(33 + self.rng.below(1000) as u32),
                    2 => self.kernel_cons.wrapping_sub(1 + self.rng.below(40) as u32),
                    _ => self.kernel_cons.wrapping_add(self.rng.below(33) as u32),
                };
                self.store_rsp_prod(prod);
                let cons = self.kernel_cons;
                format!(
                    "#{n} rsp_prod set to {prod} (kernel at {cons}); {}",
                    self.kick()
                )
            }
            14 => {
                // Answer a request twice.
                let Some(r) = self.take_some(1).pop() else {
                    return format!("#{n} nothing to answer twice");
                };
                self.answer(&r, None);
                self.answer(&r, None);
                let prod = self.rsp_prod_pvt;
                self.store_rsp_prod(prod);
                format!("#{n} answered id {} twice; {}", r.id, self.kick())
            }
            15 => {
                // Not 3 (CLOSE): that is the kernel's word, and the peer would obey it.
                let msg = self.rng.pick(&[0u8, 1, 2, 0x80, 0xff]);
                self.ring().set_msg(msg);
                format!("#{n} msg set to {msg}; {}", self.kick())
            }
            16 => format!("#{n} kick alone; {}", self.kick()),
            17 => {
                // Publish without RESPOND: a later action or timeout kicks.
                let k = 1 + self.rng.below(4) as usize;
                let reqs = self.take_some(k);
                for r in &reqs {
                    self.answer(r, None);
                }
                let prod = self.rsp_prod_pvt;
                self.store_rsp_prod(prod);
                format!("#{n} {} answer(s) published, no RESPOND yet", reqs.len())
            }
            _ => format!("#{n} nothing done ({} pending)", self.pending.len()),
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

    #[test]
    fn random_actions_then_settles_and_answers_everything() {
        let mem = Rc::new(AnonRing::new().unwrap());
        let kernel = SharedRing::new(&*mem);
        let mut chaos = Chaos::new(Rc::clone(&mem), 2048, 42, 50);
        let mut prod = 0;
        for round in 0..60u64 {
            kernel.write_request(prod, &request(round % 32, (round % 2) as u8));
            prod += 1;
            kernel.set_req_prod(prod);
            let lines = chaos.step(false);
            assert!(!lines.is_empty());
        }
        assert!(chaos.settled());
        assert_eq!(chaos.actions(), 50);
        // Settled: whatever is still pending is answered at the next step.
        chaos.step(true);
        assert!(chaos.pending.is_empty());
        assert!(mem.kicks() > 0);
    }

    #[test]
    fn is_deterministic() {
        let run = || {
            let mem = Rc::new(AnonRing::new().unwrap());
            let kernel = SharedRing::new(&*mem);
            let mut chaos = Chaos::new(Rc::clone(&mem), 2048, 7, 20);
            let mut out = Vec::new();
            for i in 0..20u32 {
                kernel.write_request(i, &request(u64::from(i), 0));
                kernel.set_req_prod(i + 1);
                out.extend(chaos.step(false));
            }
            out
        };
        assert_eq!(run(), run());
    }
}
