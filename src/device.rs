// SPDX-License-Identifier: GPL-2.0

//! The tapdev disks, `/dev/xen/blktap-2/tapdevN` (`tda`, `tdb`, ...), on blk-mq.
//!
//! Improved request dequeuing: the old driver woke tapdisk and pulled requests inside tapdisk's
//! `poll`, mapping pages per request. Here each disk has one hardware queue of 32 tags, as many
//! as the ring has slots. `queue_rq` reserves a free slot (the lowest; not the tag, as a slot
//! outlives a request that timed out until tapdisk answers it), writes the ring entry itself and
//! copies write data into the slot's pages (mapped once for the ring's life); `req_prod` is
//! published, and tapdisk woken, once per batch (`last` / `commit_rqs`). A request that finds
//! every slot late waits in the tap for one, within its deadline (see `slot.rs`).

use kernel::{
    prelude::*,
    str::CString,
    sync::{
        Arc,
        ArcBorrow, //
    },
};

use crate::{
    blk_mq::{
        Disk,
        DiskParams,
        Operations,
        Queued,
        Request,
        RequestRef,
        TagSet,
        TimeoutAction, //
    },
    request,
    ring::{
        self,
        Features,
        RingPages, //
    },
    tap::Tap,
    uapi,
    Blktap, //
};

/// The largest capacity, in 512-byte sectors: its byte size must fit `loff_t`.
const CAPACITY_MAX: u64 = i64::MAX as u64 / request::SECTOR_SIZE as u64;

/// The largest physical block size (`BLK_MAX_BLOCK_SIZE`); discard splitting needs far less than
/// a discard request's largest size (1 GiB).
const PHYSICAL_BLOCK_MAX: u32 = 64 * 1024;

/// A validated disk description, from `CREATE_DEVICE` or `CREATE_DEVICE_COMPAT`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct DeviceInfo {
    pub(crate) capacity: u64,
    pub(crate) sector_size: u32,
    pub(crate) physical_sector_size: u32,
    pub(crate) read_only: bool,
    /// Negotiated extensions: what the kernel may send.
    pub(crate) features: Features,
    /// Keep the disk and its requests when tapdisk dies.
    pub(crate) recovery: bool,
}

impl DeviceInfo {
    /// From `struct blktap_device_info`.
    ///
    /// # Errors
    ///
    /// `EINVAL` for a zero capacity, one whose byte size does not fit `loff_t` or that is not a
    /// whole number of logical blocks, a sector size that is not a power of two in 512..=4096, a
    /// physical sector size that is not a power of two in 512..=64 KiB (the block layer's largest
    /// block), unknown flags, or FUA without FLUSH.
    pub(crate) fn from_info(info: &uapi::BlktapDeviceInfo) -> Result<Self> {
        let flags = info.flags;
        if flags & !uapi::DEVICE_FLAGS_KNOWN != 0
            || (flags & uapi::DEVICE_FUA != 0 && flags & uapi::DEVICE_FLUSH == 0)
        {
            return Err(EINVAL);
        }
        Self {
            capacity: info.capacity,
            sector_size: info.sector_size,
            physical_sector_size: info.physical_sector_size,
            read_only: flags & uapi::DEVICE_RO != 0,
            features: Features {
                flush: flags & uapi::DEVICE_FLUSH != 0,
                fua: flags & uapi::DEVICE_FUA != 0,
                discard: flags & uapi::DEVICE_DISCARD != 0,
            },
            recovery: flags & uapi::DEVICE_RECOVERY != 0,
        }
        .validate()
    }

    /// From the 272-byte `CREATE_DEVICE_COMPAT` parameters.
    ///
    /// # Errors
    ///
    /// As [`DeviceInfo::from_info`].
    pub(crate) fn from_params(params: &uapi::BlktapParams) -> Result<Self> {
        let sector_size = u32::try_from(params.sector_size).map_err(|_| EINVAL)?;
        Self {
            capacity: params.capacity,
            sector_size,
            physical_sector_size: sector_size,
            read_only: false,
            features: Features::default(),
            recovery: false,
        }
        .validate()
    }

