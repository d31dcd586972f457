//! The fuzzer proper: a run's state and main loop. The operations, the model of the driver's
//! state and the expected answers are in the modules below:
//!
//! - [`model`]: the model of the driver's state, and the answers a call may give;
//! - [`ops`]: the operations and their frequencies;
//! - [`gen`]: generators of minors, commands, pointer arguments and device nodes;
//! - [`control`]: the control device's operations;
//! - [`ring_files`]: opening, closing and mapping ring files;
//! - [`ring_ioctls`]: the ring's ioctls and poll;
//! - [`disks`]: opening and closing tapdevs;
//! - [`processes`]: forked children and fixed sequences;
//! - [`report`]: checking answers, and what a run did;
//! - [`scratch`]: volatile accesses to the scratch pages and ring mappings.

mod control;
mod disks;
mod gen;
mod model;
mod ops;
mod processes;
mod report;
mod ring_files;
mod ring_ioctls;
mod scratch;

use std::collections::{BTreeMap, BTreeSet};
use std::mem::size_of;

use anyhow::{bail, Context};
use blktap_abi as abi;
use libc::{
    EACCES, EAGAIN, EBUSY, EEXIST, EFAULT, EINVAL, EIO, ENODEV, ENOMEM, ENOTTY, ENXIO, EOVERFLOW,
    EPERM, EROFS,
};

use crate::sys::{self, errno_name};
use blktap::rng::Rng;

use model::{code, vfs_cmd, Allowed, Arg, ArgKind, Map, RingFile, Tap, Tapdev};
use ops::{Op, WEIGHTS};
pub use report::Report;
use scratch::{read_bytes, read_u32, read_u64, write_bytes, write_u32, write_u64};

const PAGE: u64 = 4096;
/// The ring mapping: 1 + 32 * 11 pages.
const MAP_LEN: u64 = abi::MMAP_PAGES as u64 * PAGE;
const RING_SIZE: u32 = abi::RING_SIZE as u32;

const ALLOC_TAP: u32 = abi::IOCTL_ALLOC_TAP;
const FREE_TAP: u32 = abi::IOCTL_FREE_TAP;
const RESPOND: u32 = abi::IOCTL_RESPOND;
const CREATE_COMPAT: u32 = abi::IOCTL_CREATE_DEVICE_COMPAT;
const REMOVE: u32 = abi::IOCTL_REMOVE_DEVICE;
const CREATE: u32 = abi::IOCTL_CREATE_DEVICE;
/// Extensions the kernel is about to implement (include/uapi/blktap.h): any answer is allowed.
const PAUSE: u32 = 204;
const RESUME: u32 = 206;
const CONTROL_CMDS: [u32; 2] = [ALLOC_TAP, FREE_TAP];
const RING_CMDS: [u32; 6] = [RESPOND, CREATE_COMPAT, PAUSE, RESUME, REMOVE, CREATE];

const DEVICE_RO: u64 = abi::DEVICE_RO;
/// Flags the kernel will negotiate (FLUSH, DISCARD, FUA, RECOVERY, STAGED_WRITES, REQ_EVENT,
/// LARGE_REQUESTS: the last is EINVAL on the fuzzer's standard mappings): OK or EINVAL.
const NEW_FLAGS: u64 = 0x04 | 0x08 | 0x20 | 0x40 | 0x80 | 0x100 | 0x200;

const INFO_LEN: u64 = size_of::<abi::blktap_info>() as u64;
const DEVICE_INFO_LEN: u64 = size_of::<abi::blktap_device_info>() as u64;
const PARAMS_LEN: u64 = size_of::<abi::blktap2_params>() as u64;
const _: () = assert!(INFO_LEN == 12 && DEVICE_INFO_LEN == 56 && PARAMS_LEN == 272);

// The shared ring page (struct blktap_sring).
const RSP_PROD: u64 = 8;
const MSG: u64 = 16;
const ENTRIES: u64 = 64;
const ENTRY: u64 = 112;

const MAX_MINORS: u64 = abi::MAX_MINORS as u64;
const MAX_TAPDEV_FDS: usize = 16;
const MAX_CONTROL_FDS: usize = 4;
const POLLIN_RDNORM: i64 = (libc::POLLIN | libc::POLLRDNORM) as i64;

/// What a run is asked to do.
pub struct Config {
    pub seed: u64,
    pub calls: u64,
    pub max_taps: usize,
    pub verbose: bool,
    pub fail_fast: bool,
    pub mremap: bool,
}

