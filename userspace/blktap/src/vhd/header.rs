//! The dynamic disk header: 1024 bytes at the footer's data offset of a dynamic or
//! differencing disk.
//!
//! Layout (big-endian): cookie `cxsparse` (0), data offset (8, unused, all ones), table offset
//! (16, the BAT), header version (24), max table entries (28), block size (32), checksum (36),
//! parent UUID (40), parent timestamp (56), reserved (60), parent name in UTF-16 big-endian
//! (64, 512 bytes), 8 parent locator entries of 24 bytes (576): platform code, platform data
//! space, platform data length, reserved, platform data offset.
//!
//! Locators name the parent file: `MACX` a UTF-8 file URL, `W2KU` an absolute and `W2RU` a
//! relative path in UTF-16 little-endian.

use std::path::{Component, Path, PathBuf};

use super::{be32, be64, checksum, cookie_text, put32, put64, VhdError};

/// Bytes in a header.
pub const HEADER_SIZE: usize = 1024;
/// The header's cookie.
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
/// Header version 1.0.
pub const HEADER_VERSION: u32 = 0x0001_0000;
/// Locator entries in a header.
pub const LOCATORS: usize = 8;
/// Platform code: Mac OS X file URL (UTF-8).
pub const PLAT_MACX: u32 = u32::from_be_bytes(*b"MACX");
/// Platform code: absolute Windows path (UTF-16 LE).
pub const PLAT_W2KU: u32 = u32::from_be_bytes(*b"W2KU");
/// Platform code: relative Windows path (UTF-16 LE).
pub const PLAT_W2RU: u32 = u32::from_be_bytes(*b"W2RU");
/// The longest locator accepted, in bytes.
pub const MAX_LOCATOR: u32 = 64 << 10;

/// A parent locator entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Locator {
    /// Platform code (`MACX`, `W2KU`, `W2RU`; 0 for an unused entry).
    pub code: u32,
    /// Space reserved for the data (sectors by the specification, bytes by some writers).
    pub data_space: u32,
    /// Length of the data in bytes.
    pub data_len: u32,
    /// Byte offset of the data in the file.
    pub data_offset: u64,
}

impl Locator {
    /// Reads the locator's data from `file`, if it is of a sane length and ends by `limit`
    /// (the first byte it may not reach).
    pub fn read_data(&self, file: &std::fs::File, limit: u64) -> Option<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        if self.data_len == 0 || self.data_len > MAX_LOCATOR {
            return None;
        }
        let end = self.data_offset.checked_add(u64::from(self.data_len))?;
        if end > limit {
            return None;
        }
        let mut b = vec![0u8; self.data_len as usize];
        file.read_exact_at(&mut b, self.data_offset).ok()?;
        Some(b)
    }

    /// Bytes reserved for the locator's data: `data_space` read as sectors when small, as
    /// bytes when it is a multiple of 512 (both are found in the wild), never less than its
    /// length.
    pub fn reserved_bytes(&self) -> u64 {
        let space = u64::from(self.data_space);
        let bytes = if space < 512 { space * 512 } else { space };
        bytes.max(u64::from(self.data_len))
    }

    /// Decodes the path stored in `data` (the locator's bytes).
    pub fn decode(&self, data: &[u8]) -> Option<String> {
        match self.code {
            PLAT_MACX => {
                let s = std::str::from_utf8(data).ok()?;
                let s = s.trim_end_matches('\0');
                Some(s.strip_prefix("file://").unwrap_or(s).to_string())
            }
            PLAT_W2KU | PLAT_W2RU => {
                if !data.len().is_multiple_of(2) {
                    return None;
                }
                let units: Vec<u16> = data
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                let s = String::from_utf16(&units).ok()?;
                Some(s.trim_end_matches('\0').replace('\\', "/"))
            }
            _ => None,
        }
    }
}

/// Encodes `path` for a locator of platform `code`.
pub fn encode_locator(code: u32, path: &str) -> Vec<u8> {
    match code {
        PLAT_MACX => format!("file://{path}").into_bytes(),
        _ => {
            let text = if code == PLAT_W2RU {
                path.replace('/', "\\")
            } else {
                path.to_string()
            };
            text.encode_utf16().flat_map(u16::to_le_bytes).collect()
        }
    }
}

/// A parsed dynamic disk header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Byte offset of the BAT.
    pub table_offset: u64,
    /// Header version.
    pub version: u32,
    /// Entries in the BAT.
    pub max_table_entries: u32,
    /// Bytes of data in a block.
    pub block_size: u32,
    /// The parent's UUID (zero: no parent, or a raw parent).
    pub parent_uuid: [u8; 16],
    /// The parent's timestamp.
    pub parent_timestamp: u32,
    /// The parent's file name.
    pub parent_name: String,
    /// Parent locators.
    pub locators: [Locator; LOCATORS],
}

impl Header {
    /// A header for a disk with a BAT at `table_offset` of `entries` blocks of `block_size`.
    pub fn new(table_offset: u64, entries: u32, block_size: u32) -> Self {
        Header {
            table_offset,
            version: HEADER_VERSION,
            max_table_entries: entries,
            block_size,
            parent_uuid: [0; 16],
            parent_timestamp: 0,
            parent_name: String::new(),
            locators: [Locator::default(); LOCATORS],
        }
    }

