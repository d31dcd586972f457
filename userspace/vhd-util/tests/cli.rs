//! vhd-util end to end: images made and inspected through the command line, data written
//! through the library, qemu-img as an independent reader where installed.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use blktap::rng::Rng;
use blktap::vhd::Chain;

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
        .prefix(&format!("vhd-util-{name}-"))
        .tempdir()
        .unwrap();
    Scratch(dir)
}

fn vhd_util(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vhd-util"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = vhd_util(args);
    assert!(
        out.status.success(),
        "vhd-util {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn write_random(path: &Path, rng: &mut Rng, model: &mut [u8]) {
    let mut chain = Chain::open(path, true).unwrap();
    for _ in 0..4 {
        let len = 512 * (1 + rng.below(32) as usize);
        let off = rng.below((model.len() - len) as u64 / 512) as usize * 512;
        let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        chain.write(off as u64, &data).unwrap();
        model[off..off + len].copy_from_slice(&data);
    }
    chain.flush().unwrap();
}

fn read_all(path: &Path) -> Vec<u8> {
    let mut chain = Chain::open(path, false).unwrap();
    let mut buf = vec![0u8; chain.size() as usize];
    chain.read(0, &mut buf).unwrap();
    buf
}

#[test]
fn create_query_and_set() {
    let dir = scratch("create");
    let d = dir.join("d.vhd");
    ok(&["create", "-n", s(&d), "-s", "20"]);
    assert_eq!(ok(&["query", "-n", s(&d), "-v"]), "20\n");
    // --debug (SM passes it to every command) is ignored, wherever it stands.
    assert_eq!(ok(&["query", "--debug", "-n", s(&d), "-v"]), "20\n");
    assert_eq!(ok(&["query", "-n", s(&d), "-v", "--debug"]), "20\n");
    let phys: u64 = ok(&["query", "-n", s(&d), "-s"]).trim().parse().unwrap();
    assert_eq!(phys, std::fs::metadata(&d).unwrap().len());
    assert_eq!(
        ok(&["query", "-n", s(&d), "-p"]),
        format!("{} has no parent\n", s(&d))
    );
    assert_eq!(ok(&["query", "-n", s(&d), "-f"]), "hidden: 0\n");
    assert_eq!(ok(&["query", "-n", s(&d), "-d"]), "chain depth: 1\n");
    ok(&["set", "-n", s(&d), "-f", "hidden", "-v", "1"]);
    assert_eq!(ok(&["query", "-n", s(&d), "-f"]), "hidden: 1\n");
    assert_eq!(ok(&["check", "-n", s(&d)]), format!("{} is valid\n", s(&d)));
    let out = vhd_util(&["set", "-n", s(&d), "-f", "marker", "-v", "1"]);
    assert_eq!(out.status.code(), Some(libc::EINVAL));

    let f = dir.join("f.vhd");
    ok(&["create", "-n", s(&f), "-s", "4", "-r"]);
    assert_eq!(std::fs::metadata(&f).unwrap().len(), (4 << 20) + 512);
    assert_eq!(ok(&["query", "-n", s(&f), "-v"]), "4\n");
    // An existing file is not overwritten.
    let out = vhd_util(&["create", "-n", s(&f), "-s", "4"]);
    assert_eq!(out.status.code(), Some(libc::EEXIST));
    let out = vhd_util(&["create", "-n", s(&dir.join("z.vhd")), "-s", "0"]);
    assert_eq!(out.status.code(), Some(libc::EINVAL));

    // -S leaves room in the BAT.
    let g = dir.join("g.vhd");
    ok(&["create", "-n", s(&g), "-s", "4", "-S", "64"]);
    let image = blktap::vhd::VhdImage::open(&g, false).unwrap();
    assert_eq!(image.header().unwrap().max_table_entries, 32);
    assert_eq!(image.bat().len(), 2);
}

#[test]
fn chains_built_by_snapshot_read_back_check_and_coalesce() {
    let mut rng = Rng::new(11);
    for depth in [1usize, 2, 30] {
        let dir = scratch(&format!("chain{depth}"));
        let base = dir.join("base.vhd");
        ok(&["create", "-n", s(&base), "-s", "8"]);
        let mut model = vec![0u8; 8 << 20];
        write_random(&base, &mut rng, &mut model);
        let mut leaf = base.clone();
        let mut models = vec![model.clone()];
        for level in 1..=depth {
            let child = dir.join(format!("l{level}.vhd"));
            ok(&["snapshot", "-n", s(&child), "-p", s(&leaf)]);
            assert_eq!(
                ok(&["query", "-n", s(&child), "-p"]).trim(),
                s(&dir.join(format!("./{}", leaf.file_name().unwrap().to_str().unwrap())))
                    .replace("/./", "/")
            );
            leaf = child;
            write_random(&leaf, &mut rng, &mut model);
            models.push(model.clone());
        }
        assert_eq!(
            ok(&["query", "-n", s(&leaf), "-d"]),
            format!("chain depth: {}\n", depth + 1)
        );
        assert!(read_all(&leaf) == model, "depth {depth}: leaf");
        // Every level still reads as it was when its child was made.
        let mid = dir.join(format!("l{}.vhd", depth - 1));
        let mid = if depth == 1 { base.clone() } else { mid };
        assert!(read_all(&mid) == models[depth - 1], "depth {depth}: parent");
        assert_eq!(
            ok(&["check", "-n", s(&leaf)]),
            format!("{} is valid\n", s(&leaf))
        );
        ok(&["coalesce", "-n", s(&leaf)]);
        assert!(
            read_all(&mid) == model,
            "depth {depth}: parent after coalesce"
        );
        assert!(
            read_all(&leaf) == model,
            "depth {depth}: leaf after coalesce"
        );
        ok(&["check", "-n", s(&mid)]);
    }
}

#[test]
fn a_chain_can_be_moved_as_a_whole() {
    // Relative locators: the chain opens from a new directory.
    let dir = scratch("move");
    let base = dir.join("a/base.vhd");
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::fs::create_dir_all(dir.join("b")).unwrap();
    ok(&["create", "-n", s(&base), "-s", "4"]);
    let leaf = dir.join("b/leaf.vhd");
    ok(&["snapshot", "-n", s(&leaf), "-p", s(&base)]);
    let moved = scratch("moved");
    std::fs::rename(dir.join("a"), moved.join("a")).unwrap();
    std::fs::rename(dir.join("b"), moved.join("b")).unwrap();
    let leaf = moved.join("b/leaf.vhd");
    assert_eq!(ok(&["query", "-n", s(&leaf), "-d"]), "chain depth: 2\n");
    assert_eq!(
        ok(&["query", "-n", s(&leaf), "-p"]).trim(),
        s(&moved.join("b/../a/base.vhd"))
    );
}

#[test]
fn check_says_what_is_wrong() {
    let dir = scratch("check");
    let base = dir.join("base.vhd");
    ok(&["create", "-n", s(&base), "-s", "4"]);
    let leaf = dir.join("leaf.vhd");
    ok(&["snapshot", "-n", s(&leaf), "-p", s(&base)]);
    std::fs::remove_file(&base).unwrap();
    let out = vhd_util(&["check", "-n", s(&leaf)]);
    assert_eq!(out.status.code(), Some(libc::EINVAL));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("appears invalid"), "{text}");
    assert!(text.contains("not found"), "{text}");
    let out = vhd_util(&["query", "-n", s(&leaf), "-d"]);
    assert_eq!(out.status.code(), Some(libc::ENOENT));

    // A lost footer: check says so, repair rebuilds it from the copy.
    let lost = dir.join("lost.vhd");
    ok(&["create", "-n", s(&lost), "-s", "4"]);
    let len = std::fs::metadata(&lost).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&lost)
        .unwrap()
        .set_len(len - 512)
        .unwrap();
    let out = vhd_util(&["check", "-n", s(&lost)]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("repairable"));
    assert!(ok(&["repair", "-n", s(&lost)]).contains("rebuilt the footer"));
    ok(&["check", "-n", s(&lost)]);
    assert_eq!(ok(&["repair", "-n", s(&lost)]), "");

    let junk = dir.join("junk.vhd");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    let out = vhd_util(&["check", "-n", s(&junk)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("bad cookie"));
}

#[test]
fn qemu_img_accepts_what_vhd_util_makes() {
    let have = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("qemu-img is not installed: skipped");
        return;
    }
    let dir = scratch("qemu");
    for (name, extra) in [("d.vhd", None), ("f.vhd", Some("-r"))] {
        let p = dir.join(name);
        let mut args = vec!["create", "-n", s(&p), "-s", "30"];
        args.extend(extra);
        ok(&args);
        let out = Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "vpc", s(&p)])
            .output()
            .unwrap();
        assert!(out.status.success());
        let info = String::from_utf8_lossy(&out.stdout);
        assert!(
            info.contains(&format!("\"virtual-size\": {}", 30u64 << 20)),
            "{info}"
        );
    }
}

