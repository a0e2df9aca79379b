//! A tiny interactive WebSocket client for trying customws by hand.
//!
//! Usage: `cargo run --release --example client -- 'ws://127.0.0.1:8082/ws?token=…'`
//!
//! Every text message received is printed on its own line, prefixed `< `. Each non-empty line
//! typed on stdin is sent as a text frame. End of input (Ctrl-D) closes the connection with
//! code 1000; a close from the server is printed with its code and reason.
//!
//! tungstenite's `WebSocket` cannot be shared between a reading and a writing thread, so one
//! thread reads stdin into a channel and the main thread alternates between that channel and
//! the socket, whose short read timeout keeps it from blocking.

use std::io::{BufRead, ErrorKind};
use std::net::TcpStream;
use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::time::{Duration, Instant};

use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Error, Message, WebSocket};

type Socket = WebSocket<MaybeTlsStream<TcpStream>>;

/// How long one socket read waits before the loop looks at stdin again.
const POLL: Duration = Duration::from_millis(50);
/// How long to wait for the server's answer to our close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let Some(url) = std::env::args().nth(1) else {
        eprintln!("usage: cargo run --release --example client -- 'ws://HOST:PORT/PATH?token=…'");
        return ExitCode::from(2);
    };
    let mut socket = match tungstenite::connect(url.as_str()) {
        Ok((socket, response)) => {
            eprintln!("connected ({}); type messages, Ctrl-D to quit", response.status());
            socket
        }
        Err(error) => {
            eprintln!("cannot connect to {url}: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(error) = set_poll_timeout(&mut socket) {
        eprintln!("cannot set the read timeout: {error}");
        return ExitCode::FAILURE;
    }
    run(&mut socket, &stdin_lines())
}

fn set_poll_timeout(socket: &mut Socket) -> std::io::Result<()> {
    match socket.get_mut() {
        MaybeTlsStream::Plain(stream) => stream.set_read_timeout(Some(POLL)),
        _ => Err(std::io::Error::other("only plain ws:// is supported")),
    }
}

/// Lines typed on stdin; the channel disconnects at end of input.
fn stdin_lines() -> Receiver<String> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    receiver
}

/// What the loop does next.
enum Next {
    Continue,
    Quit(ExitCode),
}

fn run(socket: &mut Socket, lines: &Receiver<String>) -> ExitCode {
    loop {
        if let Next::Quit(code) = send_typed_lines(socket, lines) {
            return code;
        }
        if let Next::Quit(code) = receive(socket) {
            return code;
        }
    }
}

/// Sends every line typed so far; at end of input closes the connection.
fn send_typed_lines(socket: &mut Socket, lines: &Receiver<String>) -> Next {
    loop {
        match lines.try_recv() {
            Ok(line) if line.trim().is_empty() => {}
            Ok(line) => {
                if let Err(error) = socket.send(Message::text(line)) {
                    return failed("send", &error);
                }
            }
            Err(TryRecvError::Empty) => return Next::Continue,
            Err(TryRecvError::Disconnected) => return Next::Quit(close(socket)),
        }
    }
}

/// Reads at most one message, waiting up to [`POLL`].
fn receive(socket: &mut Socket) -> Next {
    match socket.read() {
        Ok(Message::Text(text)) => println!("< {}", text.as_str()),
        Ok(Message::Binary(data)) => println!("< (binary message, {} bytes)", data.len()),
        Ok(Message::Close(frame)) => print_close(frame.as_ref()),
        Ok(_) => {}
        Err(Error::Io(error)) if is_timeout(&error) => {}
        Err(Error::ConnectionClosed) => return Next::Quit(ExitCode::SUCCESS),
        Err(error) => return failed("read", &error),
    }
    Next::Continue
}

fn print_close(frame: Option<&CloseFrame>) {
    match frame {
        Some(frame) => {
            let code = u16::from(frame.code);
            eprintln!("server closed the connection: {code} {}", frame.reason.as_str());
        }
        None => eprintln!("server closed the connection without a code"),
    }
}

/// Sends close 1000 and waits briefly for the server's answer.
fn close(socket: &mut Socket) -> ExitCode {
    let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
    if let Err(error) = socket.close(Some(frame)) {
        eprintln!("close: {error}");
        return ExitCode::FAILURE;
    }
    let deadline = Instant::now() + CLOSE_GRACE;
    while Instant::now() < deadline {
        match socket.read() {
            Ok(_) => {}
            Err(Error::Io(error)) if is_timeout(&error) => {}
            Err(Error::ConnectionClosed | Error::AlreadyClosed) => break,
            Err(error) => {
                eprintln!("close: {error}");
                return ExitCode::FAILURE;
            }
        }
    }
    eprintln!("closed");
    ExitCode::SUCCESS
}

fn is_timeout(error: &std::io::Error) -> bool {
    matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

fn failed(what: &str, error: &Error) -> Next {
    eprintln!("{what}: {error}");
    Next::Quit(ExitCode::FAILURE)
}
