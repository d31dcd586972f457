// SPDX-License-Identifier: GPL-2.0

//! The char-device adapter: the ring devices, `/dev/xen/blktap-2/blktapN`.
//!
//! A tapdisk opens the ring of its tap exclusively (`EBUSY` for a second opener, `ENXIO` for an
//! unallocated minor; an opener waits while the last user's disk is removed), maps it once per
//! open (1 + 32 x 11 pages at offset 0), creates the disk with `CREATE_DEVICE`, polls for
//! requests and answers with `RESPOND`. Each file operation checks its arguments and calls one
//! transition of the tap (`tap/`). See `Documentation/blktap2.rst` for the protocol.

use core::sync::atomic::{
    AtomicBool,
    Ordering, //
};

use kernel::{
    fs::File,
    mm::virt::VmaNew,
    page::PAGE_SIZE,
    prelude::*,
    sync::{
        poll::PollTable,
        Arc, //
    },
    uaccess::{
        UserPtr,
        UserSlice, //
    },
};

use crate::{
    chrdev::{
        poll_bits,
        CharDevice, //
    },
    driver::Blktap,
    protocol::DeviceInfo,
    ring::{
        pages::RingPages,
        state::Readiness, //
    },
    tap::Tap,
    task::{
        self,
        MmId, //
    },
    uapi,
    vma::{
        self,
        FixedMapping, //
    },
};

/// An open ring.
///
/// # Invariants
///
/// The tap's ring is `Open` for as long as this object exists (`Closing` while it drops).
pub(crate) struct RingFile {
    tap: Arc<Tap>,
    /// The driver, which makes the disks.
    blktap: Arc<Blktap>,
    /// Mapped once already (a file is mapped at most once).
    mapped: AtomicBool,
}

impl Drop for RingFile {
    fn drop(&mut self) {
        // The mapping (which holds the file) is gone.
        self.tap.close_ring();
    }
}

impl FixedMapping for Tap {
    fn opened(this: &Arc<Self>) {
        this.vma_opened();
    }

    fn closed(this: Arc<Self>) {
        this.vma_closed();
    }
}

impl RingFile {
    fn check_caller(&self) -> Result {
        self.tap.check_caller(task::current_mm())
    }

    fn mmap(&self, vma: &VmaNew) -> Result {
        // The length chooses the slots' pages: 11 (every tapdisk), or more for large requests.
        let len = vma.end() - vma.start();
        let per_slot = RingPages::per_slot_of_mapping(len / PAGE_SIZE)
            .filter(|_| len % PAGE_SIZE == 0 && vma::pgoff(vma) == 0)
            .ok_or(EINVAL)?;
        if self.mapped.swap(true, Ordering::Relaxed) {
            return Err(EBUSY);
        }
        let pages = self.tap.pages(per_slot).inspect_err(|_| {
            // Refused: the file may be mapped again, as an mmap refused for its length may.
            self.mapped.store(false, Ordering::Relaxed);
        })?;
        vma.set_dontcopy();
        vma.set_dontexpand();
        vma.set_dontdump();
        let mixed = vma.set_mixedmap();
        let start = vma.start();
        mixed.vm_insert_page(start, pages.ring_page())?;
        for (i, page) in pages.data_pages().iter().enumerate() {
            mixed.vm_insert_page(start + (i + 1) * PAGE_SIZE, page)?;
        }
        // The mapping holds a reference on the tap, dropped when its vma closes.
        Tap::install(vma, self.tap.clone());
        self.tap
            .mapped(MmId::from_ptr(vma.mm().as_raw().cast_const()), pages);
        Ok(())
    }

    /// Level-triggered: readable while the ring holds a request tapdisk has not answered
    /// (timed-out and staged ones included) or a message; an error while unmapped. So a peer
    /// that registers late, re-arms (`EPOLL_CTL_MOD`) or polls through nested epoll sees the
    /// same answer each time. Its one side effect keeps that answer: staged writes (disks with
    /// staged writes) are copied and put on the ring here, in the poller's context.
    fn poll(&self, file: &File, table: PollTable<'_>) -> u32 {
        table.register_wait(file, self.tap.poll_queue());
        self.tap.drain_staged();
        match self.tap.readiness() {
            Readiness::Unmapped => poll_bits::ERR,
            Readiness::Readable => poll_bits::IN | poll_bits::RDNORM,
            Readiness::Idle => 0,
        }
    }

    fn create(&self, info: DeviceInfo) -> Result {
        self.blktap.create_disk(&self.tap, &info)
    }

    fn ioctl(&self, cmd: u32, arg: usize) -> Result<isize> {
        match cmd {
            uapi::IOCTL_RESPOND => {
                self.check_caller()?;
                let answered = self.tap.respond();
                // Then the writes staged meanwhile, so that tapdisk finds them on the ring
                // when the call returns.
                self.tap.drain_staged();
                answered?;
            }
            uapi::IOCTL_CREATE_DEVICE => {
                self.check_caller()?;
                let mut reader =
                    UserSlice::new(UserPtr::from_addr(arg), size_of::<uapi::BlktapDeviceInfo>())
                        .reader();
                let info: uapi::BlktapDeviceInfo = reader.read()?;
                self.create(DeviceInfo::from_info(&info)?)?;
            }
            uapi::IOCTL_CREATE_DEVICE_COMPAT => {
                self.check_caller()?;
                let mut reader =
                    UserSlice::new(UserPtr::from_addr(arg), size_of::<uapi::BlktapParams>())
                        .reader();
                let params: uapi::BlktapParams = reader.read()?;
                self.create(DeviceInfo::from_params(&params)?)?;
            }
            uapi::IOCTL_REMOVE_DEVICE => {
                self.check_caller()?;
                // Staged writes go on the ring, to be answered before the disk can go.
                self.tap.drain_staged();
                self.tap.remove_disk()?;
            }
            uapi::IOCTL_PAUSE | uapi::IOCTL_RESUME => {
                self.check_caller()?;
                self.tap.set_paused(cmd == uapi::IOCTL_PAUSE)?;
            }
            _ => return Err(ENOTTY),
        }
        Ok(0)
    }
}

/// The ring devices' file operations.
pub(crate) struct Ring;

#[vtable]
impl CharDevice for Ring {
    type Data = Arc<Blktap>;
    type Ptr = KBox<RingFile>;

    fn open(blktap: &Arc<Blktap>, minor: u32, _file: &File) -> Result<Self::Ptr> {
        let tap = blktap.open_ring(minor, task::current_tgid())?;
        // INVARIANT: `open_ring` made the ring `Open`. If the allocation fails, the `RingFile`
        // is dropped, which closes it again.
        KBox::new(
            RingFile {
                tap,
                blktap: blktap.clone(),
                mapped: AtomicBool::new(false),
            },
            GFP_KERNEL,
        )
        .map_err(Into::into)
    }

    fn mmap(ring: &RingFile, _file: &File, vma: &VmaNew) -> Result {
        ring.mmap(vma)
    }

    fn poll(ring: &RingFile, file: &File, table: PollTable<'_>) -> u32 {
        ring.poll(file, table)
    }

    fn ioctl(ring: &RingFile, _file: &File, cmd: u32, arg: usize) -> Result<isize> {
        ring.ioctl(cmd, arg)
    }
}
