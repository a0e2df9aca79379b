//! The `customws` binary: the tier with its built-in router.
//!
//! `customws --listen 127.0.0.1:8082 --jwt-secret S` runs with no file; `customws --dev`
//! generates a secret and prints ready-to-use tokens. SIGTERM/SIGINT shut down gracefully.

use std::process::ExitCode;
use std::sync::Arc;

use customws::config::{Config, ConfigError};
use signal_hook::consts::{SIGINT, SIGTERM};
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
    init_logging(&config.log_level);
    if config.dev && config.jwt_secret.is_none() {
        config.jwt_secret = Some(customws::dev::random_secret());
    }
    let (dev, ws_path, secret) = (config.dev, config.ws_path.clone(), config.jwt_secret.clone());
    let mut signals = match Signals::new([SIGTERM, SIGINT]) {
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
    if let Some(signal) = signals.forever().next() {
        log::info!("signal {signal} received: shutting down");
    }
    server.shutdown();
    // A second signal while draining means "now".
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            std::process::exit(1);
        }
    });
    server.wait();
    log::info!("shutdown complete");
    ExitCode::SUCCESS
}

fn init_logging(level: &str) {
    env_logger::Builder::new()
        .parse_filters(level)
        .format_timestamp_millis()
        .target(env_logger::Target::Stderr)
        .init();
}
