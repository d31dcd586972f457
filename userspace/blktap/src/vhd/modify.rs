//! Changing an image in place (`vhd-util modify`): re-parenting a differencing image (`-p`), as
//! Xen's storage manager does after a coalesce, the child's header made to name another parent;
//! setting the physical size (`-s`, [`set_physical_size`]); forgetting every block (`-z`,
//! [`zero_blocks`]).
//!
//! The new parent is recorded as [`super::create::snapshot`] records one: its UUID (zero for a
//! raw parent), the parent timestamp (the parent footer's timestamp, a raw parent's modification
//! time), its file name, and the locators (`W2RU` and `MACX` relative to the child's directory,
//! `W2KU` absolute). Only the locators the header has are rewritten, each in the space it
//! reserves: nothing moves. A locator of another platform (`Wi2r`, `Wi2k`, `Mac `) is left as it
//! is, as the original tool leaves it (this implementation never reads one).
//!
//! Refused, before anything is written: an image that is not differencing; a resize journal
//! beside it; a parent that cannot be found, is not a regular file or block device, or (without
//! `raw`) is not a VHD whose chain opens; a VHD parent larger than the child (a chain that
//! [`super::chain::Chain::open`] refuses; a smaller one is a disk resized after its snapshot, which
//! it accepts); a parent whose chain holds the child (a loop); a chain that would be too long; a
//! header without a `W2RU`, `MACX` or `W2KU` locator; a new locator longer than its entry's space;
//! a locator whose space lies outside the file's metadata area or over other metadata or data.
//!
//! Crash safety: the locators' data first, synced; then the header, one write of its 1024 bytes at
//! its sector-aligned offset, synced. Cut short before the header, the image has the old header
//! (old parent UUID and name) with locators that name the new parent: `check` reports the parent
//! mismatch and running the same `modify` again completes it.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;

use super::create::{locator_texts, parent_link};
use super::footer::FOOTER_SIZE;
use super::header::{encode_locator, HEADER_SIZE, PLAT_MACX, PLAT_W2KU, PLAT_W2RU};
use super::image::VhdImage;
use super::{journal, VhdError, UNALLOCATED};

/// The locator platforms written (and rewritten), by name.
fn platform(code: u32) -> Option<&'static str> {
    match code {
        PLAT_W2RU => Some("W2RU"),
        PLAT_MACX => Some("MACX"),
        PLAT_W2KU => Some("W2KU"),
        _ => None,
    }
}

