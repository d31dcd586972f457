//! Serving a tap: requests from the ring go to an image backend, completions go back to the ring
//! as responses.
//!
//! Every request is copied out of the ring once and validated before use. Invalid requests are
//! answered with `-1` (unknown operations with `-2`) right away; valid ones become one backend
//! I/O straight between the image and the request's data pages. Responses are published in
//! batches: one `rsp_prod` store and one kick per batch. A ring whose producer index runs ahead
//! of what it may, or that reuses a data slot still in flight, is faulty: the tap is no longer
//! served (its in-flight I/O still completes, so the data pages are left alone after that).
//!
//! Flushes, FUA writes and discards go to the backend if it does them, and are answered `-2`
//! otherwise. A request that fails with an error that may pass (`EIO`, `EAGAIN`, `EINTR`,
//! `ENOMEM`, `EBUSY`) is tried again, after 10 ms, then twice as long each time (at most 1 s),
//! until its deadline ([`ServerOptions::deadline`], from when it was taken from the ring); if it
//! still fails then, it is answered `-1`. The retries are timers: [`Server::next_wakeup`] says
//! when, [`Server::run_timers`] runs them.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use blktap_abi::{self as abi, blktap_request, blktap_response};
use nix::errno::Errno;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Completion, Features, Io};
use crate::mapping::AlignedBuf;
use crate::ring::{
    validate_with, BackRing, Invalid, Op, Request, RingCorrupt, RingMemory, SharedRing, PAGE_SIZE,
    RING_MESSAGE_CLOSE, SECTOR_SIZE, STANDARD_PAGES_PER_SLOT,
};
use crate::{Error, Result};

#[cfg(test)]
mod tests;

/// How long a request may take, retries included, unless told otherwise (the original
/// tapdisk's deadline).
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);
/// The first wait before trying a failed request again.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// The longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

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

/// I/O counters of a tap (also the counters of the control protocol's `stats` answer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IoStats {
    /// Read requests started.
    pub reads: u64,
    /// Write requests started (without FUA).
    pub writes: u64,
    /// FUA write requests started.
    pub fua_writes: u64,
    /// Flush requests started.
    pub flushes: u64,
    /// Discard requests started.
    pub discards: u64,
    /// Bytes read successfully.
    pub bytes_read: u64,
    /// Bytes written successfully (FUA writes included).
    pub bytes_written: u64,
    /// Bytes discarded successfully.
    pub discarded_bytes: u64,
    /// Requests answered with an error (invalid, refused, or failed).
    pub errors: u64,
    /// Of those, requests that were invalid.
    pub invalid: u64,
    /// Requests answered "not supported" (`-2`): an operation the image does not do.
    pub unsupported: u64,
    /// Times a failed request was tried again.
    pub retries: u64,
    /// Requests taken from the ring (valid or not).
    #[serde(default)]
    pub requests: u64,
    /// Answers pushed onto the ring.
    #[serde(default)]
    pub responses: u64,
    /// Reads answered with an error.
    #[serde(default)]
    pub read_errors: u64,
    /// Writes (plain and FUA) answered with an error.
    #[serde(default)]
    pub write_errors: u64,
    /// Times the ring was looked at for new requests (each wake-up of its fd).
    #[serde(default)]
    pub kicks_in: u64,
    /// Times answers were published to the kernel (`RESPOND`).
    #[serde(default)]
    pub kicks_out: u64,
    /// `RESPOND` calls made only to have the kernel put its staged writes on the ring (seen
    /// staged while watching the ring, see [`Server::has_new_requests`]).
    #[serde(default)]
    pub drains: u64,
}

impl IoStats {
    fn count_error(&mut self, operation: u8) {
        self.errors += 1;
        match operation {
            abi::OP_READ => self.read_errors += 1,
            abi::OP_WRITE | abi::OP_WRITE_FUA => self.write_errors += 1,
            _ => {}
        }
    }
}

