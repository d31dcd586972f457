// SPDX-License-Identifier: GPL-2.0

//! The pages a tap shares with its tapdisk: the ring page (header and entries) and 32 x `S` data
//! pages, `S` the pages per slot the mapping asked for (11, or up to 128 for large requests).
//! Allocated at a tap's first mapping and kept until the tap is freed (or, while it has no disk,
//! until a mapping asks for another `S`); nothing is allocated or mapped on the I/O path.
//!
//! Every access to the ring page is one volatile read or write of a whole field or entry: what
//! tapdisk writes is read once, into a copy, and checked before use (`protocol.rs`).

use core::mem::offset_of;

use kernel::{
    page::Page,
    prelude::*,
    sync::barrier::{
        smp_mb,
        Full,
        Read,
        Write, //
    },
};

use crate::{
    page::LowmemPage,
    uapi::{
        self,
        SringHeader, //
    },
};

/// The shared pages of a tap.
///
/// # Invariants
///
/// `per_slot` is in `SEGMENT_MAX..=SEGMENT_MAX_LARGE`, and `data` holds `RING_SIZE * per_slot`
/// pages.
pub(crate) struct RingPages {
    ring: LowmemPage,
    data: KVec<Page>,
    per_slot: usize,
}

impl RingPages {
    /// The data pages per slot of a mapping of `pages` pages (`1 + RING_SIZE * S`), if it is a
    /// mapping a tapdisk may make.
    pub(crate) fn per_slot_of_mapping(pages: usize) -> Option<usize> {
        let data = pages.checked_sub(1)?;
        let per_slot = data / uapi::RING_SIZE;
        (data % uapi::RING_SIZE == 0
            && (uapi::SEGMENT_MAX..=uapi::SEGMENT_MAX_LARGE).contains(&per_slot))
        .then_some(per_slot)
    }

    /// Allocates the ring page and `per_slot` data pages per slot, zeroed.
    ///
    /// # Errors
    ///
    /// `EINVAL` if `per_slot` is not in `SEGMENT_MAX..=SEGMENT_MAX_LARGE`, `ENOMEM`.
    pub(crate) fn new(per_slot: usize) -> Result<Self> {
        if !(uapi::SEGMENT_MAX..=uapi::SEGMENT_MAX_LARGE).contains(&per_slot) {
            return Err(EINVAL);
        }
        let ring = LowmemPage::alloc_zeroed()?;
        let n = uapi::RING_SIZE * per_slot;
        let mut data = KVec::with_capacity(n, GFP_KERNEL)?;
        for _ in 0..n {
            data.push(Page::alloc_page(GFP_KERNEL | __GFP_ZERO)?, GFP_KERNEL)?;
        }
        // INVARIANT: `per_slot` is checked above; `data` holds every data page.
        Ok(Self {
            ring,
            data,
            per_slot,
        })
    }

    /// Data pages per slot.
    pub(crate) fn per_slot(&self) -> usize {
        self.per_slot
    }

    /// Pages of the mapping: the ring page and the data pages.
    pub(crate) fn mapping_pages(&self) -> usize {
        1 + self.data.len()
    }

    /// The ring page.
    pub(crate) fn ring_page(&self) -> &Page {
        self.ring.page()
    }

    /// Every data page, slot by slot: the mapping's pages after the ring page.
    pub(crate) fn data_pages(&self) -> &[Page] {
        &self.data
    }

    /// The data pages of slot `slot` (< 32).
    pub(crate) fn slot(&self, slot: usize) -> &[Page] {
        let first = (slot % uapi::RING_SIZE) * self.per_slot;
        // By the type invariants, `first + per_slot <= data.len()`.
        self.data.get(first..first + self.per_slot).unwrap_or(&[])
    }

    /// Zeroes the ring page (at each new mapping).
    pub(crate) fn zero_ring(&self) {
        self.ring.zero();
    }

    /// The byte offset of ring entry `index` (free-running; the entry is `index % 32`).
    fn entry_offset(index: u32) -> usize {
        uapi::RING_HEADER_SIZE + (index as usize % uapi::RING_SIZE) * uapi::RING_ENTRY_SIZE
    }

    /// Writes request entry `index`.
    pub(crate) fn write_request(&self, index: u32, req: &uapi::Request) {
        // Entries 0..32 of 112 bytes after the 64-byte header fit in the page, 8-aligned.
        let _ = self.ring.write_volatile(Self::entry_offset(index), *req);
    }

    /// Copies response entry `index` out of the ring: the one read of it.
    pub(crate) fn read_response(&self, index: u32) -> uapi::Response {
        self.ring
            .read_volatile(Self::entry_offset(index))
            .unwrap_or_default()
    }

