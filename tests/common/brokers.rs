//! Real `redis-server` and `nats-server` processes for the cluster tests, on free loopback
//! ports with throwaway state (both installed by `.ci/setup`), stopped on drop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::free_port;
use std::time::{Duration, Instant};

/// The broker engine.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Engine {
    Redis,
    Nats,
}

/// A broker server child process, killed on drop.
pub struct BrokerServer {
    pub engine: Engine,
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl BrokerServer {
    /// Starts `engine` on a free port (three tries: a port may be taken meanwhile).
    pub fn start(engine: Engine) -> BrokerServer {
        let dir =
            std::env::temp_dir().join(format!("customws-broker-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = BrokerServer { engine, port: 0, dir, child: None };
        for _ in 0..3 {
            server.port = free_port();
            if server.spawn() {
                return server;
            }
        }
        panic!("could not start {engine:?} on a free port");
    }

    /// The `cluster` setting that names it.
    pub fn url(&self) -> String {
        match self.engine {
            Engine::Redis => format!("redis://127.0.0.1:{}", self.port),
            Engine::Nats => format!("nats://127.0.0.1:{}", self.port),
        }
    }

    /// Starts the process on `self.port`; false if it did not come up (port taken).
    fn spawn(&mut self) -> bool {
        let port = self.port.to_string();
        let (binary, args): (&str, Vec<&str>) = match self.engine {
            Engine::Redis => (
                "redis-server",
                vec![
                    "--port",
                    &port,
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                ],
            ),
            Engine::Nats => ("nats-server", vec!["-a", "127.0.0.1", "-p", &port]),
        };
        let child = Command::new(binary)
            .args(&args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {binary} ({e}): install it with .ci/setup (Debian package {binary})")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.answers() {
                return true;
            }
            if let Some(child) = self.child.as_mut()
                && child.try_wait().unwrap().is_some()
            {
                self.child = None;
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        false
    }

    /// Whether the server answers its protocol's greeting.
    fn answers(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        stream.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        if self.engine == Engine::Redis && stream.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 5];
        let expected: &[u8] = if self.engine == Engine::Redis { b"+PONG" } else { b"INFO " };
        stream.read_exact(&mut buf).is_ok() && buf == expected
    }

    /// Sends `signal` (e.g. `-STOP`) to the running process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        assert!(Command::new("kill").args([signal, &pid]).status().unwrap().success());
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn() {
            assert!(Instant::now() < deadline, "{:?} did not restart on port {}", self.engine, self.port);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for BrokerServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A stopped process must be continued to die promptly and close its sockets.
            let _ = Command::new("kill").args(["-CONT", &child.id().to_string()]).status();
        }
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
