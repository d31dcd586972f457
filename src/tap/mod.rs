// SPDX-License-Identifier: GPL-2.0

//! Taps: the hub. A tap is created by `ALLOC_TAP` and lives until `FREE_TAP`; in between, a
//! tapdisk opens and maps its ring, creates its disk, serves it, and goes. Everything that
//! happens to a tap is a named transition here; the adapters (`ring_file.rs` for the char
//! device, `disk.rs` for blk-mq, `sysfs.rs`) only call them. The I/O path is in `io.rs`, the
//! minor allocator in `table.rs`.
//!
//! # Lock order
//!
//! This is the one place the lock order is written:
//!
//! 1. `Taps::table` (`blktap_taps`, mutex, `driver.rs`): the table of taps;
//! 2. `Tap::inner` (`blktap_tap`, mutex): one tap's life: its name, who has the ring, the
//!    pages, the disk;
//! 3. `Tap::ring` (`blktap_ring`, spinlock, `ring/state.rs`): the ring's I/O state.
//!
//! - The spinlock is never held across page allocation, a user copy, an mm operation, or the
//!   end of a request; `queue_rq`, `RESPOND` and the timeout handler take only it.
//! - Per-tap sysfs callbacks take `Tap::inner` (then `Tap::ring`), never `Taps::table`, so a
//!   tap's class device may be removed with `Taps::table` held.
//! - `Tap::closed` (`blktap_closed`) is waited on with `Tap::inner` held by the wait, never with
//!   `Taps::table` held.
//!
//! # Teardown
//!
//! A tap's disk is always dropped (deleted) with no lock held. While it goes, whoever would meet
//! its removal is held off: a closing ring or a tap being freed is `Closing` (a new opener and
//! `FREE_TAP` wait on `Tap::closed`), and a disk removed by `REMOVE_DEVICE` is `Removing`
//! (`CREATE_DEVICE` answers `EBUSY`); new requests fail at once meanwhile.

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
    class::SysfsBuf,
    module_ref::ModuleRef,
    protocol::{
        DeviceInfo,
        Features, //
    },
    ring::{
        pages::RingPages,
        state::{
            Readiness,
            RingState,
            Taken,
            Unmapped, //
        },
    },
    task::MmId,
    uapi,
};

mod io;
pub(crate) mod table;

pub(crate) use io::DiskLink;

/// The longest deadline a tap accepts, in seconds (a day).
pub(crate) const DEADLINE_MAX: u32 = 86400;

/// What the hub needs of a tap's disk; the blk-mq adapter (`disk.rs`) implements it.
pub(crate) trait DiskControl: Send + Sync {
    /// How many times the block device is open.
    fn openers(&self) -> u32;
    /// Stops (`true`) or restarts dispatching requests to the ring. Stopping waits for
    /// `queue_rq` calls in progress.
    fn set_quiesced(&mut self, quiesced: bool);
    /// Whether dispatching is stopped.
    fn is_quiesced(&self) -> bool;
    /// Sets how long a request may run before the timeout handler.
    fn set_timeout_ms(&self, msecs: u32);
}

/// Who has a tap's ring open.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RingUser {
    /// Nobody: it may be opened, and the tap freed.
    Closed,
    /// The ring node is open (or mapped, as a mapping keeps the file open) by this thread group.
    Open(Pid),
    /// Its last user closed it, or the tap is being freed, and the disk is being removed.
    Closing,
}

/// A tap's disk.
enum DiskState {
    None,
    Live {
        disk: KBox<dyn DiskControl>,
        read_only: bool,
        features: Features,
    },
    /// `REMOVE_DEVICE` is deleting it.
    Removing,
}

/// The state of a tap that `Tap::inner` protects.
struct TapInner {
    /// The tap's name, set through sysfs; empty while unset.
    name: KVec<u8>,
    ring_user: RingUser,
    /// The shared pages, from the first mapping until the tap is freed.
    pages: Option<Arc<RingPages>>,
    disk: DiskState,
}

impl TapInner {
    /// The live disk.
    fn disk_mut(&mut self) -> Option<&mut KBox<dyn DiskControl>> {
        match &mut self.disk {
            DiskState::Live { disk, .. } => Some(disk),
            _ => None,
        }
    }

    /// Takes the live disk out, for the caller to drop outside the lock; `next` says what the
    /// tap has meanwhile.
    fn take_disk(&mut self, next: DiskState) -> Option<KBox<dyn DiskControl>> {
        match core::mem::replace(&mut self.disk, next) {
            DiskState::Live { disk, .. } => Some(disk),
            other => {
                self.disk = other;
                None
            }
        }
    }
}

