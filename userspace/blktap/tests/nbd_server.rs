//! Host tests of the NBD server: our server on a temporary unix socket over a temporary sparse
//! raw file, checked with the real tools (nbdinfo, nbdcopy from libnbd-bin; qemu-img, qemu-io
//! from qemu-utils) and with hostile clients written here. A test whose tool is missing says so
//! and passes without checking (scripts/setup installs them).

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use blktap::nbd::proto::{
    self, cflag, cmd, errno, opt, read_u16, read_u32, read_u64, rep, write_option, ReplyHeader,
    Request, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, IHAVEOPT, NBDMAGIC, OPT_REPLY_MAGIC,
};
use blktap::nbd::server::{FileExport, Server, ServerConfig};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

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

/// A 16 MiB sparse file: data (0x11) at [0, 1M) and (0x22) at [8M, 9M), holes elsewhere.
fn sparse_image(dir: &Path) -> PathBuf {
    let path = dir.join("disk.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(SIZE).unwrap();
    f.write_all_at(&vec![0x11; MIB as usize], 0).unwrap();
    f.write_all_at(&vec![0x22; MIB as usize], 8 * MIB).unwrap();
    f.sync_all().unwrap();
    path
}

// Fields drop in order: the server before its directory.
struct Fixture {
    server: Server,
    image: PathBuf,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(readonly: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let image = sparse_image(dir.path());
        let export = Arc::new(FileExport::open(&image, readonly).unwrap());
        let config = ServerConfig {
            name: "disk".into(),
            description: "a test disk".into(),
            readonly,
            any_name: false,
        };
        let server = Server::serve(&dir.path().join("nbd.sock"), export, config).unwrap();
        Fixture { server, image, dir }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.server.path().display())
    }
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn nbdinfo_lists_the_export_and_maps_its_holes() {
    if !have("nbdinfo") {
        return;
    }
    let fx = Fixture::new(false);
    let (ok, out) = run(Command::new("nbdinfo").arg(fx.uri()));
    assert!(ok, "{out}");
    assert!(out.contains(&format!("export-size: {SIZE}")), "{out}");
    assert!(out.contains("is_read_only: false"), "{out}");
    assert!(out.contains("can_flush: true"), "{out}");
    assert!(out.contains("can_trim: true"), "{out}");
    assert!(out.contains("can_zero: true"), "{out}");
    assert!(out.contains("can_multi_conn: true"), "{out}");
    assert!(out.contains("description: a test disk"), "{out}");
    let (ok, out) = run(Command::new("nbdinfo").args(["--map", &fx.uri()]));
    assert!(ok, "{out}");
    let map: Vec<(u64, u64, u32)> = out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        map,
        [
            (0, MIB, 0),
            (MIB, 7 * MIB, 3),
            (8 * MIB, MIB, 0),
            (9 * MIB, 7 * MIB, 3)
        ],
        "{out}"
    );
    let (ok, out) = run(Command::new("nbdinfo").args(["--list", &fx.uri()]));
    assert!(ok && out.contains("export=\"disk\""), "{out}");
}

#[test]
fn nbdcopy_of_the_export_equals_the_image() {
    if !have("nbdcopy") {
        return;
    }
    let fx = Fixture::new(false);
    let copy = fx.dir.path().join("copy.raw");
    let (ok, out) = run(Command::new("nbdcopy").arg(fx.uri()).arg(&copy));
    assert!(ok, "{out}");
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(&fx.image).unwrap()
    );
    // And the other way, over several connections at once.
    let other = fx.dir.path().join("other.raw");
    std::fs::write(&other, vec![0x5a; SIZE as usize]).unwrap();
    let (ok, out) = run(Command::new("nbdcopy")
        .args(["--connections=4", "--requests=8"])
        .arg(&other)
        .arg(fx.uri()));
    assert!(ok, "{out}");
    assert_eq!(
        std::fs::read(&fx.image).unwrap(),
        std::fs::read(&other).unwrap()
    );
}

