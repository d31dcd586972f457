//! Generators: minors, commands and pointer arguments, good and bad, and the device nodes they
//! name.

use super::*;

impl Fuzzer<'_> {
    /// A minor: mostly allocated ones, also free, random and out-of-range ones.
    pub(super) fn gen_minor(&mut self) -> u64 {
        let allocated: Vec<u32> = self.taps.keys().copied().collect();
        match self.rng.below(20) {
            0..=10 if !allocated.is_empty() => u64::from(self.rng.pick(&allocated)),
            0..=14 => self.rng.below(16),
            15..=16 => self.rng.below(MAX_MINORS),
            _ => self.rng.pick(&[
                MAX_MINORS - 1,
                MAX_MINORS,
                MAX_MINORS + 1,
                65535,
                (1 << 20) - 1,
                u64::from(u32::MAX),
                1 << 32,
                (1 << 32) | 1,
                u64::MAX,
                i64::MIN as u64,
            ]),
        }
    }

    /// A command: the node's own, the other node's, small, random, or with high bits set.
    pub(super) fn gen_cmd(&mut self, own: &[u32]) -> u64 {
        let all: Vec<u32> = CONTROL_CMDS
            .iter()
            .chain(RING_CMDS.iter())
            .copied()
            .collect();
        match self.rng.below(20) {
            0..=7 => u64::from(self.rng.pick(own)),
            8..=9 => u64::from(self.rng.pick(&all)),
            10..=14 => self.rng.below(301),
            15..=17 => self.rng.next_u64() & 0xffff_ffff,
            // The kernel takes the command as an unsigned int: the high half is dropped.
            _ => u64::from(self.rng.pick(own)) | ((self.rng.next_u64() | 1) << 32),
        }
    }

    /// A pointer argument, good or bad.
    pub(super) fn gen_arg(&mut self) -> Arg {
        let bad = |value| Arg {
            value,
            kind: ArgKind::Bad,
        };
        match self.rng.below(24) {
            0 => bad(0),
            1 => bad(1 + self.rng.below(4096)),
            2 => bad(u64::MAX),
            3 => bad(0xffff_8880_0000_0000 + self.rng.below(1 << 30) * 8),
            4 => bad(0xffff_ffff_8100_0000 + self.rng.below(1 << 20)),
            5 => bad(0xffff_ffff_ffff_f000 + self.rng.below(4096)),
            6 => bad(0x8000_0000_0000_0000 | self.rng.below(1 << 40)),
            7 => bad(0x0000_8000_0000_0000 - self.rng.below(4096)),
            8 => bad(self.scratch + PAGE + self.rng.below(PAGE)),
            9 => bad(self.scratch + 3 * PAGE + self.rng.below(PAGE)),
            10 => bad(self.rng.next_u64() | (1 << 63)),
            11..=12 => {
                // Straddling the guard page: the first bytes are readable, the rest not.
                let back = 1 + self.rng.below(300);
                Arg {
                    value: self.scratch + PAGE - back,
                    kind: ArgKind::Writable(back),
                }
            }
            13 => {
                let off = self.rng.below(PAGE - 272);
                Arg {
                    value: self.scratch + 2 * PAGE + off,
                    kind: ArgKind::ReadOnly(PAGE - off),
                }
            }
            14..=15 => Arg {
                value: self.scratch + 2 * PAGE,
                kind: ArgKind::ReadOnly(PAGE),
            },
            _ => {
                let off = self.rng.below(PAGE - 272);
                Arg {
                    value: self.scratch + off,
                    kind: ArgKind::Writable(PAGE - off),
                }
            }
        }
    }

    /// Fills random bytes into the writable part of an argument.
    pub(super) fn scribble(&mut self, arg: Arg) {
        if let ArgKind::Writable(room) = arg.kind {
            let n = room.min(512);
            let mut buf = vec![0u8; n as usize];
            self.rng.fill(&mut buf);
            write_bytes(arg.value, &buf);
        }
    }

    pub(super) fn ring_node(&mut self, minor: u32) -> String {
        self.node(false, minor)
    }

    pub(super) fn node(&mut self, block: bool, minor: u32) -> String {
        let path = format!(
            "{}/{}{minor}",
            self.node_dir,
            if block { "tapdev" } else { "blktap" }
        );
        if self.nodes.insert((block, minor)) {
            let major = if block {
                self.bdev_major
            } else {
                self.ring_major
            };
            if let Err(e) = sys::mknod(&path, block, major, minor) {
                self.fail(format!("mknod {path}: {}", errno_name(e)));
            }
        }
        path
    }
}
