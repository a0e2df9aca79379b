//! Shared helpers for the chat server's integration tests: a fixture that opens a database
//! (a temporary SQLite file, or a database on the shared MariaDB server), seeds the demo data
//! and starts the real chat server in-process on an ephemeral port; a blocking WebSocket
//! client (tungstenite over TCP) whose reads are bounded so no test can hang; and the flows
//! both backends run.
#![allow(dead_code, unreachable_pub)]

pub mod flows;
pub mod mariadb;

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use customws::Config;
use customws_chat::seed::Seeded;
use customws_chat::{ChatOptions, ChatServer, Db};
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

/// Upper bound of any wait for a message in the tests.
pub const WAIT: Duration = Duration::from_secs(5);

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A fresh temporary directory (removed by [`Fixture`]'s drop).
pub fn temp_dir(tag: &str) -> PathBuf {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("customws-chat-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// The tier's configuration for tests: 2 shards on 127.0.0.1:0, no rate limit.
pub fn test_config() -> Config {
    let mut cfg = Config::default();
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.shards = 2;
    cfg.handshake_timeout = Duration::from_secs(2);
    cfg.shutdown_timeout = Duration::from_secs(2);
    cfg.ack_timeout = Duration::from_secs(3);
    cfg.rate_limit = 0;
    cfg.rate_limit_bytes = 0;
    cfg
}

/// A running chat server over a seeded database.
pub struct Fixture {
    /// The server.
    pub server: ChatServer,
    /// The database URL.
    pub url: String,
    /// alice, bob, carol, dave (see `seed::demo`).
    pub users: Vec<Seeded>,
    dir: Option<PathBuf>,
}

impl Fixture {
    /// SQLite in a temporary file.
    pub fn sqlite() -> Fixture {
        Fixture::sqlite_with(|_, _| {})
    }

    /// SQLite, after `tweak` adjusted the settings.
    pub fn sqlite_with(tweak: impl FnOnce(&mut Config, &mut ChatOptions)) -> Fixture {
        let dir = temp_dir("sqlite");
        let url = format!("sqlite://{}", dir.join("chat.db").display());
        let mut fixture = Fixture::on(&url, tweak);
        fixture.dir = Some(dir);
        fixture
    }

    /// Any database URL: seeds it, then starts the server.
    pub fn on(url: &str, tweak: impl FnOnce(&mut Config, &mut ChatOptions)) -> Fixture {
        let db = Db::open(url, 2).expect("open database");
        let users = customws_chat::seed::demo(&db).expect("seed");
        drop(db);
        let mut cfg = test_config();
        let mut options = ChatOptions { database: url.to_string(), workers: 8, ..ChatOptions::default() };
        tweak(&mut cfg, &mut options);
        let server = customws_chat::start(cfg, &options).expect("start chat server");
        Fixture { server, url: url.to_string(), users, dir: None }
    }

    /// The seeded user named `name`.
    pub fn user(&self, name: &str) -> &Seeded {
        self.users.iter().find(|u| u.username == name).expect("seeded user")
    }

    /// Connects `name` with auto-acknowledgement of chat messages.
    pub fn connect(&self, name: &str) -> Client {
        Client::connect(self.server.local_addr(), &self.user(name).token, true)
    }

    /// Connects `name`; its client never acknowledges chat messages.
    pub fn connect_without_acks(&self, name: &str) -> Client {
        Client::connect(self.server.local_addr(), &self.user(name).token, false)
    }

    /// A fresh connection to the database.
    pub fn db(&self) -> Db {
        Db::open(&self.url, 2).expect("open database")
    }

    /// A message's stored status id (1 sent, 2 delivered, 3 read).
    pub fn status_of(&self, id: i64) -> Option<i64> {
        let db = self.db();
        let mut conn = db.conn().unwrap();
        customws_chat::store::message_status(&mut conn, id).unwrap()
    }

    /// Waits until message `id` has status `want` in the database.
    pub fn wait_status(&self, id: i64, want: i64) {
        wait_until(WAIT, &format!("message {id} status {want}"), || self.status_of(id) == Some(want));
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.server.shutdown();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Polls `cond` every 10 ms until it holds; panics after `timeout` naming `what`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A WebSocket client of the chat server.
pub struct Client {
    ws: WebSocket<TcpStream>,
    /// Messages read but not yet asked for.
    backlog: VecDeque<Value>,
    /// Answer `NEW_CHAT_MESSAGE` with `client_ack` as soon as it is read.
    pub auto_ack: bool,
    next_pid: usize,
}

/// Opens a WebSocket with `token`; the handshake's HTTP status when refused.
pub fn try_connect(addr: SocketAddr, token: &str) -> Result<WebSocket<TcpStream>, u16> {
    let stream = TcpStream::connect(addr).expect("tcp connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_nodelay(true).unwrap();
    let url = format!("ws://{addr}/ws?token={token}");
    match tungstenite::client::client(url.as_str(), stream) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("handshake failed: {e}"),
    }
}

impl Client {
    /// Connects with a session token.
    pub fn connect(addr: SocketAddr, token: &str, auto_ack: bool) -> Client {
        let ws = try_connect(addr, token).unwrap_or_else(|status| panic!("handshake refused with {status}"));
        Client { ws, backlog: VecDeque::new(), auto_ack, next_pid: 0 }
    }

    /// Sends one JSON message.
    pub fn send(&mut self, msg: &Value) {
        self.ws.send(Message::text(msg.to_string())).expect("send");
    }

    /// Sends `{"pid", "type", "payload"}` with a fresh pid; returns the pid.
    pub fn request(&mut self, kind: &str, payload: Value) -> String {
        self.next_pid += 1;
        let pid = format!("c{}", self.next_pid);
        self.send(&json!({ "pid": pid, "type": kind, "payload": payload }));
        pid
    }

    /// Sends a request and returns the answer carrying its pid.
    pub fn call(&mut self, kind: &str, payload: Value) -> Value {
        let pid = self.request(kind, payload);
        self.expect_pid(&pid)
    }

    /// Acknowledges a server message (`client_ack`).
    pub fn ack(&mut self, server_pid: &str) {
        self.send(&json!({ "type": "client_ack", "payload": { "acknowledgedPid": server_pid, "status": "received" } }));
    }

    fn read_one(&mut self, deadline: Instant) -> Option<Value> {
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            self.ws.get_mut().set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
            match self.ws.read() {
                Ok(Message::Text(text)) => {
                    let value: Value = serde_json::from_str(text.as_str()).expect("server sent JSON");
                    if self.auto_ack
                        && value["type"] == "NEW_CHAT_MESSAGE"
                        && let Some(pid) = value["pid"].as_str()
                    {
                        let pid = pid.to_string();
                        self.ack(&pid);
                    }
                    return Some(value);
                }
                Ok(Message::Close(frame)) => panic!("server closed the connection: {frame:?}"),
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    return None;
                }
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    /// The first message (backlog first) that satisfies `pred`, within `timeout`.
    pub fn next_where(&mut self, timeout: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(i).unwrap();
        }
        let deadline = Instant::now() + timeout;
        while let Some(value) = self.read_one(deadline) {
            if pred(&value) {
                return value;
            }
            self.backlog.push_back(value);
        }
        panic!("no {what} within {timeout:?}; got {:?}", self.backlog);
    }

    /// The next message of type `kind`.
    pub fn expect(&mut self, kind: &str) -> Value {
        self.next_where(WAIT, kind, |v| v["type"] == kind)
    }

    /// The next message carrying `pid`.
    pub fn expect_pid(&mut self, pid: &str) -> Value {
        self.next_where(WAIT, &format!("answer to {pid}"), |v| v["pid"] == pid)
    }

    /// Asserts that no message of type `kind` arrived before the answer to a request sent now
    /// (`GET_MY_PROFILE`: it goes through the same worker → shard path as every push, so
    /// anything queued for this user before it shows up first).
    pub fn assert_none_before_marker(&mut self, kind: &str) {
        self.assert_none_before_marker_where(kind, |v| v["type"] == kind);
    }

    /// Like [`Client::assert_none_before_marker`], for messages satisfying `pred`.
    pub fn assert_none_before_marker_where(&mut self, what: &str, pred: impl Fn(&Value) -> bool) {
        let marker = self.request("GET_MY_PROFILE", Value::Null);
        let answer = self.expect_pid(&marker);
        assert_eq!(answer["type"], "MY_PROFILE_DATA");
        let found: Vec<&Value> = self.backlog.iter().filter(|v| pred(v)).collect();
        assert!(found.is_empty(), "unexpected {what}: {found:?}");
    }

    /// Closes the connection.
    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
    }
}
