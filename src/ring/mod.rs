// SPDX-License-Identifier: GPL-2.0

//! The ring a tap shares with its tapdisk: the pages (`pages.rs`), the life of each slot and
//! the requests waiting for one (`slot.rs`), and the I/O state under the tap's spinlock
//! (`state.rs`). No file here knows the disk or the char device.

pub(crate) mod pages;
pub(crate) mod slot;
pub(crate) mod state;
