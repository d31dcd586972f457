//! `null:SIZE`: reads return zeros, writes are dropped; flushes, FUA writes and discards are
//! accepted (and do nothing). I/O completes as soon as it is queued. A read into buffers the
//! caller knows to hold zeros already (the ring server tracks its data pages) writes nothing.

use nix::errno::Errno;

use super::immediate::SyncBackend;
use super::{check_range, Features, ImageKind, Io};
use crate::ring::Op;

/// A disk of zeros that forgets what is written to it.
#[derive(Debug)]
pub struct NullBackend {
    size: u64,
}

impl NullBackend {
    /// A disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self { size }
    }
}

impl SyncBackend for NullBackend {
    fn kind(&self) -> ImageKind {
        ImageKind::Null
    }

    fn size(&self) -> u64 {
        self.size
    }

    /// Zeros the buffers of a read; drops anything else.
    unsafe fn transfer(&mut self, io: &Io) -> Result<(), Errno> {
        check_range(io, self.size)?;
        if io.op == Op::Read {
            // SAFETY: the iovecs are valid for writes of their lengths (the `queue` contract).
            unsafe { zero_iovecs(&io.iov) };
        }
        Ok(())
    }

    /// Checks the range and leaves the buffers, which hold zeros already.
    unsafe fn transfer_into_zeros(&mut self, io: &Io) -> Result<(), Errno> {
        check_range(io, self.size)
    }

    fn reads_zeros(&self) -> bool {
        true
    }

    fn features(&self) -> Features {
        Features::ALL
    }
}

/// Zeros every buffer of `iov`.
///
/// # Safety
///
/// Every iovec must be valid for writes of its length.
pub(crate) unsafe fn zero_iovecs(iov: &[libc::iovec]) {
    for v in iov {
        // SAFETY: valid for writes of its length (the caller's contract).
        unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::immediate::Synchronous;
    use crate::backend::{Backend, Completion};
    use nix::errno::Errno;

    #[test]
    fn reads_zeros_and_drops_writes() {
        let mut null = Synchronous::new(NullBackend::new(8192));
        assert_eq!(null.size(), 8192);
        // It "does" everything (a flush or discard of nothing succeeds) and stores nothing.
        assert_eq!(null.features(), Features::ALL);
        assert_eq!(null.allocated_bytes(), None);
        let mut buf = vec![0xffu8; 1024];
        let p = buf.as_mut_ptr();
        let iov = || {
            vec![libc::iovec {
                iov_base: p.cast(),
                iov_len: 1024,
            }]
        };
        let (w, r, bad) = (iov(), iov(), iov());
        // SAFETY: `buf` outlives the I/Os, which complete inside `queue`.
        unsafe {
            null.queue(Io {
                tag: 7,
                op: Op::Write,
                offset: 0,
                iov: w,
                discard_len: 0,
            });
            null.queue(Io {
                tag: 8,
                op: Op::Read,
                offset: 7168,
                iov: r,
                discard_len: 0,
            });
            null.queue(Io {
                tag: 9,
                op: Op::Read,
                offset: 7680,
                iov: bad,
                discard_len: 0,
            });
        }
        let mut done = Vec::new();
        null.drain(&mut done).unwrap();
        assert_eq!(done.len(), 3);
        assert_eq!(
            done[0],
            Completion {
                tag: 7,
                result: Ok(())
            }
        );
        assert_eq!(
            done[1],
            Completion {
                tag: 8,
                result: Ok(())
            }
        );
        assert_eq!(
            done[2],
            Completion {
                tag: 9,
                result: Err(Errno::EIO)
            }
        );
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(null.in_flight(), 0);
    }
}
