// SPDX-License-Identifier: GPL-2.0

//! Taps: one per allocated minor, and the table that hands minors out.
//!
//! A tap is created by `ALLOC_TAP` on the control device and lives until `FREE_TAP`. While it
//! exists, it holds a reference on the module, so the module cannot be unloaded under it, and a
//! class device `blktap/blktapN` with its ring node `/dev/xen/blktap-2/blktapN`.
//!
//! # Lock order
//!
//! 1. `Blktap::taps` (`blktap_taps`), the table of taps;
//! 2. `Tap::inner` (`blktap_tap`), one tap's state;
//! 3. `Tap::ring` (`blktap_ring`, a spinlock), the ring's I/O state.
//!
//! A tap's sysfs callbacks take only `Tap::inner`, so a class device may be removed with
//! `Blktap::taps` held; they never take `Blktap::taps`. Neither lock is held across a copy to or
//! from user space.

use kernel::{
    prelude::*,
    sync::{
        poll::PollCondVar,
        Arc,
        CondVar,
        Mutex,
        SpinLock, //
    },
    task::Pid,
};

use crate::{
    blk_mq::Disk,
    device::TapDisk,
    module_ref::ModuleRef,
    ring::{
        Features,
        RingPages,
        RingState, //
    },
    uapi, //
};

/// The state of a tap that its lock protects.
pub(crate) struct TapInner {
    /// The tap's name, set through sysfs; empty while unset.
    pub(crate) name: KVec<u8>,
    /// Who has the ring open.
    pub(crate) ring_user: RingUser,
    /// The shared pages, from the first mapping until the tap is freed.
    pub(crate) pages: Option<Arc<RingPages>>,
    /// The tap's disk, between `CREATE_DEVICE` and `REMOVE_DEVICE` (or the ring's close).
    pub(crate) disk: Option<Disk<TapDisk>>,
    /// The disk is read-only.
    pub(crate) read_only: bool,
    /// The disk's negotiated extensions.
    pub(crate) features: Features,
}

/// Who has a tap's ring open.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum RingUser {
    /// Nobody: it may be opened, and the tap freed.
    Closed,
    /// The ring node is open (or mapped, as a mapping keeps the file open) by this thread group.
    Open(Pid),
    /// Its last user closed it, and the disk it served is being removed: a new opener and
    /// `FREE_TAP` wait on [`Tap::closed`] until it is gone.
    Closing,
}

impl TapInner {
    /// Takes the disk out (the caller drops it, which removes it), with what described it.
    pub(crate) fn take_disk(&mut self) -> Option<Disk<TapDisk>> {
        self.read_only = false;
        self.features = Features::default();
        self.disk.take()
    }
}

/// An allocated tap.
///
/// # Invariants
///
/// `minor < MAX_MINORS`, and it is the tap's index in the [`TapTable`] while the tap is there.
#[pin_data]
pub(crate) struct Tap {
    minor: u32,
    #[pin]
    pub(crate) inner: Mutex<TapInner>,
    /// The ring's I/O state, used by `queue_rq` and `RESPOND`.
    #[pin]
    pub(crate) ring: SpinLock<RingState>,
    /// Woken when requests are published or the ring's state changes.
    #[pin]
    pub(crate) poll: PollCondVar,
    /// Woken when the ring's user goes from `Closing` to `Closed`; waited on with `inner`.
    #[pin]
    pub(crate) closed: CondVar,
    /// Keeps the module loaded while the tap exists.
    _module: ModuleRef,
}

impl Tap {
    /// Creates tap `minor`, taking a reference on the module. Its requests time out after
    /// `deadline` seconds.
    pub(crate) fn new(minor: u32, deadline: u32, module: &'static ThisModule) -> Result<Arc<Self>> {
        if minor >= uapi::MAX_MINORS {
            return Err(EINVAL);
        }
        Arc::pin_init(
            // INVARIANT: `minor` was checked above.
            try_pin_init!(Self {
                minor,
                inner <- kernel::new_mutex!(
                    TapInner {
                        name: KVec::new(),
                        ring_user: RingUser::Closed,
                        pages: None,
                        disk: None,
                        read_only: false,
                        features: Features::default(),
                    },
                    "blktap_tap"
                ),
                ring <- kernel::new_spinlock!(RingState::new(deadline), "blktap_ring"),
                poll <- kernel::new_poll_condvar!("blktap_poll"),
                closed <- kernel::new_condvar!("blktap_closed"),
                _module: ModuleRef::get(module)?,
            }),
            GFP_KERNEL,
        )
    }

    /// The tap's minor: the ring minor, and the block minor once a disk exists.
    pub(crate) fn minor(&self) -> u32 {
        self.minor
    }
}

