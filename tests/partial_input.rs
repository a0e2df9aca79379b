//! A connection's incomplete input — a frame cut between reads, a fragmented message — is held
//! between reads and let go once complete (issue 15: it lives in a box made only while
//! something is incomplete). Messages split every way still arrive whole, in order, and the
//! connection keeps working afterwards.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// Writes `bytes` in two pieces cut at `at`, pausing in between so that the server reads them
/// apart (when it does not, the test still holds: it then checks the whole-frame path).
fn write_cut(s: &mut TcpStream, bytes: &[u8], at: usize) {
    s.write_all(&bytes[..at]).unwrap();
    s.flush().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    s.write_all(&bytes[at..]).unwrap();
}

/// Reads text frames until `count` arrived (bounded by the socket's read timeout).
fn read_texts(s: &mut TcpStream, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let texts: Vec<Value> = parse_frames(&data)
            .into_iter()
            .filter(|(opcode, _)| *opcode == 1)
            .map(|(_, payload)| serde_json::from_slice(&payload).unwrap())
            .collect();
        if texts.len() >= count {
            return texts;
        }
        assert!(Instant::now() < deadline, "only {} of {count} answers: {texts:?}", texts.len());
        let n = s.read(&mut buf).expect("reading answers");
        assert!(n > 0, "EOF after {texts:?}");
        data.extend_from_slice(&buf[..n]);
    }
}

fn request(pid: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"pid": pid, "type": "generic_request", "payload": {"probe": pid}})).unwrap()
}

#[test]
fn messages_cut_between_reads_and_in_fragments_arrive_whole() {
    let server = start(|_| {});
    let mut s = raw_ws_connect(server.local_addr(), &token(1, &[]), None);
    s.set_nodelay(true).unwrap();

    // 1. One frame cut in its header, then one cut in its payload.
    let one = masked_frame(true, 0x1, &request("cut-header"));
    write_cut(&mut s, &one, 1);
    let two = masked_frame(true, 0x1, &request("cut-payload"));
    write_cut(&mut s, &two, two.len() - 3);

    // 2. A fragmented message: three frames, each cut in two, the last one sent together
    //    with a whole message behind it.
    let text = request("fragmented");
    let (a, rest) = text.split_at(10);
    let (b, c) = rest.split_at(10);
    let first = masked_frame(false, 0x1, a);
    write_cut(&mut s, &first, 4);
    let second = masked_frame(false, 0x0, b);
    write_cut(&mut s, &second, second.len() / 2);
    let mut last = masked_frame(true, 0x0, c);
    last.extend_from_slice(&masked_frame(true, 0x1, &request("after")));
    write_cut(&mut s, &last, 7);

    // 3. A ping between two fragments of a message (control frames may interleave).
    let text = request("around-ping");
    let (a, b) = text.split_at(text.len() / 2);
    let mut bytes = masked_frame(false, 0x1, a);
    bytes.extend_from_slice(&masked_frame(true, 0x9, b"p"));
    bytes.extend_from_slice(&masked_frame(true, 0x0, b));
    write_cut(&mut s, &bytes, bytes.len() - 2);

    let pids: Vec<Value> = read_texts(&mut s, 5).into_iter().map(|v| v["pid"].clone()).collect();
    assert_eq!(pids, ["cut-header", "cut-payload", "fragmented", "after", "around-ping"]);

    // Nothing is left over: a plain message afterwards is answered alone.
    s.write_all(&masked_frame(true, 0x1, &request("plain"))).unwrap();
    let answers = read_texts(&mut s, 1);
    assert_eq!((&answers[0]["pid"], &answers[0]["type"]), (&json!("plain"), &json!("generic_response")));
}