#[test]
fn qemu_img_compare_sees_the_same_disk() {
    if !have("qemu-img") {
        return;
    }
    let fx = Fixture::new(false);
    let compare = |other: &Path| {
        run(Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(other)
            .arg(fx.uri()))
    };
    let (ok, out) = compare(&fx.image);
    assert!(ok, "{out}");
    assert!(out.contains("Images are identical"), "{out}");
    let different = fx.dir.path().join("different.raw");
    std::fs::copy(&fx.image, &different).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&different)
        .unwrap();
    f.write_all_at(b"x", 12 * MIB + 7).unwrap();
    let (ok, out) = compare(&different);
    assert!(!ok && out.contains("Content mismatch"), "{out}");
}

#[test]
fn qemu_io_writes_reach_the_file_and_reads_come_back() {
    if !have("qemu-io") {
        return;
    }
    let fx = Fixture::new(false);
    let (ok, out) = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 0 64k",
        "-c",
        "write -z 8M 4k",
        "-c",
        "discard 12M 1M",
        "-c",
        "flush",
        &fx.uri(),
    ]));
    assert!(ok && !out.contains("error"), "{out}");
    let data = std::fs::read(&fx.image).unwrap();
    assert!(data[..65536].iter().all(|&b| b == 0xab));
    assert!(data[65536..MIB as usize].iter().all(|&b| b == 0x11));
    let m8 = 8 * MIB as usize;
    assert!(data[m8..m8 + 4096].iter().all(|&b| b == 0));
    assert!(data[m8 + 4096..m8 + MIB as usize]
        .iter()
        .all(|&b| b == 0x22));
    // The file changed under the export, and reads through the export see it.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.image)
        .unwrap();
    f.write_all_at(&[0xcd; 4096], 4 * MIB).unwrap();
    let (ok, out) = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-r",
        "-c",
        "read -P 0xcd 4M 4k",
        "-c",
        "read -P 0xab 0 64k",
        &fx.uri(),
    ]));
    assert!(ok && !out.contains("Pattern verification failed"), "{out}");
    let (_, out) = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-r",
        "-c",
        "read -P 0xcd 0 4k",
        &fx.uri(),
    ]));
    assert!(out.contains("Pattern verification failed"), "{out}");
}

/// A raw client: greeting, fixed newstyle, no zeroes.
fn hello(path: &Path) -> UnixStream {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(read_u64(&mut s).unwrap(), NBDMAGIC);
    assert_eq!(read_u64(&mut s).unwrap(), IHAVEOPT);
    let flags = read_u16(&mut s).unwrap();
    assert_eq!(flags, proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    s
}

/// Reads one option reply: (option, type, data).
fn opt_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    assert_eq!(read_u64(s).unwrap(), OPT_REPLY_MAGIC);
    let option = read_u32(s).unwrap();
    let typ = read_u32(s).unwrap();
    let len = read_u32(s).unwrap();
    let data = proto::read_payload(s, "reply", len, 1 << 16).unwrap();
    (option, typ, data)
}

/// A raw client in transmission (simple replies), and the export's transmission flags.
fn transmitting(path: &Path) -> (UnixStream, u16) {
    let mut s = hello(path);
    write_option(&mut s, opt::EXPORT_NAME, b"disk").unwrap();
    let size = read_u64(&mut s).unwrap();
    assert_eq!(size, SIZE);
    let flags = read_u16(&mut s).unwrap();
    (s, flags)
}

fn request(s: &mut UnixStream, typ: u16, flags: u16, offset: u64, length: u32) {
    let r = Request {
        flags,
        typ,
        cookie: 0x1234,
        offset,
        length,
    };
    s.write_all(&r.encode()).unwrap();
}

fn simple_error(s: &mut UnixStream) -> u32 {
    match ReplyHeader::read(s).unwrap() {
        ReplyHeader::Simple { error, cookie } => {
            assert_eq!(cookie, 0x1234);
            error
        }
        h => panic!("expected a simple reply, got {h:?}"),
    }
}

