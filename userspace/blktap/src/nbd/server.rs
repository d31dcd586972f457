//! An NBD server: one export on a unix socket, a thread per connection.
//!
//! The handshake is fixed newstyle (plain newstyle clients may still send `NBD_OPT_EXPORT_NAME`),
//! with `NBD_OPT_EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`, `STRUCTURED_REPLY`,
//! `LIST_META_CONTEXT` and `SET_META_CONTEXT` (`base:allocation`); every other option is answered
//! `NBD_REP_ERR_UNSUP`. In transmission: `READ`, `WRITE`, `DISC`, `FLUSH`, `TRIM`,
//! `WRITE_ZEROES` and `BLOCK_STATUS`, with `FUA` on writes, trims and write-zeroes.
//!
//! Each connection is served by its own thread (at most [`MAX_CONNECTIONS`] at once), which reads
//! its requests and hands them to workers of the connection (at most [`PIPELINE_DEPTH`] requests
//! and [`PIPELINE_BYTES`] of data in flight): replies come as requests complete, out of order
//! (each a whole, never interleaved with another). The
//! [`Export`] is shared by every connection: it must be safe to call from several threads, and a
//! flush on one connection must cover writes completed on every other (`CAN_MULTI_CONN` is
//! announced only if [`ExportFeatures::multi_conn`] says so).
//!
//! Every byte from a client is treated as hostile: option payloads over
//! [`MAX_OPTION_LEN`](super::proto::MAX_OPTION_LEN), requests over
//! [`MAX_PAYLOAD`](super::proto::MAX_PAYLOAD) and ranges past the end of the export are refused
//! with a clear error (a bad magic or an oversized write, after which the stream cannot be
//! resynchronised, closes that connection only); the server and its other connections go on.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use nix::fcntl::{fallocate, FallocateFlags};
use nix::unistd::{lseek, Whence};

use super::proto::{
    alloc, cflag, chunk, cmd, errno, info, opt, put_lstring, read_payload, read_u32, read_u64, rep,
    tflag, write_opt_reply, Cursor, ProtoError, ReplyHeader, Request, BASE_ALLOCATION,
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT,
    MAX_OPTION_LEN, MAX_PAYLOAD, NBDMAGIC, REPLY_FLAG_DONE,
};

/// The metadata context id of `base:allocation` on our connections.
const ALLOCATION_ID: u32 = 1;
/// Preferred block size announced.
const PREFERRED_BLOCK: u32 = 4096;
/// Most connections served at once (each may hold a request of up to `MAX_PAYLOAD` bytes);
/// more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;

/// One extent of a `base:allocation` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (non-zero).
    pub length: u32,
    /// [`alloc::HOLE`] and/or [`alloc::ZERO`], or 0 for allocated data.
    pub flags: u32,
}

/// What an export does beyond reads and writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportFeatures {
    /// `flush` makes completed writes durable.
    pub flush: bool,
    /// `write(.., fua: true)` is durable when it returns.
    pub fua: bool,
    /// `trim` frees a range.
    pub trim: bool,
    /// `write_zeroes` zeros a range without data.
    pub write_zeroes: bool,
    /// A flush on one connection covers writes completed on all of them.
    pub multi_conn: bool,
}

/// The image an NBD server serves. Called from one thread per connection at once; every range
/// has been checked against [`Export::size`] before the call.
pub trait Export: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// The operations beyond reads and writes.
    fn features(&self) -> ExportFeatures;
    /// Fills `buf` from `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `buf` at `offset`, durably if `fua`.
    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()>;
    /// Makes completed writes durable.
    fn flush(&self) -> io::Result<()>;
    /// Frees `[offset, offset + len)`; its content is unspecified afterwards.
    fn trim(&self, offset: u64, len: u32, fua: bool) -> io::Result<()>;
    /// Zeros `[offset, offset + len)`, punching a hole if `may_punch`.
    fn write_zeroes(&self, offset: u64, len: u32, may_punch: bool, fua: bool) -> io::Result<()>;
    /// The smallest block (offsets and lengths should be multiples of it), announced in
    /// `NBD_INFO_BLOCK_SIZE`: a power of two, at most 4096.
    fn min_block_size(&self) -> u32 {
        1
    }
    /// The allocation of `[offset, offset + len)` from its start, in order (at least one extent,
    /// lengths adding up to at most `len`).
    fn block_status(&self, offset: u64, len: u32) -> io::Result<Vec<Extent>>;
}

