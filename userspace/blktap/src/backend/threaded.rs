//! A [`SyncBackend`] whose transfers block on files, run on a worker thread so the event loop
//! does not wait: [`Backend::submit`] hands the queued I/Os to the worker, which performs them
//! in order and posts each completion, signalling an eventfd the event loop polls when it
//! posts to an empty list (the loop takes the whole list at once, so the completions that
//! pile up while it is busy cost one wake-up, not one each).
//!
//! The eventfd is written and read only under the list's lock, so it is signalled exactly
//! while the list holds completions: a loop that has taken every completion it is owed
//! (`pending` 0) finds it clear and need not read it, and [`Backend::reap`] then makes no
//! system call at all (a `vhd:` leaf whose I/O all goes through the loop's own io_uring reaps
//! its worker on every turn).

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::immediate::SyncBackend;
use super::{Backend, Completion, Features, ImageKind, Io};
use crate::{Error, Result};

/// An I/O on its way to the worker.
struct Job(Io);

// SAFETY: the raw buffer pointers in `Io::iov` are used by exactly one thread (the worker)
// until the completion is handed out; the `queue` contract keeps them valid and unaliased by
// Rust references for that long, and `Drop` joins the worker before the backend goes away.
unsafe impl Send for Job {}

#[derive(Default)]
struct Done {
    completions: Vec<Completion>,
}

struct Shared {
    done: Mutex<Done>,
    cond: Condvar,
    eventfd: EventFd,
}

/// A [`SyncBackend`] served by a worker thread.
pub struct Threaded {
    kind: ImageKind,
    size: u64,
    features: Features,
    shared: Arc<Shared>,
    queued: Vec<Job>,
    jobs: Option<Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    /// Queued and not yet handed out.
    pending: usize,
    layers: Option<super::immediate::LayersReporter>,
}

impl std::fmt::Debug for Threaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Threaded")
            .field("kind", &self.kind)
            .field("size", &self.size)
            .field("pending", &self.pending)
            .finish()
    }
}

impl Threaded {
    /// Moves `inner` to a new worker thread.
    pub fn new<T: SyncBackend + Send + 'static>(mut inner: T) -> Result<Self> {
        let eventfd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(|e| Error::os("create an eventfd", e))?;
        let shared = Arc::new(Shared {
            done: Mutex::new(Done::default()),
            cond: Condvar::new(),
            eventfd,
        });
        let (kind, size, features) = (inner.kind(), inner.size(), inner.features());
        let layers = inner.layers_reporter();
        let (tx, rx) = channel::<Job>();
        let worker_shared = Arc::clone(&shared);
        let worker = std::thread::Builder::new()
            .name(format!("{}-io", kind.name()))
            .spawn(move || {
                let mut broken = false;
                for Job(io) in rx {
                    let result = if broken {
                        Err(Errno::EIO)
                    } else {
                        // SAFETY: the buffers stay valid until this completion is handed out
                        // (the `queue` contract, carried by `Job`).
                        let run = || unsafe { inner.transfer(&io) };
                        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
                            Ok(result) => result,
                            Err(_) => {
                                // A bug: every I/O from now on fails rather than hangs, and
                                // the image is not touched again.
                                log::error!("{} I/O thread: a transfer panicked", kind.name());
                                broken = true;
                                Err(Errno::EIO)
                            }
                        }
                    };
                    let mut done = worker_shared
                        .done
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    // Only a first completion signals: a list that was not empty was signalled
                    // by the completion that made it so. Signalled under the lock, as the
                    // readers clear it (`take_done`, `drain`): never left set with the list
                    // empty.
                    if done.completions.is_empty() {
                        let _ = worker_shared.eventfd.write(1);
                    }
                    done.completions.push(Completion {
                        tag: io.tag,
                        result,
                    });
                    drop(done);
                    worker_shared.cond.notify_all();
                }
            })
            .map_err(|e| {
                Error::os(
                    "start an I/O thread",
                    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EAGAIN)),
                )
            })?;
        Ok(Self {
            kind,
            size,
            features,
            shared,
            queued: Vec::new(),
            jobs: Some(tx),
            worker: Some(worker),
            pending: 0,
            layers,
        })
    }

    /// Takes the posted completions and clears the eventfd, both under the lock the worker
    /// signals under: the eventfd is left clear with the list empty.
    fn take_done(&mut self, out: &mut Vec<Completion>) {
        let mut done = self
            .shared
            .done
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !done.completions.is_empty() {
            let _ = self.shared.eventfd.read();
            self.pending -= done.completions.len();
            out.append(&mut done.completions);
        }
    }
}

