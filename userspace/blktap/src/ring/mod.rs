//! The shared ring between the kernel and tapdisk.
//!
//! - [`memory`]: the ring's memory ([`RingMemory`]) and bounds-checked access ([`SharedRing`]);
//! - [`request`]: validating the copy of a request ([`validate`]);
//! - [`protocol`]: the back end of the ring ([`BackRing`]): fetching requests, publishing
//!   responses;
//! - [`device`]: the ring device of a tap, opened and mapped ([`Ring`]), and its ioctls.
//!
//! The protocol code is generic over [`RingMemory`], so it runs the same over a real ring and
//! over memory where a test plays the kernel (`testkit::AnonRing`, with the `testkit` feature).

pub mod device;
pub mod memory;
pub mod protocol;
pub mod request;

pub use device::{DiskParams, Ring, RingDevice, EXTENSION_FLAGS};
pub use memory::{
    data_page_index, map_size, valid_pages_per_slot, RingMemory, SharedRing, ENTRY_SIZE, MAP_SIZE,
    MAX_PAGES_PER_SLOT, PAGE_SIZE, RING_MESSAGE_CLOSE, RING_MESSAGE_PAUSE, RING_MESSAGE_RESUME,
    STANDARD_PAGES_PER_SLOT,
};
pub use protocol::{BackRing, NoRequest, RingCorrupt};
pub use request::{
    discard_view, validate, validate_with, Invalid, Op, Request, Segment, Segments, SECTOR_SIZE,
};
