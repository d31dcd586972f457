//! A tap as tapdisk serves it: its ring, and the image it serves the ring from, through the
//! tap's life: attached (ring mapped), open (serving), pausing, paused (image closed, disk kept),
//! and back.
//!
//! Generic over [`RingDevice`], so the whole life runs against a simulated kernel in tests.
//!
//! - Opening negotiates the extensions: `CREATE_DEVICE` with `FLUSH|FUA` and `DISCARD` where the
//!   backend does them (unless [`TapOptions::extensions`] is off) and `RECOVERY` if asked; a
//!   kernel that answers `EINVAL` (or `ENOTTY`) is asked again without `FLUSH|FUA|DISCARD`; if it
//!   refuses `RECOVERY` too, opening fails: recovery is unavailable. A ring mapped with more
//!   than 11 pages per slot ([`TapOptions::max_segments`]) asks for `LARGE_REQUESTS` first; a
//!   kernel that refuses it gets the ring mapped again with 11 pages per slot, and the other
//!   extensions as before.
//! - Recovering (`recover`) serves a disk that already exists (its requests were kept by the
//!   kernel for a new tapdisk): no `CREATE_DEVICE`; the image must have the disk's size, and the
//!   ring the disk's pages per slot (the kernel maps no other): more than 11 means the disk has
//!   large requests.
//! - Pausing: `PAUSE`, then the ring is served until every request the kernel handed out is
//!   answered and the backend has nothing in flight; then the image is closed. Unpausing opens
//!   the image again (or another of the same size), then `RESUME`. No request is failed because
//!   of a pause. The kernel's `msg` PAUSE and RESUME start the same procedures.

use std::os::fd::BorrowedFd;
use std::time::Instant;

use blktap_abi as abi;
use nix::errno::Errno;

use crate::backend::{self, Backend, Features, ImageSpec};
use crate::ctl::{TapEntry, TapState, TapStats};
use crate::ring::{
    DiskParams, RingDevice, SharedRing, RING_MESSAGE_CLOSE, RING_MESSAGE_PAUSE,
    RING_MESSAGE_RESUME, SECTOR_SIZE, STANDARD_PAGES_PER_SLOT,
};
use crate::server::{
    disk_sectors, ExternalIo, IoStats, RingFault, ServeError, Server, ServerOptions,
};
use crate::{Error, Result};

/// How a tap is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapOptions {
    /// The server's options (the request deadline).
    pub server: ServerOptions,
    /// Ask the kernel for flush, FUA and discard where the backend does them, and for staged
    /// writes if `staged_writes`.
    pub extensions: bool,
    /// Ask the kernel to copy write data in tapdisk's context (`DEVICE_STAGED_WRITES`), not on
    /// the submitter's CPU (with `extensions` only).
    pub staged_writes: bool,
    /// Ask the kernel to signal the ring only when tapdisk sleeps (`DEVICE_REQ_EVENT`: the
    /// header's `req_event`), not for every request while it polls (with `extensions` only).
    /// Off by default: measured alone it brought nothing (`Documentation/benchmarks.rst`).
    pub req_event: bool,
    /// The most pages per request to ask for: 11 (the default) is the standard ring; 12..=128
    /// maps the ring with that many data pages per slot and asks for `DEVICE_LARGE_REQUESTS`
    /// (with `extensions` only; see [`TapOptions::pages_per_slot`]).
    pub max_segments: usize,
}

impl TapOptions {
    /// The data pages per slot to map a tap's ring with: `max_segments` (clamped to 11..=128)
    /// with the extensions, 11 without.
    pub fn pages_per_slot(&self) -> usize {
        if self.extensions {
            self.max_segments
                .clamp(STANDARD_PAGES_PER_SLOT, abi::SEGMENT_MAX_LARGE)
        } else {
            STANDARD_PAGES_PER_SLOT
        }
    }
}

impl Default for TapOptions {
    fn default() -> Self {
        Self {
            server: ServerOptions::default(),
            extensions: true,
            staged_writes: true,
            req_event: false,
            max_segments: STANDARD_PAGES_PER_SLOT,
        }
    }
}

/// How to open an image on a tap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenArgs<'a> {
    /// The image, `type:path`.
    pub params: &'a str,
    /// A read-only disk.
    pub readonly: bool,
    /// Create the disk with `RECOVERY`: it and its requests outlive this tapdisk.
    pub recovery: bool,
    /// Serve the disk that exists already (a new tapdisk taking over): no `CREATE_DEVICE`.
    pub recover: bool,
    /// Never open the image with `O_DIRECT` (also when it is opened again after a pause).
    pub no_direct: bool,
    /// This tap's request deadline, instead of the tapdisk's.
    pub deadline: Option<std::time::Duration>,
}

/// A paused tap: the ring, and what to open again.
struct Paused<D> {
    ring: D,
    image: String,
    readonly: bool,
    no_direct: bool,
    capacity: u64,
    stats: IoStats,
    device_flags: u64,
}

enum Stage<D: RingDevice> {
    Attached(D),
    Open(Box<Server<D>>),
    Pausing(Box<Server<D>>),
    Paused(Box<Paused<D>>),
}

/// What a readable ring fd meant.
#[derive(Debug)]
pub enum TapEvent {
    /// Requests were served, or a message handled (or there was nothing).
    Served,
    /// The kernel asked for the tap to be shut down.
    CloseRequested,
    /// The ring broke the protocol: it is no longer served.
    Fault(RingFault),
    /// Something failed; serving goes on.
    Error(Error),
}

/// A tap: its ring, and its image once one is open.
pub struct TapCore<D: RingDevice> {
    /// `None` only while changing stage.
    stage: Option<Stage<D>>,
    options: TapOptions,
    /// The kernel asked for a resume while the pause was still draining.
    resume_requested: bool,
    /// Changes whenever the image (and so the backend's fd) is opened or closed.
    generation: u64,
    /// The image is opened without `O_DIRECT`.
    no_direct: bool,
}

impl<D: RingDevice> TapCore<D> {
    /// A tap whose ring `ring` is mapped.
    pub fn attach(ring: D, options: TapOptions) -> Self {
        Self {
            stage: Some(Stage::Attached(ring)),
            options,
            resume_requested: false,
            generation: 0,
            no_direct: false,
        }
    }

