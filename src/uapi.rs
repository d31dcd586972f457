// SPDX-License-Identifier: GPL-2.0

//! The blktap2 kernel ABI, XenServer dialect; mirrors `include/uapi/blktap.h`.
//!
//! The ioctl numbers are plain integers (not `_IO` encodings) and every layout is fixed by the
//! original driver, so that existing tap-ctl and tapdisk binaries work unchanged. The KUnit suite
//! at the bottom pins sizes and offsets to the published ones.

// The ring and device-info layouts are part of the ABI even before the data path uses them, and
// are checked by the KUnit suite below.
#![allow(dead_code)]

use kernel::{
    prelude::*,
    transmute::{
        AsBytes,
        FromBytes, //
    },
};

/// Name of the control device in `/proc/misc`.
pub(crate) const MISC_NAME: &CStr = c"blktap/control";
/// Node of the control device, under `/dev`.
pub(crate) const CONTROL_NODE: &CStr = c"xen/blktap-2/control";
/// Directory of the ring and block nodes, under `/dev`.
pub(crate) const NODE_DIR: &CStr = c"xen/blktap-2";
/// Permissions of every blktap node.
pub(crate) const NODE_MODE: u16 = 0o600;
/// Name of the ring char region in `/proc/devices`.
pub(crate) const RING_REGION_NAME: &CStr = c"blktap2";
/// Name of the block major in `/proc/devices`.
pub(crate) const BLOCK_MAJOR_NAME: &CStr = c"tapdev";
/// The sysfs class.
pub(crate) const CLASS_NAME: &CStr = c"blktap2";

/// Number of ring minors, and so of taps.
pub(crate) const MAX_MINORS: u32 = 16384;
/// Longest tap name in bytes; the C buffer has room for a NUL as well.
pub(crate) const NAME_MAX: usize = 255;

/// Control ioctl: allocate a tap, answer a [`BlktapInfo`].
pub(crate) const IOCTL_ALLOC_TAP: u32 = 200;
/// Control ioctl: free the tap whose minor is the argument.
pub(crate) const IOCTL_FREE_TAP: u32 = 201;
/// Ring ioctl: responses are in the ring.
pub(crate) const IOCTL_RESPOND: u32 = 1;
/// Ring ioctl: create the disk from [`BlktapParams`].
pub(crate) const IOCTL_CREATE_DEVICE_COMPAT: u32 = 202;
/// Ring ioctl: remove the disk.
pub(crate) const IOCTL_REMOVE_DEVICE: u32 = 207;
/// Ring ioctl: create the disk from [`BlktapDeviceInfo`].
pub(crate) const IOCTL_CREATE_DEVICE: u32 = 208;
/// Ring ioctl (extension): stop handing new requests to the ring.
pub(crate) const IOCTL_PAUSE: u32 = 204;
/// Ring ioctl (extension): hand requests to the ring again.
pub(crate) const IOCTL_RESUME: u32 = 206;

/// Request slots in the ring.
pub(crate) const RING_SIZE: usize = 32;
/// Segments (pages) per request, and data pages per slot of the standard mapping.
pub(crate) const SEGMENT_MAX: usize = 11;
/// Pages of the standard ring mapping: the ring page, then one data page per slot and segment.
pub(crate) const MMAP_PAGES: usize = 1 + RING_SIZE * SEGMENT_MAX;
/// The most data pages per slot (and per request, with [`DEVICE_LARGE_REQUESTS`]) a mapping may
/// have: a mapping of `1 + RING_SIZE * S` pages has `S` per slot, `SEGMENT_MAX..=` this.
pub(crate) const SEGMENT_MAX_LARGE: usize = 128;
/// Bytes before the first ring entry.
pub(crate) const RING_HEADER_SIZE: usize = 64;
/// Bytes of a ring entry (a request or a response).
pub(crate) const RING_ENTRY_SIZE: usize = 112;
/// Offset of the `msg` byte in the ring header.
pub(crate) const RING_MSG_OFFSET: usize = 16;
/// `msg`: the kernel asks tapdisk to pause (`BLKTAP2_RING_MESSAGE_PAUSE`).
pub(crate) const RING_MSG_PAUSE: u8 = 1;
/// `msg`: the kernel asks tapdisk to resume (`BLKTAP2_RING_MESSAGE_RESUME`).
pub(crate) const RING_MSG_RESUME: u8 = 2;
/// `msg`: the kernel asks tapdisk to close the ring (`BLKTAP2_RING_MESSAGE_CLOSE`).
pub(crate) const RING_MSG_CLOSE: u8 = 3;

