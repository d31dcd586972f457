//! One tap served by this tapdisk: its ring, and once an image is open, the server.

use std::os::fd::BorrowedFd;

use blktap::backend;
use blktap::backend::ImageSpec;
use blktap::ctl::{TapEntry, TapState, TapStats};
use blktap::ring::{DiskParams, Ring, SharedRing, RING_MESSAGE_CLOSE};
use blktap::server::{disk_sectors, RingFault, ServeError, Server};
use blktap::{Error, Result};
use nix::errno::Errno;

/// Where a tap is in its life.
enum Stage {
    /// The ring is mapped, no image.
    Attached(Ring),
    /// An image is open and the disk exists.
    Open(Box<Server<Ring>>),
}

/// What a readable ring fd meant.
#[derive(Debug)]
pub enum RingEvent {
    /// Requests were served (or there were none).
    Served,
    /// The kernel asked for the tap to be shut down.
    CloseRequested,
    /// The ring broke the protocol: it is no longer served.
    Fault(RingFault),
    /// Serving hit a system error; it goes on.
    Error(Error),
}

/// A tap: its minor and its stage. `stage` is `None` only while changing stage.
pub struct Tap {
    minor: u32,
    stage: Option<Stage>,
}

impl Tap {
    /// Opens and maps the ring of tap `minor`.
    pub fn attach(minor: u32) -> Result<Self> {
        let ring = Ring::open(minor)?;
        Ok(Self {
            minor,
            stage: Some(Stage::Attached(ring)),
        })
    }

    fn stage(&self) -> &Stage {
        self.stage.as_ref().expect("a tap always has a stage")
    }

    fn ring(&self) -> &Ring {
        match self.stage() {
            Stage::Attached(ring) => ring,
            Stage::Open(server) => server.memory(),
        }
    }

    /// The ring fd, to poll.
    pub fn ring_fd(&self) -> BorrowedFd<'_> {
        self.ring().fd()
    }

    /// The backend's completion fd, to poll, when an image is open and has one.
    pub fn backend_fd(&self) -> Option<BorrowedFd<'_>> {
        match self.stage() {
            Stage::Attached(_) => None,
            Stage::Open(server) => server.backend_fd(),
        }
    }

    /// The tap's state.
    pub fn state(&self) -> TapState {
        match self.stage() {
            Stage::Attached(_) => TapState::Attached,
            Stage::Open(server) if server.fault().is_some() => TapState::Dead,
            Stage::Open(_) => TapState::Open,
        }
    }

    /// Whether an image is open.
    pub fn is_open(&self) -> bool {
        matches!(self.stage(), Stage::Open(_))
    }

    /// Opens image `params` (`type:path`) and creates the disk.
    pub fn open(&mut self, params: &str, readonly: bool) -> Result<()> {
        if let Stage::Open(server) = self.stage() {
            return Err(Error::os(
                format!("tap {} already has {} open", self.minor, server.image()),
                Errno::EBUSY,
            ));
        }
        let spec: ImageSpec = params.parse()?;
        let backend = backend::open(&spec, readonly)?;
        let capacity = disk_sectors(backend.as_ref())?;
        let image = spec.to_string();
        let Some(Stage::Attached(ring)) = self.stage.take() else {
            unreachable!("checked above");
        };
        if let Err(e) = ring.create_device(&DiskParams::new(capacity, readonly, image.clone())) {
            self.stage = Some(Stage::Attached(ring));
            return Err(e);
        }
        let server = Server::new(ring, backend, image, readonly);
        self.stage = Some(Stage::Open(Box::new(server)));
        Ok(())
    }

    /// Waits for the I/O in flight, removes the disk and closes the image. On failure (`EBUSY`
    /// while the disk is open) the image stays open and served.
    pub fn close(&mut self) -> Result<()> {
        let Some(Stage::Open(server)) = self.stage.as_mut() else {
            return Err(Error::os(
                format!("tap {} has no image open", self.minor),
                Errno::EINVAL,
            ));
        };
        if let Err(e) = server.drain() {
            crate::log::log!("tap {}: {e}", self.minor);
        }
        server.memory().remove_device()?;
        let Some(Stage::Open(server)) = self.stage.take() else {
            unreachable!("checked above");
        };
        self.stage = Some(Stage::Attached(server.into_memory()));
        Ok(())
    }

    /// Serves the ring after its fd polled readable.
    pub fn on_ring_event(&mut self) -> RingEvent {
        match self.stage.as_mut().expect("a tap always has a stage") {
            Stage::Attached(ring) => {
                if SharedRing::new(ring).msg() == RING_MESSAGE_CLOSE {
                    RingEvent::CloseRequested
                } else {
                    RingEvent::Served
                }
            }
            Stage::Open(server) => {
                if server.close_requested() {
                    return RingEvent::CloseRequested;
                }
                match server.serve_ring() {
                    Ok(()) => RingEvent::Served,
                    Err(ServeError::Fault(f)) => RingEvent::Fault(f),
                    Err(ServeError::Sys(e)) => RingEvent::Error(e),
                }
            }
        }
    }

    /// Answers completed I/O after the backend's fd polled readable.
    pub fn on_backend_event(&mut self) -> Result<(), ServeError> {
        match self.stage.as_mut().expect("a tap always has a stage") {
            Stage::Attached(_) => Ok(()),
            Stage::Open(server) => server.serve_backend(),
        }
    }

    /// Shuts the tap down for good: waits for its I/O, removes the disk (errors are logged),
    /// then unmaps and closes the ring.
    pub fn shut_down(mut self) {
        if self.is_open() {
            if let Err(e) = self.close() {
                crate::log::log!("tap {}: {e}; dropping the ring anyway", self.minor);
            }
        }
        // Dropping the stage waits for any I/O still in flight, then unmaps the ring.
    }

    /// The tap as `list` shows it.
    pub fn entry(&self) -> TapEntry {
        let (params, readonly) = match self.stage() {
            Stage::Attached(_) => (None, false),
            Stage::Open(server) => (Some(server.image().to_string()), server.readonly()),
        };
        TapEntry {
            minor: self.minor,
            state: self.state(),
            params,
            readonly,
        }
    }

    /// The tap's counters.
    pub fn stats(&self) -> TapStats {
        let mut stats = TapStats {
            minor: self.minor,
            state: Some(self.state()),
            ..Default::default()
        };
        if let Stage::Open(server) = self.stage() {
            let io = server.stats();
            stats.image = Some(server.image().to_string());
            stats.sectors = server.capacity();
            stats.size = server.capacity() * blktap::ring::SECTOR_SIZE;
            stats.readonly = server.readonly();
            stats.reads = io.reads;
            stats.writes = io.writes;
            stats.bytes_read = io.bytes_read;
            stats.bytes_written = io.bytes_written;
            stats.errors = io.errors;
            stats.invalid = io.invalid;
            stats.in_flight = server.in_flight() as u64;
        }
        stats
    }
}
