//! The tapdisk binary's control socket, without a kernel module: the protocol, errors for taps
//! it does not have, and a clean exit on SIGTERM.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blktap::ctl::{socket_path, Client, CtlRequest};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Starts a tapdisk and connects to it. The caller waits for the child it gets back.
#[allow(clippy::zombie_processes)]
fn start(dir: &PathBuf) -> (Child, Client) {
    let _ = std::fs::remove_dir_all(dir);
    let mut child = Command::new(env!("CARGO_BIN_EXE_tapdisk"))
        .arg("-D")
        .arg("--ctl-dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(client) = Client::connect(dir, pid) {
            return (child, client);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tapdisk did not come up");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tapdisk-test-{name}-{}", std::process::id()))
}

#[test]
fn answers_requests_and_exits_on_sigterm() {
    let dir = scratch("socket");
    let (mut child, mut client) = start(&dir);
    let pid = child.id() as i32;

    let list = client.call(&CtlRequest::List).unwrap();
    assert_eq!(list.taps, Some(vec![]));

    // Taps it does not serve: ENODEV, naming the tap.
    for req in [
        CtlRequest::Stats { minor: 5 },
        CtlRequest::Close { minor: 5 },
        CtlRequest::Detach { minor: 5 },
        CtlRequest::Pause { minor: 5 },
        CtlRequest::Open {
            minor: 5,
            params: "ram:1M".into(),
            readonly: false,
            recovery: false,
            recover: false,
            no_direct: false,
            timeout: None,
        },
        CtlRequest::Unpause {
            minor: 5,
            params: None,
        },
    ] {
        let e = client.call(&req).unwrap_err();
        assert_eq!(e.errno(), libc::ENODEV, "{req:?}: {e}");
        assert!(e.to_string().contains("tap 5 is not attached"), "{e}");
    }

    // Attaching a tap the kernel does not have fails (no module here, or no such tap).
    let r = client
        .call_raw(&CtlRequest::Attach { minor: 16000 })
        .unwrap();
    if r.ok {
        client.call(&CtlRequest::Detach { minor: 16000 }).unwrap();
    } else {
        assert!(r.errno.unwrap() > 0);
    }

    // Malformed lines get an answer too, and the connection stays usable.
    let mut raw = std::os::unix::net::UnixStream::connect(socket_path(&dir, pid)).unwrap();
    use std::io::{BufRead, BufReader, Write};
    raw.write_all(b"{not json\n\n{\"op\":\"list\"}\n").unwrap();
    let mut reader = BufReader::new(raw.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("{\"ok\":false,\"errno\":22,"), "{line}");
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "{\"ok\":true,\"taps\":[]}\n");

    kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!socket_path(&dir, pid).exists());
    std::fs::remove_dir_all(dir).unwrap();
}
