//! `vhd:/path`: a VHD image (fixed, dynamic, or differencing with its chain of parents).
//!
//! The chain is opened from the leaf ([`crate::vhd::Chain`]); reads go down the chain for the
//! sectors a layer lacks, writes go to the leaf and allocate its blocks in a crash-safe order
//! (see [`crate::vhd::image`]). Transfers are plain `pread`/`pwrite` through a bounce buffer
//! (one, reused), on a worker thread ([`super::threaded`]). Flushes are `fdatasync` of the leaf, FUA writes
//! are a write and a flush. Discard is done on a leaf without parent (fixed or dynamic), where
//! a forgotten range reads as zeros and whole blocks are given back
//! ([`crate::vhd::VhdImage::discard`]); a differencing leaf does not do it (its forgotten
//! sectors would read as the parent's).

use nix::errno::Errno;

use super::immediate::SyncBackend;
use super::{check_range, Features, ImageKind, Io, LayerStats};
use crate::ring::Op;
use crate::vhd::{Chain, VhdError};

/// A VHD chain as a backend.
#[derive(Debug)]
pub struct VhdBackend {
    chain: Chain,
    readonly: bool,
    size: u64,
    /// The bounce buffer, kept from one transfer to the next (it grows to the largest).
    bounce: Vec<u8>,
}

impl VhdBackend {
    /// Opens the chain whose leaf is `path`.
    pub fn open(path: &std::path::Path, readonly: bool) -> Result<Self, VhdError> {
        let chain = Chain::open(path, !readonly)?;
        let size = chain.size();
        Ok(Self {
            chain,
            readonly,
            size,
            bounce: Vec::new(),
        })
    }

    /// The chain.
    pub fn chain(&self) -> &Chain {
        &self.chain
    }
}

fn errno(e: &VhdError) -> Errno {
    log::warn!("vhd: {e}");
    match e {
        VhdError::ReadOnly { .. } => Errno::EROFS,
        VhdError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => Errno::ENOSPC,
        _ => Errno::EIO,
    }
}

impl SyncBackend for VhdBackend {
    fn kind(&self) -> ImageKind {
        ImageKind::Vhd
    }

    fn size(&self) -> u64 {
        self.size
    }

