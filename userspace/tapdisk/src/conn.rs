//! One client connection on the control socket: request lines in, response lines out.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;

/// What reading from a connection produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    /// Complete request lines (without their newlines).
    Lines(Vec<String>),
    /// The client is gone (end of file or error), or sent a line that is too long; the lines
    /// before that still need answers.
    Closed(Vec<String>),
}

/// A non-blocking client connection with its buffers.
#[derive(Debug)]
pub struct Conn {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Request lines read and not answered yet.
    pub backlog: VecDeque<String>,
    /// Whether the answer to the last request taken must wait (the next ones wait behind it).
    pub waiting: bool,
}

impl Conn {
    /// Wraps an accepted stream, making it non-blocking.
    pub fn new(stream: UnixStream) -> std::io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            backlog: VecDeque::new(),
            waiting: false,
        })
    }

    /// The stream, to register for polling.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Reads what is available and splits off the complete lines.
    pub fn read(&mut self) -> Input {
        let mut buf = [0u8; 4096];
        let mut closed = false;
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => self.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
            if self.input.len() > MAX_LINE && !self.input[..MAX_LINE].contains(&b'\n') {
                break;
            }
        }
        let mut lines = Vec::new();
        while let Some(end) = self.input.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.input.drain(..=end).collect();
            lines.push(String::from_utf8_lossy(&line[..end]).into_owned());
        }
        if self.input.len() > MAX_LINE {
            closed = true;
        }
        if closed {
            Input::Closed(lines)
        } else {
            Input::Lines(lines)
        }
    }

    /// Queues a response line (with its newline).
    pub fn queue(&mut self, line: &str) {
        self.output.extend_from_slice(line.as_bytes());
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
        let _ = self
            .stream
            .set_write_timeout(Some(std::time::Duration::from_secs(1)));
        let _ = self.stream.write_all(&self.output);
        self.output.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_and_answers() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut conn = Conn::new(a).unwrap();
        assert_eq!(conn.read(), Input::Lines(vec![]));
        b.write_all(b"{\"op\":\"list\"}\n{\"op\":").unwrap();
        assert_eq!(conn.read(), Input::Lines(vec!["{\"op\":\"list\"}".into()]));
        b.write_all(b"\"list\"}\n").unwrap();
        assert_eq!(conn.read(), Input::Lines(vec!["{\"op\":\"list\"}".into()]));
        conn.queue("{\"ok\":true}\n");
        assert!(!conn.flush().unwrap());
        let mut got = [0u8; 12];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"{\"ok\":true}\n");
        b.write_all(b"last\n").unwrap();
        drop(b);
        assert_eq!(conn.read(), Input::Closed(vec!["last".into()]));
    }

    #[test]
    fn overlong_lines_close_the_connection() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut conn = Conn::new(a).unwrap();
        let writer = std::thread::spawn(move || {
            let _ = b.write_all(&vec![b'x'; MAX_LINE + 10]);
            b
        });
        let mut result = conn.read();
        while result == Input::Lines(vec![]) {
            std::thread::sleep(std::time::Duration::from_millis(10));
            result = conn.read();
        }
        assert_eq!(result, Input::Closed(vec![]));
        drop(conn);
        let _ = writer.join();
    }
}
