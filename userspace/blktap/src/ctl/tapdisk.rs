//! Starting tapdisks and talking to them, as `tap-ctl` does.
//!
//! Every command a tapdisk of either origin has goes over the original binary protocol
//! (`blktap::ctl::binary`), so this tap-ctl drives an original tapdisk and this project's alike;
//! only this project's own extras (opening with recovery, recovering) use the JSON protocol,
//! which an original tapdisk does not speak: it closes the connection after its read timeout,
//! and that is reported as such. Every call has a timeout: nothing here waits forever.

use std::env;
use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::ctl::binary::{self, flag, kind, kind_name, Call, ListEntry, Message, Params};
use crate::ctl::{find_tapdisks, Client, CtlRequest, CtlResponse, CTL_DIR};
use crate::{sysfs, Error, Result};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a new tapdisk may take to listen on its socket (slow under emulation).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a tapdisk may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a tapdisk may take to answer a request by default (opening an image may be slow).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `list` and `stats` wait for each tapdisk (the original's 10 s).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a pause may take to answer by default: the requests handed out must all be
/// answered, which with failing I/O takes up to tapdisk's deadline.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(600);

/// Where tap-ctl looks for tapdisk.
#[derive(Debug, Clone, Copy)]
pub struct Lookup<'a> {
    /// tap-ctl's own executable.
    pub own_exe: Option<&'a Path>,
    /// `$TAPDISK`, else `$TAPDISK2` (the original's overrides).
    pub env: Option<&'a OsStr>,
    /// The installed tapdisk's directory (the original tap-ctl's `TAPDISK_EXECDIR`).
    pub execdir: &'a Path,
}

impl Lookup<'_> {
    /// The tapdisk to run, the first of:
    /// 1. `$TAPDISK`, else `$TAPDISK2`, as given (a bare name is looked up in `PATH`): the
    ///    original's overrides, which the tests use to run a stand-in of the original tapdisk;
    /// 2. `tapdisk` next to this executable: a tap-ctl run from its build directory
    ///    (`target/release`) runs the tapdisk built with it, never an older installed one;
    /// 3. the installed one, `TAPDISK_EXECDIR/tapdisk`;
    /// 4. `tapdisk` from `PATH`.
    pub fn binary(&self) -> PathBuf {
        if let Some(t) = self.env.filter(|t| !t.is_empty()) {
            return t.into();
        }
        if let Some(beside) = self.own_exe.map(|exe| exe.with_file_name("tapdisk")) {
            if beside.is_file() {
                return beside;
            }
        }
        let installed = self.execdir.join("tapdisk");
        if installed.is_file() {
            return installed;
        }
        PathBuf::from("tapdisk")
    }
}

/// `$TAPDISK`, else `$TAPDISK2`, if set and not empty.
fn tapdisk_env() -> Option<OsString> {
    ["TAPDISK", "TAPDISK2"]
        .into_iter()
        .filter_map(env::var_os)
        .find(|t| !t.is_empty())
}

/// The tapdisk to run for this process, with the installed one in `execdir` (see
/// [`Lookup::binary`]).
pub fn tapdisk_binary(execdir: &Path) -> PathBuf {
    let exe = env::current_exe().ok();
    let env = tapdisk_env();
    Lookup {
        own_exe: exe.as_deref(),
        env: env.as_deref(),
        execdir,
    }
    .binary()
}

/// A tapdisk this tap-ctl started (a daemon: not a child of this process).
#[derive(Debug)]
pub struct Spawned {
    pid: i32,
}

