//! A tap's NBD export, as the original tapdisk serves on every open:
//! `/var/run/blktap-control/nbd<pid>.<minor>`.
//!
//! NBD connection threads ([`server`](super::server)) send their requests through a
//! [`channel`](super::channel) to the event loop that serves the tap; [`TapExport::pump`] (called
//! by that loop when [`TapExport::fd`] is readable) and [`TapExport::retry`] (after anything else
//! happened to the tap, with no system call) hand them to the tap's ring server, on the same
//! backend as the tapdev's requests:
//!
//! - ordering: every I/O, from the ring or from NBD, goes to the one backend in the order the
//!   loop takes it; as with two initiators of a shared disk, I/Os in flight together on
//!   overlapping ranges have no defined order, and an I/O issued after another completed sees
//!   its data;
//! - flush: a flush from either side is a backend flush, covering every write completed before
//!   it on both (hence `CAN_MULTI_CONN` when the image flushes);
//! - pause: while the tap is pausing or paused, NBD requests are held (the pause waits only for
//!   the ones already handed to the backend, like the ring's); they go to the new image once the
//!   tap is unpaused;
//! - close: the ring server drains first (NBD requests already handed to it are answered),
//!   then dropping the export fails the held ones with `ESHUTDOWN`, closes every connection and
//!   removes the socket.

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;

use super::channel::{channel, ExportQueue, ExportRequest};
use super::server::{Server, ServerConfig};
use crate::ctl::TapState;
use crate::ring::{RingDevice, SECTOR_SIZE};
use crate::tap::TapCore;
use crate::{Error, Result};

/// The socket of tap `minor`'s export in tapdisk `pid`, in `dir` (the control directory).
pub fn socket_path(dir: &Path, pid: u32, minor: u32) -> PathBuf {
    dir.join(format!("nbd{pid}.{minor}"))
}

/// A tap's export: its NBD server, and the requests waiting for the tap.
pub struct TapExport {
    held: VecDeque<ExportRequest>,
    queue: ExportQueue,
    server: Server,
}

impl std::fmt::Debug for TapExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapExport")
            .field("path", &self.server.path())
            .field("held", &self.held.len())
            .finish()
    }
}

impl TapExport {
    /// Serves the open tap's image on a unix socket at `path`, read-only if the tap is.
    pub fn start<D: RingDevice>(path: &Path, tap: &TapCore<D>) -> Result<Self> {
        let minor = tap.minor();
        let s = tap.server().ok_or_else(|| {
            Error::os(
                format!("tap {minor} has no image open to export"),
                Errno::EINVAL,
            )
        })?;
        let (export, queue) = channel(s.capacity() * SECTOR_SIZE, s.features())?;
        let config = ServerConfig {
            name: String::new(),
            description: format!("blktap tap {minor}: {}", s.image()),
            readonly: s.readonly(),
            any_name: true,
        };
        let server = Server::serve(path, Arc::new(export), config)
            .map_err(|e| Error::io("cannot serve NBD on", path, e))?;
        // Like the control socket: for root (the toolstack) only.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io("cannot restrict", path, e))?;
        Ok(Self {
            held: VecDeque::new(),
            queue,
            server,
        })
    }

    /// Readable when NBD requests wait to be taken.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.queue.fd()
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        self.server.path()
    }

    /// NBD requests held while the tap is not open (pausing, paused).
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Takes the waiting NBD requests (reading the queue's wake-up, a system call) and hands
    /// them, with those held, to the tap as [`TapExport::retry`] does: for when
    /// [`TapExport::fd`] is readable.
    pub fn pump<D: RingDevice>(&mut self, tap: &mut TapCore<D>) {
        self.held.extend(self.queue.take());
        self.retry(tap);
    }

    /// Hands the held NBD requests, in order, to the tap while it is open, without taking new
    /// ones (no system call): for after anything else happened to the tap, which may have made
    /// room or ended a pause. New requests wake the loop through [`TapExport::fd`].
    pub fn retry<D: RingDevice>(&mut self, tap: &mut TapCore<D>) {
        while let Some(req) = self.held.pop_front() {
            match req {
                ExportRequest::Io(io) => {
                    if let Err(io) = tap.queue_external(io) {
                        self.held.push_front(ExportRequest::Io(io));
                        break;
                    }
                }
                // A dead tap (its ring broke the protocol) still has its image: answer.
                ExportRequest::Status(q)
                    if matches!(tap.state(), TapState::Open | TapState::Dead) =>
                {
                    let map = tap
                        .server()
                        .and_then(|s| s.block_status(q.offset, u64::from(q.length)));
                    (q.reply)(map);
                }
                req => {
                    self.held.push_front(req);
                    break;
                }
            }
        }
    }
}

