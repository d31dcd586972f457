//! The back end of the shared ring: consuming requests and producing responses.
//!
//! Indices are free-running `u32`s. `req_cons` and `rsp_prod_pvt` are private to this side; the
//! kernel only sees `rsp_prod` when a batch of responses is published.

use blktap_abi::{self as abi, blktap_request, blktap_response};

use super::memory::{RingMemory, SharedRing};
use crate::Result;

const RING_SIZE: u32 = abi::RING_SIZE as u32;

/// The kernel's `req_prod` is inconsistent with what this side has answered: the ring cannot be
/// trusted any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "ring corrupt: req_prod {req_prod} is {ahead} entries past the oldest unanswered request \
     {rsp_prod_pvt} (at most {RING_SIZE})"
)]
pub struct RingCorrupt {
    /// The `req_prod` that was read.
    pub req_prod: u32,
    /// This side's response producer.
    pub rsp_prod_pvt: u32,
    /// `req_prod - rsp_prod_pvt`, wrapping.
    pub ahead: u32,
}

/// This side pushed a response without an unanswered request for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no unanswered request to respond to")]
pub struct NoRequest;

/// The back end of a ring, owning its memory.
#[derive(Debug)]
pub struct BackRing<M: RingMemory> {
    memory: M,
    req_cons: u32,
    rsp_prod_pvt: u32,
    rsp_published: u32,
}

impl<M: RingMemory> BackRing<M> {
    /// The back end of the ring in `memory`, starting from the `rsp_prod` found there (0 in a
    /// freshly mapped ring): every request before it counts as answered.
    pub fn new(memory: M) -> Self {
        let start = SharedRing::new(&memory).rsp_prod();
        Self {
            memory,
            req_cons: start,
            rsp_prod_pvt: start,
            rsp_published: start,
        }
    }

    /// The ring's memory.
    pub fn memory(&self) -> &M {
        &self.memory
    }

    /// Gives the memory back.
    pub fn into_memory(self) -> M {
        self.memory
    }

