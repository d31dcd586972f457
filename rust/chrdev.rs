// SPDX-License-Identifier: GPL-2.0

//! Character device regions and a `struct cdev` served by a Rust trait.
//!
//! [`ChrdevRegion`] allocates a dynamic major with a range of minors, shown by name in
//! `/proc/devices`. [`Cdev`] adds a `struct cdev` over the whole region whose file operations call a
//! [`CharDevice`] implementation; `open` receives the registration's data and the minor opened, so
//! one registration serves every minor.
//!
//! C header: [`include/linux/cdev.h`](srctree/include/linux/cdev.h)

use core::marker::PhantomData;

use kernel::{
    bindings,
    error::to_result,
    error::VTABLE_DEFAULT_ERROR,
    ffi::{
        c_int,
        c_long,
        c_uint,
        c_ulong, //
    },
    fs::File,
    mm::virt::VmaNew,
    module::this_module,
    prelude::*,
    sync::poll::PollTable,
    types::{
        ForeignOwnable,
        Opaque, //
    },
};

/// Readiness bits a [`CharDevice::poll`] returns.
pub mod poll_bits {
    use kernel::bindings;

    /// Data to read (`POLLIN`).
    pub const IN: u32 = bindings::POLLIN;
    /// Normal data to read (`POLLRDNORM`).
    pub const RDNORM: u32 = bindings::POLLRDNORM;
    /// An error condition (`POLLERR`).
    pub const ERR: u32 = bindings::POLLERR;
}

/// A range of character device numbers under one dynamic major.
///
/// # Invariants
///
/// `first..first + count` was allocated with `alloc_chrdev_region()` and is released exactly once,
/// in [`Drop`].
pub struct ChrdevRegion {
    first: bindings::dev_t,
    count: u32,
}

impl ChrdevRegion {
    /// Allocates `count` minors, starting at minor 0 of a dynamic major registered as `name`.
    ///
    /// # Errors
    ///
    /// Whatever `alloc_chrdev_region()` returns, e.g. `EBUSY` when no major is free.
    pub fn alloc(count: u32, name: &'static CStr) -> Result<Self> {
        let mut first: bindings::dev_t = 0;
        // SAFETY: `first` is a valid place for the result and `name` a valid C string, which the
        // kernel copies.
        to_result(unsafe {
            bindings::alloc_chrdev_region(&mut first, 0, count, name.as_char_ptr())
        })?;
        // INVARIANT: The region was just allocated.
        Ok(Self { first, count })
    }

    /// The major number of the region.
    pub fn major(&self) -> u32 {
        self.first >> bindings::MINORBITS
    }

    /// The device number of `minor` in this region, if it is inside it.
    pub fn devt(&self, minor: u32) -> Option<bindings::dev_t> {
        (minor < self.count).then(|| self.first + minor)
    }
}

impl Drop for ChrdevRegion {
    fn drop(&mut self) {
        // SAFETY: By the type invariants, the region is allocated.
        unsafe { bindings::unregister_chrdev_region(self.first, self.count) };
    }
}

/// File operations of a character device registered with [`Cdev`].
#[vtable]
pub trait CharDevice: Sized {
    /// Data shared by every open of every minor of the registration.
    type Data: Send + Sync;

    /// Per-open state, kept in the file's private data.
    type Ptr: ForeignOwnable + Send + Sync;

    /// Opens minor `minor` (relative to the region's first minor).
    fn open(data: &Self::Data, minor: u32, file: &File) -> Result<Self::Ptr>;

    /// Releases a file when its last reference is dropped.
    fn release(ptr: Self::Ptr, _file: &File) {
        drop(ptr);
    }

    /// Sets up a new mapping of the file.
    fn mmap(
        _ptr: <Self::Ptr as ForeignOwnable>::Borrowed<'_>,
        _file: &File,
        _vma: &VmaNew,
    ) -> Result {
        build_error!(VTABLE_DEFAULT_ERROR)
    }

