//! What the thread that owns a leaf VHD ([`super::VhdImage`], on the `vhd:` backend's worker)
//! tells the event loop about it, so that the loop can do I/O on the chain's data itself
//! (io_uring, straight into the ring's pages) where no metadata is involved: which blocks are
//! wholly present in the leaf and where their data is, for the other blocks of a differencing
//! leaf where the leaf and its parents hold their sectors, which blocks the leaf has allocated,
//! and whether the loop wrote since the last flush.
//!
//! A block becomes "present" only after its data, bitmap and BAT entry are on disk (the worker
//! marks it at the end of the allocation, or when it reads a full bitmap); it stops being present
//! before the worker touches its BAT entry to free it (a discard). The loop reads each entry once
//! per I/O; I/Os in flight together with a discard of the same range have no defined outcome, as
//! for any disk.
//!
//! A block of a differencing leaf that the leaf holds in part or not at all (no BAT entry, or
//! some sectors' bits clear) is read from the leaf's sectors of it and its parents' for the
//! rest: where each run of it is (which image, where in its file) is worked out by the worker
//! when it first reads the block ([`LeafState::set_sources`]). The parents' runs never change,
//! as parents do not; the leaf's change only when the leaf writes into the block (a new
//! sector's bit, or the block's allocation). The worker withdraws the block
//! ([`LeafState::revoke_sources`]) before it writes the first byte of a write into it, so
//! before that write's completion: a read the loop starts after the completion goes to the
//! worker (or to the leaf, once the block is whole). A withdrawn block stays withdrawn (a
//! differencing leaf never frees a block: it does not discard).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

/// Where a run of a block is: `len` bytes of image `image` of the chain (0 the leaf, 1 its
/// parent, 2 that one's parent, ...) at byte `at` of its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    /// The image, counted from the leaf (0).
    pub image: usize,
    /// Byte offset in the image's file.
    pub at: u64,
    /// Bytes.
    pub len: u64,
}

/// A piece of an I/O located by [`LeafState::locate`]: image (0 the leaf), byte offset in its
/// file, length.
pub type Piece = (usize, u64, u64);
/// A leaf's state, shared between its worker and the event loop.
///
/// # Invariants
///
/// `data_at[b]` is 0, or 1 + the byte offset in the leaf file of block `b`'s data, every sector
/// of which the leaf holds (its bitmap is full) and whose BAT entry is on disk.
///
/// While `revoked[b]` is false, `sources[b]`, if set and not empty, covers block `b` with runs in
/// order, each from one image of the chain, the leaf's runs being exactly the sectors of the
/// block it holds.
#[derive(Debug)]
pub struct LeafState {
    /// The disk's size in bytes.
    pub size: u64,
    /// Bytes per block (0 for a fixed disk: its data is the file's first `size` bytes).
    pub block_size: u64,
    data_at: Vec<AtomicU64>,
    allocated: Vec<AtomicBool>,
    /// Per block, once the worker worked it out: where the leaf and its parents hold it, in
    /// runs (empty: not so: some of it reads as zeros, or it is in too many runs).
    sources: Vec<OnceLock<Box<[Source]>>>,
    /// Per block: the leaf wrote (or is about to write) into it; never cleared.
    revoked: Vec<AtomicBool>,
    /// Whether the loop wrote to the file since the worker's last flush.
    written: AtomicBool,
}

impl LeafState {
    /// A fixed disk of `size` bytes: all present, at their own offsets.
    pub fn fixed(size: u64) -> Self {
        Self {
            size,
            block_size: 0,
            data_at: Vec::new(),
            allocated: Vec::new(),
            sources: Vec::new(),
            revoked: Vec::new(),
            written: AtomicBool::new(false),
        }
    }

    /// A dynamic or differencing disk of `blocks` blocks of `block_size` bytes, none known to be
    /// present yet; `allocated` says which the BAT has.
    pub fn dynamic(size: u64, block_size: u64, allocated: impl Iterator<Item = bool>) -> Self {
        let allocated: Vec<AtomicBool> = allocated.map(AtomicBool::new).collect();
        Self {
            size,
            block_size,
            data_at: allocated.iter().map(|_| AtomicU64::new(0)).collect(),
            sources: allocated.iter().map(|_| OnceLock::new()).collect(),
            revoked: allocated.iter().map(|_| AtomicBool::new(false)).collect(),
            allocated,
            written: AtomicBool::new(false),
        }
    }

    /// Block `b` is wholly present, its data at byte `at` of the file.
    pub fn set_present(&self, b: u32, at: u64) {
        if let Some(e) = self.data_at.get(b as usize) {
            e.store(at + 1, Ordering::Release);
        }
        self.set_allocated(b, true);
    }

