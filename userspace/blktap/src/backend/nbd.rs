//! `nbd:URI`: an image on an NBD server (`nbd:nbd://host[:port]/export`,
//! `nbd:nbd+unix:///export?socket=PATH`), through the client of [`crate::nbd`].
//!
//! Threads: the event loop only queues I/Os and reaps completions; a supervisor thread sends the
//! requests (pipelined, each with its own cookie) and owns the connection, and a reader thread per
//! connection reads the replies, copies read data into the I/O's buffers and posts the completion
//! on an eventfd the event loop polls (as `aio:` does). Nothing here blocks the event loop.
//!
//! Operations: reads and writes always; `Flush` if the server offers `NBD_CMD_FLUSH`, `WriteFua`
//! if it offers `NBD_CMD_FLAG_FUA`; `Discard` is sent as `NBD_CMD_WRITE_ZEROES` (holes allowed)
//! when the server offers it, because a blktap discard promises that the range reads back as
//! zeros and an NBD trim does not.
//!
//! A dropped connection is re-established (at once if it answered a request; else, and after a
//! failed try, backing off from 50 ms to 1 s) and every unanswered request is sent again, in the
//! order first sent. A request still unanswered
//! [`Options::deadline`] after it was first queued fails with `EIO`; so does every request while
//! the server stays away past that deadline (tapdisk's own retries then apply). A server that
//! stalls (a request unanswered past the deadline while connected) or breaks the protocol (a reply
//! for an unknown cookie, a bad magic, data outside the request, a successful read reply that
//! leaves part of the range without data) is dropped the same way.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::{check_range, Backend, Completion, Features, ImageKind, Io};
use crate::nbd::client::{self, Connection, NbdUri, Reply, Sent, Stream};
use crate::nbd::proto::{cflag, cmd, errno, tflag, ProtoError, Request};
use crate::ring::Op;
use crate::{Error, Result};

/// How the client waits.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// How long a request may stay unanswered (the server away, or stalling) before it fails.
    pub deadline: Duration,
    /// How long one connection attempt (connect and handshake) may take.
    pub connect_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            deadline: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// An I/O travelling to the worker threads.
struct SendIo(Io);

// SAFETY: an Io is plain data plus raw iovecs into buffers the caller of `Backend::queue` keeps
// valid, untouched by anyone else, until the completion is handed out or the backend is dropped;
// the worker threads are its only users meanwhile (one at a time, under the `pending` lock), and
// `Drop` joins them before returning.
unsafe impl Send for SendIo {}

struct InFlight {
    io: SendIo,
    req: Request,
    first_sent: Instant,
    /// An error chunk seen for it (0: none).
    error: u32,
    /// The ranges a read's reply chunks filled so far (data or holes), on this connection.
    filled: Vec<(u64, u64)>,
}

/// Whether `ranges` (each `[start, end)`, in any order, overlapping or not) cover
/// `[offset, offset + length)` entirely.
fn covers(ranges: &mut [(u64, u64)], offset: u64, length: u64) -> bool {
    ranges.sort_unstable();
    let end = offset.saturating_add(length);
    let mut at = offset;
    for &(a, b) in ranges.iter() {
        if at >= end {
            break;
        }
        if a > at {
            return false;
        }
        at = at.max(b);
    }
    at >= end
}

struct Shared {
    pending: Mutex<BTreeMap<u64, InFlight>>,
    done: Mutex<Vec<Completion>>,
    event: EventFd,
    /// Requests the server answered (on any connection).
    answered: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn complete(&self, tag: u64, result: Result<(), Errno>) {
        lock(&self.done).push(Completion { tag, result });
        let _ = self.event.write(1);
    }
}

enum Msg {
    Io(SendIo),
    /// The reader of connection number `.0` stopped.
    Dead(u64),
    Stop,
}

