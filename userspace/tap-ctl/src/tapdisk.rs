//! Starting tapdisks and talking to them.

use std::env;
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blktap::ctl::{find_tapdisks, Client, CtlRequest, CtlResponse};
use blktap::{sysfs, Error, Result};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a new tapdisk may take to listen on its socket (slow under emulation).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a tapdisk may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where `make install` puts tapdisk, and where an installed tap-ctl runs it from (the original
/// tap-ctl's `TAPDISK_EXECDIR`): `$(LIBEXECDIR)` of the top-level Makefile, `$(PREFIX)/libexec`,
/// fixed when tap-ctl is built (`build.rs`).
pub const TAPDISK_EXECDIR: &str = env!("TAPDISK_EXECDIR");

/// Where tap-ctl looks for tapdisk.
#[derive(Debug, Clone, Copy)]
pub struct Lookup<'a> {
    /// tap-ctl's own executable.
    pub own_exe: Option<&'a Path>,
    /// `$TAPDISK`, else `$TAPDISK2` (the original's overrides).
    pub env: Option<&'a OsStr>,
    /// The installed tapdisk's directory ([`TAPDISK_EXECDIR`]).
    pub execdir: &'a Path,
}

impl Lookup<'_> {
    /// The tapdisk to run, the first of:
    /// 1. `tapdisk` next to this executable: a tap-ctl run from its build directory
    ///    (`target/release`) runs the tapdisk built with it, never an older installed one;
    /// 2. `$TAPDISK`, else `$TAPDISK2`, as given (a bare name is looked up in `PATH`);
    /// 3. the installed one, `TAPDISK_EXECDIR/tapdisk`;
    /// 4. `tapdisk` from `PATH`.
    pub fn binary(&self) -> PathBuf {
        if let Some(beside) = self.own_exe.map(|exe| exe.with_file_name("tapdisk")) {
            if beside.is_file() {
                return beside;
            }
        }
        if let Some(t) = self.env.filter(|t| !t.is_empty()) {
            return t.into();
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

/// The tapdisk this tap-ctl runs (see [`Lookup::binary`]).
pub fn tapdisk_binary() -> PathBuf {
    let exe = env::current_exe().ok();
    let env = tapdisk_env();
    Lookup {
        own_exe: exe.as_deref(),
        env: env.as_deref(),
        execdir: Path::new(TAPDISK_EXECDIR),
    }
    .binary()
}

/// A tapdisk this tap-ctl started.
#[derive(Debug)]
pub struct Spawned {
    child: Child,
}

impl Spawned {
    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Stops it (SIGTERM, SIGKILL if it lingers) and waits until it is gone, so that any ring
    /// it held is closed.
    pub fn stop(mut self) {
        let pid = Pid::from_raw(self.pid());
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// How to run a new tapdisk.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpawnOptions<'a> {
    /// Its log file (default: none).
    pub log: Option<&'a Path>,
    /// Its request deadline in seconds (`--deadline`; default: tapdisk's, 120).
    pub deadline: Option<u64>,
    /// Never ask the kernel for flush, FUA or discard (`--no-extensions`).
    pub no_extensions: bool,
}

impl SpawnOptions<'_> {
    /// tapdisk's arguments beyond `--ctl-dir DIR --exit-when-idle`.
    pub fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(d) = self.deadline {
            args.push("--deadline".into());
            args.push(d.to_string());
        }
        if self.no_extensions {
            args.push("--no-extensions".into());
        }
        args
    }
}

/// Starts a tapdisk in its own session, with its output in `opts.log` (or nowhere), that exits
/// once its last tap is detached; returns when it listens on its socket in `ctl_dir`.
pub fn spawn(ctl_dir: &Path, opts: &SpawnOptions<'_>) -> Result<Spawned> {
    let log = opts.log;
    let binary = tapdisk_binary();
    let out = match log {
        Some(path) => OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io("cannot open", path, e))?,
        None => File::options()
            .write(true)
            .open("/dev/null")
            .map_err(|e| Error::io("cannot open", "/dev/null", e))?,
    };
    let err = out
        .try_clone()
        .map_err(|e| Error::io("cannot duplicate", log.unwrap_or(Path::new("/dev/null")), e))?;
    let mut cmd = Command::new(&binary);
    cmd.arg("--ctl-dir")
        .arg(ctl_dir)
        .arg("--exit-when-idle")
        .args(opts.args())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: the hook runs in the child between fork and exec and only calls setsid(2), which
    // is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    let child = cmd.spawn().map_err(|e| {
        let errno = Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
        Error::os(format!("cannot run {}", binary.display()), errno)
    })?;
    let mut spawned = Spawned { child };
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if Client::connect_with_timeout(ctl_dir, spawned.pid(), Duration::from_secs(5)).is_ok() {
            return Ok(spawned);
        }
        if let Ok(Some(status)) = spawned.child.try_wait() {
            return Err(Error::os(
                format!(
                    "{} exited ({status}) before listening in {}{}",
                    binary.display(),
                    ctl_dir.display(),
                    log.map_or(String::new(), |l| format!("; see {}", l.display()))
                ),
                Errno::EIO,
            ));
        }
        if Instant::now() >= deadline {
            spawned.stop();
            return Err(Error::os(
                format!("tapdisk did not listen in {} in time", ctl_dir.display()),
                Errno::ETIMEDOUT,
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long a pause may take to answer: the requests handed out must all be answered, which
/// with failing I/O takes up to tapdisk's deadline.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(600);

/// Sends one request to tapdisk `pid`.
pub fn call(ctl_dir: &Path, pid: i32, req: &CtlRequest) -> Result<CtlResponse> {
    let timeout = match req {
        CtlRequest::Pause { .. } => PAUSE_TIMEOUT,
        _ => blktap::ctl::client::DEFAULT_TIMEOUT,
    };
    Client::connect_with_timeout(ctl_dir, pid, timeout)?.call(req)
}

/// The tapdisk serving tap `minor`: the ring holder sysfs names, else the tapdisk that lists
/// the tap. `None` if no process holds the tap.
pub fn find_server(ctl_dir: &Path, minor: u32) -> Result<Option<i32>> {
    if let Some(task) = sysfs::find_tap(minor)?.task()? {
        return Ok(Some(task));
    }
    for pid in find_tapdisks(ctl_dir) {
        let Ok(mut client) = Client::connect_with_timeout(ctl_dir, pid, Duration::from_secs(5))
        else {
            continue;
        };
        let listed = client.call(&CtlRequest::List).ok().and_then(|r| r.taps);
        if listed.is_some_and(|taps| taps.iter().any(|t| t.minor == minor)) {
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
        assert!(SpawnOptions::default().args().is_empty());
        let opts = SpawnOptions {
            log: None,
            deadline: Some(30),
            no_extensions: true,
        };
        assert_eq!(opts.args(), ["--deadline", "30", "--no-extensions"]);
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
        // Beside tap-ctl (its build directory) wins over everything.
        std::fs::write(build.join("tapdisk"), "").unwrap();
        assert_eq!(lookup(Some("/opt/td")), build.join("tapdisk"));
        assert_eq!(lookup(None), build.join("tapdisk"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_installed_tapdisk_is_under_an_absolute_execdir() {
        assert!(TAPDISK_EXECDIR.starts_with('/'), "{TAPDISK_EXECDIR}");
        assert!(!TAPDISK_EXECDIR.ends_with('/') || TAPDISK_EXECDIR == "/");
    }
}
