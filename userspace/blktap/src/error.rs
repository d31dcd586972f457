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
    /// A system call other than an ioctl failed, on something that is not simply a path.
    #[error("{what}: {}", describe_errno(*.errno))]
    Os {
        /// What was being done.
        what: String,
        /// The errno.
        errno: i32,
    },
    /// An argument was not acceptable (a malformed `type:path`, a bad size, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// A tapdisk answered a control request with an error.
    #[error("tapdisk {pid}: {message}")]
    Remote {
        /// The tapdisk's pid.
        pid: i32,
        /// The errno it answered.
        errno: i32,
        /// Its explanation.
        message: String,
    },
    /// A control-socket peer broke the protocol (bad JSON, no answer).
    #[error("control protocol: {0}")]
    Protocol(String),
    /// A VHD image or chain could not be used.
    #[error("vhd: {0}")]
    Vhd(Box<crate::vhd::VhdError>),
}

impl Error {
    /// The errno this error stands for, for callers that want to act on it.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotLoaded | Error::NoSuchTap(_) => Errno::ENODEV as i32,
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(Errno::EIO as i32),
            Error::Ioctl { errno, .. } => *errno,
            Error::Parse { .. } | Error::InvalidArgument(_) => Errno::EINVAL as i32,
            Error::Os { errno, .. } | Error::Remote { errno, .. } => *errno,
            Error::Protocol(_) => Errno::EPROTO as i32,
            Error::Vhd(e) => e.errno(),
        }
    }

    /// An error for `what` failing with `errno`.
    pub fn os(what: impl Into<String>, errno: Errno) -> Self {
        Error::Os {
            what: what.into(),
            errno: errno as i32,
        }
    }

    /// An error for an unacceptable argument (`EINVAL`).
    pub fn invalid(detail: impl Into<String>) -> Self {
        Error::InvalidArgument(detail.into())
    }

    /// An error for `what` (e.g. "cannot open") failing on `path`.
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
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

    #[test]
    fn every_variant_has_an_errno() {
        assert_eq!(Error::os("open ring 2", Errno::ENXIO).errno(), 6);
        assert_eq!(
            Error::os("open ring 2", Errno::ENXIO).to_string(),
            "open ring 2: ENXIO (No such device or address)"
        );
        assert_eq!(Error::invalid("bad size").errno(), 22);
        assert_eq!(Error::Protocol("eof".into()).errno(), Errno::EPROTO as i32);
        let remote = Error::Remote {
            pid: 12,
            errno: 95,
            message: "pause is not supported".into(),
        };
        assert_eq!(remote.errno(), 95);
        assert_eq!(remote.to_string(), "tapdisk 12: pause is not supported");
    }
}
