//! The tapdisk control protocols over `ctl<pid>` unix sockets: newline-delimited JSON (this
//! tapdisk's own) and the original binary `tapdisk_message_t` protocol (what a Xen host's
//! `tap-ctl` speaks). A tapdisk tells them apart by a connection's first two bytes: a
//! binary message starts with its little-endian type, below 256, so its second byte is NUL,
//! which no JSON text has.
//!
//! - [`proto`]: the JSON messages ([`CtlRequest`], [`CtlResponse`]);
//! - [`client`]: finding tapdisks and calling them ([`Client`]);
//! - [`binary`]: the binary messages and a client for them ([`binary::Call`]);
//! - [`xenstats`]: `stats` in the original tapdisk's JSON schema;
//! - [`tapdisk`]: starting tapdisks and calling them as `tap-ctl` does, over either protocol;
//! - [`lifecycle`]: a tap's whole life in one call each (`tap-ctl create`, `recover`,
//!   `destroy`, `allocate`), undoing what was done when a step fails.

pub mod binary;
pub mod client;
pub mod lifecycle;
pub mod proto;
pub mod tapdisk;
pub mod xenstats;

pub use client::{find_tapdisks, socket_path, Client};
pub use proto::{CtlRequest, CtlResponse, TapEntry, TapState, TapStats, CTL_DIR};
