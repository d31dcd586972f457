//! An image's footer and dynamic header alone, without its BAT or blocks: what listing many
//! images needs (`vhd-util scan`), which reads no more than that, as the original tool does.
//! [`VhdImage::open`](super::image::VhdImage::open) checks a whole image; a probe only its footer
//! (the trailing one or the copy at offset 0, whichever is asked for first, the other if that one
//! is not a valid footer) and its header (cookie and checksum).

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::chain::candidates;
use super::footer::{DiskType, Footer, FOOTER_SIZE, NO_DATA_OFFSET};
use super::header::{Header, Locator, HEADER_SIZE, PLAT_MACX, PLAT_W2RU};
use super::VhdError;

/// An image's footer and header, read.
#[derive(Debug)]
pub struct Probe {
    path: PathBuf,
    file: File,
    len: u64,
    /// The footer.
    pub footer: Footer,
    /// The dynamic header (none for a fixed disk).
    pub header: Option<Header>,
}

impl Probe {
    /// Reads the footer and header of the image at `path`: the footer copy at offset 0 first
    /// when `copy_first` (as the original's fast scan does), else the trailing footer first.
    pub fn open(path: &Path, copy_first: bool) -> Result<Self, VhdError> {
        let mut file = File::open(path).map_err(|e| VhdError::io("cannot open", path, e))?;
        let len = file
            .seek(SeekFrom::End(0))
            .map_err(|e| VhdError::io("cannot size", path, e))?;
        let read_footer = |at: u64| -> Result<Footer, VhdError> {
            let mut b = [0u8; FOOTER_SIZE];
            file.read_exact_at(&mut b, at)
                .map_err(|e| VhdError::io("cannot read", path, e))?;
            Footer::parse(path, &b)
        };
        if len < FOOTER_SIZE as u64 {
            return Err(VhdError::Truncated {
                path: path.into(),
                what: "footer",
                need: FOOTER_SIZE as u64,
                len,
            });
        }
        let trailing = || read_footer(len - FOOTER_SIZE as u64);
        // Only a dynamic or differencing disk has a copy; a fixed disk's first sector is data.
        let copy = || {
            read_footer(0).and_then(|f| {
                if f.disk_type == DiskType::Fixed || f.data_offset == NO_DATA_OFFSET {
                    Err(VhdError::invalid(path, "offset 0 holds no footer copy"))
                } else {
                    Ok(f)
                }
            })
        };
        let footer = if copy_first {
            copy().or_else(|_| trailing())?
        } else {
            trailing().or_else(|e| copy().map_err(|_| e))?
        };
        let header = if footer.disk_type == DiskType::Fixed {
            None
        } else {
            let at = footer.data_offset;
            if at
                .checked_add(HEADER_SIZE as u64)
                .is_none_or(|end| end > len)
            {
                return Err(VhdError::Truncated {
                    path: path.into(),
                    what: "dynamic header",
                    need: at.saturating_add(HEADER_SIZE as u64),
                    len,
                });
            }
            let mut b = [0u8; HEADER_SIZE];
            file.read_exact_at(&mut b, at)
                .map_err(|e| VhdError::io("cannot read", path, e))?;
            Some(Header::parse(path, &b)?)
        };
        Ok(Probe {
            path: path.into(),
            file,
            len,
            footer,
            header,
        })
    }

    /// The file's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty (it never is: it holds a footer).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether it is a differencing disk.
    pub fn has_parent(&self) -> bool {
        self.footer.disk_type == DiskType::Differencing
    }

    /// Whether it is a differencing disk over a raw parent (its parent UUID is zero).
    pub fn raw_parent(&self) -> bool {
        self.has_parent()
            && self
                .header
                .as_ref()
                .is_some_and(|h| h.parent_uuid == [0; 16])
    }

    /// The bytes of locator `l`, if they lie inside the file and are of a sane length.
    pub fn locator_data(&self, l: &Locator) -> Option<Vec<u8>> {
        l.read_data(&self.file, self.len)
    }

    /// Where the parent is: the paths the locators name, then the recorded name next to the
    /// image ([`super::chain::parent_candidates`]).
    pub fn parent_candidates(&self) -> Vec<PathBuf> {
        match &self.header {
            Some(h) if self.has_parent() => candidates(&self.path, h, |l| self.locator_data(l)),
            _ => Vec::new(),
        }
    }

    /// The parent's path as a locator has it, found or not: the `MACX` locator's, else the
    /// `W2RU` one's, else the first other that decodes (the original scan's choice).
    pub fn locator_text(&self) -> Option<String> {
        let header = self.header.as_ref().filter(|_| self.has_parent())?;
        let decoded = |l: &Locator| self.locator_data(l).and_then(|d| l.decode(&d));
        let used = header.locators.iter().filter(|l| l.code != 0);
        let by = |code| used.clone().filter(move |l| l.code == code);
        by(PLAT_MACX)
            .chain(by(PLAT_W2RU))
            .chain(used.clone())
            .find_map(decoded)
            .filter(|t| !t.is_empty())
    }
}
