//! A calm restart: with `drain_window`, shutdown closes the clients spread over the window
//! (not all at once), each with 1001 and the reason `server restarting; retry after <n> ms`
//! carrying a per-client, jittered retry hint.

mod common;

use std::collections::HashMap;
use std::io::{ErrorKind, Read};
use std::time::{Duration, Instant};

use common::*;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

const CLIENTS: usize = 1000;
const WINDOW: Duration = Duration::from_secs(2);

struct Closed {
    at: Duration,
    code: u16,
    reason: String,
}

/// The retry hint in `server restarting; retry after <n> ms`.
fn hint(reason: &str) -> u64 {
    reason
        .strip_prefix("server restarting; retry after ")
        .and_then(|rest| rest.strip_suffix(" ms"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("close reason {reason:?} is not the documented one"))
}

#[test]
fn shutdown_spreads_closes_over_the_drain_window_with_retry_hints() {
    let server = start(|c| {
        c.drain_window = WINDOW;
        c.shutdown_timeout = Duration::from_secs(6);
    });
    let addr = server.local_addr();
    let mut streams: Vec<TcpStream> = (0..CLIENTS)
        .map(|i| {
            let s = raw_ws_connect(addr, &token(i as i64 + 1, &[]), None);
            s.set_nonblocking(true).unwrap();
            TcpStream::from_std(s)
        })
        .collect();
    wait_until(Duration::from_secs(10), "every client counted", || {
        metrics_shard_connections(addr).iter().sum::<u64>() == CLIENTS as u64
    });
    let per_shard = metrics_shard_connections(addr);
    assert!(per_shard.iter().all(|&n| n > 0), "clients on both shards: {per_shard:?}");

    let mut poll = Poll::new().unwrap();
    for (i, s) in streams.iter_mut().enumerate() {
        poll.registry().register(s, Token(i), Interest::READABLE).unwrap();
    }
    let started = Instant::now();
    server.shutdown();
    let mut buffers: HashMap<usize, Vec<u8>> = HashMap::new();
    let mut closed: HashMap<usize, Closed> = HashMap::new();
    let mut events = Events::with_capacity(1024);
    let mut buf = [0u8; 4096];
    while closed.len() < CLIENTS {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "only {} of {CLIENTS} closed in 10 s",
            closed.len()
        );
        poll.poll(&mut events, Some(Duration::from_millis(100))).unwrap();
        for event in &events {
            let i = event.token().0;
            if closed.contains_key(&i) {
                continue;
            }
            let data = buffers.entry(i).or_default();
            loop {
                match streams[i].read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => data.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => panic!("client {i}: read failed before its close frame: {e}"),
                }
            }
            if let Some((_, payload)) = parse_frames(data).into_iter().find(|(op, _)| *op == 0x8) {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                let reason = String::from_utf8(payload[2..].to_vec()).unwrap();
                closed.insert(i, Closed { at: started.elapsed(), code, reason });
                // Our EOF ends the close handshake (the server need not linger).
                let _ = streams[i].shutdown(std::net::Shutdown::Write);
            }
        }
    }
    server.wait();

    let mut times: Vec<Duration> = closed.values().map(|c| c.at).collect();
    times.sort();
    let (first, last) = (times[0], times[CLIENTS - 1]);
    assert!(last - first >= WINDOW / 2, "closes from {first:?} to {last:?}: not spread over {WINDOW:?}");
    assert!(last <= WINDOW + Duration::from_secs(1), "last close at {last:?}, window {WINDOW:?}");
    // No tenth of the window holds more than a quarter of the clients (uniform: a tenth).
    let slice = WINDOW / 10;
    for k in 0..12 {
        let (from, to) = (slice * k, slice * (k + 1));
        let n = times.iter().filter(|&&t| t >= from && t < to).count();
        assert!(n <= CLIENTS / 4, "{n} of {CLIENTS} closes between {from:?} and {to:?}");
    }
    let mut hints = Vec::new();
    for (i, c) in &closed {
        assert_eq!(c.code, 1001, "client {i}: close {} {:?}", c.code, c.reason);
        assert!(c.reason.len() <= 123);
        let h = hint(&c.reason);
        assert!(h < WINDOW.as_millis() as u64, "client {i}: hint {h} ms beyond the window");
        hints.push(h);
    }
    hints.sort_unstable();
    hints.dedup();
    assert!(hints.len() > CLIENTS / 4, "hints are jittered per client: only {} distinct", hints.len());
}

#[test]
fn drain_window_must_leave_time_before_shutdown_timeout() {
    let args = ["--drain-window", "10s", "--shutdown-timeout", "10s", "--jwt-secret", "s"].map(String::from);
    let err = customws::Config::load(args, Vec::new()).unwrap_err().to_string();
    assert!(err.contains("drain_window"), "{err}");
}
