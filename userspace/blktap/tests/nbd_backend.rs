//! Host tests of the `nbd:` backend against real servers on temporary unix sockets (nbdkit
//! `memory` and `file`, qemu-nbd serving raw and qcow2 files, and this project's own server), and
//! against misbehaving servers written here. A test whose tool is missing says so and passes
//! without checking (scripts/setup installs them).

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blktap::backend::nbd::{NbdBackend, Options};
use blktap::backend::{open, Backend, Completion, ImageKind, ImageSpec, Io};
use blktap::nbd::proto::{self, rep, tflag, write_opt_reply, ReplyHeader, Request};
use blktap::nbd::server::{FileExport, Server, ServerConfig};
use blktap::ring::Op;
use nix::errno::Errno;

const MIB: u64 = 1 << 20;

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("SKIP: {tool} is not installed (scripts/setup installs it)");
    }
    found
}

/// A server process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a server that writes `pidfile` once it listens, and waits for that.
fn spawn(cmd: &mut Command, sock: &Path, pidfile: &Path) -> Proc {
    let _ = std::fs::remove_file(sock);
    let _ = std::fs::remove_file(pidfile);
    let child = cmd.stdout(Stdio::null()).spawn().unwrap();
    let p = Proc(child);
    let t = Instant::now();
    while !std::fs::metadata(pidfile).is_ok_and(|m| m.len() > 0) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{} never came up",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

fn nbdkit(sock: &Path, args: &[&str]) -> Proc {
    let pidfile = sock.with_extension("pid");
    spawn(
        Command::new("nbdkit")
            .args(["-f", "--exit-with-parent", "-P"])
            .arg(&pidfile)
            .arg("-U")
            .arg(sock)
            .args(args),
        sock,
        &pidfile,
    )
}

fn qemu_nbd(sock: &Path, format: &str, file: &Path) -> Proc {
    let pidfile = sock.with_extension("pid");
    spawn(
        Command::new("qemu-nbd")
            .args(["-t", "--discard=unmap", "-f", format, "--pid-file"])
            .arg(&pidfile)
            .arg("-k")
            .arg(sock)
            .arg(file),
        sock,
        &pidfile,
    )
}

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

fn quick() -> Options {
    Options {
        deadline: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(2),
    }
}

fn iov(buf: &mut [u8]) -> libc::iovec {
    libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }
}

/// Queues `ios` (tags 0..), submits, drains; the results in tag order.
///
/// # Safety
///
/// The buffers of `ios` must stay valid until this returns.
unsafe fn run(b: &mut dyn Backend, ios: Vec<Io>) -> Vec<Result<(), Errno>> {
    let n = ios.len();
    for (i, mut io) in ios.into_iter().enumerate() {
        io.tag = i as u64;
        // SAFETY: the caller keeps the buffers valid until the drain below returns.
        unsafe { b.queue(io) };
    }
    b.submit().unwrap();
    let mut done: Vec<Completion> = Vec::new();
    b.drain(&mut done).unwrap();
    assert_eq!(done.len(), n, "{done:?}");
    assert_eq!(b.in_flight(), 0);
    done.sort_by_key(|c| c.tag);
    done.into_iter().map(|c| c.result).collect()
}

fn io(op: Op, offset: u64, iov: Vec<libc::iovec>, discard_len: u64) -> Io {
    Io {
        tag: 0,
        op,
        offset,
        iov,
        discard_len,
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 / 7) % 251) as u8)
        .collect()
}

