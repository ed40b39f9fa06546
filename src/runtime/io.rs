//! Glue between glommio and hyper: hyper's I/O traits over a glommio `TcpStream` (or a TLS
//! session over one), and an executor that spawns hyper's connection tasks on the current glommio
//! executor (they need not be `Send`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

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
    /// Written but not yet sent: held until the next flush. HTTP/2 writes a large DATA frame
    /// as its buffered frames and then the payload, two socket sends per frame (one per
    /// watch response, say) and each a loopback packet the peer must take; gathered here
    /// they go out in one.
    pending: Vec<u8>,
    /// How much of `pending` the socket already took.
    sent: usize,
}

/// Writes that would take `pending` past this are sent first; a write this large goes straight
/// to the socket. Twice HTTP/2's own write buffer (16 KiB) plus a default-sized frame fits.
const COALESCE: usize = 64 << 10;
/// What `pending` starts with, so a flush of HTTP/2's whole write buffer does not reallocate.
const PENDING_START: usize = 16 << 10;
/// A `pending` buffer that grew past this (HTTP/2's buffer plus one full frame) is freed once
/// sent rather than kept per connection.
const KEEP_PENDING: usize = 32 << 10;

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
            pending: Vec::new(),
            sent: 0,
        }
    }

    /// Sends everything in `pending`.
    fn poll_send_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.pending.len() {
            let n = ready!(Pin::new(&mut self.stream).poll_write(cx, &self.pending[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.sent = 0;
        if self.pending.capacity() > KEEP_PENDING {
            self.pending = Vec::new();
        } else {
            self.pending.clear();
        }
        Poll::Ready(Ok(()))
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

/// Writes are gathered in `pending` and sent at the next flush (hyper and h2 flush after every
/// batch of frames they write), so nothing waits past the flush that the protocol asks for.
impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pending.len() + buf.len() > COALESCE {
            ready!(this.poll_send_pending(cx))?;
            if buf.len() >= COALESCE {
                return Pin::new(&mut this.stream).poll_write(cx, buf);
            }
        }
        if this.pending.capacity() == 0 {
            this.pending.reserve(PENDING_START.max(buf.len()));
        }
        this.pending.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_pending(cx))?;
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_pending(cx))?;
        Pin::new(&mut this.stream).poll_close(cx)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    async fn write(conn: &mut Conn, buf: &[u8]) -> io::Result<usize> {
        std::future::poll_fn(|cx| hyper::rt::Write::poll_write(Pin::new(&mut *conn), cx, buf)).await
    }

    async fn flush(conn: &mut Conn) -> io::Result<()> {
        std::future::poll_fn(|cx| hyper::rt::Write::poll_flush(Pin::new(&mut *conn), cx)).await
    }

    #[test]
    fn writes_wait_for_the_flush_and_keep_their_order() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let big: Vec<u8> = (0..COALESCE + 100).map(|i| (i % 251) as u8).collect();
        let expected = [b"hello world".as_slice(), b"a", &big].concat();
        let received = crate::runtime::builder(glommio::Placement::Unbound, "io-test")
            .spawn(move || async move {
                let stream = TcpStream::connect(addr).await.expect("connect");
                let (mut peer, _) = listener.accept().expect("accept");
                let mut conn = Conn::new(stream);
                assert_eq!(write(&mut conn, b"hello ").await.expect("write"), 6);
                assert_eq!(write(&mut conn, b"world").await.expect("write"), 5);
                // Nothing reaches the socket before the flush.
                peer.set_nonblocking(true).expect("nonblocking");
                let mut probe = [0u8; 16];
                let early = peer.read(&mut probe).map_err(|e| e.kind());
                assert_eq!(early, Err(io::ErrorKind::WouldBlock));
                peer.set_nonblocking(false).expect("blocking");
                let reader = std::thread::spawn(move || {
                    let mut all = Vec::new();
                    peer.read_to_end(&mut all).expect("read");
                    all
                });
                flush(&mut conn).await.expect("flush");
                // A write too large to gather sends what is held first, then goes straight out.
                write(&mut conn, b"a").await.expect("write");
                let mut at = 0;
                while at < big.len() {
                    at += write(&mut conn, &big[at..]).await.expect("write");
                }
                flush(&mut conn).await.expect("flush");
                std::future::poll_fn(|cx| hyper::rt::Write::poll_shutdown(Pin::new(&mut conn), cx))
                    .await
                    .expect("shutdown");
                drop(conn);
                reader.join().expect("reader")
            })
            .expect("executor")
            .join()
            .expect("join");
        assert!(
            received == expected,
            "bytes arrived out of order or missing"
        );
    }
}
