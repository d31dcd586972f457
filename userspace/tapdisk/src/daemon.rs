//! The event loop: one epoll over the control socket, the termination signals, each client
//! connection, each ring fd and each backend's completion eventfd.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::ErrorKind;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use anyhow::Context;
use blktap::ctl::socket_path;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::conn::{Conn, Input};
use crate::log::log;
use crate::tap::{RingEvent, Tap};

/// What an epoll event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Listener,
    Signals,
    Conn(u64),
    Ring(u32),
    Backend(u32),
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
            _ => return None,
        })
    }
}

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory of the control socket `ctl<pid>`.
    pub ctl_dir: PathBuf,
    /// Exit once the last tap is gone (after at least one was attached).
    pub exit_when_idle: bool,
}

/// A tapdisk: its control socket, its clients and its taps.
pub struct Daemon {
    epoll: Epoll,
    signals: SignalFd,
    listener: UnixListener,
    socket: PathBuf,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    pub(crate) taps: BTreeMap<u32, Tap>,
    exit_when_idle: bool,
    had_taps: bool,
    quit: bool,
}

impl Daemon {
    /// Blocks the termination signals (they are read from a signalfd), and listens on the
    /// control socket.
    pub fn new(opts: &Options) -> anyhow::Result<Self> {
        let mut mask = SigSet::empty();
        for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
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
            exit_when_idle: opts.exit_when_idle,
            had_taps: false,
            quit: false,
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

    /// Serves until a termination signal (or, with `exit_when_idle`, until the last tap is
    /// gone), then shuts every tap down.
    pub fn run(&mut self) -> anyhow::Result<()> {
        let mut events = vec![EpollEvent::empty(); 64];
        while !self.quit {
            let n = match self.epoll.wait(&mut events, EpollTimeout::NONE) {
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
        }
        self.shut_down();
        Ok(())
    }

    fn dispatch(&mut self, token: Token, events: EpollFlags) {
        match token {
            Token::Listener => self.accept(),
            Token::Signals => self.on_signals(),
            Token::Conn(id) => self.on_conn(id, events),
            Token::Ring(minor) => self.on_ring(minor, events),
            Token::Backend(minor) => self.on_backend(minor),
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

    /// Polls the tap's ring fd, and its backend's fd if it has one.
    pub(crate) fn watch_tap(&self, minor: u32) -> nix::Result<()> {
        let Some(tap) = self.taps.get(&minor) else {
            return Ok(());
        };
        // Edge-triggered: every wake-up of the ring's poll queue (new requests, a message) is
        // an event, and each event takes everything there is; whether the kernel keeps
        // reporting POLLIN while requests are outstanding does not matter.
        let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLET;
        self.watch(tap.ring_fd(), Token::Ring(minor), flags)?;
        self.watch_backend(minor)
    }

    /// Polls the tap's backend's fd, if it has one.
    pub(crate) fn watch_backend(&self, minor: u32) -> nix::Result<()> {
        if let Some(fd) = self.taps.get(&minor).and_then(Tap::backend_fd) {
            self.watch(fd, Token::Backend(minor), EpollFlags::EPOLLIN)?;
        }
        Ok(())
    }

    /// Stops polling the tap's backend's fd.
    pub(crate) fn unwatch_backend(&self, minor: u32) {
        if let Some(fd) = self.taps.get(&minor).and_then(Tap::backend_fd) {
            self.unwatch(fd);
        }
    }

    /// Stops polling every fd of the tap.
    pub(crate) fn unwatch_tap(&self, minor: u32) {
        if let Some(tap) = self.taps.get(&minor) {
            self.unwatch(tap.ring_fd());
        }
        self.unwatch_backend(minor);
    }

    /// Records that a tap was attached (for `exit_when_idle`).
    pub(crate) fn note_attached(&mut self) {
        self.had_taps = true;
    }

    /// Forgets tap `minor` after shutting it down.
    pub(crate) fn remove_tap(&mut self, minor: u32) {
        self.unwatch_tap(minor);
        if let Some(tap) = self.taps.remove(&minor) {
            tap.shut_down();
        }
        self.check_idle();
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
        let (lines, closed) = match conn.read() {
            Input::Lines(lines) => (lines, false),
            Input::Closed(lines) => (lines, true),
        };
        for line in lines {
            if line.trim().is_empty() {
                continue;
            }
            let response = self.handle_line(&line);
            conn.queue(&response.to_line());
        }
        let hung_up = closed || events.contains(EpollFlags::EPOLLERR);
        if hung_up {
            conn.flush_blocking();
            self.unwatch(conn.stream().as_fd());
            return;
        }
        match conn.flush() {
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
        let event = if events.intersects(EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP) {
            RingEvent::CloseRequested
        } else {
            tap.on_ring_event()
        };
        match event {
            RingEvent::Served => {}
            RingEvent::CloseRequested => {
                log!("tap {minor}: the kernel closes the ring; shutting the tap down");
                self.remove_tap(minor);
            }
            RingEvent::Fault(f) => {
                log!("tap {minor}: {f}; no longer serving it (close and detach it)");
                if let Some(tap) = self.taps.get(&minor) {
                    self.unwatch(tap.ring_fd());
                }
            }
            RingEvent::Error(e) => log!("tap {minor}: {e}"),
        }
    }

    fn on_backend(&mut self, minor: u32) {
        if let Some(tap) = self.taps.get_mut(&minor) {
            if let Err(e) = tap.on_backend_event() {
                log!("tap {minor}: {e}");
            }
        }
    }

    fn on_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            let name = Signal::try_from(info.ssi_signo as i32)
                .map(|s| s.as_str())
                .unwrap_or("a signal");
            log!("{name}: shutting down");
            self.quit = true;
        }
    }

    fn shut_down(&mut self) {
        let minors: Vec<u32> = self.taps.keys().copied().collect();
        for minor in minors {
            log!("tap {minor}: shutting down");
            self.remove_tap(minor);
        }
        for conn in self.conns.values_mut() {
            conn.flush_blocking();
        }
        self.conns.clear();
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
