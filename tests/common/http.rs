//! Hand-written HTTP/1.1 requests to a server's client port (the JSON gateway, /health,
//! /metrics), for the forms a client library would not send.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Sends `raw` as it is and returns everything the server answers until it closes the connection
/// or sends nothing for `quiet` (a reset ends the answer too: bad input may be answered that way).
pub fn request(port: u16, raw: &[u8], quiet: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the server");
    s.set_read_timeout(Some(quiet)).unwrap();
    s.write_all(raw).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// [`request`] as text, waiting at most 5 s for a server that keeps a bad request's connection
/// open without answering.
pub fn http(port: u16, raw: &str) -> String {
    String::from_utf8_lossy(&request(port, raw.as_bytes(), Duration::from_secs(5))).into_owned()
}

/// A JSON POST of `body` to `path` on one connection; the whole response (head and body).
pub fn post_raw(port: u16, path: &str, body: &str) -> Vec<u8> {
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    request(port, req.as_bytes(), Duration::from_secs(10))
}

/// [`post_raw`], as text.
pub fn post(port: u16, path: &str, body: &str) -> String {
    String::from_utf8_lossy(&post_raw(port, path, body)).into_owned()
}

/// Sends `raw` on a connection of its own, waits 300 ms for the server to start streaming, runs
/// `during`, and returns what arrived until the server sent nothing for 1.5 s.
pub fn stream_during(port: u16, raw: &str, during: impl FnOnce()) -> String {
    let mut sock = TcpStream::connect(("127.0.0.1", port)).expect("connect to the server");
    sock.write_all(raw.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    during();
    sock.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.read(&mut buf) {
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&raw).into_owned()
}