    /// Registers `table` with the file's wait queues and returns the ready events (`POLL*`).
    fn poll(
        _ptr: <Self::Ptr as ForeignOwnable>::Borrowed<'_>,
        _file: &File,
        _table: PollTable<'_>,
    ) -> u32 {
        build_error!(VTABLE_DEFAULT_ERROR)
    }

    /// Handles an `ioctl`.
    fn ioctl(
        _ptr: <Self::Ptr as ForeignOwnable>::Borrowed<'_>,
        _file: &File,
        _cmd: u32,
        _arg: usize,
    ) -> Result<isize> {
        build_error!(VTABLE_DEFAULT_ERROR)
    }
}

/// A `struct cdev` covering a whole [`ChrdevRegion`].
///
/// The registration must be dropped before its region; a driver keeps both in its module object,
/// declared in that order. Open files pin the module (the file operations' owner), so they never
/// outlive the registration.
///
/// # Invariants
///
/// - `cdev` was initialised with `cdev_init()` for this type's file operations and added with
///   `cdev_add()`; it is deleted exactly once, in [`Drop`].
/// - `data` is initialised before `cdev` is added and dropped after it is deleted.
#[pin_data(PinnedDrop)]
pub struct Cdev<T: CharDevice> {
    data: T::Data,
    #[pin]
    cdev: Opaque<bindings::cdev>,
    first_minor: u32,
}

// SAFETY: `cdev_del` may be called from any thread; `data` is `Send`.
unsafe impl<T: CharDevice> Send for Cdev<T> {}
// SAFETY: `&self` methods only read `data`, which is `Sync`.
unsafe impl<T: CharDevice> Sync for Cdev<T> {}

impl<T: CharDevice> Cdev<T> {
    /// Adds a character device over all of `region`, served by `T`.
    ///
    /// # Errors
    ///
    /// Whatever `cdev_add()` returns.
    pub fn register(region: &ChrdevRegion, data: T::Data) -> impl PinInit<Self, Error> {
        let first = region.first;
        let count = region.count;
        try_pin_init!(Self {
            data,
            first_minor: first & ((1 << bindings::MINORBITS) - 1),
            cdev <- Opaque::try_ffi_init(move |slot: *mut bindings::cdev| {
                // SAFETY: `slot` is valid for writes; `cdev_init()` initialises all of it.
                unsafe { bindings::cdev_init(slot, FopsVTable::<T>::build()) };
                // SAFETY: `slot` was just initialised.
                unsafe { (*slot).owner = this_module::<T::OwnerModule>().as_ptr() };
                // SAFETY: `slot` is an initialised, pinned cdev; it is deleted in `drop` before its
                // memory goes away.
                // INVARIANT: On success the cdev is added.
                to_result(unsafe { bindings::cdev_add(slot, first, count) })
            }),
        })
    }
}

#[pinned_drop]
impl<T: CharDevice> PinnedDrop for Cdev<T> {
    fn drop(self: Pin<&mut Self>) {
        // SAFETY: By the type invariants, the cdev was added.
        unsafe { bindings::cdev_del(self.cdev.get()) };
    }
}

struct FopsVTable<T: CharDevice>(PhantomData<T>);

impl<T: CharDevice> FopsVTable<T> {
    /// # Safety
    ///
    /// `inode` and `file` are an inode of a `Cdev<T>` and a file being opened on it.
    unsafe extern "C" fn open(inode: *mut bindings::inode, file: *mut bindings::file) -> c_int {
        // SAFETY: `chrdev_open()` set `i_cdev` to our cdev and holds a reference on it (and on the
        // module) for the duration of this call.
        let cdev = unsafe { (*inode).__bindgen_anon_5.i_cdev };
        let raw = Opaque::cast_from(cdev.cast_const());
        // SAFETY: Every cdev with these file operations is the `cdev` field of a `Cdev<T>`.
        let this = unsafe { &*kernel::container_of!(raw.cast_mut(), Cdev<T>, cdev) };
        // SAFETY: `inode` is valid; `i_rdev` does not change while it is open.
        let rdev = unsafe { (*inode).i_rdev };
        let minor = (rdev & ((1 << bindings::MINORBITS) - 1)) - this.first_minor;
        // SAFETY: The file is valid for the duration of the call, with no `fdget_pos` region.
        let f = unsafe { File::from_raw_file(file) };
        match T::open(&this.data, minor, f) {
            Ok(ptr) => {
                // SAFETY: `open` owns the file's private data.
                unsafe { (*file).private_data = ptr.into_foreign().cast() };
                0
            }
            Err(e) => e.to_errno(),
        }
    }

