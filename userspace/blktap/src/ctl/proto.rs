//! The messages of the tapdisk control protocol.
//!
//! Newline-delimited JSON over a unix stream socket: the client writes one request per line, the
//! tapdisk answers each with one response line, in order. Examples:
//!
//! ```text
//! {"op":"attach","minor":0}                                  -> {"ok":true}
//! {"op":"open","minor":0,"params":"aio:/img","readonly":false} -> {"ok":true}
//! {"op":"close","minor":3}  -> {"ok":false,"errno":19,"error":"tap 3 is not attached to tapdisk 41"}
//! {"op":"list"}  -> {"ok":true,"taps":[{"minor":0,"state":"open","params":"aio:/img","readonly":false}]}
//! {"op":"stats","minor":0}  -> {"ok":true,"stats":{"minor":0,"state":"open",...}}
//! ```

use serde::{Deserialize, Serialize};

use crate::server::IoStats;
use crate::{Error, Result};

/// Where tapdisks put their control sockets, `ctl<pid>`.
pub const CTL_DIR: &str = "/var/run/blktap-control";

/// A request to a tapdisk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum CtlRequest {
    /// Open and map the ring of tap `minor`.
    Attach {
        /// The tap.
        minor: u32,
    },
    /// Unmap and close the ring of tap `minor` (which must not be open).
    Detach {
        /// The tap.
        minor: u32,
    },
    /// Open image `params` (`type:path`) and create the tap's disk.
    Open {
        /// The tap.
        minor: u32,
        /// The image, `type:path`.
        params: String,
        /// Refuse writes, and create a read-only disk.
        #[serde(default)]
        readonly: bool,
        /// Create the disk with `RECOVERY` (it outlives this tapdisk).
        #[serde(default, skip_serializing_if = "is_false")]
        recovery: bool,
        /// Take over the tap's existing disk (a new tapdisk after one died): no
        /// `CREATE_DEVICE`; the image must have the disk's size.
        #[serde(default, skip_serializing_if = "is_false")]
        recover: bool,
        /// Never open the image with `O_DIRECT`.
        #[serde(default, skip_serializing_if = "is_false")]
        no_direct: bool,
        /// This tap's request deadline in seconds, instead of the tapdisk's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout: Option<u64>,
    },
    /// Remove the tap's disk and close its image.
    Close {
        /// The tap.
        minor: u32,
    },
    /// Pause the tap: answered once every request is answered and the image is closed.
    Pause {
        /// The tap.
        minor: u32,
    },
    /// Resume a paused tap: open its image again (or `params`, of the same size).
    Unpause {
        /// The tap.
        minor: u32,
        /// Another image to open, `type:path`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        params: Option<String>,
    },
    /// The tap's I/O counters.
    Stats {
        /// The tap.
        minor: u32,
    },
    /// Every tap of this tapdisk.
    List,
}

/// The state of a tap inside a tapdisk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TapState {
    /// The ring is mapped; no image.
    Attached,
    /// An image is open and the disk exists: requests are served.
    Open,
    /// The ring broke the protocol and is no longer served; close and detach it.
    Dead,
    /// Pausing: no new requests; the ones handed out are being answered.
    Pausing,
    /// Paused: the image is closed, the disk kept; requests wait in the kernel.
    Paused,
}

impl TapState {
    /// The number `tap-ctl list` prints, the original tapdisk's state bits: 0 while serving,
    /// `0x1` (dead), `0x2` (no image: closed), `0x10` (pause requested), `0x2a` (paused: `0x20`
    /// paused, `0x8` quiesced, `0x2` image closed, as a paused original tapdisk reports).
    pub fn code(self) -> u32 {
        match self {
            TapState::Open => 0,
            TapState::Dead => 0x1,
            TapState::Attached => 0x2,
            TapState::Pausing => 0x10,
            TapState::Paused => 0x2a,
        }
    }
}

/// One tap in a `list` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapEntry {
    /// The tap.
    pub minor: u32,
    /// Its state.
    pub state: TapState,
    /// The image (`type:path`), when one is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<String>,
    /// Whether the image is open read-only.
    #[serde(default)]
    pub readonly: bool,
}

