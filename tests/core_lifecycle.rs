//! Connection lifecycle: liveness (ping/pong), handshake deadline, one connection per user
//! (close 4000), slow consumers (close 1013), client-initiated close, and graceful shutdown
//! (close 1001) of both the library and the binary on SIGTERM.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tungstenite::Message;

#[test]
fn client_that_never_answers_pings_is_closed() {
    let server = start(|c| {
        c.ping_period = Duration::from_millis(100);
        c.pong_wait = Duration::from_millis(300);
    });
    let addr = server.local_addr();
    let mut raw = raw_ws_connect(addr, &token(1, &[]), None);
    // Reading is not answering: no pong is ever written on this socket.
    let (ended, elapsed, data) = read_until_closed(&mut raw, Duration::from_secs(2));
    let frames = parse_frames(&data);
    assert!(
        ended.is_some(),
        "an unresponsive client was still connected after {elapsed:?} (frames: {:?})",
        frames.iter().map(|f| f.0).collect::<Vec<_>>()
    );
    assert!(
        frames.iter().any(|(op, _)| *op == 0x9),
        "the server never pinged (opcodes received: {:?})",
        frames.iter().map(|f| f.0).collect::<Vec<_>>()
    );
    wait_until(Duration::from_secs(2), "ws_connections_current == 0", || {
        metric_sum(&metrics(addr), "ws_connections_current") == Some(0.0)
    });
}