/// Request operation: read.
pub(crate) const OP_READ: u8 = 0;
/// Request operation: write.
pub(crate) const OP_WRITE: u8 = 1;
/// Request operation (negotiated, [`DEVICE_FLUSH`]): make completed writes durable.
pub(crate) const OP_FLUSH: u8 = 2;
/// Request operation (negotiated, [`DEVICE_DISCARD`]): discard a range ([`RequestDiscard`]).
pub(crate) const OP_DISCARD: u8 = 3;
/// Request operation (negotiated, [`DEVICE_FUA`]): a write durable when answered.
pub(crate) const OP_WRITE_FUA: u8 = 4;
/// Largest discard in one request, in 512-byte sectors.
pub(crate) const DISCARD_MAX_SECTORS: u32 = 1 << 21;
/// Response status: success.
pub(crate) const RSP_OKAY: i16 = 0;
/// Response status: the operation is not supported.
pub(crate) const RSP_EOPNOTSUPP: i16 = -2;

/// `blktap_device_info.flags`: the disk is read-only.
pub(crate) const DEVICE_RO: usize = 1;
/// `blktap_device_info.flags`: a volatile write cache; tapdisk handles [`OP_FLUSH`].
pub(crate) const DEVICE_FLUSH: usize = 0x04;
/// `blktap_device_info.flags`: tapdisk handles [`OP_DISCARD`].
pub(crate) const DEVICE_DISCARD: usize = 0x08;
/// `blktap_device_info.flags`: tapdisk handles [`OP_WRITE_FUA`]; needs [`DEVICE_FLUSH`].
pub(crate) const DEVICE_FUA: usize = 0x20;
/// `blktap_device_info.flags`: keep the disk and its requests when tapdisk dies.
pub(crate) const DEVICE_RECOVERY: usize = 0x40;
/// `blktap_device_info.flags`: write data is copied in tapdisk's context; writes wait, staged,
/// until tapdisk polls the ring or calls `RESPOND` (the header's `staged` counts them).
pub(crate) const DEVICE_STAGED_WRITES: usize = 0x80;
/// `blktap_device_info.flags`: the kernel signals tapdisk of new requests only when the ring
/// header's `req_event` asks for it (wake-up suppression, as Xen rings do).
pub(crate) const DEVICE_REQ_EVENT: usize = 0x100;
/// `blktap_device_info.flags`: requests of up to as many pages as the mapping has per slot
/// (more than [`SEGMENT_MAX`]): `nr_segments` pages, `Request::nr_sectors` sectors.
pub(crate) const DEVICE_LARGE_REQUESTS: usize = 0x200;
/// Flags this driver knows.
pub(crate) const DEVICE_FLAGS_KNOWN: usize = DEVICE_RO
    | DEVICE_FLUSH
    | DEVICE_DISCARD
    | DEVICE_FUA
    | DEVICE_RECOVERY
    | DEVICE_STAGED_WRITES
    | DEVICE_REQ_EVENT
    | DEVICE_LARGE_REQUESTS;

/// `ALLOC_TAP` result.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct BlktapInfo {
    pub(crate) ring_major: u32,
    pub(crate) bdev_major: u32,
    pub(crate) ring_minor: u32,
}

/// `CREATE_DEVICE_COMPAT` argument.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct BlktapParams {
    pub(crate) name: [u8; 256],
    pub(crate) capacity: u64,
    pub(crate) sector_size: usize,
}