/// A tap's counters, the `stats` answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapStats {
    /// The tap.
    pub minor: u32,
    /// Its state.
    pub state: Option<TapState>,
    /// The image (`type:path`), when one is open.
    pub image: Option<String>,
    /// Image size in bytes.
    pub size: u64,
    /// Disk capacity in 512-byte sectors.
    pub sectors: u64,
    /// Whether the disk is read-only.
    pub readonly: bool,
    /// The I/O counters (inline: `reads`, `writes`, ...).
    #[serde(flatten)]
    pub io: IoStats,
    /// Requests being served.
    pub in_flight: u64,
    /// Bytes of storage the image takes up (a file's allocated blocks, a ram disk's memory),
    /// when known.
    #[serde(default)]
    pub allocated_bytes: Option<u64>,
    /// The `CREATE_DEVICE` flags beyond `RO` the disk got (0x4 flush, 0x8 discard, 0x20 FUA,
    /// 0x40 recovery).
    #[serde(default)]
    pub device_flags: u64,
    /// The layers below the image's top one, top first (a stack's; empty for one image).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<crate::backend::LayerStats>,
}

/// A tapdisk's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtlResponse {
    /// Whether the request succeeded.
    pub ok: bool,
    /// On failure, the errno.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
    /// On failure, what went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The `list` answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taps: Option<Vec<TapEntry>>,
    /// The `stats` answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<TapStats>,
}

impl CtlResponse {
    /// Success, with nothing to say.
    pub fn ok() -> Self {
        Self {
            ok: true,
            ..Default::default()
        }
    }

    /// Failure: `error`'s errno and message.
    pub fn failed(error: &Error) -> Self {
        Self {
            ok: false,
            errno: Some(error.errno()),
            error: Some(error.to_string()),
            ..Default::default()
        }
    }

    /// The answer as a result: `Error::Remote` unless `ok`.
    pub fn into_result(self, pid: i32) -> Result<Self> {
        if self.ok {
            return Ok(self);
        }
        Err(Error::Remote {
            pid,
            errno: self.errno.filter(|&e| e > 0).unwrap_or(libc::EIO),
            message: self.error.unwrap_or_else(|| "failed".into()),
        })
    }

    /// The response as one line of JSON, with its newline.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("responses always serialize");
        line.push('\n');
        line
    }
}

impl CtlRequest {
    /// Parses one request line (without its newline).
    pub fn from_line(line: &str) -> Result<Self> {
        serde_json::from_str(line.trim()).map_err(|e| Error::invalid(format!("bad request: {e}")))
    }

