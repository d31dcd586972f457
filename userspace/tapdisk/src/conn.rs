//! One client connection on the control socket, in either protocol.
//!
//! The first two bytes say which. A JSON request starts with `{` (or white space) and has no NUL
//! byte; a binary `tapdisk_message_t` starts with its little-endian type, and every message type
//! (all below 256) has a NUL second byte. So: JSON if the first byte is `{` or white space and
//! the second is not NUL; binary otherwise (an unknown type gets a binary EINVAL). A JSON
//! connection that sends a NUL byte (a binary message whose type looks like JSON) gets a JSON
//! error and is closed: no client of either protocol waits on the other.
//!
//! - JSON: request lines in, response lines out, any number, in order;
//! - binary: one message (and its trailer), one answer, then the connection is closed once the
//!   answer is written, as the original tapdisk did.
//!
//! A connection whose request does not arrive complete within [`READ_TIMEOUT`] (or that sends
//! nothing at all, or does not read its answer) is closed; so is a JSON connection idle for as
//! long between requests.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use blktap::ctl::binary::{Message, MESSAGE_SIZE};

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;
/// How long a client may take to send a whole request (or, JSON, to send the next one), or to
/// read its answer.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Which protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// Not known yet: nothing (or only `{`) arrived.
    Unknown,
    /// Newline-delimited JSON.
    Json,
    /// The original binary messages.
    Binary,
}

/// One request read from a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A JSON request line (without its newline).
    Json(String),
    /// A binary message and the trailer that followed it.
    Binary(Box<Message>, Vec<u8>),
    /// A NUL byte on a JSON connection: not JSON; answered with an error, then closed.
    NotJson,
}

/// What reading from a connection produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    /// Complete requests.
    Requests(Vec<Request>),
    /// The client is gone (end of file or error), or sent a line that is too long; the requests
    /// before that still need answers.
    Closed(Vec<Request>),
}

/// A non-blocking client connection with its buffers.
#[derive(Debug)]
pub struct Conn {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    proto: Proto,
    /// Requests read and not answered yet.
    pub backlog: VecDeque<Request>,
    /// Whether the answer to the last request taken must wait (the next ones wait behind it).
    pub waiting: bool,
    /// A binary request was taken: the connection closes once its answer is written.
    pub finished: bool,
    /// When the client must have sent its request, or read its answer, by.
    deadline: Instant,
}

