// SPDX-License-Identifier: GPL-2.0

//! Device classes with attributes, devtmpfs node placement, and class devices with attributes.
//!
//! - [`Class`] registers a `struct class`. Its data implements [`ClassAttributes`], which serves the
//!   class's sysfs attributes (`/sys/class/<name>/<attr>`). Devices of the class can get their
//!   devtmpfs nodes in a directory of the class's choosing with a given mode
//!   ([`ClassAttributes::NODE_DIR`], [`ClassAttributes::NODE_MODE`]).
//! - [`ClassDevice`] creates a device of the class with a `dev_t`, whose sysfs attributes are
//!   served by its data, an `Arc<T>` with `T: DeviceAttributes`.
//! - Attributes are declared as statics with [`ClassAttribute::new`] and [`DeviceAttribute::new`],
//!   so sysfs and lockdep see them in static memory, and dispatched by name.
//!
//! C header: [`include/linux/device/class.h`](srctree/include/linux/device/class.h)

use core::{
    fmt,
    ptr, //
};

use kernel::{
    bindings,
    error::to_result,
    ffi::c_char,
    prelude::*,
    str::CString,
    sync::Arc,
    types::Opaque, //
};

/// Size of the buffer sysfs gives a `show` callback.
const SYSFS_BUF_SIZE: usize = bindings::PAGE_SIZE;

/// Output of a sysfs `show` callback: at most one page.
///
/// # Invariants
///
/// `len <= buf.len()`.
pub struct SysfsBuf<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl SysfsBuf<'_> {
    /// Appends raw bytes, e.g. a name that need not be UTF-8.
    ///
    /// # Errors
    ///
    /// `EFBIG` if they do not fit in the page.
    pub fn write_bytes(&mut self, bytes: &[u8]) -> Result {
        let end = self.len.checked_add(bytes.len()).ok_or(EFBIG)?;
        self.buf
            .get_mut(self.len..end)
            .ok_or(EFBIG)?
            .copy_from_slice(bytes);
        // INVARIANT: `end <= buf.len()`, checked by `get_mut`.
        self.len = end;
        Ok(())
    }
}

impl fmt::Write for SysfsBuf<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes()).map_err(|_| fmt::Error)
    }
}

/// Runs `f` on the page that sysfs passed to a `show` callback, and returns what the callback must
/// return: the length written, or a negative errno.
///
/// # Safety
///
/// `buf` points to a writable buffer of [`SYSFS_BUF_SIZE`] bytes, unaliased during the call.
unsafe fn show_into(buf: *mut c_char, f: impl FnOnce(&mut SysfsBuf<'_>) -> Result) -> isize {
    // SAFETY: By the safety requirements, `buf` is a page we may write.
    let page = unsafe { core::slice::from_raw_parts_mut(buf.cast::<u8>(), SYSFS_BUF_SIZE) };
    // INVARIANT: Nothing written yet.
    let mut out = SysfsBuf { buf: page, len: 0 };
    match f(&mut out) {
        // CAST: At most a page was written.
        Ok(()) => out.len as isize,
        Err(e) => e.to_errno() as isize,
    }
}

/// Runs `f` on the input that sysfs passed to a `store` callback, and returns what the callback
/// must return: `count` on success, or a negative errno.
///
/// # Safety
///
/// `buf` points to `count` readable bytes that stay unchanged during the call.
unsafe fn store_from(buf: *const c_char, count: usize, f: impl FnOnce(&[u8]) -> Result) -> isize {
    // SAFETY: By the safety requirements, `buf` holds `count` bytes.
    let input = unsafe { core::slice::from_raw_parts(buf.cast::<u8>(), count) };
    match f(input) {
        // CAST: sysfs input is at most a page long.
        Ok(()) => count as isize,
        Err(e) => e.to_errno() as isize,
    }
}

/// Returns the name of a sysfs attribute.
///
/// # Safety
///
/// `attr` is a valid attribute whose name is a static C string.
unsafe fn attr_name<'a>(attr: *const bindings::attribute) -> &'a CStr {
    // SAFETY: By the safety requirements.
    unsafe { CStr::from_char_ptr((*attr).name) }
}

/// A `struct attribute` named `name` with permissions `mode`.
#[allow(
    clippy::needless_update,
    reason = "with lockdep, `struct attribute` has more fields, which must be zero"
)]
#[allow(
    clippy::disallowed_methods,
    reason = "`as_char_ptr` is not `const`; the cast gives the kernel's `c_char`"
)]
const fn attribute(name: &'static CStr, mode: u16) -> bindings::attribute {
    bindings::attribute {
        name: name.as_ptr().cast(),
        mode,
        ..pin_init::zeroed()
    }
}

