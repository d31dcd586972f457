//! Image backends, chosen by `type:path`:
//!
//! - `aio:/path`: a raw file or block device through io_uring ([`aio`]);
//! - `vhd:/path`: a VHD image and its chain of parents: io_uring for the data the leaf holds,
//!   a worker thread for the rest ([`vhd`]);
//! - `ram:SIZE`: an in-memory disk ([`ram`]);
//! - `null:SIZE`: reads return zeros, writes are dropped ([`null`]);
//! - `stall:MS[:SIZE]`: like `null:`, every answer `MS` milliseconds late ([`stall`]);
//! - `nbd:URI`: an export on an NBD server, `URI` being `nbd://host[:port]/export` or
//!   `nbd+unix:///export?socket=PATH` ([`nbd`]);
//!
//! and filters stacked over an image ([`layer`]: the image stack):
//!
//! - `trace:IMAGE`: every request logged ([`trace`]);
//! - `cow:OVERLAY:IMAGE`: a copy-on-write overlay (`ram`, or an overlay file's absolute path)
//!   over `IMAGE`, opened read-only ([`cow`]).
//!
//! A backend takes I/Os whose buffers are raw `iovec`s (into the ring's data pages), and reports
//! their completions later, so the event loop never blocks on I/O.

use std::fmt;
use std::os::fd::BorrowedFd;
use std::str::FromStr;

use nix::errno::Errno;

use crate::ring::Op;
use crate::{Error, Result};

pub mod aio;
pub mod cow;
pub mod immediate;
pub mod layer;
pub mod nbd;
pub mod null;
pub mod ram;
pub mod stall;
pub mod threaded;
pub mod trace;
pub mod vhd;

pub use layer::LayerStats;

/// One I/O: a contiguous range of the image, scattered over `iov` (a flush has no range, a
/// discard's length is `discard_len`).
#[derive(Debug)]
pub struct Io {
    /// The caller's tag, handed back with the completion.
    pub tag: u64,
    /// Read from the image into `iov`, write `iov` to the image (durably for `WriteFua`), make
    /// completed writes durable (`Flush`), or forget a range (`Discard`).
    pub op: Op,
    /// Byte offset on the image.
    pub offset: u64,
    /// The buffers, in image order (none for `Flush` and `Discard`).
    pub iov: Vec<libc::iovec>,
    /// For `Discard`, the length of the range in bytes; 0 otherwise.
    pub discard_len: u64,
}

impl Io {
    /// Total bytes of the range.
    pub fn len(&self) -> u64 {
        match self.op {
            Op::Discard => self.discard_len,
            _ => self.iov.iter().map(|v| v.iov_len as u64).sum(),
        }
    }

    /// Whether the I/O moves no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The outcome of an I/O: all of its bytes were moved, or it failed with an errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The tag of the I/O.
    pub tag: u64,
    /// `Ok` only if every byte was transferred.
    pub result: Result<(), Errno>,
}

/// What a backend does beyond reads and writes. An operation it lacks is answered "not
/// supported" (`-2`), and tapdisk does not ask the kernel for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// `Flush`: completed writes are made durable.
    pub flush: bool,
    /// `WriteFua`: a write durable when answered.
    pub fua: bool,
    /// `Discard`: a range is forgotten (reads back as zeros, space freed where possible).
    pub discard: bool,
}

impl Features {
    /// Everything.
    pub const ALL: Features = Features {
        flush: true,
        fua: true,
        discard: true,
    };

    /// Whether the backend does `op`.
    pub fn supports(self, op: Op) -> bool {
        match op {
            Op::Read | Op::Write => true,
            Op::Flush => self.flush,
            Op::WriteFua => self.fua,
            Op::Discard => self.discard,
        }
    }
}

/// An image backend.
pub trait Backend {
    /// The image type (`aio`, `ram`, `null`).
    fn kind(&self) -> ImageKind;

    /// Size of the image in bytes.
    fn size(&self) -> u64;

    /// Queues an I/O; it is started by the next [`Backend::submit`] at the latest. Its
    /// completion comes from [`Backend::reap`] or [`Backend::drain`], exactly once.
    ///
    /// # Safety
    ///
    /// Every buffer of `io.iov` must stay valid (for writes when reading from the image, for
    /// reads when writing to it) until the I/O's completion has been handed out or the backend
    /// has been dropped, and no Rust reference may reach those buffers meanwhile.
    unsafe fn queue(&mut self, io: Io);

