//! Tests of the VHD format code: round trips, qemu-img as an independent reference, chains,
//! coalescing, malformed images and random corruption.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::check::check;
use super::create::{coalesce, create_dynamic, create_fixed, resize, snapshot};
use super::{Chain, VhdError, VhdImage};
use crate::backend::{self, Backend, ImageSpec, Io};
use crate::ring::Op;
use crate::rng::Rng;

/// A scratch directory (`tempfile`'s), removed when the test is done with it.
struct Scratch(tempfile::TempDir);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.path()
    }
}

fn scratch(name: &str) -> Scratch {
    let dir = tempfile::Builder::new()
        .prefix(&format!("blktap-vhd-{name}-"))
        .tempdir()
        .unwrap();
    Scratch(dir)
}

fn pattern(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for c in v.chunks_mut(8) {
        let r = rng.next_u64().to_le_bytes();
        c.copy_from_slice(&r[..c.len()]);
    }
    v
}

fn read_all(path: &Path) -> Vec<u8> {
    let mut chain = Chain::open(path, false).unwrap();
    let mut buf = vec![0u8; chain.size() as usize];
    chain.read(0, &mut buf).unwrap();
    buf
}

fn qemu_img() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("qemu-img is not installed: skipped (scripts/setup installs qemu-utils)");
    }
    ok
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn to_raw(vhd: &Path, raw: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(raw);
    run(Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(vhd)
        .arg(raw));
    std::fs::read(raw).unwrap()
}

#[test]
fn dynamic_images_read_back_what_was_written() {
    let dir = scratch("dyn");
    let path = dir.join("d.vhd");
    create_dynamic(&path, 10 << 20, None).unwrap();
    assert!(read_all(&path).iter().all(|&b| b == 0));
    let mut rng = Rng::new(1);
    let mut model = vec![0u8; 10 << 20];
    {
        let mut chain = Chain::open(&path, true).unwrap();
        // Across a block boundary, at the start, and at the very end.
        for (off, len) in [
            (2 * 1024 * 1024 - 4096, 8192),
            (0, 512),
            ((10 << 20) - 1024, 1024),
        ] {
            let data = pattern(&mut rng, len);
            chain.write(off as u64, &data).unwrap();
            model[off..off + len].copy_from_slice(&data);
        }
        chain.flush().unwrap();
        let mut buf = vec![0u8; model.len()];
        chain.read(0, &mut buf).unwrap();
        assert!(buf == model, "read back through the open chain");
    }
    assert!(read_all(&path) == model, "read back after reopening");
    assert!(check(&path).is_empty(), "{:?}", check(&path));
    // A resize journal left beside it is a problem `check` names, with the way out.
    let journal = super::journal::default_path(&path);
    std::fs::write(&journal, b"left over").unwrap();
    let problems = check(&path);
    assert!(
        problems.len() == 1 && problems[0].contains("vhd-util revert"),
        "{problems:?}"
    );
    std::fs::remove_file(&journal).unwrap();
    assert!(check(&path).is_empty());
    let image = VhdImage::open(&path, false).unwrap();
    let allocated = image
        .bat()
        .iter()
        .filter(|&&e| e != super::UNALLOCATED)
        .count();
    assert_eq!(allocated, 3, "blocks 0, 1 and 4 allocated");
    let mut chain = Chain::open(&path, false).unwrap();
    assert!(matches!(
        chain.write(0, &[0; 512]),
        Err(VhdError::ReadOnly { .. })
    ));
    assert!(matches!(
        chain.read(10 << 20, &mut [0; 512]),
        Err(VhdError::OutOfRange { .. })
    ));
    assert!(chain.read(100, &mut [0; 512]).is_err(), "unaligned");
}

#[test]
fn fixed_images_read_back_what_was_written() {
    let dir = scratch("fixed");
    let path = dir.join("f.vhd");
    create_fixed(&path, 3 << 20).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), (3 << 20) + 512);
    let mut rng = Rng::new(2);
    let data = pattern(&mut rng, 4096);
    Chain::open(&path, true)
        .unwrap()
        .write(1 << 20, &data)
        .unwrap();
    let all = read_all(&path);
    assert!(all[(1 << 20)..(1 << 20) + 4096] == data[..]);
    assert!(all[..1 << 20].iter().all(|&b| b == 0));
    assert!(check(&path).is_empty());
}

#[test]
fn qemu_made_images_read_like_qemu_converts_them() {
    if !qemu_img() {
        return;
    }
    let dir = scratch("qemu-read");
    let mut rng = Rng::new(3);
    for (sub, size_mb) in [
        ("dynamic", 3u64),
        ("dynamic", 17),
        ("fixed", 5),
        ("fixed", 9),
    ] {
        // A raw disk with scattered data, made a VHD by qemu-img.
        let raw = dir.join("src.raw");
        let size = size_mb << 20;
        let mut model = vec![0u8; size as usize];
        for _ in 0..6 {
            let off = rng.below(size / 512 - 16) as usize * 512;
            let data = pattern(&mut rng, 8192);
            model[off..off + 8192].copy_from_slice(&data);
        }
        std::fs::write(&raw, &model).unwrap();
        let vhd = dir.join(format!("{sub}-{size_mb}.vhd"));
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "vpc", "-o"])
            .arg(format!("subformat={sub}"))
            .arg(&raw)
            .arg(&vhd));
        let reference = to_raw(&vhd, &dir.join("ref.raw"));
        let ours = read_all(&vhd);
        assert_eq!(ours.len(), reference.len(), "{sub} {size_mb}M: size");
        assert!(ours == reference, "{sub} {size_mb}M: bytes");
        assert!(check(&vhd).is_empty(), "{sub}: {:?}", check(&vhd));
    }
}

/// Writes `data` at `offset` through the backend API (iovecs, queue, submit, drain).
fn backend_io(b: &mut dyn Backend, op: Op, offset: u64, data: &mut [u8]) -> Result<(), i32> {
    let (a, c) = data.split_at_mut(data.len() / 2);
    let iov = vec![
        libc::iovec {
            iov_base: a.as_mut_ptr().cast(),
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: c.as_mut_ptr().cast(),
            iov_len: c.len(),
        },
    ];
    // SAFETY: `data` outlives the drain below, which hands out the completion.
    unsafe {
        b.queue(Io {
            tag: 7,
            op,
            offset,
            iov,
            discard_len: 0,
        })
    };
    b.submit().unwrap();
    let mut out = Vec::new();
    b.drain(&mut out).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].tag, 7);
    assert_eq!(b.in_flight(), 0);
    out[0].result.map_err(|e| e as i32)
}

#[test]
fn images_written_through_the_backend_convert_with_qemu_byte_for_byte() {
    if !qemu_img() {
        return;
    }
    let dir = scratch("qemu-write");
    let mut rng = Rng::new(4);
    for kind in ["ours-dynamic", "ours-fixed", "qemu-dynamic", "qemu-fixed"] {
        let path = dir.join(format!("{kind}.vhd"));
        let size: u64 = match kind {
            "ours-dynamic" => create_dynamic(&path, 12 << 20, None).unwrap().current_size,
            "ours-fixed" => create_fixed(&path, 6 << 20).unwrap().current_size,
            _ => {
                let sub = kind.trim_start_matches("qemu-");
                run(Command::new("qemu-img")
                    .args(["create", "-q", "-f", "vpc", "-o"])
                    .arg(format!("subformat={sub}"))
                    .arg(&path)
                    .arg("8M"));
                VhdImage::open(&path, false).unwrap().size()
            }
        };
        let spec: ImageSpec = format!("vhd:{}", path.display()).parse().unwrap();
        let mut model = vec![0u8; size as usize];
        {
            let mut b = backend::open(&spec, false).unwrap();
            assert_eq!(b.size(), size);
            assert!(b.features().flush && b.features().fua);
            for i in 0..10 {
                let len = 512 * (1 + rng.below(64) as usize) * 2;
                let off = rng.below((size - len as u64) / 512) * 512;
                let mut data = pattern(&mut rng, len);
                let op = if i % 3 == 0 { Op::WriteFua } else { Op::Write };
                backend_io(b.as_mut(), op, off, &mut data)
                    .unwrap_or_else(|e| panic!("{kind} {i} {op:?} {off} {len}: {e}"));
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            backend_io(b.as_mut(), Op::Flush, 0, &mut []).unwrap();
            let mut back = vec![0u8; size as usize];
            backend_io(b.as_mut(), Op::Read, 0, &mut back).unwrap();
            assert!(back == model, "{kind}: read back through the backend");
            assert!(b.features().discard, "{kind}: no parent, discard works");
        }
        let converted = to_raw(&path, &dir.join("out.raw"));
        assert!(converted == model, "{kind}: qemu-img reads what we wrote");
        let info = run(Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "vpc"])
            .arg(&path));
        assert!(
            info.contains(&format!("\"virtual-size\": {size}")),
            "{kind}: {info}"
        );
    }
}

#[test]
fn qemu_img_reads_images_we_create_with_their_size() {
    if !qemu_img() {
        return;
    }
    let dir = scratch("qemu-info");
    for size_mb in [1u64, 10, 100, 2048] {
        let path = dir.join(format!("{size_mb}.vhd"));
        create_dynamic(&path, size_mb << 20, None).unwrap();
        let info = run(Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "vpc"])
            .arg(&path));
        assert!(
            info.contains(&format!("\"virtual-size\": {}", size_mb << 20)),
            "{size_mb}M: {info}"
        );
    }
}