/// Writes 64 scattered, pipelined 12 KiB writes (three iovecs each) and reads them back with a
/// different iovec layout; checks a FUA write, a flush and a discard (reads back as zeros) when
/// the backend has them. Returns the bytes written at `base`.
fn exercise(b: &mut dyn Backend, base: u64) -> Vec<u8> {
    let chunk = 12 * 1024;
    let mut bufs: Vec<Vec<u8>> = (0..64).map(|i| pattern(i, chunk)).collect();
    let ios = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, buf)| {
            let (a, rest) = buf.split_at_mut(4096);
            let (bb, c) = rest.split_at_mut(4096);
            io(
                Op::Write,
                base + (i * chunk) as u64,
                vec![iov(a), iov(bb), iov(c)],
                0,
            )
        })
        .collect();
    // SAFETY: the buffers live until after run returns.
    let r = unsafe { run(b, ios) };
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    let mut back = vec![0u8; 64 * chunk];
    let ios = back
        .chunks_mut(8192)
        .enumerate()
        .map(|(i, c)| io(Op::Read, base + (i * 8192) as u64, vec![iov(c)], 0))
        .collect();
    // SAFETY: as above.
    let r = unsafe { run(b, ios) };
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    assert!(back == bufs.concat(), "read back differs");
    let f = b.features();
    let mut extra = Vec::new();
    let mut fua = vec![0x3cu8; 4096];
    if f.fua {
        extra.push(io(Op::WriteFua, base, vec![iov(&mut fua)], 0));
    }
    if f.flush {
        extra.push(io(Op::Flush, 0, vec![], 0));
    }
    if f.discard {
        extra.push(io(Op::Discard, base + 4096, vec![], 8192));
    }
    // SAFETY: as above.
    let r = unsafe { run(b, extra) };
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    let mut expect = bufs.concat();
    if f.fua {
        expect[..4096].fill(0x3c);
    }
    if f.discard {
        expect[4096..12288].fill(0);
    }
    let mut back = vec![0xffu8; 16384];
    // SAFETY: as above.
    let r = unsafe { run(b, vec![io(Op::Read, base, vec![iov(&mut back)], 0)]) };
    assert_eq!(r, [Ok(())]);
    assert!(back == expect[..16384], "after fua/discard");
    expect
}

#[test]
fn opening_parses_the_uri_and_reports_missing_servers() {
    let dir = tempfile::tempdir().unwrap();
    let spec: ImageSpec = format!("nbd:{}", uri(&dir.path().join("none.sock")))
        .parse()
        .unwrap();
    assert_eq!(spec.kind, ImageKind::Nbd);
    let Err(e) = open(&spec, false) else {
        panic!("opened an NBD image with no server");
    };
    assert!(
        e.to_string().contains("NBD server nbd+unix:///?socket="),
        "{e}"
    );
    assert_eq!(e.errno(), libc::ENOENT);
}