/// A raw file (or block device) as an export: `pread`/`pwrite` on one descriptor shared by every
/// connection, holes from `SEEK_DATA`/`SEEK_HOLE`, trims and write-zeroes by `fallocate`.
#[derive(Debug)]
pub struct FileExport {
    file: File,
    size: u64,
}

impl FileExport {
    /// Opens `path`, read-write unless `readonly`.
    pub fn open(path: &Path, readonly: bool) -> io::Result<Self> {
        let file = File::options().read(true).write(!readonly).open(path)?;
        let size = file.metadata()?.len();
        let size = if size == 0 {
            // A block device: its size is where SEEK_END lands.
            lseek(file.as_fd(), 0, Whence::SeekEnd).map_err(io::Error::from)? as u64
        } else {
            size
        };
        Ok(Self { file, size })
    }

    fn punch(&self, offset: u64, len: u32, mode: FallocateFlags) -> io::Result<()> {
        fallocate(
            self.file.as_fd(),
            mode | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            i64::from(len),
        )
        .map_err(io::Error::from)
    }

    fn write_zero_bytes(&self, offset: u64, len: u32) -> io::Result<()> {
        let zeros = vec![0u8; (len as usize).min(1 << 20)];
        let mut done = 0u64;
        while done < u64::from(len) {
            let n = (u64::from(len) - done).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

impl Export for FileExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn features(&self) -> ExportFeatures {
        ExportFeatures {
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            // One descriptor: fdatasync covers writes from every connection.
            multi_conn: true,
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        self.file.write_all_at(buf, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn trim(&self, offset: u64, len: u32, fua: bool) -> io::Result<()> {
        match self.punch(offset, len, FallocateFlags::FALLOC_FL_PUNCH_HOLE) {
            // A trim is advisory: a file system without holes keeps the data.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            r => r?,
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u32, may_punch: bool, fua: bool) -> io::Result<()> {
        let mode = if may_punch {
            FallocateFlags::FALLOC_FL_PUNCH_HOLE
        } else {
            FallocateFlags::FALLOC_FL_ZERO_RANGE
        };
        match self.punch(offset, len, mode) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zero_bytes(offset, len)?
            }
            r => r?,
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u32) -> io::Result<Vec<Extent>> {
        Ok(to_nbd_extents(
            crate::backend::seek_extents(self.file.as_fd(), offset, u64::from(len)),
            len,
        ))
    }
}

/// A backend's allocation map as `base:allocation` extents (all data if it cannot say).
pub fn to_nbd_extents(map: Option<Vec<crate::backend::Extent>>, len: u32) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    let mut total = 0u64;
    for e in map.unwrap_or_default() {
        // Each is inside the u32 range asked for; never past it.
        let length = e.length.min(u64::from(len) - total) as u32;
        if length == 0 {
            break;
        }
        total += u64::from(length);
        out.push(Extent {
            length,
            flags: if e.hole { alloc::HOLE | alloc::ZERO } else { 0 },
        });
    }
    if out.is_empty() {
        out.push(Extent {
            length: len,
            flags: 0,
        });
    }
    out
}

/// How an export is offered.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// The export's name (clients asking for `""` get it too).
    pub name: String,
    /// Its description, sent when asked for.
    pub description: String,
    /// Refuse writes, trims and write-zeroes.
    pub readonly: bool,
    /// Serve the export whatever name a client asks for (one export per socket).
    pub any_name: bool,
}

/// A running server. Dropping it stops accepting, closes every connection, waits for their
/// threads and removes the socket.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    /// The listening socket (a clone of the accept loop's), shut down to wake the loop.
    listener: UnixListener,
    accept: Option<JoinHandle<()>>,
    conns: Conns,
}

impl Server {
    /// Serves `export` on a new unix socket at `path` (an existing socket there is replaced).
    pub fn serve(path: &Path, export: Arc<dyn Export>, config: ServerConfig) -> io::Result<Server> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(path)?;
        let wake = listener.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Conns = Arc::default();
        let config = Arc::new(config);
        let accept = {
            let (stop, conns) = (stop.clone(), conns.clone());
            std::thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || accept_loop(listener, export, config, stop, conns))?
        };
        Ok(Server {
            path: path.into(),
            stop,
            listener: wake,
            accept: Some(accept),
            conns,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Connections being served now.
    pub fn connections(&self) -> usize {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.iter().filter(|(_, t)| !t.is_finished()).count()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop: on Linux, shutting a listening socket down fails its accept.
        // SAFETY: shutdown(2) on a socket we own; it does not close the descriptor.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let conns = std::mem::take(&mut *self.conns.lock().unwrap_or_else(|e| e.into_inner()));
        for (stream, _) in &conns {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        for (_, t) in conns {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The connections: a clone of each stream (to shut it down) and its thread.
type Conns = Arc<Mutex<Vec<(UnixStream, JoinHandle<()>)>>>;

fn accept_loop(
    listener: UnixListener,
    export: Arc<dyn Export>,
    config: Arc<ServerConfig>,
    stop: Arc<AtomicBool>,
    conns: Conns,
) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => {
                log::warn!("nbd: accept: {e}");
                // Out of descriptors, say: do not spin.
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        let Ok(shut) = stream.try_clone() else {
            continue;
        };
        {
            let mut conns = conns.lock().unwrap_or_else(|e| e.into_inner());
            conns.retain(|(_, t)| !t.is_finished());
            if conns.len() >= MAX_CONNECTIONS {
                log::warn!("nbd: {MAX_CONNECTIONS} connections already: refusing one");
                continue;
            }
        }
        let (export, config) = (export.clone(), config.clone());
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || {
                match serve_connection(&stream, export.as_ref(), &config) {
                    Ok(()) => {}
                    // The client went away.
                    Err(ProtoError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {}
                    Err(e) => log::warn!("nbd: export {:?}: client dropped: {e}", config.name),
                }
                // The server's clone keeps the descriptor open: end the connection here.
                let _ = stream.shutdown(std::net::Shutdown::Both);
            });
        let mut conns = conns.lock().unwrap_or_else(|e| e.into_inner());
        match spawned {
            Ok(t) => conns.push((shut, t)),
            Err(e) => log::warn!("nbd: cannot start a connection thread: {e}"),
        }
    }
}

/// What the handshake settled.
#[derive(Debug, Default)]
struct Session {
    structured: bool,
    allocation: bool,
}

/// The outcome of one option.
enum Next {
    Option,
    Transmission,
    Close,
}

/// Serves one client until it disconnects or breaks the protocol.
pub fn serve_connection(
    stream: &UnixStream,
    export: &dyn Export,
    config: &ServerConfig,
) -> Result<(), ProtoError> {
    let mut r = stream;
    let mut w = stream;
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&hello)?;
    let cflags = read_u32(&mut r)?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtoError::violation(format!(
            "unknown client flags {cflags:#x}"
        )));
    }
    let fixed = cflags & FLAG_C_FIXED_NEWSTYLE != 0;
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    let mut s = Session::default();
    loop {
        let magic = read_u64(&mut r)?;
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic {
                what: "option",
                got: magic,
            });
        }
        let option = read_u32(&mut r)?;
        let len = read_u32(&mut r)?;
        if !fixed && option != opt::EXPORT_NAME {
            return Err(ProtoError::violation(format!(
                "option {option} from a client that is not fixed newstyle"
            )));
        }
        if len > MAX_OPTION_LEN {
            // Nothing sane is this long; do not read it.
            let _ = write_opt_reply(&mut w, option, rep::ERR_TOO_BIG, b"option too long");
            return Err(ProtoError::TooLong {
                what: "option",
                len: len.into(),
                max: MAX_OPTION_LEN.into(),
            });
        }
        let data = read_payload(&mut r, "option", len, MAX_OPTION_LEN)?;
        match handle_option(&mut w, option, &data, export, config, &mut s, no_zeroes)? {
            Next::Option => {}
            Next::Transmission => break,
            Next::Close => return Ok(()),
        }
    }
    transmission(stream, export, config, &s)
}

fn error_reply(w: &mut impl Write, option: u32, code: u32, msg: &str) -> io::Result<Next> {
    write_opt_reply(w, option, code, msg.as_bytes())?;
    Ok(Next::Option)
}

/// The rest of an option that names an export (`INFO`, `GO`, the metadata-context ones), if its
/// payload parsed and the export is ours; otherwise the error is answered (`ERR_INVALID`,
/// `ERR_UNKNOWN`) and there is nothing more to do for the option.
fn for_our_export<T>(
    w: &mut impl Write,
    option: u32,
    config: &ServerConfig,
    parsed: Result<(String, T), ProtoError>,
) -> io::Result<Option<T>> {
    match parsed {
        Err(e) => error_reply(w, option, rep::ERR_INVALID, &e.to_string()).map(|_| None),
        Ok((name, _)) if !name_matches(&name, config) => {
            error_reply(w, option, rep::ERR_UNKNOWN, &format!("no export {name:?}")).map(|_| None)
        }
        Ok((_, rest)) => Ok(Some(rest)),
    }
}

fn name_matches(name: &str, config: &ServerConfig) -> bool {
    config.any_name || name.is_empty() || name == config.name
}

fn transmission_flags(export: &dyn Export, config: &ServerConfig) -> u16 {
    let f = export.features();
    let mut flags = tflag::HAS_FLAGS;
    let set = |flags: &mut u16, on: bool, bit: u16| {
        if on {
            *flags |= bit;
        }
    };
    set(&mut flags, config.readonly, tflag::READ_ONLY);
    set(&mut flags, f.flush, tflag::SEND_FLUSH);
    set(&mut flags, f.fua, tflag::SEND_FUA);
    set(&mut flags, f.trim && !config.readonly, tflag::SEND_TRIM);
    set(
        &mut flags,
        f.write_zeroes && !config.readonly,
        tflag::SEND_WRITE_ZEROES,
    );
    set(&mut flags, true, tflag::SEND_DF);
    set(&mut flags, f.multi_conn, tflag::CAN_MULTI_CONN);
    flags
}

fn handle_option(
    w: &mut impl Write,
    option: u32,
    data: &[u8],
    export: &dyn Export,
    config: &ServerConfig,
    s: &mut Session,
    no_zeroes: bool,
) -> Result<Next, ProtoError> {
    let mut c = Cursor::new(data, "option");
    match option {
        opt::EXPORT_NAME => {
            let name = c.string(data.len())?;
            if !name_matches(&name, config) {
                return Err(ProtoError::violation(format!(
                    "NBD_OPT_EXPORT_NAME: no export {name:?}"
                )));
            }
            let mut b = Vec::with_capacity(10 + 124);
            b.extend_from_slice(&export.size().to_be_bytes());
            b.extend_from_slice(&transmission_flags(export, config).to_be_bytes());
            if !no_zeroes {
                b.extend_from_slice(&[0u8; 124]);
            }
            w.write_all(&b)?;
            // Block status needs a context negotiated for this export and structured replies.
            Ok(Next::Transmission)
        }
        opt::ABORT => {
            // The client may already be gone: the acknowledgement is a courtesy.
            let _ = write_opt_reply(w, option, rep::ACK, &[]);
            Ok(Next::Close)
        }
        opt::LIST => {
            if !data.is_empty() {
                return Ok(error_reply(
                    w,
                    option,
                    rep::ERR_INVALID,
                    "NBD_OPT_LIST takes no data",
                )?);
            }
            let mut b = Vec::new();
            put_lstring(&mut b, &config.name);
            b.extend_from_slice(config.description.as_bytes());
            write_opt_reply(w, option, rep::SERVER, &b)?;
            write_opt_reply(w, option, rep::ACK, &[])?;
            Ok(Next::Option)
        }
        opt::INFO | opt::GO => {
            let parsed = (|| {
                let name = c.lstring()?;
                let n = c.u16()?;
                let mut wanted = Vec::with_capacity(usize::from(n));
                for _ in 0..n {
                    wanted.push(c.u16()?);
                }
                c.finish()?;
                Ok::<_, ProtoError>((name, wanted))
            })();
            let Some(wanted) = for_our_export(w, option, config, parsed)? else {
                return Ok(Next::Option);
            };
            let mut b = vec![];
            b.extend_from_slice(&info::EXPORT.to_be_bytes());
            b.extend_from_slice(&export.size().to_be_bytes());
            b.extend_from_slice(&transmission_flags(export, config).to_be_bytes());
            write_opt_reply(w, option, rep::INFO, &b)?;
            if wanted.contains(&info::NAME) {
                let mut b = info::NAME.to_be_bytes().to_vec();
                b.extend_from_slice(config.name.as_bytes());
                write_opt_reply(w, option, rep::INFO, &b)?;
            }
            if wanted.contains(&info::DESCRIPTION) && !config.description.is_empty() {
                let mut b = info::DESCRIPTION.to_be_bytes().to_vec();
                b.extend_from_slice(config.description.as_bytes());
                write_opt_reply(w, option, rep::INFO, &b)?;
            }
            let mut b = info::BLOCK_SIZE.to_be_bytes().to_vec();
            for v in [export.min_block_size(), PREFERRED_BLOCK, MAX_PAYLOAD] {
                b.extend_from_slice(&u32::to_be_bytes(v));
            }
            write_opt_reply(w, option, rep::INFO, &b)?;
            write_opt_reply(w, option, rep::ACK, &[])?;
            Ok(if option == opt::GO {
                Next::Transmission
            } else {
                Next::Option
            })
        }
        opt::STRUCTURED_REPLY => {
            if !data.is_empty() {
                return Ok(error_reply(
                    w,
                    option,
                    rep::ERR_INVALID,
                    "NBD_OPT_STRUCTURED_REPLY takes no data",
                )?);
            }
            s.structured = true;
            write_opt_reply(w, option, rep::ACK, &[])?;
            Ok(Next::Option)
        }
        opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
            let set = option == opt::SET_META_CONTEXT;
            if set && !s.structured {
                return Ok(error_reply(
                    w,
                    option,
                    rep::ERR_INVALID,
                    "metadata contexts need structured replies first",
                )?);
            }
            let parsed = (|| {
                let name = c.lstring()?;
                let n = c.u32()?;
                let mut queries = Vec::new();
                for _ in 0..n {
                    queries.push(c.lstring()?);
                }
                c.finish()?;
                Ok::<_, ProtoError>((name, queries))
            })();
            let Some(queries) = for_our_export(w, option, config, parsed)? else {
                return Ok(Next::Option);
            };
            let matches = if set {
                queries.iter().any(|q| q == BASE_ALLOCATION)
            } else {
                queries.is_empty() || queries.iter().any(|q| q == BASE_ALLOCATION || q == "base:")
            };
            if set {
                s.allocation = matches;
            }
            if matches {
                let mut b = ALLOCATION_ID.to_be_bytes().to_vec();
                b.extend_from_slice(BASE_ALLOCATION.as_bytes());
                write_opt_reply(w, option, rep::META_CONTEXT, &b)?;
            }
            write_opt_reply(w, option, rep::ACK, &[])?;
            Ok(Next::Option)
        }
        _ => Ok(error_reply(
            w,
            option,
            rep::ERR_UNSUP,
            &format!("option {option} is not supported"),
        )?),
    }
}

