//! The VHD image format (Microsoft's Virtual Hard Disk specification), as Xen storage keeps its
//! virtual disks: fixed, dynamic and differencing images, and chains of them.
//!
//! - [`footer`]: the 512-byte footer at the end of every image (and its copy at offset 0 of a
//!   dynamic or differencing image);
//! - [`header`]: the dynamic disk header with the block size, the BAT's place, the parent's
//!   UUID, name and locators;
//! - [`image`]: one image file opened and checked: BAT, per-block sector bitmaps, reads and
//!   allocating writes;
//! - [`chain`]: an image and its parents, found through the parent locators, read as one disk;
//! - [`create`]: new images (dynamic, fixed, differencing children), resizing and coalescing;
//! - [`journal`]: the journal of a resize that moves the BAT, and reverting one cut short;
//! - [`fill`]: allocating every block of an image, its data as it reads;
//! - [`modify`]: re-parenting a differencing image, setting its physical size, forgetting its
//!   blocks;
//! - [`probe`]: an image's footer and header alone, for listing many images.
//!
//! Every field is big-endian. Files are hostile: every offset and size read from one is checked
//! against the file before it is used, and a problem is a [`VhdError`], never a panic.

use std::io;
use std::path::PathBuf;

pub mod chain;
pub mod check;
pub mod create;
pub mod fill;
pub mod footer;
pub mod header;
pub mod image;
pub mod journal;
pub mod modify;
pub mod probe;
pub mod repair;
pub mod shared;

pub use chain::{Chain, Layer};
pub use footer::{DiskType, Footer};
pub use header::{Header, Locator};
pub use image::VhdImage;

/// Bytes in a sector.
pub const SECTOR: u64 = 512;
/// The default (and XenServer's only) block size: 2 MiB.
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// A BAT entry for a block that is not allocated.
pub const UNALLOCATED: u32 = 0xFFFF_FFFF;
/// Images in a chain at most (Xen's storage manager keeps chains at most 30 deep; this bound
/// only stops runaway or looping chains).
pub const MAX_CHAIN: usize = 64;
/// The most blocks a disk may have (a BAT of 64 MiB: 32 TiB in 2 MiB blocks), so that a
/// hostile header cannot make the BAT's buffer huge.
pub const MAX_BLOCKS: u64 = 1 << 24;
/// The largest block size accepted (the specification's blocks are 512 KiB to a few MiB).
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Seconds from the Unix epoch to 2000-01-01 00:00:00 UTC, the epoch of VHD timestamps.
pub const VHD_EPOCH_OFFSET: u64 = 946_684_800;

/// What can be wrong with a VHD image or its chain.
#[derive(Debug, thiserror::Error)]
pub enum VhdError {
    /// A system call on the file failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file ends before a structure it must hold.
    #[error("{path}: truncated: {what} needs bytes up to {need}, the file has {len}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The structure.
        what: &'static str,
        /// The end offset needed.
        need: u64,
        /// The file's length.
        len: u64,
    },
    /// A structure's cookie is not the expected one.
    #[error("{path}: {what}: bad cookie {found:?} (expected {expected:?})")]
    BadCookie {
        /// The file.
        path: PathBuf,
        /// The structure.
        what: &'static str,
        /// The cookie expected.
        expected: &'static str,
        /// The bytes found.
        found: String,
    },
    /// A structure's checksum does not match its bytes.
    #[error("{path}: {what}: checksum {stored:#010x} does not match {computed:#010x}")]
    BadChecksum {
        /// The file.
        path: PathBuf,
        /// The structure.
        what: &'static str,
        /// The checksum in the file.
        stored: u32,
        /// The checksum of the bytes.
        computed: u32,
    },
    /// A field holds a value the format does not allow.
    #[error("{path}: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A BAT entry points where no block can be.
    #[error("{path}: BAT entry {block} (sector {sector:#x}) {detail}")]
    BadBat {
        /// The file.
        path: PathBuf,
        /// The block.
        block: u32,
        /// The entry's sector.
        sector: u32,
        /// What is wrong.
        detail: &'static str,
    },
    /// No locator of a differencing image names a file that exists.
    #[error("{path}: parent {name:?} not found (tried {tried:?})")]
    ParentMissing {
        /// The child.
        path: PathBuf,
        /// The parent's name in the header.
        name: String,
        /// The paths tried.
        tried: Vec<PathBuf>,
    },
    /// The parent found is not the one the child was made from.
    #[error("{path}: parent {parent}: {detail}")]
    ParentMismatch {
        /// The child.
        path: PathBuf,
        /// The parent.
        parent: PathBuf,
        /// What differs.
        detail: String,
    },
    /// The chain comes back to an image already in it, or is too long.
    #[error("{path}: parent chain {detail}")]
    BadChain {
        /// The image where the walk stopped.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A write to an image opened read-only.
    #[error("{path}: read-only")]
    ReadOnly {
        /// The image.
        path: PathBuf,
    },
    /// A range outside the virtual disk.
    #[error("range {offset}+{len} outside a disk of {size} bytes")]
    OutOfRange {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The disk's size.
        size: u64,
    },
}