/// The connection was closed by the server.
fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 64];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn read_only_exports_refuse_writes() {
    let fx = Fixture::new(true);
    let (mut s, flags) = transmitting(fx.server.path());
    assert_ne!(flags & proto::tflag::READ_ONLY, 0);
    assert_eq!(flags & proto::tflag::SEND_TRIM, 0);
    request(&mut s, cmd::WRITE, 0, 0, 512);
    s.write_all(&[0xee; 512]).unwrap();
    assert_eq!(simple_error(&mut s), errno::EPERM);
    request(&mut s, cmd::WRITE_ZEROES, 0, 0, 512);
    assert_eq!(simple_error(&mut s), errno::EPERM);
    request(&mut s, cmd::TRIM, 0, 0, 512);
    assert_eq!(simple_error(&mut s), errno::EPERM);
    // Reads still work.
    request(&mut s, cmd::READ, 0, 0, 512);
    assert_eq!(simple_error(&mut s), 0);
    let mut b = [0u8; 512];
    s.read_exact(&mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0x11));
    assert!(std::fs::read(&fx.image).unwrap()[..512]
        .iter()
        .all(|&x| x == 0x11));
    if have("qemu-io") {
        let (ok, out) = run(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 64k",
            &fx.uri(),
        ]));
        assert!(
            !ok || out.contains("read-only") || out.contains("ermission"),
            "{out}"
        );
    }
}

#[test]
fn hostile_clients_get_clear_errors_and_the_server_lives() {
    let fx = Fixture::new(false);
    let path = fx.server.path();

    // Bad option magic: the connection is closed.
    let mut s = hello(path);
    s.write_all(b"NOTOPTS!\0\0\0\x07\0\0\0\0").unwrap();
    assert!(closed(&mut s));

    // An option payload of 1 GiB: refused as too big without being read, then closed.
    let mut s = hello(path);
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt::GO.to_be_bytes());
    b.extend_from_slice(&(1u32 << 30).to_be_bytes());
    s.write_all(&b).unwrap();
    let (option, typ, _) = opt_reply(&mut s);
    assert_eq!((option, typ), (opt::GO, rep::ERR_TOO_BIG));
    assert!(closed(&mut s));

    // A malformed OPT_GO (name length past the payload), an unknown export, an unknown
    // option: error replies, and the handshake goes on.
    let mut s = hello(path);
    write_option(&mut s, opt::GO, &[0, 0, 1, 0, b'x']).unwrap();
    assert_eq!(opt_reply(&mut s).1, rep::ERR_INVALID);
    let mut go = Vec::new();
    proto::put_lstring(&mut go, "nope");
    go.extend_from_slice(&0u16.to_be_bytes());
    write_option(&mut s, opt::GO, &go).unwrap();
    assert_eq!(opt_reply(&mut s).1, rep::ERR_UNKNOWN);
    write_option(&mut s, 4242, b"whatever").unwrap();
    assert_eq!(opt_reply(&mut s).1, rep::ERR_UNSUP);
    write_option(&mut s, opt::SET_META_CONTEXT, &[]).unwrap();
    assert_eq!(
        opt_reply(&mut s).1,
        rep::ERR_INVALID,
        "needs structured replies"
    );
    write_option(&mut s, opt::ABORT, &[]).unwrap();
    assert_eq!(opt_reply(&mut s).1, rep::ACK);
    assert!(closed(&mut s));

    // In transmission: an unknown command, unknown flags, oversized and out-of-range reads and
    // a block status without a context are answered with errors; the connection goes on.
    let (mut s, _) = transmitting(path);
    request(&mut s, 99, 0, 0, 0);
    assert_eq!(simple_error(&mut s), errno::EINVAL);
    request(&mut s, cmd::FLUSH, 1 << 9, 0, 0);
    assert_eq!(simple_error(&mut s), errno::EINVAL);
    request(&mut s, cmd::READ, 0, 0, 64 << 20);
    assert_eq!(simple_error(&mut s), errno::EOVERFLOW);
    request(&mut s, cmd::READ, 0, SIZE - 512, 1024);
    assert_eq!(simple_error(&mut s), errno::EINVAL);
    request(&mut s, cmd::READ, 0, u64::MAX - 100, 512);
    assert_eq!(simple_error(&mut s), errno::EINVAL);
    request(&mut s, cmd::TRIM, cflag::FUA, SIZE, 512);
    assert_eq!(simple_error(&mut s), errno::ENOSPC);
    request(&mut s, cmd::BLOCK_STATUS, 0, 0, 512);
    assert_eq!(simple_error(&mut s), errno::EINVAL);
    request(&mut s, cmd::WRITE, 0, SIZE, 512);
    s.write_all(&[0u8; 512]).unwrap();
    assert_eq!(simple_error(&mut s), errno::ENOSPC);
    request(&mut s, cmd::FLUSH, 0, 0, 0);
    assert_eq!(simple_error(&mut s), 0);
    // A write of 1 GiB: refused, and the connection closed (its data cannot be skipped).
    request(&mut s, cmd::WRITE, 0, 0, 1 << 30);
    assert_eq!(simple_error(&mut s), errno::EOVERFLOW);
    assert!(closed(&mut s));

    // A bad request magic, and a truncated request: closed.
    let (mut s, _) = transmitting(path);
    s.write_all(&[0xff; Request::SIZE]).unwrap();
    assert!(closed(&mut s));
    let (mut s, _) = transmitting(path);
    s.write_all(
        &Request::encode(&Request {
            flags: 0,
            typ: cmd::READ,
            cookie: 1,
            offset: 0,
            length: 512,
        })[..10],
    )
    .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(closed(&mut s));

    // The server still serves.
    let (mut s, _) = transmitting(path);
    request(&mut s, cmd::READ, 0, 8 * MIB, 4096);
    assert_eq!(simple_error(&mut s), 0);
    let mut b = vec![0u8; 4096];
    s.read_exact(&mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0x22));
    request(&mut s, cmd::DISC, 0, 0, 0);
    assert!(closed(&mut s));
}

