//! Which sectors a copy-on-write overlay holds: one bit per 512-byte sector, kept in pages of
//! 4096 bytes (32768 sectors, 16 MiB of disk) allocated when first set, so the map takes memory
//! in proportion to what was written. A page is also the unit the overlay file stores.

use std::collections::BTreeSet;

/// Bytes in a map page.
pub const PAGE_BYTES: usize = 4096;
/// Sectors a map page covers.
pub const PAGE_SECTORS: u64 = (PAGE_BYTES * 8) as u64;
const WORDS: usize = PAGE_BYTES / 8;

/// The map of present sectors.
///
/// # Invariants
///
/// `pages.len()` is the number of pages covering `sectors`; bits past `sectors` are never set.
#[derive(Debug, Default)]
pub struct Map {
    sectors: u64,
    pages: Vec<Option<Box<[u64; WORDS]>>>,
    /// Pages changed since [`Map::take_dirty`].
    dirty: BTreeSet<usize>,
}

impl Map {
    /// An empty map of a disk of `sectors` sectors.
    pub fn new(sectors: u64) -> Self {
        let n = sectors.div_ceil(PAGE_SECTORS) as usize;
        Self {
            sectors,
            pages: (0..n).map(|_| None).collect(),
            dirty: BTreeSet::new(),
        }
    }

    /// Pages of the map.
    pub fn page_count(&self) -> usize {
        self.pages.len()
    }

    /// Whether sector `s` is present.
    pub fn get(&self, s: u64) -> bool {
        let (p, w, b) = split(s);
        self.pages
            .get(p)
            .and_then(|x| x.as_ref())
            .is_some_and(|page| page[w] >> b & 1 == 1)
    }

    /// Marks `[start, start + n)` present (clipped to the disk).
    pub fn set(&mut self, start: u64, n: u64) {
        let end = start.saturating_add(n).min(self.sectors);
        let mut s = start;
        while s < end {
            let (p, w, b) = split(s);
            let page = self.pages[p].get_or_insert_with(|| Box::new([0; WORDS]));
            let take = (64 - b as u64).min(end - s);
            let mask = if take == 64 {
                u64::MAX
            } else {
                ((1u64 << take) - 1) << b
            };
            if page[w] & mask != mask {
                page[w] |= mask;
                self.dirty.insert(p);
            }
            s += take;
        }
    }

    /// The runs of `[start, start + n)`, in order: `(first sector, sectors, present)`.
    pub fn runs(&self, start: u64, n: u64) -> Vec<(u64, u64, bool)> {
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let end = start.saturating_add(n);
        let mut s = start;
        while s < end {
            let (p, w, b) = split(s);
            // A whole absent page, or one word's worth of bits.
            let (take, present) = match self.pages.get(p).and_then(|x| x.as_ref()) {
                None => ((p as u64 + 1) * PAGE_SECTORS - s, false),
                Some(page) => {
                    let bits = page[w] >> b;
                    let present = bits & 1 == 1;
                    let same = if present {
                        (!bits).trailing_zeros()
                    } else {
                        bits.trailing_zeros()
                    };
                    ((same as u64).min(64 - b as u64).max(1), present)
                }
            };
            let take = take.min(end - s);
            match out.last_mut() {
                Some(last) if last.2 == present && last.0 + last.1 == s => last.1 += take,
                _ => out.push((s, take, present)),
            }
            s += take;
        }
        out
    }

