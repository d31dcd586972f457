/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * blktap.h: the blktap2 kernel ABI, XenServer dialect, as implemented by blktap2-rs.
 *
 * Nodes:
 *   /dev/xen/blktap-2/control    misc device ("blktap/control" in /proc/misc)
 *   /dev/xen/blktap-2/blktapN    ring char device, region "blktap2" in /proc/devices
 *   /dev/xen/blktap-2/tapdevN    block device, major "tapdev" in /proc/devices
 *
 * The ioctl numbers are plain integers, not _IO() encodings, as in the original driver.
 * See Documentation/blktap2.rst for the protocol.
 */
#ifndef _UAPI_BLKTAP_H
#define _UAPI_BLKTAP_H

#include <linux/types.h>

#define BLKTAP_CONTROL_PATH "/dev/xen/blktap-2/control"
#define BLKTAP_RING_PATH_FMT "/dev/xen/blktap-2/blktap%d"
#define BLKTAP_DEVICE_PATH_FMT "/dev/xen/blktap-2/tapdev%d"
#define BLKTAP_MISC_NAME "blktap/control"
#define BLKTAP_RING_REGION_NAME "blktap2"
#define BLKTAP_BLOCK_MAJOR_NAME "tapdev"
#define BLKTAP_SYSFS_CLASS "blktap2"

/* Number of ring minors, and so of taps. */
#define BLKTAP_MAX_MINORS 16384

/* Control device ioctls. */
#define BLKTAP2_IOCTL_ALLOC_TAP 200
#define BLKTAP2_IOCTL_FREE_TAP 201

/* Ring device ioctls. */
#define BLKTAP2_IOCTL_RESPOND 1
#define BLKTAP2_IOCTL_CREATE_DEVICE_COMPAT 202
#define BLKTAP2_IOCTL_REMOVE_DEVICE 207
#define BLKTAP2_IOCTL_CREATE_DEVICE 208

/*
 * Extensions (blktap2-rs; the numbers are those of the older drivers' PAUSE and RESUME). Only
 * the process that maps the ring may call them, like every ring ioctl.
 *
 * PAUSE: the disk stops handing new requests to the ring; they wait in the block layer and are
 * not failed. Requests already on the ring stay there and are answered as usual. Returns at once;
 * tapdisk drains its own work after it.
 * RESUME: requests flow again. Both are idempotent, answer ENODEV without a disk, and clear a
 * pending PAUSE/RESUME message.
 *
 * sysfs (per tap): `pause` (rw: reads 1 while paused; writing 1/0 sets the ring message PAUSE or
 * RESUME) and `deadline` (rw: seconds a request may wait for its answer before it fails with an
 * I/O error; module parameter request_timeout, default 120).
 */
#define BLKTAP2_IOCTL_PAUSE 204
#define BLKTAP2_IOCTL_RESUME 206

/* ALLOC_TAP result. */
struct blktap_info {
	__u32 ring_major;
	__u32 bdev_major;
	__u32 ring_minor;
};

#define BLKTAP_NAME_MAX 256

/* CREATE_DEVICE_COMPAT argument. */
struct blktap2_params {
	char name[BLKTAP_NAME_MAX];
	__u64 capacity;          /* in 512-byte sectors */
	unsigned long sector_size;
};

#define BLKTAP_DEVICE_RO 1UL
/*
 * Negotiated extensions: a tapdisk sets these only if it handles what they bring. Old tapdisks
 * leave them zero and then see READ and WRITE only. A kernel that does not know a flag answers
 * CREATE_DEVICE with EINVAL, so a tapdisk can retry without it.
 *   FLUSH     the disk has a volatile write cache; the kernel sends BLKTAP_OP_FLUSH.
 *   DISCARD   the kernel sends BLKTAP_OP_DISCARD (struct blktap_request_discard).
 *   FUA       the kernel sends BLKTAP_OP_WRITE_FUA; only together with FLUSH.
 *   RECOVERY  when the ring's tapdisk dies, the disk and its requests stay, for a new tapdisk
 *             to map the ring again and answer them; see Documentation/blktap2.rst.
 *   STAGED_WRITES
 *             write data is copied into the slot's pages in tapdisk's context, not the
 *             submitter's: a write waits, staged, until tapdisk polls the ring or calls RESPOND
 *             (or PAUSE, REMOVE_DEVICE), and only then goes on the ring. The header's `staged`
 *             counts the writes waiting so, for a tapdisk that watches the ring without polling.
 *   REQ_EVENT the kernel signals the ring's poll queue for new requests only when the header's
 *             req_event asks for it (as Xen rings do): after publishing requests old..new, if
 *             req_event is in (old, new]; after staging a write, if req_event is req_prod + 1.
 *             A req_event of 0 (the ring page is zeroed at each mapping) is always signalled.
 *             A tapdisk about to sleep sets req_event = req_cons + 1, issues a full barrier,
 *             and looks at req_prod and staged once more; while it polls the ring it leaves
 *             req_event behind, and nobody signals it. See Documentation/blktap2.rst.
 *   LARGE_REQUESTS
 *             READ, WRITE and WRITE_FUA requests of up to S pages each, where S is the pages
 *             per slot of the tapdisk's mapping (below), 12 .. BLKTAP_SEGMENT_MAX_LARGE: a
 *             request of more than 11 pages has nr_segments = its page count and nr_sectors =
 *             its length in 512-byte sectors; its data fills pages 0 .. nr_segments - 1 of its
 *             slot from the first byte on, seg[0..11] describing the first 11. CREATE_DEVICE
 *             answers EINVAL if the mapping has 11 pages per slot.
 * (FLUSH and DISCARD have the values of the OpenXT dialect's FLUSH and TRIM.)
 */