impl Drop for TapExport {
    fn drop(&mut self) {
        // First fail what waits (its callers give up), then `server` is dropped: it closes
        // every connection and waits for their threads.
        self.queue.close();
        self.held.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::backend::immediate::Synchronous;
    use crate::backend::nbd::{NbdBackend, Options};
    use crate::backend::ram::RamBackend;
    use crate::backend::{Backend, Completion, Io};
    use crate::ring::Op;
    use crate::tap::{OpenArgs, TapOptions};
    use crate::testkit::sim::{SimDevice, SimKernel};

    type Tap = TapCore<Rc<SimDevice>>;

    /// Runs the tap's loop (the export's queue, the client's completions) until the client has
    /// `n` completions or `for_at_most` passed.
    fn pump(
        tap: &mut Tap,
        export: &mut TapExport,
        client: &mut NbdBackend,
        n: usize,
        for_at_most: Duration,
    ) -> Vec<Completion> {
        let until = Instant::now() + for_at_most;
        let mut done = Vec::new();
        while done.len() < n && Instant::now() < until {
            let mut fds = [nix::poll::PollFd::new(
                export.fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10u16)).unwrap();
            export.pump(tap);
            client.reap(&mut done);
        }
        done
    }

    /// A 1 MiB ram disk, as a tap opens it.
    fn ram() -> Box<dyn Backend> {
        Box::new(Synchronous::new(RamBackend::new(1 << 20).unwrap()))
    }

    /// A tap on a simulated kernel serving `ram:1M` (the kernel must outlive the tap).
    fn ram_tap() -> (SimKernel, Tap) {
        let k = SimKernel::new();
        let mut tap: Tap = TapCore::attach(Rc::clone(&k.mem), TapOptions::default());
        let args = OpenArgs {
            params: "ram:1M",
            ..Default::default()
        };
        tap.open_backend(&args, "ram:1M", ram()).unwrap();
        (k, tap)
    }

    fn iov(b: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        }
    }

    fn readable(export: &TapExport, ms: u16) -> bool {
        let mut fds = [nix::poll::PollFd::new(
            export.fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)).unwrap() == 1
    }

