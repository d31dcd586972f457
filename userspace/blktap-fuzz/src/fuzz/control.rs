//! The control device: ALLOC_TAP, FREE_TAP, other commands, opening and closing it, and the
//! taps' sysfs attributes.

use super::*;

impl Fuzzer<'_> {
    /// ALLOC_TAP through `arg`; returns true if a tap was allocated.
    pub(super) fn alloc_at(&mut self, fd: i32, cmd: u64, arg: Arg) -> bool {
        let full = self.taps.len() >= self.cfg.max_taps;
        let arg = if full && arg.writable(INFO_LEN) {
            Arg {
                value: 0,
                kind: ArgKind::Bad,
            }
        } else {
            arg
        };
        let expected = self.lowest_free();
        if arg.writable(INFO_LEN) {
            write_bytes(arg.value, &[0xa5; 12]);
        }
        let got = code(sys::ioctl(fd, cmd, arg.value));
        let call = format!(
            "ALLOC_TAP(cmd {cmd:#x}, arg {:#x} {:?})",
            arg.value, arg.kind
        );
        if !arg.writable(INFO_LEN) {
            // A bad pointer: EFAULT, and the tap is freed again (the next ALLOC_TAP checks that
            // the minor was not leaked).
            self.expect(&call, got, &[EFAULT]);
            return false;
        }
        if !self.expect(&call, got, &[0]) || got != 0 {
            return false;
        }
        let ring_major = read_u32(arg.value);
        let bdev_major = read_u32(arg.value + 4);
        let minor = read_u32(arg.value + 8);
        if self.ring_major == 0 {
            self.ring_major = ring_major;
            self.bdev_major = bdev_major;
        }
        if (ring_major, bdev_major) != (self.ring_major, self.bdev_major) || minor != expected {
            self.fail(format!(
                "ALLOC_TAP answered majors {ring_major}/{bdev_major} minor {minor}, expected \
                 {}/{} minor {expected} (the lowest free)",
                self.ring_major, self.bdev_major
            ));
        }
        self.taps.insert(minor, Tap::default());
        true
    }

    /// FREE_TAP of `value`.
    pub(super) fn free_value(&mut self, fd: i32, cmd: u64, value: u64) {
        let allowed = if value >= MAX_MINORS {
            vec![EINVAL]
        } else if !self.taps.contains_key(&(value as u32)) {
            vec![ENODEV]
        } else if self.ring_open(value as u32) {
            vec![EBUSY]
        } else if self.taps[&(value as u32)].disk.is_some() {
            // A recovery disk left without a ring: removed, or EBUSY while a tapdev is open.
            vec![0, EBUSY]
        } else {
            vec![0]
        };
        let got = code(sys::ioctl(fd, cmd, value));
        self.expect(&format!("FREE_TAP({value:#x})"), got, &allowed);
        if got == 0 {
            self.taps.remove(&(value as u32));
        }
    }

    pub(super) fn op_ctl_ioctl(&mut self) {
        let fd = self.ctl_fd();
        // ALLOC_TAP and FREE_TAP are slow (a class device each): rarer here than the ring's.
        let cmd = if self.rng.chance(1, 2) {
            self.gen_cmd(&CONTROL_CMDS)
        } else {
            let small = self.rng.below(301);
            let random = u64::from(self.rng.next_u64() as u32);
            self.rng.pick(&[small, random])
        };
        match cmd as u32 {
            ALLOC_TAP => {
                let arg = self.gen_arg();
                self.alloc_at(fd, cmd, arg);
            }
            FREE_TAP => {
                let value = if self.rng.chance(1, 2) {
                    self.gen_minor()
                } else {
                    self.gen_arg().value
                };
                self.free_value(fd, cmd, value);
            }
            c => {
                let arg = self.gen_arg();
                self.scribble(arg);
                let got = code(sys::ioctl(fd, cmd, arg.value));
                let allowed = if vfs_cmd(c) { vec![] } else { vec![ENOTTY] };
                self.expect(
                    &format!("control ioctl {cmd:#x}({:#x})", arg.value),
                    got,
                    &allowed,
                );
            }
        }
    }

    pub(super) fn op_alloc(&mut self) {
        if self.taps.len() >= self.cfg.max_taps {
            return self.op_free();
        }
        let fd = self.ctl_fd();
        let arg = match self.rng.below(10) {
            // The answer does not fit before the guard page, or the page is read-only.
            0 => Arg {
                value: self.scratch + PAGE - 4,
                kind: ArgKind::Writable(4),
            },
            1 => Arg {
                value: self.scratch + 2 * PAGE,
                kind: ArgKind::ReadOnly(PAGE),
            },
            _ => {
                let off = 8 * self.rng.below(500);
                Arg {
                    value: self.scratch + off,
                    kind: ArgKind::Writable(PAGE - off),
                }
            }
        };
        self.alloc_at(fd, u64::from(ALLOC_TAP), arg);
    }

    pub(super) fn op_free(&mut self) {
        let fd = self.ctl_fd();
        let value = self.gen_minor();
        self.free_value(fd, u64::from(FREE_TAP), value);
    }

    pub(super) fn op_control(&mut self) {
        if self.ctl.len() > 1 && self.rng.chance(1, 2) {
            let i = self.rng.below(self.ctl.len() as u64) as usize;
            let fd = self.ctl.remove(i);
            let got = code(sys::close(fd));
            self.expect("close(control)", got, &[0]);
        } else if self.ctl.len() < MAX_CONTROL_FDS {
            let r = sys::open(abi::CONTROL_PATH, libc::O_RDWR);
            let got = code(r);
            if self.expect("open(control)", got, &[0]) {
                if let Ok(fd) = r {
                    self.ctl.push(fd as i32);
                }
            }
        }
    }

    pub(super) fn op_sysfs(&mut self) {
        let minor = self.gen_minor();
        if minor >= MAX_MINORS {
            return;
        }
        let minor = minor as u32;
        let attr = self.rng.pick(&["name", "task", "debug"]);
        let path = format!("{}/blktap!blktap{minor}/{attr}", abi::SYSFS_CLASS);
        let r = std::fs::read_to_string(&path);
        self.calls += 1;
        match (self.taps.contains_key(&minor), r) {
            (true, Ok(text)) => {
                if attr == "task"
                    && self
                        .files
                        .iter()
                        .any(|f| f.minor == minor && f.fd.is_some())
                {
                    let pid = std::process::id().to_string();
                    if text.trim() != pid {
                        self.fail(format!(
                            "{path} reads {:?}, expected our pid {pid}",
                            text.trim()
                        ));
                    }
                }
            }
            (false, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            (allocated, r) => self.fail(format!(
                "reading {path} (tap allocated: {allocated}) answered {:?}",
                r.map(|_| "contents")
            )),
        }
    }
}
