//! Reserving blocks without writing their data (`vhd-util fill -b`): each unallocated block of
//! a range gets its place at the end of the file, its sector bitmap and its BAT entry; its data
//! region is left unwritten, a hole of the file.
//!
//! What the disk reads does not change:
//! - in a dynamic disk held in a regular file, the bitmap marks every sector present: the hole
//!   reads as zeros, as the unallocated block did, and later writes into the block need no
//!   bitmap update;
//! - in a differencing disk, or in an image that is not a regular file (a block device, whose
//!   unwritten sectors hold whatever was there), the bitmap marks none: the block's sectors
//!   still read as the parent's (or as zeros), and the space is reserved.
//!
//! Blocks already allocated are left as they are, with their data. The order is the allocating
//! write's, for a whole range at once: the footer moves to the new end first, then the bitmaps
//! are written, `fdatasync`, then the BAT entries, `fdatasync`. Killed before the BAT is
//! written, the file ends with a valid footer and holds blocks no entry references.

use std::ops::RangeInclusive;

use super::{set_bit, VhdImage};
use crate::vhd::{VhdError, UNALLOCATED};

impl VhdImage {
    /// Reserves every unallocated block in `blocks` (indices past the last block are ignored;
    /// see the module's documentation). Returns how many blocks it reserved.
    ///
    /// # Errors
    ///
    /// A fixed disk, a read-only image, a block the BAT cannot address (its sector offset does
    /// not fit the entry's 32 bits), or a failed write or `fdatasync`.
    pub fn reserve(&mut self, blocks: RangeInclusive<u32>) -> Result<u64, VhdError> {
        self.refuse_read_only()?;
        let Some(table_offset) = self.header.as_ref().map(|h| h.table_offset) else {
            return Err(VhdError::invalid(
                &self.path,
                "is a fixed disk: it holds every sector already",
            ));
        };
        // CAST: the BAT has at most `MAX_BLOCKS` entries, counted in `u32`.
        let last = (self.bat.len() as u32).checked_sub(1);
        let Some(last) = last.map(|l| (*blocks.end()).min(l)) else {
            return Ok(0);
        };
        let todo: Vec<u32> = (*blocks.start()..=last)
            .filter(|&b| self.bat[b as usize] == UNALLOCATED)
            .collect();
        if todo.is_empty() {
            return Ok(0);
        }
        let regular = self
            .file
            .metadata()
            .map_err(|e| VhdError::io("cannot stat", &self.path, e))?
            .is_file();
        let present = regular && !self.has_parent();
        let (bm, bs) = (self.bitmap_bytes, self.block_size);
        let mut bitmap = vec![0u8; bm as usize];
        if present {
            for s in 0..bs / 512 {
                set_bit(&mut bitmap, s);
            }
        }
        // Where each block goes: one after the other, as allocating writes place them.
        let mut placed = Vec::with_capacity(todo.len());
        let mut end = self.footer_offset;
        for &block in &todo {
            let (start, sector) = self.place_after(end)?;
            placed.push((block, sector));
            end = start + bm + bs;
        }
        let footer = self.footer.to_bytes();
        self.write_file(end, &footer)?;
        self.footer_offset = end;
        for &(_, sector) in &placed {
            self.write_file(u64::from(sector) * 512, &bitmap)?;
        }
        // Footer and bitmaps are on disk before the BAT points at the blocks.
        self.barrier()?;
        for &(block, sector) in &placed {
            self.bat[block as usize] = sector;
        }
        // The entries from the first block reserved to the last, in one write.
        let (first, last) = (placed[0].0 as usize, placed[placed.len() - 1].0 as usize);
        let entries: Vec<u8> = self.bat[first..=last]
            .iter()
            .flat_map(|s| s.to_be_bytes())
            .collect();
        self.write_file(table_offset + first as u64 * 4, &entries)?;
        self.barrier()?;
        // The bitmaps are read back when asked for (`bitmap`): one per block of a large disk
        // would be a lot of memory to keep here.
        let full = present && self.full(&bitmap);
        for &(block, _) in &placed {
            self.bitmaps.remove(&block);
            if let Some(s) = &self.shared {
                s.set_allocated(block, true);
            }
            if full {
                self.tell_present(block);
            }
        }
        Ok(placed.len() as u64)
    }
}
