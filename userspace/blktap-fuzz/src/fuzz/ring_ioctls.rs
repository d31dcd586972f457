//! The ring's ioctls: RESPOND with random ring contents, CREATE_DEVICE (and _COMPAT) with the
//! answers its device info allows, REMOVE_DEVICE, other commands, and poll.

use super::*;

impl Fuzzer<'_> {
    pub(super) fn op_ring_ioctl(&mut self) {
        let Some(i) = self.pick_file(true, false) else {
            return;
        };
        let cmd = self.gen_cmd(&RING_CMDS);
        match cmd as u32 {
            RESPOND => self.respond(i, cmd),
            CREATE => {
                let arg = self.gen_arg();
                self.create(i, cmd, arg, false);
            }
            CREATE_COMPAT => {
                let arg = self.gen_arg();
                self.create(i, cmd, arg, true);
            }
            REMOVE => self.remove(i, cmd),
            c => {
                let arg = self.gen_arg();
                self.scribble(arg);
                let fd = self.files[i].fd.unwrap_or(-1);
                let got = code(sys::ioctl(fd, cmd, arg.value));
                let allowed = if c == PAUSE || c == RESUME || vfs_cmd(c) {
                    vec![]
                } else {
                    vec![ENOTTY]
                };
                let minor = self.files[i].minor;
                self.expect(
                    &format!("ring {minor} ioctl {cmd:#x}({:#x})", arg.value),
                    got,
                    &allowed,
                );
            }
        }
    }

    pub(super) fn respond(&mut self, i: usize, cmd: u64) {
        let f = &self.files[i];
        let fd = f.fd.unwrap_or(-1);
        let minor = f.minor;
        let mut rsp_prod = None;
        let allowed: Allowed = match (&f.map, f.rsp_cons) {
            (None, _) => vec![EACCES],
            (Some(m), Some(cons)) if !m.private && m.prot & libc::PROT_READ != 0 => {
                let prod = read_u32(m.addr + RSP_PROD);
                rsp_prod = Some(prod);
                let n = prod.wrapping_sub(cons);
                if n > RING_SIZE {
                    vec![EIO]
                } else if n == 0 {
                    vec![0]
                } else {
                    // No request is ever pending: every response is refused.
                    vec![EINVAL]
                }
            }
            (Some(m), _) => {
                if !m.private && m.prot & libc::PROT_READ != 0 {
                    rsp_prod = Some(read_u32(m.addr + RSP_PROD));
                }
                vec![0, EINVAL, EIO]
            }
        };
        let got = code(sys::ioctl(fd, cmd, self.rng.next_u64()));
        self.expect(
            &format!("RESPOND(ring {minor}, rsp_prod {rsp_prod:?})"),
            got,
            &allowed,
        );
        let f = &mut self.files[i];
        if got == 0 || got == EINVAL {
            // The kernel consumed up to the rsp_prod it read.
            f.rsp_cons = rsp_prod.filter(|_| f.map.is_some());
        } else if got != EIO {
            f.rsp_cons = None;
        }
    }

    /// Random ring contents, then RESPOND.
    pub(super) fn op_respond(&mut self) {
        let Some(i) = self.pick_file(true, true) else {
            return self.op_ring_ioctl();
        };
        let Some(map) = self.files[i].map else { return };
        if map.prot & libc::PROT_WRITE != 0 {
            let cons = self.files[i].rsp_cons.unwrap_or(0);
            let base = map.addr;
            // Responses at random indices.
            for _ in 0..self.rng.below(6) {
                let idx = cons.wrapping_add(self.rng.below(40) as u32);
                let e = base + ENTRIES + u64::from(idx % RING_SIZE) * ENTRY;
                let id = match self.rng.below(8) {
                    0 => 1000,
                    1 => u64::MAX,
                    2 => self.rng.next_u64(),
                    3 => 32,
                    _ => self.rng.below(32),
                };
                write_u64(e, id);
                write_bytes(e + 8, &[self.rng.pick(&[0u8, 1, 2, 3, 4, 5, 255])]);
                let status: i16 = self.rng.pick(&[0, 0, -1, -2, i16::MIN, i16::MAX, 1]);
                write_bytes(e + 10, &status.to_le_bytes());
                if self.rng.chance(1, 4) {
                    let mut junk = [0u8; ENTRY as usize];
                    self.rng.fill(&mut junk);
                    write_bytes(e, &junk);
                }
            }
            let prod = match self.rng.below(12) {
                0 => self.rng.next_u64() as u32,
                1 => cons.wrapping_sub(1 + self.rng.below(40) as u32),
                2 => cons.wrapping_add(33 + self.rng.below(1000) as u32),
                3 => cons,
                _ => cons.wrapping_add(self.rng.below(33) as u32),
            };
            write_u32(base + RSP_PROD, prod);
            if self.rng.chance(1, 8) {
                // The kernel's own fields and the message byte.
                let mut hdr = [0u8; 8];
                self.rng.fill(&mut hdr);
                match self.rng.below(3) {
                    0 => write_bytes(base, &hdr[..4]),
                    1 => write_bytes(base + 12, &hdr[..4]),
                    _ => write_bytes(base + MSG, &[self.rng.pick(&[0u8, 1, 2, 3, hdr[0]])]),
                }
            }
            if self.rng.chance(1, 16) {
                let page = base + PAGE * (1 + self.rng.below(352));
                let mut junk = [0u8; 64];
                self.rng.fill(&mut junk);
                write_bytes(page + 64 * self.rng.below(64), &junk);
            }
        }
        self.respond(i, u64::from(RESPOND));
    }

    /// Writes a random device info for CREATE, or params for CREATE_COMPAT, at `at`.
    pub(super) fn gen_device(&mut self, at: u64, compat: bool) {
        let capacity = match self.rng.below(14) {
            0 => 0,
            1 => 1,
            2 => u64::MAX,
            3 => u64::MAX / 512,
            4 => i64::MAX as u64 / 512 + self.rng.below(2),
            5 => 1 << 40,
            6 => self.rng.next_u64(),
            _ => 1 + self.rng.below(1 << 21),
        };
        let pick_size = |rng: &mut Rng| match rng.below(16) {
            0 => 0,
            1 => 256,
            2 => 511,
            3 => 513,
            4 => 1000,
            5 => 8192,
            6 => 1 << 31,
            7 => u64::from(u32::MAX),
            8 => rng.next_u64() & 0xffff_ffff,
            9 => 65536,
            10 => 1024,
            11 => 2048,
            12 | 13 => 4096,
            _ => 512,
        };
        let ss = pick_size(&mut self.rng);
        if compat {
            let ss = match self.rng.below(10) {
                0 => ss | (1 << 32),
                1 => u64::MAX,
                _ => ss,
            };
            let mut name = [0u8; 256];
            self.rng.fill(&mut name);
            if self.rng.chance(1, 2) {
                name[self.rng.below(256) as usize] = 0;
            }
            write_bytes(at, &name);
            write_u64(at + 256, capacity);
            write_u64(at + 264, ss);
            return;
        }
        let pss = if self.rng.chance(1, 3) {
            ss
        } else {
            pick_size(&mut self.rng)
        };
        let flags = match self.rng.below(12) {
            0 => DEVICE_RO,
            1 => self.rng.next_u64() & (NEW_FLAGS | DEVICE_RO),
            2 => 1 << self.rng.below(64),
            3 => self.rng.next_u64(),
            4 => self.rng.pick(&[0x02, 0x10, 0x80, 0x100, 0x04 | 0x20, 0x20]),
            _ => 0,
        };
        let mut rsvd = [0u64; 4];
        if self.rng.chance(1, 10) {
            rsvd[self.rng.below(4) as usize] = self.rng.next_u64() | 1;
        }
        write_u64(at, capacity);
        write_u32(at + 8, ss as u32);
        write_u32(at + 12, pss as u32);
        write_u64(at + 16, flags);
        for (k, r) in rsvd.iter().enumerate() {
            write_u64(at + 24 + 8 * k as u64, *r);
        }
    }

    pub(super) fn create(&mut self, i: usize, cmd: u64, arg: Arg, compat: bool) {
        let len = if compat { PARAMS_LEN } else { DEVICE_INFO_LEN };
        if arg.writable(len) {
            self.gen_device(arg.value, compat);
        }
        let (fresh, exists, ro) = if arg.readable(len) {
            judge_device(arg.value, compat)
        } else {
            (vec![EFAULT], vec![EFAULT], false)
        };
        let f = &self.files[i];
        let minor = f.minor;
        let has_disk = self.taps.get(&minor).is_some_and(|t| t.disk.is_some());
        let allowed = if !f.ours() {
            vec![EACCES]
        } else if has_disk {
            exists
        } else {
            fresh
        };
        let fd = f.fd.unwrap_or(-1);
        let got = code(sys::ioctl(fd, cmd, arg.value));
        let name = if compat {
            "CREATE_DEVICE_COMPAT"
        } else {
            "CREATE_DEVICE"
        };
        let call = format!(
            "{name}(ring {minor}, arg {:#x} {:?}) disk: {has_disk}",
            arg.value, arg.kind
        );
        self.expect(&call, got, &allowed);
        if got == 0 && !has_disk {
            self.disk_gen += 1;
            let gen = self.disk_gen;
            // Success means a valid buffer: its flags say whether the disk outlives the ring.
            let recovery = !compat && read_u64(arg.value + 16) & abi::DEVICE_RECOVERY != 0;
            if let Some(tap) = self.taps.get_mut(&minor) {
                tap.disk = Some(gen);
                tap.read_only = ro;
                tap.recovery = recovery;
            }
        }
    }

    pub(super) fn op_create(&mut self, compat: bool) {
        let Some(i) = self.pick_file(true, false) else {
            return;
        };
        let cmd = if compat { CREATE_COMPAT } else { CREATE };
        let arg = if self.rng.chance(1, 8) {
            self.gen_arg()
        } else {
            let off = 8 * self.rng.below(400);
            Arg {
                value: self.scratch + off,
                kind: ArgKind::Writable(PAGE - off),
            }
        };
        self.create(i, u64::from(cmd), arg, compat);
    }

    pub(super) fn remove(&mut self, i: usize, cmd: u64) {
        let f = &self.files[i];
        let minor = f.minor;
        let disk = self.taps.get(&minor).and_then(|t| t.disk);
        let open = self
            .tapdevs
            .iter()
            .any(|t| t.minor == minor && Some(t.gen) == disk);
        let allowed = if !f.ours() {
            vec![EACCES]
        } else if disk.is_none() {
            vec![ENODEV]
        } else if open {
            vec![EBUSY]
        } else {
            vec![0]
        };
        let fd = f.fd.unwrap_or(-1);
        let got = code(sys::ioctl(fd, cmd, self.rng.next_u64()));
        self.expect(
            &format!("REMOVE_DEVICE(ring {minor}) disk {disk:?} open {open}"),
            got,
            &allowed,
        );
        if got == 0 {
            if let Some(tap) = self.taps.get_mut(&minor) {
                tap.disk = None;
                tap.recovery = false;
            }
        }
    }

    pub(super) fn op_remove(&mut self) {
        let Some(i) = self.pick_file(true, false) else {
            return;
        };
        self.remove(i, u64::from(REMOVE));
    }

    pub(super) fn op_poll(&mut self) {
        let Some(i) = self.pick_file(true, false) else {
            return;
        };
        let f = &self.files[i];
        let allowed: Allowed = match &f.map {
            None => vec![i64::from(libc::POLLERR) as i32],
            Some(m) if !m.private && m.prot & libc::PROT_READ != 0 => {
                let msg = read_bytes::<1>(m.addr + MSG)[0];
                vec![if msg != 0 { POLLIN_RDNORM as i32 } else { 0 }]
            }
            Some(_) => vec![0, POLLIN_RDNORM as i32],
        };
        let fd = f.fd.unwrap_or(-1);
        let minor = f.minor;
        let r = sys::poll_now(fd, libc::POLLIN | libc::POLLRDNORM);
        self.calls += 1;
        match r {
            Ok(ev) if allowed.contains(&(ev as i32)) => {}
            other => self.fail(format!(
                "poll(ring {minor}) answered {other:?}, expected revents {allowed:?}"
            )),
        }
    }
}