/// Requests of one connection served at once: its worker threads, started as requests come
/// (and kept until the connection ends). Above the deepest queue a client commonly keeps (QD32),
/// so that one is never held back by the server.
pub const PIPELINE_DEPTH: usize = 64;
/// Bytes of request data (writes' payloads, reads' buffers) one connection holds at once; the
/// connection's requests are not read further until some are answered. One largest request
/// ([`MAX_PAYLOAD`], which must fit), as when a connection served one request at a time: the
/// server's memory for request data stays at most [`MAX_CONNECTIONS`] times that.
pub const PIPELINE_BYTES: u64 = MAX_PAYLOAD as u64;
/// Stack of a connection's worker: it only calls the [`Export`] and writes a reply (buffers are
/// on the heap), so far less than the default 2 MiB.
const WORKER_STACK: usize = 256 << 10;
/// The buffer a connection's requests are read through.
const READ_BUFFER: usize = 64 << 10;

/// Replies to requests; replies of several workers never interleave (one whole reply per write
/// under the lock).
struct Replier<'a> {
    stream: &'a UnixStream,
    structured: bool,
    lock: &'a Mutex<()>,
}

impl Replier<'_> {
    /// Writes one whole reply.
    fn send(&self, b: &[u8]) -> io::Result<()> {
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        (&mut &*self.stream).write_all(b)
    }

    fn ok(&self, cookie: u64) -> io::Result<()> {
        let h = if self.structured {
            ReplyHeader::Chunk {
                flags: REPLY_FLAG_DONE,
                typ: chunk::NONE,
                cookie,
                length: 0,
            }
        } else {
            ReplyHeader::Simple { error: 0, cookie }
        };
        self.send(&h.encode())
    }

    fn error(&self, cookie: u64, error: u32, msg: &str) -> io::Result<()> {
        let mut b;
        if self.structured {
            let msg = &msg.as_bytes()[..msg.len().min(1024)];
            b = ReplyHeader::Chunk {
                flags: REPLY_FLAG_DONE,
                typ: chunk::ERROR,
                cookie,
                length: 6 + msg.len() as u32,
            }
            .encode();
            b.extend_from_slice(&error.to_be_bytes());
            b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            b.extend_from_slice(msg);
        } else {
            b = ReplyHeader::Simple { error, cookie }.encode();
        }
        self.send(&b)
    }

    fn result(&self, cookie: u64, r: io::Result<()>) -> io::Result<()> {
        match r {
            Ok(()) => self.ok(cookie),
            Err(e) => self.error(cookie, errno_of(&e), &e.to_string()),
        }
    }
}