    unsafe fn transfer(&mut self, io: &Io) -> Result<(), Errno> {
        match io.op {
            Op::Flush => return self.chain.flush().map_err(|e| errno(&e)),
            Op::Read | Op::Write | Op::WriteFua | Op::Discard => {}
        }
        check_range(io, self.size)?;
        if !io.offset.is_multiple_of(512) || !io.len().is_multiple_of(512) {
            return Err(Errno::EINVAL);
        }
        if self.readonly && io.op != Op::Read {
            return Err(Errno::EROFS);
        }
        if io.op == Op::Discard {
            if !self.chain.can_discard() {
                return Err(Errno::EOPNOTSUPP);
            }
            return self
                .chain
                .discard(io.offset, io.discard_len)
                .map_err(|e| errno(&e));
        }
        let len = usize::try_from(io.len()).map_err(|_| Errno::EINVAL)?;
        if self.bounce.len() < len {
            self.bounce.resize(len, 0);
        }
        // Every byte of `buf` is written before it is read: by the chain (a read) or from the
        // request's pages (a write).
        let buf = &mut self.bounce[..len];
        if io.op == Op::Read {
            self.chain.read(io.offset, buf).map_err(|e| errno(&e))?;
            let mut pos = 0;
            for v in &io.iov {
                // SAFETY: the iovec is valid for writes of its length until the completion
                // (the `queue` contract); `buf` is ours, so the two never overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(buf[pos..].as_ptr(), v.iov_base.cast(), v.iov_len)
                };
                pos += v.iov_len;
            }
            return Ok(());
        }
        let mut pos = 0;
        for v in &io.iov {
            // SAFETY: the iovec is valid for reads of its length (the `queue` contract); `buf`
            // is ours.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    v.iov_base.cast::<u8>(),
                    buf[pos..].as_mut_ptr(),
                    v.iov_len,
                )
            };
            pos += v.iov_len;
        }
        self.chain.write(io.offset, buf).map_err(|e| errno(&e))?;
        if io.op == Op::WriteFua {
            self.chain.flush().map_err(|e| errno(&e))?;
        }
        Ok(())
    }

    fn features(&self) -> Features {
        Features {
            flush: true,
            fua: true,
            discard: self.chain.can_discard(),
        }
    }

    /// The parents, each with the sectors read from it (the leaf's entry is the tap's own).
    fn layers_reporter(&self) -> Option<super::immediate::LayersReporter> {
        let reads = self.chain.reads();
        Some(std::sync::Arc::new(move |out: &mut Vec<LayerStats>| {
            for (i, (path, vhd)) in reads.images.iter().enumerate().skip(1) {
                out.push(LayerStats {
                    driver: if *vhd { "vhd" } else { "aio" }.into(),
                    name: path.display().to_string(),
                    hits: [reads.sectors(i), 0],
                    fail: [0, 0],
                });
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::threaded::tests::io;

    #[test]
    fn the_reused_bounce_buffer_never_shows_an_earlier_transfer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.vhd");
        crate::vhd::create::create_dynamic(&path, 8 << 20, None).unwrap();
        let mut b = VhdBackend::open(&path, false).unwrap();
        let mut data = vec![0x5au8; 44 << 10];
        // SAFETY: each buffer outlives its (synchronous) transfer.
        unsafe { b.transfer(&io(0, Op::Write, 0, &mut data)) }.unwrap();
        let mut back = vec![0u8; 44 << 10];
        // SAFETY: as above.
        unsafe { b.transfer(&io(0, Op::Read, 0, &mut back)) }.unwrap();
        assert_eq!(back, data);
        // An unallocated block, a shorter and a longer read after it: zeros, all of them.
        for len in [4096usize, 64 << 10] {
            let mut hole = vec![0xffu8; len];
            // SAFETY: as above.
            unsafe { b.transfer(&io(0, Op::Read, 4 << 20, &mut hole)) }.unwrap();
            assert!(hole.iter().all(|&x| x == 0), "{len}-byte read of a hole");
        }
        // A write shorter than the buffer, read back with what was there around it.
        let mut small = vec![0xa5u8; 1024];
        // SAFETY: as above.
        unsafe { b.transfer(&io(0, Op::Write, 512, &mut small)) }.unwrap();
        // SAFETY: as above.
        unsafe { b.transfer(&io(0, Op::Read, 0, &mut back)) }.unwrap();
        data[512..1536].fill(0xa5);
        assert_eq!(back, data);
    }

    #[test]
    fn the_stats_list_the_parents_with_what_was_read_from_each() {
        use crate::backend::Backend;
        let dir = tempfile::tempdir().unwrap();
        let (base, mid, leaf) = (
            dir.path().join("base.vhd"),
            dir.path().join("mid.vhd"),
            dir.path().join("leaf.vhd"),
        );
        crate::vhd::create::create_dynamic(&base, 8 << 20, None).unwrap();
        let mut b = VhdBackend::open(&base, false).unwrap();
        let mut data = vec![7u8; 8192];
        // SAFETY: the buffer outlives the synchronous transfer.
        unsafe { b.transfer(&io(0, Op::Write, 0, &mut data)) }.unwrap();
        drop(b);
        crate::vhd::create::snapshot(&mid, &base, false).unwrap();
        crate::vhd::create::snapshot(&leaf, &mid, false).unwrap();
        let mut t =
            super::super::threaded::Threaded::new(VhdBackend::open(&leaf, false).unwrap()).unwrap();
        let mut back = vec![0u8; 16384];
        // SAFETY: the buffer outlives the drain below.
        unsafe { t.queue(io(1, Op::Read, 0, &mut back)) };
        let mut done = Vec::new();
        t.drain(&mut done).unwrap();
        assert_eq!(done[0].result, Ok(()));
        assert!(back[..8192].iter().all(|&x| x == 7));
        let mut layers = Vec::new();
        t.layers(&mut layers);
        let shown: Vec<_> = layers
            .iter()
            .map(|l| (l.driver.as_str(), l.name.clone(), l.hits))
            .collect();
        // The base's first block is allocated whole by the write (a disk without parent marks
        // a new block present): all 32 sectors come from it; none from the empty middle image.
        assert_eq!(
            shown,
            [
                ("vhd", mid.display().to_string(), [0, 0]),
                ("vhd", base.display().to_string(), [32, 0]),
            ]
        );
    }
}