impl Conn {
    /// Wraps an accepted stream, making it non-blocking.
    pub fn new(stream: UnixStream) -> std::io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            proto: Proto::Unknown,
            backlog: VecDeque::new(),
            waiting: false,
            finished: false,
            deadline: Instant::now() + READ_TIMEOUT,
        })
    }

    /// The stream, to register for polling.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// The protocol the client speaks, once known.
    pub fn proto(&self) -> Proto {
        self.proto
    }

    /// When the connection times out, unless it is waiting for the daemon (a pause).
    pub fn deadline(&self) -> Option<Instant> {
        (!self.waiting).then_some(self.deadline)
    }

    /// Starts the timeout again (after a request was answered: the client has that long to read
    /// the answer, and a JSON client to send the next request).
    pub fn touch(&mut self) {
        self.deadline = Instant::now() + READ_TIMEOUT;
    }

    /// What a timed-out connection was doing, for the log.
    pub fn stalled_at(&self) -> String {
        if !self.output.is_empty() {
            return format!(
                "the client did not read {} bytes of answer",
                self.output.len()
            );
        }
        match self.proto {
            Proto::Binary if !self.finished => format!(
                "incomplete message: {} of {MESSAGE_SIZE} bytes (or its trailer)",
                self.input.len()
            ),
            Proto::Json if !self.input.is_empty() => {
                format!("incomplete request line ({} bytes)", self.input.len())
            }
            Proto::Json => "idle".into(),
            _ if self.input.is_empty() && self.output.is_empty() => {
                "the client sent nothing".into()
            }
            _ => "the client sent one byte".into(),
        }
    }

    /// Reads what is available and splits off the complete requests.
    pub fn read(&mut self) -> Input {
        let mut buf = [0u8; 4096];
        let mut closed = false;
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => {
                    if !self.finished {
                        self.input.extend_from_slice(&buf[..n]);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
            if self.input.len() > MAX_LINE {
                break;
            }
        }
        if self.proto == Proto::Unknown {
            self.proto = match self.input.as_slice() {
                [] | [_] => Proto::Unknown,
                [b'{' | b' ' | b'\t' | b'\n' | b'\r', second, ..] if *second != 0 => Proto::Json,
                _ => Proto::Binary,
            };
        }
        let mut requests = Vec::new();
        match self.proto {
            Proto::Unknown => {}
            Proto::Json => {
                if let Some(nul) = self.input.iter().position(|&b| b == 0) {
                    // Lines before the NUL are answered; then the connection ends.
                    self.input.truncate(nul);
                    self.input.push(b'\n');
                    closed = true;
                    requests.push(Request::NotJson);
                }
                while let Some(end) = self.input.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = self.input.drain(..=end).collect();
                    requests.push(Request::Json(
                        String::from_utf8_lossy(&line[..end]).into_owned(),
                    ));
                }
                // The NUL's marker goes last, after the lines before it.
                if let Some(i) = requests.iter().position(|r| *r == Request::NotJson) {
                    let r = requests.remove(i);
                    if let Some(Request::Json(partial)) = requests.last() {
                        if !partial.is_empty() && closed {
                            // The text before the NUL was no complete line: drop it.
                            requests.pop();
                        }
                    }
                    requests.push(r);
                }
                if self.input.len() > MAX_LINE {
                    closed = true;
                }
            }
            Proto::Binary => {
                if let Some(r) = self.take_message() {
                    requests.push(r);
                }
            }
        }
        if closed {
            Input::Closed(requests)
        } else {
            Input::Requests(requests)
        }
    }

    /// The binary message, once it and its trailer are complete; only one per connection.
    fn take_message(&mut self) -> Option<Request> {
        if self.finished || self.input.len() < MESSAGE_SIZE {
            return None;
        }
        let bytes: [u8; MESSAGE_SIZE] = self.input[..MESSAGE_SIZE].try_into().expect("size");
        let msg = Message::from_bytes(bytes);
        let after = &self.input[MESSAGE_SIZE..];
        let len = msg.trailer().len(after)?;
        if after.len() < len {
            return None;
        }
        let trailer = after[..len].to_vec();
        self.input.clear();
        self.finished = true;
        Some(Request::Binary(Box::new(msg), trailer))
    }

    /// Queues answer bytes.
    pub fn queue(&mut self, bytes: &[u8]) {
        self.output.extend_from_slice(bytes);
    }

    /// Whether the connection has done its work: a binary answer written.
    pub fn done(&self) -> bool {
        self.finished && !self.waiting && self.backlog.is_empty() && self.output.is_empty()
    }

    /// Writes as much queued output as the socket takes. Returns whether output is left, or an
    /// error if the client is gone.
    pub fn flush(&mut self) -> std::io::Result<bool> {
        while !self.output.is_empty() {
            match self.stream.write(&self.output) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// Writes the queued output, waiting for the client up to one second: for the last
    /// answers before the connection or the process goes away.
    pub fn flush_blocking(&mut self) {
        if self.stream.set_nonblocking(false).is_err() {
            return;
        }
        let _ = self.stream.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = self.stream.write_all(&self.output);
        self.output.clear();
    }
}

#[cfg(test)]
mod tests {
    use blktap::ctl::binary::{flag, kind, offset};

    use super::*;

    fn json(s: &str) -> Request {
        Request::Json(s.into())
    }

    #[test]
    fn splits_lines_and_answers() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut conn = Conn::new(a).unwrap();
        assert_eq!(conn.read(), Input::Requests(vec![]));
        assert_eq!(conn.proto(), Proto::Unknown);
        b.write_all(b"{").unwrap();
        assert_eq!(conn.read(), Input::Requests(vec![]));
        assert_eq!(conn.proto(), Proto::Unknown);
        b.write_all(b"\"op\":\"list\"}\n{\"op\":").unwrap();
        assert_eq!(
            conn.read(),
            Input::Requests(vec![json("{\"op\":\"list\"}")])
        );
        assert_eq!(conn.proto(), Proto::Json);
        b.write_all(b"\"list\"}\n").unwrap();
        assert_eq!(
            conn.read(),
            Input::Requests(vec![json("{\"op\":\"list\"}")])
        );
        conn.queue(b"{\"ok\":true}\n");
        assert!(!conn.flush().unwrap());
        let mut got = [0u8; 12];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"{\"ok\":true}\n");
        b.write_all(b"last\n").unwrap();
        drop(b);
        assert_eq!(conn.read(), Input::Closed(vec![json("last")]));
        assert!(!conn.done());
    }

    #[test]
    fn overlong_lines_close_the_connection() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut conn = Conn::new(a).unwrap();
        let writer = std::thread::spawn(move || {
            let mut line = vec![b'x'; MAX_LINE + 10];
            line[0] = b'{';
            let _ = b.write_all(&line);
            b
        });
        let mut result = conn.read();
        while result == Input::Requests(vec![]) {
            std::thread::sleep(Duration::from_millis(10));
            result = conn.read();
        }
        assert_eq!(result, Input::Closed(vec![]));
        drop(conn);
        let _ = writer.join();
    }

    #[test]
    fn binary_messages_are_taken_whole_with_their_trailers() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut conn = Conn::new(a).unwrap();
        let pid = Message::new(kind::PID, 0);
        // In pieces: nothing until the whole message is there.
        b.write_all(&pid.as_bytes()[..100]).unwrap();
        assert_eq!(conn.read(), Input::Requests(vec![]));
        assert_eq!(conn.proto(), Proto::Binary);
        assert!(conn.stalled_at().contains("100 of 544"));
        b.write_all(&pid.as_bytes()[100..]).unwrap();
        assert_eq!(
            conn.read(),
            Input::Requests(vec![Request::Binary(Box::new(pid), vec![])])
        );
        assert!(conn.finished);
        // One request per connection: more input is ignored.
        b.write_all(&[7; 600]).unwrap();
        assert_eq!(conn.read(), Input::Requests(vec![]));
        assert!(conn.done());

        // An OPEN with a log path and a key: the trailer is read too.
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut conn = Conn::new(a).unwrap();
        let mut open = Message::new(kind::OPEN, 1);
        open.set_u32(offset::PARAMS_FLAGS, flag::ADD_LOG | flag::OPEN_ENCRYPTED);
        b.write_all(open.as_bytes()).unwrap();
        b.write_all(&[b'l'; 256]).unwrap();
        assert_eq!(conn.read(), Input::Requests(vec![]));
        b.write_all(&[3, 1, 2]).unwrap();
        assert_eq!(conn.read(), Input::Requests(vec![]));
        b.write_all(&[3]).unwrap();
        let Input::Requests(r) = conn.read() else {
            panic!("closed")
        };
        let Request::Binary(m, trailer) = &r[0] else {
            panic!("not binary")
        };
        assert_eq!(m.kind(), kind::OPEN);
        assert_eq!(trailer.len(), 256 + 1 + 3);

        // A NUL second byte is binary (even after '{'); anything else JSON.
        for (start, proto) in [
            (&[b'{', 0][..], Proto::Binary),
            (&[9, 0][..], Proto::Binary),
            (&[0xe7, 3][..], Proto::Binary),
            (&b"no"[..], Proto::Binary),
            (&b"{\""[..], Proto::Json),
            (&b" {"[..], Proto::Json),
        ] {
            let (a, mut b) = UnixStream::pair().unwrap();
            let mut conn = Conn::new(a).unwrap();
            b.write_all(start).unwrap();
            conn.read();
            assert_eq!(conn.proto(), proto, "{start:?}");
        }
    }

    #[test]
    fn a_nul_ends_a_json_connection() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut conn = Conn::new(a).unwrap();
        b.write_all(b"{\"op\":\"list\"}\n{\"x\0rest").unwrap();
        assert_eq!(
            conn.read(),
            Input::Closed(vec![json("{\"op\":\"list\"}"), Request::NotJson])
        );
    }

    #[test]
    fn timeouts_say_what_was_missing() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut conn = Conn::new(a).unwrap();
        assert_eq!(conn.stalled_at(), "the client sent nothing");
        assert!(conn.deadline().is_some());
        conn.waiting = true;
        assert!(conn.deadline().is_none());
    }
}
