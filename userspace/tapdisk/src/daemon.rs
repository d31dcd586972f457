//! The event loop: one epoll over the control socket, the signals, each client connection, each
//! ring fd, each backend's completion eventfd, and each tap's NBD export queue (the export's
//! connections are served by threads of their own, whose I/O this loop does on the tap's image:
//! see `blktap::nbd::tap`).
//!
//! Signals, as the original tapdisk: SIGHUP reopens the log, SIGUSR1 writes the state of every
//! tap to it, SIGTERM and SIGINT shut down cleanly (every tap closed: its I/O answered, its disk
//! removed). None of them loses a disk.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::ErrorKind;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use blktap::ctl::{socket_path, CtlResponse};
use blktap::nbd::tap::TapExport;
use blktap::tap::TapOptions;
use blktap::Error;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::binary::{pause_answer, Answer, BinaryRequests};
use crate::conn::{Conn, Input, Proto, Request};
use crate::logging::{self, log};
use crate::requests::{not_attached, Handled, Requests, TapHost};
use crate::tap::{Tap, TapEvent};

/// What an epoll event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Listener,
    Signals,
    Conn(u64),
    Ring(u32),
    Backend(u32),
    Export(u32),
}

const KIND_SHIFT: u32 = 56;
const ID_MASK: u64 = (1 << KIND_SHIFT) - 1;

impl Token {
    fn encode(self) -> u64 {
        let (kind, id) = match self {
            Token::Listener => (1, 0),
            Token::Signals => (2, 0),
            Token::Conn(id) => (3, id & ID_MASK),
            Token::Ring(minor) => (4, u64::from(minor)),
            Token::Backend(minor) => (5, u64::from(minor)),
            Token::Export(minor) => (6, u64::from(minor)),
        };
        (kind << KIND_SHIFT) | id
    }

    fn decode(data: u64) -> Option<Self> {
        let id = data & ID_MASK;
        Some(match data >> KIND_SHIFT {
            1 => Token::Listener,
            2 => Token::Signals,
            3 => Token::Conn(id),
            4 => Token::Ring(u32::try_from(id).ok()?),
            5 => Token::Backend(u32::try_from(id).ok()?),
            6 => Token::Export(u32::try_from(id).ok()?),
            _ => return None,
        })
    }
}

/// How long tapdisk watches the rings after answering requests, by default (microseconds).
pub const DEFAULT_POLL_US: u64 = 100;

/// The longest stretch the rings are served by polling alone; epoll is then asked (without
/// waiting) for the other descriptors: control connections, signals, exports.
const POLL_STRETCH: Duration = Duration::from_millis(2);

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// After answering requests, how long to watch the rings for new ones before sleeping.
    pub poll: Duration,
    /// Whether that watch runs the CPU's spin-wait hint between two looks at the rings.
    pub poll_pause: bool,
    /// Directory of the control socket `ctl<pid>`.
    pub ctl_dir: PathBuf,
    /// Exit once the last tap is gone (after at least one was attached).
    pub exit_when_idle: bool,
    /// How taps are served (request deadline, extensions).
    pub tap: TapOptions,
}

/// A tapdisk: its control socket, its clients and its taps.
pub struct Daemon {
    epoll: Epoll,
    signals: SignalFd,
    listener: UnixListener,
    socket: PathBuf,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    taps: BTreeMap<u32, Tap>,
    tap_options: TapOptions,
    /// Connections waiting for a pause to finish: (connection, tap).
    waiters: Vec<(u64, u32)>,
    /// The generation of each tap's image whose backend fd is polled.
    backend_watch: BTreeMap<u32, u64>,
    /// Each open tap's NBD export (`nbd<pid>.<minor>` beside the control socket).
    exports: BTreeMap<u32, TapExport>,
    exit_when_idle: bool,
    had_taps: bool,
    quit: bool,
    poll: Duration,
    poll_pause: bool,
    /// Taps that answered requests since epoll returned: the rings worth watching.
    active: Vec<u32>,
    /// Whether the last stretch of polling ended with requests still coming: epoll is then
    /// asked without waiting.
    poll_again: bool,
}

