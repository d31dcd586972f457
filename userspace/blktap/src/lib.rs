//! Userspace side of blktap2: talking to the kernel module the way the original tools did.
//!
//! - [`control`]: the control device (`ALLOC_TAP`, `FREE_TAP`), found through `/proc/misc`;
//! - [`sysfs`]: the taps and attributes under `/sys/class/blktap2`, and majors in `/proc/devices`;
//! - [`Error`]: one error type, with the errno a caller can act on.

pub mod control;
pub mod error;
pub mod sysfs;

pub use error::{Error, Result};