#[test]
fn a_child_resized_after_its_snapshot_reads_zeros_past_its_parent_and_coalesces() {
    let mut rng = Rng::new(12);
    let dir = scratch("resize");
    let base = dir.join("base.vhd");
    ok(&["create", "-n", s(&base), "-s", "4"]);
    let mut model = vec![0u8; 4 << 20];
    write_random(&base, &mut rng, &mut model);
    let leaf = dir.join("leaf.vhd");
    ok(&["snapshot", "-n", s(&leaf), "-p", s(&base)]);
    ok(&[
        "resize",
        "-n",
        s(&leaf),
        "-s",
        "10",
        "-j",
        s(&dir.join("journal")),
    ]);
    assert_eq!(ok(&["query", "-n", s(&leaf), "-v"]), "10\n");
    assert_eq!(ok(&["query", "-n", s(&base), "-v"]), "4\n");
    assert_eq!(
        ok(&["check", "-n", s(&leaf)]),
        format!("{} is valid\n", s(&leaf))
    );
    model.resize(10 << 20, 0);
    assert!(read_all(&leaf) == model, "zeros past the parent's end");
    write_random(&leaf, &mut rng, &mut model);
    // Across the parent's end.
    let data: Vec<u8> = (0..8192).map(|_| rng.next_u64() as u8).collect();
    Chain::open(&leaf, true)
        .unwrap()
        .write((4 << 20) - 4096, &data)
        .unwrap();
    model[(4 << 20) - 4096..(4 << 20) + 4096].copy_from_slice(&data);
    assert!(read_all(&leaf) == model);
    ok(&["check", "-n", s(&leaf)]);
    // Shrinking is refused.
    let out = vhd_util(&["resize", "-n", s(&leaf), "-s", "8"]);
    assert_eq!(out.status.code(), Some(libc::EINVAL));
    ok(&["coalesce", "-n", s(&leaf)]);
    assert_eq!(ok(&["query", "-n", s(&base), "-v"]), "10\n");
    ok(&["check", "-n", s(&base)]);
    assert!(
        read_all(&base) == model,
        "the parent grew and holds the bytes"
    );
}

#[test]
fn resize_past_the_bat_room_uses_a_journal_and_revert_restores() {
    let mut rng = Rng::new(13);
    let dir = scratch("grow");
    let d = dir.join("d.vhd");
    ok(&["create", "-n", s(&d), "-s", "16"]);
    let mut model = vec![0u8; 16 << 20];
    write_random(&d, &mut rng, &mut model);
    let orig = std::fs::read(&d).unwrap();
    let j = dir.join("j");
    // 4 GiB: 2048 blocks, past the 128 the BAT's sector has room for.
    ok(&["resize", "-n", s(&d), "-s", "4096", "-j", s(&j)]);
    assert!(!j.exists(), "the journal is removed when done");
    assert_eq!(ok(&["query", "-n", s(&d), "-v"]), "4096\n");
    assert_eq!(ok(&["check", "-n", s(&d)]), format!("{} is valid\n", s(&d)));
    let mut chain = Chain::open(&d, false).unwrap();
    let mut buf = vec![0u8; 32 << 20];
    chain.read(0, &mut buf).unwrap();
    assert!(buf[..16 << 20] == model[..] && buf[16 << 20..].iter().all(|&b| b == 0));
    drop(chain);

    // A journal left by a resize cut short: resize refuses (one line, non-zero exit), revert
    // restores the image as it was and removes the journal.
    let grown = std::fs::read(&d).unwrap();
    std::fs::write(&j, journal_of(&d, &orig)).unwrap();
    for args in [
        vec!["resize", "-n", s(&d), "-s", "8192", "-j", s(&j)],
        vec!["resize", "-n", s(&d), "-s", "8192"],
    ] {
        let named = args.len() == 7;
        let default = dir.join("d.vhd.journal");
        if !named {
            std::fs::copy(&j, &default).unwrap();
        }
        let out = vhd_util(&args);
        assert_eq!(out.status.code(), Some(libc::EINVAL), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("vhd-util revert"), "{err}");
        if !named {
            std::fs::remove_file(&default).unwrap();
        }
    }
    assert!(
        std::fs::read(&d).unwrap() == grown,
        "a refused resize writes nothing"
    );
    ok(&["revert", "-n", s(&d), "-j", s(&j)]);
    assert!(!j.exists(), "revert removes the journal");
    assert!(
        std::fs::read(&d).unwrap() == orig,
        "revert restores the image"
    );
    assert_eq!(ok(&["query", "-n", s(&d), "-v"]), "16\n");
    // Without a journal there is nothing to revert.
    let out = vhd_util(&["revert", "-n", s(&d), "-j", s(&j)]);
    assert_eq!(out.status.code(), Some(libc::ENOENT));
    // The default journal, NAME.journal.
    ok(&["resize", "-n", s(&d), "-s", "2048"]);
    assert!(!dir.join("d.vhd.journal").exists());
    assert_eq!(ok(&["query", "-n", s(&d), "-v"]), "2048\n");
    ok(&["check", "-n", s(&d)]);
}

/// The `data_offset` and `data_space` of each locator `read -p` prints for `path`.
fn printed_locators(path: &Path) -> Vec<(u64, u64)> {
    let text = ok(&["read", "-n", s(path), "-p"]);
    let field = |name: &str| -> Vec<u64> {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix(name))
            .map(|v| v.trim_start_matches([' ', ':']).trim().parse().unwrap())
            .collect()
    };
    let (offsets, spaces) = (field("data_offset"), field("data_space"));
    assert_eq!(offsets.len(), spaces.len());
    offsets.into_iter().zip(spaces).collect()
}

#[test]
fn resize_puts_a_childs_locators_right_after_the_grown_bat() {
    let mut rng = Rng::new(14);
    let dir = scratch("grow-child");
    let base = dir.join("base.vhd");
    ok(&["create", "-n", s(&base), "-s", "16"]);
    let mut model = vec![0u8; 16 << 20];
    write_random(&base, &mut rng, &mut model);
    let leaf = dir.join("leaf.vhd");
    ok(&["snapshot", "-n", s(&leaf), "-p", s(&base)]);
    write_random(&leaf, &mut rng, &mut model);
    // 4 GiB: a BAT of 2048 entries at 1536, 8 KiB; the locators right after it (at 9728), each
    // in its reserved sector(s); the blocks in their way at the end.
    ok(&["resize", "-n", s(&leaf), "-s", "4096"]);
    assert_eq!(
        ok(&["check", "-n", s(&leaf)]),
        format!("{} is valid\n", s(&leaf))
    );
    let mut at = 1536 + 8192;
    let locators = printed_locators(&leaf);
    assert_eq!(locators.len(), 3);
    for (offset, space) in locators {
        assert_eq!(offset, at);
        at += space.next_multiple_of(512);
    }
    let mut buf = vec![0u8; 16 << 20];
    Chain::open(&leaf, false)
        .unwrap()
        .read(0, &mut buf)
        .unwrap();
    assert!(buf == model);

    // A locator past the blocks (as earlier versions' resize left it): the image reads well, but
    // check says that a block starts before the end of the metadata (XenServer's check refuses
    // it); the next resize past the room lays it out again.
    let mut b = std::fs::read(&leaf).unwrap();
    let n = b.len() - 512;
    let (offset, space) = printed_locators(&leaf)[2];
    let data = b[offset as usize..(offset + space) as usize].to_vec();
    let footer = b.split_off(n);
    b.extend_from_slice(&data);
    b.extend_from_slice(&footer);
    b[512 + 576 + 48 + 16..][..8].copy_from_slice(&(n as u64).to_be_bytes());
    b[512 + 36..512 + 40].fill(0);
    let sum = vhd_sum(&b[512..1536]);
    b[512 + 36..512 + 40].copy_from_slice(&sum.to_be_bytes());
    std::fs::write(&leaf, &b).unwrap();
    let out = vhd_util(&["check", "-n", s(&leaf)]);
    assert_eq!(out.status.code(), Some(libc::EINVAL));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("appears invalid") && text.contains("clobbers headers"),
        "{text}"
    );
    ok(&["resize", "-n", s(&leaf), "-s", "65536"]);
    assert_eq!(
        ok(&["check", "-n", s(&leaf)]),
        format!("{} is valid\n", s(&leaf))
    );
    // 32768 entries: 128 KiB of BAT.
    let mut at = 1536 + (128 << 10);
    for (offset, space) in printed_locators(&leaf) {
        assert_eq!(offset, at);
        at += space.next_multiple_of(512);
    }
    Chain::open(&leaf, false)
        .unwrap()
        .read(0, &mut buf)
        .unwrap();
    assert!(buf == model);
}

/// A journal as a resize of `path` (whose bytes were `orig`) writes before it touches the
/// image: the magic, the original length and UUID, records of the original bytes (here one of
/// the whole file, a superset of what a resize overwrites) and the hashed trailer. (A crash
/// cannot be played through the command line; the library's tests stop a resize after each
/// of its steps.)
fn journal_of(path: &Path, orig: &[u8]) -> Vec<u8> {
    let image = blktap::vhd::VhdImage::open(path, false).unwrap();
    let journal = blktap::vhd::journal::Journal {
        len: orig.len() as u64,
        uuid: image.footer().uuid,
        records: vec![(0, orig.to_vec())],
    };
    let b = journal.to_bytes();
    assert_eq!(&b[..8], b"vhdjrnl1");
    b
}

