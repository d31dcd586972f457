// SPDX-License-Identifier: GPL-2.0

//! The ring devices, `/dev/xen/blktap-2/blktapN`: one char minor per tap, in the `blktap2` region.
//!
//! A tapdisk opens the ring of its tap exclusively. Opening answers `ENXIO` if the minor is not
//! allocated (or is being freed) and `EBUSY` if the ring is already open. While the ring is open,
//! `FREE_TAP` answers `EBUSY`.

use kernel::{fs::File, prelude::*, sync::Arc};

use crate::{
    chrdev::CharDevice,
    tap::Tap,
    Blktap, //
};

/// An open ring.
///
/// # Invariants
///
/// `tap.inner.ring_open` is set for as long as this object exists.
pub(crate) struct RingFile {
    tap: Arc<Tap>,
}

impl Drop for RingFile {
    fn drop(&mut self) {
        let mut inner = self.tap.inner.lock();
        inner.ring_open = false;
        inner.ring_pid = None;
    }
}

/// The ring devices' file operations.
pub(crate) struct Ring;

#[vtable]
impl CharDevice for Ring {
    type Data = Arc<Blktap>;
    type Ptr = KBox<RingFile>;

    fn open(blktap: &Arc<Blktap>, minor: u32, _file: &File) -> Result<Self::Ptr> {
        let tap = blktap.open_ring(minor, current!().tgid_nr_ns(None))?;
        // INVARIANT: `open_ring` set `ring_open`. If the allocation fails, the `RingFile` is
        // dropped, which clears it again.
        KBox::new(RingFile { tap }, GFP_KERNEL).map_err(Into::into)
    }
}
