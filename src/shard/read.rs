//! The read side of a connection: bytes → HTTP head or frames → messages.
//!
//! Reads go into the shard's scratch buffer; a connection keeps bytes only for an incomplete
//! HTTP head or frame. Frames are unmasked in place and text messages are routed straight from
//! that buffer.

use std::io::{self, Read};

use super::Shard;
use super::conn::Phase;
use crate::core::ConnKey;
use crate::metrics::ShardMetrics;
use crate::protocol::ClientMessage;
use crate::protocol::envelope::error_notification;
use crate::protocol::router::{SenderCaps, route};
use crate::ws::frame::{parse_close, parse_frame};
use crate::ws::{Assembled, Frame, FrameEncoder, FrameError, FrameKind, OutKind, close};

impl Shard {
    /// Reads until the socket is drained or the per-wake budget is spent.
    pub(super) fn read(&mut self, key: ConnKey) {
        self.read_until(key, Drained::AtWouldBlock);
    }

    /// Reads for a readiness event (edge-triggered). A read that fills less than the buffer
    /// emptied the socket: bytes arriving later raise a new edge, so the `EAGAIN` read that
    /// would confirm it is skipped (one syscall per readable event; tokio does the same).
    /// An event that already reported the peer's FIN (`read_closed`) raises no new edge for
    /// it, so then the reads go on to the EOF.
    pub(super) fn read_ready(&mut self, key: ConnKey, read_closed: bool) {
        let drained = if read_closed { Drained::AtWouldBlock } else { Drained::AtShortRead };
        self.read_until(key, drained);
    }

    fn read_until(&mut self, key: ConnKey, drained: Drained) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut budget_spent = true;
        for _ in 0..super::READS_PER_WAKE {
            let Some(conn) = self.conn_mut(key) else {
                break;
            };
            match conn.stream.read(&mut scratch) {
                Ok(0) => {
                    self.on_eof(key);
                    budget_spent = false;
                    break;
                }
                Ok(n) => {
                    self.ingest(key, &mut scratch, n);
                    if n < scratch.len() && drained == Drained::AtShortRead {
                        budget_spent = false;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    budget_spent = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.drop_conn(key, &format!("read failed: {e}"));
                    budget_spent = false;
                    break;
                }
            }
        }
        // Edge-triggered readiness will not report bytes we left in the socket: come back to
        // this connection on the next iteration, after the others had their turn.
        if budget_spent && self.conn_mut(key).is_some() {
            self.pending_reads.push(key);
        }
        self.scratch = scratch;
    }
}

/// When a socket counts as drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drained {
    /// Only when a read says `EAGAIN` (or EOF).
    AtWouldBlock,
    /// Also when a read returns fewer bytes than asked for.
    AtShortRead,
}

impl Shard {
    /// The peer is done sending; it may still be reading (`shutdown(SHUT_WR)`). Everything it
    /// sent has been handled, so what we owe it (an HTTP response, the 101 and what followed
    /// it, a close reply) is written before the socket goes: the connection is dropped once its
    /// queue is flushed, or at the linger deadline.
    pub(super) fn on_eof(&mut self, key: ConnKey) {
        let deadline = self.close_deadline();
        let Some(conn) = self.conn_mut(key) else {
            return;
        };
        match conn.phase {
            // An incomplete request head: nothing is owed.
            Phase::Http => return self.drop_conn(key, "peer closed the connection"),
            Phase::Open => conn.deadline = deadline,
            Phase::Closing { .. } => {}
        }
        conn.phase = Phase::Closing { peer_done: true };
        if conn.out.is_empty() {
            return self.drop_conn(key, "peer closed the connection");
        }
        let deadline = conn.deadline;
        self.mark_dirty(key);
        self.schedule_before(key, deadline);
    }

