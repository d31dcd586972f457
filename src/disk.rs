// SPDX-License-Identifier: GPL-2.0

//! The blk-mq adapter: the tapdev disks, `/dev/xen/blktap-2/tapdevN` (`tda`, `tdb`, ...).
//!
//! Improved request dequeuing: the old driver woke tapdisk and pulled requests inside tapdisk's
//! `poll`, mapping pages per request. Here each disk has one hardware queue of 32 tags, as many
//! as the ring has slots. `queue_rq` hands the request to its tap, which reserves a free slot
//! (the lowest; not the tag, as a slot outlives a request that timed out until tapdisk answers
//! it), writes the ring entry itself and copies write data into the slot's pages (mapped once
//! for the ring's life); `req_prod` is published, and tapdisk woken, once per batch (`last` /
//! `commit_rqs`). A request that finds every slot late waits in the tap for one, within its
//! deadline (`ring/slot.rs`).
//!
//! The queue limits of a disk come from its [`DeviceInfo`] here, and nowhere else.

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
        QueueLimits,
        Queued,
        Request,
        RequestRef,
        TagSet,
        TimeoutAction, //
    },
    protocol::{
        DeviceInfo,
        SECTORS_PER_PAGE, //
    },
    tap::{
        DiskControl,
        DiskLink, //
    },
    uapi,
};

/// The tapdev disks' blk-mq operations.
pub(crate) struct TapDisk;

#[vtable]
impl Operations for TapDisk {
    type QueueData = Arc<DiskLink>;

    fn queue_rq(link: ArcBorrow<'_, DiskLink>, rq: Request, last: bool) -> Queued {
        link.queue(rq, last)
    }

    fn timeout(link: ArcBorrow<'_, DiskLink>, rq: RequestRef<'_>) -> TimeoutAction {
        link.timed_out(rq)
    }

    fn commit_rqs(link: ArcBorrow<'_, DiskLink>) {
        link.commit();
    }

    fn devnode(link: ArcBorrow<'_, DiskLink>) -> Option<(CString, u16)> {
        let minor = link.minor();
        let path = CString::try_from_fmt(fmt!("xen/blktap-2/tapdev{minor}")).ok()?;
        Some((path, uapi::NODE_MODE))
    }
}

impl DiskControl for Disk<TapDisk> {
    fn openers(&self) -> u32 {
        Disk::openers(self)
    }

    fn set_quiesced(&mut self, quiesced: bool) {
        Disk::set_quiesced(self, quiesced)
    }

    fn is_quiesced(&self) -> bool {
        Disk::is_quiesced(self)
    }

    fn set_timeout_ms(&self, msecs: u32) {
        Disk::set_timeout_ms(self, msecs)
    }
}

/// The queue limits of a disk described by `info`, whose requests have at most `pages` pages.
///
/// # Errors
///
/// `EINVAL` for limits the block layer would refuse.
fn limits(info: &DeviceInfo, pages: usize) -> Result<QueueLimits> {
    let pages = pages.clamp(uapi::SEGMENT_MAX, uapi::SEGMENT_MAX_LARGE);
    let mut lim = QueueLimits::new(info.capacity, info.sector_size)
        .physical_block_size(info.physical_sector_size)
        // CAST: at most 128 pages of 8 sectors.
        .max_hw_sectors(pages as u32 * SECTORS_PER_PAGE)
        // CAST: at most 128.
        .max_segments(pages as u16);
    if info.read_only {
        lim = lim.read_only();
    }
    if info.features.flush {
        lim = lim.write_cache(info.features.fua);
    }
    if info.features.discard {
        lim = lim.max_discard_sectors(uapi::DISCARD_MAX_SECTORS);
    }
    lim.validate()
}

/// Makes a tap's disk (for `CREATE_DEVICE`) on block major `major`; its queue reaches the tap
/// through `link`.
///
/// # Errors
///
/// `EINVAL` for limits the block layer refuses, `ENOMEM`, or what adding the disk answers.
pub(crate) fn new(link: DiskLink, major: u32, info: &DeviceInfo) -> Result<KBox<dyn DiskControl>> {
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
        name: disk_name(link.minor(), &mut name),
        major,
        minor: link.minor(),
        limits: limits(info, link.request_pages())?,
    };
    let disk = Disk::new(tagset, &params, Arc::new(link, GFP_KERNEL)?)?;
    Ok(KBox::new(disk, GFP_KERNEL)?)
}

/// Writes the disk name of tap `minor`: `td` and letters, `tda`..`tdz`, `tdaa`, ...
pub(crate) fn disk_name(minor: u32, out: &mut [u8; 32]) -> &CStr {
    let mut letters = [0u8; 8];
    let mut n = 0;
    let mut m = u64::from(minor) + 1;
    while m > 0 && n < letters.len() {
        m -= 1;
        // CAST: `m % 26 < 26`.
        letters[n] = b'a' + (m % 26) as u8;
        n += 1;
        m /= 26;
    }
    out[0] = b't';
    out[1] = b'd';
    for i in 0..n {
        out[2 + i] = letters[n - 1 - i];
    }
    out[2 + n] = 0;
    // PANIC: The buffer holds a NUL at `2 + n` and none before.
    CStr::from_bytes_until_nul(&out[..]).unwrap_or(c"td")
}

#[kunit_tests(blktap_disk)]
mod tests {
    use super::*;
    use crate::protocol::{
        Features,
        MAX_REQUEST_BYTES,
        SECTOR_SIZE, //
    };

    #[test]
    fn disk_names_count_like_sd() {
        let mut b = [0u8; 32];
        assert_eq!(disk_name(0, &mut b), c"tda");
        assert_eq!(disk_name(25, &mut b), c"tdz");
        assert_eq!(disk_name(26, &mut b), c"tdaa");
        assert_eq!(disk_name(27, &mut b), c"tdab");
        assert_eq!(disk_name(701, &mut b), c"tdzz");
        assert_eq!(disk_name(702, &mut b), c"tdaaa");
        assert_eq!(disk_name(16383, &mut b), c"tdxfd");
    }

    #[test]
    fn limits_follow_the_negotiation() -> Result {
        let mut info = DeviceInfo {
            capacity: 2048,
            sector_size: 512,
            physical_sector_size: 4096,
            read_only: false,
            features: Features::default(),
            recovery: false,
        };
        let lim = limits(&info, uapi::SEGMENT_MAX)?;
        assert!(!lim.has_write_cache() && !lim.has_fua() && lim.discard_sectors() == 0);
        assert_eq!(lim.request_sectors(), MAX_REQUEST_BYTES / SECTOR_SIZE);
        info.features = Features {
            flush: true,
            fua: true,
            discard: true,
            staged_writes: true,
            req_event: true,
            large: true,
        };
        let lim = limits(&info, 64)?;
        assert!(lim.has_write_cache() && lim.has_fua());
        assert_eq!(lim.discard_sectors(), uapi::DISCARD_MAX_SECTORS);
        assert_eq!(lim.request_sectors(), 64 * 8);
        assert_eq!(limits(&info, 1000)?.request_sectors(), 128 * 8);
        Ok(())
    }
}
