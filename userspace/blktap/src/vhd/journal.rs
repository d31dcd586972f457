//! The journal of a resize that moves the BAT ([`VhdImage::resize`]): what the image was before,
//! so that a resize cut short (a crash, a kill, a full disk) can be undone with
//! [`revert`] (`vhd-util revert`).
//!
//! It holds the image's length and UUID before the resize and the original bytes of every
//! region of the image (within that length) the resize overwrites: the footer copy, the dynamic
//! header, the extent of the new metadata (the grown BAT, the batmap and the parent locators'
//! data after it) and of the staging space after that (the old BAT, batmap and locators, and the
//! blocks that were in their way) and the old trailing footer.
//! Everything else the resize writes lies past the old end, which reverting cuts off.
//!
//! # Format
//!
//! Big-endian: the magic `vhdjrnl1`; the image's original length (8 bytes); its UUID (16); the
//! number of records (4); each record: offset (8), length (8), the original bytes; then the
//! trailer: `vhdjend1` and an FNV-1a 64 hash (8) of everything before it.
//!
//! # Durability
//!
//! The journal is written to `<journal>.tmp`, `fsync`ed, renamed to its name and the directory
//! `fsync`ed, all before the image is touched: a journal under its name is complete, and a
//! journal whose hash does not match is damaged (reverting refuses it rather than guess).
//!
//! [`VhdImage::resize`]: super::VhdImage::resize

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::footer::{Footer, FOOTER_SIZE};
use super::VhdError;

/// The journal's magic.
pub const JOURNAL_MAGIC: &[u8; 8] = b"vhdjrnl1";
/// The magic of the journal's trailer.
const TRAILER_MAGIC: &[u8; 8] = b"vhdjend1";
/// The most records a journal may hold (a resize writes a handful).
const MAX_RECORDS: u32 = 64;
/// The most bytes a record may hold: the metadata from the footer copy to the end of a grown
/// BAT of `MAX_BLOCKS` entries (64 MiB), the batmap after it (2 MiB of map), the parent
/// locators after that and the staging space after them (the locators again, and an old map);
/// 8 MiB are left for the locators (the most a resize moves: it refuses more).
pub(crate) const MAX_RECORD: u64 = 4 * super::MAX_BLOCKS + super::MAX_BLOCKS / 4 + (8 << 20);

/// What an image was before a resize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journal {
    /// The image's length.
    pub len: u64,
    /// The image's UUID (from its footer).
    pub uuid: [u8; 16],
    /// Offset and original bytes of each region the resize overwrites.
    pub records: Vec<(u64, Vec<u8>)>,
}

/// The journal a resize of `image` uses when none is named: `<image>.journal`.
pub fn default_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".journal");
    PathBuf::from(name)
}

/// Refuses to go on if `journal` exists: a resize of `image` was cut short, and `revert` must
/// undo it first.
pub fn refuse_existing(image: &Path, journal: &Path) -> Result<(), VhdError> {
    if journal.symlink_metadata().is_ok() {
        return Err(VhdError::invalid(
            image,
            format!(
                "journal {} exists: an earlier resize was interrupted; run `vhd-util revert -n {} -j {}` first",
                journal.display(),
                image.display(),
                journal.display()
            ),
        ));
    }
    Ok(())
}

