//! The hard disk footer: 512 bytes at the end of every VHD (and copied at offset 0 of dynamic
//! and differencing disks).
//!
//! Layout (big-endian): cookie `conectix` (0), features (8), format version (12), data offset
//! (16, the dynamic header's offset; all ones for a fixed disk), timestamp (24), creator
//! application (28), creator version (32), creator host OS (36), original size (40), current
//! size (48), geometry: cylinders u16, heads u8, sectors per track u8 (56), disk type (60),
//! checksum (64), unique id (68), saved state (84). XenServer keeps a `hidden` byte at 85
//! (a node of a chain that no VM opens directly).

use std::path::Path;

use super::{be32, be64, checksum, cookie_text, put32, put64, VhdError};

/// Bytes in a footer.
pub const FOOTER_SIZE: usize = 512;
/// The footer's cookie.
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// The features field: the reserved bit is always set.
pub const FEATURES_RESERVED: u32 = 2;
/// File format version 1.0.
pub const FORMAT_VERSION: u32 = 0x0001_0000;
/// The data offset of a fixed disk (no dynamic header).
pub const NO_DATA_OFFSET: u64 = u64::MAX;
/// Creator application written by this implementation ("tap\0", as XenServer's tools, which
/// also tells readers such as qemu that the current size field is authoritative).
pub const CREATOR_APP: [u8; 4] = *b"tap\0";
/// Creator host OS written: "Lnux".
pub const CREATOR_OS: u32 = u32::from_be_bytes(*b"Lnux");

/// The disk types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// Data in place, footer at the end.
    Fixed,
    /// Blocks allocated as written.
    Dynamic,
    /// A dynamic disk whose unallocated sectors are its parent's.
    Differencing,
}

impl DiskType {
    /// The code in the footer.
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    /// The type with `code`.
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

/// CHS geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Geometry {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors: u8,
}

impl Geometry {
    /// The geometry the specification's algorithm gives a disk of `size` bytes (capped at
    /// 65535 cylinders, 16 heads, 255 sectors per track).
    pub fn for_size(size: u64) -> Self {
        let mut total = size / 512;
        total = total.min(65535 * 16 * 255);
        let (spt, heads, cyl_times_heads);
        if total >= 65535 * 16 * 63 {
            spt = 255;
            heads = 16;
            cyl_times_heads = total / spt;
        } else {
            let mut s = 17;
            let mut cth = total / s;
            let mut h = cth.div_ceil(1024).max(4);
            if cth >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                cth = total / s;
            }
            if cth >= h * 1024 {
                s = 63;
                h = 16;
                cth = total / s;
            }
            spt = s;
            heads = h;
            cyl_times_heads = cth;
        }
        Geometry {
            cylinders: (cyl_times_heads / heads).min(65535) as u16,
            heads: heads as u8,
            sectors: spt as u8,
        }
    }
}

/// A parsed footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Features (bit 1 reserved, set).
    pub features: u32,
    /// Format version.
    pub version: u32,
    /// Offset of the dynamic header (all ones for fixed disks).
    pub data_offset: u64,
    /// Creation time, seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// Creator application.
    pub creator_app: [u8; 4],
    /// Creator version.
    pub creator_version: u32,
    /// Creator host OS.
    pub creator_os: u32,
    /// Size at creation.
    pub original_size: u64,
    /// Virtual size in bytes.
    pub current_size: u64,
    /// CHS geometry.
    pub geometry: Geometry,
    /// Disk type.
    pub disk_type: DiskType,
    /// The image's UUID (children name their parent by it).
    pub uuid: [u8; 16],
    /// Saved state.
    pub saved_state: u8,
    /// XenServer's hidden flag.
    pub hidden: u8,
}

impl Footer {
    /// A footer for a new disk of `size` bytes.
    pub fn new(disk_type: DiskType, size: u64, data_offset: u64) -> Self {
        Footer {
            features: FEATURES_RESERVED,
            version: FORMAT_VERSION,
            data_offset,
            timestamp: super::now_timestamp(),
            creator_app: CREATOR_APP,
            creator_version: FORMAT_VERSION,
            creator_os: CREATOR_OS,
            original_size: size,
            current_size: size,
            geometry: Geometry::for_size(size),
            disk_type,
            uuid: super::new_uuid(),
            saved_state: 0,
            hidden: 0,
        }
    }