/// The answer of [`Tap::open_ring`] and [`Tap::begin_free`] when they cannot go on now.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Busy {
    /// The ring is open: `EBUSY`.
    InUse,
    /// The ring is closing or the tap is being freed: wait ([`Tap::wait_settled`]), then look
    /// the tap up again.
    Settling,
    /// Another error.
    Err(Error),
}

impl From<Error> for Busy {
    fn from(e: Error) -> Self {
        Busy::Err(e)
    }
}

/// An allocated tap.
///
/// # Invariants
///
/// `minor < MAX_MINORS`, and it is the tap's index in the tap table while the tap is there.
#[pin_data]
pub(crate) struct Tap {
    minor: u32,
    #[pin]
    inner: Mutex<TapInner>,
    #[pin]
    ring: SpinLock<RingState>,
    /// Woken when requests are published or the ring's state changes.
    #[pin]
    poll: PollCondVar,
    /// Woken when the ring's user leaves `Closing`; waited on with `inner`.
    #[pin]
    closed: CondVar,
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
                        disk: DiskState::None,
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

    /// The wait queue of the ring's poll.
    pub(crate) fn poll_queue(&self) -> &PollCondVar {
        &self.poll
    }

    // ---- the ring's user ---------------------------------------------------------------------

    /// Marks the ring open by thread group `pid` (the ring node's `open`).
    pub(crate) fn open_ring(&self, pid: Pid) -> core::result::Result<(), Busy> {
        let mut inner = self.inner.lock();
        match inner.ring_user {
            RingUser::Open(_) => Err(Busy::InUse),
            RingUser::Closing => Err(Busy::Settling),
            RingUser::Closed => {
                inner.ring_user = RingUser::Open(pid);
                Ok(())
            }
        }
    }

    /// Waits until the ring is no longer `Closing`.
    ///
    /// # Errors
    ///
    /// `ERESTARTSYS` if a signal came first.
    pub(crate) fn wait_settled(&self) -> Result {
        let mut inner = self.inner.lock();
        while inner.ring_user == RingUser::Closing {
            if self.closed.wait_interruptible(&mut inner) {
                return Err(ERESTARTSYS);
            }
        }
        Ok(())
    }

    /// The ring's last user closed it (after its mapping went). The disk goes too, unless it
    /// waits for a new tapdisk (recovery); until it is gone the ring is `Closing`.
    pub(crate) fn close_ring(&self) {
        let disk = {
            let mut inner = self.inner.lock();
            let mut ring = self.ring.lock();
            if ring.recovery() && matches!(inner.disk, DiskState::Live { .. }) {
                // The disk and its requests wait for a new tapdisk; a pause ends with the old one.
                ring.set_paused(false);
                drop(ring);
                if let Some(disk) = inner.disk_mut() {
                    disk.set_quiesced(false);
                }
                inner.ring_user = RingUser::Closed;
                return;
            }
            ring.force_removing();
            drop(ring);
            inner.ring_user = RingUser::Closing;
            inner.take_disk(DiskState::None)
        };
        if let Some(disk) = disk {
            pr_info!("blktap{}: ring closed; removing its disk\n", self.minor);
            drop(disk);
        }
        let mut inner = self.inner.lock();
        self.ring.lock().end_removing();
        inner.ring_user = RingUser::Closed;
        drop(inner);
        self.closed.notify_all();
    }

    /// `FREE_TAP`, first step: refuses while the ring is open or the kept disk is open, else
    /// makes the tap `Closing`, fails the requests a recovering disk kept and takes the disk
    /// out, for the caller to drop with no lock held, then to call [`Tap::end_free`].
    pub(crate) fn begin_free(&self) -> core::result::Result<Option<KBox<dyn DiskControl>>, Busy> {
        let mut inner = self.inner.lock();
        match inner.ring_user {
            RingUser::Open(_) => return Err(Busy::Err(EBUSY)),
            RingUser::Closing => return Err(Busy::Settling),
            RingUser::Closed => {}
        }
        // A disk without a ring is one kept for recovery that nobody came back for.
        if let DiskState::Live { disk, .. } = &inner.disk {
            if disk.openers() > 0 {
                return Err(Busy::Err(EBUSY));
            }
        }
        let mut kept = Taken::new();
        self.ring.lock().abandon(&mut kept);
        inner.ring_user = RingUser::Closing;
        let disk = inner.take_disk(DiskState::None);
        drop(inner);
        let failed = kept.fail_all();
        if failed > 0 {
            pr_warn!(
                "blktap{}: freed while recovering; failed {failed} kept requests\n",
                self.minor
            );
        }
        Ok(disk)
    }

