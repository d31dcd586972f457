//! The original binary control protocol: what each `tapdisk_message_t` request does.
//!
//! The answers and errnos are the original tapdisk's: an ERROR answer carries a positive errno
//! (and, unlike the original, a message saying what went wrong). What this tapdisk does not do
//! (the Xen userspace block backend, encryption, changed-block logs, caches, mirrors, parent
//! reuse) is refused with `EOPNOTSUPP` and a message naming the feature; a message that is no
//! request, or malformed, is refused with `EINVAL`.

use std::time::Duration;

use blktap::ctl::binary::{
    flag, kind, kind_name, offset, ImageInfo, ListEntry, Message, Params, ALL_MINORS, MAX_MINORS,
    VDISK_READONLY,
};
use blktap::ctl::{xenstats, CtlResponse, TapState};
use blktap::tap::OpenArgs;
use blktap::{Error, Result};
use nix::errno::Errno;

use crate::logging::log;
use crate::requests::{Handled, Requests, TapHost};
use crate::tap::Tap;

/// The outcome of a binary request.
#[derive(Debug)]
pub enum Answer {
    /// The bytes to send (one or more messages, and a payload).
    Now(Vec<u8>),
    /// A pause of this tap is draining: the answer comes once it is paused (or failed).
    Later(u32),
}

/// The answer to a PAUSE that had to wait, once it is known.
pub fn pause_answer(minor: u32, response: &CtlResponse) -> Message {
    let cookie = minor as u16;
    if response.ok {
        return Message::new(kind::PAUSE_RSP, cookie);
    }
    Message::error(
        cookie,
        response.errno.unwrap_or(libc::EIO),
        response.error.as_deref().unwrap_or("pause failed"),
    )
}

/// The open flags this tapdisk does not do, with the feature each stands for.
const UNSUPPORTED_FLAGS: [(u32, &str); 8] = [
    (flag::ADD_CACHE, "the read cache (ADD_CACHE)"),
    (flag::VHD_INDEX, "VHD index images (VHD_INDEX)"),
    (
        flag::ADD_LOG,
        "the changed-block log (ADD_LOG, tap-ctl -C/-c)",
    ),
    (
        flag::ADD_LCACHE,
        "the local read cache (ADD_LCACHE, tap-ctl -r)",
    ),
    (
        flag::REUSE_PRT,
        "reusing another tap's parent chain (REUSE_PRT, tap-ctl -e)",
    ),
    (
        flag::SECONDARY,
        "the secondary mirror (SECONDARY, tap-ctl -2)",
    ),
    (flag::STANDBY, "the standby secondary (STANDBY, tap-ctl -s)"),
    (
        flag::OPEN_ENCRYPTED,
        "encrypted images (OPEN_ENCRYPTED, tap-ctl -E)",
    ),
];

/// `EOPNOTSUPP` for the first flag in `flags` this tapdisk does not do.
fn check_flags(flags: u32, what: &str) -> Result<()> {
    for (bit, feature) in UNSUPPORTED_FLAGS {
        if flags & bit != 0 {
            return Err(Error::os(
                format!("{what}: {feature} is not supported by this tapdisk"),
                Errno::EOPNOTSUPP,
            ));
        }
    }
    let unknown = flags & !flag::KNOWN;
    if unknown != 0 {
        return Err(Error::os(
            format!("{what}: unknown flags {unknown:#x}"),
            Errno::EINVAL,
        ));
    }
    Ok(())
}

/// The binary requests, carried out on any [`TapHost`] (as the JSON ones are, through
/// [`Requests`]).
pub trait BinaryRequests: Requests {
    /// Answers one binary request (or defers the answer).
    fn handle_binary(&mut self, msg: &Message, trailer: &[u8]) -> Answer {
        let cookie = msg.cookie();
        match self.binary_request(msg, trailer) {
            Ok(answer) => answer,
            Err(e) => {
                log!("'{}' request for tap {cookie}: {e}", kind_name(msg.kind()));
                Answer::Now(
                    Message::error(cookie, e.errno(), &e.to_string())
                        .as_bytes()
                        .to_vec(),
                )
            }
        }
    }