impl Daemon {
    /// Blocks the termination signals (they are read from a signalfd), and listens on the
    /// control socket.
    pub fn new(opts: &Options) -> anyhow::Result<Self> {
        let mut mask = SigSet::empty();
        for s in [
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGHUP,
            Signal::SIGUSR1,
        ] {
            mask.add(s);
        }
        mask.thread_block().context("cannot block signals")?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .context("cannot create a signalfd")?;

        let socket = socket_path(&opts.ctl_dir, std::process::id() as i32);
        let listener = listen(&opts.ctl_dir, &socket)?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("cannot create epoll")?;
        let daemon = Self {
            epoll,
            signals,
            listener,
            socket,
            conns: HashMap::new(),
            next_conn: 0,
            taps: BTreeMap::new(),
            tap_options: opts.tap,
            waiters: Vec::new(),
            backend_watch: BTreeMap::new(),
            exports: BTreeMap::new(),
            exit_when_idle: opts.exit_when_idle,
            had_taps: false,
            quit: false,
            poll: opts.poll,
            poll_pause: opts.poll_pause,
            active: Vec::new(),
            poll_again: false,
        };
        daemon
            .watch(
                daemon.listener.as_fd(),
                Token::Listener,
                EpollFlags::EPOLLIN,
            )
            .context("cannot poll the control socket")?;
        daemon
            .watch(daemon.signals.as_fd(), Token::Signals, EpollFlags::EPOLLIN)
            .context("cannot poll the signalfd")?;
        Ok(daemon)
    }

    /// The control socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// How long epoll may wait: until the first retry of any tap is due, or a connection's
    /// timeout.
    fn timeout(&self) -> EpollTimeout {
        let retries = self.taps.values().filter_map(Tap::next_wakeup);
        let conns = self.conns.values().filter_map(Conn::deadline);
        let Some(at) = retries.chain(conns).min() else {
            return EpollTimeout::NONE;
        };
        let left = at.saturating_duration_since(Instant::now());
        // Round up, so that the retry is due when epoll returns.
        let ms = left.as_micros().div_ceil(1000).min(60_000) as u16;
        EpollTimeout::from(ms)
    }