    /// `FREE_TAP`, last step: the tap is out of the table; wakes whoever waited for it (they
    /// look it up again, and do not find it).
    pub(crate) fn end_free(&self) {
        self.inner.lock().ring_user = RingUser::Closed;
        self.closed.notify_all();
    }

    // ---- the mapping -------------------------------------------------------------------------

    /// The shared pages for a mapping of `per_slot` data pages per slot: allocated at the tap's
    /// first mapping and kept until it is freed; allocated again when a mapping asks for another
    /// `per_slot` while the tap has no disk.
    ///
    /// # Errors
    ///
    /// `EINVAL` if the tap has a disk made on pages of another `per_slot` (its queue's limits
    /// and its kept requests are the old pages'), or if `per_slot` is not a mapping's; `ENOMEM`.
    pub(crate) fn pages(&self, per_slot: usize) -> Result<Arc<RingPages>> {
        let mut inner = self.inner.lock();
        if let Some(p) = &inner.pages {
            if p.per_slot() == per_slot {
                return Ok(p.clone());
            }
            if !matches!(inner.disk, DiskState::None) {
                return Err(EINVAL);
            }
        }
        let p = Arc::new(RingPages::new(per_slot)?, GFP_KERNEL)?;
        // The old pages, if any, go with their last user (no disk holds them).
        inner.pages = Some(p.clone());
        Ok(p)
    }

    /// A tapdisk (of mm `mm`) mapped the ring's `pages`: a recovering tap gives it the kept
    /// requests first, then those that waited for a slot.
    pub(crate) fn mapped(&self, mm: MmId, pages: Arc<RingPages>) {
        pages.zero_ring();
        let (reissued, staged) = {
            let mut ring = self.ring.lock();
            (ring.map(mm, pages.clone()), ring.staged())
        };
        if reissued > 0 {
            pr_info!(
                "blktap{}: ring mapped again; re-issued {reissued} kept requests\n",
                self.minor
            );
        }
        if reissued > 0 || staged > 0 {
            self.poll.notify_all();
        }
        self.dispatch_parked(&pages);
    }

    /// The mm copied a vma of the mapping.
    pub(crate) fn vma_opened(&self) {
        self.ring.lock().vma_opened();
    }

    /// A vma of the mapping closed: when it was the last, the mapping is gone (munmap, or the
    /// process died). Without recovery, pending and waiting requests fail, and new ones until
    /// the disk is removed; with recovery, they are kept for the next tapdisk.
    pub(crate) fn vma_closed(&self) {
        let mut dead = Taken::new();
        let unmapped = {
            let mut ring = self.ring.lock();
            if !ring.vma_closed() {
                return;
            }
            ring.unmap(&mut dead)
        };
        let failed = dead.fail_all();
        match unmapped {
            Unmapped::Kept { n, log: true } => pr_warn!(
                "blktap{}: ring unmapped; keeping the disk and {n} requests for recovery\n",
                self.minor
            ),
            Unmapped::Failed if failed > 0 => pr_warn!(
                "blktap{}: ring unmapped; failed {failed} pending requests\n",
                self.minor
            ),
            _ => {}
        }
        self.poll.notify_all();
    }

    /// Whether the calling process (of mm `mm`) mapped the ring: only it may use ring ioctls.
    ///
    /// # Errors
    ///
    /// `EACCES` otherwise.
    pub(crate) fn check_caller(&self, mm: MmId) -> Result {
        if self.ring.lock().is_mapper(mm) {
            Ok(())
        } else {
            Err(EACCES)
        }
    }

    /// What poll reports: a query without side effects.
    pub(crate) fn readiness(&self) -> Readiness {
        self.ring.lock().readiness()
    }

    // ---- the disk ----------------------------------------------------------------------------

