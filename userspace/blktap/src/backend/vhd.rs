//! `vhd:/path`: a VHD image (fixed, dynamic, or differencing with its chain of parents).
//!
//! The chain is opened from the leaf ([`crate::vhd::Chain`]); reads go down the chain for the
//! sectors a layer lacks, writes go to the leaf and allocate its blocks in a crash-safe order
//! (see [`crate::vhd::image`]).
//!
//! Two paths ([`Vhd`]), and for each piece of an I/O (split at the leaf's block ends) one of
//! three answers:
//!
//! 1. in a block the leaf holds whole (every sector's bit set; every sector of a fixed disk): a
//!    read or plain write is done by the event loop itself with io_uring, straight between the
//!    leaf file and the ring's pages (`aio:`'s engine, `O_DIRECT` where the file system allows
//!    it);
//! 2. in a block a differencing leaf holds in part or not at all (no BAT entry, or some
//!    sectors' bits clear) whose every sector lies in the leaf or a parent (none read as zeros:
//!    past a parent's end, or in no image): a read is done by the loop too, from the leaf's file
//!    for the sectors it has and from the parents' files (opened again, read-only, on the same
//!    ring: `O_DIRECT` tried as for the leaf) for the others, split where the block's runs
//!    change image (at most 32 runs; one, when the first image holding the block holds it
//!    whole);
//! 3. everything else (allocations, writes into blocks not wholly present, the rest of the
//!    parents' sectors, flushes, FUA writes, discards) is done by a worker thread
//!    ([`super::threaded`]) with `pread`/`pwrite` through a bounce buffer.
//!
//! An I/O is the loop's only if each of its pieces is (1) (a write) or (1) or (2) (a read). The
//! worker tells the loop which blocks are whole ([`crate::vhd::shared::LeafState`]) once their
//! data, bitmap and BAT entry are written; its flushes (`fdatasync` of the leaf) cover the loop's
//! writes too. FUA writes are a write and a flush, on the worker. Where the leaf and the parents
//! hold a block (2) the worker works out when it first reads the block (the loop's first read
//! of it is the worker's); parents never change while open, and the leaf's sectors of the
//! block only when the leaf writes into it, so that holds until then: the worker withdraws the
//! block before it writes the first byte of such a write, so before the write's completion,
//! and a read the loop starts after that completion goes to the worker (or to the leaf, once
//! the block is whole). A withdrawn block stays so (a differencing leaf does not discard).
//! Reopening (unpause) starts over with nothing known. The parents' entries in the `stats`
//! count the sectors read from each, by the worker or the loop.
//!
//! Discard is done on a leaf without parent (fixed or dynamic), where
//! a forgotten range reads as zeros and whole blocks are given back
//! ([`crate::vhd::VhdImage::discard`]); a differencing leaf does not do it (its forgotten
//! sectors would read as the parent's).

use slab::Slab;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};

use super::aio::AioBackend;
use super::immediate::SyncBackend;
use super::layer::{merge, slice_iov};
use super::threaded::Threaded;
use super::{check_range, Backend, Completion, Extent, Features, ImageKind, Io, LayerStats};
use crate::mapping::AlignedBuf;
use crate::ring::Op;
use crate::vhd::chain::ChainReads;
use crate::vhd::shared::{LeafState, Piece};
use crate::vhd::{Chain, VhdError};
use crate::{Error, Result};

/// A VHD chain as a backend.
#[derive(Debug)]
pub struct VhdBackend {
    chain: Chain,
    readonly: bool,
    size: u64,
    /// The bounce buffer, kept from one transfer to the next (it grows to the largest);
    /// page-aligned, so that the leaf's writes of whole pages can go with `O_DIRECT`.
    bounce: AlignedBuf,
}

impl VhdBackend {
    /// Opens the chain whose leaf is `path`.
    ///
    /// Refuses a chain with an image whose resize (or a coalesce that grew it) was cut short:
    /// its journal is still beside it and the image may be half moved until `vhd-util revert`
    /// undoes it, as `vhd-util` itself refuses it.
    pub fn open(path: &std::path::Path, readonly: bool) -> Result<Self, VhdError> {
        let chain = Chain::open(path, !readonly)?;
        for layer in chain.layers() {
            let image = layer.path();
            crate::vhd::journal::refuse_existing(image, &crate::vhd::journal::default_path(image))?;
        }
        let size = chain.size();
        Ok(Self {
            chain,
            readonly,
            size,
            bounce: AlignedBuf::zeroed(0),
        })
    }

    /// The chain.
    pub fn chain(&self) -> &Chain {
        &self.chain
    }
}

/// The `vhd:` backend: the loop's io_uring path for data the leaf holds whole and for reads of
/// blocks the parents hold (the leaf lacking them), the worker for the rest (see the module's
/// documentation).
pub struct Vhd {
    worker: Threaded,
    data: AioBackend,
    leaf: Arc<LeafState>,
    readonly: bool,
    /// The leaf has parents (its unallocated blocks are theirs, not holes).
    has_parents: bool,
    /// What was read from each image (the loop counts its reads of the parents).
    reads: Arc<ChainReads>,
    /// The loop's pieces in flight, keyed by the tag they have on the data path.
    pieces: Slab<PieceOf>,
    /// The loop's I/Os in more than one piece.
    split: Slab<Split>,
    /// The loop's I/Os in flight (whole or split).
    fast_in_flight: usize,
    located: Vec<Piece>,
    scratch: Vec<Completion>,
    done: Vec<Completion>,
    epoll: Epoll,
    fast_ios: u64,
}

