// SPDX-License-Identifier: GPL-2.0

//! Requests on the ring: how a block request is laid out in its slot's data pages, and the
//! checks every value tapdisk writes must pass before the kernel uses it.
//!
//! A request of `n` bytes (a multiple of 512, at most 44 KiB) fills the 11 data pages of its slot
//! linearly: segment `j` holds bytes `4096 * j ..` of the request, from sector 0 of its page. The
//! block layer's own segment geometry never reaches tapdisk; the kernel copies the data between
//! the request and the slot's pages.

use kernel::prelude::*;

use crate::uapi::{
    self,
    Response,
    Segment, //
};

/// Bytes in a sector.
pub(crate) const SECTOR_SIZE: u32 = 512;
/// Sectors in a data page.
const SECTORS_PER_PAGE: u32 = 4096 / SECTOR_SIZE;
/// The largest request, in bytes.
pub(crate) const MAX_REQUEST_BYTES: u32 = 4096 * uapi::SEGMENT_MAX as u32;

/// The segments of a request of `bytes` bytes: `(segments, count)`.
///
/// # Errors
///
/// `EINVAL` if `bytes` is 0, not a multiple of 512, or more than 44 KiB.
pub(crate) fn segments(bytes: u32) -> Result<([Segment; uapi::SEGMENT_MAX], u8)> {
    if bytes == 0 || bytes % SECTOR_SIZE != 0 || bytes > MAX_REQUEST_BYTES {
        return Err(EINVAL);
    }
    let mut seg = [Segment::default(); uapi::SEGMENT_MAX];
    let sectors = bytes / SECTOR_SIZE;
    let count = sectors.div_ceil(SECTORS_PER_PAGE);
    for (j, s) in seg.iter_mut().enumerate().take(count as usize) {
        // CAST: `j < 11`.
        let in_page = (sectors - j as u32 * SECTORS_PER_PAGE).min(SECTORS_PER_PAGE);
        s.first_sect = 0;
        // CAST: `in_page` is 1..=8.
        s.last_sect = (in_page - 1) as u8;
    }
    // CAST: `count <= 11`.
    Ok((seg, count as u8))
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

#[kunit_tests(blktap_ring)]
mod tests {
    use super::*;

    #[test]
    fn one_sector() -> Result {
        let (seg, n) = segments(512)?;
        assert_eq!(n, 1);
        assert_eq!((seg[0].first_sect, seg[0].last_sect), (0, 0));
        Ok(())
    }

    #[test]
    fn pages_fill_linearly() -> Result {
        let (seg, n) = segments(4096)?;
        assert_eq!(n, 1);
        assert_eq!(seg[0].last_sect, 7);
        let (seg, n) = segments(4096 + 1024)?;
        assert_eq!(n, 2);
        assert_eq!(
            (seg[0].last_sect, seg[1].first_sect, seg[1].last_sect),
            (7, 0, 1)
        );
        let (seg, n) = segments(MAX_REQUEST_BYTES)?;
        assert_eq!(n, 11);
        assert!(seg.iter().all(|s| s.first_sect == 0 && s.last_sect == 7));
        Ok(())
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(segments(0).is_err());
        assert!(segments(511).is_err());
        assert!(segments(4097).is_err());
        assert!(segments(MAX_REQUEST_BYTES + 512).is_err());
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
}