    /// Parses and checks the footer in `b` (from `path`).
    pub fn parse(path: &Path, b: &[u8; FOOTER_SIZE]) -> Result<Self, VhdError> {
        if &b[..8] != FOOTER_COOKIE {
            return Err(VhdError::BadCookie {
                path: path.into(),
                what: "footer",
                expected: "conectix",
                found: cookie_text(&b[..8]),
            });
        }
        let stored = be32(b, 64);
        let mut copy = *b;
        put32(&mut copy, 64, 0);
        let computed = checksum(&copy);
        if stored != computed {
            return Err(VhdError::BadChecksum {
                path: path.into(),
                what: "footer",
                stored,
                computed,
            });
        }
        let code = be32(b, 60);
        let disk_type = DiskType::from_code(code).ok_or_else(|| {
            VhdError::invalid(path, format!("footer: unsupported disk type {code}"))
        })?;
        let current_size = be64(b, 48);
        if !current_size.is_multiple_of(512) {
            return Err(VhdError::invalid(
                path,
                format!("footer: size {current_size} is not a multiple of 512"),
            ));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[68..84]);
        let mut creator_app = [0u8; 4];
        creator_app.copy_from_slice(&b[28..32]);
        Ok(Footer {
            features: be32(b, 8),
            version: be32(b, 12),
            data_offset: be64(b, 16),
            timestamp: be32(b, 24),
            creator_app,
            creator_version: be32(b, 32),
            creator_os: be32(b, 36),
            original_size: be64(b, 40),
            current_size,
            geometry: Geometry {
                cylinders: u16::from_be_bytes([b[56], b[57]]),
                heads: b[58],
                sectors: b[59],
            },
            disk_type,
            uuid,
            saved_state: b[84],
            hidden: b[85],
        })
    }

    /// The footer's 512 bytes, with its checksum.
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[..8].copy_from_slice(FOOTER_COOKIE);
        put32(&mut b, 8, self.features);
        put32(&mut b, 12, self.version);
        put64(&mut b, 16, self.data_offset);
        put32(&mut b, 24, self.timestamp);
        b[28..32].copy_from_slice(&self.creator_app);
        put32(&mut b, 32, self.creator_version);
        put32(&mut b, 36, self.creator_os);
        put64(&mut b, 40, self.original_size);
        put64(&mut b, 48, self.current_size);
        b[56..58].copy_from_slice(&self.geometry.cylinders.to_be_bytes());
        b[58] = self.geometry.heads;
        b[59] = self.geometry.sectors;
        put32(&mut b, 60, self.disk_type.code());
        b[68..84].copy_from_slice(&self.uuid);
        b[84] = self.saved_state;
        b[85] = self.hidden;
        let sum = checksum(&b);
        put32(&mut b, 64, sum);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_a_valid_checksum() {
        let f = Footer::new(DiskType::Dynamic, 100 << 20, 512);
        let b = f.to_bytes();
        assert_eq!(&b[..8], b"conectix");
        assert_eq!(Footer::parse(Path::new("x"), &b).unwrap(), f);
    }

    #[test]
    fn a_flipped_bit_fails_the_checksum() {
        let b = Footer::new(DiskType::Fixed, 1 << 20, NO_DATA_OFFSET).to_bytes();
        for at in [9, 50, 70, 300] {
            let mut bad = b;
            bad[at] ^= 0x10;
            assert!(
                matches!(
                    Footer::parse(Path::new("x"), &bad),
                    Err(VhdError::BadChecksum { .. })
                ),
                "{at}"
            );
        }
        let mut bad = b;
        bad[0] = b'C';
        assert!(matches!(
            Footer::parse(Path::new("x"), &bad),
            Err(VhdError::BadCookie { .. })
        ));
    }

    #[test]
    fn unknown_disk_types_and_odd_sizes_are_refused() {
        let mut f = Footer::new(DiskType::Fixed, 1 << 20, NO_DATA_OFFSET);
        let mut b = f.to_bytes();
        put32(&mut b, 60, 5);
        put32(&mut b, 64, 0);
        let sum = checksum(&b);
        put32(&mut b, 64, sum);
        assert!(matches!(
            Footer::parse(Path::new("x"), &b),
            Err(VhdError::Invalid { .. })
        ));
        f.current_size = 1000;
        assert!(Footer::parse(Path::new("x"), &f.to_bytes()).is_err());
    }

    #[test]
    fn geometry_follows_the_specification() {
        // 16 MiB: 32768 sectors -> 17 spt, 4 heads, 481 cylinders.
        assert_eq!(
            Geometry::for_size(16 << 20),
            Geometry {
                cylinders: 481,
                heads: 4,
                sectors: 17
            }
        );
        // 127 GiB and beyond hit the 255-sector branch.
        let g = Geometry::for_size(200 << 30);
        assert_eq!((g.heads, g.sectors, g.cylinders), (16, 255, 65535));
        // 1 GiB: 2097152 sectors -> 63 spt, 16 heads, 2080 cylinders.
        assert_eq!(
            Geometry::for_size(1 << 30),
            Geometry {
                cylinders: 2080,
                heads: 16,
                sectors: 63
            }
        );
    }
}