impl Spawned {
    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Stops it (SIGTERM, SIGKILL if it lingers) and waits until it is gone, so that any ring
    /// it held is closed.
    pub fn stop(self) {
        let pid = Pid::from_raw(self.pid);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while process_alive(self.pid) {
            if Instant::now() >= deadline {
                let _ = kill(pid, Signal::SIGKILL);
                let kill_deadline = Instant::now() + STOP_TIMEOUT;
                while process_alive(self.pid) && Instant::now() < kill_deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether process `pid` exists and is not a zombie.
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// How to run a new tapdisk.
#[derive(Debug, Clone, Copy)]
pub struct SpawnOptions<'a> {
    /// The tapdisk to run (see [`tapdisk_binary`]).
    pub tapdisk: &'a Path,
    /// Its log file (default: none given, so syslog).
    pub log: Option<&'a Path>,
    /// Its request deadline in seconds (`--deadline`; default: tapdisk's, 120).
    pub deadline: Option<u64>,
    /// Never ask the kernel for flush, FUA or discard (`--no-extensions`).
    pub no_extensions: bool,
}

impl Default for SpawnOptions<'_> {
    /// `tapdisk` from `PATH`, with its defaults.
    fn default() -> Self {
        SpawnOptions {
            tapdisk: Path::new("tapdisk"),
            log: None,
            deadline: None,
            no_extensions: false,
        }
    }
}

impl SpawnOptions<'_> {
    /// tapdisk's arguments: none for the defaults (what the original tapdisk takes), this
    /// tapdisk's own options otherwise.
    pub fn args(&self, ctl_dir: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        if ctl_dir != Path::new(CTL_DIR) {
            args.push("--ctl-dir".into());
            args.push(ctl_dir.into());
        }
        if let Some(log) = self.log {
            args.push("--log".into());
            args.push(log.into());
        }
        if let Some(d) = self.deadline {
            args.push("--deadline".into());
            args.push(d.to_string().into());
        }
        if self.no_extensions {
            args.push("--no-extensions".into());
        }
        args
    }
}

/// The pid in the socket path a tapdisk printed (`<dir>/ctl<pid>`).
pub fn parse_spawn_output(out: &str, ctl_dir: &Path) -> Option<i32> {
    let line = out.lines().find(|l| !l.trim().is_empty())?.trim();
    let path = Path::new(line);
    if path.parent()? != ctl_dir {
        return None;
    }
    super::client::parse_socket_name(path.file_name()?.to_str()?)
}

/// Starts a tapdisk the way the original tap-ctl did: runs it (with no arguments unless this
/// tapdisk's own options are asked for), it daemonizes and prints its socket's path, from which
/// the pid is taken.
pub fn spawn(ctl_dir: &Path, opts: &SpawnOptions<'_>) -> Result<Spawned> {
    let binary = opts.tapdisk;
    let args = opts.args(ctl_dir);
    log::debug!("running {} {args:?}", binary.display());
    let mut cmd = Command::new(binary);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the hook runs in the child between fork and exec and only calls setsid(2), which
    // is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        let errno = Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
        Error::os(format!("cannot run {}", binary.display()), errno)
    })?;
    // The daemon keeps the pipe open until it prints its path, the parent exits at once (after
    // the daemon listens, with this project's tapdisk): read both on threads, wait with a
    // timeout.
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 512];
        // The first line is all that is needed; the daemon may keep the pipe open.
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if out.contains(&b'\n') {
                break;
            }
        }
        let _ = tx.send(out);
    });
    let err_reader = std::thread::spawn(move || {
        let mut err = Vec::new();
        let _ = (&mut stderr).take(4096).read_to_end(&mut err);
        err
    });
    let status = wait_child(&mut child, START_TIMEOUT);
    let out = rx.recv_timeout(START_TIMEOUT).unwrap_or_default();
    let out = String::from_utf8_lossy(&out).into_owned();
    log::debug!("tapdisk printed {out:?}, its parent exited {status:?}");
    if let Some(pid) = parse_spawn_output(&out, ctl_dir) {
        return Ok(Spawned { pid });
    }
    let err = if err_reader.is_finished() {
        err_reader.join().unwrap_or_default()
    } else {
        Vec::new()
    };
    let err = String::from_utf8_lossy(&err);
    Err(Error::os(
        format!(
            "{} did not start a tapdisk listening in {} (exit {}; printed {:?}{})",
            binary.display(),
            ctl_dir.display(),
            status.map_or("unknown".into(), |s| s.to_string()),
            out.trim(),
            if err.trim().is_empty() {
                String::new()
            } else {
                format!("; said {:?}", err.trim())
            }
        ),
        Errno::EIO,
    ))
}

