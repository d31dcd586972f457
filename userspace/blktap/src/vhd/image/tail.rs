//! The file's tail: where an image's metadata and data end, moving its trailing footer to set
//! its physical size (`vhd-util modify -s`), and forgetting every block (`vhd-util modify -z`).

use super::VhdImage;
use crate::vhd::footer::FOOTER_SIZE;
use crate::vhd::header::HEADER_SIZE;
use crate::vhd::{VhdError, UNALLOCATED};

impl VhdImage {
    pub(super) fn refuse_read_only(&self) -> Result<(), VhdError> {
        if self.writable {
            Ok(())
        } else {
            Err(VhdError::ReadOnly {
                path: self.path.clone(),
            })
        }
    }

    /// The end of the BAT's sectors (where a batmap's header is).
    pub(super) fn bat_end(&self) -> u64 {
        self.header.as_ref().map_or(0, |h| {
            h.table_offset + (u64::from(h.max_table_entries) * 4).next_multiple_of(512)
        })
    }

    /// The end of the metadata: the footer copy, the header, the BAT, the batmap and the parent
    /// locators' reserved space (those inside the file), in whole sectors. A fixed disk's is its
    /// virtual size (its data).
    pub fn end_of_metadata(&self) -> u64 {
        let Some(header) = &self.header else {
            return self.footer.current_size;
        };
        let mut end = (FOOTER_SIZE as u64)
            .max(self.footer.data_offset + HEADER_SIZE as u64)
            .max(self.bat_end());
        if let Some(b) = &self.batmap {
            end = end.max(self.bat_end() + 512).max(b.offset + b.bytes);
        }
        for l in header.locators.iter().filter(|l| l.code != 0) {
            let e = l.data_offset.saturating_add(l.reserved_bytes());
            if e <= self.footer_offset {
                end = end.max(e);
            }
        }
        end.next_multiple_of(512)
    }

    /// The end of the metadata and of every allocated block: the least physical size is this and
    /// the footer after it.
    pub fn end_of_data(&self) -> u64 {
        let extent = self.bitmap_bytes + self.block_size;
        self.bat
            .iter()
            .filter(|&&s| s != UNALLOCATED)
            .map(|&s| u64::from(s) * 512 + extent)
            .fold(self.end_of_metadata(), u64::max)
    }

    /// Moves the trailing footer so that the file is `size` bytes long (a multiple of 512, at
    /// least [`VhdImage::end_of_data`] and the footer): the original's "physical size" of an
    /// image, which XenServer sets to pad an image (the footer must end its volume). Refused for
    /// a fixed disk (its footer follows its data).
    ///
    /// Crash-safe order: the footer at its new place, durable; then a longer file's old footer
    /// is zeroed (a stale copy in the middle of the file would only mislead), or a shorter file
    /// is cut after the new footer, durable. A crash between leaves the file ending with a valid
    /// footer either way.
    pub fn set_physical_size(&mut self, size: u64) -> Result<(), VhdError> {
        self.refuse_read_only()?;
        if self.header.is_none() {
            return Err(VhdError::invalid(
                &self.path,
                format!(
                    "is a fixed disk: its physical size is its virtual size and the footer ({} bytes)",
                    self.footer.current_size + FOOTER_SIZE as u64
                ),
            ));
        }
        if !size.is_multiple_of(512) {
            return Err(VhdError::invalid(
                &self.path,
                format!("physical size {size} is not a multiple of 512"),
            ));
        }
        let least = self.end_of_data() + FOOTER_SIZE as u64;
        if size < least {
            return Err(VhdError::invalid(
                &self.path,
                format!(
                    "physical size {size} would cut into its data: its data and footer need {least} bytes"
                ),
            ));
        }
        let old = self.footer_offset;
        let new = size - FOOTER_SIZE as u64;
        if new == old {
            return Ok(());
        }
        let footer = self.footer.to_bytes();
        self.write_file(new, &footer)?;
        self.barrier()?;
        self.footer_offset = new;
        if new > old {
            self.write_file(old, &[0u8; FOOTER_SIZE])?;
        } else {
            self.file
                .set_len(size)
                .map_err(|e| VhdError::io("cannot truncate", &self.path, e))?;
        }
        self.barrier()
    }

    /// Forgets every block of a dynamic or differencing disk (the original's "zero the BAT, kill
    /// the data"): every BAT entry unallocated, so the disk reads as zeros (a differencing one as
    /// its parent), and the file cut after its metadata.
    ///
    /// Crash-safe order: a batmap's map is zeroed and its checksum rewritten, durable (a clear
    /// bit never lies); the BAT's entries, durable; the footer after the metadata, durable; the
    /// file cut after it, durable. A crash on the way leaves a valid image (at worst with blocks
    /// no entry references).
    pub fn zero_bat(&mut self) -> Result<(), VhdError> {
        self.refuse_read_only()?;
        let Some(header) = self.header.clone() else {
            return Err(VhdError::invalid(
                &self.path,
                "is a fixed disk: it has no BAT to zero",
            ));
        };
        if let Some(b) = self.batmap.clone().filter(|b| b.bytes > 0) {
            self.write_file(b.offset, &vec![0u8; b.bytes as usize])?;
            let mut hb = [0u8; 512];
            super::read_exact(&self.file, &self.path, &mut hb, self.bat_end())?;
            let sum = crate::vhd::batmap_checksum(&vec![0u8; b.bytes as usize], b.version);
            crate::vhd::put32(&mut hb, 24, sum);
            self.write_file(self.bat_end(), &hb)?;
            self.barrier()?;
            if let Some(m) = self.batmap.as_mut() {
                m.problem = None;
            }
        }
        // CAST: blocks are counted in `u32` (at most `MAX_BLOCKS`).
        let allocated: Vec<u32> = (0..self.bat.len() as u32)
            .filter(|&b| self.bat[b as usize] != UNALLOCATED)
            .collect();
        if let Some(s) = &self.shared {
            for &block in &allocated {
                s.clear_present(block);
            }
        }
        let entries = vec![0xffu8; header.max_table_entries as usize * 4];
        self.write_file(header.table_offset, &entries)?;
        self.barrier()?;
        if let Some(s) = &self.shared {
            for &block in &allocated {
                s.set_allocated(block, false);
            }
        }
        self.bat.fill(UNALLOCATED);
        self.bitmaps.clear();
        let end = self.end_of_metadata();
        if end != self.footer_offset {
            let footer = self.footer.to_bytes();
            self.write_file(end, &footer)?;
            self.barrier()?;
            self.footer_offset = end;
            self.file
                .set_len(end + FOOTER_SIZE as u64)
                .map_err(|e| VhdError::io("cannot truncate", &self.path, e))?;
            self.barrier()?;
        }
        Ok(())
    }
}