#[test]
fn connections_past_the_limit_are_closed_and_the_others_served() {
    let fx = Fixture::new(false);
    let held: Vec<(UnixStream, u16)> = (0..blktap::nbd::server::MAX_CONNECTIONS)
        .map(|_| transmitting(fx.server.path()))
        .collect();
    assert_eq!(
        fx.server.connections(),
        blktap::nbd::server::MAX_CONNECTIONS
    );
    let mut extra = UnixStream::connect(fx.server.path()).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(closed(&mut extra));
    drop(held);
    let t = std::time::Instant::now();
    while fx.server.connections() > 0 {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    let (mut s, _) = transmitting(fx.server.path());
    request(&mut s, cmd::FLUSH, 0, 0, 0);
    assert_eq!(simple_error(&mut s), 0);
}

/// Random bytes after a valid start, from many seeds: a mutated handshake or request stream
/// (valid headers with random fields, or plain garbage) never takes the server down.
#[test]
fn random_client_bytes_never_take_the_server_down() {
    use blktap::rng::Rng;
    let fx = Fixture::new(false);
    let path = fx.server.path();
    for seed in 0..300u64 {
        let mut rng = Rng::new(seed);
        let mut s = if rng.chance(1, 2) {
            hello(path)
        } else {
            transmitting(path).0
        };
        let mut junk = Vec::new();
        for _ in 0..rng.below(8) + 1 {
            match rng.below(4) {
                // An option with random code and a small random payload.
                0 => {
                    let len = rng.below(64) as usize;
                    let mut data = vec![0u8; len];
                    rng.fill(&mut data);
                    let mut b = IHAVEOPT.to_be_bytes().to_vec();
                    b.extend_from_slice(&(rng.below(12) as u32).to_be_bytes());
                    b.extend_from_slice(&(len as u32).to_be_bytes());
                    b.extend_from_slice(&data);
                    junk.extend_from_slice(&b);
                }
                // A request with random type, flags, offset and length (no payload).
                1 => {
                    let (any_offset, any_length) = (rng.next_u64(), rng.next_u64() as u32);
                    let req = Request {
                        flags: rng.below(64) as u16,
                        typ: rng.pick(&[0u16, 2, 3, 4, 6, 7, 8, 99]),
                        cookie: rng.next_u64(),
                        offset: rng.pick(&[0, SIZE - 512, SIZE, u64::MAX, any_offset]),
                        length: rng.pick(&[0, 512, 1 << 20, u32::MAX, any_length]),
                    };
                    junk.extend_from_slice(&req.encode());
                }
                // Garbage.
                _ => {
                    let mut b = vec![0u8; rng.below(100) as usize];
                    rng.fill(&mut b);
                    junk.extend_from_slice(&b);
                }
            }
        }
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(&junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        // Read whatever comes back until the server closes: it must close, not hang.
        let mut sink = Vec::new();
        let r = s.read_to_end(&mut sink);
        assert!(
            r.is_ok(),
            "seed {seed}: the server did not close the connection: {r:?}"
        );
    }
    // Still serving.
    let (mut s, _) = transmitting(path);
    request(&mut s, cmd::READ, 0, 0, 512);
    assert_eq!(simple_error(&mut s), 0);
}

/// An export in memory whose reads at `slow_at` wait until the gate opens, counting the calls
/// in progress (to see how many requests of one connection the server serves at once).
struct GatedExport {
    data: std::sync::Mutex<Vec<u8>>,
    slow_at: Option<u64>,
    gate: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
    busy: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
    /// Writes done, and how many were done when each flush came.
    writes: std::sync::atomic::AtomicUsize,
    flushes: std::sync::Mutex<Vec<usize>>,
}

impl GatedExport {
    fn new(slow_at: Option<u64>, open: bool) -> Arc<Self> {
        Arc::new(Self {
            data: std::sync::Mutex::new(vec![0; SIZE as usize]),
            slow_at,
            gate: std::sync::Mutex::new(open),
            opened: std::sync::Condvar::new(),
            busy: Default::default(),
            most: Default::default(),
            writes: Default::default(),
            flushes: Default::default(),
        })
    }

    fn open(&self) {
        *self.gate.lock().unwrap() = true;
        self.opened.notify_all();
    }

    fn wait(&self, offset: u64) {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.busy.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(now, SeqCst);
        if self.slow_at.is_none_or(|at| at == offset) {
            let mut open = self.gate.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
        }
        self.busy.fetch_sub(1, SeqCst);
    }
}

impl blktap::nbd::server::Export for GatedExport {
    fn size(&self) -> u64 {
        SIZE
    }
    fn features(&self) -> blktap::nbd::server::ExportFeatures {
        blktap::nbd::server::ExportFeatures {
            flush: true,
            ..Default::default()
        }
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.wait(offset);
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, buf: &[u8], _fua: bool) -> std::io::Result<()> {
        self.wait(offset);
        self.data.lock().unwrap()[offset as usize..offset as usize + buf.len()]
            .copy_from_slice(buf);
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        let done = self.writes.load(std::sync::atomic::Ordering::SeqCst);
        self.flushes.lock().unwrap().push(done);
        Ok(())
    }
    fn trim(&self, _: u64, _: u32, _: bool) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
    fn write_zeroes(&self, _: u64, _: u32, _: bool, _: bool) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
    fn block_status(&self, _: u64, len: u32) -> std::io::Result<Vec<blktap::nbd::server::Extent>> {
        Ok(vec![blktap::nbd::server::Extent {
            length: len,
            flags: 0,
        }])
    }
}

fn serve_gated(export: Arc<GatedExport>) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        name: "disk".into(),
        ..Default::default()
    };
    let server = Server::serve(&dir.path().join("nbd.sock"), export, config).unwrap();
    (server, dir)
}

