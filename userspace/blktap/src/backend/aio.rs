//! `aio:/path`: a raw image file or block device, through io_uring.
//!
//! The image is opened with `O_DIRECT` when its file system allows it (buffered otherwise).
//! Each I/O is one `readv`/`writev` straight between the image and the caller's buffers (the
//! ring's data pages). A batch is submitted with one `io_uring_enter`; completions are signalled
//! on an eventfd for the event loop. Short transfers are continued where they stopped; a
//! transfer that makes no progress (a read at end of file) fails with `EIO`.
//!
//! Flushes are `fdatasync` (io_uring `Fsync` with `DATASYNC`); FUA writes are `pwritev2` with
//! `RWF_DSYNC`; discards punch a hole in a regular file (io_uring `Fallocate` with
//! `PUNCH_HOLE | KEEP_SIZE`), or are a `BLKDISCARD` ioctl on a block device. A file system
//! without holes answers `EOPNOTSUPP`, which the server turns into "not supported".
//!
//! **Direct and buffered transfers.** Each file is open twice, with and without `O_DIRECT`.
//! A transfer goes direct when it meets the alignment `O_DIRECT` needs on that file (its
//! offset and every buffer's length a multiple of the logical block size, every buffer's
//! address of the memory alignment), as `statx(STATX_DIOALIGN)` reports it, or 512 bytes where
//! the kernel does not say. Any other transfer goes through the page cache, so a 512-byte guest
//! I/O on storage with 4 KiB sectors costs that one transfer a trip through the page cache,
//! not the whole image. Linux keeps the two coherent: a direct transfer writes back and drops
//! the cached pages of its range first.
//!
//! Where the alignment was assumed and `O_DIRECT` refuses (`EINVAL`) a transfer that met it,
//! the file's alignment is raised to 4 KiB (offset and lengths first, then addresses) and the
//! transfer is retried; when even that is refused, or a direct transfer fails with `EFAULT`
//! (buffers the kernel cannot pin, e.g. a ring mapped as raw page frames), the file gives up
//! `O_DIRECT` and every later transfer goes through the page cache.
//!
//! While a file is served direct, its clean cached pages are dropped (`posix_fadvise`
//! `DONTNEED`) when it is opened and after each flush that follows buffered transfers: while a
//! file has any page cached, every direct write must look for pages to invalidate in its
//! range, which costs measurably (see `userspace/README.md`, "I/O").
//!
//! Other files can be read through the same ring, opened read-only beside the image
//! ([`AioBackend::add_reader`], [`AioBackend::queue_read`]; each with its own alignment and
//! fall-back): the `vhd:` backend reads its chain's parents so.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use io_uring::{opcode, types, IoUring};
use nix::errno::Errno;
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::{check_range, Backend, Completion, Features, ImageKind, Io};
use crate::ring::Op;
use crate::{Error, Result};

/// BLKGETSIZE64 and BLKDISCARD, kept private (the macros make public functions).
mod ioctls {
    nix::ioctl_read!(ioctl_blkgetsize64, 0x12, 114, u64);
    nix::ioctl_write_ptr_bad!(
        ioctl_blkdiscard,
        nix::request_code_none!(0x12, 119),
        [u64; 2]
    );
}

use ioctls::{ioctl_blkdiscard, ioctl_blkgetsize64};

/// Submission queue entries: at most 32 requests are in flight per tap, each one entry.
const QUEUE_DEPTH: u32 = 64;
/// How often an I/O is retried after `EAGAIN`/`EINTR` before it fails.
const MAX_RETRIES: u32 = 16;

/// What `O_DIRECT` needs of a transfer on one file: the transfer's offset and every buffer's
/// length a multiple of `offset`, every buffer's address a multiple of `mem` (the checks Linux
/// makes for block devices and iomap file systems).
///
/// # Invariants
///
/// `mem` and `offset` are powers of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectAlign {
    /// Alignment of the buffers' addresses.
    pub mem: u64,
    /// Alignment of the offset and of each buffer's length.
    pub offset: u64,
    /// Reported by the kernel (`STATX_DIOALIGN`), not assumed.
    pub reported: bool,
}

impl DirectAlign {
    /// Assumed where the kernel does not report it: 512-byte sectors, the unit of the ring.
    pub const ASSUMED: DirectAlign = DirectAlign {
        mem: 512,
        offset: 512,
        reported: false,
    };
    /// The strictest alignment learned from refusals: a page, and the largest logical block
    /// size in common use.
    const MOST: u64 = 4096;

    /// The alignment the kernel reports for `file` opened with `O_DIRECT`: `Some(None)` if it
    /// says the file takes no direct I/O, `None` if it does not say (kernels before 6.1, file
    /// systems that do not report it).
    fn reported(file: &File) -> Option<Option<DirectAlign>> {
        // SAFETY: all-zero bytes are a valid `statx` (plain integers).
        let mut st: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: an empty path with AT_EMPTY_PATH names the open descriptor; `st` is a
        // writable `statx` the call fills.
        let rc = unsafe {
            libc::statx(
                file.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                libc::STATX_DIOALIGN,
                &mut st,
            )
        };
        if rc != 0 || st.stx_mask & libc::STATX_DIOALIGN == 0 {
            return None;
        }
        let (mem, offset) = (
            u64::from(st.stx_dio_mem_align),
            u64::from(st.stx_dio_offset_align),
        );
        if mem == 0 || offset == 0 || !mem.is_power_of_two() || !offset.is_power_of_two() {
            return Some(None);
        }
        Some(Some(DirectAlign {
            mem,
            offset,
            reported: true,
        }))
    }

    /// Whether a transfer at `offset` with buffers `iov` meets this alignment.
    pub fn admits(&self, offset: u64, iov: &[libc::iovec]) -> bool {
        offset.is_multiple_of(self.offset)
            && iov.iter().all(|v| {
                (v.iov_base as u64).is_multiple_of(self.mem)
                    && (v.iov_len as u64).is_multiple_of(self.offset)
            })
    }

    /// The alignment to try after `O_DIRECT` refused (`EINVAL`) a transfer this one admits:
    /// 4 KiB offsets and lengths, then 4 KiB addresses too; none when the kernel reported this
    /// one, or it is that strict already (the file gives up `O_DIRECT`).
    pub fn stricter(&self) -> Option<DirectAlign> {
        if self.reported {
            None
        } else if self.offset < Self::MOST {
            Some(DirectAlign {
                offset: Self::MOST,
                mem: self.mem.min(Self::MOST),
                ..*self
            })
        } else if self.mem < Self::MOST {
            Some(DirectAlign {
                mem: Self::MOST,
                ..*self
            })
        } else {
            None
        }
    }
}