#[test]
fn against_nbdkit_memory() {
    if !have("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let _srv = nbdkit(&sock, &["memory", "64M"]);
    let spec: ImageSpec = format!("nbd:{}", uri(&sock)).parse().unwrap();
    let mut b = open(&spec, false).unwrap();
    assert_eq!(b.size(), 64 * MIB);
    assert_eq!(b.kind(), ImageKind::Nbd);
    let f = b.features();
    assert!(f.flush && f.fua && f.discard, "{f:?}");
    assert!(b.event_fd().is_some());
    exercise(b.as_mut(), 5 * MIB + 512);
    // Past the end: refused without asking the server.
    let mut buf = vec![0u8; 4096];
    // SAFETY: the buffer outlives run.
    let r = unsafe {
        run(
            b.as_mut(),
            vec![io(Op::Read, 64 * MIB - 512, vec![iov(&mut buf)], 0)],
        )
    };
    assert_eq!(r, [Err(Errno::EIO)]);
}

#[test]
fn against_nbdkit_on_loopback_tcp() {
    if !have("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    // A free port: the kernel picks one, and nbdkit takes it after it is let go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _srv = spawn(
        Command::new("nbdkit")
            .args(["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .arg("-P")
            .arg(&pidfile)
            .args(["-e", "vol", "memory", "64M"]),
        &dir.path().join("unused"),
        &pidfile,
    );
    let u = format!("nbd://127.0.0.1:{port}/vol");
    let mut b = NbdBackend::open_with(&u, false, quick()).unwrap();
    assert_eq!(b.size(), 64 * MIB);
    exercise(&mut b, 7 * MIB);
    assert_eq!(b.uri().to_string(), u);
}

#[test]
fn flush_fua_and_discard_reach_the_server() {
    if !have("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let log = dir.path().join("log");
    let logfile = format!("logfile={}", log.display());
    let _srv = nbdkit(&sock, &["--filter=log", "memory", "64M", &logfile]);
    let mut b = NbdBackend::open_with(&uri(&sock), false, quick()).unwrap();
    exercise(&mut b, 0);
    drop(b);
    let text = std::fs::read_to_string(&log).unwrap();
    let count = |what: &str| text.lines().filter(|l| l.contains(what)).count();
    assert!(count(" Flush ") >= 1, "{text}");
    assert!(count(" Zero ") >= 1, "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains(" Write ") && l.contains("fua=1")),
        "{text}"
    );
    // 64 writes, 24 reads, the FUA write and the final read, besides the handshake's lines.
    assert!(count(" Write ") >= 65 && count(" Read ") >= 25, "{text}");
}

#[test]
fn against_nbdkit_file_the_file_changes() {
    if !have("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let file = dir.path().join("disk.raw");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let _srv = nbdkit(&sock, &["file", &format!("file={}", file.display())]);
    let mut b = NbdBackend::open_with(&uri(&sock), false, quick()).unwrap();
    let expect = exercise(&mut b, 3 * MIB);
    let mut on_disk = vec![0u8; expect.len()];
    std::fs::File::open(&file)
        .unwrap()
        .read_exact_at(&mut on_disk, 3 * MIB)
        .unwrap();
    assert!(on_disk == expect);
}

#[test]
fn against_qemu_nbd_raw_and_qcow2() {
    if !have("qemu-nbd") || !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for format in ["raw", "qcow2"] {
        let sock = dir.path().join(format!("{format}.sock"));
        let file = dir.path().join(format!("disk.{format}"));
        let ok = Command::new("qemu-img")
            .args(["create", "-q", "-f", format])
            .arg(&file)
            .arg("64M")
            .status()
            .unwrap();
        assert!(ok.success());
        let expect;
        {
            let _srv = qemu_nbd(&sock, format, &file);
            let mut b = NbdBackend::open_with(&uri(&sock), false, quick()).unwrap();
            assert_eq!(b.size(), 64 * MIB);
            assert!(b.features().flush, "{format}: {:?}", b.features());
            expect = exercise(&mut b, 17 * MIB);
        }
        // What the server wrote is in the image: read it through a second server.
        let _srv = qemu_nbd(&sock, format, &file);
        let mut b = NbdBackend::open_with(&uri(&sock), true, quick()).unwrap();
        let mut back = vec![0u8; expect.len()];
        // SAFETY: the buffer outlives run.
        let r = unsafe {
            run(
                &mut b,
                vec![io(Op::Read, 17 * MIB, vec![iov(&mut back)], 0)],
            )
        };
        assert_eq!(r, [Ok(())], "{format}");
        assert!(back == expect, "{format}: the image differs");
    }
}

fn our_server(dir: &Path, readonly: bool) -> (Server, PathBuf) {
    let file = dir.join("ours.raw");
    if !file.exists() {
        std::fs::File::create(&file)
            .unwrap()
            .set_len(16 * MIB)
            .unwrap();
    }
    let export = Arc::new(FileExport::open(&file, readonly).unwrap());
    let config = ServerConfig {
        name: "ours".into(),
        readonly,
        ..Default::default()
    };
    (
        Server::serve(&dir.join("ours.sock"), export, config).unwrap(),
        file,
    )
}

#[test]
fn against_our_own_server_with_several_clients() {
    let dir = tempfile::tempdir().unwrap();
    let (server, file) = our_server(dir.path(), false);
    let u = format!("nbd+unix:///ours?socket={}", server.path().display());
    let mut handles = Vec::new();
    for i in 0..4u64 {
        let u = u.clone();
        handles.push(std::thread::spawn(move || {
            let mut b = NbdBackend::open_with(&u, false, quick()).unwrap();
            exercise(&mut b, i * 3 * MIB)
        }));
    }
    let f = std::fs::File::open(&file).unwrap();
    for (i, h) in handles.into_iter().enumerate() {
        let expect = h.join().unwrap();
        let mut on_disk = vec![0u8; expect.len()];
        f.read_exact_at(&mut on_disk, i as u64 * 3 * MIB).unwrap();
        assert!(on_disk == expect, "client {i}");
    }
    // Unknown export: a clear refusal.
    let e = NbdBackend::open_with(
        &format!("nbd+unix:///other?socket={}", server.path().display()),
        false,
        quick(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("unknown export"), "{e}");
    drop(server);
    // Read-only: a read-write open is refused, a read-only one cannot write.
    let (server, _) = our_server(dir.path(), true);
    let u = format!("nbd+unix:///ours?socket={}", server.path().display());
    let e = NbdBackend::open_with(&u, false, quick()).unwrap_err();
    assert_eq!(e.errno(), libc::EROFS, "{e}");
    let mut b = NbdBackend::open_with(&u, true, quick()).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: the buffer outlives run.
    let r = unsafe { run(&mut b, vec![io(Op::Write, 0, vec![iov(&mut buf)], 0)]) };
    assert_eq!(r, [Err(Errno::EROFS)]);
}

#[test]
fn a_restarted_server_gets_the_unanswered_requests_again() {
    if !have("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let file = dir.path().join("disk.raw");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let file_arg = format!("file={}", file.display());
    let srv = nbdkit(&sock, &["file", &file_arg]);
    let mut b = NbdBackend::open_with(&uri(&sock), false, quick()).unwrap();
    exercise(&mut b, 0);
    drop(srv);
    // The server is gone: these wait for it.
    let mut w = pattern(99, 65536);
    let mut r = vec![0u8; 4096];
    for (tag, io) in [
        io(Op::Write, 8 * MIB, vec![iov(&mut w)], 0),
        io(Op::Read, 0, vec![iov(&mut r)], 0),
        io(Op::Flush, 0, vec![], 0),
    ]
    .into_iter()
    .enumerate()
    {
        // SAFETY: the buffers outlive the drain below.
        unsafe {
            b.queue(Io {
                tag: tag as u64,
                ..io
            })
        };
    }
    b.submit().unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let mut done = Vec::new();
    b.reap(&mut done);
    assert!(
        done.is_empty(),
        "answered while the server was away: {done:?}"
    );
    let _srv = nbdkit(&sock, &["file", &file_arg]);
    b.drain(&mut done).unwrap();
    done.sort_by_key(|c| c.tag);
    assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
    assert_eq!(done.len(), 3);
    let mut on_disk = vec![0u8; w.len()];
    std::fs::File::open(&file)
        .unwrap()
        .read_exact_at(&mut on_disk, 8 * MIB)
        .unwrap();
    assert!(on_disk == w);
    // exercise() left its FUA write's bytes there.
    assert!(r.iter().all(|&x| x == 0x3c));
}

#[test]
fn a_server_gone_for_good_means_eio_within_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = our_server(dir.path(), false);
    let u = format!("nbd+unix:///ours?socket={}", server.path().display());
    let opts = Options {
        deadline: Duration::from_secs(1),
        connect_timeout: Duration::from_millis(500),
    };
    let mut b = NbdBackend::open_with(&u, false, opts).unwrap();
    drop(server);
    let mut buf = vec![0u8; 4096];
    let t = Instant::now();
    // SAFETY: the buffer outlives run.
    let r = unsafe { run(&mut b, vec![io(Op::Read, 0, vec![iov(&mut buf)], 0)]) };
    assert_eq!(r, [Err(Errno::EIO)]);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
}

/// How a misbehaving server answers a request.
type Answer = fn(&mut UnixStream, Request);

/// A test server that handshakes properly (structured replies refused, OPT_GO answered), then
/// misbehaves with every request as `answer` says.
fn misbehaving_server(sock: &Path, answer: Answer) -> std::thread::JoinHandle<()> {
    serve_requests(sock, false, Arc::new(move |s, req, _| answer(s, req)))
}

/// How a test server answers a request on its connection number `.2` (from 0).
type AnswerOn = Arc<dyn Fn(&mut UnixStream, Request, usize) + Send + Sync>;

/// A test server that handshakes properly (structured replies acknowledged if `structured`,
/// OPT_GO answered: 16 MiB, flush), then answers every request as `answer` says.
fn serve_requests(sock: &Path, structured: bool, answer: AnswerOn) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        for (n, s) in listener.incoming().enumerate() {
            let Ok(mut s) = s else { return };
            let answer = answer.clone();
            std::thread::spawn(move || {
                let mut hello = proto::NBDMAGIC.to_be_bytes().to_vec();
                hello.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
                hello.extend_from_slice(
                    &(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes(),
                );
                if s.write_all(&hello).is_err() || proto::read_u32(&mut s).is_err() {
                    return;
                }
                loop {
                    let Ok(_) = proto::read_u64(&mut s) else {
                        return;
                    };
                    let option = proto::read_u32(&mut s).unwrap_or(0);
                    let len = proto::read_u32(&mut s).unwrap_or(0);
                    let Ok(_) = proto::read_payload(&mut s, "opt", len, 4096) else {
                        return;
                    };
                    if option == proto::opt::STRUCTURED_REPLY && structured {
                        let _ = write_opt_reply(&mut s, option, rep::ACK, &[]);
                        continue;
                    }
                    if option == proto::opt::GO {
                        let mut b = proto::info::EXPORT.to_be_bytes().to_vec();
                        b.extend_from_slice(&(16 * MIB).to_be_bytes());
                        b.extend_from_slice(&(tflag::HAS_FLAGS | tflag::SEND_FLUSH).to_be_bytes());
                        let _ = write_opt_reply(&mut s, option, rep::INFO, &b);
                        let _ = write_opt_reply(&mut s, option, rep::ACK, &[]);
                        break;
                    }
                    let _ = write_opt_reply(&mut s, option, rep::ERR_UNSUP, &[]);
                }
                let mut h = [0u8; Request::SIZE];
                while s.read_exact(&mut h).is_ok() {
                    let Ok(req) = Request::decode(&h) else { return };
                    if req.typ == proto::cmd::WRITE {
                        let _ = proto::read_payload(&mut s, "w", req.length, 1 << 25);
                    }
                    answer(&mut s, req, n);
                }
            });
        }
    })
}

#[test]
fn misbehaving_servers_mean_eio_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        deadline: Duration::from_secs(1),
        connect_timeout: Duration::from_millis(500),
    };
    let cases: [(&str, Answer); 5] = [
        ("unknown cookie", |s, req| {
            let h = ReplyHeader::Simple {
                error: 0,
                cookie: req.cookie + 1000,
            };
            let _ = s.write_all(&h.encode());
        }),
        ("bad magic", |s, _| {
            let _ = s.write_all(&[0xee; 16]);
        }),
        ("short reply", |s, req| {
            let h = ReplyHeader::Simple {
                error: 0,
                cookie: req.cookie,
            };
            let mut b = h.encode();
            b.extend_from_slice(&[1, 2, 3]);
            let _ = s.write_all(&b);
            let _ = s.shutdown(std::net::Shutdown::Both);
        }),
        ("stall", |_, _| {}),
        ("oversized chunk", |s, req| {
            let h = ReplyHeader::Chunk {
                flags: proto::REPLY_FLAG_DONE,
                typ: proto::chunk::OFFSET_DATA,
                cookie: req.cookie,
                length: u32::MAX,
            };
            let _ = s.write_all(&h.encode());
        }),
    ];
    for (name, answer) in cases {
        let sock = dir.path().join(name.replace(' ', "-"));
        let _srv = misbehaving_server(&sock, answer);
        let mut b = NbdBackend::open_with(&uri(&sock), false, opts).unwrap();
        assert_eq!(b.size(), 16 * MIB);
        let mut buf = vec![0u8; 4096];
        let t = Instant::now();
        // SAFETY: the buffer outlives run.
        let r = unsafe { run(&mut b, vec![io(Op::Read, 0, vec![iov(&mut buf)], 0)]) };
        assert_eq!(r, [Err(Errno::EIO)], "{name}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{name}: {:?}",
            t.elapsed()
        );
    }
    // A server that is not NBD at all.
    let sock = dir.path().join("http");
    let l = UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
            let mut b = [0u8; 64];
            let _ = s.read(&mut b);
        }
    });
    let e = NbdBackend::open_with(&uri(&sock), false, opts).unwrap_err();
    assert!(e.to_string().contains("bad server greeting magic"), "{e}");
}

