//! Ring memory in an anonymous mapping, where the test plays the kernel.

use std::cell::Cell;
use std::ptr::NonNull;

use crate::mapping::Mapping;
use crate::ring::memory::{map_size, valid_pages_per_slot, STANDARD_PAGES_PER_SLOT};
use crate::ring::RingMemory;
use crate::{Error, Result};

/// Ring memory in an anonymous mapping, for simulations and tests: the caller plays the kernel.
///
/// [`RingMemory::kick`] only counts the calls ([`AnonRing::kicks`]).
#[derive(Debug)]
pub struct AnonRing {
    map: Mapping,
    pages_per_slot: usize,
    kicks: Cell<u64>,
}

impl AnonRing {
    /// A zeroed standard ring mapping (11 data pages per slot).
    pub fn new() -> Result<Self> {
        Self::with_pages_per_slot(STANDARD_PAGES_PER_SLOT)
    }

    /// A zeroed ring mapping with `pages_per_slot` data pages per slot (11..=128).
    pub fn with_pages_per_slot(pages_per_slot: usize) -> Result<Self> {
        if !valid_pages_per_slot(pages_per_slot) {
            return Err(Error::invalid(format!(
                "{pages_per_slot} data pages per slot (11..=128)"
            )));
        }
        let map = Mapping::anonymous(map_size(pages_per_slot))
            .map_err(|e| Error::os("map ring memory", e))?;
        Ok(Self {
            map,
            pages_per_slot,
            kicks: Cell::new(0),
        })
    }

    /// How many times responses were signalled.
    pub fn kicks(&self) -> u64 {
        self.kicks.get()
    }
}

// SAFETY: the mapping is map_size(pages_per_slot) bytes (pages_per_slot checked in 11..=128),
// page-aligned (mmap), lives as long as `self`, and is only reached through raw pointers.
unsafe impl RingMemory for AnonRing {
    fn base(&self) -> NonNull<u8> {
        self.map.as_ptr()
    }

    fn pages_per_slot(&self) -> usize {
        self.pages_per_slot
    }

    fn kick(&self) -> Result<()> {
        self.kicks.set(self.kicks.get() + 1);
        Ok(())
    }
}
