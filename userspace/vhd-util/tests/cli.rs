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
