//! vhd-util end to end: images made and inspected through the command line, data written
//! through the library, qemu-img as an independent reader where installed.

use std::path::Path;
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
        (vec!["modify", "-n", c], libc::EINVAL, "-p PARENT is needed"),
        (
            vec!["modify", "-n", c, "-s", "1000000"],
            libc::ENOSYS,
            "not supported",
        ),
        (vec!["modify", "-n", c, "-z"], libc::ENOSYS, "not supported"),
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
