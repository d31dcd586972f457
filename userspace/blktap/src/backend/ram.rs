//! `ram:SIZE`: an in-memory disk. I/O completes as soon as it is queued.

use super::immediate::SyncBackend;
use super::{check_range, ImageKind, Io};
use crate::mapping::Mapping;
use crate::ring::Op;
use crate::{Error, Result};

/// An in-memory disk, in anonymous memory allocated as it is written.
#[derive(Debug)]
pub struct RamBackend {
    data: Mapping,
}

impl RamBackend {
    /// A zeroed disk of `size` bytes.
    pub fn new(size: u64) -> Result<Self> {
        let len = usize::try_from(size).map_err(|_| Error::invalid("ram disk too large"))?;
        let data = Mapping::anonymous(len)
            .map_err(|e| Error::os(format!("allocate a ram disk of {size} bytes"), e))?;
        Ok(Self { data })
    }
}

impl SyncBackend for RamBackend {
    fn kind(&self) -> ImageKind {
        ImageKind::Ram
    }

    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    /// Copies between the disk and the buffers of `io`.
    unsafe fn transfer(&mut self, io: &Io) -> Result<(), nix::errno::Errno> {
        check_range(io, self.size())?;
        let mut pos = io.offset as usize;
        for v in &io.iov {
            // SAFETY: check_range put [offset, offset + len) inside the mapping, so this
            // iovec's part is too; the iovec is valid for its length (the `queue` contract).
            // The two never overlap: the disk is private to this backend.
            unsafe {
                let disk = self.data.as_ptr().as_ptr().add(pos);
                let buf = v.iov_base.cast::<u8>();
                match io.op {
                    Op::Read => std::ptr::copy_nonoverlapping(disk, buf, v.iov_len),
                    Op::Write => std::ptr::copy_nonoverlapping(buf, disk, v.iov_len),
                }
            }
            pos += v.iov_len;
        }
        Ok(())
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
            });
            ram.queue(Io {
                tag: 3,
                op: Op::Read,
                offset: (1 << 20) - 512,
                iov: vec![iov(&mut a), iov(&mut b)],
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
}
