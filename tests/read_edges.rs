//! Reading on edge-triggered readiness without the confirming `EAGAIN` read (issue 15): a read
//! that returns fewer bytes than the buffer ends the event's reads, unless the event reported
//! the peer's FIN, which raises no new edge; then the reads go on to the EOF.
//!
//! - Data and FIN arriving together: the data is handled and the EOF seen at once (the
//!   connection would otherwise stay open until `pong_wait`).
//! - A frame split across two sends, the second well after the first was read: the second
//!   part raises its own edge.
//! - Messages larger than the shard's 64 KB read buffer, alone and back to back.

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::time::{Duration, Instant};

use common::*;
use tungstenite::Message;

/// Tries of the data + FIN case: the FIN must be seen every time, not by luck of timing.
const TRIES: usize = 20;

#[test]
fn data_and_fin_together_are_both_seen() {
    // A missed EOF would keep the connection until pong_wait (60 s): far beyond the 3 s below.
    let server = start(|c| {
        c.pong_wait = Duration::from_secs(60);
        c.ping_period = Duration::from_secs(50);
    });
    let addr = server.local_addr();
    for i in 0..TRIES {
        let mut s = raw_ws_connect(addr, &token(300 + i as i64, &[]), None);
        // A ping (answered with a pong) and the FIN, back to back.
        s.write_all(&masked_frame(true, 0x9, b"are you there")).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let (ended, took, data) = read_until_closed(&mut s, Duration::from_secs(3));
        assert!(ended.is_some(), "try {i}: the server did not see the FIN (still open after {took:?})");
        let frames = parse_frames(&data);
        assert!(
            frames.iter().any(|(op, payload)| *op == 0xA && payload == b"are you there"),
            "try {i}: the ping sent with the FIN was not answered: {frames:?}"
        );
    }
    wait_until(Duration::from_secs(5), "every connection released", || {
        metric_sum(&metrics(addr), "ws_connections_current") == Some(0.0)
    });
}

#[test]
fn a_frame_completed_later_raises_its_own_read() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut s = raw_ws_connect(addr, &token(400, &[]), None);
    let ping = masked_frame(true, 0x9, b"split across two sends");
    for (first, second) in [(1, ping.len() - 1), (6, ping.len() - 6), (ping.len() - 1, 1)] {
        assert_eq!(first + second, ping.len());
        s.write_all(&ping[..first]).unwrap();
        // Long enough for the server to have read the first part on its own.
        std::thread::sleep(Duration::from_millis(50));
        s.write_all(&ping[first..]).unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + READ_TIMEOUT;
        while !parse_frames(&got).iter().any(|(op, _)| *op == 0xA) {
            assert!(Instant::now() < deadline, "no pong for a ping split at {first}");
            let mut buf = [0u8; 256];
            let n = std::io::Read::read(&mut s, &mut buf).expect("the pong");
            assert!(n > 0, "closed instead of answering the split ping");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(parse_frames(&got), vec![(0xA, b"split across two sends".to_vec())]);
    }
}

#[test]
fn messages_larger_than_the_read_buffer_arrive_whole() {
    let server = start(|c| {
        c.echo_path = Some("/echo".into());
        c.max_message_size = 4 * 1024 * 1024;
    });
    let addr = server.local_addr();
    let (mut ws, _) = try_connect_with(addr, "/echo", &[]).expect("echo handshake");
    let text = |len: usize, seed: u8| -> String {
        (0..len).map(|i| char::from(b'a' + ((i as u8).wrapping_add(seed)) % 26)).collect()
    };
    // Alone: 1 byte under, at and over the 64 KB scratch buffer, and several times it.
    for len in [64 * 1024 - 20, 64 * 1024, 64 * 1024 + 1, 300_000, 3_000_000] {
        let sent = text(len, len as u8);
        ws.send(Message::text(sent.clone())).unwrap();
        match ws.read().unwrap() {
            Message::Text(got) => assert!(got.as_str() == sent, "{len}-byte echo differs"),
            other => panic!("{len} bytes: expected the echo, got {other:?}"),
        }
    }
    // Back to back, in one burst of writes, with a small one between.
    let burst = [text(200_000, 1), text(10, 2), text(150_000, 3), text(70_000, 4)];
    for m in &burst {
        ws.write(Message::text(m.clone())).unwrap();
    }
    ws.flush().unwrap();
    for (i, sent) in burst.iter().enumerate() {
        match ws.read().unwrap() {
            Message::Text(got) => assert!(got.as_str() == sent.as_str(), "burst message {i} differs"),
            other => panic!("burst message {i}: expected the echo, got {other:?}"),
        }
    }
}
