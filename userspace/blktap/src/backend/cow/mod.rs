//! `cow:OVERLAY:IMAGE`: a copy-on-write overlay over a read-only image (the 2005 seed's
//! `blkcow`). Writes go to the overlay; a read is split into the runs the overlay holds (read
//! from it) and the rest (read from `IMAGE`, which is opened read-only and never written).
//!
//! `OVERLAY` is `ram` (the overlay in memory, a memfd as `ram:` uses, as large as the disk and
//! allocated as written; forgotten when the image closes, which a pause also does) or the
//! absolute path of an overlay file (made if missing or empty; see [`file`] for its format),
//! which keeps the written sectors and their map across pauses, closes and restarts.
//!
//! - **Map**: one bit per 512-byte sector ([`map`]), set when a write to the overlay completes,
//!   so a read issued after a write completed reads the overlay.
//! - **Flush** (file overlay): the overlay's data is flushed; then the map pages whose bits stand
//!   for writes completed before that flush was issued are written, and flushed; the flush
//!   completes after both. A map page is never stored with a bit whose data is not durable yet,
//!   and map stores run one at a time (a later one never lands under an earlier one). **FUA**:
//!   the data is written with FUA, then its map pages stored and flushed. With a memory overlay,
//!   flush and FUA are the overlay's (nothing to do).
//! - **Discard**: the overlay's range is discarded (reads zeros) and marked present, so the base
//!   is hidden there; offered when the overlay discards.
//! - **Closing** (file overlay): the data is synced and the whole map stored.

pub mod file;
pub mod map;

use rustc_hash::FxHashMap;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};

use super::layer::{merge, slice_iov, LayerStats, Lower};
use super::{check_range, Backend, Completion, Extent, Features, ImageKind, Io, MAX_EXTENTS};
use crate::ring::{Op, SECTOR_SIZE};
use crate::{Error, Result};
use map::{Map, PAGE_BYTES};

/// A page-aligned page of bytes (what `O_DIRECT` writes need).
struct AlignedPage(std::ptr::NonNull<u8>);

impl AlignedPage {
    const LAYOUT: std::alloc::Layout =
        match std::alloc::Layout::from_size_align(PAGE_BYTES, PAGE_BYTES) {
            Ok(l) => l,
            Err(_) => panic!("a page is a valid layout"),
        };

    fn new(bytes: &[u8; PAGE_BYTES]) -> Self {
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc(Self::LAYOUT) };
        let Some(p) = std::ptr::NonNull::new(p) else {
            std::alloc::handle_alloc_error(Self::LAYOUT)
        };
        // SAFETY: `p` is valid for `PAGE_BYTES` bytes and does not overlap `bytes`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p.as_ptr(), PAGE_BYTES) };
        Self(p)
    }

    fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.0.as_ptr().cast(),
            iov_len: PAGE_BYTES,
        }
    }
}

impl Drop for AlignedPage {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.0.as_ptr(), Self::LAYOUT) }
    }
}

/// What a sub-I/O is for.
enum Sub {
    /// A parent's read (or a part of it), write, discard, or a memory overlay's flush.
    Part,
    /// A flush of the overlay's data for a parent, covering the writes completed up to write
    /// sequence `covers`.
    FlushData { covers: u64 },
    /// The store of map page `page`, from `_bytes` (held until the write completes).
    Page { page: usize, _bytes: AlignedPage },
    /// The flush after a map store.
    FlushMap,
}

/// An I/O this layer was given.
struct Parent {
    op: Op,
    /// Its range in sectors.
    sector: u64,
    sectors: u64,
    remaining: usize,
    result: std::result::Result<(), Errno>,
}

/// The file overlay's persistence.
struct Store {
    file: File,
    /// The map as it may be stored: bits of writes whose data is durable.
    durable: Map,
    /// Ranges written (or discarded) since, in completion order: `(sequence, sector, sectors)`.
    unflushed: Vec<(u64, u64, u64)>,
    /// Completions of overlay writes so far.
    seq: u64,
    /// The parents waiting for the next map store.
    next: Vec<u64>,
    /// The parents the map store in flight answers (empty: none in flight).
    group: Vec<u64>,
    /// Pages of the store in flight not written yet, and its result.
    pages_left: usize,
    group_result: std::result::Result<(), Errno>,
}