    /// `CREATE_DEVICE`: makes the disk with `make`, given the link its queue reaches `tap`
    /// through.
    ///
    /// # Errors
    ///
    /// `EEXIST` if the tap has a disk, `EBUSY` while one is being removed, `ENXIO` if the ring
    /// was never mapped, `EINVAL` for large requests on a mapping with 11 pages per slot, or
    /// what `make` answers.
    pub(crate) fn create_disk(
        tap: &Arc<Self>,
        info: &DeviceInfo,
        make: impl FnOnce(DiskLink) -> Result<KBox<dyn DiskControl>>,
    ) -> Result {
        let mut inner = tap.inner.lock();
        match inner.disk {
            DiskState::None => {}
            DiskState::Live { .. } => return Err(EEXIST),
            DiskState::Removing => return Err(EBUSY),
        }
        let pages = inner.pages.clone().ok_or(ENXIO)?;
        if info.features.large && pages.per_slot() == uapi::SEGMENT_MAX {
            return Err(EINVAL);
        }
        let disk = make(DiskLink::new(tap.clone(), pages, info.features))?;
        let deadline = tap.ring.lock().deadline();
        disk.set_timeout_ms(deadline.saturating_mul(1000));
        inner.disk = DiskState::Live {
            disk,
            read_only: info.read_only,
            features: info.features,
        };
        tap.ring
            .lock()
            .disk_created(info.recovery, info.features.req_event);
        Ok(())
    }

    /// `REMOVE_DEVICE`.
    ///
    /// # Errors
    ///
    /// `ENODEV` if there is no disk, `EBUSY` while it is open, has requests on the ring or
    /// waiting for a slot, or is being removed.
    pub(crate) fn remove_disk(&self) -> Result {
        let disk = {
            let mut inner = self.inner.lock();
            let disk = match &inner.disk {
                DiskState::Live { disk, .. } => disk,
                DiskState::Removing => return Err(EBUSY),
                DiskState::None => return Err(ENODEV),
            };
            if disk.openers() > 0 {
                return Err(EBUSY);
            }
            // Deleting the disk waits for requests in flight, and tapdisk (the caller) cannot
            // answer any while it waits here. So, in one critical section: refuse if any request
            // is on the ring, and make every new one fail at once until the disk is gone.
            self.ring.lock().start_removing()?;
            inner.take_disk(DiskState::Removing)
        };
        // A paused disk is resumed by its drop: its waiting requests then fail at once.
        drop(disk);
        let mut inner = self.inner.lock();
        self.ring.lock().end_removing();
        inner.disk = DiskState::None;
        Ok(())
    }

    /// `PAUSE` (`true`) and `RESUME` (`false`): stops or restarts handing requests to the ring,
    /// and clears a pause or resume message (also when there is no disk to pause). `PAUSE` puts
    /// the staged writes on the ring before it returns.
    ///
    /// # Errors
    ///
    /// `ENODEV` if the tap has no disk.
    pub(crate) fn set_paused(&self, paused: bool) -> Result {
        let mut inner = self.inner.lock();
        self.ring.lock().clear_pause_message();
        let disk = inner.disk_mut().ok_or(ENODEV)?;
        // Stopping waits for `queue_rq` calls in progress; none takes `inner`.
        disk.set_quiesced(paused);
        self.ring.lock().set_paused(paused);
        let pages = inner.pages.clone();
        drop(inner);
        if paused {
            // No `queue_rq` runs now: every write staged so far goes on the ring, for tapdisk
            // to answer before it releases its image.
            self.drain_staged();
        } else if let Some(pages) = pages {
            self.dispatch_parked(&pages);
        }
        Ok(())
    }

    /// Asks the ring's tapdisk to pause or resume (sysfs `pause`), through the ring's `msg`.
    ///
    /// # Errors
    ///
    /// `ENXIO` if no tapdisk maps the ring, `ENODEV` if the tap has no disk.
    pub(crate) fn request_pause(&self, paused: bool) -> Result {
        {
            let inner = self.inner.lock();
            let ring = self.ring.lock();
            if !ring.is_mapped() {
                return Err(ENXIO);
            }
            // Without a disk there is nothing to pause, and the message would stay unanswered.
            if !matches!(inner.disk, DiskState::Live { .. }) {
                return Err(ENODEV);
            }
            ring.post_message(if paused {
                uapi::RING_MSG_PAUSE
            } else {
                uapi::RING_MSG_RESUME
            })?;
        }
        self.poll.notify_all();
        Ok(())
    }

    // ---- what sysfs shows and sets -----------------------------------------------------------

    /// Writes the tap's name, or its minor while unset, and a newline.
    pub(crate) fn show_name(&self, out: &mut SysfsBuf<'_>) -> Result {
        use core::fmt::Write;
        let inner = self.inner.lock();
        if inner.name.is_empty() {
            writeln!(out, "{}", self.minor)?;
        } else {
            out.write_bytes(&inner.name)?;
            out.write_bytes(b"\n")?;
        }
        Ok(())
    }

