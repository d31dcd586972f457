//! `ram:SIZE`: an in-memory disk. I/O completes as soon as it is queued.
//!
//! The disk lives in a memfd (tmpfs pages, allocated as they are first written), mapped shared.
//! A discard punches a hole in the memfd: the range reads back as zeros and its memory is given
//! back, which [`Backend::allocated_bytes`](super::Backend::allocated_bytes) shows (the memfd's
//! allocated blocks). Without memfds the disk is anonymous memory, and a discard drops the
//! range's whole pages (`MADV_DONTNEED`) and zeros the rest; the allocation is then the resident
//! pages (`mincore`). Flushes have nothing to do, and FUA writes are plain writes.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

use super::immediate::SyncBackend;
use super::{check_range, Features, ImageKind, Io};
use crate::mapping::Mapping;
use crate::ring::{Op, PAGE_SIZE};
use crate::{Error, Result};

/// An in-memory disk, allocated as it is written.
#[derive(Debug)]
pub struct RamBackend {
    // Unmapped before the memfd closes.
    data: Mapping,
    memfd: Option<OwnedFd>,
}

impl RamBackend {
    /// A zeroed disk of `size` bytes, in a memfd if the system has them.
    pub fn new(size: u64) -> Result<Self> {
        let len = usize::try_from(size).map_err(|_| Error::invalid("ram disk too large"))?;
        if let Some(memfd) = memfd(size) {
            if let Ok(data) = Mapping::shared(memfd.as_fd(), len) {
                return Ok(Self {
                    data,
                    memfd: Some(memfd),
                });
            }
        }
        Self::anonymous(size)
    }

    /// A zeroed disk of `size` bytes in anonymous memory.
    pub fn anonymous(size: u64) -> Result<Self> {
        let len = usize::try_from(size).map_err(|_| Error::invalid("ram disk too large"))?;
        let data = Mapping::anonymous(len)
            .map_err(|e| Error::os(format!("allocate a ram disk of {size} bytes"), e))?;
        Ok(Self { data, memfd: None })
    }

    /// Whether the disk is in a memfd.
    pub fn in_memfd(&self) -> bool {
        self.memfd.is_some()
    }

    fn base(&self) -> *mut u8 {
        self.data.as_ptr().as_ptr()
    }

    /// Zeros `[offset, offset + len)` and gives back the memory of its whole pages.
    fn discard(&mut self, offset: u64, len: u64) {
        if let Some(fd) = &self.memfd {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: fallocate on our own memfd; the range is inside it (checked by the caller).
            let r = unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset as i64, len as i64) };
            if r == 0 {
                return;
            }
        }
        let (start, end) = (offset as usize, (offset + len) as usize);
        let page_start = start.next_multiple_of(PAGE_SIZE);
        let page_end = end / PAGE_SIZE * PAGE_SIZE;
        let zero = |from: usize, to: usize| {
            if from < to {
                // SAFETY: [from, to) is inside the mapping (the caller checked the range).
                unsafe { std::ptr::write_bytes(self.base().add(from), 0, to - from) };
            }
        };
        if self.memfd.is_none() && page_start < page_end {
            zero(start, page_start);
            zero(page_end, end);
            // SAFETY: whole pages inside our private anonymous mapping, which nothing else
            // references; they read back as zeros afterwards.
            let r = unsafe {
                libc::madvise(
                    self.base().add(page_start).cast(),
                    page_end - page_start,
                    libc::MADV_DONTNEED,
                )
            };
            if r == 0 {
                return;
            }
        }
        zero(start, end);
    }
}

