//! A [`SyncBackend`] whose transfers block on files, run on a worker thread so the event loop
//! does not wait: [`Backend::submit`] hands the queued I/Os to the worker, which performs them
//! in order and posts each completion, signalling an eventfd the event loop polls.

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
        let (tx, rx) = channel::<Job>();
        let worker_shared = Arc::clone(&shared);
        let worker = std::thread::Builder::new()
            .name(format!("{}-io", kind.name()))
            .spawn(move || {
                for Job(io) in rx {
                    // SAFETY: the buffers stay valid until this completion is handed out (the
                    // `queue` contract, carried by `Job`).
                    let result = unsafe { inner.transfer(&io) };
                    let mut done = worker_shared
                        .done
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    done.completions.push(Completion {
                        tag: io.tag,
                        result,
                    });
                    drop(done);
                    worker_shared.cond.notify_all();
                    let _ = worker_shared.eventfd.write(1);
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
        })
    }

    fn take_done(&mut self, out: &mut Vec<Completion>) {
        let mut done = self
            .shared
            .done
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.pending -= done.completions.len();
        out.append(&mut done.completions);
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
        // Clear the eventfd first: completions posted after this read signal it again.
        let _ = self.shared.eventfd.read();
        self.take_done(out);
    }

    fn in_flight(&self) -> usize {
        self.pending
    }

    fn drain(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        self.submit()?;
        let _ = self.shared.eventfd.read();
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
