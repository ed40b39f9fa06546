//! Glue between glommio and hyper: hyper's I/O traits over a glommio `TcpStream` (or a TLS
//! session over one), and an executor that spawns hyper's connection tasks on the current glommio
//! executor (they need not be `Send`).

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{ready, Context, Poll, Waker};

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
    /// Shared with the connection's sender task (plain sockets only, see [`Outbox`]).
    stream: Rc<RefCell<Stream>>,
    buf: Box<[u8]>,
    /// Bytes read while sniffing the protocol (or produced by the filter), served before the
    /// socket.
    replay: Vec<u8>,
    filter: Option<Box<dyn ReadFilter>>,
    out: Rc<RefCell<Outbox>>,
    /// Whether a flush hands the send to the sender task (plain sockets) or sends before it
    /// returns (TLS sessions, whose reads may write too and so must stay on one task).
    deferred: bool,
}

/// What was written and not yet sent.
///
/// HTTP/2 writes a large DATA frame (a watch response, say) as its buffered frames and then
/// the payload, and flushes after each such frame: sent as written, that is two socket sends
/// per frame, each a loopback packet the peer has to take. Writes are gathered here instead.
/// On a plain socket a flush only asks the connection's sender task to send; it runs once the
/// connection's task yields, so all the frames one turn of HTTP/2 produced (every watcher's
/// response to one batch of events) leave in one send, after the tasks that were already
/// runnable. A TLS session sends at the flush itself.
#[derive(Default)]
struct Outbox {
    pending: Vec<u8>,
    /// How much of `pending` the socket already took.
    sent: usize,
    /// A flush asked for what is held to be sent.
    requested: bool,
    /// Why sending stopped; every later write and flush reports it.
    failed: Option<(io::ErrorKind, String)>,
    /// The connection's task, waiting for room or for everything to be sent.
    writer: Option<Waker>,
    /// The sender task's waker, once it runs.
    sender: Option<Waker>,
}

impl Outbox {
    fn held(&self) -> usize {
        self.pending.len() - self.sent
    }

