//! A throwaway MariaDB server for the tests: `mariadb-install-db` initialises a temporary
//! data directory, `mariadbd` serves it on a free loopback port (no system service, no
//! grant tables), and dropping the handle kills it and removes the directory.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;

/// A running `mariadbd`.
pub struct MariaDb {
    child: Child,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    /// How long initialisation and start-up took.
    pub startup: Duration,
}

fn find(binary: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"])
        .map(|dir| Path::new(dir).join(binary))
        .find(|p| p.is_file())
}

impl MariaDb {
    /// Starts a server; panics (naming `.ci/setup`) when MariaDB is not installed.
    pub fn start() -> MariaDb {
        let began = Instant::now();
        let missing = "MariaDB is not installed: run `bash .ci/setup` (Debian package mariadb-server)";
        let mariadbd = find("mariadbd").expect(missing);
        let install = find("mariadb-install-db").expect(missing);
        let dir = super::temp_dir("mariadb");
        let data = dir.join("data");
        let out = Command::new(&install)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(["--user=root", "--auth-root-authentication-method=normal", "--skip-test-db"])
            .stdin(Stdio::null())
            .output()
            .expect("run mariadb-install-db");
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = std::fs::File::create(dir.join("mariadbd.log")).unwrap();
        let child = Command::new(&mariadbd)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", dir.join("mariadbd.sock").display()))
            .arg(format!("--pid-file={}", dir.join("mariadbd.pid").display()))
            .arg(format!("--port={port}"))
            .args([
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-grant-tables",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=64M",
                "--innodb-flush-log-at-trx-commit=2",
                "--max-connections=500",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mariadbd");
        let mut server = MariaDb { child, port, dir, startup: Duration::ZERO };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if mysql::Conn::new(mysql::Opts::from_url(&server.url("")).unwrap()).is_ok() {
                break;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                let log = std::fs::read_to_string(server.dir.join("mariadbd.log")).unwrap_or_default();
                panic!("mariadbd exited with {status}: {log}");
            }
            assert!(Instant::now() < deadline, "mariadbd did not accept connections within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        server.startup = began.elapsed();
        eprintln!("mariadbd on port {port}, ready in {:?}", server.startup);
        server
    }

    /// The URL of database `name` (empty: none).
    pub fn url(&self, name: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates an empty database and returns its URL.
    pub fn fresh_database(&self, name: &str) -> String {
        let mut conn = mysql::Conn::new(mysql::Opts::from_url(&self.url("")).unwrap()).unwrap();
        conn.query_drop(format!("DROP DATABASE IF EXISTS {name}")).unwrap();
        conn.query_drop(format!("CREATE DATABASE {name} CHARACTER SET utf8mb4")).unwrap();
        self.url(name)
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