/// An I/O handed to the kernel.
#[derive(Debug)]
struct Pending {
    tag: u64,
    op: Op,
    /// Where the rest of the transfer starts on the image.
    offset: u64,
    /// The buffers; `iov[first..]` (the first one trimmed) is what remains to transfer. The
    /// vector's heap block never moves while the kernel may read it.
    iov: Vec<libc::iovec>,
    first: usize,
    remaining: u64,
    retries: u32,
    /// Last submitted on the `O_DIRECT` descriptor.
    direct: bool,
    /// The file: 0 the image, `i` the `i`th one [`AioBackend::add_reader`] opened.
    file: usize,
}

impl Pending {
    /// Drops the first `n` bytes of the remaining buffers.
    fn advance(&mut self, mut n: u64) {
        self.offset += n;
        self.remaining -= n;
        while n > 0 {
            let v = &mut self.iov[self.first];
            let len = v.iov_len as u64;
            if n < len {
                // SAFETY: n < iov_len, so the new base stays inside the same buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n as usize) }.cast();
                v.iov_len -= n as usize;
                return;
            }
            n -= len;
            self.first += 1;
        }
    }
}

/// One file the ring transfers to or from: the image (file 0) or a reader.
#[derive(Debug)]
struct Handle {
    /// Open without `O_DIRECT`: the transfers `align` does not admit (all of them without
    /// it), flushes and discards.
    buffered: File,
    /// Open with `O_DIRECT`, if the file system allows it. It stays open after the file gives
    /// up `O_DIRECT` (transfers on it may still be in flight, so its number must not be
    /// reused) until drop.
    direct: Option<File>,
    /// What a transfer must meet to go on `direct`; none once `O_DIRECT` is given up, or if
    /// it never was possible.
    align: Option<DirectAlign>,
    path: PathBuf,
    size: u64,
    /// A block device (else a regular file).
    block_device: bool,
    /// Transfers went through the page cache since its clean pages were last dropped.
    cached: bool,
    /// Transfers submitted direct and buffered.
    transfers: [u64; 2],
}

impl Handle {
    /// Opens `path` (read-only or not), also with `O_DIRECT` if `try_direct` and its file
    /// system allows it.
    fn open(path: &Path, readonly: bool, try_direct: bool) -> Result<Self> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!readonly);
        let buffered = opts
            .open(path)
            .map_err(|e| Error::io("cannot open", path, e))?;
        let (size, block_device) = image_size(&buffered, path)?;
        let direct = if try_direct {
            match opts.custom_flags(libc::O_DIRECT).open(path) {
                Ok(f) => Some(f),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => None,
                Err(e) => return Err(Error::io("cannot open", path, e)),
            }
        } else {
            None
        };
        let align = match &direct {
            None => None,
            Some(f) => DirectAlign::reported(f).unwrap_or(Some(DirectAlign::ASSUMED)),
        };
        let handle = Self {
            buffered,
            direct,
            align,
            path: path.into(),
            size,
            block_device,
            cached: false,
            transfers: [0; 2],
        };
        // Pages cached by whoever wrote the file last would slow every direct write.
        handle.drop_clean_pages();
        Ok(handle)
    }

    /// Drops the file's clean cached pages while it is served direct (best effort: kernels
    /// without `posix_fadvise` answer `ENOSYS`).
    fn drop_clean_pages(&self) {
        if self.align.is_some() {
            super::drop_clean_pages(self.buffered.as_fd(), 0, 0);
        }
    }

    /// After `O_DIRECT` failed with `errno` on a transfer at `offset` with buffers `iov`:
    /// makes the alignment stricter or gives up `O_DIRECT`. Returns whether the transfer is
    /// to be retried (always, unless `errno` is no refusal of direct I/O).
    fn refused(&mut self, errno: Errno, offset: u64, iov: &[libc::iovec]) -> bool {
        let Some(align) = self.align else {
            // Another transfer gave up O_DIRECT since this one was submitted.
            return true;
        };
        if !align.admits(offset, iov) {
            // Another one made the alignment stricter since: this one goes buffered now.
            return true;
        }
        match (errno, align.stricter()) {
            (Errno::EINVAL, Some(next)) => {
                log::warn!(
                    "aio {}: O_DIRECT refused a transfer aligned to {} bytes; transfers not \
                     aligned to {} bytes (addresses {}) go through the page cache",
                    self.path.display(),
                    align.offset,
                    next.offset,
                    next.mem
                );
                self.align = Some(next);
                true
            }
            (Errno::EINVAL | Errno::EFAULT, _) => {
                log::warn!(
                    "aio {}: O_DIRECT transfer failed ({errno}); using buffered I/O",
                    self.path.display()
                );
                self.align = None;
                true
            }
            _ => false,
        }
    }
}

/// A raw image served through io_uring.
pub struct AioBackend {
    uring: IoUring,
    eventfd: EventFd,
    /// The image, then the files [`AioBackend::add_reader`] opened beside it.
    files: Vec<Handle>,
    /// In-flight I/Os, indexed by their io_uring `user_data`.
    ops: Vec<Option<Pending>>,
    free: Vec<usize>,
    /// Completions decided without the kernel (out of range, submission failed).
    done: Vec<Completion>,
    active: usize,
    /// `io_uring_enter` calls made to submit.
    enters: u64,
}

impl std::fmt::Debug for AioBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AioBackend")
            .field("path", &self.image().path)
            .field("size", &self.image().size)
            .field("align", &self.image().align)
            .field("active", &self.active)
            .finish()
    }
}

impl AioBackend {
    /// Opens the image at `path`, with `O_DIRECT` if the file system allows it.
    pub fn open(path: &Path, readonly: bool) -> Result<Self> {
        Self::open_with(path, readonly, true)
    }

    /// Opens the image at `path`; `O_DIRECT` is tried only if `try_direct`.
    pub fn open_with(path: &Path, readonly: bool, try_direct: bool) -> Result<Self> {
        let image = Handle::open(path, readonly, try_direct)?;
        // No `dontfork()`: tapdisk does not fork once serving, and it needs `madvise`, which
        // small kernels (tinyconfig without ADVISE_SYSCALLS) lack.
        let uring = IoUring::builder()
            .build(QUEUE_DEPTH)
            .map_err(|e| Error::io("cannot set up io_uring for", path, e))?;
        let eventfd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(|e| Error::os("create an eventfd", e))?;
        uring
            .submitter()
            .register_eventfd(eventfd.as_fd().as_raw_fd())
            .map_err(|e| Error::io("cannot register the eventfd of", path, e))?;
        Ok(Self {
            uring,
            eventfd,
            files: vec![image],
            ops: Vec::new(),
            free: Vec::new(),
            done: Vec::new(),
            active: 0,
            enters: 0,
        })
    }