/// A server without NBD_OPT_GO (nor structured replies): the client falls back to
/// NBD_OPT_EXPORT_NAME, and simple replies carry the data.
#[test]
fn servers_without_opt_go_are_reached_with_export_name() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("old");
    let listener = UnixListener::bind(&sock).unwrap();
    let served = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut hello = proto::NBDMAGIC.to_be_bytes().to_vec();
        hello.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        // Fixed newstyle, but zeroes after NBD_OPT_EXPORT_NAME.
        hello.extend_from_slice(&proto::FLAG_FIXED_NEWSTYLE.to_be_bytes());
        s.write_all(&hello).unwrap();
        assert_eq!(
            proto::read_u32(&mut s).unwrap(),
            proto::FLAG_C_FIXED_NEWSTYLE
        );
        let name = loop {
            assert_eq!(proto::read_u64(&mut s).unwrap(), proto::IHAVEOPT);
            let option = proto::read_u32(&mut s).unwrap();
            let len = proto::read_u32(&mut s).unwrap();
            let data = proto::read_payload(&mut s, "opt", len, 4096).unwrap();
            if option == proto::opt::EXPORT_NAME {
                let mut b = (8 * MIB).to_be_bytes().to_vec();
                b.extend_from_slice(&(tflag::HAS_FLAGS | tflag::SEND_FLUSH).to_be_bytes());
                b.extend_from_slice(&[0u8; 124]);
                s.write_all(&b).unwrap();
                break String::from_utf8(data).unwrap();
            }
            write_opt_reply(&mut s, option, rep::ERR_UNSUP, &[]).unwrap();
        };
        // Reads: 0x77 bytes; then the client goes away.
        let mut h = [0u8; Request::SIZE];
        let mut reads = 0;
        while s.read_exact(&mut h).is_ok() {
            let req = Request::decode(&h).unwrap();
            let mut b = ReplyHeader::Simple {
                error: 0,
                cookie: req.cookie,
            }
            .encode();
            if req.typ == proto::cmd::READ {
                b.extend_from_slice(&vec![0x77; req.length as usize]);
                reads += 1;
            }
            s.write_all(&b).unwrap();
        }
        (name, reads)
    });
    let u = format!("nbd+unix:///legacy?socket={}", sock.display());
    let mut b = NbdBackend::open_with(&u, false, quick()).unwrap();
    assert_eq!(b.size(), 8 * MIB);
    let f = b.features();
    assert!(f.flush && !f.fua && !f.discard, "{f:?}");
    let mut buf = vec![0u8; 8192];
    // SAFETY: the buffer outlives run.
    let r = unsafe {
        run(
            &mut b,
            vec![
                io(Op::Read, 4096, vec![iov(&mut buf)], 0),
                io(Op::Flush, 0, vec![], 0),
                io(Op::Discard, 0, vec![], 4096),
            ],
        )
    };
    assert_eq!(r, [Ok(()), Ok(()), Err(Errno::EOPNOTSUPP)]);
    assert!(buf.iter().all(|&x| x == 0x77));
    drop(b);
    assert_eq!(served.join().unwrap(), ("legacy".to_string(), 1));
}

