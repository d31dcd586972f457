//! An [`Export`] whose I/O is done by an event loop: the NBD connection threads send each
//! request over a channel and wake the loop with an eventfd; the loop takes them
//! ([`ExportQueue::take`]) and hands them to the tap's ring [`Server`](crate::server::Server)
//! ([`Server::queue_external`](crate::server::Server::queue_external)), which queues them on the
//! same backend as the ring's own requests. So NBD clients and the tapdev share one image stack:
//! a flush from either side covers the writes completed on both, and a paused tap (no server, or
//! a server draining) simply leaves the requests waiting in the channel until it goes on.
//!
//! Allocation status (`base:allocation`) is asked of the tap's backend the same way
//! ([`ExportRequest::Status`]): holes of a sparse `aio:` file or of a `ram:` disk; all data where
//! the backend cannot say.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::server::{to_nbd_extents, Export, ExportFeatures, Extent};
use crate::backend::Extent as BackendExtent;
use crate::backend::Features;
use crate::mapping::AlignedBuf;
use crate::ring::Op;
use crate::server::ExternalIo;
use crate::{Error, Result};

/// What an NBD connection asks of the loop.
pub enum ExportRequest {
    /// An I/O on the image.
    Io(ExternalIo),
    /// The allocation of a range.
    Status(StatusQuery),
}

/// Where a block status answer goes (none: the backend cannot say).
pub type StatusReply = Box<dyn FnOnce(Option<Vec<BackendExtent>>) + Send>;

/// A block status request: the allocation of `[offset, offset + length)`.
pub struct StatusQuery {
    /// Byte offset on the image.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
    /// Called once with the answer.
    pub reply: StatusReply,
}

impl std::fmt::Debug for ExportRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExportRequest::Io(io) => io.fmt(f),
            ExportRequest::Status(q) => write!(f, "Status({}, {})", q.offset, q.length),
        }
    }
}

/// How often a caller waiting for an answer looks whether the queue was closed.
pub const CLOSED_POLL: Duration = Duration::from_millis(100);

/// The unit of the image's I/O.
const SECTOR: u64 = 512;

/// Largest write of zeros sent to the loop at once.
const ZERO_PIECE: usize = 1 << 20;

/// The NBD side: an [`Export`] for [`super::server::Server::serve`].
pub struct ChannelExport {
    closed: Arc<AtomicBool>,
    tx: Mutex<Sender<ExportRequest>>,
    wake: Arc<EventFd>,
    size: u64,
    features: Features,
}

/// The event loop's side: poll [`ExportQueue::fd`], then [`ExportQueue::take`].
pub struct ExportQueue {
    closed: Arc<AtomicBool>,
    rx: Receiver<ExportRequest>,
    wake: Arc<EventFd>,
}

/// A connected pair for an image of `size` bytes whose backend does `features`.
pub fn channel(size: u64, features: Features) -> Result<(ChannelExport, ExportQueue)> {
    let wake = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
        .map_err(|e| Error::os("create an eventfd", e))?;
    let wake = Arc::new(wake);
    let (tx, rx) = mpsc::channel();
    let closed = Arc::new(AtomicBool::new(false));
    Ok((
        ChannelExport {
            closed: closed.clone(),
            tx: Mutex::new(tx),
            wake: wake.clone(),
            size,
            features,
        },
        ExportQueue { closed, rx, wake },
    ))
}

impl ExportQueue {
    /// Readable when requests wait.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// The requests waiting now.
    pub fn take(&self) -> Vec<ExportRequest> {
        // Clear first: a request sent after this read wakes the loop again.
        let _ = self.wake.read();
        self.rx.try_iter().collect()
    }

    /// Stops taking requests: every request waiting (and any sent later) fails with
    /// `ESHUTDOWN`, and callers waiting for an answer that will not come give up within
    /// [`CLOSED_POLL`]. (Requests already handed to a ring server are answered by it.)
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        drop(self.take());
    }
}

impl Drop for ExportQueue {
    fn drop(&mut self) {
        self.close();
    }
}

fn to_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

