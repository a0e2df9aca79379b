//! The wait loop every scenario runs after sending its load: poll the engine until a count is
//! reached, with a progress line every second, and stop with a problem when the server process
//! died or nothing moved for a while (or on the overall deadline).

use std::time::{Duration, Instant};

use super::Ctx;
use super::engine::{Engine, Handler};

/// How a wait reports its progress and its problems.
pub(crate) struct Wait<'a> {
    /// Progress lines read `{label}: {text}`.
    pub(crate) label: &'a str,
    /// How long the progress number may stand still before the wait gives up.
    pub(crate) stall: Duration,
    /// A poll that made no progress with fewer connections than this open also gives up.
    pub(crate) min_open: usize,
    pub(crate) problems: Problems<'a>,
}

/// The problems a wait records.
pub(crate) enum Problems<'a> {
    /// `{label} stalled: no progress for {secs} s, {text}, {open} connections open`,
    /// `{label}: server process died` and `{label}: overall timeout, {text}`.
    Labelled,
    /// The stall's problem from the seconds since the last progress and the open connections;
    /// `server process died`; none on the overall timeout (`run` reports that).
    Plain(&'a dyn Fn(f64, usize) -> String),
}

impl<'a> Wait<'a> {
    /// A wait with [`Problems::Labelled`] that gives up after `stall` without progress.
    pub(crate) fn labelled(label: &'a str, stall: Duration) -> Self {
        Wait { label, stall, min_open: 0, problems: Problems::Labelled }
    }

    /// A wait with [`Problems::Plain`] that gives up after `stall` without progress.
    pub(crate) fn plain(label: &'a str, stall: Duration, stalled: &'a dyn Fn(f64, usize) -> String) -> Self {
        Wait { label, stall, min_open: 0, problems: Problems::Plain(stalled) }
    }
}

/// How [`wait`] ended.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Waited {
    /// `done` held.
    Done,
    /// The overall deadline passed first.
    TimedOut,
    /// A stall or the server's death (a problem was recorded).
    Stopped,
}

/// Runs the engine until `done(h)`, the overall deadline, a stall of `count(h)` or the server's
/// death, recording the problem of the last two (and of the deadline with
/// [`Problems::Labelled`]) in `ctx.problems`.
pub(crate) fn wait<H: Handler>(
    ctx: &mut Ctx,
    eng: &mut Engine,
    h: &mut H,
    w: &Wait<'_>,
    done: impl Fn(&H) -> bool,
    count: impl Fn(&H) -> u64,
    text: impl Fn(&H) -> String,
) -> Waited {
    let mut last = (count(h), Instant::now());
    let mut last_report = Instant::now();
    loop {
        if done(h) {
            return Waited::Done;
        }
        if ctx.timed_out() {
            if let Problems::Labelled = w.problems {
                ctx.problems.push(format!("{}: overall timeout, {}", w.label, text(h)));
            }
            return Waited::TimedOut;
        }
        eng.poll_once(h, Duration::from_millis(5));
        let p = count(h);
        if p != last.0 {
            last = (p, Instant::now());
        } else if last.1.elapsed() > w.stall || eng.open < w.min_open {
            let secs = last.1.elapsed().as_secs_f64();
            ctx.problems.push(match w.problems {
                Problems::Labelled => format!(
                    "{} stalled: no progress for {secs:.1} s, {}, {} connections open",
                    w.label,
                    text(h),
                    eng.open
                ),
                Problems::Plain(stalled) => stalled(secs, eng.open),
            });
            return Waited::Stopped;
        }
        if last_report.elapsed() > Duration::from_secs(1) {
            last_report = Instant::now();
            progress!("{}: {}", w.label, text(h));
            if !ctx.server.alive() {
                ctx.problems.push(match w.problems {
                    Problems::Labelled => format!("{}: server process died", w.label),
                    Problems::Plain(_) => "server process died".into(),
                });
                return Waited::Stopped;
            }
        }
    }
}