/// An image on an NBD server.
pub struct NbdBackend {
    uri: NbdUri,
    size: u64,
    features: Features,
    tx: Sender<Msg>,
    shared: Arc<Shared>,
    queued: Vec<Io>,
    in_flight: usize,
    supervisor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NbdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdBackend")
            .field("uri", &self.uri.to_string())
            .field("size", &self.size)
            .field("features", &self.features)
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

fn proto_error(uri: &NbdUri, e: ProtoError) -> Error {
    let errno = match &e {
        ProtoError::Io(io) => Errno::from_raw(io.raw_os_error().unwrap_or(libc::EIO)),
        ProtoError::Refused { .. } => Errno::ENOENT,
        _ => Errno::EPROTO,
    };
    Error::os(format!("NBD server {uri}: {e}"), errno)
}

impl NbdBackend {
    /// Connects to the export `uri` names; writes are refused when `readonly`.
    pub fn open(uri: &str, readonly: bool) -> Result<Self> {
        Self::open_with(uri, readonly, Options::default())
    }

    /// Connects as [`NbdBackend::open`] does, waiting as `opts` say.
    pub fn open_with(uri: &str, readonly: bool, opts: Options) -> Result<Self> {
        let uri: NbdUri = uri.parse().map_err(|e| Error::invalid(format!("{e}")))?;
        let conn = client::connect(&uri, opts.connect_timeout).map_err(|e| proto_error(&uri, e))?;
        if !readonly && conn.has(tflag::READ_ONLY) {
            return Err(Error::os(
                format!("NBD server {uri}: the export is read-only"),
                Errno::EROFS,
            ));
        }
        let features = Features {
            flush: conn.has(tflag::SEND_FLUSH),
            fua: conn.has(tflag::SEND_FUA) && !readonly,
            discard: conn.has(tflag::SEND_WRITE_ZEROES) && !readonly,
        };
        let size = conn.size;
        let event = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(|e| Error::os("create an eventfd", e))?;
        let shared = Arc::new(Shared {
            pending: Mutex::default(),
            done: Mutex::default(),
            event,
            answered: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel();
        let mut sup = Supervisor {
            uri: uri.clone(),
            opts,
            readonly,
            features,
            size,
            shared: shared.clone(),
            tx: tx.clone(),
            rx,
            conn: None,
            generation: 0,
            next_cookie: 1,
            next_try: Instant::now(),
            backoff: BACKOFF_MIN,
        };
        sup.attach(conn)
            .map_err(|e| Error::os("start an NBD reader thread", e))?;
        let supervisor = std::thread::Builder::new()
            .name("nbd-client".into())
            .spawn(move || sup.run())
            .map_err(|e| {
                Error::os(
                    "start an NBD client thread",
                    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EAGAIN)),
                )
            })?;
        Ok(NbdBackend {
            uri,
            size,
            features,
            tx,
            shared,
            queued: Vec::new(),
            in_flight: 0,
            supervisor: Some(supervisor),
        })
    }

    /// The server's URI.
    pub fn uri(&self) -> &NbdUri {
        &self.uri
    }
}

impl Drop for NbdBackend {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(t) = self.supervisor.take() {
            let _ = t.join();
        }
    }
}

impl Backend for NbdBackend {
    fn kind(&self) -> ImageKind {
        ImageKind::Nbd
    }

    fn size(&self) -> u64 {
        self.size
    }

    unsafe fn queue(&mut self, io: Io) {
        self.in_flight += 1;
        self.queued.push(io);
    }

    fn submit(&mut self) -> Result<()> {
        for io in self.queued.drain(..) {
            if let Err(mpsc::SendError(Msg::Io(SendIo(io)))) = self.tx.send(Msg::Io(SendIo(io))) {
                // The supervisor is gone (it never stops before Drop): fail the I/O here.
                self.shared.complete(io.tag, Err(Errno::EIO));
            }
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        // Clear the eventfd first: completions posted after this read signal it again.
        let _ = self.shared.event.read();
        let mut done = lock(&self.shared.done);
        self.in_flight -= done.len();
        out.append(&mut done);
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn drain(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        self.submit()?;
        loop {
            self.reap(out);
            if self.in_flight == 0 {
                return Ok(());
            }
            let mut fds = [PollFd::new(self.shared.event.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(1000u16)) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(Error::os("poll an NBD client's eventfd", e)),
            }
        }
    }

    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.shared.event.as_fd())
    }

    fn features(&self) -> Features {
        self.features
    }
}

struct Live {
    stream: Stream,
    reader: JoinHandle<()>,
    generation: u64,
    /// [`Shared::answered`] when it was made.
    answered: u64,
}

