//! The `customws` binary: the tier with its built-in router.
//!
//! `customws --listen 127.0.0.1:8082 --jwt-secret-file /path/to/secret` runs with no config
//! file; `customws --dev` generates a secret and prints ready-to-use tokens. SIGTERM/SIGINT
//! shut down gracefully; SIGHUP re-reads the key files ([`customws::run_until_signal`]).

use std::process::ExitCode;
use std::sync::Arc;

use customws::config::{Config, ConfigError};

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
    customws::run::init_logging(&config);
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
    // With `backend_url`, generic_request and unknown message types go to the backend.
    let app: customws::app::application::App = match customws::backend::BackendApp::from_config(&config) {
        Ok(Some(backend)) => Arc::new(backend),
        Ok(None) => Arc::new(customws::app::application::BuiltIn),
        Err(e) => {
            eprintln!("customws: {e}");
            return ExitCode::from(2);
        }
    };
    customws::run::run_until_signal_with(config, app, |server| {
        if dev {
            println!(
                "{}",
                customws::dev::banner(server.local_addr(), &ws_path, secret.as_deref().unwrap_or(""))
            );
        }
    })
}
