//! `customws-chat`: seed 002's chat server.
//!
//! ```text
//! customws-chat [serve] [--database URL] [--workers N] [--session-refresh 30s] [customws flags…]
//! customws-chat seed --database URL
//! ```
//! `URL` is `sqlite://PATH` (default `sqlite://chat.db`) or `mysql://user:pass@host:port/db`;
//! `CUSTOMWS_CHAT_DATABASE` sets it too. Every other flag is the tier's (`customws --help`).

use std::time::Duration;

use customws_chat::{ChatOptions, Db, SlowQuery};

const USAGE: &str = "usage: customws-chat [serve] [--database URL] [--workers N] [--session-refresh DURATION] [customws flags…]
       customws-chat seed [--database URL]
URL: sqlite://PATH (default sqlite://chat.db) or mysql://user:pass@host:port/db (env CUSTOMWS_CHAT_DATABASE)";

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let command = match args.first().map(String::as_str) {
        Some("seed") | Some("serve") => args.remove(0),
        _ => "serve".to_string(),
    };
    let mut options = ChatOptions::default();
    if let Ok(url) = std::env::var("CUSTOMWS_CHAT_DATABASE") {
        options.database = url;
    }
    let rest = match take_own_flags(args, &mut options) {
        Ok(rest) => rest,
        Err(e) => fail(2, &format!("{e}\n{USAGE}")),
    };
    match command.as_str() {
        "seed" => seed(&options),
        _ => serve(rest, &options),
    }
}

fn fail(code: i32, message: &str) -> ! {
    eprintln!("{message}");
    std::process::exit(code);
}

fn take_own_flags(args: Vec<String>, options: &mut ChatOptions) -> Result<Vec<String>, String> {
    let mut rest = Vec::new();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let own = ["--database", "--workers", "--session-refresh", "--slow-query"];
        if !own.contains(&name.as_str()) {
            rest.push(arg);
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => it.next().ok_or_else(|| format!("{name} needs a value"))?,
        };
        match name.as_str() {
            "--database" => options.database = value,
            "--workers" => {
                options.workers = value.parse().map_err(|_| format!("--workers: not a number: {value}"))?;
            }
            "--session-refresh" => {
                options.session_refresh =
                    humantime::parse_duration(&value).map_err(|e| format!("--session-refresh: {e}"))?;
            }
            _ => {
                // --slow-query TYPE:DURATION (testing only).
                let (kind, delay) = value.split_once(':').ok_or("--slow-query wants TYPE:DURATION")?;
                let delay: Duration =
                    humantime::parse_duration(delay).map_err(|e| format!("--slow-query: {e}"))?;
                options.slow_query = Some(SlowQuery { kind: kind.to_string(), delay });
            }
        }
    }
    Ok(rest)
}

fn seed(options: &ChatOptions) {
    let db = Db::open(&options.database, 2).unwrap_or_else(|e| fail(1, &format!("database: {e}")));
    let users = customws_chat::seed::demo(&db).unwrap_or_else(|e| fail(1, &format!("seed: {e}")));
    println!(
        "seeded {} (contacts: alice–bob, alice–carol accepted; bob–carol pending; dave none)",
        options.database
    );
    for user in users {
        println!("  {:<6} id {:<3} token {}", user.username, user.id, user.token);
    }
    println!(
        "connect: ws://127.0.0.1:8082/ws?token=<token>  (sessions are picked up within --session-refresh)"
    );
}

fn serve(mut rest: Vec<String>, options: &ChatOptions) {
    let env: Vec<(String, String)> =
        std::env::vars().filter(|(k, _)| k != "CUSTOMWS_CHAT_DATABASE").collect();
    // The tier insists on JWT key material even though this application authenticates by
    // session token and ignores the JWT result; a random secret nobody knows satisfies it
    // without admitting anything (built-in `auth_refresh` then accepts no token either).
    let has_secret = rest.iter().any(|a| a.starts_with("--jwt-secret") || a.starts_with("--jwt-public-key"))
        || env.iter().any(|(k, _)| k == "CUSTOMWS_JWT_SECRET" || k == "CUSTOMWS_JWT_PUBLIC_KEY");
    if !has_secret {
        match customws_chat::auth::new_token() {
            Ok(secret) => rest.push(format!("--jwt-secret={secret}")),
            Err(e) => fail(1, &e.to_string()),
        }
    }
    let config = match customws::Config::load(rest, env) {
        Ok(config) => config,
        Err(e) => fail(2, &format!("{e}\n{USAGE}")),
    };
    match customws_chat::start(config, options) {
        Ok(server) => {
            println!(
                "chat server listening on {} (database {})",
                server.local_addr(),
                customws_chat::db::redact(&options.database)
            );
            server.wait();
        }
        Err(e) => fail(1, &e.to_string()),
    }
}
