//! Serving a tap: requests from the ring go to an image backend, completions go back to the ring
//! as responses.
//!
//! Every request is copied out of the ring once and validated before use. Invalid requests are
//! answered with `-1` (unknown operations with `-2`) right away; valid ones become one backend
//! I/O straight between the image and the request's data pages. Responses are published in
//! batches: one `rsp_prod` store and one kick per batch. A ring whose producer index runs ahead
//! of what it may, or that reuses a data slot still in flight, is faulty: the tap is no longer
//! served (its in-flight I/O still completes, so the data pages are left alone after that).

use std::os::fd::BorrowedFd;

use blktap_abi::{self as abi, blktap_request, blktap_response};

use crate::backend::{Backend, Completion, Io};
use crate::ring::{
    validate, BackRing, Invalid, Op, Request, RingCorrupt, RingMemory, RING_MESSAGE_CLOSE,
    SECTOR_SIZE,
};
use crate::{Error, Result};

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

/// How many invalid requests are logged; the rest are only counted.
const LOGGED_INVALID: u64 = 16;
/// How many failed or refused requests are logged; the rest are only counted.
const LOGGED_FAILURES: u64 = 16;

/// A protocol violation by the other side of the ring, after which it is no longer served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingFault {
    /// The request producer index is impossible.
    #[error(transparent)]
    Corrupt(#[from] RingCorrupt),
    /// A request named a data slot whose previous request is still in flight.
    #[error("ring corrupt: request for data slot {0}, which has a request in flight")]
    SlotBusy(usize),
}

/// What went wrong while serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The ring broke the protocol; the tap is no longer served.
    #[error(transparent)]
    Fault(#[from] RingFault),
    /// A system call failed (submitting I/O, kicking the kernel); serving goes on.
    #[error(transparent)]
    Sys(#[from] Error),
}

/// I/O counters of a tap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoStats {
    /// Read requests started.
    pub reads: u64,
    /// Write requests started.
    pub writes: u64,
    /// Bytes read successfully.
    pub bytes_read: u64,
    /// Bytes written successfully.
    pub bytes_written: u64,
    /// Requests answered with an error (invalid, refused, or failed).
    pub errors: u64,
    /// Of those, requests that were invalid.
    pub invalid: u64,
}

/// The capacity in 512-byte sectors of a disk served from `backend`; an image smaller than one
/// sector cannot make a disk (`EINVAL`).
pub fn disk_sectors(backend: &dyn Backend) -> Result<u64> {
    match backend.size() / SECTOR_SIZE {
        0 => Err(Error::invalid(format!(
            "the image has {} bytes, less than one sector",
            backend.size()
        ))),
        n => Ok(n),
    }
}

/// A request handed to the backend.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    op: Op,
    bytes: u64,
}

/// Serves the ring in memory `M` from an image backend.
pub struct Server<M: RingMemory> {
    // Declared first so it is dropped first: a backend waits for its I/O into the ring's data
    // pages when dropped, and the ring's memory must outlive that.
    backend: Box<dyn Backend>,
    ring: BackRing<M>,
    image: String,
    capacity: u64,
    readonly: bool,
    in_flight: [Option<InFlight>; abi::RING_SIZE],
    stats: IoStats,
    fault: Option<RingFault>,
    fetched: Vec<blktap_request>,
    completions: Vec<Completion>,
}

impl<M: RingMemory> Server<M> {
    /// Serves the ring in `memory` from `backend`, which holds image `image` (`type:path`, for
    /// messages). The disk has the backend's size, rounded down to whole sectors (see
    /// [`disk_sectors`]).
    pub fn new(memory: M, backend: Box<dyn Backend>, image: String, readonly: bool) -> Self {
        let capacity = backend.size() / SECTOR_SIZE;
        Self {
            backend,
            ring: BackRing::new(memory),
            image,
            capacity,
            readonly,
            in_flight: [None; abi::RING_SIZE],
            stats: IoStats::default(),
            fault: None,
            fetched: Vec::with_capacity(abi::RING_SIZE),
            completions: Vec::with_capacity(abi::RING_SIZE),
        }
    }

    /// The ring's memory.
    pub fn memory(&self) -> &M {
        self.ring.memory()
    }

    /// The image, `type:path`.
    pub fn image(&self) -> &str {
        &self.image
    }

    /// The disk's capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether writes are refused.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// The I/O counters.
    pub fn stats(&self) -> IoStats {
        self.stats
    }

