//! One tap served by this tapdisk: the library's [`TapCore`] over a real ring device.

use blktap::ring::Ring;
use blktap::tap::{TapCore, TapOptions};
use blktap::Result;

pub use blktap::tap::TapEvent;

/// A tap: its ring, and its image once one is open.
pub type Tap = TapCore<Ring>;

/// Opens and maps the ring of tap `minor`, with the data pages per slot of `options` (or the
/// standard 11, if the kernel refuses more). For a disk created with `RECOVERY` whose tapdisk
/// died, this mapping is when the kernel publishes the requests it kept.
pub fn attach(minor: u32, options: TapOptions) -> Result<Tap> {
    let ring = Ring::open_with(minor, options.pages_per_slot())?;
    Ok(TapCore::attach(ring, options))
}
