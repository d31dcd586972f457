// SPDX-License-Identifier: GPL-2.0

//! The minor allocator: a table of taps indexed by minor, lowest free minor first.

use kernel::prelude::*;

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
