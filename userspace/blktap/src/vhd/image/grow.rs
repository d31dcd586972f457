//! Growing the BAT past its room ([`VhdImage::resize`]), under a journal, as XenServer's
//! vhd-util lays the result out: the grown BAT in place; a XenServer batmap's header right after
//! it and its map (grown to a bit per block) right after that; the parent locators' data right
//! after those, each in its reserved space; every block that lies in the way of this metadata
//! moved to the end of the file. Every block then starts after the end of the metadata, as
//! XenServer's `vhd-util check` requires.

use std::path::Path;

use super::{overlaps, read_exact, Batmap, VhdImage};
use crate::vhd::header::{Header, HEADER_SIZE};
use crate::vhd::journal::{self, Journal};
use crate::vhd::{VhdError, UNALLOCATED};

/// The steps of a resize that moves the BAT, in order. Tests stop after one to play a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// The journal is durable; the image is untouched.
    Journal,
    /// The old footer is at the new end and the copies of the blocks in the way are past the
    /// old end.
    Copy,
    /// The moved blocks' BAT entries point at their copies.
    Repoint,
    /// Copies of the locators whose places the new metadata takes are written in the staging
    /// space (after the old and the new metadata, where no block is any longer). Nothing is
    /// done here when no locator is in the way.
    Stage,
    /// The header's locators point at the staged copies. Nothing is done here when no locator
    /// is in the way.
    Restage,
    /// The grown BAT is written over the old places (and the old batmap's header: the image has
    /// no batmap until the header counts the new entries).
    Bat,
    /// The new metadata after the grown BAT (unused by the image now) is written: the batmap's
    /// header and map, the locators' data.
    Metadata,
    /// The header counts the new blocks and points at the locators' new places.
    Header,
    /// The trailing footer has the new size.
    Footer,
    /// The footer copy at offset 0 has it too (the journal is still there: what follows is
    /// its removal, which completes the resize).
    FooterCopy,
}

impl Step {
    /// Every step, in order.
    #[cfg(test)]
    pub(crate) const ALL: [Step; 10] = [
        Step::Journal,
        Step::Copy,
        Step::Repoint,
        Step::Stage,
        Step::Restage,
        Step::Bat,
        Step::Metadata,
        Step::Header,
        Step::Footer,
        Step::FooterCopy,
    ];
}

/// An allocated block (bitmap and data) in the new metadata's way: its bytes, and where they go
/// (past the old end of the file).
#[derive(Debug, Clone, Copy)]
struct BlockMove {
    block: u32,
    from: u64,
    to: u64,
}

/// A parent locator's data moving to its new place after the grown BAT and batmap.
#[derive(Debug, Clone, Copy)]
struct LocatorMove {
    /// Its index in the header.
    index: usize,
    /// Its place and its reserved bytes.
    from: u64,
    len: u64,
    /// Its new place.
    to: u64,
    /// Where it waits for the header to point at its new place, when the new metadata is
    /// written over its old place first.
    staged: Option<u64>,
}

impl LocatorMove {
    /// Where its bytes are once staged (if they are).
    fn current(&self) -> u64 {
        self.staged.unwrap_or(self.from)
    }
}

/// Where the batmap of a resize that moves the BAT goes.
#[derive(Debug)]
struct NewBatmap {
    /// The old one.
    old: Batmap,
    /// Where its header was (the end of the old BAT).
    old_header: u64,
    /// Where its header goes (the end of the grown BAT).
    header: u64,
    /// Where its map goes (the sector after the header).
    map: u64,
    /// The bytes of the grown map: a bit per block, in whole sectors.
    bytes: u64,
}

/// What a resize that moves the BAT does.
#[derive(Debug)]
struct Plan {
    /// The blocks that move, in file order.
    blocks: Vec<BlockMove>,
    /// The locators that move, in file order.
    locators: Vec<LocatorMove>,
    /// The end of the grown BAT.
    bat_end: u64,
    /// The end of the space the blocks leave: the grown metadata and the staging space.
    clear_end: u64,
    /// The batmap's new place, if the image has one.
    batmap: Option<NewBatmap>,
    /// Where the trailing footer goes.
    footer_offset: u64,
}