impl std::fmt::Debug for Vhd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vhd")
            .field("worker", &self.worker)
            .field("leaf", &self.leaf)
            .field("split", &self.split.len())
            .finish()
    }
}

impl Vhd {
    /// Opens the chain whose leaf is `path`; the loop's path uses `O_DIRECT` if `direct` and
    /// the file system allows it.
    pub fn open(path: &std::path::Path, readonly: bool, direct: bool) -> Result<Self> {
        let mut inner = VhdBackend::open(path, readonly)?;
        let leaf = inner.chain.share_leaf();
        let has_parents = inner.chain.layers().len() > 1;
        let reads = inner.chain.reads();
        let mut data = AioBackend::open_with(path, readonly, direct)?;
        // The leaf grows as the worker appends blocks; the offsets come from its BAT (at most
        // 2 TiB: 32-bit sector numbers).
        data.set_limit(u64::from(u32::MAX) * 512 + leaf.block_size.max(1 << 21) * 2);
        // The parents, read-only, read by the loop where they hold what the leaf lacks: file
        // `i` of the engine is image `i` of the chain.
        for (i, layer) in inner.chain.layers().iter().enumerate().skip(1) {
            let n = data.add_reader(layer.path(), direct)?;
            debug_assert_eq!(n, i);
        }
        let worker = Threaded::new(inner)?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|e| Error::os("vhd: epoll_create1", e))?;
        for (i, fd) in [worker.event_fd(), data.event_fd()]
            .into_iter()
            .flatten()
            .enumerate()
        {
            epoll
                .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))
                .map_err(|e| Error::os("vhd: epoll_ctl", e))?;
        }
        Ok(Self {
            worker,
            data,
            leaf,
            readonly,
            has_parents,
            reads,
            pieces: Slab::new(),
            split: Slab::new(),
            fast_in_flight: 0,
            located: Vec::new(),
            scratch: Vec::new(),
            done: Vec::new(),
            epoll,
            fast_ios: 0,
        })
    }

    /// I/Os the loop did itself (io_uring on the chain's files) so far.
    pub fn fast_ios(&self) -> u64 {
        self.fast_ios
    }

    /// Whether the loop may do `io` itself (then `self.located` has its pieces): a read or
    /// plain write, aligned, wholly in blocks the leaf holds whole, or for a read also in blocks
    /// the leaf and its parents hold (see the module's documentation).
    fn fast(&mut self, io: &Io) -> bool {
        let chain = match io.op {
            Op::Read => self.has_parents,
            Op::Write if !self.readonly => false,
            _ => return false,
        };
        let len = io.len();
        len > 0
            && io.offset.is_multiple_of(512)
            && len.is_multiple_of(512)
            && self.leaf.locate(io.offset, len, chain, &mut self.located)
    }

    /// Hands the data path's completions out, joining the pieces of split I/Os.
    fn collect(&mut self) {
        for c in self.scratch.drain(..) {
            // The data path's tags are this loop's keys (`queue`); anything else is not ours.
            let Some(piece) = usize::try_from(c.tag)
                .ok()
                .and_then(|k| self.pieces.try_remove(k))
            else {
                continue;
            };
            if piece.image > 0 && c.result.is_ok() {
                self.reads.add(piece.image, piece.sectors);
            }
            let done = match piece.of {
                Owner::Whole(tag) => Some(Completion {
                    tag,
                    result: c.result,
                }),
                Owner::Part(k) => {
                    let last = self.split.get_mut(k).is_some_and(|entry| {
                        merge(&mut entry.result, c.result);
                        entry.left -= 1;
                        entry.left == 0
                    });
                    if last {
                        self.split.try_remove(k).map(|whole| Completion {
                            tag: whole.tag,
                            result: whole.result,
                        })
                    } else {
                        None
                    }
                }
            };
            if let Some(done) = done {
                self.fast_in_flight -= 1;
                self.done.push(done);
            }
        }
    }
}

/// What a piece the loop has in flight belongs to.
#[derive(Debug, Clone, Copy)]
enum Owner {
    /// The whole I/O of this tag (one piece).
    Whole(u64),
    /// Part of the split I/O of this key in [`Vhd::split`].
    Part(usize),
}

/// A piece the loop has in flight: whose it is, the image it reads or writes (0 the leaf), its
/// sectors.
#[derive(Debug)]
struct PieceOf {
    of: Owner,
    image: usize,
    sectors: u64,
}

/// An I/O the loop does in more than one piece: its tag, the pieces left, the first error.
#[derive(Debug)]
struct Split {
    tag: u64,
    left: usize,
    result: std::result::Result<(), Errno>,
}

fn errno(e: &VhdError) -> Errno {
    log::warn!("vhd: {e}");
    match e {
        VhdError::ReadOnly { .. } => Errno::EROFS,
        VhdError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => Errno::ENOSPC,
        _ => Errno::EIO,
    }
}

impl SyncBackend for VhdBackend {
    fn kind(&self) -> ImageKind {
        ImageKind::Vhd
    }

    fn size(&self) -> u64 {
        self.size
    }

