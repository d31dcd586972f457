//! Logging: the `log` facade (the library logs through it too), routed to stderr, to a log file
//! (`--log FILE`, reopened on SIGHUP, so that logrotate can move it away), or to syslog (a
//! daemonized tapdisk without `--log`, as the original logged; SIGHUP reconnects).
//!
//! Every line is `tapdisk[PID]: message` (a file's lines start with the Unix time, to the
//! millisecond).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// Where log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// Standard error.
    Stderr,
    /// A file, appended to; reopened by [`reopen`].
    File(PathBuf),
    /// syslog(3), facility daemon, ident `tapdisk`.
    Syslog,
}

struct Logger {
    sink: Sink,
    file: Mutex<Option<File>>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

fn open_file(path: &PathBuf) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn open_syslog() {
    // SAFETY: the ident is a static C string, valid for the whole process (openlog keeps the
    // pointer).
    unsafe { libc::openlog(c"tapdisk".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
}

/// Routes the `log` facade to `sink`. Fails if the log file cannot be opened.
pub fn init(sink: Sink) -> std::io::Result<()> {
    let file = match &sink {
        Sink::File(path) => Some(open_file(path)?),
        Sink::Syslog => {
            open_syslog();
            None
        }
        Sink::Stderr => None,
    };
    let logger = LOGGER.get_or_init(|| Logger {
        sink,
        file: Mutex::new(file),
    });
    // A second init (tests) keeps the first logger.
    let _ = log::set_logger(logger);
    log::set_max_level(log::LevelFilter::Info);
    Ok(())
}

/// Reopens the log (SIGHUP): the file at its path again (a new file if it was moved away), or
/// the connection to syslog. Says what it did.
pub fn reopen() -> std::io::Result<String> {
    let Some(logger) = LOGGER.get() else {
        return Ok("no log to reopen".into());
    };
    match &logger.sink {
        Sink::Stderr => Ok("logging to stderr: nothing to reopen".into()),
        Sink::Syslog => {
            // SAFETY: plain libc calls; openlog's ident is static.
            unsafe { libc::closelog() };
            open_syslog();
            Ok("reconnected to syslog".into())
        }
        Sink::File(path) => {
            let file = open_file(path)?;
            *logger.file.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
            Ok(format!("reopened {}", path.display()))
        }
    }
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let pid = std::process::id();
        match &self.sink {
            Sink::Stderr => eprintln!("tapdisk[{pid}]: {}", record.args()),
            Sink::File(_) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                let line = format!(
                    "{}.{:03} tapdisk[{pid}]: {}\n",
                    now.as_secs(),
                    now.subsec_millis(),
                    record.args()
                );
                let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(f) = file.as_mut() {
                    let _ = f.write_all(line.as_bytes());
                }
            }
            Sink::Syslog => {
                let priority = match record.level() {
                    log::Level::Error => libc::LOG_ERR,
                    log::Level::Warn => libc::LOG_WARNING,
                    _ => libc::LOG_INFO,
                };
                let text = record.args().to_string().replace('\0', " ");
                let text = CString::new(text).expect("NULs replaced");
                // SAFETY: a constant "%s" format with one NUL-terminated string argument.
                unsafe { libc::syslog(priority, c"%s".as_ptr(), text.as_ptr()) };
            }
        }
    }

    fn flush(&self) {
        if let Some(f) = self.file.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let _ = f.flush();
        }
    }
}

/// Logs a line (info level).
macro_rules! log {
    ($($arg:tt)*) => {
        ::log::info!($($arg)*)
    };
}

pub(crate) use log;