    /// The request as one line of JSON, with its newline.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("requests always serialize");
        line.push('\n');
        line
    }

    /// The tap the request is about, if any.
    pub fn minor(&self) -> Option<u32> {
        match *self {
            CtlRequest::Attach { minor }
            | CtlRequest::Detach { minor }
            | CtlRequest::Open { minor, .. }
            | CtlRequest::Close { minor }
            | CtlRequest::Pause { minor }
            | CtlRequest::Unpause { minor, .. }
            | CtlRequest::Stats { minor } => Some(minor),
            CtlRequest::List => None,
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_documented_wire_form() {
        let cases = [
            (
                CtlRequest::Attach { minor: 0 },
                r#"{"op":"attach","minor":0}"#,
            ),
            (
                CtlRequest::Detach { minor: 2 },
                r#"{"op":"detach","minor":2}"#,
            ),
            (
                CtlRequest::Open {
                    minor: 1,
                    params: "aio:/var/tmp/d.img".into(),
                    readonly: true,
                    recovery: false,
                    recover: false,
                    no_direct: false,
                    timeout: None,
                },
                r#"{"op":"open","minor":1,"params":"aio:/var/tmp/d.img","readonly":true}"#,
            ),
            (
                CtlRequest::Open {
                    minor: 1,
                    params: "ram:1M".into(),
                    readonly: false,
                    recovery: true,
                    recover: false,
                    no_direct: false,
                    timeout: None,
                },
                r#"{"op":"open","minor":1,"params":"ram:1M","readonly":false,"recovery":true}"#,
            ),
            (
                CtlRequest::Open {
                    minor: 1,
                    params: "ram:1M".into(),
                    readonly: false,
                    recovery: false,
                    recover: true,
                    no_direct: false,
                    timeout: None,
                },
                r#"{"op":"open","minor":1,"params":"ram:1M","readonly":false,"recover":true}"#,
            ),
            (
                CtlRequest::Close { minor: 1 },
                r#"{"op":"close","minor":1}"#,
            ),
            (
                CtlRequest::Pause { minor: 1 },
                r#"{"op":"pause","minor":1}"#,
            ),
            (
                CtlRequest::Unpause {
                    minor: 1,
                    params: None,
                },
                r#"{"op":"unpause","minor":1}"#,
            ),
            (
                CtlRequest::Unpause {
                    minor: 1,
                    params: Some("aio:/b".into()),
                },
                r#"{"op":"unpause","minor":1,"params":"aio:/b"}"#,
            ),
            (
                CtlRequest::Stats { minor: 9 },
                r#"{"op":"stats","minor":9}"#,
            ),
            (CtlRequest::List, r#"{"op":"list"}"#),
        ];
        for (req, wire) in cases {
            assert_eq!(req.to_line(), format!("{wire}\n"));
            assert_eq!(CtlRequest::from_line(wire).unwrap(), req);
        }
        // readonly may be left out.
        assert_eq!(
            CtlRequest::from_line(r#"{"op":"open","minor":1,"params":"ram:1M"}"#).unwrap(),
            CtlRequest::Open {
                minor: 1,
                params: "ram:1M".into(),
                readonly: false,
                recovery: false,
                recover: false,
                no_direct: false,
                timeout: None,
            }
        );
        assert_eq!(CtlRequest::List.minor(), None);
        assert_eq!(CtlRequest::Close { minor: 4 }.minor(), Some(4));
    }

    #[test]
    fn malformed_requests_are_einval() {
        for bad in [
            "",
            "{",
            r#"{"op":"frobnicate","minor":0}"#,
            r#"{"op":"attach"}"#,
            r#"{"op":"attach","minor":-1}"#,
            r#"{"op":"attach","minor":0,"extra":1}"#,
        ] {
            let e = CtlRequest::from_line(bad).unwrap_err();
            assert_eq!(e.errno(), 22, "{bad}");
        }
    }

    #[test]
    fn responses_round_trip() {
        assert_eq!(CtlResponse::ok().to_line(), "{\"ok\":true}\n");
        let e = Error::os("close tap 3", nix::errno::Errno::EBUSY);
        let r = CtlResponse::failed(&e);
        assert_eq!(
            r.to_line(),
            "{\"ok\":false,\"errno\":16,\"error\":\"close tap 3: EBUSY (Device or resource busy)\"}\n"
        );
        let back: CtlResponse = serde_json::from_str(&r.to_line()).unwrap();
        assert_eq!(back, r);
        let err = back.into_result(77).unwrap_err();
        assert_eq!(err.errno(), 16);
        assert_eq!(
            err.to_string(),
            "tapdisk 77: close tap 3: EBUSY (Device or resource busy)"
        );

        let list = CtlResponse {
            taps: Some(vec![
                TapEntry {
                    minor: 0,
                    state: TapState::Open,
                    params: Some("ram:64M".into()),
                    readonly: false,
                },
                TapEntry {
                    minor: 1,
                    state: TapState::Attached,
                    params: None,
                    readonly: false,
                },
            ]),
            ..CtlResponse::ok()
        };
        let line = list.to_line();
        assert!(line.contains(r#"{"minor":1,"state":"attached","readonly":false}"#));
        let back: CtlResponse = serde_json::from_str(&line).unwrap();
        assert_eq!(back.clone().into_result(1).unwrap(), list);

        let stats = CtlResponse {
            stats: Some(TapStats {
                minor: 0,
                state: Some(TapState::Open),
                image: Some("null:1G".into()),
                size: 1 << 30,
                sectors: 1 << 21,
                io: IoStats {
                    reads: 3,
                    flushes: 2,
                    discarded_bytes: 4096,
                    retries: 1,
                    ..Default::default()
                },
                allocated_bytes: Some(8192),
                ..Default::default()
            }),
            ..CtlResponse::ok()
        };
        let line = stats.to_line();
        // The counters are flat in the stats object, not nested.
        for field in [
            r#""reads":3,"#,
            r#""flushes":2,"#,
            r#""discarded_bytes":4096,"#,
            r#""retries":1,"#,
            r#""fua_writes":0,"#,
            r#""discards":0,"#,
            r#""allocated_bytes":8192"#,
        ] {
            assert!(line.contains(field), "{field} in {line}");
        }
        assert!(!line.contains("\"io\""), "{line}");
        let back: CtlResponse = serde_json::from_str(&line).unwrap();
        assert_eq!(back, stats);
        // A failure without an errno still fails, with EIO.
        let bare: CtlResponse = serde_json::from_str(r#"{"ok":false}"#).unwrap();
        assert_eq!(bare.into_result(1).unwrap_err().errno(), libc::EIO);
    }

    #[test]
    fn state_codes_follow_the_original() {
        assert_eq!(TapState::Open.code(), 0);
        assert_eq!(TapState::Dead.code(), 1);
        assert_eq!(TapState::Attached.code(), 2);
        assert_eq!(TapState::Pausing.code(), 0x10);
        assert_eq!(TapState::Paused.code(), 0x2a);
    }
}