/// Sorted `regions`, overlapping or touching ones merged.
fn merge(mut regions: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    regions.retain(|&(a, b)| a < b);
    regions.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in regions {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

impl VhdImage {
    /// Grows the disk to `size` (`blocks` blocks, more than the BAT has room for): see
    /// [`VhdImage::resize`]. Reverts from the journal if a step fails.
    pub(super) fn grow_moving(
        &mut self,
        size: u64,
        journal_path: &Path,
        header: &Header,
        blocks: u64,
        stop_after: Option<Step>,
    ) -> Result<(), VhdError> {
        let plan = self.plan(header, blocks)?;
        let journal = self.journal_for(header, &plan)?;
        journal.write(&self.path, journal_path)?;
        if stop_after == Some(Step::Journal) {
            return Ok(());
        }
        match self.move_and_grow(size, header, blocks, &plan, &journal, stop_after) {
            Ok(done) => {
                if done {
                    journal::remove(journal_path)?;
                }
                Ok(())
            }
            Err(e) => match journal::revert(&self.path, journal_path) {
                Ok(()) => {
                    log::warn!(
                        "{}: resize failed, the image is restored from its journal: {e}",
                        self.path.display()
                    );
                    Err(e)
                }
                Err(r) => Err(VhdError::invalid(
                    &self.path,
                    format!(
                        "resize failed ({e}) and reverting from the journal failed too ({r}): run `vhd-util revert -n {} -j {}`",
                        self.path.display(),
                        journal_path.display()
                    ),
                )),
            },
        }
    }

    /// What moves where for a BAT of `blocks` entries, and the new footer's offset.
    fn plan(&self, header: &Header, blocks: u64) -> Result<Plan, VhdError> {
        let path = &self.path;
        if self.shared.is_some() {
            return Err(VhdError::invalid(
                path,
                "the BAT of an image being served cannot move",
            ));
        }
        self.refuse_used_tail(header, blocks)?;
        self.refuse_full_bits(self.bat.len() as u64, blocks)?;
        let (bm, bs) = (self.bitmap_bytes, self.block_size);
        let bat_start = header.table_offset;
        let bat_end = bat_start + (blocks * 4).next_multiple_of(512);
        // The batmap: its header after the grown BAT, its map after that, of a bit per block
        // in whole sectors (XenServer's layout and size, whatever the old map's size).
        let batmap = self.batmap.clone().map(|old| NewBatmap {
            old,
            old_header: self.bat_end(),
            header: bat_end,
            map: bat_end + 512,
            bytes: blocks.div_ceil(8).next_multiple_of(512),
        });
        let map_end = batmap.as_ref().map_or(bat_end, |b| b.map + b.bytes);
        // The locators after the BAT (all of them, as the original shifts every locator past
        // the BAT), in file order, right after the batmap, each in its reserved space rounded
        // to whole sectors.
        let mut locators = Vec::new();
        for (index, l) in header.locators.iter().enumerate() {
            if l.code == 0 || l.data_offset < bat_start {
                continue;
            }
            let len = l.reserved_bytes();
            if l.data_offset.saturating_add(len) > self.footer_offset {
                return Err(VhdError::invalid(
                    path,
                    format!(
                        "parent locator {index} at {:#x} ({len} bytes) lies past the end of the file: not moving it",
                        l.data_offset
                    ),
                ));
            }
            locators.push(LocatorMove {
                index,
                from: l.data_offset,
                len,
                to: 0,
                staged: None,
            });
        }
        locators.sort_unstable_by_key(|l| l.from);
        let mut pos = map_end;
        for l in &mut locators {
            l.to = pos;
            pos += l.len.next_multiple_of(512);
        }
        let meta_end = pos;
        // The staging space: a locator waits there when the grown BAT or the new metadata is
        // written over its place before the header points at its new one. (The old batmap's map
        // needs none: the grown BAT replaces its header before the new metadata is written over
        // it.) It is the first space after the new metadata clear of the old metadata (which
        // serves until the header, or the grown BAT, replaces it); the blocks there move.
        let header_start = self.footer.data_offset;
        // (`staged` is first the offset in the staging space, then the offset in the file.)
        let mut need = 0;
        for l in &mut locators {
            if overlaps(l.from, l.from + l.len, bat_start, meta_end) {
                l.staged = Some(need);
                need += l.len.next_multiple_of(512);
            }
        }
        let mut clear_end = meta_end;
        if need > 0 {
            let mut busy = vec![
                (header_start, header_start + HEADER_SIZE as u64),
                (bat_start, self.bat_end()),
            ];
            if let Some(b) = &self.batmap {
                busy.push((self.bat_end(), self.bat_end() + 512));
                busy.push((b.offset, b.offset + b.bytes));
            }
            // (Locators past the end of the file are not metadata; after the BAT, refused above.)
            busy.extend(
                header
                    .locators
                    .iter()
                    .filter(|l| l.code != 0)
                    .map(|l| (l.data_offset, l.data_offset + l.reserved_bytes()))
                    .filter(|&(_, end)| end <= self.footer_offset),
            );
            let mut at = meta_end;
            while let Some(&(_, end)) = busy.iter().find(|&&(a, b)| overlaps(at, at + need, a, b)) {
                at = end.next_multiple_of(512);
            }
            for l in &mut locators {
                if let Some(rel) = l.staged.as_mut() {
                    *rel += at;
                }
            }
            clear_end = at + need;
        }
        if overlaps(
            bat_start,
            clear_end,
            header_start,
            header_start + HEADER_SIZE as u64,
        ) {
            return Err(VhdError::invalid(
                path,
                format!(
                    "the dynamic header at {header_start:#x} lies in the way of the BAT at {bat_start:#x} grown to {} entries",
                    blocks
                ),
            ));
        }
        // Every block in the way of the new metadata and the staging space moves past the old
        // end and the new metadata, where `allocate` would put it.
        let mut in_way = Vec::new();
        for (block, &sector) in self.bat.iter().enumerate() {
            let from = u64::from(sector) * 512;
            if sector != UNALLOCATED && overlaps(from, from + bm + bs, bat_start, clear_end) {
                // CAST: the BAT has at most `MAX_BLOCKS` entries.
                in_way.push((from, block as u32));
            }
        }
        in_way.sort_unstable();
        let mut pos = self.footer_offset.max(clear_end).next_multiple_of(512);
        let mut moves = Vec::new();
        for (from, block) in in_way {
            let to = (pos + bm).next_multiple_of(4096) - bm;
            if u32::try_from(to / 512).map_or(true, |s| s == UNALLOCATED) {
                return Err(VhdError::invalid(
                    path,
                    "the BAT cannot address a block this far",
                ));
            }
            moves.push(BlockMove { block, from, to });
            pos = to + bm + bs;
        }
        Ok(Plan {
            blocks: moves,
            locators,
            bat_end,
            clear_end,
            batmap,
            footer_offset: pos,
        })
    }

    /// The journal of the resize `plan`: the regions of the file it overwrites (the footer copy,
    /// the header, the extent of the grown metadata and the staging space: BAT, batmap,
    /// locators, and the blocks in their way; the trailing footer), as they are.
    fn journal_for(&self, header: &Header, plan: &Plan) -> Result<Journal, VhdError> {
        let len = self.footer_offset + super::FOOTER_SIZE as u64;
        let data_offset = self.footer.data_offset;
        let regions = merge(vec![
            (0, super::FOOTER_SIZE as u64),
            (data_offset, data_offset + HEADER_SIZE as u64),
            (header.table_offset, plan.clear_end.min(len)),
            (self.footer_offset, len),
        ]);
        let mut records = Vec::new();
        for (a, b) in regions {
            if b - a > journal::MAX_RECORD {
                return Err(VhdError::invalid(
                    &self.path,
                    format!(
                        "the metadata to move ({} bytes at {a:#x}: the BAT, batmap and parent locators' reserved space) is more than a journal record holds ({} bytes)",
                        b - a,
                        journal::MAX_RECORD
                    ),
                ));
            }
            // CAST: at most `MAX_RECORD`.
            let mut buf = vec![0u8; (b - a) as usize];
            read_exact(&self.file, &self.path, &mut buf, a)?;
            records.push((a, buf));
        }
        Ok(Journal {
            len,
            uuid: self.footer.uuid,
            records,
        })
    }

    /// Writes `buf` at `at`, which `journal` must cover.
    fn write_journaled(&mut self, journal: &Journal, at: u64, buf: &[u8]) -> Result<(), VhdError> {
        if !journal.covers(at, buf.len() as u64) {
            return Err(VhdError::invalid(
                &self.path,
                format!(
                    "resize: a write of {} bytes at {at:#x} is not in the journal",
                    buf.len()
                ),
            ));
        }
        self.write_file(at, buf)
    }

    /// Copies `len` bytes at `from` to `to` (which `journal` must cover), a MiB at a time.
    fn copy_journaled(
        &mut self,
        journal: &Journal,
        from: u64,
        to: u64,
        len: u64,
    ) -> Result<(), VhdError> {
        let mut buf = Vec::new();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(1 << 20);
            // CAST: at most 1 MiB.
            buf.resize(n as usize, 0);
            read_exact(&self.file, &self.path, &mut buf, from + done)?;
            self.write_journaled(journal, to + done, &buf)?;
            done += n;
        }
        Ok(())
    }

    /// The steps after the journal's; true when all are done (none was the `stop_after` one).
    fn move_and_grow(
        &mut self,
        size: u64,
        header: &Header,
        blocks: u64,
        plan: &Plan,
        journal: &Journal,
        stop_after: Option<Step>,
    ) -> Result<bool, VhdError> {
        let footer_offset = plan.footer_offset;
        let stop = |step| stop_after == Some(step);
        // Copy: the file keeps ending with the (old) footer, then the blocks' copies go in
        // before it.
        let old_footer = self.footer.to_bytes();
        self.write_journaled(journal, footer_offset, &old_footer)?;
        let extent = self.bitmap_bytes + self.block_size;
        for m in &plan.blocks {
            self.copy_journaled(journal, m.from, m.to, extent)?;
        }
        self.barrier()?;
        if stop(Step::Copy) {
            return Ok(false);
        }
        // Repoint: the old BAT's entries, at the copies. The blocks' old places are free.
        let mut bat = self.bat.clone();
        for m in &plan.blocks {
            // CAST: `plan` checked that the sector fits.
            bat[m.block as usize] = (m.to / 512) as u32;
        }
        let raw: Vec<u8> = bat.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write_journaled(journal, header.table_offset, &raw)?;
        self.barrier()?;
        if stop(Step::Repoint) {
            return Ok(false);
        }
        // Stage: the locators in the new metadata's way, copied to the staging space (free
        // now).
        let staging = plan.locators.iter().any(|l| l.staged.is_some());
        for l in &plan.locators {
            if let Some(at) = l.staged {
                self.copy_journaled(journal, l.from, at, l.len)?;
            }
        }
        if staging {
            self.barrier()?;
        }
        if stop(Step::Stage) {
            return Ok(false);
        }
        // Restage: the header's locators at the staged copies.
        let data_offset = self.footer.data_offset;
        let mut hb = [0u8; HEADER_SIZE];
        read_exact(&self.file, &self.path, &mut hb, data_offset)?;
        if staging {
            for l in &plan.locators {
                if let Some(at) = l.staged {
                    crate::vhd::put64(&mut hb, 576 + 24 * l.index + 16, at);
                }
            }
            seal(&mut hb);
            self.write_journaled(journal, data_offset, &hb)?;
            self.barrier()?;
        }
        if stop(Step::Restage) {
            return Ok(false);
        }
        // The old batmap's header and its bits, before the grown BAT is written over them.
        let old_batmap = match &plan.batmap {
            Some(b) => Some(self.read_old_batmap(b)?),
            None => None,
        };
        // Bat: the grown BAT, new entries unallocated, over the old places (and the old
        // batmap's header: until the header counts the new entries, the image has none).
        let bat_bytes = plan.bat_end - header.table_offset;
        // CAST: at most 64 MiB (`MAX_BLOCKS` entries).
        let mut grown = vec![0xffu8; bat_bytes as usize];
        grown[..raw.len()].copy_from_slice(&raw);
        self.write_journaled(journal, header.table_offset, &grown)?;
        self.barrier()?;
        if stop(Step::Bat) {
            return Ok(false);
        }
        // Metadata: the new batmap and the locators' data after the grown BAT, which the image
        // no longer uses (the old batmap's header is gone, the locators there are staged, the
        // blocks there moved).
        let new_batmap = match (&plan.batmap, old_batmap) {
            (Some(b), Some((bmh, map))) => Some(self.write_batmap(journal, b, bmh, map)?),
            _ => None,
        };
        for l in &plan.locators {
            self.copy_journaled(journal, l.current(), l.to, l.len)?;
        }
        self.barrier()?;
        if stop(Step::Metadata) {
            return Ok(false);
        }
        // Header: its entries, and the locators at their new places.
        // CAST: at most `MAX_BLOCKS`.
        crate::vhd::put32(&mut hb, 28, blocks as u32);
        let mut locators = header.locators;
        for l in &plan.locators {
            locators[l.index].data_offset = l.to;
            crate::vhd::put64(&mut hb, 576 + 24 * l.index + 16, l.to);
        }
        seal(&mut hb);
        self.write_journaled(journal, data_offset, &hb)?;
        self.barrier()?;
        if stop(Step::Header) {
            return Ok(false);
        }
        // Footer, then its copy.
        let footer = self.grown_footer(size);
        let fb = footer.to_bytes();
        self.write_journaled(journal, footer_offset, &fb)?;
        self.barrier()?;
        if stop(Step::Footer) {
            return Ok(false);
        }
        self.write_journaled(journal, 0, &fb)?;
        self.barrier()?;
        if stop(Step::FooterCopy) {
            return Ok(false);
        }
        bat.resize(blocks as usize, UNALLOCATED);
        self.bat = bat;
        self.footer = footer;
        self.footer_offset = footer_offset;
        if let Some(h) = self.header.as_mut() {
            h.max_table_entries = blocks as u32;
            h.locators = locators;
        }
        self.batmap = new_batmap;
        Ok(true)
    }

    /// The old batmap's header sector and the grown map's bytes: the old map's bits for the
    /// disk's blocks (it has a bit for each of the BAT's entries), clear for the others and the
    /// new ones.
    fn read_old_batmap(&self, b: &NewBatmap) -> Result<([u8; 512], Vec<u8>), VhdError> {
        let mut header = [0u8; 512];
        read_exact(&self.file, &self.path, &mut header, b.old_header)?;
        // CAST: at most `MAX_BLOCKS` bits, 2 MiB.
        let mut map = vec![0u8; b.bytes as usize];
        let have = self.bat.len();
        read_exact(
            &self.file,
            &self.path,
            &mut map[..have.div_ceil(8)],
            b.old.offset,
        )?;
        if !have.is_multiple_of(8) {
            map[have / 8] &= !(0xffu8 >> (have % 8));
        }
        Ok((header, map))
    }

    /// Writes the batmap `b` at its new place: the `map` and its header (the old one's sector
    /// `header` with the new offset, size and checksum).
    fn write_batmap(
        &mut self,
        journal: &Journal,
        b: &NewBatmap,
        mut header: [u8; 512],
        map: Vec<u8>,
    ) -> Result<Batmap, VhdError> {
        let sum = crate::vhd::batmap_checksum(&map, b.old.version);
        crate::vhd::put64(&mut header, 8, b.map);
        // CAST: at most 4096 sectors.
        crate::vhd::put32(&mut header, 16, (b.bytes / 512) as u32);
        crate::vhd::put32(&mut header, 24, sum);
        self.write_journaled(journal, b.map, &map)?;
        self.write_journaled(journal, b.header, &header)?;
        Ok(Batmap {
            offset: b.map,
            bytes: b.bytes,
            version: b.old.version,
            problem: None,
        })
    }
}

/// Sets the checksum of header bytes `hb`.
fn seal(hb: &mut [u8; HEADER_SIZE]) {
    crate::vhd::put32(hb, 36, 0);
    let sum = crate::vhd::checksum(hb);
    crate::vhd::put32(hb, 36, sum);
}
