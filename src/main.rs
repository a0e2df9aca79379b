//! The `customws` binary: the tier with its built-in router.
//!
//! `customws --listen 127.0.0.1:8082 --jwt-secret-file /path/to/secret` runs with no config
//! file; `customws --dev` generates a secret and prints ready-to-use tokens. SIGTERM/SIGINT
//! shut down gracefully; SIGHUP re-reads the key files.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use customws::config::{Config, ConfigError, LogFormat};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

fn main() -> ExitCode {
    let mut config = match Config::from_process() {
        Ok(config) => config,
        Err(ConfigError::Help(text)) => {
            println!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("customws: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    let has_key = config.jwt_secret_file.is_some() || config.jwt_keys_file.is_some();
    if config.dev && config.jwt_secret.is_none() && !has_key {
        config.jwt_secret = Some(customws::dev::random_secret());
    }
    let file_secret = || {
        let path = config.jwt_secret_file.as_deref()?;
        customws::http::keys::read_secret_file("jwt_secret_file", path).ok()
    };
    let secret = config.jwt_secret.clone().or_else(file_secret);
    let (dev, ws_path) = (config.dev, config.ws_path.clone());
    let mut signals = match Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("customws: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    // With `backend_url`, generic_request and unknown message types go to the backend.
    let app: customws::app::application::App = match customws::backend::BackendApp::from_config(&config) {
        Ok(Some(backend)) => Arc::new(backend),
        Ok(None) => Arc::new(customws::app::application::BuiltIn),
        Err(e) => {
            eprintln!("customws: {e}");
            return ExitCode::from(2);
        }
    };
    let server = match customws::start_with(config, app) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("customws: {e}");
            return ExitCode::FAILURE;
        }
    };
    if dev {
        println!("{}", customws::dev::banner(server.local_addr(), &ws_path, secret.as_deref().unwrap_or("")));
    }
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

/// `log_level` directives, then `RUST_LOG`'s (which win for the modules they name); text or
/// one JSON object per line.
fn init_logging(config: &Config) {
    let mut builder = env_logger::Builder::new();
    builder.parse_filters(&config.log_level);
    if let Ok(rust_log) = std::env::var("RUST_LOG") {
        builder.parse_filters(&rust_log);
    }
    builder.format_timestamp_millis().target(env_logger::Target::Stderr);
    if config.log_format == LogFormat::Json {
        builder.format(|buf, record| {
            let line = customws::logfmt::json_line(std::time::SystemTime::now(), record);
            writeln!(buf, "{line}")
        });
    }
    builder.init();
}