    /// The pages changed since the last call, with a copy of each as stored (little-endian
    /// words), and forgets that they changed.
    pub fn take_dirty(&mut self) -> Vec<(usize, [u8; PAGE_BYTES])> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty.into_iter().map(|p| (p, self.page_bytes(p))).collect()
    }

    /// Marks page `p` changed again (its store failed).
    pub fn redirty(&mut self, p: usize) {
        self.dirty.insert(p);
    }

    /// Page `p` as stored.
    pub fn page_bytes(&self, p: usize) -> [u8; PAGE_BYTES] {
        let mut out = [0u8; PAGE_BYTES];
        if let Some(page) = self.pages.get(p).and_then(|x| x.as_ref()) {
            for (chunk, w) in out.chunks_exact_mut(8).zip(page.iter()) {
                chunk.copy_from_slice(&w.to_le_bytes());
            }
        }
        out
    }

    /// Loads page `p` from its stored bytes; bits past the disk's end are dropped.
    pub fn load_page(&mut self, p: usize, bytes: &[u8; PAGE_BYTES]) {
        if p >= self.pages.len() || bytes.iter().all(|&b| b == 0) {
            return;
        }
        let mut page = Box::new([0u64; WORDS]);
        for (w, chunk) in page.iter_mut().zip(bytes.chunks_exact(8)) {
            *w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        }
        let first = p as u64 * PAGE_SECTORS;
        for s in self.sectors.max(first)..first + PAGE_SECTORS {
            let (_, w, b) = split(s);
            page[w] &= !(1 << b);
        }
        self.pages[p] = Some(page);
    }

    /// Sectors present.
    pub fn count(&self) -> u64 {
        self.pages
            .iter()
            .flatten()
            .map(|p| p.iter().map(|w| u64::from(w.count_ones())).sum::<u64>())
            .sum()
    }
}

fn split(s: u64) -> (usize, usize, u32) {
    let p = (s / PAGE_SECTORS) as usize;
    let within = s % PAGE_SECTORS;
    (p, (within / 64) as usize, (within % 64) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The runs, from a model of one bool per sector.
    fn model_runs(m: &[bool], start: u64, n: u64) -> Vec<(u64, u64, bool)> {
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        for s in start..start + n {
            let present = m[s as usize];
            match out.last_mut() {
                Some(last) if last.2 == present => last.1 += 1,
                _ => out.push((s, 1, present)),
            }
        }
        out
    }

    #[test]
    fn runs_and_bits_agree_with_a_model() {
        let sectors = 3 * PAGE_SECTORS + 1000;
        let mut map = Map::new(sectors);
        let mut model = vec![false; sectors as usize];
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..400 {
            let start = rnd(sectors);
            let long = rnd(4) == 0;
            let n = 1 + rnd(if long { 70000 } else { 200 });
            map.set(start, n);
            for s in start..(start + n).min(sectors) {
                model[s as usize] = true;
            }
            let (a, len) = (rnd(sectors), 1 + rnd(80000));
            let len = len.min(sectors - a);
            assert_eq!(map.runs(a, len), model_runs(&model, a, len));
        }
        assert_eq!(map.count(), model.iter().filter(|&&b| b).count() as u64);
        assert_eq!(map.runs(0, sectors), model_runs(&model, 0, sectors));
        for s in (0..sectors).step_by(97) {
            assert_eq!(map.get(s), model[s as usize]);
        }
    }

    #[test]
    fn pages_round_trip_and_dirty_pages_are_taken_once() {
        let mut map = Map::new(2 * PAGE_SECTORS);
        map.set(5, 3);
        map.set(PAGE_SECTORS + 64, 64);
        let dirty = map.take_dirty();
        assert_eq!(dirty.iter().map(|d| d.0).collect::<Vec<_>>(), [0, 1]);
        assert!(map.take_dirty().is_empty());
        // Setting what is set already changes nothing.
        map.set(5, 3);
        assert!(map.take_dirty().is_empty());
        let mut back = Map::new(2 * PAGE_SECTORS);
        for (p, bytes) in &dirty {
            back.load_page(*p, bytes);
        }
        assert_eq!(
            back.runs(0, 2 * PAGE_SECTORS),
            map.runs(0, 2 * PAGE_SECTORS)
        );
        assert!(back.take_dirty().is_empty());
    }

    #[test]
    fn bits_past_the_end_are_never_set_nor_loaded() {
        let mut map = Map::new(100);
        map.set(90, 50);
        assert_eq!(map.count(), 10);
        let mut back = Map::new(95);
        back.load_page(0, &[0xff; PAGE_BYTES]);
        assert_eq!(back.count(), 95);
        back.load_page(7, &[0xff; PAGE_BYTES]);
        assert_eq!(back.count(), 95);
    }
}