    fn image(&self) -> &Handle {
        &self.files[0]
    }

    /// Opens `path` read-only beside the image, with `O_DIRECT` if `try_direct` and its file
    /// system allows it (with its own alignment and fall-back, as the image's):
    /// [`AioBackend::queue_read`] reads it through the same ring. Returns its number (from 1).
    pub fn add_reader(&mut self, path: &Path, try_direct: bool) -> Result<usize> {
        self.files.push(Handle::open(path, true, try_direct)?);
        Ok(self.files.len() - 1)
    }

    /// Whether file `file` (0 the image, else a reader) is served with `O_DIRECT` (the
    /// transfers its alignment admits).
    pub fn file_direct(&self, file: usize) -> Option<bool> {
        self.files.get(file).map(|h| h.align.is_some())
    }

    /// The alignment file `file`'s transfers must meet to go direct; none if it is served
    /// through the page cache only (or there is no such file).
    pub fn file_align(&self, file: usize) -> Option<DirectAlign> {
        self.files.get(file).and_then(|h| h.align)
    }

    /// Transfers submitted on file `file`: direct, and through the page cache.
    pub fn file_transfers(&self, file: usize) -> Option<[u64; 2]> {
        self.files.get(file).map(|h| h.transfers)
    }

    /// Queues a read from file `file` (the number [`AioBackend::add_reader`] gave), as
    /// [`Backend::queue`] does on the image; anything but a read, or an unknown file, fails
    /// (`EINVAL`). File 0 is the image: any I/O, as [`Backend::queue`].
    ///
    /// # Safety
    ///
    /// As [`Backend::queue`].
    pub unsafe fn queue_read(&mut self, file: usize, io: Io) {
        if file == 0 {
            // SAFETY: the caller's contract.
            return unsafe { self.queue(io) };
        }
        let Some(h) = self.files.get(file).filter(|_| io.op == Op::Read) else {
            self.done.push(Completion {
                tag: io.tag,
                result: Err(Errno::EINVAL),
            });
            return;
        };
        if let Err(e) = check_range(&io, h.size) {
            self.done.push(Completion {
                tag: io.tag,
                result: Err(e),
            });
            return;
        }
        self.start(io, file);
    }

    /// Whether the image is served with `O_DIRECT` (the transfers its alignment admits).
    pub fn direct(&self) -> bool {
        self.image().align.is_some()
    }

    /// Lets I/Os reach past the size the file had when opened, up to `limit` bytes: for a file
    /// that grows while it is served (a VHD whose blocks are appended), whose owner knows where
    /// the data is.
    pub fn set_limit(&mut self, limit: u64) {
        self.files[0].size = limit;
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.image().path
    }

    fn complete(&mut self, token: usize, result: Result<(), Errno>) {
        if let Some(p) = self.ops.get_mut(token).and_then(Option::take) {
            self.free.push(token);
            self.active -= 1;
            if p.op == Op::Flush && result.is_ok() {
                if let Some(h) = self.files.get_mut(p.file).filter(|h| h.cached) {
                    // What went through the page cache is on disk: its pages are clean.
                    h.cached = false;
                    h.drop_clean_pages();
                }
            }
            self.done.push(Completion { tag: p.tag, result });
        }
    }

    /// Puts the remaining part of I/O `token` on the submission queue: on the direct
    /// descriptor if its file's alignment admits it, else on the buffered one.
    fn push(&mut self, token: usize) {
        let Some(p) = self.ops.get_mut(token).and_then(Option::as_mut) else {
            return;
        };
        let Some(h) = self.files.get_mut(p.file) else {
            return self.complete(token, Err(Errno::EINVAL));
        };
        let rest = &p.iov[p.first..];
        let direct = match (&h.direct, h.align) {
            (Some(f), Some(a)) if p.op.has_data() && a.admits(p.offset, rest) => Some(f),
            _ => None,
        };
        p.direct = direct.is_some();
        if p.op.has_data() {
            h.transfers[usize::from(!p.direct)] += 1;
            h.cached |= !p.direct;
        }
        let fd = types::Fd(direct.unwrap_or(&h.buffered).as_raw_fd());
        let (ptr, len) = (rest.as_ptr(), rest.len() as u32);
        let entry = match p.op {
            Op::Read => opcode::Readv::new(fd, ptr, len).offset(p.offset).build(),
            Op::Write => opcode::Writev::new(fd, ptr, len).offset(p.offset).build(),
            Op::WriteFua => opcode::Writev::new(fd, ptr, len)
                .offset(p.offset)
                .rw_flags(libc::RWF_DSYNC)
                .build(),
            Op::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Discard => opcode::Fallocate::new(fd, p.remaining)
                .offset(p.offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        }
        .user_data(token as u64);
        for _ in 0..2 {
            // SAFETY: the entry points at `p.iov[first..]`, whose heap block stays put until the
            // I/O completes (it is only dropped in `complete`, after its CQE), and at buffers the
            // `queue` contract keeps valid until then; its descriptor stays open until drop.
            if unsafe { self.uring.submission().push(&entry) }.is_ok() {
                return;
            }
            // Queue full: hand what is queued to the kernel and retry once.
            if let Err(e) = self.submit_queued() {
                log::warn!("aio {}: submit: {e}", self.path().display());
            }
        }
        self.complete(token, Err(Errno::EAGAIN));
    }

    /// Hands the queued entries to the kernel: one `io_uring_enter`, and none when nothing is
    /// queued (the io-uring crate's `submit` enters anyway: a system call per turn of the
    /// loop for nothing), unless completions overflowed the CQ and wait in the kernel.
    fn submit_queued(&mut self) -> std::io::Result<usize> {
        {
            let mut sq = self.uring.submission();
            sq.sync();
            if sq.is_empty() && !sq.cq_overflow() {
                return Ok(0);
            }
        }
        self.enters += 1;
        loop {
            match self.uring.submit() {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                r => return r,
            }
        }
    }

    /// Handles the completion of one transfer of I/O `token`: finishes it, or continues it.
    fn handle(&mut self, token: usize, res: i32) -> bool {
        let Some(p) = self.ops.get_mut(token).and_then(Option::as_mut) else {
            log::warn!("aio {}: unknown completion {token}", self.path().display());
            return false;
        };
        if res < 0 {
            let errno = Errno::from_raw(-res);
            if matches!(errno, Errno::EAGAIN | Errno::EINTR) && p.retries < MAX_RETRIES {
                p.retries += 1;
                self.push(token);
                return true;
            }
            if matches!(errno, Errno::EFAULT | Errno::EINVAL) && p.op.has_data() && p.direct {
                let retry = self
                    .files
                    .get_mut(p.file)
                    .is_some_and(|h| h.refused(errno, p.offset, &p.iov[p.first..]));
                if retry {
                    self.push(token);
                    return true;
                }
            }
            self.complete(token, Err(errno));
            return false;
        }
        if !p.op.has_data() {
            // A flush or discard is done in one go.
            self.complete(token, Ok(()));
            return false;
        }
        let n = res as u64;
        if n == 0 || n > p.remaining {
            // End of file, or a transfer that made no progress (or more than asked).
            self.complete(token, Err(Errno::EIO));
            return false;
        }
        p.advance(n);
        if p.remaining == 0 {
            self.complete(token, Ok(()));
            return false;
        }
        self.push(token);
        true
    }

    /// Hands `io` (checked against the file's size) on file `file` to the kernel; its buffers
    /// are valid until its completion (the `queue` contract).
    fn start(&mut self, io: Io, file: usize) {
        let remaining = io.len();
        if remaining == 0 && io.op.has_data() {
            self.done.push(Completion {
                tag: io.tag,
                result: Ok(()),
            });
            return;
        }
        let pending = Pending {
            tag: io.tag,
            op: io.op,
            offset: io.offset,
            iov: io.iov,
            first: 0,
            remaining,
            retries: 0,
            direct: false,
            file,
        };
        let token = match self.free.pop() {
            Some(t) => {
                self.ops[t] = Some(pending);
                t
            }
            None => {
                self.ops.push(Some(pending));
                self.ops.len() - 1
            }
        };
        self.active += 1;
        self.push(token);
    }

    /// Takes every completion the kernel has posted. Returns whether transfers were continued.
    fn reap_kernel(&mut self) -> bool {
        let cqes: Vec<(u64, i32)> = self
            .uring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let mut continued = false;
        for (token, res) in cqes {
            continued |= self.handle(token as usize, res);
        }
        continued
    }
}

impl Backend for AioBackend {
    fn kind(&self) -> ImageKind {
        ImageKind::Aio
    }

