//! CPU time of this process's threads, by name: `/proc/self/task/TID/stat` utime + stime
//! (clock ticks) and, for precision, the thread's CPU clock (`clock_gettime` on the per-thread
//! clock id of TID, nanoseconds).

use serde_json::{Value, json};

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}

unsafe extern "C" {
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    fn sysconf(name: i32) -> i64;
}

const SC_CLK_TCK: i32 = 2;

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 when unknown).
pub(crate) fn clk_tck() -> u64 {
    // SAFETY: sysconf takes an int and has no memory effects.
    let v = unsafe { sysconf(SC_CLK_TCK) };
    if v > 0 { v as u64 } else { 100 }
}

/// One thread of this process.
#[derive(Clone, Debug)]
pub(crate) struct Task {
    pub(crate) tid: i32,
    pub(crate) comm: String,
}

/// Threads whose `comm` starts with `prefix`.
pub(crate) fn tasks(prefix: &str) -> Vec<Task> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for entry in dir.flatten().take(10_000) {
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let comm = comm.trim_end().to_string();
        if comm.starts_with(prefix) {
            out.push(Task { tid, comm });
        }
    }
    out.sort_by_key(|t| t.tid);
    out
}

/// utime + stime (fields 14 and 15 of `/proc/self/task/TID/stat`), in clock ticks.
pub(crate) fn stat_ticks(tid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // f[0] is field 3 (state): utime is field 14 = f[11], stime field 15 = f[12].
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// The thread's CPU time in nanoseconds from its per-thread CPU clock
/// (`MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)` = `(~tid << 3) | 6`).
pub(crate) fn clock_ns(tid: i32) -> Option<u64> {
    let clock = (!tid << 3) | 6;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `ts` is a valid, writable `struct timespec` (64-bit Linux layout).
    let rc = unsafe { clock_gettime(clock, &mut ts) };
    (rc == 0).then(|| ts.sec as u64 * 1_000_000_000 + ts.nsec as u64)
}

/// The calling thread's id (from `/proc/thread-self`).
pub(crate) fn my_tid() -> Option<i32> {
    std::fs::read_link("/proc/thread-self").ok()?.file_name()?.to_str()?.parse().ok()
}

/// A CPU reading of a set of threads.
#[derive(Clone, Debug)]
pub(crate) struct Mark {
    per_task: Vec<(Task, Option<u64>, Option<u64>)>,
}

impl Mark {
    /// Reads every thread of `tasks`.
    pub(crate) fn take(tasks: &[Task]) -> Mark {
        Mark { per_task: tasks.iter().map(|t| (t.clone(), stat_ticks(t.tid), clock_ns(t.tid))).collect() }
    }

    /// Ticks summed over the threads.
    fn ticks(&self) -> Option<u64> {
        self.per_task.iter().map(|(_, t, _)| *t).sum()
    }

    /// Nanoseconds summed over the threads.
    fn ns(&self) -> Option<u64> {
        self.per_task.iter().map(|(_, _, n)| *n).sum()
    }
}

/// CPU spent between two marks of the same threads.
#[derive(Clone, Debug)]
pub(crate) struct Spent {
    /// From utime + stime (tick resolution).
    pub(crate) ticks_us: Option<f64>,
    /// From the per-thread CPU clocks (ns resolution).
    pub(crate) clock_us: Option<f64>,
    per_task: Vec<Value>,
}

impl Spent {
    pub(crate) fn between(a: &Mark, b: &Mark, tck: u64) -> Spent {
        let ticks_us = match (a.ticks(), b.ticks()) {
            (Some(x), Some(y)) => Some(y.saturating_sub(x) as f64 * 1e6 / tck as f64),
            _ => None,
        };
        let clock_us = match (a.ns(), b.ns()) {
            (Some(x), Some(y)) => Some(y.saturating_sub(x) as f64 / 1e3),
            _ => None,
        };
        let per_task = a
            .per_task
            .iter()
            .zip(&b.per_task)
            .map(|((t, ta, na), (_, tb, nb))| {
                json!({
                    "tid": t.tid,
                    "comm": t.comm,
                    "ticks": tb.zip(*ta).map(|(y, x)| y.saturating_sub(x)),
                    "clock_ms": nb.zip(*na).map(|(y, x)| super::r3(y.saturating_sub(x) as f64 / 1e6)),
                })
            })
            .collect();
        Spent { ticks_us, clock_us, per_task }
    }

    /// JSON with per-operation figures for `ops` operations.
    pub(crate) fn json(&self, ops: u64) -> Value {
        let per = |v: Option<f64>| v.map(|us| super::r3(us / ops.max(1) as f64));
        json!({
            "total_ms_ticks": self.ticks_us.map(|us| super::r3(us / 1e3)),
            "total_ms_clock": self.clock_us.map(|us| super::r3(us / 1e3)),
            "us_per_op_ticks": per(self.ticks_us),
            "us_per_op_clock": per(self.clock_us),
            "threads": self.per_task,
        })
    }
}

/// Busy and total clock ticks of the whole machine (`/proc/stat`, first line), and this
/// process's utime + stime: to tell how much CPU other processes took during a phase.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Machine {
    busy: u64,
    total: u64,
    me: u64,
}

impl Machine {
    pub(crate) fn take() -> Option<Machine> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().next()?.strip_prefix("cpu ")?;
        let f: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal (guest time is already in user).
        let total: u64 = f.iter().take(8).sum();
        let idle = f.get(3)? + f.get(4)?;
        let me = {
            let s = std::fs::read_to_string("/proc/self/stat").ok()?;
            let after = &s[s.rfind(')')? + 2..];
            let v: Vec<&str> = after.split_whitespace().collect();
            v.get(11)?.parse::<u64>().ok()? + v.get(12)?.parse::<u64>().ok()?
        };
        Some(Machine { busy: total - idle, total, me })
    }

    /// Other processes' CPU and the machine's idle share between two readings.
    pub(crate) fn between(a: Option<Machine>, b: Option<Machine>, tck: u64) -> Value {
        let (Some(a), Some(b)) = (a, b) else {
            return Value::Null;
        };
        let busy = b.busy.saturating_sub(a.busy);
        let total = b.total.saturating_sub(a.total).max(1);
        let me = b.me.saturating_sub(a.me);
        json!({
            "this_process_cpu_ms": me as f64 * 1e3 / tck as f64,
            "other_processes_cpu_ms": busy.saturating_sub(me) as f64 * 1e3 / tck as f64,
            "machine_idle_pct": super::r3(100.0 * (total - busy.min(total)) as f64 / total as f64),
        })
    }
}
