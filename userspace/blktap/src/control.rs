//! The control device: allocating and freeing taps.
//!
//! The node is found the way the original tools found it: the minor of `blktap/control` in
//! `/proc/misc`, at `/dev/xen/blktap-2/control`. If devtmpfs did not make the node, it is made.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use blktap_abi as abi;
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

use crate::{Error, Result};

const MISC_MAJOR: u64 = 10;

nix::ioctl_read_bad!(ioctl_alloc_tap, abi::IOCTL_ALLOC_TAP, abi::blktap_info);
nix::ioctl_write_int_bad!(ioctl_free_tap, abi::IOCTL_FREE_TAP);

/// What `ALLOC_TAP` answers: the new tap's minor and the majors of its ring and disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapInfo {
    /// Major of the ring char devices (`blktap2` in `/proc/devices`).
    pub ring_major: u32,
    /// Major of the disks (`tapdev` in `/proc/devices`).
    pub bdev_major: u32,
    /// The tap's minor.
    pub minor: u32,
}

/// The minor of `name` in the contents of `/proc/misc`.
pub fn parse_proc_misc(contents: &str, name: &str) -> Option<u32> {
    contents.lines().find_map(|line| {
        let mut it = line.split_whitespace();
        let minor = it.next()?.parse().ok()?;
        (it.next()? == name).then_some(minor)
    })
}

/// The control device's misc minor, from `/proc/misc`.
pub fn control_minor() -> Result<u32> {
    let misc =
        fs::read_to_string("/proc/misc").map_err(|e| Error::io("cannot read", "/proc/misc", e))?;
    parse_proc_misc(&misc, abi::MISC_NAME).ok_or(Error::NotLoaded)
}

/// An open control device.
pub struct Control {
    file: File,
}

impl Control {
    /// Opens the control device, making its node first if it is missing.
    pub fn open() -> Result<Self> {
        let minor = control_minor()?;
        let path = Path::new(abi::CONTROL_PATH);
        ensure_char_node(path, MISC_MAJOR, u64::from(minor))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("cannot open", path, e))?;
        Ok(Self { file })
    }

    /// Allocates a tap with the lowest free minor.
    pub fn allocate(&self) -> Result<TapInfo> {
        let mut info = abi::blktap_info::default();
        // SAFETY: `info` is a valid `blktap_info` for the kernel to fill in.
        unsafe { ioctl_alloc_tap(self.file.as_raw_fd(), &mut info) }
            .map_err(|e| Error::ioctl("allocate a tap", e))?;
        Ok(TapInfo {
            ring_major: info.ring_major,
            bdev_major: info.bdev_major,
            minor: info.ring_minor,
        })
    }

    /// Frees tap `minor`.
    pub fn free(&self, minor: u32) -> Result<()> {
        let arg = i32::try_from(minor)
            .map_err(|_| Error::ioctl(format!("free tap {minor}"), nix::errno::Errno::EINVAL))?;
        // SAFETY: FREE_TAP takes the minor by value and touches no memory of ours.
        unsafe { ioctl_free_tap(self.file.as_raw_fd(), arg) }
            .map_err(|e| Error::ioctl(format!("free tap {minor}"), e))?;
        Ok(())
    }
}

/// Makes char node `path` for `major:minor` (mode 0600) unless a char node is already there.
pub fn ensure_char_node(path: &Path, major: u64, minor: u64) -> Result<()> {
    match fs::metadata(path) {
        Ok(m) if m.file_type().is_char_device() => return Ok(()),
        Ok(_) => {
            return Err(Error::Parse {
                path: path.into(),
                detail: "exists but is not a character device".into(),
            })
        }
        Err(_) => {}
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
    }
    mknod(
        path,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o600),
        makedev(major, minor),
    )
    .map_err(|e| Error::io("cannot make node", path, e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_control_minor_in_proc_misc() {
        let misc = "183 hw_random\n 58 blktap/control\n  1 psaux\n";
        assert_eq!(parse_proc_misc(misc, "blktap/control"), Some(58));
        assert_eq!(parse_proc_misc(misc, "blktap"), None);
        assert_eq!(parse_proc_misc("", "blktap/control"), None);
    }
}
