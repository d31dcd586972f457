// SPDX-License-Identifier: GPL-2.0

//! The ring protocol: what a block request becomes on the ring, and the checks every value
//! tapdisk hands the kernel must pass before the kernel uses it (responses, `rsp_prod`, device
//! descriptions). Pure functions, KUnit-tested here; no state.
//!
//! A request of `n` bytes (a multiple of 512, at most 11 pages, or with
//! [`uapi::DEVICE_LARGE_REQUESTS`] as many as the mapping has per slot) fills its slot's data
//! pages linearly: page `j` holds bytes `4096 * j ..` of the request, from sector 0 of its page.
//! The entry describes the first 11 pages in `seg`; a request of more pages has `nr_segments`
//! pages and `nr_sectors` sectors. The block layer's own segment geometry never reaches tapdisk;
//! the kernel copies the data between the request and the slot's pages.

use kernel::prelude::*;

use crate::{
    blk_mq::Op,
    uapi::{
        self,
        Response,
        Segment, //
    },
};

/// Bytes in a sector.
pub(crate) const SECTOR_SIZE: u32 = 512;
/// Sectors in a data page.
pub(crate) const SECTORS_PER_PAGE: u32 = 4096 / SECTOR_SIZE;
/// The largest request without [`uapi::DEVICE_LARGE_REQUESTS`], in bytes.
pub(crate) const MAX_REQUEST_BYTES: u32 = 4096 * uapi::SEGMENT_MAX as u32;

/// Checks the length of a read or a write for slots of `pages` data pages.
///
/// # Errors
///
/// `EINVAL` if `bytes` is 0, not a multiple of 512, or more than `pages` pages (at most
/// [`uapi::SEGMENT_MAX_LARGE`]).
pub(crate) fn check_transfer(bytes: u32, pages: usize) -> Result {
    let max = 4096 * pages.min(uapi::SEGMENT_MAX_LARGE) as u32;
    if bytes == 0 || bytes % SECTOR_SIZE != 0 || bytes > max {
        return Err(EINVAL);
    }
    Ok(())
}

/// The entry fields describing a transfer of `bytes` bytes, checked by the caller
/// ([`check_transfer`]; more than the largest request is cut to it): `(seg, nr_segments,
/// nr_sectors)`. `nr_sectors` is 0 for at most 11 pages, as an old tapdisk expects.
fn transfer_fields(bytes: u32) -> ([Segment; uapi::SEGMENT_MAX], u8, u16) {
    let mut seg = [Segment::default(); uapi::SEGMENT_MAX];
    let sectors = (bytes / SECTOR_SIZE).min(uapi::SEGMENT_MAX_LARGE as u32 * SECTORS_PER_PAGE);
    let pages = sectors.div_ceil(SECTORS_PER_PAGE);
    for (j, s) in seg.iter_mut().enumerate().take(pages as usize) {
        // CAST: `j < 11`.
        let in_page = (sectors - j as u32 * SECTORS_PER_PAGE).min(SECTORS_PER_PAGE);
        s.first_sect = 0;
        // CAST: `in_page` is 1..=8.
        s.last_sect = (in_page - 1) as u8;
    }
    let nr_sectors = if pages as usize > uapi::SEGMENT_MAX {
        // CAST: at most 128 * 8 sectors.
        sectors as u16
    } else {
        0
    };
    // CAST: at most 128 pages.
    (seg, pages as u8, nr_sectors)
}

/// How many new responses tapdisk published: `rsp_prod - rsp_cons`, if that is at most a ring.
///
/// Each response is then checked on its own ([`check_response`]): one beyond the requests
/// pending names a slot with no request and is refused. A refused response uses a ring index but
/// answers nothing, so a correct answer may follow it.
///
/// # Errors
///
/// `EIO` if `rsp_prod` ran more than a ring ahead of `rsp_cons`, or behind it (which wraps to a
/// huge count).
pub(crate) fn new_responses(rsp_prod: u32, rsp_cons: u32) -> Result<u32> {
    let n = rsp_prod.wrapping_sub(rsp_cons);
    // CAST: The ring size is 32.
    if n > uapi::RING_SIZE as u32 {
        return Err(EIO);
    }
    Ok(n)
}

/// Why a response was refused.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) enum BadResponse {
    /// `id` is not a slot.
    BadId,
    /// The slot has no request pending.
    NotPending,
    /// The operation is not the request's.
    WrongOp,
}