/// A chain of `depth` snapshots over a dynamic base, data written at every level.
fn build_chain(dir: &Path, depth: usize, rng: &mut Rng) -> (PathBuf, Vec<u8>) {
    let size = 8u64 << 20;
    let base = dir.join("base.vhd");
    create_dynamic(&base, size, None).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut leaf = base;
    for level in 0..=depth {
        if level > 0 {
            // Children in subdirectories every few levels, to resolve relative paths.
            let sub = dir.join(format!("d{}", level / 4));
            std::fs::create_dir_all(&sub).unwrap();
            let child = sub.join(format!("c{level}.vhd"));
            snapshot(&child, &leaf, false).unwrap();
            leaf = child;
        }
        let mut chain = Chain::open(&leaf, true).unwrap();
        assert_eq!(chain.layers().len(), level + 1);
        for _ in 0..3 {
            let len = 512 * (1 + rng.below(16) as usize);
            let off = rng.below((size - len as u64) / 512) * 512;
            let data = pattern(rng, len);
            chain.write(off, &data).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        chain.flush().unwrap();
    }
    (leaf, model)
}

#[test]
fn chains_read_through_the_leaf_check_clean_and_coalesce() {
    let mut rng = Rng::new(5);
    for depth in [1, 2, 30] {
        let dir = scratch(&format!("chain{depth}"));
        let (leaf, model) = build_chain(&dir, depth, &mut rng);
        assert!(read_all(&leaf) == model, "depth {depth}: bytes");
        assert!(check(&leaf).is_empty(), "{:?}", check(&leaf));
        let parent = Chain::open(&leaf, false).unwrap().layers()[1]
            .path()
            .to_path_buf();
        let copied = coalesce(&leaf).unwrap();
        assert!(copied > 0);
        assert!(
            read_all(&parent) == model,
            "depth {depth}: coalesced parent"
        );
        assert!(
            read_all(&leaf) == model,
            "depth {depth}: leaf after coalesce"
        );
        assert!(check(&parent).is_empty());
    }
}

#[test]
fn raw_parents_serve_what_a_child_lacks() {
    let dir = scratch("rawparent");
    let mut rng = Rng::new(6);
    let raw = dir.join("base.raw");
    let mut model = pattern(&mut rng, 4 << 20);
    std::fs::write(&raw, &model).unwrap();
    let child = dir.join("child.vhd");
    snapshot(&child, &raw, true).unwrap();
    assert!(read_all(&child) == model);
    let data = pattern(&mut rng, 4096);
    Chain::open(&child, true)
        .unwrap()
        .write(512 * 3, &data)
        .unwrap();
    model[1536..1536 + 4096].copy_from_slice(&data);
    assert!(read_all(&child) == model);
    assert!(
        std::fs::read(&raw).unwrap() != model,
        "the raw parent is untouched"
    );
    coalesce(&child).unwrap();
    assert!(
        std::fs::read(&raw).unwrap() == model,
        "coalesced into the raw file"
    );
}

fn corrupt(path: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

/// Rewrites the BAT entry of `block` (fixing nothing else).
fn set_bat(path: &Path, block: u32, sector: u32) {
    let image = VhdImage::open(path, false).unwrap();
    let at = image.header().unwrap().table_offset + u64::from(block) * 4;
    corrupt(path, at, &sector.to_be_bytes());
}

#[test]
fn malformed_images_are_refused_with_a_clear_error() {
    let dir = scratch("malformed");
    let fresh = |name: &str| {
        let p = dir.join(name);
        let _ = std::fs::remove_file(&p);
        create_dynamic(&p, 8 << 20, None).unwrap();
        Chain::open(&p, true).unwrap().write(0, &[1; 4096]).unwrap();
        p
    };
    let open = |p: &Path| Chain::open(p, false).unwrap_err();

    let p = fresh("checksum.vhd");
    let len = std::fs::metadata(&p).unwrap().len();
    corrupt(&p, len - 512 + 40, &[0xAB]);
    assert!(matches!(open(&p), VhdError::BadChecksum { .. }));
    let problems = check(&p);
    assert!(problems[0].contains("checksum"), "{problems:?}");
    assert!(problems[1].contains("footer copy"), "{problems:?}");

    // A header claiming blocks of 512 bytes for a huge disk.
    let p = fresh("huge.vhd");
    let mut image = std::fs::read(&p).unwrap();
    let mut f = VhdImage::open(&p, false).unwrap().footer().clone();
    f.current_size = 1 << 40;
    let mut h = VhdImage::open(&p, false).unwrap().header().unwrap().clone();
    h.block_size = 512;
    let n = image.len();
    image[n - 512..].copy_from_slice(&f.to_bytes());
    image[512..1536].copy_from_slice(&h.to_bytes());
    std::fs::write(&p, &image).unwrap();
    let e = open(&p);
    assert!(e.to_string().contains("blocks, more than"), "{e}");

    let p = fresh("header.vhd");
    corrupt(&p, 512 + 30, &[0xAB]);
    assert!(matches!(
        open(&p),
        VhdError::BadChecksum {
            what: "dynamic header",
            ..
        }
    ));

    let p = fresh("past-end.vhd");
    set_bat(&p, 1, 0x00F0_0000);
    let e = open(&p);
    assert!(matches!(e, VhdError::BadBat { block: 1, .. }), "{e}");
    assert!(e.to_string().contains("past the end"));
    assert!(!check(&p).is_empty());

    let p = fresh("into-metadata.vhd");
    set_bat(&p, 2, 1);
    assert!(open(&p).to_string().contains("metadata"));

    let p = fresh("overlap.vhd");
    Chain::open(&p, true)
        .unwrap()
        .write(2 << 20, &[2; 512])
        .unwrap();
    let first = VhdImage::open(&p, false).unwrap().bat()[0];
    set_bat(&p, 3, first + 8);
    assert!(open(&p).to_string().contains("overlaps another block"));

    let p = fresh("truncated.vhd");
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(1000).unwrap();
    assert!(matches!(
        open(&p),
        VhdError::BadCookie { .. } | VhdError::Truncated { .. }
    ));
    f.set_len(100).unwrap();
    assert!(matches!(open(&p), VhdError::Truncated { .. }));
    let data = std::fs::read(fresh("t2.vhd")).unwrap();
    // The footer kept but the BAT and blocks cut away.
    let p = dir.join("t3.vhd");
    let mut short = data[..1024].to_vec();
    short.extend_from_slice(&data[data.len() - 512..]);
    std::fs::write(&p, &short).unwrap();
    assert!(
        matches!(open(&p), VhdError::Truncated { .. }),
        "{}",
        open(&p)
    );
}

#[test]
fn broken_chains_are_refused() {
    let dir = scratch("badchain");
    let base = dir.join("base.vhd");
    create_dynamic(&base, 4 << 20, None).unwrap();
    let child = dir.join("child.vhd");
    snapshot(&child, &base, false).unwrap();
    assert_eq!(Chain::open(&child, false).unwrap().layers().len(), 2);

    // A different parent in its place: the UUID does not match.
    let saved = std::fs::read(&base).unwrap();
    std::fs::remove_file(&base).unwrap();
    let e = Chain::open(&child, false).unwrap_err();
    assert!(matches!(e, VhdError::ParentMissing { .. }), "{e}");
    assert_eq!(e.errno(), libc::ENOENT);
    create_dynamic(&base, 4 << 20, None).unwrap();
    let e = Chain::open(&child, false).unwrap_err();
    assert!(matches!(e, VhdError::ParentMismatch { .. }), "{e}");
    assert!(e.to_string().contains("UUID"));
    assert!(!check(&child).is_empty());

    // A parent larger than the child, with the right UUID (grown after the snapshot: VHDs
    // never shrink, so no resize makes such a chain).
    std::fs::write(&base, &saved).unwrap();
    super::create::resize(&base, 6 << 20).unwrap();
    let e = Chain::open(&child, false).unwrap_err();
    assert!(matches!(e, VhdError::ParentMismatch { .. }), "{e}");
    assert!(e.to_string().contains("larger"), "{e}");
    assert!(!check(&child).is_empty());
    std::fs::write(&base, &saved).unwrap();

    // A loop: the base made a differencing child of the child.
    let a = dir.join("a.vhd");
    let b = dir.join("b.vhd");
    snapshot(&a, &base, false).unwrap();
    snapshot(&b, &a, false).unwrap();
    // Overwrite a with a copy of b's header naming b as parent: a -> b -> a.
    let tmp = dir.join("tmp.vhd");
    snapshot(&tmp, &b, false).unwrap();
    std::fs::rename(&tmp, &a).unwrap();
    let e = Chain::open(&b, false).unwrap_err();
    assert!(
        matches!(
            e,
            VhdError::BadChain { .. } | VhdError::ParentMismatch { .. }
        ),
        "{e}"
    );
}

#[test]
fn a_chain_that_loops_is_refused() {
    // Two children naming each other, with matching UUIDs: only the loop check stops the walk.
    let dir = scratch("loop");
    let base = dir.join("base.vhd");
    create_dynamic(&base, 4 << 20, None).unwrap();
    let a = dir.join("a.vhd");
    snapshot(&a, &base, false).unwrap();
    let b = dir.join("b.vhd");
    snapshot(&b, &a, false).unwrap();
    // Make a's parent b: rewrite a's header with b's UUID and locators naming b.vhd.
    let tmp = dir.join("tmp.vhd");
    snapshot(&tmp, &b, false).unwrap();
    let a_footer = VhdImage::open(&a, false).unwrap().footer().clone();
    let mut bytes = std::fs::read(&tmp).unwrap();
    let fb = a_footer.to_bytes();
    let n = bytes.len();
    bytes[..512].copy_from_slice(&fb);
    bytes[n - 512..].copy_from_slice(&fb);
    std::fs::write(&a, &bytes).unwrap();
    let e = Chain::open(&b, false).unwrap_err();
    assert!(matches!(e, VhdError::BadChain { .. }), "{e}");
    assert!(e.to_string().contains("loops"), "{e}");
}

#[test]
fn random_corruption_never_panics() {
    let dir = scratch("fuzz");
    let base = dir.join("base.vhd");
    create_dynamic(&base, 4 << 20, None).unwrap();
    let child = dir.join("child.vhd");
    snapshot(&child, &base, false).unwrap();
    Chain::open(&child, true)
        .unwrap()
        .write(4096, &[9; 8192])
        .unwrap();
    let pristine = std::fs::read(&child).unwrap();
    let len = pristine.len() as u64;
    let mut rng = Rng::new(7);
    let mut refused = 0;
    for round in 0..400 {
        // Flip bytes in the metadata (first 8 KiB), a block's bitmap, or the footer.
        let mut changes = Vec::new();
        for _ in 0..1 + rng.below(4) {
            let at = match rng.below(3) {
                0 => rng.below(8192),
                1 => rng.below(len),
                _ => len - 1 - rng.below(512),
            };
            changes.push((at, rng.next_u64() as u8));
        }
        for &(at, v) in &changes {
            corrupt(&child, at, &[v]);
        }
        // The checksums catch most flips: also fix them up now and then, so the BAT, the
        // offsets and the locators are exercised.
        if round % 2 == 0 {
            fix_checksums(&child);
        }
        match Chain::open(&child, true) {
            Err(_) => refused += 1,
            Ok(mut chain) => {
                let size = chain.size();
                let mut buf = vec![0u8; size.min(8 << 20) as usize];
                let _ = chain.read(0, &mut buf);
                let _ = chain.write(0, &[1; 1024]);
                let _ = chain.write(size.saturating_sub(512), &[1; 512]);
            }
        }
        let _ = check(&child);
        std::fs::write(&child, &pristine).unwrap();
    }
    assert!(refused > 50, "only {refused} corrupt images refused");
}

/// Recomputes the footer and header checksums of `path` in place (after corruption).
fn fix_checksums(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    let n = b.len();
    if n < 1536 {
        return;
    }
    for range in [0..512, n - 512..n] {
        let f = &mut b[range];
        f[64..68].fill(0);
        let sum = super::checksum(f);
        f[64..68].copy_from_slice(&sum.to_be_bytes());
    }
    let h = &mut b[512..1536];
    h[36..40].fill(0);
    let sum = super::checksum(h);
    h[36..40].copy_from_slice(&sum.to_be_bytes());
    std::fs::write(path, &b).unwrap();
}

/// The writer of [`kill_9_during_allocating_writes_leaves_a_consistent_image`]: the data of
/// write `i` (seeded by `seed`).
fn crash_data(seed: u64, i: u64) -> (u64, Vec<u8>) {
    let mut rng = Rng::new(seed ^ (i + 1).wrapping_mul(0x9e37_79b9));
    // Distinct ranges, 1031 sectors apart: about four per 2 MiB block, the first allocating it.
    (i * 1031 * 512, {
        let len = 4096 + 512 * rng.below(8) as usize;
        pattern(&mut rng, len)
    })
}

const CRASH_ENV: &str = "BLKTAP_VHD_CRASH_WRITER";
const CRASH_WRITES: u64 = 120;

#[test]
#[ignore = "the writer process of kill_9_during_allocating_writes_leaves_a_consistent_image"]
fn crash_writer_process() {
    use std::io::Write;
    let Ok(arg) = std::env::var(CRASH_ENV) else {
        return;
    };
    let (seed, path) = arg.split_once(':').unwrap();
    let seed: u64 = seed.parse().unwrap();
    let mut chain = Chain::open(Path::new(path), true).unwrap();
    let mut out = std::io::stdout();
    for i in 0..CRASH_WRITES {
        let (off, data) = crash_data(seed, i);
        chain.write(off, &data).unwrap();
        writeln!(out, "ack {i}").unwrap();
        out.flush().unwrap();
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

#[test]
fn kill_9_during_allocating_writes_leaves_a_consistent_image() {
    use std::io::Read;
    let dir = scratch("crash");
    let exe = std::env::current_exe().unwrap();
    let mut rng = Rng::new(8);
    let mut killed_midway = 0;
    for round in 0..40u64 {
        // Even rounds: a differencing leaf over a sparse raw parent with 0x5A where the check
        // below looks; odd rounds: a dynamic disk on its own.
        let base = dir.join("base.raw");
        let leaf = dir.join("leaf.vhd");
        let _ = std::fs::remove_file(&base);
        let _ = std::fs::remove_file(&leaf);
        let expected_gap = if round % 2 == 0 {
            let raw = std::fs::File::create(&base).unwrap();
            raw.set_len(64 << 20).unwrap();
            for i in 0..CRASH_WRITES {
                raw.write_all_at(&[0x5A; 512], i * 1031 * 512 + 1030 * 512)
                    .unwrap();
            }
            snapshot(&leaf, &base, true).unwrap();
            0x5A
        } else {
            create_dynamic(&leaf, 64 << 20, None).unwrap();
            0
        };
        let seed = rng.next_u64();
        let mut child = Command::new(&exe)
            .args([
                "vhd::image_tests::crash_writer_process",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_ENV, format!("{seed}:{}", leaf.display()))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5 + rng.below(80)));
        child.kill().unwrap();
        child.wait().unwrap();
        let mut text = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        let acked: Vec<u64> = text
            .lines()
            .filter_map(|l| l.strip_prefix("ack ")?.trim().parse().ok())
            .collect();
        if (acked.len() as u64) < CRASH_WRITES {
            killed_midway += 1;
        }
        let problems = check(&leaf);
        assert!(problems.is_empty(), "round {round}: {problems:?}");
        let mut chain = Chain::open(&leaf, false).unwrap();
        for &i in &acked {
            let (off, data) = crash_data(seed, i);
            let mut back = vec![0u8; data.len()];
            chain.read(off, &mut back).unwrap();
            assert!(back == data, "round {round}: acknowledged write {i} lost");
        }
        // What was not written still reads as the parent's (or as zeros without one).
        let mut gap = vec![0u8; 512];
        for i in 0..CRASH_WRITES {
            chain.read(i * 1031 * 512 + 1030 * 512, &mut gap).unwrap();
            assert!(gap.iter().all(|&b| b == expected_gap), "round {round}");
        }
    }
    assert!(
        killed_midway >= 10,
        "only {killed_midway} rounds killed mid-way"
    );
    drop(dir);
}

#[test]
fn repair_rebuilds_a_lost_trailing_footer_from_its_copy() {
    let dir = scratch("repair");
    let p = dir.join("r.vhd");
    create_dynamic(&p, 8 << 20, None).unwrap();
    let mut rng = Rng::new(9);
    let data = pattern(&mut rng, 8192);
    Chain::open(&p, true)
        .unwrap()
        .write(4 << 20, &data)
        .unwrap();
    assert_eq!(super::repair::repair(&p).unwrap(), None);
    let len = std::fs::metadata(&p).unwrap().len();

    // The footer zeroed (a torn write), then the file cut inside the footer.
    corrupt(&p, len - 512, &[0; 512]);
    assert!(Chain::open(&p, false).is_err());
    let done = super::repair::repair(&p).unwrap().unwrap();
    assert!(done.contains("rebuilt"), "{done}");
    assert!(check(&p).is_empty(), "{:?}", check(&p));
    assert_eq!(std::fs::metadata(&p).unwrap().len(), len);
    assert!(read_all(&p)[4 << 20..(4 << 20) + 8192] == data[..]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    super::repair::repair(&p).unwrap().unwrap();
    assert!(check(&p).is_empty());
    assert!(read_all(&p)[4 << 20..(4 << 20) + 8192] == data[..]);

    // A damaged copy is rewritten from the footer.
    corrupt(&p, 10, &[0xFF]);
    assert!(!check(&p).is_empty());
    let done = super::repair::repair(&p).unwrap().unwrap();
    assert!(done.contains("copy"), "{done}");
    assert!(check(&p).is_empty());

    // A block cut off: its data is gone, repair says so and leaves the file.
    let cut = len - 512 - 4096;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let e = super::repair::repair(&p).unwrap_err();
    assert!(e.to_string().contains("data is lost"), "{e}");
    assert_eq!(std::fs::metadata(&p).unwrap().len(), cut);
}

/// A discard through the backend API.
fn backend_discard(b: &mut dyn Backend, offset: u64, len: u64) -> Result<(), i32> {
    // SAFETY: a discard has no buffers.
    unsafe {
        b.queue(Io {
            tag: 9,
            op: Op::Discard,
            offset,
            iov: Vec::new(),
            discard_len: len,
        })
    };
    b.submit().unwrap();
    let mut out = Vec::new();
    b.drain(&mut out).unwrap();
    out[0].result.map_err(|e| e as i32)
}

#[test]
fn discard_zeroes_and_frees_whole_blocks_of_a_leaf_without_parent() {
    let dir = scratch("discard");
    let mut rng = Rng::new(10);
    for kind in ["dynamic", "fixed"] {
        let p = dir.join(format!("{kind}.vhd"));
        let size = 12u64 << 20;
        if kind == "dynamic" {
            create_dynamic(&p, size, None).unwrap();
        } else {
            create_fixed(&p, size).unwrap();
        }
        let mut model = pattern(&mut rng, size as usize);
        let spec: ImageSpec = format!("vhd:{}", p.display()).parse().unwrap();
        let mut b = backend::open(&spec, false).unwrap();
        assert!(b.features().discard);
        backend_io(b.as_mut(), Op::Write, 0, &mut model.clone()).unwrap();
        backend_io(b.as_mut(), Op::Flush, 0, &mut []).unwrap();
        let used = std::fs::metadata(&p).unwrap().blocks() * 512;
        // Blocks 1 and 2 whole, and parts of blocks 0 and 3.
        let (off, len) = ((2 << 20) - 4096, (4 << 20) + 8192);
        backend_discard(b.as_mut(), off, len).unwrap();
        model[off as usize..(off + len) as usize].fill(0);
        let mut back = vec![0u8; size as usize];
        backend_io(b.as_mut(), Op::Read, 0, &mut back).unwrap();
        assert!(
            back == model,
            "{kind}: reads zeros where discarded, the rest kept"
        );
        assert_eq!(
            backend_discard(b.as_mut(), size - 512, 1024),
            Err(libc::EIO)
        );
        drop(b);
        assert!(read_all(&p) == model, "{kind}: after reopening");
        assert!(check(&p).is_empty(), "{kind}: {:?}", check(&p));
        let freed = used.saturating_sub(std::fs::metadata(&p).unwrap().blocks() * 512);
        if kind == "dynamic" {
            let image = VhdImage::open(&p, false).unwrap();
            assert_eq!(image.bat()[1], super::UNALLOCATED);
            assert_eq!(image.bat()[2], super::UNALLOCATED);
            assert_ne!(image.bat()[0], super::UNALLOCATED);
        }
        // Where the file system has holes, the two whole blocks' space is given back (but the
        // file system's pages the extents only partly cover).
        eprintln!("{kind}: {freed} bytes freed");
        if has_holes(&dir) {
            assert!(
                freed >= (4 << 20) - 4 * 4096,
                "{kind}: only {freed} bytes freed"
            );
        }
        if qemu_img() {
            assert!(
                to_raw(&p, &dir.join("d.raw")) == model,
                "{kind}: qemu-img agrees"
            );
        }
    }

    // A differencing leaf does not discard.
    let base = dir.join("dynamic.vhd");
    let leaf = dir.join("leaf.vhd");
    snapshot(&leaf, &base, false).unwrap();
    let spec: ImageSpec = format!("vhd:{}", leaf.display()).parse().unwrap();
    let mut b = backend::open(&spec, false).unwrap();
    assert!(!b.features().discard);
    assert_eq!(backend_discard(b.as_mut(), 0, 4096), Err(libc::EOPNOTSUPP));
}

/// Whether the file system of `dir` punches holes.
fn has_holes(dir: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let p = dir.join("holes");
    let f = std::fs::File::create(&p).unwrap();
    f.write_all_at(&[1; 65536], 0).unwrap();
    f.sync_all().unwrap();
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on our own file.
    unsafe { libc::fallocate(f.as_raw_fd(), mode, 0, 65536) == 0 }
}

/// A dynamic image laid out as XenServer's tools make them: creator `tap` 1.3, and a batmap
/// (header and one sector of map) after the BAT.
fn image_with_batmap(path: &Path, size: u64) {
    use super::footer::{DiskType, Footer};
    use super::header::Header;
    let entries = size.div_ceil(2 << 20) as u32;
    assert!(entries <= 128);
    let mut footer = Footer::new(DiskType::Dynamic, size, 512);
    footer.creator_version = 0x0001_0003;
    let header = Header::new(1536, entries, 2 << 20);
    let mut b = vec![0u8; 3072];
    b[..512].copy_from_slice(&footer.to_bytes());
    b[512..1536].copy_from_slice(&header.to_bytes());
    b[1536..2048].fill(0xff);
    b[2048..2056].copy_from_slice(b"tdbatmap");
    b[2056..2064].copy_from_slice(&2560u64.to_be_bytes());
    b[2064..2068].copy_from_slice(&1u32.to_be_bytes());
    b[2068..2072].copy_from_slice(&0x0001_0002u32.to_be_bytes());
    b[2072..2076].copy_from_slice(&super::checksum(&[0u8; 512]).to_be_bytes());
    b.extend_from_slice(&footer.to_bytes());
    std::fs::write(path, &b).unwrap();
}

#[test]
fn a_batmap_is_kept_out_of_the_blocks_way_and_checked() {
    let dir = scratch("batmap");
    let p = dir.join("b.vhd");
    image_with_batmap(&p, 8 << 20);
    let image = VhdImage::open(&p, false).unwrap();
    let batmap = image.batmap().unwrap();
    assert_eq!(
        (batmap.offset, batmap.bytes, batmap.problem.as_deref()),
        (2560, 512, None)
    );
    drop(image);
    let mut rng = Rng::new(12);
    let data = pattern(&mut rng, 8192);
    Chain::open(&p, true)
        .unwrap()
        .write(2 << 20, &data)
        .unwrap();
    assert!(read_all(&p)[2 << 20..(2 << 20) + 8192] == data[..]);
    assert!(check(&p).is_empty(), "{:?}", check(&p));
    let image = VhdImage::open(&p, false).unwrap();
    assert!(
        u64::from(image.bat()[1]) * 512 >= 3072,
        "the block is after the batmap"
    );
    assert!(
        !image.can_discard(),
        "a discard would leave the batmap's bit stale"
    );
    // The map is never changed: its checksum still holds.
    assert_eq!(std::fs::read(&p).unwrap()[2560..3072], [0u8; 512]);

    // A corrupt map is reported by check, and does not stop the image from opening.
    corrupt(&p, 2600, &[1]);
    let problems = check(&p);
    assert!(
        problems.len() == 1 && problems[0].contains("batmap: checksum"),
        "{problems:?}"
    );
    assert!(Chain::open(&p, false).is_ok());
    corrupt(&p, 2600, &[0]);
    // A version past 1.2 is one XenServer's tools refuse: check reports it.
    corrupt(&p, 2068, &0x0001_0003u32.to_be_bytes());
    let problems = check(&p);
    assert!(
        problems.len() == 1 && problems[0].contains("batmap: unsupported version 0x00010003"),
        "{problems:?}"
    );
    // Version 1.1 summed the map's bytes as signed chars.
    corrupt(&p, 2068, &0x0001_0001u32.to_be_bytes());
    corrupt(&p, 2600, &[0x80]);
    let signed = !(0u32.wrapping_sub(0x80));
    corrupt(&p, 2072, &signed.to_be_bytes());
    assert!(check(&p).is_empty(), "{:?}", check(&p));
    corrupt(&p, 2068, &0x0001_0002u32.to_be_bytes());
    assert!(check(&p)[0].contains("batmap: checksum"), "{:?}", check(&p));
    corrupt(&p, 2600, &[0]);
    corrupt(&p, 2072, &super::checksum(&[0u8; 512]).to_be_bytes());
    // A map off the sector grid is reported.
    corrupt(&p, 2056, &2561u64.to_be_bytes());
    assert!(
        check(&p)[0].contains("outside the metadata"),
        "{:?}",
        check(&p)
    );
    corrupt(&p, 2056, &2560u64.to_be_bytes());
    assert!(check(&p).is_empty(), "{:?}", check(&p));
    // A BAT entry into the batmap is refused.
    set_bat(&p, 2, 5);
    let e = Chain::open(&p, false).unwrap_err();
    assert!(e.to_string().contains("metadata"), "{e}");
}

#[test]
fn the_on_disk_layout_follows_the_specification() {
    // Pinned by hand, since qemu-img (which writes full bitmaps) cannot tell: sector bitmaps
    // are most significant bit first, BAT entries big-endian sector numbers, a block starts
    // with its bitmap (one sector for 2 MiB) and the footer follows the last block.
    let dir = scratch("layout");
    let base = dir.join("base.vhd");
    create_dynamic(&base, 4 << 20, None).unwrap();
    let child = dir.join("child.vhd");
    snapshot(&child, &base, false).unwrap();
    let before = std::fs::metadata(&child).unwrap().len();
    let mut chain = Chain::open(&child, true).unwrap();
    chain.write(0, &[0xA1; 512]).unwrap();
    chain.write(9 * 512, &[0xB2; 512]).unwrap();
    drop(chain);
    let bytes = std::fs::read(&child).unwrap();
    assert_eq!(bytes.len() as u64, before + 512 + (2 << 20));
    let table = VhdImage::open(&child, false)
        .unwrap()
        .header()
        .unwrap()
        .table_offset as usize;
    let entry = u32::from_be_bytes(bytes[table..table + 4].try_into().unwrap());
    assert_eq!(
        u64::from(entry) * 512,
        before - 512,
        "the block went where the footer was"
    );
    assert_eq!(&bytes[table + 4..table + 8], &[0xff; 4]);
    let block = entry as usize * 512;
    assert_eq!(bytes[block..block + 3], [0x80, 0x40, 0x00]);
    assert!(bytes[block + 512..block + 1024].iter().all(|&b| b == 0xA1));
    assert!(bytes[block + 512 + 9 * 512..block + 1024 + 9 * 512]
        .iter()
        .all(|&b| b == 0xB2));
    assert_eq!(&bytes[bytes.len() - 512..][..8], b"conectix");
    // A dynamic disk without parent marks its whole new block present.
    let mut chain = Chain::open(&base, true).unwrap();
    chain.write(512, &[1; 512]).unwrap();
    drop(chain);
    let image = VhdImage::open(&base, false).unwrap();
    let bytes = std::fs::read(&base).unwrap();
    let block = image.bat()[0] as usize * 512;
    assert!(bytes[block..block + 512].iter().all(|&b| b == 0xff));
}

#[test]
fn overlapping_random_writes_in_a_chain_match_a_model() {
    // Many writes, overlapping each other and block boundaries, in a leaf over a parent with
    // data: every read of the whole disk matches the model, before and after reopening.
    let dir = scratch("model");
    let base = dir.join("base.vhd");
    let size = 6u64 << 20;
    create_dynamic(&base, size, None).unwrap();
    let mut rng = Rng::new(13);
    let mut model = vec![0u8; size as usize];
    let write = |path: &Path, rng: &mut Rng, model: &mut [u8], n: usize| {
        let mut chain = Chain::open(path, true).unwrap();
        for _ in 0..n {
            let len = 512 * (1 + rng.below(40) as usize);
            let off = rng.below((size - len as u64) / 512 + 1) * 512;
            let data = pattern(rng, len);
            chain.write(off, &data).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        let mut back = vec![0u8; size as usize];
        chain.read(0, &mut back).unwrap();
        assert!(back == model);
    };
    write(&base, &mut rng, &mut model, 40);
    let leaf = dir.join("leaf.vhd");
    snapshot(&leaf, &base, false).unwrap();
    // A write, then one overlapping its end within a block: both sets of sectors are the leaf's.
    let mut chain = Chain::open(&leaf, true).unwrap();
    chain.write(0, &[7; 2048]).unwrap();
    chain.write(1024, &[8; 4096]).unwrap();
    model[..1024].fill(7);
    model[1024..5120].fill(8);
    drop(chain);
    write(&leaf, &mut rng, &mut model, 300);
    assert!(read_all(&leaf) == model, "after reopening");
    assert!(check(&leaf).is_empty());
}

/// Random whole-sector ranges of `model`, many of them across `edge` (a parent's end), read
/// through the chain at `leaf` and compared with the model.
fn reads_match_around(leaf: &Path, model: &[u8], edge: u64, rng: &mut Rng) {
    let mut chain = Chain::open(leaf, false).unwrap();
    assert_eq!(chain.size(), model.len() as u64);
    let sectors = model.len() as u64 / 512;
    for i in 0..200 {
        let len = 1 + rng.below(64.min(sectors));
        let first = if i % 2 == 0 {
            // Straddling the edge (or touching it from either side).
            (edge / 512)
                .saturating_sub(rng.below(len + 1))
                .min(sectors - len)
        } else {
            rng.below(sectors - len + 1)
        };
        let (off, n) = ((first * 512) as usize, (len * 512) as usize);
        let mut buf = vec![0xa5u8; n];
        chain.read(off as u64, &mut buf).unwrap();
        assert!(buf == model[off..off + n], "{off}+{n} (edge {edge})");
    }
    let mut all = vec![0u8; model.len()];
    chain.read(0, &mut all).unwrap();
    assert!(all == model, "the whole disk");
}

#[test]
fn a_parent_smaller_than_its_child_reads_zeros_past_its_end() {
    let dir = scratch("smallparent");
    let mut rng = Rng::new(12);
    // A parent whose size is not a whole number of blocks, full of data up to its last sector.
    let psize = (3 << 20) + 5 * 512;
    let base = dir.join("base.vhd");
    create_dynamic(&base, psize, None).unwrap();
    let mut pdata = pattern(&mut rng, psize as usize);
    pdata[..512].fill(0);
    Chain::open(&base, true).unwrap().write(0, &pdata).unwrap();
    let child = dir.join("child.vhd");
    snapshot(&child, &base, false).unwrap();
    // The child resized after its snapshot, as XenServer resizes a disk.
    let csize = (7 << 20) + 1024;
    resize(&child, csize).unwrap();
    assert_eq!(VhdImage::open(&child, false).unwrap().size(), csize);
    assert!(check(&child).is_empty(), "{:?}", check(&child));
    let mut model = pdata.clone();
    model.resize(csize as usize, 0);
    reads_match_around(&child, &model, psize, &mut rng);

    // Writes before, across and past the parent's end, then reads across it again.
    {
        let mut chain = Chain::open(&child, true).unwrap();
        for (off, len) in [
            (psize - 1024, 4096),
            (psize + 512, 512),
            (csize - 8192, 8192),
            (1 << 20, 2048),
            (4 << 20, 64 << 10),
        ] {
            let data = pattern(&mut rng, len as usize);
            chain.write(off, &data).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        chain.flush().unwrap();
    }
    reads_match_around(&child, &model, psize, &mut rng);
    assert!(check(&child).is_empty(), "{:?}", check(&child));
    assert!(
        std::fs::read(&base).unwrap().len() as u64
            == VhdImage::open(&base, false).unwrap().physical_size()
            && read_all(&base) == pdata,
        "the parent is untouched"
    );

    // Coalescing grows the parent to the child's size and keeps every byte.
    assert!(coalesce(&child).unwrap() > 0);
    assert_eq!(VhdImage::open(&base, false).unwrap().size(), csize);
    assert!(check(&base).is_empty(), "{:?}", check(&base));
    assert!(read_all(&base) == model, "the coalesced parent");
    assert!(read_all(&child) == model, "the child after the coalesce");
    if qemu_img() {
        let info = run(Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "vpc"])
            .arg(&child));
        assert!(
            info.contains(&format!("\"virtual-size\": {csize}")),
            "{info}"
        );
        assert!(
            to_raw(&base, &dir.join("base.raw")) == model,
            "qemu-img reads the coalesced parent as the chain read"
        );
    }
}

#[test]
fn a_chain_growing_at_every_level_reads_and_coalesces_through_each_end() {
    let dir = scratch("growchain");
    let mut rng = Rng::new(13);
    let sizes = [2u64 << 20, (5 << 20) - 512, 9 << 20];
    let mut leaf = dir.join("l0.vhd");
    create_dynamic(&leaf, sizes[0], None).unwrap();
    let mut model = vec![0u8; sizes[0] as usize];
    let mut paths = vec![leaf.clone()];
    for (level, &size) in sizes.iter().enumerate() {
        if level > 0 {
            let child = dir.join(format!("l{level}.vhd"));
            snapshot(&child, &leaf, false).unwrap();
            resize(&child, size).unwrap();
            model.resize(size as usize, 0);
            leaf = child;
            paths.push(leaf.clone());
        }
        let mut chain = Chain::open(&leaf, true).unwrap();
        // Data at the end of this level (past its parent's end).
        let len = 4096u64;
        let off = size - len;
        let data = pattern(&mut rng, len as usize);
        chain.write(off, &data).unwrap();
        model[off as usize..].copy_from_slice(&data);
        chain.flush().unwrap();
    }
    for &edge in &sizes[..2] {
        reads_match_around(&leaf, &model, edge, &mut rng);
    }
    assert!(check(&leaf).is_empty(), "{:?}", check(&leaf));
    // Coalesce from the leaf down: each parent grows to its child's size.
    coalesce(&paths[2]).unwrap();
    coalesce(&paths[1]).unwrap();
    assert!(
        read_all(&paths[0]) == model,
        "the base holds the chain's bytes"
    );
    assert!(check(&paths[0]).is_empty(), "{:?}", check(&paths[0]));
    if qemu_img() {
        assert!(
            to_raw(&paths[0], &dir.join("b.raw")) == model,
            "qemu-img agrees"
        );
    }
}

#[test]
fn a_raw_parent_smaller_than_its_child_reads_zeros_and_grows_at_coalesce() {
    let dir = scratch("smallraw");
    let mut rng = Rng::new(14);
    let raw = dir.join("base.raw");
    let mut model = pattern(&mut rng, 3 << 20);
    std::fs::write(&raw, &model).unwrap();
    let child = dir.join("child.vhd");
    snapshot(&child, &raw, true).unwrap();
    resize(&child, 6 << 20).unwrap();
    model.resize(6 << 20, 0);
    reads_match_around(&child, &model, 3 << 20, &mut rng);
    let data = pattern(&mut rng, 8192);
    let off = (3 << 20) - 4096;
    Chain::open(&child, true)
        .unwrap()
        .write(off as u64, &data)
        .unwrap();
    model[off..off + 8192].copy_from_slice(&data);
    reads_match_around(&child, &model, 3 << 20, &mut rng);
    assert!(check(&child).is_empty(), "{:?}", check(&child));
    coalesce(&child).unwrap();
    assert!(
        std::fs::read(&raw).unwrap() == model,
        "the raw parent grew and holds the bytes"
    );
}

#[test]
fn grow_stays_within_the_bat_and_keeps_the_data() {
    let dir = scratch("resize");
    let mut rng = Rng::new(15);
    let d = dir.join("d.vhd");
    create_dynamic(&d, 4 << 20, None).unwrap();
    let data = pattern(&mut rng, 4 << 20);
    Chain::open(&d, true).unwrap().write(0, &data).unwrap();
    // A BAT of 2 entries in one sector: room for 128 blocks of 2 MiB.
    resize(&d, 256 << 20).unwrap();
    let all = read_all(&d);
    assert!(all[..4 << 20] == data[..] && all[4 << 20..].iter().all(|&b| b == 0));
    assert!(check(&d).is_empty(), "{:?}", check(&d));
    // `grow` never moves the BAT (`resize` does, under a journal: tests below).
    let e = VhdImage::open(&d, true)
        .unwrap()
        .grow((256 << 20) + (2 << 20))
        .unwrap_err();
    assert!(e.to_string().contains("room"), "{e}");
    let e = resize(&d, 8 << 20).unwrap_err();
    assert!(e.to_string().contains("only growing"), "{e}");
    resize(&d, 256 << 20).unwrap();
    // More room with -S.
    let big = dir.join("big.vhd");
    create_dynamic(&big, 4 << 20, Some(1 << 30)).unwrap();
    resize(&big, 1 << 30).unwrap();
    assert_eq!(VhdImage::open(&big, false).unwrap().size(), 1 << 30);
    let f = dir.join("f.vhd");
    create_fixed(&f, 1 << 20).unwrap();
    assert!(resize(&f, 2 << 20)
        .unwrap_err()
        .to_string()
        .contains("fixed"));
    // A BAT entry past the end that is in use (hostile) is not grown over.
    let h = dir.join("h.vhd");
    create_dynamic(&h, 4 << 20, Some(8 << 20)).unwrap();
    set_bat(&h, 3, 3);
    let e = resize(&h, 8 << 20).unwrap_err();
    assert!(matches!(e, VhdError::BadBat { .. }), "{e}");
    if qemu_img() {
        let info = run(Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "vpc"])
            .arg(&d));
        assert!(
            info.contains(&format!("\"virtual-size\": {}", 256u64 << 20)),
            "{info}"
        );
    }
}

/// Ranges written into a disk (offset, bytes; a later one over an earlier one), to check reads of a large disk
/// without holding all of it.
struct Written(Vec<(u64, Vec<u8>)>);

impl Written {
    /// Writes `ranges` (offset, length) of pattern data through the chain of `path`.
    fn write(path: &Path, ranges: &[(u64, usize)], rng: &mut Rng) -> Written {
        let mut chain = Chain::open(path, true).unwrap();
        let mut out = Vec::new();
        for &(off, len) in ranges {
            let data = pattern(rng, len);
            chain.write(off, &data).unwrap();
            out.push((off, data));
        }
        chain.flush().unwrap();
        Written(out)
    }

    /// What `[off, off + len)` holds: zeros but for the ranges written.
    fn expected(&self, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        let end = off + len as u64;
        for (at, data) in &self.0 {
            let (a, b) = ((*at).max(off), (at + data.len() as u64).min(end));
            if a < b {
                v[(a - off) as usize..(b - off) as usize]
                    .copy_from_slice(&data[(a - at) as usize..(b - at) as usize]);
            }
        }
        v
    }

    /// Checks reads of `path`: every range written and its surroundings, then the whole disk
    /// (`full`) or pieces of it (the start, around `old_size`, the end, random places).
    fn check_reads(&self, path: &Path, old_size: u64, full: bool, rng: &mut Rng) {
        let mut chain = Chain::open(path, false).unwrap();
        let size = chain.size();
        let mut places: Vec<(u64, usize)> = self
            .0
            .iter()
            .map(|(at, d)| {
                let a = at.saturating_sub(4096);
                (a, ((at + d.len() as u64 + 4096).min(size) - a) as usize)
            })
            .collect();
        if full {
            let chunk = 32u64 << 20;
            places.extend((0..size.div_ceil(chunk)).map(|i| {
                let a = i * chunk;
                (a, chunk.min(size - a) as usize)
            }));
        } else {
            places.push((0, 1 << 20));
            let at = old_size - (1 << 20);
            places.push((at, (2 << 20).min(size - at) as usize));
            places.push((size - (4 << 20), 4 << 20));
            for _ in 0..16 {
                places.push((rng.below((size >> 20) - 1) << 20, 1 << 20));
            }
        }
        for (off, len) in places {
            let mut buf = vec![0u8; len];
            chain.read(off, &mut buf).unwrap();
            assert!(
                buf == self.expected(off, len),
                "{}: {len} bytes at {off:#x}",
                path.display()
            );
        }
    }

    /// Checks that qemu-img reads `path` as this: converted to raw (`convert`), or compared with
    /// a sparse raw model (a disk too large to convert quickly).
    fn check_with_qemu(&self, path: &Path, size: u64, convert: bool) {
        let raw = path.with_extension("raw");
        let _ = std::fs::remove_file(&raw);
        if convert {
            run(Command::new("qemu-img")
                .args(["convert", "-f", "vpc", "-O", "raw"])
                .arg(path)
                .arg(&raw));
            let f = std::fs::File::open(&raw).unwrap();
            assert_eq!(f.metadata().unwrap().len(), size);
            let chunk = 32u64 << 20;
            let mut buf = vec![0u8; chunk as usize];
            for i in 0..size.div_ceil(chunk) {
                let n = chunk.min(size - i * chunk) as usize;
                f.read_exact_at(&mut buf[..n], i * chunk).unwrap();
                assert!(
                    buf[..n] == self.expected(i * chunk, n)[..],
                    "qemu-img reads {} differently in {n} bytes at {:#x}",
                    path.display(),
                    i * chunk
                );
            }
        } else {
            let f = std::fs::File::create(&raw).unwrap();
            f.set_len(size).unwrap();
            for (at, data) in &self.0 {
                f.write_all_at(data, *at).unwrap();
            }
            drop(f);
            run(Command::new("qemu-img")
                .args(["compare", "-f", "vpc", "-F", "raw"])
                .arg(path)
                .arg(&raw));
        }
        std::fs::remove_file(&raw).unwrap();
    }
}

/// The end of the BAT of the image at `path`.
fn bat_end(path: &Path) -> u64 {
    let image = VhdImage::open(path, false).unwrap();
    let h = image.header().unwrap();
    h.table_offset + (u64::from(h.max_table_entries) * 4).next_multiple_of(512)
}

/// Checks the layout of the image at `path` that XenServer's vhd-util gives a disk grown past
/// its BAT's room: the batmap (if any) right after the BAT, its map right after its header; the
/// parent locators after the BAT right after those, in file order, each in its reserved space
/// (in whole sectors); every block after the end of all that metadata; and `check` clean.
fn assert_grown_layout(path: &Path) {
    let image = VhdImage::open(path, false).unwrap();
    let h = image.header().unwrap();
    let end = bat_end(path);
    let mut at = match image.batmap() {
        Some(b) => {
            assert_eq!(
                b.offset,
                end + 512,
                "the map right after the batmap's header"
            );
            b.offset + b.bytes
        }
        None => end,
    };
    let mut locators: Vec<_> = h
        .locators
        .iter()
        .filter(|l| l.code != 0 && l.data_offset >= h.table_offset)
        .collect();
    locators.sort_by_key(|l| l.data_offset);
    for l in locators {
        assert_eq!(
            l.data_offset, at,
            "the locators right after the BAT and batmap: {l:?}"
        );
        at += l.reserved_bytes().next_multiple_of(512);
    }
    assert_eq!(image.end_of_metadata(), at);
    for (block, &s) in image.bat().iter().enumerate() {
        assert!(
            s == super::UNALLOCATED || u64::from(s) * 512 >= at,
            "block {block} at sector {s} starts before the end of the metadata at {at:#x}"
        );
    }
    drop(image);
    assert!(check(path).is_empty(), "{:?}", check(path));
}

/// A dynamic disk of 16 MiB with data in four blocks, allocated so that block 3 lies right
/// after the BAT, then blocks 0, 7 (the disk's last bytes) and 5.
fn dynamic_with_data(path: &Path, rng: &mut Rng) -> Written {
    const MB: u64 = 1 << 20;
    create_dynamic(path, 16 * MB, None).unwrap();
    let written = Written::write(
        path,
        &[
            (6 * MB + 4096, 64 << 10),
            (0, 2 << 20),
            (16 * MB - 8192, 8192),
            (10 * MB + 512, 512),
        ],
        rng,
    );
    let image = VhdImage::open(path, false).unwrap();
    assert_eq!(
        u64::from(image.bat()[3]) * 512,
        (bat_end(path) + 512).next_multiple_of(4096) - 512,
        "block 3 is right after the BAT"
    );
    written
}

#[test]
fn resize_past_the_bat_room_moves_the_blocks_in_its_way() {
    let dir = scratch("grow");
    let mut rng = Rng::new(16);
    let orig = dir.join("orig.vhd");
    let written = dynamic_with_data(&orig, &mut rng);
    let old_bat_end = bat_end(&orig);
    let first_block = VhdImage::open(&orig, false).unwrap().bat()[3];
    // 4 GiB: a BAT of 8 KiB moves block 3; 64 GiB: 128 KiB, block 3; 1.5 TiB: 3 MiB, blocks 3
    // and 0.
    for (size, moved) in [(4u64 << 30, 1usize), (64 << 30, 1), (1536 << 30, 2)] {
        let d = dir.join(format!("d{}g.vhd", size >> 30));
        std::fs::copy(&orig, &d).unwrap();
        let before = VhdImage::open(&d, false).unwrap().bat().to_vec();
        resize(&d, size).unwrap();
        assert!(
            !super::journal::default_path(&d).exists(),
            "the journal is removed"
        );
        let image = VhdImage::open(&d, false).unwrap();
        assert_eq!(image.size(), size);
        let blocks = size / (2 << 20);
        assert_eq!(u64::from(image.header().unwrap().max_table_entries), blocks);
        let end = bat_end(&d);
        assert!(end > old_bat_end);
        let bat = image.bat();
        assert_eq!(bat.len() as u64, blocks);
        assert!(bat[8..].iter().all(|&e| e == super::UNALLOCATED));
        let changed = (0..8).filter(|&i| bat[i] != before[i]).count();
        assert_eq!(changed, moved, "blocks moved out of the BAT's way");
        assert!(bat[3] != first_block && u64::from(bat[3]) * 512 >= end);
        assert!(
            (u64::from(bat[3]) * 512 + 512).is_multiple_of(4096),
            "a moved block's data is 4 KiB aligned"
        );
        drop(image);
        assert_grown_layout(&d);
        written.check_reads(&d, 16 << 20, size <= 4 << 30, &mut rng);
        if qemu_img() {
            written.check_with_qemu(&d, size, size <= 4 << 30);
        }
    }
    // A grown image takes writes past its old end and grows again.
    let d = dir.join("d4g.vhd");
    let mut more = Written::write(
        &d,
        &[
            (3 << 30, 1 << 20),
            ((4 << 30) - 4096, 4096),
            (8 << 20, 4096),
        ],
        &mut rng,
    );
    // Later ranges over earlier ones: `expected` lays them in order.
    let mut all = written;
    all.0.append(&mut more.0);
    let more = all;
    resize(&d, 256 << 30).unwrap();
    assert_grown_layout(&d);
    more.check_reads(&d, 4 << 30, false, &mut rng);
    if qemu_img() {
        more.check_with_qemu(&d, 256 << 30, false);
    }
}

/// Each locator of differencing image `child` names `parent`.
fn locators_name(child: &Path, parent: &Path) {
    let image = VhdImage::open(child, false).unwrap();
    let parent = std::fs::canonicalize(parent).unwrap();
    let dir = child.parent().unwrap();
    let mut n = 0;
    for l in image
        .header()
        .unwrap()
        .locators
        .iter()
        .filter(|l| l.code != 0)
    {
        let text = image
            .locator_data(l)
            .and_then(|d| l.decode(&d))
            .unwrap_or_else(|| panic!("locator {l:?} does not decode"));
        let p = Path::new(&text);
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            dir.join(p)
        };
        assert_eq!(
            std::fs::canonicalize(&p).ok(),
            Some(parent.clone()),
            "{l:?}"
        );
        n += 1;
    }
    assert_eq!(n, 3);
}

/// A base of 16 MiB with data, and a child with data of its own whose first block lies right
/// after its locators.
fn child_with_data(dir: &Path, rng: &mut Rng) -> (PathBuf, PathBuf, Written) {
    let base = dir.join("base.vhd");
    let mut written = dynamic_with_data(&base, rng);
    let child = dir.join("child.vhd");
    snapshot(&child, &base, false).unwrap();
    let mine = Written::write(&child, &[(6 << 20, 8192), (14 << 20, 1 << 20)], rng);
    written.0.extend(mine.0);
    (base, child, written)
}

/// Moves the data of locator `index` of the image at `path` past its blocks (the trailing
/// footer after it), as the resize of earlier versions did; returns the new end of the metadata.
fn put_locator_past_the_blocks(path: &Path, index: usize) -> u64 {
    let image = VhdImage::open(path, false).unwrap();
    let l = image.header().unwrap().locators[index];
    drop(image);
    let mut b = std::fs::read(path).unwrap();
    let n = b.len() - 512;
    let footer = b[n..].to_vec();
    let from = l.data_offset as usize;
    let data = b[from..from + l.reserved_bytes() as usize].to_vec();
    b.truncate(n);
    b.extend_from_slice(&data);
    b.extend_from_slice(&footer);
    let at = 512 + 576 + 24 * index + 16;
    b[at..at + 8].copy_from_slice(&(n as u64).to_be_bytes());
    std::fs::write(path, &b).unwrap();
    fix_checksums(path);
    let end = (n + data.len()) as u64;
    assert_eq!(VhdImage::open(path, false).unwrap().end_of_metadata(), end);
    end
}

#[test]
fn check_reports_a_block_before_the_end_of_the_metadata() {
    let dir = scratch("check-eoh");
    let mut rng = Rng::new(23);
    let (_, child, written) = child_with_data(&dir, &mut rng);
    assert!(check(&child).is_empty(), "{:?}", check(&child));
    // Locator 2's data moved past the blocks: the image reads the same and opens (nothing
    // overlaps), but its blocks start before the end of its metadata, which XenServer's
    // vhd-util check refuses ("block N clobbers headers").
    let image = VhdImage::open(&child, false).unwrap();
    let allocated = image
        .bat()
        .iter()
        .filter(|&&s| s != super::UNALLOCATED)
        .count();
    let first = (0..image.bat().len())
        .find(|&i| image.bat()[i] != super::UNALLOCATED)
        .unwrap();
    drop(image);
    let end = put_locator_past_the_blocks(&child, 2);
    let problems = check(&child);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(allocated, 2);
    assert!(
        problems[0].contains(&format!("block {first} at "))
            && problems[0].contains(&format!(
                "starts before the end of the metadata at {end:#x} (and 1 other block)"
            ))
            && problems[0].contains(&format!("block {first} clobbers headers")),
        "{problems:?}"
    );
    written.check_reads(&child, 16 << 20, true, &mut rng);
}

#[test]
fn a_resize_past_the_room_puts_a_locator_left_past_the_blocks_after_the_bat() {
    // What the resize of earlier versions left (a locator past the blocks): the next resize
    // past the room lays the metadata out again, each step valid, revert byte for byte.
    let dir = scratch("grow-legacy");
    let mut rng = Rng::new(24);
    let (base, child, written) = child_with_data(&dir, &mut rng);
    put_locator_past_the_blocks(&child, 2);
    let before = VhdImage::open(&child, false).unwrap().bat().to_vec();
    crash_after_each_step(&child, 4 << 30, &written, &mut rng, true);
    locators_name(&child, &base);
    // The locators staged on the way wait right after the new metadata, not past the blocks:
    // only the block in the way of the new metadata moves (block 3, right after the old
    // locators), not block 7 after it.
    let after = VhdImage::open(&child, false).unwrap().bat().to_vec();
    let moved: Vec<usize> = (0..before.len())
        .filter(|&i| before[i] != super::UNALLOCATED && before[i] != after[i])
        .collect();
    assert_eq!(moved, [3]);
    let (bbase, bchild, written) = batmap_child_with_data(&dir, &mut rng);
    put_locator_past_the_blocks(&bchild, 0);
    crash_after_each_step(&bchild, 512 << 20, &written, &mut rng, true);
    locators_name(&bchild, &bbase);
}

#[test]
fn a_child_grown_past_its_bat_room_keeps_its_locators_and_data() {
    let dir = scratch("grow-child");
    let mut rng = Rng::new(17);
    let (base, child, written) = child_with_data(&dir, &mut rng);
    let image = VhdImage::open(&child, false).unwrap();
    let old_locators = image.header().unwrap().locators;
    drop(image);
    resize(&child, 4 << 30).unwrap();
    let image = VhdImage::open(&child, false).unwrap();
    let end = bat_end(&child);
    for (old, new) in old_locators
        .iter()
        .zip(&image.header().unwrap().locators)
        .filter(|(l, _)| l.code != 0)
    {
        assert!(
            old.data_offset < end && new.data_offset >= end,
            "the locator moved out of the BAT's way: {old:?} {new:?}"
        );
        assert!(new.data_offset.is_multiple_of(512), "{new:?}");
        assert_eq!(
            (old.code, old.data_len, old.data_space),
            (new.code, new.data_len, new.data_space)
        );
    }
    drop(image);
    assert_grown_layout(&child);
    locators_name(&child, &base);
    let chain = Chain::open(&child, false).unwrap();
    assert_eq!(chain.layers().len(), 2);
    assert_eq!(chain.size(), 4 << 30);
    drop(chain);
    written.check_reads(&child, 16 << 20, false, &mut rng);
    // The base is left as it was, until the child is coalesced into it: then it grows past
    // its BAT's room too.
    assert_eq!(VhdImage::open(&base, false).unwrap().size(), 16 << 20);
    let far = Written::write(&child, &[((4 << 30) - (1 << 20), 1 << 20)], &mut rng);
    let mut written = written;
    written.0.extend(far.0);
    coalesce(&child).unwrap();
    assert!(!super::journal::default_path(&base).exists());
    assert_eq!(VhdImage::open(&base, false).unwrap().size(), 4 << 30);
    assert_grown_layout(&base);
    written.check_reads(&base, 16 << 20, false, &mut rng);
    written.check_reads(&child, 16 << 20, false, &mut rng);
}

/// Plays a crash after each step of a resize of `image` to `size`: the image is a valid VHD
/// at every step, a resize refuses while the journal is there, and reverting restores it byte
/// for byte. Then the resize run to its end leaves the new image, laid out as XenServer's
/// vhd-util lays it out, and no journal. `clobbered`: the image has blocks before the end of
/// its metadata (a locator past them), which `check` reports until the header points at the
/// locators' new places.
fn crash_after_each_step(
    image: &Path,
    size: u64,
    written: &Written,
    rng: &mut Rng,
    clobbered: bool,
) {
    use super::image::Step;
    let orig = std::fs::read(image).unwrap();
    let old = VhdImage::open(image, false).unwrap();
    let (old_size, old_batmap) = (old.size(), old.batmap().cloned());
    drop(old);
    let journal = super::journal::default_path(image);
    for step in Step::ALL {
        VhdImage::open(image, true)
            .unwrap()
            .resize_stopping(size, &journal, Some(step))
            .unwrap();
        assert!(journal.exists(), "{step:?}: the journal is there");
        let grown = matches!(step, Step::Footer | Step::FooterCopy);
        let now = VhdImage::open(image, false).unwrap_or_else(|e| panic!("{step:?}: {e}"));
        assert_eq!(now.size(), if grown { size } else { old_size }, "{step:?}");
        // A batmap: the old one (in its place) until the grown BAT is written over its header,
        // none until the header counts the new entries, then the new one after the grown BAT.
        if let Some(b) = &old_batmap {
            match (step, now.batmap()) {
                (Step::Bat | Step::Metadata, None) => {}
                (
                    Step::Journal | Step::Copy | Step::Repoint | Step::Stage | Step::Restage,
                    Some(now),
                ) => assert_eq!((now.offset, now.bytes), (b.offset, b.bytes), "{step:?}"),
                (Step::Header | Step::Footer | Step::FooterCopy, Some(now)) => {
                    assert!(now.offset > b.offset, "{step:?}")
                }
                (_, now) => panic!("{step:?}: {now:?}"),
            }
        }
        drop(now);
        if step == Step::Journal {
            assert!(
                std::fs::read(image).unwrap() == orig,
                "the image is untouched"
            );
        }
        // The image is valid at every step, but the journal is left: `check` names it (and
        // only it, but for the footer copy not yet rewritten after the footer), as `tapdisk`
        // refuses it.
        let mut problems = check(image);
        if clobbered && !matches!(step, Step::Header | Step::Footer | Step::FooterCopy) {
            let last = problems.pop().unwrap_or_default();
            assert!(last.contains("clobbers headers"), "{step:?}: {last}");
        }
        let stale_copy = step == Step::Footer;
        assert!(
            problems.len() == 1 + usize::from(stale_copy)
                && problems[0].contains("vhd-util revert")
                && (!stale_copy || problems[1].contains("footer copy at offset 0 differs")),
            "{step:?}: {problems:?}"
        );
        written.check_reads(image, old_size, false, rng);
        let e = resize(image, size).unwrap_err();
        assert!(e.to_string().contains("vhd-util revert"), "{e}");
        super::create::revert(image, &journal).unwrap();
        assert!(!journal.exists(), "{step:?}: revert removes the journal");
        assert!(
            std::fs::read(image).unwrap() == orig,
            "{step:?}: revert restores the image byte for byte"
        );
    }
    resize(image, size).unwrap();
    assert!(!journal.exists());
    assert_eq!(VhdImage::open(image, false).unwrap().size(), size);
    assert_grown_layout(image);
    written.check_reads(image, old_size, false, rng);
}

#[test]
fn a_resize_cut_short_after_any_step_reverts_byte_for_byte() {
    let dir = scratch("grow-crash");
    let mut rng = Rng::new(18);
    let d = dir.join("d.vhd");
    let written = dynamic_with_data(&d, &mut rng);
    crash_after_each_step(&d, 4 << 30, &written, &mut rng, false);
    let (_, child, written) = child_with_data(&dir, &mut rng);
    crash_after_each_step(&child, 64 << 30, &written, &mut rng, false);
    // With a batmap: its map in the way of its new header (moved first); blocks in the way.
    for (i, size) in [512u64 << 20, 4 << 30].into_iter().enumerate() {
        let b = dir.join(format!("b{i}.vhd"));
        let written = batmap_with_data(&b, &mut rng);
        crash_after_each_step(&b, size, &written, &mut rng, false);
        let (_, map) = batmap_of(&b);
        assert!(map[0] == 0x81 && map[1..].iter().all(|&x| x == 0));
    }
    // An empty image: nothing moves, the grown BAT covers the old footer.
    let e = dir.join("e.vhd");
    create_dynamic(&e, 4 << 20, None).unwrap();
    crash_after_each_step(&e, 1 << 30, &Written(Vec::new()), &mut rng, false);
}

#[test]
fn revert_refuses_a_damaged_journal_or_another_image() {
    let dir = scratch("journal");
    let mut rng = Rng::new(19);
    let d = dir.join("d.vhd");
    let written = dynamic_with_data(&d, &mut rng);
    let orig = std::fs::read(&d).unwrap();
    let j = dir.join("j");
    VhdImage::open(&d, true)
        .unwrap()
        .resize_stopping(1 << 30, &j, Some(super::image::Step::Bat))
        .unwrap();
    // Another image (another UUID) is not reverted with it.
    let other = dir.join("o.vhd");
    create_dynamic(&other, 16 << 20, None).unwrap();
    let e = super::create::revert(&other, &j).unwrap_err();
    assert!(e.to_string().contains("UUID"), "{e}");
    // Nor is a damaged journal used.
    let good = std::fs::read(&j).unwrap();
    let mut bad = good.clone();
    bad[100] ^= 1;
    std::fs::write(&j, &bad).unwrap();
    let e = super::create::revert(&d, &j).unwrap_err();
    assert!(e.to_string().contains("damaged"), "{e}");
    std::fs::write(&j, &good[..good.len() - 3]).unwrap();
    let e = super::create::revert(&d, &j).unwrap_err();
    assert!(e.to_string().contains("damaged"), "{e}");
    assert!(j.exists(), "a journal that cannot be used is kept");
    std::fs::write(&j, &good).unwrap();
    super::create::revert(&d, &j).unwrap();
    assert!(std::fs::read(&d).unwrap() == orig);
    written.check_reads(&d, 16 << 20, true, &mut rng);
}

/// The batmap's header sector and map in the image at `path` (its header after the BAT).
fn batmap_of(path: &Path) -> ([u8; 512], Vec<u8>) {
    let image = VhdImage::open(path, false).unwrap();
    let b = image.batmap().unwrap().clone();
    assert_eq!(b.problem, None);
    let mut hb = [0u8; 512];
    image.read_file(bat_end(path), &mut hb).unwrap();
    let mut map = vec![0u8; b.bytes as usize];
    image.read_file(b.offset, &mut map).unwrap();
    (hb, map)
}

/// A XenServer image of 16 MiB with a batmap and data in four blocks: block 0 (whole, right
/// after the batmap's map), 3 (partly), 7 (whole, the disk's last) and 5 (partly); the batmap
/// marks blocks 0 and 7 full (as tapdisk would), and its header's marker byte is set.
fn batmap_with_data(path: &Path, rng: &mut Rng) -> Written {
    const MB: u64 = 1 << 20;
    image_with_batmap(path, 16 * MB);
    let written = Written::write(
        path,
        &[
            (0, 2 << 20),
            (6 * MB + 4096, 64 << 10),
            (14 * MB, 2 << 20),
            (10 * MB + 512, 512),
        ],
        rng,
    );
    assert_eq!(VhdImage::open(path, false).unwrap().bat()[0], 3584 / 512);
    let mut map = [0u8; 512];
    map[0] = 0x81;
    corrupt(path, 2560, &map);
    corrupt(path, 2072, &super::checksum(&map).to_be_bytes());
    corrupt(path, 2076, &[1]);
    assert!(check(path).is_empty(), "{:?}", check(path));
    written
}

#[test]
fn a_batmap_moves_with_the_bat_grown_past_its_room() {
    let dir = scratch("grow-batmap");
    let mut rng = Rng::new(20);
    let orig = dir.join("orig.vhd");
    let written = batmap_with_data(&orig, &mut rng);
    let before = VhdImage::open(&orig, false).unwrap().bat().to_vec();
    // 512 MiB: a BAT of 2 sectors, whose batmap header goes where the map was (the map moves
    // first); 4 GiB: 16 sectors, block 0 moves; 1.5 TiB: 3 MiB, blocks 0 and 3 move, and the
    // map grows to 96 KiB.
    for (size, moved) in [(512u64 << 20, 0usize), (4 << 30, 1), (1536 << 30, 2)] {
        let d = dir.join(format!("d{}m.vhd", size >> 20));
        std::fs::copy(&orig, &d).unwrap();
        resize(&d, size).unwrap();
        assert!(!super::journal::default_path(&d).exists());
        assert!(check(&d).is_empty(), "{:?}", check(&d));
        let blocks = size / (2 << 20);
        let image = VhdImage::open(&d, false).unwrap();
        assert_eq!(image.size(), size);
        assert_eq!(u64::from(image.header().unwrap().max_table_entries), blocks);
        let bat = image.bat().to_vec();
        let b = image.batmap().unwrap().clone();
        drop(image);
        let end = bat_end(&d);
        assert_eq!(
            b.offset,
            end + 512,
            "the map right after the batmap's header"
        );
        assert_eq!(b.bytes, blocks.div_ceil(8).next_multiple_of(512).max(512));
        let changed = (0..8).filter(|&i| bat[i] != before[i]).count();
        assert_eq!(changed, moved, "blocks moved out of the way");
        assert!(bat
            .iter()
            .filter(|&&e| e != super::UNALLOCATED)
            .all(|&e| u64::from(e) * 512 >= b.offset + b.bytes));
        let (hb, map) = batmap_of(&d);
        assert_eq!(&hb[..8], b"tdbatmap");
        assert_eq!(super::be32(&hb, 20), 0x0001_0002, "the version is kept");
        assert_eq!(hb[28], 1, "the marker byte is kept");
        assert_eq!(map[0], 0x81, "blocks 0 and 7 are still marked full");
        assert!(map[1..].iter().all(|&x| x == 0), "the new bits are clear");
        written.check_reads(&d, 16 << 20, size <= 4 << 30, &mut rng);
        if qemu_img() {
            written.check_with_qemu(&d, size, size <= 4 << 30);
        }
    }
    // Grown again (its map now moves with blocks written since), and within the room.
    let d = dir.join("d512m.vhd");
    let mut more = Written::write(&d, &[((512 << 20) - 4096, 4096)], &mut rng);
    let mut all = written;
    all.0.append(&mut more.0);
    resize(&d, 100 << 30).unwrap();
    assert!(check(&d).is_empty(), "{:?}", check(&d));
    all.check_reads(&d, 512 << 20, false, &mut rng);
    let (_, map) = batmap_of(&d);
    assert!(map[0] == 0x81 && map[1..].iter().all(|&x| x == 0));
}

/// A snapshot of a base of 16 MiB with data, laid out as XenServer's vhd-util makes one:
/// creator `tap` 1.2, a batmap (header and a sector of map) after the BAT, the locators after
/// the map; then data of its own, its first block right after the locators.
fn batmap_child_with_data(dir: &Path, rng: &mut Rng) -> (PathBuf, PathBuf, Written) {
    let base = dir.join("bbase.vhd");
    let mut written = dynamic_with_data(&base, rng);
    let child = dir.join("bchild.vhd");
    snapshot(&child, &base, false).unwrap();
    let image = VhdImage::open(&child, false).unwrap();
    let end = bat_end(&child);
    let locators = image.header().unwrap().locators;
    assert!(locators
        .iter()
        .filter(|l| l.code != 0)
        .all(|l| l.data_offset >= end));
    drop(image);
    let old = std::fs::read(&child).unwrap();
    let e = end as usize;
    let mut b = old[..e].to_vec();
    let mut hb = [0u8; 512];
    hb[..8].copy_from_slice(b"tdbatmap");
    hb[8..16].copy_from_slice(&(end + 512).to_be_bytes());
    hb[16..20].copy_from_slice(&1u32.to_be_bytes());
    hb[20..24].copy_from_slice(&0x0001_0002u32.to_be_bytes());
    hb[24..28].copy_from_slice(&super::checksum(&[0u8; 512]).to_be_bytes());
    b.extend_from_slice(&hb);
    b.extend_from_slice(&[0u8; 512]);
    b.extend_from_slice(&old[e..]);
    for (i, l) in locators.iter().enumerate().filter(|(_, l)| l.code != 0) {
        let at = 512 + 576 + 24 * i + 16;
        b[at..at + 8].copy_from_slice(&(l.data_offset + 1024).to_be_bytes());
    }
    let n = b.len();
    for at in [32, n - 512 + 32] {
        b[at..at + 4].copy_from_slice(&0x0001_0002u32.to_be_bytes());
    }
    std::fs::write(&child, &b).unwrap();
    fix_checksums(&child);
    assert!(check(&child).is_empty(), "{:?}", check(&child));
    assert_eq!(
        VhdImage::open(&child, false)
            .unwrap()
            .batmap()
            .unwrap()
            .offset,
        end + 512
    );
    let mine = Written::write(&child, &[(6 << 20, 8192), (14 << 20, 1 << 20)], rng);
    written.0.extend(mine.0);
    (base, child, written)
}

#[test]
fn a_child_with_a_batmap_grown_past_its_bat_room_keeps_its_locators() {
    let dir = scratch("grow-batmap-child");
    let mut rng = Rng::new(22);
    let (base, child, written) = batmap_child_with_data(&dir, &mut rng);
    crash_after_each_step(&child, 8 << 30, &written, &mut rng, false);
    locators_name(&child, &base);
    let image = VhdImage::open(&child, false).unwrap();
    let b = image.batmap().unwrap().clone();
    assert_eq!((b.offset, b.bytes), (bat_end(&child) + 512, 512));
    // Its locators right after the map, in their reserved sectors (the blocks after them).
    let mut offsets: Vec<(u64, u64)> = image
        .header()
        .unwrap()
        .locators
        .iter()
        .filter(|l| l.code != 0)
        .map(|l| (l.data_offset, l.reserved_bytes().next_multiple_of(512)))
        .collect();
    offsets.sort_unstable();
    assert_eq!(offsets.len(), 3);
    assert_eq!(offsets[0].0, b.offset + b.bytes);
    assert!(offsets.windows(2).all(|w| w[1].0 == w[0].0 + w[0].1));
    drop(image);
    assert_eq!(Chain::open(&child, false).unwrap().size(), 8 << 30);
    // (qemu-img does not read differencing VHDs.)
}

#[test]
fn a_batmap_grows_within_the_room_and_refuses_what_xenserver_refuses() {
    let dir = scratch("grow-batmap-room");
    let mut rng = Rng::new(21);
    let d = dir.join("d.vhd");
    let written = batmap_with_data(&d, &mut rng);
    let (hb, map) = batmap_of(&d);
    // 100 blocks: within the BAT's sector; the batmap stays as it is.
    resize(&d, 200 << 20).unwrap();
    assert!(check(&d).is_empty(), "{:?}", check(&d));
    let image = VhdImage::open(&d, false).unwrap();
    assert_eq!(image.header().unwrap().max_table_entries, 100);
    assert_eq!(image.batmap().unwrap().offset, 2560);
    drop(image);
    assert!(batmap_of(&d) == (hb, map));
    written.check_reads(&d, 16 << 20, true, &mut rng);

    // A bit set for a block that is not allocated (XenServer's check reports it) is not grown
    // over, within the room or past it; nothing is written.
    let mut map = [0u8; 512];
    map[0] = 0x81;
    map[110 / 8] = 0x80 >> (110 % 8);
    corrupt(&d, 2560, &map);
    corrupt(&d, 2072, &super::checksum(&map).to_be_bytes());
    let orig = std::fs::read(&d).unwrap();
    for size in [240u64 << 20, 1 << 30] {
        let e = resize(&d, size).unwrap_err();
        assert!(e.to_string().contains("marks block 110 full"), "{e}");
        assert!(std::fs::read(&d).unwrap() == orig);
        assert!(!super::journal::default_path(&d).exists());
    }
    // Below it, the disk grows.
    resize(&d, 220 << 20).unwrap();
    let orig = std::fs::read(&d).unwrap();
    // An invalid batmap (XenServer's vhd-util does not read it, nor resize the image): a
    // checksum that does not hold, a version past 1.2.
    corrupt(&d, 2600, &[1]);
    let e = resize(&d, 1 << 30).unwrap_err();
    assert!(e.to_string().contains("batmap is invalid (checksum"), "{e}");
    corrupt(&d, 2600, &[0]);
    corrupt(&d, 2068, &0x0001_0003u32.to_be_bytes());
    let e = resize(&d, 230 << 20).unwrap_err();
    assert!(
        e.to_string()
            .contains("batmap is invalid (unsupported version 0x00010003"),
        "{e}"
    );
    corrupt(&d, 2068, &0x0001_0002u32.to_be_bytes());
    assert!(std::fs::read(&d).unwrap() == orig);
    assert!(!super::journal::default_path(&d).exists());
}

/// Whether every block of the image at `path` is allocated with every sector of the disk's
/// blocks present.
fn wholly_allocated(path: &Path) -> bool {
    let mut image = VhdImage::open(path, false).unwrap();
    let (size, bs) = (image.size(), image.block_size());
    (0..image.bat().len() as u32).all(|b| {
        let sectors = bs.min(size - u64::from(b) * bs) / 512;
        image.bat()[b as usize] != super::UNALLOCATED
            && (0..sectors).all(|s| super::image::bit(image.bitmap(b).unwrap(), s))
    })
}

#[test]
fn fill_allocates_every_block_and_the_disk_reads_the_same() {
    use super::fill::fill;
    let mut rng = Rng::new(31);
    let dir = scratch("fill");
    // A dynamic disk whose last block is partial, a chain of three, and a batmap image.
    let d = dir.join("d.vhd");
    create_dynamic(&d, (7 << 20) + 4096, None).unwrap();
    let data = pattern(&mut rng, 8192);
    Chain::open(&d, true)
        .unwrap()
        .write(3 << 20, &data)
        .unwrap();
    let (leaf, _) = build_chain(&dir, 2, &mut rng);
    let b = dir.join("b.vhd");
    image_with_batmap(&b, 8 << 20);
    Chain::open(&b, true).unwrap().write(4096, &data).unwrap();
    for p in [&d, &leaf, &b] {
        let before = read_all(p);
        let blocks = VhdImage::open(p, false).unwrap().bat().len() as u64;
        assert!(fill(p).unwrap() > 0, "{}", p.display());
        assert!(read_all(p) == before, "{}: reads differ", p.display());
        assert!(wholly_allocated(p), "{}", p.display());
        assert!(check(p).is_empty(), "{}: {:?}", p.display(), check(p));
        // Filled, a differencing leaf reads nothing from its parents.
        let mut chain = Chain::open(p, false).unwrap();
        let mut buf = vec![0u8; chain.size() as usize];
        chain.read(0, &mut buf).unwrap();
        assert_eq!(chain.reads().sectors(0), chain.size() / 512);
        assert!(chain.layers().len() == 1 || chain.reads().sectors(1) == 0);
        // Again: nothing left to write.
        assert_eq!(fill(p).unwrap(), 0, "{}", p.display());
        assert_eq!(VhdImage::open(p, false).unwrap().bat().len() as u64, blocks);
    }
    // The batmap is never set (a clear bit never lies): its checksum still holds.
    assert!(VhdImage::open(&b, false)
        .unwrap()
        .batmap()
        .unwrap()
        .problem
        .is_none());
    // A fixed disk is refused.
    let f = dir.join("f.vhd");
    create_fixed(&f, 1 << 20).unwrap();
    let e = fill(&f).unwrap_err();
    assert!(e.to_string().contains("fixed"), "{e}");
}

#[test]
fn reserve_allocates_blocks_without_their_data_and_the_disk_reads_the_same() {
    use super::fill::reserve;
    let mut rng = Rng::new(33);
    let dir = scratch("reserve");
    // A dynamic disk with one block written (its last block partial), a chain of three.
    let d = dir.join("d.vhd");
    create_dynamic(&d, (7 << 20) + 4096, None).unwrap();
    let data = pattern(&mut rng, 8192);
    Chain::open(&d, true)
        .unwrap()
        .write((3 << 20) + 4096, &data)
        .unwrap();
    let (leaf, _) = build_chain(&dir, 2, &mut rng);
    for p in [&d, &leaf] {
        let before = read_all(p);
        let file_before = std::fs::read(p).unwrap();
        let held: Vec<u32> = VhdImage::open(p, false).unwrap().bat().to_vec();
        let blocks = held.len() as u64;
        let unallocated = held.iter().filter(|&&s| s == super::UNALLOCATED).count() as u64;
        assert!(unallocated > 0);
        let stored = std::fs::metadata(p).unwrap().blocks() * 512;
        assert_eq!(
            reserve(p, None, None).unwrap(),
            unallocated,
            "{}",
            p.display()
        );
        assert!(read_all(p) == before, "{}: reads differ", p.display());
        assert!(check(p).is_empty(), "{}: {:?}", p.display(), check(p));
        let mut image = VhdImage::open(p, false).unwrap();
        assert_eq!(image.bat().len() as u64, blocks);
        // Every block allocated; those held before where they were, with their bitmaps.
        for (b, &was) in held.iter().enumerate() {
            let now = image.bat()[b];
            assert_ne!(now, super::UNALLOCATED);
            if was != super::UNALLOCATED {
                assert_eq!(now, was);
                let at = u64::from(was) * 512;
                let bm = image.bitmap(b as u32).unwrap().to_vec();
                assert!(file_before[at as usize..at as usize + bm.len()] == bm[..]);
            }
        }
        // The data was not written: the file stores a few bitmaps more, not the blocks.
        let grew = std::fs::metadata(p).unwrap().blocks() * 512 - stored;
        assert!(grew < unallocated * (2 << 20) / 8, "{grew}");
        let mut chain = Chain::open(p, false).unwrap();
        let mut buf = vec![0u8; chain.size() as usize];
        chain.read(0, &mut buf).unwrap();
        if chain.layers().len() == 1 {
            // A dynamic disk: every sector is marked present, and reads as zeros where
            // nothing was written.
            assert!(wholly_allocated(p), "{}", p.display());
            assert_eq!(chain.reads().sectors(0), chain.size() / 512);
        } else {
            // A differencing disk: the reserved blocks mark nothing, their sectors still come
            // from the parents.
            assert!(!wholly_allocated(p), "{}", p.display());
            assert!(chain.reads().sectors(1) + chain.reads().sectors(2) > 0);
        }
        // Writes into reserved blocks read back, and the disk still checks clean.
        let w = pattern(&mut rng, 4096);
        let mut model = before.clone();
        model[(5 << 20)..(5 << 20) + 4096].copy_from_slice(&w);
        let mut chain = Chain::open(p, true).unwrap();
        chain.write(5 << 20, &w).unwrap();
        chain.flush().unwrap();
        assert!(read_all(p) == model, "{}", p.display());
        assert!(check(p).is_empty(), "{}: {:?}", p.display(), check(p));
        // Again: nothing left to reserve, nothing written.
        let file = std::fs::read(p).unwrap();
        assert_eq!(reserve(p, None, None).unwrap(), 0);
        assert!(std::fs::read(p).unwrap() == file);
    }
    // A range of sectors: the blocks holding them, the last one clamped to the disk.
    let r = dir.join("r.vhd");
    create_dynamic(&r, 8 << 20, None).unwrap();
    assert_eq!(reserve(&r, Some(4096), Some(4096 + 1)).unwrap(), 1);
    assert_eq!(reserve(&r, Some(3 * 4096 - 1), Some(u64::MAX)).unwrap(), 2);
    let image = VhdImage::open(&r, false).unwrap();
    let allocated: Vec<bool> = image
        .bat()
        .iter()
        .map(|&s| s != super::UNALLOCATED)
        .collect();
    assert_eq!(allocated, [false, true, true, true]);
    assert!(check(&r).is_empty(), "{:?}", check(&r));
    // Refused, and nothing written: past the end, a reversed range, a fixed disk.
    let bytes = std::fs::read(&r).unwrap();
    for (from, to, says) in [
        (Some(4 * 4096), None, "past the disk's end"),
        (Some(100), Some(99), "invalid sector range 100-99"),
    ] {
        let e = reserve(&r, from, to).unwrap_err();
        assert!(e.to_string().contains(says), "{e}");
    }
    assert!(std::fs::read(&r).unwrap() == bytes);
    let f = dir.join("f.vhd");
    create_fixed(&f, 1 << 20).unwrap();
    let e = reserve(&f, None, None).unwrap_err();
    assert!(e.to_string().contains("fixed"), "{e}");
}

#[test]
fn physical_size_moves_the_footer_and_refuses_to_cut_data() {
    let mut rng = Rng::new(32);
    let dir = scratch("physical");
    let d = dir.join("d.vhd");
    create_dynamic(&d, 8 << 20, None).unwrap();
    let data = pattern(&mut rng, 4096);
    Chain::open(&d, true)
        .unwrap()
        .write(5 << 20, &data)
        .unwrap();
    let before = read_all(&d);
    let len = std::fs::metadata(&d).unwrap().len();
    let least = VhdImage::open(&d, false).unwrap().end_of_data() + 512;
    assert_eq!(
        least, len,
        "a file just written ends with its last block and footer"
    );
    for size in [len + (1 << 20), len + 512, len] {
        let mut image = VhdImage::open(&d, true).unwrap();
        image.set_physical_size(size).unwrap();
        drop(image);
        assert_eq!(std::fs::metadata(&d).unwrap().len(), size);
        assert_eq!(VhdImage::open(&d, false).unwrap().physical_size(), size);
        assert!(read_all(&d) == before);
        assert!(check(&d).is_empty(), "{size}: {:?}", check(&d));
    }
    // The old footer of a longer file is zeroed.
    let mut image = VhdImage::open(&d, true).unwrap();
    image.set_physical_size(len + 4096).unwrap();
    let mut old = [1u8; 512];
    image.read_file(len - 512, &mut old).unwrap();
    assert_eq!(old, [0u8; 512]);
    // Writes after a padded end still allocate and read back.
    Chain::open(&d, true).unwrap().write(0, &data).unwrap();
    assert!(read_all(&d)[..4096] == data[..]);
    assert!(check(&d).is_empty(), "{:?}", check(&d));
    let mut image = VhdImage::open(&d, true).unwrap();
    let least = image.end_of_data() + 512;
    for bad in [least - 512, least + 100, 0] {
        let e = image.set_physical_size(bad).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL, "{bad}: {e}");
    }
    let f = dir.join("f.vhd");
    create_fixed(&f, 1 << 20).unwrap();
    let e = VhdImage::open(&f, true)
        .unwrap()
        .set_physical_size(4 << 20)
        .unwrap_err();
    assert!(e.to_string().contains("fixed disk"), "{e}");
    let e = VhdImage::open(&d, false)
        .unwrap()
        .set_physical_size(8 << 20)
        .unwrap_err();
    assert_eq!(e.errno(), libc::EROFS);
}