fn identity(path: &Path) -> Result<(u64, u64), VhdError> {
    let m = std::fs::metadata(path).map_err(|e| VhdError::io("cannot stat", path, e))?;
    Ok((m.dev(), m.ino()))
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Makes the differencing image at `child` name `parent` (a VHD, or a raw file or device when
/// `raw`) as its parent: see the module's documentation for what is written and refused.
pub fn set_parent(child: &Path, parent: &Path, raw: bool) -> Result<(), VhdError> {
    journal::refuse_existing(child, &journal::default_path(child))?;
    let image = VhdImage::open(child, true)?;
    let Some(header) = image.header().filter(|_| image.has_parent()) else {
        return Err(VhdError::invalid(
            child,
            format!(
                "is a {} disk, not a differencing one: it has no parent to set",
                image.footer().disk_type.name()
            ),
        ));
    };
    let meta = std::fs::metadata(parent).map_err(|e| VhdError::io("cannot find", parent, e))?;
    if !meta.is_file() && !meta.file_type().is_block_device() {
        return Err(VhdError::invalid(
            parent,
            "is not a regular file or block device",
        ));
    }
    let link = parent_link(parent, raw)?;
    let me = identity(child)?;
    for p in &link.chain {
        if identity(p)? == me {
            return Err(VhdError::BadChain {
                path: child.into(),
                detail: format!(
                    "would loop: {} is {} or has it among its parents",
                    parent.display(),
                    child.display()
                ),
            });
        }
    }
    if !raw && link.size > image.size() {
        return Err(VhdError::ParentMismatch {
            path: child.into(),
            parent: link.abs,
            detail: format!(
                "virtual size {} is larger than the child's {}",
                link.size,
                image.size()
            ),
        });
    }

    // What may not be written over: the footer copy, the header, the BAT (and the batmap), the
    // blocks, and the trailing footer (everything from its offset on).
    let footer_at = image.physical_size() - FOOTER_SIZE as u64;
    let bat_end =
        header.table_offset + (u64::from(header.max_table_entries) * 4).next_multiple_of(512);
    let mut taken = vec![
        (0, FOOTER_SIZE as u64),
        (
            image.footer().data_offset,
            image.footer().data_offset + HEADER_SIZE as u64,
        ),
        (header.table_offset, bat_end),
    ];
    if let Some(b) = image.batmap() {
        taken.push((bat_end, bat_end + 512));
        taken.push((b.offset, b.offset + b.bytes));
    }
    let extent = header.bitmap_bytes() + u64::from(header.block_size);
    taken.extend(
        image
            .bat()
            .iter()
            .filter(|&&s| s != UNALLOCATED)
            .map(|&s| (u64::from(s) * 512, u64::from(s) * 512 + extent)),
    );

    let texts = locator_texts(child, &link.abs)?;
    let mut new = header.clone();
    new.parent_uuid = link.uuid;
    new.parent_timestamp = link.timestamp;
    new.parent_name = link.name();
    let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
    for (i, l) in new.locators.iter_mut().enumerate() {
        let Some(name) = platform(l.code) else {
            continue;
        };
        let text = texts
            .iter()
            .find(|(code, _)| *code == l.code)
            .map(|(_, t)| t.as_str())
            .unwrap_or_default();
        let data = encode_locator(l.code, text);
        let room = l.reserved_bytes();
        let need = data.len() as u64;
        if need > room {
            return Err(VhdError::invalid(
                child,
                format!(
                    "parent locator {i} ({name}) reserves {room} bytes and the path of {} needs {need}: not rewritten (modify does not move the locators' data)",
                    link.abs.display()
                ),
            ));
        }
        // The data, and zeros to the end of its last sector (within the reserved space).
        let len = need.next_multiple_of(512).min(room);
        let region = (l.data_offset, l.data_offset.saturating_add(len));
        let clash = taken.iter().any(|&t| overlaps(region, t))
            || writes
                .iter()
                .any(|(at, b)| overlaps(region, (*at, at + b.len() as u64)));
        if region.1 > footer_at || clash {
            return Err(VhdError::invalid(
                child,
                format!(
                    "parent locator {i} ({name}): its space at {:#x}..{:#x} is not free metadata space of the file (ends at {footer_at:#x}): not rewritten",
                    region.0, region.1
                ),
            ));
        }
        let mut buf = data;
        buf.resize(len as usize, 0);
        l.data_len = need as u32;
        writes.push((l.data_offset, buf));
    }
    if writes.is_empty() {
        return Err(VhdError::invalid(
            child,
            "has no W2RU, MACX or W2KU parent locator to rewrite (modify adds none)",
        ));
    }
    let header_at = image.footer().data_offset;
    drop(image);

    let file = OpenOptions::new()
        .write(true)
        .open(child)
        .map_err(|e| VhdError::io("cannot open", child, e))?;
    let sync = |what| file.sync_all().map_err(|e| VhdError::io(what, child, e));
    for (at, buf) in &writes {
        file.write_all_at(buf, *at)
            .map_err(|e| VhdError::io("cannot write a parent locator of", child, e))?;
    }
    sync("cannot sync")?;
    // One write of the whole header at its sector-aligned offset.
    file.write_all_at(&new.to_bytes(), header_at)
        .map_err(|e| VhdError::io("cannot write the header of", child, e))?;
    sync("cannot sync")
}

/// Sets the physical size of the dynamic or differencing image at `path` to `size` bytes: its
/// trailing footer moves to end the file there ([`VhdImage::set_physical_size`]). Refused while a
/// resize journal is beside it.
pub fn set_physical_size(path: &Path, size: u64) -> Result<(), VhdError> {
    journal::refuse_existing(path, &journal::default_path(path))?;
    VhdImage::open(path, true)?.set_physical_size(size)
}

/// Forgets every block of the dynamic or differencing image at `path`
/// ([`VhdImage::zero_bat`]). Refused while a resize journal is beside it.
pub fn zero_blocks(path: &Path) -> Result<(), VhdError> {
    journal::refuse_existing(path, &journal::default_path(path))?;
    VhdImage::open(path, true)?.zero_bat()
}