/// The protocol's error number for an I/O error.
fn errno_of(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EROFS) => errno::EPERM,
        Some(libc::ENOMEM) => errno::ENOMEM,
        Some(libc::EINVAL) => errno::EINVAL,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => errno::ENOSPC,
        Some(libc::EOPNOTSUPP) => errno::ENOTSUP,
        _ => errno::EIO,
    }
}

/// The bytes a connection may still take for requests in flight.
struct Budget {
    left: Mutex<u64>,
    freed: Condvar,
}

impl Budget {
    /// Waits until `n` bytes are free, and takes them.
    fn take(&self, n: u64) {
        let mut left = self.left.lock().unwrap_or_else(|e| e.into_inner());
        while *left < n {
            left = self.freed.wait(left).unwrap_or_else(|e| e.into_inner());
        }
        *left -= n;
    }

    fn give(&self, n: u64) {
        *self.left.lock().unwrap_or_else(|e| e.into_inner()) += n;
        self.freed.notify_all();
    }
}

/// A request handed to a worker: its header, a write's payload, the budget it holds.
struct Job {
    req: Request,
    data: Vec<u8>,
    cost: u64,
}

/// What every worker of a connection shares.
struct Ctx<'a> {
    export: &'a dyn Export,
    config: &'a ServerConfig,
    reply: Replier<'a>,
    tflags: u16,
    size: u64,
    allocation: bool,
}