    fn check(&self) -> io::Result<()> {
        match &self.failed {
            Some((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
            None => Ok(()),
        }
    }

    fn append(&mut self, buf: &[u8]) {
        if self.pending.capacity() == 0 {
            self.pending.reserve(PENDING_START.max(buf.len()));
        }
        self.pending.extend_from_slice(buf);
    }

    /// Sends what is held; a failure is kept for later calls and what is held dropped.
    fn poll_send(&mut self, stream: &mut Stream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        while self.sent < self.pending.len() {
            let failure = match Pin::new(&mut *stream).poll_write(cx, &self.pending[self.sent..]) {
                Poll::Ready(Ok(0)) => io::Error::from(io::ErrorKind::WriteZero),
                Poll::Ready(Ok(n)) => {
                    self.sent += n;
                    continue;
                }
                Poll::Ready(Err(e)) => e,
                Poll::Pending => return Poll::Pending,
            };
            self.failed = Some((failure.kind(), failure.to_string()));
            self.sent = self.pending.len();
            break;
        }
        self.sent = 0;
        if self.pending.capacity() > KEEP_PENDING {
            self.pending = Vec::new();
        } else {
            self.pending.clear();
        }
        self.check().into()
    }
}

/// The sender task of a plain connection: sends whenever a flush asks, and wakes the
/// connection's task when it is waiting for room or for the send. It ends once the connection
/// is dropped (the socket goes with it, so a peer that stopped reading holds nothing here).
async fn send_when_asked(stream: Weak<RefCell<Stream>>, out: Rc<RefCell<Outbox>>) {
    std::future::poll_fn(|cx| {
        let Some(stream) = stream.upgrade() else {
            return Poll::Ready(());
        };
        let mut o = out.borrow_mut();
        // Woken by the connection (a flush, or the drop) or by the socket: either way this
        // waker is the one to use next.
        o.sender = Some(cx.waker().clone());
        if o.requested {
            if o.poll_send(&mut stream.borrow_mut(), cx).is_pending() {
                return Poll::Pending;
            }
            o.requested = false;
            if let Some(w) = o.writer.take() {
                w.wake();
            }
        }
        Poll::Pending
    })
    .await
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
        let deferred = matches!(stream, Stream::Plain(_));
        let conn = Conn {
            deferred,
            stream: Rc::new(RefCell::new(stream)),
            buf: vec![0u8; 16 << 10].into_boxed_slice(),
            replay: Vec::new(),
            filter: None,
            out: Rc::default(),
        };
        if deferred {
            // Started here, where nothing is borrowed: glommio may run a new task at once.
            let task = send_when_asked(Rc::downgrade(&conn.stream), conn.out.clone());
            glommio::spawn_local(task).detach();
        }
        conn
    }

    /// Asks the sender task to send what is held.
    fn ask_sender(out: &mut Outbox) {
        out.requested = true;
        if let Some(w) = out.sender.take() {
            w.wake();
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
        let mut chunk = [0u8; H2_PREFACE.len()];
        while self.replay.len() < H2_PREFACE.len() {
            let want = H2_PREFACE.len() - self.replay.len();
            let read = std::future::poll_fn(|cx| {
                Pin::new(&mut *self.stream.borrow_mut()).poll_read(cx, &mut chunk[..want])
            });
            match read.await {
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
            let read =
                Pin::new(&mut *this.stream.borrow_mut()).poll_read(cx, &mut this.buf[..want]);
            match read {
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

/// Writes are gathered in the [`Outbox`]; nothing waits past the flush the protocol asks for
/// longer than the tasks already runnable on the executor.
impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut out = this.out.borrow_mut();
        out.check()?;
        // The bound counts what the socket already took from `pending` too: that part is only
        // freed once all of it is sent, so a reader that drains a little at a time while the
        // writer keeps adding would otherwise grow the buffer without end.
        if !out.pending.is_empty() && out.pending.len() + buf.len() > COALESCE {
            if this.deferred {
                out.writer = Some(cx.waker().clone());
                Conn::ask_sender(&mut out);
                return Poll::Pending;
            }
            ready!(out.poll_send(&mut this.stream.borrow_mut(), cx))?;
        }
        if buf.len() >= COALESCE {
            // Nothing is held: `pending` is empty exactly when everything was sent.
            return Pin::new(&mut *this.stream.borrow_mut()).poll_write(cx, buf);
        }
        out.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut out = this.out.borrow_mut();
        if this.deferred {
            out.check()?;
            if out.held() > 0 {
                Conn::ask_sender(&mut out);
            }
            // A plain socket buffers nothing of its own.
            return Poll::Ready(Ok(()));
        }
        ready!(out.poll_send(&mut this.stream.borrow_mut(), cx))?;
        Pin::new(&mut *this.stream.borrow_mut()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut out = this.out.borrow_mut();
        if this.deferred && out.held() > 0 {
            out.writer = Some(cx.waker().clone());
            Conn::ask_sender(&mut out);
            return Poll::Pending;
        }
        ready!(out.poll_send(&mut this.stream.borrow_mut(), cx))?;
        Pin::new(&mut *this.stream.borrow_mut()).poll_close(cx)
    }
}

impl Drop for Conn {
    /// What was written and not sent goes out if the socket takes it at once; nothing waits
    /// for a peer that stopped reading. The sender task, woken, finds the socket gone and ends.
    fn drop(&mut self) {
        let mut out = self.out.borrow_mut();
        if out.held() > 0 {
            let mut cx = Context::from_waker(Waker::noop());
            let _ = out.poll_send(&mut self.stream.borrow_mut(), &mut cx);
            out.pending = Vec::new();
            out.sent = 0;
        }
        if let Some(w) = out.sender.take() {
            w.wake();
        }
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

    async fn shutdown(conn: &mut Conn) -> io::Result<()> {
        std::future::poll_fn(|cx| hyper::rt::Write::poll_shutdown(Pin::new(&mut *conn), cx)).await
    }

    /// Runs `body` on a fresh executor with a connected pair: this side as a glommio socket,
    /// the peer as a blocking std socket.
    fn with_pair<T, F>(body: impl FnOnce(TcpStream, std::net::TcpStream) -> F + Send + 'static) -> T
    where
        F: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        crate::runtime::builder(glommio::Placement::Unbound, "io-test")
            .spawn(move || async move {
                let stream = TcpStream::connect(addr).await.expect("connect");
                let (peer, _) = listener.accept().expect("accept");
                body(stream, peer).await
            })
            .expect("executor")
            .join()
            .expect("join")
    }

    #[test]
    fn writes_wait_for_the_flush_and_keep_their_order() {
        let big: Vec<u8> = (0..COALESCE + 100).map(|i| (i % 251) as u8).collect();
        let expected = [b"hello world".as_slice(), b"a", &big].concat();
        let received = with_pair(|stream, mut peer| async move {
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
            shutdown(&mut conn).await.expect("shutdown");
            drop(conn);
            reader.join().expect("reader")
        });
        assert!(
            received == expected,
            "bytes arrived out of order or missing"
        );
    }

    fn small_buffer(fd: std::os::fd::RawFd, option: libc::c_int) {
        let size: libc::c_int = 16 << 10;
        // SAFETY: a valid socket and a pointer to a c_int of the length passed.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "setsockopt: {}", io::Error::last_os_error());
    }

    #[test]
    fn a_slow_reader_gets_every_byte_and_the_buffer_stays_bounded() {
        const TOTAL: usize = 4 << 20;
        let (largest, received) = with_pair(|stream, mut peer| async move {
            // Small socket buffers and a reader taking small pieces with pauses: the
            // socket drains a little at a time while the writer keeps going, so sends
            // are partial.
            use std::os::fd::AsRawFd;
            small_buffer(stream.as_raw_fd(), libc::SO_SNDBUF);
            small_buffer(peer.as_raw_fd(), libc::SO_RCVBUF);
            let reader = std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                let mut total = 0;
                loop {
                    match peer.read(&mut chunk).expect("read") {
                        0 => return total,
                        n => total += n,
                    }
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            });
            let mut conn = Conn::new(stream);
            let frame = [7u8; 1000];
            let (mut written, mut largest) = (0, 0);
            while written < TOTAL {
                written += write(&mut conn, &frame).await.expect("write");
                flush(&mut conn).await.expect("flush");
                largest = largest.max(conn.out.borrow().pending.capacity());
            }
            shutdown(&mut conn).await.expect("shutdown");
            drop(conn);
            (largest, reader.join().expect("reader"))
        });
        assert_eq!(received, TOTAL.div_ceil(1000) * 1000);
        assert!(
            largest <= 2 * COALESCE,
            "{largest} bytes held for a slow reader, bound {}",
            2 * COALESCE
        );
    }

    #[test]
    fn bytes_already_sent_count_against_the_bound() {
        with_pair(|stream, _peer| async move {
            let mut conn = Conn::new(stream);
            // The sender is part-way through: most of what is held already went out.
            {
                let mut out = conn.out.borrow_mut();
                out.pending = vec![1u8; COALESCE - 1000];
                out.sent = COALESCE - 2000;
                out.requested = true;
            }
            let mut cx = Context::from_waker(Waker::noop());
            let more = [2u8; 2000];
            let polled = hyper::rt::Write::poll_write(Pin::new(&mut conn), &mut cx, &more);
            let out = conn.out.borrow();
            assert!(
                polled.is_pending() && out.pending.len() == COALESCE - 1000,
                "a write was taken while the buffer, sent part included, was full"
            );
            drop(out);
            // Not sent: the test only looked at the bookkeeping.
            conn.out.borrow_mut().pending.clear();
            conn.out.borrow_mut().sent = 0;
        });
    }

    #[test]
    fn what_a_dropped_connection_flushed_still_arrives() {
        let received = with_pair(|stream, mut peer| async move {
            let mut conn = Conn::new(stream);
            write(&mut conn, b"bye").await.expect("write");
            flush(&mut conn).await.expect("flush");
            // Dropped before the sender task had a turn.
            drop(conn);
            let mut all = Vec::new();
            peer.read_to_end(&mut all).expect("read");
            all
        });
        assert_eq!(received, b"bye");
    }
}