/// Opened for a tap, the client gives up on a request the server leaves unanswered by the tap's
/// deadline when that is shorter than its own (30 s): the tap's deadline holds.
#[test]
fn a_taps_shorter_deadline_bounds_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("stall");
    let _srv = misbehaving_server(&sock, |_, _| {});
    let spec: ImageSpec = format!("nbd:{}", uri(&sock)).parse().unwrap();
    let mut b = blktap::backend::open_for_tap(&spec, false, true, Duration::from_secs(1)).unwrap();
    let mut buf = vec![0u8; 4096];
    let t = Instant::now();
    // SAFETY: the buffer outlives run.
    let r = unsafe { run(b.as_mut(), vec![io(Op::Read, 0, vec![iov(&mut buf)], 0)]) };
    assert_eq!(r, [Err(Errno::EIO)]);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

/// The bytes a test server serves at `offset`: each 8-byte word holds its own offset.
fn served(offset: u64, len: u32) -> Vec<u8> {
    (offset / 8..(offset + u64::from(len)) / 8)
        .flat_map(|w| (w * 8).to_le_bytes())
        .collect()
}

/// A structured reply chunk with the data of `req` from byte `from` to `to` of its range.
fn data_chunk(req: &Request, from: u32, to: u32, done: bool) -> Vec<u8> {
    let mut b = ReplyHeader::Chunk {
        flags: if done { proto::REPLY_FLAG_DONE } else { 0 },
        typ: proto::chunk::OFFSET_DATA,
        cookie: req.cookie,
        length: 8 + to - from,
    }
    .encode();
    let at = req.offset + u64::from(from);
    b.extend_from_slice(&at.to_be_bytes());
    b.extend_from_slice(&served(at, to - from));
    b
}

