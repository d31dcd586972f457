//! Growing the BAT past its room ([`VhdImage::resize`]): the blocks and locator data in the
//! grown BAT's way move to the end of the file, under a journal. A XenServer batmap moves with
//! the BAT: its header right after the grown BAT, its map (grown to a bit per block) right
//! after that, as XenServer's vhd-util places them.

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
    /// The old footer is at the new end and the copies of what moves are past the old end.
    Copy,
    /// The moved blocks' BAT entries and the locators' offsets point at the copies (and the
    /// batmap's header at its map's copy, if the map was in the new batmap's way).
    Repoint,
    /// The new batmap (header after the grown BAT's place, map after it) is written; the old one
    /// still serves. Nothing is done here for an image without a batmap.
    Batmap,
    /// The grown BAT is written over the old places.
    Bat,
    /// The header's `max_table_entries` counts the new blocks.
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
    pub(crate) const ALL: [Step; 8] = [
        Step::Journal,
        Step::Copy,
        Step::Repoint,
        Step::Batmap,
        Step::Bat,
        Step::Header,
        Step::Footer,
        Step::FooterCopy,
    ];
}

/// What lies in the grown BAT's way.
#[derive(Debug, Clone, Copy)]
enum Item {
    /// An allocated block (bitmap and data).
    Block(u32),
    /// The data of the parent locator with this index.
    Locator(usize),
    /// The batmap's map.
    Batmap,
}

/// A move: the item, where its bytes are, how many, and where they go.
#[derive(Debug, Clone, Copy)]
struct Move {
    item: Item,
    from: u64,
    len: u64,
    to: u64,
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
    /// What moves, in file order.
    moves: Vec<Move>,
    /// The end of the grown BAT.
    bat_end: u64,
    /// The end of the grown metadata: the BAT, and the batmap after it.
    meta_end: u64,
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
        let meta_end = batmap.as_ref().map_or(bat_end, |b| b.map + b.bytes);
        let header_start = self.footer.data_offset;
        if overlaps(
            bat_start,
            meta_end,
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
        let mut in_way = Vec::new();
        for (block, &sector) in self.bat.iter().enumerate() {
            let from = u64::from(sector) * 512;
            if sector != UNALLOCATED && overlaps(from, from + bm + bs, bat_start, meta_end) {
                // CAST: the BAT has at most `MAX_BLOCKS` entries.
                in_way.push((from, bm + bs, Item::Block(block as u32)));
            }
        }
        for (i, l) in header.locators.iter().enumerate() {
            let len = l.reserved_bytes();
            let end = l.data_offset.saturating_add(len);
            if l.code == 0 || !overlaps(l.data_offset, end, bat_start, meta_end) {
                continue;
            }
            if end > self.footer_offset {
                return Err(VhdError::invalid(
                    path,
                    format!(
                        "parent locator {i} at {:#x} ({len} bytes) lies in the way of the grown BAT and past the end of the file",
                        l.data_offset
                    ),
                ));
            }
            in_way.push((l.data_offset, len, Item::Locator(i)));
        }
        // The old map serves until the grown BAT replaces the old batmap's header: it moves if
        // the new batmap would be written over it (the grown BAT is written over it only
        // when its header goes too).
        if let Some(b) = &batmap {
            let (from, len) = (b.old.offset, b.old.bytes);
            if overlaps(from, from + len, b.header, meta_end) {
                in_way.push((from, len, Item::Batmap));
            }
        }
        in_way.sort_unstable_by_key(|&(from, _, _)| from);
        // Past the old end and the grown metadata; blocks where `allocate` would put them.
        let mut pos = self.footer_offset.max(meta_end).next_multiple_of(512);
        let mut moves = Vec::new();
        for (from, len, item) in in_way {
            let to = match item {
                Item::Block(_) => {
                    let to = (pos + bm).next_multiple_of(4096) - bm;
                    if u32::try_from(to / 512).map_or(true, |s| s == UNALLOCATED) {
                        return Err(VhdError::invalid(
                            path,
                            "the BAT cannot address a block this far",
                        ));
                    }
                    to
                }
                Item::Locator(_) | Item::Batmap => pos,
            };
            moves.push(Move {
                item,
                from,
                len,
                to,
            });
            pos = to + len.next_multiple_of(512);
        }
        Ok(Plan {
            moves,
            bat_end,
            meta_end,
            batmap,
            footer_offset: pos,
        })
    }