/// How a server treats its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerOptions {
    /// How long a request may take, retries included, before it is answered `-1`.
    pub deadline: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            deadline: DEFAULT_DEADLINE,
        }
    }
}

/// Whether a failure may pass, so that trying again makes sense.
pub fn is_transient(e: Errno) -> bool {
    matches!(
        e,
        Errno::EIO | Errno::EAGAIN | Errno::EINTR | Errno::ENOMEM | Errno::EBUSY
    )
}

/// The wait before try number `attempt + 1` (after `attempt` failures, from 1).
pub fn backoff(attempt: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
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

/// A request handed to the backend (or waiting to be tried again).
#[derive(Debug, Clone, Copy)]
struct InFlight {
    req: Request,
    /// When it was taken from the ring.
    started: Instant,
    /// Failed tries so far.
    failures: u32,
    /// When to try again, while waiting for that.
    retry_at: Option<Instant>,
}

/// The tags of external I/Os start here (ring requests are tagged by slot, below
/// `RING_SIZE`).
const EXTERNAL_TAG: u64 = 1 << 63;

/// Where an external I/O's result goes: its buffer back (filled, for a read) or an errno.
pub type ExternalReply = Box<dyn FnOnce(std::result::Result<AlignedBuf, Errno>) + Send>;

/// An I/O from outside the ring on the same image (an NBD client of the tap's export): queued on
/// the same backend as the ring's requests, so a flush from either side covers the writes
/// completed on both.
pub struct ExternalIo {
    /// What to do (`Read` fills `buf`; `Write`/`WriteFua` write it; `Flush`; `Discard` of
    /// `discard_len` bytes).
    pub op: Op,
    /// Byte offset on the image.
    pub offset: u64,
    /// The data (its length is the I/O's, for reads and writes; page-aligned, for `O_DIRECT`
    /// backends).
    pub buf: AlignedBuf,
    /// For `Discard`, the length of the range.
    pub discard_len: u64,
    /// Called once with the result.
    pub reply: ExternalReply,
}

impl std::fmt::Debug for ExternalIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalIo")
            .field("op", &self.op)
            .field("offset", &self.offset)
            .field("len", &self.buf.len())
            .field("discard_len", &self.discard_len)
            .finish()
    }
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
    options: ServerOptions,
    features: Features,
    device_flags: u64,
    in_flight: [Option<InFlight>; abi::RING_SIZE],
    stats: IoStats,
    fault: Option<RingFault>,
    fetched: Vec<blktap_request>,
    completions: Vec<Completion>,
    /// External I/Os handed to the backend, by tag; their buffers live here (an `AlignedBuf`'s
    /// memory does not move when the map does) until their completion.
    external: rustc_hash::FxHashMap<u64, ExternalIo>,
    next_external: u64,
    /// Whether the backend's reads return zeros ([`Backend::reads_zeros`]): then `unzeroed`
    /// is kept.
    reads_zeros: bool,
    /// Per slot, bit j set: data page j may hold something other than zeros. Every page starts
    /// so (a new mapping may hold an earlier user's data); a page is known to hold zeros once a
    /// read of all of it from a backend that reads zeros succeeded, and stops being so when any
    /// request other than a read arrives in its slot (the kernel copies write data in first).
    /// Reads into pages known to hold zeros are queued with [`Backend::queue_read_into_zeros`].
    unzeroed: [u128; abi::RING_SIZE],
}

/// Every data page of a slot (of up to 128 pages; the bits beyond a slot's pages are unused).
const ALL_PAGES: u128 = u128::MAX;
const _: () = assert!(abi::SEGMENT_MAX_LARGE <= u128::BITS as usize);

/// The bits of pages `0..n` of a slot (n <= 128).
fn first_pages(n: usize) -> u128 {
    match u32::try_from(n) {
        Ok(n) if n < u128::BITS => (1u128 << n) - 1,
        _ => ALL_PAGES,
    }
}