    /// Parses and checks the header in `b` (from `path`).
    pub fn parse(path: &Path, b: &[u8; HEADER_SIZE]) -> Result<Self, VhdError> {
        if &b[..8] != HEADER_COOKIE {
            return Err(VhdError::BadCookie {
                path: path.into(),
                what: "dynamic header",
                expected: "cxsparse",
                found: cookie_text(&b[..8]),
            });
        }
        let stored = be32(b, 36);
        let mut copy = *b;
        put32(&mut copy, 36, 0);
        let computed = checksum(&copy);
        if stored != computed {
            return Err(VhdError::BadChecksum {
                path: path.into(),
                what: "dynamic header",
                stored,
                computed,
            });
        }
        let block_size = be32(b, 32);
        if block_size == 0
            || !block_size.is_multiple_of(512)
            || block_size > super::MAX_BLOCK_SIZE
            || !block_size.is_power_of_two()
        {
            return Err(VhdError::invalid(
                path,
                format!("dynamic header: block size {block_size} is not a power of two of 512 bytes to 256 MiB"),
            ));
        }
        let mut parent_uuid = [0u8; 16];
        parent_uuid.copy_from_slice(&b[40..56]);
        let units: Vec<u16> = b[64..576]
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let parent_name = String::from_utf16_lossy(&units);
        let mut locators = [Locator::default(); LOCATORS];
        for (i, l) in locators.iter_mut().enumerate() {
            let at = 576 + i * 24;
            *l = Locator {
                code: be32(b, at),
                data_space: be32(b, at + 4),
                data_len: be32(b, at + 8),
                data_offset: be64(b, at + 16),
            };
        }
        Ok(Header {
            table_offset: be64(b, 16),
            version: be32(b, 24),
            max_table_entries: be32(b, 28),
            block_size,
            parent_uuid,
            parent_timestamp: be32(b, 56),
            parent_name,
            locators,
        })
    }

    /// The header's 1024 bytes, with its checksum.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[..8].copy_from_slice(HEADER_COOKIE);
        put64(&mut b, 8, u64::MAX);
        put64(&mut b, 16, self.table_offset);
        put32(&mut b, 24, self.version);
        put32(&mut b, 28, self.max_table_entries);
        put32(&mut b, 32, self.block_size);
        b[40..56].copy_from_slice(&self.parent_uuid);
        put32(&mut b, 56, self.parent_timestamp);
        for (i, u) in self.parent_name.encode_utf16().take(256).enumerate() {
            b[64 + 2 * i..66 + 2 * i].copy_from_slice(&u.to_be_bytes());
        }
        for (i, l) in self.locators.iter().enumerate() {
            let at = 576 + i * 24;
            put32(&mut b, at, l.code);
            put32(&mut b, at + 4, l.data_space);
            put32(&mut b, at + 8, l.data_len);
            put64(&mut b, at + 16, l.data_offset);
        }
        let sum = checksum(&b);
        put32(&mut b, 36, sum);
        b
    }

    /// Bytes of the sector bitmap before each block (one bit per sector, padded to sectors).
    pub fn bitmap_bytes(&self) -> u64 {
        (u64::from(self.block_size) / 512)
            .div_ceil(8)
            .next_multiple_of(512)
    }
}

/// `target` relative to the directory `from` (both absolute), e.g. `../b/p.vhd`.
pub fn relative_path(from: &Path, target: &Path) -> PathBuf {
    let a: Vec<Component> = from.components().collect();
    let b: Vec<Component> = target.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..a.len() {
        out.push("..");
    }
    for c in &b[common..] {
        out.push(c.as_os_str());
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_parent_fields() {
        let mut h = Header::new(1536, 50, 2 << 20);
        h.parent_uuid = [7; 16];
        h.parent_timestamp = 1234;
        h.parent_name = "parént.vhd".into();
        h.locators[0] = Locator {
            code: PLAT_W2RU,
            data_space: 1,
            data_len: 24,
            data_offset: 4096,
        };
        let b = h.to_bytes();
        assert_eq!(Header::parse(Path::new("x"), &b).unwrap(), h);
        assert_eq!(h.bitmap_bytes(), 512);
        let mut bad = b;
        bad[600] ^= 1;
        assert!(matches!(
            Header::parse(Path::new("x"), &bad),
            Err(VhdError::BadChecksum { .. })
        ));
    }

    #[test]
    fn odd_block_sizes_are_refused() {
        for bs in [0, 1000, 3 << 20, 1 << 30] {
            let h = Header::new(1536, 1, bs);
            assert!(
                Header::parse(Path::new("x"), &h.to_bytes()).is_err(),
                "{bs}"
            );
        }
    }

    #[test]
    fn locators_encode_and_decode() {
        for code in [PLAT_MACX, PLAT_W2KU, PLAT_W2RU] {
            let l = Locator {
                code,
                ..Default::default()
            };
            let data = encode_locator(code, "../dir/p.vhd");
            assert_eq!(l.decode(&data).as_deref(), Some("../dir/p.vhd"));
        }
        let l = Locator {
            code: PLAT_W2KU,
            ..Default::default()
        };
        assert_eq!(l.decode(&[1, 2, 3]), None);
        let l = Locator {
            data_space: 2,
            data_len: 10,
            ..Default::default()
        };
        assert_eq!(l.reserved_bytes(), 1024);
        let l = Locator {
            data_space: 1024,
            data_len: 10,
            ..Default::default()
        };
        assert_eq!(l.reserved_bytes(), 1024);
    }

    #[test]
    fn relative_paths_climb_and_descend() {
        let r = |a: &str, b: &str| relative_path(Path::new(a), Path::new(b));
        assert_eq!(r("/sr/a", "/sr/a/p.vhd"), PathBuf::from("p.vhd"));
        assert_eq!(r("/sr/a", "/sr/b/p.vhd"), PathBuf::from("../b/p.vhd"));
        assert_eq!(r("/", "/p.vhd"), PathBuf::from("p.vhd"));
    }
}