struct Fuzzer<'c> {
    cfg: &'c Config,
    rng: Rng,
    calls: u64,
    op_no: u64,
    what: String,
    /// When the last call answered (to time each call, with the model's work in between).
    last_answer: std::time::Instant,
    report: Report,
    ctl: Vec<i32>,
    ring_major: u32,
    bdev_major: u32,
    taps: BTreeMap<u32, Tap>,
    files: Vec<RingFile>,
    tapdevs: Vec<Tapdev>,
    disk_gen: u64,
    /// Scratch: page 0 read-write, 1 guard, 2 read-only, 3 guard.
    scratch: u64,
    /// Two slots of MAP_LEN for MAP_FIXED and mremap targets, each with a guard page after it.
    reserve: u64,
    slot_used: [bool; 2],
    node_dir: String,
    nodes: BTreeSet<(bool, u32)>,
}

/// Runs the fuzzer.
pub fn run(cfg: &Config) -> anyhow::Result<Report> {
    let mut f = Fuzzer::new(cfg)?;
    let result = f.main_loop();
    f.cleanup();
    result?;
    Ok(f.report)
}

impl<'c> Fuzzer<'c> {
    fn new(cfg: &'c Config) -> anyhow::Result<Self> {
        let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        let scratch = sys::mmap(0, 4 * PAGE, libc::PROT_NONE, anon, -1, 0)
            .map_err(|e| anyhow::anyhow!("cannot map scratch pages: {}", errno_name(e)))?
            as u64;
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        sys::mprotect(scratch, PAGE, rw)
            .and_then(|_| sys::mprotect(scratch + 2 * PAGE, PAGE, rw))
            .map_err(|e| anyhow::anyhow!("mprotect: {}", errno_name(e)))?;
        // The read-only page holds a valid device info at 0 and, read as blktap2_params, a valid
        // capacity and sector size at 256.
        let ro = scratch + 2 * PAGE;
        write_u64(ro, 2048);
        write_u32(ro + 8, 512);
        write_u32(ro + 12, 512);
        write_u64(ro + 256, 4096);
        write_u64(ro + 264, 512);
        sys::mprotect(ro, PAGE, libc::PROT_READ)
            .map_err(|e| anyhow::anyhow!("mprotect: {}", errno_name(e)))?;
        let reserve = sys::mmap(0, 2 * (MAP_LEN + PAGE), libc::PROT_NONE, anon, -1, 0)
            .map_err(|e| anyhow::anyhow!("cannot reserve: {}", errno_name(e)))?
            as u64;
        let node_dir = format!("/tmp/blktap-fuzz-{}", std::process::id());
        std::fs::create_dir_all(&node_dir).with_context(|| format!("cannot create {node_dir}"))?;
        let ctl = sys::open(abi::CONTROL_PATH, libc::O_RDWR)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {}", abi::CONTROL_PATH, errno_name(e)))?
            as i32;
        Ok(Self {
            cfg,
            rng: Rng::new(cfg.seed),
            calls: 0,
            op_no: 0,
            what: String::new(),
            last_answer: std::time::Instant::now(),
            report: Report {
                slow: 0,
                seed: cfg.seed,
                calls: 0,
                ops: BTreeMap::new(),
                answers: BTreeMap::new(),
                failures: Vec::new(),
            },
            ctl: vec![ctl],
            ring_major: 0,
            bdev_major: 0,
            taps: BTreeMap::new(),
            files: Vec::new(),
            tapdevs: Vec::new(),
            disk_gen: 0,
            scratch,
            reserve,
            slot_used: [false; 2],
            node_dir,
            nodes: BTreeSet::new(),
        })
    }