/// The data of a [`Class`]: serves its attributes and places its device nodes.
pub trait ClassAttributes: Send + Sync + Sized {
    /// The class's attributes.
    const ATTRIBUTES: &'static [ClassAttribute];

    /// Directory under `/dev` for the nodes of this class's devices: a device named `a/b` gets its
    /// node at `/dev/<NODE_DIR>/b`. `None` keeps the kernel's default (`/dev/a/b`).
    const NODE_DIR: Option<&'static CStr> = None;

    /// Permissions of the device nodes; 0 keeps the kernel's default.
    const NODE_MODE: u16 = 0;

    /// Writes the value of attribute `name`.
    fn show(&self, name: &CStr, out: &mut SysfsBuf<'_>) -> Result;

    /// Stores `input` into attribute `name`.
    fn store(&self, _name: &CStr, _input: &[u8]) -> Result {
        Err(EACCES)
    }
}

/// A class attribute, for a `static` list in [`ClassAttributes::ATTRIBUTES`].
#[repr(transparent)]
pub struct ClassAttribute(bindings::class_attribute);

// SAFETY: The C struct is never changed after construction; its pointers are to static strings
// and functions.
unsafe impl Sync for ClassAttribute {}

impl ClassAttribute {
    /// An attribute `name` with permissions `mode` (0444 read-only, 0644 read-write), served by the
    /// data of a `Class<T>`.
    pub const fn new<T: ClassAttributes>(name: &'static CStr, mode: u16) -> Self {
        Self(bindings::class_attribute {
            attr: attribute(name, mode),
            show: Some(Class::<T>::show),
            store: if mode & 0o222 != 0 {
                Some(Class::<T>::store)
            } else {
                None
            },
        })
    }
}

/// A registered device class.
///
/// # Invariants
///
/// - `class` is registered with `class_register()` for the whole life of this object and
///   unregistered exactly once, in [`Drop`], after its attribute files are removed.
/// - `data` is initialised before the class is registered and dropped after it is unregistered.
#[pin_data(PinnedDrop)]
pub struct Class<T: ClassAttributes> {
    data: T,
    #[pin]
    class: Opaque<bindings::class>,
}

// SAFETY: Classes may be unregistered from any thread; `T` is `Send`.
unsafe impl<T: ClassAttributes> Send for Class<T> {}
// SAFETY: `&self` methods only read `data`, which is `Sync`, and the class pointer.
unsafe impl<T: ClassAttributes> Sync for Class<T> {}

impl<T: ClassAttributes> Class<T> {
    /// Registers class `name` with `data` serving its attributes.
    ///
    /// # Errors
    ///
    /// Whatever `class_register()` or `class_create_file()` return.
    pub fn register(name: &'static CStr, data: T) -> impl PinInit<Self, Error> {
        try_pin_init!(Self {
            data,
            class <- Opaque::try_ffi_init(move |slot: *mut bindings::class| {
                // SAFETY: `slot` is valid for writes.
                unsafe {
                    slot.write(bindings::class {
                        name: name.as_char_ptr(),
                        devnode: Some(Self::devnode),
                        ..pin_init::zeroed()
                    })
                };
                // SAFETY: `slot` holds a set-up class with static strings; it is pinned and
                // unregistered in `drop`.
                to_result(unsafe { bindings::class_register(slot) })?;
                for (i, attr) in T::ATTRIBUTES.iter().enumerate() {
                    // SAFETY: The class is registered and the attribute is static.
                    let ret = unsafe { bindings::class_create_file_ns(slot, &attr.0, ptr::null()) };
                    if let Err(e) = to_result(ret) {
                        for done in &T::ATTRIBUTES[..i] {
                            // SAFETY: This file was created above.
                            unsafe { bindings::class_remove_file_ns(slot, &done.0, ptr::null()) };
                        }
                        // SAFETY: The class was registered above.
                        unsafe { bindings::class_unregister(slot) };
                        return Err(e);
                    }
                }
                // INVARIANT: The class is registered with its attribute files.
                Ok(())
            }),
        })
    }

