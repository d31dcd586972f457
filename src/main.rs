// SPDX-License-Identifier: GPL-2.0

//! blktap: the Xen blktap2 userspace block-device driver (XenServer ABI), in Rust.
//!
//! A tapdisk process serves a block device from user space: `tap-ctl` allocates a tap on the
//! control device, tapdisk opens and maps the tap's ring, and the tap's disk is served through it.
//! See `Documentation/blktap2.rst`.
//!
//! # Objects
//!
//! - `control`: the control misc device (`ALLOC_TAP`, `FREE_TAP`);
//! - `tap`: a tap and the minor table;
//! - `ring`: the ring char devices;
//! - `sysfs`: `/sys/class/blktap2`;
//! - `uapi`: the ABI.
//!
//! # Lock order
//!
//! 1. `Taps::table` (`blktap_taps`);
//! 2. `Tap::inner` (`blktap_tap`);
//! 3. `Tap::ring` (`blktap_ring`, spinlock).
//!
//! # Teardown
//!
//! The module cannot be unloaded while a tap exists: each tap holds a module reference. At unload,
//! [`BlktapModule`]'s fields are dropped in declaration order: the control device first (no new
//! taps), then the ring cdev (no new opens), then the shared [`Blktap`] state: its class, block
//! major and char region.

use core::sync::atomic::AtomicI32;

use kernel::{
    prelude::*,
    sync::{
        Arc,
        Mutex, //
    },
    task::Pid,
};

mod control;
mod device;
mod request;
mod ring;
mod slot;
mod sysfs;
mod tap;
mod uapi;

// The project's own abstractions over `kernel::bindings` (see `rust/`), public so that each is
// usable on its own.
#[path = "../rust/blk_mq.rs"]
pub mod blk_mq;
#[path = "../rust/blkdev.rs"]
pub mod blkdev;
#[path = "../rust/chrdev.rs"]
pub mod chrdev;
#[path = "../rust/class.rs"]
pub mod class;
#[path = "../rust/misc.rs"]
pub mod misc;
#[path = "../rust/module_ref.rs"]
pub mod module_ref;

use blkdev::BlockMajor;
use chrdev::{
    Cdev,
    ChrdevRegion, //
};
use class::{
    Class,
    ClassDevice, //
};
use misc::MiscNodeRegistration;
use tap::{
    RingUser,
    Tap,
    TapTable, //
};

module! {
    type: BlktapModule,
    name: "blktap",
    authors: ["blktap2-rs developers"],
    description: "Xen blktap2 userspace block-device driver",
    license: "GPL",
    params: {
        request_timeout: u32 {
            default: 120,
            description: "Seconds a request may wait for tapdisk's answer before it fails (1..86400; per tap in sysfs: deadline)",
        },
    },
}

/// Longest deadline a tap accepts, in seconds (a day).
pub(crate) const DEADLINE_MAX: u32 = 86400;

/// The deadline of new taps: the `request_timeout` parameter, within `1..=DEADLINE_MAX`.
fn default_deadline() -> u32 {
    module_parameters::request_timeout
        .value()
        .clamp(1, DEADLINE_MAX)
}

/// An allocated tap and its class device.
///
/// Fields drop in order: the class device goes before the tap's last reference.
pub(crate) struct TapEntry {
    /// Kept for its lifetime: dropping it removes `blktap/blktapN` and the ring node.
    _dev: ClassDevice<Tap>,
    tap: Arc<Tap>,
}

/// What the class attributes see: the taps and the driver's settings.
#[pin_data]
pub(crate) struct Taps {
    #[pin]
    table: Mutex<TapTable<TapEntry>>,
    /// Log level, set through `/sys/class/blktap2/verbosity`.
    pub(crate) verbosity: AtomicI32,
}

impl Taps {
    pub(crate) fn verbose(&self) -> bool {
        self.verbosity.load(core::sync::atomic::Ordering::Relaxed) > 0
    }
}

/// The driver's shared state, reached from every file and sysfs callback.
///
/// Fields drop in declaration order: the class (after every tap's class device is gone), the block
/// major, the ring region (after the ring cdev, which the module drops first), then the taps.
#[pin_data]
pub(crate) struct Blktap {
    #[pin]
    class: Class<Arc<Taps>>,
    bdev_major: BlockMajor,
    ring_region: ChrdevRegion,
    taps: Arc<Taps>,
    module: &'static ThisModule,
}

impl Blktap {
    fn new(module: &'static ThisModule) -> Result<Arc<Self>> {
        let shared = Arc::pin_init(
            try_pin_init!(Taps {
                table <- kernel::new_mutex!(TapTable::new(uapi::MAX_MINORS), "blktap_taps"),
                verbosity: AtomicI32::new(0),
            }),
            GFP_KERNEL,
        )?;
        Arc::pin_init(
            try_pin_init!(Self {
                module,
                taps: shared.clone(),
                ring_region: ChrdevRegion::alloc(uapi::MAX_MINORS, uapi::RING_REGION_NAME)?,
                bdev_major: BlockMajor::register(uapi::BLOCK_MAJOR_NAME)?,
                class <- Class::register(uapi::CLASS_NAME, shared),
            }),
            GFP_KERNEL,
        )
    }