    /// Queues a read whose buffers hold zeros already, which the caller knows (see
    /// [`Backend::reads_zeros`]): a backend whose reads return zeros may leave the buffers as
    /// they are. Any other backend reads as [`Backend::queue`] does, which is the default.
    ///
    /// # Safety
    ///
    /// As for [`Backend::queue`]; and every buffer of `io.iov` holds only zero bytes.
    unsafe fn queue_read_into_zeros(&mut self, io: Io) {
        // SAFETY: the caller's contract is `queue`'s, and more.
        unsafe { self.queue(io) }
    }

    /// Whether every read returns zeros (`null:`): the caller may then track which of its
    /// buffers hold zeros already and use [`Backend::queue_read_into_zeros`] for them.
    fn reads_zeros(&self) -> bool {
        false
    }

    /// Starts every queued I/O, in one go.
    fn submit(&mut self) -> Result<()>;

    /// Appends the completions available now to `out`, without blocking.
    fn reap(&mut self, out: &mut Vec<Completion>);

    /// I/Os queued whose completions were not handed out yet.
    fn in_flight(&self) -> usize;

    /// Waits for every I/O in flight, appending their completions to `out`.
    fn drain(&mut self, out: &mut Vec<Completion>) -> Result<()>;

    /// A descriptor that becomes readable when completions are available (none: completions are
    /// available as soon as [`Backend::submit`] returns).
    fn event_fd(&self) -> Option<BorrowedFd<'_>>;

    /// The operations beyond reads and writes it does.
    fn features(&self) -> Features {
        Features::default()
    }

    /// Bytes of storage the image takes up (a file's allocated blocks, a ram disk's allocated
    /// memory), when known.
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }

    /// The allocation of `[offset, offset + len)`, from `offset` on, in order (lengths adding up
    /// to at most `len`), when the backend can say; a hole reads as zeros.
    fn block_status(&self, offset: u64, len: u64) -> Option<Vec<Extent>> {
        let _ = (offset, len);
        None
    }

    /// Appends the statistics of the layers below this one, top first (none for an image:
    /// the tap's own counters are its layer's; see [`layer`]).
    fn layers(&self, out: &mut Vec<LayerStats>) {
        let _ = out;
    }
}

/// One extent of an allocation map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Its length in bytes (non-zero).
    pub length: u64,
    /// Not allocated: reads as zeros.
    pub hole: bool,
}

/// Most extents [`seek_extents`] returns at once.
pub const MAX_EXTENTS: usize = 1024;

/// Drops the clean page-cache pages of `[at, at + len)` of a file (`len` 0: to its end) with
/// `posix_fadvise(DONTNEED)`; dirty pages stay (their writeback starts). For files served with
/// `O_DIRECT`: while a file has any page cached, every direct write must look for pages to
/// invalidate in its range. Advice only: kernels without `CONFIG_ADVISE_SYSCALLS` refuse it.
pub(crate) fn drop_clean_pages(fd: BorrowedFd<'_>, at: u64, len: u64) {
    if let (Ok(at), Ok(len)) = (i64::try_from(at), i64::try_from(len)) {
        let _ = nix::fcntl::posix_fadvise(
            fd,
            at,
            len,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }
}

/// The allocation of `[offset, offset + len)` of a file, from `SEEK_DATA`/`SEEK_HOLE` (at most
/// [`MAX_EXTENTS`] extents); none if its file system cannot say.
pub fn seek_extents(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Option<Vec<Extent>> {
    use nix::unistd::{lseek, Whence};
    let end = offset.checked_add(len)?;
    let mut pos = offset;
    let mut out = Vec::new();
    while pos < end && out.len() < MAX_EXTENTS {
        let at = i64::try_from(pos).ok()?;
        let (next, hole) = match lseek(fd, at, Whence::SeekData) {
            // No data from here to the end of the file.
            Err(Errno::ENXIO) => (end, true),
            Err(_) => return None,
            Ok(data) if data as u64 > pos => (data as u64, true),
            Ok(_) => match lseek(fd, at, Whence::SeekHole) {
                Ok(h) => (h as u64, false),
                Err(Errno::ENXIO) => (end, false),
                Err(_) => return None,
            },
        };
        let next = next.clamp(pos + 1, end);
        out.push(Extent {
            length: next - pos,
            hole,
        });
        pos = next;
    }
    Some(out)
}

/// The image types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// A raw file or block device through io_uring.
    Aio,
    /// An in-memory disk.
    Ram,
    /// Zeros, writes dropped.
    Null,
    /// Zeros, writes dropped, every answer late.
    Stall,
    /// A VHD image and its parents.
    Vhd,
    /// An export on an NBD server.
    Nbd,
    /// A filter logging every request.
    Trace,
    /// A copy-on-write overlay over an image.
    Cow,
}

impl ImageKind {
    /// The type's name in `type:path`.
    pub fn name(self) -> &'static str {
        match self {
            ImageKind::Aio => "aio",
            ImageKind::Ram => "ram",
            ImageKind::Null => "null",
            ImageKind::Stall => "stall",
            ImageKind::Vhd => "vhd",
            ImageKind::Nbd => "nbd",
            ImageKind::Trace => "trace",
            ImageKind::Cow => "cow",
        }
    }
}