    /// Block `b` is (or is about to be) no longer wholly present.
    pub fn clear_present(&self, b: u32) {
        if let Some(e) = self.data_at.get(b as usize) {
            e.store(0, Ordering::Release);
        }
    }

    /// The leaf's BAT has (or no longer has) block `b`.
    pub fn set_allocated(&self, b: u32, yes: bool) {
        if let Some(e) = self.allocated.get(b as usize) {
            e.store(yes, Ordering::Release);
        }
    }

    /// Whether the leaf's BAT has block `b` (a fixed disk has everything).
    pub fn allocated(&self, b: u32) -> bool {
        self.block_size == 0
            || self
                .allocated
                .get(b as usize)
                .is_some_and(|e| e.load(Ordering::Acquire))
    }

    /// Whether the worker has worked out where the chain holds block `b` (or that the loop
    /// cannot read it).
    pub fn sources_known(&self, b: u32) -> bool {
        self.sources
            .get(b as usize)
            .is_some_and(|p| p.get().is_some())
    }

    /// Block `b`, which the leaf holds in part or not at all, is `runs` of the leaf and its
    /// parents, in order, covering it (empty: the loop cannot read it). Only the worker calls
    /// this, and only once per block (later calls change nothing).
    pub fn set_sources(&self, b: u32, runs: Box<[Source]>) {
        if let Some(p) = self.sources.get(b as usize) {
            let _ = p.set(runs);
        }
    }

    /// The leaf is about to write into block `b`: the loop no longer reads it from the runs it
    /// was told. Called by the worker before it writes any byte into the block.
    pub fn revoke_sources(&self, b: u32) {
        if let Some(r) = self.revoked.get(b as usize) {
            r.store(true, Ordering::Release);
        }
    }

    /// Where `[offset, offset + len)` of the disk is, if all of it is in blocks the leaf holds
    /// wholly, or (if `chain`) in blocks whose runs in the leaf and its parents are known: the
    /// pieces `(image, file offset, length)`, split at block ends (and at the ends of the
    /// runs), in order. None if any part is elsewhere (then the worker does the I/O).
    pub fn locate(&self, offset: u64, len: u64, chain: bool, out: &mut Vec<Piece>) -> bool {
        out.clear();
        let Some(end) = offset.checked_add(len).filter(|&e| e <= self.size) else {
            return false;
        };
        if self.block_size == 0 {
            out.push((0, offset, len));
            return true;
        }
        let mut pos = offset;
        while pos < end {
            let b = (pos / self.block_size) as usize;
            let within = pos % self.block_size;
            let n = (self.block_size - within).min(end - pos);
            let Some(at) = self.data_at.get(b).map(|e| e.load(Ordering::Acquire)) else {
                return false;
            };
            if at != 0 {
                out.push((0, at - 1 + within, n));
            } else if !chain || !self.locate_in_sources(b, within, n, out) {
                return false;
            }
            pos += n;
        }
        true
    }

    /// Pushes where the chain holds `[within, within + n)` of block `b`, if its runs are known
    /// and the leaf has not written into it since.
    fn locate_in_sources(&self, b: usize, within: u64, n: u64, out: &mut Vec<Piece>) -> bool {
        if self
            .revoked
            .get(b)
            .is_none_or(|r| r.load(Ordering::Acquire))
        {
            return false;
        }
        let Some(runs) = self.sources.get(b).and_then(OnceLock::get) else {
            return false;
        };
        let (end, mut start, mut covered) = (within + n, 0, 0);
        for r in runs.iter() {
            let (a, z) = (start.max(within), (start + r.len).min(end));
            if a < z {
                out.push((r.image, r.at + (a - start), z - a));
                covered += z - a;
            }
            start += r.len;
            if start >= end {
                break;
            }
        }
        covered == n
    }

    /// The loop is about to write to the file.
    pub fn note_write(&self) {
        self.written.store(true, Ordering::Release);
    }