/// The answers CREATE_DEVICE (or _COMPAT) may give for the info (params) at `at`: for a ring
/// without a disk, for one with a disk, and whether the disk would be read-only.
pub(super) fn judge_device(at: u64, compat: bool) -> (Allowed, Allowed, bool) {
    let good_size = |s: u64| s.is_power_of_two() && (512..=4096).contains(&s);
    // The byte size must fit loff_t and be a whole number of logical blocks.
    let good_capacity = |c: u64, ss: u64| {
        c != 0 && c <= i64::MAX as u64 / 512 && c.is_multiple_of((ss / 512).max(1))
    };
    if compat {
        let capacity = read_u64(at + 256);
        let ss = read_u64(at + 264);
        let valid = good_size(ss) && good_capacity(capacity, ss);
        return if !valid {
            (vec![EINVAL], vec![EINVAL], false)
        } else if capacity > 1 << 48 {
            (
                vec![0, EINVAL, ENOMEM, EOVERFLOW],
                vec![EEXIST, EINVAL],
                false,
            )
        } else {
            (vec![0], vec![EEXIST], false)
        };
    }
    let capacity = read_u64(at);
    let ss = u64::from(read_u32(at + 8));
    let pss = u64::from(read_u32(at + 12));
    let flags = read_u64(at + 16);
    let rsvd_zero = (0..4).all(|k| read_u64(at + 24 + 8 * k) == 0);
    let valid = flags & !(DEVICE_RO | NEW_FLAGS) == 0
        && good_size(ss)
        && good_capacity(capacity, ss)
        && pss.is_power_of_two()
        && (512..=65536).contains(&pss);
    let unsure = flags & NEW_FLAGS != 0 || !rsvd_zero;
    let extreme = capacity > 1 << 48 || pss > 65536 || pss < ss;
    let ro = flags & DEVICE_RO != 0;
    if !valid {
        (vec![EINVAL], vec![EINVAL], ro)
    } else if unsure || extreme {
        (vec![0, EINVAL, ENOMEM, EOVERFLOW], vec![EEXIST, EINVAL], ro)
    } else {
        (vec![0], vec![EEXIST], ro)
    }
}