fn wait_child(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => return None,
        }
    }
}

/// Sends `msg` (and `trailer`) to tapdisk `pid` and reads its answer.
pub fn request(
    ctl_dir: &Path,
    pid: i32,
    msg: &Message,
    trailer: &[u8],
    timeout: Duration,
) -> Result<Message> {
    log::debug!(
        "sending '{}' message (minor {}) to tapdisk {pid}",
        kind_name(msg.kind()),
        msg.cookie()
    );
    let answer = Call::connect(ctl_dir, pid, timeout)?.request(msg, trailer);
    match &answer {
        Ok(m) => log::debug!("received '{}' message", kind_name(m.kind())),
        Err(e) => log::debug!("failed: {e}"),
    }
    answer
}

/// A request of type `t` for tap `minor`, with nothing else in it.
pub fn simple(ctl_dir: &Path, pid: i32, t: u16, minor: u32, timeout: Duration) -> Result<()> {
    request(ctl_dir, pid, &Message::new(t, cookie(minor)?), &[], timeout).map(drop)
}

/// The cookie for tap `minor`.
pub fn cookie(minor: u32) -> Result<u16> {
    u16::try_from(minor)
        .ok()
        .filter(|&c| c != binary::ALL_MINORS)
        .ok_or_else(|| Error::invalid(format!("minor {minor} is out of range")))
}

/// What `open` sends.
#[derive(Debug, Clone, Default)]
pub struct OpenRequest {
    /// The image, `type:path`.
    pub params: String,
    /// `flag::*`.
    pub flags: u32,
    /// With `-e`: the tap serving the parent chain.
    pub prt_minor: Option<u32>,
    /// With `-2`: the secondary image.
    pub secondary: Option<String>,
    /// Per-request timeout in seconds (0: the tapdisk's).
    pub req_timeout: u16,
    /// With `-C`: the changed-block log's path (a trailer).
    pub logpath: Option<String>,
    /// With `-E`: the key (a trailer).
    pub key: Option<Vec<u8>>,
}

impl OpenRequest {
    /// The message and its trailer.
    pub fn encode(&self, kind: u16, minor: u32) -> Result<(Message, Vec<u8>)> {
        let mut flags = self.flags;
        if self.prt_minor.is_some() {
            flags |= flag::REUSE_PRT;
        }
        if self.secondary.is_some() {
            flags |= flag::SECONDARY;
        }
        if self.logpath.is_some() {
            flags |= flag::ADD_LOG;
        }
        if self.key.is_some() {
            flags |= flag::OPEN_ENCRYPTED;
        }
        let params = Params {
            flags,
            devnum: minor,
            domid: 0,
            path: self.params.clone(),
            prt_devnum: self.prt_minor.unwrap_or(u32::MAX),
            req_timeout: self.req_timeout,
            secondary: self.secondary.clone().unwrap_or_default(),
        };
        let mut msg = Message::new(kind, cookie(minor)?);
        msg.set_params(&params)
            .map_err(|e| Error::os("the image or secondary path is too long", e))?;
        let mut trailer = Vec::new();
        if let Some(log) = &self.logpath {
            let mut field = [0u8; binary::PATH_LENGTH];
            let b = log.as_bytes();
            if b.len() >= binary::PATH_LENGTH {
                return Err(Error::os("the log path is too long", Errno::ENAMETOOLONG));
            }
            field[..b.len()].copy_from_slice(b);
            trailer.extend_from_slice(&field);
        }
        if let Some(key) = &self.key {
            if kind == binary::kind::OPEN {
                trailer.push(key.len() as u8);
                trailer.extend_from_slice(key);
            }
        }
        Ok((msg, trailer))
    }
}

/// OPEN.
pub fn open(ctl_dir: &Path, pid: i32, minor: u32, req: &OpenRequest) -> Result<()> {
    let (msg, trailer) = req.encode(kind::OPEN, minor)?;
    request(ctl_dir, pid, &msg, &trailer, DEFAULT_TIMEOUT).map(drop)
}