#[test]
fn client_that_answers_pings_stays_connected() {
    let server = start(|c| {
        c.ping_period = Duration::from_millis(100);
        c.pong_wait = Duration::from_millis(300);
    });
    let addr = server.local_addr();
    let mut c = connect(addr, 1, &[]);
    c.ws.get_ref().set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_millis(1300) {
        // tungstenite writes the pong for a ping on the next read.
        match c.ws.read() {
            Ok(Message::Ping(_)) => pings += 1,
            Ok(Message::Pong(_)) => {}
            Ok(m) => panic!("unexpected message while idling: {m:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("a client answering pings was disconnected after {:?}: {e:?}", start.elapsed()),
        }
    }
    c.ws.get_ref().set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    assert!(pings >= 3, "only {pings} pings in 1.3 s with ping_period 100ms");
    c.roundtrip("alive");
}

#[test]
fn handshake_deadline_closes_stalled_connections() {
    let server = start(|c| c.handshake_timeout = Duration::from_millis(300));
    let addr = server.local_addr();
    // Sends nothing at all.
    let mut idle = tcp(addr);
    // Sends half a request head and stalls (slowloris).
    let mut partial = tcp(addr);
    partial.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n").unwrap();
    for (name, s) in [("idle", &mut idle), ("partial", &mut partial)] {
        let (ended, elapsed, _) = read_until_closed(s, Duration::from_secs(2));
        assert!(
            ended.is_some(),
            "{name} connection still open after {elapsed:?} with handshake_timeout 300ms"
        );
    }
}

#[test]
fn newer_connection_of_the_same_user_replaces_the_older_with_4000() {
    let server = start(|c| c.connections_per_user = 1);
    let addr = server.local_addr();
    let mut first = connect(addr, 7, &[]);
    first.roundtrip("first-ready");
    let mut second = connect(addr, 7, &[]);
    first.expect_close(4000);
    second.roundtrip("second-works");

    // Messages to user 7 now reach the newer connection.
    let mut other = connect(addr, 8, &[]);
    other.send_p2p_acked(7, "to-7", &json!({"hi": 7}));
    let ev = second.recv_of_type("data_event");
    assert_eq!(ev["fromUserId"], 8);
    wait_until(Duration::from_secs(3), "ws_connections_current == 2", || {
        metric_sum(&metrics(addr), "ws_connections_current") == Some(2.0)
    });
}

/// A never-reading consumer (tiny SO_RCVBUF) and a reading one receive `N` ~1 KiB broadcasts
/// with `send_queue = 16`, `send_queue_bytes = 64KiB`. `pace`: after every `pace` broadcasts
/// the broadcaster waits for a `generic_response` (bursts per loop iteration stay small).
fn slow_consumer_scenario(pace: Option<usize>) {
    const N: usize = 5000;
    let server = start(|c| {
        c.send_queue = 16;
        c.send_queue_bytes = 64 * 1024;
    });
    let addr = server.local_addr();

    // Never reads, tiny receive buffer.
    let mut slow = raw_ws_connect(addr, &token(3, &[]), Some(4096));
    let mut fast = connect(addr, 2, &[]);
    let mut caster = connect(addr, 1, &["broadcast"]);

    let reader = std::thread::spawn(move || {
        for i in 0..N {
            let ev = fast.recv_json();
            assert_eq!(ev["type"], "data_event", "fast receiver got {ev}");
            assert_eq!(ev["fromUserId"], 1, "{ev}");
            assert_eq!(ev["payload"]["seq"], i, "fast receiver out of order");
        }
        fast
    });

    let pad = "x".repeat(1000);
    for i in 0..N {
        caster.send_json(&format!(r#"{{"type":"data_request","payload":{{"seq":{i},"pad":"{pad}"}}}}"#));
        if pace.is_some_and(|p| (i + 1) % p == 0) {
            caster.roundtrip(&format!("pace-{i}"));
        }
    }
    let mut fast = match reader.join() {
        Ok(c) => c,
        Err(e) => std::panic::resume_unwind(e),
    };
    fast.roundtrip("fast-still-open");
    caster.roundtrip("caster-still-open");

    wait_until(Duration::from_secs(3), "customws_slow_consumer_closes_total >= 1", || {
        metric_sum(&metrics(addr), "customws_slow_consumer_closes_total").is_some_and(|v| v >= 1.0)
    });

    let (ended, elapsed, data) = read_until_closed(&mut slow, Duration::from_secs(5));
    let frames = parse_frames(&data);
    let texts = frames.iter().filter(|(op, _)| *op == 0x1).count();
    assert!(
        ended.is_some(),
        "the slow consumer was still connected {elapsed:?} after draining ({texts} texts)"
    );
    assert!(texts < N, "the slow consumer received all {N} messages");
    if let Some(code) = close_code(&frames) {
        assert_eq!(code, 1013, "slow-consumer close code");
    }
}

#[test]
fn slow_consumer_is_closed_while_fast_receiver_gets_everything_in_order() {
    slow_consumer_scenario(None);
}

#[test]
fn slow_consumer_is_closed_while_fast_receiver_gets_everything_paced() {
    slow_consumer_scenario(Some(8));
}

#[test]
fn client_close_is_answered_and_the_connection_released() {
    let server = start(|_| {});
    let addr = server.local_addr();
    let mut c = connect(addr, 1, &[]);
    c.roundtrip("ready");
    c.ws.close(None).unwrap();
    let mut got_close = false;
    loop {
        match c.ws.read() {
            Ok(Message::Close(_)) => got_close = true,
            Ok(m) => panic!("unexpected {m:?} after sending close"),
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("closing handshake failed: {e:?}"),
        }
    }
    assert!(got_close, "the server did not answer the close frame");
    wait_until(Duration::from_secs(3), "ws_connections_current == 0", || {
        metric_sum(&metrics(addr), "ws_connections_current") == Some(0.0)
    });
}

#[test]
fn library_shutdown_closes_every_client_with_1001() {
    let server = start(|c| c.shutdown_timeout = Duration::from_secs(3));
    let addr = server.local_addr();
    let mut clients = vec![connect_on_shard(addr, 100, &[], 0), connect_on_shard(addr, 101, &[], 1)];
    for u in 102..110 {
        clients.push(connect(addr, u, &[]));
    }
    let shards = metrics_shard_connections(addr);
    assert_eq!(shards[0] + shards[1], 10, "{shards:?}");
    assert!(shards[0] >= 1 && shards[1] >= 1, "{shards:?}");

    server.shutdown();
    for c in &mut clients {
        c.expect_close(1001);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        server.wait();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("ServerHandle::wait did not return within shutdown_timeout + 2 s");
    assert!(TcpStream::connect(addr).is_err(), "the listener still accepts after shutdown");
}

#[test]
fn binary_sigterm_closes_clients_with_1001_and_exits_zero() {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let log = std::env::temp_dir().join(format!("customws-sigterm-{}.log", std::process::id()));
    let child = Command::new(env!("CARGO_BIN_EXE_customws"))
        .args([
            "--listen",
            &addr.to_string(),
            "--jwt-secret",
            SECRET,
            "--shards",
            "2",
            "--shutdown-timeout",
            "3s",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn the customws binary");
    let mut child = ChildGuard(child);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("the binary exited early with {status}; stderr:\n{}", log_text());
        }
        assert!(
            Instant::now() < deadline,
            "the binary did not listen on {addr} within 10 s; stderr:\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(http_get(addr, "/health", &[]).status, 200);

    let mut clients: Vec<Client> = (1..=3).map(|u| connect(addr, u, &[])).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.roundtrip(&format!("ready-{i}"));
    }

    let status = Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().unwrap();
    assert!(status.success(), "kill -TERM failed");
    for c in &mut clients {
        c.expect_close(1001);
    }

    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the binary did not exit within 5 s of SIGTERM (shutdown_timeout 3s); stderr:\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status} after SIGTERM; stderr:\n{}", log_text());
    let _ = std::fs::remove_file(&log);
}

#[test]
fn a_second_server_on_the_same_port_is_refused() {
    let first = start(|_| {});
    let taken = first.local_addr();
    let mut cfg = test_config();
    cfg.listen = taken;
    let err = customws::start(cfg).expect_err("SO_REUSEPORT must not let a second server share the port");
    assert!(err.to_string().contains(&taken.to_string()), "{err}");
}
