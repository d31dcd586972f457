//! Requests: validating the copy of a ring entry before anything is done with it.

use blktap_abi::{self as abi, blktap_request, blktap_request_discard};

/// Bytes per sector of the ring protocol (`sector_number`, `first_sect`, `last_sect`).
pub const SECTOR_SIZE: u64 = 512;
/// Sectors per data page.
pub const SECTORS_PER_PAGE: u8 = 8;

/// A request's operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read from the image into the data pages.
    Read,
    /// Write the data pages to the image.
    Write,
    /// Make every completed write durable (extension; no segments).
    Flush,
    /// Forget a range of the image (extension; no segments, the range in `nr_sectors`).
    Discard,
    /// Write the data pages to the image, durably before the answer (extension).
    WriteFua,
}

impl Op {
    /// The operation for ring code `code`, if known.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            abi::OP_READ => Some(Op::Read),
            abi::OP_WRITE => Some(Op::Write),
            abi::OP_FLUSH => Some(Op::Flush),
            abi::OP_DISCARD => Some(Op::Discard),
            abi::OP_WRITE_FUA => Some(Op::WriteFua),
            _ => None,
        }
    }

    /// The ring code of the operation.
    pub fn code(self) -> u8 {
        match self {
            Op::Read => abi::OP_READ,
            Op::Write => abi::OP_WRITE,
            Op::Flush => abi::OP_FLUSH,
            Op::Discard => abi::OP_DISCARD,
            Op::WriteFua => abi::OP_WRITE_FUA,
        }
    }

    /// Whether the operation moves data between the image and the data pages.
    pub fn has_data(self) -> bool {
        matches!(self, Op::Read | Op::Write | Op::WriteFua)
    }

    /// Whether the operation changes the image.
    pub fn writes(self) -> bool {
        matches!(self, Op::Write | Op::WriteFua | Op::Discard)
    }
}

/// One segment: sectors `first_sect..=last_sect` of one data page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    /// First sector inside the page (0..=7).
    pub first_sect: u8,
    /// Last sector inside the page, inclusive (first_sect..=7).
    pub last_sect: u8,
}

impl Segment {
    /// Number of sectors.
    pub fn sectors(self) -> u64 {
        u64::from(self.last_sect - self.first_sect) + 1
    }

    /// Offset of the first byte inside the page.
    pub fn page_offset(self) -> usize {
        usize::from(self.first_sect) * SECTOR_SIZE as usize
    }

    /// Length in bytes.
    pub fn len(self) -> usize {
        self.sectors() as usize * SECTOR_SIZE as usize
    }

    /// Whether the segment is empty (never, once validated).
    pub fn is_empty(self) -> bool {
        self.len() == 0
    }
}

/// A validated request: every field is in range and may be used to index.
///
/// A request of up to 11 pages keeps its segments as the ring gave them; a large one (more than
/// 11 pages, `DEVICE_LARGE_REQUESTS`) fills its pages from the first byte on, so its segments
/// beyond the 11 of the entry are computed from its page and sector counts, not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub op: Op,
    /// The data slot (the request's id), 0..32.
    pub slot: usize,
    /// First sector on the image.
    pub sector: u64,
    /// Data pages (segments) of the request, 0 for a flush or discard.
    nr_segments: usize,
    /// The segments of the entry (`nr_segments.min(11)` of them used).
    segments: [Segment; abi::SEGMENT_MAX],
    /// Total sectors: of the segments, or a discard's length.
    sectors: u64,
}

