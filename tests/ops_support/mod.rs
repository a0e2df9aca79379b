//! The real `customws` binary for the operator tests: started on a free port with its stderr
//! in a file, signalled by PID, and always killed when the test ends.
#![allow(dead_code, unreachable_pub)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running binary.
pub struct Bin {
    /// The process.
    pub child: Child,
    /// Where the shards listen.
    pub addr: SocketAddr,
    /// Its stderr.
    pub log: PathBuf,
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A file under the system temp dir, unique to this process and `name`.
pub fn temp_file(name: &str, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("customws-ops-{}-{name}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

impl Bin {
    /// Starts the binary with `--listen 127.0.0.1:<free>`, 2 shards, and `args`; `env` adds
    /// environment variables. Waits (bounded) until it listens.
    pub fn start(name: &str, args: &[&str], env: &[(&str, &str)]) -> Bin {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::env::temp_dir().join(format!("customws-ops-{}-{name}.log", std::process::id()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_customws"));
        cmd.args(["--listen", &addr.to_string(), "--shards", "2"]).args(args);
        cmd.env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn the customws binary");
        let mut bin = Bin { child, addr, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = bin.child.try_wait() {
                panic!("the binary exited early with {status}; stderr:\n{}", bin.stderr());
            }
            assert!(Instant::now() < deadline, "not listening within 10 s; stderr:\n{}", bin.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
        bin
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` (e.g. "HUP", "TERM") to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits (bounded) until stderr holds a line for which `pred` holds.
    pub fn wait_for_line(&self, within: Duration, what: &str, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + within;
        while !self.stderr().lines().any(&pred) {
            assert!(
                Instant::now() < deadline,
                "no log line for {what} within {within:?}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits (bounded) for a successful exit; returns stderr.
    pub fn stop(self) -> String {
        self.signal("TERM");
        self.wait_exit()
    }

    /// Waits (bounded) for a successful exit after a signal sent earlier; returns stderr.
    pub fn wait_exit(mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "exit status {status}; stderr:\n{}", self.stderr());
                return self.stderr();
            }
            assert!(Instant::now() < deadline, "no exit within 10 s of SIGTERM; stderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Bin {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
