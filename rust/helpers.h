/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Prototypes of the C helpers in rust/helpers.c, called from the Rust abstractions through
 * `extern "C"` declarations that must match these.
 */
#ifndef BLKTAP_RUST_HELPERS_H
#define BLKTAP_RUST_HELPERS_H

#include <linux/types.h>

struct blk_mq_hw_ctx;
struct blk_mq_ops;
struct blk_mq_tag_set;
struct block_device_operations;
struct gendisk;
struct page;
struct request;
struct vm_area_struct;
struct vm_operations_struct;

const void *blktap_current_mm(void);

int blktap_current_tgid(void);

u64 blktap_rq_pos(struct request *rq);

unsigned int blktap_rq_bytes(struct request *rq);

unsigned int blktap_rq_op(struct request *rq);

int blktap_rq_tag(struct request *rq);

bool blktap_rq_fua(struct request *rq);

void *blktap_rq_queuedata(struct request *rq);

size_t blktap_rq_copy(struct request *rq, struct page *const *pages, unsigned int npages,
		      size_t skip, size_t len, bool to_pages);

int blktap_disk_openers(struct gendisk *disk);

void blktap_vma_set_ops(struct vm_area_struct *vma, const struct vm_operations_struct *ops,
			void *private_data);

void *blktap_vma_private(struct vm_area_struct *vma);

unsigned long blktap_vma_pgoff(struct vm_area_struct *vma);

void *blktap_hctx_queuedata(struct blk_mq_hw_ctx *hctx);

void *blktap_disk_queuedata(struct gendisk *disk);

void blktap_disk_quiesce(struct gendisk *disk, bool quiesce);

void blktap_disk_set_timeout(struct gendisk *disk, unsigned int msecs);

int blktap_tag_set_alloc(struct blk_mq_tag_set *set, const struct blk_mq_ops *ops,
			 unsigned int depth, unsigned int flags);

/*
 * What a disk is made with: its size, queue limits and flags. Filled in by QueueLimits in
 * rust/blk_mq.rs, whose #[repr(C)] copy must match (checked at run time by size).
 */
struct blktap_disk_limits {
	u64 capacity;
	u32 logical_block_size;
	u32 physical_block_size;
	u32 max_hw_sectors;
	u32 max_discard_sectors;
	u16 max_segments;
	bool read_only;
	bool write_cache;
	bool fua;
};

size_t blktap_disk_limits_size(void);

struct gendisk *blktap_alloc_disk(struct blk_mq_tag_set *set, void *queuedata,
				  const struct block_device_operations *fops, int major,
				  int first_minor, const char *name,
				  const struct blktap_disk_limits *limits);

void *blktap_page_address(struct page *page);

#endif /* BLKTAP_RUST_HELPERS_H */