impl<M: RingMemory> Server<M> {
    /// Serves the ring in `memory` from `backend`, which holds image `image` (`type:path`, for
    /// messages). The disk has the backend's size, rounded down to whole sectors (see
    /// [`disk_sectors`]).
    pub fn new(memory: M, backend: Box<dyn Backend>, image: String, readonly: bool) -> Self {
        Self::with_options(memory, backend, image, readonly, ServerOptions::default())
    }

    /// As [`Server::new`], with `options`.
    pub fn with_options(
        memory: M,
        backend: Box<dyn Backend>,
        image: String,
        readonly: bool,
        options: ServerOptions,
    ) -> Self {
        let capacity = backend.size() / SECTOR_SIZE;
        let features = backend.features();
        let features_reads_zeros = backend.reads_zeros();
        Self {
            backend,
            ring: BackRing::new(memory),
            image,
            capacity,
            readonly,
            options,
            features,
            device_flags: 0,
            in_flight: [None; abi::RING_SIZE],
            stats: IoStats::default(),
            fault: None,
            fetched: Vec::with_capacity(abi::RING_SIZE),
            completions: Vec::with_capacity(abi::RING_SIZE),
            external: rustc_hash::FxHashMap::default(),
            next_external: EXTERNAL_TAG,
            reads_zeros: features_reads_zeros,
            unzeroed: [ALL_PAGES; abi::RING_SIZE],
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

    /// Starts the counters from `stats` (carried over from an earlier image of the same tap).
    pub fn set_stats(&mut self, stats: IoStats) {
        self.stats = stats;
    }

    /// The options.
    pub fn options(&self) -> ServerOptions {
        self.options
    }

    /// What the backend does beyond reads and writes.
    pub fn features(&self) -> Features {
        self.features
    }

    /// The flags the disk was created with (for reports).
    pub fn device_flags(&self) -> u64 {
        self.device_flags
    }

    /// Records the flags the disk was created with.
    pub fn set_device_flags(&mut self, flags: u64) {
        self.device_flags = flags;
    }

    /// The most pages a request may have: the mapping's pages per slot on a disk created with
    /// `DEVICE_LARGE_REQUESTS`, 11 otherwise.
    pub fn max_request_pages(&self) -> usize {
        if self.device_flags & abi::DEVICE_LARGE_REQUESTS != 0 {
            self.ring.memory().pages_per_slot()
        } else {
            STANDARD_PAGES_PER_SLOT
        }
    }

    /// Bytes of storage the image takes up, when the backend knows.
    pub fn allocated_bytes(&self) -> Option<u64> {
        self.backend.allocated_bytes()
    }

    /// Whether the ring holds requests not taken yet, or the kernel has staged writes for it,
    /// and they can be served (read from shared memory, without a system call: for polling the
    /// ring between wake-ups).
    pub fn has_new_requests(&self) -> bool {
        self.fault.is_none() && (self.ring.has_new() || self.staged() != 0)
    }

    /// Before sleeping: on a disk created with `DEVICE_REQ_EVENT`, asks the kernel to signal
    /// the ring at the next request (`req_event = req_cons + 1`), then, after a full barrier,
    /// looks at the ring once more. True if requests (or staged writes) came meanwhile: serve
    /// them instead of sleeping (the kernel may not signal them). Without the flag the kernel
    /// signals every request, and this does nothing (false).
    pub fn arm_wakeup(&self) -> bool {
        if self.device_flags & abi::DEVICE_REQ_EVENT == 0 {
            return false;
        }
        let shared = SharedRing::new(self.ring.memory());
        shared.set_req_event(self.ring.req_cons().wrapping_add(1));
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.has_new_requests()
    }

    /// The writes the kernel has staged (a disk with staged writes; always 0 otherwise: the
    /// field is padding the kernel leaves zero).
    fn staged(&self) -> u32 {
        SharedRing::new(self.ring.memory()).staged()
    }

    /// The statistics of the image's layers below the top one (see [`Backend::layers`]).
    pub fn layers(&self) -> Vec<crate::backend::LayerStats> {
        let mut out = Vec::new();
        self.backend.layers(&mut out);
        out
    }

    /// Requests handed to the backend, or waiting to be tried again, and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.iter().filter(|s| s.is_some()).count()
    }

    /// The server's state for a debug dump (SIGUSR1): ring indexes, the requests in flight by
    /// slot, the counters; one item per line.
    pub fn debug_state(&self) -> String {
        use std::fmt::Write as _;
        let shared = self.ring.shared();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "image {} ({} sectors{}), deadline {} s, device flags {:#x}",
            self.image,
            self.capacity,
            if self.readonly { ", read-only" } else { "" },
            self.options.deadline.as_secs(),
            self.device_flags
        );
        let _ = writeln!(
            out,
            "ring: req_prod {} req_cons {} rsp_prod {} (private {}), taken and unanswered {}, \
             answers unpublished {}, msg {}, fault {}",
            shared.req_prod(),
            self.ring.req_cons(),
            shared.rsp_prod(),
            self.ring.rsp_prod_pvt(),
            self.ring.outstanding(),
            self.ring.unpublished(),
            shared.msg(),
            self.fault.map_or("none".to_string(), |f| f.to_string())
        );
        let now = Instant::now();
        let _ = writeln!(
            out,
            "slots in flight: {} (the backend has {} I/Os)",
            self.in_flight(),
            self.backend.in_flight()
        );
        for f in self.in_flight.iter().flatten() {
            let _ = writeln!(
                out,
                "  slot {:2}: {:?} sector {} ({} sectors), for {} ms, {} failed tries{}",
                f.req.slot,
                f.req.op,
                f.req.sector,
                f.req.sectors(),
                now.saturating_duration_since(f.started).as_millis(),
                f.failures,
                f.retry_at.map_or(String::new(), |at| format!(
                    ", next try in {} ms",
                    at.saturating_duration_since(now).as_millis()
                ))
            );
        }
        let _ = write!(out, "counters: {:?}", self.stats);
        out
    }

