// SPDX-License-Identifier: GPL-2.0

//! A page with a permanent kernel address, for memory shared with user space that the kernel
//! reads and writes field by field (a ring header), where [`Page`]'s map-per-access methods do
//! not fit.
//!
//! C header: [`include/linux/mm.h`](srctree/include/linux/mm.h) (`page_address`)

use core::ptr::NonNull;

use kernel::{
    page::{
        Page,
        PAGE_SIZE, //
    },
    prelude::*,
    transmute::{
        AsBytes,
        FromBytes, //
    },
};

mod ffi {
    use kernel::bindings;

    #[allow(improper_ctypes, reason = "opaque pointers only")]
    extern "C" {
        pub(super) fn blktap_page_address(page: *mut bindings::page) -> *mut core::ffi::c_void;
    }
}

/// A zeroed lowmem page and its kernel address.
///
/// # Invariants
///
/// `addr` is the kernel address of `page`, which was allocated without `__GFP_HIGHMEM`, so it
/// stays valid for `PAGE_SIZE` bytes while `page` lives.
pub struct LowmemPage {
    page: Page,
    addr: NonNull<u8>,
}

// SAFETY: The page is owned; the address is only used through `&self` methods whose callers
// order their accesses (the memory may be shared with user space).
unsafe impl Send for LowmemPage {}
// SAFETY: As above.
unsafe impl Sync for LowmemPage {}

impl LowmemPage {
    /// Allocates a zeroed page.
    ///
    /// # Errors
    ///
    /// `ENOMEM`.
    pub fn alloc_zeroed() -> Result<Self> {
        let page = Page::alloc_page(GFP_KERNEL | __GFP_ZERO)?;
        // SAFETY: `page` is a live page allocated without `__GFP_HIGHMEM`.
        let addr = unsafe { ffi::blktap_page_address(page.as_ptr()) }.cast::<u8>();
        let addr = NonNull::new(addr).ok_or(ENOMEM)?;
        // INVARIANT: `addr` is `page`'s address, and the page is lowmem.
        Ok(Self { page, addr })
    }

    /// The page.
    pub fn page(&self) -> &Page {
        &self.page
    }

    /// The address of a `T` at byte `offset`, if it lies inside the page and is aligned.
    fn field<T>(&self, offset: usize) -> Result<*mut T> {
        let end = offset.checked_add(size_of::<T>()).ok_or(EINVAL)?;
        if end > PAGE_SIZE || offset % align_of::<T>() != 0 {
            return Err(EINVAL);
        }
        // SAFETY: `offset` is inside the page (checked), so the result is inside the allocation.
        Ok(unsafe { self.addr.as_ptr().add(offset) }.cast::<T>())
    }

    /// Reads the `T` at byte `offset` once (a volatile read: user space may change it at any
    /// time, and any bit pattern is a valid `T`).
    ///
    /// # Errors
    ///
    /// `EINVAL` unless the `T` lies inside the page and is aligned.
    pub fn read_volatile<T: FromBytes + Copy>(&self, offset: usize) -> Result<T> {
        let p = self.field::<T>(offset)?;
        // SAFETY: `p` is inside the page, aligned, and valid for reads while `self` lives; any
        // bit pattern is a valid `T`.
        Ok(unsafe { core::ptr::read_volatile(p) })
    }

    /// Writes `value` at byte `offset` (a volatile write: user space may read it at any time).
    ///
    /// # Errors
    ///
    /// `EINVAL` unless the `T` lies inside the page and is aligned.
    pub fn write_volatile<T: AsBytes + Copy>(&self, offset: usize, value: T) -> Result {
        let p = self.field::<T>(offset)?;
        // SAFETY: `p` is inside the page, aligned, and valid for writes while `self` lives.
        unsafe { core::ptr::write_volatile(p, value) };
        Ok(())
    }

    /// Zeroes the page.
    pub fn zero(&self) {
        // SAFETY: By the type invariants the page is mapped at `addr` for `PAGE_SIZE` bytes.
        unsafe { core::ptr::write_bytes(self.addr.as_ptr(), 0, PAGE_SIZE) };
    }
}
