//! The NBD wire format: magic numbers, flags, option and command codes, and the fixed-size
//! headers, encoded and decoded by hand (every field is big-endian).
//!
//! Decoding never trusts a length from the peer: [`read_payload`] refuses anything over a caller's
//! bound before allocating, and every header decoder checks its magic.

use std::io::{self, Read, Write};

/// `NBDMAGIC`, the first eight bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle handshake's second magic, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag (server): fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag (server): the 124 zero bytes after `NBD_OPT_EXPORT_NAME` can be left out.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags (per export).
pub mod tflag {
    /// Always set: the other flags mean something.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Writes, trims and write-zeroes are refused.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is understood.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is understood.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The export is a rotational medium.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_CMD_TRIM` is understood.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` is understood.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` is understood.
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections see each other's completed writes and flushes.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// Option codes (client to server during the handshake).
pub mod opt {
    /// Select an export and go to transmission, without a way to report errors.
    pub const EXPORT_NAME: u32 = 1;
    /// End the handshake.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and go to transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts for `NBD_CMD_BLOCK_STATUS`.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types.
pub mod rep {
    /// The option is done.
    pub const ACK: u32 = 1;
    /// An export (answer to `NBD_OPT_LIST`).
    pub const SERVER: u32 = 2;
    /// An information item (answer to `NBD_OPT_INFO` and `NBD_OPT_GO`).
    pub const INFO: u32 = 3;
    /// A metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Error bit: every error reply type has it.
    pub const ERR: u32 = 1 << 31;
    /// The option is not known.
    pub const ERR_UNSUP: u32 = ERR | 1;
    /// Refused by policy.
    pub const ERR_POLICY: u32 = ERR | 2;
    /// Syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = ERR | 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = ERR | 4;
    /// TLS is required first.
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    /// Block size negotiation is required first.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR | 8;
    /// The request or reply is too large.
    pub const ERR_TOO_BIG: u32 = ERR | 9;
}

/// Information item types in `NBD_REP_INFO`.
pub mod info {
    /// Size (u64) and transmission flags (u16).
    pub const EXPORT: u16 = 0;
    /// The export's canonical name.
    pub const NAME: u16 = 1;
    /// A human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes (three u32).
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission command types.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (the data follows the request).
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Make completed writes durable.
    pub const FLUSH: u16 = 3;
    /// The range is no longer needed.
    pub const TRIM: u16 = 4;
    /// Write zeros (without data).
    pub const WRITE_ZEROES: u16 = 6;
    /// Ask for metadata (allocation) of a range.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflag {
    /// Durable when answered.
    pub const FUA: u16 = 1 << 0;
    /// `NBD_CMD_WRITE_ZEROES`: do not punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `NBD_CMD_READ`: do not fragment the reply.
    pub const DF: u16 = 1 << 2;
    /// `NBD_CMD_BLOCK_STATUS`: one extent is enough.
    pub const REQ_ONE: u16 = 1 << 3;
}

/// Structured reply flag: the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

/// Structured reply chunk types.
pub mod chunk {
    /// No payload (the final chunk of a reply that carried everything before).
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Zeros at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error (u32 errno, u16 message length, message).
    pub const ERROR: u16 = (1 << 15) | 1;
    /// An error at an offset.
    pub const ERROR_OFFSET: u16 = (1 << 15) | 2;
}

/// Errors as the protocol numbers them (Linux's values).
pub mod errno {
    /// Operation not permitted (write to a read-only export).
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left (a write past the end).
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` status flags.
pub mod alloc {
    /// The extent is not allocated.
    pub const HOLE: u32 = 1 << 0;
    /// The extent reads as zeros.
    pub const ZERO: u32 = 1 << 1;
}

/// The one metadata context served and asked for.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Longest option payload accepted (export names and queries are at most 4096 bytes).
pub const MAX_OPTION_LEN: u32 = 4096 + 64;
/// Largest read or write payload accepted or sent, and the maximum block size announced.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Longest string (export name, description, error message) accepted.
pub const MAX_STRING: usize = 4096;

/// A transmission request header (28 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub typ: u16,
    /// The client's tag, echoed in the reply.
    pub cookie: u64,
    /// Byte offset on the export.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl Request {
    /// Encoded size.
    pub const SIZE: usize = 28;

    /// The header on the wire.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.typ.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decodes a header, checking its magic.
    pub fn decode(b: &[u8; Self::SIZE]) -> Result<Self, ProtoError> {
        let magic = be32(&b[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "request",
                got: magic.into(),
            });
        }
        Ok(Self {
            flags: be16(&b[4..6]),
            typ: be16(&b[6..8]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            length: be32(&b[24..28]),
        })
    }
}

/// The header of a reply: simple, or one structured chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply (for a successful read, the data follows).
    Simple {
        /// 0 or an error number.
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// A structured reply chunk, `length` payload bytes following.
    Chunk {
        /// `REPLY_FLAG_DONE` or not.
        flags: u16,
        /// Chunk type.
        typ: u16,
        /// The request's cookie.
        cookie: u64,
        /// Payload length.
        length: u32,
    },
}

impl ReplyHeader {
    /// Size of a simple reply header.
    pub const SIMPLE_SIZE: usize = 16;
    /// Size of a structured chunk header.
    pub const CHUNK_SIZE: usize = 20;

    /// The header on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::CHUNK_SIZE);
        match *self {
            ReplyHeader::Simple { error, cookie } => {
                b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                b.extend_from_slice(&error.to_be_bytes());
                b.extend_from_slice(&cookie.to_be_bytes());
            }
            ReplyHeader::Chunk {
                flags,
                typ,
                cookie,
                length,
            } => {
                b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
                b.extend_from_slice(&flags.to_be_bytes());
                b.extend_from_slice(&typ.to_be_bytes());
                b.extend_from_slice(&cookie.to_be_bytes());
                b.extend_from_slice(&length.to_be_bytes());
            }
        }
        b
    }

    /// Reads a reply header of either kind.
    pub fn read(r: &mut impl Read) -> Result<Self, ProtoError> {
        let mut b = [0u8; Self::CHUNK_SIZE];
        r.read_exact(&mut b[..4])?;
        match be32(&b[..4]) {
            SIMPLE_REPLY_MAGIC => {
                r.read_exact(&mut b[4..Self::SIMPLE_SIZE])?;
                Ok(ReplyHeader::Simple {
                    error: be32(&b[4..8]),
                    cookie: be64(&b[8..16]),
                })
            }
            STRUCTURED_REPLY_MAGIC => {
                r.read_exact(&mut b[4..Self::CHUNK_SIZE])?;
                Ok(ReplyHeader::Chunk {
                    flags: be16(&b[4..6]),
                    typ: be16(&b[6..8]),
                    cookie: be64(&b[8..16]),
                    length: be32(&b[16..20]),
                })
            }
            got => Err(ProtoError::BadMagic {
                what: "reply",
                got: got.into(),
            }),
        }
    }
}

/// What went wrong speaking NBD.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The connection failed or closed.
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    /// A magic number was wrong.
    #[error("bad {what} magic {got:#x}")]
    BadMagic {
        /// Which header.
        what: &'static str,
        /// What came instead.
        got: u64,
    },
    /// A length was over its bound.
    #[error("{what} of {len} bytes is over the limit of {max}")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// The length the peer sent.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// The peer broke the protocol otherwise.
    #[error("{0}")]
    Violation(String),
    /// The server refused an option.
    #[error("server refused {what}: {}{}", rep_error_name(*.code), if .message.is_empty() { String::new() } else { format!(" ({})", .message) })]
    Refused {
        /// Which option.
        what: &'static str,
        /// The error reply type.
        code: u32,
        /// The server's explanation.
        message: String,
    },
}

impl ProtoError {
    /// A protocol violation.
    pub fn violation(s: impl Into<String>) -> Self {
        ProtoError::Violation(s.into())
    }
}

/// The name of an option error reply type.
pub fn rep_error_name(code: u32) -> String {
    match code {
        rep::ERR_UNSUP => "unsupported".into(),
        rep::ERR_POLICY => "policy".into(),
        rep::ERR_INVALID => "invalid".into(),
        rep::ERR_PLATFORM => "platform".into(),
        rep::ERR_TLS_REQD => "TLS required".into(),
        rep::ERR_UNKNOWN => "unknown export".into(),
        rep::ERR_SHUTDOWN => "shutting down".into(),
        rep::ERR_BLOCK_SIZE_REQD => "block size required".into(),
        rep::ERR_TOO_BIG => "too big".into(),
        _ => format!("error {code:#x}"),
    }
}

/// Big-endian u16 from the first two bytes of `b` (callers pass slices of the right length).
pub fn be16(b: &[u8]) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[..2]);
    u16::from_be_bytes(a)
}

/// Big-endian u32 from the first four bytes of `b`.
pub fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

/// Big-endian u64 from the first eight bytes of `b`.
pub fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Reads a big-endian u16.
pub fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

/// Reads a big-endian u32.
pub fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// Reads a big-endian u64.
pub fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Reads `len` bytes, refusing (before allocating) a `len` over `max`.
pub fn read_payload(
    r: &mut impl Read,
    what: &'static str,
    len: u32,
    max: u32,
) -> Result<Vec<u8>, ProtoError> {
    if len > max {
        return Err(ProtoError::TooLong {
            what,
            len: len.into(),
            max: max.into(),
        });
    }
    let mut v = vec![0u8; len as usize];
    r.read_exact(&mut v)?;
    Ok(v)
}

/// A cursor over an option or chunk payload whose every read is bounds-checked.
#[derive(Debug)]
pub struct Cursor<'a> {
    data: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    /// Reads `data`, naming it `what` in errors.
    pub fn new(data: &'a [u8], what: &'static str) -> Self {
        Self { data, what }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if n > self.data.len() {
            return Err(ProtoError::violation(format!(
                "{}: {} bytes short",
                self.what,
                n - self.data.len()
            )));
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    /// The next u16.
    pub fn u16(&mut self) -> Result<u16, ProtoError> {
        self.take(2).map(be16)
    }

    /// The next u32.
    pub fn u32(&mut self) -> Result<u32, ProtoError> {
        self.take(4).map(be32)
    }

    /// The next u64.
    pub fn u64(&mut self) -> Result<u64, ProtoError> {
        self.take(8).map(be64)
    }

    /// A string of `len` bytes (at most [`MAX_STRING`], valid UTF-8).
    pub fn string(&mut self, len: usize) -> Result<String, ProtoError> {
        if len > MAX_STRING {
            return Err(ProtoError::TooLong {
                what: "string",
                len: len as u64,
                max: MAX_STRING as u64,
            });
        }
        let b = self.take(len)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| ProtoError::violation(format!("{}: a string is not UTF-8", self.what)))
    }

    /// A string preceded by its u32 length.
    pub fn lstring(&mut self) -> Result<String, ProtoError> {
        let len = self.u32()?;
        self.string(len as usize)
    }

    /// The bytes left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    /// Fails unless every byte was consumed.
    pub fn finish(&self) -> Result<(), ProtoError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::violation(format!(
                "{}: {} trailing bytes",
                self.what,
                self.data.len()
            )))
        }
    }
}

/// Writes an option reply.
pub fn write_opt_reply(w: &mut impl Write, option: u32, typ: u32, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "option reply too long"))?;
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b)
}

/// Writes a client option.
pub fn write_option(w: &mut impl Write, option: u32, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "option too long"))?;
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b)
}

/// Appends a u32 length and the string.
pub fn put_lstring(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u32).to_be_bytes());
    b.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_spell_their_names() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn requests_round_trip_and_bad_magic_is_refused() {
        let r = Request {
            flags: cflag::FUA,
            typ: cmd::WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        let b = r.encode();
        assert_eq!(Request::decode(&b).unwrap(), r);
        let mut bad = b;
        bad[0] ^= 1;
        let e = Request::decode(&bad).unwrap_err();
        assert!(e.to_string().contains("bad request magic"), "{e}");
    }

    #[test]
    fn reply_headers_round_trip() {
        for h in [
            ReplyHeader::Simple {
                error: errno::EIO,
                cookie: 7,
            },
            ReplyHeader::Chunk {
                flags: REPLY_FLAG_DONE,
                typ: chunk::ERROR,
                cookie: 9,
                length: 6,
            },
        ] {
            let b = h.encode();
            assert_eq!(ReplyHeader::read(&mut &b[..]).unwrap(), h);
        }
        let e = ReplyHeader::read(&mut &[0u8; 20][..]).unwrap_err();
        assert!(e.to_string().contains("bad reply magic"), "{e}");
        // Truncated: an I/O error, not a panic.
        let b = ReplyHeader::Simple {
            error: 0,
            cookie: 1,
        }
        .encode();
        assert!(matches!(
            ReplyHeader::read(&mut &b[..10]),
            Err(ProtoError::Io(_))
        ));
    }

    #[test]
    fn payloads_and_cursors_are_bounded() {
        let big = read_payload(&mut &[0u8; 8][..], "option", u32::MAX, MAX_OPTION_LEN);
        assert!(matches!(big, Err(ProtoError::TooLong { .. })));
        assert_eq!(
            read_payload(&mut &[1u8, 2][..], "x", 2, 4).unwrap(),
            vec![1, 2]
        );
        let data = [0, 0, 0, 3, b'a', b'b', b'c', 0, 1];
        let mut c = Cursor::new(&data, "test");
        assert_eq!(c.lstring().unwrap(), "abc");
        assert!(c.finish().is_err());
        assert!(c.u32().is_err());
        assert_eq!(c.u16().unwrap(), 1);
        c.finish().unwrap();
        let huge = [0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            Cursor::new(&huge, "t").lstring(),
            Err(ProtoError::TooLong { .. })
        ));
    }
}
