//! The operations a run is made of, and how often each is picked.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Op {
    CtlIoctl,
    Alloc,
    Free,
    RingOpen,
    RingClose,
    Mmap,
    Munmap,
    Mprotect,
    Mremap,
    RingIoctl,
    Create,
    CreateCompat,
    Remove,
    Respond,
    Poll,
    TapdevOpen,
    TapdevClose,
    Fork,
    Control,
    Sysfs,
    Lifecycle,
}

/// Relative frequencies. Ops that allocate taps, disks or ring pages are slow under TCG (ms
/// each), so they are rarer than the cheap ioctls; the mix still changes state often.
pub(super) const WEIGHTS: [(Op, u64); 21] = [
    (Op::CtlIoctl, 200),
    (Op::Alloc, 6),
    (Op::Free, 8),
    (Op::RingOpen, 20),
    (Op::RingClose, 5),
    (Op::Mmap, 20),
    (Op::Munmap, 6),
    (Op::Mprotect, 5),
    (Op::Mremap, 4),
    (Op::RingIoctl, 250),
    (Op::Create, 25),
    (Op::CreateCompat, 8),
    (Op::Remove, 8),
    (Op::Respond, 300),
    (Op::Poll, 100),
    (Op::TapdevOpen, 6),
    (Op::TapdevClose, 6),
    (Op::Fork, 1),
    (Op::Control, 2),
    (Op::Sysfs, 5),
    (Op::Lifecycle, 1),
];

impl Op {
    pub(super) fn name(self) -> &'static str {
        match self {
            Op::CtlIoctl => "ctl-ioctl",
            Op::Alloc => "alloc",
            Op::Free => "free",
            Op::RingOpen => "ring-open",
            Op::RingClose => "ring-close",
            Op::Mmap => "mmap",
            Op::Munmap => "munmap",
            Op::Mprotect => "mprotect",
            Op::Mremap => "mremap",
            Op::RingIoctl => "ring-ioctl",
            Op::Create => "create",
            Op::CreateCompat => "create-compat",
            Op::Remove => "remove",
            Op::Respond => "respond",
            Op::Poll => "poll",
            Op::TapdevOpen => "tapdev-open",
            Op::TapdevClose => "tapdev-close",
            Op::Fork => "fork",
            Op::Control => "control-fds",
            Op::Sysfs => "sysfs",
            Op::Lifecycle => "lifecycle",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_cover_every_op() {
        assert_eq!(WEIGHTS.len(), 21);
        assert!(WEIGHTS.iter().all(|w| w.1 > 0));
    }
}
