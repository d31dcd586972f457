//! Owned memory mappings: anonymous memory, or a shared mapping of a device.

use std::num::NonZeroUsize;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use nix::errno::Errno;
use nix::sys::mman::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};

/// A read-write memory mapping, unmapped on drop.
///
/// The memory is only ever reached through raw pointers (never through Rust references), since
/// another party (the kernel, an I/O in flight) may change it at any time.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes of zeroed private anonymous memory. Pages are only allocated when touched.
    pub fn anonymous(len: usize) -> Result<Self, Errno> {
        let length = NonZeroUsize::new(len).ok_or(Errno::EINVAL)?;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks aliases nothing.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
            )
        }?;
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Maps `len` bytes of `fd` from offset 0, shared and read-write.
    pub fn shared(fd: BorrowedFd<'_>, len: usize) -> Result<Self, Errno> {
        let length = NonZeroUsize::new(len).ok_or(Errno::EINVAL)?;
        // SAFETY: a new mapping at an address the kernel picks aliases no Rust object; the memory
        // is only reached through raw pointers afterwards.
        let ptr = unsafe {
            mmap(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }?;
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    /// The first byte of the mapping.
    pub fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: mappings have at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, and the mapping is not used after
        // this: every user borrows the `Mapping`.
        if let Err(e) = unsafe { munmap(self.ptr.cast(), self.len) } {
            // Nothing sensible can be done; the address range stays reserved.
            log::warn!("munmap of {} bytes failed: {e}", self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_mappings_are_zeroed_and_writable() {
        let m = Mapping::anonymous(8192).unwrap();
        assert_eq!(m.len(), 8192);
        assert!(!m.is_empty());
        let p = m.as_ptr().as_ptr();
        // SAFETY: both offsets are inside the 8192-byte mapping, reached only through `p`.
        unsafe {
            assert_eq!(p.add(8191).read(), 0);
            p.add(4096).write(7);
            assert_eq!(p.add(4096).read(), 7);
        }
        assert_eq!(Mapping::anonymous(0).unwrap_err(), Errno::EINVAL);
    }
}
