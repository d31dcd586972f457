//! Logging: one line per event on stderr, prefixed with the process's name and pid.
//!
//! A spawned tapdisk's stderr goes to the log file `tap-ctl spawn --log FILE` named, or nowhere.

/// Logs a line: `tapdisk[PID]: message`.
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("tapdisk[{}]: {}", std::process::id(), format_args!($($arg)*))
    };
}

pub(crate) use log;