    fn size(&self) -> u64 {
        self.image().size
    }

    unsafe fn queue(&mut self, io: Io) {
        if let Err(e) = check_range(&io, self.image().size) {
            self.done.push(Completion {
                tag: io.tag,
                result: Err(e),
            });
            return;
        }
        let remaining = io.len();
        if io.op == Op::Discard && self.image().block_device {
            let range = [io.offset, remaining];
            let fd = self.image().buffered.as_raw_fd();
            // SAFETY: BLKDISCARD reads two u64s from the pointer, which points at `range`.
            let result = unsafe { ioctl_blkdiscard(fd, &range) }.map(drop);
            self.done.push(Completion {
                tag: io.tag,
                result,
            });
            return;
        }
        self.start(io, 0);
    }

    fn submit(&mut self) -> Result<()> {
        self.submit_queued()
            .map_err(|e| Error::io("cannot submit I/O to", self.path(), e))?;
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        // Clear the eventfd first: completions posted after this read signal it again.
        let _ = self.eventfd.read();
        if self.reap_kernel() {
            if let Err(e) = self.submit_queued() {
                log::warn!("aio {}: submit: {e}", self.path().display());
            }
        }
        out.append(&mut self.done);
    }

    fn in_flight(&self) -> usize {
        self.active + self.done.len()
    }

    fn drain(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        while self.active > 0 {
            match self.uring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(Error::io("cannot wait for I/O on", self.path(), e)),
            }
            self.reap_kernel();
        }
        let _ = self.eventfd.read();
        out.append(&mut self.done);
        Ok(())
    }

    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.eventfd.as_fd())
    }

    fn features(&self) -> Features {
        Features::ALL
    }

    fn allocated_bytes(&self) -> Option<u64> {
        if self.image().block_device {
            return None;
        }
        let st = nix::sys::stat::fstat(&self.image().buffered).ok()?;
        Some(st.st_blocks as u64 * 512)
    }

    fn block_status(&self, offset: u64, len: u64) -> Option<Vec<super::Extent>> {
        if self.image().block_device {
            return None;
        }
        super::seek_extents(self.image().buffered.as_fd(), offset, len)
    }
}

impl Drop for AioBackend {
    fn drop(&mut self) {
        // The kernel must be done with the caller's buffers before they may go away.
        let mut lost = Vec::new();
        if let Err(e) = self.drain(&mut lost) {
            log::warn!("aio {}: {e}", self.path().display());
        }
    }
}

