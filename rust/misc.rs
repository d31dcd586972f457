// SPDX-License-Identifier: GPL-2.0

//! Misc devices with a devtmpfs node name, a node mode and per-registration data.
//!
//! [`kernel::miscdevice::MiscDeviceRegistration`] registers a misc device under one string that is
//! both its name in `/proc/misc` and its node path. A device with a compatibility name, such as
//! `blktap/control` in `/proc/misc` with its node at `/dev/xen/blktap-2/control`, needs the C
//! `nodename` and `mode` fields as well. [`MiscNodeRegistration`] sets them, and keeps data that the
//! device's [`MiscDevice`] callbacks reach through [`MiscNodeRegistration::data`].
//!
//! The file operations are the kernel's own ([`MiscDevice`]); only registration differs.
//!
//! C header: [`include/linux/miscdevice.h`](srctree/include/linux/miscdevice.h)

use core::mem::{
    align_of,
    size_of, //
};

use kernel::{
    bindings,
    error::to_result,
    miscdevice::{
        MiscDevice,
        MiscDeviceOptions,
        MiscDeviceRegistration, //
    },
    prelude::*,
    types::Opaque, //
};

// `MiscDeviceRegistration<T>` is `#[repr(transparent)]` over `Opaque<bindings::miscdevice>`: the
// kernel's open trampoline casts the registered `struct miscdevice` to it. We register the same
// C struct ourselves, so it must stay exactly that.
const _: () = {
    assert!(size_of::<MiscDeviceRegistration<()>>() == size_of::<bindings::miscdevice>());
    assert!(align_of::<MiscDeviceRegistration<()>>() == align_of::<bindings::miscdevice>());
};

/// A [`MiscDevice`] that is registered with a node name and data.
///
/// # Safety
///
/// Implementers guarantee that `Self` is registered only through [`MiscNodeRegistration`], never
/// through [`MiscDeviceRegistration::register`], so that every `&MiscDeviceRegistration<Self>`
/// passed to a [`MiscDevice`] callback is the `misc` field of a live `MiscNodeRegistration<Self>`.
pub unsafe trait MiscNodeDevice: MiscDevice {
    /// Data shared by all opens of the device.
    type Data: Send + Sync;
}

/// A registered misc device with a node name and mode.
///
/// # Invariants
///
/// - `misc` holds a `struct miscdevice` registered with `misc_register()` for the whole life of
///   this object, and is deregistered exactly once, in [`Drop`].
/// - `data` is initialised before `misc` is registered and dropped after it is deregistered.
#[pin_data(PinnedDrop)]
pub struct MiscNodeRegistration<T: MiscNodeDevice> {
    data: T::Data,
    #[pin]
    misc: Opaque<bindings::miscdevice>,
}

// SAFETY: `misc_deregister` may be called from any thread; `data` is `Send`.
unsafe impl<T: MiscNodeDevice> Send for MiscNodeRegistration<T> {}
// SAFETY: `&self` methods only read `data`, which is `Sync`.
unsafe impl<T: MiscNodeDevice> Sync for MiscNodeRegistration<T> {}

impl<T: MiscNodeDevice> MiscNodeRegistration<T> {
    /// Registers misc device `name` (as shown in `/proc/misc`) with its devtmpfs node at
    /// `/dev/<nodename>`, created with permissions `mode`.
    ///
    /// # Errors
    ///
    /// Whatever `misc_register()` returns, e.g. `EBUSY` if the name is taken.
    pub fn register(
        name: &'static CStr,
        nodename: &'static CStr,
        mode: u16,
        data: T::Data,
    ) -> impl PinInit<Self, Error> {
        try_pin_init!(Self {
            // `data` is written first: an open may run as soon as `misc_register()` returns.
            data,
            misc <- Opaque::try_ffi_init(move |slot: *mut bindings::miscdevice| {
                let mut raw = MiscDeviceOptions { name }.into_raw::<T>();
                raw.nodename = nodename.as_char_ptr();
                raw.mode = mode;
                // SAFETY: The initialiser may write to `slot`.
                unsafe { slot.write(raw) };
                // SAFETY: `slot` holds a fully set-up `miscdevice` whose strings are `'static`.
                // It is pinned and deregistered in `drop` before its memory goes away.
                // INVARIANT: On success `misc` is registered.
                to_result(unsafe { bindings::misc_register(slot) })
            }),
        })
    }

    /// Returns the data of the registration that `misc` belongs to.
    pub fn data(misc: &MiscDeviceRegistration<T>) -> &T::Data {
        let raw = Opaque::cast_from(misc.as_raw().cast_const());
        // SAFETY: By the safety contract of `MiscNodeDevice`, `misc` is the `misc` field of a live
        // `MiscNodeRegistration<T>`, so stepping back to the container stays in bounds.
        let this = unsafe { &*kernel::container_of!(raw.cast_mut(), Self, misc) };
        &this.data
    }

    /// Returns the registered C `struct miscdevice`.
    pub fn as_raw(&self) -> *mut bindings::miscdevice {
        self.misc.get()
    }
}

#[pinned_drop]
impl<T: MiscNodeDevice> PinnedDrop for MiscNodeRegistration<T> {
    fn drop(self: Pin<&mut Self>) {
        // SAFETY: By the type invariants, `misc` is registered.
        unsafe { bindings::misc_deregister(self.misc.get()) };
    }
}
