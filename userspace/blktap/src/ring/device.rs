//! A tap's ring device: `/dev/xen/blktap-2/blktapN`, opened and mapped, and its ioctls.

use std::cell::{Cell, RefCell};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use blktap_abi::{self as abi, blktap2_params, blktap_device_info};
use nix::errno::Errno;

use super::memory::{
    map_size, valid_pages_per_slot, RingMemory, PAGE_SIZE, STANDARD_PAGES_PER_SLOT,
};
use crate::control::ensure_char_node;
use crate::mapping::Mapping;
use crate::sysfs::{self, DeviceKind};
use crate::{Error, Result};

/// The ring ioctls, kept private (the macros make public functions).
mod ioctls {
    use blktap_abi::{self as abi, blktap2_params, blktap_device_info};

    nix::ioctl_write_int_bad!(ioctl_respond, abi::IOCTL_RESPOND);
    nix::ioctl_write_ptr_bad!(
        ioctl_create_device,
        abi::IOCTL_CREATE_DEVICE,
        blktap_device_info
    );
    nix::ioctl_write_ptr_bad!(
        ioctl_create_device_compat,
        abi::IOCTL_CREATE_DEVICE_COMPAT,
        blktap2_params
    );
    nix::ioctl_write_int_bad!(ioctl_remove_device, abi::IOCTL_REMOVE_DEVICE);
    nix::ioctl_none_bad!(ioctl_pause, abi::IOCTL_PAUSE);
    nix::ioctl_none_bad!(ioctl_resume, abi::IOCTL_RESUME);
}

use ioctls::{
    ioctl_create_device, ioctl_create_device_compat, ioctl_pause, ioctl_remove_device,
    ioctl_respond, ioctl_resume,
};

/// The extension flags of `CREATE_DEVICE` (everything but `RO`).
pub const EXTENSION_FLAGS: u64 = abi::DEVICE_FLUSH
    | abi::DEVICE_DISCARD
    | abi::DEVICE_FUA
    | abi::DEVICE_RECOVERY
    | abi::DEVICE_STAGED_WRITES
    | abi::DEVICE_REQ_EVENT
    | abi::DEVICE_LARGE_REQUESTS;

/// The kernel side of a tap's ring, as a tap needs it: the ring's memory and the ring ioctls,
/// and what sysfs says about the tap's disk. [`Ring`] is the real one; tests simulate it.
pub trait RingDevice: RingMemory {
    /// The tap's minor.
    fn minor(&self) -> u32;
    /// `CREATE_DEVICE` with `params` (the kernel's errno on failure).
    fn create_device(&self, params: &DiskParams) -> Result<()>;
    /// `REMOVE_DEVICE`.
    fn remove_device(&self) -> Result<()>;
    /// `PAUSE`: no new requests are handed to the ring.
    fn pause(&self) -> Result<()>;
    /// `RESUME`: requests flow again.
    fn resume(&self) -> Result<()>;
    /// The capacity in sectors of the tap's disk, if it has one (for recovery).
    fn existing_disk(&self) -> Result<Option<u64>>;
    /// Unmaps the ring and maps it again with `pages_per_slot` data pages per slot (11..=128),
    /// before the disk is created: to fall back to the standard mapping when the kernel refuses
    /// `DEVICE_LARGE_REQUESTS`. On failure the ring keeps a mapping of its former size (its
    /// memory may have moved even so).
    ///
    /// # Safety
    ///
    /// The ring's memory may move and change size: no pointer into it obtained before the call
    /// ([`RingMemory::base`], a [`SharedRing`](super::SharedRing), a data page) may be used
    /// after it, and no I/O into it may be in flight.
    unsafe fn remap(&self, pages_per_slot: usize) -> Result<()>;
}

/// The disk to create on a tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskParams {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Logical sector size in bytes.
    pub sector_size: u32,
    /// Physical sector size in bytes.
    pub physical_sector_size: u32,
    /// Whether the disk is read-only.
    pub readonly: bool,
    /// A name for the disk (the image, `type:path`); only the compat ioctl carries it.
    pub name: String,
    /// Extension flags ([`EXTENSION_FLAGS`]); the compat ioctl carries none.
    pub flags: u64,
}

