//! Allocating every block of a dynamic or differencing image (`vhd-util fill`): each block the
//! image does not hold whole is written with what the disk reads there (zeros in a dynamic disk,
//! the parents' sectors in a differencing one), so that the image holds every sector itself and
//! reads as before.
//!
//! The writes are the library's allocating writes ([`VhdImage::write`](super::VhdImage::write)),
//! with their crash-safe order: a block is allocated with the footer moved past it first, then
//! its bitmap and data, made durable, and only then its BAT entry; sectors added to a block
//! already allocated are written and made durable before their bits are set. A kill at any point
//! leaves a valid image that reads as before (at worst with a block no entry references); the
//! BAT entries are made durable at the end.
//!
//! [`reserve`] (`vhd-util fill -b`) allocates blocks without writing their data: see
//! [`VhdImage::reserve`].

use std::path::Path;

use super::chain::Chain;
use super::image::bit;
use super::{journal, VhdError, VhdImage, UNALLOCATED};

/// The most bytes read and written at a time (a block's part).
const CHUNK: u64 = 2 << 20;

/// Whether the leaf of `chain` holds every sector of `block` up to `len` bytes.
fn holds(chain: &mut Chain, block: u32, len: u64) -> Result<bool, VhdError> {
    let leaf = chain.leaf();
    if leaf.bat()[block as usize] == UNALLOCATED {
        return Ok(false);
    }
    let bitmap = leaf.bitmap(block)?;
    Ok((0..len / 512).all(|s| bit(bitmap, s)))
}

/// Allocates every block of the dynamic or differencing image at `path` (see the module's
/// documentation); returns how many blocks it wrote to. Refused: a fixed disk (it holds every
/// sector already), a resize journal beside the image, a chain that does not open.
pub fn fill(path: &Path) -> Result<u64, VhdError> {
    journal::refuse_existing(path, &journal::default_path(path))?;
    let mut chain = Chain::open(path, true)?;
    let leaf = chain.leaf();
    if leaf.header().is_none() {
        return Err(VhdError::invalid(
            path,
            "is a fixed disk: it holds every sector already",
        ));
    }
    let (size, bs) = (leaf.size(), leaf.block_size());
    let blocks = leaf.bat().len();
    let mut buf = vec![0u8; bs.min(CHUNK) as usize];
    let mut written = 0;
    for block in 0..blocks {
        // CAST: blocks are counted in `u32` (at most `MAX_BLOCKS`).
        let block = block as u32;
        let start = u64::from(block) * bs;
        let len = bs.min(size - start);
        let mut wrote = false;
        let mut done = 0;
        while done < len && !holds(&mut chain, block, len)? {
            let n = (len - done).min(CHUNK);
            // CAST: `n` is at most `CHUNK`.
            let part = &mut buf[..n as usize];
            chain.read(start + done, part)?;
            chain.write(start + done, part)?;
            wrote = true;
            done += n;
        }
        written += u64::from(wrote);
    }
    chain.flush()?;
    Ok(written)
}

/// Reserves the blocks of the dynamic or differencing image at `path` that hold sectors
/// `from..=to` of the disk (every block when both are None; `to` past the end means up to the
/// end), without writing their data (`vhd-util fill -b`, see [`VhdImage::reserve`]). Returns how
/// many blocks it reserved. Refused: a fixed disk, a range that starts past the disk's end or
/// ends before it starts, a resize journal beside the image.
pub fn reserve(path: &Path, from: Option<u64>, to: Option<u64>) -> Result<u64, VhdError> {
    journal::refuse_existing(path, &journal::default_path(path))?;
    let mut image = VhdImage::open(path, true)?;
    if image.header().is_none() {
        return Err(VhdError::invalid(
            path,
            "is a fixed disk: it holds every sector already",
        ));
    }
    let sectors = image.size() / 512;
    let (from, to) = (from.unwrap_or(0), to.unwrap_or(u64::MAX));
    if to < from {
        return Err(VhdError::invalid(
            path,
            format!("invalid sector range {from}-{to}"),
        ));
    }
    if from >= sectors {
        return Err(VhdError::invalid(
            path,
            format!("sector {from} is past the disk's end ({sectors} sectors)"),
        ));
    }
    let spb = image.block_size() / 512;
    // CAST: below the disk's sector count, so a block index (at most `MAX_BLOCKS`); the end is
    // clamped to the last block by `reserve`.
    let first = (from / spb) as u32;
    let last = u32::try_from(to / spb).unwrap_or(u32::MAX);
    image.reserve(first..=last)
}
