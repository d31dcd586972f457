//! The overlay file of `cow:PATH:IMAGE`: the sectors written over the base, and the map of which
//! they are, so that the overlay outlives the tap (a pause, a close, a restart of tapdisk).
//!
//! ```text
//! 0        header (4096 bytes): "blktap2-rs cow\0\0", version (u32 LE) = 1, 0 (u32),
//!          disk size in bytes (u64 LE), map offset (u64 LE) = 4096, data offset (u64 LE)
//! 4096     the map: one bit per 512-byte sector of the disk (bit s%8 of byte s/8), in pages of
//!          4096 bytes
//! data     the disk's sectors at their own offsets, from the data offset (a multiple of 1 MiB);
//!          the file is sparse: only what was written takes space
//! ```
//!
//! A map bit is stored only after the data it stands for is durable (see the `cow` layer), so
//! after a crash every set bit holds what was written, and a sector whose bit was lost reads
//! as the base's.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::map::{Map, PAGE_BYTES};
use crate::{Error, Result};

/// The header's first bytes.
pub const MAGIC: &[u8; 16] = b"blktap2-rs cow\0\0";
/// The format's version.
pub const VERSION: u32 = 1;
/// Where the map starts.
pub const MAP_OFFSET: u64 = 4096;

/// The data offset of an overlay of a disk with `pages` map pages.
pub fn data_offset(pages: usize) -> u64 {
    (MAP_OFFSET + pages as u64 * PAGE_BYTES as u64).next_multiple_of(1 << 20)
}

/// Where map page `p` is kept.
pub fn page_offset(p: usize) -> u64 {
    MAP_OFFSET + p as u64 * PAGE_BYTES as u64
}

/// Opens the overlay file `path` of a disk of `size` bytes, making it if it does not exist or is
/// empty, and reads its map. A file that is something else, or the overlay of a disk of another
/// size, is refused (`EINVAL`) and left alone.
pub fn open(path: &Path, size: u64) -> Result<(File, Map, u64)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io("cannot open the overlay", path, e))?;
    let mut map = Map::new(size / 512);
    let data = data_offset(map.page_count());
    let len = file
        .metadata()
        .map_err(|e| Error::io("cannot stat the overlay", path, e))?
        .len();
    let bad = |what: String| Error::invalid(format!("overlay {}: {what}", path.display()));
    if len == 0 {
        let mut header = [0u8; 4096];
        header[..16].copy_from_slice(MAGIC);
        header[16..20].copy_from_slice(&VERSION.to_le_bytes());
        header[24..32].copy_from_slice(&size.to_le_bytes());
        header[32..40].copy_from_slice(&MAP_OFFSET.to_le_bytes());
        header[40..48].copy_from_slice(&data.to_le_bytes());
        let made = file
            .set_len(data + size)
            .and_then(|()| file.write_all_at(&header, 0))
            .and_then(|()| file.sync_all());
        made.map_err(|e| Error::io("cannot make the overlay", path, e))?;
        return Ok((file, map, data));
    }
    if len < MAP_OFFSET {
        return Err(bad(format!("not an overlay file ({len} bytes)")));
    }
    let mut header = [0u8; 4096];
    read_at(&file, &mut header, 0).map_err(|e| Error::io("cannot read the overlay", path, e))?;
    if &header[..16] != MAGIC {
        return Err(bad("not an overlay file (no blktap2-rs cow header)".into()));
    }
    let word = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    let version = u32::from_le_bytes(header[16..20].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(bad(format!(
            "version {version}, this tapdisk knows {VERSION}"
        )));
    }
    if word(24) != size {
        return Err(bad(format!(
            "made for a disk of {} bytes, the image has {size}",
            word(24)
        )));
    }
    if word(32) != MAP_OFFSET || word(40) != data {
        return Err(bad(format!(
            "map at {}, data at {}: expected {MAP_OFFSET} and {data}",
            word(32),
            word(40)
        )));
    }
    if len < data {
        return Err(bad(format!(
            "truncated: {len} bytes, its data starts at {data}"
        )));
    }
    if len < data + size {
        file.set_len(data + size)
            .map_err(|e| Error::io("cannot extend the overlay", path, e))?;
    }
    let mut page = [0u8; PAGE_BYTES];
    for p in 0..map.page_count() {
        read_at(&file, &mut page, page_offset(p))
            .map_err(|e| Error::io("cannot read the overlay's map", path, e))?;
        map.load_page(p, &page);
    }
    Ok((file, map, data))
}

fn read_at(file: &File, buf: &mut [u8], at: u64) -> io::Result<()> {
    file.read_exact_at(buf, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_then_reopened_with_its_map() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ov");
        let size = 40 << 20;
        let (f, mut map, data) = open(&path, size).unwrap();
        assert_eq!(data, 1 << 20);
        assert_eq!(f.metadata().unwrap().len(), data + size);
        map.set(100, 8);
        map.set(70000, 1);
        for (p, bytes) in map.take_dirty() {
            f.write_all_at(&bytes, page_offset(p)).unwrap();
        }
        drop(f);
        let (_, back, _) = open(&path, size).unwrap();
        assert_eq!(back.runs(0, size / 512), map.runs(0, size / 512));
        // Another size, another file, a truncated one: refused, left as they are.
        assert_eq!(open(&path, size * 2).unwrap_err().errno(), 22);
        let other = dir.path().join("other");
        std::fs::write(&other, b"not an overlay").unwrap();
        let e = open(&other, size).unwrap_err();
        assert!(e.to_string().contains("not an overlay"), "{e}");
        assert_eq!(std::fs::read(&other).unwrap(), b"not an overlay");
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(4096).unwrap();
        assert!(open(&path, size)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
    }
}
