//! A small keep-alive HTTP/1.1 server standing in for an application's backend
//! (`backend_url`, `authorize_url`, `presence_webhook_url`): every request's JSON body goes to a
//! handler, whose `(status, body)` is the answer. Each connection is served on its own thread
//! until the client goes away.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;

use serde_json::Value;

/// One request as the backend received it.
#[derive(Debug, Clone)]
pub struct BackendRequest {
    pub method: String,
    pub path: String,
    pub content_type: Option<String>,
    /// The body as JSON (`Null` when it is not JSON).
    pub body: Value,
}

/// Starts the server on an ephemeral loopback port; `handler` answers every request (a 204
/// is sent without a body).
pub fn serve_backend(
    handler: impl Fn(&BackendRequest) -> (u16, Vec<u8>) + Send + Sync + 'static,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = Arc::new(handler);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let handler = Arc::clone(&handler);
            std::thread::spawn(move || serve_connection(stream, &*handler));
        }
    });
    addr
}

fn serve_connection(stream: TcpStream, handler: &dyn Fn(&BackendRequest) -> (u16, Vec<u8>)) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    while let Some(request) = read_request(&mut reader) {
        let (status, reply) = handler(&request);
        let head = if status == 204 {
            "HTTP/1.1 204 No Content\r\n\r\n".to_string()
        } else {
            format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                reply.len()
            )
        };
        let body: &[u8] = if status == 204 { &[] } else { &reply };
        if writer.write_all(head.as_bytes()).and_then(|()| writer.write_all(body)).is_err() {
            return;
        }
    }
}

/// The next request on the connection; `None` once the client has gone.
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<BackendRequest> {
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).ok()? == 0 {
        return None;
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_owned(), parts.next().unwrap_or("").to_owned());
    let (mut content_length, mut content_type) = (0usize, None);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => content_length = value.trim().parse().unwrap(),
                "content-type" => content_type = Some(value.trim().to_owned()),
                _ => {}
            }
        }
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body).ok()?;
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Some(BackendRequest { method, path, content_type, body })
}