    unsafe fn transfer(&mut self, io: &Io) -> Result<(), Errno> {
        match io.op {
            Op::Flush => return self.chain.flush().map_err(|e| errno(&e)),
            Op::Read | Op::Write | Op::WriteFua | Op::Discard => {}
        }
        check_range(io, self.size)?;
        if !io.offset.is_multiple_of(512) || !io.len().is_multiple_of(512) {
            return Err(Errno::EINVAL);
        }
        if self.readonly && io.op != Op::Read {
            return Err(Errno::EROFS);
        }
        if io.op == Op::Discard {
            if !self.chain.can_discard() {
                return Err(Errno::EOPNOTSUPP);
            }
            return self
                .chain
                .discard(io.offset, io.discard_len)
                .map_err(|e| errno(&e));
        }
        let len = usize::try_from(io.len()).map_err(|_| Errno::EINVAL)?;
        if self.bounce.len() < len {
            self.bounce = AlignedBuf::zeroed(len);
        }
        // Every byte of `buf` is written before it is read: by the chain (a read) or from the
        // request's pages (a write).
        let buf = &mut self.bounce.as_mut_slice()[..len];
        if io.op == Op::Read {
            self.chain.read(io.offset, buf).map_err(|e| errno(&e))?;
            let mut pos = 0;
            for v in &io.iov {
                // SAFETY: the iovec is valid for writes of its length until the completion
                // (the `queue` contract); `buf` is ours, so the two never overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(buf[pos..].as_ptr(), v.iov_base.cast(), v.iov_len)
                };
                pos += v.iov_len;
            }
            return Ok(());
        }
        let mut pos = 0;
        for v in &io.iov {
            // SAFETY: the iovec is valid for reads of its length (the `queue` contract); `buf`
            // is ours.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    v.iov_base.cast::<u8>(),
                    buf[pos..].as_mut_ptr(),
                    v.iov_len,
                )
            };
            pos += v.iov_len;
        }
        self.chain.write(io.offset, buf).map_err(|e| errno(&e))?;
        if io.op == Op::WriteFua {
            self.chain.flush().map_err(|e| errno(&e))?;
        }
        Ok(())
    }

    fn features(&self) -> Features {
        Features {
            flush: true,
            fua: true,
            discard: self.chain.can_discard(),
        }
    }

    /// The parents, each with the sectors read from it (the leaf's entry is the tap's own).
    fn layers_reporter(&self) -> Option<super::immediate::LayersReporter> {
        let reads = self.chain.reads();
        Some(std::sync::Arc::new(move |out: &mut Vec<LayerStats>| {
            for (i, (path, vhd)) in reads.images.iter().enumerate().skip(1) {
                out.push(LayerStats {
                    driver: if *vhd { "vhd" } else { "aio" }.into(),
                    name: path.display().to_string(),
                    hits: [reads.sectors(i), 0],
                    fail: [0, 0],
                });
            }
        }))
    }
}

impl Backend for Vhd {
    fn kind(&self) -> ImageKind {
        ImageKind::Vhd
    }

    fn size(&self) -> u64 {
        self.worker.size()
    }

    unsafe fn queue(&mut self, mut io: Io) {
        if !self.fast(&io) {
            // SAFETY: the caller's contract is the worker's.
            unsafe { self.worker.queue(io) };
            return;
        }
        if io.op == Op::Write {
            self.leaf.note_write();
        }
        self.fast_ios += 1;
        self.fast_in_flight += 1;
        let n = self.located.len();
        let of = if n == 1 {
            Owner::Whole(io.tag)
        } else {
            Owner::Part(self.split.insert(Split {
                tag: io.tag,
                left: n,
                result: Ok(()),
            }))
        };
        let mut pos = 0;
        for i in 0..n {
            let (image, at, len) = self.located[i];
            let key = self.pieces.insert(PieceOf {
                of,
                image,
                sectors: len / 512,
            });
            let iov = if n == 1 {
                // One piece: the I/O's own buffers, as they are.
                std::mem::take(&mut io.iov)
            } else {
                slice_iov(&io.iov, pos, len)
            };
            pos += len;
            let part = Io {
                // CAST: a usize fits in a u64.
                tag: key as u64,
                op: io.op,
                offset: at,
                iov,
                discard_len: 0,
            };
            // SAFETY: the pieces' buffers are the I/O's, valid until its completion (the
            // caller's contract), which comes after every piece's. (Only reads have pieces
            // on the parents.)
            unsafe { self.data.queue_read(image, part) };
        }
    }

    fn submit(&mut self) -> Result<()> {
        let r = self.data.submit();
        r.and(self.worker.submit())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        self.worker.reap(out);
        self.data.reap(&mut self.scratch);
        self.collect();
        out.append(&mut self.done);
    }

    fn in_flight(&self) -> usize {
        self.worker.in_flight() + self.fast_in_flight + self.done.len()
    }