impl DiskParams {
    /// A disk of `capacity` 512-byte sectors.
    pub fn new(capacity: u64, readonly: bool, name: impl Into<String>) -> Self {
        Self {
            capacity,
            sector_size: 512,
            physical_sector_size: 512,
            readonly,
            name: name.into(),
            flags: 0,
        }
    }

    /// The `CREATE_DEVICE` argument.
    pub fn device_info(&self) -> blktap_device_info {
        blktap_device_info {
            capacity: self.capacity,
            sector_size: self.sector_size,
            physical_sector_size: self.physical_sector_size,
            flags: (if self.readonly { abi::DEVICE_RO } else { 0 }) | self.flags,
            ..Default::default()
        }
    }

    /// The `CREATE_DEVICE_COMPAT` argument (the name is cut to 255 bytes).
    pub fn compat_params(&self) -> blktap2_params {
        let mut params = blktap2_params {
            capacity: self.capacity,
            sector_size: self.sector_size.into(),
            ..Default::default()
        };
        let name = self.name.as_bytes();
        let n = name.len().min(abi::NAME_MAX - 1);
        for (dst, src) in params.name.iter_mut().zip(&name[..n]) {
            *dst = *src as libc::c_char;
        }
        params
    }
}

/// An open, mapped ring device. Dropping it unmaps the ring and closes the device.
#[derive(Debug)]
pub struct Ring {
    // Fields drop in order: unmap, then close. Replaced only by `remap`.
    map: RefCell<Mapping>,
    /// Data pages per slot of `map`.
    pages_per_slot: Cell<usize>,
    file: File,
    minor: u32,
    path: PathBuf,
}

impl Ring {
    /// Opens and maps the ring of tap `minor` (the standard mapping), making its node first if
    /// it is missing.
    pub fn open(minor: u32) -> Result<Self> {
        Self::open_with(minor, STANDARD_PAGES_PER_SLOT)
    }

    /// Opens and maps the ring of tap `minor` with `pages_per_slot` data pages per slot
    /// (11..=128; more than 11 for `DEVICE_LARGE_REQUESTS`), making its node first if it is
    /// missing. A kernel that refuses the larger mapping (`EINVAL`: one without large requests,
    /// or a tap whose disk exists with 11 pages per slot) gets the standard one instead: see
    /// [`Ring::pages_per_slot`].
    pub fn open_with(minor: u32, pages_per_slot: usize) -> Result<Self> {
        if minor >= abi::MAX_MINORS {
            return Err(Error::os(
                format!("tap {minor} is out of range (0..{})", abi::MAX_MINORS),
                Errno::EINVAL,
            ));
        }
        let path = PathBuf::from(abi::ring_path(minor));
        if !path.exists() {
            let major = sysfs::major(DeviceKind::Char, abi::RING_REGION_NAME)?;
            ensure_char_node(&path, major.into(), minor.into())?;
        }
        Self::open_path_with(&path, minor, pages_per_slot)
    }

    /// Opens and maps the ring device at `path`, for tap `minor` (the standard mapping).
    pub fn open_path(path: &Path, minor: u32) -> Result<Self> {
        Self::open_path_with(path, minor, STANDARD_PAGES_PER_SLOT)
    }

