// SPDX-License-Identifier: GPL-2.0

//! The control device, `/dev/xen/blktap-2/control` (`blktap/control` in `/proc/misc`).
//!
//! - `ALLOC_TAP` (200) allocates the lowest free minor and answers a `struct blktap_info`.
//! - `FREE_TAP` (201) frees the tap whose minor is the argument: `EINVAL` if out of range,
//!   `ENODEV` if not allocated, `EBUSY` while its ring is open or mapped.
//! - Any other command answers `ENOTTY`.

use kernel::{
    fs::File,
    miscdevice::{
        MiscDevice,
        MiscDeviceRegistration, //
    },
    prelude::*,
    sync::{
        Arc,
        ArcBorrow, //
    },
    uaccess::{
        UserPtr,
        UserSlice, //
    },
};

use crate::{
    driver::Blktap,
    misc::{
        MiscNodeDevice,
        MiscNodeRegistration, //
    },
    uapi, //
};

/// The control device's file operations.
pub(crate) struct Control;

// SAFETY: `Control` is registered only in `BlktapModule::init`, through `MiscNodeRegistration`.
unsafe impl MiscNodeDevice for Control {
    type Data = Arc<Blktap>;
}

#[vtable]
impl MiscDevice for Control {
    type Ptr = Arc<Blktap>;

    fn open(_file: &File, misc: &MiscDeviceRegistration<Self>) -> Result<Self::Ptr> {
        Ok(MiscNodeRegistration::<Self>::data(misc).clone())
    }

    fn ioctl(blktap: ArcBorrow<'_, Blktap>, _file: &File, cmd: u32, arg: usize) -> Result<isize> {
        match cmd {
            uapi::IOCTL_ALLOC_TAP => alloc_tap(&blktap, arg),
            uapi::IOCTL_FREE_TAP => {
                let minor = u32::try_from(arg).map_err(|_| EINVAL)?;
                blktap.free_tap(minor)?;
                Ok(0)
            }
            _ => Err(ENOTTY),
        }
    }
}

/// `ALLOC_TAP`: allocates a tap and writes its `blktap_info` to `arg`.
///
/// If the answer cannot be written, the tap is freed again, so a bad pointer never leaks a minor.
fn alloc_tap(blktap: &Blktap, arg: usize) -> Result<isize> {
    let info = blktap.alloc_tap()?;
    let mut writer =
        UserSlice::new(UserPtr::from_addr(arg), size_of::<uapi::BlktapInfo>()).writer();
    if let Err(e) = writer.write(&info) {
        // The tap was never published to user space, and nothing else can have opened its ring
        // yet but a process guessing minors; if one did, the tap stays and is freed as usual.
        let _ = blktap.free_tap(info.ring_minor);
        return Err(e);
    }
    Ok(0)
}