/// A copy-on-write overlay over a read-only layer.
pub struct CowLayer {
    size: u64,
    readonly: bool,
    base: Lower,
    overlay: Lower,
    /// Where the disk's sector 0 is on the overlay.
    data_off: u64,
    map: Map,
    store: Option<Store>,
    next_tag: u64,
    /// Sub-I/O tag: its parent's tag, and what it is.
    subs: FxHashMap<u64, (u64, Sub)>,
    /// Parent tag: the I/O this layer was given.
    parents: FxHashMap<u64, Parent>,
    done: Vec<Completion>,
    epoll: Option<Epoll>,
    scratch: Vec<Completion>,
}

impl std::fmt::Debug for CowLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CowLayer")
            .field("size", &self.size)
            .field("base", &self.base)
            .field("overlay", &self.overlay)
            .field("present", &self.map.count())
            .finish()
    }
}

impl CowLayer {
    /// An overlay in memory over `base`.
    pub fn in_memory(base: Lower, readonly: bool) -> Result<Self> {
        let size = base.backend().size();
        let ram = super::ram::RamBackend::new(size)?;
        let overlay = Lower::named(
            Box::new(super::immediate::Synchronous::new(ram)),
            "ram".into(),
            "memory".into(),
        );
        Self::new(
            base,
            overlay,
            readonly,
            0,
            Map::new(size / SECTOR_SIZE),
            None,
        )
    }

    /// An overlay in the file `path` (see [`file`]) over `base`; the file's data is served by
    /// `aio:` (`O_DIRECT` when `direct` and the file system allows it).
    pub fn in_file(
        base: Lower,
        path: &std::path::Path,
        readonly: bool,
        direct: bool,
    ) -> Result<Self> {
        let size = base.backend().size();
        let (f, map, data_off) = file::open(path, size)?;
        let aio = super::aio::AioBackend::open_with(path, readonly, direct)?;
        let overlay = Lower::named(Box::new(aio), "cow".into(), path.display().to_string());
        let store = Store {
            file: f,
            durable: clone_map(&map, size / SECTOR_SIZE),
            unflushed: Vec::new(),
            seq: 0,
            next: Vec::new(),
            group: Vec::new(),
            pages_left: 0,
            group_result: Ok(()),
        };
        Self::new(base, overlay, readonly, data_off, map, Some(store))
    }