    /// A view of the shared memory.
    pub fn shared(&self) -> SharedRing<'_> {
        SharedRing::new(&self.memory)
    }

    /// Requests consumed and not answered yet.
    pub fn outstanding(&self) -> u32 {
        self.req_cons.wrapping_sub(self.rsp_prod_pvt)
    }

    /// Whether the kernel has published requests not fetched yet (one read of `req_prod`, in
    /// shared memory: no system call). A corrupt index also says yes: [`BackRing::fetch`] then
    /// reports it.
    pub fn has_new(&self) -> bool {
        SharedRing::new(&self.memory).req_prod() != self.req_cons
    }

    /// The private request consumer index.
    pub fn req_cons(&self) -> u32 {
        self.req_cons
    }

    /// The private response producer index.
    pub fn rsp_prod_pvt(&self) -> u32 {
        self.rsp_prod_pvt
    }

    /// Copies every new request out of the ring, each exactly once, appending them to `out`.
    /// The copies are raw: validate them. Fails, consuming nothing, if `req_prod` claims more
    /// than 32 requests beyond the oldest unanswered one (or moved backwards).
    pub fn fetch(&mut self, out: &mut Vec<blktap_request>) -> Result<usize, RingCorrupt> {
        let shared = SharedRing::new(&self.memory);
        let req_prod = shared.req_prod();
        let ahead = req_prod.wrapping_sub(self.rsp_prod_pvt);
        let new = req_prod.wrapping_sub(self.req_cons);
        if ahead > RING_SIZE || new > ahead {
            return Err(RingCorrupt {
                req_prod,
                rsp_prod_pvt: self.rsp_prod_pvt,
                ahead,
            });
        }
        out.reserve(new as usize);
        while self.req_cons != req_prod {
            out.push(shared.read_request(self.req_cons));
            self.req_cons = self.req_cons.wrapping_add(1);
        }
        Ok(new as usize)
    }

    /// Writes a response into the next response entry. The kernel sees it only after
    /// [`BackRing::publish`].
    pub fn push_response(&mut self, rsp: &blktap_response) -> Result<(), NoRequest> {
        if self.outstanding() == 0 {
            return Err(NoRequest);
        }
        SharedRing::new(&self.memory).write_response(self.rsp_prod_pvt, rsp);
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// Responses written and not published yet.
    pub fn unpublished(&self) -> u32 {
        self.rsp_prod_pvt.wrapping_sub(self.rsp_published)
    }

    /// Publishes the responses written so far (one release store of `rsp_prod`, after all their
    /// entries) and kicks the kernel once. Returns whether there was anything to publish.
    pub fn publish(&mut self) -> Result<bool> {
        if self.unpublished() == 0 {
            return Ok(false);
        }
        SharedRing::new(&self.memory).set_rsp_prod(self.rsp_prod_pvt);
        self.rsp_published = self.rsp_prod_pvt;
        self.memory.kick()?;
        Ok(true)
    }

    /// The header's message byte.
    pub fn msg(&self) -> u8 {
        SharedRing::new(&self.memory).msg()
    }
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use super::*;
    use crate::testkit::AnonRing;

    fn request(id: u64) -> blktap_request {
        blktap_request {
            operation: abi::OP_READ,
            nr_segments: 1,
            id,
            ..Default::default()
        }
    }

    fn response(id: u64) -> blktap_response {
        blktap_response {
            id,
            ..Default::default()
        }
    }

    #[test]
    fn requests_are_copied_once_and_responses_published_in_batches() {
        let mem = Rc::new(AnonRing::new().unwrap());
        let kernel = SharedRing::new(&*mem);
        let mut ring = BackRing::new(Rc::clone(&mem));
        for i in 0..3 {
            kernel.write_request(i, &request(u64::from(i)));
        }
        assert!(!ring.has_new());
        kernel.set_req_prod(3);
        assert!(ring.has_new());
        let mut out = Vec::new();
        assert_eq!(ring.fetch(&mut out), Ok(3));
        assert!(!ring.has_new());
        assert_eq!(out.iter().map(|r| r.id).collect::<Vec<_>>(), [0, 1, 2]);
        // Nothing new: nothing fetched, even if the kernel rewrites consumed entries.
        kernel.write_request(0, &request(9));
        assert_eq!(ring.fetch(&mut out), Ok(0));
        assert_eq!(ring.outstanding(), 3);

        ring.push_response(&response(2)).unwrap();
        ring.push_response(&response(0)).unwrap();
        // Written, not visible yet.
        assert_eq!(kernel.read_response(0).id, 2);
        assert_eq!(kernel.rsp_prod(), 0);
        assert_eq!(mem.kicks(), 0);
        assert!(ring.publish().unwrap());
        assert_eq!(kernel.rsp_prod(), 2);
        assert_eq!(mem.kicks(), 1);
        assert!(!ring.publish().unwrap());
        assert_eq!(mem.kicks(), 1);
        ring.push_response(&response(1)).unwrap();
        assert_eq!(ring.push_response(&response(1)), Err(NoRequest));
        assert!(ring.publish().unwrap());
        assert_eq!(kernel.rsp_prod(), 3);
        assert_eq!(ring.outstanding(), 0);
    }

    #[test]
    fn a_req_prod_racing_ahead_is_corruption() {
        let mem = Rc::new(AnonRing::new().unwrap());
        let kernel = SharedRing::new(&*mem);
        let mut ring = BackRing::new(Rc::clone(&mem));
        let mut out = Vec::new();
        kernel.set_req_prod(32);
        assert_eq!(ring.fetch(&mut out), Ok(32));
        // 32 outstanding: not one more may be produced.
        kernel.set_req_prod(33);
        let err = ring.fetch(&mut out).unwrap_err();
        assert_eq!(err.ahead, 33);
        assert_eq!(ring.req_cons(), 32);
        for i in 0..5 {
            ring.push_response(&response(i)).unwrap();
        }
        ring.publish().unwrap();
        assert_eq!(ring.fetch(&mut out), Ok(1));
        kernel.set_req_prod(1000);
        assert!(ring.fetch(&mut out).is_err());
        // Going backwards is as wrong as jumping ahead.
        kernel.set_req_prod(10);
        assert!(ring.fetch(&mut out).is_err());
        assert_eq!(out.len(), 33);
    }

    #[test]
    fn indices_wrap_around() {
        let mem = Rc::new(AnonRing::new().unwrap());
        let kernel = SharedRing::new(&*mem);
        let start = u32::MAX - 2;
        kernel.set_rsp_prod(start);
        kernel.set_req_prod(start);
        let mut ring = BackRing::new(Rc::clone(&mem));
        for k in 0..6u32 {
            kernel.write_request(start.wrapping_add(k), &request(u64::from(k)));
        }
        kernel.set_req_prod(start.wrapping_add(6));
        let mut out = Vec::new();
        assert_eq!(ring.fetch(&mut out), Ok(6));
        assert_eq!(
            out.iter().map(|r| r.id).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4, 5]
        );
        for k in 0..6 {
            ring.push_response(&response(k)).unwrap();
        }
        ring.publish().unwrap();
        assert_eq!(kernel.rsp_prod(), 3);
        assert_eq!(kernel.read_response(start.wrapping_add(5)).id, 5);
    }
}
