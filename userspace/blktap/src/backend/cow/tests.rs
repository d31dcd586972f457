//! The overlay against a model of the disk, over memory and over files, with I/Os in flight
//! together; its file kept across a close; its map stored only for durable data.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;

use super::*;
use crate::backend::threaded::tests::io;
use crate::backend::{Backend, ImageSpec, MAX_LAYERS};

/// Opens `spec` buffered: the tests' buffers are not aligned for `O_DIRECT` (the ring's pages
/// are).
fn open(spec: &ImageSpec, readonly: bool) -> crate::Result<Box<dyn Backend>> {
    crate::backend::open_with(spec, readonly, false)
}

/// A xorshift generator, seeded.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Queues `ios` together, submits, and waits for every completion through the layer's
/// descriptor (or at once when it has none), as the event loop does.
fn run(b: &mut dyn Backend, ios: Vec<Io>) -> HashMap<u64, std::result::Result<(), Errno>> {
    let n = ios.len();
    for io in ios {
        // SAFETY: the callers' buffers outlive this call, which returns when all completed.
        unsafe { b.queue(io) };
    }
    b.submit().unwrap();
    let mut got = Vec::new();
    b.reap(&mut got);
    while got.len() < n {
        if let Some(fd) = b.event_fd() {
            let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
            assert_eq!(
                nix::poll::poll(&mut fds, 10000u16).unwrap(),
                1,
                "no completion"
            );
        }
        b.reap(&mut got);
    }
    assert_eq!(b.in_flight(), 0);
    got.into_iter().map(|c| (c.tag, c.result)).collect()
}

fn discard(tag: u64, offset: u64, len: u64) -> Io {
    Io {
        tag,
        op: Op::Discard,
        offset,
        iov: Vec::new(),
        discard_len: len,
    }
}

fn flush(tag: u64) -> Io {
    discard_like(tag, Op::Flush)
}

fn discard_like(tag: u64, op: Op) -> Io {
    Io {
        tag,
        op,
        offset: 0,
        iov: Vec::new(),
        discard_len: 0,
    }
}

const SIZE: u64 = 8 << 20;

/// A base file of `SIZE` bytes with a pattern in its first half and a hole after.
fn base_file(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    let path = dir.join("base.raw");
    let mut data = vec![0u8; SIZE as usize];
    for (i, c) in data[..SIZE as usize / 2].chunks_mut(512).enumerate() {
        c.fill((i % 251) as u8 + 1);
    }
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(SIZE).unwrap();
    f.write_all_at(&data[..SIZE as usize / 2], 0).unwrap();
    (path, data)
}

/// Random batches of reads, writes, FUA writes, discards and flushes, in flight together on
/// disjoint ranges, against a model; every read checked.
fn exercise(b: &mut dyn Backend, model: &mut [u8], seed: u64, rounds: usize) {
    let mut rng = Rng(seed);
    let sectors = SIZE / 512;
    for round in 0..rounds {
        let mut ios = Vec::new();
        let mut bufs: Vec<(u64, Op, u64, Vec<u8>)> = Vec::new();
        let mut taken: Vec<(u64, u64)> = Vec::new();
        for k in 0..(1 + rng.below(8)) {
            let long = rng.below(4) == 0;
            let len = 1 + rng.below(if long { 300 } else { 24 });
            let start = rng.below(sectors - len);
            if taken.iter().any(|&(a, n)| start < a + n && a < start + len) {
                continue;
            }
            taken.push((start, len));
            let op = match rng.below(10) {
                0..=4 => Op::Read,
                5..=7 => Op::Write,
                8 => Op::WriteFua,
                _ => Op::Discard,
            };
            let fill = (round * 16 + k as usize) as u8 | 0x80;
            let buf = match op {
                Op::Read => vec![0xeeu8; (len * 512) as usize],
                Op::Discard => Vec::new(),
                _ => vec![fill; (len * 512) as usize],
            };
            bufs.push((start * 512, op, len * 512, buf));
        }
        for (tag, (offset, op, len, buf)) in bufs.iter_mut().enumerate() {
            ios.push(match op {
                Op::Discard => discard(tag as u64, *offset, *len),
                _ => io(tag as u64, *op, *offset, buf),
            });
        }
        if rng.below(3) == 0 {
            ios.push(flush(999));
        }
        let results = run(b, ios);
        for (tag, r) in &results {
            let what = bufs.get(*tag as usize).map(|b| (b.0, b.1, b.2));
            assert!(r.is_ok(), "round {round}: {what:?}: {r:?}");
        }
        for (offset, op, len, buf) in &bufs {
            let range = *offset as usize..(*offset + *len) as usize;
            match op {
                Op::Read => assert!(
                    buf[..] == model[range.clone()],
                    "round {round}: read of {range:?} differs"
                ),
                Op::Discard => model[range].fill(0),
                _ => model[range].copy_from_slice(buf),
            }
        }
    }
    // The whole disk, read back in one go.
    let mut all = vec![0u8; SIZE as usize];
    run(b, vec![io(1, Op::Read, 0, &mut all)]);
    assert!(all == model, "the whole disk differs from the model");
}

