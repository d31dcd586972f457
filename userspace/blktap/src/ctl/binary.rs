//! The original tapdisk control protocol: fixed-size `tapdisk_message_t` messages.
//!
//! This is what the Xen host's `tap-ctl` (blktap 3.x) speaks on `ctl<pid>`: one connection per
//! request, the client writes one 544-byte message (the x86-64 layout of `tapdisk_message_t`),
//! possibly followed by a trailer (a log path, an encryption key), and reads one answer (LIST: a
//! stream of answers counting down; STATS: an answer whose `info.length` says how many bytes of
//! JSON follow). Errors are a `TAPDISK_MESSAGE_ERROR` answer whose `response.error` is a
//! positive errno.
//!
//! Layout (offsets from the start of the message; all integers little-endian):
//!
//! | field | offset | size |
//! |---|---|---|
//! | `type` | 0 | u16 |
//! | `cookie` (the minor; 0xffff = all, for STATS) | 2 | u16 |
//! | `union u` (8-aligned: it holds a `size_t`) | 8 | 536 |
//!
//! Members of the union, offsets from its start: `tapdisk_pid` (i32 at 0); `image` (`sectors`
//! u64 at 0, `sector_size` u32 at 8, `info` u32 at 12); `params` (`flags` u32 at 0, `devnum` u32
//! at 4, `domid` u32 at 8, `path` char\[256\] at 12, `prt_devnum` u32 at 268, `req_timeout` u16 at
//! 272, `secondary` char\[256\] at 274); `string` (`text` char\[256\] at 0); `response` (`error`
//! i32 at 0, `message` char\[256\] at 4); `minors` (`count` i32 at 0, `list` i32\[63\] at 4);
//! `list` (`count` i32 at 0, `minor` i32 at 4, `state` i32 at 8, `path` char\[256\] at 12);
//! `info` (`type` u16 at 0, `cookie` u16 at 2, `length` u64 at 8). RESUME uses `params` (its
//! `path` is the optional new image, `flags` its flags).

use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;

use crate::{Error, Result};

/// Size of a message: 8 bytes of header (with padding) and the 536-byte union.
pub const MESSAGE_SIZE: usize = 544;
/// Where the union starts.
pub const UNION_OFFSET: usize = 8;
/// Size of the union (its largest member, `params`, is 530 bytes; 8-aligned).
pub const UNION_SIZE: usize = MESSAGE_SIZE - UNION_OFFSET;
/// Length of the path and string fields, terminating NUL included.
pub const PATH_LENGTH: usize = 256;
/// Minors a `minors` member holds.
pub const MAX_MINORS: usize = PATH_LENGTH / 4 - 1;
/// The cookie that means "every tap" (STATS).
pub const ALL_MINORS: u16 = 0xffff;

/// Absolute offsets of the fields.
pub mod offset {
    use super::UNION_OFFSET as U;
    /// `type`.
    pub const TYPE: usize = 0;
    /// `cookie`.
    pub const COOKIE: usize = 2;
    /// `u.tapdisk_pid`.
    pub const PID: usize = U;
    /// `u.image.sectors`.
    pub const IMAGE_SECTORS: usize = U;
    /// `u.image.sector_size`.
    pub const IMAGE_SECTOR_SIZE: usize = U + 8;
    /// `u.image.info`.
    pub const IMAGE_INFO: usize = U + 12;
    /// `u.params.flags`.
    pub const PARAMS_FLAGS: usize = U;
    /// `u.params.devnum`.
    pub const PARAMS_DEVNUM: usize = U + 4;
    /// `u.params.domid`.
    pub const PARAMS_DOMID: usize = U + 8;
    /// `u.params.path`.
    pub const PARAMS_PATH: usize = U + 12;
    /// `u.params.prt_devnum`.
    pub const PARAMS_PRT_DEVNUM: usize = U + 268;
    /// `u.params.req_timeout`.
    pub const PARAMS_REQ_TIMEOUT: usize = U + 272;
    /// `u.params.secondary`.
    pub const PARAMS_SECONDARY: usize = U + 274;
    /// `u.string.text`.
    pub const STRING_TEXT: usize = U;
    /// `u.response.error`.
    pub const RESPONSE_ERROR: usize = U;
    /// `u.response.message`.
    pub const RESPONSE_MESSAGE: usize = U + 4;
    /// `u.minors.count`.
    pub const MINORS_COUNT: usize = U;
    /// `u.minors.list`.
    pub const MINORS_LIST: usize = U + 4;
    /// `u.list.count`.
    pub const LIST_COUNT: usize = U;
    /// `u.list.minor`.
    pub const LIST_MINOR: usize = U + 4;
    /// `u.list.state`.
    pub const LIST_STATE: usize = U + 8;
    /// `u.list.path`.
    pub const LIST_PATH: usize = U + 12;
    /// `u.info.type`.
    pub const INFO_TYPE: usize = U;
    /// `u.info.cookie`.
    pub const INFO_COOKIE: usize = U + 2;
    /// `u.info.length`.
    pub const INFO_LENGTH: usize = U + 8;
}