    pub(super) fn ingest(&mut self, key: ConnKey, scratch: &mut [u8], n: usize) {
        let Some(conn) = self.conn_mut(key) else {
            return;
        };
        match conn.phase {
            Phase::Closing { .. } => {} // draining until EOF; the bytes mean nothing now
            Phase::Http => {
                conn.inbuf_mut().extend_from_slice(&scratch[..n]);
                self.on_http_bytes(key);
            }
            Phase::Open if conn.inbuf().is_empty() => {
                let used = self.on_frames(key, &mut scratch[..n]);
                if used < n
                    && let Some(conn) = self.conn_mut(key)
                {
                    conn.inbuf_mut().extend_from_slice(&scratch[used..n]);
                }
            }
            Phase::Open => {
                let mut buf = conn.take_inbuf();
                buf.extend_from_slice(&scratch[..n]);
                self.resume_frames(key, buf);
            }
        }
    }

    /// Parses frames out of a connection-owned buffer, keeping only the incomplete tail.
    pub(super) fn resume_frames(&mut self, key: ConnKey, mut buf: Vec<u8>) {
        let used = self.on_frames(key, &mut buf);
        if let Some(conn) = self.conn_mut(key) {
            buf.drain(..used);
            conn.set_inbuf(buf); // an empty one gives the memory back while idle
        }
    }

    /// Handles every complete frame in `buf`; returns the bytes consumed.
    fn on_frames(&mut self, key: ConnKey, buf: &mut [u8]) -> usize {
        let max = self.limits.max_message;
        let mut pos = 0;
        while pos < buf.len() {
            if !self.conn_mut(key).is_some_and(|c| c.phase == Phase::Open) {
                return buf.len();
            }
            match parse_frame(&mut buf[pos..], max) {
                Ok(None) => break,
                Ok(Some(frame)) => {
                    let start = pos;
                    pos += frame.len;
                    let payload = &mut buf[start + frame.payload.start..start + frame.payload.end];
                    self.on_frame(key, &frame, payload);
                }
                Err(e) => {
                    self.fail(key, e);
                    return buf.len();
                }
            }
        }
        pos
    }

    fn on_frame(&mut self, key: ConnKey, frame: &Frame, payload: &mut [u8]) {
        match frame.kind {
            FrameKind::Ping => {
                let pong = FrameEncoder::frame(OutKind::Pong, payload);
                self.sink.push(&mut self.conns, key, pong);
            }
            FrameKind::Pong => {
                let deadline = self.now + self.limits.pong_wait_ms;
                if let Some(conn) = self.conn_mut(key) {
                    conn.read_deadline = deadline;
                }
            }
            FrameKind::Close => self.on_close_frame(key, payload),
            // A binary frame while a text message awaits its continuation is a protocol
            // error (1002, from the reassembly), not an unsupported message.
            FrameKind::Binary if !self.conn_mut(key).is_some_and(|c| c.echo || c.reassembling()) => {
                self.close(key, close::UNSUPPORTED, "binary frames are not supported")
            }
            FrameKind::Text | FrameKind::Binary | FrameKind::Continuation => {
                self.on_data_frame(key, frame, payload)
            }
        }
    }

    fn on_close_frame(&mut self, key: ConnKey, payload: &[u8]) {
        match parse_close(payload) {
            Ok(code) => {
                let reply = code.unwrap_or(close::NORMAL);
                // Codes we may not send back (e.g. 1005 never appears on the wire) were
                // rejected by parse_close; echo the peer's code as RFC 6455 suggests.
                self.close(key, reply, "");
                if let Some(conn) = self.conn_mut(key) {
                    conn.phase = Phase::Closing { peer_done: true };
                }
            }
            Err(e) => self.fail(key, e),
        }
    }

