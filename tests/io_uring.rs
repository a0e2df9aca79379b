//! The io_uring driver (`io_driver`): it really runs when asked for, and where io_uring is
//! blocked — here by a seccomp filter like a container runtime's, installed in the server's
//! process before it starts — the server says so in its log and serves on epoll.
#![cfg(all(target_os = "linux", feature = "io-uring"))]

mod common;

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use customws::config::IoDriver;
use serde_json::json;

/// `io_uring_setup` (the same number on x86_64 and the asm-generic architectures).
const SYS_IO_URING_SETUP: u32 = 425;

/// Installs a seccomp filter that fails `io_uring_setup` with `EPERM` and allows everything
/// else (what Docker's default profile does). Runs in the child between fork and exec.
fn block_io_uring() -> std::io::Result<()> {
    // Classic BPF over `struct seccomp_data` (its first word is the syscall number).
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    let filter = [
        libc::sock_filter { code: LD_W_ABS, jt: 0, jf: 0, k: 0 },
        libc::sock_filter { code: JEQ_K, jt: 0, jf: 1, k: SYS_IO_URING_SETUP },
        libc::sock_filter { code: RET_K, jt: 0, jf: 0, k: SECCOMP_RET_ERRNO | libc::EPERM as u32 },
        libc::sock_filter { code: RET_K, jt: 0, jf: 0, k: SECCOMP_RET_ALLOW },
    ];
    let program = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut _ };
    // SAFETY: plain prctl calls with a filter that outlives them (the kernel copies it).
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &program as *const libc::sock_fprog)
            != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Starts the binary with `io_driver`, io_uring blocked or not; returns it once it listens.
fn spawn(driver: &str, blocked: bool, log: &PathBuf) -> (ChildGuard, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_customws"));
    command
        .args(["--listen", &addr.to_string(), "--jwt-secret", SECRET, "--shards", "2"])
        .args(["--io-driver", driver, "--log-level", "info"])
        .env_remove("CUSTOMWS_IO_DRIVER")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    if blocked {
        // SAFETY: `block_io_uring` only calls prctl (async-signal-safe) between fork and exec.
        unsafe { command.pre_exec(block_io_uring) };
    }
    let mut child = ChildGuard(command.spawn().expect("spawn the customws binary"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("the binary exited with {status}; stderr:\n{}", read(log));
        }
        assert!(Instant::now() < deadline, "not listening within 10 s; stderr:\n{}", read(log));
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, addr)
}

fn read(log: &PathBuf) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

fn log_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("customws-{name}-{}.log", std::process::id()))
}

/// Connect, P2P both ways with acks, a round trip, close: the server serves.
fn serve(addr: SocketAddr) {
    let mut a = connect(addr, 1, &[]);
    let mut b = connect(addr, 2, &[]);
    a.send_p2p_acked(2, "p1", &json!({"n": 1}));
    assert_eq!(b.recv_of_type("data_event")["payload"]["n"], 1);
    b.send_p2p_acked(1, "p2", &json!({"n": 2}));
    assert_eq!(a.recv_of_type("data_event")["payload"]["n"], 2);
    a.roundtrip("r1");
    a.close();
    b.close();
}

#[test]
fn blocked_io_uring_falls_back_to_epoll_and_says_so() {
    for driver in ["auto", "io_uring"] {
        let log = log_path(&format!("uring-blocked-{driver}"));
        let (_child, addr) = spawn(driver, true, &log);
        serve(addr);
        let text = read(&log);
        assert!(
            text.contains("io_uring unavailable (Operation not permitted")
                && text.contains(&format!("io_driver {driver} falls back to epoll")),
            "no fallback warning naming the error:\n{text}"
        );
        assert!(text.contains("io driver epoll"), "the start-up line names another driver:\n{text}");
        let _ = std::fs::remove_file(&log);
    }
}

#[test]
fn io_uring_runs_when_it_can_be_set_up() {
    // The filter of the test above, unused here, must not be what makes the difference.
    let log = log_path("uring-open");
    let (_child, addr) = spawn("io_uring", false, &log);
    serve(addr);
    let text = read(&log);
    assert!(text.contains("io driver io_uring"), "{text}");
    assert!(!text.contains("falls back"), "{text}");
    let _ = std::fs::remove_file(&log);

    // In process too, with the sockets closed by the server: the close reaches the client
    // (the cancelled receive let the socket go).
    let server = start(|c| c.io_driver = IoDriver::IoUring);
    assert_eq!(server.io_driver(), "io_uring");
    serve(server.local_addr());
    let mut c = connect(server.local_addr(), 3, &[]);
    server.shutdown();
    c.expect_close(1001);
}

#[test]
fn epoll_is_the_driver_asked_for() {
    let server = start(|c| c.io_driver = IoDriver::Epoll);
    assert_eq!(server.io_driver(), "epoll");
    serve(server.local_addr());
}

#[test]
fn a_server_going_away_does_not_interrupt_the_thread_that_started_it() {
    // The kernel ties a ring to the threads that set it up and interrupts them when it goes:
    // with the rings set up in `start`, this thread's blocking read (with a timeout) failed
    // with EINTR when another server was dropped.
    let server = start(|c| c.io_driver = IoDriver::IoUring);
    let mut client = connect(server.local_addr(), 1, &[]);
    let going = start(|c| c.io_driver = IoDriver::IoUring);
    let dropper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        drop(going);
    });
    client.expect_silence(Duration::from_millis(800));
    dropper.join().unwrap();
}
