//! Taps as the kernel shows them: `/sys/class/blktap2` and `/proc/devices`.

use std::fs;
use std::path::{Path, PathBuf};

use blktap_abi as abi;

use crate::{Error, Result};

/// Which section of `/proc/devices`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// "Character devices:".
    Char,
    /// "Block devices:".
    Block,
}

/// The major registered as `name` in the given section of `/proc/devices` contents.
pub fn parse_proc_devices(contents: &str, kind: DeviceKind, name: &str) -> Option<u32> {
    let header = match kind {
        DeviceKind::Char => "Character devices:",
        DeviceKind::Block => "Block devices:",
    };
    let mut in_section = false;
    for line in contents.lines() {
        if line.ends_with(':') {
            in_section = line == header;
            continue;
        }
        if !in_section {
            continue;
        }
        let mut it = line.split_whitespace();
        if let (Some(major), Some(n)) = (it.next(), it.next()) {
            if n == name {
                return major.parse().ok();
            }
        }
    }
    None
}

/// The major of `name` from `/proc/devices`.
pub fn major(kind: DeviceKind, name: &str) -> Result<u32> {
    let contents = fs::read_to_string("/proc/devices")
        .map_err(|e| Error::io("cannot read", "/proc/devices", e))?;
    parse_proc_devices(&contents, kind, name).ok_or(Error::NotLoaded)
}

/// The tap minor named by a class device directory `blktap!blktapN`.
pub fn parse_class_dir(name: &str) -> Option<u32> {
    let n = name.strip_prefix("blktap!blktap")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// A tap found in sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysfsTap {
    /// Its minor.
    pub minor: u32,
    /// Its class device directory.
    pub dir: PathBuf,
}

impl SysfsTap {
    /// Reads attribute `attr`, without its trailing newline.
    pub fn attr(&self, attr: &str) -> Result<String> {
        let path = self.dir.join(attr);
        let s = fs::read_to_string(&path).map_err(|e| Error::io("cannot read", &path, e))?;
        Ok(s.strip_suffix('\n').unwrap_or(&s).to_string())
    }

    /// The tap's name (its minor while unset).
    pub fn name(&self) -> Result<String> {
        self.attr("name")
    }

    /// The pid of the process holding the ring, if any.
    pub fn task(&self) -> Result<Option<i32>> {
        let t = self.attr("task")?;
        if t.is_empty() {
            return Ok(None);
        }
        t.parse().map(Some).map_err(|_| Error::Parse {
            path: self.dir.join("task"),
            detail: format!("not a pid: {t:?}"),
        })
    }

    /// Writes attribute `attr`.
    pub fn set_attr(&self, attr: &str, value: &str) -> Result<()> {
        let path = self.dir.join(attr);
        fs::write(&path, value).map_err(|e| Error::io("cannot write", path, e))
    }
}

/// The taps under `class_dir` (normally `/sys/class/blktap2`), by increasing minor.
pub fn list_taps_in(class_dir: &Path) -> Result<Vec<SysfsTap>> {
    let entries = match fs::read_dir(class_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::NotLoaded),
        Err(e) => return Err(Error::io("cannot list", class_dir, e)),
    };
    let mut taps: Vec<SysfsTap> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let minor = parse_class_dir(e.file_name().to_str()?)?;
            Some(SysfsTap {
                minor,
                dir: e.path(),
            })
        })
        .collect();
    taps.sort_by_key(|t| t.minor);
    Ok(taps)
}

/// The taps the kernel has, by increasing minor.
pub fn list_taps() -> Result<Vec<SysfsTap>> {
    list_taps_in(Path::new(abi::SYSFS_CLASS))
}

/// The minors in the contents of the class attribute `devices` (one line `minor name` per tap
/// that has a disk).
pub fn parse_devices(contents: &str) -> Vec<u32> {
    contents
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// The capacity in 512-byte sectors of tap `minor`'s disk, if it has one: the tap is listed in
/// `/sys/class/blktap2/devices`, and its disk's `size` is read through `/sys/dev/block`.
pub fn disk_capacity(minor: u32) -> Result<Option<u64>> {
    let devices = Path::new(abi::SYSFS_CLASS).join("devices");
    let contents = match fs::read_to_string(&devices) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::NotLoaded),
        Err(e) => return Err(Error::io("cannot read", devices, e)),
    };
    if !parse_devices(&contents).contains(&minor) {
        return Ok(None);
    }
    let major = major(DeviceKind::Block, abi::BLOCK_MAJOR_NAME)?;
    let path = PathBuf::from(format!("/sys/dev/block/{major}:{minor}/size"));
    let size = fs::read_to_string(&path).map_err(|e| Error::io("cannot read", &path, e))?;
    size.trim().parse().map(Some).map_err(|_| Error::Parse {
        path,
        detail: format!("not a number of sectors: {size:?}"),
    })
}

/// The tap with minor `minor`.
pub fn find_tap(minor: u32) -> Result<SysfsTap> {
    let dir = PathBuf::from(abi::class_device_dir(minor));
    if dir.is_dir() {
        Ok(SysfsTap { minor, dir })
    } else {
        Err(Error::NoSuchTap(minor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC_DEVICES: &str = "Character devices:\n  1 mem\n  4 tty\n245 blktap2\n\n\
                                Block devices:\n  7 loop\n252 tapdev\n259 blkext\n";

    #[test]
    fn finds_majors_in_the_right_section() {
        let c = PROC_DEVICES;
        assert_eq!(
            parse_proc_devices(c, DeviceKind::Char, "blktap2"),
            Some(245)
        );
        assert_eq!(
            parse_proc_devices(c, DeviceKind::Block, "tapdev"),
            Some(252)
        );
        assert_eq!(parse_proc_devices(c, DeviceKind::Block, "blktap2"), None);
        assert_eq!(parse_proc_devices(c, DeviceKind::Char, "tapdev"), None);
    }

    #[test]
    fn parses_the_devices_attribute() {
        assert_eq!(parse_devices("0 vm-disk\n12 12\n\nbad line\n"), [0, 12]);
        assert!(parse_devices("").is_empty());
    }

    #[test]
    fn parses_class_device_directories() {
        assert_eq!(parse_class_dir("blktap!blktap0"), Some(0));
        assert_eq!(parse_class_dir("blktap!blktap16383"), Some(16383));
        assert_eq!(parse_class_dir("blktap!blktap"), None);
        assert_eq!(parse_class_dir("blktap!blktap1x"), None);
        assert_eq!(parse_class_dir("verbosity"), None);
    }

    #[test]
    fn lists_taps_sorted_by_minor() {
        let dir = std::env::temp_dir().join(format!("blktap-sysfs-test-{}", std::process::id()));
        for d in ["blktap!blktap10", "blktap!blktap2", "blktap!blktap0"] {
            fs::create_dir_all(dir.join(d)).unwrap();
        }
        fs::write(dir.join("verbosity"), "0\n").unwrap();
        fs::write(dir.join("blktap!blktap2/name"), "vm-disk\n").unwrap();
        let taps = list_taps_in(&dir).unwrap();
        let minors: Vec<u32> = taps.iter().map(|t| t.minor).collect();
        assert_eq!(minors, [0, 2, 10]);
        assert_eq!(taps[1].name().unwrap(), "vm-disk");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_class_means_the_module_is_not_loaded() {
        let r = list_taps_in(Path::new("/nonexistent/blktap2"));
        assert!(matches!(r, Err(Error::NotLoaded)));
    }
}
