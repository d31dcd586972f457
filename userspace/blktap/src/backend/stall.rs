//! `stall:MS[:SIZE]`: like `null:` (reads return zeros, writes are dropped, flushes, FUA writes
//! and discards accepted), but every completion is handed out `MS` milliseconds after its I/O was
//! queued. For testing the kernel's request deadline: the wait is a timerfd the event loop polls,
//! so nothing blocks meanwhile.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::null::zero_iovecs;
use super::{check_range, parse_size, Backend, Completion, Features, ImageKind, Io};
use crate::ring::Op;
use crate::{Error, Result};

/// Size of the disk when `stall:MS` names none.
pub const DEFAULT_SIZE: u64 = 64 << 20;
/// Longest delay accepted (one hour).
pub const MAX_DELAY_MS: u64 = 3_600_000;

/// Parses `MS[:SIZE]`: the delay, and the size in bytes ([`DEFAULT_SIZE`] if left out).
pub fn parse_args(arg: &str) -> Result<(Duration, u64)> {
    let (ms, size) = match arg.split_once(':') {
        Some((ms, size)) => (ms, parse_size(size)?),
        None => (arg, DEFAULT_SIZE),
    };
    let ms: u64 = ms
        .parse()
        .ok()
        .filter(|&ms| ms <= MAX_DELAY_MS && !arg.starts_with('+'))
        .ok_or_else(|| {
            Error::invalid(format!(
                "stall:{arg}: the delay must be 0..={MAX_DELAY_MS} milliseconds"
            ))
        })?;
    Ok((Duration::from_millis(ms), size))
}

/// A disk of zeros whose every answer comes late.
#[derive(Debug)]
pub struct StallBackend {
    size: u64,
    delay: Duration,
    timer: OwnedFd,
    /// Completions and when they are due, in order (the delay is the same for all).
    pending: VecDeque<(Instant, Completion)>,
}

impl StallBackend {
    /// A disk of `size` bytes answering `delay` late.
    pub fn new(delay: Duration, size: u64) -> Result<Self> {
        // SAFETY: plain syscall with valid flags.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(Error::os("create a timerfd", Errno::last()));
        }
        Ok(Self {
            size,
            delay,
            // SAFETY: a fresh descriptor nothing else owns.
            timer: unsafe { OwnedFd::from_raw_fd(fd) },
            pending: VecDeque::new(),
        })
    }

    /// The delay of every answer.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// Arms the timer for the first pending completion (disarms it if there is none).
    fn arm(&self) {
        let left = self
            .pending
            .front()
            .map(|(due, _)| due.saturating_duration_since(Instant::now()));
        let value = match left {
            // A zero it_value disarms: expire in 1 ns instead.
            Some(d) => libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(d.subsec_nanos().max(u32::from(d.is_zero()))),
            },
            None => libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        // SAFETY: our timerfd and a valid itimerspec.
        let r = unsafe {
            libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut())
        };
        if r != 0 {
            log::warn!("stall: timerfd_settime: {}", Errno::last());
        }
    }

    fn take_due(&mut self, now: Instant, out: &mut Vec<Completion>) {
        while let Some(&(due, c)) = self.pending.front() {
            if due > now {
                break;
            }
            self.pending.pop_front();
            out.push(c);
        }
    }
}

impl Backend for StallBackend {
    fn kind(&self) -> ImageKind {
        ImageKind::Stall
    }

    fn size(&self) -> u64 {
        self.size
    }

    unsafe fn queue(&mut self, io: Io) {
        let result = check_range(&io, self.size);
        if result.is_ok() && io.op == Op::Read {
            // SAFETY: the buffers are valid for writes (the `queue` contract).
            unsafe { zero_iovecs(&io.iov) };
        }
        let was_idle = self.pending.is_empty();
        self.pending.push_back((
            Instant::now() + self.delay,
            Completion {
                tag: io.tag,
                result,
            },
        ));
        if was_idle {
            self.arm();
        }
    }

