//! The client side: NBD URIs, the handshake, and reading a server's replies.
//!
//! [`connect`] opens a connection to an [`NbdUri`] and negotiates fixed newstyle, structured
//! replies if the server offers them, and the export with `NBD_OPT_GO` (`NBD_OPT_EXPORT_NAME` if
//! the server does not know `NBD_OPT_GO`). [`read_reply`] reads one reply (simple, or one
//! structured chunk) and checks it against the request it answers: a reply for a cookie never sent,
//! data outside the request's range, lengths over their bounds, unknown chunk types: each is a
//! [`ProtoError`], never a panic or an unbounded allocation.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::proto::{
    chunk, info, opt, put_lstring, read_payload, read_u16, read_u32, read_u64, rep, tflag,
    write_option, Cursor, ProtoError, ReplyHeader, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, MAX_PAYLOAD, NBDMAGIC, OPT_REPLY_MAGIC,
    REPLY_FLAG_DONE,
};

/// The port of `nbd://host/` URIs without one.
pub const DEFAULT_PORT: u16 = 10809;
/// Longest option reply accepted.
const MAX_OPT_REPLY: u32 = 64 << 10;

/// Where a server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A TCP host and port.
    Tcp(String, u16),
    /// A unix socket.
    Unix(PathBuf),
}

/// An NBD URI: `nbd://host[:port]/export` or `nbd+unix:///export?socket=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// The server.
    pub address: Address,
    /// The export's name (the path without its leading `/`, percent-decoded).
    pub export: String,
}

/// An unusable NBD URI.
#[derive(Debug, thiserror::Error)]
#[error("NBD URI {uri:?}: {why}")]
pub struct UriError {
    uri: String,
    why: String,
}

impl FromStr for NbdUri {
    type Err = UriError;

    fn from_str(s: &str) -> Result<Self, UriError> {
        let bad = |why: &str| UriError {
            uri: s.into(),
            why: why.into(),
        };
        let url = url::Url::parse(s).map_err(|e| bad(&e.to_string()))?;
        if !url.username().is_empty() || url.password().is_some() || url.fragment().is_some() {
            return Err(bad("user names, passwords and fragments are not supported"));
        }
        let path = url.path();
        let export = path.strip_prefix('/').unwrap_or(path);
        let export = percent_decode(export).ok_or_else(|| bad("bad percent-encoding"))?;
        let mut socket = None;
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "socket" if socket.is_none() => socket = Some(PathBuf::from(v.as_ref())),
                _ => return Err(bad(&format!("unsupported query parameter {k:?}"))),
            }
        }
        let address = match url.scheme() {
            "nbd" => {
                if socket.is_some() {
                    return Err(bad("socket= is for nbd+unix:"));
                }
                let host = url.host_str().filter(|h| !h.is_empty());
                let host = host.ok_or_else(|| bad("no host"))?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                Address::Tcp(host.into(), url.port().unwrap_or(DEFAULT_PORT))
            }
            "nbd+unix" => {
                if url.host_str().is_some_and(|h| !h.is_empty()) || url.port().is_some() {
                    return Err(bad("nbd+unix: takes no host"));
                }
                Address::Unix(socket.ok_or_else(|| bad("nbd+unix: needs ?socket=PATH"))?)
            }
            "nbds" | "nbds+unix" => return Err(bad("TLS is not supported")),
            other => return Err(bad(&format!("unknown scheme {other:?} (nbd, nbd+unix)"))),
        };
        Ok(NbdUri { address, export })
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.address {
            Address::Tcp(host, port) if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{}", self.export)
            }
            Address::Tcp(host, port) => write!(f, "nbd://{host}:{port}/{}", self.export),
            Address::Unix(path) => {
                write!(f, "nbd+unix:///{}?socket={}", self.export, path.display())
            }
        }
    }
}

/// Decodes `%XX` escapes (the url crate leaves paths encoded).
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A connection to a server, of either kind.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// A unix socket.
    Unix(UnixStream),
}

