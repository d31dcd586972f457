//! The model of the driver's state: how an argument was made (and so whether the kernel may
//! read or write through it), the ring files open and mapped, the taps and their disks, the
//! tapdevs open; and the sets of answers a call may give.

use crate::sys::SysResult;

/// An allowed set of answers: 0 is success, others errnos; empty allows anything.
pub(super) type Allowed = Vec<i32>;

pub(super) fn code(r: SysResult) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e,
    }
}

/// How an argument was made, which decides whether the kernel may read or write through it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum ArgKind {
    /// Not a valid user address (NULL, small, -1, kernel half, non-canonical, guard page).
    Bad,
    /// In the read-write scratch page, with this many bytes before the guard page.
    Writable(u64),
    /// In the read-only scratch page, with this many bytes before the guard page.
    ReadOnly(u64),
}

#[derive(Clone, Copy)]
pub(super) struct Arg {
    pub(super) value: u64,
    pub(super) kind: ArgKind,
}

impl Arg {
    pub(super) fn readable(&self, len: u64) -> bool {
        matches!(self.kind, ArgKind::Writable(room) | ArgKind::ReadOnly(room) if room >= len)
    }

    pub(super) fn writable(&self, len: u64) -> bool {
        matches!(self.kind, ArgKind::Writable(room) if room >= len)
    }
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Map {
    pub(super) addr: u64,
    pub(super) prot: i32,
    pub(super) private: bool,
    /// Which reservation slot it sits in, if placed with MAP_FIXED or moved by mremap.
    pub(super) slot: Option<usize>,
}

/// An open ring file (an open file description of a ring node): alive while its fd is open or
/// its mapping exists.
#[derive(Debug)]
pub(super) struct RingFile {
    pub(super) minor: u32,
    pub(super) fd: Option<i32>,
    pub(super) readable: bool,
    pub(super) writable: bool,
    pub(super) map: Option<Map>,
    pub(super) mapped_once: bool,
    /// The kernel's `rsp_cons`, when known.
    pub(super) rsp_cons: Option<u32>,
}

impl RingFile {
    /// The kernel sees this process as the ring's mapper.
    pub(super) fn ours(&self) -> bool {
        self.map.is_some()
    }
}

#[derive(Debug, Default)]
pub(super) struct Tap {
    /// Generation of the tap's disk, if it has one.
    pub(super) disk: Option<u64>,
    pub(super) read_only: bool,
    /// The disk was made with BLKTAP_DEVICE_RECOVERY: it outlives the ring's file.
    pub(super) recovery: bool,
}

pub(super) struct Tapdev {
    pub(super) fd: i32,
    pub(super) minor: u32,
    pub(super) gen: u64,
}

/// Commands the VFS answers itself for some files (generic file ioctls): any answer.
pub(super) fn vfs_cmd(cmd: u32) -> bool {
    let ty = (cmd >> 8) & 0xff;
    cmd == 2 || matches!(ty, 0x54 | 0x58 | 0x66 | 0x94 | 0x15)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::{ALLOC_TAP, RESPOND};

    #[test]
    fn vfs_commands_are_recognised() {
        assert!(vfs_cmd(libc::FIOCLEX as u32));
        assert!(vfs_cmd(libc::FIONBIO as u32));
        assert!(!vfs_cmd(ALLOC_TAP));
        assert!(!vfs_cmd(RESPOND));
        assert!(!vfs_cmd(300));
    }

    #[test]
    fn argument_room() {
        let a = Arg {
            value: 0,
            kind: ArgKind::Writable(12),
        };
        assert!(a.writable(12) && a.readable(12) && !a.writable(13));
        let a = Arg {
            value: 0,
            kind: ArgKind::ReadOnly(4096),
        };
        assert!(a.readable(272) && !a.writable(1));
        assert!(!Arg {
            value: 0,
            kind: ArgKind::Bad
        }
        .readable(1));
    }
}