#[test]
fn a_memory_overlay_over_a_file_matches_the_model_and_leaves_the_base_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (base, data) = base_file(dir.path());
    let spec: ImageSpec = format!("cow:ram:aio:{}", base.display()).parse().unwrap();
    let mut b = open(&spec, false).unwrap();
    assert_eq!(b.kind(), ImageKind::Cow);
    assert_eq!(b.size(), SIZE);
    assert_eq!(b.features(), Features::ALL);
    let mut model = data.clone();
    exercise(b.as_mut(), &mut model, 7, 120);
    let mut layers = Vec::new();
    b.layers(&mut layers);
    assert_eq!(layers.len(), 2);
    assert_eq!(
        (layers[0].driver.as_str(), layers[0].name.as_str()),
        ("ram", "memory")
    );
    assert_eq!(layers[1].driver, "aio");
    assert_eq!(layers[1].name, base.display().to_string());
    assert!(layers[0].hits[1] > 0 && layers[1].hits[0] > 0, "{layers:?}");
    assert_eq!(layers[1].hits[1], 0, "nothing written to the base");
    drop(b);
    assert!(std::fs::read(&base).unwrap() == data, "the base changed");
}

#[test]
fn a_file_overlay_keeps_its_sectors_across_a_close() {
    let dir = tempfile::tempdir().unwrap();
    let (base, data) = base_file(dir.path());
    let ov = dir.path().join("overlay.cow");
    let spec: ImageSpec = format!("cow:{}:aio:{}", ov.display(), base.display())
        .parse()
        .unwrap();
    let mut model = data.clone();
    let mut b = open(&spec, false).unwrap();
    assert!(b.event_fd().is_some());
    exercise(b.as_mut(), &mut model, 11, 80);
    drop(b);
    // Reopened: the same disk; and more rounds on it.
    let mut b = open(&spec, false).unwrap();
    let mut all = vec![0u8; SIZE as usize];
    run(b.as_mut(), vec![io(1, Op::Read, 0, &mut all)]);
    assert!(all == model, "the disk differs after a close");
    exercise(b.as_mut(), &mut model, 12, 40);
    drop(b);
    assert!(std::fs::read(&base).unwrap() == data, "the base changed");
    // Read-only: reads work, writes are refused.
    let mut b = open(&spec, true).unwrap();
    let mut buf = vec![0u8; 4096];
    let r = run(b.as_mut(), vec![io(1, Op::Write, 0, &mut buf)]);
    assert_eq!(r[&1], Err(Errno::EROFS));
    run(b.as_mut(), vec![io(2, Op::Read, 0, &mut buf)]);
    assert!(buf[..] == model[..4096]);
}

/// The map pages stored in the file, read as a fresh open would.
fn stored_map(ov: &std::path::Path) -> Map {
    let f = std::fs::File::open(ov).unwrap();
    let mut m = Map::new(SIZE / 512);
    let mut page = [0u8; PAGE_BYTES];
    for p in 0..m.page_count() {
        f.read_exact_at(&mut page, file::page_offset(p)).unwrap();
        m.load_page(p, &page);
    }
    m
}

#[test]
fn the_stored_map_has_the_writes_a_flush_made_durable_and_no_others() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = base_file(dir.path());
    let ov = dir.path().join("overlay.cow");
    let spec: ImageSpec = format!("cow:{}:aio:{}", ov.display(), base.display())
        .parse()
        .unwrap();
    let mut b = open(&spec, false).unwrap();
    let mut a = vec![1u8; 8192];
    run(b.as_mut(), vec![io(1, Op::Write, 0, &mut a)]);
    assert_eq!(stored_map(&ov).count(), 0, "stored before any flush");
    run(b.as_mut(), vec![flush(2)]);
    assert_eq!(
        stored_map(&ov).runs(0, 64),
        [(0, 16, true), (16, 48, false)]
    );
    // A write completed after the flush was issued is not in the map that flush stores.
    let mut c = vec![2u8; 4096];
    run(b.as_mut(), vec![io(3, Op::Write, 1 << 20, &mut c)]);
    assert_eq!(stored_map(&ov).count(), 16);
    // A FUA write is durable, map included, when it completes.
    let mut d = vec![3u8; 512];
    run(b.as_mut(), vec![io(4, Op::WriteFua, 2 << 20, &mut d)]);
    let m = stored_map(&ov);
    assert!(m.get((2 << 20) / 512));
    // Flushes in flight together, and writes with them: all answered, the map complete.
    let mut e = vec![4u8; 4096];
    run(
        b.as_mut(),
        vec![
            flush(5),
            io(6, Op::Write, 3 << 20, &mut e),
            flush(7),
            flush(8),
        ],
    );
    run(b.as_mut(), vec![flush(9)]);
    assert_eq!(stored_map(&ov).count(), 16 + 8 + 1 + 8);
}

