//! Glue between glommio and hyper: hyper's I/O traits over a glommio `TcpStream` (or a TLS
//! session over one), and an executor that spawns hyper's connection tasks on the current glommio
//! executor (they need not be `Send`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

/// A server-side TLS session over a glommio socket.
pub type TlsStream = futures_rustls::server::TlsStream<TcpStream>;
/// A client-side one (the load generator dialing `https://`).
pub type ClientTlsStream = futures_rustls::client::TlsStream<TcpStream>;

/// The byte stream under a connection: the socket itself, or a TLS session over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
    ClientTls(Box<ClientTlsStream>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_close(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_close(cx),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_close(cx),
        }
    }
}

/// The next connection on `listener`, with Nagle off. A failed accept (the process is out of
/// descriptors, a connection reset before it was taken) is logged and retried after a pause, so
/// a listener never ends and never spins.
pub async fn accept(listener: &glommio::net::TcpListener) -> TcpStream {
    loop {
        match listener.accept().await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return s;
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

/// A connection in hyper's terms. Reads go through a small owned buffer, so no uninitialized
/// memory is ever handed to the socket.
pub struct Conn {
    stream: Stream,
    buf: Box<[u8]>,
    /// Bytes read while sniffing the protocol (or produced by the filter), served before the
    /// socket.
    replay: Vec<u8>,
    filter: Option<Box<dyn ReadFilter>>,
}

/// Rewrites what a client sent before the protocol layer reads it; dropped once `done`.
pub trait ReadFilter {
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>);
    fn done(&self) -> bool;
}

/// Start of the HTTP/2 client connection preface (`PRI * HTTP/2.0...`).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

impl Conn {
    pub fn new(stream: TcpStream) -> Conn {
        Conn::over(Stream::Plain(stream))
    }

    /// A connection over an established TLS session.
    pub fn tls(stream: TlsStream) -> Conn {
        Conn::over(Stream::Tls(Box::new(stream)))
    }

    /// A client connection over an established TLS session.
    pub fn client_tls(stream: ClientTlsStream) -> Conn {
        Conn::over(Stream::ClientTls(Box::new(stream)))
    }

    fn over(stream: Stream) -> Conn {
        Conn {
            stream,
            buf: vec![0u8; 16 << 10].into_boxed_slice(),
            replay: Vec::new(),
            filter: None,
        }
    }

    /// Passes every byte still to be read (including those sniffed) through `filter`.
    pub fn filter_reads(&mut self, mut filter: Box<dyn ReadFilter>) {
        let mut out = Vec::new();
        filter.feed(&self.replay, &mut out);
        self.replay = out;
        if !filter.done() {
            self.filter = Some(filter);
        }
    }

    /// Reads the first bytes of the connection and tells whether it speaks HTTP/2 with prior
    /// knowledge (gRPC clients) or HTTP/1.1 (curl, the JSON gateway, /health).
    pub async fn peek_h2_preface(&mut self) -> bool {
        use futures_lite::AsyncReadExt;
        let mut chunk = [0u8; H2_PREFACE.len()];
        while self.replay.len() < H2_PREFACE.len() {
            match self
                .stream
                .read(&mut chunk[..H2_PREFACE.len() - self.replay.len()])
                .await
            {
                Ok(0) | Err(_) => break,
                Ok(n) => self.replay.extend_from_slice(&chunk[..n]),
            }
            if !H2_PREFACE.starts_with(&self.replay) {
                break;
            }
        }
        self.replay.as_slice() == H2_PREFACE
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut out: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.replay.is_empty() {
            let n = out.remaining().min(this.replay.len());
            out.put_slice(&this.replay[..n]);
            this.replay.drain(..n);
            return Poll::Ready(Ok(()));
        }
        loop {
            let want = out.remaining().min(this.buf.len());
            match Pin::new(&mut this.stream).poll_read(cx, &mut this.buf[..want]) {
                Poll::Ready(Ok(n)) => {
                    let Some(f) = this.filter.as_mut().filter(|_| n > 0) else {
                        out.put_slice(&this.buf[..n]);
                        return Poll::Ready(Ok(()));
                    };
                    f.feed(&this.buf[..n], &mut this.replay);
                    if f.done() {
                        this.filter = None;
                    }
                    if this.replay.is_empty() {
                        // The filter holds a partial frame: read on rather than report EOF.
                        continue;
                    }
                    let k = out.remaining().min(this.replay.len());
                    out.put_slice(&this.replay[..k]);
                    this.replay.drain(..k);
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_close(cx)
    }
}

/// Spawns hyper's background tasks (HTTP/2 streams) on the executor that owns the connection.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
{
    fn execute(&self, fut: F) {
        glommio::spawn_local(fut).detach();
    }
}