    /// The class's data.
    pub fn data(&self) -> &T {
        &self.data
    }

    /// The registered C `struct class`.
    pub fn as_raw(&self) -> *mut bindings::class {
        self.class.get()
    }

    /// # Safety
    ///
    /// `class` is the `class` field of a live `Class<T>`.
    unsafe fn from_raw<'a>(class: *const bindings::class) -> &'a Self {
        let raw = Opaque::cast_from(class);
        // SAFETY: By the safety requirements, the container is a live `Class<T>`.
        unsafe { &*kernel::container_of!(raw.cast_mut(), Self, class) }
    }

    /// # Safety
    ///
    /// Called by sysfs with a `Class<T>`, one of its attributes and a page-sized buffer.
    unsafe extern "C" fn show(
        class: *const bindings::class,
        attr: *const bindings::class_attribute,
        buf: *mut c_char,
    ) -> isize {
        // SAFETY: sysfs calls this only while the class and its attribute files exist.
        let this = unsafe { Self::from_raw(class) };
        // SAFETY: `attr` is one of our static attributes.
        let name = unsafe { attr_name(&raw const (*attr).attr) };
        // SAFETY: sysfs passes a page-sized buffer.
        unsafe { show_into(buf, |out| this.data.show(name, out)) }
    }

    /// # Safety
    ///
    /// Called by sysfs with a `Class<T>`, one of its attributes and `count` bytes of input.
    unsafe extern "C" fn store(
        class: *const bindings::class,
        attr: *const bindings::class_attribute,
        buf: *const c_char,
        count: usize,
    ) -> isize {
        // SAFETY: sysfs calls this only while the class and its attribute files exist.
        let this = unsafe { Self::from_raw(class) };
        // SAFETY: `attr` is one of our static attributes.
        let name = unsafe { attr_name(&raw const (*attr).attr) };
        // SAFETY: sysfs passes `count` bytes of input.
        unsafe { store_from(buf, count, |input| this.data.store(name, input)) }
    }

