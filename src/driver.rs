// SPDX-License-Identifier: GPL-2.0

//! The driver's shared state, reached from every file and sysfs callback: the class, the block
//! major, the ring region and the table of taps; `ALLOC_TAP` and `FREE_TAP`, opening a ring and
//! making a disk.

use core::sync::atomic::AtomicI32;

use kernel::{
    prelude::*,
    sync::{
        Arc,
        Mutex, //
    },
    task::Pid,
};

use crate::{
    blkdev::BlockMajor,
    chrdev::ChrdevRegion,
    class::{
        Class,
        ClassDevice,
        SysfsBuf, //
    },
    disk, protocol,
    tap::{
        table::TapTable,
        Busy,
        Tap,
        DEADLINE_MAX, //
    },
    uapi,
};

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
    /// Writes one line `minor name` per tap that has a disk (the class's `devices`).
    pub(crate) fn show_devices(&self, out: &mut SysfsBuf<'_>) -> Result {
        use core::fmt::Write;
        let table = self.table.lock();
        for (minor, entry) in table.iter() {
            if entry.tap.has_disk() {
                write!(out, "{minor} ")?;
                entry.tap.show_name(out)?;
            }
        }
        Ok(())
    }

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
    /// The deadline of new taps, in seconds.
    deadline: u32,
}

impl Blktap {
    /// The driver's state; new taps get `deadline` (clamped to `1..=DEADLINE_MAX` seconds).
    pub(crate) fn new(module: &'static ThisModule, deadline: u32) -> Result<Arc<Self>> {
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
                deadline: deadline.clamp(1, DEADLINE_MAX),
                taps: shared.clone(),
                ring_region: ChrdevRegion::alloc(uapi::MAX_MINORS, uapi::RING_REGION_NAME)?,
                bdev_major: BlockMajor::register(uapi::BLOCK_MAJOR_NAME)?,
                class <- Class::register(uapi::CLASS_NAME, shared),
            }),
            GFP_KERNEL,
        )
    }

    /// The region of the ring devices' numbers.
    pub(crate) fn ring_region(&self) -> &ChrdevRegion {
        &self.ring_region
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
        let tap = Tap::new(minor, self.deadline, self.module)?;
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

    /// Frees tap `minor` (`FREE_TAP`). If its ring is closing, waits until its disk is gone.
    ///
    /// # Errors
    ///
    /// `EINVAL` if `minor` is out of range, `ENODEV` if it is not allocated, `EBUSY` while its
    /// ring is open or mapped, or while the disk a recovering tap kept is open, `ERESTARTSYS` if
    /// a signal came while waiting.
    pub(crate) fn free_tap(&self, minor: u32) -> Result {
        if minor >= uapi::MAX_MINORS {
            return Err(EINVAL);
        }
        loop {
            let table = self.taps.table.lock();
            let tap = table.get(minor).ok_or(ENODEV)?.tap.clone();
            match tap.begin_free() {
                Ok(disk) => {
                    drop(table);
                    // The minor stays taken (the tap is `Closing`) until its disk is gone, so a
                    // new tap of the same minor never meets it.
                    drop(disk);
                    // The class device goes before the minor is free again: a concurrent
                    // `ALLOC_TAP` of the same minor would otherwise find `blktap!blktapN` still
                    // in sysfs (EEXIST). Removing it waits for the tap's sysfs callbacks, which
                    // never take this lock.
                    drop(self.taps.table.lock().remove(minor));
                    tap.end_free();
                    break;
                }
                Err(Busy::Settling) => {
                    drop(table);
                    tap.wait_settled()?;
                }
                Err(Busy::InUse) => return Err(EBUSY),
                Err(Busy::Err(e)) => return Err(e),
            }
        }
        if self.taps.verbose() {
            pr_info!("blktap{minor}: freed\n");
        }
        Ok(())
    }

    /// Opens the ring of tap `minor` for thread group `pid`, and returns the tap. If the ring's
    /// last user is still closing it, waits until its disk is gone.
    ///
    /// # Errors
    ///
    /// `ENXIO` if the minor is not allocated, `EBUSY` if its ring is already open,
    /// `ERESTARTSYS` if a signal came while waiting.
    pub(crate) fn open_ring(&self, minor: u32, pid: Pid) -> Result<Arc<Tap>> {
        loop {
            let table = self.taps.table.lock();
            let tap = table.get(minor).ok_or(ENXIO)?.tap.clone();
            match tap.open_ring(pid) {
                Ok(()) => return Ok(tap),
                Err(Busy::Settling) => {
                    // The tap may be freed meanwhile: look it up again after.
                    drop(table);
                    tap.wait_settled()?;
                }
                Err(Busy::InUse) => return Err(EBUSY),
                Err(Busy::Err(e)) => return Err(e),
            }
        }
    }

    /// Makes the disk of `tap` (`CREATE_DEVICE`).
    ///
    /// # Errors
    ///
    /// As [`Tap::create_disk`].
    pub(crate) fn create_disk(&self, tap: &Arc<Tap>, info: &protocol::DeviceInfo) -> Result {
        Tap::create_disk(tap, info, |link| disk::new(link, self.bdev_major(), info))?;
        if self.verbose() {
            pr_info!(
                "blktap{}: disk created, {} sectors\n",
                tap.minor(),
                info.capacity
            );
        }
        Ok(())
    }
}