    fn binary_request(&mut self, msg: &Message, _trailer: &[u8]) -> Result<Answer> {
        let cookie = msg.cookie();
        let minor = u32::from(cookie);
        let now = |m: Message| Ok(Answer::Now(m.as_bytes().to_vec()));
        let simple = |t: u16| now(Message::new(t, cookie));
        match msg.kind() {
            kind::PID => now(Message::pid_response(cookie, std::process::id() as i32)),
            kind::ATTACH => {
                self.handle_json_like(|d| d.attach_tap(minor))?;
                simple(kind::ATTACH_RSP)
            }
            kind::DETACH => {
                self.handle_json_like(|d| d.detach_tap(minor))?;
                simple(kind::DETACH_RSP)
            }
            kind::OPEN => {
                let params = msg
                    .params()
                    .map_err(|e| Error::os("open: the image path is not NUL-terminated", e))?;
                let info = self.binary_open(minor, &params)?;
                now(Message::image_response(kind::OPEN_RSP, cookie, info))
            }
            kind::CLOSE => {
                self.handle_json_like(|d| d.close_tap(minor, false))?;
                simple(kind::CLOSE_RSP)
            }
            kind::FORCE_SHUTDOWN => {
                self.handle_json_like(|d| d.close_tap(minor, true))?;
                simple(kind::CLOSE_RSP)
            }
            kind::PAUSE => match self.pause_tap(minor)? {
                Handled::Now(_) => simple(kind::PAUSE_RSP),
                Handled::Later(m) => Ok(Answer::Later(m)),
            },
            kind::RESUME => {
                let params = msg
                    .params()
                    .map_err(|e| Error::os("resume: the image path is not NUL-terminated", e))?;
                check_flags(
                    params.flags & !(flag::RDONLY | flag::SHARED | flag::NO_O_DIRECT),
                    "resume",
                )?;
                let path = (!params.path.is_empty()).then_some(params.path.as_str());
                self.handle_json_like(|d| d.unpause_tap(minor, path))?;
                simple(kind::RESUME_RSP)
            }
            kind::LIST => now_list(self.list_entries(), cookie),
            kind::LIST_MINORS => {
                let mut m = Message::new(kind::LIST_MINORS_RSP, cookie);
                let minors: Vec<u32> = self.taps().keys().copied().take(MAX_MINORS).collect();
                m.set_i32(offset::MINORS_COUNT, minors.len() as i32);
                for (i, minor) in minors.iter().enumerate() {
                    m.set_i32(offset::MINORS_LIST + 4 * i, *minor as i32);
                }
                now(m)
            }
            kind::STATS => {
                let json = if cookie == ALL_MINORS {
                    let all: Vec<_> = self
                        .taps()
                        .values()
                        .map(|t| xenstats::tap_stats(&t.stats()))
                        .collect();
                    serde_json::Value::Array(all)
                } else {
                    xenstats::tap_stats(&self.existing_tap(minor)?.stats())
                };
                let text = json.to_string();
                let mut bytes = Message::stats_response(cookie, text.len() as u64)
                    .as_bytes()
                    .to_vec();
                bytes.extend_from_slice(text.as_bytes());
                Ok(Answer::Now(bytes))
            }
            kind::DISK_INFO => {
                let stats = self.existing_tap(minor)?.stats();
                now(Message::image_response(
                    kind::DISK_INFO_RSP,
                    cookie,
                    ImageInfo {
                        sectors: stats.sectors,
                        sector_size: 512,
                        info: if stats.readonly { VDISK_READONLY } else { 0 },
                    },
                ))
            }
            kind::XENBLKIF_CONNECT | kind::XENBLKIF_DISCONNECT => Err(Error::os(
                format!(
                    "'{}': the Xen userspace block backend is not supported: this tapdisk \
                     serves blktap2 kernel rings only",
                    kind_name(msg.kind())
                ),
                Errno::EOPNOTSUPP,
            )),
            t => Err(Error::os(
                format!(
                    "unsupported message type {t} ('{}'): not a request this tapdisk takes",
                    kind_name(t)
                ),
                Errno::EINVAL,
            )),
        }
    }