struct Supervisor {
    uri: NbdUri,
    opts: Options,
    readonly: bool,
    features: Features,
    size: u64,
    shared: Arc<Shared>,
    tx: Sender<Msg>,
    rx: Receiver<Msg>,
    conn: Option<Live>,
    generation: u64,
    next_cookie: u64,
    next_try: Instant,
    backoff: Duration,
}

impl Supervisor {
    fn run(mut self) {
        loop {
            if self.conn.is_none() && !lock(&self.shared.pending).is_empty() {
                self.reconnect_or_expire();
            }
            let wait = if self.conn.is_none() {
                self.next_try.saturating_duration_since(Instant::now())
            } else {
                // Look for stalled requests now and then.
                (self.opts.deadline / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
            };
            match self.rx.recv_timeout(wait) {
                Ok(Msg::Io(io)) => self.start(io.0),
                Ok(Msg::Dead(g)) => {
                    if self.conn.as_ref().is_some_and(|c| c.generation == g) {
                        self.drop_connection("connection lost");
                    }
                }
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
            if self.conn.is_some() && self.stalled() {
                self.drop_connection("a request is unanswered past the deadline");
                self.expire();
            }
        }
        if let Some(live) = self.conn.take() {
            live.stream.shutdown();
            let _ = live.reader.join();
        }
    }

    /// Takes a new I/O: checks it, then sends it (or keeps it until the server is back).
    fn start(&mut self, io: Io) {
        let tag = io.tag;
        let fail = |e| self.shared.complete(tag, Err(e));
        if !self.features.supports(io.op) {
            return fail(Errno::EOPNOTSUPP);
        }
        if self.readonly && matches!(io.op, Op::Write | Op::WriteFua | Op::Discard) {
            return fail(Errno::EROFS);
        }
        if let Err(e) = check_range(&io, self.size) {
            return fail(e);
        }
        let len = io.len();
        let (typ, flags) = match io.op {
            Op::Read => (cmd::READ, 0),
            Op::Write => (cmd::WRITE, 0),
            Op::WriteFua => (cmd::WRITE, cflag::FUA),
            Op::Flush => (cmd::FLUSH, 0),
            Op::Discard => (cmd::WRITE_ZEROES, 0),
        };
        let limit = if io.op == Op::Discard {
            u64::from(u32::MAX - 4095)
        } else {
            u64::from(crate::nbd::proto::MAX_PAYLOAD)
        };
        if len > limit {
            return fail(Errno::EINVAL);
        }
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let req = Request {
            flags,
            typ,
            cookie,
            offset: if io.op == Op::Flush { 0 } else { io.offset },
            length: if io.op == Op::Flush { 0 } else { len as u32 },
        };
        lock(&self.shared.pending).insert(
            cookie,
            InFlight {
                io: SendIo(io),
                req,
                first_sent: Instant::now(),
                error: 0,
                filled: Vec::new(),
            },
        );
        if self.conn.is_some() {
            if let Err(e) = self.send(cookie) {
                self.drop_connection(&format!("send: {e}"));
            }
        }
    }

    /// Writes request `cookie` (and a write's data) on the connection.
    fn send(&mut self, cookie: u64) -> std::io::Result<()> {
        let mut b;
        {
            let pending = lock(&self.shared.pending);
            let Some(f) = pending.get(&cookie) else {
                return Ok(());
            };
            b = f.req.encode().to_vec();
            if f.req.typ == cmd::WRITE {
                b.reserve(f.req.length as usize);
                for v in &f.io.0.iov {
                    // SAFETY: the iovec is valid for reads of its length until the I/O completes
                    // (the `queue` contract), and it has not completed: it is still pending.
                    let s =
                        unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len) };
                    b.extend_from_slice(s);
                }
            }
        }
        let Some(live) = &self.conn else {
            return Ok(());
        };
        std::io::Write::write_all(&mut &live.stream, &b)
    }

    /// Whether the oldest request is past its deadline.
    fn stalled(&self) -> bool {
        let now = Instant::now();
        lock(&self.shared.pending)
            .values()
            .any(|f| now.duration_since(f.first_sent) >= self.opts.deadline)
    }