/// An image as tap-ctl names it: `type:path` (for `ram` and `null`, `type:SIZE`; for `stall`,
/// `stall:MS[:SIZE]`; for `nbd`, `nbd:URI`), or a stack: a filter's prefix before the image it
/// filters (`trace:IMAGE`, `cow:OVERLAY:IMAGE`; at most [`MAX_LAYERS`] layers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// The type.
    pub kind: ImageKind,
    /// The path, or size.
    pub arg: String,
}

/// Most layers in a stack.
pub const MAX_LAYERS: usize = 8;

impl ImageSpec {
    /// The image below a filter (none for an image).
    pub fn lower(&self) -> Option<ImageSpec> {
        let rest = match self.kind {
            ImageKind::Trace => self.arg.as_str(),
            ImageKind::Cow => self.arg.split_once(':')?.1,
            _ => return None,
        };
        rest.parse().ok()
    }

    /// For `cow:OVERLAY:IMAGE`, `OVERLAY`.
    pub fn overlay(&self) -> Option<&str> {
        match self.kind {
            ImageKind::Cow => self.arg.split_once(':').map(|(o, _)| o),
            _ => None,
        }
    }

    /// What the statistics call this layer: its type, and its path or what it is.
    pub fn layer_name(&self) -> (String, String) {
        let name = match self.kind {
            ImageKind::Trace => "trace".to_string(),
            ImageKind::Cow => match self.overlay() {
                Some("ram") | None => "memory".to_string(),
                Some(path) => path.to_string(),
            },
            _ => self.arg.clone(),
        };
        (self.kind.name().to_string(), name)
    }

    fn parse_depth(s: &str, depth: usize) -> Result<Self> {
        if depth >= MAX_LAYERS {
            return Err(Error::invalid(format!(
                "image {s:?}: more than {MAX_LAYERS} layers"
            )));
        }
        let spec = Self::parse_one(s)?;
        let rest = match spec.kind {
            ImageKind::Trace => Some(spec.arg.as_str()),
            ImageKind::Cow => {
                let Some((overlay, rest)) = spec.arg.split_once(':') else {
                    return Err(Error::invalid(format!(
                        "image {s:?}: cow:OVERLAY:IMAGE, OVERLAY being ram or an absolute path"
                    )));
                };
                if overlay != "ram" && !overlay.starts_with('/') {
                    return Err(Error::invalid(format!(
                        "image {s:?}: the overlay {overlay:?} is neither ram nor an absolute path"
                    )));
                }
                Some(rest)
            }
            _ => None,
        };
        if let Some(rest) = rest {
            Self::parse_depth(rest, depth + 1)?;
        }
        Ok(spec)
    }
}

impl FromStr for ImageSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::parse_depth(s, 0)
    }
}

impl ImageSpec {
    fn parse_one(s: &str) -> Result<Self> {
        let (kind, arg) = s
            .split_once(':')
            .ok_or_else(|| Error::invalid(format!("image {s:?} is not type:path")))?;
        let kind = match kind {
            "aio" => ImageKind::Aio,
            "ram" => ImageKind::Ram,
            "null" => ImageKind::Null,
            "stall" => ImageKind::Stall,
            "vhd" => ImageKind::Vhd,
            "nbd" => ImageKind::Nbd,
            "trace" => ImageKind::Trace,
            "cow" => ImageKind::Cow,
            _ => {
                return Err(Error::invalid(format!(
                    "image {s:?}: unknown type {kind:?} (aio, vhd, ram, null, stall, nbd; \
                     filters trace, cow)"
                )))
            }
        };
        if arg.is_empty() {
            return Err(Error::invalid(format!("image {s:?}: empty path")));
        }
        match kind {
            ImageKind::Aio | ImageKind::Vhd | ImageKind::Trace | ImageKind::Cow => {}
            ImageKind::Ram | ImageKind::Null => {
                parse_size(arg)?;
            }
            ImageKind::Stall => {
                stall::parse_args(arg)?;
            }
            ImageKind::Nbd => {
                arg.parse::<crate::nbd::client::NbdUri>()
                    .map_err(|e| Error::invalid(format!("image {s:?}: {e}")))?;
            }
        }
        Ok(Self {
            kind,
            arg: arg.into(),
        })
    }
}