    /// # Safety
    ///
    /// Called by the driver core with a device of this class, and a valid or null `mode`.
    unsafe extern "C" fn devnode(dev: *const bindings::device, mode: *mut u16) -> *mut c_char {
        if !mode.is_null() && T::NODE_MODE != 0 {
            // SAFETY: `mode` is valid for writes when not null.
            unsafe { *mode = T::NODE_MODE };
        }
        let Some(dir) = T::NODE_DIR else {
            return ptr::null_mut();
        };
        // SAFETY: `dev` is a registered device, whose kobject name is set.
        let name = unsafe { CStr::from_char_ptr((*dev).kobj.name) };
        let bytes = name.to_bytes();
        // The driver core stores a device named `a/b` as `a!b`, as sysfs names cannot hold `/`.
        let base = match bytes.iter().rposition(|&b| b == b'/' || b == b'!') {
            Some(i) => &bytes[i + 1..],
            None => bytes,
        };
        let Ok(base) = core::str::from_utf8(base) else {
            return ptr::null_mut();
        };
        let Ok(dir) = dir.to_str() else {
            return ptr::null_mut();
        };
        match CString::try_from_fmt(fmt!("{dir}/{base}")) {
            // SAFETY: `path` is a valid C string; the driver core frees the copy with `kfree()`.
            Ok(path) => unsafe { bindings::kstrdup(path.as_char_ptr(), bindings::GFP_KERNEL) },
            Err(_) => ptr::null_mut(),
        }
    }
}

#[pinned_drop]
impl<T: ClassAttributes> PinnedDrop for Class<T> {
    fn drop(self: Pin<&mut Self>) {
        for attr in T::ATTRIBUTES {
            // SAFETY: By the type invariants, the class is registered with this attribute file.
            unsafe { bindings::class_remove_file_ns(self.as_raw(), &attr.0, ptr::null()) };
        }
        // SAFETY: By the type invariants, the class is registered.
        unsafe { bindings::class_unregister(self.as_raw()) };
    }
}

/// The data of a [`ClassDevice`]: serves its attributes.
pub trait DeviceAttributes: Send + Sync + Sized {
    /// The device's attributes.
    const ATTRIBUTES: &'static [DeviceAttribute];

    /// Writes the value of attribute `name`.
    fn show(&self, name: &CStr, out: &mut SysfsBuf<'_>) -> Result;

    /// Stores `input` into attribute `name`.
    fn store(&self, _name: &CStr, _input: &[u8]) -> Result {
        Err(EACCES)
    }
}

/// A device attribute, for a `static` list in [`DeviceAttributes::ATTRIBUTES`].
#[repr(transparent)]
pub struct DeviceAttribute(bindings::device_attribute);

// SAFETY: The C struct is never changed after construction; its pointers are to static strings
// and functions.
unsafe impl Sync for DeviceAttribute {}

impl DeviceAttribute {
    /// An attribute `name` with permissions `mode`, served by the data of a `ClassDevice<T>`.
    pub const fn new<T: DeviceAttributes>(name: &'static CStr, mode: u16) -> Self {
        Self(bindings::device_attribute {
            attr: attribute(name, mode),
            __bindgen_anon_1: bindings::device_attribute__bindgen_ty_1 {
                show: Some(ClassDevice::<T>::show),
            },
            __bindgen_anon_2: bindings::device_attribute__bindgen_ty_2 {
                store: if mode & 0o222 != 0 {
                    Some(ClassDevice::<T>::store)
                } else {
                    None
                },
            },
        })
    }
}

/// A device of a [`Class`], with a device number and attributes.
///
/// # Invariants
///
/// - `dev` was created with `device_create()` in a class that outlives this object, with driver
///   data pointing to `data`'s value; it is unregistered exactly once, in [`Drop`], after its
///   attribute files are removed.
/// - `data` is kept alive until `dev` is unregistered, so sysfs callbacks always see live data.
pub struct ClassDevice<T: DeviceAttributes> {
    dev: *mut bindings::device,
    data: Arc<T>,
}

// SAFETY: Devices may be unregistered from any thread; `Arc<T>` is `Send` for `T: Send + Sync`.
unsafe impl<T: DeviceAttributes> Send for ClassDevice<T> {}
// SAFETY: No `&self` method touches `dev`.
unsafe impl<T: DeviceAttributes> Sync for ClassDevice<T> {}

impl<T: DeviceAttributes> ClassDevice<T> {
    /// Creates device `name` (e.g. `blktap/blktap3`) with number `devt` in `class`, serving its
    /// attributes from `data`. If `devt` is not 0, devtmpfs makes a node for it.
    ///
    /// The device must be dropped before `class`.
    ///
    /// # Errors
    ///
    /// `ENOMEM`, or whatever `device_create()` and `device_create_file()` return.
    pub fn create<C: ClassAttributes>(
        class: &Class<C>,
        devt: bindings::dev_t,
        data: Arc<T>,
        name: fmt::Arguments<'_>,
    ) -> Result<Self> {
        let name = CString::try_from_fmt(name)?;
        let drvdata = Arc::as_ptr(&data).cast_mut().cast();
        // SAFETY: `class` is registered; the format is a static "%s" with one C string argument.
        let dev = unsafe {
            bindings::device_create(
                class.as_raw(),
                ptr::null_mut(),
                devt,
                drvdata,
                c"%s".as_char_ptr(),
                name.as_char_ptr(),
            )
        };
        let dev = kernel::error::from_err_ptr(dev)?;
        for (i, attr) in T::ATTRIBUTES.iter().enumerate() {
            // SAFETY: `dev` was just created; the attribute is static.
            if let Err(e) = to_result(unsafe { bindings::device_create_file(dev, &attr.0) }) {
                for done in &T::ATTRIBUTES[..i] {
                    // SAFETY: This file was created above.
                    unsafe { bindings::device_remove_file(dev, &done.0) };
                }
                // SAFETY: `dev` was created above and is not used after this.
                unsafe { bindings::device_unregister(dev) };
                return Err(e);
            }
        }
        // INVARIANT: `dev` is created with its attribute files and driver data pointing to `data`.
        Ok(Self { dev, data })
    }