impl Backend for Threaded {
    fn kind(&self) -> ImageKind {
        self.kind
    }

    fn size(&self) -> u64 {
        self.size
    }

    unsafe fn queue(&mut self, io: Io) {
        self.pending += 1;
        self.queued.push(Job(io));
    }

    fn submit(&mut self) -> Result<()> {
        for job in self.queued.drain(..) {
            let tag = job.0.tag;
            let sent = self.jobs.as_ref().is_some_and(|tx| tx.send(job).is_ok());
            if !sent {
                // The worker is gone (it panicked): the I/O fails.
                let mut done = self
                    .shared
                    .done
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                done.completions.push(Completion {
                    tag,
                    result: Err(Errno::EIO),
                });
                let _ = self.shared.eventfd.write(1);
            }
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        // Nothing owed: nothing posted, and the eventfd is clear (see the module's comment).
        if self.pending > 0 {
            self.take_done(out);
        }
    }

    fn in_flight(&self) -> usize {
        self.pending
    }

    fn drain(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        self.submit()?;
        let mut done = self
            .shared
            .done
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while done.completions.len() < self.pending {
            done = self
                .shared
                .cond
                .wait(done)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if !done.completions.is_empty() {
            let _ = self.shared.eventfd.read();
        }
        self.pending -= done.completions.len();
        out.append(&mut done.completions);
        Ok(())
    }

    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.shared.eventfd.as_fd())
    }

    fn features(&self) -> Features {
        self.features
    }

    fn layers(&self, out: &mut Vec<super::LayerStats>) {
        if let Some(report) = &self.layers {
            report(out);
        }
    }
}

impl Drop for Threaded {
    fn drop(&mut self) {
        // Closing the channel ends the worker after the I/Os it has; joining it means no
        // buffer is touched after the backend is gone.
        self.queued.clear();
        self.jobs = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ring::Op;

    /// A disk in a vector; transfers at offset 4096 panic when `fragile`.
    struct VecDisk {
        data: Vec<u8>,
        fragile: bool,
    }

    impl SyncBackend for VecDisk {
        fn kind(&self) -> ImageKind {
            ImageKind::Ram
        }
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        unsafe fn transfer(&mut self, io: &Io) -> Result<(), Errno> {
            assert!(!(self.fragile && io.offset == 4096), "a bug in a backend");
            let mut pos = io.offset as usize;
            for v in &io.iov {
                // SAFETY: the iovec is valid for its length (the caller's contract); the
                // vector is ours and was checked to hold the range below.
                let buf =
                    unsafe { std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len) };
                let disk = self.data.get_mut(pos..pos + v.iov_len).ok_or(Errno::EIO)?;
                match io.op {
                    Op::Read => buf.copy_from_slice(disk),
                    _ => disk.copy_from_slice(buf),
                }
                pos += v.iov_len;
            }
            Ok(())
        }
    }

    fn disk(fragile: bool) -> VecDisk {
        VecDisk {
            data: vec![0; 1 << 20],
            fragile,
        }
    }