/// A table of objects indexed by minor, handing out the lowest free minor first.
///
/// # Invariants
///
/// `slots.len() <= limit`, and the last slot, if any, is occupied.
pub(crate) struct TapTable<E> {
    slots: KVec<Option<E>>,
    limit: u32,
}

impl<E> TapTable<E> {
    /// An empty table for minors `0..limit`.
    pub(crate) const fn new(limit: u32) -> Self {
        // INVARIANT: No slot yet.
        Self {
            slots: KVec::new(),
            limit,
        }
    }

    /// The lowest free minor.
    ///
    /// # Errors
    ///
    /// `ENOSPC` when every minor is in use.
    pub(crate) fn lowest_free(&self) -> Result<u32> {
        let minor = self
            .slots
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.slots.len());
        // CAST: `slots.len() <= limit`, a `u32`.
        let minor = minor as u32;
        if minor >= self.limit {
            return Err(ENOSPC);
        }
        Ok(minor)
    }

    /// Stores `entry` at the free minor `minor`.
    ///
    /// # Errors
    ///
    /// `EINVAL` if `minor` is out of range, `EEXIST` if it is taken, `ENOMEM`.
    pub(crate) fn insert(&mut self, minor: u32, entry: E) -> Result {
        if minor >= self.limit {
            return Err(EINVAL);
        }
        let idx = minor as usize;
        while self.slots.len() <= idx {
            self.slots.push(None, GFP_KERNEL)?;
        }
        if self.slots[idx].is_some() {
            // Keep the invariant: a trailing slot pushed above would be empty.
            self.trim();
            return Err(EEXIST);
        }
        // INVARIANT: `idx < limit`, and the last slot is occupied or was already.
        self.slots[idx] = Some(entry);
        Ok(())
    }

    /// The entry at `minor`.
    pub(crate) fn get(&self, minor: u32) -> Option<&E> {
        self.slots.get(minor as usize)?.as_ref()
    }

    /// Takes the entry at `minor` out of the table.
    pub(crate) fn remove(&mut self, minor: u32) -> Option<E> {
        let entry = self.slots.get_mut(minor as usize)?.take();
        self.trim();
        entry
    }

    /// The entries, by increasing minor.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, &E)> {
        self.slots
            .iter()
            .enumerate()
            // CAST: Indices are below `limit`, a `u32`.
            .filter_map(|(i, e)| e.as_ref().map(|e| (i as u32, e)))
    }

    /// Number of entries.
    pub(crate) fn count(&self) -> usize {
        self.slots.iter().filter(|e| e.is_some()).count()
    }

    fn trim(&mut self) {
        while matches!(self.slots.last(), Some(None)) {
            self.slots.pop();
        }
    }
}

#[kunit_tests(blktap_minors)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_the_lowest_free_minor() -> Result {
        let mut t = TapTable::<u32>::new(8);
        for m in 0..4 {
            let minor = t.lowest_free()?;
            assert_eq!(minor, m);
            t.insert(minor, m * 10)?;
        }
        assert_eq!(t.remove(1), Some(10));
        assert_eq!(t.lowest_free()?, 1);
        t.insert(1, 11)?;
        assert_eq!(t.lowest_free()?, 4);
        assert_eq!(t.count(), 4);
        Ok(())
    }

    #[test]
    fn refuses_out_of_range_and_taken_minors() -> Result {
        let mut t = TapTable::<u32>::new(4);
        assert_eq!(t.insert(4, 0), Err(EINVAL));
        t.insert(2, 0)?;
        assert_eq!(t.insert(2, 1), Err(EEXIST));
        assert!(t.get(2).is_some());
        assert!(t.get(1).is_none());
        assert!(t.get(100).is_none());
        assert!(t.remove(100).is_none());
        Ok(())
    }

    #[test]
    fn full_table_answers_enospc() -> Result {
        let mut t = TapTable::<()>::new(3);
        for _ in 0..3 {
            let m = t.lowest_free()?;
            t.insert(m, ())?;
        }
        assert_eq!(t.lowest_free(), Err(ENOSPC));
        t.remove(0);
        assert_eq!(t.lowest_free()?, 0);
        Ok(())
    }

    #[test]
    fn shrinks_when_the_highest_minors_go() -> Result {
        let mut t = TapTable::<()>::new(16384);
        t.insert(16383, ())?;
        assert_eq!(t.lowest_free()?, 0);
        assert_eq!(t.slots.len(), 16384);
        t.remove(16383);
        assert_eq!(t.slots.len(), 0);
        let ids: KVec<u32> = {
            let mut v = KVec::new();
            t.insert(5, ())?;
            t.insert(3, ())?;
            for (m, ()) in t.iter() {
                v.push(m, GFP_KERNEL)?;
            }
            v
        };
        assert_eq!(&ids[..], &[3, 5]);
        Ok(())
    }
}