    /// Fails every request past its deadline with `EIO`.
    fn expire(&mut self) {
        let now = Instant::now();
        let mut pending = lock(&self.shared.pending);
        let late: Vec<u64> = pending
            .iter()
            .filter(|(_, f)| now.duration_since(f.first_sent) >= self.opts.deadline)
            .map(|(&c, _)| c)
            .collect();
        for c in late {
            if let Some(f) = pending.remove(&c) {
                self.shared.complete(f.io.0.tag, Err(Errno::EIO));
            }
        }
    }

    fn drop_connection(&mut self, why: &str) {
        if let Some(live) = self.conn.take() {
            live.stream.shutdown();
            let _ = live.reader.join();
            if self.shared.answered.load(Ordering::Relaxed) != live.answered {
                // It served: try again at once.
                log::warn!("nbd: {}: {why}; reconnecting", self.uri);
                self.next_try = Instant::now();
                self.backoff = BACKOFF_MIN;
            } else {
                // Not one request answered (a server that breaks the protocol or stalls on
                // every connection): back off as after a failed connect, not to hammer it.
                log::warn!(
                    "nbd: {}: {why}; reconnecting in {} ms",
                    self.uri,
                    self.backoff.as_millis()
                );
                self.next_try = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    fn reconnect_or_expire(&mut self) {
        self.expire();
        if lock(&self.shared.pending).is_empty() || Instant::now() < self.next_try {
            return;
        }
        let attempt = client::connect(&self.uri, self.opts.connect_timeout)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                if c.size != self.size {
                    Err(format!("the export's size changed to {}", c.size))
                } else if (self.features.flush && !c.has(tflag::SEND_FLUSH))
                    || (self.features.fua && !c.has(tflag::SEND_FUA))
                    || (self.features.discard && !c.has(tflag::SEND_WRITE_ZEROES))
                    || (!self.readonly && c.has(tflag::READ_ONLY))
                {
                    Err("the server no longer offers what it did".into())
                } else {
                    Ok(c)
                }
            });
        let conn = match attempt {
            Ok(c) => c,
            Err(e) => {
                log::debug!("nbd: {}: reconnect: {e}", self.uri);
                self.next_try = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                return;
            }
        };
        if let Err(e) = self.attach(conn) {
            log::warn!("nbd: {}: cannot start a reader: {e}", self.uri);
            self.next_try = Instant::now() + self.backoff;
            return;
        }
        let cookies: Vec<u64> = {
            let mut pending = lock(&self.shared.pending);
            for f in pending.values_mut() {
                f.error = 0;
                f.filled.clear();
            }
            pending.keys().copied().collect()
        };
        log::info!(
            "nbd: {}: reconnected, sending {} requests again",
            self.uri,
            cookies.len()
        );
        for c in cookies {
            if let Err(e) = self.send(c) {
                self.drop_connection(&format!("send: {e}"));
                return;
            }
        }
    }

    /// Starts the reader of a new connection and makes it the live one.
    fn attach(&mut self, conn: Connection) -> std::result::Result<(), Errno> {
        let errno = |e: std::io::Error| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
        let read_half = conn.stream.try_clone().map_err(errno)?;
        self.generation += 1;
        let generation = self.generation;
        let (shared, tx) = (self.shared.clone(), self.tx.clone());
        let uri = self.uri.to_string();
        let reader = std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || {
                if let Err(e) = read_replies(&read_half, &shared) {
                    log::warn!("nbd: {uri}: {e}");
                }
                let _ = tx.send(Msg::Dead(generation));
            })
            .map_err(errno)?;
        self.conn = Some(Live {
            stream: conn.stream,
            reader,
            generation,
            answered: self.shared.answered.load(Ordering::Relaxed),
        });
        Ok(())
    }
}

/// The errno for a protocol error number.
fn errno_of(e: u32) -> Errno {
    match e {
        errno::EPERM => Errno::EPERM,
        errno::ENOMEM => Errno::ENOMEM,
        errno::EINVAL => Errno::EINVAL,
        errno::ENOSPC => Errno::ENOSPC,
        errno::EOVERFLOW => Errno::EOVERFLOW,
        errno::ENOTSUP => Errno::EOPNOTSUPP,
        _ => Errno::EIO,
    }
}