    /// Runs one of the JSON protocol's handlers, for its effect.
    fn handle_json_like(&mut self, f: impl FnOnce(&mut Self) -> Result<CtlResponse>) -> Result<()> {
        f(self).map(drop)
    }

    fn existing_tap(&self, minor: u32) -> Result<&Tap> {
        self.taps().get(&minor).ok_or_else(|| {
            Error::os(
                format!(
                    "tap {minor} is not attached to tapdisk {}",
                    std::process::id()
                ),
                Errno::ENODEV,
            )
        })
    }

    /// OPEN: the flags checked, then the image opened as the JSON `open` does.
    fn binary_open(&mut self, minor: u32, params: &Params) -> Result<ImageInfo> {
        check_flags(params.flags, "open")?;
        if params.path.is_empty() {
            return Err(Error::os("open: no image given", Errno::EINVAL));
        }
        let Some(tap) = self.taps().get(&minor) else {
            return Err(Error::os(
                format!("open: tap {minor} is not attached"),
                Errno::EINVAL,
            ));
        };
        if tap.has_disk() {
            return Err(Error::os(
                format!("open: tap {minor} already has an image open"),
                Errno::EALREADY,
            ));
        }
        let args = OpenArgs {
            params: &params.path,
            readonly: params.flags & flag::RDONLY != 0,
            no_direct: params.flags & flag::NO_O_DIRECT != 0,
            deadline: (params.req_timeout > 0)
                .then(|| Duration::from_secs(u64::from(params.req_timeout))),
            ..Default::default()
        };
        self.open_tap(minor, &args)?;
        let stats = self.existing_tap(minor)?.stats();
        Ok(ImageInfo {
            sectors: stats.sectors,
            sector_size: 512,
            info: if stats.readonly { VDISK_READONLY } else { 0 },
        })
    }

    /// The taps as LIST answers them, counting down to 1.
    fn list_entries(&self) -> Vec<ListEntry> {
        let n = self.taps().len() as i32;
        self.taps()
            .values()
            .enumerate()
            .map(|(i, tap)| {
                let e = tap.entry();
                ListEntry {
                    count: n - i as i32,
                    minor: e.minor as i32,
                    state: state_bits(e.state) as i32,
                    path: e.params.unwrap_or_default(),
                }
            })
            .collect()
    }
}

impl<H: TapHost + ?Sized> BinaryRequests for H {}

/// A tap's state as LIST reports it.
fn state_bits(state: TapState) -> u32 {
    state.code()
}

/// The LIST stream: one answer per tap, then `count 0, minor -1, path ""`.
fn now_list(entries: Vec<ListEntry>, cookie: u16) -> Result<Answer> {
    let mut bytes = Vec::new();
    for e in &entries {
        bytes.extend_from_slice(Message::list_response(cookie, e).as_bytes());
    }
    let end = ListEntry {
        count: 0,
        minor: -1,
        state: 0,
        path: String::new(),
    };
    bytes.extend_from_slice(Message::list_response(cookie, &end).as_bytes());
    Ok(Answer::Now(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_flags_name_their_feature() {
        assert!(check_flags(flag::RDONLY | flag::NO_O_DIRECT | flag::SHARED, "open").is_ok());
        for (bit, feature) in UNSUPPORTED_FLAGS {
            let e = check_flags(bit | flag::RDONLY, "open").unwrap_err();
            assert_eq!(e.errno(), libc::EOPNOTSUPP);
            assert!(e.to_string().contains(feature), "{e}");
        }
        assert_eq!(
            check_flags(0x10000, "open").unwrap_err().errno(),
            libc::EINVAL
        );
    }

    #[test]
    fn a_failed_pause_answers_an_error() {
        let ok = pause_answer(3, &CtlResponse::ok());
        assert_eq!((ok.kind(), ok.cookie()), (kind::PAUSE_RSP, 3));
        let e = Error::os("x", Errno::ESHUTDOWN);
        let failed = pause_answer(3, &CtlResponse::failed(&e));
        assert_eq!(failed.kind(), kind::ERROR);
        assert_eq!(failed.response().0, libc::ESHUTDOWN);
    }
}
