//! Other processes and fixed sequences: a forked child calls the ring's ioctls (it is not the
//! mapper), and a fixed interleaving of open, mmap, close and FREE_TAP on a new tap.

use super::*;

impl Fuzzer<'_> {
    /// A child calls the ring's ioctls (it is not the mapper) and perhaps maps the ring itself.
    pub(super) fn op_fork(&mut self) {
        let Some(i) = self.pick_file(true, false) else {
            return;
        };
        let f = &self.files[i];
        let fd = f.fd.unwrap_or(-1);
        let minor = f.minor;
        let try_map = f.map.is_none() && f.readable && f.writable && self.rng.chance(1, 2);
        let map_expected = if f.mapped_once { EBUSY } else { 0 };
        let free_minor = u64::from(self.lowest_free());
        let ctl = self.ctl[0];
        let info = self.scratch + 2 * PAGE;
        // SAFETY: the fuzzer is single-threaded; the child only makes system calls and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let mut bad = 0;
            let mut check = |what: &str, got: i32, want: i32| {
                if got != want {
                    eprintln!(
                        "blktap-fuzz child: {what}: got {}, expected {}",
                        errno_name(got),
                        errno_name(want)
                    );
                    bad += 1;
                }
            };
            check(
                "RESPOND",
                code(sys::ioctl(fd, u64::from(RESPOND), 0)),
                EACCES,
            );
            check(
                "CREATE_DEVICE",
                code(sys::ioctl(fd, u64::from(CREATE), info)),
                EACCES,
            );
            check(
                "REMOVE_DEVICE",
                code(sys::ioctl(fd, u64::from(REMOVE), 0)),
                EACCES,
            );
            check("ioctl 203", code(sys::ioctl(fd, 203, 0)), ENOTTY);
            check(
                "FREE_TAP(open ring)",
                code(sys::ioctl(ctl, u64::from(FREE_TAP), u64::from(minor))),
                EBUSY,
            );
            check(
                "FREE_TAP(free minor)",
                code(sys::ioctl(ctl, u64::from(FREE_TAP), free_minor)),
                ENODEV,
            );
            if try_map {
                let rw = libc::PROT_READ | libc::PROT_WRITE;
                let r = sys::mmap(0, MAP_LEN, rw, libc::MAP_SHARED, fd, 0);
                check("child mmap", code(r), map_expected);
                if r.is_ok() {
                    // The child is the mapper now.
                    check(
                        "child RESPOND",
                        code(sys::ioctl(fd, u64::from(RESPOND), 0)),
                        0,
                    );
                }
            }
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(bad.min(100)) };
        }
        if pid < 0 {
            self.fail(format!(
                "fork: {}",
                errno_name(nix::errno::Errno::last_raw())
            ));
            return;
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        self.calls += 6 + if try_map { 2 } else { 0 };
        if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            self.fail(format!(
                "a forked child's ring {minor} ioctls: status {status:#x} (see its stderr)"
            ));
        }
        if try_map {
            // The child's mapping went with it: the ring is not mapped any more.
            self.files[i].mapped_once = true;
        }
    }

    /// A fixed interleaving of open, mmap, close and FREE_TAP on a new tap.
    pub(super) fn op_lifecycle(&mut self) {
        if self.taps.len() >= self.cfg.max_taps {
            return self.op_free();
        }
        let ctl = self.ctl[0];
        let arg = Arg {
            value: self.scratch,
            kind: ArgKind::Writable(PAGE),
        };
        let minor = self.lowest_free();
        if !self.alloc_at(ctl, u64::from(ALLOC_TAP), arg) {
            return;
        }
        let path = self.ring_node(minor);
        let r = sys::open(&path, libc::O_RDWR);
        if !self.expect("lifecycle open", code(r), &[0]) {
            return;
        }
        let fd = r.unwrap_or(-1) as i32;
        let free = u64::from(FREE_TAP);
        let got = code(sys::ioctl(ctl, free, u64::from(minor)));
        self.expect("lifecycle FREE_TAP(open)", got, &[EBUSY]);
        let got = code(sys::open(&path, libc::O_RDWR));
        self.expect("lifecycle second open", got, &[EBUSY]);
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let m = sys::mmap(0, MAP_LEN, rw, libc::MAP_SHARED, fd, 0);
        self.expect("lifecycle mmap", code(m), &[0]);
        let got = code(sys::close(fd));
        self.expect("lifecycle close", got, &[0]);
        let got = code(sys::ioctl(ctl, free, u64::from(minor)));
        self.expect("lifecycle FREE_TAP(mapped)", got, &[EBUSY]);
        if let Ok(a) = m {
            let got = code(sys::munmap(a as u64, MAP_LEN));
            self.expect("lifecycle munmap", got, &[0]);
        }
        let got = code(sys::ioctl(ctl, free, u64::from(minor)));
        if self.expect("lifecycle FREE_TAP(closed)", got, &[0]) && got == 0 {
            self.taps.remove(&minor);
        }
    }
}