/// Message types (`enum tapdisk_message_id`).
#[allow(missing_docs)]
pub mod kind {
    pub const ERROR: u16 = 1;
    pub const RUNTIME_ERROR: u16 = 2;
    pub const PID: u16 = 3;
    pub const PID_RSP: u16 = 4;
    pub const ATTACH: u16 = 5;
    pub const ATTACH_RSP: u16 = 6;
    pub const OPEN: u16 = 7;
    pub const OPEN_RSP: u16 = 8;
    pub const PAUSE: u16 = 9;
    pub const PAUSE_RSP: u16 = 10;
    pub const RESUME: u16 = 11;
    pub const RESUME_RSP: u16 = 12;
    pub const CLOSE: u16 = 13;
    pub const CLOSE_RSP: u16 = 14;
    pub const DETACH: u16 = 15;
    pub const DETACH_RSP: u16 = 16;
    pub const LIST_MINORS: u16 = 17;
    pub const LIST_MINORS_RSP: u16 = 18;
    pub const LIST: u16 = 19;
    pub const LIST_RSP: u16 = 20;
    pub const STATS: u16 = 21;
    pub const STATS_RSP: u16 = 22;
    pub const FORCE_SHUTDOWN: u16 = 23;
    pub const XENBLKIF_CONNECT: u16 = 24;
    pub const XENBLKIF_CONNECT_RSP: u16 = 25;
    pub const XENBLKIF_DISCONNECT: u16 = 26;
    pub const XENBLKIF_DISCONNECT_RSP: u16 = 27;
    pub const DISK_INFO: u16 = 28;
    pub const DISK_INFO_RSP: u16 = 29;
    pub const EXIT: u16 = 30;
}

/// The name of message type `t`, for messages.
pub fn kind_name(t: u16) -> &'static str {
    const NAMES: [&str; 31] = [
        "unknown",
        "error",
        "runtime error",
        "pid",
        "pid response",
        "attach",
        "attach response",
        "open",
        "open response",
        "pause",
        "pause response",
        "resume",
        "resume response",
        "close",
        "close response",
        "detach",
        "detach response",
        "list minors",
        "list minors response",
        "list",
        "list response",
        "stats",
        "stats response",
        "force shutdown",
        "xenblkif connect",
        "xenblkif connect response",
        "xenblkif disconnect",
        "xenblkif disconnect response",
        "disk info",
        "disk info response",
        "exit",
    ];
    NAMES.get(usize::from(t)).copied().unwrap_or("unknown")
}

/// Open (and resume) flags, `params.flags`.
pub mod flag {
    /// The image may be shared with other taps of this tapdisk.
    pub const SHARED: u32 = 0x001;
    /// Read-only.
    pub const RDONLY: u32 = 0x002;
    /// Add a read cache (block-cache).
    pub const ADD_CACHE: u32 = 0x004;
    /// A VHD index image.
    pub const VHD_INDEX: u32 = 0x008;
    /// Insert a changed-block log; a 256-byte log path follows the message.
    pub const ADD_LOG: u32 = 0x010;
    /// Add a local read cache (`-r`).
    pub const ADD_LCACHE: u32 = 0x020;
    /// Reuse the parent chain another tap serves (`-e minor`, `prt_devnum`).
    pub const REUSE_PRT: u32 = 0x040;
    /// Mirror writes to `secondary` (`-2 path`).
    pub const SECONDARY: u32 = 0x080;
    /// With SECONDARY: fail over to it on ENOSPC instead of mirroring (`-s`).
    pub const STANDBY: u32 = 0x100;
    /// Do not use `O_DIRECT` (`-D`).
    pub const NO_O_DIRECT: u32 = 0x200;
    /// An encrypted image: a key-size byte and the key follow the message (`-E`).
    pub const OPEN_ENCRYPTED: u32 = 0x400;
    /// The flags this tapdisk knows the meaning of.
    pub const KNOWN: u32 = 0x7ff;
}