    /// Closes the connections whose client took too long to send its request or read its
    /// answer.
    fn expire_conns(&mut self) {
        let now = Instant::now();
        let expired: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline().is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            if let Some(conn) = self.conns.remove(&id) {
                if conn.proto() != Proto::Json || conn.stalled_at() != "idle" {
                    log!(
                        "control connection closed after {} s: {}",
                        crate::conn::READ_TIMEOUT.as_secs(),
                        conn.stalled_at()
                    );
                }
                self.unwatch(conn.stream().as_fd());
            }
        }
    }

    /// Runs the retries that are due.
    fn run_timers(&mut self) {
        self.expire_conns();
        let now = Instant::now();
        let due: Vec<u32> = self
            .taps
            .iter()
            .filter(|(_, t)| t.next_wakeup().is_some_and(|at| at <= now))
            .map(|(&m, _)| m)
            .collect();
        for minor in due {
            if let Some(tap) = self.taps.get_mut(&minor) {
                if let Err(e) = tap.on_timer() {
                    log!("tap {minor}: {e}");
                }
            }
            self.after_tap_event(minor);
        }
    }

    /// Serves until a termination signal (or, with `exit_when_idle`, until the last tap is
    /// gone), then shuts every tap down.
    pub fn run(&mut self) -> anyhow::Result<()> {
        let mut events = vec![EpollEvent::empty(); 64];
        while !self.quit {
            let timeout = if std::mem::take(&mut self.poll_again) || self.arm_wakeups() {
                EpollTimeout::ZERO
            } else {
                self.timeout()
            };
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e).context("epoll_wait"),
            };
            for ev in &events[..n] {
                match Token::decode(ev.data()) {
                    Some(token) => self.dispatch(token, ev.events()),
                    None => log!("unknown epoll token {:#x}", ev.data()),
                }
            }
            self.run_timers();
            self.poll_rings();
        }
        self.shut_down();
        Ok(())
    }

    /// Before sleeping in epoll: each tap whose disk negotiated `DEVICE_REQ_EVENT` asks the
    /// kernel to signal its next request (while tapdisk polls, the kernel signals nobody), then
    /// looks at its ring once more. True if one had requests after all: they are served now,
    /// and epoll is asked without waiting.
    fn arm_wakeups(&mut self) -> bool {
        let ready: Vec<u32> = self
            .taps
            .iter()
            .filter(|(_, tap)| tap.arm_wakeup())
            .map(|(&minor, _)| minor)
            .collect();
        for &minor in &ready {
            self.on_ring(minor, EpollFlags::EPOLLIN);
        }
        !ready.is_empty()
    }

    /// Watches the rings of the taps that just answered requests for up to `poll` after the
    /// last request came, serving what comes (a request that arrives meanwhile costs no wake-up
    /// and no epoll_wait). Stops as soon as a tap waits for its image (its completion comes
    /// through epoll), and after `POLL_STRETCH` of serving, so that the other descriptors are
    /// looked at.
    fn poll_rings(&mut self) {
        if self.poll.is_zero() || self.active.is_empty() {
            self.active.clear();
            return;
        }
        let mut taps = std::mem::take(&mut self.active);
        taps.sort_unstable();
        taps.dedup();
        let start = Instant::now();
        let mut last = start;
        loop {
            let mut served = false;
            for &minor in &taps {
                if self.taps.get(&minor).is_some_and(Tap::has_new_requests) {
                    self.on_ring(minor, EpollFlags::EPOLLIN);
                    served = true;
                }
            }
            if self.quit
                || taps
                    .iter()
                    .any(|m| self.taps.get(m).is_none_or(Tap::backend_busy))
            {
                break;
            }
            let now = Instant::now();
            if served {
                last = now;
                if now.duration_since(start) >= POLL_STRETCH {
                    self.poll_again = true;
                    break;
                }
            } else if now.duration_since(last) >= self.poll {
                break;
            } else if self.poll_pause {
                std::hint::spin_loop();
            }
        }
        self.active.clear();
    }

    fn dispatch(&mut self, token: Token, events: EpollFlags) {
        match token {
            Token::Listener => self.accept(),
            Token::Signals => self.on_signals(),
            Token::Conn(id) => self.on_conn(id, events),
            Token::Ring(minor) => self.on_ring(minor, events),
            Token::Backend(minor) => self.on_backend(minor),
            Token::Export(minor) => {
                self.sync_export(minor, true);
                self.after_tap_event(minor);
            }
        }
    }

    /// Serves the open tap's image over NBD on `nbd<pid>.<minor>` beside the control socket, as
    /// the original tapdisk does. A tap whose export cannot start is still served (logged).
    fn serve_export(&mut self, minor: u32) {
        let Some(tap) = self.taps.get(&minor) else {
            return;
        };
        let dir = self.socket.parent().unwrap_or(Path::new("."));
        let path = blktap::nbd::tap::socket_path(dir, std::process::id(), minor);
        let export = match TapExport::start(&path, tap) {
            Ok(x) => x,
            Err(e) => return log!("tap {minor}: no NBD export: {e}"),
        };
        if let Err(e) = self.watch(export.fd(), Token::Export(minor), EpollFlags::EPOLLIN) {
            return log!("tap {minor}: no NBD export: cannot poll its queue: {e}");
        }
        log!("tap {minor}: NBD export on {}", export.path().display());
        self.exports.insert(minor, export);
    }

    /// The export follows its tap: the NBD requests held go to the tap while it is open, and
    /// with `take` (its queue is readable) the new ones first; once the tap has no disk (closed,
    /// shut down) the export is gone, its socket removed. Without `take` it makes no system
    /// call, so the ring's events cost nothing for it.
    fn sync_export(&mut self, minor: u32, take: bool) {
        match self.taps.get_mut(&minor) {
            Some(tap) if tap.has_disk() => {
                if let Some(export) = self.exports.get_mut(&minor) {
                    if take {
                        export.pump(tap);
                    } else {
                        export.retry(tap);
                    }
                }
            }
            _ => {
                if let Some(export) = self.exports.remove(&minor) {
                    self.unwatch(export.fd());
                    drop(export);
                    log!("tap {minor}: NBD export closed");
                }
            }
        }
    }

    fn watch(&self, fd: BorrowedFd<'_>, token: Token, flags: EpollFlags) -> nix::Result<()> {
        self.epoll.add(fd, EpollEvent::new(flags, token.encode()))
    }

    fn unwatch(&self, fd: BorrowedFd<'_>) {
        match self.epoll.delete(fd) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => log!("epoll_ctl(DEL): {e}"),
        }
    }

    /// Stops polling every fd of the tap.
    fn unwatch_tap(&mut self, minor: u32) {
        if let Some(tap) = self.taps.get(&minor) {
            self.unwatch(tap.ring().fd());
            if let Some(fd) = tap.backend_fd() {
                self.unwatch(fd);
            }
        }
        self.backend_watch.remove(&minor);
    }

    /// Answers every connection waiting for tap `minor` to pause, and goes on with their
    /// requests.
    fn answer_waiters(&mut self, minor: u32, response: CtlResponse) {
        if !self.waits_for(minor) {
            return;
        }
        let (ready, rest): (Vec<_>, Vec<_>) =
            self.waiters.drain(..).partition(|&(_, m)| m == minor);
        self.waiters = rest;
        for (id, _) in ready {
            if let Some(mut conn) = self.conns.remove(&id) {
                conn.waiting = false;
                conn.touch();
                match conn.proto() {
                    Proto::Binary => {
                        let answer = pause_answer(minor, &response);
                        conn.queue(answer.as_bytes());
                    }
                    _ => conn.queue(response.to_line().as_bytes()),
                }
                self.process(id, &mut conn);
                self.rearm(id, conn);
            }
        }
    }

    /// Whether a connection waits for tap `minor` to pause.
    fn waits_for(&self, minor: u32) -> bool {
        self.waiters.iter().any(|&(_, m)| m == minor)
    }

    /// With `exit_when_idle`, decides to exit once the last tap is gone, and removes the socket
    /// right away: from then on nobody finds this tapdisk (`tap-ctl list` right after `destroy`
    /// shows nothing), while the answers still pending on open connections go out.
    fn check_idle(&mut self) {
        if self.exit_when_idle && self.had_taps && self.taps.is_empty() && !self.quit {
            log!("last tap gone, exiting");
            self.quit = true;
            let _ = fs::remove_file(&self.socket);
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let conn = match Conn::new(stream) {
                        Ok(c) => c,
                        Err(e) => {
                            log!("control connection: {e}");
                            continue;
                        }
                    };
                    let id = self.next_conn;
                    self.next_conn = (self.next_conn + 1) & ID_MASK;
                    let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
                    if let Err(e) = self.watch(conn.stream().as_fd(), Token::Conn(id), flags) {
                        log!("cannot poll a control connection: {e}");
                        continue;
                    }
                    self.conns.insert(id, conn);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log!("accept: {e}");
                    return;
                }
            }
        }
    }

    fn on_conn(&mut self, id: u64, events: EpollFlags) {
        let Some(mut conn) = self.conns.remove(&id) else {
            return;
        };
        let (requests, closed) = match conn.read() {
            Input::Requests(r) => (r, false),
            Input::Closed(r) => (r, true),
        };
        conn.backlog.extend(requests);
        self.process(id, &mut conn);
        let hung_up = closed || events.contains(EpollFlags::EPOLLERR);
        if hung_up {
            conn.flush_blocking();
            self.unwatch(conn.stream().as_fd());
            return;
        }
        self.rearm(id, conn);
    }

    /// Answers the connection's requests in order, up to one whose answer must wait (a pause
    /// still draining).
    fn process(&mut self, id: u64, conn: &mut Conn) {
        while !conn.waiting {
            let Some(request) = conn.backlog.pop_front() else {
                return;
            };
            conn.touch();
            match request {
                Request::Json(line) => {
                    if line.trim().is_empty() {
                        continue;
                    }
                    match self.handle_line(&line) {
                        Handled::Now(response) => conn.queue(response.to_line().as_bytes()),
                        Handled::Later(minor) => {
                            conn.waiting = true;
                            self.waiters.push((id, minor));
                        }
                    }
                }
                Request::NotJson => {
                    let e = Error::invalid("not a JSON request: a NUL byte");
                    log!("control connection: {e}; closing it");
                    conn.queue(CtlResponse::failed(&e).to_line().as_bytes());
                }
                Request::Binary(msg, trailer) => match self.handle_binary(&msg, &trailer) {
                    Answer::Now(bytes) => conn.queue(&bytes),
                    Answer::Later(minor) => {
                        conn.waiting = true;
                        self.waiters.push((id, minor));
                    }
                },
            }
        }
    }

    /// Writes what the connection has to say and polls it again (for output too, if the socket
    /// is full); drops it if the client is gone.
    fn rearm(&mut self, id: u64, mut conn: Conn) {
        match conn.flush() {
            Ok(_) if conn.done() => self.unwatch(conn.stream().as_fd()),
            Ok(pending) => {
                let mut flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
                if pending {
                    flags |= EpollFlags::EPOLLOUT;
                }
                let ev = EpollEvent::new(flags, Token::Conn(id).encode());
                if let Err(e) = self.epoll.modify(conn.stream().as_fd(), &mut { ev }) {
                    log!("epoll_ctl(MOD): {e}");
                }
                self.conns.insert(id, conn);
            }
            Err(_) => self.unwatch(conn.stream().as_fd()),
        }
    }

    fn on_ring(&mut self, minor: u32, events: EpollFlags) {
        let Some(tap) = self.taps.get_mut(&minor) else {
            return;
        };
        self.active.push(minor);
        let event = if events.intersects(EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP) {
            TapEvent::CloseRequested
        } else {
            tap.on_ring()
        };
        match event {
            TapEvent::Served => {}
            TapEvent::CloseRequested => {
                log!("tap {minor}: the kernel closes the ring; shutting the tap down");
                self.remove_tap(minor);
                return;
            }
            TapEvent::Fault(f) => {
                log!("tap {minor}: {f}; no longer serving it (close and detach it)");
                if let Some(tap) = self.taps.get(&minor) {
                    self.unwatch(tap.ring().fd());
                }
            }
            TapEvent::Error(e) => log!("tap {minor}: {e}"),
        }
        self.after_tap_event(minor);
    }

    fn on_backend(&mut self, minor: u32) {
        self.active.push(minor);
        if let Some(tap) = self.taps.get_mut(&minor) {
            if let Err(e) = tap.on_backend() {
                log!("tap {minor}: {e}");
            }
        }
        self.after_tap_event(minor);
    }

    fn on_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGHUP) => match logging::reopen() {
                    Ok(what) => log!("SIGHUP: {what}"),
                    Err(e) => log!("SIGHUP: cannot reopen the log: {e}"),
                },
                Ok(Signal::SIGUSR1) => self.dump_state(),
                Ok(s) => {
                    log!("{}: shutting down", s.as_str());
                    self.quit = true;
                }
                Err(_) => log!("signal {}: ignored", info.ssi_signo),
            }
        }
    }

    /// SIGUSR1: the state of the daemon and of every tap (ring indexes, requests in flight by
    /// slot, counters), to the log.
    fn dump_state(&self) {
        log!(
            "SIGUSR1: state of tapdisk {}: {} tap(s), {} control connection(s), {} waiting for a \
             pause",
            std::process::id(),
            self.taps.len(),
            self.conns.len(),
            self.waiters.len()
        );
        for (minor, tap) in &self.taps {
            for line in tap.debug_state().lines() {
                log!("tap {minor}: {line}");
            }
        }
        log!("SIGUSR1: end of state");
    }

    fn shut_down(&mut self) {
        let minors: Vec<u32> = self.taps.keys().copied().collect();
        for minor in minors {
            log!("tap {minor}: shutting down");
            self.remove_tap(minor);
        }
        let e = Error::os("tapdisk is shutting down", Errno::ESHUTDOWN);
        let waiting: Vec<u32> = self.waiters.iter().map(|&(_, m)| m).collect();
        for minor in waiting {
            self.answer_waiters(minor, CtlResponse::failed(&e));
        }
        for conn in self.conns.values_mut() {
            conn.flush_blocking();
        }
        self.conns.clear();
    }
}