    /// Whether the loop wrote since the last call (the worker's flush then syncs).
    pub fn take_written(&self) -> bool {
        self.written.swap(false, Ordering::AcqRel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_wholly_present_blocks_are_located_split_at_block_ends() {
        let bs = 2 << 20;
        let s = LeafState::dynamic(8 << 20, bs, [true, false, false, false].into_iter());
        let mut out = Vec::new();
        assert!(
            !s.locate(0, 4096, true, &mut out),
            "allocated, not known present"
        );
        s.set_present(0, 1 << 20);
        s.set_present(1, 9 << 20);
        assert!(s.locate(4096, 8192, true, &mut out));
        assert_eq!(out, [(0, (1 << 20) + 4096, 8192)]);
        assert!(s.locate(bs - 512, 1024, true, &mut out));
        assert_eq!(out, [(0, (1 << 20) + bs - 512, 512), (0, 9 << 20, 512)]);
        assert!(
            !s.locate(2 * bs - 512, 1024, true, &mut out),
            "block 2 is not present"
        );
        assert!(!s.locate(8 << 20, 512, true, &mut out), "past the end");
        assert!(!s.locate(u64::MAX - 10, 512, true, &mut out));
        s.clear_present(1);
        assert!(!s.locate(bs, 512, true, &mut out));
        assert!(s.allocated(1) && !s.allocated(2));
        let f = LeafState::fixed(1 << 20);
        assert!(f.locate(512, 1024, true, &mut out) && out == [(0, 512, 1024)]);
        assert!(f.allocated(7));
        assert!(!f.take_written());
        f.note_write();
        assert!(f.take_written() && !f.take_written());
    }

    #[test]
    fn blocks_the_parents_hold_are_located_in_their_runs_until_revoked() {
        let bs = 8192;
        let s = LeafState::dynamic(4 * bs, bs, [false; 4].into_iter());
        let mut out = Vec::new();
        assert!(!s.locate(0, 512, true, &mut out), "not worked out yet");
        assert!(!s.sources_known(0));
        let src = |image, at, len| Source { image, at, len };
        // Block 0: 4 KiB of image 1, then 4 KiB of image 3; block 1: image 2 whole; block 2: not
        // the parents' alone.
        s.set_sources(0, [src(1, 100 << 10, 4096), src(3, 7 << 20, 4096)].into());
        s.set_sources(1, [src(2, 1 << 20, bs)].into());
        s.set_sources(2, Box::new([]));
        assert!(s.sources_known(0) && s.sources_known(2) && !s.sources_known(3));
        assert!(s.locate(3584, 1024, true, &mut out));
        assert_eq!(out, [(1, (100 << 10) + 3584, 512), (3, 7 << 20, 512)]);
        assert!(
            !s.locate(3584, 1024, false, &mut out),
            "writes: the leaf only"
        );
        assert!(s.locate(bs - 512, 1024, true, &mut out));
        assert_eq!(out, [(3, (7 << 20) + 3584, 512), (2, 1 << 20, 512)]);
        assert!(!s.locate(2 * bs - 512, 1024, true, &mut out), "block 2");
        // A second answer for a block changes nothing.
        s.set_sources(1, [src(1, 0, bs)].into());
        // A leaf block present wins; a leaf block revoked is no longer the parents'.
        s.set_present(0, 1 << 20);
        assert!(s.locate(0, bs + 512, true, &mut out));
        assert_eq!(out, [(0, 1 << 20, bs), (2, 1 << 20, 512)]);
        s.revoke_sources(1);
        assert!(!s.locate(bs, 512, true, &mut out));
        // Runs that do not cover the block (a bug) are not trusted.
        s.set_sources(3, [src(1, 0, 4096)].into());
        assert!(!s.locate(3 * bs + 4096, 512, true, &mut out));
        assert!(s.locate(3 * bs, 4096, true, &mut out));
    }

    #[test]
    fn a_block_the_leaf_holds_in_part_is_located_in_the_leaf_and_the_parents() {
        let bs = 8192;
        let s = LeafState::dynamic(2 * bs, bs, [true, false].into_iter());
        let mut out = Vec::new();
        let src = |image, at, len| Source { image, at, len };
        // Block 0: 2 KiB of the parent, 4 KiB of the leaf's own data (at 1 MiB of its file),
        // 2 KiB of the parent's parent.
        s.set_sources(
            0,
            [src(1, 4096, 2048), src(0, 1 << 20, 4096), src(2, 0, 2048)].into(),
        );
        assert!(s.locate(1024, 6144, true, &mut out));
        assert_eq!(out, [(1, 5120, 1024), (0, 1 << 20, 4096), (2, 0, 1024)]);
        assert!(
            !s.locate(1024, 512, false, &mut out),
            "writes: whole blocks only"
        );
        // The worker is about to write into it: the leaf's runs may change, none is used.
        s.revoke_sources(0);
        assert!(!s.locate(2048, 512, true, &mut out));
        // Once whole, the leaf's block is read where it is.
        s.set_present(0, 1 << 20);
        assert!(s.locate(2048, 512, true, &mut out) && out == [(0, (1 << 20) + 2048, 512)]);
    }
}