/// Checks a response (already copied out of the ring) against the pending requests' operations,
/// and returns its slot.
pub(crate) fn check_response(
    rsp: &Response,
    pending_op: impl Fn(usize) -> Option<u8>,
) -> core::result::Result<usize, BadResponse> {
    let slot = usize::try_from(rsp.id)
        .ok()
        .filter(|&s| s < uapi::RING_SIZE)
        .ok_or(BadResponse::BadId)?;
    match pending_op(slot) {
        None => Err(BadResponse::NotPending),
        Some(op) if op != rsp.operation => Err(BadResponse::WrongOp),
        Some(_) => Ok(slot),
    }
}

/// What the negotiated extensions let the kernel send.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub(crate) struct Features {
    pub(crate) flush: bool,
    pub(crate) fua: bool,
    pub(crate) discard: bool,
    /// Writes are staged and their data copied in tapdisk's context
    /// ([`uapi::DEVICE_STAGED_WRITES`]).
    pub(crate) staged_writes: bool,
    /// Tapdisk is signalled of new requests only when the header's `req_event` asks for it
    /// ([`uapi::DEVICE_REQ_EVENT`]).
    pub(crate) req_event: bool,
    /// Requests of up to as many pages as the mapping has per slot
    /// ([`uapi::DEVICE_LARGE_REQUESTS`]).
    pub(crate) large: bool,
}

/// Whether tapdisk, whose ring header says `req_event` (read once), must be signalled after
/// the kernel published requests `old..new` (free-running indices): if `req_event` lies in
/// `(old, new]`, as Xen's `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY` decides; always for a
/// `req_event` of 0, which a tapdisk that never writes it leaves (the page is zeroed at each
/// mapping). Any other value only decides whether this tapdisk is woken.
pub(crate) fn wake_for_requests(req_event: u32, old: u32, new: u32) -> bool {
    req_event == 0 || req_event.wrapping_sub(old).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Whether tapdisk, whose ring header says `req_event` (read once), must be signalled of a
/// staged write (nothing new on the ring, only the header's `staged`) while `published` is the
/// ring's `req_prod`: if it has asked for the next request (`req_prod + 1`), or never writes
/// `req_event` (0).
pub(crate) fn wake_for_staged(req_event: u32, published: u32) -> bool {
    req_event == 0 || req_event == published.wrapping_add(1)
}

/// The ring operation for a block request, given the negotiated features.
pub(crate) fn ring_op(op: Op, fua: bool, features: Features) -> Option<u8> {
    match op {
        Op::Read => Some(uapi::OP_READ),
        Op::Write if fua && features.fua => Some(uapi::OP_WRITE_FUA),
        Op::Write => Some(uapi::OP_WRITE),
        Op::Flush if features.flush => Some(uapi::OP_FLUSH),
        Op::Discard if features.discard => Some(uapi::OP_DISCARD),
        // Nothing else is ever sent; old tapdisks know READ and WRITE only.
        _ => None,
    }
}

/// A block request as the ring carries it, checked once: its entry can then be written for any
/// slot, as often as needed (a recovering tap writes it again). Kept per slot instead of the
/// 112-byte entry.
///
/// # Invariants
///
/// `op` is a ring operation. For `OP_READ`, `OP_WRITE` and `OP_WRITE_FUA`, `bytes` is a
/// multiple of 512 of at most [`uapi::SEGMENT_MAX_LARGE`] pages; for `OP_DISCARD`, a multiple of 512 of
/// `1..=DISCARD_MAX_SECTORS` sectors; for `OP_FLUSH` it is not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RingRequest {
    op: u8,
    sector: u64,
    bytes: u32,
}

impl RingRequest {
    /// The request of `bytes` bytes at `sector` with ring operation `op`, for slots of `pages`
    /// data pages. (The queue's limits keep requests to 11 pages unless tapdisk negotiated
    /// [`uapi::DEVICE_LARGE_REQUESTS`]; this bound keeps the copy inside the slot.)
    ///
    /// # Errors
    ///
    /// `EINVAL` if `op` is not a ring operation or `bytes` does not fit it.
    pub(crate) fn new(op: u8, sector: u64, bytes: u32, pages: usize) -> Result<Self> {
        match op {
            uapi::OP_READ | uapi::OP_WRITE | uapi::OP_WRITE_FUA => {
                check_transfer(bytes, pages)?;
            }
            uapi::OP_FLUSH => {}
            uapi::OP_DISCARD => {
                let sectors = bytes / SECTOR_SIZE;
                if sectors == 0 || bytes % SECTOR_SIZE != 0 || sectors > uapi::DISCARD_MAX_SECTORS {
                    return Err(EINVAL);
                }
            }
            _ => return Err(EINVAL),
        }
        // INVARIANT: checked above.
        Ok(Self { op, sector, bytes })
    }

