//! Ring files: opening and closing ring nodes, and mapping them in every way the mm allows
//! (mmap, munmap, mprotect, mremap), with the reservation slots MAP_FIXED and mremap use.

use super::*;

impl Fuzzer<'_> {
    pub(super) fn slot_addr(&self, slot: usize) -> u64 {
        self.reserve + slot as u64 * (MAP_LEN + PAGE)
    }

    /// Puts a slot's reservation back (after a mapping there went away or a MAP_FIXED failed).
    pub(super) fn rereserve(&mut self, slot: usize) {
        let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
        let addr = self.slot_addr(slot);
        if let Err(e) = sys::mmap(addr, MAP_LEN, libc::PROT_NONE, anon, -1, 0) {
            self.fail(format!("cannot re-reserve slot {slot}: {}", errno_name(e)));
        }
        self.slot_used[slot] = false;
    }

    /// A file's mapping went away: the kernel fails its requests; if its fd is closed too, the
    /// file is gone, and with it the disk.
    pub(super) fn unmapped(&mut self, i: usize) {
        if let Some(map) = self.files[i].map.take() {
            if let Some(slot) = map.slot {
                self.rereserve(slot);
            }
        }
        self.files[i].rsp_cons = None;
        self.maybe_release(i);
    }

    pub(super) fn maybe_release(&mut self, i: usize) {
        let f = &self.files[i];
        if f.fd.is_none() && f.map.is_none() {
            let minor = f.minor;
            self.files.remove(i);
            if let Some(tap) = self.taps.get_mut(&minor) {
                if !tap.recovery {
                    tap.disk = None;
                }
            }
        }
    }

    pub(super) fn op_ring_open(&mut self) {
        let minor = self.gen_minor();
        let minor = if minor >= 1 << 20 {
            minor & 0xfffff
        } else {
            minor
        } as u32;
        let allocated = self.taps.contains_key(&minor);
        let dev = allocated && self.rng.chance(3, 10);
        let path = if dev {
            abi::ring_path(minor)
        } else {
            self.ring_node(minor)
        };
        let (mode, readable, writable) = self.rng.pick(&[
            (libc::O_RDWR, true, true),
            (libc::O_RDWR, true, true),
            (libc::O_RDWR, true, true),
            (libc::O_RDWR | libc::O_NONBLOCK, true, true),
            (libc::O_RDONLY, true, false),
            (libc::O_WRONLY, false, true),
        ]);
        let allowed = if u64::from(minor) >= MAX_MINORS || !allocated {
            vec![ENXIO]
        } else if self.ring_open(minor) {
            vec![EBUSY]
        } else {
            vec![0]
        };
        let r = sys::open(&path, mode);
        let got = code(r);
        self.expect(&format!("open({path}, {mode:#o})"), got, &allowed);
        if let Ok(fd) = r {
            if allowed != [0] {
                // The kernel let a second opener in: keep the model sane.
                let _ = sys::close(fd as i32);
                return;
            }
            self.files.push(RingFile {
                minor,
                fd: Some(fd as i32),
                readable,
                writable,
                map: None,
                mapped_once: false,
                rsp_cons: None,
            });
        }
    }

    pub(super) fn op_ring_close(&mut self) {
        let Some(i) = self.pick_file(true, false) else {
            return;
        };
        let fd = self.files[i].fd.take().unwrap_or(-1);
        let got = code(sys::close(fd));
        self.expect(&format!("close(ring {})", self.files[i].minor), got, &[0]);
        self.maybe_release(i);
    }

    pub(super) fn op_mmap(&mut self) {
        let Some(i) = self.pick_file(true, false) else {
            return;
        };
        let fd = self.files[i].fd.unwrap_or(-1);
        let len = match self.rng.below(14) {
            0 => MAP_LEN - PAGE,
            1 => MAP_LEN + PAGE,
            2 => PAGE,
            3 => 0,
            4 => PAGE * not_a_large_mapping(1 + self.rng.below(800)),
            5 => MAP_LEN - 1 - self.rng.below(PAGE - 1),
            6 => MAP_LEN + 1,
            _ => MAP_LEN,
        };
        let offset = match self.rng.below(14) {
            0 => PAGE,
            1 => 1 + self.rng.below(PAGE - 1),
            2 => PAGE * self.rng.below(1 << 20),
            3 => 1 << 40,
            4 => !(PAGE - 1),
            _ => 0,
        };
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let prot = match self.rng.below(12) {
            0 => libc::PROT_READ,
            1 => libc::PROT_WRITE,
            2 => libc::PROT_NONE,
            3 => rw | libc::PROT_EXEC,
            _ => rw,
        };
        let mut flags = match self.rng.below(14) {
            0 => libc::MAP_PRIVATE,
            1 => libc::MAP_SHARED_VALIDATE,
            2 => libc::MAP_SHARED | libc::MAP_POPULATE,
            3 => libc::MAP_SHARED | libc::MAP_LOCKED,
            4 => libc::MAP_SHARED | libc::MAP_NORESERVE,
            5..=6 => libc::MAP_SHARED | libc::MAP_FIXED,
            _ => libc::MAP_SHARED,
        };
        let mut slot = None;
        let mut addr = 0;
        if flags & libc::MAP_FIXED != 0 {
            if self.slot_used[0] || len > MAP_LEN {
                flags &= !libc::MAP_FIXED;
            } else {
                slot = Some(0);
                addr = self.slot_addr(0);
            }
        }
        // MAP_SHARED_VALIDATE (3) shares too.
        let private = flags & 3 == libc::MAP_PRIVATE;
        let f = &self.files[i];
        let rounded = (len + PAGE - 1) & !(PAGE - 1);
        let odd = private || prot & libc::PROT_EXEC != 0 || prot == libc::PROT_WRITE;
        // The mm's checks come first (length, alignment, overflow, the file's access mode), then
        // the driver's (size and offset, once per open).
        let allowed: Allowed = if len == 0 || offset % PAGE != 0 {
            vec![EINVAL]
        } else if offset >= 1 << 60 {
            vec![EINVAL, EOVERFLOW, ENOMEM]
        } else if !f.readable || (!private && prot & libc::PROT_WRITE != 0 && !f.writable) {
            vec![EACCES]
        } else if rounded != MAP_LEN || offset != 0 {
            vec![EINVAL]
        } else if f.mapped_once {
            vec![EBUSY]
        } else if odd {
            vec![0, EINVAL, EPERM, EACCES]
        } else if flags & libc::MAP_LOCKED != 0 {
            vec![0, EAGAIN]
        } else {
            vec![0]
        };
        let r = sys::mmap(addr, len, prot, flags, fd, offset);
        let got = code(r);
        let call = format!(
            "mmap(ring {}, len {len:#x}, off {offset:#x}, prot {prot}, flags {flags:#x})",
            f.minor
        );
        let ok = self.expect(&call, got, &allowed);
        match r {
            Ok(a) => {
                if !ok {
                    // Mapped though it should not have been: undo it, the model cannot follow.
                    let _ = sys::munmap(a as u64, rounded);
                    self.files[i].mapped_once = true;
                    if let Some(s) = slot {
                        self.rereserve(s);
                    }
                    return;
                }
                if let Some(s) = slot {
                    self.slot_used[s] = true;
                }
                let f = &mut self.files[i];
                let minor = f.minor;
                f.mapped_once = true;
                f.map = Some(Map {
                    addr: a as u64,
                    prot,
                    private,
                    slot,
                });
                f.rsp_cons = if private { None } else { Some(0) };
                if !private && prot & libc::PROT_READ != 0 {
                    let a = a as u64;
                    if (0..PAGE).step_by(8).any(|o| read_u64(a + o) != 0) {
                        self.fail(format!(
                            "the ring page of tap {minor} is not zeroed at mapping"
                        ));
                    }
                }
            }
            Err(_) => {
                if let Some(s) = slot {
                    self.rereserve(s);
                }
            }
        }
    }

    pub(super) fn op_munmap(&mut self) {
        let Some(i) = self.pick_file(false, true) else {
            return;
        };
        let Some(map) = self.files[i].map else { return };
        let (addr, len, whole) = match self.rng.below(8) {
            0 => (map.addr, PAGE, false),
            1 => (map.addr + MAP_LEN - PAGE, PAGE, false),
            2 => (
                map.addr + PAGE * (1 + self.rng.below(300)),
                PAGE * (1 + self.rng.below(8)),
                false,
            ),
            3 if map.slot.is_some() => (map.addr, MAP_LEN + PAGE, true),
            _ => (map.addr, MAP_LEN, true),
        };
        let got = code(sys::munmap(addr, len));
        let minor = self.files[i].minor;
        self.expect(
            &format!("munmap(ring {minor} + {:#x}, {len:#x})", addr - map.addr),
            got,
            &[if whole { 0 } else { EINVAL }],
        );
        if got == 0 {
            self.unmapped(i);
        }
    }

    pub(super) fn op_mprotect(&mut self) {
        let Some(i) = self.pick_file(false, true) else {
            return;
        };
        let Some(map) = self.files[i].map else { return };
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let prot = self.rng.pick(&[
            rw,
            rw,
            libc::PROT_READ,
            libc::PROT_NONE,
            rw | libc::PROT_EXEC,
        ]);
        let whole = self.rng.chance(1, 2);
        let (addr, len) = if whole {
            (map.addr, MAP_LEN)
        } else {
            (map.addr + PAGE * self.rng.below(353), PAGE)
        };
        let f = &self.files[i];
        let denied = !map.private && prot & libc::PROT_WRITE != 0 && !f.writable;
        let allowed: Allowed = match (whole, denied) {
            (_, true) => vec![EACCES, EINVAL],
            (true, false) if prot & libc::PROT_EXEC != 0 => vec![0, EACCES],
            (true, false) => vec![0],
            (false, false) if prot == map.prot => vec![0, EINVAL],
            (false, false) => vec![EINVAL],
        };
        let got = code(sys::mprotect(addr, len, prot));
        let minor = f.minor;
        self.expect(
            &format!(
                "mprotect(ring {minor} + {:#x}, {len:#x}, {prot})",
                addr - map.addr
            ),
            got,
            &allowed,
        );
        if got == 0 && whole {
            if let Some(m) = self.files[i].map.as_mut() {
                m.prot = prot;
            }
        } else if got == 0 && prot != map.prot {
            // A part changed protection (the mapping was split): the model stops writing to it.
            if let Some(m) = self.files[i].map.as_mut() {
                m.prot = libc::PROT_NONE;
            }
        }
    }

    pub(super) fn op_mremap(&mut self) {
        let Some(i) = self.pick_file(false, true) else {
            return;
        };
        let Some(map) = self.files[i].map else { return };
        let minor = self.files[i].minor;
        match self.rng.below(4) {
            0 => {
                // Grow in place: the mapping cannot expand.
                let got = code(sys::mremap(map.addr, MAP_LEN, MAP_LEN + PAGE, 0, 0));
                self.expect(
                    &format!("mremap(ring {minor}, grow)"),
                    got,
                    &[EFAULT, ENOMEM],
                );
            }
            1 => {
                // Shrink: would split the mapping.
                let got = code(sys::mremap(map.addr, MAP_LEN, MAP_LEN - PAGE, 0, 0));
                self.expect(&format!("mremap(ring {minor}, shrink)"), got, &[EINVAL]);
            }
            2 => {
                let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_DONTUNMAP;
                let got = code(sys::mremap(map.addr, MAP_LEN, MAP_LEN, flags, 0));
                self.expect(&format!("mremap(ring {minor}, DONTUNMAP)"), got, &[EINVAL]);
            }
            _ => {
                // Move it whole to the free slot.
                let Some(slot) = (0..2).find(|&s| !self.slot_used[s] && Some(s) != map.slot) else {
                    return;
                };
                let to = self.slot_addr(slot);
                let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
                let r = sys::mremap(map.addr, MAP_LEN, MAP_LEN, flags, to);
                let got = code(r);
                self.expect(
                    &format!("mremap(ring {minor}, move)"),
                    got,
                    &[0, EINVAL, EFAULT],
                );
                if got == 0 {
                    if let Some(old) = map.slot {
                        self.rereserve(old);
                    }
                    self.slot_used[slot] = true;
                    if let Some(m) = self.files[i].map.as_mut() {
                        m.addr = to;
                        m.slot = Some(slot);
                    }
                } else {
                    self.rereserve(slot);
                }
            }
        }
    }
}

/// `pages`, or one more if `pages` is the length of a mapping for large requests
/// (`1 + 32 * S` pages, S in 12..=128), which the kernel takes: the model knows the standard
/// mapping only (t87-large covers the large ones).
fn not_a_large_mapping(pages: u64) -> u64 {
    let data = pages - 1;
    let per_slot = data / 32;
    if data.is_multiple_of(32) && (12..=abi::SEGMENT_MAX_LARGE as u64).contains(&per_slot) {
        pages + 1
    } else {
        pages
    }
}