#[test]
fn block_status_shows_the_overlay_as_data_and_the_base_holes() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = base_file(dir.path());
    let spec: ImageSpec = format!("cow:ram:aio:{}", base.display()).parse().unwrap();
    let mut b = open(&spec, false).unwrap();
    let half = SIZE / 2;
    let mut w = vec![9u8; 1 << 20];
    run(b.as_mut(), vec![io(1, Op::Write, half + (1 << 20), &mut w)]);
    let ext = b.block_status(0, SIZE).unwrap();
    let total: u64 = ext.iter().map(|e| e.length).sum();
    assert_eq!(total, SIZE);
    let mut pos = 0;
    for e in &ext {
        let data = !e.hole;
        // Data: the base's first half and the written MiB; the rest is the base's hole.
        let expect = pos < half || (half + (1 << 20)..half + (2 << 20)).contains(&pos);
        assert_eq!(data, expect, "extent at {pos}: {ext:?}");
        pos += e.length;
    }
}

#[test]
fn bad_requests_and_bad_overlays_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = base_file(dir.path());
    let spec: ImageSpec = format!("cow:ram:aio:{}", base.display()).parse().unwrap();
    let mut b = open(&spec, false).unwrap();
    let mut buf = vec![0u8; 1024];
    let r = run(
        b.as_mut(),
        vec![
            io(1, Op::Read, SIZE - 512, &mut buf),
            Io {
                tag: 2,
                op: Op::Read,
                offset: 100,
                iov: vec![libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: 512,
                }],
                discard_len: 0,
            },
        ],
    );
    assert_eq!(r[&1], Err(Errno::EIO));
    assert_eq!(r[&2], Err(Errno::EINVAL));
    // An overlay file of another disk, or that is not one: refused at open.
    let ov = dir.path().join("ov");
    std::fs::write(&ov, b"something else").unwrap();
    let spec: ImageSpec = format!("cow:{}:aio:{}", ov.display(), base.display())
        .parse()
        .unwrap();
    let Err(e) = open(&spec, false) else {
        panic!("opened an overlay that is not one")
    };
    assert_eq!(e.errno(), 22);
    assert!(e.to_string().contains("not an overlay"), "{e}");
}

#[test]
fn stacks_are_parsed_and_bounded() {
    let s: ImageSpec = "trace:cow:ram:aio:/b.raw".parse().unwrap();
    assert_eq!(s.kind, ImageKind::Trace);
    assert_eq!(s.to_string(), "trace:cow:ram:aio:/b.raw");
    let cow = s.lower().unwrap();
    assert_eq!((cow.kind, cow.overlay()), (ImageKind::Cow, Some("ram")));
    assert_eq!(cow.lower().unwrap().to_string(), "aio:/b.raw");
    let s: ImageSpec = "cow:/var/ov.cow:nbd:nbd+unix:///x?socket=/run/s"
        .parse()
        .unwrap();
    assert_eq!(s.overlay(), Some("/var/ov.cow"));
    assert_eq!(s.lower().unwrap().kind, ImageKind::Nbd);
    assert_eq!(s.layer_name(), ("cow".into(), "/var/ov.cow".into()));
    for bad in [
        "trace:",
        "trace:foo:/x",
        "cow:ram",
        "cow:ram:",
        "cow:rel/ov:aio:/x",
        "cow:/ov:aio:",
        "trace:ram:12",
    ] {
        let e = bad.parse::<ImageSpec>().unwrap_err();
        assert_eq!(e.errno(), 22, "{bad}");
    }
    let deep = format!("{}null:1M", "trace:".repeat(MAX_LAYERS));
    let e = deep.parse::<ImageSpec>().unwrap_err();
    assert!(e.to_string().contains("layers"), "{e}");
    let ok = format!("{}null:1M", "trace:".repeat(MAX_LAYERS - 1));
    assert!(ok.parse::<ImageSpec>().is_ok());
}

#[test]
fn trace_passes_every_request_on_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let (base, data) = base_file(dir.path());
    let spec: ImageSpec = format!("trace:cow:ram:aio:{}", base.display())
        .parse()
        .unwrap();
    let mut b = open(&spec, false).unwrap();
    assert_eq!(b.kind(), ImageKind::Trace);
    let mut model = data.clone();
    exercise(b.as_mut(), &mut model, 3, 30);
    let mut layers = Vec::new();
    b.layers(&mut layers);
    let names: Vec<_> = layers.iter().map(|l| l.driver.as_str()).collect();
    assert_eq!(names, ["cow", "ram", "aio"]);
    // What the tracer passed to the overlay layer is what the tap asked for.
    assert!(layers[0].hits[0] >= SIZE / 512, "{layers:?}");
}
