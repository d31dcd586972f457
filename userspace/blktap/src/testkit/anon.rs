//! Ring memory in an anonymous mapping, where the test plays the kernel.

use std::cell::Cell;
use std::ptr::NonNull;

use crate::mapping::Mapping;
use crate::ring::{RingMemory, MAP_SIZE};
use crate::{Error, Result};

/// Ring memory in an anonymous mapping, for simulations and tests: the caller plays the kernel.
///
/// [`RingMemory::kick`] only counts the calls ([`AnonRing::kicks`]).
#[derive(Debug)]
pub struct AnonRing {
    map: Mapping,
    kicks: Cell<u64>,
}

impl AnonRing {
    /// A zeroed ring mapping.
    pub fn new() -> Result<Self> {
        let map = Mapping::anonymous(MAP_SIZE).map_err(|e| Error::os("map ring memory", e))?;
        Ok(Self {
            map,
            kicks: Cell::new(0),
        })
    }

    /// How many times responses were signalled.
    pub fn kicks(&self) -> u64 {
        self.kicks.get()
    }
}

// SAFETY: the mapping is MAP_SIZE bytes, page-aligned (mmap), lives as long as `self`, and is
// only reached through raw pointers.
unsafe impl RingMemory for AnonRing {
    fn base(&self) -> NonNull<u8> {
        self.map.as_ptr()
    }

    fn kick(&self) -> Result<()> {
        self.kicks.set(self.kicks.get() + 1);
        Ok(())
    }
}