    fn new(
        base: Lower,
        overlay: Lower,
        readonly: bool,
        data_off: u64,
        map: Map,
        store: Option<Store>,
    ) -> Result<Self> {
        let size = base.backend().size();
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(Error::invalid(format!(
                "cow: the base's size ({size} bytes) is not a multiple of 512"
            )));
        }
        let fds: Vec<BorrowedFd<'_>> = [base.event_fd(), overlay.event_fd()]
            .into_iter()
            .flatten()
            .collect();
        let epoll = if fds.is_empty() {
            None
        } else {
            let e = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
                .map_err(|e| Error::os("cow: epoll_create1", e))?;
            for (i, fd) in fds.iter().enumerate() {
                e.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))
                    .map_err(|e| Error::os("cow: epoll_ctl", e))?;
            }
            Some(e)
        };
        Ok(Self {
            size,
            readonly,
            base,
            overlay,
            data_off,
            map,
            store,
            next_tag: 0,
            subs: FxHashMap::default(),
            parents: FxHashMap::default(),
            done: Vec::new(),
            epoll,
            scratch: Vec::new(),
        })
    }

    /// Sectors the overlay holds.
    pub fn present_sectors(&self) -> u64 {
        self.map.count()
    }

    fn check(&self, io: &Io) -> std::result::Result<(), Errno> {
        if io.op == Op::Flush {
            return Ok(());
        }
        check_range(io, self.size)?;
        if !io.offset.is_multiple_of(SECTOR_SIZE) || !io.len().is_multiple_of(SECTOR_SIZE) {
            return Err(Errno::EINVAL);
        }
        if self.readonly && io.op != Op::Read {
            return Err(Errno::EROFS);
        }
        if io.op == Op::Discard && !self.overlay.backend().features().discard {
            return Err(Errno::EOPNOTSUPP);
        }
        Ok(())
    }

    fn tag(&mut self) -> u64 {
        self.next_tag = self.next_tag.wrapping_add(1);
        self.next_tag
    }

    /// Queues a sub-I/O of `parent` on the overlay (`overlay`) or the base.
    ///
    /// # Safety
    ///
    /// The buffers of `iov` stay valid as the parent's do (the `queue` contract); a page store's
    /// buffer is held in `sub` until its completion.
    unsafe fn sub(&mut self, parent: u64, sub: Sub, overlay: bool, mut io: Io) {
        let tag = self.tag();
        self.subs.insert(tag, (parent, sub));
        io.tag = tag;
        let lower = if overlay {
            &mut self.overlay
        } else {
            &mut self.base
        };
        // SAFETY: the caller keeps the buffers valid.
        unsafe { lower.queue(io) }
    }

    fn finish(&mut self, tag: u64) {
        if let Some(p) = self.parents.remove(&tag) {
            self.done.push(Completion {
                tag,
                result: p.result,
            });
        }
    }

    /// Flushes the overlay's data for `parent`, then stores the map.
    fn flush_data(&mut self, parent: u64) {
        let covers = self.store.as_ref().map_or(0, |s| s.seq);
        let flush = part(Op::Flush, 0, Vec::new(), 0);
        // SAFETY: a flush has no buffers.
        unsafe { self.sub(parent, Sub::FlushData { covers }, true, flush) }
    }

    /// `parent` waits for a map store (its data durable); starts one if none is in flight.
    fn wait_store(&mut self, parent: u64) {
        if let Some(s) = self.store.as_mut() {
            s.next.push(parent);
            if s.group.is_empty() {
                self.start_store();
            }
        }
    }

    /// Stores the durable map's changed pages for the parents waiting, one store at a time.
    fn start_store(&mut self) {
        loop {
            let Some(s) = self.store.as_mut() else { return };
            if !s.group.is_empty() || s.next.is_empty() {
                return;
            }
            s.group = std::mem::take(&mut s.next);
            s.group_result = Ok(());
            let pages = s.durable.take_dirty();
            s.pages_left = pages.len();
            if pages.is_empty() {
                // Every bit is stored already (by stores that completed).
                self.end_store();
                continue;
            }
            let first = self.store.as_ref().map_or(0, |s| s.group[0]);
            for (p, bytes) in pages {
                let page = AlignedPage::new(&bytes);
                let iov = vec![page.iovec()];
                // SAFETY: the page's buffer lives in the sub entry until its completion.
                unsafe {
                    self.sub(
                        first,
                        Sub::Page {
                            page: p,
                            _bytes: page,
                        },
                        true,
                        part(Op::Write, file::page_offset(p), iov, 0),
                    )
                };
            }
            return;
        }
    }

    /// The map store in flight is over: its parents complete, the next store starts.
    fn end_store(&mut self) {
        let Some(s) = self.store.as_mut() else { return };
        let group = std::mem::take(&mut s.group);
        let result = s.group_result;
        for g in group {
            if let Some(p) = self.parents.get_mut(&g) {
                merge(&mut p.result, result);
            }
            self.finish(g);
        }
    }

    /// Records a completed write or discard of `[sector, sector + n)` on the overlay: present
    /// now; in a file overlay, to be stored once its data is durable (`durable`: it is).
    fn written(&mut self, sector: u64, n: u64, durable: bool) {
        self.map.set(sector, n);
        if let Some(s) = self.store.as_mut() {
            s.seq += 1;
            if durable {
                s.durable.set(sector, n);
            } else {
                s.unflushed.push((s.seq, sector, n));
            }
        }
    }

    /// Handles one completion of a lower layer.
    fn complete(&mut self, c: Completion) {
        let Some((parent, sub)) = self.subs.remove(&c.tag) else {
            log::warn!("cow: completion of unknown sub-I/O {}", c.tag);
            return;
        };
        match sub {
            Sub::Page { page: p, .. } => {
                let mut store_done = false;
                if let Some(s) = self.store.as_mut() {
                    if c.result.is_err() {
                        s.durable.redirty(p);
                    }
                    merge(&mut s.group_result, c.result.map_err(|_| Errno::EIO));
                    s.pages_left -= 1;
                    store_done = s.pages_left == 0;
                }
                if store_done {
                    self.flush_map(parent);
                }
                return;
            }
            Sub::FlushMap => {
                if let Some(s) = self.store.as_mut() {
                    merge(&mut s.group_result, c.result.map_err(|_| Errno::EIO));
                }
                self.end_store();
                self.start_store();
                return;
            }
            Sub::FlushData { covers } => {
                if c.result.is_ok() {
                    if let Some(s) = self.store.as_mut() {
                        // The writes completed before the flush was issued are durable.
                        let n = s.unflushed.partition_point(|&(seq, _, _)| seq <= covers);
                        for (_, sector, len) in s.unflushed.drain(..n) {
                            s.durable.set(sector, len);
                        }
                    }
                }
                let Some(p) = self.parents.get_mut(&parent) else {
                    return;
                };
                merge(&mut p.result, c.result);
                if p.result.is_ok() {
                    self.wait_store(parent);
                } else {
                    self.finish(parent);
                }
                return;
            }
            Sub::Part => {}
        }
        let Some(p) = self.parents.get_mut(&parent) else {
            return;
        };
        merge(&mut p.result, c.result);
        p.remaining -= 1;
        if p.remaining > 0 {
            return;
        }
        let (op, sector, sectors, ok) = (p.op, p.sector, p.sectors, p.result.is_ok());
        if ok && matches!(op, Op::Write | Op::WriteFua | Op::Discard) {
            self.written(sector, sectors, op == Op::WriteFua);
            if op == Op::WriteFua && self.store.is_some() {
                self.wait_store(parent);
                return;
            }
        }
        self.finish(parent);
    }

    /// Flushes the overlay after the map pages of the store in flight (for `parent`'s group).
    fn flush_map(&mut self, parent: u64) {
        let flush = part(Op::Flush, 0, Vec::new(), 0);
        // SAFETY: a flush has no buffers.
        unsafe { self.sub(parent, Sub::FlushMap, true, flush) }
    }

    /// Reaps both layers and handles their completions, submitting what that queued, until
    /// nothing more completes now.
    fn pump(&mut self) -> Result<()> {
        let mut got = std::mem::take(&mut self.scratch);
        let mut result = Ok(());
        loop {
            self.base.reap(&mut got);
            self.overlay.reap(&mut got);
            if got.is_empty() {
                break;
            }
            if let Err(e) = self.complete_all(&mut got) {
                result = Err(e);
                break;
            }
        }
        self.scratch = got;
        result
    }

    /// Handles the completions in `got`, then submits what that queued.
    fn complete_all(&mut self, got: &mut Vec<Completion>) -> Result<()> {
        for c in got.drain(..) {
            self.complete(c);
        }
        self.overlay.submit().and(self.base.submit())
    }
}

