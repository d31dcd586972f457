//! The tapdisk control protocol: newline-delimited JSON over `ctl<pid>` unix sockets.
//!
//! - [`proto`]: the messages ([`CtlRequest`], [`CtlResponse`]);
//! - [`client`]: finding tapdisks and calling them ([`Client`]).

pub mod client;
pub mod proto;

pub use client::{find_tapdisks, socket_path, Client};
pub use proto::{CtlRequest, CtlResponse, TapEntry, TapState, TapStats, CTL_DIR};