    /// Publishes `req_prod`: the entries written before are visible to tapdisk first.
    pub(crate) fn publish_req_prod(&self, req_prod: u32) {
        smp_mb(Write);
        let _ = self
            .ring
            .write_volatile(offset_of!(SringHeader, req_prod), req_prod);
    }

    /// Reads `rsp_prod` once; the entries it covers are read after it.
    pub(crate) fn read_rsp_prod(&self) -> u32 {
        let v = self
            .ring
            .read_volatile(offset_of!(SringHeader, rsp_prod))
            .unwrap_or(0);
        smp_mb(Read);
        v
    }

    /// The header's `msg` byte.
    pub(crate) fn msg(&self) -> u8 {
        self.ring
            .read_volatile(offset_of!(SringHeader, msg))
            .unwrap_or(0)
    }

    /// Reads `req_event` once, after a full barrier: the `req_prod` or `staged` written before is
    /// visible to tapdisk before the kernel looks at what tapdisk asked for, as tapdisk, after
    /// setting `req_event`, looks at them again (so one of the two sees the other).
    pub(crate) fn read_req_event(&self) -> u32 {
        smp_mb(Full);
        self.ring
            .read_volatile(offset_of!(SringHeader, req_event))
            .unwrap_or(0)
    }

    /// Sets the header's `staged` count (disks with staged writes).
    pub(crate) fn set_staged(&self, n: u32) {
        let _ = self.ring.write_volatile(offset_of!(SringHeader, staged), n);
    }

    /// Sets the header's `msg` byte.
    pub(crate) fn set_msg(&self, msg: u8) {
        let _ = self.ring.write_volatile(offset_of!(SringHeader, msg), msg);
    }
}

#[kunit_tests(blktap_ring_pages)]
mod tests {
    use super::*;

    #[test]
    fn entries_and_header_fields_fit_the_ring_page() -> Result {
        let pages = RingPages::new(uapi::SEGMENT_MAX)?;
        assert_eq!(pages.data_pages().len(), uapi::MMAP_PAGES - 1);
        assert_eq!(pages.mapping_pages(), uapi::MMAP_PAGES);
        for i in [0u32, 31, 32, u32::MAX] {
            let e = uapi::Request {
                id: u64::from(i),
                ..Default::default()
            };
            pages.write_request(i, &e);
        }
        // Entry 31 (also index u32::MAX) is the last one, and it ends inside the page.
        assert_eq!(
            RingPages::entry_offset(u32::MAX) + uapi::RING_ENTRY_SIZE,
            uapi::RING_HEADER_SIZE + 32 * uapi::RING_ENTRY_SIZE
        );
        // A response's `operation` lies where a request's `id` starts (byte 8).
        assert_eq!(pages.read_response(31).operation, 0xff);
        assert_eq!(pages.read_response(32).operation, 32);
        pages.set_msg(uapi::RING_MSG_PAUSE);
        assert_eq!(pages.msg(), uapi::RING_MSG_PAUSE);
        pages.publish_req_prod(7);
        assert_eq!(pages.read_rsp_prod(), 0);
        pages.zero_ring();
        assert_eq!(pages.msg(), 0);
        assert_eq!(pages.slot(31).len(), uapi::SEGMENT_MAX);
        Ok(())
    }

    #[test]
    fn the_mapping_length_gives_the_pages_per_slot() -> Result {
        let per_slot = RingPages::per_slot_of_mapping;
        assert_eq!(per_slot(uapi::MMAP_PAGES), Some(uapi::SEGMENT_MAX));
        assert_eq!(per_slot(1 + 32 * 64), Some(64));
        assert_eq!(per_slot(1 + 32 * 128), Some(128));
        for bad in [
            0,
            1,
            1 + 32 * 10,
            uapi::MMAP_PAGES + 1,
            1 + 32 * 129,
            usize::MAX,
        ] {
            assert_eq!(per_slot(bad), None);
        }
        assert!(RingPages::new(10).is_err() && RingPages::new(129).is_err());
        // Slots of a large mapping are disjoint and follow each other.
        let pages = RingPages::new(16)?;
        assert_eq!(pages.mapping_pages(), 1 + 32 * 16);
        assert_eq!(pages.slot(1).len(), 16);
        assert!(core::ptr::eq(&pages.slot(1)[0], &pages.data_pages()[16]));
        assert!(core::ptr::eq(
            &pages.slot(31)[15],
            &pages.data_pages()[32 * 16 - 1]
        ));
        Ok(())
    }
}
