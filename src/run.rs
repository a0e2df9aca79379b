//! Running a server until a signal, as the `customws` binary does: logging from the
//! configuration, SIGTERM/SIGINT for a graceful shutdown, SIGHUP to re-read the key files.
//! An application that embeds the tier calls [`run_until_signal`] from its `main` instead of
//! copying the binary's. Needs the `run` feature (on by default).

use std::io::Write;
use std::process::ExitCode;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::app::application::App;
use crate::config::{Config, LogFormat};
use crate::server::ServerHandle;

/// Installs the process logger from `config`: `log_level` directives, then `RUST_LOG`'s (which
/// win for the modules they name); text or one JSON object per line (`log_format`), on stderr.
/// Does nothing when a logger is already installed (the application's own wins).
pub fn init_logging(config: &Config) {
    let mut builder = env_logger::Builder::new();
    builder.parse_filters(&config.log_level);
    if let Ok(rust_log) = std::env::var("RUST_LOG") {
        builder.parse_filters(&rust_log);
    }
    builder.format_timestamp_millis().target(env_logger::Target::Stderr);
    if config.log_format == LogFormat::Json {
        builder.format(|buf, record| {
            let line = crate::logfmt::json_line(std::time::SystemTime::now(), record);
            writeln!(buf, "{line}")
        });
    }
    // An error only means a logger is already installed.
    let _ = builder.try_init();
}

/// Starts `app` with `config` and serves until SIGTERM or SIGINT, then shuts down gracefully
/// (close 1001 everywhere, at most `shutdown_timeout`) and returns `ExitCode::SUCCESS`.
/// Installs logging first ([`init_logging`]). SIGHUP re-reads the key files
/// ([`ServerHandle::reload`]). A second SIGTERM/SIGINT during the drain exits the process at
/// once with status 1. Returns `ExitCode::FAILURE` (after printing why on stderr) when the
/// signal handlers or the server cannot start.
///
/// ```no_run
/// use std::sync::Arc;
///
/// use customws::prelude::*;
///
/// struct MyApp;
/// impl Application for MyApp {}
///
/// fn main() -> std::process::ExitCode {
///     let config = match Config::from_process() {
///         Ok(config) => config,
///         Err(e) => {
///             eprintln!("{e}");
///             return std::process::ExitCode::from(2);
///         }
///     };
///     customws::run_until_signal(config, Arc::new(MyApp))
/// }
/// ```
pub fn run_until_signal(config: Config, app: App) -> ExitCode {
    run_until_signal_with(config, app, |_| {})
}

/// [`run_until_signal`], calling `started` with the running server once it listens (to print
/// its address, keep a [`crate::Handle`], start the application's own threads).
pub fn run_until_signal_with(config: Config, app: App, started: impl FnOnce(&ServerHandle)) -> ExitCode {
    init_logging(&config);
    // Installed before the server starts, so a signal during start-up is not lost.
    let mut signals = match Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("customws: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let server = match crate::start_with(config, app) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("customws: {e}");
            return ExitCode::FAILURE;
        }
    };
    started(&server);
    for signal in signals.forever() {
        if signal == SIGHUP {
            server.reload();
            continue;
        }
        log::info!("signal {signal} received: shutting down");
        break;
    }
    server.shutdown();
    // A second SIGTERM/SIGINT while draining means "now"; SIGHUP is ignored.
    std::thread::spawn(move || {
        if signals.forever().any(|signal| signal != SIGHUP) {
            std::process::exit(1);
        }
    });
    server.wait();
    log::info!("shutdown complete");
    ExitCode::SUCCESS
}