impl fmt::Display for ImageSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.name(), self.arg)
    }
}

/// Parses a size in bytes: a number with an optional `K`, `M`, `G` or `T` suffix (powers of
/// 1024). It must be a positive multiple of 512.
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = || Error::invalid(format!("size {s:?}: not a positive multiple of 512 bytes"));
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let bytes = n.checked_mul(1 << shift).ok_or_else(bad)?;
    if bytes == 0 || bytes % 512 != 0 {
        return Err(bad());
    }
    Ok(bytes)
}

/// Opens the image `spec`; writes are refused when `readonly`.
pub fn open(spec: &ImageSpec, readonly: bool) -> Result<Box<dyn Backend>> {
    open_with(spec, readonly, true)
}

/// Opens the image `spec` as [`open`] does; `direct: false` never uses `O_DIRECT` (`aio:`).
pub fn open_with(spec: &ImageSpec, readonly: bool, direct: bool) -> Result<Box<dyn Backend>> {
    open_inner(spec, readonly, direct, None)
}

/// Opens the image `spec` as [`open_with`] does, for a tap whose requests must be answered
/// within `deadline` (retries included): an `nbd:` client then gives up on a request the
/// server leaves unanswered (or cannot take, being away) by that deadline, if it is shorter
/// than the client's own ([`nbd::Options::default`], 30 s), so that the tap's deadline holds.
pub fn open_for_tap(
    spec: &ImageSpec,
    readonly: bool,
    direct: bool,
    deadline: std::time::Duration,
) -> Result<Box<dyn Backend>> {
    open_inner(spec, readonly, direct, Some(deadline))
}

fn open_inner(
    spec: &ImageSpec,
    readonly: bool,
    direct: bool,
    deadline: Option<std::time::Duration>,
) -> Result<Box<dyn Backend>> {
    Ok(match spec.kind {
        ImageKind::Aio => Box::new(aio::AioBackend::open_with(
            spec.arg.as_ref(),
            readonly,
            direct,
        )?),
        ImageKind::Ram => Box::new(immediate::Synchronous::new(ram::RamBackend::new(
            parse_size(&spec.arg)?,
        )?)),
        ImageKind::Null => Box::new(immediate::Synchronous::new(null::NullBackend::new(
            parse_size(&spec.arg)?,
        ))),
        ImageKind::Stall => {
            let (delay, size) = stall::parse_args(&spec.arg)?;
            Box::new(stall::StallBackend::new(delay, size)?)
        }
        ImageKind::Vhd => Box::new(vhd::Vhd::open(spec.arg.as_ref(), readonly, direct)?),
        ImageKind::Nbd => {
            let mut opts = nbd::Options::default();
            if let Some(d) = deadline {
                opts.deadline = opts.deadline.min(d);
            }
            Box::new(nbd::NbdBackend::open_with(&spec.arg, readonly, opts)?)
        }
        ImageKind::Trace | ImageKind::Cow => {
            let lower_spec = spec
                .lower()
                .ok_or_else(|| Error::invalid(format!("image {spec}: no image below")))?;
            // The base under an overlay is never written.
            let lower_ro = readonly || spec.kind == ImageKind::Cow;
            let lower = layer::Lower::new(
                open_inner(&lower_spec, lower_ro, direct, deadline)?,
                &lower_spec,
            );
            match spec.overlay() {
                None => Box::new(trace::TraceLayer::new(lower, lower_spec.to_string())),
                Some("ram") => Box::new(cow::CowLayer::in_memory(lower, readonly)?),
                Some(path) => Box::new(cow::CowLayer::in_file(
                    lower,
                    path.as_ref(),
                    readonly,
                    direct,
                )?),
            }
        }
    })
}