/// A memfd of `size` bytes, if the system has them.
fn memfd(size: u64) -> Option<OwnedFd> {
    // SAFETY: a NUL-terminated name and valid flags.
    let fd = unsafe { libc::memfd_create(c"blktap-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    nix::unistd::ftruncate(&fd, i64::try_from(size).ok()?).ok()?;
    Some(fd)
}

impl SyncBackend for RamBackend {
    fn kind(&self) -> ImageKind {
        ImageKind::Ram
    }

    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    /// Copies between the disk and the buffers of `io`; discards zero and free their range.
    unsafe fn transfer(&mut self, io: &Io) -> Result<(), Errno> {
        check_range(io, self.size())?;
        match io.op {
            Op::Flush => return Ok(()),
            Op::Discard => {
                self.discard(io.offset, io.discard_len);
                return Ok(());
            }
            Op::Read | Op::Write | Op::WriteFua => {}
        }
        let mut pos = io.offset as usize;
        for v in &io.iov {
            // SAFETY: check_range put [offset, offset + len) inside the mapping, so this
            // iovec's part is too; the iovec is valid for its length (the `queue` contract).
            // The two never overlap: the disk is private to this backend.
            unsafe {
                let disk = self.base().add(pos);
                let buf = v.iov_base.cast::<u8>();
                match io.op {
                    Op::Read => std::ptr::copy_nonoverlapping(disk, buf, v.iov_len),
                    _ => std::ptr::copy_nonoverlapping(buf, disk, v.iov_len),
                }
            }
            pos += v.iov_len;
        }
        Ok(())
    }

    fn features(&self) -> Features {
        Features::ALL
    }

    fn block_status(&self, offset: u64, len: u64) -> Option<Vec<super::Extent>> {
        // A memfd (tmpfs) knows its holes: pages never written, or given back by a discard.
        super::seek_extents(self.memfd.as_ref()?.as_fd(), offset, len)
    }

    fn allocated_bytes(&self) -> Option<u64> {
        if let Some(fd) = &self.memfd {
            let st = nix::sys::stat::fstat(fd).ok()?;
            return Some(st.st_blocks as u64 * 512);
        }
        let pages = self.data.len().div_ceil(PAGE_SIZE);
        let mut vec = vec![0u8; pages];
        // SAFETY: the mapping is page-aligned, `vec` has one byte per page of it.
        let r = unsafe { libc::mincore(self.base().cast(), self.data.len(), vec.as_mut_ptr()) };
        (r == 0).then(|| vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE_SIZE as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::immediate::Synchronous;
    use crate::backend::{Backend, Completion};
    use nix::errno::Errno;

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    #[test]
    fn writes_read_back_and_ranges_are_checked() {
        let mut ram = Synchronous::new(RamBackend::new(1 << 20).unwrap());
        assert_eq!(ram.size(), 1 << 20);
        assert_eq!(ram.kind(), ImageKind::Ram);
        let mut a = vec![0xa5u8; 512];
        let mut b = vec![0x5au8; 1024];
        // SAFETY: the buffers outlive the I/O, which completes inside `queue`.
        unsafe {
            ram.queue(Io {
                tag: 1,
                op: Op::Write,
                offset: 4096,
                iov: vec![iov(&mut a), iov(&mut b)],
                discard_len: 0,
            })
        };
        let mut back = vec![0u8; 2048];
        // SAFETY: as above.
        unsafe {
            ram.queue(Io {
                tag: 2,
                op: Op::Read,
                offset: 4096 - 512,
                iov: vec![iov(&mut back)],
                discard_len: 0,
            });
            ram.queue(Io {
                tag: 3,
                op: Op::Read,
                offset: (1 << 20) - 512,
                iov: vec![iov(&mut a), iov(&mut b)],
                discard_len: 0,
            });
        }
        assert_eq!(ram.in_flight(), 3);
        ram.submit().unwrap();
        let mut done = Vec::new();
        ram.reap(&mut done);
        assert_eq!(ram.in_flight(), 0);
        assert_eq!(
            done,
            [
                Completion {
                    tag: 1,
                    result: Ok(())
                },
                Completion {
                    tag: 2,
                    result: Ok(())
                },
                Completion {
                    tag: 3,
                    result: Err(Errno::EIO)
                },
            ]
        );
        assert!(back[..512].iter().all(|&x| x == 0));
        assert!(back[512..1024].iter().all(|&x| x == 0xa5));
        assert!(back[1024..].iter().all(|&x| x == 0x5a));
        assert!(RamBackend::new(u64::MAX).is_err());
    }

    fn io(op: Op, offset: u64, iov: Vec<libc::iovec>, discard_len: u64) -> Io {
        Io {
            tag: 0,
            op,
            offset,
            iov,
            discard_len,
        }
    }

    fn discard_frees_and_zeros(mut ram: Synchronous<RamBackend>) {
        let size = ram.size();
        let before = ram.allocated_bytes().unwrap();
        let mut buf = vec![0x77u8; 2 << 20];
        let mut done = Vec::new();
        // Write 2 MiB at 62 KiB, then FUA-write 4 KiB at 0, then flush.
        // SAFETY: the buffers outlive the I/Os, which complete inside `queue`.
        unsafe {
            ram.queue(io(Op::Write, 62 * 1024, vec![iov(&mut buf)], 0));
            ram.queue(io(Op::WriteFua, 0, vec![iov(&mut buf[..4096])], 0));
            ram.queue(io(Op::Flush, 0, vec![], 0));
        }
        ram.reap(&mut done);
        assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
        let written = ram.allocated_bytes().unwrap();
        assert!(written >= before + (2 << 20), "{before} -> {written}");
        // Discard 1 MiB + 1.5 KiB at 63 KiB: not page-aligned at either end; and 1000 bytes
        // inside one page.
        // SAFETY: no buffers.
        unsafe { ram.queue(io(Op::Discard, 63 * 1024, vec![], (1 << 20) + 1536)) };
        // Beyond the end: refused.
        // SAFETY: no buffers.
        unsafe { ram.queue(io(Op::Discard, size - 512, vec![], 1024)) };
        // SAFETY: no buffers.
        unsafe { ram.queue(io(Op::Discard, (1 << 20) + 200 * 1024 + 100, vec![], 1000)) };
        done.clear();
        ram.reap(&mut done);
        assert_eq!(done[0].result, Ok(()));
        assert_eq!(done[1].result, Err(Errno::EIO));
        assert_eq!(done[2].result, Ok(()));
        let after = ram.allocated_bytes().unwrap();
        assert!(
            after + (1 << 20) - 8192 <= written,
            "discarding 1 MiB freed only {} bytes",
            written - after
        );
        // The range reads back as zeros, the bytes around it kept their data.
        let mut back = vec![0xffu8; (1 << 20) + 8192];
        // SAFETY: as above.
        unsafe { ram.queue(io(Op::Read, 62 * 1024, vec![iov(&mut back)], 0)) };
        done.clear();
        ram.reap(&mut done);
        assert_eq!(done[0].result, Ok(()));
        assert!(back[..1024].iter().all(|&b| b == 0x77), "before the range");
        assert!(back[1024..1024 + (1 << 20) + 1536].iter().all(|&b| b == 0));
        assert!(back[1024 + (1 << 20) + 1536..].iter().all(|&b| b == 0x77));
        // The small range: zeros, and its neighbours in the same page kept.
        let mut back = vec![0xffu8; 4096];
        // SAFETY: as above.
        unsafe {
            ram.queue(io(
                Op::Read,
                (1 << 20) + 200 * 1024 - 1948,
                vec![iov(&mut back)],
                0,
            ))
        };
        done.clear();
        ram.reap(&mut done);
        assert_eq!(done[0].result, Ok(()));
        assert!(back[..2048].iter().all(|&b| b == 0x77));
        assert!(back[2048..3048].iter().all(|&b| b == 0));
        assert!(back[3048..].iter().all(|&b| b == 0x77));
    }

    #[test]
    fn discards_free_memory_in_a_memfd() {
        let ram = RamBackend::new(4 << 20).unwrap();
        assert!(ram.in_memfd(), "this system has memfds");
        discard_frees_and_zeros(Synchronous::new(ram));
    }

    #[test]
    fn discards_free_anonymous_memory() {
        let ram = RamBackend::anonymous(4 << 20).unwrap();
        assert!(!ram.in_memfd());
        assert_eq!(ram.allocated_bytes(), Some(0));
        discard_frees_and_zeros(Synchronous::new(ram));
    }
}
