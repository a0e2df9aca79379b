//! One HTTP connection of the API: its socket, buffers and where it is in its request.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;

use super::MAX_BODY_BYTES;
use super::chunked::Scan;
use super::routes::Tally;
use crate::http::request::MAX_HEAD_BYTES;

/// Most bytes buffered from a client until its request head has been read and its API key
/// checked: the head alone. Nothing of a body is read before the key is known to be right.
pub(super) const HEAD_CAP: usize = MAX_HEAD_BYTES;
/// Most bytes of a chunked body (sizes, extensions and trailers included) buffered for one
/// request; its decoded data is bounded by [`MAX_BODY_BYTES`].
pub(super) const CHUNKED_CAP: usize = 2 * MAX_BODY_BYTES;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 16 * 1024;

/// The request being served, for the reply's framing and the log.
#[derive(Debug)]
pub(super) struct Current {
    /// Method.
    pub(super) method: String,
    /// Path.
    pub(super) path: String,
    /// The client allows keep-alive.
    pub(super) keep_alive: bool,
    /// When the complete request was received.
    pub(super) started: Instant,
}

/// A call started on the handle, waiting for its outcomes.
#[derive(Debug)]
pub(super) struct Waiting {
    /// Request number: the low half of the completion tag.
    pub(super) seq: u32,
    /// Outcomes so far.
    pub(super) tally: Tally,
    /// The request.
    pub(super) current: Current,
}

/// Where a connection is.
#[derive(Debug)]
pub(super) enum State {
    /// Receiving a request head and body.
    Reading,
    /// A call is in flight; its outcomes arrive through the loop's channel (boxed: a
    /// connection between requests stays small).
    Waiting(Box<Waiting>),
    /// Writing a response; then keep-alive (`Reading`) or `Lingering` when `close`.
    Responding {
        /// Close after the response.
        close: bool,
    },
    /// Response written and our side shut: discard input until the client closes too, so
    /// unread bytes do not turn the close into a reset that could destroy the response.
    Lingering,
    /// `GET /api/v1/events`: a snapshot every second until the client closes; input is
    /// discarded.
    Streaming,
}

/// How a read burst ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fill {
    /// The socket has nothing more for now.
    Blocked,
    /// The input buffer is at its cap; more may be waiting in the socket.
    Full,
    /// The client closed its side.
    Eof,
}

/// One API connection.
#[derive(Debug)]
pub(super) struct Conn {
    /// The socket.
    pub(super) stream: TcpStream,
    /// The client's address, for the log.
    pub(super) peer: SocketAddr,
    /// Unique per accepted connection: tells timers of a reused slab slot apart.
    pub(super) id: u64,
    /// Bytes received and not yet consumed.
    pub(super) input: Vec<u8>,
    /// Bytes to send; `written` of them are sent.
    output: Vec<u8>,
    written: usize,
    /// Where the connection is.
    pub(super) state: State,
    /// When the current state gives up.
    pub(super) deadline: Instant,
    /// The earliest timer entry of this connection in the loop's heap, if any: a later
    /// deadline needs no new entry (that one re-arms), which keeps the heap at about one
    /// entry per connection.
    pub(super) armed: Option<Instant>,
    /// The client shut its sending side.
    pub(super) peer_closed: bool,
    /// `100 Continue` was sent for the request being read.
    pub(super) continue_sent: bool,
    /// Most bytes [`Conn::fill`] buffers: [`HEAD_CAP`] until an authorized head allows its
    /// body (one request; a client pipelining more waits until it is answered).
    pub(super) limit: usize,
    /// Progress through the current request's chunked body.
    pub(super) chunks: Scan,
}

impl Conn {
    /// A fresh connection, reading its first request until `deadline`.
    pub(super) fn new(stream: TcpStream, peer: SocketAddr, id: u64, deadline: Instant) -> Self {
        Conn {
            stream,
            peer,
            id,
            input: Vec::new(),
            output: Vec::new(),
            written: 0,
            state: State::Reading,
            deadline,
            armed: None,
            peer_closed: false,
            continue_sent: false,
            limit: HEAD_CAP,
            chunks: Scan::default(),
        }
    }

    /// Reads what the socket has, up to [`Conn::limit`].
    pub(super) fn fill(&mut self) -> io::Result<Fill> {
        if self.peer_closed {
            return Ok(Fill::Eof);
        }
        loop {
            if self.input.len() >= self.limit {
                return Ok(Fill::Full);
            }
            let start = self.input.len();
            let want = READ_CHUNK.min(self.limit - start);
            self.input.resize(start + want, 0);
            let result = self.stream.read(&mut self.input[start..]);
            let got = match &result {
                Ok(n) => *n,
                Err(_) => 0,
            };
            self.input.truncate(start + got);
            match result {
                Ok(0) => {
                    self.peer_closed = true;
                    return Ok(Fill::Eof);
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Fill::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Bytes queued and not yet written.
    pub(super) fn unsent(&self) -> usize {
        self.output.len() - self.written
    }

    /// Queues bytes to send.
    pub(super) fn queue(&mut self, bytes: &[u8]) {
        self.output.extend_from_slice(bytes);
    }

    /// Writes queued bytes; `Ok(true)` when nothing is left.
    pub(super) fn flush(&mut self) -> io::Result<bool> {
        while self.written < self.output.len() {
            match self.stream.write(&self.output[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.output.clear();
        self.written = 0;
        Ok(true)
    }
}
