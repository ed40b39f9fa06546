//! The self-check endpoint: an in-process HTTP/2 server on the same stack as `spindle serve` that
//! answers every gRPC call with an empty message, so `spindle bench --self-check` shows the rate
//! the generator itself can drive on this machine.

use std::net::SocketAddr;

use bytes::Bytes;

use crate::runtime::io::{Conn, LocalExec};
use crate::server::grpc;

/// A running no-op endpoint. Its executors serve until the process exits (it is a CLI aid).
pub struct Noop {
    addr: SocketAddr,
}

impl Noop {
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }
}

/// Starts `cores` executors listening on one free port (SO_REUSEPORT).
pub fn start(cores: usize) -> Result<Noop, String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let (ready_tx, ready_rx) = flume::bounded::<Result<(), String>>(cores);
    for core in 0..cores {
        let ready = ready_tx.clone();
        std::thread::spawn(move || {
            let ex = crate::runtime::builder(glommio::Placement::Unbound, &format!("noop-{core}"))
                .make();
            let ex = match ex {
                Ok(ex) => ex,
                Err(e) => {
                    let _ = ready.send(Err(e.to_string()));
                    return;
                }
            };
            ex.run(async move {
                let listener = match glommio::net::TcpListener::bind(addr) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready.send(Err(format!("bind {addr}: {e}")));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                while let Ok(stream) = listener.accept().await {
                    let _ = stream.set_nodelay(true);
                    glommio::spawn_local(async move {
                        let service = hyper::service::service_fn(|_req| async {
                            Ok::<_, std::convert::Infallible>(grpc::ok_bytes(Bytes::new()))
                        });
                        let _ = hyper::server::conn::http2::Builder::new(LocalExec)
                            .max_concurrent_streams(1024)
                            .serve_connection(Conn::new(stream), service)
                            .await;
                    })
                    .detach();
                }
            });
        });
    }
    for _ in 0..cores {
        ready_rx
            .recv()
            .map_err(|_| "no-op endpoint failed to start".to_string())??;
    }
    Ok(Noop { addr })
}