impl Stream {
    /// Another handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Shuts both directions down (a reader blocked on it returns).
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Sets (or clears) the read timeout.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write_vectored(bufs),
            Stream::Unix(s) => (&*s).write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An export in transmission.
#[derive(Debug)]
pub struct Connection {
    /// The connection.
    pub stream: Stream,
    /// Size of the export in bytes.
    pub size: u64,
    /// Its transmission flags.
    pub flags: u16,
    /// Whether structured replies were negotiated.
    pub structured: bool,
    /// The largest request the server takes (its maximum block size, at most
    /// [`MAX_PAYLOAD`]).
    pub max_request: u32,
}

impl Connection {
    /// Whether the server said it has transmission flag `bit`.
    pub fn has(&self, bit: u16) -> bool {
        self.flags & tflag::HAS_FLAGS != 0 && self.flags & bit != 0
    }
}

/// Connects to `uri` and negotiates; each step of the handshake must come within `timeout`.
pub fn connect(uri: &NbdUri, timeout: Duration) -> Result<Connection, ProtoError> {
    let stream = match &uri.address {
        Address::Unix(path) => Stream::Unix(UnixStream::connect(path)?),
        Address::Tcp(host, port) => {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            let mut found = None;
            for a in (host.as_str(), *port).to_socket_addrs()? {
                match TcpStream::connect_timeout(&a, timeout) {
                    Ok(s) => {
                        found = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let s = found.ok_or(last)?;
            s.set_nodelay(true)?;
            Stream::Tcp(s)
        }
    };
    stream.set_read_timeout(Some(timeout))?;
    let c = handshake(stream, &uri.export)?;
    c.stream.set_read_timeout(None)?;
    Ok(c)
}

/// Reads one option reply to `option`: its type and data.
fn opt_reply(r: &mut &Stream, option: u32) -> Result<(u32, Vec<u8>), ProtoError> {
    let magic = read_u64(r)?;
    if magic != OPT_REPLY_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "option reply",
            got: magic,
        });
    }
    let got = read_u32(r)?;
    if got != option {
        return Err(ProtoError::violation(format!(
            "reply to option {got} while waiting for option {option}"
        )));
    }
    let typ = read_u32(r)?;
    let len = read_u32(r)?;
    let data = read_payload(r, "option reply", len, MAX_OPT_REPLY)?;
    Ok((typ, data))
}

fn refused(what: &'static str, code: u32, data: &[u8]) -> ProtoError {
    ProtoError::Refused {
        what,
        code,
        message: String::from_utf8_lossy(&data[..data.len().min(256)]).into_owned(),
    }
}

fn handshake(stream: Stream, export: &str) -> Result<Connection, ProtoError> {
    let mut s = &stream;
    let magic = read_u64(&mut s)?;
    if magic != NBDMAGIC {
        return Err(ProtoError::BadMagic {
            what: "server greeting",
            got: magic,
        });
    }
    let magic = read_u64(&mut s)?;
    if magic != IHAVEOPT {
        return Err(ProtoError::violation(format!(
            "not a newstyle server (magic {magic:#x}); oldstyle is not supported"
        )));
    }
    let gflags = read_u16(&mut s)?;
    if gflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ProtoError::violation(
            "the server is not fixed newstyle".to_string(),
        ));
    }
    let no_zeroes = gflags & FLAG_NO_ZEROES != 0;
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes())?;

    write_option(&mut s, opt::STRUCTURED_REPLY, &[])?;
    let (typ, data) = opt_reply(&mut s, opt::STRUCTURED_REPLY)?;
    let structured = match typ {
        rep::ACK => true,
        t if t & rep::ERR != 0 => false,
        t => {
            return Err(ProtoError::violation(format!(
                "reply type {t} to NBD_OPT_STRUCTURED_REPLY ({} bytes)",
                data.len()
            )))
        }
    };

    let mut go = Vec::new();
    put_lstring(&mut go, export);
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    write_option(&mut s, opt::GO, &go)?;
    let mut export_info = None;
    let mut max_request = MAX_PAYLOAD;
    loop {
        let (typ, data) = opt_reply(&mut s, opt::GO)?;
        match typ {
            rep::INFO => {
                let mut c = Cursor::new(&data, "NBD_REP_INFO");
                match c.u16()? {
                    info::EXPORT => {
                        let size = c.u64()?;
                        let flags = c.u16()?;
                        c.finish()?;
                        export_info = Some((size, flags));
                    }
                    info::BLOCK_SIZE => {
                        let (_min, _pref, max) = (c.u32()?, c.u32()?, c.u32()?);
                        c.finish()?;
                        if max == 0 {
                            return Err(ProtoError::violation("maximum block size 0"));
                        }
                        max_request = max.min(MAX_PAYLOAD);
                    }
                    // Unrequested or unknown information is ignored.
                    _ => {}
                }
            }
            rep::ACK => break,
            rep::ERR_UNSUP => {
                // A server without NBD_OPT_GO: the old way, which cannot report errors.
                write_option(&mut s, opt::EXPORT_NAME, export.as_bytes())?;
                let size = read_u64(&mut s)?;
                let flags = read_u16(&mut s)?;
                if !no_zeroes {
                    let mut z = [0u8; 124];
                    s.read_exact(&mut z)?;
                }
                export_info = Some((size, flags));
                break;
            }
            t if t & rep::ERR != 0 => return Err(refused("NBD_OPT_GO", t, &data)),
            t => {
                return Err(ProtoError::violation(format!(
                    "reply type {t} to NBD_OPT_GO"
                )))
            }
        }
    }
    let (size, flags) = export_info.ok_or_else(|| {
        ProtoError::violation("NBD_OPT_GO acknowledged without the export's size")
    })?;
    Ok(Connection {
        stream,
        size,
        flags,
        structured,
        max_request,
    })
}