impl VhdError {
    /// The errno it stands for: the OS error for I/O, `EROFS`, `EIO` for a range, `ENOENT` for
    /// a missing parent, `EINVAL` for a malformed image.
    pub fn errno(&self) -> i32 {
        match self {
            VhdError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            VhdError::ReadOnly { .. } => libc::EROFS,
            VhdError::OutOfRange { .. } => libc::EIO,
            VhdError::ParentMissing { .. } => libc::ENOENT,
            _ => libc::EINVAL,
        }
    }

    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        VhdError::Io {
            what,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        VhdError::Invalid {
            path: path.into(),
            detail: detail.into(),
        }
    }
}

impl From<VhdError> for crate::Error {
    fn from(e: VhdError) -> Self {
        crate::Error::Vhd(Box::new(e))
    }
}

/// The VHD checksum of `bytes`: the ones' complement of the sum of its bytes (the caller zeroes
/// the checksum field first).
pub fn checksum(bytes: &[u8]) -> u32 {
    !bytes
        .iter()
        .fold(0u32, |s, &b| s.wrapping_add(u32::from(b)))
}

/// The newest batmap version XenServer's tools know (1.2); they refuse a later one.
pub const BATMAP_VERSION: u32 = 0x0001_0002;

/// The checksum of a batmap's map (all its sectors) as XenServer's tools compute it: the VHD
/// checksum, except that version 1.1 summed the bytes as signed `char`s.
pub fn batmap_checksum(map: &[u8], version: u32) -> u32 {
    if version == 0x0001_0001 {
        // CAST: a byte as a signed `char`, sign-extended, as the original sums it.
        !map.iter()
            .fold(0u32, |s, &b| s.wrapping_add(i32::from(b as i8) as u32))
    } else {
        checksum(map)
    }
}

/// Now, as a VHD timestamp (seconds since 2000-01-01 UTC; 0 before then).
pub fn now_timestamp() -> u32 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    u32::try_from(unix.saturating_sub(VHD_EPOCH_OFFSET)).unwrap_or(u32::MAX)
}

/// A new random (version 4) UUID.
pub fn new_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    let mut filled = 0;
    while filled < u.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `u`.
        let n = unsafe { libc::getrandom(u[filled..].as_mut_ptr().cast(), u.len() - filled, 0) };
        if n <= 0 {
            // No entropy source: mix the time and pid so UUIDs still differ.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()) as u64;
            let mut rng = crate::rng::Rng::new(t ^ u64::from(std::process::id()) << 32);
            u[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
            u[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
            break;
        }
        filled += n as usize;
    }
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// A UUID in its usual text form.
pub fn uuid_string(u: &[u8; 16]) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..].concat()
    )
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

pub(crate) fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

pub(crate) fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Printable form of a cookie.
pub(crate) fn cookie_text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).escape_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_is_the_complement_of_the_byte_sum() {
        assert_eq!(checksum(&[]), 0xffff_ffff);
        assert_eq!(checksum(&[1, 2, 3]), !6);
        assert_eq!(checksum(&[0xff; 512]), !(0xff * 512));
    }

    #[test]
    fn uuids_are_random_version_4() {
        let (a, b) = (new_uuid(), new_uuid());
        assert_ne!(a, b);
        assert_eq!(a[6] >> 4, 4);
        let s = uuid_string(&a);
        assert_eq!(s.len(), 36);
        assert_eq!(s.matches('-').count(), 4);
    }

    #[test]
    fn timestamps_count_from_2000() {
        // Later than 2026-01-01 (820454400 s after 2000-01-01).
        assert!(now_timestamp() > 820_454_400);
    }
}

#[cfg(test)]
mod image_tests;