/// Fails with `errno` and one line on stderr that holds `says`; returns that line.
fn refused(args: &[&str], errno: i32, says: &str) -> String {
    let out = vhd_util(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(errno), "vhd-util {args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "vhd-util {args:?}: {err}");
    assert!(
        err.contains(says),
        "vhd-util {args:?}: {err:?} lacks {says:?}"
    );
    err
}

/// Writes `data` at `offset` of the image at `path` (through its chain) and into `model`.
fn write_at(path: &Path, offset: usize, data: &[u8], models: &mut [&mut Vec<u8>]) {
    let mut chain = Chain::open(path, true).unwrap();
    chain.write(offset as u64, data).unwrap();
    chain.flush().unwrap();
    for m in models.iter_mut() {
        m[offset..offset + data.len()].copy_from_slice(data);
    }
}

fn random_bytes(rng: &mut Rng, len: usize) -> Vec<u8> {
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

#[test]
fn modify_sets_the_parent_of_a_differencing_image() {
    use blktap::vhd::chain::parent_candidates;
    use blktap::vhd::VhdImage;
    let mut rng = Rng::new(21);
    let dir = scratch("modify");
    std::fs::create_dir_all(dir.join("other")).unwrap();
    let (p1, p2) = (dir.join("p1.vhd"), dir.join("other/p2.vhd"));
    let mut m1 = vec![0u8; 8 << 20];
    let mut m2 = vec![0u8; 8 << 20];
    for (p, m) in [(&p1, &mut m1), (&p2, &mut m2)] {
        ok(&["create", "-n", s(p), "-s", "8"]);
        write_random(p, &mut rng, m);
    }
    let child = dir.join("child.vhd");
    ok(&["snapshot", "-n", s(&child), "-p", s(&p1)]);
    // The child's own sectors, over each parent's.
    let (mut over1, mut over2) = (m1.clone(), m2.clone());
    for (off, len) in [(0, 4096), (3 << 20, 512), ((8 << 20) - 8192, 8192)] {
        let data = random_bytes(&mut rng, len);
        write_at(&child, off, &data, &mut [&mut over1, &mut over2]);
    }
    assert!(read_all(&child) == over1);
    let before = std::fs::metadata(&child).unwrap().len();

    // SM passes --debug; it is ignored.
    assert_eq!(
        ok(&["modify", "--debug", "-n", s(&child), "-p", s(&p2)]),
        ""
    );
    assert_eq!(
        std::fs::metadata(&child).unwrap().len(),
        before,
        "nothing moves"
    );
    assert_eq!(
        ok(&["check", "-n", s(&child)]),
        format!("{} is valid\n", s(&child))
    );
    assert_eq!(
        ok(&["query", "-n", s(&child), "-p"]),
        format!("{}\n", s(&dir.join("other/p2.vhd")))
    );
    assert_eq!(ok(&["query", "-n", s(&child), "-d"]), "chain depth: 2\n");
    assert!(read_all(&child) == over2, "reads the new parent's data");
    // The header as snapshot writes it: the parent's UUID, footer timestamp and name; the
    // locators relative (W2RU, MACX) and absolute (W2KU).
    let image = VhdImage::open(&child, false).unwrap();
    let parent = VhdImage::open(&p2, false).unwrap();
    let h = image.header().unwrap();
    assert_eq!(h.parent_uuid, parent.footer().uuid);
    assert_eq!(h.parent_timestamp, parent.footer().timestamp);
    assert_eq!(h.parent_name, "p2.vhd");
    let texts: Vec<String> = h
        .locators
        .iter()
        .filter(|l| l.code != 0)
        .map(|l| l.decode(&image.locator_data(l).unwrap()).unwrap())
        .collect();
    let abs = std::fs::canonicalize(&p2).unwrap();
    assert_eq!(
        texts,
        [
            "./other/p2.vhd".to_string(),
            "./other/p2.vhd".to_string(),
            s(&abs).to_string()
        ]
    );
    assert_eq!(parent_candidates(&image)[0], dir.join("other/p2.vhd"));
    drop(image);

    // And back, from another directory: the relative locators climb.
    let moved = dir.join("other/child.vhd");
    std::fs::rename(&child, &moved).unwrap();
    ok(&["modify", "-n", s(&moved), "-p", s(&p1)]);
    assert_eq!(
        ok(&["query", "-n", s(&moved), "-p"]),
        format!("{}\n", s(&dir.join("other/../p1.vhd")))
    );
    assert!(read_all(&moved) == over1);
    ok(&["check", "-n", s(&moved)]);

    // A raw parent (-m): the parent UUID is zero, the chain reads the file.
    let raw = dir.join("disk.raw");
    let mut mr = random_bytes(&mut rng, 8 << 20);
    std::fs::write(&raw, &mr).unwrap();
    ok(&["modify", "-n", s(&moved), "-p", s(&raw), "-m"]);
    let image = VhdImage::open(&moved, false).unwrap();
    assert_eq!(image.header().unwrap().parent_uuid, [0; 16]);
    assert_eq!(image.header().unwrap().parent_name, "disk.raw");
    drop(image);
    ok(&["check", "-n", s(&moved)]);
    for (off, len) in [(0, 4096), (3 << 20, 512), ((8 << 20) - 8192, 8192)] {
        mr[off..off + len].copy_from_slice(&over1[off..off + len]);
    }
    assert!(read_all(&moved) == mr, "reads the raw parent's data");

    // A smaller VHD parent (a child resized after its snapshot has one): accepted, as the chain
    // accepts it; what lies past its end reads as zeros.
    let small = dir.join("small.vhd");
    ok(&["create", "-n", s(&small), "-s", "4"]);
    let mut ms = vec![0u8; 4 << 20];
    write_random(&small, &mut rng, &mut ms);
    ok(&["modify", "-n", s(&moved), "-p", s(&small)]);
    ok(&["check", "-n", s(&moved)]);
    ms.resize(8 << 20, 0);
    for (off, len) in [(0, 4096), (3 << 20, 512), ((8 << 20) - 8192, 8192)] {
        ms[off..off + len].copy_from_slice(&over1[off..off + len]);
    }
    assert!(read_all(&moved) == ms);
}

#[test]
fn modify_refuses_with_one_line_and_writes_nothing() {
    let dir = scratch("modify-refusals");
    let base = dir.join("base.vhd");
    ok(&["create", "-n", s(&base), "-s", "8"]);
    let child = dir.join("child.vhd");
    ok(&["snapshot", "-n", s(&child), "-p", s(&base)]);
    let grandchild = dir.join("grandchild.vhd");
    ok(&["snapshot", "-n", s(&grandchild), "-p", s(&child)]);
    let big = dir.join("big.vhd");
    ok(&["create", "-n", s(&big), "-s", "16"]);
    let junk = dir.join("junk.vhd");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    // A parent whose relative path (UTF-16 in W2RU) needs more than the 512 bytes snapshot
    // reserved.
    let deep = dir.join("a".repeat(200)).join("b".repeat(200));
    std::fs::create_dir_all(&deep).unwrap();
    let far = deep.join("far.vhd");
    ok(&["create", "-n", s(&far), "-s", "8"]);
    let bytes = std::fs::read(&child).unwrap();
    let journal = dir.join("child.vhd.journal");

    let c = s(&child);
    let missing = dir.join("missing.vhd");
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec!["modify", "-n", s(&base), "-p", s(&big)],
            libc::EINVAL,
            "not a differencing one",
        ),
        (
            vec!["modify", "-n", c, "-p", s(&missing)],
            libc::ENOENT,
            "cannot find",
        ),
        (
            vec!["modify", "-n", c, "-p", s(&junk)],
            libc::EINVAL,
            "bad cookie",
        ),
        (
            vec!["modify", "-n", c, "-p", s(&dir)],
            libc::EINVAL,
            "not a regular file or block device",
        ),
        (
            vec!["modify", "-n", c, "-p", s(&big)],
            libc::EINVAL,
            "larger than the child's",
        ),
        (vec!["modify", "-n", c, "-p", c], libc::EINVAL, "would loop"),
        (
            vec!["modify", "-n", c, "-p", s(&grandchild)],
            libc::EINVAL,
            "would loop",
        ),
        (
            vec!["modify", "-n", c, "-p", s(&far)],
            libc::EINVAL,
            "reserves 512 bytes",
        ),
        (vec!["modify", "-n", c], libc::EINVAL, "nothing to do"),
        (
            vec!["modify", "-n", c, "-m"],
            libc::EINVAL,
            "goes with -p PARENT",
        ),
        (
            vec!["modify", "-n", c, "-s", "1000000"],
            libc::EINVAL,
            "not a multiple of 512",
        ),
        (
            vec!["modify", "-n", c, "-s", "1024"],
            libc::EINVAL,
            "would cut into its data",
        ),
        (
            vec!["modify", "-n", c, "-s", "big"],
            libc::EINVAL,
            "invalid value 'big'",
        ),
    ];
    for (args, errno, says) in &cases {
        refused(args, *errno, says);
        assert!(
            std::fs::read(&child).unwrap() == bytes,
            "{args:?} wrote to the image"
        );
    }
    std::fs::write(&journal, b"x").unwrap();
    refused(
        &["modify", "-n", c, "-p", s(&base)],
        libc::EINVAL,
        "vhd-util revert",
    );
    std::fs::remove_file(&journal).unwrap();
    assert!(std::fs::read(&child).unwrap() == bytes);
    ok(&["check", "-n", s(&grandchild)]);
}