/// What the client knows of a request, to check its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Whether it is a read (a successful simple reply carries its data).
    pub read: bool,
    /// Its offset.
    pub offset: u64,
    /// Its length.
    pub length: u32,
}

/// One reply or reply chunk, checked.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Data for a read, at `offset` (inside the request's range).
    Data {
        /// The request.
        cookie: u64,
        /// Where on the export.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
        /// The last chunk.
        done: bool,
    },
    /// Zeros for a read.
    Hole {
        /// The request.
        cookie: u64,
        /// Where on the export.
        offset: u64,
        /// How many bytes.
        length: u32,
        /// The last chunk.
        done: bool,
    },
    /// Success or failure without data (`error` 0 for success).
    Status {
        /// The request.
        cookie: u64,
        /// 0 or the protocol's error number.
        error: u32,
        /// The last chunk.
        done: bool,
    },
}

/// Reads one reply and checks it against the request `lookup(cookie)` names (none: an unknown
/// cookie, which is a protocol violation).
pub fn read_reply(
    r: &mut impl Read,
    lookup: impl FnOnce(u64) -> Option<Sent>,
) -> Result<Reply, ProtoError> {
    let header = ReplyHeader::read(r)?;
    let cookie = match header {
        ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => cookie,
    };
    let sent = lookup(cookie)
        .ok_or_else(|| ProtoError::violation(format!("reply for unknown cookie {cookie:#x}")))?;
    let inside = |offset: u64, len: u64| {
        offset >= sent.offset
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= sent.offset.saturating_add(u64::from(sent.length)))
    };
    match header {
        ReplyHeader::Simple { error, .. } => {
            if error == 0 && sent.read {
                let data = read_payload(r, "read reply", sent.length, MAX_PAYLOAD)?;
                return Ok(Reply::Data {
                    cookie,
                    offset: sent.offset,
                    data,
                    done: true,
                });
            }
            Ok(Reply::Status {
                cookie,
                error,
                done: true,
            })
        }
        ReplyHeader::Chunk {
            flags, typ, length, ..
        } => {
            let done = flags & REPLY_FLAG_DONE != 0;
            match typ {
                chunk::NONE => {
                    if length != 0 || !done {
                        return Err(ProtoError::violation(
                            "NBD_REPLY_TYPE_NONE with a payload or without DONE",
                        ));
                    }
                    Ok(Reply::Status {
                        cookie,
                        error: 0,
                        done,
                    })
                }
                chunk::OFFSET_DATA => {
                    if !sent.read || length < 9 || length - 8 > sent.length {
                        return Err(ProtoError::violation(format!(
                            "bad NBD_REPLY_TYPE_OFFSET_DATA of {length} bytes"
                        )));
                    }
                    let offset = read_u64(r)?;
                    if !inside(offset, u64::from(length - 8)) {
                        return Err(ProtoError::violation(
                            "read data outside the request's range",
                        ));
                    }
                    let data = read_payload(r, "read data", length - 8, MAX_PAYLOAD)?;
                    Ok(Reply::Data {
                        cookie,
                        offset,
                        data,
                        done,
                    })
                }
                chunk::OFFSET_HOLE => {
                    if !sent.read || length != 12 {
                        return Err(ProtoError::violation("bad NBD_REPLY_TYPE_OFFSET_HOLE"));
                    }
                    let offset = read_u64(r)?;
                    let hole = read_u32(r)?;
                    if hole == 0 || !inside(offset, u64::from(hole)) {
                        return Err(ProtoError::violation("hole outside the request's range"));
                    }
                    Ok(Reply::Hole {
                        cookie,
                        offset,
                        length: hole,
                        done,
                    })
                }
                t if t & (1 << 15) != 0 => {
                    // An error chunk (ERROR, ERROR_OFFSET or one we do not know).
                    let data = read_payload(r, "error chunk", length, MAX_OPT_REPLY)?;
                    let mut c = Cursor::new(&data, "error chunk");
                    let error = c.u32()?;
                    let msg_len = c.u16()?;
                    let msg = String::from_utf8_lossy(c.take(usize::from(msg_len))?);
                    if t == chunk::ERROR_OFFSET {
                        let at = c.u64()?;
                        log::debug!("nbd: error {error} at offset {at}: {msg}");
                    } else if !msg.is_empty() {
                        log::debug!("nbd: error {error}: {msg}");
                    }
                    Ok(Reply::Status {
                        cookie,
                        error: if error == 0 {
                            super::proto::errno::EIO
                        } else {
                            error
                        },
                        done,
                    })
                }
                t => Err(ProtoError::violation(format!(
                    "unexpected reply chunk type {t}"
                ))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto::errno;

    #[test]
    fn uris_parse() {
        let u: NbdUri = "nbd://example.org/disk".parse().unwrap();
        assert_eq!(u.address, Address::Tcp("example.org".into(), DEFAULT_PORT));
        assert_eq!(u.export, "disk");
        let u: NbdUri = "nbd://127.0.0.1:10900/".parse().unwrap();
        assert_eq!(u.address, Address::Tcp("127.0.0.1".into(), 10900));
        assert_eq!(u.export, "");
        let u: NbdUri = "nbd://[::1]:7/a%20b".parse().unwrap();
        assert_eq!(u.address, Address::Tcp("::1".into(), 7));
        assert_eq!(u.export, "a b");
        assert_eq!(u.to_string(), "nbd://[::1]:7/a b");
        let u: NbdUri = "nbd+unix:///vol?socket=/run/nbd.sock".parse().unwrap();
        assert_eq!(u.address, Address::Unix("/run/nbd.sock".into()));
        assert_eq!(u.export, "vol");
        assert_eq!(u.to_string(), "nbd+unix:///vol?socket=/run/nbd.sock");
        let u: NbdUri = "nbd+unix://?socket=/tmp/s".parse().unwrap();
        assert_eq!(u.export, "");
        for bad in [
            "",
            "disk",
            "nbd:///disk",
            "nbd+unix:///disk",
            "nbd+unix://host/disk?socket=/s",
            "nbd://h/disk?socket=/s",
            "nbd://h/disk?tls=on",
            "nbds://h/disk",
            "http://h/disk",
            "nbd://user@h/disk",
            "nbd://h/%zz",
        ] {
            assert!(bad.parse::<NbdUri>().is_err(), "{bad}");
        }
    }

    fn chunk(flags: u16, typ: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut b = ReplyHeader::Chunk {
            flags,
            typ,
            cookie,
            length: payload.len() as u32,
        }
        .encode();
        b.extend_from_slice(payload);
        b
    }

    const READ: Sent = Sent {
        read: true,
        offset: 4096,
        length: 1024,
    };

    #[test]
    fn replies_are_checked_against_their_requests() {
        let known = |c| (c == 7).then_some(READ);
        // Simple read reply: the data follows.
        let mut b = ReplyHeader::Simple {
            error: 0,
            cookie: 7,
        }
        .encode();
        b.extend_from_slice(&[9u8; 1024]);
        match read_reply(&mut &b[..], known).unwrap() {
            Reply::Data { offset, data, .. } => assert_eq!((offset, data.len()), (4096, 1024)),
            r => panic!("{r:?}"),
        }
        // Short data: an I/O error.
        assert!(read_reply(&mut &b[..500], known).is_err());
        // Unknown cookie.
        let b = ReplyHeader::Simple {
            error: 0,
            cookie: 8,
        }
        .encode();
        let e = read_reply(&mut &b[..], known).unwrap_err();
        assert!(e.to_string().contains("unknown cookie"), "{e}");
        // Structured data inside, then outside the range.
        let mut p = 4096u64.to_be_bytes().to_vec();
        p.extend_from_slice(&[1u8; 512]);
        let b = chunk(0, chunk::OFFSET_DATA, 7, &p);
        assert!(matches!(
            read_reply(&mut &b[..], known).unwrap(),
            Reply::Data { done: false, .. }
        ));
        let mut p = 4608u64.to_be_bytes().to_vec();
        p.extend_from_slice(&[1u8; 1024]);
        let b = chunk(0, chunk::OFFSET_DATA, 7, &p);
        assert!(read_reply(&mut &b[..], known).is_err());
        // A huge chunk length is refused before any allocation.
        let b = ReplyHeader::Chunk {
            flags: 0,
            typ: chunk::OFFSET_DATA,
            cookie: 7,
            length: u32::MAX,
        }
        .encode();
        assert!(read_reply(&mut &b[..], known).is_err());
        // Holes.
        let mut p = 5000u64.to_be_bytes().to_vec();
        p.extend_from_slice(&100u32.to_be_bytes());
        let b = chunk(REPLY_FLAG_DONE, chunk::OFFSET_HOLE, 7, &p);
        assert_eq!(
            read_reply(&mut &b[..], known).unwrap(),
            Reply::Hole {
                cookie: 7,
                offset: 5000,
                length: 100,
                done: true
            }
        );
        let mut p = 5000u64.to_be_bytes().to_vec();
        p.extend_from_slice(&10000u32.to_be_bytes());
        let b = chunk(REPLY_FLAG_DONE, chunk::OFFSET_HOLE, 7, &p);
        assert!(read_reply(&mut &b[..], known).is_err());
        // Errors, with a message length past the payload refused.
        let mut p = errno::ENOSPC.to_be_bytes().to_vec();
        p.extend_from_slice(&2u16.to_be_bytes());
        p.extend_from_slice(b"no");
        let b = chunk(REPLY_FLAG_DONE, chunk::ERROR, 7, &p);
        assert_eq!(
            read_reply(&mut &b[..], known).unwrap(),
            Reply::Status {
                cookie: 7,
                error: errno::ENOSPC,
                done: true
            }
        );
        let mut p = errno::EIO.to_be_bytes().to_vec();
        p.extend_from_slice(&200u16.to_be_bytes());
        let b = chunk(REPLY_FLAG_DONE, chunk::ERROR, 7, &p);
        assert!(read_reply(&mut &b[..], known).is_err());
        // Unknown non-error chunk types, and NONE without DONE.
        let b = chunk(REPLY_FLAG_DONE, 77, 7, &[]);
        assert!(read_reply(&mut &b[..], known).is_err());
        let b = chunk(0, chunk::NONE, 7, &[]);
        assert!(read_reply(&mut &b[..], known).is_err());
    }
}
