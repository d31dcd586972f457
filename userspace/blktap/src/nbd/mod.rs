//! The NBD (network block device) protocol, both ways: a [`server`] that exports an image on a
//! unix socket, and a [`client`] that reaches an image on an NBD server (the `nbd:` backend).
//!
//! Written here rather than taken from a crate: the one NBD protocol crate on crates.io (`nbd`,
//! 0.3) is an early sketch by its own account, has no structured replies, block status or
//! metadata contexts, serves one `Read + Write + Seek` object without trim or write-zeroes, and
//! has seen one release since 2020; `libnbd` bindings would bring a C library and are client-only;
//! `nbd-netlink` drives the kernel's NBD client, not the protocol. The facts (magic numbers,
//! codes, layouts) come from the public NBD protocol specification.
//!
//! - [`proto`]: the wire format, with bounded decoding;
//! - [`server`]: an [`Export`](server::Export) served to several clients at once;
//! - [`channel`]: an export whose I/O an event loop does, on a tap's ring server (the tap's
//!   image stack, shared with the tapdev);
//! - [`tap`]: a tap's export (`nbd<pid>.<minor>`), pumped by the loop that serves the tap;
//! - [`client`]: a synchronous connection (handshake, pipelined requests) and the URIs it takes.

pub mod channel;
pub mod client;
pub mod proto;
pub mod server;
pub mod tap;