impl Request {
    /// The segments, in disk order: segment j (page j of the slot) starts where segment j-1
    /// ended.
    pub fn segments(&self) -> Segments<'_> {
        Segments { req: self, next: 0 }
    }

    /// Segment `j` (of data page `j` of the slot), if the request has that many.
    pub fn segment(&self, j: usize) -> Option<Segment> {
        if j >= self.nr_segments {
            return None;
        }
        if let Some(seg) = self.segments.get(j) {
            return Some(*seg);
        }
        // A large request: every page full but the last.
        let last_sect = if j + 1 == self.nr_segments {
            // Validated: (pages - 1) * 8 < sectors <= pages * 8, so this is 0..=7.
            let before = (self.nr_segments as u64 - 1) * u64::from(SECTORS_PER_PAGE);
            (self.sectors - before - 1) as u8
        } else {
            SECTORS_PER_PAGE - 1
        };
        Some(Segment {
            first_sect: 0,
            last_sect,
        })
    }

    /// Number of data pages (segments) the request uses, from page 0 of its slot.
    pub fn pages(&self) -> usize {
        self.nr_segments
    }

    /// Whether the request has more pages than an entry describes (`DEVICE_LARGE_REQUESTS`).
    pub fn is_large(&self) -> bool {
        self.nr_segments > abi::SEGMENT_MAX
    }

    /// Total sectors the request covers (a discard's range; 0 for a flush).
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Total bytes the request covers.
    pub fn bytes(&self) -> u64 {
        self.sectors() * SECTOR_SIZE
    }

    /// Byte offset of the first sector on the image.
    pub fn offset(&self) -> u64 {
        self.sector * SECTOR_SIZE
    }
}

/// The segments of a [`Request`], in order (see [`Request::segments`]).
#[derive(Debug, Clone)]
pub struct Segments<'a> {
    req: &'a Request,
    next: usize,
}

impl Iterator for Segments<'_> {
    type Item = Segment;

    fn next(&mut self) -> Option<Segment> {
        let seg = self.req.segment(self.next)?;
        self.next += 1;
        Some(seg)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.req.nr_segments.saturating_sub(self.next);
        (n, Some(n))
    }
}

impl ExactSizeIterator for Segments<'_> {}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// The id does not name a data slot.
    #[error("id {0} is not a data slot (0..{max})", max = abi::RING_SIZE)]
    BadId(u64),
    /// The operation is none of READ, WRITE, FLUSH, DISCARD, WRITE_FUA.
    #[error("unknown operation {0}")]
    UnknownOp(u8),
    /// Zero segments for a transfer, or more than 11 (more than the slot's pages, with large
    /// requests); any segment for a flush or discard.
    #[error(
        "{0} segments (1..={max} for a transfer, or up to the slot's pages with large \
         requests; 0 for a flush or discard)",
        max = abi::SEGMENT_MAX
    )]
    BadSegmentCount(u8),
    /// A large request's `nr_sectors` does not fit its pages (`(pages - 1) * 8 < nr_sectors <=
    /// pages * 8`), or a request of up to 11 pages has one (it must be 0).
    #[error("{sectors} sectors in {pages} pages (a large request's pages hold it to the last)")]
    BadSectorCount {
        /// The request's `nr_segments`.
        pages: u8,
        /// Its `nr_sectors`.
        sectors: u16,
    },
    /// A discard of no sectors, or of more than `BLKTAP_DISCARD_MAX_SECTORS`.
    #[error("discard of {0} sectors (1..={max})", max = abi::DISCARD_MAX_SECTORS)]
    BadDiscard(u64),
    /// A segment's sectors are out of the page or reversed.
    #[error("segment {index}: sectors {first}..={last} (0..=7, first <= last)")]
    BadSegment {
        /// Which segment.
        index: usize,
        /// Its first sector.
        first: u8,
        /// Its last sector.
        last: u8,
    },
    /// The sectors are not all inside the image.
    #[error("sectors {sector}+{count} beyond the image's {capacity}")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        count: u64,
        /// The image's capacity in sectors.
        capacity: u64,
    },
}

impl Invalid {
    /// The response status the request gets.
    pub fn status(self) -> i16 {
        match self {
            Invalid::UnknownOp(_) => abi::RSP_EOPNOTSUPP,
            _ => abi::RSP_ERROR,
        }
    }
}