/// `CREATE_DEVICE` argument.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct BlktapDeviceInfo {
    pub(crate) capacity: u64,
    pub(crate) sector_size: u32,
    pub(crate) physical_sector_size: u32,
    pub(crate) flags: usize,
    pub(crate) rsvd: [usize; 4],
}

/// A segment of a ring request: sectors `first_sect..=last_sect` of one data page.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct Segment {
    pub(crate) pad: u32,
    pub(crate) first_sect: u8,
    pub(crate) last_sect: u8,
    pub(crate) pad2: u16,
}

/// A ring request, written by the kernel.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct Request {
    pub(crate) operation: u8,
    pub(crate) nr_segments: u8,
    /// With [`DEVICE_LARGE_REQUESTS`], for more than [`SEGMENT_MAX`] segments: the length in
    /// 512-byte sectors; else 0.
    pub(crate) nr_sectors: u16,
    pub(crate) pad2: u32,
    pub(crate) id: u64,
    pub(crate) sector_number: u64,
    pub(crate) seg: [Segment; SEGMENT_MAX],
}

/// A discard request, written by the kernel in a ring entry (the C union's `discard`); padded
/// here to the entry size.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct RequestDiscard {
    pub(crate) operation: u8,
    pub(crate) nr_segments: u8,
    pub(crate) pad: u16,
    pub(crate) pad2: u32,
    pub(crate) id: u64,
    pub(crate) sector_number: u64,
    pub(crate) nr_sectors: u64,
    pub(crate) pad3: [u8; RING_ENTRY_SIZE - 32],
}

impl Request {
    /// The ring entry of a discard: the same bytes as `d`.
    pub(crate) fn from_discard(d: &RequestDiscard) -> Self {
        Self::from_bytes(d.as_bytes()).copied().unwrap_or_default()
    }
}

/// A ring response, written by tapdisk.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct Response {
    pub(crate) id: u64,
    pub(crate) operation: u8,
    pub(crate) pad: u8,
    pub(crate) status: i16,
    pub(crate) pad2: u32,
}

/// The shared ring's header (Xen `sring` layout).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct SringHeader {
    pub(crate) req_prod: u32,
    /// With [`DEVICE_REQ_EVENT`]: the request index at which tapdisk wants to be signalled.
    pub(crate) req_event: u32,
    pub(crate) rsp_prod: u32,
    pub(crate) rsp_event: u32,
    pub(crate) msg: u8,
    pub(crate) pad: [u8; 3],
    /// With [`DEVICE_STAGED_WRITES`]: the writes staged, not yet on the ring.
    pub(crate) staged: u32,
    pub(crate) pad2: [u8; 40],
}

// SAFETY: Plain integers; every bit pattern is valid, and there is no padding.
unsafe impl FromBytes for BlktapInfo {}
// SAFETY: Plain integers with no padding.
unsafe impl AsBytes for BlktapInfo {}
// SAFETY: Plain integers and bytes; every bit pattern is valid.
unsafe impl FromBytes for BlktapParams {}
// SAFETY: Plain integers; every bit pattern is valid.
unsafe impl FromBytes for BlktapDeviceInfo {}
// SAFETY: Plain integers; every bit pattern is valid.
unsafe impl FromBytes for Response {}
// SAFETY: Plain integers with explicit padding fields, so no uninitialised bytes.
unsafe impl AsBytes for Request {}
// SAFETY: Plain integers; every bit pattern is valid.
unsafe impl FromBytes for Request {}
// SAFETY: Plain integers with explicit padding fields, so no uninitialised bytes.
unsafe impl AsBytes for RequestDiscard {}