/// RESUME, onto `req.params` if not empty.
pub fn unpause(ctl_dir: &Path, pid: i32, minor: u32, req: &OpenRequest) -> Result<()> {
    let (msg, trailer) = req.encode(kind::RESUME, minor)?;
    request(ctl_dir, pid, &msg, &trailer, DEFAULT_TIMEOUT).map(drop)
}

/// PAUSE: returns once the tap is paused.
pub fn pause(ctl_dir: &Path, pid: i32, minor: u32, timeout: Option<Duration>) -> Result<()> {
    simple(
        ctl_dir,
        pid,
        kind::PAUSE,
        minor,
        timeout.unwrap_or(PAUSE_TIMEOUT),
    )
}

/// CLOSE (FORCE_SHUTDOWN with `force`), tried again every second while the tapdisk answers
/// `EBUSY` (the disk is open), until `timeout`.
pub fn close(
    ctl_dir: &Path,
    pid: i32,
    minor: u32,
    force: bool,
    timeout: Option<Duration>,
) -> Result<()> {
    let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT);
    let deadline = Instant::now() + timeout;
    let t = if force {
        kind::FORCE_SHUTDOWN
    } else {
        kind::CLOSE
    };
    let msg = Message::new(t, cookie(minor)?);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Both are answered CLOSE_RSP (FORCE_SHUTDOWN has no answer type of its own).
        let result =
            Call::connect(ctl_dir, pid, left.max(Duration::from_millis(100))).and_then(|mut c| {
                log::debug!("sending '{}' message (minor {minor})", kind_name(t));
                c.send(&msg, &[])?;
                let answer = c.receive()?;
                c.check(answer, kind::CLOSE_RSP).map(drop)
            });
        match result {
            Err(e)
                if e.errno() == libc::EBUSY
                    && Instant::now() + Duration::from_secs(1) < deadline =>
            {
                log::debug!("{e}; trying again in 1 s");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) if e.errno() == libc::EBUSY => {
                return Err(Error::os(
                    format!("{e}; still busy after {} s", timeout.as_secs()),
                    Errno::EBUSY,
                ))
            }
            r => return r,
        }
    }
}

/// LIST: the taps of tapdisk `pid`.
pub fn list(ctl_dir: &Path, pid: i32) -> Result<Vec<ListEntry>> {
    log::debug!("sending 'list' message to tapdisk {pid}");
    Call::connect(ctl_dir, pid, QUERY_TIMEOUT)?.list()
}

/// STATS of tap `minor`: the tapdisk's JSON.
pub fn stats(ctl_dir: &Path, pid: i32, minor: u32) -> Result<String> {
    log::debug!("sending 'stats' message (minor {minor}) to tapdisk {pid}");
    Call::connect(ctl_dir, pid, QUERY_TIMEOUT)?.stats(cookie(minor)?)
}

/// A request in this project's JSON protocol (for its own extras). An original tapdisk does
/// not speak it: that is reported as `EPROTONOSUPPORT`.
pub fn json_call(ctl_dir: &Path, pid: i32, req: &CtlRequest) -> Result<CtlResponse> {
    log::debug!("sending {} to tapdisk {pid}", req.to_line().trim());
    let result = Client::connect_with_timeout(ctl_dir, pid, DEFAULT_TIMEOUT)?.call(req);
    match result {
        Err(Error::Protocol(p)) => Err(Error::os(
            format!(
                "tapdisk {pid} does not speak this tap-ctl's JSON protocol ({p}): an original \
                 tapdisk has no recovery"
            ),
            Errno::EPROTONOSUPPORT,
        )),
        r => r,
    }
}

