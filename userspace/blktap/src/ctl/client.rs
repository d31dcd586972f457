//! The client side of the control protocol: finding tapdisks and talking to them.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;

use super::proto::{CtlRequest, CtlResponse};
use crate::{Error, Result};

/// How long a tapdisk may take to answer by default (opening an image may be slow).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The control socket of tapdisk `pid` in `dir`.
pub fn socket_path(dir: &Path, pid: i32) -> PathBuf {
    dir.join(format!("ctl{pid}"))
}

/// The pid in a control socket's name `ctl<pid>`.
pub fn parse_socket_name(name: &str) -> Option<i32> {
    let n = name.strip_prefix("ctl")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok().filter(|&p| p > 0)
}

/// The pids of the tapdisks with a socket in `dir`, in increasing order. A missing directory
/// means no tapdisk. Sockets of dead tapdisks are listed too; connecting to them fails.
pub fn find_tapdisks(dir: &Path) -> Vec<i32> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| parse_socket_name(e.file_name().to_str()?))
        .collect();
    pids.sort_unstable();
    pids
}

/// Connects to tapdisk `pid`'s socket in `dir`, for either protocol; every read and write on
/// the stream waits at most `timeout`.
pub(crate) fn connect(dir: &Path, pid: i32, timeout: Duration) -> Result<UnixStream> {
    let path = socket_path(dir, pid);
    let stream = UnixStream::connect(&path).map_err(|e| {
        let errno = Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
        Error::os(
            format!("no tapdisk {pid} listening at {}", path.display()),
            errno,
        )
    })?;
    let sys = |e: std::io::Error| Error::io("cannot set up", &path, e);
    stream.set_read_timeout(Some(timeout)).map_err(sys)?;
    stream.set_write_timeout(Some(timeout)).map_err(sys)?;
    Ok(stream)
}

/// A connection to one tapdisk.
#[derive(Debug)]
pub struct Client {
    pid: i32,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects to tapdisk `pid` through its socket in `dir`.
    pub fn connect(dir: &Path, pid: i32) -> Result<Self> {
        Self::connect_with_timeout(dir, pid, DEFAULT_TIMEOUT)
    }

    /// Connects to tapdisk `pid`, waiting at most `timeout` for each answer.
    pub fn connect_with_timeout(dir: &Path, pid: i32, timeout: Duration) -> Result<Self> {
        let stream = connect(dir, pid, timeout)?;
        let writer = stream
            .try_clone()
            .map_err(|e| Error::io("cannot set up", socket_path(dir, pid), e))?;
        Ok(Self {
            pid,
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// The tapdisk's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `req` and reads the answer; a failure answer is [`Error::Remote`].
    pub fn call(&mut self, req: &CtlRequest) -> Result<CtlResponse> {
        self.call_raw(req)?.into_result(self.pid)
    }

    /// Sends `req` and reads the answer as it is.
    pub fn call_raw(&mut self, req: &CtlRequest) -> Result<CtlResponse> {
        let pid = self.pid;
        let lost =
            |e: std::io::Error| Error::Protocol(format!("tapdisk {pid}: connection lost: {e}"));
        self.writer
            .write_all(req.to_line().as_bytes())
            .map_err(lost)?;
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).map_err(lost)?;
        if n == 0 || !line.ends_with('\n') {
            return Err(Error::Protocol(format!(
                "tapdisk {pid} closed the connection without answering"
            )));
        }
        serde_json::from_str(&line)
            .map_err(|e| Error::Protocol(format!("tapdisk {pid}: bad answer {line:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("blktap-ctl-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn socket_names_carry_the_pid() {
        assert_eq!(parse_socket_name("ctl1234"), Some(1234));
        assert_eq!(parse_socket_name("ctl"), None);
        assert_eq!(parse_socket_name("ctl0"), None);
        assert_eq!(parse_socket_name("ctl12x"), None);
        assert_eq!(parse_socket_name("ctl-1"), None);
        assert_eq!(parse_socket_name("blktap"), None);
        assert_eq!(
            socket_path(Path::new("/var/run/blktap-control"), 7),
            Path::new("/var/run/blktap-control/ctl7")
        );
    }

    #[test]
    fn finds_tapdisks_by_their_sockets() {
        let dir = scratch_dir("find");
        for name in ["ctl30", "ctl4", "junk", "ctlx"] {
            fs::write(dir.join(name), "").unwrap();
        }
        assert_eq!(find_tapdisks(&dir), [4, 30]);
        assert!(find_tapdisks(Path::new("/nonexistent/blktap-control")).is_empty());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_call_is_one_line_each_way() {
        let dir = scratch_dir("call");
        let listener = UnixListener::bind(socket_path(&dir, 42)).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut writer = stream;
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            assert_eq!(line, "{\"op\":\"list\"}\n");
            writer.write_all(b"{\"ok\":true,\"taps\":[]}\n").unwrap();
            line.clear();
            reader.read_line(&mut line).unwrap();
            assert_eq!(line, "{\"op\":\"pause\",\"minor\":3}\n");
            writer
                .write_all(b"{\"ok\":false,\"errno\":95,\"error\":\"pause is not supported\"}\n")
                .unwrap();
            line.clear();
            reader.read_line(&mut line).unwrap();
            writer.write_all(b"garbage\n").unwrap();
        });
        let mut client = Client::connect(&dir, 42).unwrap();
        assert_eq!(client.pid(), 42);
        let list = client.call(&CtlRequest::List).unwrap();
        assert_eq!(list.taps, Some(vec![]));
        let e = client.call(&CtlRequest::Pause { minor: 3 }).unwrap_err();
        assert_eq!(e.errno(), 95);
        assert_eq!(e.to_string(), "tapdisk 42: pause is not supported");
        let e = client.call(&CtlRequest::List).unwrap_err();
        assert_eq!(e.errno(), libc::EPROTO);
        server.join().unwrap();
        let e = client.call(&CtlRequest::List).unwrap_err();
        assert_eq!(e.errno(), libc::EPROTO);

        let e = Client::connect(&dir, 43).unwrap_err();
        assert_eq!(e.errno(), libc::ENOENT);
        assert!(e.to_string().contains("no tapdisk 43 listening"), "{e}");
        fs::remove_dir_all(dir).unwrap();
    }
}