    /// A number that changes whenever the image is opened or closed: the backend's fd (to
    /// poll) may have changed.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn stage(&self) -> &Stage<D> {
        self.stage.as_ref().expect("a tap always has a stage")
    }

    /// The ring.
    pub fn ring(&self) -> &D {
        match self.stage() {
            Stage::Attached(ring) => ring,
            Stage::Open(s) | Stage::Pausing(s) => s.memory(),
            Stage::Paused(p) => &p.ring,
        }
    }

    /// The tap's minor.
    pub fn minor(&self) -> u32 {
        self.ring().minor()
    }

    /// The server, while an image is open.
    pub fn server(&self) -> Option<&Server<D>> {
        match self.stage() {
            Stage::Open(s) | Stage::Pausing(s) => Some(s),
            _ => None,
        }
    }

    fn server_mut(&mut self) -> Option<&mut Server<D>> {
        match self.stage.as_mut()? {
            Stage::Open(s) | Stage::Pausing(s) => Some(s),
            _ => None,
        }
    }

    /// The tap's state.
    pub fn state(&self) -> TapState {
        match self.stage() {
            Stage::Attached(_) => TapState::Attached,
            Stage::Open(s) | Stage::Pausing(s) if s.fault().is_some() => TapState::Dead,
            Stage::Open(_) => TapState::Open,
            Stage::Pausing(_) => TapState::Pausing,
            Stage::Paused(_) => TapState::Paused,
        }
    }

    /// Whether the tap has a disk (an image open, or paused).
    pub fn has_disk(&self) -> bool {
        !matches!(self.stage(), Stage::Attached(_))
    }

    /// Starts an I/O from outside the ring (an NBD client of the tap's export) on the tap's
    /// image while it is open; hands it back while the tap has no image or is pausing or paused
    /// (the caller holds it until the tap is open again). See [`Server::queue_external`].
    pub fn queue_external(&mut self, io: ExternalIo) -> std::result::Result<(), ExternalIo> {
        let minor = self.minor();
        match self.stage.as_mut() {
            Some(Stage::Open(s)) => {
                if let Err(e) = s.queue_external(io) {
                    log::warn!("tap {minor}: {e}");
                }
                Ok(())
            }
            _ => Err(io),
        }
    }

    /// The backend's completion fd, when an image is open and has one.
    pub fn backend_fd(&self) -> Option<BorrowedFd<'_>> {
        self.server()?.backend_fd()
    }

    /// Opens image `args.params` and creates the disk (or, recovering, takes over the disk).
    pub fn open(&mut self, args: &OpenArgs<'_>) -> Result<()> {
        self.check_attached()?;
        let spec: ImageSpec = args.params.parse()?;
        let deadline = args.deadline.unwrap_or(self.options.server.deadline);
        let backend = backend::open_for_tap(&spec, args.readonly, !args.no_direct, deadline)?;
        self.open_backend(args, &spec.to_string(), backend)
    }

    fn check_attached(&self) -> Result<()> {
        match self.stage() {
            Stage::Attached(_) => Ok(()),
            _ => Err(Error::os(
                format!("tap {} already has a disk", self.minor()),
                Errno::EBUSY,
            )),
        }
    }

    /// Opens `backend`, holding `image`, as [`TapCore::open`] does.
    pub fn open_backend(
        &mut self,
        args: &OpenArgs<'_>,
        image: &str,
        backend: Box<dyn Backend>,
    ) -> Result<()> {
        self.check_attached()?;
        let capacity = disk_sectors(backend.as_ref())?;
        let minor = self.minor();
        let ring = self.ring();
        let flags = if args.recover {
            match ring.existing_disk()? {
                None => {
                    return Err(Error::os(
                        format!("tap {minor} has no disk to recover"),
                        Errno::ENODEV,
                    ))
                }
                Some(sectors) if sectors != capacity => {
                    return Err(Error::os(
                        format!(
                            "cannot recover tap {minor}: its disk has {sectors} sectors, \
                             {image} has {capacity}"
                        ),
                        Errno::EINVAL,
                    ))
                }
                // The kernel maps a ring with more than 11 pages per slot only for a disk
                // created with large requests and that mapping: it sends them.
                Some(_) if ring.pages_per_slot() > STANDARD_PAGES_PER_SLOT => {
                    abi::DEVICE_LARGE_REQUESTS
                }
                Some(_) => 0,
            }
        } else {
            let params = DiskParams::new(capacity, args.readonly, image);
            negotiate(
                ring,
                params,
                backend.features(),
                self.options,
                args.recovery,
            )?
        };
        let Some(Stage::Attached(ring)) = self.stage.take() else {
            unreachable!("checked above");
        };
        if let Some(deadline) = args.deadline {
            self.options.server.deadline = deadline;
        }
        self.no_direct = args.no_direct;
        let mut server = Server::with_options(
            ring,
            backend,
            image.to_string(),
            args.readonly,
            self.options.server,
        );
        server.set_device_flags(flags);
        self.stage = Some(Stage::Open(Box::new(server)));
        self.generation += 1;
        if args.recover {
            // The kept requests are on the ring already.
            if let Err(e) = self.serve() {
                log::warn!("tap {minor}: {e}");
            }
        }
        Ok(())
    }

    /// Waits for the I/O in flight, removes the disk and closes the image (a paused tap's disk
    /// is removed as it is). On failure (`EBUSY` while the disk is open) nothing changes.
    pub fn close(&mut self) -> Result<()> {
        let minor = self.minor();
        match self.stage.as_mut().expect("a tap always has a stage") {
            Stage::Attached(_) => {
                return Err(Error::os(
                    format!("tap {minor} has no image open"),
                    Errno::EINVAL,
                ))
            }
            Stage::Open(server) | Stage::Pausing(server) => {
                if let Err(e) = server.drain() {
                    log::warn!("tap {minor}: {e}");
                }
                server.memory().remove_device()?;
            }
            Stage::Paused(p) => p.ring.remove_device()?,
        }
        let ring = match self.stage.take() {
            Some(Stage::Open(s) | Stage::Pausing(s)) => s.into_memory(),
            Some(Stage::Paused(p)) => p.ring,
            _ => unreachable!("checked above"),
        };
        self.resume_requested = false;
        self.stage = Some(Stage::Attached(ring));
        self.generation += 1;
        Ok(())
    }

    /// Starts pausing: `PAUSE`, then the requests already handed out are served. Returns whether
    /// the tap is paused already; if not, [`TapCore::advance`] says when it is.
    pub fn pause(&mut self) -> Result<bool> {
        let minor = self.minor();
        match self.stage() {
            Stage::Attached(_) => {
                return Err(Error::os(
                    format!("tap {minor} has no image open to pause"),
                    Errno::EINVAL,
                ))
            }
            Stage::Open(s) if s.fault().is_some() => {
                return Err(Error::os(
                    format!("tap {minor} broke the ring protocol and is not served"),
                    Errno::EIO,
                ))
            }
            Stage::Open(s) => s.memory().pause()?,
            Stage::Pausing(_) => return Ok(false),
            Stage::Paused(p) => {
                // Idempotent; clears a PAUSE message.
                p.ring.pause()?;
                return Ok(true);
            }
        }
        let Some(Stage::Open(server)) = self.stage.take() else {
            unreachable!("checked above");
        };
        self.stage = Some(Stage::Pausing(server));
        // Requests published before PAUSE returned are on the ring: take them.
        if let Err(e) = self.serve() {
            log::warn!("tap {minor}: {e}");
        }
        match self.advance() {
            Some(Err(e)) => Err(e),
            // Paused (and maybe resumed again right away, for a RESUME message).
            Some(Ok(())) => Ok(true),
            None => Ok(false),
        }
    }

    /// Moves a pause on: once every request is answered and the backend is idle, closes the
    /// image (`Some(Ok)`: the tap is paused now). `Some(Err)`: the pause cannot finish (the ring
    /// broke the protocol). A resume the kernel asked for meanwhile is carried out after.
    pub fn advance(&mut self) -> Option<Result<()>> {
        let minor = self.minor();
        let result = match self.stage() {
            Stage::Pausing(s) if s.fault().is_some() => {
                let Some(Stage::Pausing(server)) = self.stage.take() else {
                    unreachable!()
                };
                self.stage = Some(Stage::Open(server));
                Some(Err(Error::os(
                    format!("tap {minor} broke the ring protocol while pausing"),
                    Errno::EIO,
                )))
            }
            Stage::Pausing(s) if s.idle() => {
                let Some(Stage::Pausing(server)) = self.stage.take() else {
                    unreachable!()
                };
                let paused = Paused {
                    image: server.image().to_string(),
                    readonly: server.readonly(),
                    no_direct: self.no_direct,
                    capacity: server.capacity(),
                    stats: server.stats(),
                    device_flags: server.device_flags(),
                    // Drops the backend: the image is closed.
                    ring: server.into_memory(),
                };
                self.stage = Some(Stage::Paused(Box::new(paused)));
                self.generation += 1;
                Some(Ok(()))
            }
            _ => None,
        };
        if self.resume_requested && matches!(self.stage(), Stage::Paused(_)) {
            self.resume_requested = false;
            if let Err(e) = self.unpause(None) {
                log::warn!("tap {minor}: resuming as the kernel asked: {e}");
            }
        }
        result
    }

    /// Opens the image again (`params`, or the one it had), which must have the disk's size,
    /// then `RESUME`. On failure the tap stays paused.
    pub fn unpause(&mut self, params: Option<&str>) -> Result<()> {
        let minor = self.minor();
        let p = match self.stage() {
            Stage::Paused(p) => p,
            Stage::Open(s) => {
                if params.is_some_and(|p| p != s.image()) {
                    return Err(Error::os(
                        format!("tap {minor} is not paused: cannot change its image"),
                        Errno::EINVAL,
                    ));
                }
                // Idempotent; clears a RESUME message.
                return s.memory().resume();
            }
            Stage::Pausing(_) => {
                return Err(Error::os(
                    format!("tap {minor} is still pausing: try again once it is paused"),
                    Errno::EBUSY,
                ))
            }
            Stage::Attached(_) => {
                return Err(Error::os(
                    format!("tap {minor} has no image to unpause"),
                    Errno::EINVAL,
                ))
            }
        };
        let spec: ImageSpec = params.unwrap_or(&p.image).parse()?;
        let backend = backend::open_for_tap(
            &spec,
            p.readonly,
            !p.no_direct,
            self.options.server.deadline,
        )?;
        self.unpause_backend(&spec.to_string(), backend)
    }

    /// Resumes a paused tap with `backend`, holding `image`, as [`TapCore::unpause`] does.
    pub fn unpause_backend(&mut self, image: &str, backend: Box<dyn Backend>) -> Result<()> {
        let minor = self.minor();
        let Stage::Paused(p) = self.stage() else {
            return Err(Error::os(
                format!("tap {minor} is not paused"),
                Errno::EINVAL,
            ));
        };
        let sectors = backend.size() / SECTOR_SIZE;
        if sectors != p.capacity {
            return Err(Error::os(
                format!(
                    "tap {minor} stays paused: {image} has {sectors} sectors, the disk has {}",
                    p.capacity
                ),
                Errno::EINVAL,
            ));
        }
        let Some(Stage::Paused(p)) = self.stage.take() else {
            unreachable!("checked above");
        };
        let Paused {
            ring,
            readonly,
            no_direct,
            capacity,
            stats,
            device_flags,
            image: old_image,
        } = *p;
        let mut server =
            Server::with_options(ring, backend, image.into(), readonly, self.options.server);
        server.set_stats(stats);
        server.set_device_flags(device_flags);
        if let Err(e) = server.memory().resume() {
            let ring = server.into_memory();
            self.stage = Some(Stage::Paused(Box::new(Paused {
                ring,
                image: old_image,
                readonly,
                no_direct,
                capacity,
                stats,
                device_flags,
            })));
            return Err(e);
        }
        self.stage = Some(Stage::Open(Box::new(server)));
        self.generation += 1;
        if let Err(e) = self.serve() {
            log::warn!("tap {minor}: {e}");
        }
        Ok(())
    }

    fn serve(&mut self) -> Result<(), ServeError> {
        match self.server_mut() {
            Some(s) => s.serve_ring(),
            None => Ok(()),
        }
    }

    /// Handles a readable ring fd: the kernel's message, then new requests.
    pub fn on_ring(&mut self) -> TapEvent {
        let msg = SharedRing::new(self.ring()).msg();
        match msg {
            RING_MESSAGE_CLOSE => return TapEvent::CloseRequested,
            RING_MESSAGE_PAUSE if self.has_disk() => {
                if let Err(e) = self.pause() {
                    return TapEvent::Error(e);
                }
            }
            RING_MESSAGE_RESUME if self.has_disk() => match self.stage() {
                Stage::Pausing(_) => self.resume_requested = true,
                _ => {
                    if let Err(e) = self.unpause(None) {
                        return TapEvent::Error(e);
                    }
                }
            },
            _ => {}
        }
        match self.serve() {
            Ok(()) => TapEvent::Served,
            Err(ServeError::Fault(f)) => TapEvent::Fault(f),
            Err(ServeError::Sys(e)) => TapEvent::Error(e),
        }
    }

    /// Answers completed I/O after the backend's fd polled readable.
    pub fn on_backend(&mut self) -> Result<(), ServeError> {
        match self.server_mut() {
            Some(s) => s.serve_backend(),
            None => Ok(()),
        }
    }

    /// Whether the tap serves its ring and the kernel published requests it has not taken yet
    /// (see [`Server::has_new_requests`]); [`TapCore::on_ring`] serves them.
    pub fn has_new_requests(&self) -> bool {
        self.server().is_some_and(Server::has_new_requests)
    }

    /// Before tapdisk sleeps: asks the kernel to signal the next request, where the disk
    /// negotiated `DEVICE_REQ_EVENT` ([`Server::arm_wakeup`]). True if requests came meanwhile:
    /// serve them instead of sleeping.
    pub fn arm_wakeup(&self) -> bool {
        self.server().is_some_and(Server::arm_wakeup)
    }

    /// Whether the tap's image has I/O in flight (its completion comes on the backend's fd).
    pub fn backend_busy(&self) -> bool {
        self.server().is_some_and(|s| s.in_flight() > 0)
    }

    /// When [`TapCore::on_timer`] has work to do (retries).
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.server()?.next_wakeup()
    }

    /// Runs the retries that are due.
    pub fn on_timer(&mut self) -> Result<(), ServeError> {
        match self.server_mut() {
            Some(s) => s.run_timers(),
            None => Ok(()),
        }
    }

    /// Shuts the tap down for good: waits for its I/O, removes the disk (errors are logged),
    /// and gives the ring back.
    pub fn shut_down(mut self) -> D {
        if self.has_disk() {
            if let Err(e) = self.close() {
                log::warn!("tap {}: {e}; dropping the ring anyway", self.minor());
            }
        }
        match self.stage.take().expect("a tap always has a stage") {
            Stage::Attached(ring) => ring,
            Stage::Open(s) | Stage::Pausing(s) => s.into_memory(),
            Stage::Paused(p) => p.ring,
        }
    }

    /// The tap's state for a debug dump (SIGUSR1), one item per line.
    pub fn debug_state(&self) -> String {
        let head = format!(
            "state {:?} (list state {:#x}), generation {}{}",
            self.state(),
            self.state().code(),
            self.generation,
            if self.resume_requested {
                ", resume requested"
            } else {
                ""
            }
        );
        match self.stage() {
            Stage::Attached(_) => format!("{head}\nno image"),
            Stage::Open(s) | Stage::Pausing(s) => format!("{head}\n{}", s.debug_state()),
            Stage::Paused(p) => format!(
                "{head}\nimage {} closed while paused ({} sectors), counters: {:?}",
                p.image, p.capacity, p.stats
            ),
        }
    }

    /// Forced close: fails the requests waiting to be tried again, then closes as
    /// [`TapCore::close`] does.
    pub fn force_close(&mut self) -> Result<()> {
        if let Some(s) = self.server_mut() {
            let n = s.fail_retries();
            if n > 0 {
                log::warn!(
                    "tap {}: forced close: failed {n} requests waiting to be tried again",
                    self.minor()
                );
            }
        }
        self.close()
    }

    /// The tap as `list` shows it.
    pub fn entry(&self) -> TapEntry {
        let (params, readonly) = match self.stage() {
            Stage::Attached(_) => (None, false),
            Stage::Open(s) | Stage::Pausing(s) => (Some(s.image().to_string()), s.readonly()),
            Stage::Paused(p) => (Some(p.image.clone()), p.readonly),
        };
        TapEntry {
            minor: self.minor(),
            state: self.state(),
            params,
            readonly,
        }
    }

    /// The tap's counters.
    pub fn stats(&self) -> TapStats {
        let mut stats = TapStats {
            minor: self.minor(),
            state: Some(self.state()),
            ..Default::default()
        };
        match self.stage() {
            Stage::Attached(_) => {}
            Stage::Open(s) | Stage::Pausing(s) => {
                stats.image = Some(s.image().to_string());
                stats.sectors = s.capacity();
                stats.size = s.capacity() * SECTOR_SIZE;
                stats.readonly = s.readonly();
                stats.io = s.stats();
                stats.in_flight = s.in_flight() as u64;
                stats.allocated_bytes = s.allocated_bytes();
                stats.layers = s.layers();
                stats.device_flags = s.device_flags();
            }
            Stage::Paused(p) => {
                stats.image = Some(p.image.clone());
                stats.sectors = p.capacity;
                stats.size = p.capacity * SECTOR_SIZE;
                stats.readonly = p.readonly;
                stats.io = p.stats;
                stats.device_flags = p.device_flags;
            }
        }
        stats
    }
}

