//! New images and chain maintenance: dynamic and fixed disks, differencing children
//! (snapshots), and coalescing a child into its parent.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::chain::{Chain, Layer, RawImage};
use super::footer::{DiskType, Footer, FOOTER_SIZE, NO_DATA_OFFSET};
use super::header::{
    encode_locator, relative_path, Header, Locator, HEADER_SIZE, PLAT_MACX, PLAT_W2KU, PLAT_W2RU,
};
use super::image::{bit, VhdImage};
use super::journal;
use super::{VhdError, DEFAULT_BLOCK_SIZE, MAX_CHAIN, UNALLOCATED, VHD_EPOCH_OFFSET};

fn create_file(path: &Path) -> Result<File, VhdError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| VhdError::io("cannot create", path, e))
}

fn finish(file: &File, path: &Path, bytes: &[u8]) -> Result<(), VhdError> {
    let mut f = file;
    f.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| VhdError::io("cannot write", path, e))
}

fn check_size(path: &Path, size: u64) -> Result<(), VhdError> {
    if size == 0 || !size.is_multiple_of(512) {
        return Err(VhdError::invalid(
            path,
            format!("size {size} is not a positive multiple of 512"),
        ));
    }
    Ok(())
}

/// Creates a fixed disk of `size` bytes: the data (sparse zeros) and a footer.
pub fn create_fixed(path: &Path, size: u64) -> Result<Footer, VhdError> {
    check_size(path, size)?;
    let footer = Footer::new(DiskType::Fixed, size, NO_DATA_OFFSET);
    let file = create_file(path)?;
    file.write_all_at(&footer.to_bytes(), size)
        .and_then(|()| file.sync_all())
        .map_err(|e| VhdError::io("cannot write", path, e))?;
    Ok(footer)
}

/// Creates an empty dynamic disk of `size` bytes whose BAT has room for `max_size` (at least
/// `size`).
pub fn create_dynamic(path: &Path, size: u64, max_size: Option<u64>) -> Result<Footer, VhdError> {
    check_size(path, size)?;
    let (footer, header, image) = layout(DiskType::Dynamic, size, max_size, DEFAULT_BLOCK_SIZE)?;
    let bytes = assemble(&footer, &header, image);
    let file = create_file(path)?;
    finish(&file, path, &bytes)?;
    Ok(footer)
}

/// Footer, header and the bytes of a new empty dynamic-style image (before locators).
fn layout(
    disk_type: DiskType,
    size: u64,
    max_size: Option<u64>,
    block_size: u32,
) -> Result<(Footer, Header, Vec<u8>), VhdError> {
    let room = max_size.unwrap_or(size).max(size);
    let entries = u32::try_from(room.div_ceil(u64::from(block_size)))
        .map_err(|_| VhdError::invalid("", format!("size {room} is too large for a VHD")))?;
    let table_offset = (FOOTER_SIZE + HEADER_SIZE) as u64;
    let bat_bytes = (u64::from(entries) * 4).next_multiple_of(512);
    let footer = Footer::new(disk_type, size, FOOTER_SIZE as u64);
    let header = Header::new(table_offset, entries, block_size);
    let mut image = vec![0u8; (table_offset + bat_bytes) as usize];
    image[(table_offset as usize)..].fill(0xff);
    Ok((footer, header, image))
}

fn assemble(footer: &Footer, header: &Header, mut image: Vec<u8>) -> Vec<u8> {
    let fb = footer.to_bytes();
    image[..FOOTER_SIZE].copy_from_slice(&fb);
    image[FOOTER_SIZE..FOOTER_SIZE + HEADER_SIZE].copy_from_slice(&header.to_bytes());
    image.extend_from_slice(&fb);
    image
}

/// Seconds since 2000 of the file's modification time.
fn mtime_timestamp(path: &Path) -> Result<u32, VhdError> {
    let m = std::fs::metadata(path).map_err(|e| VhdError::io("cannot stat", path, e))?;
    let secs = u64::try_from(m.mtime()).unwrap_or(0);
    Ok(u32::try_from(secs.saturating_sub(VHD_EPOCH_OFFSET)).unwrap_or(u32::MAX))
}