impl ChannelExport {
    /// Sends a request to the loop and waits for the answer `rx` receives.
    fn ask<T>(&self, req: ExportRequest, rx: Receiver<T>) -> io::Result<T> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(to_io(Errno::ESHUTDOWN));
        }
        {
            let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
            tx.send(req).map_err(|_| to_io(Errno::ESHUTDOWN))?;
        }
        self.wake.write(1).map_err(to_io)?;
        // The loop dropping the request unanswered, or closing the queue, is an error too.
        loop {
            match rx.recv_timeout(CLOSED_POLL) {
                Ok(r) => return Ok(r),
                Err(RecvTimeoutError::Timeout) if !self.closed.load(Ordering::SeqCst) => {}
                Err(_) => return Err(to_io(Errno::ESHUTDOWN)),
            }
        }
    }

    /// Sends one I/O to the loop and waits for its result.
    fn call(
        &self,
        op: Op,
        offset: u64,
        buf: AlignedBuf,
        discard_len: u64,
    ) -> io::Result<AlignedBuf> {
        // The backend may be O_DIRECT: whole sectors only (announced as the minimum block size).
        let len = if op == Op::Discard {
            discard_len
        } else {
            buf.len() as u64
        };
        if !offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
            return Err(to_io(Errno::EINVAL));
        }
        let (done_tx, done_rx) = mpsc::channel();
        let io = ExternalIo {
            op,
            offset,
            buf,
            discard_len,
            reply: Box::new(move |r| {
                let _ = done_tx.send(r);
            }),
        };
        self.ask(ExportRequest::Io(io), done_rx)?.map_err(to_io)
    }
}

impl Export for ChannelExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn features(&self) -> ExportFeatures {
        ExportFeatures {
            flush: self.features.flush,
            fua: self.features.fua,
            trim: self.features.discard,
            write_zeroes: true,
            // Every connection's I/O goes to one backend: a flush covers them all.
            multi_conn: self.features.flush,
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let data = self.call(Op::Read, offset, AlignedBuf::zeroed(buf.len()), 0)?;
        buf.copy_from_slice(data.as_slice());
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        let op = if fua && self.features.fua {
            Op::WriteFua
        } else {
            Op::Write
        };
        self.call(op, offset, AlignedBuf::copy_of(buf), 0)?;
        if fua && !self.features.fua && self.features.flush {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.call(Op::Flush, 0, AlignedBuf::zeroed(0), 0).map(drop)
    }

    fn trim(&self, offset: u64, len: u32, fua: bool) -> io::Result<()> {
        self.call(Op::Discard, offset, AlignedBuf::zeroed(0), u64::from(len))?;
        if fua && self.features.flush {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u32, may_punch: bool, fua: bool) -> io::Result<()> {
        if may_punch && self.features.discard {
            // A blktap discard reads back as zeros.
            self.trim(offset, len, fua)
        } else {
            // In pieces of at most 1 MiB (whole sectors): `len` comes from the client.
            let piece = (len as usize).min(ZERO_PIECE);
            let mut done = 0u64;
            while done < u64::from(len) {
                let n = (u64::from(len) - done).min(piece as u64) as usize;
                self.call(Op::Write, offset + done, AlignedBuf::zeroed(n), 0)?;
                done += n as u64;
            }
            if fua && self.features.flush {
                self.flush()?;
            }
            Ok(())
        }
    }

    fn min_block_size(&self) -> u32 {
        SECTOR as u32
    }

    fn block_status(&self, offset: u64, len: u32) -> io::Result<Vec<Extent>> {
        let (tx, rx) = mpsc::channel();
        let query = StatusQuery {
            offset,
            length: len,
            reply: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        };
        let map = self.ask(ExportRequest::Status(query), rx)?;
        Ok(to_nbd_extents(map, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Features;

    #[test]
    fn requests_reach_the_queue_and_unaligned_ones_do_not() {
        let (export, queue) = channel(1 << 20, Features::ALL).unwrap();
        assert_eq!(export.min_block_size(), 512);
        assert!(export.features().trim && export.features().multi_conn);
        let e = export.read(100, &mut [0u8; 200]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        let e = export.write_zeroes(512, 100, false, false).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        assert!(queue.take().is_empty());
        // A loop that answers reads with 0x5a, from another thread.
        let t = std::thread::spawn(move || {
            let mut served = 0;
            while served < 2 {
                let mut fds = [nix::poll::PollFd::new(
                    queue.fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16)).unwrap();
                for req in queue.take() {
                    let ExportRequest::Io(mut io) = req else {
                        panic!("not an I/O: {req:?}");
                    };
                    assert_eq!((io.op, io.offset), (Op::Read, 4096));
                    io.buf.as_mut_slice().fill(0x5a);
                    (io.reply)(Ok(io.buf));
                    served += 1;
                }
            }
            // Dropping the queue: later requests fail rather than hang.
            drop(queue);
        });
        for _ in 0..2 {
            let mut b = [0u8; 1024];
            export.read(4096, &mut b).unwrap();
            assert!(b.iter().all(|&x| x == 0x5a));
        }
        t.join().unwrap();
        let e = export.flush().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ESHUTDOWN));
    }
}