/// The transmission phase, pipelined: this thread reads requests and hands each to a worker
/// (up to [`PIPELINE_DEPTH`], started as needed), which serves it and writes its reply as soon
/// as it is done, so replies may come out of order (matched by cookie, as the protocol allows).
/// Reading stops while every worker is busy or [`PIPELINE_BYTES`] are held (back-pressure).
/// A flush covers the writes answered before it was received (they are done in the export),
/// as the protocol asks. On `NBD_CMD_DISC`, the end of the stream or a broken request, the
/// requests in flight are answered before the connection is closed.
fn transmission(
    stream: &UnixStream,
    export: &dyn Export,
    config: &ServerConfig,
    s: &Session,
) -> Result<(), ProtoError> {
    let lock = Mutex::new(());
    let ctx = Ctx {
        export,
        config,
        reply: Replier {
            stream,
            structured: s.structured,
            lock: &lock,
        },
        tflags: transmission_flags(export, config),
        size: export.size(),
        allocation: s.allocation,
    };
    let budget = Budget {
        left: Mutex::new(PIPELINE_BYTES),
        freed: Condvar::new(),
    };
    let broken = AtomicBool::new(false);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(0);
    let rx = Mutex::new(rx);
    std::thread::scope(|scope| {
        let mut workers = 0;
        // Buffered: a client's pipelined requests come in with one read(2), not one each.
        let mut r = io::BufReader::with_capacity(READ_BUFFER, stream);
        let result = loop {
            let mut hb = [0u8; Request::SIZE];
            if let Err(e) = r.read_exact(&mut hb) {
                break Err(e.into());
            }
            let req = match Request::decode(&hb) {
                Ok(req) => req,
                Err(e) => break Err(e),
            };
            let mut data = Vec::new();
            let mut cost = 0;
            match req.typ {
                cmd::DISC => break Ok(()),
                cmd::WRITE if req.length > MAX_PAYLOAD => {
                    // Its data cannot be skipped safely: answer, then close this connection.
                    if let Err(e) = ctx.reply.error(
                        req.cookie,
                        errno::EOVERFLOW,
                        "write over the maximum block size",
                    ) {
                        break Err(e.into());
                    }
                    break Err(ProtoError::TooLong {
                        what: "write",
                        len: req.length.into(),
                        max: MAX_PAYLOAD.into(),
                    });
                }
                cmd::WRITE => {
                    cost = u64::from(req.length);
                    budget.take(cost);
                    match read_payload(&mut r, "write", req.length, MAX_PAYLOAD) {
                        Ok(d) => data = d,
                        Err(e) => {
                            budget.give(cost);
                            break Err(e);
                        }
                    }
                }
                cmd::READ if req.length <= MAX_PAYLOAD => {
                    cost = u64::from(req.length);
                    budget.take(cost);
                }
                _ => {}
            }
            if broken.load(Ordering::Relaxed) {
                budget.give(cost);
                break Ok(());
            }
            let job = Job { req, data, cost };
            // An idle worker takes it at once; else start one, or wait for one.
            let job = match tx.try_send(job) {
                Ok(()) => continue,
                Err(std::sync::mpsc::TrySendError::Full(job)) => job,
                Err(std::sync::mpsc::TrySendError::Disconnected(_)) => break Ok(()),
            };
            if workers < PIPELINE_DEPTH {
                workers += 1;
                let (rx, ctx, budget, broken) = (&rx, &ctx, &budget, &broken);
                let spawned = std::thread::Builder::new()
                    .name("nbd-req".into())
                    .stack_size(WORKER_STACK)
                    .spawn_scoped(scope, move || loop {
                        let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok(job) = next else { break };
                        if let Err(e) = serve_request(ctx, &job.req, &job.data) {
                            if !broken.swap(true, Ordering::Relaxed) {
                                log::warn!("nbd: export {:?}: cannot reply: {e}", ctx.config.name);
                            }
                        }
                        budget.give(job.cost);
                    });
                if let Err(e) = spawned {
                    workers -= 1;
                    if workers == 0 {
                        budget.give(job.cost);
                        break Err(e.into());
                    }
                }
            }
            if tx.send(job).is_err() {
                break Ok(());
            }
        };
        // The workers answer what they hold, then end.
        drop(tx);
        result
    })
}