    /// The ring operation.
    pub(crate) fn op(&self) -> u8 {
        self.op
    }

    /// The data length in bytes (reads and writes).
    pub(crate) fn bytes(&self) -> u32 {
        self.bytes
    }

    /// Whether the request carries write data in its slot's pages.
    pub(crate) fn carries_write_data(&self) -> bool {
        carries_write_data(self.op)
    }

    /// The ring entry of the request in slot `slot`.
    pub(crate) fn entry(&self, slot: usize) -> uapi::Request {
        let id = slot as u64;
        match self.op {
            uapi::OP_DISCARD => uapi::Request::from_discard(&uapi::RequestDiscard {
                operation: self.op,
                nr_segments: 0,
                pad: 0,
                pad2: 0,
                id,
                sector_number: self.sector,
                nr_sectors: u64::from(self.bytes / SECTOR_SIZE),
                pad3: [0; uapi::RING_ENTRY_SIZE - 32],
            }),
            uapi::OP_FLUSH => uapi::Request {
                operation: self.op,
                id,
                ..Default::default()
            },
            // By the type invariants, a read or a write of a valid size.
            _ => {
                let (seg, nr_segments, nr_sectors) = transfer_fields(self.bytes);
                uapi::Request {
                    operation: self.op,
                    nr_segments,
                    nr_sectors,
                    id,
                    sector_number: self.sector,
                    seg,
                    ..Default::default()
                }
            }
        }
    }
}

/// Whether a ring operation carries write data in its slot's pages.
pub(crate) fn carries_write_data(op: u8) -> bool {
    op == uapi::OP_WRITE || op == uapi::OP_WRITE_FUA
}

/// The largest capacity, in 512-byte sectors: its byte size must fit `loff_t`.
const CAPACITY_MAX: u64 = i64::MAX as u64 / SECTOR_SIZE as u64;

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
                staged_writes: flags & uapi::DEVICE_STAGED_WRITES != 0,
                req_event: flags & uapi::DEVICE_REQ_EVENT != 0,
                large: flags & uapi::DEVICE_LARGE_REQUESTS != 0,
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
            || self.capacity % u64::from(ss / SECTOR_SIZE) != 0
        {
            return Err(EINVAL);
        }
        Ok(self)
    }
}

#[kunit_tests(blktap_protocol)]
mod tests {
    use super::*;
    use kernel::transmute::AsBytes;

    const ALL: Features = Features {
        flush: true,
        fua: true,
        discard: true,
        staged_writes: false,
        req_event: false,
        large: false,
    };

    #[test]
    fn old_tapdisks_get_reads_and_writes_only() {
        let none = Features::default();
        assert_eq!(ring_op(Op::Read, false, none), Some(uapi::OP_READ));
        assert_eq!(ring_op(Op::Write, false, none), Some(uapi::OP_WRITE));
        assert_eq!(ring_op(Op::Write, true, none), Some(uapi::OP_WRITE));
        assert_eq!(ring_op(Op::Flush, false, none), None);
        assert_eq!(ring_op(Op::Discard, false, none), None);
        assert_eq!(ring_op(Op::Other(9), false, ALL), None);
    }

    #[test]
    fn negotiated_operations() {
        assert_eq!(ring_op(Op::Write, true, ALL), Some(uapi::OP_WRITE_FUA));
        assert_eq!(ring_op(Op::Flush, false, ALL), Some(uapi::OP_FLUSH));
        assert_eq!(ring_op(Op::Discard, false, ALL), Some(uapi::OP_DISCARD));
    }