/// The size in bytes of an image (a regular file's length, or a block device's size), and
/// whether it is a block device.
fn image_size(file: &File, path: &Path) -> Result<(u64, bool)> {
    let meta = file
        .metadata()
        .map_err(|e| Error::io("cannot stat", path, e))?;
    let ft = meta.file_type();
    if ft.is_file() {
        Ok((meta.len(), false))
    } else if ft.is_block_device() {
        let mut size = 0u64;
        // SAFETY: BLKGETSIZE64 writes one u64 to the pointer, which points at `size`.
        unsafe { ioctl_blkgetsize64(file.as_raw_fd(), &mut size) }
            .map_err(|e| Error::os(format!("get the size of {}", path.display()), e))?;
        Ok((size, true))
    } else {
        Err(Error::invalid(format!(
            "{}: not a regular file or block device",
            path.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::Mapping;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::io::{Read, Seek, SeekFrom, Write};

    /// A scratch file (O_DIRECT is used if the temporary directory's file system allows it).
    fn scratch(name: &str, len: u64) -> PathBuf {
        let path = std::env::temp_dir().join(format!("aio-{name}-{}.img", std::process::id()));
        let f = File::create(&path).unwrap();
        f.set_len(len).unwrap();
        path
    }

    fn iov(base: *mut u8, len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        }
    }

    /// Waits for the eventfd and reaps until `n` completions arrived.
    fn wait_for(aio: &mut AioBackend, n: usize) -> Vec<Completion> {
        let mut done = Vec::new();
        while done.len() < n {
            let fd = aio.event_fd().unwrap();
            let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
            assert_eq!(poll(&mut fds, PollTimeout::from(5000u16)).unwrap(), 1);
            aio.reap(&mut done);
        }
        done
    }

    /// A turn of the loop with nothing queued makes no `io_uring_enter`; a batch makes one.
    #[test]
    fn submitting_nothing_enters_nothing() {
        let path = scratch("enter", 1 << 20);
        let mut aio = AioBackend::open(&path, false).unwrap();
        for _ in 0..10 {
            aio.submit().unwrap();
            aio.reap(&mut Vec::new());
        }
        assert_eq!(aio.enters, 0);
        let buf = Mapping::anonymous(8 * 4096).unwrap();
        let p = buf.as_ptr().as_ptr();
        for i in 0..8usize {
            // SAFETY: the pages are inside `buf`, which outlives the I/Os (waited for below).
            unsafe {
                aio.queue(Io {
                    tag: i as u64,
                    op: Op::Read,
                    offset: i as u64 * 4096,
                    iov: vec![iov(p.add(i * 4096), 4096)],
                    discard_len: 0,
                });
            }
        }
        aio.submit().unwrap();
        assert_eq!(aio.enters, 1);
        let done = wait_for(&mut aio, 8);
        assert!(done.iter().all(|c| c.result.is_ok()));
        aio.submit().unwrap();
        assert_eq!(aio.enters, 1);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn writes_and_reads_a_file_asynchronously() {
        let path = scratch("rw", 1 << 20);
        let mut aio = AioBackend::open(&path, false).unwrap();
        assert_eq!(aio.size(), 1 << 20);
        assert_eq!(aio.kind(), ImageKind::Aio);
        let buf = Mapping::anonymous(64 * 4096).unwrap();
        let p = buf.as_ptr().as_ptr();
        // 32 I/Os of two 512-byte-aligned pieces each, in one batch.
        for i in 0..32usize {
            // SAFETY: the pieces are inside `buf`, which outlives the I/Os (waited for below).
            unsafe {
                std::ptr::write_bytes(p.add(i * 8192), i as u8 + 1, 8192);
                aio.queue(Io {
                    tag: i as u64,
                    op: Op::Write,
                    offset: i as u64 * 6144,
                    iov: vec![
                        iov(p.add(i * 8192), 4096),
                        iov(p.add(i * 8192 + 4096), 2048),
                    ],
                    discard_len: 0,
                });
            }
        }
        assert_eq!(aio.in_flight(), 32);
        aio.submit().unwrap();
        let mut done = wait_for(&mut aio, 32);
        done.sort_by_key(|c| c.tag);
        assert!(done
            .iter()
            .enumerate()
            .all(|(i, c)| c.tag == i as u64 && c.result.is_ok()));
        assert_eq!(aio.in_flight(), 0);

        let mut content = Vec::new();
        File::open(&path)
            .unwrap()
            .read_to_end(&mut content)
            .unwrap();
        for i in 0..32 {
            let piece = &content[i * 6144..(i + 1) * 6144];
            assert!(piece.iter().all(|&b| b == i as u8 + 1), "piece {i}");
        }
        assert!(content[32 * 6144..].iter().all(|&b| b == 0));

        // Read back pieces 3 and 4 (12 KiB) into one buffer.
        // SAFETY: as above.
        unsafe {
            aio.queue(Io {
                tag: 99,
                op: Op::Read,
                offset: 3 * 6144,
                iov: vec![iov(p.add(40 * 4096), 12288)],
                discard_len: 0,
            });
        }
        aio.submit().unwrap();
        assert_eq!(
            wait_for(&mut aio, 1),
            [Completion {
                tag: 99,
                result: Ok(())
            }]
        );
        // SAFETY: the read has completed; nothing else touches the buffer.
        let back = unsafe { std::slice::from_raw_parts(p.add(40 * 4096), 12288) };
        assert!(back[..6144].iter().all(|&b| b == 4));
        assert!(back[6144..].iter().all(|&b| b == 5));
        drop(aio);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn reads_past_the_end_fail_and_short_reads_are_not_truncated() {
        let path = scratch("short", 16384);
        let mut aio = AioBackend::open(&path, true).unwrap();
        let buf = Mapping::anonymous(4 * 4096).unwrap();
        let p = buf.as_ptr().as_ptr();
        // Beyond the size known at open: refused without touching the file.
        // SAFETY: the buffer outlives the I/O.
        unsafe {
            aio.queue(Io {
                tag: 1,
                op: Op::Read,
                offset: 16384,
                iov: vec![iov(p, 512)],
                discard_len: 0,
            });
        }
        let mut done = Vec::new();
        aio.reap(&mut done);
        assert_eq!(
            done,
            [Completion {
                tag: 1,
                result: Err(Errno::EIO)
            }]
        );

        // The file shrinks under us: the read comes back short, then at end of file.
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4608)
            .unwrap();
        // SAFETY: as above.
        unsafe {
            aio.queue(Io {
                tag: 2,
                op: Op::Read,
                offset: 0,
                iov: vec![iov(p, 8192), iov(p.add(8192), 8192)],
                discard_len: 0,
            });
        }
        aio.submit().unwrap();
        assert_eq!(
            wait_for(&mut aio, 1),
            [Completion {
                tag: 2,
                result: Err(Errno::EIO)
            }]
        );

        // A read-only image refuses writes (EBADF from the kernel).
        // SAFETY: as above.
        unsafe {
            aio.queue(Io {
                tag: 3,
                op: Op::Write,
                offset: 0,
                iov: vec![iov(p, 512)],
                discard_len: 0,
            });
        }
        aio.submit().unwrap();
        let done = wait_for(&mut aio, 1);
        assert_eq!(done[0].tag, 3);
        assert!(done[0].result.is_err());
        drop(aio);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn buffered_mode_and_drain() {
        let path = scratch("buffered", 8192);
        let mut f = File::options().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.write_all(&[7u8; 4096]).unwrap();
        let mut aio = AioBackend::open_with(&path, false, false).unwrap();
        assert!(!aio.direct());
        assert_eq!(aio.path(), path);
        let buf = Mapping::anonymous(4096).unwrap();
        let p = buf.as_ptr().as_ptr();
        // An unaligned piece is fine without O_DIRECT.
        // SAFETY: the buffer outlives the I/O.
        unsafe { run_one(&mut aio, one(5, Op::Read, 4096, p.add(1), 100)) };
        // SAFETY: the read completed.
        assert_eq!(unsafe { p.add(1).read() }, 7);
        std::fs::remove_file(path).unwrap();
    }

    /// Pages of `path` in the page cache (mincore over a shared mapping of it).
    fn resident_pages(path: &Path) -> usize {
        let f = File::open(path).unwrap();
        let len = f.metadata().unwrap().len() as usize;
        // SAFETY: a fresh read-only shared mapping of `len` bytes of `f`, unmapped below.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(at, libc::MAP_FAILED);
        let mut vec = vec![0u8; len.div_ceil(4096)];
        // SAFETY: `at` is the mapping of `len` bytes; `vec` has a byte per page of it.
        assert_eq!(unsafe { libc::mincore(at, len, vec.as_mut_ptr()) }, 0);
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(at, len) };
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }

    /// Queues `io`, submits it and waits for it: it succeeds.
    ///
    /// # Safety
    ///
    /// `io`'s buffers are valid for the transfer.
    unsafe fn run_one(aio: &mut AioBackend, io: Io) {
        let tag = io.tag;
        // SAFETY: the caller's contract; `drain` waits for the I/O.
        unsafe { aio.queue(io) };
        aio.submit().unwrap();
        let mut done = Vec::new();
        aio.drain(&mut done).unwrap();
        assert_eq!(
            done,
            [Completion {
                tag,
                result: Ok(())
            }]
        );
    }

    fn one(tag: u64, op: Op, offset: u64, base: *mut u8, len: usize) -> Io {
        Io {
            tag,
            op,
            offset,
            iov: if op.has_data() {
                vec![iov(base, len)]
            } else {
                Vec::new()
            },
            discard_len: 0,
        }
    }

    /// A transfer `O_DIRECT` cannot take (a length no multiple of the block size, a buffer at
    /// an odd address) goes through the page cache; the others, in flight beside it, stay
    /// direct, and the file stays served direct.
    #[test]
    fn transfers_direct_io_cannot_take_go_through_the_page_cache_alone() {
        let path = scratch("mixed", 65536);
        // Data, not holes: an O_DIRECT read of a hole is not checked for alignment.
        std::fs::write(&path, [5u8; 65536]).unwrap();
        let mut aio = AioBackend::open(&path, false).unwrap();
        let Some(align) = aio.file_align(0) else {
            // No O_DIRECT in the temporary directory's file system.
            std::fs::remove_file(path).unwrap();
            return;
        };
        let buf = Mapping::anonymous(16 * 4096).unwrap();
        let p = buf.as_ptr().as_ptr();
        // Eight odd reads and eight page reads at once, the odd ones first.
        for i in 0..16u64 {
            let page = 4096 * i as usize;
            let (offset, at, len) = if i < 8 {
                (512 * i, page + 3, 100)
            } else {
                (4096 * i, page, 4096)
            };
            // SAFETY: (pointer arithmetic) inside `buf`.
            let base = unsafe { p.add(at) };
            // SAFETY: the buffer outlives the I/Os, which `drain` waits for.
            unsafe { aio.queue(one(i, Op::Read, offset, base, len)) };
        }
        aio.submit().unwrap();
        let mut done = Vec::new();
        aio.drain(&mut done).unwrap();
        assert_eq!(done.len(), 16);
        assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
        for i in 0..8 {
            // SAFETY: the reads completed.
            assert_eq!(unsafe { p.add(3 + 4096 * i + 99).read() }, 5);
        }
        // SAFETY: as above.
        let pages = unsafe { std::slice::from_raw_parts(p.add(8 * 4096), 8 * 4096) };
        assert!(pages.iter().all(|&b| b == 5));
        assert_eq!(
            aio.file_align(0),
            Some(align),
            "the alignment did not change"
        );
        assert_eq!(aio.file_transfers(0), Some([8, 8]));
        std::fs::remove_file(path).unwrap();
    }

    /// Where the alignment is only assumed, a refusal makes it stricter (4 KiB offsets and
    /// lengths, then addresses) and the refused transfer is retried through the page cache;
    /// transfers meeting the stricter one stay direct.
    #[test]
    fn refusals_make_an_assumed_alignment_stricter() {
        let path = scratch("learn", 8192);
        std::fs::write(&path, [9u8; 8192]).unwrap();
        let mut aio = AioBackend::open(&path, false).unwrap();
        if aio.file_align(0).is_none() {
            std::fs::remove_file(path).unwrap();
            return;
        }
        // A guess weaker than any device's: O_DIRECT refuses some transfers it admits.
        aio.files[0].align = Some(DirectAlign {
            mem: 1,
            offset: 1,
            reported: false,
        });
        let buf = Mapping::anonymous(4 * 4096).unwrap();
        let p = buf.as_ptr().as_ptr();
        // 100 bytes at 512: refused, so offsets and lengths need 4 KiB now.
        // SAFETY: the I/O stays inside `buf`, which outlives it.
        unsafe { run_one(&mut aio, one(1, Op::Read, 512, p.add(3), 100)) };
        // SAFETY: the read completed.
        assert_eq!(unsafe { p.add(3 + 99).read() }, 9);
        let step = DirectAlign {
            mem: 1,
            offset: 4096,
            reported: false,
        };
        assert_eq!(aio.file_align(0), Some(step));
        assert_eq!(aio.file_transfers(0), Some([1, 1]));
        // A page into a page: direct.
        // SAFETY: the I/O stays inside `buf`, which outlives it.
        unsafe { run_one(&mut aio, one(2, Op::Read, 4096, p.add(4096), 4096)) };
        assert_eq!(aio.file_transfers(0), Some([2, 1]));
        // 4091 bytes: not admitted, through the page cache; the alignment stays.
        // SAFETY: nothing else touches the buffer.
        unsafe { std::ptr::write_bytes(p.add(8192), 7, 8192) };
        // SAFETY: the I/O stays inside `buf`, which outlives it.
        unsafe { run_one(&mut aio, one(3, Op::Write, 4096, p.add(8192), 4091)) };
        assert_eq!(aio.file_align(0), Some(step));
        assert_eq!(aio.file_transfers(0), Some([2, 2]));
        // A page from an odd address: refused, so addresses need 4 KiB too; written through
        // the page cache.
        // SAFETY: the I/O stays inside `buf`, which outlives it.
        unsafe { run_one(&mut aio, one(4, Op::Write, 0, p.add(8192 + 3), 4096)) };
        assert_eq!(
            aio.file_align(0),
            Some(DirectAlign {
                mem: 4096,
                offset: 4096,
                reported: false,
            })
        );
        assert_eq!(aio.file_transfers(0), Some([3, 3]));
        assert!(aio.direct());
        let content = std::fs::read(&path).unwrap();
        assert!(content[..8187].iter().all(|&b| b == 7));
        assert!(content[8187..].iter().all(|&b| b == 9));
        std::fs::remove_file(path).unwrap();
    }

    /// The fall-back's decisions: stricter while the alignment is assumed, then none; a
    /// reported alignment is not second-guessed; `EFAULT` gives up at once; a transfer submitted
    /// under a rule that has changed since is retried as it is; other errors are not retried.
    #[test]
    fn refusals_step_through_the_alignments_then_give_up() {
        let path = scratch("steps", 4096);
        let mut h = Handle::open(&path, true, false).unwrap();
        let page = [iov(4096 as *mut u8, 4096)];
        let sector = [iov(512 as *mut u8, 512)];
        h.align = Some(DirectAlign::ASSUMED);
        assert!(h.refused(Errno::EINVAL, 512, &sector));
        let offsets = DirectAlign {
            mem: 512,
            offset: 4096,
            reported: false,
        };
        assert_eq!(h.align, Some(offsets));
        // In flight under the old rule: retried, the rule unchanged.
        assert!(h.refused(Errno::EINVAL, 512, &sector));
        assert_eq!(h.align, Some(offsets));
        assert!(h.refused(Errno::EINVAL, 4096, &page));
        let strict = DirectAlign {
            mem: 4096,
            ..offsets
        };
        assert_eq!(h.align, Some(strict));
        assert!(h.refused(Errno::EINVAL, 4096, &page));
        assert_eq!(h.align, None, "refused at 4 KiB: O_DIRECT given up");
        assert!(h.refused(Errno::EINVAL, 4096, &page), "retried buffered");
        // A reported alignment: the first refusal gives up.
        h.align = Some(DirectAlign {
            reported: true,
            ..DirectAlign::ASSUMED
        });
        assert!(h.refused(Errno::EINVAL, 4096, &page));
        assert_eq!(h.align, None);
        h.align = Some(DirectAlign::ASSUMED);
        assert!(h.refused(Errno::EFAULT, 4096, &page));
        assert_eq!(h.align, None);
        h.align = Some(DirectAlign::ASSUMED);
        assert!(!h.refused(Errno::EIO, 4096, &page));
        assert_eq!(h.align, Some(DirectAlign::ASSUMED));
        std::fs::remove_file(path).unwrap();
    }

    /// While a file is served direct, its clean cached pages are dropped when it is opened and
    /// by the flush after a transfer went through the page cache.
    #[test]
    fn cached_pages_are_dropped_at_open_and_after_a_flush() {
        let path = scratch("drop", 16 * 4096);
        std::fs::write(&path, [3u8; 16 * 4096]).unwrap();
        File::open(&path).unwrap().sync_all().unwrap();
        assert!(
            resident_pages(&path) > 0,
            "a buffered write leaves pages cached"
        );
        let mut aio = AioBackend::open(&path, false).unwrap();
        if aio.file_align(0).is_none() {
            std::fs::remove_file(path).unwrap();
            return;
        }
        assert_eq!(resident_pages(&path), 0, "dropped at open");
        let buf = Mapping::anonymous(4096).unwrap();
        let p = buf.as_ptr().as_ptr();
        // SAFETY: the buffer outlives the I/Os.
        unsafe { run_one(&mut aio, one(1, Op::Write, 5 * 4096 + 7, p, 100)) };
        assert!(
            resident_pages(&path) > 0,
            "an odd write goes through the page cache"
        );
        // SAFETY: no buffers.
        unsafe { run_one(&mut aio, one(2, Op::Flush, 0, p, 0)) };
        assert_eq!(resident_pages(&path), 0, "dropped after the flush");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn transient_errors_are_retried_then_reported() {
        let path = scratch("retry", 8192);
        let buf = Mapping::anonymous(4096).unwrap();
        let p = buf.as_ptr().as_ptr();
        let mut aio = AioBackend::open(&path, false).unwrap();
        let read = |tag| Io {
            tag,
            op: Op::Read,
            offset: 0,
            iov: vec![iov(p, 4096)],
            discard_len: 0,
        };
        // Queued and never submitted: the completions below are made up, and the retries only
        // queue the transfer again.
        // SAFETY: nothing reaches the kernel, so the buffer is never used.
        unsafe { aio.queue(read(5)) };
        for _ in 0..MAX_RETRIES {
            assert!(aio.handle(0, -libc::EAGAIN));
        }
        assert!(!aio.handle(0, -libc::EINTR));
        assert_eq!(
            aio.done,
            [Completion {
                tag: 5,
                result: Err(Errno::EINTR)
            }]
        );
        aio.done.clear();
        // Any other error ends the transfer at once.
        // SAFETY: as above.
        unsafe { aio.queue(read(6)) };
        assert!(!aio.handle(0, -libc::EIO));
        assert_eq!(
            aio.done,
            [Completion {
                tag: 6,
                result: Err(Errno::EIO)
            }]
        );
        // Handed out only when reaped.
        assert_eq!(aio.in_flight(), 1);
        let mut out = Vec::new();
        aio.reap(&mut out);
        assert_eq!((out.len(), aio.in_flight()), (1, 0));
        // A short transfer goes on where it stopped; one that moves nothing, or more than was
        // left, fails.
        // SAFETY: as above.
        unsafe { aio.queue(read(7)) };
        assert!(aio.handle(0, 1024));
        assert!(!aio.handle(0, 3072));
        for (tag, res) in [(8, 0), (9, 4097)] {
            // SAFETY: as above.
            unsafe { aio.queue(read(tag)) };
            assert!(!aio.handle(0, res));
        }
        aio.reap(&mut out);
        assert_eq!(
            out[1..],
            [
                Completion {
                    tag: 7,
                    result: Ok(())
                },
                Completion {
                    tag: 8,
                    result: Err(Errno::EIO)
                },
                Completion {
                    tag: 9,
                    result: Err(Errno::EIO)
                }
            ]
        );
        drop(aio);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn direct_io_is_used_where_the_file_system_allows_it() {
        let path = scratch("direct", 8192);
        let allowed = File::options()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .is_ok();
        let aio = AioBackend::open(&path, true).unwrap();
        assert_eq!(aio.direct(), allowed);
        assert_eq!(aio.path(), path.as_path());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn opening_reports_missing_files_and_odd_types() {
        let e = AioBackend::open(Path::new("/nonexistent/disk.img"), false).unwrap_err();
        assert_eq!(e.errno(), libc::ENOENT);
        let e = AioBackend::open(Path::new("/dev/null"), true).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
    }

    #[test]
    fn partial_transfers_advance_the_buffers() {
        let mut a = [0u8; 16];
        let base = a.as_mut_ptr();
        let mut p = Pending {
            tag: 0,
            op: Op::Read,
            offset: 100,
            iov: vec![
                iov(base, 4),
                iov(base.wrapping_add(4), 8),
                iov(base.wrapping_add(12), 4),
            ],
            first: 0,
            remaining: 16,
            retries: 0,
            direct: false,
            file: 0,
        };
        p.advance(6);
        assert_eq!((p.offset, p.remaining, p.first), (106, 10, 1));
        assert_eq!(p.iov[1].iov_len, 6);
        assert_eq!(p.iov[1].iov_base as usize, base as usize + 6);
        p.advance(6);
        assert_eq!((p.offset, p.remaining, p.first), (112, 4, 2));
        assert_eq!(p.iov[2].iov_len, 4);
        p.advance(4);
        assert_eq!(p.remaining, 0);
    }

    #[test]
    fn flush_fua_and_discard_reach_the_file() {
        let path = scratch("ext", 4 << 20);
        let mut aio = AioBackend::open(&path, false).unwrap();
        assert_eq!(aio.features(), Features::ALL);
        assert_eq!(aio.allocated_bytes(), Some(0), "a sparse file");
        let buf = Mapping::anonymous(1 << 20).unwrap();
        let p = buf.as_ptr().as_ptr();
        // SAFETY: the buffer outlives the I/Os, which `wait_for` waits for.
        unsafe {
            std::ptr::write_bytes(p, 0x3c, 1 << 20);
            aio.queue(Io {
                tag: 1,
                op: Op::Write,
                offset: 0,
                iov: vec![iov(p, 1 << 20)],
                discard_len: 0,
            });
            aio.queue(Io {
                tag: 2,
                op: Op::WriteFua,
                offset: 2 << 20,
                iov: vec![iov(p, 1 << 20)],
                discard_len: 0,
            });
        }
        aio.submit().unwrap();
        assert!(wait_for(&mut aio, 2).iter().all(|c| c.result.is_ok()));
        // SAFETY: no buffers.
        unsafe {
            aio.queue(Io {
                tag: 3,
                op: Op::Flush,
                offset: 0,
                iov: vec![],
                discard_len: 0,
            });
        }
        aio.submit().unwrap();
        assert_eq!(
            wait_for(&mut aio, 1),
            [Completion {
                tag: 3,
                result: Ok(())
            }]
        );
        let allocated = aio.allocated_bytes().unwrap();
        assert!(allocated >= 2 << 20, "{allocated}");
        // Discard the first MiB (and a range beyond the end, refused).
        // SAFETY: no buffers.
        unsafe {
            aio.queue(Io {
                tag: 4,
                op: Op::Discard,
                offset: 0,
                iov: vec![],
                discard_len: 1 << 20,
            });
            aio.queue(Io {
                tag: 5,
                op: Op::Discard,
                offset: 4 << 20,
                iov: vec![],
                discard_len: 512,
            });
        }
        aio.submit().unwrap();
        let mut done = wait_for(&mut aio, 2);
        done.sort_by_key(|c| c.tag);
        assert_eq!(done[1].result, Err(Errno::EIO));
        if done[0].result == Err(Errno::EOPNOTSUPP) {
            // The temporary directory's file system has no holes.
            std::fs::remove_file(path).unwrap();
            return;
        }
        assert_eq!(done[0].result, Ok(()));
        let after = aio.allocated_bytes().unwrap();
        assert!(after + (1 << 20) <= allocated, "{allocated} -> {after}");
        drop(aio);
        let content = std::fs::read(&path).unwrap();
        assert_eq!(content.len(), 4 << 20, "the size is kept");
        assert!(content[..1 << 20].iter().all(|&b| b == 0));
        assert!(content[2 << 20..3 << 20].iter().all(|&b| b == 0x3c));
        std::fs::remove_file(path).unwrap();
    }

    /// Files added beside the image are read through the same ring, each at its own offsets
    /// and checked against its own size; they take reads only.
    #[test]
    fn readers_beside_the_image_are_read_through_the_same_ring() {
        let main = scratch("main", 1 << 20);
        let other = scratch("other", 64 << 10);
        std::fs::write(&other, vec![0x6bu8; 64 << 10]).unwrap();
        let mut aio = AioBackend::open(&main, false).unwrap();
        let n = aio.add_reader(&other, true).unwrap();
        assert_eq!(n, 1);
        assert_eq!(aio.file_direct(1), Some(aio.direct()));
        assert_eq!(aio.file_direct(2), None);
        let buf = Mapping::anonymous(4 * 4096).unwrap();
        let p = buf.as_ptr().as_ptr();
        let read = |tag, offset, at: usize, len| Io {
            tag,
            op: Op::Read,
            offset,
            // SAFETY: (pointer arithmetic) inside `buf`.
            iov: vec![iov(unsafe { p.add(at) }, len)],
            discard_len: 0,
        };
        // SAFETY: the pages are inside `buf`, which outlives the I/Os (waited for below).
        unsafe {
            aio.queue_read(1, read(1, 60 << 10, 0, 4096));
            aio.queue_read(0, read(2, 0, 4096, 4096));
            // Past the reader's end (the image is longer): refused.
            aio.queue_read(1, read(3, 64 << 10, 8192, 512));
            // No such file.
            aio.queue_read(2, read(4, 0, 8192, 512));
            // A write to a reader.
            let mut w = read(5, 0, 8192, 512);
            w.op = Op::Write;
            aio.queue_read(1, w);
        }
        aio.submit().unwrap();
        let mut done = wait_for(&mut aio, 5);
        done.sort_by_key(|c| c.tag);
        let results: Vec<_> = done.iter().map(|c| c.result).collect();
        assert_eq!(
            results,
            [
                Ok(()),
                Ok(()),
                Err(Errno::EIO),
                Err(Errno::EINVAL),
                Err(Errno::EINVAL)
            ]
        );
        // SAFETY: every I/O has completed; nothing else touches the buffer.
        let back = unsafe { std::slice::from_raw_parts(p, 8192) };
        assert!(back[..4096].iter().all(|&b| b == 0x6b));
        assert!(back[4096..].iter().all(|&b| b == 0));
        if aio.direct() {
            // A read O_DIRECT cannot take (no multiple of the block size) goes through the
            // page cache, counted on that reader alone.
            let mut odd = read(6, 512, 3, 100);
            odd.iov[0].iov_len = 100;
            // SAFETY: as above.
            unsafe { aio.queue_read(1, odd) };
            aio.submit().unwrap();
            assert_eq!(wait_for(&mut aio, 1)[0].result, Ok(()));
            assert_eq!(aio.file_direct(1), Some(true));
            assert_eq!(aio.file_transfers(1), Some([1, 1]));
            assert_eq!(aio.file_transfers(0), Some([1, 0]));
            // SAFETY: the read completed.
            assert_eq!(unsafe { p.add(3 + 99).read() }, 0x6b);
        }
        drop(aio);
        std::fs::remove_file(main).unwrap();
        std::fs::remove_file(other).unwrap();
    }
}