    /// The block major of the disks.
    pub(crate) fn bdev_major(&self) -> u32 {
        self.bdev_major.major()
    }

    /// Whether to log each operation.
    pub(crate) fn verbose(&self) -> bool {
        self.taps.verbose()
    }

    /// Allocates the tap with the lowest free minor (`ALLOC_TAP`).
    ///
    /// # Errors
    ///
    /// `ENOSPC` when all minors are in use, `ENOMEM`, or a sysfs error.
    pub(crate) fn alloc_tap(&self) -> Result<uapi::BlktapInfo> {
        let mut table = self.taps.table.lock();
        let minor = table.lowest_free()?;
        let tap = Tap::new(minor, default_deadline(), self.module)?;
        let devt = self.ring_region.devt(minor).ok_or(EINVAL)?;
        let dev =
            ClassDevice::create(&self.class, devt, tap.clone(), fmt!("blktap/blktap{minor}"))?;
        table.insert(minor, TapEntry { _dev: dev, tap })?;
        drop(table);
        if self.taps.verbose() {
            pr_info!("blktap{minor}: allocated\n");
        }
        Ok(uapi::BlktapInfo {
            ring_major: self.ring_region.major(),
            bdev_major: self.bdev_major.major(),
            ring_minor: minor,
        })
    }

    /// Frees tap `minor` (`FREE_TAP`).
    ///
    /// # Errors
    ///
    /// `EINVAL` if `minor` is out of range, `ENODEV` if it is not allocated, `EBUSY` while its
    /// ring is open or mapped, or while the disk a recovering tap kept is open.
    pub(crate) fn free_tap(&self, minor: u32) -> Result {
        if minor >= uapi::MAX_MINORS {
            return Err(EINVAL);
        }
        loop {
            let mut table = self.taps.table.lock();
            let entry = table.get(minor).ok_or(ENODEV)?;
            let tap = entry.tap.clone();
            let mut inner = tap.inner.lock();
            match inner.ring_user {
                RingUser::Open(_) => return Err(EBUSY),
                RingUser::Closing => {
                    // Its old disk is being removed: wait for it, then look again.
                    drop(table);
                    if tap.closed.wait_interruptible(&mut inner) {
                        return Err(ERESTARTSYS);
                    }
                    continue;
                }
                RingUser::Closed => {}
            }
            drop(inner);
            // A disk without a ring is one kept for recovery that nobody came back for.
            device::abandon(&tap)?;
            // The class device goes before the minor is free again: a concurrent `ALLOC_TAP`
            // of the same minor would otherwise find `blktap!blktapN` still in sysfs (EEXIST).
            // Removing it waits for the tap's sysfs callbacks, which never take this lock.
            drop(table.remove(minor));
            break;
        }
        if self.taps.verbose() {
            pr_info!("blktap{minor}: freed\n");
        }
        Ok(())
    }

    /// Marks the ring of tap `minor` open by process `pid`, and returns the tap.
    ///
    /// # Errors
    ///
    /// `ENXIO` if the minor is not allocated, `EBUSY` if its ring is already open.
    pub(crate) fn open_ring(&self, minor: u32, pid: Pid) -> Result<Arc<Tap>> {
        loop {
            let table = self.taps.table.lock();
            let tap = table.get(minor).ok_or(ENXIO)?.tap.clone();
            let mut inner = tap.inner.lock();
            match inner.ring_user {
                RingUser::Open(_) => return Err(EBUSY),
                RingUser::Closing => {
                    // The last user's disk is being removed: wait for it, then look again (the
                    // tap may have been freed meanwhile).
                    drop(table);
                    if tap.closed.wait_interruptible(&mut inner) {
                        return Err(ERESTARTSYS);
                    }
                }
                RingUser::Closed => {
                    inner.ring_user = RingUser::Open(pid);
                    drop(inner);
                    return Ok(tap);
                }
            }
        }
    }
}

/// The module: its devices, in teardown order.
#[pin_data]
struct BlktapModule {
    #[pin]
    control: MiscNodeRegistration<control::Control>,
    #[pin]
    ring: Cdev<ring::Ring>,
    blktap: Arc<Blktap>,
}

impl kernel::InPlaceModule for BlktapModule {
    fn init(module: &'static ThisModule) -> impl PinInit<Self, Error> {
        try_pin_init!(Self {
            blktap: Blktap::new(module)?,
            ring <- Cdev::register(&blktap.ring_region, blktap.clone()),
            control <- MiscNodeRegistration::register(
                uapi::MISC_NAME,
                uapi::CONTROL_NODE,
                uapi::NODE_MODE,
                blktap.clone(),
            ),
        })
    }
}