#[test]
fn modify_cut_short_after_the_locators_is_completed_by_running_it_again() {
    let dir = scratch("modify-cut");
    let (p1, p2) = (dir.join("p1.vhd"), dir.join("p2.vhd"));
    ok(&["create", "-n", s(&p1), "-s", "4"]);
    ok(&["create", "-n", s(&p2), "-s", "4"]);
    let child = dir.join("child.vhd");
    ok(&["snapshot", "-n", s(&child), "-p", s(&p1)]);
    let old = std::fs::read(&child).unwrap();
    ok(&["modify", "-n", s(&child), "-p", s(&p2)]);
    let new = std::fs::read(&child).unwrap();
    // modify writes the locators, then the header (at 512, 1024 bytes): the state between is
    // the old image with the new locators.
    assert_eq!(old.len(), new.len());
    let changed: Vec<usize> = (0..old.len()).filter(|&i| old[i] != new[i]).collect();
    assert!(changed.iter().any(|&i| (512..1536).contains(&i)));
    assert!(changed.iter().any(|&i| i >= 1536));
    let mut cut = new.clone();
    cut[512..1536].copy_from_slice(&old[512..1536]);
    std::fs::write(&child, &cut).unwrap();
    let out = vhd_util(&["check", "-n", s(&child)]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("is not the child's parent UUID"), "{text}");
    ok(&["modify", "-n", s(&child), "-p", s(&p2)]);
    assert!(std::fs::read(&child).unwrap() == new);
    ok(&["check", "-n", s(&child)]);
}

#[test]
fn qemu_img_reads_a_reparented_child() {
    let have = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("qemu-img is not installed: skipped");
        return;
    }
    let dir = scratch("modify-qemu");
    let (p1, p2) = (dir.join("p1.vhd"), dir.join("p2.vhd"));
    ok(&["create", "-n", s(&p1), "-s", "30"]);
    ok(&["create", "-n", s(&p2), "-s", "30"]);
    let child = dir.join("child.vhd");
    ok(&["snapshot", "-n", s(&child), "-p", s(&p1)]);
    ok(&["modify", "-n", s(&child), "-p", s(&p2)]);
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "vpc", s(&child)])
        .output()
        .unwrap();
    assert!(out.status.success());
    let info = String::from_utf8_lossy(&out.stdout);
    assert!(
        info.contains(&format!("\"virtual-size\": {}", 30u64 << 20)),
        "{info}"
    );
    // qemu's vpc driver has no check ("This image format does not support checks", exit 63):
    // nothing to ask it there.
}

fn len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// `vhd=` line of an image as scan prints it.
fn scan_line(name: &str, capacity: u64, size: u64, hidden: u8, parent: &str) -> String {
    format!("vhd={name} capacity={capacity} size={size} hidden={hidden} parent={parent}")
}

#[test]
fn scan_prints_one_line_per_vhd() {
    let dir = scratch("scan");
    let d = |n: &str| dir.join(n);
    ok(&["create", "-n", s(&d("base.vhd")), "-s", "8"]);
    ok(&["create", "-n", s(&d("fixed.vhd")), "-s", "4", "-r"]);
    ok(&[
        "snapshot",
        "-n",
        s(&d("child.vhd")),
        "-p",
        s(&d("base.vhd")),
    ]);
    ok(&[
        "snapshot",
        "-n",
        s(&d("grand.vhd")),
        "-p",
        s(&d("child.vhd")),
    ]);
    ok(&["set", "-n", s(&d("base.vhd")), "-f", "hidden", "-v", "1"]);
    // Written into, so that the physical sizes differ.
    let mut model = vec![0u8; 8 << 20];
    write_random(&d("grand.vhd"), &mut Rng::new(5), &mut model);
    // Not matched: another extension, a leading dot.
    std::fs::write(d("notes.txt"), b"x").unwrap();
    std::fs::copy(d("base.vhd"), d(".dot.vhd")).unwrap();
    let pattern = format!("{}/*.vhd", s(&dir));
    let lines = [
        scan_line("base.vhd", 8 << 20, len(&d("base.vhd")), 1, "none"),
        scan_line("child.vhd", 8 << 20, len(&d("child.vhd")), 0, "base.vhd"),
        scan_line("fixed.vhd", 4 << 20, (4 << 20) + 512, 0, "none"),
        scan_line("grand.vhd", 8 << 20, len(&d("grand.vhd")), 0, "child.vhd"),
    ];
    let expected = lines.join("\n") + "\n";
    for flags in [vec!["-f"], vec![], vec!["-f", "-c"], vec!["-fc"]] {
        let mut args = vec!["scan"];
        args.extend(flags);
        args.extend(["-m", &pattern]);
        assert_eq!(ok(&args), expected, "{args:?}");
    }
    // SM's call, with --debug.
    assert_eq!(
        ok(&["scan", "--debug", "-f", "-c", "-m", &pattern]),
        expected
    );
    // Files named on the command line, after the pattern's; -v prints whole paths.
    assert_eq!(
        ok(&["scan", "-v", s(&d("grand.vhd")), s(&d("fixed.vhd"))]),
        format!(
            "{}\n{}\n",
            scan_line(
                s(&d("grand.vhd")),
                8 << 20,
                len(&d("grand.vhd")),
                0,
                s(&std::fs::canonicalize(d("child.vhd")).unwrap())
            ),
            scan_line(s(&d("fixed.vhd")), 4 << 20, (4 << 20) + 512, 0, "none"),
        )
    );
    // Nothing matches: nothing printed, success.
    assert_eq!(
        ok(&["scan", "-f", "-m", &format!("{}/*.vhdx", s(&dir))]),
        ""
    );
    assert_eq!(
        ok(&["scan", "-f", "-m", &format!("{}/nowhere/*.vhd", s(&dir))]),
        ""
    );
    // ? and [...] too.
    assert_eq!(
        ok(&["scan", "-f", "-m", &format!("{}/[bc]?[si]*.vhd", s(&dir))]),
        format!("{}\n{}\n", lines[0], lines[1])
    );

    // -p: trees, children indented by three spaces under their parent.
    ok(&["create", "-n", s(&d("solo.vhd")), "-s", "2"]);
    ok(&["snapshot", "-n", s(&d("sib.vhd")), "-p", s(&d("child.vhd"))]);
    ok(&["set", "-n", s(&d("child.vhd")), "-f", "hidden", "-v", "1"]);
    let tree = ok(&["scan", "-p", "-m", &pattern]);
    let sz = |n: &str| len(&d(n));
    assert_eq!(
        tree,
        [
            scan_line("base.vhd", 8 << 20, sz("base.vhd"), 1, "none"),
            format!(
                "   {}",
                scan_line("child.vhd", 8 << 20, sz("child.vhd"), 1, "base.vhd")
            ),
            format!(
                "      {}",
                scan_line("grand.vhd", 8 << 20, sz("grand.vhd"), 0, "child.vhd")
            ),
            format!(
                "      {}",
                scan_line("sib.vhd", 8 << 20, sz("sib.vhd"), 0, "child.vhd")
            ),
            scan_line("fixed.vhd", 4 << 20, sz("fixed.vhd"), 0, "none"),
            scan_line("solo.vhd", 2 << 20, sz("solo.vhd"), 0, "none"),
        ]
        .join("\n")
            + "\n"
    );
    // A parent outside the scan is said so.
    assert_eq!(
        ok(&["scan", "-p", s(&d("grand.vhd"))]),
        format!(
            "{} (not found in scan)\n",
            scan_line("grand.vhd", 8 << 20, sz("grand.vhd"), 0, "child.vhd")
        )
    );

    // -a: the parents are scanned too (with -f, found next to the child by their name).
    let grand = d("grand.vhd");
    for fast in [true, false] {
        let mut args = vec!["scan", "-a"];
        if fast {
            args.push("-f");
        }
        args.extend(["-m", s(&grand)]);
        assert_eq!(
            ok(&args),
            [
                scan_line("grand.vhd", 8 << 20, sz("grand.vhd"), 0, "child.vhd"),
                scan_line("child.vhd", 8 << 20, sz("child.vhd"), 1, "base.vhd"),
                scan_line("base.vhd", 8 << 20, sz("base.vhd"), 1, "none"),
            ]
            .join("\n")
                + "\n",
            "{args:?}"
        );
    }
}

