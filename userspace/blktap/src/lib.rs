//! Userspace side of blktap2: talking to the kernel module the way the original tools did, and
//! serving taps.
//!
//! - [`control`]: the control device (`ALLOC_TAP`, `FREE_TAP`), found through `/proc/misc`;
//! - [`sysfs`]: the taps and attributes under `/sys/class/blktap2`, and majors in `/proc/devices`;
//! - [`ring`]: a tap's shared ring: its memory, request validation, the ring protocol, and the
//!   ring device with its ioctls;
//! - [`backend`]: image backends (`aio:`, `vhd:`, `ram:`, `null:`, `stall:`, `nbd:`);
//! - [`vhd`]: the VHD format: images, chains, creation and coalescing;
//! - [`server`]: serving a ring from a backend;
//! - [`nbd`]: the NBD protocol: an export server, and the client behind `nbd:` images;
//! - [`tap`]: a tap's life in tapdisk (open, pause, unpause, recover, close);
//! - [`ctl`]: the tapdisk control protocols (JSON lines and the original binary messages over
//!   unix sockets), and what tap-ctl does with them: starting and calling tapdisks, a tap's
//!   create, recover and destroy with rollback;
//! - [`mapping`]: owned memory mappings;
//! - `testkit` (the `testkit` feature, and this crate's tests): test doubles, a ring where the
//!   test plays the kernel and a simulated kernel;
//! - [`Error`]: one error type, with the errno a caller can act on.

pub mod backend;
pub mod control;
pub mod ctl;
pub mod error;
pub mod mapping;
pub mod nbd;
pub mod ring;
pub mod rng;
pub mod server;
pub mod sysfs;
pub mod tap;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod vhd;

pub use error::{Error, Result};