/// State bits in LIST answers (the original `td_vbd` state flags).
pub mod state {
    /// The ring broke the protocol.
    pub const DEAD: u32 = 0x01;
    /// No image open.
    pub const CLOSED: u32 = 0x02;
    /// A quiesce was asked for.
    pub const QUIESCE_REQUESTED: u32 = 0x04;
    /// Quiesced: no request in flight.
    pub const QUIESCED: u32 = 0x08;
    /// A pause was asked for.
    pub const PAUSE_REQUESTED: u32 = 0x10;
    /// Paused.
    pub const PAUSED: u32 = 0x20;
}

/// One message: the raw 544 bytes, with typed access to the fields.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    bytes: [u8; MESSAGE_SIZE],
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("type", &kind_name(self.kind()))
            .field("cookie", &self.cookie())
            .finish_non_exhaustive()
    }
}

impl Default for Message {
    fn default() -> Self {
        Self {
            bytes: [0; MESSAGE_SIZE],
        }
    }
}

impl Message {
    /// A zeroed message of type `kind` for `cookie`.
    pub fn new(kind: u16, cookie: u16) -> Self {
        let mut m = Self::default();
        m.set_u16(offset::TYPE, kind);
        m.set_u16(offset::COOKIE, cookie);
        m
    }

    /// The message in `bytes`.
    pub fn from_bytes(bytes: [u8; MESSAGE_SIZE]) -> Self {
        Self { bytes }
    }

    /// The message's bytes.
    pub fn as_bytes(&self) -> &[u8; MESSAGE_SIZE] {
        &self.bytes
    }

    /// `type`.
    pub fn kind(&self) -> u16 {
        self.u16_at(offset::TYPE)
    }

    /// `cookie`.
    pub fn cookie(&self) -> u16 {
        self.u16_at(offset::COOKIE)
    }

    /// The u16 at `off`.
    pub fn u16_at(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }

