//! The kernel's own floor: CPU the kernel charges for loopback TCP writes and reads on this
//! machine, to put beside the server's per-message figures.
//!
//! ```text
//! cargo bench --bench floor -- [--pairs 1000] [--size 100] [--batch 8] [--secs 1.0]
//!                               [--read-gap-ms 1]
//! ```
//!
//! N connected loopback socket pairs; a reader thread (mio) drains the receiving ends while the
//! main thread writes. CPU is the writing thread's own (getrusage RUSAGE_THREAD), not wall time:
//! (a) one `size`-byte `write` per socket in turn, many rounds; (b) `batch` frames of `size`
//! bytes per socket with one `writev`; (c) one `read` of a `size`-byte message per socket (and
//! the same followed by the `EAGAIN` read an edge-triggered loop does). The reads happen
//! `--read-gap-ms` (default 1) after the writes; reading immediately after the write costs
//! noticeably more here and is reported too. Prints one JSON object.

use std::io::{self, IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use serde_json::{Value, json};

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Timeval {
    sec: i64,
    usec: i64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Rusage {
    utime: Timeval,
    stime: Timeval,
    rest: [i64; 14],
}

unsafe extern "C" {
    fn getrusage(who: i32, usage: *mut Rusage) -> i32;
}

const RUSAGE_SELF: i32 = 0;
const RUSAGE_THREAD: i32 = 1;

/// User and system CPU microseconds of the calling thread or of the process.
#[derive(Clone, Copy)]
struct Cpu {
    user: f64,
    sys: f64,
}

impl Cpu {
    fn total(self) -> f64 {
        self.user + self.sys
    }
    fn minus(self, o: Cpu) -> Cpu {
        Cpu { user: self.user - o.user, sys: self.sys - o.sys }
    }
}

fn cpu(who: i32) -> Cpu {
    let mut r = Rusage::default();
    // SAFETY: `r` is a properly sized, writable `struct rusage` for x86_64/aarch64 Linux.
    let rc = unsafe { getrusage(who, &mut r) };
    assert_eq!(rc, 0, "getrusage failed");
    Cpu {
        user: r.utime.sec as f64 * 1e6 + r.utime.usec as f64,
        sys: r.stime.sec as f64 * 1e6 + r.stime.usec as f64,
    }
}

fn thread_cpu() -> Cpu {
    cpu(RUSAGE_THREAD)
}

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn opt<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Reader thread: drains every receiving end, counting bytes, until told to stop.
fn spawn_reader(
    ends: Vec<TcpStream>,
    read_bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<(Cpu, u64)> {
    thread::spawn(move || {
        let c0 = thread_cpu();
        let mut poll = Poll::new().expect("poll");
        let mut socks: Vec<mio::net::TcpStream> =
            ends.into_iter().map(mio::net::TcpStream::from_std).collect();
        for (i, s) in socks.iter_mut().enumerate() {
            poll.registry().register(s, Token(i), Interest::READABLE).expect("register");
        }
        let mut events = Events::with_capacity(1024);
        let mut buf = vec![0u8; 64 * 1024];
        let mut reads = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if poll.poll(&mut events, Some(Duration::from_millis(20))).is_err() {
                continue;
            }
            for ev in events.iter() {
                let s = &mut socks[ev.token().0];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            reads += 1;
                            read_bytes.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            }
        }
        (thread_cpu().minus(c0), reads)
    })
}

fn wait_drained(read_bytes: &AtomicU64, want: u64) -> bool {
    let end = Instant::now() + Duration::from_secs(20);
    while read_bytes.load(Ordering::Relaxed) < want {
        if Instant::now() > end {
            return false;
        }
        thread::sleep(Duration::from_micros(200));
    }
    true
}

/// Writes `frames` (one `write`, or one `writev` when several) to each socket in turn until the
/// writing thread has used `secs` of CPU.
fn write_phase(
    writers: &mut [TcpStream],
    frames: &[Vec<u8>],
    secs: f64,
    read_bytes: &AtomicU64,
) -> io::Result<Value> {
    let per_socket: usize = frames.iter().map(Vec::len).sum();
    let bytes0 = read_bytes.load(Ordering::Relaxed);
    let p0 = cpu(RUSAGE_SELF);
    let t0 = Instant::now();
    let c0 = thread_cpu();
    let mut calls = 0u64;
    let mut partial = 0u64;
    let mut rounds = 0u64;
    let slices: Vec<IoSlice<'_>> = frames.iter().map(|f| IoSlice::new(f)).collect();
    let flat: Vec<u8> = frames.concat();
    loop {
        for w in writers.iter_mut() {
            let n = if slices.len() == 1 { w.write(&flat)? } else { w.write_vectored(&slices)? };
            calls += 1;
            if n < per_socket {
                partial += 1;
                w.write_all(&flat[n..])?;
            }
        }
        rounds += 1;
        if rounds.is_multiple_of(8) && thread_cpu().minus(c0).total() >= secs * 1e6 {
            break;
        }
    }
    let c = thread_cpu().minus(c0);
    let wall_write = t0.elapsed().as_secs_f64();
    let want = bytes0 + rounds * writers.len() as u64 * per_socket as u64;
    let drained = wait_drained(read_bytes, want);
    let p = cpu(RUSAGE_SELF).minus(p0);
    let nframes = calls * frames.len() as u64;
    Ok(json!({
        "rounds": rounds,
        "calls": calls,
        "frames": nframes,
        "partial_writes": partial,
        "bytes_per_call": per_socket,
        "thread_cpu_us": r3(c.total()),
        "thread_cpu_us_per_call": r3(c.total() / calls as f64),
        "thread_cpu_us_per_frame": r3(c.total() / nframes as f64),
        "thread_user_us_per_call": r3(c.user / calls as f64),
        "thread_sys_us_per_call": r3(c.sys / calls as f64),
        "wall_us_per_call": r3(wall_write * 1e6 / calls as f64),
        "process_cpu_us_per_frame_incl_reader": r3(p.total() / nframes as f64),
        "all_read_back": drained,
    }))
}

/// One `size`-byte message into every socket, then one `read` of it per socket (measured);
/// with `eagain`, a second read that returns `WouldBlock` (what an edge-triggered loop does).
fn read_phase(
    writers: &mut [TcpStream],
    readers: &mut [TcpStream],
    size: usize,
    secs: f64,
    eagain: bool,
    gap_ms: f64,
) -> io::Result<Value> {
    let msg = vec![b'r'; size];
    let mut buf = vec![0u8; 64 * 1024];
    let mut measured = 0.0f64;
    let mut user = 0.0f64;
    let mut reads = 0u64;
    let mut short = 0u64;
    let mut would_block = 0u64;
    let end = Instant::now() + Duration::from_secs_f64(secs * 6.0 + 5.0);
    while measured < secs * 1e6 && Instant::now() < end {
        for w in writers.iter_mut() {
            w.write_all(&msg)?;
        }
        // Loopback delivers within the write (counted below if it ever did not); the optional
        // gap lets the receive side settle (delayed ACKs etc.) as on a server reading later.
        if gap_ms > 0.0 {
            thread::sleep(Duration::from_secs_f64(gap_ms / 1000.0));
        }
        let c0 = thread_cpu();
        for r in readers.iter_mut() {
            match r.read(&mut buf) {
                Ok(n) if n == size => {}
                Ok(_) => short += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => would_block += 1,
                Err(e) => return Err(e),
            }
            if eagain {
                match r.read(&mut buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    _ => short += 1,
                }
            }
        }
        let c = thread_cpu().minus(c0);
        measured += c.total();
        user += c.user;
        reads += readers.len() as u64;
    }
    Ok(json!({
        "messages": reads,
        "syscalls_per_message": if eagain { 2 } else { 1 },
        "thread_cpu_us_per_message": r3(measured / reads as f64),
        "thread_user_us_per_message": r3(user / reads as f64),
        "short_or_unexpected_reads": short,
        "would_block_first_read": would_block,
    }))
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let pairs: usize = opt(&args, "--pairs", 1000);
    let size: usize = opt(&args, "--size", 100);
    let batch: usize = opt(&args, "--batch", 8);
    let secs: f64 = opt(&args, "--secs", 1.0);
    let gap_ms: f64 = opt(&args, "--read-gap-ms", 1.0);

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut writers = Vec::with_capacity(pairs);
    let mut readers = Vec::with_capacity(pairs);
    let mut reader_dups = Vec::with_capacity(pairs);
    for _ in 0..pairs {
        let w = TcpStream::connect(addr)?;
        let (r, _) = listener.accept()?;
        w.set_nodelay(true)?;
        r.set_nodelay(true)?;
        r.set_nonblocking(true)?;
        reader_dups.push(r.try_clone()?);
        writers.push(w);
        readers.push(r);
    }
    eprintln!("[floor] {pairs} loopback pairs connected");

    let read_bytes = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = spawn_reader(reader_dups, read_bytes.clone(), stop.clone());

    // Warm-up: one round of each.
    let one = vec![vec![b'a'; size]];
    let many: Vec<Vec<u8>> = (0..batch).map(|i| vec![b'b' + i as u8; size]).collect();
    write_phase(&mut writers, &one, 0.05, &read_bytes)?;
    eprintln!("[floor] (a) write of {size} bytes");
    let write1 = write_phase(&mut writers, &one, secs, &read_bytes)?;
    eprintln!("[floor] (b) writev of {batch} x {size} bytes");
    let writev = write_phase(&mut writers, &many, secs, &read_bytes)?;
    stop.store(true, Ordering::Relaxed);
    let (reader_cpu, reader_reads) = reader.join().expect("reader thread");

    eprintln!("[floor] (c) read of {size} bytes");
    let read1 = read_phase(&mut writers, &mut readers, size, secs * 0.4, false, gap_ms)?;
    let read2 = read_phase(&mut writers, &mut readers, size, secs * 0.4, true, gap_ms)?;
    let read0 = read_phase(&mut writers, &mut readers, size, secs * 0.4, false, 0.0)?;

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let argv: Vec<&str> = args.iter().skip(1).map(String::as_str).filter(|a| *a != "--bench").collect();
    let out = json!({
        "scenario": "floor",
        "command": if argv.is_empty() {
            "cargo bench --bench floor".to_string()
        } else {
            format!("cargo bench --bench floor -- {}", argv.join(" "))
        },
        "pairs": pairs,
        "size": size,
        "batch": batch,
        "target_cpu_secs_per_phase": secs,
        "read_gap_ms": gap_ms,
        "cpus": thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "kernel": kernel,
        "write": write1,
        "writev": writev,
        "read": read1,
        "read_plus_eagain": read2,
        "read_immediately_after_write": read0,
        "reader_thread_during_writes": {
            "reads": reader_reads,
            "cpu_us": r3(reader_cpu.total()),
            "cpu_us_per_read": r3(reader_cpu.total() / reader_reads.max(1) as f64),
        },
        "summary": {
            "cpu_us_per_write": write1["thread_cpu_us_per_call"],
            "cpu_us_per_frame_writev": writev["thread_cpu_us_per_frame"],
            "cpu_us_per_writev_call": writev["thread_cpu_us_per_call"],
            "cpu_us_per_read": read1["thread_cpu_us_per_message"],
            "cpu_us_per_read_plus_eagain": read2["thread_cpu_us_per_message"],
            "cpu_us_per_read_immediately_after_write": read0["thread_cpu_us_per_message"],
        },
    });
    println!("{out}");
    Ok(())
}
