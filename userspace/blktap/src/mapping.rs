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

/// Alignment of an [`AlignedBuf`]: a page, enough for `O_DIRECT` on any device.
pub const BUF_ALIGN: usize = 4096;

/// An owned, zero-initialised, page-aligned byte buffer: data for I/O that may go to an
/// `O_DIRECT` backend (an NBD client's request on a tap's image).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer owns its allocation exclusively; moving it between threads moves that
// ownership.
unsafe impl Send for AlignedBuf {}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

impl AlignedBuf {
    fn layout(len: usize) -> std::alloc::Layout {
        // A size overflowing isize is an allocation failure, as for Vec.
        std::alloc::Layout::from_size_align(len, BUF_ALIGN)
            .unwrap_or_else(|_| panic!("buffer of {len} bytes"))
    }

    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return Self {
                ptr: NonNull::dangling(),
                len,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            std::alloc::handle_alloc_error(layout)
        };
        Self { ptr, len }
    }

    /// A copy of `data`.
    pub fn copy_of(data: &[u8]) -> Self {
        let mut b = Self::zeroed(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    /// Its bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` initialised bytes owned by self (or a dangling pointer and 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Its bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, borrowed mutably through self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Its start, for an iovec (stable while the buffer lives, wherever it is moved).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated by `zeroed` with this very layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned_zeroed_and_copied() {
        for len in [0, 1, 512, 4096, 12345] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            if len > 0 {
                assert_eq!(b.as_slice().as_ptr() as usize % BUF_ALIGN, 0);
            }
        }
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let mut b = AlignedBuf::copy_of(&data);
        assert_eq!(b.as_slice(), &data[..]);
        b.as_mut_slice()[7] = 0xff;
        assert_eq!(b.as_slice()[7], 0xff);
        assert!(!b.is_empty() && AlignedBuf::zeroed(0).is_empty());
    }

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
