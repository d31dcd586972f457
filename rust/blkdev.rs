// SPDX-License-Identifier: GPL-2.0

//! Registration of a block major number, as shown in `/proc/devices`.
//!
//! C header: [`include/linux/blkdev.h`](srctree/include/linux/blkdev.h)

use kernel::{
    bindings,
    prelude::*, //
};

/// A dynamically allocated block major.
///
/// # Invariants
///
/// `major` was registered under `name` with `register_blkdev()` and is unregistered exactly once,
/// in [`Drop`].
pub struct BlockMajor {
    major: u32,
    name: &'static CStr,
}

impl BlockMajor {
    /// Allocates a block major registered as `name`.
    ///
    /// # Errors
    ///
    /// Whatever `register_blkdev()` returns, e.g. `EBUSY` when no major is free.
    pub fn register(name: &'static CStr) -> Result<Self> {
        // SAFETY: `name` is a valid C string; the block layer copies it.
        let ret = unsafe { bindings::__register_blkdev(0, name.as_char_ptr(), None) };
        if ret < 0 {
            return Err(Error::from_errno(ret));
        }
        // CAST: `ret` is a non-negative major number.
        // INVARIANT: The major was just registered under `name`.
        Ok(Self {
            major: ret as u32,
            name,
        })
    }

    /// The major number.
    pub fn major(&self) -> u32 {
        self.major
    }
}

impl Drop for BlockMajor {
    fn drop(&mut self) {
        // SAFETY: By the type invariants, `major` is registered under `name`.
        unsafe { bindings::unregister_blkdev(self.major, self.name.as_char_ptr()) };
    }
}
