//! Memory under hostile clients (issue 5, item 6; SECURITY.md "Measured"): a frame header
//! announcing 1 GiB, fragments that never end, clients that never read, and slowloris
//! handshakes. Each scenario runs against an in-process server while this process's resident
//! memory is measured from `/proc/self/status`: `VmRSS` before, the peak `VmHWM` during (the
//! peak is reset first through `/proc/self/clear_refs`) and `VmRSS` after. The scenarios take
//! a lock so that no two of them run at once; run with `--nocapture` to see the figures.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// Growth of resident memory any one scenario may cause.
const BOUND_KIB: u64 = 32 * 1024;

static ONE_AT_A_TIME: LazyLock<Mutex<()>> = LazyLock::new(|| Mutex::new(()));

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Runs `scenario` and asserts the process's resident memory grew by less than [`BOUND_KIB`]
/// at its peak. Prints `before / peak / after` in KiB.
fn measured(name: &str, scenario: impl FnOnce()) {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let before = status_kib("VmRSS");
    // "5" resets the peak resident set size (Linux 4.0+); without it the peak is the
    // process's lifetime peak and only the final RSS is meaningful.
    let peak_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let started = Instant::now();
    scenario();
    let after = status_kib("VmRSS");
    let peak = if peak_reset { status_kib("VmHWM") } else { after };
    let growth = peak.max(after).saturating_sub(before);
    println!(
        "memory {name}: VmRSS before {before} KiB, peak {peak} KiB, after {after} KiB, \
         growth {growth} KiB, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(growth < BOUND_KIB, "{name}: resident memory grew {growth} KiB (bound {BOUND_KIB} KiB)");
}

/// A masked client frame.
fn client_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    customws::ws::frame::masked_frame(first_byte, payload, [0x37, 0xfa, 0x21, 0x3d])
}

/// Writes `frame` until the peer stops accepting it or `stop` is set; returns the bytes sent.
fn write_until_stopped(s: &mut TcpStream, frames: impl Iterator<Item = Vec<u8>>, stop: &AtomicBool) -> usize {
    let mut sent = 0;
    for frame in frames {
        if stop.load(Ordering::Relaxed) || s.write_all(&frame).is_err() {
            break;
        }
        sent += frame.len();
    }
    sent
}

#[test]
fn frame_headers_announcing_1_gib_are_closed_1009_at_once() {
    let server = start(|_| {});
    let addr = server.local_addr();
    measured("1 GiB frame headers x16", || {
        let mut header = vec![0x81, 0x80 | 127];
        header.extend_from_slice(&(1u64 << 30).to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4]);
        let mut socks: Vec<TcpStream> = (0..16).map(|_| raw_ws_connect(addr, &token(1, &[]), None)).collect();
        let sent_at = Instant::now();
        for s in &mut socks {
            s.write_all(&header).unwrap();
            let _ = s.write_all(&[b'x'; 16 * 1024]); // the start of the gigabyte
        }
        for s in &mut socks {
            let (ended, _, data) = read_until_closed(s, Duration::from_secs(5));
            assert_eq!(close_code(&parse_frames(&data)), Some(1009), "close code for a 1 GiB header");
            assert!(ended.is_some(), "the connection stayed open after its close frame");
        }
        let took = sent_at.elapsed();
        println!("1 GiB headers: 16 connections closed 1009 within {took:?}");
        assert!(took < Duration::from_secs(1), "closing 16 announced gigabytes took {took:?}");
    });
    wait_until(Duration::from_secs(5), "every hostile connection released", || {
        metric_sum(&metrics(addr), "ws_connections_current") == Some(0.0)
    });
}

#[test]
fn fragments_forever_are_closed_1009_once_the_message_passes_max() {
    let server = start(|c| c.max_message_size = 64 * 1024);
    let addr = server.local_addr();
    measured("endless fragments x4", || {
        let clients: Vec<_> = (0..4)
            .map(|i| {
                let mut s = raw_ws_connect(addr, &token(10 + i, &[]), None);
                let mut reader = s.try_clone().unwrap();
                let stop = Arc::new(AtomicBool::new(false));
                let stop_writer = Arc::clone(&stop);
                let writer = std::thread::spawn(move || {
                    let chunk = vec![b'a'; 4096];
                    let first = std::iter::once(client_frame(0x01, &chunk)); // text, FIN = 0
                    let more = std::iter::repeat_with(|| client_frame(0x00, &chunk)).take(4096); // 16 MiB
                    write_until_stopped(&mut s, first.chain(more), &stop_writer)
                });
                let reader = std::thread::spawn(move || {
                    let result = read_until_closed(&mut reader, Duration::from_secs(10));
                    stop.store(true, Ordering::Relaxed);
                    result
                });
                (writer, reader)
            })
            .collect();
        for (writer, reader) in clients {
            let (ended, elapsed, data) = reader.join().unwrap();
            let sent = writer.join().unwrap();
            assert_eq!(
                close_code(&parse_frames(&data)),
                Some(1009),
                "close code after {sent} bytes of fragments"
            );
            assert!(ended.is_some(), "still open {elapsed:?} after fragments passed max_message_size");
            assert!(
                sent < 16 * 1024 * 1024,
                "the server kept reading fragments ({sent} bytes) without closing"
            );
            println!("endless fragments: closed 1009 after {sent} bytes written, in {elapsed:?}");
        }
    });
}