/// What a differencing child records of its parent, and what it takes from it.
#[derive(Debug)]
pub(crate) struct ParentLink {
    /// The parent's canonical path.
    pub abs: PathBuf,
    /// The parent's virtual size (a raw parent's length).
    pub size: u64,
    /// The parent's block size (the default for a raw parent or a fixed disk).
    pub block_size: u32,
    /// The parent's UUID (zero for a raw parent).
    pub uuid: [u8; 16],
    /// The parent timestamp the child records: the parent footer's timestamp, or a raw
    /// parent's modification time.
    pub timestamp: u32,
    /// The files of the parent's chain, the parent first (the parent alone if raw).
    pub chain: Vec<PathBuf>,
}

impl ParentLink {
    /// The parent's file name, as the header's parent name.
    pub fn name(&self) -> String {
        self.abs
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// Reads what a child of `parent` (a VHD, whose whole chain is opened and checked, or a raw
/// file or device when `raw_parent`) records of it.
pub(crate) fn parent_link(parent: &Path, raw_parent: bool) -> Result<ParentLink, VhdError> {
    let abs = std::fs::canonicalize(parent).map_err(|e| VhdError::io("cannot find", parent, e))?;
    if raw_parent {
        let raw = RawImage::open(&abs, false)?;
        return Ok(ParentLink {
            size: raw.size(),
            block_size: DEFAULT_BLOCK_SIZE,
            uuid: [0; 16],
            timestamp: mtime_timestamp(&abs)?,
            chain: vec![abs.clone()],
            abs,
        });
    }
    let mut chain = Chain::open(&abs, false)?;
    if chain.layers().len() >= MAX_CHAIN {
        return Err(VhdError::BadChain {
            path: abs,
            detail: format!("has {MAX_CHAIN} images already"),
        });
    }
    let files = chain
        .layers()
        .iter()
        .map(|l| l.path().to_path_buf())
        .collect();
    let leaf = chain.leaf();
    let block_size = match leaf.block_size() {
        0 => DEFAULT_BLOCK_SIZE,
        b => b as u32,
    };
    Ok(ParentLink {
        size: leaf.size(),
        block_size,
        uuid: leaf.footer().uuid,
        timestamp: leaf.footer().timestamp,
        chain: files,
        abs,
    })
}

/// The parent locators a child at `child` writes for the parent at `parent_abs` (canonical),
/// in the order of the header's entries: `W2RU` and `MACX` relative to the child's directory
/// (`./` first), `W2KU` absolute.
pub(crate) fn locator_texts(
    child: &Path,
    parent_abs: &Path,
) -> Result<[(u32, String); 3], VhdError> {
    let child_dir = match child.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let child_dir = std::fs::canonicalize(&child_dir)
        .map_err(|e| VhdError::io("cannot find", &child_dir, e))?;
    let rel = relative_path(&child_dir, parent_abs);
    let rel = format!("./{}", rel.display());
    let abs = parent_abs.display().to_string();
    Ok([(PLAT_W2RU, rel.clone()), (PLAT_MACX, rel), (PLAT_W2KU, abs)])
}

/// Creates `child`, an empty differencing disk over `parent` (a VHD, or a raw file or device
/// when `raw_parent`). The parent chain is opened and checked first.
pub fn snapshot(child: &Path, parent: &Path, raw_parent: bool) -> Result<Footer, VhdError> {
    let link = parent_link(parent, raw_parent)?;
    check_size(child, link.size)?;
    let (mut footer, mut header, mut image) =
        layout(DiskType::Differencing, link.size, None, link.block_size)?;
    footer.disk_type = DiskType::Differencing;
    header.parent_uuid = link.uuid;
    header.parent_timestamp = link.timestamp;
    header.parent_name = link.name();
    for (i, (code, text)) in locator_texts(child, &link.abs)?.into_iter().enumerate() {
        let data = encode_locator(code, &text);
        let space = (data.len() as u64).next_multiple_of(512).max(512);
        let at = image.len() as u64;
        image.extend_from_slice(&data);
        image.resize((at + space) as usize, 0);
        header.locators[i] = Locator {
            code,
            data_space: space as u32,
            data_len: data.len() as u32,
            data_offset: at,
        };
    }
    let bytes = assemble(&footer, &header, image);
    let file = create_file(child)?;
    finish(&file, child, &bytes)?;
    Ok(footer)
}

/// Grows the VHD at `path` to `size` bytes ([`VhdImage::resize`]), under the journal
/// `<path>.journal` ([`journal::default_path`]) should the BAT have to grow past its room.
pub fn resize(path: &Path, size: u64) -> Result<(), VhdError> {
    resize_with_journal(path, size, &journal::default_path(path))
}

/// Grows the VHD at `path` to `size` bytes ([`VhdImage::resize`]), under the journal `journal`
/// should the BAT have to grow past its room. Refuses while `journal` (or the default journal,
/// `<path>.journal`) exists: a resize was cut short and `revert` must undo it first.
pub fn resize_with_journal(path: &Path, size: u64, journal: &Path) -> Result<(), VhdError> {
    journal::refuse_existing(path, &journal::default_path(path))?;
    journal::refuse_existing(path, journal)?;
    VhdImage::open(path, true)?.resize(size, journal)
}

/// Undoes the resize of the VHD at `path` that the journal `journal` recorded, then removes
/// the journal ([`journal::revert`]).
pub fn revert(path: &Path, journal: &Path) -> Result<(), VhdError> {
    journal::revert(path, journal)
}

/// Creates an empty dynamic disk (the layout [`create_dynamic`] writes) and returns its bytes;
/// used by tests that corrupt images.
pub fn dynamic_image_bytes(size: u64) -> Result<Vec<u8>, VhdError> {
    let (footer, header, image) = layout(DiskType::Dynamic, size, None, DEFAULT_BLOCK_SIZE)?;
    Ok(assemble(&footer, &header, image))
}

/// Writes the sectors `child` holds into its parent (a VHD, allocating blocks in it, or a raw
/// file), then makes the parent durable. A parent smaller than the child is grown to the
/// child's size first ([`VhdImage::resize`], under the journal `<parent>.journal` if its BAT
/// must grow past its room; a raw file is extended). The child is left as it
/// was. Returns the bytes copied.
pub fn coalesce(child: &Path) -> Result<u64, VhdError> {
    let chain = Chain::open(child, false)?;
    let (parent_path, raw) = match chain.layers().get(1) {
        Some(l @ Layer::Vhd(_)) => (l.path().to_path_buf(), false),
        Some(l @ Layer::Raw(_)) => (l.path().to_path_buf(), true),
        None => return Err(VhdError::invalid(child, "is not a differencing image")),
    };
    drop(chain);
    let mut source = VhdImage::open(child, false)?;
    let mut target_vhd = None;
    let mut target_raw = None;
    // A parent smaller than its child (a disk resized after its snapshot) grows to the child's
    // size first, so that it can take the child's sectors past its old end.
    if raw {
        let mut p = RawImage::open(&parent_path, true)?;
        p.grow(source.size())?;
        target_raw = Some(p);
    } else {
        journal::refuse_existing(&parent_path, &journal::default_path(&parent_path))?;
        let mut p = VhdImage::open(&parent_path, true)?;
        if p.size() < source.size() {
            p.resize(source.size(), &journal::default_path(&parent_path))?;
        }
        target_vhd = Some(p);
    }
    let bs = source.block_size();
    let bat = source.bat().to_vec();
    let mut copied = 0u64;
    for (block, &sector) in bat.iter().enumerate() {
        if sector == UNALLOCATED {
            continue;
        }
        let data_base = u64::from(sector) * 512 + source.header().map_or(0, |h| h.bitmap_bytes());
        let bitmap = source.bitmap(block as u32)?.to_vec();
        let sectors = bs.min(source.size() - block as u64 * bs) / 512;
        let mut s = 0;
        while s < sectors {
            if !bit(&bitmap, s) {
                s += 1;
                continue;
            }
            let mut t = s + 1;
            while t < sectors && bit(&bitmap, t) {
                t += 1;
            }
            let mut buf = vec![0u8; ((t - s) * 512) as usize];
            source.read_file(data_base + s * 512, &mut buf)?;
            let offset = block as u64 * bs + s * 512;
            if let Some(p) = target_vhd.as_mut() {
                p.write(offset, &buf)?;
            }
            if let Some(p) = target_raw.as_ref() {
                p.write(offset, &buf)?;
            }
            copied += buf.len() as u64;
            s = t;
        }
    }
    if let Some(p) = target_vhd.as_mut() {
        p.flush()?;
    }
    if let Some(p) = target_raw.as_ref() {
        p.flush()?;
    }
    Ok(copied)
}