    /// Opens and maps the ring device at `path`, for tap `minor`, with `pages_per_slot` data
    /// pages per slot, as [`Ring::open_with`].
    pub fn open_path_with(path: &Path, minor: u32, pages_per_slot: usize) -> Result<Self> {
        if !valid_pages_per_slot(pages_per_slot) {
            return Err(Error::invalid(format!(
                "{pages_per_slot} data pages per slot (11..={})",
                abi::SEGMENT_MAX_LARGE
            )));
        }
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten();
        if page != Some(PAGE_SIZE as libc::c_long) {
            return Err(Error::invalid(format!(
                "the ring layout needs {PAGE_SIZE}-byte pages, this system has {page:?}"
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| open_error(minor, path, e))?;
        // A stray regular file at the node's path would map, and fail only later.
        let is_char = file.metadata().map(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_char_device()
        });
        if !matches!(is_char, Ok(true)) {
            return Err(Error::os(
                format!("{} is not a character device", path.display()),
                Errno::ENODEV,
            ));
        }
        let (map, pages_per_slot) = map_ring(file.as_fd(), minor, pages_per_slot)?;
        Ok(Self {
            map: RefCell::new(map),
            pages_per_slot: Cell::new(pages_per_slot),
            file,
            minor,
            path: path.into(),
        })
    }

    /// The tap's minor.
    pub fn minor(&self) -> u32 {
        self.minor
    }

    /// The device node.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Data pages per slot of the mapping: 11, or more when the kernel mapped a larger one.
    pub fn pages_per_slot(&self) -> usize {
        self.pages_per_slot.get()
    }

    /// The ring fd, to poll for requests.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Creates the tap's disk (`CREATE_DEVICE`, or `CREATE_DEVICE_COMPAT` on kernels that do
    /// not know it, unless extension flags are asked for: then `ENOTTY`).
    pub fn create_device(&self, params: &DiskParams) -> Result<()> {
        let info = params.device_info();
        let fd = self.file.as_raw_fd();
        // SAFETY: `info` is a valid `blktap_device_info` the kernel only reads.
        match unsafe { ioctl_create_device(fd, &info) } {
            Ok(_) => return Ok(()),
            Err(Errno::ENOTTY) if params.flags == 0 => {}
            Err(e) => {
                return Err(Error::ioctl(
                    format!("create the disk of tap {}", self.minor),
                    e,
                ))
            }
        }
        let compat = params.compat_params();
        // SAFETY: `compat` is a valid `blktap2_params` the kernel only reads.
        unsafe { ioctl_create_device_compat(fd, &compat) }.map_err(|e| {
            Error::ioctl(
                format!("create the disk of tap {} (compat ioctl)", self.minor),
                e,
            )
        })?;
        Ok(())
    }

    /// Removes the tap's disk. `EBUSY` while the block device is open.
    pub fn remove_device(&self) -> Result<()> {
        // SAFETY: REMOVE_DEVICE takes no argument and touches no memory of ours.
        unsafe { ioctl_remove_device(self.file.as_raw_fd(), 0) }.map_err(|e| {
            let what = if e == Errno::EBUSY {
                format!(
                    "remove the disk of tap {} ({} is still open)",
                    self.minor,
                    abi::device_path(self.minor)
                )
            } else {
                format!("remove the disk of tap {}", self.minor)
            };
            Error::ioctl(what, e)
        })?;
        Ok(())
    }

    /// `PAUSE`: the disk stops handing new requests to the ring (`ENODEV` without a disk).
    pub fn pause(&self) -> Result<()> {
        // SAFETY: PAUSE takes no argument.
        unsafe { ioctl_pause(self.file.as_raw_fd()) }
            .map_err(|e| Error::ioctl(format!("pause tap {}", self.minor), e))?;
        Ok(())
    }

    /// `RESUME`: requests flow to the ring again.
    pub fn resume(&self) -> Result<()> {
        // SAFETY: RESUME takes no argument.
        unsafe { ioctl_resume(self.file.as_raw_fd()) }
            .map_err(|e| Error::ioctl(format!("resume tap {}", self.minor), e))?;
        Ok(())
    }

    /// Tells the kernel that responses are in the ring (`RESPOND`).
    pub fn respond(&self) -> Result<()> {
        // SAFETY: RESPOND ignores its argument and touches no memory of ours.
        unsafe { ioctl_respond(self.file.as_raw_fd(), 0) }
            .map_err(|e| Error::ioctl(format!("respond on tap {}", self.minor), e))?;
        Ok(())
    }
}

/// Maps the ring on `fd` with `pages` data pages per slot or, if the kernel refuses that with
/// `EINVAL`, with the standard 11.
fn map_ring(fd: BorrowedFd<'_>, minor: u32, pages: usize) -> Result<(Mapping, usize)> {
    let standard = STANDARD_PAGES_PER_SLOT;
    match Mapping::shared(fd, map_size(pages)) {
        Ok(map) => return Ok((map, pages)),
        Err(Errno::EINVAL) if pages != standard => {
            log::warn!(
                "tap {minor}: the kernel refused a ring of {pages} pages per slot (EINVAL: no \
                 large requests, or the tap's disk has a standard ring); mapping {standard}"
            );
        }
        Err(e) => return Err(Error::os(format!("map the ring of tap {minor}"), e)),
    }
    match Mapping::shared(fd, map_size(standard)) {
        Ok(map) => Ok((map, standard)),
        Err(e) => Err(Error::os(
            format!(
                "map the ring of tap {minor} ({e}: a tap whose disk exists needs the ring's \
                 pages per slot it was created with, tapdisk's --max-segments)"
            ),
            e,
        )),
    }
}

// SAFETY: the mapping is map_size(pages_per_slot) bytes from mmap (page-aligned; pages_per_slot
// checked in 11..=128), lives as long as the `Ring` (or until `remap`, an unsafe operation whose
// callers promise that no pointer into it survives), and is only reached through raw pointers
// and atomics.
unsafe impl RingMemory for Ring {
    fn base(&self) -> NonNull<u8> {
        self.map.borrow().as_ptr()
    }

    fn pages_per_slot(&self) -> usize {
        self.pages_per_slot.get()
    }

    fn kick(&self) -> Result<()> {
        self.respond()
    }
}

impl<D: RingDevice + ?Sized> RingDevice for std::rc::Rc<D> {
    fn minor(&self) -> u32 {
        (**self).minor()
    }

    fn create_device(&self, params: &DiskParams) -> Result<()> {
        (**self).create_device(params)
    }

    fn remove_device(&self) -> Result<()> {
        (**self).remove_device()
    }

    fn pause(&self) -> Result<()> {
        (**self).pause()
    }

    fn resume(&self) -> Result<()> {
        (**self).resume()
    }

    fn existing_disk(&self) -> Result<Option<u64>> {
        (**self).existing_disk()
    }

    unsafe fn remap(&self, pages_per_slot: usize) -> Result<()> {
        // SAFETY: the caller's promise, passed on.
        unsafe { (**self).remap(pages_per_slot) }
    }
}

impl RingDevice for Ring {
    fn minor(&self) -> u32 {
        self.minor
    }

    fn create_device(&self, params: &DiskParams) -> Result<()> {
        Ring::create_device(self, params)
    }

    fn remove_device(&self) -> Result<()> {
        Ring::remove_device(self)
    }

    fn pause(&self) -> Result<()> {
        Ring::pause(self)
    }

    fn resume(&self) -> Result<()> {
        Ring::resume(self)
    }

    fn existing_disk(&self) -> Result<Option<u64>> {
        sysfs::disk_capacity(self.minor)
    }

    unsafe fn remap(&self, pages_per_slot: usize) -> Result<()> {
        if !valid_pages_per_slot(pages_per_slot) {
            return Err(Error::invalid(format!(
                "{pages_per_slot} data pages per slot (11..={})",
                abi::SEGMENT_MAX_LARGE
            )));
        }
        let minor = self.minor;
        let old = self.pages_per_slot.get();
        // The kernel has one mapping of a ring at a time: the old one goes first. Meanwhile
        // (and for good, if no mapping can be made again) anonymous memory of the old size
        // stands in, so that the ring's memory stays valid for its pages per slot.
        let stand_in = Mapping::anonymous(map_size(old))
            .map_err(|e| Error::os(format!("remap the ring of tap {minor}"), e))?;
        let mut map = self.map.borrow_mut();
        drop(std::mem::replace(&mut *map, stand_in));
        let fd = self.file.as_fd();
        match Mapping::shared(fd, map_size(pages_per_slot)) {
            Ok(new) => {
                *map = new;
                self.pages_per_slot.set(pages_per_slot);
                Ok(())
            }
            Err(e) => {
                let restored = Mapping::shared(fd, map_size(old)).map(|back| *map = back);
                Err(Error::os(
                    format!(
                        "map the ring of tap {minor} with {pages_per_slot} pages per slot{}",
                        if restored.is_ok() {
                            ""
                        } else {
                            " (and the former mapping cannot be made again)"
                        }
                    ),
                    e,
                ))
            }
        }
    }
}

fn open_error(minor: u32, path: &Path, e: std::io::Error) -> Error {
    let errno = Errno::from_raw(e.raw_os_error().unwrap_or(Errno::EIO as i32));
    let what = match errno {
        Errno::ENXIO => format!("open {}: tap {minor} is not allocated", path.display()),
        Errno::EBUSY => format!(
            "open {}: the ring of tap {minor} is already open (served by another process)",
            path.display()
        ),
        _ => format!("open {}", path.display()),
    };
    Error::os(what, errno)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_params_fill_both_ioctl_structs() {
        let p = DiskParams::new(2048, true, "aio:/var/tmp/disk.raw");
        let info = p.device_info();
        assert_eq!(info.capacity, 2048);
        assert_eq!(info.sector_size, 512);
        assert_eq!(info.physical_sector_size, 512);
        assert_eq!(info.flags, 1);
        let compat = p.compat_params();
        assert_eq!(compat.capacity, 2048);
        assert_eq!(compat.sector_size, 512);
        assert_eq!(compat.name[0] as u8, b'a');
        assert_eq!(compat.name[20] as u8, b'w');
        assert_eq!(compat.name[21], 0);
        let long = DiskParams::new(1, false, "x".repeat(400)).compat_params();
        assert_eq!(long.name[254] as u8, b'x');
        assert_eq!(long.name[255], 0);
        assert_eq!(DiskParams::new(1, false, "").device_info().flags, 0);
        let mut ext = DiskParams::new(1, true, "");
        ext.flags = abi::DEVICE_FLUSH | abi::DEVICE_FUA | abi::DEVICE_RECOVERY;
        assert_eq!(ext.device_info().flags, 0x1 | 0x4 | 0x20 | 0x40);
    }

    #[test]
    fn minors_out_of_range_make_no_node() {
        let err = Ring::open(abi::MAX_MINORS).unwrap_err();
        assert_eq!(err.errno(), Errno::EINVAL as i32);
        assert!(!Path::new(&abi::ring_path(abi::MAX_MINORS)).exists());
    }

    #[test]
    fn opening_a_missing_ring_names_the_errno() {
        let err = Ring::open_path(Path::new("/nonexistent/blktap7"), 7).unwrap_err();
        assert_eq!(err.errno(), Errno::ENOENT as i32);
        assert!(err.to_string().contains("ENOENT"), "{err}");
    }

    #[test]
    fn mappings_have_11_to_128_pages_per_slot() {
        for pages in [0, 10, 129, 1000] {
            let err =
                Ring::open_path_with(Path::new("/nonexistent/blktap7"), 7, pages).unwrap_err();
            assert_eq!(err.errno(), Errno::EINVAL as i32, "{pages}");
        }
        // In range, the path is looked at (and missing).
        let err = Ring::open_path_with(Path::new("/nonexistent/blktap7"), 7, 128).unwrap_err();
        assert_eq!(err.errno(), Errno::ENOENT as i32);
    }

    #[test]
    fn a_regular_file_is_not_a_ring() {
        let path = std::env::temp_dir().join(format!("not-a-ring-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let err = Ring::open_path(&path, 0).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(err.errno(), Errno::ENODEV as i32);
        assert!(err.to_string().contains("not a character device"), "{err}");
    }
}