/// Serves one request and writes its reply. An error is the connection's (its replies cannot
/// be written).
fn serve_request(ctx: &Ctx<'_>, req: &Request, data: &[u8]) -> Result<(), ProtoError> {
    let (reply, export, cookie) = (&ctx.reply, ctx.export, req.cookie);
    let in_range = req
        .offset
        .checked_add(u64::from(req.length))
        .is_some_and(|end| end <= ctx.size);
    let allowed_flags = match req.typ {
        cmd::READ if reply.structured => cflag::DF,
        cmd::WRITE | cmd::TRIM => cflag::FUA,
        cmd::WRITE_ZEROES => cflag::FUA | cflag::NO_HOLE,
        cmd::BLOCK_STATUS => cflag::REQ_ONE,
        _ => 0,
    };
    if req.flags & !allowed_flags != 0 {
        reply.error(cookie, errno::EINVAL, "unknown command flags")?;
        return Ok(());
    }
    match req.typ {
        cmd::WRITE => {
            if ctx.config.readonly {
                reply.error(cookie, errno::EPERM, "the export is read-only")?;
            } else if !in_range {
                reply.error(cookie, errno::ENOSPC, "write past the end of the export")?;
            } else {
                let fua = req.flags & cflag::FUA != 0;
                reply.result(cookie, export.write(req.offset, data, fua))?;
            }
        }
        cmd::READ => {
            if req.length > MAX_PAYLOAD {
                reply.error(cookie, errno::EOVERFLOW, "read over the maximum block size")?;
            } else if !in_range {
                reply.error(cookie, errno::EINVAL, "read past the end of the export")?;
            } else if req.length == 0 {
                reply.ok(cookie)?;
            } else {
                read_reply(export, reply, req)?;
            }
        }
        cmd::FLUSH => {
            if ctx.tflags & tflag::SEND_FLUSH == 0 {
                reply.error(cookie, errno::EINVAL, "flush is not supported")?;
            } else {
                reply.result(cookie, export.flush())?;
            }
        }
        cmd::TRIM | cmd::WRITE_ZEROES => {
            let fua = req.flags & cflag::FUA != 0;
            let bit = if req.typ == cmd::TRIM {
                tflag::SEND_TRIM
            } else {
                tflag::SEND_WRITE_ZEROES
            };
            if ctx.config.readonly {
                reply.error(cookie, errno::EPERM, "the export is read-only")?;
            } else if ctx.tflags & bit == 0 {
                reply.error(cookie, errno::EINVAL, "command not supported")?;
            } else if !in_range {
                reply.error(cookie, errno::ENOSPC, "range past the end of the export")?;
            } else if req.typ == cmd::TRIM {
                reply.result(cookie, export.trim(req.offset, req.length, fua))?;
            } else {
                let may_punch = req.flags & cflag::NO_HOLE == 0;
                let r = export.write_zeroes(req.offset, req.length, may_punch, fua);
                reply.result(cookie, r)?;
            }
        }
        cmd::BLOCK_STATUS => {
            if !ctx.allocation {
                reply.error(cookie, errno::EINVAL, "no metadata context was negotiated")?;
            } else if !in_range || req.length == 0 {
                reply.error(cookie, errno::EINVAL, "range outside the export")?;
            } else {
                match export.block_status(req.offset, req.length) {
                    Ok(mut extents) if !extents.is_empty() => {
                        if req.flags & cflag::REQ_ONE != 0 {
                            extents.truncate(1);
                        }
                        let mut b = ReplyHeader::Chunk {
                            flags: REPLY_FLAG_DONE,
                            typ: chunk::BLOCK_STATUS,
                            cookie,
                            length: 4 + 8 * extents.len() as u32,
                        }
                        .encode();
                        b.extend_from_slice(&ALLOCATION_ID.to_be_bytes());
                        for e in extents {
                            b.extend_from_slice(&e.length.to_be_bytes());
                            b.extend_from_slice(&e.flags.to_be_bytes());
                        }
                        reply.send(&b)?;
                    }
                    Ok(_) => reply.error(cookie, errno::EIO, "no extents")?,
                    Err(e) => reply.result(cookie, Err(e))?,
                }
            }
        }
        typ => reply.error(cookie, errno::EINVAL, &format!("unknown command {typ}"))?,
    }
    Ok(())
}

fn read_reply(export: &dyn Export, reply: &Replier<'_>, req: &Request) -> io::Result<()> {
    let len = req.length as usize;
    let head = if reply.structured {
        ReplyHeader::CHUNK_SIZE + 8
    } else {
        ReplyHeader::SIMPLE_SIZE
    };
    let mut b = vec![0u8; head + len];
    if let Err(e) = export.read(req.offset, &mut b[head..]) {
        return reply.result(req.cookie, Err(e));
    }
    let h = if reply.structured {
        ReplyHeader::Chunk {
            flags: REPLY_FLAG_DONE,
            typ: chunk::OFFSET_DATA,
            cookie: req.cookie,
            length: 8 + req.length,
        }
    } else {
        ReplyHeader::Simple {
            error: 0,
            cookie: req.cookie,
        }
    };
    let hb = h.encode();
    b[..hb.len()].copy_from_slice(&hb);
    if reply.structured {
        b[hb.len()..head].copy_from_slice(&req.offset.to_be_bytes());
    }
    reply.send(&b)
}