    fn main_loop(&mut self) -> anyhow::Result<()> {
        // The first tap tells the majors, for the nodes made in the node directory.
        self.what = "initial alloc".into();
        let info = self.scratch;
        if !self.alloc_at(
            self.ctl[0],
            u64::from(ALLOC_TAP),
            Arg {
                value: info,
                kind: ArgKind::Writable(PAGE),
            },
        ) {
            bail!("the first ALLOC_TAP failed");
        }
        let total: u64 = WEIGHTS.iter().map(|w| w.1).sum();
        let start = std::time::Instant::now();
        let mut next_progress = 10_000;
        while self.calls < self.cfg.calls {
            if self.calls >= next_progress {
                next_progress += 10_000;
                println!(
                    "blktap-fuzz: {} calls, {} ops, {} taps, {:.1} s",
                    self.calls,
                    self.op_no,
                    self.taps.len(),
                    start.elapsed().as_secs_f64()
                );
            }
            if self.cfg.fail_fast && !self.report.failures.is_empty() {
                break;
            }
            let mut r = self.rng.below(total);
            let mut op = Op::CtlIoctl;
            for (o, w) in WEIGHTS {
                if r < w {
                    op = o;
                    break;
                }
                r -= w;
            }
            if op == Op::Mremap && !self.cfg.mremap {
                continue;
            }
            self.op_no += 1;
            self.what = op.name().to_string();
            let t = std::time::Instant::now();
            self.last_answer = t;
            self.step(op);
            let entry = self.report.ops.entry(op.name()).or_default();
            entry.0 += 1;
            entry.1 += t.elapsed();
        }
        Ok(())
    }

    fn step(&mut self, op: Op) {
        match op {
            Op::CtlIoctl => self.op_ctl_ioctl(),
            Op::Alloc => self.op_alloc(),
            Op::Free => self.op_free(),
            Op::RingOpen => self.op_ring_open(),
            Op::RingClose => self.op_ring_close(),
            Op::Mmap => self.op_mmap(),
            Op::Munmap => self.op_munmap(),
            Op::Mprotect => self.op_mprotect(),
            Op::Mremap => self.op_mremap(),
            Op::RingIoctl => self.op_ring_ioctl(),
            Op::Create => self.op_create(false),
            Op::CreateCompat => self.op_create(true),
            Op::Remove => self.op_remove(),
            Op::Respond => self.op_respond(),
            Op::Poll => self.op_poll(),
            Op::TapdevOpen => self.op_tapdev_open(),
            Op::TapdevClose => self.op_tapdev_close(),
            Op::Fork => self.op_fork(),
            Op::Control => self.op_control(),
            Op::Sysfs => self.op_sysfs(),
            Op::Lifecycle => self.op_lifecycle(),
        }
    }

    fn ctl_fd(&mut self) -> i32 {
        let i = self.rng.below(self.ctl.len() as u64) as usize;
        self.ctl[i]
    }

    fn lowest_free(&self) -> u32 {
        (0..).find(|m| !self.taps.contains_key(m)).unwrap_or(0)
    }

    fn ring_open(&self, minor: u32) -> bool {
        self.files.iter().any(|f| f.minor == minor)
    }

    fn pick_file(&mut self, need_fd: bool, need_map: bool) -> Option<usize> {
        let idx: Vec<usize> = (0..self.files.len())
            .filter(|&i| {
                (!need_fd || self.files[i].fd.is_some())
                    && (!need_map || self.files[i].map.is_some())
            })
            .collect();
        if idx.is_empty() {
            None
        } else {
            Some(self.rng.pick(&idx))
        }
    }

    /// Unmaps, closes and frees everything; each step must succeed.
    fn cleanup(&mut self) {
        self.what = "cleanup".into();
        for t in std::mem::take(&mut self.tapdevs) {
            let got = code(sys::close(t.fd));
            self.expect("close(tapdev)", got, &[0]);
        }
        while let Some(f) = self.files.pop() {
            if let Some(m) = f.map {
                let got = code(sys::munmap(m.addr, MAP_LEN));
                self.expect(&format!("munmap(ring {})", f.minor), got, &[0]);
            }
            if let Some(fd) = f.fd {
                let got = code(sys::close(fd));
                self.expect(&format!("close(ring {})", f.minor), got, &[0]);
            }
        }
        let ctl = self.ctl[0];
        for minor in std::mem::take(&mut self.taps).into_keys() {
            let got = code(sys::ioctl(ctl, u64::from(FREE_TAP), u64::from(minor)));
            self.expect(&format!("FREE_TAP({minor})"), got, &[0]);
        }
        for fd in std::mem::take(&mut self.ctl) {
            let _ = sys::close(fd);
        }
        let _ = std::fs::remove_dir_all(&self.node_dir);
        let left: Vec<String> = std::fs::read_dir(abi::SYSFS_CLASS)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("blktap!"))
                    .collect()
            })
            .unwrap_or_default();
        if !left.is_empty() {
            self.fail(format!("taps left after freeing all: {left:?}"));
        }
        self.report.calls = self.calls;
    }
}