/// The tapdisk serving tap `minor`: the ring holder sysfs names, else the tapdisk that lists
/// the tap. `None` if no process holds the tap.
pub fn find_server(ctl_dir: &Path, minor: u32) -> Result<Option<i32>> {
    if let Ok(tap) = sysfs::find_tap(minor) {
        if let Some(task) = tap.task()? {
            return Ok(Some(task));
        }
    }
    for pid in find_tapdisks(ctl_dir) {
        let Ok(taps) = list(ctl_dir, pid) else {
            continue;
        };
        if taps.iter().any(|t| t.minor == minor as i32) {
            return Ok(Some(pid));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawn_options_become_tapdisk_arguments() {
        let dir = Path::new(CTL_DIR);
        assert!(
            SpawnOptions::default().args(dir).is_empty(),
            "none: as the original"
        );
        let opts = SpawnOptions {
            tapdisk: Path::new("/t"),
            log: Some(Path::new("/l")),
            deadline: Some(30),
            no_extensions: true,
        };
        assert_eq!(
            opts.args(Path::new("/tmp/c")),
            [
                "--ctl-dir",
                "/tmp/c",
                "--log",
                "/l",
                "--deadline",
                "30",
                "--no-extensions"
            ]
        );
    }

    #[test]
    fn the_pid_comes_from_the_printed_socket_path() {
        let dir = Path::new("/var/run/blktap-control");
        assert_eq!(
            parse_spawn_output("/var/run/blktap-control/ctl4242\n", dir),
            Some(4242)
        );
        assert_eq!(
            parse_spawn_output("\n/var/run/blktap-control/ctl7", dir),
            Some(7)
        );
        assert_eq!(parse_spawn_output("/tmp/ctl7\n", dir), None);
        assert_eq!(parse_spawn_output("", dir), None);
        assert_eq!(parse_spawn_output("garbage\n", dir), None);
    }

    #[test]
    fn open_requests_set_flags_and_trailers() {
        let req = OpenRequest {
            params: "aio:/x".into(),
            flags: flag::RDONLY,
            prt_minor: Some(3),
            secondary: Some("aio:/m".into()),
            req_timeout: 120,
            logpath: Some("/log".into()),
            key: Some(vec![7; 32]),
        };
        let (m, trailer) = req.encode(kind::OPEN, 5).unwrap();
        let p = m.params().unwrap();
        assert_eq!(
            p.flags,
            flag::RDONLY | flag::REUSE_PRT | flag::SECONDARY | flag::ADD_LOG | flag::OPEN_ENCRYPTED
        );
        assert_eq!((p.devnum, p.prt_devnum, p.req_timeout), (5, 3, 120));
        assert_eq!(p.secondary, "aio:/m");
        assert_eq!(trailer.len(), 256 + 1 + 32);
        assert_eq!(m.trailer().len(&trailer[..257]), Some(trailer.len()));
        // RESUME carries no key.
        let (_, trailer) = req.encode(kind::RESUME, 5).unwrap();
        assert_eq!(trailer.len(), 256);
        assert!(cookie(0xffff).is_err());
        assert!(cookie(70000).is_err());
    }

    #[test]
    fn finds_the_tapdisk_binary() {
        let dir = env::temp_dir().join(format!("tap-ctl-bin-{}", std::process::id()));
        let (build, libexec) = (dir.join("release"), dir.join("libexec"));
        std::fs::create_dir_all(&build).unwrap();
        std::fs::create_dir_all(&libexec).unwrap();
        let own = build.join("tap-ctl");
        let lookup = |env: Option<&str>| {
            Lookup {
                own_exe: Some(&own),
                env: env.map(OsStr::new),
                execdir: &libexec,
            }
            .binary()
        };
        // Nothing beside, nothing installed: $TAPDISK, else PATH.
        assert_eq!(lookup(Some("/opt/td")), PathBuf::from("/opt/td"));
        assert_eq!(lookup(None), PathBuf::from("tapdisk"));
        assert_eq!(lookup(Some("")), PathBuf::from("tapdisk"));
        // Installed: $TAPDISK still wins, then the installed one, before PATH.
        std::fs::write(libexec.join("tapdisk"), "").unwrap();
        assert_eq!(lookup(Some("/opt/td")), PathBuf::from("/opt/td"));
        assert_eq!(lookup(None), libexec.join("tapdisk"));
        // Beside tap-ctl (its build directory) wins over the installed one; $TAPDISK over both.
        std::fs::write(build.join("tapdisk"), "").unwrap();
        assert_eq!(lookup(Some("/opt/td")), PathBuf::from("/opt/td"));
        assert_eq!(lookup(None), build.join("tapdisk"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