fn send(s: &mut UnixStream, typ: u16, cookie: u64, offset: u64, length: u32) {
    let r = Request {
        flags: 0,
        typ,
        cookie,
        offset,
        length,
    };
    s.write_all(&r.encode()).unwrap();
}

/// A simple reply: its cookie, after checking it is not an error.
fn reply_cookie(s: &mut UnixStream) -> u64 {
    match ReplyHeader::read(s).unwrap() {
        ReplyHeader::Simple { error: 0, cookie } => cookie,
        h => panic!("expected a successful simple reply, got {h:?}"),
    }
}

#[test]
fn a_connection_is_pipelined_and_answers_the_quick_request_first() {
    let export = GatedExport::new(Some(0), false);
    let (server, _dir) = serve_gated(Arc::clone(&export));
    let (mut s, _) = transmitting(server.path());
    // A read held by the export, then one that is not: the second is answered first.
    send(&mut s, cmd::READ, 1, 0, 4096);
    send(&mut s, cmd::READ, 2, 4096, 4096);
    assert_eq!(reply_cookie(&mut s), 2);
    let mut b = vec![0u8; 4096];
    s.read_exact(&mut b).unwrap();
    export.open();
    assert_eq!(reply_cookie(&mut s), 1);
    s.read_exact(&mut b).unwrap();
}