    #[test]
    fn entries() -> Result {
        let ring_entry = |op, slot, sector, bytes| -> Result<uapi::Request> {
            Ok(RingRequest::new(op, sector, bytes, uapi::SEGMENT_MAX)?.entry(slot))
        };
        let e = ring_entry(uapi::OP_WRITE_FUA, 5, 100, 8192)?;
        assert_eq!(
            (e.operation, e.nr_segments, e.id, e.sector_number),
            (4, 2, 5, 100)
        );
        let e = ring_entry(uapi::OP_FLUSH, 3, 77, 0)?;
        assert_eq!(
            (e.operation, e.nr_segments, e.id, e.sector_number),
            (2, 0, 3, 0)
        );
        let e = ring_entry(uapi::OP_DISCARD, 31, 8, 1 << 20)?;
        assert_eq!((e.operation, e.nr_segments, e.id), (3, 0, 31));
        assert_eq!(&e.as_bytes()[24..32], &2048u64.to_ne_bytes());
        assert!(ring_entry(uapi::OP_DISCARD, 0, 0, 0).is_err());
        assert!(ring_entry(uapi::OP_DISCARD, 0, 0, 1000).is_err());
        assert!(ring_entry(
            uapi::OP_DISCARD,
            0,
            0,
            (uapi::DISCARD_MAX_SECTORS + 1) * 512
        )
        .is_err());
        assert!(ring_entry(uapi::OP_READ, 0, 0, 45 * 1024).is_err());
        assert!(ring_entry(uapi::OP_READ, 0, 0, 0).is_err());
        assert!(ring_entry(9, 0, 0, 512).is_err());
        // The same request, written for another slot (a recovering tap), differs by its id.
        let r = RingRequest::new(uapi::OP_WRITE, 64, 44 * 1024, uapi::SEGMENT_MAX)?;
        let (a, b) = (r.entry(1), r.entry(30));
        assert_eq!(
            (a.id, b.id, a.nr_segments, b.sector_number),
            (1, 30, 11, 64)
        );
        assert_eq!(&a.as_bytes()[16..], &b.as_bytes()[16..]);
        assert!(r.carries_write_data() && r.bytes() == 44 * 1024 && r.op() == uapi::OP_WRITE);
        Ok(())
    }

    /// `(seg, nr_segments, nr_sectors)` of a checked transfer for slots of `pages` pages.
    fn fields(bytes: u32, pages: usize) -> Result<([Segment; uapi::SEGMENT_MAX], u8, u16)> {
        check_transfer(bytes, pages)?;
        Ok(transfer_fields(bytes))
    }

    #[test]
    fn one_sector() -> Result {
        let (seg, n, sectors) = fields(512, uapi::SEGMENT_MAX)?;
        assert_eq!((n, sectors), (1, 0));
        assert_eq!((seg[0].first_sect, seg[0].last_sect), (0, 0));
        Ok(())
    }

    #[test]
    fn pages_fill_linearly() -> Result {
        let (seg, n, _) = fields(4096, uapi::SEGMENT_MAX)?;
        assert_eq!(n, 1);
        assert_eq!(seg[0].last_sect, 7);
        let (seg, n, _) = fields(4096 + 1024, uapi::SEGMENT_MAX)?;
        assert_eq!(n, 2);
        assert_eq!(
            (seg[0].last_sect, seg[1].first_sect, seg[1].last_sect),
            (7, 0, 1)
        );
        let (seg, n, sectors) = fields(MAX_REQUEST_BYTES, uapi::SEGMENT_MAX)?;
        assert_eq!((n, sectors), (11, 0));
        assert!(seg.iter().all(|s| s.first_sect == 0 && s.last_sect == 7));
        Ok(())
    }

    #[test]
    fn large_requests_count_pages_and_sectors() -> Result {
        // 12 pages, the last one holding one sector: the 11 first described, all full.
        let (seg, n, sectors) = fields(MAX_REQUEST_BYTES + 512, 12)?;
        assert_eq!((n, sectors), (12, 89));
        assert!(seg.iter().all(|s| s.first_sect == 0 && s.last_sect == 7));
        let (_, n, sectors) = fields(512 * 1024, uapi::SEGMENT_MAX_LARGE)?;
        assert_eq!((n, sectors), (128, 1024));
        // In an entry: `nr_sectors` at byte 2, 0 for a request of at most 11 pages.
        let e = RingRequest::new(uapi::OP_READ, 8, 64 * 1024, 16)?.entry(2);
        assert_eq!((e.nr_segments, e.nr_sectors), (16, 128));
        assert_eq!(&e.as_bytes()[2..4], &128u16.to_ne_bytes());
        let e = RingRequest::new(uapi::OP_READ, 8, 44 * 1024, 16)?.entry(2);
        assert_eq!((e.nr_segments, e.nr_sectors), (11, 0));
        Ok(())
    }