#[test]
fn scan_reports_what_it_cannot_read() {
    let dir = scratch("scan-errors");
    let d = |n: &str| dir.join(n);
    ok(&["create", "-n", s(&d("a.vhd")), "-s", "2"]);
    std::fs::write(d("junk.vhd"), vec![7u8; 4096]).unwrap();
    ok(&["create", "-n", s(&d("z.vhd")), "-s", "2"]);
    let pattern = format!("{}/*.vhd", s(&dir));
    let a = scan_line("a.vhd", 2 << 20, len(&d("a.vhd")), 0, "none");
    let z = scan_line("z.vhd", 2 << 20, len(&d("z.vhd")), 0, "none");
    let junk = format!(
        "vhd={} scan-error=-{} error-message='opening file'",
        s(&d("junk.vhd")),
        libc::EINVAL
    );
    // The scan stops at the first image it cannot read, with its errno...
    let out = vhd_util(&["scan", "-f", "-m", &pattern]);
    assert_eq!(out.status.code(), Some(libc::EINVAL));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{a}\n{junk}\n")
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("bad cookie"), "{err}");
    // ...or with -c goes on and succeeds.
    assert_eq!(
        ok(&["scan", "-f", "-c", "-m", &pattern]),
        format!("{a}\n{junk}\n{z}\n")
    );
    // In a tree the error lines come first, with canonical names.
    assert_eq!(
        ok(&["scan", "-p", "-c", "-m", &pattern]),
        format!(
            "vhd={} scan-error=-{} error-message='opening file'\n{a}\n{z}\n",
            s(&std::fs::canonicalize(d("junk.vhd")).unwrap()),
            libc::EINVAL
        )
    );
    // A damaged trailing footer: scan reads the copy at offset 0 (as the original does).
    let torn = d("torn/t.vhd");
    std::fs::create_dir_all(d("torn")).unwrap();
    std::fs::copy(d("a.vhd"), &torn).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&torn).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 512], len(&torn) - 512).unwrap();
    drop(f);
    assert!(!vhd_util(&["check", "-n", s(&torn)]).status.success());
    for fast in ["-f", "-c"] {
        assert_eq!(
            ok(&["scan", fast, s(&torn)]),
            format!("{}\n", scan_line("t.vhd", 2 << 20, len(&torn), 0, "none"))
        );
    }
    // A named file that does not exist.
    let missing = d("missing.vhd");
    let out = vhd_util(&["scan", s(&missing)]);
    assert_eq!(out.status.code(), Some(libc::ENOENT));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "vhd={} scan-error=-{} error-message='failure scanning target'\n",
            s(&missing),
            libc::ENOENT
        )
    );

    // A parent that is missing: found by no locator, its name is the one a locator holds (the
    // relative MACX path); -p says it is not in the scan; -a says it cannot scan it.
    let b = d("sub/b.vhd");
    std::fs::create_dir_all(d("sub")).unwrap();
    ok(&["create", "-n", s(&b), "-s", "2"]);
    let c = d("c.vhd");
    ok(&["snapshot", "-n", s(&c), "-p", s(&b)]);
    std::fs::remove_file(&b).unwrap();
    let line = scan_line("c.vhd", 2 << 20, len(&c), 0, "b.vhd");
    assert_eq!(ok(&["scan", s(&c)]), format!("{line}\n"));
    assert_eq!(
        ok(&["scan", "-v", s(&c)]),
        format!("{}\n", scan_line(s(&c), 2 << 20, len(&c), 0, "./sub/b.vhd"))
    );
    assert_eq!(
        ok(&["scan", "-p", s(&c)]),
        format!("{line} (not found in scan)\n")
    );
    assert_eq!(
        ok(&["scan", "-a", s(&c)]),
        format!(
            "{line}\nvhd={} scan-error=-{} error-message='failure scanning target'\n",
            s(&d("sub/b.vhd")),
            libc::ENOENT
        )
    );

    // A raw parent, scanned by -a: its length, hidden.
    let raw = d("disk.raw");
    std::fs::write(&raw, vec![1u8; 3 << 20]).unwrap();
    let r = d("r.vhd");
    ok(&["snapshot", "-n", s(&r), "-p", s(&raw), "-m"]);
    assert_eq!(
        ok(&["scan", "-a", s(&r)]),
        format!(
            "{}\n{}\n",
            scan_line("r.vhd", 3 << 20, len(&r), 0, "disk.raw"),
            scan_line("disk.raw", 3 << 20, 3 << 20, 1, "none")
        )
    );

    // What is not supported, or missing, is refused.
    refused(
        &["scan", "-f", "-l", "VG_XenStorage", "-m", "*"],
        libc::ENOSYS,
        "LVM",
    );
    refused(&["scan", "-M", "-m", &pattern], libc::ENOSYS, "markers");
    refused(&["scan", "-f"], libc::EINVAL, "pattern");
}