/// A sub-I/O (its tag given when queued).
fn part(op: Op, offset: u64, iov: Vec<libc::iovec>, discard_len: u64) -> Io {
    Io {
        tag: 0,
        op,
        offset,
        iov,
        discard_len,
    }
}

fn clone_map(map: &Map, sectors: u64) -> Map {
    let mut out = Map::new(sectors);
    for p in 0..map.page_count() {
        out.load_page(p, &map.page_bytes(p));
    }
    out.take_dirty();
    out
}

impl Backend for CowLayer {
    fn kind(&self) -> ImageKind {
        ImageKind::Cow
    }

    fn size(&self) -> u64 {
        self.size
    }

    unsafe fn queue(&mut self, io: Io) {
        let tag = io.tag;
        if let Err(e) = self.check(&io) {
            self.done.push(Completion {
                tag,
                result: Err(e),
            });
            return;
        }
        let (sector, sectors) = (io.offset / SECTOR_SIZE, io.len() / SECTOR_SIZE);
        let mut parent = Parent {
            op: io.op,
            sector,
            sectors,
            remaining: 0,
            result: Ok(()),
        };
        match io.op {
            Op::Read => {
                let runs = self.map.runs(sector, sectors);
                parent.remaining = runs.len();
                self.parents.insert(tag, parent);
                if runs.is_empty() {
                    self.finish(tag);
                    return;
                }
                for (s, n, present) in runs {
                    let iov = slice_iov(&io.iov, (s - sector) * SECTOR_SIZE, n * SECTOR_SIZE);
                    let offset = s * SECTOR_SIZE + if present { self.data_off } else { 0 };
                    // SAFETY: slices of the parent's buffers, valid as long (the caller's
                    // `queue` contract).
                    unsafe { self.sub(tag, Sub::Part, present, part(Op::Read, offset, iov, 0)) };
                }
            }
            Op::Write | Op::WriteFua => {
                parent.remaining = 1;
                self.parents.insert(tag, parent);
                // SAFETY: the parent's buffers (the caller's `queue` contract).
                unsafe {
                    self.sub(
                        tag,
                        Sub::Part,
                        true,
                        part(io.op, io.offset + self.data_off, io.iov, 0),
                    )
                };
            }
            Op::Discard => {
                parent.remaining = 1;
                self.parents.insert(tag, parent);
                let len = io.discard_len;
                // SAFETY: a discard has no buffers.
                unsafe {
                    self.sub(
                        tag,
                        Sub::Part,
                        true,
                        part(Op::Discard, io.offset + self.data_off, Vec::new(), len),
                    )
                };
            }
            Op::Flush => {
                parent.remaining = 1;
                self.parents.insert(tag, parent);
                if self.store.is_some() {
                    self.flush_data(tag);
                } else {
                    // SAFETY: a flush has no buffers.
                    unsafe { self.sub(tag, Sub::Part, true, part(Op::Flush, 0, Vec::new(), 0)) };
                }
            }
        }
    }