    /// Requests handed to the backend and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.iter().filter(|s| s.is_some()).count()
    }

    /// The protocol violation that stopped serving, if any.
    pub fn fault(&self) -> Option<RingFault> {
        self.fault
    }

    /// The backend's completion descriptor, to poll (none: completions come with submission).
    pub fn backend_fd(&self) -> Option<BorrowedFd<'_>> {
        self.backend.event_fd()
    }

    /// Whether the kernel asked for the tap to be shut down (`msg` is CLOSE).
    pub fn close_requested(&self) -> bool {
        self.ring.msg() == RING_MESSAGE_CLOSE
    }

    /// Takes the new requests from the ring and starts them, then answers what has completed.
    /// Call when the ring fd is readable.
    pub fn serve_ring(&mut self) -> Result<(), ServeError> {
        if let Some(f) = self.fault {
            return Err(f.into());
        }
        let mut fetched = std::mem::take(&mut self.fetched);
        fetched.clear();
        let result = self.ring.fetch(&mut fetched);
        if let Err(c) = result {
            self.fault = Some(c.into());
            self.fetched = fetched;
            return Err(RingFault::from(c).into());
        }
        for raw in &fetched {
            if self.fault.is_some() {
                break;
            }
            self.start(raw);
        }
        self.fetched = fetched;
        let submitted = self.backend.submit();
        self.collect()?;
        submitted?;
        match self.fault {
            Some(f) => Err(f.into()),
            None => Ok(()),
        }
    }

    /// Answers the I/O that has completed. Call when the backend's descriptor is readable.
    pub fn serve_backend(&mut self) -> Result<(), ServeError> {
        self.collect()
    }

    /// Waits for every I/O in flight and answers it.
    pub fn drain(&mut self) -> Result<(), ServeError> {
        let mut completions = std::mem::take(&mut self.completions);
        let drained = self.backend.drain(&mut completions);
        for c in completions.drain(..) {
            self.finish(c);
        }
        self.completions = completions;
        self.publish()?;
        drained?;
        Ok(())
    }

    /// Stops serving: waits for the I/O in flight, answers it, drops the backend, and gives the
    /// ring's memory back.
    pub fn into_memory(mut self) -> M {
        if let Err(e) = self.drain() {
            eprintln!("blktap: {}: {e}", self.image);
        }
        let Server { backend, ring, .. } = self;
        drop(backend);
        ring.into_memory()
    }

    /// Starts one request (or answers it, if it cannot be started).
    fn start(&mut self, raw: &blktap_request) {
        let req = match validate(raw, self.capacity) {
            Ok(req) => req,
            Err(invalid) => return self.refuse(raw, invalid),
        };
        if self.in_flight[req.slot].is_some() {
            self.fault = Some(RingFault::SlotBusy(req.slot));
            return;
        }
        if self.readonly && req.op == Op::Write {
            self.stats.errors += 1;
            return self.respond(raw.id, raw.operation, abi::RSP_ERROR);
        }
        let Some(iov) = self.iovecs(&req) else {
            self.stats.errors += 1;
            return self.respond(raw.id, raw.operation, abi::RSP_ERROR);
        };
        match req.op {
            Op::Read => self.stats.reads += 1,
            Op::Write => self.stats.writes += 1,
        }
        self.in_flight[req.slot] = Some(InFlight {
            op: req.op,
            bytes: req.bytes(),
        });
        let io = Io {
            tag: req.slot as u64,
            op: req.op,
            offset: req.offset(),
            iov,
        };
        // SAFETY: the buffers are inside the request's data pages (bounds-checked by
        // `data_page` and `validate`), in the ring memory this server owns. That memory outlives
        // the backend (declared first, dropped first, and `into_memory` drops it before handing
        // the memory back), and is only reached through raw pointers.
        unsafe { self.backend.queue(io) };
    }

    fn refuse(&mut self, raw: &blktap_request, invalid: Invalid) {
        self.stats.errors += 1;
        self.stats.invalid += 1;
        if self.stats.invalid <= LOGGED_INVALID {
            eprintln!(
                "blktap: {}: invalid request (id {}, op {}): {invalid}",
                self.image, raw.id, raw.operation
            );
        }
        self.respond(raw.id, raw.operation, invalid.status());
    }

    /// The request's buffers: one per segment, merged where segments are adjacent in memory.
    fn iovecs(&self, req: &Request) -> Option<Vec<libc::iovec>> {
        let shared = self.ring.shared();
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(req.segments().len());
        for (j, seg) in req.segments().iter().enumerate() {
            let page = shared.data_page(req.slot, j)?;
            // SAFETY: page_offset() + len() <= PAGE_SIZE for a validated segment, so the
            // pointer stays inside the data page.
            let base = unsafe { page.as_ptr().add(seg.page_offset()) };
            match iov.last_mut() {
                Some(last) if last.iov_base.cast::<u8>().wrapping_add(last.iov_len) == base => {
                    last.iov_len += seg.len();
                }
                _ => iov.push(libc::iovec {
                    iov_base: base.cast(),
                    iov_len: seg.len(),
                }),
            }
        }
        Some(iov)
    }

    /// Reaps the backend's completions and answers them, in one published batch.
    fn collect(&mut self) -> Result<(), ServeError> {
        let mut completions = std::mem::take(&mut self.completions);
        self.backend.reap(&mut completions);
        for c in completions.drain(..) {
            self.finish(c);
        }
        self.completions = completions;
        self.publish()
    }

    fn finish(&mut self, c: Completion) {
        let slot = c.tag as usize;
        let Some(done) = self.in_flight.get_mut(slot).and_then(Option::take) else {
            eprintln!("blktap: {}: completion for idle slot {slot}", self.image);
            return;
        };
        let status = match c.result {
            Ok(()) => {
                match done.op {
                    Op::Read => self.stats.bytes_read += done.bytes,
                    Op::Write => self.stats.bytes_written += done.bytes,
                }
                abi::RSP_OKAY
            }
            Err(e) => {
                self.stats.errors += 1;
                if self.stats.errors - self.stats.invalid <= LOGGED_FAILURES {
                    eprintln!(
                        "blktap: {}: {:?} of slot {slot} failed: {e}",
                        self.image, done.op
                    );
                }
                abi::RSP_ERROR
            }
        };
        self.respond(slot as u64, done.op.code(), status);
    }

    fn respond(&mut self, id: u64, operation: u8, status: i16) {
        if self.fault.is_some() {
            return;
        }
        let rsp = blktap_response {
            id,
            operation,
            status,
            ..Default::default()
        };
        if let Err(e) = self.ring.push_response(&rsp) {
            eprintln!("blktap: {}: response for id {id}: {e}", self.image);
        }
    }

    fn publish(&mut self) -> Result<(), ServeError> {
        if self.fault.is_some() {
            return Ok(());
        }
        self.ring.publish()?;
        Ok(())
    }
}
