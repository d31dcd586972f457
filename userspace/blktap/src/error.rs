//! The library's error type.

use std::io;

use nix::errno::Errno;
use std::path::PathBuf;

/// An error from the blktap library. Every variant can say which errno it stands for.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel module is not loaded (no `blktap/control` in `/proc/misc`).
    #[error("the blktap kernel module is not loaded (no blktap/control in /proc/misc)")]
    NotLoaded,
    /// An operation on a file or device failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// An ioctl failed.
    #[error("{what}: {}", describe_errno(*.errno))]
    Ioctl {
        /// What was being done.
        what: String,
        /// The errno the kernel answered.
        errno: i32,
    },
    /// Something the kernel exposes could not be parsed.
    #[error("cannot parse {path}: {detail}")]
    Parse {
        /// Which file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// No such tap.
    #[error("no tap with minor {0}")]
    NoSuchTap(u32),
}

impl Error {
    /// The errno this error stands for, for callers that want to act on it.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotLoaded | Error::NoSuchTap(_) => Errno::ENODEV as i32,
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(Errno::EIO as i32),
            Error::Ioctl { errno, .. } => *errno,
            Error::Parse { .. } => Errno::EINVAL as i32,
        }
    }

    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            what,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn ioctl(what: impl Into<String>, errno: Errno) -> Self {
        Error::Ioctl {
            what: what.into(),
            errno: errno as i32,
        }
    }
}

/// The errno's symbolic name and meaning, e.g. `EBUSY (Device or resource busy)`.
pub fn describe_errno(errno: i32) -> String {
    let e = Errno::from_raw(errno);
    format!("{e:?} ({})", e.desc())
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_descriptions_name_the_errno() {
        assert_eq!(describe_errno(16), "EBUSY (Device or resource busy)");
        assert_eq!(describe_errno(19), "ENODEV (No such device)");
        assert!(describe_errno(25).starts_with("ENOTTY ("));
    }

    #[test]
    fn ioctl_errors_keep_their_errno() {
        let e = Error::Ioctl {
            what: "free tap 3".into(),
            errno: 16,
        };
        assert_eq!(e.errno(), 16);
        assert_eq!(e.to_string(), "free tap 3: EBUSY (Device or resource busy)");
    }
}
