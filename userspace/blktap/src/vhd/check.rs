//! Finding what is wrong with an image: everything [`VhdImage::open`] checks (cookies,
//! checksums, sizes, the BAT's entries against the file and its metadata), the footer copy of a
//! dynamic disk, and the parent chain (locators, parent UUID and size, loops).

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
            if image.has_parent() {
                if let Err(e) = Chain::open(path, false) {
                    problems.push(e.to_string());
                }
            }
        }
    }
    problems
}

fn read_footer_at(path: &Path, at: u64) -> Result<Footer, String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut b = [0u8; FOOTER_SIZE];
    f.read_exact_at(&mut b, at).map_err(|e| e.to_string())?;
    Footer::parse(path, &b).map_err(|e| e.to_string())
}
