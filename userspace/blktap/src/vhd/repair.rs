//! Repairing the footers of a dynamic or differencing image: a trailing footer lost or damaged
//! (a file cut short, a torn write) is rebuilt from the copy at offset 0, at the end of the
//! data the BAT references; a damaged copy is rewritten from the trailing footer.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::footer::{Footer, FOOTER_SIZE};
use super::header::{Header, HEADER_SIZE};
use super::image::VhdImage;
use super::{VhdError, UNALLOCATED};

/// Repairs the footers of the image at `path`; says what it did (`None`: nothing to repair).
/// An image whose problems are elsewhere is left alone, with the error that [`VhdImage::open`]
/// gives.
pub fn repair(path: &Path) -> Result<Option<String>, VhdError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| VhdError::io("cannot open", path, e))?;
    let write = |buf: &[u8], at: u64| {
        file.write_all_at(buf, at)
            .and_then(|()| file.sync_all())
            .map_err(|e| VhdError::io("cannot write", path, e))
    };
    let mut cb = [0u8; FOOTER_SIZE];
    let copy = file
        .read_exact_at(&mut cb, 0)
        .ok()
        .and_then(|()| Footer::parse(path, &cb).ok())
        .filter(|f| f.data_offset != u64::MAX);
    match VhdImage::open(path, false) {
        Ok(image) => {
            if image.header().is_none() || copy.as_ref() == Some(image.footer()) {
                return Ok(None);
            }
            write(&image.footer().to_bytes(), 0)?;
            Ok(Some("rewrote the footer copy at offset 0".into()))
        }
        Err(e) => {
            let Some(copy) = copy else {
                return Err(e);
            };
            let damaged = matches!(
                e,
                VhdError::BadCookie { what: "footer", .. }
                    | VhdError::BadChecksum { what: "footer", .. }
                    | VhdError::Truncated { .. }
                    | VhdError::BadBat { .. }
            );
            if !damaged {
                return Err(e);
            }
            let len = file
                .metadata()
                .map_err(|e| VhdError::io("cannot stat", path, e))?
                .len();
            let end = data_end(&file, path, &copy, len)?;
            write(&copy.to_bytes(), end)?;
            file.set_len(end + FOOTER_SIZE as u64)
                .map_err(|e| VhdError::io("cannot truncate", path, e))?;
            VhdImage::open(path, false)?;
            Ok(Some(format!(
                "rebuilt the footer at offset {end} from the copy at offset 0"
            )))
        }
    }
}

/// The end of the metadata and of every block the BAT references, as far as the file holds them.
fn data_end(file: &std::fs::File, path: &Path, footer: &Footer, len: u64) -> Result<u64, VhdError> {
    let read = |buf: &mut [u8], at: u64| {
        file.read_exact_at(buf, at)
            .map_err(|e| VhdError::io("cannot read", path, e))
    };
    let mut hb = [0u8; HEADER_SIZE];
    read(&mut hb, footer.data_offset)?;
    let header = Header::parse(path, &hb)?;
    let bat_bytes = u64::from(header.max_table_entries) * 4;
    if header.table_offset.saturating_add(bat_bytes) > len {
        return Err(VhdError::invalid(
            path,
            "the BAT is past the end of the file",
        ));
    }
    let mut bat = vec![0u8; bat_bytes as usize];
    read(&mut bat, header.table_offset)?;
    let block = header.bitmap_bytes() + u64::from(header.block_size);
    let mut end = (footer.data_offset + HEADER_SIZE as u64)
        .max(header.table_offset + bat_bytes.next_multiple_of(512));
    for l in header.locators.iter().filter(|l| l.code != 0) {
        let e = l.data_offset.saturating_add(l.reserved_bytes());
        if e <= len {
            end = end.max(e);
        }
    }
    for (i, c) in bat.chunks_exact(4).enumerate() {
        let sector = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        if sector == UNALLOCATED {
            continue;
        }
        let e = u64::from(sector) * 512 + block;
        if e > len {
            return Err(VhdError::BadBat {
                path: path.into(),
                block: i as u32,
                sector,
                detail: "points past the end of the file: its data is lost",
            });
        }
        end = end.max(e);
    }
    Ok(end.next_multiple_of(512))
}