    fn submit(&mut self) -> Result<()> {
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        let mut expirations = [0u8; 8];
        // SAFETY: reads 8 bytes into the buffer; clears the timer's expiry count.
        let _ = unsafe { libc::read(self.timer.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
        self.take_due(Instant::now(), out);
        self.arm();
    }

    fn in_flight(&self) -> usize {
        self.pending.len()
    }

    fn drain(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        if let Some(&(last, _)) = self.pending.back() {
            std::thread::sleep(last.saturating_duration_since(Instant::now()));
        }
        self.take_due(Instant::now(), out);
        self.arm();
        Ok(())
    }

    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.timer.as_fd())
    }

    fn features(&self) -> Features {
        Features::ALL
    }

    fn allocated_bytes(&self) -> Option<u64> {
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

    #[test]
    fn parses_delay_and_size() {
        assert_eq!(
            parse_args("4000").unwrap(),
            (Duration::from_secs(4), DEFAULT_SIZE)
        );
        assert_eq!(parse_args("0:1M").unwrap(), (Duration::ZERO, 1 << 20));
        for bad in ["", "x", "-1", "+5", "3600001", "10:", "10:100", "1.5"] {
            assert!(parse_args(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn answers_come_late_through_the_timerfd_without_blocking() {
        let delay = Duration::from_millis(150);
        let mut stall = StallBackend::new(delay, 1 << 20).unwrap();
        let mut buf = vec![0xaau8; 512];
        let start = Instant::now();
        // SAFETY: `buf` outlives the I/O (its zeroing happens inside `queue`).
        unsafe {
            stall.queue(Io {
                tag: 1,
                op: Op::Read,
                offset: 0,
                iov: vec![libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: 512,
                }],
                discard_len: 0,
            });
            stall.queue(Io {
                tag: 2,
                op: Op::Flush,
                offset: 0,
                iov: vec![],
                discard_len: 0,
            });
        }
        // Queuing did not wait.
        assert!(start.elapsed() < delay / 2);
        let mut done = Vec::new();
        stall.reap(&mut done);
        assert!(done.is_empty());
        assert_eq!(stall.in_flight(), 2);
        let fd = stall.event_fd().unwrap();
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        assert_eq!(poll(&mut fds, PollTimeout::from(5000u16)).unwrap(), 1);
        let waited = start.elapsed();
        assert!(waited >= delay, "readable after {waited:?}");
        assert!(waited < delay * 4, "readable only after {waited:?}");
        stall.reap(&mut done);
        assert_eq!(
            done.iter().map(|c| (c.tag, c.result)).collect::<Vec<_>>(),
            [(1, Ok(())), (2, Ok(()))]
        );
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(stall.in_flight(), 0);
        // Nothing pending: the timer is disarmed.
        let fd = stall.event_fd().unwrap();
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        assert_eq!(poll(&mut fds, PollTimeout::from(300u16)).unwrap(), 0);
    }

    #[test]
    fn describes_itself_and_answers_what_is_due() {
        // `stall:MS` without a size: 64 MiB.
        assert_eq!(DEFAULT_SIZE, 64 << 20);
        let mut stall = StallBackend::new(Duration::from_millis(20), 4096).unwrap();
        assert_eq!(stall.delay(), Duration::from_millis(20));
        assert_eq!(stall.allocated_bytes(), Some(0));
        assert_eq!(stall.features(), Features::ALL);
        // SAFETY: no buffers.
        unsafe {
            stall.queue(Io {
                tag: 3,
                op: Op::Flush,
                offset: 0,
                iov: vec![],
                discard_len: 0,
            });
        }
        let due = stall.pending.front().unwrap().0;
        let mut out = Vec::new();
        stall.take_due(due - Duration::from_nanos(1), &mut out);
        assert!(out.is_empty());
        // Due at `due` itself.
        stall.take_due(due, &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn drain_waits_for_the_last_answer() {
        let mut stall = StallBackend::new(Duration::from_millis(100), 4096).unwrap();
        let start = Instant::now();
        // SAFETY: no buffers.
        unsafe {
            stall.queue(Io {
                tag: 7,
                op: Op::Discard,
                offset: 0,
                iov: vec![],
                discard_len: 8192,
            });
        }
        let mut done = Vec::new();
        stall.drain(&mut done).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(100));
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].result, Err(Errno::EIO), "beyond the 4 KiB disk");
    }
}