    fn validate(self) -> Result<Self> {
        let ss = self.sector_size;
        let pss = self.physical_sector_size;
        if self.capacity == 0
            || !ss.is_power_of_two()
            || !(512..=4096).contains(&ss)
            || !pss.is_power_of_two()
            || !(512..=PHYSICAL_BLOCK_MAX).contains(&pss)
            || self.capacity > CAPACITY_MAX
            || self.capacity % u64::from(ss / request::SECTOR_SIZE) != 0
        {
            return Err(EINVAL);
        }
        Ok(self)
    }
}

/// The queue data of a tap's disk.
pub(crate) struct DiskQueue {
    tap: Arc<Tap>,
    pages: Arc<RingPages>,
    features: Features,
}

/// The tapdev disks' blk-mq operations.
pub(crate) struct TapDisk;

#[vtable]
impl Operations for TapDisk {
    type QueueData = Arc<DiskQueue>;

    fn queue_rq(q: ArcBorrow<'_, DiskQueue>, rq: Request, last: bool) -> Queued {
        q.tap.queue(&q.pages, q.features, rq, last)
    }

    fn timeout(q: ArcBorrow<'_, DiskQueue>, rq: RequestRef<'_>) -> TimeoutAction {
        q.tap.timed_out(&q.pages, rq)
    }

    fn commit_rqs(q: ArcBorrow<'_, DiskQueue>) {
        q.tap.commit();
    }

    fn devnode(q: ArcBorrow<'_, DiskQueue>) -> Option<(CString, u16)> {
        let minor = q.tap.minor();
        let path = CString::try_from_fmt(fmt!("xen/blktap-2/tapdev{minor}")).ok()?;
        Some((path, uapi::NODE_MODE))
    }
}

/// Creates tap `tap`'s disk (`CREATE_DEVICE`).
///
/// # Errors
///
/// `EEXIST` if the tap has a disk, `ENXIO` if its ring is not mapped, `ENOMEM`, or what adding
/// the disk answers.
pub(crate) fn create(blktap: &Blktap, tap: &Arc<Tap>, info: &DeviceInfo) -> Result {
    let mut inner = tap.inner.lock();
    if inner.disk.is_some() {
        return Err(EEXIST);
    }
    let pages = inner.pages.clone().ok_or(ENXIO)?;
    let tagset = Arc::pin_init(
        TagSet::new(
            uapi::RING_SIZE as u32,
            // tapdisk orders and merges nothing; a scheduler only adds a hop (`make bench`).
            TagSet::<TapDisk>::NO_SCHED_BY_DEFAULT,
        ),
        GFP_KERNEL,
    )?;
    let mut name = [0u8; 32];
    let params = DiskParams {
        name: request::disk_name(tap.minor(), &mut name),
        major: blktap.bdev_major(),
        minor: tap.minor(),
        capacity: info.capacity,
        logical_block_size: info.sector_size,
        physical_block_size: info.physical_sector_size,
        max_hw_sectors: request::MAX_REQUEST_BYTES / request::SECTOR_SIZE,
        // CAST: 11 fits `u16`.
        max_segments: uapi::SEGMENT_MAX as u16,
        read_only: info.read_only,
        write_cache: info.features.flush,
        fua: info.features.fua,
        max_discard_sectors: if info.features.discard {
            uapi::DISCARD_MAX_SECTORS
        } else {
            0
        },
    };
    let queue = Arc::new(
        DiskQueue {
            tap: tap.clone(),
            pages,
            features: info.features,
        },
        GFP_KERNEL,
    )?;
    let deadline = tap.ring.lock().deadline;
    let disk = Disk::new(tagset, &params, queue)?;
    disk.set_timeout_ms(deadline.saturating_mul(1000));
    inner.disk = Some(disk);
    inner.read_only = info.read_only;
    inner.features = info.features;
    tap.ring.lock().recovery = info.recovery;
    drop(inner);
    if blktap.verbose() {
        pr_info!(
            "blktap{}: disk {} created, {} sectors\n",
            tap.minor(),
            params.name.to_str().unwrap_or("?"),
            info.capacity
        );
    }
    Ok(())
}