/// Checks that `io` lies inside an image of `size` bytes.
pub(crate) fn check_range(io: &Io, size: u64) -> Result<(), Errno> {
    match io.offset.checked_add(io.len()) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Errno::EIO),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_type_and_path() {
        let s: ImageSpec = "aio:/var/tmp/disk.raw".parse().unwrap();
        assert_eq!(s.kind, ImageKind::Aio);
        assert_eq!(s.arg, "/var/tmp/disk.raw");
        assert_eq!(s.to_string(), "aio:/var/tmp/disk.raw");
        // Only the first colon separates.
        assert_eq!("aio:/a:b".parse::<ImageSpec>().unwrap().arg, "/a:b");
        assert_eq!("ram:64M".parse::<ImageSpec>().unwrap().kind, ImageKind::Ram);
        assert_eq!(
            "null:1G".parse::<ImageSpec>().unwrap().kind,
            ImageKind::Null
        );
        let s: ImageSpec = "stall:4000".parse().unwrap();
        assert_eq!((s.kind, s.arg.as_str()), (ImageKind::Stall, "4000"));
        assert_eq!(s.to_string(), "stall:4000");
        assert!("stall:10:1M".parse::<ImageSpec>().is_ok());
        let s: ImageSpec = "vhd:/sr/leaf.vhd".parse().unwrap();
        assert_eq!((s.kind, s.arg.as_str()), (ImageKind::Vhd, "/sr/leaf.vhd"));
        assert_eq!(s.to_string(), "vhd:/sr/leaf.vhd");
        let s: ImageSpec = "nbd:nbd+unix:///vol?socket=/run/s".parse().unwrap();
        assert_eq!(
            (s.kind, s.arg.as_str()),
            (ImageKind::Nbd, "nbd+unix:///vol?socket=/run/s")
        );
        assert_eq!(s.to_string(), "nbd:nbd+unix:///vol?socket=/run/s");
        assert!("nbd:nbd://host:10809/disk".parse::<ImageSpec>().is_ok());
        for bad in [
            "",
            "aio",
            "aio:",
            "ram:12",
            "null:lots",
            "stall:",
            "stall:x",
            "stall:10:12",
            "stall:10:1M:3",
            "nbd:",
            "nbd:/tmp/sock",
            "nbd:nbd+unix:///vol",
            "nbd:nbds://host/vol",
        ] {
            let e = bad.parse::<ImageSpec>().unwrap_err();
            assert_eq!(e.errno(), 22, "{bad}");
        }
    }

    #[test]
    fn parses_sizes_with_suffixes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("64m").unwrap(), 64 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        for bad in ["0", "100", "K", "-1M", "1.5M", "1X", "99999999999T", " 1M"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ranges_are_checked_without_overflow() {
        let io = |offset, len| Io {
            tag: 0,
            op: Op::Read,
            offset,
            iov: vec![libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: len,
            }],
            discard_len: 0,
        };
        assert!(check_range(&io(0, 1024), 1024).is_ok());
        assert_eq!(check_range(&io(512, 1024), 1024), Err(Errno::EIO));
        assert_eq!(check_range(&io(u64::MAX, 512), 1024), Err(Errno::EIO));
        let discard = |offset, len| Io {
            tag: 0,
            op: Op::Discard,
            offset,
            iov: Vec::new(),
            discard_len: len,
        };
        assert!(check_range(&discard(512, 512), 1024).is_ok());
        assert_eq!(check_range(&discard(512, 1024), 1024), Err(Errno::EIO));
        assert_eq!(discard(0, 4096).len(), 4096);
        assert!(!discard(0, 4096).is_empty());
        assert!(discard(0, 0).is_empty());
        assert!(!io(0, 512).is_empty());
    }

    #[test]
    fn seek_extents_finds_the_holes_of_a_sparse_file() {
        use std::os::fd::AsFd;
        use std::os::unix::fs::FileExt;
        let f = tempfile_in_tmp();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[1u8; 8192], 64 << 10).unwrap();
        let ext = seek_extents(f.as_fd(), 0, 1 << 20).unwrap();
        let hole = |length| Extent { length, hole: true };
        assert_eq!(
            ext,
            [
                hole(64 << 10),
                Extent {
                    length: 8192,
                    hole: false
                },
                hole((1 << 20) - (64 << 10) - 8192)
            ]
        );
        // From the middle of the data, for a short range.
        let ext = seek_extents(f.as_fd(), (64 << 10) + 512, 1024).unwrap();
        assert_eq!(
            ext,
            [Extent {
                length: 1024,
                hole: false
            }]
        );
        assert!(seek_extents(f.as_fd(), u64::MAX, 2).is_none());
    }

    fn tempfile_in_tmp() -> std::fs::File {
        let path = std::env::temp_dir().join(format!("seek-extents-{}", std::process::id()));
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn features_say_which_ops_are_supported() {
        let none = Features::default();
        assert!(none.supports(Op::Read) && none.supports(Op::Write));
        assert!(!none.supports(Op::Flush) && !none.supports(Op::Discard));
        assert!(!none.supports(Op::WriteFua));
        let all = Features::ALL;
        assert!([Op::Flush, Op::Discard, Op::WriteFua]
            .iter()
            .all(|&op| all.supports(op)));
    }
}