    fn submit(&mut self) -> Result<()> {
        let r = self.overlay.submit().and(self.base.submit());
        r.and(self.pump())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        // The epoll set is level-triggered: the layers clear their own descriptors as they reap.
        if let Err(e) = self.pump() {
            log::warn!("cow: submit: {e}");
        }
        out.append(&mut self.done);
    }

    fn in_flight(&self) -> usize {
        self.parents.len() + self.done.len()
    }

    fn drain(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        let mut got = std::mem::take(&mut self.scratch);
        let mut result = Ok(());
        while !self.parents.is_empty() {
            if self.subs.is_empty() {
                // Nothing in flight can answer them (a bug): fail them rather than spin.
                log::warn!("cow: {} I/Os with nothing in flight", self.parents.len());
                let tags: Vec<u64> = self.parents.keys().copied().collect();
                for t in tags {
                    if let Some(p) = self.parents.get_mut(&t) {
                        merge(&mut p.result, Err(Errno::EIO));
                    }
                    self.finish(t);
                }
                break;
            }
            let r = self.overlay.drain(&mut got).and(self.base.drain(&mut got));
            if let Err(e) = r {
                result = Err(e);
                break;
            }
            if let Err(e) = self.complete_all(&mut got) {
                result = Err(e);
                break;
            }
        }
        self.scratch = got;
        out.append(&mut self.done);
        result
    }

    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        self.epoll.as_ref().map(|e| e.0.as_fd())
    }

    fn features(&self) -> Features {
        Features {
            flush: true,
            fua: true,
            discard: self.overlay.backend().features().discard,
        }
    }

    fn allocated_bytes(&self) -> Option<u64> {
        self.overlay.backend().allocated_bytes()
    }

    fn block_status(&self, offset: u64, len: u64) -> Option<Vec<Extent>> {
        let end = offset.checked_add(len)?.min(self.size);
        if !offset.is_multiple_of(SECTOR_SIZE) || offset >= end {
            return None;
        }
        let sectors = (end - offset).div_ceil(SECTOR_SIZE);
        let mut out: Vec<Extent> = Vec::new();
        let push = |e: Extent, out: &mut Vec<Extent>| match out.last_mut() {
            Some(last) if last.hole == e.hole => last.length += e.length,
            _ => out.push(e),
        };
        for (s, n, present) in self.map.runs(offset / SECTOR_SIZE, sectors) {
            let (from, to) = (s * SECTOR_SIZE, ((s + n) * SECTOR_SIZE).min(end));
            if present {
                push(
                    Extent {
                        length: to - from,
                        hole: false,
                    },
                    &mut out,
                );
                continue;
            }
            let base = self.base.backend().block_status(from, to - from);
            let mut covered = 0;
            for e in base.into_iter().flatten() {
                covered += e.length;
                push(e, &mut out);
            }
            if covered < to - from {
                push(
                    Extent {
                        length: to - from - covered,
                        hole: false,
                    },
                    &mut out,
                );
            }
            if out.len() >= MAX_EXTENTS {
                break;
            }
        }
        Some(out)
    }

    fn layers(&self, out: &mut Vec<LayerStats>) {
        self.overlay.layers(out);
        self.base.layers(out);
    }
}

impl Drop for CowLayer {
    fn drop(&mut self) {
        // A file overlay's last map store: the data synced, then every bit it stands for.
        let Some(s) = self.store.as_mut() else { return };
        let stored = s.file.sync_data().and_then(|()| {
            for (_, sector, n) in s.unflushed.drain(..) {
                s.durable.set(sector, n);
            }
            for (p, bytes) in s.durable.take_dirty() {
                s.file.write_all_at(&bytes, file::page_offset(p))?;
            }
            s.file.sync_data()
        });
        if let Err(e) = stored {
            log::warn!(
                "cow {}: cannot store the map at close: {e}",
                self.overlay_name()
            );
        }
    }
}

impl CowLayer {
    fn overlay_name(&self) -> String {
        let mut v = Vec::new();
        self.overlay.layers(&mut v);
        v.first().map(|l| l.name.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests;
