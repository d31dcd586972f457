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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub op: Op,
    /// The data slot (the request's id), 0..32.
    pub slot: usize,
    /// First sector on the image.
    pub sector: u64,
    nr_segments: usize,
    segments: [Segment; abi::SEGMENT_MAX],
    /// For a discard, its length in sectors.
    discard_sectors: u64,
}

impl Request {
    /// The segments, in disk order: segment j starts where segment j-1 ended.
    pub fn segments(&self) -> &[Segment] {
        &self.segments[..self.nr_segments]
    }

    /// Total sectors the request covers (a discard's range; 0 for a flush).
    pub fn sectors(&self) -> u64 {
        match self.op {
            Op::Discard => self.discard_sectors,
            _ => self.segments().iter().map(|s| s.sectors()).sum(),
        }
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

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// The id does not name a data slot.
    #[error("id {0} is not a data slot (0..{max})", max = abi::RING_SIZE)]
    BadId(u64),
    /// The operation is none of READ, WRITE, FLUSH, DISCARD, WRITE_FUA.
    #[error("unknown operation {0}")]
    UnknownOp(u8),
    /// Zero segments, or more than 11, for a transfer; any segment for a flush or discard.
    #[error("{0} segments (1..={max} for a transfer, 0 for a flush or discard)", max = abi::SEGMENT_MAX)]
    BadSegmentCount(u8),
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

/// Validates the copy `raw` of a ring entry for an image of `capacity` sectors.
pub fn validate(raw: &blktap_request, capacity: u64) -> Result<Request, Invalid> {
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
        discard_sectors: 0,
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
        request.discard_sectors = n;
    } else {
        if !(1..=abi::SEGMENT_MAX).contains(&nr_segments) {
            return Err(Invalid::BadSegmentCount(raw.nr_segments));
        }
        for (index, (seg, raw_seg)) in request.segments.iter_mut().zip(&raw.seg).enumerate() {
            if index == nr_segments {
                break;
            }
            let (first, last) = (raw_seg.first_sect, raw_seg.last_sect);
            if first > last || last >= SECTORS_PER_PAGE {
                return Err(Invalid::BadSegment { index, first, last });
            }
            *seg = Segment {
                first_sect: first,
                last_sect: last,
            };
        }
        request.nr_segments = nr_segments;
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
        assert_eq!(r.segments()[2].page_offset(), 1024);
        assert_eq!(r.segments()[2].len(), 2048);
        assert!(r.segments().iter().all(|s| !s.is_empty()));
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
        assert!(r.segments().is_empty());
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
        assert!(r.segments().is_empty());
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
