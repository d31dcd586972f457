// SPDX-License-Identifier: GPL-2.0

//! Mappings that stay where they were made, each vma holding a reference to the driver object
//! that serves it.
//!
//! [`FixedMapping::install`] sets a new vma's operations: every vma of the mapping (the first,
//! and the copy `mremap` makes before asking) holds one `Arc<T>`, released when that vma closes;
//! `mremap` and splitting (a partial `munmap` or `mprotect`) are refused with `EINVAL`. The
//! driver hears of each copy ([`FixedMapping::opened`]) and each close
//! ([`FixedMapping::closed`]), so it knows when the last vma is gone.
//!
//! Also the vma's page offset, which `VmaRef` does not expose.
//!
//! C header: [`include/linux/mm.h`](srctree/include/linux/mm.h)

use core::{
    marker::PhantomData,
    mem::ManuallyDrop, //
};

use kernel::{
    bindings,
    mm::virt::{
        VmaNew,
        VmaRef, //
    },
    prelude::*,
    sync::Arc,
};

mod ffi {
    use kernel::bindings;

    #[allow(improper_ctypes, reason = "opaque pointers only")]
    extern "C" {
        pub(super) fn blktap_vma_set_ops(
            vma: *mut bindings::vm_area_struct,
            ops: *const bindings::vm_operations_struct,
            private_data: *mut core::ffi::c_void,
        );
        pub(super) fn blktap_vma_private(
            vma: *mut bindings::vm_area_struct,
        ) -> *mut core::ffi::c_void;
        pub(super) fn blktap_vma_pgoff(vma: *mut bindings::vm_area_struct) -> usize;
    }
}

/// The page offset the vma maps at (`vm_pgoff`).
pub fn pgoff(vma: &VmaRef) -> usize {
    // SAFETY: `vma` is a live vma (the caller holds the mmap lock, by `VmaRef`'s invariants).
    unsafe { ffi::blktap_vma_pgoff(vma.as_ptr()) }
}

/// A driver object whose mappings are fixed.
pub trait FixedMapping: Send + Sync + Sized + 'static {
    /// The mm copied a vma of the mapping (`mremap`, which is then refused and closes the copy).
    fn opened(this: &Arc<Self>);

    /// A vma of the mapping closed; `this` is its reference.
    fn closed(this: Arc<Self>);

    /// Makes `vma` a fixed mapping served by `owner`, which the vma keeps until it closes.
    fn install(vma: &VmaNew, owner: Arc<Self>) {
        let private = Arc::into_raw(owner).cast_mut().cast();
        // SAFETY: `vma` is being set up by the `mmap` call that gave it; the ops are static and
        // `private` is released by `close`, once per vma.
        unsafe { ffi::blktap_vma_set_ops(vma.as_ptr(), &Ops::<Self>::OPS, private) };
    }
}

struct Ops<T>(PhantomData<T>);

impl<T: FixedMapping> Ops<T> {
    /// # Safety
    ///
    /// Called by the mm with a copy of a vma set up by [`FixedMapping::install`] (or by this
    /// function), whose private data is the original's `Arc<T>`.
    unsafe extern "C" fn open(vma: *mut bindings::vm_area_struct) {
        // SAFETY: The private data is an `Arc<T>` from `into_raw`, owned by the original vma,
        // which lives during this call; it is not dropped here.
        let this = ManuallyDrop::new(unsafe {
            Arc::from_raw(ffi::blktap_vma_private(vma).cast::<T>().cast_const())
        });
        // The copy's own reference, released by its `close`.
        let _ = ManuallyDrop::new(Arc::clone(&this));
        T::opened(&this);
    }

    /// # Safety
    ///
    /// Called by the mm, once, with a vma set up by [`FixedMapping::install`] or [`Self::open`]
    /// as it goes away.
    unsafe extern "C" fn close(vma: *mut bindings::vm_area_struct) {
        // SAFETY: Each such vma holds one reference from `into_raw` (`install`) or `clone`
        // (`open`) as its private data; `close` runs once per vma.
        let this = unsafe { Arc::from_raw(ffi::blktap_vma_private(vma).cast::<T>().cast_const()) };
        T::closed(this);
    }

    /// # Safety
    ///
    /// Called by the mm with the copy of a vma that `mremap` made.
    unsafe extern "C" fn mremap(_vma: *mut bindings::vm_area_struct) -> i32 {
        // The mapping stays where it was made; the mm closes the copy.
        EINVAL.to_errno()
    }

    /// # Safety
    ///
    /// Called by the mm with a vma of the mapping.
    unsafe extern "C" fn may_split(_vma: *mut bindings::vm_area_struct, _addr: usize) -> i32 {
        // All or nothing.
        EINVAL.to_errno()
    }

    const OPS: bindings::vm_operations_struct = bindings::vm_operations_struct {
        open: Some(Self::open),
        close: Some(Self::close),
        may_split: Some(Self::may_split),
        mremap: Some(Self::mremap),
        ..pin_init::zeroed()
    };
}
