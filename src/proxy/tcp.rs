//! `spindle gateway start`: etcd's L4 gateway. It accepts TCP connections and splices each to a
//! live endpoint, byte for byte (so it carries gRPC, the JSON gateway and TLS alike). An endpoint
//! that refuses a connection is skipped, the next one tried, and it is tried again only after
//! `--retry-delay` (etcd's default: one minute).
//!
//! Plain threads: a connection is two copy loops and nothing else.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// etcd's `--retry-delay` default.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(60);

/// How long connecting to one endpoint may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("no endpoints given")]
    NoEndpoints,
    #[error("bad endpoint {0:?}")]
    BadEndpoint(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: io::Error },
}

/// The endpoints, and until when each one that failed is left out.
pub struct Remotes {
    endpoints: Vec<String>,
    down_until: Mutex<Vec<Option<Instant>>>,
    retry_delay: Duration,
}

impl Remotes {
    pub fn new(endpoints: Vec<String>, retry_delay: Duration) -> Remotes {
        let n = endpoints.len();
        Remotes {
            endpoints,
            down_until: Mutex::new(vec![None; n]),
            retry_delay,
        }
    }

    /// The endpoints to try now, in order: those not left out, then (if all are) every one,
    /// since a client is better served by one more try than by a closed connection.
    pub fn candidates(&self, now: Instant) -> Vec<usize> {
        let down = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        let up: Vec<usize> = (0..self.endpoints.len())
            .filter(|&i| down[i].is_none_or(|t| t <= now))
            .collect();
        if up.is_empty() {
            (0..self.endpoints.len()).collect()
        } else {
            up
        }
    }

    pub fn failed(&self, i: usize, now: Instant) {
        self.down_until.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(now + self.retry_delay);
    }

    pub fn succeeded(&self, i: usize) {
        self.down_until.lock().unwrap_or_else(|e| e.into_inner())[i] = None;
    }

    /// A connection to the first endpoint that accepts one.
    fn dial(&self) -> Option<TcpStream> {
        for i in self.candidates(Instant::now()) {
            let ep = &self.endpoints[i];
            let conn = ep
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .and_then(|a| TcpStream::connect_timeout(&a, DIAL_TIMEOUT).ok());
            match conn {
                Some(c) => {
                    self.succeeded(i);
                    return Some(c);
                }
                None => {
                    tracing::warn!(endpoint = %ep, "endpoint refused; trying the next one");
                    self.failed(i, Instant::now());
                }
            }
        }
        None
    }
}

/// `host:port` of an endpoint given as `host:port` or a URL.
fn host_port(e: &str) -> Result<String, GatewayError> {
    let hp = e
        .trim()
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/');
    if hp
        .rsplit_once(':')
        .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
    {
        return Err(GatewayError::BadEndpoint(e.to_string()));
    }
    Ok(hp.to_string())
}

/// Runs the gateway until the process ends.
pub fn run(endpoints: &[String], listen: &str, retry_delay: Duration) -> Result<(), GatewayError> {
    let eps = endpoints
        .iter()
        .flat_map(|e| e.split(','))
        .filter(|e| !e.trim().is_empty())
        .map(host_port)
        .collect::<Result<Vec<_>, _>>()?;
    if eps.is_empty() {
        return Err(GatewayError::NoEndpoints);
    }
    let listener = TcpListener::bind(listen).map_err(|source| GatewayError::Listen {
        addr: listen.to_string(),
        source,
    })?;
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, endpoints = ?eps, "gateway listening");
    let remotes = Arc::new(Remotes::new(eps, retry_delay));
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let remotes = remotes.clone();
        thread::spawn(move || {
            let Some(server) = remotes.dial() else {
                tracing::warn!("no endpoint accepts connections; closing the client's");
                return;
            };
            splice(client, server);
        });
    }
    Ok(())
}

/// Copies both ways until either side closes.
fn splice(client: TcpStream, server: TcpStream) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up = thread::spawn(move || copy(c2, s2));
    copy(server, client);
    let _ = up.join();
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// A Go duration as etcd's flags take it (`1m0s`, `500ms`, `2s`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("bad duration {s:?} (e.g. 1m0s, 30s, 500ms)");
    let mut rest = s.trim();
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let n: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total += Duration::from_secs_f64(n * unit);
    }
    if total.is_zero() && !s.trim().starts_with('0') {
        return Err(bad());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_duration("1m0s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h2m3s"), Ok(Duration::from_secs(3723)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5x").is_err());
    }

    #[test]
    fn failed_endpoints_wait_out_the_retry_delay() {
        let r = Remotes::new(
            vec!["a:1".into(), "b:2".into(), "c:3".into()],
            Duration::from_secs(60),
        );
        let t = Instant::now();
        assert_eq!(r.candidates(t), vec![0, 1, 2]);
        r.failed(0, t);
        assert_eq!(r.candidates(t), vec![1, 2]);
        assert_eq!(r.candidates(t + Duration::from_secs(61)), vec![0, 1, 2]);
        r.failed(1, t);
        r.failed(2, t);
        // All down: every one is tried anyway.
        assert_eq!(r.candidates(t), vec![0, 1, 2]);
        r.succeeded(1);
        assert_eq!(r.candidates(t), vec![1]);
    }

    #[test]
    fn endpoints_are_host_and_port() {
        assert_eq!(
            host_port("http://127.0.0.1:2379/").unwrap(),
            "127.0.0.1:2379"
        );
        assert_eq!(host_port("h:1").unwrap(), "h:1");
        assert!(host_port("h").is_err());
        assert!(host_port(":1").is_err());
    }
}