fn have_qemu() -> bool {
    let have = ["qemu-img", "qemu-io"].iter().all(|p| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !have {
        eprintln!("qemu-img or qemu-io is not installed: skipped");
    }
    have
}

/// Runs a qemu tool, which must succeed; its stdout.
fn qemu(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The disk as qemu-img reads it (through its parents).
fn qemu_raw(vhd: &Path) -> Vec<u8> {
    let raw = vhd.with_extension("raw");
    let _ = std::fs::remove_file(&raw);
    qemu(
        "qemu-img",
        &["convert", "-f", "vpc", "-O", "raw", s(vhd), s(&raw)],
    );
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    bytes
}

/// qemu-img map's extents of the image alone (`start length offset`; offset none where the
/// image does not hold the range).
fn qemu_map(vhd: &Path) -> Vec<(u64, u64, Option<u64>)> {
    let json = qemu("qemu-img", &["map", "-f", "vpc", "--output=json", s(vhd)]);
    let field = |line: &str, name: &str| -> Option<u64> {
        let at = line.find(&format!("\"{name}\": "))? + name.len() + 4;
        let digits: String = line[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    json.lines()
        .filter(|l| l.contains("\"start\""))
        .map(|l| {
            let depth0 = l.contains("\"depth\": 0");
            let data = l.contains("\"data\": true");
            let offset = field(l, "offset").filter(|_| depth0 && data);
            (
                field(l, "start").unwrap(),
                field(l, "length").unwrap(),
                offset,
            )
        })
        .collect()
}

/// The file offset qemu maps the disk's byte `at` to, if the image holds it.
fn qemu_offset(map: &[(u64, u64, Option<u64>)], at: u64) -> Option<u64> {
    map.iter()
        .find(|(start, len, _)| (*start..start + len).contains(&at))
        .and_then(|(start, _, off)| off.map(|o| o + at - start))
}

fn raw_stdout(args: &[&str]) -> Vec<u8> {
    let out = vhd_util(args);
    assert!(
        out.status.success(),
        "vhd-util {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn uuid_text(b: &[u8]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

#[test]
fn read_p_prints_the_footer_header_and_locators() {
    let dir = scratch("read-p");
    let base = dir.join("base.vhd");
    ok(&["create", "-n", s(&base), "-s", "20"]);
    let bytes = std::fs::read(&base).unwrap();
    let footer = &bytes[bytes.len() - 512..];
    let text = ok(&["read", "-n", s(&base), "-p"]);
    for line in [
        "VHD Footer Summary:".to_string(),
        "Cookie              : conectix".into(),
        "Features            : (0x00000002) <RESV>".into(),
        "File format version : Major: 1, Minor: 0".into(),
        "Data offset         : 512".into(),
        "Creator Application : 'tap'".into(),
        "Original disk size  : 20 MB (20971520 Bytes)".into(),
        "Current disk size   : 20 MB (20971520 Bytes)".into(),
        // The specification's geometry of 40960 sectors: 602 cylinders, 4 heads, 17 sectors.
        "Geometry            : Cyl: 602, Hds: 4, Sctrs: 17".into(),
        format!(
            "                    : = {} MB ({} Bytes)",
            (602 * 4 * 17) >> 11,
            602 * 4 * 17 * 512
        ),
        "Disk type           : Dynamic hard disk".into(),
        format!("UUID                : {}", uuid_text(&footer[68..84])),
        "Saved state         : No".into(),
        "Hidden              : 0".into(),
        "VHD Header Summary:".into(),
        "Cookie              : cxsparse".into(),
        "Data offset (unusd) : 18446744073709551615".into(),
        "Table offset        : 1536".into(),
        "Header version      : 0x00010000".into(),
        "Max BAT size        : 10".into(),
        "Block size          : 2097152 (2 MB)".into(),
        "Parent name         : ".into(),
        "Parent UUID         : 00000000-0000-0000-0000-000000000000".into(),
        "Parent timestamp    : Sat Jan  1 00:00:00 2000".into(),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} missing in\n{text}"
        );
    }
    let sum = u32::from_be_bytes(footer[64..68].try_into().unwrap());
    assert!(text.contains(&format!(
        "Checksum            : {sum:#x}|{sum:#x} (Good!)\n"
    )));
    assert_eq!(text.matches("(Good!)").count(), 2, "{text}");
    assert!(!text.contains("Parent Locators"), "{text}");
    // The timestamp, as ctime prints it: "Www Mmm dd hh:mm:ss yyyy".
    let ts = text
        .lines()
        .find_map(|l| l.strip_prefix("Timestamp           : "))
        .unwrap();
    assert_eq!(ts.len(), 24, "{ts:?}");
    assert_eq!(ts.split_whitespace().count(), 5, "{ts:?}");
    // -x: C's %#x.
    let hex = ok(&["read", "-n", s(&base), "-p", "-x"]);
    for line in [
        "Data offset         : 0x200",
        "Current disk size   : 0x14 MB (0x1400000 Bytes)",
        "Table offset        : 0x600",
        "Max BAT size        : 0xa",
        "Block size          : 0x200000 (0x2 MB)",
        "Data offset (unusd) : 0xffffffffffffffff",
    ] {
        assert!(hex.lines().any(|l| l == line), "{line:?} missing in\n{hex}");
    }

    // A child: its parent's name, UUID and locators.
    let child = dir.join("child.vhd");
    ok(&["snapshot", "-n", s(&child), "-p", s(&base)]);
    let text = ok(&["read", "-n", s(&child), "-p"]);
    assert!(text.contains("Disk type           : Differencing hard disk\n"));
    assert!(text.contains("Parent name         : base.vhd\n"), "{text}");
    assert!(text.contains(&format!(
        "Parent UUID         : {}\n",
        uuid_text(&footer[68..84])
    )));
    assert!(text.contains("VHD Parent Locators:\n--------------------\n"));
    let canonical = std::fs::canonicalize(&base).unwrap();
    for (i, code, name) in [
        (0, "PLAT_CODE_W2RU", "./base.vhd".to_string()),
        (1, "PLAT_CODE_MACX", "./base.vhd".into()),
        (2, "PLAT_CODE_W2KU", s(&canonical).to_string()),
    ] {
        let block = format!(
            "locator:            : {i}\n       code         : {code}\n       data_space   : 512\n"
        );
        assert!(text.contains(&block), "{block:?} missing in\n{text}");
        let at = text.find(&block).unwrap();
        assert!(
            text[at..].contains(&format!("       decoded name : {name}\n")),
            "{name} missing in\n{text}"
        );
    }
    assert_eq!(text.matches("locator:  ").count(), 3);
}

#[test]
fn read_maps_blocks_and_sectors_where_qemu_does() {
    if !have_qemu() {
        return;
    }
    let dir = scratch("read-map");
    let d = dir.join("d.vhd");
    ok(&["create", "-n", s(&d), "-s", "20"]);
    // qemu-io writes (its blocks' bitmaps wholly set): blocks 0, 1 and 7.
    qemu(
        "qemu-io",
        &[
            "-f",
            "vpc",
            "-c",
            "write -P 0x5a 1M 3M",
            "-c",
            "write -P 0x11 15M 4k",
            s(&d),
        ],
    );
    let map = qemu_map(&d);
    let bytes = std::fs::read(&d).unwrap();

    // -b: each entry is the block's bitmap sector, its data one sector (the bitmap) further.
    let text = ok(&["read", "-n", s(&d), "-b", "0", "-c", "10"]);
    assert_eq!(text.lines().count(), 10);
    for (block, line) in text.lines().enumerate() {
        let at = (block as u64) << 21;
        let expected = match qemu_offset(&map, at) {
            Some(data) => format!("block: {block}: offset: {}", data - 512),
            None => format!("block: {block}: offset: not allocated"),
        };
        assert_eq!(line, expected, "{text}");
    }
    assert_eq!(text.matches("not allocated").count(), 7);
    let hex = ok(&["read", "-n", s(&d), "-b", "2", "-c", "1", "-x"]);
    assert_eq!(hex, "block: 0x2: offset: not allocated\n");

    // -t: sectors to their file offsets.
    let text = ok(&["read", "-n", s(&d), "-t", "8191", "-c", "2"]);
    let o = |sector: u64| qemu_offset(&map, sector * 512).unwrap();
    assert_eq!(
        text,
        format!(
            "logical sector 8191: block number: 1, sector offset: 4095, file offset: {}\n\
             logical sector 8192: block number: 2, sector offset: 0, file offset: not allocated\n",
            o(8191)
        ),
        "{text}"
    );

    // -B: one bit per block, most significant first: blocks 0, 1, 7.
    assert_eq!(raw_stdout(&["read", "-n", s(&d), "-B"]), [0b1100_0001, 0]);
    // -m: a block's bitmap (one sector, every bit set by qemu), or "not allocated".
    let out = raw_stdout(&["read", "-n", s(&d), "-m", "1", "-c", "2"]);
    assert_eq!(out.len(), 512 + "block 2 not allocated\n".len());
    assert!(out[..512].iter().all(|&b| b == 0xff));
    assert_eq!(&out[512..], b"block 2 not allocated\n");
    // -d: a block's data, as in the file.
    let data_at = o(15 << 11) as usize - (15 << 20) % (2 << 20);
    let out = raw_stdout(&["read", "-n", s(&d), "-d", "7"]);
    assert!(out == bytes[data_at..data_at + (2 << 20)]);
    assert!(out[(1 << 20)..(1 << 20) + 4096].iter().all(|&b| b == 0x11));
    // -r and -R: the disk as qemu reads it.
    let disk = qemu_raw(&d);
    let out = raw_stdout(&["read", "-n", s(&d), "-r", "2040", "-c", "4200"]);
    assert!(out == disk[2040 * 512..(2040 + 4200) * 512]);
    let out = raw_stdout(&["read", "-n", s(&d), "-R", "1048570", "-c", "3000000"]);
    assert!(out == disk[1_048_570..1_048_570 + 3_000_000]);
    let out = raw_stdout(&["read", "-n", s(&d), "-r", "40959"]);
    assert!(out == disk[disk.len() - 512..]);

    // A child holding a few sectors: -i and -e read its bitmaps; -r reads through the parent.
    let child = dir.join("child.vhd");
    ok(&["snapshot", "-n", s(&child), "-p", s(&d)]);
    let mut chain = Chain::open(&child, true).unwrap();
    chain.write(4094 * 512, &[7u8; 3 * 512]).unwrap();
    chain.write(10 * 512, &[8u8; 512]).unwrap();
    chain.flush().unwrap();
    drop(chain);
    assert_eq!(
        ok(&["read", "-n", s(&child), "-e", "0", "-c", "40960"]),
        "10 1\n4094 3\n"
    );
    assert_eq!(
        ok(&["read", "-n", s(&child), "-e", "0", "-c", "40960", "-x"]),
        "0xa 0x1\n0xffe 0x3\n"
    );
    assert_eq!(
        ok(&["read", "-n", s(&child), "-i", "4095", "-c", "3"]),
        "block 0: sec: 4095: 1\nblock 1: sec: 0: 1\nblock 1: sec: 1: 0\n"
    );
    assert_eq!(
        ok(&["read", "-n", s(&child), "-i", "40000", "-c", "1"]),
        "block 9: sec: 3136: 0\n"
    );
    let bitmap = raw_stdout(&["read", "-n", s(&child), "-m", "0"]);
    assert_eq!(bitmap.len(), 512);
    assert_eq!(bitmap[1], 0x20, "sector 10 is bit 5 of byte 1");
    assert_eq!(bitmap[511], 0x03, "sectors 4094 and 4095");
    assert_eq!(bitmap.iter().map(|b| b.count_ones()).sum::<u32>(), 3);
    // qemu's vpc driver does not read a differencing image's parent: the expected disk is
    // the parent as qemu reads it with the child's sectors over it.
    let mut disk = qemu_raw(&d);
    disk[4094 * 512..4097 * 512].fill(7);
    disk[10 * 512..11 * 512].fill(8);
    let out = raw_stdout(&["read", "-n", s(&child), "-r", "0", "-c", "40960"]);
    assert!(out == disk);
    assert_eq!(&out[4094 * 512..4097 * 512], &[7u8; 1536][..]);
}

#[test]
fn read_refuses_ranges_past_the_end_and_what_an_image_lacks() {
    let dir = scratch("read-refusals");
    let d = dir.join("d.vhd");
    ok(&["create", "-n", s(&d), "-s", "20"]);
    let f = dir.join("f.vhd");
    ok(&["create", "-n", s(&f), "-s", "4", "-r"]);
    let missing = dir.join("missing.vhd");
    let (d, f) = (s(&d), s(&f));
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec!["read", "-n", d, "-b", "9", "-c", "2"],
            libc::ERANGE,
            "block 11 past the end (10 blocks)",
        ),
        (
            vec!["read", "-n", d, "-b", "10"],
            libc::ERANGE,
            "past the end",
        ),
        (
            vec!["read", "-n", d, "-m", "10"],
            libc::ERANGE,
            "past the end",
        ),
        (
            vec!["read", "-n", d, "-d", "18446744073709551615", "-c", "2"],
            libc::ERANGE,
            "past the end",
        ),
        (
            vec!["read", "-n", d, "-t", "40960"],
            libc::ERANGE,
            "sector 40961 past the end (40960 sectors)",
        ),
        (
            vec!["read", "-n", d, "-i", "40959", "-c", "2"],
            libc::ERANGE,
            "past the end",
        ),
        (
            vec!["read", "-n", d, "-e", "0", "-c", "40961"],
            libc::ERANGE,
            "past the end",
        ),
        (
            vec!["read", "-n", d, "-r", "40960"],
            libc::ERANGE,
            "past the end",
        ),
        (
            vec!["read", "-n", d, "-R", "20971000", "-c", "1000"],
            libc::ERANGE,
            "byte 20972000 past the end",
        ),
        (vec!["read", "-n", d, "-a"], libc::EINVAL, "has no batmap"),
        (
            vec!["read", "-n", d, "-j", "0"],
            libc::EINVAL,
            "has no batmap",
        ),
        (
            vec!["read", "-n", f, "-b", "0"],
            libc::EINVAL,
            "is a fixed disk: it has no BAT",
        ),
        (
            vec!["read", "-n", f, "-t", "0"],
            libc::EINVAL,
            "is a fixed disk",
        ),
        (vec!["read", "-n", f, "-B"], libc::EINVAL, "is a fixed disk"),
        (
            vec!["read", "-n", d, "-b", "x"],
            libc::EINVAL,
            "invalid value 'x' for '-b <BLK>'",
        ),
        (
            vec!["read", "-n", d, "-c", "-1", "-b", "0"],
            libc::EINVAL,
            "-1",
        ),
        (
            vec!["read", "-n", d, "-q"],
            libc::EINVAL,
            "unexpected argument '-q'",
        ),
        (
            vec!["read", "-p"],
            libc::EINVAL,
            "required arguments were not provided: -n <NAME>",
        ),
        (
            vec!["read", "-n", s(&missing), "-p"],
            libc::ENOENT,
            "cannot open",
        ),
    ];
    for (args, errno, says) in &cases {
        refused(args, *errno, says);
    }
    // A directory: no dump, one line.
    let out = vhd_util(&["read", "-n", s(&dir), "-p"]);
    assert_eq!(out.status.code(), Some(libc::EISDIR));
    assert!(out.stdout.is_empty());
    // A fixed disk prints its footer and reads.
    let text = ok(&["read", "-n", f, "-p"]);
    assert!(text.contains("Disk type           : Fixed hard disk\n"));
    assert!(!text.contains("Header Summary"));
    assert_eq!(raw_stdout(&["read", "-n", f, "-R", "4194303"]), [0]);
    // Nothing asked, nothing printed; -C (a cache) is accepted.
    assert_eq!(ok(&["read", "-n", d]), "");
    assert_eq!(
        ok(&["read", "-n", d, "-C", "-b", "0"]),
        "block: 0: offset: not allocated\n"
    );
    assert_eq!(ok(&["read", "-n", d, "-b", "0", "-c", "0"]), "");
    // An image that does not open: its headers dumped as found, then the error.
    let bad = dir.join("bad.vhd");
    let mut bytes = std::fs::read(d).unwrap();
    let n = bytes.len();
    bytes[n - 512 + 70] ^= 1;
    std::fs::write(&bad, &bytes).unwrap();
    let out = vhd_util(&["read", "-n", s(&bad), "-p"]);
    assert_eq!(out.status.code(), Some(libc::EINVAL));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{} appears invalid; dumping headers", s(&bad))));
    assert!(text.contains("(Bad!)"), "{text}");
    assert!(text.contains("VHD Header Summary:"), "{text}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("checksum"), "{err}");
}

/// A 20 MiB dynamic VHD and a snapshot of it in `dir`, each written at random: the base, the
/// child, and what each reads.
fn base_and_child(dir: &Path, rng: &mut Rng) -> (PathBuf, PathBuf, Vec<u8>, Vec<u8>) {
    let base = dir.join("base.vhd");
    ok(&["create", "-n", s(&base), "-s", "20"]);
    let mut model = vec![0u8; 20 << 20];
    write_random(&base, rng, &mut model);
    let base_model = model.clone();
    let child = dir.join("child.vhd");
    ok(&["snapshot", "-n", s(&child), "-p", s(&base)]);
    write_random(&child, rng, &mut model);
    (base, child, base_model, model)
}

#[test]
fn fill_allocates_every_block_and_qemu_reads_the_same_bytes() {
    let dir = scratch("fill");
    let mut rng = Rng::new(41);
    let (base, child, base_model, model) = base_and_child(&dir, &mut rng);
    let qemu = have_qemu();
    for (p, model) in [(&child, &model), (&base, &base_model)] {
        // qemu's vpc driver does not read a differencing image's parent (it reads zeros where
        // the child holds nothing): the reference is the model, and qemu once the image holds
        // every sector.
        let before = read_all(p);
        assert!(before == *model, "{}", p.display());
        let out = vhd_util(&["fill", "-n", s(p)]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout.is_empty() && out.stderr.is_empty());
        let after = if qemu { qemu_raw(p) } else { read_all(p) };
        assert!(
            before == after,
            "{}: the disk reads differently",
            p.display()
        );
        assert_eq!(ok(&["check", "-n", s(p)]), format!("{} is valid\n", s(p)));
        let bat = ok(&["read", "-n", s(p), "-b", "0", "-c", "10"]);
        assert_eq!(bat.lines().count(), 10);
        assert!(!bat.contains("not allocated"), "{bat}");
        assert_eq!(
            ok(&["read", "-n", s(p), "-e", "0", "-c", "40960"]),
            "0 40960\n"
        );
        if qemu {
            let map = qemu_map(p);
            assert!(map.iter().all(|&(_, _, off)| off.is_some()), "{map:?}");
            assert_eq!(map.iter().map(|m| m.1).sum::<u64>(), 20 << 20);
        }
    }
    assert!(read_all(&child) == model);
    // The child holds every sector: it reads the same without its parent.
    std::fs::remove_file(&base).unwrap();
    let mut image = blktap::vhd::VhdImage::open(&child, false).unwrap();
    let runs = image.map(0, 20 << 20).unwrap();
    assert!(runs.iter().all(|r| r.1.is_some()), "{runs:?}");

    let f = dir.join("f.vhd");
    ok(&["create", "-n", s(&f), "-s", "4", "-r"]);
    let d = dir.join("d.vhd");
    ok(&["create", "-n", s(&d), "-s", "4"]);
    let missing = dir.join("missing.vhd");
    let bytes = std::fs::read(&d).unwrap();
    for (args, errno, says) in [
        (vec!["fill", "-n", s(&f)], libc::EINVAL, "is a fixed disk"),
        (vec!["fill", "-n", s(&child)], libc::ENOENT, "not found"),
        (
            vec!["fill", "-n", s(&d), "-f", "0", "-t", "100"],
            libc::EINVAL,
            "can only be used with -b",
        ),
        (
            vec!["fill", "-n", s(&d), "-B"],
            libc::EINVAL,
            "can only be used with -b",
        ),
        (
            vec!["fill", "-n", s(&d), "-b", "-f", "8192"],
            libc::EINVAL,
            "past the disk's end",
        ),
        (
            vec!["fill", "-n", s(&d), "-b", "-f", "100", "-t", "99"],
            libc::EINVAL,
            "invalid sector range",
        ),
        (
            vec!["fill", "-n", s(&f), "-b"],
            libc::EINVAL,
            "is a fixed disk",
        ),
        (vec!["fill", "-n", s(&missing)], libc::ENOENT, "cannot open"),
        (vec!["fill"], libc::EINVAL, "-n <NAME>"),
    ] {
        refused(&args, errno, says);
    }
    assert!(std::fs::read(&d).unwrap() == bytes);
    let journal = dir.join("d.vhd.journal");
    std::fs::write(&journal, b"x").unwrap();
    refused(&["fill", "-n", s(&d)], libc::EINVAL, "vhd-util revert");
    assert!(std::fs::read(&d).unwrap() == bytes);
}

#[test]
fn fill_b_allocates_the_bat_and_bitmaps_and_the_disk_reads_the_same() {
    let dir = scratch("fill-b");
    let mut rng = Rng::new(43);
    let (base, child, base_model, mut model) = base_and_child(&dir, &mut rng);
    let qemu = have_qemu();
    for (p, model) in [(&child, &model), (&base, &base_model)] {
        let stored = std::fs::metadata(p).unwrap().blocks() * 512;
        let out = vhd_util(&["fill", "-n", s(p), "-b"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout.is_empty() && out.stderr.is_empty());
        assert!(
            read_all(p) == *model,
            "{}: the disk reads differently",
            p.display()
        );
        assert_eq!(ok(&["check", "-n", s(p)]), format!("{} is valid\n", s(p)));
        let bat = ok(&["read", "-n", s(p), "-b", "0", "-c", "10"]);
        assert_eq!(bat.lines().count(), 10);
        assert!(!bat.contains("not allocated"), "{bat}");
        // The data blocks were not written: the file stores less than a block more.
        let grew = std::fs::metadata(p).unwrap().blocks() * 512 - stored;
        assert!(grew < 2 << 20, "{}: {grew} bytes more", p.display());
        if qemu && p == &base {
            // qemu reads the dynamic disk the same, every block of it mapped in the file.
            assert!(qemu_raw(p) == *model);
            let map = qemu_map(p);
            assert!(map.iter().all(|&(_, _, off)| off.is_some()), "{map:?}");
        }
        // Again: nothing to do, nothing written.
        let bytes = std::fs::read(p).unwrap();
        ok(&["fill", "-n", s(p), "-b"]);
        assert!(std::fs::read(p).unwrap() == bytes);
    }
    // The child's reserved blocks mark no sector: it still reads its parent's.
    assert!(read_all(&child) == model);
    // Writes into reserved blocks read back.
    write_random(&child, &mut rng, &mut model);
    assert!(read_all(&child) == model);
    assert_eq!(
        ok(&["check", "-n", s(&child)]),
        format!("{} is valid\n", s(&child))
    );

    // -f and -t: the blocks holding those sectors (2 MiB blocks of 4096 sectors), -t past the
    // end clamped; -B accepted with -b.
    let d = dir.join("d.vhd");
    ok(&["create", "-n", s(&d), "-s", "20"]);
    ok(&["fill", "-n", s(&d), "-b", "-f", "4096", "-t", "4097"]);
    ok(&[
        "fill",
        "-n",
        s(&d),
        "-b",
        "-B",
        "-f",
        "36863",
        "-t",
        "999999",
    ]);
    let bat = ok(&["read", "-n", s(&d), "-b", "0", "-c", "10"]);
    let allocated: Vec<bool> = bat.lines().map(|l| !l.contains("not allocated")).collect();
    assert_eq!(
        allocated,
        [false, true, false, false, false, false, false, false, true, true],
        "{bat}"
    );
    assert_eq!(ok(&["check", "-n", s(&d)]), format!("{} is valid\n", s(&d)));
    assert!(read_all(&d) == vec![0u8; 20 << 20]);
}

#[test]
fn modify_s_sets_the_physical_size_and_z_forgets_every_block() {
    let dir = scratch("modify-sz");
    let mut rng = Rng::new(42);
    let d = dir.join("d.vhd");
    ok(&["create", "-n", s(&d), "-s", "20"]);
    let mut model = vec![0u8; 20 << 20];
    write_random(&d, &mut rng, &mut model);
    let qemu = have_qemu();
    let reads = |p: &Path| if qemu { qemu_raw(p) } else { read_all(p) };
    let before = reads(&d);
    assert!(before == model);
    let l = len(&d);
    for size in [l + (3 << 20), l + 512, l] {
        ok(&["modify", "-n", s(&d), "-s", &size.to_string()]);
        assert_eq!(len(&d), size);
        assert_eq!(ok(&["query", "-n", s(&d), "-s"]), format!("{size}\n"));
        assert_eq!(ok(&["check", "-n", s(&d)]), format!("{} is valid\n", s(&d)));
        assert!(reads(&d) == before);
    }
    // Below the end of its data: refused, nothing written.
    let bytes = std::fs::read(&d).unwrap();
    for size in [l - 512, 0] {
        refused(
            &["modify", "-n", s(&d), "-s", &size.to_string()],
            libc::EINVAL,
            "would cut into its data",
        );
    }
    assert!(std::fs::read(&d).unwrap() == bytes);
    let f = dir.join("f.vhd");
    ok(&["create", "-n", s(&f), "-s", "4", "-r"]);
    refused(
        &["modify", "-n", s(&f), "-s", "8389120"],
        libc::EINVAL,
        "is a fixed disk",
    );
    refused(
        &["modify", "-n", s(&f), "-z"],
        libc::ENOSYS,
        "no BAT to zero",
    );

    // -z: every block forgotten, the file cut after the metadata (footer copy, header, one
    // sector of BAT: 2048 bytes) and its footer.
    let child = dir.join("child.vhd");
    ok(&["snapshot", "-n", s(&child), "-p", s(&d)]);
    let snapshot_len = len(&child);
    write_random(&child, &mut rng, &mut model);
    // (qemu's vpc driver does not read a differencing image's parent: the library reads it.)
    assert!(read_all(&child) == model);
    ok(&["modify", "-n", s(&child), "-z"]);
    assert!(read_all(&child) == before, "the child reads as its parent");
    assert_eq!(
        len(&child),
        snapshot_len,
        "cut after the locators (4096 bytes): the blocks are gone"
    );
    assert_eq!(
        ok(&["check", "-n", s(&child)]),
        format!("{} is valid\n", s(&child))
    );
    ok(&["modify", "-n", s(&d), "-z", "-s", "4096"]);
    assert_eq!(len(&d), 4096);
    assert!(reads(&d) == vec![0u8; 20 << 20]);
    assert_eq!(ok(&["modify", "-n", s(&d), "-z"]), "");
    assert_eq!(len(&d), 2560);
    assert_eq!(
        ok(&["read", "-n", s(&d), "-B"]),
        String::from_utf8(vec![0u8; 2]).unwrap()
    );
    assert_eq!(ok(&["check", "-n", s(&d)]), format!("{} is valid\n", s(&d)));
    // Writes allocate again after it.
    write_random(&d, &mut rng, &mut vec![0u8; 20 << 20]);
    assert_eq!(ok(&["check", "-n", s(&d)]), format!("{} is valid\n", s(&d)));
}

/// The VHD checksum: the ones' complement of the byte sum.
fn vhd_sum(b: &[u8]) -> u32 {
    !b.iter().fold(0u32, |s, &x| s.wrapping_add(u32::from(x)))
}

/// An 8 MiB image made by create (footer copy, header at 512, BAT at 1536: 2048 bytes of
/// metadata), turned into one of XenServer's: creator tap 1.2, a batmap header after the BAT
/// and one sector of map, blocks 0 and 2 marked full. Returns the map.
fn xenserver_image(p: &Path) -> [u8; 512] {
    ok(&["create", "-n", s(p), "-s", "8"]);
    let mut b = std::fs::read(p).unwrap();
    assert_eq!(b.len(), 2560);
    let mut footer = b[2048..].to_vec();
    footer[32..36].copy_from_slice(&0x0001_0002u32.to_be_bytes());
    footer[64..68].fill(0);
    let sum = vhd_sum(&footer);
    footer[64..68].copy_from_slice(&sum.to_be_bytes());
    b.truncate(2048);
    b[..512].copy_from_slice(&footer);
    let mut map = [0u8; 512];
    map[0] = 0xa0;
    let mut header = [0u8; 512];
    header[..8].copy_from_slice(b"tdbatmap");
    header[8..16].copy_from_slice(&2560u64.to_be_bytes());
    header[16..20].copy_from_slice(&1u32.to_be_bytes());
    header[20..24].copy_from_slice(&0x0001_0002u32.to_be_bytes());
    header[24..28].copy_from_slice(&vhd_sum(&map).to_be_bytes());
    b.extend_from_slice(&header);
    b.extend_from_slice(&map);
    b.extend_from_slice(&footer);
    std::fs::write(p, &b).unwrap();
    assert_eq!(ok(&["check", "-n", s(p)]), format!("{} is valid\n", s(p)));
    map
}

#[test]
fn read_prints_a_batmap_and_modify_z_clears_it() {
    let dir = scratch("batmap");
    let p = dir.join("b.vhd");
    let map = xenserver_image(&p);
    let text = ok(&["read", "-n", s(&p), "-p"]);
    let summary = format!(
        "VHD Batmap Summary:\n-------------------\nBatmap offset       : 2560\nBatmap size (secs)  : 1\nBatmap version      : 0x00010002\nChecksum            : {0:#x}|{0:#x} (Good!)\n",
        vhd_sum(&map)
    );
    assert!(text.contains(&summary), "{text}");
    assert!(text.contains("Creator version     : Major: 1, Minor: 2\n"));
    assert!(raw_stdout(&["read", "-n", s(&p), "-a"]) == map);
    assert_eq!(
        ok(&["read", "-n", s(&p), "-j", "0", "-c", "4"]),
        "batmap for block 0: 1\nbatmap for block 1: 0\nbatmap for block 2: 1\nbatmap for block 3: 0\n"
    );
    refused(
        &["read", "-n", s(&p), "-j", "3", "-c", "2"],
        libc::ERANGE,
        "block 5 past the end (4 blocks)",
    );
    // -z forgets the blocks and clears the map (its checksum rewritten).
    ok(&["modify", "-n", s(&p), "-z"]);
    assert!(raw_stdout(&["read", "-n", s(&p), "-a"]) == [0u8; 512]);
    let text = ok(&["read", "-n", s(&p), "-p"]);
    assert!(text.contains(&format!(
        "Checksum            : {0:#x}|{0:#x} (Good!)\n",
        vhd_sum(&[0u8; 512])
    )));
    assert_eq!(len(&p), 3072 + 512, "the metadata and the footer");
    assert_eq!(ok(&["check", "-n", s(&p)]), format!("{} is valid\n", s(&p)));
}

#[test]
fn resize_moves_a_batmap_with_the_bat() {
    let dir = scratch("resize-batmap");
    let p = dir.join("b.vhd");
    let map = xenserver_image(&p);
    // Every block allocated (right after the map), as the bits for blocks 0 and 2 say.
    ok(&["fill", "-n", s(&p)]);
    // 512 blocks: a BAT of 2048 bytes (to 3584), the batmap's header after it, its map at
    // 4096; the blocks in their way move to the end.
    ok(&["resize", "-n", s(&p), "-s", "1024"]);
    assert!(!dir.join("b.vhd.journal").exists());
    assert_eq!(ok(&["check", "-n", s(&p)]), format!("{} is valid\n", s(&p)));
    let text = ok(&["read", "-n", s(&p), "-p"]);
    let summary = format!(
        "VHD Batmap Summary:\n-------------------\nBatmap offset       : 4096\nBatmap size (secs)  : 1\nBatmap version      : 0x00010002\nChecksum            : {0:#x}|{0:#x} (Good!)\n",
        vhd_sum(&map)
    );
    assert!(text.contains(&summary), "{text}");
    assert!(raw_stdout(&["read", "-n", s(&p), "-a"]) == map);
    assert_eq!(
        ok(&["read", "-n", s(&p), "-j", "0", "-c", "5"]),
        "batmap for block 0: 1\nbatmap for block 1: 0\nbatmap for block 2: 1\nbatmap for block 3: 0\nbatmap for block 4: 0\n"
    );
    // An invalid batmap is refused, as XenServer's vhd-util refuses it.
    let mut b = std::fs::read(&p).unwrap();
    b[4096] ^= 1;
    std::fs::write(&p, &b).unwrap();
    refused(
        &["resize", "-n", s(&p), "-s", "4096"],
        libc::EINVAL,
        "its batmap is invalid (checksum",
    );
    assert!(std::fs::read(&p).unwrap() == b);
}