    /// Answers at once every request waiting to be tried again after a transient error (a
    /// forced close: nobody waits for their deadline). Returns how many.
    pub fn fail_retries(&mut self) -> usize {
        let waiting: Vec<usize> = self
            .in_flight
            .iter()
            .enumerate()
            .filter(|(_, f)| f.is_some_and(|f| f.retry_at.is_some()))
            .map(|(slot, _)| slot)
            .collect();
        for &slot in &waiting {
            if let Some(f) = self.in_flight[slot].take() {
                self.stats.count_error(f.req.op.code());
                self.respond(slot as u64, f.req.op.code(), abi::RSP_ERROR);
            }
        }
        if let Err(e) = self.publish() {
            log::warn!("{}: {e}", self.image);
        }
        waiting.len()
    }

    /// Whether every request the ring has published was taken and answered (and published),
    /// and the backend has no I/O left: nothing of this server's is pending any more.
    pub fn idle(&self) -> bool {
        self.fault.is_none()
            && self.ring.shared().req_prod() == self.ring.req_cons()
            && self.ring.outstanding() == 0
            && self.ring.unpublished() == 0
            && self.in_flight() == 0
            && self.backend.in_flight() == 0
    }

    /// The header's message byte.
    pub fn msg(&self) -> u8 {
        self.ring.msg()
    }

