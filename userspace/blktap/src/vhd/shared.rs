//! What the thread that owns a leaf VHD ([`super::VhdImage`], on the `vhd:` backend's worker)
//! tells the event loop about it, so that the loop can do I/O on the leaf's data itself
//! (io_uring, straight into the ring's pages) where no metadata is involved: which blocks are
//! wholly present in the leaf and where their data is, which blocks the leaf has allocated, and
//! whether the loop wrote since the last flush.
//!
//! A block becomes "present" only after its data, bitmap and BAT entry are on disk (the worker
//! marks it at the end of the allocation, or when it reads a full bitmap); it stops being present
//! before the worker touches its BAT entry to free it (a discard). The loop reads each entry once
//! per I/O; I/Os in flight together with a discard of the same range have no defined outcome, as
//! for any disk.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A leaf's state, shared between its worker and the event loop.
///
/// # Invariants
///
/// `data_at[b]` is 0, or 1 + the byte offset in the leaf file of block `b`'s data, every sector
/// of which the leaf holds (its bitmap is full) and whose BAT entry is on disk.
#[derive(Debug)]
pub struct LeafState {
    /// The disk's size in bytes.
    pub size: u64,
    /// Bytes per block (0 for a fixed disk: its data is the file's first `size` bytes).
    pub block_size: u64,
    data_at: Vec<AtomicU64>,
    allocated: Vec<AtomicBool>,
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

    /// Where `[offset, offset + len)` of the disk is in the file, if the leaf holds all of it
    /// in wholly present blocks: the pieces `(file offset, length)`, one per block, in order.
    /// None if any part is elsewhere (then the worker does the I/O).
    pub fn locate(&self, offset: u64, len: u64, out: &mut Vec<(u64, u64)>) -> bool {
        out.clear();
        let Some(end) = offset.checked_add(len).filter(|&e| e <= self.size) else {
            return false;
        };
        if self.block_size == 0 {
            out.push((offset, len));
            return true;
        }
        let mut pos = offset;
        while pos < end {
            let b = pos / self.block_size;
            let within = pos % self.block_size;
            let n = (self.block_size - within).min(end - pos);
            let Some(at) = self
                .data_at
                .get(b as usize)
                .map(|e| e.load(Ordering::Acquire))
            else {
                return false;
            };
            if at == 0 {
                return false;
            }
            out.push((at - 1 + within, n));
            pos += n;
        }
        true
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
        assert!(!s.locate(0, 4096, &mut out), "allocated, not known present");
        s.set_present(0, 1 << 20);
        s.set_present(1, 9 << 20);
        assert!(s.locate(4096, 8192, &mut out));
        assert_eq!(out, [((1 << 20) + 4096, 8192)]);
        assert!(s.locate(bs - 512, 1024, &mut out));
        assert_eq!(out, [((1 << 20) + bs - 512, 512), (9 << 20, 512)]);
        assert!(
            !s.locate(2 * bs - 512, 1024, &mut out),
            "block 2 is not present"
        );
        assert!(!s.locate(8 << 20, 512, &mut out), "past the end");
        assert!(!s.locate(u64::MAX - 10, 512, &mut out));
        s.clear_present(1);
        assert!(!s.locate(bs, 512, &mut out));
        assert!(s.allocated(1) && !s.allocated(2));
        let f = LeafState::fixed(1 << 20);
        assert!(f.locate(512, 1024, &mut out) && out == [(512, 1024)]);
        assert!(f.allocated(7));
        assert!(!f.take_written());
        f.note_write();
        assert!(f.take_written() && !f.take_written());
    }
}
