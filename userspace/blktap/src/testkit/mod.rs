//! Test doubles, for this crate's tests and, with the `testkit` feature, other crates' tests:
//! nothing a tapdisk needs to serve a tap.
//!
//! - [`AnonRing`]: ring memory in an anonymous mapping, where the test plays the kernel;
//! - [`sim`]: a simulated kernel ([`SimKernel`]) producing requests into such a ring and playing
//!   the ring ioctls ([`SimDevice`]).

mod anon;
pub mod sim;

pub use anon::AnonRing;
pub use sim::{SimDevice, SimKernel};