    /// When the next retry is due, if one is waiting.
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.in_flight
            .iter()
            .flatten()
            .filter_map(|f| f.retry_at)
            .min()
    }

    /// Tries again the requests whose retry is due, and answers what has completed.
    pub fn run_timers(&mut self) -> Result<(), ServeError> {
        self.retry_due(Instant::now());
        let submitted = self.backend.submit();
        self.collect()?;
        submitted?;
        Ok(())
    }

    fn retry_due(&mut self, now: Instant) {
        for slot in 0..abi::RING_SIZE {
            let due = self.in_flight[slot]
                .as_ref()
                .and_then(|f| f.retry_at)
                .is_some_and(|at| at <= now);
            if due && self.fault.is_none() {
                if let Some(f) = self.in_flight[slot].as_mut() {
                    f.retry_at = None;
                }
                self.queue_io(slot);
            }
        }
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
        self.stats.kicks_in += 1;
        if self.staged() != 0 {
            // `RESPOND` (with or without answers) makes the kernel copy the staged writes'
            // data into their slots and put them on the ring; a poll of the ring does too, so
            // after a wake-up this is rare.
            self.ring.memory().kick()?;
            self.stats.drains += 1;
        }
        let mut fetched = std::mem::take(&mut self.fetched);
        fetched.clear();
        let result = self.ring.fetch(&mut fetched);
        if let Err(c) = result {
            self.fault = Some(c.into());
            self.fetched = fetched;
            return Err(RingFault::from(c).into());
        }
        // One clock reading for the batch: the requests of one fetch arrived together.
        let now = Instant::now();
        for raw in &fetched {
            if self.fault.is_some() {
                break;
            }
            self.start(raw, now);
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

    /// Starts an I/O from outside the ring on the same backend (answered through `io.reply`, by
    /// [`Server::serve_backend`] and the other calls that reap completions). It is checked as a
    /// ring request would be: inside the disk, not a write on a read-only disk, an operation the
    /// backend does. It is not tried again after a transient error: the caller (an NBD client)
    /// may. While it is in flight the server is not [idle](Server::idle), so a pause waits for it.
    pub fn queue_external(&mut self, io: ExternalIo) -> Result<(), ServeError> {
        let len = match io.op {
            Op::Discard => io.discard_len,
            Op::Flush => 0,
            _ => io.buf.len() as u64,
        };
        let refuse = if self.fault.is_some() {
            Some(Errno::EIO)
        } else if !self.features.supports(io.op) {
            Some(Errno::EOPNOTSUPP)
        } else if self.readonly && io.op.writes() {
            Some(Errno::EROFS)
        } else if io
            .offset
            .checked_add(len)
            .is_none_or(|end| end > self.capacity * SECTOR_SIZE)
        {
            Some(Errno::EINVAL)
        } else {
            None
        };
        if let Some(e) = refuse {
            (io.reply)(Err(e));
            return Ok(());
        }
        let tag = self.next_external;
        self.next_external = self.next_external.wrapping_add(1) | EXTERNAL_TAG;
        let mut io = io;
        let iov = if io.op.has_data() {
            vec![libc::iovec {
                iov_base: io.buf.as_mut_ptr().cast(),
                iov_len: io.buf.len(),
            }]
        } else {
            Vec::new()
        };
        let backend_io = Io {
            tag,
            op: io.op,
            offset: io.offset,
            iov,
            discard_len: if io.op == Op::Discard { len } else { 0 },
        };
        self.external.insert(tag, io);
        // SAFETY: the buffer is the allocation of an AlignedBuf kept in `self.external` until the
        // completion is handed out (or the backend, declared first, is dropped first); nothing
        // reaches it meanwhile.
        unsafe { self.backend.queue(backend_io) };
        let submitted = self.backend.submit();
        self.collect()?;
        submitted?;
        Ok(())
    }

    /// The allocation of a range of the image, when the backend can say (see
    /// [`Backend::block_status`]).
    pub fn block_status(&self, offset: u64, len: u64) -> Option<Vec<crate::backend::Extent>> {
        self.backend.block_status(offset, len)
    }

    /// External I/Os handed to the backend and not answered yet.
    pub fn external_in_flight(&self) -> usize {
        self.external.len()
    }

    /// Answers the I/O that has completed. Call when the backend's descriptor is readable.
    pub fn serve_backend(&mut self) -> Result<(), ServeError> {
        self.collect()
    }

    /// Waits for every I/O in flight and answers it, trying failed requests again until their
    /// deadline (this blocks meanwhile).
    pub fn drain(&mut self) -> Result<(), ServeError> {
        loop {
            let mut completions = std::mem::take(&mut self.completions);
            let drained = self.backend.drain(&mut completions);
            for c in completions.drain(..) {
                self.finish(c);
            }
            self.completions = completions;
            self.publish()?;
            drained?;
            let Some(at) = self.next_wakeup() else {
                return Ok(());
            };
            if self.fault.is_some() {
                return Ok(());
            }
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            self.retry_due(Instant::now());
            self.backend.submit()?;
        }
    }

    /// Stops serving: waits for the I/O in flight, answers it, drops the backend, and gives the
    /// ring's memory back.
    pub fn into_memory(mut self) -> M {
        if let Err(e) = self.drain() {
            log::warn!("{}: {e}", self.image);
        }
        let Server { backend, ring, .. } = self;
        drop(backend);
        ring.into_memory()
    }

    /// Starts one request (or answers it, if it cannot be started).
    fn start(&mut self, raw: &blktap_request, now: Instant) {
        self.stats.requests += 1;
        if raw.operation != abi::OP_READ {
            // The kernel may have copied data into the slot's pages (a write's), whether the
            // request is valid or not.
            if let Some(pages) = self.unzeroed.get_mut(raw.id as usize) {
                *pages = ALL_PAGES;
            }
        }
        let req = match validate_with(raw, self.capacity, self.max_request_pages()) {
            Ok(req) => req,
            Err(invalid) => return self.refuse(raw, invalid),
        };
        if self.in_flight[req.slot].is_some() {
            self.fault = Some(RingFault::SlotBusy(req.slot));
            return;
        }
        if !self.features.supports(req.op) {
            self.stats.unsupported += 1;
            return self.respond(raw.id, raw.operation, abi::RSP_EOPNOTSUPP);
        }
        if self.readonly && req.op.writes() {
            self.stats.count_error(raw.operation);
            return self.respond(raw.id, raw.operation, abi::RSP_ERROR);
        }
        match req.op {
            Op::Read => self.stats.reads += 1,
            Op::Write => self.stats.writes += 1,
            Op::WriteFua => self.stats.fua_writes += 1,
            Op::Flush => self.stats.flushes += 1,
            Op::Discard => self.stats.discards += 1,
        }
        self.in_flight[req.slot] = Some(InFlight {
            req,
            started: now,
            failures: 0,
            retry_at: None,
        });
        self.queue_io(req.slot);
    }

    /// Hands the request in flight in `slot` to the backend (again).
    fn queue_io(&mut self, slot: usize) {
        let Some(req) = self.in_flight[slot].as_ref().map(|f| f.req) else {
            return;
        };
        let iov = if req.op.has_data() {
            match self.iovecs(&req) {
                Some(iov) => iov,
                None => {
                    // Unreachable for a validated request: answer it anyway.
                    self.in_flight[slot] = None;
                    self.stats.count_error(req.op.code());
                    return self.respond(slot as u64, req.op.code(), abi::RSP_ERROR);
                }
            }
        } else {
            Vec::new()
        };
        let io = Io {
            tag: slot as u64,
            op: req.op,
            offset: req.offset(),
            iov,
            discard_len: if req.op == Op::Discard {
                req.bytes()
            } else {
                0
            },
        };
        let pages = first_pages(req.pages());
        let into_zeros = self.reads_zeros && req.op == Op::Read && self.unzeroed[slot] & pages == 0;
        // SAFETY: the buffers are inside the request's data pages (bounds-checked by
        // `data_page` and `validate`), in the ring memory this server owns. That memory outlives
        // the backend (declared first, dropped first, and `into_memory` drops it before handing
        // the memory back), and is only reached through raw pointers. With `into_zeros`, every
        // page the read covers holds zeros (`unzeroed`).
        unsafe {
            if into_zeros {
                self.backend.queue_read_into_zeros(io)
            } else {
                self.backend.queue(io)
            }
        };
    }

    fn refuse(&mut self, raw: &blktap_request, invalid: Invalid) {
        self.stats.count_error(raw.operation);
        self.stats.invalid += 1;
        if self.stats.invalid <= LOGGED_INVALID {
            log::warn!(
                "{}: invalid request (id {}, op {}): {invalid}",
                self.image,
                raw.id,
                raw.operation
            );
        }
        self.respond(raw.id, raw.operation, invalid.status());
    }

    /// The request's buffers: one per segment, merged where segments are adjacent in memory (a
    /// slot's pages are, so a large request, whose pages are full but the last, makes one).
    fn iovecs(&self, req: &Request) -> Option<Vec<libc::iovec>> {
        let shared = self.ring.shared();
        let mut iov: Vec<libc::iovec> =
            Vec::with_capacity(req.pages().min(STANDARD_PAGES_PER_SLOT));
        for (j, seg) in req.segments().enumerate() {
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
        if c.tag >= EXTERNAL_TAG {
            match self.external.remove(&c.tag) {
                Some(io) => (io.reply)(c.result.map(|()| io.buf)),
                None => log::warn!("{}: completion for unknown external I/O", self.image),
            }
            return;
        }
        let slot = c.tag as usize;
        let Some(done) = self.in_flight.get_mut(slot).and_then(|f| f.as_mut()) else {
            log::warn!("{}: completion for idle slot {slot}", self.image);
            return;
        };
        let op = done.req.op;
        let status = match c.result {
            Ok(()) => {
                if op == Op::Read && self.reads_zeros {
                    // The pages the read filled whole hold zeros now.
                    for (j, seg) in done.req.segments().enumerate() {
                        if seg.page_offset() == 0 && seg.len() == PAGE_SIZE {
                            self.unzeroed[slot] &= !(1u128 << j);
                        }
                    }
                }
                let bytes = done.req.bytes();
                match op {
                    Op::Read => self.stats.bytes_read += bytes,
                    Op::Write | Op::WriteFua => self.stats.bytes_written += bytes,
                    Op::Discard => self.stats.discarded_bytes += bytes,
                    Op::Flush => {}
                }
                abi::RSP_OKAY
            }
            Err(Errno::EOPNOTSUPP) => {
                self.stats.unsupported += 1;
                abi::RSP_EOPNOTSUPP
            }
            Err(e) => {
                let now = Instant::now();
                let deadline = done.started + self.options.deadline;
                if is_transient(e) && now < deadline {
                    done.failures += 1;
                    done.retry_at = Some((now + backoff(done.failures)).min(deadline));
                    self.stats.retries += 1;
                    if self.stats.retries <= LOGGED_FAILURES {
                        log::warn!(
                            "{}: {op:?} of slot {slot} failed: {e}; trying again",
                            self.image
                        );
                    }
                    return;
                }
                self.stats.count_error(op.code());
                if self.stats.errors - self.stats.invalid <= LOGGED_FAILURES {
                    log::warn!("{}: {op:?} of slot {slot} failed: {e}", self.image);
                }
                abi::RSP_ERROR
            }
        };
        self.in_flight[slot] = None;
        self.respond(slot as u64, op.code(), status);
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
        match self.ring.push_response(&rsp) {
            Ok(()) => self.stats.responses += 1,
            Err(e) => log::warn!("{}: response for id {id}: {e}", self.image),
        }
    }

    fn publish(&mut self) -> Result<(), ServeError> {
        if self.fault.is_some() {
            return Ok(());
        }
        if self.ring.publish()? {
            self.stats.kicks_out += 1;
        }
        Ok(())
    }
}