    /// The u32 at `off`.
    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.bytes[off..off + 4].try_into().expect("4 bytes"))
    }

    /// The i32 at `off`.
    pub fn i32_at(&self, off: usize) -> i32 {
        self.u32_at(off) as i32
    }

    /// The u64 at `off`.
    pub fn u64_at(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.bytes[off..off + 8].try_into().expect("8 bytes"))
    }

    /// Sets the u16 at `off`.
    pub fn set_u16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// Sets the u32 at `off`.
    pub fn set_u32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Sets the i32 at `off`.
    pub fn set_i32(&mut self, off: usize, v: i32) {
        self.set_u32(off, v as u32);
    }

    /// Sets the u64 at `off`.
    pub fn set_u64(&mut self, off: usize, v: u64) {
        self.bytes[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// The NUL-terminated string in the `PATH_LENGTH` bytes at `off`: `None` if no NUL ends it
    /// there. Bytes that are not UTF-8 are replaced.
    pub fn str_at(&self, off: usize) -> Option<String> {
        let field = &self.bytes[off..off + PATH_LENGTH];
        let end = field.iter().position(|&b| b == 0)?;
        Some(String::from_utf8_lossy(&field[..end]).into_owned())
    }

    /// The string at `off`, cut at the first NUL or at the field's end (for answers, which
    /// clients read leniently).
    pub fn str_lossy_at(&self, off: usize) -> String {
        let field = &self.bytes[off..off + PATH_LENGTH];
        let end = field.iter().position(|&b| b == 0).unwrap_or(PATH_LENGTH);
        String::from_utf8_lossy(&field[..end]).into_owned()
    }

    /// Writes `s` with its NUL into the `PATH_LENGTH` bytes at `off`; `ENAMETOOLONG` if it does
    /// not fit.
    pub fn set_str(&mut self, off: usize, s: &str) -> Result<(), Errno> {
        let b = s.as_bytes();
        if b.len() >= PATH_LENGTH {
            return Err(Errno::ENAMETOOLONG);
        }
        let field = &mut self.bytes[off..off + PATH_LENGTH];
        field.fill(0);
        field[..b.len()].copy_from_slice(b);
        Ok(())
    }

    /// Writes `s` into the field at `off`, cut to fit (for error messages).
    pub fn set_str_truncated(&mut self, off: usize, s: &str) {
        let mut end = s.len().min(PATH_LENGTH - 1);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.set_str(off, &s[..end]).expect("cut to fit");
    }

    /// An ERROR answer: `errno` (positive) and `message`.
    pub fn error(cookie: u16, errno: i32, message: &str) -> Self {
        let mut m = Self::new(kind::ERROR, cookie);
        m.set_i32(offset::RESPONSE_ERROR, errno);
        m.set_str_truncated(offset::RESPONSE_MESSAGE, message);
        m
    }

    /// A PID answer.
    pub fn pid_response(cookie: u16, pid: i32) -> Self {
        let mut m = Self::new(kind::PID_RSP, cookie);
        m.set_i32(offset::PID, pid);
        m
    }

    /// An answer carrying `image` (OPEN, DISK_INFO).
    pub fn image_response(kind: u16, cookie: u16, image: ImageInfo) -> Self {
        let mut m = Self::new(kind, cookie);
        m.set_u64(offset::IMAGE_SECTORS, image.sectors);
        m.set_u32(offset::IMAGE_SECTOR_SIZE, image.sector_size);
        m.set_u32(offset::IMAGE_INFO, image.info);
        m
    }

    /// One LIST answer.
    pub fn list_response(cookie: u16, entry: &ListEntry) -> Self {
        let mut m = Self::new(kind::LIST_RSP, cookie);
        m.set_i32(offset::LIST_COUNT, entry.count);
        m.set_i32(offset::LIST_MINOR, entry.minor);
        m.set_i32(offset::LIST_STATE, entry.state);
        m.set_str_truncated(offset::LIST_PATH, &entry.path);
        m
    }

    /// A STATS answer: `length` bytes of JSON follow it.
    pub fn stats_response(cookie: u16, length: u64) -> Self {
        let mut m = Self::new(kind::STATS_RSP, cookie);
        m.set_u64(offset::INFO_LENGTH, length);
        m
    }

    /// The `image` member.
    pub fn image(&self) -> ImageInfo {
        ImageInfo {
            sectors: self.u64_at(offset::IMAGE_SECTORS),
            sector_size: self.u32_at(offset::IMAGE_SECTOR_SIZE),
            info: self.u32_at(offset::IMAGE_INFO),
        }
    }

    /// The `list` member.
    pub fn list_entry(&self) -> ListEntry {
        ListEntry {
            count: self.i32_at(offset::LIST_COUNT),
            minor: self.i32_at(offset::LIST_MINOR),
            state: self.i32_at(offset::LIST_STATE),
            path: self.str_lossy_at(offset::LIST_PATH),
        }
    }

    /// The `response` member: the errno and message of an ERROR answer.
    pub fn response(&self) -> (i32, String) {
        (
            self.i32_at(offset::RESPONSE_ERROR),
            self.str_lossy_at(offset::RESPONSE_MESSAGE),
        )
    }

    /// The `params` member.
    pub fn params(&self) -> Result<Params, Errno> {
        Ok(Params {
            flags: self.u32_at(offset::PARAMS_FLAGS),
            devnum: self.u32_at(offset::PARAMS_DEVNUM),
            domid: self.u32_at(offset::PARAMS_DOMID),
            path: self.str_at(offset::PARAMS_PATH).ok_or(Errno::EINVAL)?,
            prt_devnum: self.u32_at(offset::PARAMS_PRT_DEVNUM),
            req_timeout: self.u16_at(offset::PARAMS_REQ_TIMEOUT),
            secondary: self.str_at(offset::PARAMS_SECONDARY).ok_or(Errno::EINVAL)?,
        })
    }

    /// Sets the `params` member.
    pub fn set_params(&mut self, p: &Params) -> Result<(), Errno> {
        self.set_u32(offset::PARAMS_FLAGS, p.flags);
        self.set_u32(offset::PARAMS_DEVNUM, p.devnum);
        self.set_u32(offset::PARAMS_DOMID, p.domid);
        self.set_str(offset::PARAMS_PATH, &p.path)?;
        self.set_u32(offset::PARAMS_PRT_DEVNUM, p.prt_devnum);
        self.set_u16(offset::PARAMS_REQ_TIMEOUT, p.req_timeout);
        self.set_str(offset::PARAMS_SECONDARY, &p.secondary)
    }

    /// What follows this message before its answer is due: the trailers of OPEN (a log path
    /// with ADD_LOG, then a key-size byte and the key with OPEN_ENCRYPTED) and RESUME (a log
    /// path with ADD_LOG).
    pub fn trailer(&self) -> Trailer {
        if !matches!(self.kind(), kind::OPEN | kind::RESUME) {
            return Trailer::default();
        }
        let flags = self.u32_at(offset::PARAMS_FLAGS);
        Trailer {
            log_path: flags & flag::ADD_LOG != 0,
            key: flags & flag::OPEN_ENCRYPTED != 0 && self.kind() == kind::OPEN,
        }
    }
}

/// What follows a message on the socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trailer {
    /// A 256-byte log path (ADD_LOG).
    pub log_path: bool,
    /// A key-size byte and that many bytes of key (OPEN_ENCRYPTED).
    pub key: bool,
}

