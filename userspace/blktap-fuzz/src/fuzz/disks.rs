//! The disks: opening and closing tapdevs.

use super::*;

impl Fuzzer<'_> {
    pub(super) fn op_tapdev_open(&mut self) {
        if self.tapdevs.len() >= MAX_TAPDEV_FDS {
            return self.op_tapdev_close();
        }
        let with_disk: Vec<u32> = self
            .taps
            .iter()
            .filter(|(_, t)| t.disk.is_some())
            .map(|(m, _)| *m)
            .collect();
        let minor = if !with_disk.is_empty() && self.rng.chance(4, 5) {
            self.rng.pick(&with_disk)
        } else {
            self.rng.below(16) as u32
        };
        let tap = self.taps.get(&minor);
        let disk = tap.and_then(|t| t.disk);
        let ro = tap.is_some_and(|t| t.read_only);
        let path = if disk.is_some() && self.rng.chance(1, 2) {
            abi::device_path(minor)
        } else {
            self.node(true, minor)
        };
        let write = self.rng.chance(1, 4);
        let mode = if write { libc::O_RDWR } else { libc::O_RDONLY } | libc::O_NONBLOCK;
        let allowed = match disk {
            None => vec![ENXIO],
            Some(_) if write && ro => vec![0, EACCES, EROFS],
            Some(_) => vec![0],
        };
        let r = sys::open(&path, mode);
        let got = code(r);
        self.expect(
            &format!("open({path}, {mode:#o}) disk {disk:?}"),
            got,
            &allowed,
        );
        if let (Ok(fd), Some(gen)) = (r, disk) {
            self.tapdevs.push(Tapdev {
                fd: fd as i32,
                minor,
                gen,
            });
        } else if let Ok(fd) = r {
            let _ = sys::close(fd as i32);
        }
    }

    pub(super) fn op_tapdev_close(&mut self) {
        if self.tapdevs.is_empty() {
            return;
        }
        let i = self.rng.below(self.tapdevs.len() as u64) as usize;
        let t = self.tapdevs.remove(i);
        let got = code(sys::close(t.fd));
        self.expect(&format!("close(tapdev {})", t.minor), got, &[0]);
    }
}