/// The extension flags for a backend that does `features`.
pub fn extension_flags(features: Features) -> u64 {
    let mut flags = 0;
    if features.flush {
        flags |= abi::DEVICE_FLUSH;
        // FUA only together with FLUSH.
        if features.fua {
            flags |= abi::DEVICE_FUA;
        }
    }
    if features.discard {
        flags |= abi::DEVICE_DISCARD;
    }
    flags
}

/// `CREATE_DEVICE` with the extensions, falling back as the kernel asks. Returns the flags the
/// disk was created with.
///
/// With a ring mapped with more than 11 pages per slot, `LARGE_REQUESTS` is asked for first,
/// with the rest; a refusal maps the ring again with 11 pages per slot (the kernel maps a larger
/// ring only for large requests) before the ladder goes on without it. The ring is mapped
/// again, too, when the extensions are off.
fn negotiate<D: RingDevice>(
    ring: &D,
    mut params: DiskParams,
    features: Features,
    options: TapOptions,
    recovery: bool,
) -> Result<u64> {
    let recovery_flag = if recovery { abi::DEVICE_RECOVERY } else { 0 };
    let ext = if options.extensions {
        extension_flags(features)
    } else {
        0
    };
    let staged = if options.extensions && options.staged_writes {
        abi::DEVICE_STAGED_WRITES
    } else {
        0
    };
    let req_event = if options.extensions && options.req_event {
        abi::DEVICE_REQ_EVENT
    } else {
        0
    };
    let large_ring = ring.pages_per_slot() > STANDARD_PAGES_PER_SLOT;
    let large = if options.extensions && large_ring {
        abi::DEVICE_LARGE_REQUESTS
    } else {
        if large_ring {
            standard_ring(ring)?;
        }
        0
    };
    let refused = |e: &Error| matches!(Errno::from_raw(e.errno()), Errno::EINVAL | Errno::ENOTTY);
    // The newest extension is dropped first: a kernel that knows the others but not the newest
    // (an earlier version of this module) keeps them. Newest first: large requests, req_event,
    // staged writes.
    let mut flags = large | ext | staged | req_event;
    loop {
        params.flags = flags | recovery_flag;
        match ring.create_device(&params) {
            Ok(()) => return Ok(params.flags),
            Err(e) if flags != 0 && refused(&e) => {
                let fewer = if flags & large != 0 {
                    flags & !large
                } else if flags & req_event != 0 {
                    flags & !req_event
                } else if flags & staged != 0 {
                    ext
                } else {
                    0
                };
                log::warn!(
                    "tap {}: the kernel refused the extensions {flags:#x} ({e}); \
                     creating the disk with {fewer:#x}",
                    ring.minor()
                );
                if flags & large != 0 {
                    standard_ring(ring)?;
                }
                flags = fewer;
            }
            Err(e) => return Err(recovery_error(e, recovery, ring.minor())),
        }
    }
}