    /// Sets the tap's name (already validated).
    ///
    /// # Errors
    ///
    /// `ENOMEM`.
    pub(crate) fn set_name(&self, name: &[u8]) -> Result {
        let mut copy = KVec::with_capacity(name.len(), GFP_KERNEL)?;
        copy.extend_from_slice(name, GFP_KERNEL)?;
        self.inner.lock().name = copy;
        Ok(())
    }

    /// The thread group that has the ring open.
    pub(crate) fn task(&self) -> Option<Pid> {
        match self.inner.lock().ring_user {
            RingUser::Open(pid) => Some(pid),
            _ => None,
        }
    }

    /// Whether the tap has a disk.
    pub(crate) fn has_disk(&self) -> bool {
        matches!(self.inner.lock().disk, DiskState::Live { .. })
    }

    /// Whether the disk is paused.
    pub(crate) fn is_paused(&self) -> bool {
        match &self.inner.lock().disk {
            DiskState::Live { disk, .. } => disk.is_quiesced(),
            _ => false,
        }
    }

    /// The deadline of requests, in seconds.
    pub(crate) fn deadline(&self) -> u32 {
        self.ring.lock().deadline()
    }

    /// Sets the deadline of requests (already validated), for the disk too.
    pub(crate) fn set_deadline(&self, secs: u32) {
        let inner = self.inner.lock();
        self.ring.lock().set_deadline(secs);
        if let DiskState::Live { disk, .. } = &inner.disk {
            disk.set_timeout_ms(secs.saturating_mul(1000));
        }
    }

    /// Writes the `debug` attribute: one `key: value` line each.
    pub(crate) fn show_debug(&self, out: &mut SysfsBuf<'_>) -> Result {
        use core::fmt::Write;
        let inner = self.inner.lock();
        writeln!(out, "minor: {}", self.minor)?;
        out.write_bytes(b"name: ")?;
        out.write_bytes(&inner.name)?;
        out.write_bytes(b"\n")?;
        match inner.ring_user {
            RingUser::Open(pid) => writeln!(out, "ring: open by {pid}")?,
            RingUser::Closing => writeln!(out, "ring: closing")?,
            RingUser::Closed => writeln!(out, "ring: closed")?,
        }
        match &inner.disk {
            DiskState::Live {
                disk,
                read_only,
                features: f,
            } => {
                let ro = if *read_only { " (read-only)" } else { "" };
                writeln!(out, "disk: tapdev{}{ro}", self.minor)?;
                let paused = if disk.is_quiesced() { "yes" } else { "no" };
                writeln!(out, "paused: {paused}")?;
                writeln!(
                    out,
                    "features: flush={} fua={} discard={} staged_writes={} req_event={} large={}",
                    u8::from(f.flush),
                    u8::from(f.fua),
                    u8::from(f.discard),
                    u8::from(f.staged_writes),
                    u8::from(f.req_event),
                    u8::from(f.large)
                )?;
            }
            DiskState::Removing => writeln!(out, "disk: removing")?,
            DiskState::None => writeln!(out, "disk: none")?,
        }
        if let Some(p) = &inner.pages {
            writeln!(out, "slot_pages: {}", p.per_slot())?;
        }
        let ring = self.ring.lock();
        let mapped = if ring.is_mapped() { "yes" } else { "no" };
        writeln!(out, "mapped: {mapped}")?;
        let recovery = match (ring.recovery(), ring.is_mapped()) {
            (false, _) => "off",
            (true, true) => "on",
            (true, false) => "waiting for a tapdisk",
        };
        writeln!(out, "recovery: {recovery}")?;
        writeln!(out, "deadline: {}", ring.deadline())?;
        writeln!(out, "pending: {}", ring.pending())?;
        writeln!(out, "late: {}", ring.late_slots())?;
        writeln!(out, "parked: {}", ring.parked())?;
        writeln!(out, "staged: {}", ring.staged())?;
        let c = ring.counters();
        writeln!(out, "completed: {}", c.completed)?;
        writeln!(out, "refused: {}", c.refused)?;
        writeln!(out, "timed_out: {}", c.timed_out)?;
        writeln!(out, "late_answers: {}", c.late_answers)?;
        writeln!(out, "reissued: {}", c.reissued)?;
        writeln!(out, "quiet: {}", c.quiet)?;
        Ok(())
    }
}