/// Copies `data` into the I/O's buffers at byte `at` of its range (zeros if `data` is `None`),
/// `len` bytes.
///
/// # Safety
///
/// The iovecs of `io` must be valid for writes (a pending read).
unsafe fn scatter(io: &Io, mut at: usize, data: Option<&[u8]>, len: usize) {
    let mut done = 0;
    for v in &io.iov {
        if done == len {
            break;
        }
        if at >= v.iov_len {
            at -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - at).min(len - done);
        // SAFETY: [at, at + n) is inside this iovec, valid for writes (the caller's promise);
        // the source is our own buffer, which cannot overlap it.
        unsafe {
            let dst = v.iov_base.cast::<u8>().add(at);
            match data {
                Some(d) => std::ptr::copy_nonoverlapping(d[done..].as_ptr(), dst, n),
                None => std::ptr::write_bytes(dst, 0, n),
            }
        }
        done += n;
        at = 0;
    }
}

/// Reads replies until the connection fails or breaks the protocol.
fn read_replies(stream: &Stream, shared: &Shared) -> std::result::Result<(), ProtoError> {
    let mut r = stream;
    loop {
        let reply = client::read_reply(&mut r, |cookie| {
            lock(&shared.pending).get(&cookie).map(|f| Sent {
                read: f.req.typ == cmd::READ,
                offset: f.req.offset,
                length: f.req.length,
            })
        })?;
        let mut pending = lock(&shared.pending);
        let (cookie, done) = match &reply {
            Reply::Data { cookie, done, .. }
            | Reply::Hole { cookie, done, .. }
            | Reply::Status { cookie, done, .. } => (*cookie, *done),
        };
        // read_reply found it, and only this thread removes entries while connected.
        let Some(f) = pending.get_mut(&cookie) else {
            return Err(ProtoError::violation("a request vanished"));
        };
        match reply {
            Reply::Data { offset, data, .. } => {
                let at = (offset - f.req.offset) as usize;
                // SAFETY: a pending read's buffers are valid for writes; read_reply checked the
                // range against the request's, which is the I/O's.
                unsafe { scatter(&f.io.0, at, Some(&data), data.len()) };
                f.filled.push((offset, offset + data.len() as u64));
            }
            Reply::Hole { offset, length, .. } => {
                let at = (offset - f.req.offset) as usize;
                // SAFETY: as above.
                unsafe { scatter(&f.io.0, at, None, length as usize) };
                f.filled.push((offset, offset + u64::from(length)));
            }
            Reply::Status { error, .. } => {
                if error != 0 && f.error == 0 {
                    f.error = error;
                }
            }
        }
        if done
            && f.error == 0
            && f.req.typ == cmd::READ
            && !covers(&mut f.filled, f.req.offset, u64::from(f.req.length))
        {
            // A successful read must fill its whole range (the protocol says so): the rest of
            // the buffer holds whatever was there, never to be handed out as the disk's data.
            // The request stays pending, to be sent again on the next connection.
            return Err(ProtoError::violation(
                "a read answered without data for part of its range",
            ));
        }
        if done {
            shared.answered.fetch_add(1, Ordering::Relaxed);
            if let Some(f) = pending.remove(&cookie) {
                let result = if f.error == 0 {
                    Ok(())
                } else {
                    Err(errno_of(f.error))
                };
                shared.complete(f.io.0.tag, result);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::covers;

    #[test]
    fn coverage_of_a_read_by_its_chunks() {
        assert!(covers(&mut [(0, 4096)], 0, 4096));
        assert!(covers(&mut [(2048, 4096), (0, 2048)], 0, 4096));
        assert!(covers(&mut [(0, 3000), (1000, 4096)], 0, 4096));
        assert!(covers(&mut [(8192, 12288)], 8192, 4096));
        assert!(covers(&mut [], 0, 0));
        assert!(!covers(&mut [], 0, 512));
        assert!(!covers(&mut [(0, 2048)], 0, 4096));
        assert!(!covers(&mut [(0, 1024), (2048, 4096)], 0, 4096));
        assert!(!covers(&mut [(512, 4096)], 0, 4096));
        assert!(!covers(&mut [(0, 4095)], 0, 4096));
    }
}