    #[test]
    fn bad_sizes_are_refused() {
        let s = uapi::SEGMENT_MAX;
        assert!(check_transfer(0, s).is_err());
        assert!(check_transfer(511, s).is_err());
        assert!(check_transfer(4097, s).is_err());
        assert!(check_transfer(MAX_REQUEST_BYTES + 512, s).is_err());
        // More than the slot's pages, or than the largest slot.
        assert!(check_transfer(16 * 4096 + 512, 16).is_err());
        assert!(check_transfer(129 * 4096, 200).is_err());
        assert!(RingRequest::new(uapi::OP_WRITE, 0, 12 * 4096, s).is_err());
    }

    #[test]
    fn response_counts_are_bounded() -> Result {
        assert_eq!(new_responses(5, 3)?, 2);
        assert_eq!(new_responses(3, 3)?, 0);
        assert_eq!(new_responses(35, 3)?, 32);
        // Free-running indices wrap.
        assert_eq!(new_responses(1, u32::MAX - 1)?, 3);
        // More than a ring ahead, far ahead, or behind.
        assert_eq!(new_responses(36, 3), Err(EIO));
        assert_eq!(new_responses(3 + 1000, 3), Err(EIO));
        assert_eq!(new_responses(2, 3), Err(EIO));
        Ok(())
    }

    #[test]
    fn responses_are_checked_against_pending_slots() {
        let pending = |s: usize| (s == 4).then_some(uapi::OP_WRITE);
        let rsp = |id: u64, operation: u8| Response {
            id,
            operation,
            ..Default::default()
        };
        assert_eq!(check_response(&rsp(4, uapi::OP_WRITE), pending), Ok(4));
        assert_eq!(
            check_response(&rsp(32, uapi::OP_WRITE), pending),
            Err(BadResponse::BadId)
        );
        assert_eq!(
            check_response(&rsp(u64::MAX, 1), pending),
            Err(BadResponse::BadId)
        );
        assert_eq!(
            check_response(&rsp(3, uapi::OP_WRITE), pending),
            Err(BadResponse::NotPending)
        );
        assert_eq!(
            check_response(&rsp(4, uapi::OP_READ), pending),
            Err(BadResponse::WrongOp)
        );
    }

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
    fn req_event_decides_the_wake_up() {
        // A tapdisk asleep after consuming up to 5 asked for 6.
        assert!(wake_for_requests(6, 5, 6));
        assert!(wake_for_requests(6, 5, 9));
        // Polling, it left req_event behind: the next requests wake nobody.
        assert!(!wake_for_requests(6, 6, 7));
        assert!(!wake_for_requests(6, 9, 12));
        // Not yet reached.
        assert!(!wake_for_requests(9, 5, 7));
        // Across the wrap of the indices.
        assert!(wake_for_requests(1, u32::MAX, 2));
        assert!(wake_for_requests(u32::MAX, u32::MAX - 1, 1));
        assert!(!wake_for_requests(u32::MAX - 1, u32::MAX - 1, 1));
        // Nothing published: nobody to wake, unless it never writes req_event.
        assert!(!wake_for_requests(6, 5, 5));
        assert!(wake_for_requests(0, 5, 6));
        // Staged writes: only a tapdisk waiting for the next request.
        assert!(wake_for_staged(6, 5));
        assert!(!wake_for_staged(5, 5));
        assert!(!wake_for_staged(7, 5));
        assert!(wake_for_staged(0, 5));
        assert!(wake_for_staged(0, u32::MAX));
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
                discard: true,
                staged_writes: false,
                req_event: false,
                large: false,
            }
        );
        assert!(d.recovery);
        let d = DeviceInfo::from_info(&info(8, 512, 512, uapi::DEVICE_STAGED_WRITES))?;
        assert!(d.features.staged_writes && !d.features.flush);
        let d = DeviceInfo::from_info(&info(8, 512, 512, uapi::DEVICE_REQ_EVENT))?;
        assert!(d.features.req_event && !d.features.staged_writes);
        let d = DeviceInfo::from_info(&info(8, 512, 512, uapi::DEVICE_LARGE_REQUESTS))?;
        assert!(d.features.large && !d.features.req_event);
        assert!(DeviceInfo::from_info(&info(8, 512, 512, 0x400)).is_err());
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
            info(8, 512, 512, 0x400),
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