#[test]
fn zero_bat_forgets_every_block_and_cuts_the_file() {
    let mut rng = Rng::new(33);
    let dir = scratch("zero");
    let (leaf, _) = build_chain(&dir, 1, &mut rng);
    let parent = VhdImage::open(&leaf, false).unwrap();
    let parent = super::chain::find_parent(&parent).unwrap();
    let parent_reads = read_all(&parent);
    let b = dir.join("b.vhd");
    image_with_batmap(&b, 8 << 20);
    Chain::open(&b, true)
        .unwrap()
        .write(0, &pattern(&mut rng, 4096))
        .unwrap();
    // Set a batmap bit (as XenServer's tapdisk would) and fix its checksum.
    let mut map = [0u8; 512];
    map[0] = 0x80;
    corrupt(&b, 2560, &map);
    corrupt(&b, 2072, &super::checksum(&map).to_be_bytes());
    for (p, expected) in [(&leaf, parent_reads), (&b, vec![0u8; 8 << 20])] {
        let mut image = VhdImage::open(p, true).unwrap();
        assert!(image.bat().iter().any(|&e| e != super::UNALLOCATED));
        image.zero_bat().unwrap();
        let end = image.end_of_metadata();
        drop(image);
        assert!(read_all(p) == expected, "{}", p.display());
        let image = VhdImage::open(p, false).unwrap();
        assert!(image.bat().iter().all(|&e| e == super::UNALLOCATED));
        assert_eq!(std::fs::metadata(p).unwrap().len(), end + 512);
        assert!(check(p).is_empty(), "{}: {:?}", p.display(), check(p));
    }
    let bytes = std::fs::read(&b).unwrap();
    assert_eq!(bytes[2560..3072], [0u8; 512], "the batmap is cleared");
    assert!(VhdImage::open(&b, false)
        .unwrap()
        .batmap()
        .unwrap()
        .problem
        .is_none());
    let f = dir.join("f.vhd");
    create_fixed(&f, 1 << 20).unwrap();
    let e = VhdImage::open(&f, true).unwrap().zero_bat().unwrap_err();
    assert!(e.to_string().contains("fixed disk"), "{e}");
}