    fn on_data_frame(&mut self, key: ConnKey, frame: &Frame, payload: &mut [u8]) {
        let max = self.limits.max_message;
        let Some(conn) = self.conn_mut(key) else {
            return;
        };
        if conn.echo {
            return self.echo(key, frame, payload);
        }
        match conn.assemble(frame, payload, max) {
            Ok(Assembled::InPlace(FrameKind::Text)) => self.on_text(key, payload),
            Ok(Assembled::Buffered(FrameKind::Text, mut bytes)) => self.on_text(key, &mut bytes),
            Ok(Assembled::InPlace(_) | Assembled::Buffered(..)) => {
                self.close(key, close::UNSUPPORTED, "binary frames are not supported");
            }
            Ok(Assembled::Pending) => {}
            Err(e) => self.fail(key, e),
        }
    }

    /// Echo endpoint: a complete message goes back with its own opcode; text must be UTF-8.
    fn echo(&mut self, key: ConnKey, frame: &Frame, payload: &mut [u8]) {
        let max = self.limits.max_message;
        let Some(conn) = self.conn_mut(key) else { return };
        let assembled = match conn.assemble(frame, payload, max) {
            Ok(assembled) => assembled,
            Err(e) => return self.fail(key, e),
        };
        let (kind, bytes) = match &assembled {
            Assembled::InPlace(kind) => (*kind, &*payload),
            Assembled::Buffered(kind, bytes) => (*kind, bytes.as_slice()),
            Assembled::Pending => return,
        };
        if kind == FrameKind::Text && std::str::from_utf8(bytes).is_err() {
            return self.fail(key, FrameError::InvalidUtf8);
        }
        let out = if kind == FrameKind::Text { OutKind::Text } else { OutKind::Binary };
        let reply = FrameEncoder::frame(out, bytes);
        self.sink.push(&mut self.conns, key, reply);
    }

    /// A protocol violation: count it and close with the matching code.
    fn fail(&mut self, key: ConnKey, error: FrameError) {
        ShardMetrics::inc(&self.metrics().errors);
        if let Some(conn) = self.conn_mut(key) {
            let (user, client, peer) = (conn.user(), conn.client_ip(), conn.peer);
            log::info!(user, client:%, peer:%; "protocol error: {error}");
        }
        self.close(key, error.close_code(), &error.to_string());
    }

    /// One complete text message.
    fn on_text(&mut self, key: ConnKey, text: &mut [u8]) {
        let metrics = self.metrics();
        ShardMetrics::inc(&metrics.messages_in);
        metrics.observe_size(text.len());
        let now_s = (self.now / 1000) as u32;
        if let Some(conn) = self.conn_mut(key) {
            conn.messages_in = conn.messages_in.wrapping_add(1);
            conn.last_active_s = now_s;
        }
        if std::str::from_utf8(text).is_err() {
            self.fail(key, FrameError::InvalidUtf8);
            return;
        }
        let Some(session) = self.conn_mut(key).and_then(|c| c.session.as_deref()) else {
            return;
        };
        let (user, roles) = (session.user, session.roles);
        let caps = SenderCaps {
            can_broadcast: roles.broadcast || self.shared.config.allow_client_broadcast,
            disabled: self.rates.disabled_ops,
        };
        let parsed = ClientMessage::parse(text);
        // Answers to the server's own waits are not charged: the server asked for them.
        let answers_wait = parsed.as_ref().is_ok_and(|msg| self.is_wait_answer(key, msg));
        if !answers_wait && !self.admit_message(key, text.len()) {
            return;
        }
        match parsed {
            Ok(msg) => {
                if self.answers_request(key, msg.pid.as_deref(), text) {
                    return;
                }
                let decision = route(&msg, caps);
                if !answers_wait && self.authorize_first(key, user, &msg, text, &decision) {
                    return;
                }
                self.as_client_work(|s| s.execute(key, user, &msg, text, decision));
            }
            Err(e) => {
                ShardMetrics::inc(&self.metrics().errors);
                let frame = error_notification(None, 400, &format!("malformed message: {e}"));
                self.sink.push(&mut self.conns, key, frame);
            }
        }
    }
}
