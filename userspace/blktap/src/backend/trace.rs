//! `trace:IMAGE`: every request logged, then passed on to `IMAGE` unchanged (the 2005 seed's
//! `blkdump`). One line per request when it completes, at info level on the log target `trace`
//! (tapdisk's log: `--log FILE`, or syslog):
//!
//! ```text
//! trace aio:/srv/base.img: write sector 2048 len 8 latency 131us ok
//! trace aio:/srv/base.img: flush latency 2210us ok
//! trace aio:/srv/base.img: read sector 16 len 88 latency 75us error EIO
//! ```
//!
//! `sector` and `len` are in 512-byte sectors; discards show their range as writes do.

use rustc_hash::FxHashMap;
use std::os::fd::BorrowedFd;
use std::time::Instant;

use super::layer::{LayerStats, Lower};
use super::{Backend, Completion, Extent, Features, ImageKind, Io};
use crate::ring::{Op, SECTOR_SIZE};
use crate::Result;

/// A layer that logs every request it passes to the layer below.
#[derive(Debug)]
pub struct TraceLayer {
    lower: Lower,
    /// What the lines name: the layer below's `type:path`.
    image: String,
    /// Per tag: the operation, its first sector and length in sectors, and when it was queued.
    started: FxHashMap<u64, (Op, u64, u64, Instant)>,
    scratch: Vec<Completion>,
}

impl TraceLayer {
    /// Traces `lower`, named `image` in the lines.
    pub fn new(lower: Lower, image: String) -> Self {
        Self {
            lower,
            image,
            started: FxHashMap::default(),
            scratch: Vec::new(),
        }
    }

    fn log(&mut self, out: &mut Vec<Completion>) {
        for c in self.scratch.drain(..) {
            if let Some((op, sector, len, t)) = self.started.remove(&c.tag) {
                let us = t.elapsed().as_micros();
                let result = match c.result {
                    Ok(()) => "ok".to_string(),
                    Err(e) => format!("error {e}"),
                };
                let name = match op {
                    Op::Read => "read",
                    Op::Write => "write",
                    Op::WriteFua => "write-fua",
                    Op::Flush => "flush",
                    Op::Discard => "discard",
                };
                if op == Op::Flush {
                    log::info!(target: "trace", "trace {}: {name} latency {us}us {result}", self.image);
                } else {
                    log::info!(target: "trace",
                        "trace {}: {name} sector {sector} len {len} latency {us}us {result}",
                        self.image);
                }
            }
            out.push(c);
        }
    }
}

impl Backend for TraceLayer {
    fn kind(&self) -> ImageKind {
        ImageKind::Trace
    }

    fn size(&self) -> u64 {
        self.lower.backend().size()
    }

    unsafe fn queue(&mut self, io: Io) {
        self.started.insert(
            io.tag,
            (
                io.op,
                io.offset / SECTOR_SIZE,
                io.len() / SECTOR_SIZE,
                Instant::now(),
            ),
        );
        // SAFETY: the caller keeps the contract of `queue`, which is the lower layer's.
        unsafe { self.lower.queue(io) }
    }

    fn submit(&mut self) -> Result<()> {
        self.lower.submit()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        let mut got = std::mem::take(&mut self.scratch);
        self.lower.reap(&mut got);
        self.scratch = got;
        self.log(out);
    }

    fn in_flight(&self) -> usize {
        self.lower.in_flight()
    }

    fn drain(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        let mut got = std::mem::take(&mut self.scratch);
        let r = self.lower.drain(&mut got);
        self.scratch = got;
        self.log(out);
        r
    }

    fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        self.lower.event_fd()
    }

    fn features(&self) -> Features {
        self.lower.backend().features()
    }

    fn allocated_bytes(&self) -> Option<u64> {
        self.lower.backend().allocated_bytes()
    }

    fn block_status(&self, offset: u64, len: u64) -> Option<Vec<Extent>> {
        self.lower.backend().block_status(offset, len)
    }

    fn layers(&self, out: &mut Vec<LayerStats>) {
        self.lower.layers(out);
    }
}
