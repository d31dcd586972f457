//! The fuzzer proper: operations, the model of the driver's state, and the expected answers.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::mem::size_of;

use anyhow::{bail, Context};
use blktap_abi as abi;
use libc::{
    EACCES, EAGAIN, EBUSY, EEXIST, EFAULT, EINVAL, EIO, ENODEV, ENOMEM, ENOTTY, ENXIO, EOVERFLOW,
    EPERM, EROFS,
};

use crate::sys::{self, errno_name, SysResult};
use blktap::rng::Rng;

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
/// Flags the kernel will negotiate (FLUSH, DISCARD, FUA, RECOVERY): OK or EINVAL.
const NEW_FLAGS: u64 = 0x04 | 0x08 | 0x20 | 0x40;

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

/// What a run did.
pub struct Report {
    pub seed: u64,
    pub calls: u64,
    pub ops: BTreeMap<&'static str, (u64, std::time::Duration)>,
    pub answers: BTreeMap<String, u64>,
    pub failures: Vec<String>,
    /// Calls that took half a second or more.
    pub slow: u64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "blktap-fuzz: operations:")?;
        for (op, (n, t)) in &self.ops {
            writeln!(f, "  {op:<16} {n:>7} {:>8.1} ms", t.as_secs_f64() * 1000.0)?;
        }
        let answers: Vec<String> = self
            .answers
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        writeln!(f, "blktap-fuzz: answers: {}", answers.join(", "))?;
        writeln!(
            f,
            "blktap-fuzz: seed {}, {} calls, {} slow calls, {} mismatches",
            self.seed,
            self.calls,
            self.slow,
            self.failures.len()
        )
    }
}

/// An allowed set of answers: 0 is success, others errnos; empty allows anything.
type Allowed = Vec<i32>;

fn code(r: SysResult) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e,
    }
}

/// How an argument was made, which decides whether the kernel may read or write through it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ArgKind {
    /// Not a valid user address (NULL, small, -1, kernel half, non-canonical, guard page).
    Bad,
    /// In the read-write scratch page, with this many bytes before the guard page.
    Writable(u64),
    /// In the read-only scratch page, with this many bytes before the guard page.
    ReadOnly(u64),
}

#[derive(Clone, Copy)]
struct Arg {
    value: u64,
    kind: ArgKind,
}

impl Arg {
    fn readable(&self, len: u64) -> bool {
        matches!(self.kind, ArgKind::Writable(room) | ArgKind::ReadOnly(room) if room >= len)
    }

    fn writable(&self, len: u64) -> bool {
        matches!(self.kind, ArgKind::Writable(room) if room >= len)
    }
}

#[derive(Clone, Copy, Debug)]
struct Map {
    addr: u64,
    prot: i32,
    private: bool,
    /// Which reservation slot it sits in, if placed with MAP_FIXED or moved by mremap.
    slot: Option<usize>,
}

/// An open ring file (an open file description of a ring node): alive while its fd is open or
/// its mapping exists.
#[derive(Debug)]
struct RingFile {
    minor: u32,
    fd: Option<i32>,
    readable: bool,
    writable: bool,
    map: Option<Map>,
    mapped_once: bool,
    /// The kernel's `rsp_cons`, when known.
    rsp_cons: Option<u32>,
}

impl RingFile {
    /// The kernel sees this process as the ring's mapper.
    fn ours(&self) -> bool {
        self.map.is_some()
    }
}

#[derive(Debug, Default)]
struct Tap {
    /// Generation of the tap's disk, if it has one.
    disk: Option<u64>,
    read_only: bool,
    /// The disk was made with BLKTAP_DEVICE_RECOVERY: it outlives the ring's file.
    recovery: bool,
}

struct Tapdev {
    fd: i32,
    minor: u32,
    gen: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    CtlIoctl,
    Alloc,
    Free,
    RingOpen,
    RingClose,
    Mmap,
    Munmap,
    Mprotect,
    Mremap,
    RingIoctl,
    Create,
    CreateCompat,
    Remove,
    Respond,
    Poll,
    TapdevOpen,
    TapdevClose,
    Fork,
    Control,
    Sysfs,
    Lifecycle,
}

/// Relative frequencies. Ops that allocate taps, disks or ring pages are slow under TCG (ms
/// each), so they are rarer than the cheap ioctls; the mix still changes state often.
const WEIGHTS: [(Op, u64); 21] = [
    (Op::CtlIoctl, 200),
    (Op::Alloc, 6),
    (Op::Free, 8),
    (Op::RingOpen, 20),
    (Op::RingClose, 5),
    (Op::Mmap, 20),
    (Op::Munmap, 6),
    (Op::Mprotect, 5),
    (Op::Mremap, 4),
    (Op::RingIoctl, 250),
    (Op::Create, 25),
    (Op::CreateCompat, 8),
    (Op::Remove, 8),
    (Op::Respond, 300),
    (Op::Poll, 100),
    (Op::TapdevOpen, 6),
    (Op::TapdevClose, 6),
    (Op::Fork, 1),
    (Op::Control, 2),
    (Op::Sysfs, 5),
    (Op::Lifecycle, 1),
];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::CtlIoctl => "ctl-ioctl",
            Op::Alloc => "alloc",
            Op::Free => "free",
            Op::RingOpen => "ring-open",
            Op::RingClose => "ring-close",
            Op::Mmap => "mmap",
            Op::Munmap => "munmap",
            Op::Mprotect => "mprotect",
            Op::Mremap => "mremap",
            Op::RingIoctl => "ring-ioctl",
            Op::Create => "create",
            Op::CreateCompat => "create-compat",
            Op::Remove => "remove",
            Op::Respond => "respond",
            Op::Poll => "poll",
            Op::TapdevOpen => "tapdev-open",
            Op::TapdevClose => "tapdev-close",
            Op::Fork => "fork",
            Op::Control => "control-fds",
            Op::Sysfs => "sysfs",
            Op::Lifecycle => "lifecycle",
        }
    }
}

