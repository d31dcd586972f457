// SPDX-License-Identifier: GPL-2.0

//! Facts about the current task that a driver compares: its thread group and its mm.
//!
//! Both are read by C helpers (`rust/helpers.c`) that follow the C compiler's layout of
//! `struct task_struct`: on this build bindgen's layout of it was seen to disagree with the
//! compiler's (Rust read `tgid` as -1), so `current!()`'s field reads are not used for them.
//!
//! C header: [`include/linux/sched.h`](srctree/include/linux/sched.h)

use kernel::task::Pid;

mod ffi {
    extern "C" {
        pub(super) fn blktap_current_mm() -> *const core::ffi::c_void;
        pub(super) fn blktap_current_tgid() -> i32;
    }
}

/// The identity of an mm: compared, never dereferenced. 0 is no mm.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct MmId(usize);

impl MmId {
    /// No mm.
    pub const NONE: Self = Self(0);

    /// The identity of the mm at `mm` (a pointer that is only compared).
    pub fn from_ptr<T>(mm: *const T) -> Self {
        Self(mm as usize)
    }

    /// Whether this names an mm.
    pub fn is_some(self) -> bool {
        self.0 != 0
    }
}

/// The current task's mm, or [`MmId::NONE`] for a kernel thread.
pub fn current_mm() -> MmId {
    // SAFETY: Reads `current->mm`, which only the current task changes; the value is compared,
    // never dereferenced.
    MmId::from_ptr(unsafe { ffi::blktap_current_mm() })
}

/// The current task's thread-group id in the initial pid namespace.
pub fn current_tgid() -> Pid {
    // SAFETY: Reads the current task's tgid; `current` is always valid.
    unsafe { ffi::blktap_current_tgid() }
}