impl Trailer {
    /// The trailer's length, given what has arrived after the message so far: `None` while the
    /// key-size byte has not come.
    pub fn len(&self, after: &[u8]) -> Option<usize> {
        let log = if self.log_path { PATH_LENGTH } else { 0 };
        if !self.key {
            return Some(log);
        }
        let size = *after.get(log)?;
        Some(log + 1 + usize::from(size))
    }
}

/// The `image` member: a disk's geometry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageInfo {
    /// Capacity in sectors.
    pub sectors: u64,
    /// Sector size in bytes.
    pub sector_size: u32,
    /// `VDISK_*` bits (0x4: read-only).
    pub info: u32,
}

/// `VDISK_READONLY` in `image.info`.
pub const VDISK_READONLY: u32 = 0x4;

/// The `list` member: one tap of a LIST stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListEntry {
    /// Taps still to come, this one included; 0 ends the stream.
    pub count: i32,
    /// The tap's minor (-1 for none).
    pub minor: i32,
    /// Its state bits.
    pub state: i32,
    /// Its image, `type:path`, or empty.
    pub path: String,
}

/// The `params` member of OPEN and RESUME.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    /// `flag::*`.
    pub flags: u32,
    /// The tap's minor.
    pub devnum: u32,
    /// The guest's domain.
    pub domid: u32,
    /// The image, `type:path` (RESUME: the new image, or empty).
    pub path: String,
    /// With REUSE_PRT: the tap serving the parent chain.
    pub prt_devnum: u32,
    /// Per-request timeout in seconds (0: the default).
    pub req_timeout: u16,
    /// With SECONDARY: the mirror image.
    pub secondary: String,
}

/// A connection to a tapdisk speaking this protocol: one request, its answer.
#[derive(Debug)]
pub struct Call {
    pid: i32,
    stream: UnixStream,
}

impl Call {
    /// Connects to tapdisk `pid`'s socket in `dir`; every read and write waits at most
    /// `timeout`.
    pub fn connect(dir: &Path, pid: i32, timeout: Duration) -> Result<Self> {
        let stream = super::client::connect(dir, pid, timeout)?;
        Ok(Self { pid, stream })
    }