/// Removes tap `tap`'s disk (`REMOVE_DEVICE`).
///
/// # Errors
///
/// `ENODEV` if there is no disk, `EBUSY` while it is open or has requests on the ring.
pub(crate) fn remove(tap: &Tap) -> Result {
    // A paused disk is resumed first: removal fails new requests at once.
    let mut inner = tap.inner.lock();
    let disk = inner.disk.as_ref().ok_or(ENODEV)?;
    if disk.openers() > 0 {
        return Err(EBUSY);
    }
    // Deleting the disk waits for requests in flight, and tapdisk (the caller) cannot answer
    // any while it waits here. So, in one critical section: refuse if any request is on the
    // ring, and make every new one fail at once until the disk is gone.
    tap.ring.lock().start_removing()?;
    drop(inner.take_disk());
    tap.ring.lock().end_removing();
    Ok(())
}

/// Removes the disk of a tap that no tapdisk serves (`FREE_TAP` of a recovering tap): fails the
/// requests kept for recovery, then removes the disk.
///
/// # Errors
///
/// `EBUSY` while the disk is open.
pub(crate) fn abandon(tap: &Tap) -> Result {
    let mut inner = tap.inner.lock();
    let Some(disk) = inner.disk.as_ref() else {
        return Ok(());
    };
    if disk.openers() > 0 {
        return Err(EBUSY);
    }
    let mut kept = ring::Taken::new();
    tap.ring.lock().abandon(&mut kept);
    let failed = kept.fail_all();
    if failed > 0 {
        pr_warn!(
            "blktap{}: freed while recovering; failed {failed} kept requests\n",
            tap.minor()
        );
    }
    drop(inner.take_disk());
    tap.ring.lock().end_removing();
    Ok(())
}

#[kunit_tests(blktap_device)]
mod tests {
    use super::*;

    fn info(capacity: u64, ss: u32, pss: u32, flags: usize) -> uapi::BlktapDeviceInfo {
        uapi::BlktapDeviceInfo {
            capacity,
            sector_size: ss,
            physical_sector_size: pss,
            flags,
            ..Default::default()
        }
    }

    #[test]
    fn valid_device_info() -> Result {
        let d = DeviceInfo::from_info(&info(2048, 512, 4096, uapi::DEVICE_RO))?;
        assert_eq!(d.capacity, 2048);
        assert!(d.read_only);
        assert!(DeviceInfo::from_info(&info(8, 4096, 4096, 0)).is_ok());
        assert!(DeviceInfo::from_info(&info(CAPACITY_MAX, 512, 65536, 0)).is_ok());
        assert_eq!(d.features, Features::default());
        assert!(!d.recovery);
        Ok(())
    }

    #[test]
    fn negotiated_flags() -> Result {
        let all = uapi::DEVICE_FLUSH | uapi::DEVICE_FUA | uapi::DEVICE_DISCARD;
        let d = DeviceInfo::from_info(&info(8, 512, 512, all | uapi::DEVICE_RECOVERY))?;
        assert_eq!(
            d.features,
            Features {
                flush: true,
                fua: true,
                discard: true
            }
        );
        assert!(d.recovery);
        let d = DeviceInfo::from_info(&info(8, 512, 512, uapi::DEVICE_DISCARD))?;
        assert!(d.features.discard && !d.features.flush && !d.features.fua);
        Ok(())
    }

    #[test]
    fn invalid_device_info() {
        for bad in [
            info(0, 512, 512, 0),
            info(8, 256, 512, 0),
            info(8, 8192, 8192, 0),
            info(8, 1000, 1024, 0),
            info(8, 512, 100, 0),
            info(8, 512, 0, 0),
            info(8, 512, 512, 0x100),
            info(8, 512, 512, 0x2),
            info(8, 512, 512, uapi::DEVICE_FUA),
            info(u64::MAX, 512, 512, 0),
            info(CAPACITY_MAX + 1, 512, 512, 0),
            info(9, 4096, 4096, 0),
            info(8, 512, 128 * 1024, 0),
            info(8, 512, 1 << 31, 0),
        ] {
            assert_eq!(DeviceInfo::from_info(&bad), Err(EINVAL));
        }
    }

    #[test]
    fn compat_params() -> Result {
        let mut p = uapi::BlktapParams {
            name: [0; 256],
            capacity: 100,
            sector_size: 512,
        };
        assert_eq!(DeviceInfo::from_params(&p)?.physical_sector_size, 512);
        p.sector_size = 1 << 40;
        assert_eq!(DeviceInfo::from_params(&p), Err(EINVAL));
        Ok(())
    }
}
