//! Finding what is wrong with an image: everything [`VhdImage::open`] checks (cookies,
//! checksums, sizes, the BAT's entries against the file and its metadata), the footer copy of a
//! dynamic disk, blocks that start before the end of the metadata (XenServer's `vhd-util check`
//! refuses them), and the parent chain (locators, parent UUID and size, loops).

use std::path::Path;

use super::chain::Chain;
use super::footer::{Footer, FOOTER_SIZE};
use super::image::VhdImage;

/// The problems found in the image at `path` (and its chain); empty if it is valid.
pub fn check(path: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    // A resize (or a coalesce's grow) cut short: the image may be half moved.
    if let Err(e) = super::journal::refuse_existing(path, &super::journal::default_path(path)) {
        problems.push(e.to_string());
    }
    match VhdImage::open(path, false) {
        Err(e) => {
            problems.push(e.to_string());
            if let Ok(copy) = read_footer_at(path, 0) {
                problems.push(format!(
                    "the footer copy at offset 0 is valid ({} disk of {} bytes): the image may be repairable",
                    copy.disk_type.name(),
                    copy.current_size
                ));
            }
        }
        Ok(image) => {
            if image.header().is_some() {
                match image.footer_copy() {
                    Err(e) => problems.push(format!("footer copy at offset 0: {e}")),
                    Ok(copy) if copy != *image.footer() => {
                        problems.push("the footer copy at offset 0 differs from the footer".into())
                    }
                    Ok(_) => {}
                }
            }
            if let Some(problem) = image.batmap().and_then(|b| b.problem.as_ref()) {
                problems.push(format!("batmap: {problem}"));
            }
            if let Some(problem) = block_before_metadata_end(&image) {
                problems.push(problem);
            }
            if image.has_parent() {
                if let Err(e) = Chain::open(path, false) {
                    problems.push(e.to_string());
                }
            }
        }
    }
    problems
}

/// The first block (in BAT order, as XenServer's check) that starts before the end of the
/// metadata (footer copy, header, BAT, batmap, parent locators' reserved space), if any.
/// `VhdImage::open` refuses a block that overlaps the metadata; one that lies between pieces of
/// it (before a locator placed after the blocks, say) reads well but XenServer's `vhd-util
/// check` reports it ("block N clobbers headers": every block must start after the end of the
/// headers, as its `vhd_end_of_headers` computes it).
fn block_before_metadata_end(image: &VhdImage) -> Option<String> {
    let end = image.end_of_metadata();
    let mut before = image
        .bat()
        .iter()
        .enumerate()
        .filter(|&(_, &s)| s != super::UNALLOCATED && u64::from(s) * 512 < end);
    let (block, &sector) = before.next()?;
    let more = before.count();
    let others = match more {
        0 => String::new(),
        1 => " (and 1 other block)".to_string(),
        n => format!(" (and {n} other blocks)"),
    };
    Some(format!(
        "block {block} at {:#x} starts before the end of the metadata at {end:#x}{others}: XenServer's vhd-util check refuses it (\"block {block} clobbers headers\")",
        u64::from(sector) * 512
    ))
}

fn read_footer_at(path: &Path, at: u64) -> Result<Footer, String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut b = [0u8; FOOTER_SIZE];
    f.read_exact_at(&mut b, at).map_err(|e| e.to_string())?;
    Footer::parse(path, &b).map_err(|e| e.to_string())
}