#define BLKTAP_DEVICE_FLUSH 0x04UL
#define BLKTAP_DEVICE_DISCARD 0x08UL
#define BLKTAP_DEVICE_FUA 0x20UL
#define BLKTAP_DEVICE_RECOVERY 0x40UL
#define BLKTAP_DEVICE_STAGED_WRITES 0x80UL
#define BLKTAP_DEVICE_REQ_EVENT 0x100UL
#define BLKTAP_DEVICE_LARGE_REQUESTS 0x200UL

/* CREATE_DEVICE argument. */
struct blktap_device_info {
	__u64 capacity;          /* in 512-byte sectors */
	__u32 sector_size;
	__u32 physical_sector_size;
	unsigned long flags;
	unsigned long __rsvd[4];
};

/*
 * The ring mapping: page 0 is the ring, then S data pages per slot: page j of slot i is page
 * 1 + S * i + j. Tapdisk chooses S by the mapping's length, 1 + 32 * S pages: S = 11
 * (BLKTAP_MMAP_PAGES) is every tapdisk's mapping; a larger S, up to BLKTAP_SEGMENT_MAX_LARGE, only
 * for LARGE_REQUESTS. While the tap has a disk, a new mapping must have the disk's S.
 */
#define BLKTAP_RING_SIZE 32
#define BLKTAP_SEGMENT_MAX 11
#define BLKTAP_SEGMENT_MAX_LARGE 128
#define BLKTAP_RING_PAGES 1
#define BLKTAP_DATA_PAGES (BLKTAP_RING_SIZE * BLKTAP_SEGMENT_MAX)
#define BLKTAP_MMAP_PAGES (BLKTAP_RING_PAGES + BLKTAP_DATA_PAGES)
#define BLKTAP_RING_HEADER_SIZE 64

#define BLKTAP_OP_READ 0
#define BLKTAP_OP_WRITE 1
/* Only to a tapdisk that negotiated them (BLKTAP_DEVICE_FLUSH, _DISCARD, _FUA). */
#define BLKTAP_OP_FLUSH 2       /* no segments: make every completed write durable */
#define BLKTAP_OP_DISCARD 3     /* struct blktap_request_discard, no segments */
#define BLKTAP_OP_WRITE_FUA 4   /* a WRITE that is durable when answered */

/* Largest discard in one request, in 512-byte sectors (1 GiB). */
#define BLKTAP_DISCARD_MAX_SECTORS (1U << 21)

/*
 * The ring header's msg byte (offset 16): set by the kernel, it makes the ring fd poll readable.
 * PAUSE and RESUME ask tapdisk to pause or resume (an operator wrote the tap's sysfs `pause`);
 * tapdisk answers with the ioctl of the same name, which clears the byte. CLOSE asks tapdisk to
 * remove the disk and close the ring. Old tapdisks ignore PAUSE and RESUME.
 */
#define BLKTAP2_RING_MESSAGE_PAUSE 1
#define BLKTAP2_RING_MESSAGE_RESUME 2
#define BLKTAP2_RING_MESSAGE_CLOSE 3

#define BLKTAP_RSP_OKAY 0
#define BLKTAP_RSP_ERROR (-1)
#define BLKTAP_RSP_EOPNOTSUPP (-2)

struct blktap_segment {
	__u32 __pad;
	__u8 first_sect;
	__u8 last_sect;
	__u16 __pad2;
};

struct blktap_request {
	__u8 operation;
	__u8 nr_segments;
	__u16 nr_sectors;        /* LARGE_REQUESTS with nr_segments > 11 only, else 0 */
	__u32 __pad2;
	__u64 id;
	__u64 sector_number;
	struct blktap_segment seg[BLKTAP_SEGMENT_MAX];
};

/* A BLKTAP_OP_DISCARD request: the range sector_number .. + nr_sectors. */
struct blktap_request_discard {
	__u8 operation;
	__u8 nr_segments;        /* 0 */
	__u16 __pad;
	__u32 __pad2;
	__u64 id;
	__u64 sector_number;
	__u64 nr_sectors;        /* 1 .. BLKTAP_DISCARD_MAX_SECTORS */
};

struct blktap_response {
	__u64 id;
	__u8 operation;
	__u8 __pad;
	__s16 status;
	__u32 __pad2;
};

union blktap_ring_entry {
	struct blktap_request req;
	struct blktap_request_discard discard;
	struct blktap_response rsp;
};

struct blktap_sring {
	__u32 req_prod;
	__u32 req_event;         /* REQ_EVENT only: written by tapdisk, read by the kernel */
	__u32 rsp_prod;
	__u32 rsp_event;
	__u8 msg;
	__u8 __pad[3];
	__u32 staged;            /* STAGED_WRITES only: writes waiting to be put on the ring */
	__u8 __pad2[40];
	union blktap_ring_entry ring[BLKTAP_RING_SIZE];
};

#endif /* _UAPI_BLKTAP_H */