    fn drain(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        let r = self.data.drain(&mut self.scratch);
        self.collect();
        out.append(&mut self.done);
        r.and(self.worker.drain(out))
    }

    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.epoll.0.as_fd())
    }

    fn features(&self) -> Features {
        self.worker.features()
    }

    /// The blocks a leaf without parents has not allocated are holes (they read as zeros);
    /// with parents, or for a fixed disk, the backend does not say (all data).
    fn block_status(&self, offset: u64, len: u64) -> Option<Vec<Extent>> {
        let bs = self.leaf.block_size;
        if self.has_parents || bs == 0 {
            return None;
        }
        let end = offset.checked_add(len)?.min(self.leaf.size);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < super::MAX_EXTENTS {
            let n = (bs - pos % bs).min(end - pos);
            let hole = !self.leaf.allocated(u32::try_from(pos / bs).ok()?);
            match out.last_mut() {
                Some(last) if last.hole == hole => last.length += n,
                _ => out.push(Extent { length: n, hole }),
            }
            pos += n;
        }
        Some(out)
    }

    fn layers(&self, out: &mut Vec<LayerStats>) {
        self.worker.layers(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::threaded::tests::io;

    #[test]
    fn an_image_left_with_a_resize_journal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.vhd");
        let leaf = dir.path().join("leaf.vhd");
        crate::vhd::create::create_dynamic(&base, 8 << 20, None).unwrap();
        crate::vhd::create::snapshot(&leaf, &base, false).unwrap();
        VhdBackend::open(&leaf, false).unwrap();
        // A journal beside the parent (a coalesce's grow cut short), then beside the leaf.
        for image in [&base, &leaf] {
            let journal = crate::vhd::journal::default_path(image);
            std::fs::write(&journal, b"left over").unwrap();
            let err = VhdBackend::open(&leaf, false).unwrap_err().to_string();
            assert!(
                err.contains("interrupted") && err.contains("vhd-util revert"),
                "{err}"
            );
            std::fs::remove_file(&journal).unwrap();
        }
        VhdBackend::open(&leaf, true).unwrap();
    }

    #[test]
    fn the_reused_bounce_buffer_never_shows_an_earlier_transfer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.vhd");
        crate::vhd::create::create_dynamic(&path, 8 << 20, None).unwrap();
        let mut b = VhdBackend::open(&path, false).unwrap();
        let mut data = vec![0x5au8; 44 << 10];
        // SAFETY: each buffer outlives its (synchronous) transfer.
        unsafe { b.transfer(&io(0, Op::Write, 0, &mut data)) }.unwrap();
        let mut back = vec![0u8; 44 << 10];
        // SAFETY: as above.
        unsafe { b.transfer(&io(0, Op::Read, 0, &mut back)) }.unwrap();
        assert_eq!(back, data);
        // An unallocated block, a shorter and a longer read after it: zeros, all of them.
        for len in [4096usize, 64 << 10] {
            let mut hole = vec![0xffu8; len];
            // SAFETY: as above.
            unsafe { b.transfer(&io(0, Op::Read, 4 << 20, &mut hole)) }.unwrap();
            assert!(hole.iter().all(|&x| x == 0), "{len}-byte read of a hole");
        }
        // A write shorter than the buffer, read back with what was there around it.
        let mut small = vec![0xa5u8; 1024];
        // SAFETY: as above.
        unsafe { b.transfer(&io(0, Op::Write, 512, &mut small)) }.unwrap();
        // SAFETY: as above.
        unsafe { b.transfer(&io(0, Op::Read, 0, &mut back)) }.unwrap();
        data[512..1536].fill(0xa5);
        assert_eq!(back, data);
    }

    #[test]
    fn the_stats_list_the_parents_with_what_was_read_from_each() {
        use crate::backend::Backend;
        let dir = tempfile::tempdir().unwrap();
        let (base, mid, leaf) = (
            dir.path().join("base.vhd"),
            dir.path().join("mid.vhd"),
            dir.path().join("leaf.vhd"),
        );
        crate::vhd::create::create_dynamic(&base, 8 << 20, None).unwrap();
        let mut b = VhdBackend::open(&base, false).unwrap();
        let mut data = vec![7u8; 8192];
        // SAFETY: the buffer outlives the synchronous transfer.
        unsafe { b.transfer(&io(0, Op::Write, 0, &mut data)) }.unwrap();
        drop(b);
        crate::vhd::create::snapshot(&mid, &base, false).unwrap();
        crate::vhd::create::snapshot(&leaf, &mid, false).unwrap();
        let mut t =
            super::super::threaded::Threaded::new(VhdBackend::open(&leaf, false).unwrap()).unwrap();
        let mut back = vec![0u8; 16384];
        // SAFETY: the buffer outlives the drain below.
        unsafe { t.queue(io(1, Op::Read, 0, &mut back)) };
        let mut done = Vec::new();
        t.drain(&mut done).unwrap();
        assert_eq!(done[0].result, Ok(()));
        assert!(back[..8192].iter().all(|&x| x == 7));
        let mut layers = Vec::new();
        t.layers(&mut layers);
        let shown: Vec<_> = layers
            .iter()
            .map(|l| (l.driver.as_str(), l.name.clone(), l.hits))
            .collect();
        // The base's first block is allocated whole by the write (a disk without parent marks
        // a new block present): all 32 sectors come from it; none from the empty middle image.
        assert_eq!(
            shown,
            [
                ("vhd", mid.display().to_string(), [0, 0]),
                ("vhd", base.display().to_string(), [32, 0]),
            ]
        );
    }

    /// Waits for every I/O `b` has in flight (polling its eventfd) and returns their completions.
    fn wait_all(b: &mut Vhd) -> Vec<Completion> {
        let mut done = Vec::new();
        while b.in_flight() > 0 {
            let fd = b.event_fd().unwrap();
            let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
            nix::poll::poll(&mut fds, 10000u16).unwrap();
            b.reap(&mut done);
        }
        done
    }

    /// Random batches of I/Os in flight together on disjoint ranges (reads, writes that allocate
    /// and writes into whole blocks, FUA writes, discards, flushes), against a model; every read
    /// checked, then the image reopened and read whole.
    fn exercise(path: &std::path::Path, model: &mut [u8], seed: u64, rounds: usize) -> u64 {
        exercise_with(path, model, seed, rounds, 0)
    }

    /// [`exercise`], with `more_reads` more chances in 12 of an I/O being a read.
    fn exercise_with(
        path: &std::path::Path,
        model: &mut [u8],
        seed: u64,
        rounds: usize,
        more_reads: u64,
    ) -> u64 {
        let discards = Vhd::open(path, true, false).unwrap().features().discard;
        let mut b = Vhd::open(path, false, false).unwrap();
        let size = model.len() as u64;
        let mut x = seed;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for round in 0..rounds {
            let mut bufs: Vec<(u64, Op, Vec<u8>)> = Vec::new();
            let mut taken: Vec<(u64, u64)> = Vec::new();
            for k in 0..1 + rnd(10) {
                let long = rnd(4) == 0;
                let len = 512 * (1 + rnd(if long { 600 } else { 24 }));
                let off = rnd((size - len) / 512) * 512;
                if taken.iter().any(|&(a, n)| off < a + n && a < off + len) {
                    continue;
                }
                taken.push((off, len));
                let op = match rnd(12 + more_reads) {
                    0..=5 | 12.. => Op::Read,
                    6..=9 => Op::Write,
                    11 if discards => Op::Discard,
                    _ => Op::WriteFua,
                };
                let fill = (round * 16 + k as usize) as u8 | 1;
                let buf = match op {
                    Op::Discard => vec![0; len as usize],
                    Op::Read => vec![0xee; len as usize],
                    _ => vec![fill; len as usize],
                };
                bufs.push((off, op, buf));
            }
            for (tag, (off, op, buf)) in bufs.iter_mut().enumerate() {
                let io = if *op == Op::Discard {
                    Io {
                        tag: tag as u64,
                        op: Op::Discard,
                        offset: *off,
                        iov: Vec::new(),
                        discard_len: buf.len() as u64,
                    }
                } else {
                    io(tag as u64, *op, *off, buf)
                };
                // SAFETY: the buffers outlive the wait for every completion below.
                unsafe { b.queue(io) };
            }
            if rnd(3) == 0 {
                // SAFETY: a flush has no buffers.
                unsafe { b.queue(io(999, Op::Flush, 0, &mut [])) };
            }
            b.submit().unwrap();
            let done = wait_all(&mut b);
            assert!(
                done.iter().all(|c| c.result.is_ok()),
                "round {round}: {done:?}"
            );
            for (off, op, buf) in &bufs {
                let r = *off as usize..*off as usize + buf.len();
                match op {
                    Op::Read => assert!(buf[..] == model[r.clone()], "round {round}: read {r:?}"),
                    Op::Discard => model[r].fill(0),
                    _ => model[r].copy_from_slice(buf),
                }
            }
        }
        let fast = b.fast_ios();
        drop(b);
        let mut b = Vhd::open(path, true, false).unwrap();
        let mut all = vec![0u8; size as usize];
        // SAFETY: the buffer outlives the drain.
        unsafe { b.queue(io(1, Op::Read, 0, &mut all)) };
        let mut done = Vec::new();
        b.drain(&mut done).unwrap();
        assert_eq!(done[0].result, Ok(()));
        assert!(all == model, "the image reopened differs from the model");
        fast
    }

    #[test]
    fn the_loop_and_the_worker_together_keep_a_dynamic_disk_right() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.vhd");
        crate::vhd::create::create_dynamic(&path, 16 << 20, None).unwrap();
        let mut model = vec![0u8; 16 << 20];
        let fast = exercise(&path, &mut model, 5, 150);
        assert!(fast > 100, "only {fast} I/Os took the loop's path");
        let problems = crate::vhd::check::check(&path);
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn a_differencing_leaf_reads_its_parent_where_blocks_are_partly_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (base, leaf) = (dir.path().join("b.vhd"), dir.path().join("l.vhd"));
        crate::vhd::create::create_dynamic(&base, 8 << 20, None).unwrap();
        let mut model = vec![0u8; 8 << 20];
        {
            let mut b = VhdBackend::open(&base, false).unwrap();
            for (i, chunk) in model.chunks_mut(1 << 20).enumerate() {
                chunk.fill(i as u8 + 0x40);
                // SAFETY: the buffer outlives the synchronous transfer.
                unsafe { b.transfer(&io(0, Op::Write, (i as u64) << 20, chunk)) }.unwrap();
            }
        }
        crate::vhd::create::snapshot(&leaf, &base, false).unwrap();
        // Mostly reads first: the loop reads the parent's blocks where the leaf has none of
        // them (the leaf's few writes fill no block of it whole).
        let fast = exercise_with(&leaf, &mut model, 8, 60, 96);
        assert!(
            fast > 60,
            "only {fast} reads of the parent took the loop's path"
        );
        // Blocks of a differencing leaf become whole only once every sector was written; the
        // long writes (up to 300 KiB) fill few. Most I/O goes through the worker here.
        exercise(&leaf, &mut model, 9, 120);
        let problems = crate::vhd::check::check(&leaf);
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn block_status_has_the_unallocated_blocks_of_a_leaf_without_parents_as_holes() {
        use crate::backend::Backend;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.vhd");
        crate::vhd::create::create_dynamic(&path, 8 << 20, None).unwrap();
        let mut b = Vhd::open(&path, false, false).unwrap();
        let mut data = vec![3u8; 4096];
        // SAFETY: the buffer outlives the drain.
        unsafe { b.queue(io(1, Op::Write, (2 << 20) + 4096, &mut data)) };
        let mut done = Vec::new();
        b.drain(&mut done).unwrap();
        let ext = b.block_status(0, 8 << 20).unwrap();
        let shown: Vec<_> = ext.iter().map(|e| (e.length >> 20, e.hole)).collect();
        assert_eq!(shown, [(2, true), (2, false), (4, true)]);
        // The new block's data starts on a 4 KiB boundary of the file.
        let mut at = Vec::new();
        assert!(b.leaf.locate(2 << 20, 4096, false, &mut at));
        assert_eq!(at[0].1 % 4096, 0, "{at:?}");
    }

    const MIB: u64 = 1 << 20;
    /// No image holds the sector (it reads as zeros).
    const NONE: u8 = u8::MAX;

    /// The bottom of a test chain: a dynamic VHD, or a raw file of this many bytes.
    #[derive(Debug, Clone, Copy)]
    enum Base {
        Vhd,
        Raw(u64),
    }

    /// A chain of depth 4 over 20 MiB (10 blocks of 2 MiB), leaf first: `leaf` (image 0), `mid2`
    /// (1), `mid1` (2), the base (3). The base holds the first 16 MiB (a VHD: blocks 8 and 9
    /// read as zeros) or all of its length (a raw file: past its end, zeros); `mid1` holds
    /// block 1, the first half of block 2 and 8 runs of 64 KiB of block 3; `mid2` the second
    /// half of block 4 and block 5; the leaf 64 KiB of block 8.
    struct TestChain {
        _dir: tempfile::TempDir,
        leaf: std::path::PathBuf,
        mid2: std::path::PathBuf,
        /// The disk's bytes.
        model: Vec<u8>,
        /// The disk's bytes without the leaf's.
        parents: Vec<u8>,
        /// Which image holds each sector (the leaf 0; `NONE`).
        owner: Vec<u8>,
    }

    fn build_chain(base: Base, seed: u64) -> TestChain {
        let dir = tempfile::tempdir().unwrap();
        let size = 20 * MIB;
        let mut rng = crate::rng::Rng::new(seed);
        let mut model = vec![0u8; size as usize];
        let mut owner = vec![NONE; (size / 512) as usize];
        let (mid1, mid2, leaf) = (
            dir.path().join("mid1.vhd"),
            dir.path().join("mid2.vhd"),
            dir.path().join("leaf.vhd"),
        );
        let base_vhd = dir.path().join("base.vhd");
        match base {
            Base::Vhd => crate::vhd::create::create_dynamic(&base_vhd, size, None).map(drop),
            Base::Raw(len) => {
                let path = dir.path().join("base.raw");
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data);
                std::fs::write(&path, &data).unwrap();
                let n = data.len().min(model.len());
                model[..n].copy_from_slice(&data[..n]);
                // The worker counts a raw parent's sectors past its end as read from it.
                owner.fill(3);
                crate::vhd::create::snapshot(&mid1, &path, true).unwrap();
                if len < size {
                    crate::vhd::create::resize(&mid1, size).unwrap();
                }
                Ok(())
            }
        }
        .unwrap();
        let mut put = |path: &std::path::Path, image: u8, off: u64, len: u64, model: &mut [u8]| {
            let r = off as usize..(off + len) as usize;
            rng.fill(&mut model[r.clone()]);
            let mut chain = Chain::open(path, true).unwrap();
            chain.write(off, &model[r]).unwrap();
            chain.flush().unwrap();
            owner[(off / 512) as usize..((off + len) / 512) as usize].fill(image);
        };
        if let Base::Vhd = base {
            put(&base_vhd, 3, 0, 16 * MIB, &mut model);
            crate::vhd::create::snapshot(&mid1, &base_vhd, false).unwrap();
        }
        put(&mid1, 2, 2 * MIB, 2 * MIB, &mut model);
        put(&mid1, 2, 4 * MIB, MIB, &mut model);
        for k in 0..8 {
            put(&mid1, 2, 6 * MIB + k * (256 << 10), 64 << 10, &mut model);
        }
        crate::vhd::create::snapshot(&mid2, &mid1, false).unwrap();
        put(&mid2, 1, 9 * MIB, MIB, &mut model);
        put(&mid2, 1, 10 * MIB, 2 * MIB, &mut model);
        let parents = model.clone();
        crate::vhd::create::snapshot(&leaf, &mid2, false).unwrap();
        put(&leaf, 0, 16 * MIB + (128 << 10), 64 << 10, &mut model);
        TestChain {
            _dir: dir,
            leaf,
            mid2,
            model,
            parents,
            owner,
        }
    }

    /// The chains tried: a VHD base, a raw base of the disk's size, a raw base ending inside
    /// block 6; and the blocks the loop reads (from the leaf and the parents) in each, once
    /// learnt.
    fn chains() -> [(Base, Vec<u64>); 3] {
        [
            (Base::Vhd, (0..=7).collect()),
            (Base::Raw(20 * MIB), (0..=9).collect()),
            (Base::Raw(13 * MIB + 4096), (0..=5).collect()),
        ]
    }

    /// Runs `ios` (tag, op, offset, buffer) on `b` together and waits for all of them.
    fn run(b: &mut Vhd, ios: &mut [(Op, u64, Vec<u8>)]) {
        for (tag, (op, off, buf)) in ios.iter_mut().enumerate() {
            // SAFETY: the buffers outlive the wait below.
            unsafe { b.queue(io(tag as u64, *op, *off, buf)) };
        }
        b.submit().unwrap();
        let done = wait_all(b);
        assert_eq!(done.len(), ios.len());
        assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
    }

    /// Once the worker has read a block the leaf holds in part or not at all, the loop reads
    /// it from the leaf and the parent(s) holding it (split at their runs), and counts the
    /// sectors for each parent; blocks with sectors read as zeros (past a raw parent's end, in
    /// no image) stay on the worker. (Before the loop read parents, not one of these reads was
    /// the loop's; before it read the leaf's part of a block, block 8 of the chain on a raw
    /// base of the disk's size was the worker's.)
    #[test]
    fn reads_of_blocks_the_parents_hold_take_the_loop_path() {
        let bs = 2 * MIB;
        for (base, fast_blocks) in chains() {
            let c = build_chain(base, 21);
            let mut b = Vhd::open(&c.leaf, false, true).unwrap();
            // The first read of the whole disk: the worker's; it learns where the blocks are.
            let mut all = vec![(Op::Read, 0, vec![0xeeu8; 20 << 20])];
            run(&mut b, &mut all);
            assert!(all[0].2 == c.model, "{base:?}: the first read");
            assert_eq!(b.fast_ios(), 0);
            let mut at = Vec::new();
            for blk in 0..10 {
                assert_eq!(
                    b.leaf.locate(blk * bs, bs, true, &mut at),
                    fast_blocks.contains(&blk),
                    "{base:?}: block {blk}: {at:?}"
                );
            }
            // Block 3 is 16 runs: 8 of mid1's, each followed by one of the base's.
            assert!(b.leaf.locate(3 * bs, bs, true, &mut at));
            assert_eq!(at.len(), 16, "{base:?}: {at:?}");
            assert!(at.iter().all(|&(i, _, _)| i == 2 || i == 3));
            // 64 KiB reads over the whole disk, 16 at a time, each checked.
            let mut expect_fast = 0;
            for batch in 0..20u64 {
                let mut ios: Vec<_> = (0..16u64)
                    .map(|k| (Op::Read, (batch * 16 + k) << 16, vec![0xeeu8; 64 << 10]))
                    .collect();
                expect_fast += ios
                    .iter()
                    .filter(|(_, off, _)| fast_blocks.contains(&(off / bs)))
                    .count() as u64;
                run(&mut b, &mut ios);
                for (_, off, buf) in &ios {
                    let r = *off as usize..*off as usize + buf.len();
                    assert!(buf[..] == c.model[r.clone()], "{base:?}: read {r:?}");
                }
            }
            assert_eq!(b.fast_ios(), expect_fast, "{base:?}");
            // Each parent's count: its sectors, read twice (by the worker, then by the loop or
            // the worker).
            let mut layers = Vec::new();
            b.layers(&mut layers);
            let hits: Vec<u64> = layers.iter().map(|l| l.hits[0]).collect();
            let want: Vec<u64> = (1..=3u8)
                .map(|i| 2 * c.owner.iter().filter(|&&o| o == i).count() as u64)
                .collect();
            assert_eq!(hits, want, "{base:?}");
        }
    }

    /// A block the leaf holds in part (64 KiB of block 8, over a raw base of the disk's size):
    /// once learnt, the loop reads it from the leaf and the base; a write into it (a sector the
    /// leaf lacked) withdraws it, and the read after that write's completion, the worker's,
    /// sees the write.
    #[test]
    fn a_block_the_leaf_holds_in_part_is_read_by_the_loop_until_the_leaf_writes_into_it() {
        let bs = 2 * MIB;
        let mut c = build_chain(Base::Raw(20 * MIB), 22);
        let mut b = Vhd::open(&c.leaf, false, true).unwrap();
        let mut block = vec![(Op::Read, 8 * bs, vec![0xeeu8; bs as usize])];
        run(&mut b, &mut block);
        assert_eq!(b.fast_ios(), 0, "the first read is the worker's");
        let r = (8 * bs) as usize..(9 * bs) as usize;
        assert!(block[0].2 == c.model[r.clone()]);
        let mut at = Vec::new();
        assert!(b.leaf.locate(8 * bs, bs, true, &mut at));
        assert_eq!(
            at.iter().map(|&(i, _, n)| (i, n)).collect::<Vec<_>>(),
            [(3, 128 << 10), (0, 64 << 10), (3, bs - (192 << 10))]
        );
        block[0].2.fill(0xee);
        run(&mut b, &mut block);
        assert_eq!(b.fast_ios(), 1, "the second read is the loop's");
        assert!(block[0].2 == c.model[r.clone()]);
        // 4 KiB at the block's start: the base's until now.
        let mut write = vec![(Op::Write, 8 * bs, vec![0x3cu8; 4096])];
        run(&mut b, &mut write);
        c.model[r.start..r.start + 4096].fill(0x3c);
        assert!(!b.leaf.locate(8 * bs, bs, true, &mut at), "withdrawn");
        block[0].2.fill(0xee);
        run(&mut b, &mut block);
        assert_eq!(b.fast_ios(), 1, "the read after the write is the worker's");
        assert!(block[0].2 == c.model[r]);
    }

    /// The model-based run over each chain: reads through the loop (from the leaf and from
    /// the parents) and the worker, writes into blocks the parents hold among them; the image
    /// reopened and read whole at the end.
    #[test]
    fn chains_of_parents_stay_right_with_the_loop_reading_them() {
        for (i, (base, _)) in chains().into_iter().enumerate() {
            let mut c = build_chain(base, 30 + i as u64);
            // Mostly reads (a write into a block the parents hold sends its reads to the worker
            // until the leaf holds all of it).
            let fast = exercise_with(&c.leaf, &mut c.model, 40 + i as u64, 150, 96);
            assert!(fast > 60, "{base:?}: only {fast} I/Os took the loop's path");
            let problems = crate::vhd::check::check(&c.leaf);
            assert!(problems.is_empty(), "{base:?}: {problems:?}");
        }
    }

    /// Reads (the loop's, from the parents, where it may) and writes (the worker's) in flight
    /// together in blocks the parents hold, never on the same sectors at once, every read
    /// checked: each sees every write that completed before it was issued, the first write
    /// into a block included (the loop stops reading the block from the parents before that
    /// write completes), and a write's range is read back the moment it completes. A new
    /// leaf each round, so that each round has first writes into the parents' blocks.
    #[test]
    fn reads_issued_after_a_write_into_a_parent_block_completes_see_it() {
        let (bs, size) = (2 * MIB, 20 * MIB);
        let c = build_chain(Base::Vhd, 50);
        let mut rng = crate::rng::Rng::new(51);
        let (mut from_loop, mut read_back) = (0, 0);
        for round in 0..12 {
            std::fs::remove_file(&c.leaf).unwrap();
            crate::vhd::create::snapshot(&c.leaf, &c.mid2, false).unwrap();
            let mut model = c.parents.clone();
            let mut b = Vhd::open(&c.leaf, false, true).unwrap();
            // The worker reads everything once: the loop knows the parents' blocks from now.
            let mut all = vec![(Op::Read, 0, vec![0u8; size as usize])];
            run(&mut b, &mut all);
            let learnt = b.fast_ios();
            let mut flight: rustc_hash::FxHashMap<u64, (Op, u64, Vec<u8>)> =
                rustc_hash::FxHashMap::default();
            let mut written: Vec<(u64, u64)> = Vec::new();
            let (mut tag, mut issued) = (0u64, 0);
            while issued < 400 || !flight.is_empty() {
                let mut attempts = 0;
                while issued < 400 && flight.len() < 16 && attempts < 8 {
                    attempts += 1;
                    let (op, off, len) = match written.pop() {
                        // What a write just completed, with a sector either side.
                        Some((off, len)) => {
                            let a = off.saturating_sub(512);
                            (Op::Read, a, (off + len + 512).min(size) - a)
                        }
                        None => {
                            let most = if rng.chance(1, 4) { 256 } else { 16 };
                            let len = 512 * (1 + rng.below(most));
                            let off =
                                (rng.below(8) * bs + rng.below(bs / 512) * 512).min(size - len);
                            let op = if rng.chance(1, 16) {
                                Op::Write
                            } else {
                                Op::Read
                            };
                            (op, off, len)
                        }
                    };
                    if flight
                        .values()
                        .any(|(_, a, buf)| off < a + buf.len() as u64 && *a < off + len)
                    {
                        continue;
                    }
                    let mut buf = vec![0xeeu8; len as usize];
                    if op == Op::Write {
                        rng.fill(&mut buf);
                    } else if len > 0 {
                        read_back += 1;
                    }
                    tag += 1;
                    let entry = flight.entry(tag).or_insert((op, off, buf));
                    // SAFETY: the buffer's heap block stays put in `flight` until the I/O's
                    // completion is reaped below.
                    unsafe { b.queue(io(tag, op, off, &mut entry.2)) };
                    issued += 1;
                }
                b.submit().unwrap();
                let fd = b.event_fd().unwrap();
                let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
                nix::poll::poll(&mut fds, 10000u16).unwrap();
                let mut done = Vec::new();
                b.reap(&mut done);
                for c in done {
                    let (op, off, buf) = flight.remove(&c.tag).unwrap();
                    assert_eq!(c.result, Ok(()), "round {round}: {op:?} at {off}");
                    let r = off as usize..off as usize + buf.len();
                    if op == Op::Write {
                        model[r].copy_from_slice(&buf);
                        written.push((off, buf.len() as u64));
                    } else {
                        assert!(buf[..] == model[r.clone()], "round {round}: read {r:?}");
                    }
                }
            }
            from_loop += b.fast_ios() - learnt;
            drop(b);
            let mut b = Vhd::open(&c.leaf, true, true).unwrap();
            let mut all = vec![(Op::Read, 0, vec![0u8; size as usize])];
            run(&mut b, &mut all);
            assert!(all[0].2 == model, "round {round}: the leaf reopened");
            let problems = crate::vhd::check::check(&c.leaf);
            assert!(problems.is_empty(), "{problems:?}");
        }
        assert!(
            from_loop > 1000 && read_back > 2000,
            "{from_loop} of {read_back} reads the loop's"
        );
    }
}