/// Commands the VFS answers itself for some files (generic file ioctls): any answer.
fn vfs_cmd(cmd: u32) -> bool {
    let ty = (cmd >> 8) & 0xff;
    cmd == 2 || matches!(ty, 0x54 | 0x58 | 0x66 | 0x94 | 0x15)
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

    // ---- bookkeeping -------------------------------------------------------------------------

    /// Checks an answer against the allowed set; returns true if it was allowed.
    fn expect(&mut self, call: &str, got: i32, allowed: &[i32]) -> bool {
        self.calls += 1;
        let now = std::time::Instant::now();
        let took = now.duration_since(self.last_answer);
        self.last_answer = now;
        if took >= std::time::Duration::from_millis(500) {
            // Nothing the fuzzer does should block: report the call (a hang shows here first).
            println!(
                "SLOW op #{} [{}] {call} -> {} took {:.2} s",
                self.op_no,
                self.what,
                errno_name(got),
                took.as_secs_f64()
            );
            self.report.slow += 1;
        }
        *self.report.answers.entry(errno_name(got)).or_default() += 1;
        let ok = allowed.is_empty() || allowed.contains(&got);
        if self.cfg.verbose {
            println!(
                "#{} call {} [{}] {call} -> {}{}",
                self.op_no,
                self.calls,
                self.what,
                errno_name(got),
                if ok { "" } else { "  <-- MISMATCH" }
            );
        }
        if !ok {
            let names: Vec<String> = allowed.iter().map(|&c| errno_name(c)).collect();
            self.record(format!(
                "op #{} call {} [{}] {call}: got {}, expected {}",
                self.op_no,
                self.calls,
                self.what,
                errno_name(got),
                names.join("|")
            ));
        }
        ok
    }

    fn fail(&mut self, msg: String) {
        self.record(format!(
            "op #{} call {} [{}] {msg}",
            self.op_no, self.calls, self.what
        ));
    }

    /// Prints a mismatch at once (a run cut short by a hang still shows it) and keeps it.
    fn record(&mut self, line: String) {
        if self.report.failures.len() < 50 {
            println!("MISMATCH {line}");
        }
        self.report.failures.push(line);
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

    fn slot_addr(&self, slot: usize) -> u64 {
        self.reserve + slot as u64 * (MAP_LEN + PAGE)
    }

    /// Puts a slot's reservation back (after a mapping there went away or a MAP_FIXED failed).
    fn rereserve(&mut self, slot: usize) {
        let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
        let addr = self.slot_addr(slot);
        if let Err(e) = sys::mmap(addr, MAP_LEN, libc::PROT_NONE, anon, -1, 0) {
            self.fail(format!("cannot re-reserve slot {slot}: {}", errno_name(e)));
        }
        self.slot_used[slot] = false;
    }

    /// A file's mapping went away: the kernel fails its requests; if its fd is closed too, the
    /// file is gone, and with it the disk.
    fn unmapped(&mut self, i: usize) {
        if let Some(map) = self.files[i].map.take() {
            if let Some(slot) = map.slot {
                self.rereserve(slot);
            }
        }
        self.files[i].rsp_cons = None;
        self.maybe_release(i);
    }

    fn maybe_release(&mut self, i: usize) {
        let f = &self.files[i];
        if f.fd.is_none() && f.map.is_none() {
            let minor = f.minor;
            self.files.remove(i);
            if let Some(tap) = self.taps.get_mut(&minor) {
                if !tap.recovery {
                    tap.disk = None;
                }
            }
        }
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

    /// A minor: mostly allocated ones, also free, random and out-of-range ones.
    fn gen_minor(&mut self) -> u64 {
        let allocated: Vec<u32> = self.taps.keys().copied().collect();
        match self.rng.below(20) {
            0..=10 if !allocated.is_empty() => u64::from(self.rng.pick(&allocated)),
            0..=14 => self.rng.below(16),
            15..=16 => self.rng.below(MAX_MINORS),
            _ => self.rng.pick(&[
                MAX_MINORS - 1,
                MAX_MINORS,
                MAX_MINORS + 1,
                65535,
                (1 << 20) - 1,
                u64::from(u32::MAX),
                1 << 32,
                (1 << 32) | 1,
                u64::MAX,
                i64::MIN as u64,
            ]),
        }
    }

    /// A command: the node's own, the other node's, small, random, or with high bits set.
    fn gen_cmd(&mut self, own: &[u32]) -> u64 {
        let all: Vec<u32> = CONTROL_CMDS
            .iter()
            .chain(RING_CMDS.iter())
            .copied()
            .collect();
        match self.rng.below(20) {
            0..=7 => u64::from(self.rng.pick(own)),
            8..=9 => u64::from(self.rng.pick(&all)),
            10..=14 => self.rng.below(301),
            15..=17 => self.rng.next_u64() & 0xffff_ffff,
            // The kernel takes the command as an unsigned int: the high half is dropped.
            _ => u64::from(self.rng.pick(own)) | ((self.rng.next_u64() | 1) << 32),
        }
    }

    /// A pointer argument, good or bad.
    fn gen_arg(&mut self) -> Arg {
        let bad = |value| Arg {
            value,
            kind: ArgKind::Bad,
        };
        match self.rng.below(24) {
            0 => bad(0),
            1 => bad(1 + self.rng.below(4096)),
            2 => bad(u64::MAX),
            3 => bad(0xffff_8880_0000_0000 + self.rng.below(1 << 30) * 8),
            4 => bad(0xffff_ffff_8100_0000 + self.rng.below(1 << 20)),
            5 => bad(0xffff_ffff_ffff_f000 + self.rng.below(4096)),
            6 => bad(0x8000_0000_0000_0000 | self.rng.below(1 << 40)),
            7 => bad(0x0000_8000_0000_0000 - self.rng.below(4096)),
            8 => bad(self.scratch + PAGE + self.rng.below(PAGE)),
            9 => bad(self.scratch + 3 * PAGE + self.rng.below(PAGE)),
            10 => bad(self.rng.next_u64() | (1 << 63)),
            11..=12 => {
                // Straddling the guard page: the first bytes are readable, the rest not.
                let back = 1 + self.rng.below(300);
                Arg {
                    value: self.scratch + PAGE - back,
                    kind: ArgKind::Writable(back),
                }
            }
            13 => {
                let off = self.rng.below(PAGE - 272);
                Arg {
                    value: self.scratch + 2 * PAGE + off,
                    kind: ArgKind::ReadOnly(PAGE - off),
                }
            }
            14..=15 => Arg {
                value: self.scratch + 2 * PAGE,
                kind: ArgKind::ReadOnly(PAGE),
            },
            _ => {
                let off = self.rng.below(PAGE - 272);
                Arg {
                    value: self.scratch + off,
                    kind: ArgKind::Writable(PAGE - off),
                }
            }
        }
    }

    /// Fills random bytes into the writable part of an argument.
    fn scribble(&mut self, arg: Arg) {
        if let ArgKind::Writable(room) = arg.kind {
            let n = room.min(512);
            let mut buf = vec![0u8; n as usize];
            self.rng.fill(&mut buf);
            write_bytes(arg.value, &buf);
        }
    }

    fn ring_node(&mut self, minor: u32) -> String {
        self.node(false, minor)
    }

    fn node(&mut self, block: bool, minor: u32) -> String {
        let path = format!(
            "{}/{}{minor}",
            self.node_dir,
            if block { "tapdev" } else { "blktap" }
        );
        if self.nodes.insert((block, minor)) {
            let major = if block {
                self.bdev_major
            } else {
                self.ring_major
            };
            if let Err(e) = sys::mknod(&path, block, major, minor) {
                self.fail(format!("mknod {path}: {}", errno_name(e)));
            }
        }
        path
    }

    // ---- the control device ------------------------------------------------------------------

    /// ALLOC_TAP through `arg`; returns true if a tap was allocated.
    fn alloc_at(&mut self, fd: i32, cmd: u64, arg: Arg) -> bool {
        let full = self.taps.len() >= self.cfg.max_taps;
        let arg = if full && arg.writable(INFO_LEN) {
            Arg {
                value: 0,
                kind: ArgKind::Bad,
            }
        } else {
            arg
        };
        let expected = self.lowest_free();
        if arg.writable(INFO_LEN) {
            write_bytes(arg.value, &[0xa5; 12]);
        }
        let got = code(sys::ioctl(fd, cmd, arg.value));
        let call = format!(
            "ALLOC_TAP(cmd {cmd:#x}, arg {:#x} {:?})",
            arg.value, arg.kind
        );
        if !arg.writable(INFO_LEN) {
            // A bad pointer: EFAULT, and the tap is freed again (the next ALLOC_TAP checks that
            // the minor was not leaked).
            self.expect(&call, got, &[EFAULT]);
            return false;
        }
        if !self.expect(&call, got, &[0]) || got != 0 {
            return false;
        }
        let ring_major = read_u32(arg.value);
        let bdev_major = read_u32(arg.value + 4);
        let minor = read_u32(arg.value + 8);
        if self.ring_major == 0 {
            self.ring_major = ring_major;
            self.bdev_major = bdev_major;
        }
        if (ring_major, bdev_major) != (self.ring_major, self.bdev_major) || minor != expected {
            self.fail(format!(
                "ALLOC_TAP answered majors {ring_major}/{bdev_major} minor {minor}, expected \
                 {}/{} minor {expected} (the lowest free)",
                self.ring_major, self.bdev_major
            ));
        }
        self.taps.insert(minor, Tap::default());
        true
    }

    /// FREE_TAP of `value`.
    fn free_value(&mut self, fd: i32, cmd: u64, value: u64) {
        let allowed = if value >= MAX_MINORS {
            vec![EINVAL]
        } else if !self.taps.contains_key(&(value as u32)) {
            vec![ENODEV]
        } else if self.ring_open(value as u32) {
            vec![EBUSY]
        } else if self.taps[&(value as u32)].disk.is_some() {
            // A recovery disk left without a ring: removed, or EBUSY while a tapdev is open.
            vec![0, EBUSY]
        } else {
            vec![0]
        };
        let got = code(sys::ioctl(fd, cmd, value));
        self.expect(&format!("FREE_TAP({value:#x})"), got, &allowed);
        if got == 0 {
            self.taps.remove(&(value as u32));
        }
    }

    fn op_ctl_ioctl(&mut self) {
        let fd = self.ctl_fd();
        // ALLOC_TAP and FREE_TAP are slow (a class device each): rarer here than the ring's.
        let cmd = if self.rng.chance(1, 2) {
            self.gen_cmd(&CONTROL_CMDS)
        } else {
            let small = self.rng.below(301);
            let random = u64::from(self.rng.next_u64() as u32);
            self.rng.pick(&[small, random])
        };
        match cmd as u32 {
            ALLOC_TAP => {
                let arg = self.gen_arg();
                self.alloc_at(fd, cmd, arg);
            }
            FREE_TAP => {
                let value = if self.rng.chance(1, 2) {
                    self.gen_minor()
                } else {
                    self.gen_arg().value
                };
                self.free_value(fd, cmd, value);
            }
            c => {
                let arg = self.gen_arg();
                self.scribble(arg);
                let got = code(sys::ioctl(fd, cmd, arg.value));
                let allowed = if vfs_cmd(c) { vec![] } else { vec![ENOTTY] };
                self.expect(
                    &format!("control ioctl {cmd:#x}({:#x})", arg.value),
                    got,
                    &allowed,
                );
            }
        }
    }

    fn op_alloc(&mut self) {
        if self.taps.len() >= self.cfg.max_taps {
            return self.op_free();
        }
        let fd = self.ctl_fd();
        let arg = match self.rng.below(10) {
            // The answer does not fit before the guard page, or the page is read-only.
            0 => Arg {
                value: self.scratch + PAGE - 4,
                kind: ArgKind::Writable(4),
            },
            1 => Arg {
                value: self.scratch + 2 * PAGE,
                kind: ArgKind::ReadOnly(PAGE),
            },
            _ => {
                let off = 8 * self.rng.below(500);
                Arg {
                    value: self.scratch + off,
                    kind: ArgKind::Writable(PAGE - off),
                }
            }
        };
        self.alloc_at(fd, u64::from(ALLOC_TAP), arg);
    }

    fn op_free(&mut self) {
        let fd = self.ctl_fd();
        let value = self.gen_minor();
        self.free_value(fd, u64::from(FREE_TAP), value);
    }

    fn op_control(&mut self) {
        if self.ctl.len() > 1 && self.rng.chance(1, 2) {
            let i = self.rng.below(self.ctl.len() as u64) as usize;
            let fd = self.ctl.remove(i);
            let got = code(sys::close(fd));
            self.expect("close(control)", got, &[0]);
        } else if self.ctl.len() < MAX_CONTROL_FDS {
            let r = sys::open(abi::CONTROL_PATH, libc::O_RDWR);
            let got = code(r);
            if self.expect("open(control)", got, &[0]) {
                if let Ok(fd) = r {
                    self.ctl.push(fd as i32);
                }
            }
        }
    }

    fn op_sysfs(&mut self) {
        let minor = self.gen_minor();
        if minor >= MAX_MINORS {
            return;
        }
        let minor = minor as u32;
        let attr = self.rng.pick(&["name", "task", "debug"]);
        let path = format!("{}/blktap!blktap{minor}/{attr}", abi::SYSFS_CLASS);
        let r = std::fs::read_to_string(&path);
        self.calls += 1;
        match (self.taps.contains_key(&minor), r) {
            (true, Ok(text)) => {
                if attr == "task"
                    && self
                        .files
                        .iter()
                        .any(|f| f.minor == minor && f.fd.is_some())
                {
                    let pid = std::process::id().to_string();
                    if text.trim() != pid {
                        self.fail(format!(
                            "{path} reads {:?}, expected our pid {pid}",
                            text.trim()
                        ));
                    }
                }
            }
            (false, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            (allocated, r) => self.fail(format!(
                "reading {path} (tap allocated: {allocated}) answered {:?}",
                r.map(|_| "contents")
            )),
        }
    }

    // ---- ring files ----------------------------------------------------------------------------

    fn op_ring_open(&mut self) {
        let minor = self.gen_minor();
        let minor = if minor >= 1 << 20 {
            minor & 0xfffff
        } else {
            minor
        } as u32;
        let allocated = self.taps.contains_key(&minor);
        let dev = allocated && self.rng.chance(3, 10);
        let path = if dev {
            abi::ring_path(minor)
        } else {
            self.ring_node(minor)
        };
        let (mode, readable, writable) = self.rng.pick(&[
            (libc::O_RDWR, true, true),
            (libc::O_RDWR, true, true),
            (libc::O_RDWR, true, true),
            (libc::O_RDWR | libc::O_NONBLOCK, true, true),
            (libc::O_RDONLY, true, false),
            (libc::O_WRONLY, false, true),
        ]);
        let allowed = if u64::from(minor) >= MAX_MINORS || !allocated {
            vec![ENXIO]
        } else if self.ring_open(minor) {
            vec![EBUSY]
        } else {
            vec![0]
        };
        let r = sys::open(&path, mode);
        let got = code(r);
        self.expect(&format!("open({path}, {mode:#o})"), got, &allowed);
        if let Ok(fd) = r {
            if allowed != [0] {
                // The kernel let a second opener in: keep the model sane.
                let _ = sys::close(fd as i32);
                return;
            }
            self.files.push(RingFile {
                minor,
                fd: Some(fd as i32),
                readable,
                writable,
                map: None,
                mapped_once: false,
                rsp_cons: None,
            });
        }
    }

    fn op_ring_close(&mut self) {
        let Some(i) = self.pick_file(true, false) else {
            return;
        };
        let fd = self.files[i].fd.take().unwrap_or(-1);
        let got = code(sys::close(fd));
        self.expect(&format!("close(ring {})", self.files[i].minor), got, &[0]);
        self.maybe_release(i);
    }

    fn op_mmap(&mut self) {
        let Some(i) = self.pick_file(true, false) else {
            return;
        };
        let fd = self.files[i].fd.unwrap_or(-1);
        let len = match self.rng.below(14) {
            0 => MAP_LEN - PAGE,
            1 => MAP_LEN + PAGE,
            2 => PAGE,
            3 => 0,
            4 => PAGE * (1 + self.rng.below(800)),
            5 => MAP_LEN - 1 - self.rng.below(PAGE - 1),
            6 => MAP_LEN + 1,
            _ => MAP_LEN,
        };
        let offset = match self.rng.below(14) {
            0 => PAGE,
            1 => 1 + self.rng.below(PAGE - 1),
            2 => PAGE * self.rng.below(1 << 20),
            3 => 1 << 40,
            4 => !(PAGE - 1),
            _ => 0,
        };
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let prot = match self.rng.below(12) {
            0 => libc::PROT_READ,
            1 => libc::PROT_WRITE,
            2 => libc::PROT_NONE,
            3 => rw | libc::PROT_EXEC,
            _ => rw,
        };
        let mut flags = match self.rng.below(14) {
            0 => libc::MAP_PRIVATE,
            1 => libc::MAP_SHARED_VALIDATE,
            2 => libc::MAP_SHARED | libc::MAP_POPULATE,
            3 => libc::MAP_SHARED | libc::MAP_LOCKED,
            4 => libc::MAP_SHARED | libc::MAP_NORESERVE,
            5..=6 => libc::MAP_SHARED | libc::MAP_FIXED,
            _ => libc::MAP_SHARED,
        };
        let mut slot = None;
        let mut addr = 0;
        if flags & libc::MAP_FIXED != 0 {
            if self.slot_used[0] || len > MAP_LEN {
                flags &= !libc::MAP_FIXED;
            } else {
                slot = Some(0);
                addr = self.slot_addr(0);
            }
        }
        // MAP_SHARED_VALIDATE (3) shares too.
        let private = flags & 3 == libc::MAP_PRIVATE;
        let f = &self.files[i];
        let rounded = (len + PAGE - 1) & !(PAGE - 1);
        let odd = private || prot & libc::PROT_EXEC != 0 || prot == libc::PROT_WRITE;
        // The mm's checks come first (length, alignment, overflow, the file's access mode), then
        // the driver's (size and offset, once per open).
        let allowed: Allowed = if len == 0 || offset % PAGE != 0 {
            vec![EINVAL]
        } else if offset >= 1 << 60 {
            vec![EINVAL, EOVERFLOW, ENOMEM]
        } else if !f.readable || (!private && prot & libc::PROT_WRITE != 0 && !f.writable) {
            vec![EACCES]
        } else if rounded != MAP_LEN || offset != 0 {
            vec![EINVAL]
        } else if f.mapped_once {
            vec![EBUSY]
        } else if odd {
            vec![0, EINVAL, EPERM, EACCES]
        } else if flags & libc::MAP_LOCKED != 0 {
            vec![0, EAGAIN]
        } else {
            vec![0]
        };
        let r = sys::mmap(addr, len, prot, flags, fd, offset);
        let got = code(r);
        let call = format!(
            "mmap(ring {}, len {len:#x}, off {offset:#x}, prot {prot}, flags {flags:#x})",
            f.minor
        );
        let ok = self.expect(&call, got, &allowed);
        match r {
            Ok(a) => {
                if !ok {
                    // Mapped though it should not have been: undo it, the model cannot follow.
                    let _ = sys::munmap(a as u64, rounded);
                    self.files[i].mapped_once = true;
                    if let Some(s) = slot {
                        self.rereserve(s);
                    }
                    return;
                }
                if let Some(s) = slot {
                    self.slot_used[s] = true;
                }
                let f = &mut self.files[i];
                let minor = f.minor;
                f.mapped_once = true;
                f.map = Some(Map {
                    addr: a as u64,
                    prot,
                    private,
                    slot,
                });
                f.rsp_cons = if private { None } else { Some(0) };
                if !private && prot & libc::PROT_READ != 0 {
                    let a = a as u64;
                    if (0..PAGE).step_by(8).any(|o| read_u64(a + o) != 0) {
                        self.fail(format!(
                            "the ring page of tap {minor} is not zeroed at mapping"
                        ));
                    }
                }
            }
            Err(_) => {
                if let Some(s) = slot {
                    self.rereserve(s);
                }
            }
        }
    }

    fn op_munmap(&mut self) {
        let Some(i) = self.pick_file(false, true) else {
            return;
        };
        let Some(map) = self.files[i].map else { return };
        let (addr, len, whole) = match self.rng.below(8) {
            0 => (map.addr, PAGE, false),
            1 => (map.addr + MAP_LEN - PAGE, PAGE, false),
            2 => (
                map.addr + PAGE * (1 + self.rng.below(300)),
                PAGE * (1 + self.rng.below(8)),
                false,
            ),
            3 if map.slot.is_some() => (map.addr, MAP_LEN + PAGE, true),
            _ => (map.addr, MAP_LEN, true),
        };
        let got = code(sys::munmap(addr, len));
        let minor = self.files[i].minor;
        self.expect(
            &format!("munmap(ring {minor} + {:#x}, {len:#x})", addr - map.addr),
            got,
            &[if whole { 0 } else { EINVAL }],
        );
        if got == 0 {
            self.unmapped(i);
        }
    }

    fn op_mprotect(&mut self) {
        let Some(i) = self.pick_file(false, true) else {
            return;
        };
        let Some(map) = self.files[i].map else { return };
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let prot = self.rng.pick(&[
            rw,
            rw,
            libc::PROT_READ,
            libc::PROT_NONE,
            rw | libc::PROT_EXEC,
        ]);
        let whole = self.rng.chance(1, 2);
        let (addr, len) = if whole {
            (map.addr, MAP_LEN)
        } else {
            (map.addr + PAGE * self.rng.below(353), PAGE)
        };
        let f = &self.files[i];
        let denied = !map.private && prot & libc::PROT_WRITE != 0 && !f.writable;
        let allowed: Allowed = match (whole, denied) {
            (_, true) => vec![EACCES, EINVAL],
            (true, false) if prot & libc::PROT_EXEC != 0 => vec![0, EACCES],
            (true, false) => vec![0],
            (false, false) if prot == map.prot => vec![0, EINVAL],
            (false, false) => vec![EINVAL],
        };
        let got = code(sys::mprotect(addr, len, prot));
        let minor = f.minor;
        self.expect(
            &format!(
                "mprotect(ring {minor} + {:#x}, {len:#x}, {prot})",
                addr - map.addr
            ),
            got,
            &allowed,
        );
        if got == 0 && whole {
            if let Some(m) = self.files[i].map.as_mut() {
                m.prot = prot;
            }
        } else if got == 0 && prot != map.prot {
            // A part changed protection (the mapping was split): the model stops writing to it.
            if let Some(m) = self.files[i].map.as_mut() {
                m.prot = libc::PROT_NONE;
            }
        }
    }

    fn op_mremap(&mut self) {
        let Some(i) = self.pick_file(false, true) else {
            return;
        };
        let Some(map) = self.files[i].map else { return };
        let minor = self.files[i].minor;
        match self.rng.below(4) {
            0 => {
                // Grow in place: the mapping cannot expand.
                let got = code(sys::mremap(map.addr, MAP_LEN, MAP_LEN + PAGE, 0, 0));
                self.expect(
                    &format!("mremap(ring {minor}, grow)"),
                    got,
                    &[EFAULT, ENOMEM],
                );
            }
            1 => {
                // Shrink: would split the mapping.
                let got = code(sys::mremap(map.addr, MAP_LEN, MAP_LEN - PAGE, 0, 0));
                self.expect(&format!("mremap(ring {minor}, shrink)"), got, &[EINVAL]);
            }
            2 => {
                let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_DONTUNMAP;
                let got = code(sys::mremap(map.addr, MAP_LEN, MAP_LEN, flags, 0));
                self.expect(&format!("mremap(ring {minor}, DONTUNMAP)"), got, &[EINVAL]);
            }
            _ => {
                // Move it whole to the free slot.
                let Some(slot) = (0..2).find(|&s| !self.slot_used[s] && Some(s) != map.slot) else {
                    return;
                };
                let to = self.slot_addr(slot);
                let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED;
                let r = sys::mremap(map.addr, MAP_LEN, MAP_LEN, flags, to);
                let got = code(r);
                self.expect(
                    &format!("mremap(ring {minor}, move)"),
                    got,
                    &[0, EINVAL, EFAULT],
                );
                if got == 0 {
                    if let Some(old) = map.slot {
                        self.rereserve(old);
                    }
                    self.slot_used[slot] = true;
                    if let Some(m) = self.files[i].map.as_mut() {
                        m.addr = to;
                        m.slot = Some(slot);
                    }
                } else {
                    self.rereserve(slot);
                }
            }
        }
    }

    // ---- ring ioctls ---------------------------------------------------------------------------

    fn op_ring_ioctl(&mut self) {
        let Some(i) = self.pick_file(true, false) else {
            return;
        };
        let cmd = self.gen_cmd(&RING_CMDS);
        match cmd as u32 {
            RESPOND => self.respond(i, cmd),
            CREATE => {
                let arg = self.gen_arg();
                self.create(i, cmd, arg, false);
            }
            CREATE_COMPAT => {
                let arg = self.gen_arg();
                self.create(i, cmd, arg, true);
            }
            REMOVE => self.remove(i, cmd),
            c => {
                let arg = self.gen_arg();
                self.scribble(arg);
                let fd = self.files[i].fd.unwrap_or(-1);
                let got = code(sys::ioctl(fd, cmd, arg.value));
                let allowed = if c == PAUSE || c == RESUME || vfs_cmd(c) {
                    vec![]
                } else {
                    vec![ENOTTY]
                };
                let minor = self.files[i].minor;
                self.expect(
                    &format!("ring {minor} ioctl {cmd:#x}({:#x})", arg.value),
                    got,
                    &allowed,
                );
            }
        }
    }

    fn respond(&mut self, i: usize, cmd: u64) {
        let f = &self.files[i];
        let fd = f.fd.unwrap_or(-1);
        let minor = f.minor;
        let mut rsp_prod = None;
        let allowed: Allowed = match (&f.map, f.rsp_cons) {
            (None, _) => vec![EACCES],
            (Some(m), Some(cons)) if !m.private && m.prot & libc::PROT_READ != 0 => {
                let prod = read_u32(m.addr + RSP_PROD);
                rsp_prod = Some(prod);
                let n = prod.wrapping_sub(cons);
                if n > RING_SIZE {
                    vec![EIO]
                } else if n == 0 {
                    vec![0]
                } else {
                    // No request is ever pending: every response is refused.
                    vec![EINVAL]
                }
            }
            (Some(m), _) => {
                if !m.private && m.prot & libc::PROT_READ != 0 {
                    rsp_prod = Some(read_u32(m.addr + RSP_PROD));
                }
                vec![0, EINVAL, EIO]
            }
        };
        let got = code(sys::ioctl(fd, cmd, self.rng.next_u64()));
        self.expect(
            &format!("RESPOND(ring {minor}, rsp_prod {rsp_prod:?})"),
            got,
            &allowed,
        );
        let f = &mut self.files[i];
        if got == 0 || got == EINVAL {
            // The kernel consumed up to the rsp_prod it read.
            f.rsp_cons = rsp_prod.filter(|_| f.map.is_some());
        } else if got != EIO {
            f.rsp_cons = None;
        }
    }

    /// Random ring contents, then RESPOND.
    fn op_respond(&mut self) {
        let Some(i) = self.pick_file(true, true) else {
            return self.op_ring_ioctl();
        };
        let Some(map) = self.files[i].map else { return };
        if map.prot & libc::PROT_WRITE != 0 {
            let cons = self.files[i].rsp_cons.unwrap_or(0);
            let base = map.addr;
            // Responses at random indices.
            for _ in 0..self.rng.below(6) {
                let idx = cons.wrapping_add(self.rng.below(40) as u32);
                let e = base + ENTRIES + u64::from(idx % RING_SIZE) * ENTRY;
                let id = match self.rng.below(8) {
                    0 => 1000,
                    1 => u64::MAX,
                    2 => self.rng.next_u64(),
                    3 => 32,
                    _ => self.rng.below(32),
                };
                write_u64(e, id);
                write_bytes(e + 8, &[self.rng.pick(&[0u8, 1, 2, 3, 4, 5, 255])]);
                let status: i16 = self.rng.pick(&[0, 0, -1, -2, i16::MIN, i16::MAX, 1]);
                write_bytes(e + 10, &status.to_le_bytes());
                if self.rng.chance(1, 4) {
                    let mut junk = [0u8; ENTRY as usize];
                    self.rng.fill(&mut junk);
                    write_bytes(e, &junk);
                }
            }
            let prod = match self.rng.below(12) {
                0 => self.rng.next_u64() as u32,
                1 => cons.wrapping_sub(1 + self.rng.below(40) as u32),
                2 => cons.wrapping_add(33 + self.rng.below(1000) as u32),
                3 => cons,
                _ => cons.wrapping_add(self.rng.below(33) as u32),
            };
            write_u32(base + RSP_PROD, prod);
            if self.rng.chance(1, 8) {
                // The kernel's own fields and the message byte.
                let mut hdr = [0u8; 8];
                self.rng.fill(&mut hdr);
                match self.rng.below(3) {
                    0 => write_bytes(base, &hdr[..4]),
                    1 => write_bytes(base + 12, &hdr[..4]),
                    _ => write_bytes(base + MSG, &[self.rng.pick(&[0u8, 1, 2, 3, hdr[0]])]),
                }
            }
            if self.rng.chance(1, 16) {
                let page = base + PAGE * (1 + self.rng.below(352));
                let mut junk = [0u8; 64];
                self.rng.fill(&mut junk);
                write_bytes(page + 64 * self.rng.below(64), &junk);
            }
        }
        self.respond(i, u64::from(RESPOND));
    }

    /// Writes a random device info for CREATE, or params for CREATE_COMPAT, at `at`.
    fn gen_device(&mut self, at: u64, compat: bool) {
        let capacity = match self.rng.below(14) {
            0 => 0,
            1 => 1,
            2 => u64::MAX,
            3 => u64::MAX / 512,
            4 => i64::MAX as u64 / 512 + self.rng.below(2),
            5 => 1 << 40,
            6 => self.rng.next_u64(),
            _ => 1 + self.rng.below(1 << 21),
        };
        let pick_size = |rng: &mut Rng| match rng.below(16) {
            0 => 0,
            1 => 256,
            2 => 511,
            3 => 513,
            4 => 1000,
            5 => 8192,
            6 => 1 << 31,
            7 => u64::from(u32::MAX),
            8 => rng.next_u64() & 0xffff_ffff,
            9 => 65536,
            10 => 1024,
            11 => 2048,
            12 | 13 => 4096,
            _ => 512,
        };
        let ss = pick_size(&mut self.rng);
        if compat {
            let ss = match self.rng.below(10) {
                0 => ss | (1 << 32),
                1 => u64::MAX,
                _ => ss,
            };
            let mut name = [0u8; 256];
            self.rng.fill(&mut name);
            if self.rng.chance(1, 2) {
                name[self.rng.below(256) as usize] = 0;
            }
            write_bytes(at, &name);
            write_u64(at + 256, capacity);
            write_u64(at + 264, ss);
            return;
        }
        let pss = if self.rng.chance(1, 3) {
            ss
        } else {
            pick_size(&mut self.rng)
        };
        let flags = match self.rng.below(12) {
            0 => DEVICE_RO,
            1 => self.rng.next_u64() & (NEW_FLAGS | DEVICE_RO),
            2 => 1 << self.rng.below(64),
            3 => self.rng.next_u64(),
            4 => self.rng.pick(&[0x02, 0x10, 0x80, 0x04 | 0x20, 0x20]),
            _ => 0,
        };
        let mut rsvd = [0u64; 4];
        if self.rng.chance(1, 10) {
            rsvd[self.rng.below(4) as usize] = self.rng.next_u64() | 1;
        }
        write_u64(at, capacity);
        write_u32(at + 8, ss as u32);
        write_u32(at + 12, pss as u32);
        write_u64(at + 16, flags);
        for (k, r) in rsvd.iter().enumerate() {
            write_u64(at + 24 + 8 * k as u64, *r);
        }
    }

    fn create(&mut self, i: usize, cmd: u64, arg: Arg, compat: bool) {
        let len = if compat { PARAMS_LEN } else { DEVICE_INFO_LEN };
        if arg.writable(len) {
            self.gen_device(arg.value, compat);
        }
        let (fresh, exists, ro) = if arg.readable(len) {
            judge_device(arg.value, compat)
        } else {
            (vec![EFAULT], vec![EFAULT], false)
        };
        let f = &self.files[i];
        let minor = f.minor;
        let has_disk = self.taps.get(&minor).is_some_and(|t| t.disk.is_some());
        let allowed = if !f.ours() {
            vec![EACCES]
        } else if has_disk {
            exists
        } else {
            fresh
        };
        let fd = f.fd.unwrap_or(-1);
        let got = code(sys::ioctl(fd, cmd, arg.value));
        let name = if compat {
            "CREATE_DEVICE_COMPAT"
        } else {
            "CREATE_DEVICE"
        };
        let call = format!(
            "{name}(ring {minor}, arg {:#x} {:?}) disk: {has_disk}",
            arg.value, arg.kind
        );
        self.expect(&call, got, &allowed);
        if got == 0 && !has_disk {
            self.disk_gen += 1;
            let gen = self.disk_gen;
            // Success means a valid buffer: its flags say whether the disk outlives the ring.
            let recovery = !compat && read_u64(arg.value + 16) & abi::DEVICE_RECOVERY != 0;
            if let Some(tap) = self.taps.get_mut(&minor) {
                tap.disk = Some(gen);
                tap.read_only = ro;
                tap.recovery = recovery;
            }
        }
    }

    fn op_create(&mut self, compat: bool) {
        let Some(i) = self.pick_file(true, false) else {
            return;
        };
        let cmd = if compat { CREATE_COMPAT } else { CREATE };
        let arg = if self.rng.chance(1, 8) {
            self.gen_arg()
        } else {
            let off = 8 * self.rng.below(400);
            Arg {
                value: self.scratch + off,
                kind: ArgKind::Writable(PAGE - off),
            }
        };
        self.create(i, u64::from(cmd), arg, compat);
    }

    fn remove(&mut self, i: usize, cmd: u64) {
        let f = &self.files[i];
        let minor = f.minor;
        let disk = self.taps.get(&minor).and_then(|t| t.disk);
        let open = self
            .tapdevs
            .iter()
            .any(|t| t.minor == minor && Some(t.gen) == disk);
        let allowed = if !f.ours() {
            vec![EACCES]
        } else if disk.is_none() {
            vec![ENODEV]
        } else if open {
            vec![EBUSY]
        } else {
            vec![0]
        };
        let fd = f.fd.unwrap_or(-1);
        let got = code(sys::ioctl(fd, cmd, self.rng.next_u64()));
        self.expect(
            &format!("REMOVE_DEVICE(ring {minor}) disk {disk:?} open {open}"),
            got,
            &allowed,
        );
        if got == 0 {
            if let Some(tap) = self.taps.get_mut(&minor) {
                tap.disk = None;
                tap.recovery = false;
            }
        }
    }

    fn op_remove(&mut self) {
        let Some(i) = self.pick_file(true, false) else {
            return;
        };
        self.remove(i, u64::from(REMOVE));
    }

    fn op_poll(&mut self) {
        let Some(i) = self.pick_file(true, false) else {
            return;
        };
        let f = &self.files[i];
        let allowed: Allowed = match &f.map {
            None => vec![i64::from(libc::POLLERR) as i32],
            Some(m) if !m.private && m.prot & libc::PROT_READ != 0 => {
                let msg = read_bytes::<1>(m.addr + MSG)[0];
                vec![if msg != 0 { POLLIN_RDNORM as i32 } else { 0 }]
            }
            Some(_) => vec![0, POLLIN_RDNORM as i32],
        };
        let fd = f.fd.unwrap_or(-1);
        let minor = f.minor;
        let r = sys::poll_now(fd, libc::POLLIN | libc::POLLRDNORM);
        self.calls += 1;
        match r {
            Ok(ev) if allowed.contains(&(ev as i32)) => {}
            other => self.fail(format!(
                "poll(ring {minor}) answered {other:?}, expected revents {allowed:?}"
            )),
        }
    }

    // ---- the disks -----------------------------------------------------------------------------

    fn op_tapdev_open(&mut self) {
        if self.tapdevs.len() >= MAX_TAPDEV_FDS {
            return self.op_tapdev_close();
        }
        let with_disk: Vec<u32> = self
            .taps
            .iter()
            .filter(|(_, t)| t.disk.is_some())
            .map(|(m, _)| *m)
            .collect();
        let minor = if !with_disk.is_empty() && self.rng.chance(4, 5) {
            self.rng.pick(&with_disk)
        } else {
            self.rng.below(16) as u32
        };
        let tap = self.taps.get(&minor);
        let disk = tap.and_then(|t| t.disk);
        let ro = tap.is_some_and(|t| t.read_only);
        let path = if disk.is_some() && self.rng.chance(1, 2) {
            abi::device_path(minor)
        } else {
            self.node(true, minor)
        };
        let write = self.rng.chance(1, 4);
        let mode = if write { libc::O_RDWR } else { libc::O_RDONLY } | libc::O_NONBLOCK;
        let allowed = match disk {
            None => vec![ENXIO],
            Some(_) if write && ro => vec![0, EACCES, EROFS],
            Some(_) => vec![0],
        };
        let r = sys::open(&path, mode);
        let got = code(r);
        self.expect(
            &format!("open({path}, {mode:#o}) disk {disk:?}"),
            got,
            &allowed,
        );
        if let (Ok(fd), Some(gen)) = (r, disk) {
            self.tapdevs.push(Tapdev {
                fd: fd as i32,
                minor,
                gen,
            });
        } else if let Ok(fd) = r {
            let _ = sys::close(fd as i32);
        }
    }

    fn op_tapdev_close(&mut self) {
        if self.tapdevs.is_empty() {
            return;
        }
        let i = self.rng.below(self.tapdevs.len() as u64) as usize;
        let t = self.tapdevs.remove(i);
        let got = code(sys::close(t.fd));
        self.expect(&format!("close(tapdev {})", t.minor), got, &[0]);
    }

    // ---- other processes -----------------------------------------------------------------------

    /// A child calls the ring's ioctls (it is not the mapper) and perhaps maps the ring itself.
    fn op_fork(&mut self) {
        let Some(i) = self.pick_file(true, false) else {
            return;
        };
        let f = &self.files[i];
        let fd = f.fd.unwrap_or(-1);
        let minor = f.minor;
        let try_map = f.map.is_none() && f.readable && f.writable && self.rng.chance(1, 2);
        let map_expected = if f.mapped_once { EBUSY } else { 0 };
        let free_minor = u64::from(self.lowest_free());
        let ctl = self.ctl[0];
        let info = self.scratch + 2 * PAGE;
        // SAFETY: the fuzzer is single-threaded; the child only makes system calls and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let mut bad = 0;
            let mut check = |what: &str, got: i32, want: i32| {
                if got != want {
                    eprintln!(
                        "blktap-fuzz child: {what}: got {}, expected {}",
                        errno_name(got),
                        errno_name(want)
                    );
                    bad += 1;
                }
            };
            check(
                "RESPOND",
                code(sys::ioctl(fd, u64::from(RESPOND), 0)),
                EACCES,
            );
            check(
                "CREATE_DEVICE",
                code(sys::ioctl(fd, u64::from(CREATE), info)),
                EACCES,
            );
            check(
                "REMOVE_DEVICE",
                code(sys::ioctl(fd, u64::from(REMOVE), 0)),
                EACCES,
            );
            check("ioctl 203", code(sys::ioctl(fd, 203, 0)), ENOTTY);
            check(
                "FREE_TAP(open ring)",
                code(sys::ioctl(ctl, u64::from(FREE_TAP), u64::from(minor))),
                EBUSY,
            );
            check(
                "FREE_TAP(free minor)",
                code(sys::ioctl(ctl, u64::from(FREE_TAP), free_minor)),
                ENODEV,
            );
            if try_map {
                let rw = libc::PROT_READ | libc::PROT_WRITE;
                let r = sys::mmap(0, MAP_LEN, rw, libc::MAP_SHARED, fd, 0);
                check("child mmap", code(r), map_expected);
                if r.is_ok() {
                    // The child is the mapper now.
                    check(
                        "child RESPOND",
                        code(sys::ioctl(fd, u64::from(RESPOND), 0)),
                        0,
                    );
                }
            }
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(bad.min(100)) };
        }
        if pid < 0 {
            self.fail(format!(
                "fork: {}",
                errno_name(nix::errno::Errno::last_raw())
            ));
            return;
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        self.calls += 6 + if try_map { 2 } else { 0 };
        if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            self.fail(format!(
                "a forked child's ring {minor} ioctls: status {status:#x} (see its stderr)"
            ));
        }
        if try_map {
            // The child's mapping went with it: the ring is not mapped any more.
            self.files[i].mapped_once = true;
        }
    }

    /// A fixed interleaving of open, mmap, close and FREE_TAP on a new tap.
    fn op_lifecycle(&mut self) {
        if self.taps.len() >= self.cfg.max_taps {
            return self.op_free();
        }
        let ctl = self.ctl[0];
        let arg = Arg {
            value: self.scratch,
            kind: ArgKind::Writable(PAGE),
        };
        let minor = self.lowest_free();
        if !self.alloc_at(ctl, u64::from(ALLOC_TAP), arg) {
            return;
        }
        let path = self.ring_node(minor);
        let r = sys::open(&path, libc::O_RDWR);
        if !self.expect("lifecycle open", code(r), &[0]) {
            return;
        }
        let fd = r.unwrap_or(-1) as i32;
        let free = u64::from(FREE_TAP);
        let got = code(sys::ioctl(ctl, free, u64::from(minor)));
        self.expect("lifecycle FREE_TAP(open)", got, &[EBUSY]);
        let got = code(sys::open(&path, libc::O_RDWR));
        self.expect("lifecycle second open", got, &[EBUSY]);
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let m = sys::mmap(0, MAP_LEN, rw, libc::MAP_SHARED, fd, 0);
        self.expect("lifecycle mmap", code(m), &[0]);
        let got = code(sys::close(fd));
        self.expect("lifecycle close", got, &[0]);
        let got = code(sys::ioctl(ctl, free, u64::from(minor)));
        self.expect("lifecycle FREE_TAP(mapped)", got, &[EBUSY]);
        if let Ok(a) = m {
            let got = code(sys::munmap(a as u64, MAP_LEN));
            self.expect("lifecycle munmap", got, &[0]);
        }
        let got = code(sys::ioctl(ctl, free, u64::from(minor)));
        if self.expect("lifecycle FREE_TAP(closed)", got, &[0]) && got == 0 {
            self.taps.remove(&minor);
        }
    }

    // ---- the end -------------------------------------------------------------------------------

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

/// The answers CREATE_DEVICE (or _COMPAT) may give for the info (params) at `at`: for a ring
/// without a disk, for one with a disk, and whether the disk would be read-only.
fn judge_device(at: u64, compat: bool) -> (Allowed, Allowed, bool) {
    let good_size = |s: u64| s.is_power_of_two() && (512..=4096).contains(&s);
    // The byte size must fit loff_t and be a whole number of logical blocks.
    let good_capacity = |c: u64, ss: u64| {
        c != 0 && c <= i64::MAX as u64 / 512 && c.is_multiple_of((ss / 512).max(1))
    };
    if compat {
        let capacity = read_u64(at + 256);
        let ss = read_u64(at + 264);
        let valid = good_size(ss) && good_capacity(capacity, ss);
        return if !valid {
            (vec![EINVAL], vec![EINVAL], false)
        } else if capacity > 1 << 48 {
            (
                vec![0, EINVAL, ENOMEM, EOVERFLOW],
                vec![EEXIST, EINVAL],
                false,
            )
        } else {
            (vec![0], vec![EEXIST], false)
        };
    }
    let capacity = read_u64(at);
    let ss = u64::from(read_u32(at + 8));
    let pss = u64::from(read_u32(at + 12));
    let flags = read_u64(at + 16);
    let rsvd_zero = (0..4).all(|k| read_u64(at + 24 + 8 * k) == 0);
    let valid = flags & !(DEVICE_RO | NEW_FLAGS) == 0
        && good_size(ss)
        && good_capacity(capacity, ss)
        && pss.is_power_of_two()
        && (512..=65536).contains(&pss);
    let unsure = flags & NEW_FLAGS != 0 || !rsvd_zero;
    let extreme = capacity > 1 << 48 || pss > 65536 || pss < ss;
    let ro = flags & DEVICE_RO != 0;
    if !valid {
        (vec![EINVAL], vec![EINVAL], ro)
    } else if unsure || extreme {
        (vec![0, EINVAL, ENOMEM, EOVERFLOW], vec![EEXIST, EINVAL], ro)
    } else {
        (vec![0], vec![EEXIST], ro)
    }
}

// Accesses to the scratch pages and ring mappings, by address. They are volatile: the kernel
// reads and writes the ring pages behind our back, and no Rust reference points into them.

fn write_bytes(addr: u64, bytes: &[u8]) {
    for (k, b) in bytes.iter().enumerate() {
        // SAFETY: callers pass addresses inside writable mappings the fuzzer owns (the scratch
        // page, or a ring mapping with PROT_WRITE), with `bytes.len()` bytes of room.
        unsafe { std::ptr::write_volatile((addr as usize + k) as *mut u8, *b) };
    }
}

fn read_bytes<const N: usize>(addr: u64) -> [u8; N] {
    let mut out = [0u8; N];
    for (k, b) in out.iter_mut().enumerate() {
        // SAFETY: callers pass addresses inside readable mappings the fuzzer owns.
        *b = unsafe { std::ptr::read_volatile((addr as usize + k) as *const u8) };
    }
    out
}

fn write_u32(addr: u64, v: u32) {
    write_bytes(addr, &v.to_le_bytes());
}

fn write_u64(addr: u64, v: u64) {
    write_bytes(addr, &v.to_le_bytes());
}

fn read_u32(addr: u64) -> u32 {
    u32::from_le_bytes(read_bytes::<4>(addr))
}

fn read_u64(addr: u64) -> u64 {
    u64::from_le_bytes(read_bytes::<8>(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vfs_commands_are_recognised() {
        assert!(vfs_cmd(libc::FIOCLEX as u32));
        assert!(vfs_cmd(libc::FIONBIO as u32));
        assert!(!vfs_cmd(ALLOC_TAP));
        assert!(!vfs_cmd(RESPOND));
        assert!(!vfs_cmd(300));
    }

    #[test]
    fn argument_room() {
        let a = Arg {
            value: 0,
            kind: ArgKind::Writable(12),
        };
        assert!(a.writable(12) && a.readable(12) && !a.writable(13));
        let a = Arg {
            value: 0,
            kind: ArgKind::ReadOnly(4096),
        };
        assert!(a.readable(272) && !a.writable(1));
        assert!(!Arg {
            value: 0,
            kind: ArgKind::Bad
        }
        .readable(1));
    }

    #[test]
    fn weights_cover_every_op() {
        assert_eq!(WEIGHTS.len(), 21);
        assert!(WEIGHTS.iter().all(|w| w.1 > 0));
    }

    #[test]
    fn scratch_accessors_round_trip() {
        let mut buf = [0u64; 4];
        let at = buf.as_mut_ptr() as u64;
        write_u64(at, 0x1122_3344_5566_7788);
        write_u32(at + 8, 0xdead_beef);
        assert_eq!(read_u64(at), 0x1122_3344_5566_7788);
        assert_eq!(read_u32(at + 8), 0xdead_beef);
        assert_eq!(read_bytes::<2>(at), [0x88, 0x77]);
    }
}