    /// An I/O of one buffer (also used by the other backends' tests).
    pub(crate) fn io(tag: u64, op: Op, offset: u64, buf: &mut [u8]) -> Io {
        Io {
            tag,
            op,
            offset,
            iov: vec![libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }],
            discard_len: 0,
        }
    }

    #[test]
    fn completions_come_through_the_eventfd_in_order() {
        let mut t = Threaded::new(disk(false)).unwrap();
        let mut bufs: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 4096]).collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            // SAFETY: the buffers outlive the drain below.
            unsafe { t.queue(io(i as u64, Op::Write, i as u64 * 4096, b)) };
        }
        assert_eq!(t.in_flight(), 8);
        t.submit().unwrap();
        let fd = t.event_fd().unwrap();
        let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        assert_eq!(nix::poll::poll(&mut fds, 5000u16).unwrap(), 1);
        let mut out = Vec::new();
        t.drain(&mut out).unwrap();
        assert_eq!(t.in_flight(), 0);
        let tags: Vec<u64> = out.iter().map(|c| c.tag).collect();
        assert_eq!(tags, (0..8).collect::<Vec<_>>());
        assert!(out.iter().all(|c| c.result.is_ok()));
        let mut back = vec![0u8; 4096];
        // SAFETY: as above.
        unsafe { t.queue(io(9, Op::Read, 3 * 4096, &mut back)) };
        t.submit().unwrap();
        out.clear();
        t.drain(&mut out).unwrap();
        assert!(back.iter().all(|&b| b == 3));
        out.clear();
        t.reap(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn completions_that_pile_up_signal_the_eventfd_once() {
        let mut t = Threaded::new(disk(false)).unwrap();
        let mut bufs: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 4096]).collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            // SAFETY: the buffers outlive the drain below.
            unsafe { t.queue(io(i as u64, Op::Write, i as u64 * 4096, b)) };
        }
        t.submit().unwrap();
        // Nobody takes the completions while they pile up.
        let start = std::time::Instant::now();
        while t.shared.done.lock().unwrap().completions.len() < 8 {
            assert!(start.elapsed().as_secs() < 10, "the worker did not finish");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(t.shared.eventfd.read().unwrap(), 1);
        let mut out = Vec::new();
        t.reap(&mut out);
        assert_eq!(out.len(), 8);
        assert_eq!(t.in_flight(), 0);
        // The next completion, posted to the empty list, signals again.
        let mut back = vec![0u8; 4096];
        // SAFETY: as above.
        unsafe { t.queue(io(9, Op::Read, 5 * 4096, &mut back)) };
        t.submit().unwrap();
        let fd = t.event_fd().unwrap();
        let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        assert_eq!(nix::poll::poll(&mut fds, 5000u16).unwrap(), 1);
        out.clear();
        t.reap(&mut out);
        assert_eq!(out.len(), 1);
        assert!(back.iter().all(|&b| b == 5));
    }

    /// The eventfd is set exactly while completions wait: after a reap that took everything
    /// owed it is clear, so the loop's poll does not spin on it and `reap` may skip it.
    #[test]
    fn the_eventfd_is_clear_once_every_completion_is_taken() {
        let mut t = Threaded::new(disk(false)).unwrap();
        let mut bufs: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 512]).collect();
        for round in 0..2000u64 {
            let n = 1 + (round % 4) as usize;
            for (i, b) in bufs.iter_mut().take(n).enumerate() {
                // SAFETY: the buffers outlive the reaps below, which take every completion.
                unsafe { t.queue(io(i as u64, Op::Write, i as u64 * 4096, b)) };
            }
            t.submit().unwrap();
            // Reap as the completions come (the reader racing the worker).
            let mut out = Vec::new();
            let start = std::time::Instant::now();
            while out.len() < n {
                assert!(start.elapsed().as_secs() < 10, "the worker did not finish");
                t.reap(&mut out);
            }
            assert_eq!(t.in_flight(), 0);
            let fd = t.event_fd().unwrap();
            let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
            assert_eq!(
                nix::poll::poll(&mut fds, 0u16).unwrap(),
                0,
                "round {round}: the eventfd is set with nothing to take"
            );
        }
    }

    #[test]
    fn a_panicking_transfer_fails_then_every_later_one_without_hanging() {
        let mut t = Threaded::new(disk(true)).unwrap();
        let mut a = vec![1u8; 512];
        let mut b = vec![2u8; 512];
        let mut c = vec![3u8; 512];
        // SAFETY: the buffers outlive the drain below.
        unsafe {
            t.queue(io(1, Op::Write, 0, &mut a));
            t.queue(io(2, Op::Write, 4096, &mut b));
            t.queue(io(3, Op::Write, 8192, &mut c));
        }
        t.submit().unwrap();
        let mut out = Vec::new();
        t.drain(&mut out).unwrap();
        let results: Vec<_> = out.iter().map(|c| (c.tag, c.result)).collect();
        assert_eq!(
            results,
            [(1, Ok(())), (2, Err(Errno::EIO)), (3, Err(Errno::EIO))]
        );
        assert_eq!(t.in_flight(), 0);
    }
}