    /// The journal of the resize `plan`: the regions of the file it overwrites (the footer copy,
    /// the header, the grown metadata's extent: BAT and batmap, the trailing footer), as they
    /// are.
    fn journal_for(&self, header: &Header, plan: &Plan) -> Result<Journal, VhdError> {
        let len = self.footer_offset + super::FOOTER_SIZE as u64;
        let data_offset = self.footer.data_offset;
        let regions = merge(vec![
            (0, super::FOOTER_SIZE as u64),
            (data_offset, data_offset + HEADER_SIZE as u64),
            (header.table_offset, plan.meta_end.min(len)),
            (self.footer_offset, len),
        ]);
        let mut records = Vec::new();
        for (a, b) in regions {
            // CAST: a region of the metadata, at most the BAT's 64 MiB.
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
        let (moves, footer_offset) = (&plan.moves, plan.footer_offset);
        let stop = |step| stop_after == Some(step);
        // Copy: the file keeps ending with the (old) footer, then the copies go in before it.
        let old_footer = self.footer.to_bytes();
        self.write_journaled(journal, footer_offset, &old_footer)?;
        let mut buf = Vec::new();
        for m in moves {
            let mut done = 0;
            while done < m.len {
                let n = (m.len - done).min(1 << 20);
                // CAST: at most 1 MiB.
                buf.resize(n as usize, 0);
                read_exact(&self.file, &self.path, &mut buf, m.from + done)?;
                self.write_journaled(journal, m.to + done, &buf)?;
                done += n;
            }
        }
        self.barrier()?;
        if stop(Step::Copy) {
            return Ok(false);
        }
        // Repoint: the old BAT's entries and the header's locators, at the copies.
        let data_offset = self.footer.data_offset;
        let mut hb = [0u8; HEADER_SIZE];
        read_exact(&self.file, &self.path, &mut hb, data_offset)?;
        let mut bat = self.bat.clone();
        let mut locators = header.locators;
        for m in moves {
            match m.item {
                Item::Block(block) => {
                    // CAST: `plan` checked that the sector fits.
                    bat[block as usize] = (m.to / 512) as u32;
                }
                Item::Locator(i) => {
                    locators[i].data_offset = m.to;
                    crate::vhd::put64(&mut hb, 576 + 24 * i + 16, m.to);
                }
                Item::Batmap => {}
            }
        }
        let raw: Vec<u8> = bat.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write_journaled(journal, header.table_offset, &raw)?;
        seal(&mut hb);
        self.write_journaled(journal, data_offset, &hb)?;
        // The old batmap's header, at its map's copy (same bytes: its checksum holds).
        let mut old_bmh = [0u8; 512];
        if let Some(b) = &plan.batmap {
            read_exact(&self.file, &self.path, &mut old_bmh, b.old_header)?;
            if let Some(m) = moves.iter().find(|m| matches!(m.item, Item::Batmap)) {
                crate::vhd::put64(&mut old_bmh, 8, m.to);
                self.write_journaled(journal, b.old_header, &old_bmh)?;
            }
        }
        self.barrier()?;
        if stop(Step::Repoint) {
            return Ok(false);
        }
        // Batmap: the new one, after the grown BAT's place (unused by the old image now).
        let new_batmap = match &plan.batmap {
            Some(b) => Some(self.write_batmap(journal, b, old_bmh)?),
            None => None,
        };
        self.barrier()?;
        if stop(Step::Batmap) {
            return Ok(false);
        }
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
        // Header: its entries.
        // CAST: at most `MAX_BLOCKS`.
        crate::vhd::put32(&mut hb, 28, blocks as u32);
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

    /// Writes the batmap `b` at its new place: the map (the old one's bits for the disk's blocks,
    /// clear for the others and the new ones) and its header (the old one's sector `old_header`
    /// with the new offset, size and checksum).
    fn write_batmap(
        &mut self,
        journal: &Journal,
        b: &NewBatmap,
        mut header: [u8; 512],
    ) -> Result<Batmap, VhdError> {
        // CAST: at most `MAX_BLOCKS` bits, 2 MiB.
        let mut map = vec![0u8; b.bytes as usize];
        // The old map's bytes for the disk's blocks (it has a bit for each of the BAT's entries).
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