#[test]
fn a_client_that_never_reads_is_closed_1013_when_its_queue_overflows() {
    let server = start(|c| {
        c.send_queue = 256;
        c.send_queue_bytes = 1024 * 1024;
    });
    let addr = server.local_addr();
    measured("never reads, queue overflow (1 MiB queue)", || {
        let mut s = raw_ws_connect(addr, &token(20, &[]), Some(4096));
        let stop = AtomicBool::new(false);
        let pad = "p".repeat(8 * 1024);
        let requests = (0..2000).map(|i| {
            let text = json!({"pid": format!("q{i}"), "type": "generic_request", "payload": pad}).to_string();
            client_frame(0x81, text.as_bytes())
        });
        // Each request asks for an 8 KiB answer that is never read: 16 MB in all.
        let sent = write_until_stopped(&mut s, requests, &stop);
        wait_until(Duration::from_secs(5), "customws_slow_consumer_closes_total >= 1", || {
            metric_sum(&metrics(addr), "customws_slow_consumer_closes_total").is_some_and(|v| v >= 1.0)
        });
        let (ended, elapsed, data) = read_until_closed(&mut s, Duration::from_secs(10));
        assert!(ended.is_some(), "still connected {elapsed:?} after the overflow ({sent} bytes sent)");
        let code = close_code(&parse_frames(&data));
        if let Some(code) = code {
            assert_eq!(code, 1013, "slow-consumer close code");
        }
        println!("never reads: {sent} bytes of requests written; close frame seen by the client: {code:?}");
    });
}

#[test]
fn a_client_whose_socket_accepts_nothing_is_dropped_after_write_wait() {
    let server = start(|c| {
        c.write_wait = Duration::from_millis(500);
        c.send_queue = 100_000;
        c.send_queue_bytes = 64 * 1024 * 1024; // the queue never overflows: write_wait decides
    });
    let addr = server.local_addr();
    measured("never reads, write_wait 500 ms (64 MiB queue)", || {
        let mut s = raw_ws_connect(addr, &token(21, &[]), Some(4096));
        let stop = AtomicBool::new(false);
        let pad = "w".repeat(16 * 1024);
        let requests = (0..600).map(|i| {
            let text = json!({"pid": format!("q{i}"), "type": "generic_request", "payload": pad}).to_string();
            client_frame(0x81, text.as_bytes())
        });
        // ~10 MB of answers: more than the kernel buffers (tcp_wmem max 4 MiB + 4 KiB) hold, so
        // the server's writes stop making progress while the requests are still arriving.
        let started = Instant::now();
        write_until_stopped(&mut s, requests, &stop);
        let last_write = Instant::now();
        wait_until(Duration::from_secs(5), "the stuck connection dropped", || {
            metric_sum(&metrics(addr), "ws_connections_current") == Some(0.0)
        });
        println!(
            "write_wait: requests written in {:?}, connection dropped {:?} after the last one",
            last_write - started,
            last_write.elapsed()
        );
        assert!(last_write.elapsed() < Duration::from_secs(2), "dropped long after write_wait");
        assert_eq!(
            metric_sum(&metrics(addr), "customws_slow_consumer_closes_total"),
            Some(0.0),
            "the queue bound was not what closed it"
        );
        let (ended, _, _) = read_until_closed(&mut s, Duration::from_secs(5));
        assert!(ended.is_some(), "the client still sees an open connection");
    });
}

#[test]
fn slowloris_handshakes_cost_bounded_memory_and_end_at_the_deadline() {
    let server = start(|c| c.handshake_timeout = Duration::from_millis(500));
    let addr = server.local_addr();
    measured("slowloris x200 (8000-byte partial heads)", || {
        let head = format!("GET /ws HTTP/1.1\r\nHost: x\r\nX-Pad: {}", "a".repeat(8000 - 34));
        let mut socks: Vec<TcpStream> = (0..200).map(|_| tcp(addr)).collect();
        let started = Instant::now();
        for s in &mut socks {
            s.write_all(head.as_bytes()).unwrap();
        }
        // Trickle one more byte to each every 50 ms while the deadline runs.
        while started.elapsed() < Duration::from_millis(400) {
            for s in &mut socks {
                let _ = s.write_all(b"a");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for s in &mut socks {
            let (ended, _, data) = read_until_closed(s, Duration::from_secs(2));
            assert!(ended.is_some(), "a slowloris connection outlived the handshake deadline");
            assert!(data.is_empty(), "a timed-out handshake got an answer");
        }
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1500), "200 slowloris handshakes took {took:?} to end");
    });
}