    /// The device's data.
    pub fn data(&self) -> &Arc<T> {
        &self.data
    }

    /// # Safety
    ///
    /// `dev` is a device created by a live `ClassDevice<T>`.
    unsafe fn data_of<'a>(dev: *mut bindings::device) -> &'a T {
        // SAFETY: By the type invariants of `ClassDevice`, the driver data points to a `T` kept
        // alive until the device is unregistered, which waits for running sysfs callbacks.
        unsafe { &*(*dev).driver_data.cast::<T>() }
    }

    /// # Safety
    ///
    /// Called by sysfs with a device of a `ClassDevice<T>`, one of its attributes and a page.
    unsafe extern "C" fn show(
        dev: *mut bindings::device,
        attr: *mut bindings::device_attribute,
        buf: *mut c_char,
    ) -> isize {
        // SAFETY: sysfs calls this only while the attribute file exists.
        let data = unsafe { Self::data_of(dev) };
        // SAFETY: `attr` is one of our static attributes.
        let name = unsafe { attr_name(&raw const (*attr).attr) };
        // SAFETY: sysfs passes a page-sized buffer.
        unsafe { show_into(buf, |out| data.show(name, out)) }
    }

    /// # Safety
    ///
    /// Called by sysfs with a device of a `ClassDevice<T>`, one of its attributes and `count`
    /// bytes of input.
    unsafe extern "C" fn store(
        dev: *mut bindings::device,
        attr: *mut bindings::device_attribute,
        buf: *const c_char,
        count: usize,
    ) -> isize {
        // SAFETY: sysfs calls this only while the attribute file exists.
        let data = unsafe { Self::data_of(dev) };
        // SAFETY: `attr` is one of our static attributes.
        let name = unsafe { attr_name(&raw const (*attr).attr) };
        // SAFETY: sysfs passes `count` bytes of input.
        unsafe { store_from(buf, count, |input| data.store(name, input)) }
    }
}

impl<T: DeviceAttributes> Drop for ClassDevice<T> {
    fn drop(&mut self) {
        for attr in T::ATTRIBUTES {
            // SAFETY: By the type invariants, the device exists with this attribute file.
            unsafe { bindings::device_remove_file(self.dev, &attr.0) };
        }
        // SAFETY: By the type invariants, the device exists; removing it waits for running sysfs
        // callbacks, after which `data` may go.
        unsafe { bindings::device_unregister(self.dev) };
    }
}