/// Maps `ring` again with the standard 11 pages per slot (before its disk is created).
fn standard_ring<D: RingDevice>(ring: &D) -> Result<()> {
    // SAFETY: called while the tap is only attached, before its disk is created: no server
    // exists, so no I/O is in flight into the ring's memory and no view or pointer into it is
    // kept (`SharedRing`s live only inside the calls that make them).
    unsafe { ring.remap(STANDARD_PAGES_PER_SLOT) }
}

fn recovery_error(e: Error, recovery: bool, minor: u32) -> Error {
    let refused = matches!(Errno::from_raw(e.errno()), Errno::EINVAL | Errno::ENOTTY);
    if recovery && refused {
        Error::os(
            format!(
                "create the disk of tap {minor}: recovery is unavailable, this kernel refuses \
                 BLKTAP_DEVICE_RECOVERY ({e})"
            ),
            Errno::from_raw(e.errno()),
        )
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use super::*;
    use crate::backend::immediate::Synchronous;
    use crate::backend::ram::RamBackend;
    use crate::backend::{Completion, ImageKind, Io};
    use crate::ring::EXTENSION_FLAGS;
    use crate::testkit::{SimDevice, SimKernel};

    const R: u8 = abi::OP_READ;
    const W: u8 = abi::OP_WRITE;

    type Tap = TapCore<Rc<SimDevice>>;

    fn ram(size: u64) -> Box<dyn Backend> {
        Box::new(Synchronous::new(RamBackend::new(size).unwrap()))
    }

    fn open_args(recovery: bool, recover: bool) -> OpenArgs<'static> {
        OpenArgs {
            params: "ram:1M",
            readonly: false,
            recovery,
            recover,
            ..Default::default()
        }
    }

    fn open_tap(k: &SimKernel, options: TapOptions, backend: Box<dyn Backend>) -> Tap {
        let mut tap = TapCore::attach(Rc::clone(&k.mem), options);
        tap.open_backend(&open_args(false, false), "ram:1M", backend)
            .unwrap();
        tap
    }

    fn ids(k: &mut SimKernel) -> Vec<(u64, i16)> {
        k.responses().iter().map(|r| (r.id, r.status)).collect()
    }

    /// [`ids`] sorted: a staged write reaches the ring after the reads published beside it, so
    /// its answer may come after theirs.
    fn sorted_ids(k: &mut SimKernel) -> Vec<(u64, i16)> {
        let mut v = ids(k);
        v.sort_unstable();
        v
    }

    #[test]
    fn extensions_are_negotiated_and_fall_back() {
        let all = abi::DEVICE_FLUSH | abi::DEVICE_FUA | abi::DEVICE_DISCARD;
        let staged = abi::DEVICE_STAGED_WRITES;
        let ev = abi::DEVICE_REQ_EVENT;
        // Asked for everything (req_event is off by default), a kernel that knows them.
        let every = TapOptions {
            req_event: true,
            ..Default::default()
        };
        let k = SimKernel::new();
        let tap = open_tap(&k, every, ram(1 << 20));
        assert_eq!(k.state().creates, [all | staged | ev]);
        assert_eq!(k.state().disk, Some((2048, all | staged | ev)));
        assert_eq!(tap.stats().device_flags, all | staged | ev);
        assert_eq!(tap.state(), TapState::Open);

        // A kernel that knows all but req_event keeps the others.
        let k = SimKernel::new();
        k.state_mut().known_flags = all | staged | abi::DEVICE_RECOVERY;
        let _tap = open_tap(&k, every, ram(1 << 20));
        assert_eq!(k.state().creates, [all | staged | ev, all | staged]);
        assert_eq!(k.state().disk, Some((2048, all | staged)));

        // A kernel that knows neither staged writes nor req_event keeps the others.
        let k = SimKernel::new();
        k.state_mut().known_flags = all | abi::DEVICE_RECOVERY;
        let _tap = open_tap(&k, every, ram(1 << 20));
        assert_eq!(k.state().creates, [all | staged | ev, all | staged, all]);
        assert_eq!(k.state().disk, Some((2048, all)));

        // An old kernel: EINVAL, then the old behaviour.
        let k = SimKernel::new();
        k.state_mut().known_flags = 0;
        let _tap = open_tap(&k, every, ram(1 << 20));
        assert_eq!(k.state().creates, [all | staged | ev, all | staged, all, 0]);
        assert_eq!(k.state().disk, Some((2048, 0)));

        // Staged writes and req_event not asked for.
        let k = SimKernel::new();
        let options = TapOptions {
            staged_writes: false,
            req_event: false,
            ..Default::default()
        };
        let _tap = open_tap(&k, options, ram(1 << 20));
        assert_eq!(k.state().creates, [all]);

        // The default: req_event not asked for.
        let k = SimKernel::new();
        let _tap = open_tap(&k, TapOptions::default(), ram(1 << 20));
        assert_eq!(k.state().creates, [all | staged]);

        // --no-extensions: never asked.
        let k = SimKernel::new();
        let options = TapOptions {
            extensions: false,
            ..Default::default()
        };
        let _tap = open_tap(&k, options, ram(1 << 20));
        assert_eq!(k.state().creates, [0]);

        // Recovery on an old kernel: refused at every step, and opening fails clearly.
        let k = SimKernel::new();
        k.state_mut().known_flags = 0;
        let mut tap = TapCore::attach(Rc::clone(&k.mem), every);
        let e = tap
            .open_backend(&open_args(true, false), "ram:1M", ram(1 << 20))
            .unwrap_err();
        assert!(e.to_string().contains("recovery is unavailable"), "{e}");
        assert_eq!(e.errno(), libc::EINVAL);
        let r = abi::DEVICE_RECOVERY;
        assert_eq!(
            k.state().creates,
            [all | staged | ev | r, all | staged | r, all | r, r]
        );
        assert_eq!(tap.state(), TapState::Attached);
        // A kernel that knows RECOVERY only.
        k.state_mut().known_flags = abi::DEVICE_RECOVERY;
        tap.open_backend(&open_args(true, false), "ram:1M", ram(1 << 20))
            .unwrap();
        assert_eq!(k.state().disk, Some((2048, abi::DEVICE_RECOVERY)));
    }

    #[test]
    fn large_requests_are_negotiated_with_a_larger_ring_and_fall_back_to_the_standard_one() {
        use crate::ring::RingMemory;
        let all = abi::DEVICE_FLUSH | abi::DEVICE_FUA | abi::DEVICE_DISCARD;
        let staged = abi::DEVICE_STAGED_WRITES;
        let large = abi::DEVICE_LARGE_REQUESTS;
        let options = TapOptions {
            max_segments: 64,
            ..Default::default()
        };
        assert_eq!(options.pages_per_slot(), 64);
        assert_eq!(TapOptions::default().pages_per_slot(), 11);
        let off = TapOptions {
            extensions: false,
            ..options
        };
        assert_eq!(off.pages_per_slot(), 11);
        let huge = TapOptions {
            max_segments: 4096,
            ..options
        };
        assert_eq!(huge.pages_per_slot(), 128);

        // A kernel that knows large requests, a ring of 64 pages per slot.
        let mut k = SimKernel::with_pages_per_slot(64);
        let mut tap = open_tap(&k, options, ram(1 << 20));
        assert_eq!(k.state().creates, [large | all | staged]);
        assert_eq!((k.state().disk_pages, k.mem.pages_per_slot()), (64, 64));
        assert!(k.state().remaps.is_empty());
        assert_eq!(tap.stats().device_flags & large, large);
        // A request of 64 pages is served.
        for j in 0..64 {
            k.fill(5, j, |i| (i + j) as u8);
        }
        k.submit(&SimKernel::transfer(W, 5, 0, 64 * 8));
        tap.on_ring();
        assert_eq!(ids(&mut k), [(5, 0)]);
        k.submit(&SimKernel::transfer(R, 6, 0, 64 * 8));
        tap.on_ring();
        assert_eq!(ids(&mut k), [(6, 0)]);
        assert!((0..64).all(|j| k.page(6, j) == k.page(5, j)));

        // A kernel that refuses LARGE_REQUESTS at CREATE_DEVICE: the ring is mapped again with
        // 11 pages per slot, and the other extensions negotiated as before.
        let mut k = SimKernel::with_pages_per_slot(64);
        k.state_mut().known_flags = EXTENSION_FLAGS & !large;
        let mut tap = open_tap(&k, options, ram(1 << 20));
        assert_eq!(k.state().creates, [large | all | staged, all | staged]);
        assert_eq!(k.state().remaps, [11]);
        assert_eq!((k.state().disk_pages, k.mem.pages_per_slot()), (11, 11));
        assert_eq!(tap.stats().device_flags & large, 0);
        // Requests of more than 11 pages are invalid then.
        k.submit(&SimKernel::transfer(R, 1, 0, 12 * 8));
        k.submit(&SimKernel::transfer(R, 2, 0, 11 * 8));
        tap.on_ring();
        assert_eq!(sorted_ids(&mut k), [(1, abi::RSP_ERROR), (2, 0)]);

        // An old kernel refuses every extension: down to no flags, on the standard ring.
        let k = SimKernel::with_pages_per_slot(128);
        k.state_mut().known_flags = 0;
        let _tap = open_tap(&k, options, ram(1 << 20));
        assert_eq!(
            k.state().creates,
            [large | all | staged, all | staged, all, 0]
        );
        assert_eq!(k.state().remaps, [11]);
        assert_eq!(k.state().disk, Some((2048, 0)));

        // Without the extensions a larger ring is mapped again before CREATE_DEVICE.
        let k = SimKernel::with_pages_per_slot(64);
        let _tap = open_tap(&k, off, ram(1 << 20));
        assert_eq!(
            (k.state().remaps.clone(), k.state().creates.clone()),
            (vec![11], vec![0])
        );

        // A standard ring never asks for large requests.
        let k = SimKernel::new();
        let _tap = open_tap(&k, options, ram(1 << 20));
        assert_eq!(k.state().creates, [all | staged]);
        assert!(k.state().remaps.is_empty());
    }

    #[test]
    fn a_recovering_tapdisk_serves_large_requests_on_a_ring_of_the_disks_pages() {
        let mut k = SimKernel::with_pages_per_slot(128);
        let options = TapOptions {
            max_segments: 128,
            ..Default::default()
        };
        let (backend, _gate) = gated(1 << 20);
        let mut first = TapCore::attach(Rc::clone(&k.mem), options);
        first
            .open_backend(&open_args(true, false), "ram:1M", backend)
            .unwrap();
        let flags = k.state().disk.unwrap().1;
        assert_eq!(
            flags & abi::DEVICE_LARGE_REQUESTS,
            abi::DEVICE_LARGE_REQUESTS
        );
        for j in 0..128 {
            k.fill(0, j, |i| (i / 512 + j) as u8);
        }
        k.submit(&SimKernel::transfer(W, 0, 64, 1024));
        first.on_ring();
        drop(first);
        assert_eq!(k.pending(), 1);

        // The disk's pages per slot and no other.
        // SAFETY: no view or pointer into the simulated ring is kept across the call.
        let e = unsafe { crate::ring::RingDevice::remap(&*k.mem, 11) }.unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        // SAFETY: as above.
        unsafe { crate::ring::RingDevice::remap(&*k.mem, 128) }.unwrap();
        k.reattach();
        let mut second = TapCore::attach(Rc::clone(&k.mem), options);
        second
            .open_backend(&open_args(false, true), "ram:1M", ram(1 << 20))
            .unwrap();
        assert_eq!(second.stats().device_flags, abi::DEVICE_LARGE_REQUESTS);
        assert_eq!(sorted_ids(&mut k), [(0, 0)]);
        k.submit(&SimKernel::transfer(R, 9, 64, 1024));
        second.on_ring();
        assert_eq!(ids(&mut k), [(9, 0)]);
        assert!((0..128).all(|j| k.page(9, j) == k.page(0, j)));
    }

    #[test]
    fn req_event_is_armed_before_sleeping_and_requests_seen_meanwhile_are_served() {
        let mut k = SimKernel::new();
        let options = TapOptions {
            req_event: true,
            ..Default::default()
        };
        let mut tap = open_tap(&k, options, ram(1 << 20));
        // Nothing on the ring: armed for the next request (req_cons 0 + 1), sleep.
        assert!(!tap.arm_wakeup());
        assert_eq!(k.ring().req_event(), 1);
        // A request published after arming (the kernel then signals) or before the last look
        // (it may not): either way the look sees it, and tapdisk serves instead of sleeping.
        k.submit(&SimKernel::request(R, 0, 8, &[(0, 7)]));
        assert!(tap.arm_wakeup());
        assert!(matches!(tap.on_ring(), TapEvent::Served));
        assert_eq!(ids(&mut k), [(0, 0)]);
        assert!(!tap.arm_wakeup());
        assert_eq!(
            k.ring().req_event(),
            2,
            "the next request after the one consumed"
        );
        // A staged write (nothing on the ring) is seen too.
        k.submit(&SimKernel::request(W, 1, 8, &[(0, 7)]));
        assert_eq!(k.staged(), 1);
        assert!(tap.arm_wakeup());
        // Without the flag (the default), req_event is never written.
        let k = SimKernel::new();
        let tap = open_tap(&k, TapOptions::default(), ram(1 << 20));
        assert!(!tap.arm_wakeup());
        assert_eq!(k.ring().req_event(), 0);
    }

    #[test]
    fn staged_writes_reach_the_ring_when_tapdisk_calls_respond() {
        let mut k = SimKernel::new();
        let mut tap = open_tap(&k, TapOptions::default(), ram(1 << 20));
        k.fill(0, 0, |i| (i % 251) as u8);
        k.submit(&SimKernel::request(W, 0, 8, &[(0, 7)]));
        assert_eq!(k.staged(), 1);
        assert_eq!(k.ring().req_prod(), 0, "not on the ring yet");
        assert!(tap.has_new_requests(), "the header says a write is staged");
        assert!(matches!(tap.on_ring(), TapEvent::Served));
        assert_eq!((k.staged(), k.state().drained), (0, 1));
        assert_eq!(ids(&mut k), [(0, 0)]);
        assert_eq!(tap.stats().io.drains, 1);
        assert!(!tap.has_new_requests());
        // Reads are not staged; the write's data is there.
        k.submit(&SimKernel::request(R, 1, 8, &[(0, 7)]));
        assert_eq!(k.staged(), 0);
        assert!(matches!(tap.on_ring(), TapEvent::Served));
        assert_eq!(ids(&mut k), [(1, 0)]);
        let want: Vec<u8> = (0..crate::ring::PAGE_SIZE)
            .map(|i| (i % 251) as u8)
            .collect();
        assert_eq!(k.page(1, 0), want);
        // A write staged when the tap pauses goes on the ring at PAUSE and is answered.
        k.fill(2, 0, |_| 0x77);
        k.submit(&SimKernel::request(W, 2, 16, &[(0, 7)]));
        assert!(tap.pause().unwrap() || matches!(tap.advance(), Some(Ok(()))));
        assert_eq!(tap.state(), TapState::Paused);
        assert_eq!(ids(&mut k), [(2, 0)]);
        assert_eq!(tap.stats().io.writes, 2);
    }

    /// A ram disk whose completions wait until the test opens the gate.
    struct Gated {
        ram: Synchronous<RamBackend>,
        held: Vec<Completion>,
        open: Rc<Cell<bool>>,
    }

    impl Backend for Gated {
        fn kind(&self) -> ImageKind {
            ImageKind::Ram
        }
        fn size(&self) -> u64 {
            self.ram.size()
        }
        unsafe fn queue(&mut self, io: Io) {
            // SAFETY: forwarded under the same contract.
            unsafe { self.ram.queue(io) }
        }
        fn submit(&mut self) -> Result<()> {
            Ok(())
        }
        fn reap(&mut self, out: &mut Vec<Completion>) {
            self.ram.reap(&mut self.held);
            if self.open.get() {
                out.append(&mut self.held);
            }
        }
        fn in_flight(&self) -> usize {
            self.held.len() + self.ram.in_flight()
        }
        fn drain(&mut self, out: &mut Vec<Completion>) -> Result<()> {
            self.ram.reap(&mut self.held);
            out.append(&mut self.held);
            Ok(())
        }
        fn event_fd(&self) -> Option<BorrowedFd<'_>> {
            None
        }
    }

    fn gated(size: u64) -> (Box<dyn Backend>, Rc<Cell<bool>>) {
        let open = Rc::new(Cell::new(false));
        let b = Gated {
            ram: Synchronous::new(RamBackend::new(size).unwrap()),
            held: Vec::new(),
            open: Rc::clone(&open),
        };
        (Box::new(b), open)
    }

    #[test]
    fn pause_waits_for_every_request_handed_out_then_closes_the_image() {
        let mut k = SimKernel::new();
        let (backend, gate) = gated(1 << 20);
        let mut tap = open_tap(&k, TapOptions::default(), backend);
        k.fill(0, 0, |_| 0x11);
        k.submit(&SimKernel::request(W, 0, 0, &[(0, 7)]));
        k.submit(&SimKernel::request(R, 1, 8, &[(0, 7)]));
        assert!(matches!(tap.on_ring(), TapEvent::Served));
        // Published before PAUSE, not fetched yet: pausing must still answer it.
        k.submit(&SimKernel::request(R, 2, 16, &[(0, 7)]));
        assert!(!tap.pause().unwrap(), "I/O is in flight");
        assert_eq!(tap.state(), TapState::Pausing);
        assert_eq!(tap.entry().state.code(), 0x10);
        assert!(k.state().paused);
        assert_eq!(
            tap.server().unwrap().in_flight(),
            3,
            "request 2 was fetched"
        );
        // Requests after PAUSE wait in the kernel.
        k.submit(&SimKernel::request(R, 3, 24, &[(0, 7)]));
        assert_eq!(k.backlog(), 1);
        assert!(tap.advance().is_none());
        // Pausing again while draining: still in progress.
        assert!(!tap.pause().unwrap());
        // Unpausing while draining: try later.
        assert_eq!(tap.unpause(None).unwrap_err().errno(), libc::EBUSY);
        assert!(tap.on_backend().is_ok());
        assert!(tap.advance().is_none(), "the gate holds the completions");
        gate.set(true);
        tap.on_backend().unwrap();
        assert!(matches!(tap.advance(), Some(Ok(()))));
        assert_eq!(tap.state(), TapState::Paused);
        assert_eq!(tap.entry().state.code(), 0x2a);
        assert_eq!(
            sorted_ids(&mut k),
            [(0, 0), (1, 0), (2, 0)],
            "nothing failed"
        );
        assert!(tap.backend_fd().is_none());
        assert!(tap.server().is_none(), "the image is closed");
        let stats = tap.stats();
        assert_eq!((stats.io.reads, stats.io.writes), (2, 1));
        assert_eq!(stats.state, Some(TapState::Paused));
        // Idempotent.
        assert!(tap.pause().unwrap());
        assert_eq!(k.state().pauses, 2);

        // Another image of a different size: refused, still paused.
        let e = tap.unpause_backend("ram:2M", ram(2 << 20)).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(e.to_string().contains("stays paused"), "{e}");
        assert_eq!(tap.state(), TapState::Paused);
        assert!(k.state().paused);
        assert_eq!(k.backlog(), 1);

        // The same size: resumed, the held-back request flows and is served.
        tap.unpause_backend("ram:1M", ram(1 << 20)).unwrap();
        assert_eq!(tap.state(), TapState::Open);
        assert!(!k.state().paused);
        assert_eq!(k.backlog(), 0);
        assert_eq!(ids(&mut k), [(3, 0)]);
        assert_eq!(tap.entry().params.as_deref(), Some("ram:1M"));
        // The counters go on from before the pause.
        assert_eq!(tap.stats().io.reads, 3);
        // Unpausing an open tap is a no-op.
        tap.unpause(None).unwrap();
        assert!(tap.unpause(Some("ram:2M")).is_err());
    }

    #[test]
    fn the_kernels_pause_and_resume_messages_drive_the_same_procedures() {
        let mut k = SimKernel::new();
        let mut tap = open_tap(&k, TapOptions::default(), ram(1 << 20));
        k.submit(&SimKernel::request(R, 0, 0, &[(0, 7)]));
        k.set_msg(RING_MESSAGE_PAUSE);
        assert!(matches!(tap.on_ring(), TapEvent::Served));
        // The ram disk answers at once: paused right away, the message cleared by PAUSE.
        assert_eq!(tap.state(), TapState::Paused);
        assert_eq!(k.ring().msg(), 0);
        assert_eq!(ids(&mut k), [(0, 0)]);
        k.submit(&SimKernel::request(R, 1, 0, &[(0, 7)]));
        assert!(matches!(tap.on_ring(), TapEvent::Served));
        assert_eq!(k.backlog(), 1);
        // RESUME: the image (a fresh ram:1M) is opened again.
        k.set_msg(RING_MESSAGE_RESUME);
        assert!(matches!(tap.on_ring(), TapEvent::Served));
        assert_eq!(tap.state(), TapState::Open);
        assert_eq!(k.ring().msg(), 0);
        assert_eq!(ids(&mut k), [(1, 0)]);
        // A RESUME for an open tap just clears the message.
        k.set_msg(RING_MESSAGE_RESUME);
        assert!(matches!(tap.on_ring(), TapEvent::Served));
        assert_eq!(k.ring().msg(), 0);
        assert_eq!(k.state().resumes, 2);
    }

    #[test]
    fn a_resume_message_while_draining_resumes_once_paused() {
        let mut k = SimKernel::new();
        let (backend, gate) = gated(1 << 20);
        let mut tap = open_tap(&k, TapOptions::default(), backend);
        k.submit(&SimKernel::request(R, 0, 0, &[(0, 7)]));
        k.set_msg(RING_MESSAGE_PAUSE);
        tap.on_ring();
        assert_eq!(tap.state(), TapState::Pausing);
        k.set_msg(RING_MESSAGE_RESUME);
        tap.on_ring();
        assert_eq!(tap.state(), TapState::Pausing);
        assert_eq!(k.ring().msg(), RING_MESSAGE_RESUME, "answered once done");
        gate.set(true);
        tap.on_backend().unwrap();
        // Paused (the image closed), then opened again for the RESUME.
        assert!(matches!(tap.advance(), Some(Ok(()))));
        assert_eq!(tap.state(), TapState::Open);
        assert_eq!(k.ring().msg(), 0);
        assert_eq!(ids(&mut k), [(0, 0)]);
        assert!(!k.state().paused);
    }

    #[test]
    fn a_recovering_tapdisk_answers_the_requests_the_dead_one_left() {
        let mut k = SimKernel::new();
        let (backend, _gate) = gated(1 << 20);
        let mut first = TapCore::attach(Rc::clone(&k.mem), TapOptions::default());
        first
            .open_backend(&open_args(true, false), "ram:1M", backend)
            .unwrap();
        assert_ne!(k.state().disk.unwrap().1 & abi::DEVICE_RECOVERY, 0);
        k.fill(0, 0, |_| 0x5a);
        k.submit(&SimKernel::request(W, 0, 64, &[(0, 7)]));
        k.submit(&SimKernel::request(R, 1, 0, &[(0, 7)]));
        // Taken, but held in the backend when the tapdisk dies...
        first.on_ring();
        // ... and one more published that it never saw.
        k.submit(&SimKernel::request(R, 2, 8, &[(0, 7)]));
        drop(first);
        assert!(k.responses().is_empty());
        assert_eq!(k.pending(), 3);

        // The new tapdisk maps the ring: the kernel publishes the kept requests afresh.
        k.reattach();
        assert_eq!(k.ring().req_prod(), 3);
        let mut second = TapCore::attach(Rc::clone(&k.mem), TapOptions::default());
        // No disk of that size: refused, without CREATE_DEVICE.
        let creates = k.state().creates.len();
        let e = second
            .open_backend(&open_args(false, true), "ram:2M", ram(2 << 20))
            .unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        assert_eq!(second.state(), TapState::Attached);
        second
            .open_backend(&open_args(false, true), "ram:1M", ram(1 << 20))
            .unwrap();
        assert_eq!(k.state().creates.len(), creates, "no CREATE_DEVICE");
        assert_eq!(sorted_ids(&mut k), [(0, 0), (1, 0), (2, 0)]);
        assert_eq!(k.pending(), 0);
        // The write was carried out by the new tapdisk.
        k.submit(&SimKernel::request(R, 3, 64, &[(0, 7)]));
        second.on_ring();
        assert_eq!(ids(&mut k), [(3, 0)]);
        assert!(k.page(3, 0).iter().all(|&b| b == 0x5a));

        // Recovering a tap without a disk.
        second.close().unwrap();
        assert_eq!(k.state().disk, None);
        let e = second
            .open_backend(&open_args(false, true), "ram:1M", ram(1 << 20))
            .unwrap_err();
        assert_eq!(e.errno(), libc::ENODEV);
    }

    #[test]
    fn closing_a_paused_tap_removes_its_disk_and_close_messages_are_reported() {
        let k = SimKernel::new();
        let mut tap = open_tap(&k, TapOptions::default(), ram(1 << 20));
        assert!(tap.pause().unwrap());
        assert!(tap.has_disk());
        tap.close().unwrap();
        assert_eq!(tap.state(), TapState::Attached);
        assert_eq!(k.state().disk, None);
        assert_eq!(tap.pause().unwrap_err().errno(), libc::EINVAL);
        k.set_msg(RING_MESSAGE_CLOSE);
        assert!(matches!(tap.on_ring(), TapEvent::CloseRequested));
        let ring = tap.shut_down();
        assert!(Rc::ptr_eq(&ring, &k.mem));
    }

    /// Serves the tap until `n` responses have come back (a threaded backend answers later).
    fn responses(tap: &mut Tap, k: &mut SimKernel, n: usize) -> Vec<(u64, i16)> {
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while got.len() < n {
            assert!(std::time::Instant::now() < deadline, "no completion");
            if let Some(fd) = tap.backend_fd() {
                let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
                nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16)).unwrap();
                tap.on_backend().unwrap();
            }
            got.extend(ids(k));
        }
        got
    }

    #[test]
    fn a_live_snapshot_resumes_on_a_new_vhd_leaf_and_leaves_the_old_one_unchanged() {
        let dir = std::env::temp_dir().join(format!("tap-vhd-snapshot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let old = dir.join("leaf0.vhd");
        crate::vhd::create::create_dynamic(&old, 4 << 20, None).unwrap();
        let mut k = SimKernel::new();
        let mut tap = TapCore::attach(Rc::clone(&k.mem), TapOptions::default());
        let params = format!("vhd:{}", old.display());
        tap.open(&OpenArgs {
            params: &params,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(k.state().disk.map(|d| d.0), Some(8192));
        k.fill(0, 0, |_| 0x11);
        k.submit(&SimKernel::request(W, 0, 0, &[(0, 7)]));
        assert!(matches!(tap.on_ring(), TapEvent::Served));
        // Paused with the write in flight: the pause waits for it.
        let mut paused = tap.pause().unwrap();
        while !paused {
            if let Some(fd) = tap.backend_fd() {
                let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
                nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16)).unwrap();
                tap.on_backend().unwrap();
            }
            paused = matches!(tap.advance(), Some(Ok(())));
        }
        assert_eq!(ids(&mut k), [(0, 0)]);
        assert_eq!(tap.state(), TapState::Paused);

        // The snapshot: a new empty child of the leaf; unpause onto it.
        let before = std::fs::read(&old).unwrap();
        let new = dir.join("leaf1.vhd");
        crate::vhd::create::snapshot(&new, &old, false).unwrap();
        // A chain of another size is refused, and the tap stays paused.
        let other = dir.join("other.vhd");
        crate::vhd::create::create_dynamic(&other, 8 << 20, None).unwrap();
        assert!(tap
            .unpause(Some(&format!("vhd:{}", other.display())))
            .is_err());
        let new_params = format!("vhd:{}", new.display());
        tap.unpause(Some(&new_params)).unwrap();
        assert_eq!(tap.state(), TapState::Open);
        assert_eq!(tap.entry().params.as_deref(), Some(new_params.as_str()));

        // I/O resumes: a write to the new leaf, and reads of both.
        k.fill(1, 0, |_| 0x22);
        k.submit(&SimKernel::request(W, 1, 8, &[(0, 7)]));
        tap.on_ring();
        assert_eq!(responses(&mut tap, &mut k, 1), [(1, 0)]);
        k.fill(2, 0, |_| 0);
        k.fill(3, 0, |_| 0);
        k.submit(&SimKernel::request(R, 2, 0, &[(0, 7)]));
        k.submit(&SimKernel::request(R, 3, 8, &[(0, 7)]));
        tap.on_ring();
        let mut got = responses(&mut tap, &mut k, 2);
        got.sort_unstable();
        assert_eq!(got, [(2, 0), (3, 0)]);
        assert!(k.page(2, 0).iter().all(|&b| b == 0x11), "the parent's data");
        assert!(
            k.page(3, 0).iter().all(|&b| b == 0x22),
            "the new leaf's data"
        );
        assert!(
            std::fs::read(&old).unwrap() == before,
            "the old leaf is unchanged"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