    fn lost(&self, what: &str, e: std::io::Error) -> Error {
        let pid = self.pid;
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => Error::os(
                format!("tapdisk {pid} did not {what} in time"),
                Errno::ETIMEDOUT,
            ),
            ErrorKind::UnexpectedEof => Error::Protocol(format!(
                "tapdisk {pid} closed the connection without answering"
            )),
            _ => Error::Protocol(format!("tapdisk {pid}: connection lost: {e}")),
        }
    }

    /// Sends `msg` and `trailer`.
    pub fn send(&mut self, msg: &Message, trailer: &[u8]) -> Result<()> {
        let mut buf = msg.as_bytes().to_vec();
        buf.extend_from_slice(trailer);
        self.stream
            .write_all(&buf)
            .map_err(|e| self.lost("take the request", e))
    }

    /// Reads one message.
    pub fn receive(&mut self) -> Result<Message> {
        let mut buf = [0u8; MESSAGE_SIZE];
        self.stream
            .read_exact(&mut buf)
            .map_err(|e| self.lost("answer", e))?;
        Ok(Message::from_bytes(buf))
    }

    /// Reads `n` bytes of payload.
    pub fn receive_payload(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        self.stream
            .read_exact(&mut buf)
            .map_err(|e| self.lost("send its payload", e))?;
        Ok(buf)
    }

    /// The answer as a result: an ERROR answer is [`Error::Remote`], an answer of another type
    /// than `expected` a protocol error.
    pub fn check(&self, answer: Message, expected: u16) -> Result<Message> {
        match answer.kind() {
            t if t == expected => Ok(answer),
            kind::ERROR => {
                let (errno, message) = answer.response();
                let errno = if errno > 0 { errno } else { libc::EIO };
                let message = if message.is_empty() {
                    crate::error::describe_errno(errno)
                } else {
                    message
                };
                Err(Error::Remote {
                    pid: self.pid,
                    errno,
                    message,
                })
            }
            t => Err(Error::Protocol(format!(
                "tapdisk {}: answered '{}' to a '{}' request",
                self.pid,
                kind_name(t),
                kind_name(expected.saturating_sub(1)),
            ))),
        }
    }

    /// Sends `msg` (and `trailer`), and reads its answer, of type `msg`'s + 1.
    pub fn request(mut self, msg: &Message, trailer: &[u8]) -> Result<Message> {
        self.send(msg, trailer)?;
        let answer = self.receive()?;
        self.check(answer, msg.kind() + 1)
    }

    /// LIST: the taps of the tapdisk (the stream up to its `count == 0` end).
    pub fn list(mut self) -> Result<Vec<ListEntry>> {
        self.send(&Message::new(kind::LIST, ALL_MINORS), &[])?;
        let mut taps = Vec::new();
        loop {
            let answer = self.receive()?;
            let answer = self.check(answer, kind::LIST_RSP)?;
            let entry = answer.list_entry();
            if entry.count <= 0 {
                return Ok(taps);
            }
            if taps.len() > 1 << 16 {
                return Err(Error::Protocol(format!(
                    "tapdisk {}: a LIST that does not end",
                    self.pid
                )));
            }
            taps.push(entry);
        }
    }

    /// STATS of tap `minor` (or of every tap, [`ALL_MINORS`]): the JSON text.
    pub fn stats(mut self, minor: u16) -> Result<String> {
        self.send(&Message::new(kind::STATS, minor), &[])?;
        let answer = self.receive()?;
        let answer = self.check(answer, kind::STATS_RSP)?;
        let length = answer.u64_at(offset::INFO_LENGTH);
        if length > 64 << 20 {
            return Err(Error::Protocol(format!(
                "tapdisk {}: {length} bytes of stats",
                self.pid
            )));
        }
        let payload = self.receive_payload(length as usize)?;
        Ok(String::from_utf8_lossy(&payload).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_matches_the_x86_64_header() {
        assert_eq!(MESSAGE_SIZE, 544);
        assert_eq!(UNION_SIZE, 536);
        assert_eq!(MAX_MINORS, 63);
        // params is the largest member: 530 bytes, padded to 532.
        assert_eq!(offset::PARAMS_SECONDARY + PATH_LENGTH - UNION_OFFSET, 530);
        assert_eq!(offset::PARAMS_PATH, 20);
        assert_eq!(offset::PARAMS_PRT_DEVNUM, 276);
        assert_eq!(offset::PARAMS_REQ_TIMEOUT, 280);
        assert_eq!(offset::PARAMS_SECONDARY, 282);
        assert_eq!(offset::LIST_PATH, 20);
        assert_eq!(offset::RESPONSE_MESSAGE, 12);
        assert_eq!(offset::INFO_LENGTH, 16);
        assert_eq!(
            offset::MINORS_LIST + 4 * MAX_MINORS - UNION_OFFSET,
            PATH_LENGTH
        );
    }

    #[test]
    fn messages_encode_at_their_offsets() {
        let m = Message::new(kind::PID, 7);
        assert_eq!(&m.as_bytes()[..4], &[3, 0, 7, 0]);
        assert!(m.as_bytes()[4..].iter().all(|&b| b == 0));

        let m = Message::pid_response(0, 0x1234_5678);
        assert_eq!(&m.as_bytes()[8..12], &[0x78, 0x56, 0x34, 0x12]);

        let m = Message::error(3, 16, "busy");
        assert_eq!(m.kind(), kind::ERROR);
        assert_eq!(&m.as_bytes()[8..12], &16i32.to_le_bytes());
        assert_eq!(&m.as_bytes()[12..17], b"busy\0");
        assert_eq!(m.response(), (16, "busy".into()));
        // Long messages are cut, on a character boundary.
        let long = "é".repeat(200);
        let m = Message::error(0, 5, &long);
        let (_, msg) = m.response();
        assert!(msg.len() <= 255 && long.starts_with(&msg));

        let m = Message::image_response(
            kind::OPEN_RSP,
            2,
            ImageInfo {
                sectors: 0x1_0000_0002,
                sector_size: 512,
                info: VDISK_READONLY,
            },
        );
        assert_eq!(&m.as_bytes()[8..16], &0x1_0000_0002u64.to_le_bytes());
        assert_eq!(&m.as_bytes()[16..20], &512u32.to_le_bytes());
        assert_eq!(&m.as_bytes()[20..24], &4u32.to_le_bytes());
        assert_eq!(m.image().sectors, 0x1_0000_0002);

        let e = ListEntry {
            count: 2,
            minor: 5,
            state: 0x2a,
            path: "aio:/x".into(),
        };
        let m = Message::list_response(0xffff, &e);
        assert_eq!(
            &m.as_bytes()[8..20],
            &[2, 0, 0, 0, 5, 0, 0, 0, 0x2a, 0, 0, 0]
        );
        assert_eq!(&m.as_bytes()[20..27], b"aio:/x\0");
        assert_eq!(m.list_entry(), e);

        let m = Message::stats_response(1, 300);
        assert_eq!(&m.as_bytes()[16..24], &300u64.to_le_bytes());
    }

    #[test]
    fn params_round_trip_and_unterminated_paths_are_einval() {
        let p = Params {
            flags: flag::RDONLY | flag::NO_O_DIRECT,
            devnum: 4,
            domid: 7,
            path: "aio:/var/tmp/a.img".into(),
            prt_devnum: 9,
            req_timeout: 120,
            secondary: "aio:/mirror".into(),
        };
        let mut m = Message::new(kind::OPEN, 4);
        m.set_params(&p).unwrap();
        assert_eq!(&m.as_bytes()[8..12], &0x202u32.to_le_bytes());
        assert_eq!(&m.as_bytes()[280..282], &120u16.to_le_bytes());
        assert_eq!(&m.as_bytes()[282..293], b"aio:/mirror");
        assert_eq!(m.params().unwrap(), p);

        let mut raw = *m.as_bytes();
        raw[offset::PARAMS_PATH..offset::PARAMS_PATH + PATH_LENGTH].fill(b'a');
        assert_eq!(
            Message::from_bytes(raw).params().unwrap_err(),
            Errno::EINVAL
        );
        let long = Params {
            path: "x".repeat(256),
            ..Default::default()
        };
        assert_eq!(m.set_params(&long).unwrap_err(), Errno::ENAMETOOLONG);
    }

    #[test]
    fn trailers_follow_open_and_resume_flags() {
        let mut m = Message::new(kind::OPEN, 0);
        assert_eq!(m.trailer().len(&[]), Some(0));
        m.set_u32(offset::PARAMS_FLAGS, flag::ADD_LOG);
        assert_eq!(m.trailer().len(&[]), Some(256));
        m.set_u32(offset::PARAMS_FLAGS, flag::ADD_LOG | flag::OPEN_ENCRYPTED);
        assert_eq!(m.trailer().len(&[0; 256]), None);
        let mut after = vec![0; 256];
        after.push(32);
        assert_eq!(m.trailer().len(&after), Some(256 + 1 + 32));
        m.set_u32(offset::PARAMS_FLAGS, flag::OPEN_ENCRYPTED);
        assert_eq!(m.trailer().len(&[64]), Some(65));
        // RESUME carries a log path, never a key; other messages nothing.
        let mut r = Message::new(kind::RESUME, 0);
        r.set_u32(offset::PARAMS_FLAGS, flag::ADD_LOG | flag::OPEN_ENCRYPTED);
        assert_eq!(r.trailer().len(&[]), Some(256));
        let mut c = Message::new(kind::CLOSE, 0);
        c.set_u32(offset::PARAMS_FLAGS, flag::ADD_LOG);
        assert_eq!(c.trailer().len(&[]), Some(0));
    }

    #[test]
    fn kind_names() {
        assert_eq!(kind_name(kind::PID), "pid");
        assert_eq!(kind_name(kind::EXIT), "exit");
        assert_eq!(kind_name(0), "unknown");
        assert_eq!(kind_name(999), "unknown");
    }
}
