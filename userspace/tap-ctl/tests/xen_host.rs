//! tap-ctl as a drop-in on a Xen host, without a kernel module (`BLKTAP_PROC_MISC` names a
//! `/proc/misc` that has `blktap/control`): against a stand-in of the original tapdisk that
//! speaks only the binary protocol (`tests/vm/origtapdisk.py`), against this project's tapdisk
//! for the flags whose features it lacks, and the module check.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use blktap::ctl::{Client, CtlRequest};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tap-ctl-xen-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("misc"), "200 blktap/control\n 63 vga_arbiter\n").unwrap();
    dir
}

/// Runs tap-ctl with `args` in the scratch `dir`.
fn tap_ctl(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_tap-ctl"))
        .args(args)
        .env("BLKTAP_PROC_MISC", dir.join("misc"))
        .env("BLKTAP_CTL_DIR", dir.join("ctl"))
        .env_remove("TAPDISK")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    eprintln!(
        "tap-ctl {args:?}: {:?}\n  stdout: {}  stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = tap_ctl(dir, args);
    assert!(out.status.success(), "tap-ctl {args:?} failed");
    String::from_utf8(out.stdout).unwrap()
}

fn status(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn gone(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

#[test]
fn the_storage_managers_calls_against_the_original_tapdisk() {
    let dir = scratch("orig");
    let ctl = dir.join("ctl");
    // The stand-in daemonizes and prints its socket, as the original.
    let out = Command::new("python3")
        .arg(repo().join("tests/vm/origtapdisk.py"))
        .env("ORIG_TAPDISK_CTL_DIR", &ctl)
        .output()
        .expect("python3");
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    let pid: i32 = line
        .trim()
        .strip_prefix(&format!("{}/ctl", ctl.display()))
        .unwrap()
        .parse()
        .unwrap();
    let p = pid.to_string();
    let p = p.as_str();

    ok(&dir, &["attach", "-p", p, "-m", "3"]);
    let out = tap_ctl(&dir, &["attach", "-p", p, "-m", "3"]);
    assert_eq!(status(&out), libc::EEXIST);
    ok(
        &dir,
        &[
            "open",
            "-p",
            p,
            "-m",
            "3",
            "-a",
            "vhd:/sr/leaf.vhd",
            "-t",
            "120",
            "-D",
        ],
    );
    assert_eq!(
        ok(&dir, &["list"]),
        format!("pid={pid} minor=3 state=0x0 args=vhd:/sr/leaf.vhd\n")
    );
    let stats: serde_json::Value =
        serde_json::from_str(&ok(&dir, &["stats", "-p", p, "-m", "3"])).unwrap();
    assert_eq!(stats["name"], "vhd:/sr/leaf.vhd");
    assert_eq!(stats["images"][0]["driver"]["name"], "vhd");
    ok(&dir, &["pause", "-p", p, "-m", "3", "-t", "30"]);
    assert!(ok(&dir, &["list", "-p", p]).contains("state=0x2a"));
    ok(
        &dir,
        &["unpause", "-p", p, "-m", "3", "-a", "vhd:/sr/leaf2.vhd"],
    );
    assert!(ok(&dir, &["list", "-m", "3"]).contains("args=vhd:/sr/leaf2.vhd"));
    // Errors are the tapdisk's errnos.
    let out = tap_ctl(&dir, &["stats", "-p", p, "-m", "9"]);
    assert_eq!(status(&out), libc::ENODEV);
    let out = tap_ctl(&dir, &["detach", "-p", p, "-m", "3"]);
    assert_eq!(status(&out), libc::EBUSY);

    // This project's JSON protocol on the original's socket: refused within its read timeout,
    // never a hang.
    let t0 = Instant::now();
    let e = Client::connect_with_timeout(&ctl, pid, Duration::from_secs(30))
        .unwrap()
        .call(&CtlRequest::List)
        .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    assert_eq!(e.errno(), libc::EPROTO, "{e}");

    ok(&dir, &["close", "-p", p, "-m", "3", "-t", "120"]);
    ok(&dir, &["detach", "-p", p, "-m", "3"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gone(pid) {
        assert!(
            Instant::now() < deadline,
            "the stand-in did not exit when idle"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn flags_whose_features_are_missing_are_eopnotsupp_in_one_line() {
    let dir = scratch("flags");
    let pid: i32 = ok(&dir, &["spawn", "--log", dir.join("log").to_str().unwrap()])
        .trim()
        .parse()
        .unwrap();
    let p = pid.to_string();
    let p = p.as_str();
    let open = |extra: &[&str]| {
        let mut args = vec!["open", "-p", p, "-m", "3", "-a", "aio:/x"];
        args.extend_from_slice(extra);
        tap_ctl(&dir, &args)
    };
    for (flags, feature) in [
        (&["-e", "1"][..], "parent chain"),
        (&["-r"], "local read cache"),
        (&["-2", "aio:/m"], "secondary mirror"),
        (&["-s"], "standby"),
        (&["-C", "/var/log/cbt"], "changed-block log"),
    ] {
        let out = open(flags);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(status(&out), libc::EOPNOTSUPP, "{flags:?}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(feature), "{flags:?}: {err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tap-ctl"))
        .args(["open", "-p", p, "-m", "3", "-a", "aio:/x", "-E"])
        .env("BLKTAP_PROC_MISC", dir.join("misc"))
        .env("BLKTAP_CTL_DIR", dir.join("ctl"))
        .stdin(fs::File::open(dir.join("misc")).unwrap())
        .output()
        .unwrap();
    assert_eq!(status(&out), libc::EINVAL, "a key of a bad size");
    let key = dir.join("key");
    fs::write(&key, [7u8; 32]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tap-ctl"))
        .args(["open", "-p", p, "-m", "3", "-a", "aio:/x", "-E"])
        .env("BLKTAP_PROC_MISC", dir.join("misc"))
        .env("BLKTAP_CTL_DIR", dir.join("ctl"))
        .stdin(fs::File::open(&key).unwrap())
        .output()
        .unwrap();
    assert_eq!(status(&out), libc::EOPNOTSUPP);
    assert!(String::from_utf8_lossy(&out.stderr).contains("encrypt"));
    for args in [
        &["unpause", "-p", p, "-m", "3", "-2", "aio:/m"][..],
        &["unpause", "-p", p, "-m", "3", "-c", "/log"],
        &["create", "-a", "aio:/x", "-c", "slice"],
        &["spawn", "-c", "slice"],
    ] {
        let out = tap_ctl(&dir, args);
        assert_eq!(status(&out), libc::EOPNOTSUPP, "{args:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    }
    // Flags that work are accepted (the tap is missing here: ENODEV, not a usage error).
    let out = tap_ctl(&dir, &["close", "-p", p, "-m", "3", "-f", "-t", "2"]);
    assert_eq!(status(&out), libc::ENODEV);
    let out = tap_ctl(&dir, &["pause", "-p", p, "-m", "3", "-t", "2", "--debug"]);
    assert_eq!(status(&out), libc::ENODEV);
    assert!(String::from_utf8_lossy(&out.stderr).contains("sending 'pause' message"));
    // A usage error is EINVAL.
    assert_eq!(status(&tap_ctl(&dir, &["close", "-p", p])), libc::EINVAL);
    assert_eq!(
        status(&tap_ctl(&dir, &["open", "-p", p, "-m", "1", "-x"])),
        libc::EINVAL
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn without_the_module_every_command_says_so_as_the_original() {
    let dir = scratch("nomodule");
    fs::write(dir.join("misc"), " 63 vga_arbiter\n").unwrap();
    for args in [
        &["list"][..],
        &["check"],
        &["create", "-a", "aio:/x"],
        &["stats", "-p", "1"],
    ] {
        let out = tap_ctl(&dir, args);
        assert_eq!(status(&out), 218, "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "blktap kernel module not installed\n"
        );
    }
    fs::remove_dir_all(dir).unwrap();
}