#[test]
fn many_requests_before_any_reply_are_all_answered_with_their_data() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(dir.path());
    let export = Arc::new(FileExport::open(&image, false).unwrap());
    let server = Server::serve(
        &dir.path().join("nbd.sock"),
        export,
        ServerConfig {
            name: "disk".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let (mut s, _) = transmitting(server.path());
    let n = 100u64;
    let mut w = s.try_clone().unwrap();
    // Every write sent before any reply is read (from a thread: the socket fills up).
    let writer = std::thread::spawn(move || {
        for i in 0..n {
            send(&mut w, cmd::WRITE, i, i * 8192, 8192);
            w.write_all(&vec![i as u8 + 1; 8192]).unwrap();
        }
        w
    });
    let mut seen: Vec<u64> = (0..n).map(|_| reply_cookie(&mut s)).collect();
    let mut w = writer.join().unwrap();
    seen.sort_unstable();
    assert_eq!(seen, (0..n).collect::<Vec<_>>());
    // Then every read at once; each reply's data is its own range's.
    for i in 0..n {
        send(&mut w, cmd::READ, 1000 + i, i * 8192, 8192);
    }
    let mut got = std::collections::HashSet::new();
    for _ in 0..n {
        let cookie = reply_cookie(&mut s);
        let mut b = vec![0u8; 8192];
        s.read_exact(&mut b).unwrap();
        let i = cookie - 1000;
        assert!(
            b.iter().all(|&x| x == i as u8 + 1),
            "read {i} has another range's data"
        );
        assert!(got.insert(cookie), "cookie {cookie} answered twice");
    }
    let f = std::fs::read(&image).unwrap();
    assert!(f[..(n * 8192) as usize]
        .chunks(8192)
        .enumerate()
        .all(|(i, c)| c.iter().all(|&x| x == i as u8 + 1)));
}

#[test]
fn a_connection_holds_a_bounded_number_of_requests_and_disc_answers_them_first() {
    use blktap::nbd::server::PIPELINE_DEPTH;
    let export = GatedExport::new(None, false);
    let (server, _dir) = serve_gated(Arc::clone(&export));
    let (mut s, _) = transmitting(server.path());
    let n = PIPELINE_DEPTH as u64 + 20;
    for i in 0..n {
        send(&mut s, cmd::READ, i, i * 512, 512);
    }
    send(&mut s, cmd::DISC, 0, 0, 0);
    std::thread::sleep(Duration::from_millis(300));
    use std::sync::atomic::Ordering::SeqCst;
    assert_eq!(
        export.busy.load(SeqCst),
        PIPELINE_DEPTH,
        "requests served at once"
    );
    export.open();
    let mut seen: Vec<u64> = (0..n)
        .map(|_| {
            let c = reply_cookie(&mut s);
            let mut b = [0u8; 512];
            s.read_exact(&mut b).unwrap();
            c
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..n).collect::<Vec<_>>(),
        "every request before DISC answered"
    );
    assert!(closed(&mut s), "closed after DISC");
    assert!(export.most.load(SeqCst) <= PIPELINE_DEPTH);
}

#[test]
fn the_bytes_a_connection_holds_are_bounded() {
    use blktap::nbd::server::PIPELINE_BYTES;
    let export = GatedExport::new(None, false);
    let (server, _dir) = serve_gated(Arc::clone(&export));
    let (s, _) = transmitting(server.path());
    // Writes of 16 MiB (the whole export), more than the budget holds: the server stops reading
    // them at 4, far below the number of workers.
    let len = 16u32 << 20;
    let n = PIPELINE_BYTES / u64::from(len) + 4;
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for i in 0..n {
            send(&mut w, cmd::WRITE, i, 0, len);
            w.write_all(&vec![1u8; len as usize]).unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    use std::sync::atomic::Ordering::SeqCst;
    let held = export.busy.load(SeqCst) as u64;
    assert!(
        held * u64::from(len) <= PIPELINE_BYTES && held > 0,
        "{held} writes of {len} bytes held"
    );
    assert!(held < blktap::nbd::server::PIPELINE_DEPTH as u64);
    export.open();
    writer.join().unwrap();
    let mut r = s;
    for _ in 0..n {
        reply_cookie(&mut r);
    }
}

#[test]
fn a_client_that_never_reads_replies_is_not_read_further() {
    use blktap::nbd::server::PIPELINE_DEPTH;
    use std::sync::atomic::Ordering::SeqCst;
    let export = GatedExport::new(None, true);
    let (server, _dir) = serve_gated(Arc::clone(&export));
    let (s, _) = transmitting(server.path());
    // Reads of 1 MiB, never a reply read: the replies fill the socket, the workers wait to
    // write theirs, and the server stops reading requests (the client's writes block) with at
    // most PIPELINE_DEPTH replies held, not one per request sent.
    let mut w = s.try_clone().unwrap();
    w.set_nonblocking(true).unwrap();
    let req = Request {
        flags: 0,
        typ: cmd::READ,
        cookie: 0,
        offset: 0,
        length: MIB as u32,
    }
    .encode();
    let (mut sent, mut off, mut stalls) = (0u64, 0usize, 0);
    while sent < 1_000_000 && stalls < 50 {
        match w.write(&req[off..]) {
            Ok(n) => {
                stalls = 0;
                off += n;
                if off == req.len() {
                    off = 0;
                    sent += 1;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                stalls += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{e}"),
        }
    }
    // A second of the socket full (50 tries in a row): the server has stopped reading.
    assert!(
        stalls >= 50,
        "the server read {sent} requests of a client that reads no reply"
    );
    // The requests read are bounded: the depth, plus what the socket buffers hold.
    assert!(export.most.load(SeqCst) <= PIPELINE_DEPTH);
    // Reading the replies unblocks it: every request sent is answered with its data.
    let mut r = s;
    r.set_nonblocking(false).unwrap();
    if off != 0 {
        w.set_nonblocking(false).unwrap();
        w.write_all(&req[off..]).unwrap();
        sent += 1;
    }
    let mut b = vec![0u8; MIB as usize];
    for _ in 0..sent {
        assert_eq!(reply_cookie(&mut r), 0);
        r.read_exact(&mut b).unwrap();
    }
}

#[test]
fn a_flush_covers_the_writes_answered_before_it() {
    let export = GatedExport::new(None, true);
    let (server, _dir) = serve_gated(Arc::clone(&export));
    let (mut s, _) = transmitting(server.path());
    let n = 40u64;
    for i in 0..n {
        send(&mut s, cmd::WRITE, i, i * 4096, 4096);
        s.write_all(&[7u8; 4096]).unwrap();
    }
    for _ in 0..n {
        reply_cookie(&mut s);
    }
    // Every write was answered: the flush comes after all of them.
    send(&mut s, cmd::FLUSH, 99, 0, 0);
    assert_eq!(reply_cookie(&mut s), 99);
    assert_eq!(*export.flushes.lock().unwrap(), [n as usize]);
    // Pipelined behind writes not yet answered, it is answered too (covering at least those
    // answered before it was sent: none here).
    for i in 0..n {
        send(&mut s, cmd::WRITE, 100 + i, i * 4096, 4096);
        s.write_all(&[8u8; 4096]).unwrap();
    }
    send(&mut s, cmd::FLUSH, 98, 0, 0);
    let mut seen: Vec<u64> = (0..=n).map(|_| reply_cookie(&mut s)).collect();
    seen.sort_unstable();
    assert_eq!(seen.len(), n as usize + 1);
    assert!(seen.contains(&98));
    assert_eq!(export.flushes.lock().unwrap().len(), 2);
}
