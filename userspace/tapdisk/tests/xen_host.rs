//! tapdisk as a drop-in on a Xen host, without a kernel module: the original binary protocol
//! driven by an independent Python client (`tests/vm/tdmsg.py`), malformed messages included;
//! the original process model (daemonize, print the socket path); the signals.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tapdisk-xen-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts `tapdisk -D` in `dir`; returns it and its socket's path (the line it prints).
#[allow(clippy::zombie_processes)]
fn start_foreground(dir: &Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tapdisk"))
        .arg("-D")
        .arg("--ctl-dir")
        .arg(dir.join("ctl"))
        .arg("--log")
        .arg(dir.join("log"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while out.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    (child, String::from_utf8(line).unwrap())
}

fn stop(mut child: Child) {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_independent_client_of_the_binary_protocol_malformed_messages_included() {
    let dir = scratch("malformed");
    let (child, sock) = start_foreground(&dir);
    assert!(sock.ends_with(&format!("/ctl{}", child.id())), "{sock}");
    let out = Command::new("python3")
        .arg(repo().join("tests/vm/tdmsg.py"))
        .arg("malformed")
        .arg(&sock)
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "tdmsg.py malformed failed");
    assert!(text.contains("# ") && !text.contains("not ok"));
    // The daemon still runs, and exits cleanly.
    stop(child);
    assert!(!Path::new(&sock).exists());
    let log = fs::read_to_string(dir.join("log")).unwrap();
    assert!(
        log.contains("control connection closed after 10 s"),
        "{log}"
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn with_no_arguments_it_daemonizes_and_prints_its_socket() {
    let dir = scratch("daemon");
    let ctl = dir.join("ctl");
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_tapdisk"))
        .arg("--ctl-dir")
        .arg(&ctl)
        .arg("--log")
        .arg(dir.join("log"))
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    let line = String::from_utf8(out.stdout).unwrap();
    let path = line.trim_end();
    assert!(
        line.ends_with('\n') && line.lines().count() == 1,
        "{line:?}"
    );
    let pid: i32 = path
        .strip_prefix(&format!("{}/ctl", ctl.display()))
        .expect("<dir>/ctl<pid>")
        .parse()
        .unwrap();
    // The daemon: another process than the one that exited, listening, in its own session.
    assert!(Path::new(path).exists());
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    assert_eq!(fields[3], pid.to_string(), "session leader: {stat}");
    kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    wait_for("the daemon to exit", || !Path::new(path).exists());
    // A daemon that cannot start says so, and the parent exits 1.
    fs::write(dir.join("file"), "").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tapdisk"))
        .arg("--ctl-dir")
        .arg(dir.join("file/ctl"))
        .arg("--log")
        .arg(dir.join("log"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("did not start"));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn sighup_reopens_the_log_sigusr1_dumps_the_state_and_neither_stops_it() {
    let dir = scratch("signals");
    let (child, sock) = start_foreground(&dir);
    let pid = Pid::from_raw(child.id() as i32);
    let log = dir.join("log");
    wait_for("the first log line", || log.exists());
    // logrotate: move the log away, then SIGHUP.
    fs::rename(&log, dir.join("log.1")).unwrap();
    kill(pid, Signal::SIGHUP).unwrap();
    wait_for("a new log", || {
        fs::read_to_string(&log).is_ok_and(|l| l.contains("SIGHUP: reopened"))
    });
    kill(pid, Signal::SIGUSR1).unwrap();
    wait_for("the state dump", || {
        fs::read_to_string(&log).is_ok_and(|l| l.contains("SIGUSR1: end of state"))
    });
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("SIGUSR1: state of tapdisk"), "{text}");
    assert!(Path::new(&sock).exists(), "still serving");
    let old = fs::read_to_string(dir.join("log.1")).unwrap();
    assert!(old.contains("listening on"), "{old}");
    stop(child);
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("SIGTERM: shutting down"), "{text}");
    fs::remove_dir_all(dir).unwrap();
}