/// The discard view of a request entry (`struct blktap_request_discard`, its first 32 bytes).
pub fn discard_view(raw: &blktap_request) -> blktap_request_discard {
    const _: () = assert!(
        std::mem::size_of::<blktap_request_discard>() <= std::mem::size_of::<blktap_request>()
    );
    const _: () = assert!(
        std::mem::align_of::<blktap_request_discard>() <= std::mem::align_of::<blktap_request>()
    );
    // SAFETY: both are plain integer structs; the discard layout is a prefix of the request's
    // 112 bytes (checked above) with no stricter alignment, and every bit pattern is valid.
    unsafe { std::ptr::read((raw as *const blktap_request).cast::<blktap_request_discard>()) }
}

/// Validates the copy `raw` of a ring entry for an image of `capacity` sectors, on a disk
/// without large requests (at most 11 pages per request).
pub fn validate(raw: &blktap_request, capacity: u64) -> Result<Request, Invalid> {
    validate_with(raw, capacity, abi::SEGMENT_MAX)
}

/// Validates the copy `raw` of a ring entry for an image of `capacity` sectors, where a request
/// may have up to `max_pages` pages: 11 for a disk without `DEVICE_LARGE_REQUESTS` (values
/// below are taken as 11), the mapping's pages per slot for one with it (values above 128 are
/// taken as 128).
pub fn validate_with(
    raw: &blktap_request,
    capacity: u64,
    max_pages: usize,
) -> Result<Request, Invalid> {
    let max_pages = max_pages.clamp(abi::SEGMENT_MAX, abi::SEGMENT_MAX_LARGE);
    let large_requests = max_pages > abi::SEGMENT_MAX;
    let slot = usize::try_from(raw.id)
        .ok()
        .filter(|&s| s < abi::RING_SIZE)
        .ok_or(Invalid::BadId(raw.id))?;
    let op = Op::from_code(raw.operation).ok_or(Invalid::UnknownOp(raw.operation))?;
    let nr_segments = usize::from(raw.nr_segments);
    let mut request = Request {
        op,
        slot,
        sector: raw.sector_number,
        nr_segments: 0,
        segments: [Segment::default(); abi::SEGMENT_MAX],
        sectors: 0,
    };
    if !op.has_data() {
        if nr_segments != 0 {
            return Err(Invalid::BadSegmentCount(raw.nr_segments));
        }
        if op == Op::Flush {
            // A flush names no range: its sector number is not used.
            request.sector = 0;
            return Ok(request);
        }
        let n = discard_view(raw).nr_sectors;
        if !(1..=abi::DISCARD_MAX_SECTORS).contains(&n) {
            return Err(Invalid::BadDiscard(n));
        }
        request.sectors = n;
    } else {
        if !(1..=max_pages).contains(&nr_segments) {
            return Err(Invalid::BadSegmentCount(raw.nr_segments));
        }
        let large = nr_segments > abi::SEGMENT_MAX;
        let bad_sectors = Invalid::BadSectorCount {
            pages: raw.nr_segments,
            sectors: raw.nr_sectors,
        };
        // Before LARGE_REQUESTS the field was padding: only a disk with it must have it 0.
        if large_requests && !large && raw.nr_sectors != 0 {
            return Err(bad_sectors);
        }
        let mut sectors = 0;
        for (index, (seg, raw_seg)) in request.segments.iter_mut().zip(&raw.seg).enumerate() {
            if index == nr_segments {
                break;
            }
            let (first, last) = (raw_seg.first_sect, raw_seg.last_sect);
            // The entry's segments of a large request are its first 11 pages, all full.
            let whole = first == 0 && last == SECTORS_PER_PAGE - 1;
            if first > last || last >= SECTORS_PER_PAGE || (large && !whole) {
                return Err(Invalid::BadSegment { index, first, last });
            }
            *seg = Segment {
                first_sect: first,
                last_sect: last,
            };
            sectors += seg.sectors();
        }
        if large {
            let n = u64::from(raw.nr_sectors);
            let pages = nr_segments as u64;
            let per_page = u64::from(SECTORS_PER_PAGE);
            if n <= (pages - 1) * per_page || n > pages * per_page {
                return Err(bad_sectors);
            }
            sectors = n;
        }
        request.nr_segments = nr_segments;
        request.sectors = sectors;
    }
    let count = request.sectors();
    let in_range = raw
        .sector_number
        .checked_add(count)
        .is_some_and(|end| end <= capacity);
    if !in_range {
        return Err(Invalid::OutOfRange {
            sector: raw.sector_number,
            count,
            capacity,
        });
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(op: u8, id: u64, sector: u64, segs: &[(u8, u8)]) -> blktap_request {
        crate::testkit::SimKernel::request(op, id, sector, segs)
    }

    #[test]
    fn accepts_well_formed_requests() {
        let r = validate(&raw(1, 31, 10, &[(0, 7), (0, 7), (2, 5)]), 100).unwrap();
        assert_eq!(r.op, Op::Write);
        assert_eq!(r.slot, 31);
        assert_eq!(r.sectors(), 20);
        assert_eq!(r.bytes(), 20 * 512);
        assert_eq!(r.offset(), 10 * 512);
        assert_eq!(r.segments().len(), 3);
        assert_eq!(r.pages(), 3);
        assert!(!r.is_large());
        assert_eq!(r.segment(2).unwrap().page_offset(), 1024);
        assert_eq!(r.segment(2).unwrap().len(), 2048);
        assert_eq!(r.segment(3), None);
        assert!(r.segments().all(|s| !s.is_empty()));
        // Exactly up to the end of the image.
        assert!(validate(&raw(0, 0, 80, &[(0, 7); 11][..]), 168).is_ok());
        assert!(validate(&raw(0, 0, 81, &[(0, 7); 11][..]), 168).is_err());
    }

    #[test]
    fn refuses_hostile_fields() {
        let cap = 1 << 20;
        assert_eq!(
            validate(&raw(0, 32, 0, &[(0, 7)]), cap),
            Err(Invalid::BadId(32))
        );
        assert_eq!(
            validate(&raw(0, u64::MAX, 0, &[(0, 7)]), cap),
            Err(Invalid::BadId(u64::MAX))
        );
        assert_eq!(
            validate(&raw(9, 0, 0, &[(0, 7)]), cap),
            Err(Invalid::UnknownOp(9))
        );
        assert_eq!(
            validate(&raw(5, 0, 0, &[(0, 7)]), cap),
            Err(Invalid::UnknownOp(5))
        );
        assert_eq!(
            validate(&raw(0, 0, 0, &[]), cap),
            Err(Invalid::BadSegmentCount(0))
        );
        let mut twelve = raw(0, 0, 0, &[(0, 7); 11][..]);
        twelve.nr_segments = 12;
        assert_eq!(validate(&twelve, cap), Err(Invalid::BadSegmentCount(12)));
        twelve.nr_segments = 255;
        assert_eq!(validate(&twelve, cap), Err(Invalid::BadSegmentCount(255)));
        assert_eq!(
            validate(&raw(0, 0, 0, &[(0, 7), (5, 4)]), cap),
            Err(Invalid::BadSegment {
                index: 1,
                first: 5,
                last: 4
            })
        );
        assert_eq!(
            validate(&raw(0, 0, 0, &[(0, 8)]), cap),
            Err(Invalid::BadSegment {
                index: 0,
                first: 0,
                last: 8
            })
        );
        assert!(matches!(
            validate(&raw(0, 0, u64::MAX, &[(0, 7)]), cap),
            Err(Invalid::OutOfRange { .. })
        ));
        assert!(matches!(
            validate(&raw(0, 0, cap, &[(0, 0)]), cap),
            Err(Invalid::OutOfRange { .. })
        ));
    }

    #[test]
    fn unknown_ops_are_not_supported_and_the_rest_are_errors() {
        assert_eq!(Invalid::UnknownOp(5).status(), -2);
        assert_eq!(Invalid::BadDiscard(0).status(), -1);
        assert_eq!(Invalid::BadId(99).status(), -1);
        assert_eq!(Invalid::BadSegmentCount(0).status(), -1);
    }

    #[test]
    fn segments_past_nr_segments_are_ignored() {
        let mut r = raw(0, 0, 0, &[(0, 7)]);
        r.seg[1].first_sect = 200;
        r.seg[1].last_sect = 1;
        assert_eq!(validate(&r, 8).unwrap().sectors(), 8);
    }

    fn discard(id: u64, sector: u64, n: u64) -> blktap_request {
        let d = blktap_request_discard {
            operation: abi::OP_DISCARD,
            id,
            sector_number: sector,
            nr_sectors: n,
            ..Default::default()
        };
        let mut r = blktap_request::default();
        // SAFETY: the discard layout is a prefix of the request's, both plain integers.
        unsafe { std::ptr::write((&mut r as *mut blktap_request).cast(), d) };
        r
    }

    #[test]
    fn flushes_carry_no_segments_and_no_range() {
        let r = validate(&raw(abi::OP_FLUSH, 4, 12345, &[]), 100).unwrap();
        assert_eq!((r.op, r.slot, r.sectors(), r.sector), (Op::Flush, 4, 0, 0));
        assert_eq!(r.segments().len(), 0);
        assert_eq!(
            validate(&raw(abi::OP_FLUSH, 4, 0, &[(0, 7)]), 100),
            Err(Invalid::BadSegmentCount(1))
        );
        assert_eq!(
            validate(&raw(abi::OP_FLUSH, 40, 0, &[]), 100),
            Err(Invalid::BadId(40))
        );
    }

    #[test]
    fn discards_are_bounded_by_the_image_and_the_maximum() {
        let cap = 1 << 22;
        let r = validate(&discard(3, 8, 2048), cap).unwrap();
        assert_eq!(
            (r.op, r.slot, r.sector, r.sectors()),
            (Op::Discard, 3, 8, 2048)
        );
        assert_eq!(r.bytes(), 1 << 20);
        assert_eq!(r.offset(), 4096);
        assert_eq!(r.segments().len(), 0);
        // The largest discard, up to the end of the image.
        let max = abi::DISCARD_MAX_SECTORS;
        assert!(validate(&discard(0, cap - max, max), cap).is_ok());
        assert!(matches!(
            validate(&discard(0, cap - max + 1, max), cap),
            Err(Invalid::OutOfRange { .. })
        ));
        assert_eq!(
            validate(&discard(0, 0, 0), cap),
            Err(Invalid::BadDiscard(0))
        );
        assert_eq!(
            validate(&discard(0, 0, max + 1), cap),
            Err(Invalid::BadDiscard(max + 1))
        );
        assert_eq!(
            validate(&discard(0, 0, u64::MAX), cap),
            Err(Invalid::BadDiscard(u64::MAX))
        );
        assert!(matches!(
            validate(&discard(0, u64::MAX - 1, 8), cap),
            Err(Invalid::OutOfRange { .. })
        ));
        let mut segs = discard(0, 0, 8);
        segs.nr_segments = 1;
        assert_eq!(validate(&segs, cap), Err(Invalid::BadSegmentCount(1)));
    }

    /// A transfer of `sectors` sectors laid out as the kernel does (from byte 0 of page 0).
    fn transfer(op: u8, id: u64, sector: u64, sectors: u16) -> blktap_request {
        crate::testkit::SimKernel::transfer(op, id, sector, sectors)
    }

    #[test]
    fn large_requests_of_12_pages() {
        let cap = 1 << 20;
        for n in 89..=96u16 {
            let r = validate_with(&transfer(abi::OP_WRITE, 5, 8, n), cap, 12).unwrap();
            assert_eq!((r.op, r.slot, r.sector), (Op::Write, 5, 8));
            assert_eq!(
                (r.pages(), r.sectors(), r.bytes()),
                (12, n.into(), u64::from(n) * 512)
            );
            assert!(r.is_large());
            let segs: Vec<_> = r.segments().collect();
            assert_eq!(segs.len(), 12);
            assert!(segs[..11]
                .iter()
                .all(|s| (s.first_sect, s.last_sect) == (0, 7)));
            assert_eq!(
                (segs[11].first_sect, segs[11].last_sect),
                (0, (n - 89) as u8)
            );
            assert_eq!(segs.iter().map(|s| s.sectors()).sum::<u64>(), u64::from(n));
            assert_eq!(r.segment(12), None);
        }
        // nr_sectors out of the pages' bounds, both sides.
        for n in [0, 1, 87, 88, 97, 98, 1024, u16::MAX] {
            let mut raw = transfer(abi::OP_READ, 0, 0, 96);
            raw.nr_sectors = n;
            assert_eq!(
                validate_with(&raw, cap, 12),
                Err(Invalid::BadSectorCount {
                    pages: 12,
                    sectors: n
                }),
                "{n}"
            );
        }
        // The entry's segments of a large request are whole pages.
        let mut raw = transfer(abi::OP_READ, 0, 0, 96);
        raw.seg[3].last_sect = 6;
        assert_eq!(
            validate_with(&raw, cap, 12),
            Err(Invalid::BadSegment {
                index: 3,
                first: 0,
                last: 6
            })
        );
        raw.seg[3] = blktap_abi::blktap_segment {
            first_sect: 1,
            last_sect: 7,
            ..Default::default()
        };
        assert!(matches!(
            validate_with(&raw, cap, 12),
            Err(Invalid::BadSegment { index: 3, .. })
        ));
        // Inside the image, to the last sector.
        assert!(validate_with(&transfer(abi::OP_READ, 0, cap - 96, 96), cap, 12).is_ok());
        assert_eq!(
            validate_with(&transfer(abi::OP_READ, 0, cap - 95, 96), cap, 12),
            Err(Invalid::OutOfRange {
                sector: cap - 95,
                count: 96,
                capacity: cap
            })
        );
    }

    #[test]
    fn large_requests_of_128_pages() {
        let cap = 1 << 20;
        let r = validate_with(&transfer(abi::OP_WRITE_FUA, 31, 0, 1024), cap, 128).unwrap();
        assert_eq!(
            (r.op, r.slot, r.pages(), r.sectors()),
            (Op::WriteFua, 31, 128, 1024)
        );
        assert_eq!(r.bytes(), 512 * 1024);
        assert_eq!(r.segments().len(), 128);
        assert!(r
            .segments()
            .all(|s| s.page_offset() == 0 && s.len() == 4096));
        let r = validate_with(&transfer(abi::OP_READ, 0, 0, 1017), cap, 128).unwrap();
        assert_eq!(r.segment(127).map(|s| s.len()), Some(512));
        assert_eq!(r.segments().map(|s| s.len()).sum::<usize>(), 1017 * 512);
        let mut it = r.segments();
        it.nth(100);
        assert_eq!(it.len(), 27);
        for n in [1016, 1025] {
            let mut raw = transfer(abi::OP_READ, 0, 0, 1024);
            raw.nr_sectors = n;
            assert_eq!(
                validate_with(&raw, cap, 128),
                Err(Invalid::BadSectorCount {
                    pages: 128,
                    sectors: n
                })
            );
        }
    }

    #[test]
    fn large_requests_beyond_the_slot_or_not_negotiated_are_refused() {
        let cap = 1 << 20;
        // More pages than the slot has.
        let raw = transfer(abi::OP_READ, 0, 0, 13 * 8);
        assert_eq!(raw.nr_segments, 13);
        assert_eq!(
            validate_with(&raw, cap, 12),
            Err(Invalid::BadSegmentCount(13))
        );
        assert!(validate_with(&raw, cap, 13).is_ok());
        let mut raw = transfer(abi::OP_READ, 0, 0, 1024);
        raw.nr_segments = 129;
        raw.nr_sectors = 129 * 8;
        assert_eq!(
            validate_with(&raw, cap, 128),
            Err(Invalid::BadSegmentCount(129))
        );
        // A limit above the largest mapping is the largest.
        assert_eq!(
            validate_with(&raw, cap, 1000),
            Err(Invalid::BadSegmentCount(129))
        );
        raw.nr_segments = 255;
        assert_eq!(
            validate_with(&raw, cap, 128),
            Err(Invalid::BadSegmentCount(255))
        );
        // Without LARGE_REQUESTS: at most 11 pages, whatever nr_sectors says.
        let raw = transfer(abi::OP_WRITE, 0, 0, 96);
        assert_eq!(validate(&raw, cap), Err(Invalid::BadSegmentCount(12)));
        assert_eq!(
            validate_with(&raw, cap, 11),
            Err(Invalid::BadSegmentCount(12))
        );
        assert_eq!(
            validate_with(&raw, cap, 0),
            Err(Invalid::BadSegmentCount(12))
        );
        // Flushes and discards stay without segments.
        let mut flush = raw;
        flush.operation = abi::OP_FLUSH;
        assert_eq!(
            validate_with(&flush, cap, 128),
            Err(Invalid::BadSegmentCount(12))
        );
    }

    #[test]
    fn requests_of_up_to_11_pages_are_unchanged_by_large_requests() {
        let cap = 1 << 20;
        let raw = transfer(abi::OP_READ, 2, 0, 88);
        assert_eq!((raw.nr_segments, raw.nr_sectors), (11, 0));
        let small = validate(&raw, cap).unwrap();
        assert_eq!(validate_with(&raw, cap, 128), Ok(small));
        assert!(!small.is_large());
        // Partial pages and offsets inside pages, as before.
        let raw = self::raw(abi::OP_WRITE, 1, 0, &[(3, 7), (0, 7), (0, 2)]);
        let r = validate_with(&raw, cap, 128).unwrap();
        assert_eq!((r.pages(), r.sectors()), (3, 16));
        // Their nr_sectors is 0 on a disk with large requests; the padding it was is ignored
        // without them.
        let mut odd = raw;
        odd.nr_sectors = 16;
        assert_eq!(
            validate_with(&odd, cap, 128),
            Err(Invalid::BadSectorCount {
                pages: 3,
                sectors: 16
            })
        );
        assert_eq!(validate(&odd, cap).map(|r| r.sectors()), Ok(16));
    }

    #[test]
    fn fua_writes_are_writes_with_segments() {
        let r = validate(&raw(abi::OP_WRITE_FUA, 1, 0, &[(0, 7), (0, 3)]), 100).unwrap();
        assert_eq!((r.op, r.sectors()), (Op::WriteFua, 12));
        assert!(r.op.writes() && r.op.has_data());
        assert_eq!(
            validate(&raw(abi::OP_WRITE_FUA, 1, 0, &[]), 100),
            Err(Invalid::BadSegmentCount(0))
        );
        assert!(matches!(
            validate(&raw(abi::OP_WRITE_FUA, 1, 99, &[(0, 7)]), 100),
            Err(Invalid::OutOfRange { .. })
        ));
        for op in [Op::Read, Op::Write, Op::Flush, Op::Discard, Op::WriteFua] {
            assert_eq!(Op::from_code(op.code()), Some(op));
        }
    }
}