/// FNV-1a, 64 bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Journal {
    /// Its bytes on disk.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(JOURNAL_MAGIC);
        b.extend_from_slice(&self.len.to_be_bytes());
        b.extend_from_slice(&self.uuid);
        // CAST: a resize makes a handful of records.
        b.extend_from_slice(&(self.records.len() as u32).to_be_bytes());
        for (at, bytes) in &self.records {
            b.extend_from_slice(&at.to_be_bytes());
            b.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
            b.extend_from_slice(bytes);
        }
        let hash = fnv1a(&b);
        b.extend_from_slice(TRAILER_MAGIC);
        b.extend_from_slice(&hash.to_be_bytes());
        b
    }

    /// Parses and checks the journal `b` (read from `path`).
    pub fn parse(path: &Path, b: &[u8]) -> Result<Self, VhdError> {
        let bad = |detail: &str| VhdError::invalid(path, format!("journal: {detail}"));
        if b.len() < 8 || &b[..8] != JOURNAL_MAGIC {
            return Err(bad("bad magic (not a vhd-util journal)"));
        }
        if b.len() < 8 + 8 + 16 + 4 + 16 {
            return Err(bad("too short"));
        }
        let body = b.len() - 16;
        if &b[body..body + 8] != TRAILER_MAGIC {
            return Err(bad("no trailer: the journal is damaged"));
        }
        let stored = super::be64(b, body + 8);
        let computed = fnv1a(&b[..body]);
        if stored != computed {
            return Err(bad(&format!(
                "hash {stored:#018x} does not match {computed:#018x}: the journal is damaged"
            )));
        }
        let len = super::be64(b, 8);
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        let count = super::be32(b, 32);
        if count > MAX_RECORDS {
            return Err(bad(&format!("{count} records")));
        }
        let mut at = 36usize;
        let mut records = Vec::new();
        for i in 0..count {
            if at + 16 > body {
                return Err(bad(&format!("record {i} is cut short")));
            }
            let offset = super::be64(b, at);
            let n = super::be64(b, at + 8);
            at += 16;
            if n > MAX_RECORD || at as u64 + n > body as u64 {
                return Err(bad(&format!("record {i} of {n} bytes is cut short")));
            }
            // CAST: below `body`, a `usize`.
            let n = n as usize;
            if offset.checked_add(n as u64).is_none_or(|end| end > len) {
                return Err(bad(&format!(
                    "record {i} at {offset:#x} lies past the image's length {len}"
                )));
            }
            records.push((offset, b[at..at + n].to_vec()));
            at += n;
        }
        if at != body {
            return Err(bad("bytes after the last record"));
        }
        Ok(Journal { len, uuid, records })
    }

    /// Whether `[at, at + len)` lies within the recorded regions (or past the image's length):
    /// whether writing it can be undone.
    pub fn covers(&self, at: u64, len: u64) -> bool {
        let end = at.saturating_add(len);
        let mut pos = at;
        while pos < end && pos < self.len {
            let Some(next) = self
                .records
                .iter()
                .filter(|(o, b)| *o <= pos && pos < o + b.len() as u64)
                .map(|(o, b)| o + b.len() as u64)
                .max()
            else {
                return false;
            };
            pos = next;
        }
        true
    }

    /// Writes the journal at `path` durably (see the module's documentation); refuses if one is
    /// there already.
    pub fn write(&self, image: &Path, path: &Path) -> Result<(), VhdError> {
        refuse_existing(image, path)?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| VhdError::io("cannot create", &tmp, e))?;
        f.write_all(&self.to_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| VhdError::io("cannot write", &tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| VhdError::io("cannot rename", &tmp, e))?;
        sync_dir(path)
    }

    /// Reads and checks the journal at `path`.
    pub fn read(path: &Path) -> Result<Self, VhdError> {
        let b = std::fs::read(path).map_err(|e| VhdError::io("cannot read", path, e))?;
        Journal::parse(path, &b)
    }
}

/// `fsync`s the directory holding `path`, making a file's creation, rename or removal durable.
pub fn sync_dir(path: &Path) -> Result<(), VhdError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| VhdError::io("cannot sync", dir, e))
}

/// Removes the journal at `path`, durably.
pub fn remove(path: &Path) -> Result<(), VhdError> {
    std::fs::remove_file(path).map_err(|e| VhdError::io("cannot remove", path, e))?;
    sync_dir(path)
}

/// Undoes the resize of `image` that `journal` recorded: writes back the original bytes,
/// truncates the image to its original length, makes it durable, then removes the journal.
/// Cut short, it can be run again. Refuses a damaged journal, or one whose UUID is not the
/// image's.
pub fn revert(image: &Path, journal: &Path) -> Result<(), VhdError> {
    let j = Journal::read(journal)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(|e| VhdError::io("cannot open", image, e))?;
    let len = file
        .metadata()
        .map_err(|e| VhdError::io("cannot stat", image, e))?
        .len();
    // The UUID is in the footer copy (a resize rewrites it with the same UUID).
    let mut fb = [0u8; FOOTER_SIZE];
    file.read_exact_at(&mut fb, 0)
        .map_err(|e| VhdError::io("cannot read", image, e))?;
    if let Ok(footer) = Footer::parse(image, &fb) {
        if footer.uuid != j.uuid {
            return Err(VhdError::invalid(
                image,
                format!(
                    "its UUID {} is not the one in the journal {} ({})",
                    super::uuid_string(&footer.uuid),
                    journal.display(),
                    super::uuid_string(&j.uuid)
                ),
            ));
        }
    }
    if len < j.len {
        return Err(VhdError::invalid(
            image,
            format!(
                "is {len} bytes, shorter than the {} the journal {} recorded: not the journal's image?",
                j.len,
                journal.display()
            ),
        ));
    }
    for (at, bytes) in &j.records {
        file.write_all_at(bytes, *at)
            .map_err(|e| VhdError::io("cannot write", image, e))?;
    }
    file.sync_all()
        .and_then(|()| file.set_len(j.len))
        .and_then(|()| file.sync_all())
        .map_err(|e| VhdError::io("cannot restore", image, e))?;
    drop(file);
    remove(journal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_record_a_resize_makes_parses() {
        // A resize to `MAX_BLOCKS` blocks of an image with a batmap: one record from the footer
        // copy to the end of the grown batmap (footer copy, header, BAT, batmap header, map).
        let n = 1536 + 4 * crate::vhd::MAX_BLOCKS + 512 + crate::vhd::MAX_BLOCKS / 8;
        let j = Journal {
            len: n + 512,
            uuid: [7; 16],
            records: vec![(0, vec![0xa5; n as usize])],
        };
        let path = Path::new("j");
        assert_eq!(Journal::parse(path, &j.to_bytes()).unwrap(), j);
        let mut too_big = j;
        too_big.records[0].1.resize(MAX_RECORD as usize + 1, 0);
        too_big.len = MAX_RECORD + 1;
        let e = Journal::parse(path, &too_big.to_bytes()).unwrap_err();
        assert!(e.to_string().contains("cut short"), "{e}");
    }
}