    #[test]
    fn retry_leaves_new_requests_to_pump_and_its_wake_up() {
        // The loop calls `retry` after every ring event: it must not read the queue's wake-up
        // (a system call per event), and a request it does not take must keep the fd readable.
        let k = SimKernel::new();
        let mut tap: Tap = TapCore::attach(Rc::clone(&k.mem), TapOptions::default());
        let ram: Box<dyn Backend> = Box::new(Synchronous::new(RamBackend::new(1 << 20).unwrap()));
        let args = OpenArgs {
            params: "ram:1M",
            ..Default::default()
        };
        tap.open_backend(&args, "ram:1M", ram).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path(), 43, tap.minor());
        let mut export = TapExport::start(&path, &tap).unwrap();
        let uri = format!("nbd+unix:///x?socket={}", path.display());
        let opts = Options {
            deadline: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
        };
        let mut client = NbdBackend::open_with(&uri, false, opts).unwrap();
        let mut w = vec![0x3cu8; 4096];
        // SAFETY: `w` outlives the completion, which the loop below waits for.
        unsafe {
            client.queue(Io {
                tag: 9,
                op: Op::Write,
                offset: 0,
                iov: vec![iov(&mut w)],
                discard_len: 0,
            })
        };
        client.submit().unwrap();
        assert!(
            readable(&export, 10_000),
            "the request never reached the queue"
        );
        export.retry(&mut tap);
        assert!(readable(&export, 0), "retry consumed the wake-up");
        let mut done = Vec::new();
        client.reap(&mut done);
        assert!(done.is_empty(), "retry took a new request");
        let done = pump(
            &mut tap,
            &mut export,
            &mut client,
            1,
            Duration::from_secs(10),
        );
        assert_eq!(
            done,
            [Completion {
                tag: 9,
                result: Ok(())
            }]
        );
        assert!(!readable(&export, 0));
    }

    #[test]
    fn nbd_clients_share_the_tap_and_wait_through_a_pause() {
        let (k, mut tap) = ram_tap();
        let dir = std::env::temp_dir().join(format!("tap-export-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = socket_path(&dir, 42, tap.minor());
        assert!(path.ends_with(format!("nbd42.{}", tap.minor())));
        let mut export = TapExport::start(&path, &tap).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let uri = format!("nbd+unix:///any-name?socket={}", path.display());
        let opts = Options {
            deadline: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
        };
        let mut client = NbdBackend::open_with(&uri, false, opts).unwrap();
        assert_eq!(client.size(), 1 << 20);
        assert!(client.features().flush && client.features().discard);

        // An NBD write, then the ring reads it.
        let mut w = vec![0x6du8; 4096];
        // SAFETY: `w` outlives the completion, which pump() waits for.
        unsafe {
            client.queue(Io {
                tag: 1,
                op: Op::Write,
                offset: 8192,
                iov: vec![iov(&mut w)],
                discard_len: 0,
            })
        };
        client.submit().unwrap();
        let done = pump(
            &mut tap,
            &mut export,
            &mut client,
            1,
            Duration::from_secs(10),
        );
        assert_eq!(
            done,
            [Completion {
                tag: 1,
                result: Ok(())
            }]
        );
        // The map comes from the tap's image (the memfd of the ram disk knows its holes).
        if let Ok(mut child) = std::process::Command::new("nbdinfo")
            .args(["--map", &uri])
            .stdout(std::process::Stdio::piped())
            .spawn()
        {
            let until = Instant::now() + Duration::from_secs(30);
            while child.try_wait().unwrap().is_none() {
                assert!(Instant::now() < until, "nbdinfo never finished");
                let mut fds = [nix::poll::PollFd::new(
                    export.fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10u16)).unwrap();
                export.pump(&mut tap);
            }
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success());
            let text = String::from_utf8_lossy(&out.stdout);
            let map: Vec<Vec<&str>> = text
                .lines()
                .map(|l| l.split_whitespace().collect())
                .collect();
            let want = [
                ["0", "8192", "3"],
                ["8192", "4096", "0"],
                ["12288", "1036288", "3"],
            ];
            assert_eq!(map.len(), 3, "{text}");
            for (got, want) in map.iter().zip(want) {
                assert_eq!(&got[..3], &want[..], "{text}");
            }
        } else {
            eprintln!("SKIP: nbdinfo is not installed (scripts/setup installs it)");
        }
        let mut k = k;
        k.fill(0, 0, |_| 0);
        k.push(blktap_abi::OP_READ, 0, 16, &[(0, 7)]);
        k.publish();
        tap.on_ring();
        assert_eq!(k.responses().len(), 1);
        assert!(k.page(0, 0).iter().all(|&b| b == 0x6d));

        // Paused: an NBD write is held, not answered...
        assert!(tap.pause().unwrap());
        assert_eq!(tap.state(), TapState::Paused);
        let mut w2 = vec![0x2eu8; 4096];
        // SAFETY: as above.
        unsafe {
            client.queue(Io {
                tag: 2,
                op: Op::Write,
                offset: 0,
                iov: vec![iov(&mut w2)],
                discard_len: 0,
            })
        };
        client.submit().unwrap();
        let done = pump(
            &mut tap,
            &mut export,
            &mut client,
            1,
            Duration::from_millis(300),
        );
        assert!(done.is_empty(), "{done:?}");
        assert_eq!(export.held(), 1);
        // ...until the tap goes on (on a new image here): then it lands there.
        tap.unpause_backend("ram:1M", ram()).unwrap();
        let done = pump(
            &mut tap,
            &mut export,
            &mut client,
            1,
            Duration::from_secs(10),
        );
        assert_eq!(
            done,
            [Completion {
                tag: 2,
                result: Ok(())
            }]
        );
        assert_eq!(export.held(), 0);
        k.fill(1, 0, |_| 0);
        k.push(blktap_abi::OP_READ, 1, 0, &[(0, 7)]);
        k.publish();
        tap.on_ring();
        assert_eq!(k.responses().len(), 1);
        assert!(k.page(1, 0).iter().all(|&b| b == 0x2e));

        // Closed while an NBD read is held: it fails, the socket goes away.
        assert!(tap.pause().unwrap());
        let mut r = vec![0u8; 4096];
        // SAFETY: as above.
        unsafe {
            client.queue(Io {
                tag: 3,
                op: Op::Read,
                offset: 0,
                iov: vec![iov(&mut r)],
                discard_len: 0,
            })
        };
        client.submit().unwrap();
        let done = pump(
            &mut tap,
            &mut export,
            &mut client,
            1,
            Duration::from_millis(200),
        );
        assert!(done.is_empty(), "{done:?}");
        tap.close().unwrap();
        drop(export);
        assert!(!path.exists());
        let mut done = Vec::new();
        client.drain(&mut done).unwrap();
        assert_eq!(
            done,
            [Completion {
                tag: 3,
                result: Err(Errno::EIO)
            }]
        );
        drop(client);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn one_connection_has_many_requests_in_the_loop_at_once() {
        let (_k, mut tap) = ram_tap();
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path(), 44, tap.minor());
        let mut export = TapExport::start(&path, &tap).unwrap();
        let uri = format!("nbd+unix:///x?socket={}", path.display());
        // The deadline is how long the client retries once the export is gone (at the end).
        let opts = Options {
            deadline: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(2),
        };
        let mut client = NbdBackend::open_with(&uri, false, opts).unwrap();
        const N: usize = 32;
        let mut bufs: Vec<Vec<u8>> = (0..N).map(|i| vec![i as u8 + 1; 4096]).collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            // SAFETY: `bufs` outlives the completions, which pump() waits for.
            unsafe {
                client.queue(Io {
                    tag: i as u64,
                    op: Op::Write,
                    offset: i as u64 * 8192,
                    iov: vec![iov(b)],
                    discard_len: 0,
                })
            };
        }
        client.submit().unwrap();
        let done = pump(
            &mut tap,
            &mut export,
            &mut client,
            N,
            Duration::from_secs(10),
        );
        assert_eq!(done.len(), N);
        assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");

        // Paused, the tap holds what the connection sends: every read of it, sent before any
        // answer, reaches the loop (one at a time, only the first would).
        let read_all = |client: &mut NbdBackend, bufs: &mut Vec<Vec<u8>>| {
            for (i, b) in bufs.iter_mut().enumerate() {
                b.fill(0);
                // SAFETY: as above; the caller waits for the completions.
                unsafe {
                    client.queue(Io {
                        tag: 100 + i as u64,
                        op: Op::Read,
                        offset: i as u64 * 8192,
                        iov: vec![iov(b)],
                        discard_len: 0,
                    })
                };
            }
            client.submit().unwrap();
        };
        let wait_held = |tap: &mut Tap, export: &mut TapExport| {
            let until = Instant::now() + Duration::from_secs(10);
            while export.held() < N && Instant::now() < until {
                readable(export, 10);
                export.pump(tap);
            }
            export.held()
        };
        // Read back at once, answered in any order: each buffer has its own range's data.
        read_all(&mut client, &mut bufs);
        let done = pump(
            &mut tap,
            &mut export,
            &mut client,
            N,
            Duration::from_secs(10),
        );
        assert_eq!(done.len(), N);
        assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.iter().all(|&x| x == i as u8 + 1), "read {i}");
        }
        assert!(tap.pause().unwrap());
        read_all(&mut client, &mut bufs);
        assert_eq!(wait_held(&mut tap, &mut export), N);
        // They go to the new image (empty) once the tap goes on.
        tap.unpause_backend("ram:1M", ram()).unwrap();
        let done = pump(
            &mut tap,
            &mut export,
            &mut client,
            N,
            Duration::from_secs(10),
        );
        assert_eq!(done.len(), N);
        assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
        assert!(bufs.iter().all(|b| b.iter().all(|&x| x == 0)));

        // Closed with all of them held: every one fails, none is lost.
        assert!(tap.pause().unwrap());
        read_all(&mut client, &mut bufs);
        assert_eq!(wait_held(&mut tap, &mut export), N);
        tap.close().unwrap();
        drop(export);
        let mut done = Vec::new();
        client.drain(&mut done).unwrap();
        assert_eq!(done.len(), N);
        assert!(done.iter().all(|c| c.result == Err(Errno::EIO)), "{done:?}");
    }
}