#[kunit_tests(blktap_uapi)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn control_structs_match_the_abi() {
        assert_eq!(size_of::<BlktapInfo>(), 12);
        assert_eq!(offset_of!(BlktapInfo, bdev_major), 4);
        assert_eq!(offset_of!(BlktapInfo, ring_minor), 8);
    }

    #[test]
    fn device_structs_match_the_abi() {
        assert_eq!(size_of::<BlktapParams>(), 272);
        assert_eq!(offset_of!(BlktapParams, capacity), 256);
        assert_eq!(offset_of!(BlktapParams, sector_size), 264);
        assert_eq!(size_of::<BlktapDeviceInfo>(), 56);
        assert_eq!(offset_of!(BlktapDeviceInfo, sector_size), 8);
        assert_eq!(offset_of!(BlktapDeviceInfo, physical_sector_size), 12);
        assert_eq!(offset_of!(BlktapDeviceInfo, flags), 16);
        assert_eq!(offset_of!(BlktapDeviceInfo, rsvd), 24);
    }

    #[test]
    fn ring_structs_match_the_abi() {
        assert_eq!(size_of::<Segment>(), 8);
        assert_eq!(offset_of!(Segment, first_sect), 4);
        assert_eq!(offset_of!(Segment, last_sect), 5);
        assert_eq!(size_of::<Request>(), 112);
        assert_eq!(offset_of!(Request, nr_segments), 1);
        assert_eq!(offset_of!(Request, id), 8);
        assert_eq!(offset_of!(Request, sector_number), 16);
        assert_eq!(offset_of!(Request, seg), 24);
        assert_eq!(size_of::<Response>(), 16);
        assert_eq!(offset_of!(Response, operation), 8);
        assert_eq!(offset_of!(Response, status), 10);
        assert_eq!(size_of::<SringHeader>(), RING_HEADER_SIZE);
        assert_eq!(size_of::<Request>(), RING_ENTRY_SIZE);
        assert_eq!(offset_of!(SringHeader, msg), RING_MSG_OFFSET);
        assert_eq!(offset_of!(SringHeader, rsp_prod), 8);
        assert_eq!(offset_of!(SringHeader, msg), 16);
        assert_eq!(offset_of!(SringHeader, staged), 20);
        assert_eq!(size_of::<RequestDiscard>(), RING_ENTRY_SIZE);
        assert_eq!(offset_of!(RequestDiscard, id), 8);
        assert_eq!(offset_of!(RequestDiscard, sector_number), 16);
        assert_eq!(offset_of!(RequestDiscard, nr_sectors), 24);
    }

    #[test]
    fn discard_entry_keeps_its_bytes() {
        let d = RequestDiscard {
            operation: OP_DISCARD,
            nr_segments: 0,
            pad: 0,
            pad2: 0,
            id: 7,
            sector_number: 1 << 33,
            nr_sectors: 0x1122_3344_5566_7788,
            pad3: [0; RING_ENTRY_SIZE - 32],
        };
        let r = Request::from_discard(&d);
        assert_eq!(r.operation, OP_DISCARD);
        assert_eq!(r.id, 7);
        assert_eq!(r.sector_number, 1 << 33);
        assert_eq!(
            &r.as_bytes()[24..32],
            &0x1122_3344_5566_7788u64.to_ne_bytes()
        );
    }

    #[test]
    fn ring_geometry() {
        let entry = size_of::<Request>().max(size_of::<Response>());
        let fit = (4096 - RING_HEADER_SIZE) / entry;
        assert_eq!(fit, 36);
        // The ring size is the largest power of two that fits.
        assert_eq!(RING_SIZE, 1 << (usize::BITS - 1 - fit.leading_zeros()));
        assert_eq!(MMAP_PAGES, 353);
        // A largest request's page count fits `nr_segments`, its sectors `nr_sectors`.
        assert!(SEGMENT_MAX_LARGE <= u8::MAX as usize);
        assert!(SEGMENT_MAX_LARGE * 8 <= u16::MAX as usize);
    }

    #[test]
    fn ioctl_numbers_are_the_xenserver_ones() {
        assert_eq!(IOCTL_RESPOND, 1);
        assert_eq!(IOCTL_ALLOC_TAP, 200);
        assert_eq!(IOCTL_FREE_TAP, 201);
        assert_eq!(IOCTL_CREATE_DEVICE_COMPAT, 202);
        assert_eq!(IOCTL_REMOVE_DEVICE, 207);
        assert_eq!(IOCTL_CREATE_DEVICE, 208);
        assert_eq!(IOCTL_PAUSE, 204);
        assert_eq!(IOCTL_RESUME, 206);
    }
}