    /// # Safety
    ///
    /// `file` is a file of a `Cdev<T>` being released.
    unsafe extern "C" fn release(_inode: *mut bindings::inode, file: *mut bindings::file) -> c_int {
        // SAFETY: `release` owns the private data, set by a successful `open`.
        let ptr = unsafe { <T::Ptr as ForeignOwnable>::from_foreign((*file).private_data.cast()) };
        // SAFETY: The file is valid for the duration of the call, with no `fdget_pos` region.
        T::release(ptr, unsafe { File::from_raw_file(file) });
        0
    }

    /// # Safety
    ///
    /// `file` is an open file of a `Cdev<T>`.
    unsafe extern "C" fn ioctl(file: *mut bindings::file, cmd: c_uint, arg: c_ulong) -> c_long {
        // SAFETY: Between `open` and `release` the private data may be borrowed.
        let ptr = unsafe { <T::Ptr as ForeignOwnable>::borrow((*file).private_data.cast()) };
        // SAFETY: The file is valid for the duration of the call, with no `fdget_pos` region.
        let f = unsafe { File::from_raw_file(file) };
        match T::ioctl(ptr, f, cmd, arg) {
            // CAST: ioctl results fit `c_long` (`isize`).
            Ok(ret) => ret as c_long,
            Err(e) => e.to_errno() as c_long,
        }
    }

    /// # Safety
    ///
    /// `file` is an open file of a `Cdev<T>` and `vma` a mapping of it being set up.
    unsafe extern "C" fn mmap(
        file: *mut bindings::file,
        vma: *mut bindings::vm_area_struct,
    ) -> c_int {
        // SAFETY: Between `open` and `release` the private data may be borrowed.
        let ptr = unsafe { <T::Ptr as ForeignOwnable>::borrow((*file).private_data.cast()) };
        // SAFETY: The file is valid for the duration of the call, with no `fdget_pos` region.
        let f = unsafe { File::from_raw_file(file) };
        // SAFETY: `vma` is a mapping undergoing its initial set-up, as `mmap` is called.
        let area = unsafe { VmaNew::from_raw(vma) };
        match T::mmap(ptr, f, area) {
            Ok(()) => 0,
            Err(e) => e.to_errno(),
        }
    }

    /// # Safety
    ///
    /// `file` is an open file of a `Cdev<T>` and `table` a poll table or null.
    unsafe extern "C" fn poll(
        file: *mut bindings::file,
        table: *mut bindings::poll_table_struct,
    ) -> bindings::__poll_t {
        // SAFETY: Between `open` and `release` the private data may be borrowed.
        let ptr = unsafe { <T::Ptr as ForeignOwnable>::borrow((*file).private_data.cast()) };
        // SAFETY: The file is valid for the duration of the call, with no `fdget_pos` region.
        let f = unsafe { File::from_raw_file(file) };
        // SAFETY: `table` is the poll table of this `poll` call, valid for its duration.
        let table = unsafe { PollTable::from_raw(table) };
        T::poll(ptr, f, table)
    }

    const VTABLE: bindings::file_operations = bindings::file_operations {
        open: Some(Self::open),
        release: Some(Self::release),
        mmap: if T::HAS_MMAP { Some(Self::mmap) } else { None },
        poll: if T::HAS_POLL { Some(Self::poll) } else { None },
        unlocked_ioctl: if T::HAS_IOCTL {
            Some(Self::ioctl)
        } else {
            None
        },
        owner: this_module::<T::OwnerModule>().as_ptr(),
        ..pin_init::zeroed()
    };

    const fn build() -> &'static bindings::file_operations {
        &Self::VTABLE
    }
}
