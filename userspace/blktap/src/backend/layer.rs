//! The image stack: a tap serves a stack of layers, each a [`Backend`]. A layer answers a request
//! itself or forwards it, whole or split, to the layer below it; the bottom layer is an image
//! (`aio:`, `vhd:`, `ram:`, `null:`, `stall:`, `nbd:`), the layers above it filters (`trace:`,
//! `cow:`). A filter holds the layer below as a [`Lower`], which counts what the filter forwarded
//! to it: the per-layer statistics of `stats` ([`LayerStats`], the original's `images` list).
//!
//! Adding a layer: implement [`Backend`] over a [`Lower`] (queue sub-I/Os with tags of your own,
//! map their completions back to the I/Os you were given in [`Backend::reap`] and
//! [`Backend::drain`], hand out the lower's [`Backend::event_fd`]), give it an [`ImageKind`]
//! and a prefix in [`ImageSpec`](super::ImageSpec), and open it in [`super::open_for_tap`].

use rustc_hash::FxHashMap;
use std::os::fd::BorrowedFd;

use nix::errno::Errno;

use super::{Backend, Completion, ImageSpec, Io};
use crate::ring::{Op, SECTOR_SIZE};
use crate::Result;

/// What one layer of a stack did, as the original tapdisk's `images` entries show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerStats {
    /// The layer's type (`aio`, `vhd`, `cow`, `trace`, ...).
    pub driver: String,
    /// Its path, or what it is (`memory` for an overlay in memory).
    pub name: String,
    /// Sectors read from it and written to it.
    pub hits: [u64; 2],
    /// Its failed reads and writes.
    pub fail: [u64; 2],
}

/// A layer below a filter: the backend, its spec, and what was forwarded to it.
pub struct Lower {
    backend: Box<dyn Backend>,
    driver: String,
    name: String,
    /// Per tag in flight: whether it reads, writes (or neither), and its sectors.
    pending: FxHashMap<u64, (Option<usize>, u64)>,
    hits: [u64; 2],
    fail: [u64; 2],
    scratch: Vec<Completion>,
}

impl std::fmt::Debug for Lower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lower")
            .field("driver", &self.driver)
            .field("name", &self.name)
            .field("in_flight", &self.pending.len())
            .finish()
    }
}

impl Lower {
    /// `backend`, opened from `spec`.
    pub fn new(backend: Box<dyn Backend>, spec: &ImageSpec) -> Self {
        let (driver, name) = spec.layer_name();
        Self::named(backend, driver, name)
    }

    /// `backend`, shown in the statistics as `driver` and `name`.
    pub fn named(backend: Box<dyn Backend>, driver: String, name: String) -> Self {
        Self {
            backend,
            driver,
            name,
            pending: FxHashMap::default(),
            hits: [0; 2],
            fail: [0; 2],
            scratch: Vec::new(),
        }
    }

    /// The backend, for what is not an I/O.
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// Queues `io` on the layer.
    ///
    /// # Safety
    ///
    /// As for [`Backend::queue`].
    pub unsafe fn queue(&mut self, io: Io) {
        let dir = match io.op {
            Op::Read => Some(0),
            Op::Write | Op::WriteFua => Some(1),
            Op::Flush | Op::Discard => None,
        };
        let sectors = if dir.is_some() {
            io.len() / SECTOR_SIZE
        } else {
            0
        };
        self.pending.insert(io.tag, (dir, sectors));
        // SAFETY: the caller keeps the contract of `queue`.
        unsafe { self.backend.queue(io) }
    }

    /// Starts what was queued.
    pub fn submit(&mut self) -> Result<()> {
        self.backend.submit()
    }

    /// Appends the completions available now to `out`, counted.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        self.backend.reap(&mut self.scratch);
        self.count_into(out);
    }

    /// Waits for everything in flight, appending the completions to `out`, counted.
    pub fn drain(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        let r = self.backend.drain(&mut self.scratch);
        self.count_into(out);
        r
    }

    fn count_into(&mut self, out: &mut Vec<Completion>) {
        for c in self.scratch.drain(..) {
            if let Some((Some(dir), sectors)) = self.pending.remove(&c.tag) {
                match c.result {
                    Ok(()) => self.hits[dir] += sectors,
                    Err(_) => self.fail[dir] += 1,
                }
            }
            out.push(c);
        }
    }

    /// I/Os queued and not reaped yet.
    pub fn in_flight(&self) -> usize {
        self.backend.in_flight()
    }

    /// The layer's completion descriptor.
    pub fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        self.backend.event_fd()
    }

    /// Appends this layer's entry, then those of the layers below it.
    pub fn layers(&self, out: &mut Vec<LayerStats>) {
        out.push(LayerStats {
            driver: self.driver.clone(),
            name: self.name.clone(),
            hits: self.hits,
            fail: self.fail,
        });
        self.backend.layers(out);
    }
}

/// The part `[from, from + len)` (in bytes) of the buffers `iov`.
pub fn slice_iov(iov: &[libc::iovec], from: u64, len: u64) -> Vec<libc::iovec> {
    let mut out = Vec::new();
    let (mut pos, end) = (0u64, from + len);
    for v in iov {
        let (start, stop) = (pos, pos + v.iov_len as u64);
        pos = stop;
        if stop <= from {
            continue;
        }
        if start >= end {
            break;
        }
        let a = from.max(start) - start;
        let b = end.min(stop) - start;
        out.push(libc::iovec {
            iov_base: v.iov_base.cast::<u8>().wrapping_add(a as usize).cast(),
            iov_len: (b - a) as usize,
        });
    }
    out
}

/// The first error of a set of sub-I/Os, or success.
pub fn merge(result: &mut std::result::Result<(), Errno>, next: std::result::Result<(), Errno>) {
    if result.is_ok() {
        *result = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_of_scattered_buffers() {
        let mut a = [0u8; 1024];
        let mut b = [0u8; 2048];
        let iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        let lens = |s: &[libc::iovec]| s.iter().map(|v| v.iov_len).collect::<Vec<_>>();
        assert_eq!(lens(&slice_iov(&iov, 0, 3072)), [1024, 2048]);
        assert_eq!(lens(&slice_iov(&iov, 512, 1024)), [512, 512]);
        let s = slice_iov(&iov, 1536, 512);
        assert_eq!(lens(&s), [512]);
        assert_eq!(s[0].iov_base.cast::<u8>(), b.as_mut_ptr().wrapping_add(512));
        assert!(slice_iov(&iov, 3072, 0).is_empty());
        assert_eq!(lens(&slice_iov(&iov, 1024, 2048)), [2048]);
    }

    #[test]
    fn the_first_error_wins() {
        let mut r = Ok(());
        merge(&mut r, Ok(()));
        merge(&mut r, Err(Errno::EIO));
        merge(&mut r, Err(Errno::ENOSPC));
        assert_eq!(r, Err(Errno::EIO));
    }
}