impl TapHost for Daemon {
    fn taps(&self) -> &BTreeMap<u32, Tap> {
        &self.taps
    }

    fn taps_mut(&mut self) -> &mut BTreeMap<u32, Tap> {
        &mut self.taps
    }

    fn tap_options(&self) -> TapOptions {
        self.tap_options
    }

    /// Polls the tap's ring fd, and its backend's fd if it has one.
    fn watch_tap(&mut self, minor: u32) -> nix::Result<()> {
        let Some(tap) = self.taps.get(&minor) else {
            return Ok(());
        };
        // Edge-triggered: every wake-up of the ring's poll queue (new requests, a message) is
        // an event, and each event takes everything there is; whether the kernel keeps
        // reporting POLLIN while requests are outstanding does not matter.
        let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLET;
        self.watch(tap.ring().fd(), Token::Ring(minor), flags)?;
        self.sync_backend_watch(minor)
    }

    /// Polls the backend's fd of the tap's current image, if it has one and it is new (opening,
    /// pausing and unpausing change the image; a closed backend's fd left epoll as it closed).
    fn sync_backend_watch(&mut self, minor: u32) -> nix::Result<()> {
        let Some(tap) = self.taps.get(&minor) else {
            self.backend_watch.remove(&minor);
            return Ok(());
        };
        let generation = tap.generation();
        if self.backend_watch.get(&minor) == Some(&generation) {
            return Ok(());
        }
        if let Some(fd) = tap.backend_fd() {
            match self.watch(fd, Token::Backend(minor), EpollFlags::EPOLLIN) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(e),
            }
        }
        self.backend_watch.insert(minor, generation);
        Ok(())
    }

    /// After anything happened to a tap: moves its NBD export on, polls its new backend, moves
    /// a pause on, and answers the connections waiting for that pause.
    fn after_tap_event(&mut self, minor: u32) {
        self.sync_export(minor, false);
        if let Err(e) = self.sync_backend_watch(minor) {
            log!("tap {minor}: cannot poll its image: {e}");
        }
        let Some(tap) = self.taps.get_mut(&minor) else {
            return self.answer_waiters(minor, CtlResponse::failed(&not_attached(minor)));
        };
        let outcome = tap.advance();
        let pausing = tap.state() == blktap::ctl::TapState::Pausing;
        // A pause may have ended in a resume: the NBD requests held meanwhile go on.
        self.sync_export(minor, false);
        if let Err(e) = self.sync_backend_watch(minor) {
            log!("tap {minor}: cannot poll its image: {e}");
        }
        match outcome {
            Some(Ok(())) => {
                log!("tap {minor}: paused");
                self.answer_waiters(minor, CtlResponse::ok());
            }
            Some(Err(e)) => {
                log!("tap {minor}: {e}");
                self.answer_waiters(minor, CtlResponse::failed(&e));
            }
            // Nobody waits (the usual case: every ring event comes here): no answer to build.
            None if !pausing && self.waits_for(minor) => {
                let e = Error::os(
                    format!("tap {minor} stopped pausing before it was paused"),
                    Errno::EIO,
                );
                self.answer_waiters(minor, CtlResponse::failed(&e));
            }
            None => {}
        }
    }

    fn start_export(&mut self, minor: u32) {
        self.serve_export(minor);
    }

    /// Records that a tap was attached (for `exit_when_idle`).
    fn note_attached(&mut self) {
        self.had_taps = true;
    }

    /// Forgets tap `minor` after shutting it down.
    fn remove_tap(&mut self, minor: u32) {
        self.unwatch_tap(minor);
        if let Some(tap) = self.taps.remove(&minor) {
            drop(tap.shut_down());
        }
        self.after_tap_event(minor);
        self.check_idle();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.socket);
    }
}

/// Makes `dir` and listens on `socket` in it (replacing a stale socket of a dead process that
/// had the same pid).
fn listen(dir: &Path, socket: &Path) -> anyhow::Result<UnixListener> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    match fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", socket.display())),
    }
    let listener = UnixListener::bind(socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    fs::set_permissions(socket, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", socket.display()))?;
    listener
        .set_nonblocking(true)
        .context("cannot make the control socket non-blocking")?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for t in [
            Token::Listener,
            Token::Signals,
            Token::Conn(0),
            Token::Conn(ID_MASK),
            Token::Ring(0),
            Token::Ring(16383),
            Token::Backend(u32::MAX),
        ] {
            assert_eq!(Token::decode(t.encode()), Some(t));
        }
        assert_eq!(Token::decode(0), None);
        assert_eq!(Token::decode(9 << KIND_SHIFT), None);
        assert_ne!(Token::Ring(3).encode(), Token::Backend(3).encode());
    }
}
