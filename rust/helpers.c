// SPDX-License-Identifier: GPL-2.0
/*
 * C helpers for the project's Rust abstractions: static inline kernel functions and macros that
 * Rust cannot call, and field accesses that must follow the C compiler's layout.
 *
 * Every helper is a thin, side-effect-free wrapper; the safety contracts are on the Rust side
 * (the Rust files of rust/).
 */
#include <linux/blk-mq.h>
#include <linux/blkdev.h>
#include <linux/highmem.h>
#include <linux/jiffies.h>
#include <linux/mm.h>
#include <linux/sched.h>

#include "helpers.h"

/* The mm of the current task (NULL for kernel threads). Compared, never dereferenced. */
const void *blktap_current_mm(void)
{
	return current->mm;
}

/* The thread-group id of the current task in the initial pid namespace. */
int blktap_current_tgid(void)
{
	return task_tgid_nr(current);
}

u64 blktap_rq_pos(struct request *rq)
{
	return blk_rq_pos(rq);
}

unsigned int blktap_rq_bytes(struct request *rq)
{
	return blk_rq_bytes(rq);
}

unsigned int blktap_rq_op(struct request *rq)
{
	return req_op(rq);
}

int blktap_rq_tag(struct request *rq)
{
	return rq->tag;
}

bool blktap_rq_fua(struct request *rq)
{
	return rq->cmd_flags & REQ_FUA;
}

void *blktap_rq_queuedata(struct request *rq)
{
	return rq->q->queuedata;
}

/*
 * Copies bytes @skip .. @skip + @len of @rq's data from (@to_pages false) or to (@to_pages true)
 * the linear buffer made of @npages pages (the buffer's byte 0 is the data's byte @skip).
 * Returns the bytes copied.
 *
 * A whole page on both sides (a segment of PAGE_SIZE at offset 0 landing on a whole buffer
 * page: every segment of page-aligned I/O) is copied with the kernel's page copy, which moves
 * eight bytes at a time (rep movsq, or its unrolled loop) where memcpy may move one at a time
 * (rep movsb on CPUs with FSRM: as fast in silicon, eight times the iterations for an emulated
 * CPU such as the bench's).
 */
size_t blktap_rq_copy(struct request *rq, struct page *const *pages, unsigned int npages,
		      size_t skip, size_t len, bool to_pages)
{
	struct req_iterator iter;
	struct bio_vec bv;
	size_t done = 0;

	rq_for_each_segment(bv, rq, iter) {
		size_t left = bv.bv_len;
		size_t bv_off = 0;

		if (skip >= left) {
			skip -= left;
			continue;
		}
		bv_off = skip;
		left -= skip;
		skip = 0;
		while (left && done < len) {
			unsigned int pg = done >> PAGE_SHIFT;
			size_t pg_off = done & ~PAGE_MASK;
			size_t n = min3(left, PAGE_SIZE - pg_off, len - done);
			char *buf;

			if (pg >= npages)
				return done;
			if (n == PAGE_SIZE) {
				/* Then pg_off, bv.bv_offset and bv_off are all 0. */
				if (to_pages) {
					copy_highpage(pages[pg], bv.bv_page);
				} else {
					copy_highpage(bv.bv_page, pages[pg]);
					flush_dcache_page(bv.bv_page);
				}
			} else {
				buf = kmap_local_page(pages[pg]);
				if (to_pages)
					memcpy_from_page(buf + pg_off, bv.bv_page, bv.bv_offset + bv_off, n);
				else
					memcpy_to_page(bv.bv_page, bv.bv_offset + bv_off, buf + pg_off, n);
				kunmap_local(buf);
			}
			done += n;
			bv_off += n;
			left -= n;
		}
		if (done == len)
			break;
	}
	return done;
}

int blktap_disk_openers(struct gendisk *disk)
{
	return disk_openers(disk);
}

void blktap_vma_set_ops(struct vm_area_struct *vma, const struct vm_operations_struct *ops,
			void *private_data)
{
	vma->vm_ops = ops;
	vma->vm_private_data = private_data;
}

void *blktap_vma_private(struct vm_area_struct *vma)
{
	return vma->vm_private_data;
}

unsigned long blktap_vma_pgoff(struct vm_area_struct *vma)
{
	return vma->vm_pgoff;
}

void *blktap_hctx_queuedata(struct blk_mq_hw_ctx *hctx)
{
	return hctx->queue->queuedata;
}

void *blktap_disk_queuedata(struct gendisk *disk)
{
	return disk->queue->queuedata;
}

/* Stops (@quiesce true) or restarts dispatching to the driver; may sleep. */
void blktap_disk_quiesce(struct gendisk *disk, bool quiesce)
{
	if (quiesce)
		blk_mq_quiesce_queue(disk->queue);
	else
		blk_mq_unquiesce_queue(disk->queue);
}

/* Sets the time a started request may take before the driver's timeout handler runs. */
void blktap_disk_set_timeout(struct gendisk *disk, unsigned int msecs)
{
	blk_queue_rq_timeout(disk->queue, max(msecs_to_jiffies(msecs), 1UL));
}

/* Fills in and allocates a tag set of @depth tags on one hardware queue. */
int blktap_tag_set_alloc(struct blk_mq_tag_set *set, const struct blk_mq_ops *ops,
			 unsigned int depth, unsigned int flags)
{
	memset(set, 0, sizeof(*set));
	set->ops = ops;
	set->nr_hw_queues = 1;
	set->nr_maps = 1;
	set->queue_depth = depth;
	set->numa_node = NUMA_NO_NODE;
	set->flags = flags;
	return blk_mq_alloc_tag_set(set);
}

size_t blktap_disk_limits_size(void)
{
	return sizeof(struct blktap_disk_limits);
}

/*
 * Allocates a disk on @set with the given limits and identity; the caller adds it. Every
 * segment is at most a page and never crosses one.
 */
struct gendisk *blktap_alloc_disk(struct blk_mq_tag_set *set, void *queuedata,
				  const struct block_device_operations *fops, int major,
				  int first_minor, const char *name,
				  const struct blktap_disk_limits *l)
{
	struct queue_limits lim = {
		.logical_block_size = l->logical_block_size,
		.physical_block_size = l->physical_block_size,
		.max_hw_sectors = l->max_hw_sectors,
		.max_segments = l->max_segments,
		.max_segment_size = PAGE_SIZE,
		.seg_boundary_mask = PAGE_SIZE - 1,
	};
	struct gendisk *disk;

	if (l->write_cache)
		lim.features |= BLK_FEAT_WRITE_CACHE;
	if (l->write_cache && l->fua)
		lim.features |= BLK_FEAT_FUA;
	if (l->max_discard_sectors) {
		lim.max_hw_discard_sectors = l->max_discard_sectors;
		lim.discard_granularity = l->physical_block_size;
	}

	disk = blk_mq_alloc_disk(set, &lim, queuedata);
	if (IS_ERR(disk))
		return disk;
	disk->major = major;
	disk->first_minor = first_minor;
	disk->minors = 1;
	disk->fops = fops;
	disk->flags |= GENHD_FL_NO_PART;
	strscpy(disk->disk_name, name, sizeof(disk->disk_name));
	set_capacity(disk, l->capacity);
	set_disk_ro(disk, l->read_only);
	return disk;
}

/* The kernel address of a lowmem page (every GFP_KERNEL page); valid while the page lives. */
void *blktap_page_address(struct page *page)
{
	return page_address(page);
}
