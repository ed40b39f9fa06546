//! A fault-injecting TCP proxy the tests own: it listens on a free 127.0.0.1 port and forwards
//! to a target, and can be switched to drop every connection or to blackhole traffic (accepted,
//! read and thrown away), then healed. Put one in front of a cluster member's peer port and
//! advertise the proxy's URL: the member then hears nothing from its peers while the proxy is
//! faulty (a one-way partition: it still reaches them).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    Pass = 0,
    /// Close every connection, and every new one at once.
    Drop = 1,
    /// Keep connections open but deliver nothing.
    Blackhole = 2,
}

pub struct Proxy {
    pub port: u16,
    mode: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    /// Starts forwarding from a fresh port to `127.0.0.1:target`.
    pub fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let mode = Arc::new(AtomicU8::new(Mode::Pass as u8));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (m, s, c) = (mode.clone(), stop.clone(), conns.clone());
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        if m.load(Ordering::Relaxed) == Mode::Drop as u8 {
                            continue;
                        }
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                            continue;
                        };
                        if let (Ok(a), Ok(b)) = (client.try_clone(), server.try_clone()) {
                            c.lock().unwrap().extend([a, b]);
                        }
                        pipe(
                            client.try_clone().unwrap(),
                            server.try_clone().unwrap(),
                            m.clone(),
                        );
                        pipe(server, client, m.clone());
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy {
            port,
            mode,
            stop,
            conns,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::Relaxed);
        if mode == Mode::Drop {
            for c in self.conns.lock().unwrap().drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// Copies `from` to `to` while the mode passes; drops the bytes while it blackholes.
fn pipe(mut from: TcpStream, mut to: TcpStream, mode: Arc<AtomicU8>) {
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            match mode.load(Ordering::Relaxed) {
                m if m == Mode::Pass as u8 => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                m if m == Mode::Blackhole as u8 => {}
                _ => break,
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}
