//! One VHD file, opened and checked: its footer, dynamic header and BAT, the sector bitmaps of
//! its blocks, reads of what it holds and allocating writes.
//!
//! A block (dynamic and differencing disks) is its sector bitmap (one bit per sector, most
//! significant bit first, padded to whole sectors) followed by its data. A sector whose bit is
//! clear is not in this image: it reads as the parent's (or zeros without a parent).
//!
//! # Crash safety of writes
//!
//! A write to an unallocated block allocates it at the end of the data, where the trailing
//! footer was: first the footer is written at the new end (after where the block goes), then
//! the block (bitmap, data, zeros for the rest) over the old footer; `fdatasync`; then the
//! block's BAT entry. Killed before the BAT write (even in the middle of the block's write,
//! which a kill can cut short), the file ends with a valid footer and holds an unreferenced
//! block; after it, the block is complete. Sector-sized writes (footer, bitmap, BAT entry) are
//! never cut. A write into an allocated block whose bitmap lacks some of its
//! sectors writes the data, `fdatasync`s, and then sets the bits. BAT and bitmap writes are made
//! durable by the next flush (or at once for FUA writes).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::footer::{DiskType, Footer, FOOTER_SIZE};
use super::header::{Header, Locator, HEADER_SIZE};
use super::shared::LeafState;
use super::{VhdError, UNALLOCATED};
use crate::mapping::AlignedBuf;

mod grow;
mod reserve;
mod tail;

#[cfg(test)]
pub(crate) use grow::Step;

/// Where a run of the virtual disk is: in this image at a file offset, or not here.
pub type Run = (u64, Option<u64>);

/// A VHD file.
#[derive(Debug)]
pub struct VhdImage {
    path: PathBuf,
    file: File,
    /// The file opened again with `O_DIRECT`, for this thread's aligned data writes, once the
    /// loop shares the leaf (see `write_data`); None where the file system refuses it.
    direct: Option<File>,
    writable: bool,
    footer: Footer,
    header: Option<Header>,
    /// One entry per block of the virtual size.
    bat: Vec<u32>,
    /// Where the trailing footer is, the end of everything else.
    footer_offset: u64,
    bitmap_bytes: u64,
    block_size: u64,
    bitmaps: HashMap<u32, Vec<u8>>,
    /// XenServer's batmap, where there is one.
    batmap: Option<Batmap>,
    /// Writes since the last `fdatasync`.
    dirty: bool,
    /// What the event loop is told of this leaf (see [`LeafState`]), once asked for.
    shared: Option<Arc<LeafState>>,
}

fn read_exact(file: &File, path: &Path, buf: &mut [u8], at: u64) -> Result<(), VhdError> {
    file.read_exact_at(buf, at)
        .map_err(|e| VhdError::io("cannot read", path, e))
}

fn end_of(path: &Path, what: &'static str, at: u64, len: u64) -> Result<u64, VhdError> {
    at.checked_add(len)
        .ok_or_else(|| VhdError::invalid(path, format!("{what}: offset {at:#x} overflows")))
}

