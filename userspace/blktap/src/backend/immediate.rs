//! Backends whose every I/O completes as it is queued (memory-backed images), and the adapter
//! that gives them the asynchronous [`Backend`] interface.

use std::os::fd::BorrowedFd;

use nix::errno::Errno;

use super::{Backend, Completion, Extent, Features, ImageKind, Io, LayerStats};
use crate::Result;

/// An image whose transfers finish at once.
pub trait SyncBackend {
    /// The image type.
    fn kind(&self) -> ImageKind;

    /// Size of the image in bytes.
    fn size(&self) -> u64;

    /// Performs `io` now.
    ///
    /// # Safety
    ///
    /// The buffers of `io` must be valid for its operation (the [`Backend::queue`] contract).
    unsafe fn transfer(&mut self, io: &Io) -> Result<(), Errno>;

    /// Performs a read into buffers that hold zeros already (see
    /// [`Backend::queue_read_into_zeros`]); the default reads as [`SyncBackend::transfer`].
    ///
    /// # Safety
    ///
    /// As for [`SyncBackend::transfer`]; and every buffer of `io` holds only zero bytes.
    unsafe fn transfer_into_zeros(&mut self, io: &Io) -> Result<(), Errno> {
        // SAFETY: the caller's contract is `transfer`'s, and more.
        unsafe { self.transfer(io) }
    }

    /// Whether every read returns zeros (see [`Backend::reads_zeros`]).
    fn reads_zeros(&self) -> bool {
        false
    }

    /// The operations beyond reads and writes it does.
    fn features(&self) -> Features {
        Features::default()
    }

    /// Bytes of storage the image takes up, when known.
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }

    /// The allocation of a range, when known (see [`Backend::block_status`]).
    fn block_status(&self, offset: u64, len: u64) -> Option<Vec<Extent>> {
        let _ = (offset, len);
        None
    }

    /// What reports the statistics of the layers below this image's own (see
    /// [`Backend::layers`]), from any thread: the image may be served by a worker.
    fn layers_reporter(&self) -> Option<LayersReporter> {
        None
    }
}

/// Appends the statistics of an image's lower layers (a VHD's parents), callable from any thread.
pub type LayersReporter = std::sync::Arc<dyn Fn(&mut Vec<LayerStats>) + Send + Sync>;

/// A [`SyncBackend`] as a [`Backend`]: completions wait in a queue until reaped.
#[derive(Debug)]
pub struct Synchronous<T> {
    inner: T,
    done: Vec<Completion>,
}

impl<T: SyncBackend> Synchronous<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            done: Vec::new(),
        }
    }
}

impl<T: SyncBackend> Backend for Synchronous<T> {
    fn kind(&self) -> ImageKind {
        self.inner.kind()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    unsafe fn queue(&mut self, io: Io) {
        // SAFETY: the caller keeps the buffers valid (the `queue` contract).
        let result = unsafe { self.inner.transfer(&io) };
        self.done.push(Completion {
            tag: io.tag,
            result,
        });
    }

    unsafe fn queue_read_into_zeros(&mut self, io: Io) {
        // SAFETY: the caller keeps the buffers valid, and they hold zeros (the contract).
        let result = unsafe { self.inner.transfer_into_zeros(&io) };
        self.done.push(Completion {
            tag: io.tag,
            result,
        });
    }

    fn reads_zeros(&self) -> bool {
        self.inner.reads_zeros()
    }

    fn submit(&mut self) -> Result<()> {
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.done);
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn drain(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        self.reap(out);
        Ok(())
    }

    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn features(&self) -> Features {
        self.inner.features()
    }

    fn allocated_bytes(&self) -> Option<u64> {
        self.inner.allocated_bytes()
    }

    fn block_status(&self, offset: u64, len: u64) -> Option<Vec<Extent>> {
        self.inner.block_status(offset, len)
    }

    fn layers(&self, out: &mut Vec<LayerStats>) {
        if let Some(report) = self.inner.layers_reporter() {
            report(out);
        }
    }
}