/// A server whose successful read reply fills only part of the range: the rest of the buffer
/// was handed out as the disk's data (stale bytes), though the protocol says a successful read
/// fills its whole range. Now the client takes it as a protocol violation: it reconnects and
/// sends the read again; the data it hands out is the server's, or the read fails.
#[test]
fn a_read_reply_that_leaves_part_of_the_range_unfilled_is_not_taken() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        deadline: Duration::from_secs(1),
        connect_timeout: Duration::from_millis(500),
    };
    for (name, bad_connections) in [("once", 1), ("always", usize::MAX)] {
        let sock = dir.path().join(name);
        let _srv = serve_requests(
            &sock,
            true,
            Arc::new(move |s, req, n| {
                let half = req.length / 2;
                let b = if req.typ != proto::cmd::READ {
                    ReplyHeader::Simple {
                        error: 0,
                        cookie: req.cookie,
                    }
                    .encode()
                } else if n < bad_connections {
                    // The first half, then a NONE chunk ending the reply.
                    let mut b = data_chunk(&req, 0, half, false);
                    b.extend_from_slice(
                        &ReplyHeader::Chunk {
                            flags: proto::REPLY_FLAG_DONE,
                            typ: proto::chunk::NONE,
                            cookie: req.cookie,
                            length: 0,
                        }
                        .encode(),
                    );
                    b
                } else {
                    // In two chunks, the second first.
                    let mut b = data_chunk(&req, half, req.length, false);
                    b.extend_from_slice(&data_chunk(&req, 0, half, true));
                    b
                };
                let _ = s.write_all(&b);
            }),
        );
        let mut b = NbdBackend::open_with(&uri(&sock), false, opts).unwrap();
        let mut buf = vec![0xeeu8; 8192];
        let t = Instant::now();
        // SAFETY: the buffer outlives run.
        let r = unsafe { run(&mut b, vec![io(Op::Read, 65536, vec![iov(&mut buf)], 0)]) };
        if bad_connections == 1 {
            assert_eq!(r, [Ok(())], "{name}");
            assert!(
                buf == served(65536, 8192),
                "{name}: the data is not the server's"
            );
        } else {
            assert_eq!(r, [Err(Errno::EIO)], "{name}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{name}: {:?}",
            t.elapsed()
        );
    }
}

/// A server that breaks the protocol on every connection is not hammered: a connection that
/// answered nothing is followed by the same backoff as a failed connect (it used to be
/// reconnected to at once, hundreds of times a second until the deadline).
#[test]
fn a_server_that_always_breaks_the_protocol_is_not_hammered() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("bad");
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = connections.clone();
    let _srv = serve_requests(
        &sock,
        false,
        Arc::new(move |s, _, n| {
            counted.fetch_max(n + 1, std::sync::atomic::Ordering::Relaxed);
            let _ = s.write_all(&[0xee; 16]);
        }),
    );
    let opts = Options {
        deadline: Duration::from_secs(2),
        connect_timeout: Duration::from_millis(500),
    };
    let mut b = NbdBackend::open_with(&uri(&sock), false, opts).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: the buffer outlives run.
    let r = unsafe { run(&mut b, vec![io(Op::Read, 0, vec![iov(&mut buf)], 0)]) };
    assert_eq!(r, [Err(Errno::EIO)]);
    let n = connections.load(std::sync::atomic::Ordering::Relaxed);
    // 50, 100, 200, 400, 800 ms, then every second: about 7 in 2 s.
    assert!((2..=12).contains(&n), "{n} connections in 2 s");
}