impl VhdImage {
    /// Opens and checks the VHD at `path` (writable or not).
    pub fn open(path: &Path, writable: bool) -> Result<Self, VhdError> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| VhdError::io("cannot open", path, e))?;
        let file_len = file
            .metadata()
            .map_err(|e| VhdError::io("cannot stat", path, e))?
            .len();
        if file_len < FOOTER_SIZE as u64 {
            return Err(VhdError::Truncated {
                path: path.into(),
                what: "footer",
                need: FOOTER_SIZE as u64,
                len: file_len,
            });
        }
        let footer_offset = file_len - FOOTER_SIZE as u64;
        let mut fb = [0u8; FOOTER_SIZE];
        read_exact(&file, path, &mut fb, footer_offset)?;
        let footer = Footer::parse(path, &fb)?;
        let mut image = VhdImage {
            path: path.into(),
            file,
            direct: None,
            writable,
            footer,
            header: None,
            bat: Vec::new(),
            footer_offset,
            bitmap_bytes: 0,
            block_size: 0,
            bitmaps: HashMap::new(),
            batmap: None,
            dirty: false,
            shared: None,
        };
        if image.footer.disk_type == DiskType::Fixed {
            if image.footer.current_size > footer_offset {
                return Err(VhdError::Truncated {
                    path: path.into(),
                    what: "fixed disk data",
                    need: image.footer.current_size + FOOTER_SIZE as u64,
                    len: file_len,
                });
            }
            return Ok(image);
        }
        image.load_dynamic(file_len)?;
        Ok(image)
    }

    fn load_dynamic(&mut self, file_len: u64) -> Result<(), VhdError> {
        let path = self.path.clone();
        let path = path.as_path();
        let data_offset = self.footer.data_offset;
        let header_end = end_of(path, "dynamic header", data_offset, HEADER_SIZE as u64)?;
        if data_offset < FOOTER_SIZE as u64 || header_end > self.footer_offset {
            return Err(VhdError::Truncated {
                path: path.into(),
                what: "dynamic header",
                need: header_end.saturating_add(FOOTER_SIZE as u64),
                len: file_len,
            });
        }
        let mut hb = [0u8; HEADER_SIZE];
        read_exact(&self.file, path, &mut hb, data_offset)?;
        let header = Header::parse(path, &hb)?;
        let block_size = u64::from(header.block_size);
        let blocks = self.footer.current_size.div_ceil(block_size);
        if blocks > super::MAX_BLOCKS {
            return Err(VhdError::invalid(
                path,
                format!(
                    "a disk of {} bytes in blocks of {block_size} needs {blocks} blocks, more than {}",
                    self.footer.current_size,
                    super::MAX_BLOCKS
                ),
            ));
        }
        if blocks > u64::from(header.max_table_entries) {
            return Err(VhdError::invalid(
                path,
                format!(
                    "BAT has {} entries, a disk of {} bytes needs {blocks}",
                    header.max_table_entries, self.footer.current_size
                ),
            ));
        }
        let bat_bytes = (u64::from(header.max_table_entries) * 4).next_multiple_of(512);
        let bat_end = end_of(path, "BAT", header.table_offset, bat_bytes)?;
        if bat_end > self.footer_offset {
            return Err(VhdError::Truncated {
                path: path.into(),
                what: "BAT",
                need: bat_end.saturating_add(FOOTER_SIZE as u64),
                len: file_len,
            });
        }
        let mut metadata = vec![
            (0, FOOTER_SIZE as u64),
            (data_offset, header_end),
            (header.table_offset, bat_end),
        ];
        if overlaps(header.table_offset, bat_end, data_offset, header_end)
            || header.table_offset < FOOTER_SIZE as u64
        {
            return Err(VhdError::invalid(
                path,
                format!(
                    "BAT at {:#x} overlaps the header or footer copy",
                    header.table_offset
                ),
            ));
        }
        for l in header.locators.iter().filter(|l| l.code != 0) {
            let end = l.data_offset.saturating_add(l.reserved_bytes());
            if end <= self.footer_offset {
                metadata.push((l.data_offset, end));
            }
        }
        self.batmap = self.find_batmap(path, &header, bat_end);
        if let Some(b) = &self.batmap {
            metadata.push((bat_end, bat_end + 512));
            metadata.push((b.offset, b.offset + b.bytes));
        }
        let mut raw = vec![0u8; (blocks * 4) as usize];
        read_exact(&self.file, path, &mut raw, header.table_offset)?;
        let bat: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let bitmap_bytes = header.bitmap_bytes();
        let mut extents = Vec::new();
        for (block, &sector) in bat.iter().enumerate() {
            if sector == UNALLOCATED {
                continue;
            }
            let bad = |detail| VhdError::BadBat {
                path: path.into(),
                block: block as u32,
                sector,
                detail,
            };
            let start = u64::from(sector) * 512;
            let end = start + bitmap_bytes + block_size;
            if end > self.footer_offset {
                return Err(bad("points past the end of the file"));
            }
            if metadata.iter().any(|&(a, b)| overlaps(start, end, a, b)) {
                return Err(bad("points into the image's metadata"));
            }
            extents.push((start, end, block));
        }
        extents.sort_unstable();
        for w in extents.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(VhdError::BadBat {
                    path: path.into(),
                    block: w[1].2 as u32,
                    sector: bat[w[1].2],
                    detail: "overlaps another block",
                });
            }
        }
        self.bat = bat;
        self.block_size = block_size;
        self.bitmap_bytes = bitmap_bytes;
        self.header = Some(header);
        Ok(())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The footer.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    /// The dynamic header (none for a fixed disk).
    pub fn header(&self) -> Option<&Header> {
        self.header.as_ref()
    }

    /// The BAT (one entry per block; empty for a fixed disk).
    pub fn bat(&self) -> &[u32] {
        &self.bat
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.footer.current_size
    }

    /// Bytes of the file up to the end of the trailing footer.
    pub fn physical_size(&self) -> u64 {
        self.footer_offset + FOOTER_SIZE as u64
    }

    /// Bytes of data in a block (0 for a fixed disk).
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Whether it is a differencing disk.
    pub fn has_parent(&self) -> bool {
        self.footer.disk_type == DiskType::Differencing
    }

    /// Reads the bytes of locator `l`, if they lie inside the file and are of a sane length.
    pub fn locator_data(&self, l: &Locator) -> Option<Vec<u8>> {
        l.read_data(&self.file, self.footer_offset)
    }

    /// The sector bitmap of allocated block `block`.
    pub fn bitmap(&mut self, block: u32) -> Result<&[u8], VhdError> {
        let sector = self.bat[block as usize];
        if !self.bitmaps.contains_key(&block) {
            let mut b = vec![0u8; self.bitmap_bytes as usize];
            read_exact(&self.file, &self.path, &mut b, u64::from(sector) * 512)?;
            let full = self.full(&b);
            self.bitmaps.insert(block, b);
            if full {
                // The read cached the bitmap's page and what readahead took of the data: the
                // loop does the block with `O_DIRECT` from now on (see `drop_pages`). From the
                // bitmap's page on: the page cache keeps large folios, and one that begins
                // before the data would be kept whole if the range cut through it.
                let base = u64::from(sector) * 512;
                let from = base - base % 4096;
                self.drop_pages(from, base + self.bitmap_bytes + self.block_size - from);
                self.tell_present(block);
            }
        }
        Ok(self.bitmaps.get(&block).map_or(&[][..], |b| &b[..]))
    }

    /// Shares what the event loop may know of this image (the leaf of a served chain): its
    /// wholly present blocks as they become known, its allocated blocks, its flushes.
    pub fn share(&mut self) -> Arc<LeafState> {
        if let Some(s) = &self.shared {
            return Arc::clone(s);
        }
        let s = Arc::new(if self.header.is_none() {
            LeafState::fixed(self.size())
        } else {
            LeafState::dynamic(
                self.size(),
                self.block_size,
                self.bat.iter().map(|&e| e != UNALLOCATED),
            )
        });
        self.shared = Some(Arc::clone(&s));
        if self.writable {
            self.direct = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&self.path)
                .ok();
        }
        // What opening read (footer, header, BAT) is clean: out of the page cache with it.
        self.drop_pages(0, 0);
        s
    }

    /// Drops the clean page-cache pages of `[at, at + len)` of the file (`len` 0: to its end),
    /// where the loop shares the leaf. The loop's `O_DIRECT` writes cost a fifth more while the
    /// file has any page cached at all (the kernel then looks for pages to invalidate around
    /// every one of them; measured with `aio:` on a raw file with one page cached, 29.9k against
    /// 36.4k IOPS), and this thread reads and writes its metadata (footer, header, BAT, bitmaps)
    /// through the page cache ([`crate::backend::drop_clean_pages`]).
    fn drop_pages(&self, at: u64, len: u64) {
        if self.shared.is_none() {
            return;
        }
        crate::backend::drop_clean_pages(self.file.as_fd(), at, len);
    }

    /// Whether `bitmap` marks every sector of a block.
    fn full(&self, bitmap: &[u8]) -> bool {
        (0..self.block_size / 512).all(|s| bit(bitmap, s))
    }

    /// Tells the loop that allocated block `block` is wholly here now.
    fn tell_present(&self, block: u32) {
        if let Some(s) = &self.shared {
            let data = u64::from(self.bat[block as usize]) * 512 + self.bitmap_bytes;
            s.set_present(block, data);
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), VhdError> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size && offset.is_multiple_of(512) && len.is_multiple_of(512) => {
                Ok(())
            }
            _ => Err(VhdError::OutOfRange { offset, len, size }),
        }
    }

    /// Where `[offset, offset + len)` of the virtual disk is: runs in order, each in this file
    /// (at a byte offset) or not here. Offsets and lengths are whole sectors.
    pub fn map(&mut self, offset: u64, len: u64) -> Result<Vec<Run>, VhdError> {
        self.check_range(offset, len)?;
        let mut runs: Vec<Run> = Vec::new();
        let mut push = |n: u64, at: Option<u64>| {
            if let Some(last) = runs.last_mut() {
                let joins = match (last.1, at) {
                    (None, None) => true,
                    (Some(a), Some(b)) => a + last.0 == b,
                    _ => false,
                };
                if joins {
                    last.0 += n;
                    return;
                }
            }
            runs.push((n, at));
        };
        if self.header.is_none() {
            push(len, Some(offset));
            return Ok(runs);
        }
        let bm = self.bitmap_bytes;
        for (block, within, n) in pieces(offset, len, self.block_size) {
            let sector = self.bat[block as usize];
            if sector == UNALLOCATED {
                push(n, None);
            } else {
                let data = u64::from(sector) * 512 + bm;
                let bitmap = self.bitmap(block)?;
                let first = within / 512;
                let count = n / 512;
                let mut s = first;
                while s < first + count {
                    let here = bit(bitmap, s);
                    let mut t = s + 1;
                    while t < first + count && bit(bitmap, t) == here {
                        t += 1;
                    }
                    push((t - s) * 512, here.then_some(data + s * 512));
                    s = t;
                }
            }
        }
        Ok(runs)
    }

    /// Reads `buf.len()` bytes of the file at `at`.
    pub fn read_file(&self, at: u64, buf: &mut [u8]) -> Result<(), VhdError> {
        read_exact(&self.file, &self.path, buf, at)
    }

    fn write_file(&mut self, at: u64, buf: &[u8]) -> Result<(), VhdError> {
        self.dirty = true;
        self.file
            .write_all_at(buf, at)
            .map_err(|e| VhdError::io("cannot write", &self.path, e))
    }

    /// Writes block data at `at`: with `O_DIRECT` where the leaf is shared with the loop and
    /// `buf` and `at` are page-aligned, else through the page cache. The loop reads and writes
    /// whole blocks with `O_DIRECT`; pages this thread left in the page cache would cost memory
    /// twice over, and every direct write over one has to invalidate it first, which io_uring
    /// cannot do without blocking (such writes went to a kernel worker thread: a fifth slower
    /// in the bench). `fdatasync` of `self.file` covers both ways (one inode).
    fn write_data(&mut self, at: u64, buf: &[u8]) -> Result<(), VhdError> {
        let aligned = |x: u64| x.is_multiple_of(4096);
        if let Some(direct) = &self.direct {
            if aligned(at) && aligned(buf.len() as u64) && aligned(buf.as_ptr() as u64) {
                match direct.write_all_at(buf, at) {
                    Ok(()) => {
                        self.dirty = true;
                        return Ok(());
                    }
                    // Refused for alignment after all (say, larger sectors): buffered below.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                    Err(e) => return Err(VhdError::io("cannot write", &self.path, e)),
                }
            }
        }
        self.write_file(at, buf)
    }

    fn barrier(&mut self) -> Result<(), VhdError> {
        self.dirty = false;
        self.file
            .sync_data()
            .map_err(|e| VhdError::io("cannot sync", &self.path, e))?;
        // Everything is clean now: the whole file's pages go (see `drop_pages`). This covers
        // the blocks an allocation or a write makes whole, which follow a barrier.
        self.drop_pages(0, 0);
        Ok(())
    }

    /// Makes every write so far durable (the event loop's too: see [`LeafState`]).
    pub fn flush(&mut self) -> Result<(), VhdError> {
        let loop_wrote = self.shared.as_ref().is_some_and(|s| s.take_written());
        if self.dirty || loop_wrote {
            self.barrier()?;
        }
        Ok(())
    }

    /// Writes `data` at `offset` of the virtual disk, allocating blocks as needed.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), VhdError> {
        if !self.writable {
            return Err(VhdError::ReadOnly {
                path: self.path.clone(),
            });
        }
        self.check_range(offset, data.len() as u64)?;
        if self.header.is_none() {
            return self.write_file(offset, data);
        }
        if let Some(s) = &self.shared {
            // Before any byte is written (so before the write completes): the loop stops
            // reading these blocks from the leaf's and the parents' runs it was told.
            for (block, _, _) in pieces(offset, data.len() as u64, self.block_size) {
                s.revoke_sources(block);
            }
        }
        let mut done = 0usize;
        for (block, within, n) in pieces(offset, data.len() as u64, self.block_size) {
            // CAST: `n` is at most `data.len()`.
            let part = &data[done..done + n as usize];
            if self.bat[block as usize] == UNALLOCATED {
                self.allocate(block, within, part)?;
            } else {
                self.write_allocated(block, within, part)?;
            }
            done += n as usize;
        }
        Ok(())
    }

    fn write_allocated(&mut self, block: u32, within: u64, part: &[u8]) -> Result<(), VhdError> {
        let sector = self.bat[block as usize];
        let base = u64::from(sector) * 512;
        self.write_data(base + self.bitmap_bytes + within, part)?;
        let (first, count) = (within / 512, part.len() as u64 / 512);
        let bitmap = self.bitmap(block)?;
        if (first..first + count).all(|s| bit(bitmap, s)) {
            return Ok(());
        }
        let mut bitmap = bitmap.to_vec();
        for s in first..first + count {
            set_bit(&mut bitmap, s);
        }
        // The data is on disk before a bitmap says it is there.
        self.barrier()?;
        self.write_file(base, &bitmap)?;
        let full = self.full(&bitmap);
        self.bitmaps.insert(block, bitmap);
        if full {
            // The bitmap is not durable yet: it is by the next flush, which any write the loop
            // does here needs to be durable too (the loop sends FUA writes to this thread).
            self.tell_present(block);
        }
        Ok(())
    }

    /// Where a block placed after byte `end` of the file goes: its start (its bitmap) as a byte
    /// offset and as the BAT entry's sector. The block's data starts on a 4 KiB boundary (its
    /// bitmap just before): a 4 KiB write of the guest is one page of the file, and O_DIRECT
    /// on 4 KiB-sector storage works. The gap after `end` is referenced by nothing.
    fn place_after(&self, end: u64) -> Result<(u64, u32), VhdError> {
        let start = (end + self.bitmap_bytes).next_multiple_of(4096) - self.bitmap_bytes;
        let sector = u32::try_from(start / 512)
            .ok()
            .filter(|&s| s != UNALLOCATED)
            .ok_or_else(|| {
                VhdError::invalid(&self.path, "the BAT cannot address a block this far")
            })?;
        Ok((start, sector))
    }

    fn allocate(&mut self, block: u32, within: u64, part: &[u8]) -> Result<(), VhdError> {
        let (start, sector) = self.place_after(self.footer_offset)?;
        let (bm, bs) = (self.bitmap_bytes as usize, self.block_size as usize);
        let mut bitmap = vec![0u8; bm];
        let (first, count) = if self.has_parent() {
            (within / 512, part.len() as u64 / 512)
        } else {
            // Without a parent the whole block is defined: zeros around the data.
            (0, self.block_size / 512)
        };
        for s in first..first + count {
            set_bit(&mut bitmap, s);
        }
        // The data in a page-aligned buffer, for `write_data`.
        let mut data = AlignedBuf::zeroed(bs);
        let at = within as usize;
        data.as_mut_slice()[at..at + part.len()].copy_from_slice(part);
        let end = start + (bm + bs) as u64;
        // The footer moves first, to the new end: the file always ends with a valid footer,
        // even if the block's writes below are cut short (a kill interrupts a large write).
        self.write_file(end, &self.footer.to_bytes())?;
        self.footer_offset = end;
        self.write_file(start, &bitmap)?;
        self.write_data(start + bm as u64, data.as_slice())?;
        // Block and footer are on disk before the BAT points at the block.
        self.barrier()?;
        let entry_at = self.header.as_ref().map_or(0, |h| h.table_offset) + u64::from(block) * 4;
        self.write_file(entry_at, &sector.to_be_bytes())?;
        self.bat[block as usize] = sector;
        let full = self.full(&bitmap);
        self.bitmaps.insert(block, bitmap);
        if let Some(s) = &self.shared {
            s.set_allocated(block, true);
        }
        if full {
            // The BAT entry is durable by the next flush, as the loop's writes into the block
            // are (the loop sends FUA writes to this thread).
            self.tell_present(block);
        }
        Ok(())
    }

    /// Whether [`VhdImage::discard`] is possible: a fixed or dynamic disk (in a differencing disk
    /// a forgotten sector would read as its parent's, not as zeros) without a batmap (whose bit
    /// for an unallocated block would go stale).
    pub fn can_discard(&self) -> bool {
        !self.has_parent() && self.batmap.is_none()
    }

    /// XenServer's batmap, where there is one.
    pub fn batmap(&self) -> Option<&Batmap> {
        self.batmap.as_ref()
    }

    /// The batmap of an image made by XenServer's tools (creator `tap`, version 1.2 or later):
    /// its header right after the BAT, cookie `tdbatmap`. None if absent, or if its header or
    /// bitmap lie outside the file (not used for I/O, so a bad one is only reported).
    fn find_batmap(&self, path: &Path, header: &Header, bat_end: u64) -> Option<Batmap> {
        if &self.footer.creator_app[..3] != b"tap" || self.footer.creator_version < 0x0001_0002 {
            return None;
        }
        if bat_end.checked_add(512)? > self.footer_offset {
            return None;
        }
        let mut hb = [0u8; 512];
        self.file.read_exact_at(&mut hb, bat_end).ok()?;
        if &hb[..8] != BATMAP_COOKIE {
            return None;
        }
        let offset = super::be64(&hb, 8);
        let sectors = super::be32(&hb, 16);
        let version = super::be32(&hb, 20);
        let stored = super::be32(&hb, 24);
        let bytes = u64::from(sectors) * 512;
        let mut problem = None;
        let end = offset.checked_add(bytes);
        let mut map = Vec::new();
        if u64::from(header.max_table_entries).div_ceil(8) > bytes {
            problem = Some(format!(
                "{sectors} sectors are too few for the BAT's entries"
            ));
        } else if offset < bat_end + 512
            || !offset.is_multiple_of(512)
            || end.is_none_or(|e| e > self.footer_offset)
        {
            problem = Some(format!("its map at {offset:#x} is outside the metadata"));
        } else {
            map = vec![0u8; bytes as usize];
            if let Err(e) = self.file.read_exact_at(&mut map, offset) {
                problem = Some(e.to_string());
            } else {
                let computed = super::batmap_checksum(&map, version);
                if computed != stored {
                    problem = Some(format!(
                        "checksum {stored:#010x} does not match {computed:#010x}"
                    ));
                }
            }
        }
        if problem.is_none() && version > super::BATMAP_VERSION {
            problem = Some(format!(
                "unsupported version {version:#010x} (XenServer's tools know {:#010x} at most)",
                super::BATMAP_VERSION
            ));
        }
        if problem.is_some() {
            log::warn!("{}: batmap: {problem:?}", path.display());
        }
        Some(Batmap {
            offset: if map.is_empty() { bat_end } else { offset },
            bytes: if map.is_empty() { 0 } else { bytes },
            version,
            problem,
        })
    }

    /// Forgets `[offset, offset + len)`: it reads back as zeros. Whole blocks of a dynamic disk
    /// are unallocated (their BAT entry cleared and made durable, then their space punched out
    /// of the file); parts of blocks, and ranges of a fixed disk, are punched out (or written
    /// with zeros where the file system has no holes).
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), VhdError> {
        if !self.writable {
            return Err(VhdError::ReadOnly {
                path: self.path.clone(),
            });
        }
        if !self.can_discard() {
            return Err(VhdError::invalid(
                &self.path,
                "discard in a differencing image is not supported",
            ));
        }
        self.check_range(offset, len)?;
        if self.header.is_none() {
            return self.zero_file(offset, len);
        }
        let (bs, bm) = (self.block_size, self.bitmap_bytes);
        for (block, within, n) in pieces(offset, len, bs) {
            let sector = self.bat[block as usize];
            if sector != UNALLOCATED {
                let start = u64::from(sector) * 512;
                if n == bs {
                    // The BAT forgets the block before its space goes: a crash in between
                    // leaves an unreferenced block (or, the other way round after a power
                    // loss, a hole whose zero bitmap says "not here": zeros all the same).
                    let entry_at =
                        self.header.as_ref().map_or(0, |h| h.table_offset) + u64::from(block) * 4;
                    if let Some(s) = &self.shared {
                        s.clear_present(block);
                    }
                    self.write_file(entry_at, &UNALLOCATED.to_be_bytes())?;
                    self.barrier()?;
                    if let Some(s) = &self.shared {
                        s.set_allocated(block, false);
                    }
                    self.bat[block as usize] = UNALLOCATED;
                    self.bitmaps.remove(&block);
                    let _ = self.punch(start, bm + bs);
                } else {
                    self.zero_file(start + bm + within, n)?;
                }
            }
        }
        Ok(())
    }

    fn punch(&mut self, at: u64, len: u64) -> Result<(), nix::errno::Errno> {
        use nix::fcntl::{fallocate, FallocateFlags};
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let at = i64::try_from(at).map_err(|_| nix::errno::Errno::EINVAL)?;
        let len = i64::try_from(len).map_err(|_| nix::errno::Errno::EINVAL)?;
        self.dirty = true;
        fallocate(&self.file, flags, at, len)
    }

    /// Makes `[at, at + len)` of the file read as zeros.
    fn zero_file(&mut self, at: u64, len: u64) -> Result<(), VhdError> {
        if self.punch(at, len).is_ok() {
            return Ok(());
        }
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.write_file(at + done, &chunk[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    /// Rewrites the footer (at the end, and its copy at offset 0 for dynamic disks) with
    /// `hidden`, durably.
    pub fn set_hidden(&mut self, hidden: u8) -> Result<(), VhdError> {
        if !self.writable {
            return Err(VhdError::ReadOnly {
                path: self.path.clone(),
            });
        }
        self.footer.hidden = hidden;
        let b = self.footer.to_bytes();
        self.write_file(self.footer_offset, &b)?;
        if self.header.is_some() {
            self.write_file(0, &b)?;
        }
        self.barrier()
    }

    /// Grows the virtual disk to `size` bytes (a multiple of 512, not smaller than it is), as
    /// a disk is resized after its snapshot: the new sectors are unallocated (in a differencing
    /// disk they read as its parent's, or zeros past the parent's end). Only a dynamic or
    /// differencing disk whose BAT has room (its `max_table_entries`, or the rest of the BAT's
    /// last sector: `vhd-util create -S` makes room) grows here; the BAT is never moved (see
    /// [`VhdImage::resize`] for growing past the room).
    ///
    /// Crash-safe order: the new BAT entries (`0xFFFFFFFF`) and the header's
    /// `max_table_entries`, durable; then the trailing footer with the new size, durable; then
    /// its copy at offset 0. A crash leaves the old size, or the new one with a stale copy that
    /// `check` reports and `repair` rewrites.
    pub fn grow(&mut self, size: u64) -> Result<(), VhdError> {
        let Some((header, blocks)) = self.growth(size)? else {
            return Ok(());
        };
        let (bs, entries) = (self.block_size, u64::from(header.max_table_entries));
        let room = Self::room(&header);
        if blocks > room {
            return Err(VhdError::invalid(
                &self.path,
                format!(
                    "its BAT has room for {room} blocks of {bs} bytes ({} bytes); {size} bytes need {blocks} (make room with create -S, or resize with a journal)",
                    room.saturating_mul(bs)
                ),
            ));
        }
        let have = self.bat.len() as u64;
        if blocks > have {
            self.refuse_used_tail(&header, blocks)?;
            self.refuse_full_bits(have, blocks)?;
            if let Some(b) = self.batmap.as_ref().filter(|b| blocks > b.bytes * 8) {
                return Err(VhdError::invalid(
                    &self.path,
                    format!(
                        "its batmap of {} bytes has no bit for block {}",
                        b.bytes,
                        blocks - 1
                    ),
                ));
            }
            let at = header.table_offset + have * 4;
            let raw = vec![0xffu8; ((blocks - have) * 4) as usize];
            self.write_file(at, &raw)?;
        }
        if blocks > entries {
            let mut hb = [0u8; HEADER_SIZE];
            let at = self.footer.data_offset;
            read_exact(&self.file, &self.path, &mut hb, at)?;
            // CAST: `blocks` is at most `room`, below 2^30.
            super::put32(&mut hb, 28, blocks as u32);
            super::put32(&mut hb, 36, 0);
            let sum = super::checksum(&hb);
            super::put32(&mut hb, 36, sum);
            self.write_file(at, &hb)?;
            if let Some(h) = self.header.as_mut() {
                h.max_table_entries = blocks as u32;
            }
        }
        self.barrier()?;
        let footer = self.grown_footer(size);
        let b = footer.to_bytes();
        self.write_file(self.footer_offset, &b)?;
        self.barrier()?;
        self.write_file(0, &b)?;
        self.barrier()?;
        // CAST: `blocks` is at most `MAX_BLOCKS`.
        self.bat.resize(blocks as usize, UNALLOCATED);
        self.footer = footer;
        Ok(())
    }

    /// Grows the virtual disk to `size` bytes as [`VhdImage::grow`] does, and past the BAT's
    /// room too, as XenServer's `vhd-util resize` does, under the journal `journal`
    /// ([`super::journal`]), which must not exist (it would be the trace of a resize cut short:
    /// `vhd-util revert` undoes it). The result is laid out as the original lays it out: the BAT
    /// grown in place; a XenServer batmap's header right after it and its map (grown to a bit per
    /// block, the new bits clear) right after that; the data of the parent locators after the
    /// BAT right after those, in file order, each in its reserved space (whole sectors); the
    /// blocks in the way of this metadata moved to the end of the file. Every block then starts
    /// after the end of the metadata, which XenServer's `vhd-util check` requires.
    ///
    /// Crash-safe order, each step durable: the journal (the original length, UUID and bytes of
    /// every region of the image the resize overwrites); the old footer at the new end and the
    /// copies of the blocks in the way past the old end; their BAT entries repointed; the
    /// locators whose places the grown BAT or the new metadata take copied to a staging space
    /// (the first space after the new metadata clear of the old, where no block is left); the
    /// header's locators pointed at those copies; the grown BAT over the old places (it covers
    /// the old batmap's header: until the header counts the new entries the image has no
    /// batmap, and reads the same); the new batmap's map and header and the locators' data at
    /// their new places; the header's `max_table_entries` and locator offsets, in one write; the
    /// trailing footer with the new size; its copy at offset 0; the journal removed. Every state
    /// before the last is a valid image (the old size until the trailing footer is written)
    /// that `check` finds valid but for the journal (and the stale footer copy before the last
    /// step), and the journal restores the old one byte for byte. A failure on the way reverts
    /// from the journal at once.
    pub fn resize(&mut self, size: u64, journal: &Path) -> Result<(), VhdError> {
        self.resize_stopping(size, journal, None)
    }

    /// [`VhdImage::resize`], stopping (as if the process died) after step `stop_after`.
    pub(crate) fn resize_stopping(
        &mut self,
        size: u64,
        journal: &Path,
        stop_after: Option<grow::Step>,
    ) -> Result<(), VhdError> {
        super::journal::refuse_existing(&self.path, journal)?;
        let Some((header, blocks)) = self.growth(size)? else {
            return Ok(());
        };
        if blocks <= Self::room(&header) {
            return self.grow(size);
        }
        self.grow_moving(size, journal, &header, blocks, stop_after)
    }

    /// Checks that the disk can grow to `size` bytes: none if that is its size, else its header
    /// and the blocks `size` needs.
    fn growth(&self, size: u64) -> Result<Option<(Header, u64)>, VhdError> {
        if !self.writable {
            return Err(VhdError::ReadOnly {
                path: self.path.clone(),
            });
        }
        let old = self.size();
        if !size.is_multiple_of(512) || size < old {
            return Err(VhdError::invalid(
                &self.path,
                format!(
                    "cannot resize from {old} to {size} bytes (only growing, in whole sectors)"
                ),
            ));
        }
        if size == old {
            return Ok(None);
        }
        let Some(header) = self.header.clone() else {
            return Err(VhdError::invalid(
                &self.path,
                "a fixed disk cannot be resized",
            ));
        };
        if let Some(problem) = self.batmap.as_ref().and_then(|b| b.problem.as_ref()) {
            return Err(VhdError::invalid(
                &self.path,
                format!("its batmap is invalid ({problem}): not resizing it, as XenServer's vhd-util does not"),
            ));
        }
        let (bs, blocks) = (self.block_size, size.div_ceil(self.block_size));
        if blocks > super::MAX_BLOCKS {
            return Err(VhdError::invalid(
                &self.path,
                format!(
                    "{size} bytes need {blocks} blocks of {bs} bytes, more than {}",
                    super::MAX_BLOCKS
                ),
            ));
        }
        Ok(Some((header, blocks)))
    }

    /// Refuses to grow the disk over blocks `from..to` (not allocated) if the batmap marks one
    /// of them full (XenServer's `vhd-util check` reports such a bit), or has no bit for it (a
    /// map always covers the BAT's room: whole sectors of 4096 bits, the BAT's of 128
    /// entries; a resize past the room grows the map).
    pub(super) fn refuse_full_bits(&self, from: u64, to: u64) -> Result<(), VhdError> {
        let Some(b) = self.batmap.as_ref().filter(|b| b.bytes > 0) else {
            return Ok(());
        };
        let to_bit = to.min(b.bytes * 8);
        // CAST: at most 2 MiB (`MAX_BLOCKS` bits).
        let mut map = vec![0u8; b.bytes as usize];
        read_exact(&self.file, &self.path, &mut map, b.offset)?;
        if let Some(block) = (from..to_bit).find(|&i| bit(&map, i)) {
            return Err(VhdError::invalid(
                &self.path,
                format!(
                    "its batmap marks block {block} full, which is not allocated: not growing over it"
                ),
            ));
        }
        Ok(())
    }

    /// The blocks the BAT's sectors have room for.
    fn room(header: &Header) -> u64 {
        (u64::from(header.max_table_entries) * 4).next_multiple_of(512) / 4
    }

    /// Refuses to grow the disk to `blocks` blocks over BAT entries past its end that are in use
    /// (only entries below `max_table_entries` count: the rest of the BAT's last sector is
    /// padding).
    fn refuse_used_tail(&self, header: &Header, blocks: u64) -> Result<(), VhdError> {
        let have = self.bat.len() as u64;
        let upto = blocks.min(u64::from(header.max_table_entries));
        if upto <= have {
            return Ok(());
        }
        let mut raw = vec![0u8; ((upto - have) * 4) as usize];
        read_exact(
            &self.file,
            &self.path,
            &mut raw,
            header.table_offset + have * 4,
        )?;
        for (i, c) in raw.chunks_exact(4).enumerate() {
            let entry = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
            if entry != UNALLOCATED {
                return Err(VhdError::BadBat {
                    path: self.path.clone(),
                    // CAST: below `max_table_entries`, a `u32`.
                    block: (have + i as u64) as u32,
                    sector: entry,
                    detail: "lies past the disk's end and is in use: not growing over it",
                });
            }
        }
        Ok(())
    }

    /// The footer with the virtual size `size`.
    fn grown_footer(&self, size: u64) -> Footer {
        let mut footer = self.footer.clone();
        footer.current_size = size;
        footer.geometry = super::footer::Geometry::for_size(size);
        footer
    }

    /// The footer copy at offset 0 (dynamic and differencing disks).
    pub fn footer_copy(&self) -> Result<Footer, VhdError> {
        let mut b = [0u8; FOOTER_SIZE];
        self.read_file(0, &mut b)?;
        Footer::parse(&self.path, &b)
    }
}

/// The batmap's cookie.
pub const BATMAP_COOKIE: &[u8; 8] = b"tdbatmap";

/// XenServer's batmap: one bit per block that is fully allocated, after the BAT. This
/// implementation reads it to keep its space out of the blocks' way and to check it; it does not
/// use its bits (it reads the sector bitmaps) and never sets one, which keeps it true: a block it
/// allocates or fills stays marked "not known full".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batmap {
    /// Byte offset of the map.
    pub offset: u64,
    /// Bytes of the map (whole sectors).
    pub bytes: u64,
    /// Its version (1.2 is `0x00010002`).
    pub version: u32,
    /// What is wrong with it, if anything.
    pub problem: Option<String>,
}

/// The pieces of `[offset, offset + len)` within blocks of `bs` bytes, in order: the block, the
/// offset in it and the length of each.
fn pieces(offset: u64, len: u64, bs: u64) -> impl Iterator<Item = (u32, u64, u64)> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let within = pos % bs;
        let n = (bs - within).min(end - pos);
        // CAST: the caller checked the range against the disk, whose blocks are counted in `u32`.
        let piece = ((pos / bs) as u32, within, n);
        pos += n;
        Some(piece)
    })
}

fn overlaps(a0: u64, a1: u64, b0: u64, b1: u64) -> bool {
    a0 < b1 && b0 < a1
}

/// Whether sector `s` is set in `bitmap` (most significant bit first; out of range: clear).
pub fn bit(bitmap: &[u8], s: u64) -> bool {
    bitmap
        .get((s / 8) as usize)
        .is_some_and(|b| b & (0x80 >> (s % 8)) != 0)
}

fn set_bit(bitmap: &mut [u8], s: u64) {
    if let Some(b) = bitmap.get_mut((s / 8) as usize) {
        *b |= 0x80 >> (s % 8);
    }
}
