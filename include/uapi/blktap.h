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

/* CREATE_DEVICE argument. */
struct blktap_device_info {
	__u64 capacity;          /* in 512-byte sectors */
	__u32 sector_size;
	__u32 physical_sector_size;
	unsigned long flags;
	unsigned long __rsvd[4];
};

/* The shared ring: page 0 of the ring mapping. */
#define BLKTAP_RING_SIZE 32
#define BLKTAP_SEGMENT_MAX 11
#define BLKTAP_RING_PAGES 1
#define BLKTAP_DATA_PAGES (BLKTAP_RING_SIZE * BLKTAP_SEGMENT_MAX)
#define BLKTAP_MMAP_PAGES (BLKTAP_RING_PAGES + BLKTAP_DATA_PAGES)
#define BLKTAP_RING_HEADER_SIZE 64

#define BLKTAP_OP_READ 0
#define BLKTAP_OP_WRITE 1

/*
 * The ring header's msg byte (offset 16): set by the kernel, it makes the ring fd poll readable.
 * CLOSE asks tapdisk to remove the disk and close the ring.
 */
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
	__u16 __pad;
	__u32 __pad2;
	__u64 id;
	__u64 sector_number;
	struct blktap_segment seg[BLKTAP_SEGMENT_MAX];
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
	struct blktap_response rsp;
};

struct blktap_sring {
	__u32 req_prod;
	__u32 req_event;
	__u32 rsp_prod;
	__u32 rsp_event;
	__u8 msg;
	__u8 __pad[47];
	union blktap_ring_entry ring[BLKTAP_RING_SIZE];
};

#endif /* _UAPI_BLKTAP_H */
