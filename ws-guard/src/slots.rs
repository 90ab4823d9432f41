//! Connection slots of the daemon's local endpoints (the metrics endpoint, the control socket).
//!
//! Their clients are local, and some are not friendly: any user can connect to the metrics
//! endpoint, and an operator's scripts may leave control connections open. A bounded number of
//! connections keeps file descriptors bounded, but a new connection must never wait for a slot,
//! or a few slow or idle clients (reconnecting as fast as they like) lock out Prometheus or the
//! operator. So when every slot is taken, a new connection takes the slot of the oldest one
//! that is neither answering a request nor has a whole request waiting in its socket: a client
//! that sends its request at once (Prometheus, the CLI) always has one waiting or being
//! answered, so it is never the one closed, however fast others reconnect.
//!
//! Two gaps would let such a client be closed all the same, and both are shut: a connection
//! accepted before its request arrived (the client was slow to write after connecting) is as
//! closable as an idle one, so the metrics endpoint's listener defers accepting a connection
//! until its first bytes are in ([`defer_accept`]; a Unix socket, the control socket's, has no
//! such option); and a request read out of its socket but not yet marked busy is in neither
//! place, so both endpoints read through [`Watched`], which marks the connection busy before it
//! reads the bytes that complete a request, and [`Slots::admit`] looks at the socket before the
//! mark.

use std::{
    collections::BTreeMap,
    io,
    os::fd::{AsRawFd, RawFd},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf},
    net::{TcpListener, TcpStream, UnixStream},
};

/// The slots of one endpoint.
pub struct Slots {
    max: usize,
    /// What ends a request ([`HTTP_HEADER_END`], [`LINE_END`]).
    end: &'static [u8],
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    next: u64,
    /// By age (ids grow): whether a request is being answered, how to close the connection, and
    /// its socket.
    conns: BTreeMap<u64, Entry>,
}

struct Entry {
    busy: Arc<AtomicBool>,
    abort: Option<tokio::task::AbortHandle>,
    fd: RawFd,
}

/// A connection's place: [`Busy::start`] while a request is answered.
#[derive(Clone)]
pub struct Busy(Arc<AtomicBool>);

impl Busy {
    /// Marks the connection busy until the returned guard is dropped.
    pub fn start(&self) -> impl Drop + use<> {
        self.0.store(true, Ordering::SeqCst);
        BusyGuard(self.0.clone())
    }
}

struct BusyGuard(Arc<AtomicBool>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// An admitted connection, to [`Slots::register`] once its task is spawned.
pub struct Admitted {
    id: u64,
    pub busy: Busy,
    end: &'static [u8],
}

impl Admitted {
    /// The connection's stream, to read its requests through (see [`Watched`]).
    pub fn watch<S: Socket>(&self, stream: S) -> Watched<S> {
        Watched {
            inner: stream,
            busy: self.busy.clone(),
            end: self.end,
            matched: 0,
        }
    }
}

impl Slots {
    /// `max` connections at once; `end` ends a request.
    pub fn new(max: usize, end: &'static [u8]) -> Self {
        Self {
            max,
            end,
            open: Mutex::new(Open::default()),
        }
    }

    /// Admits a new connection on socket `fd`, closing another to make room if all are taken
    /// (see the module's documentation). `None`: every connection is answering a request or
    /// has one waiting, and this one has none: close it.
    pub fn admit(&self, fd: RawFd) -> Option<Admitted> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.conns
            .retain(|_, e| e.abort.as_ref().is_none_or(|h| !h.is_finished()));
        if open.conns.len() >= self.max {
            // The socket first, then the mark: a request the reader takes out of the socket
            // was marked before (see [`Watched`]), so it is seen in one or the other.
            let victim = open
                .conns
                .iter()
                .find(|(_, e)| !self.waiting(e.fd) && !e.busy.load(Ordering::SeqCst))
                .map(|(id, _)| *id);
            match victim.and_then(|id| open.conns.remove(&id)) {
                Some(e) => {
                    if let Some(h) = e.abort {
                        h.abort();
                    }
                }
                // Over the limit only for a request that is already there to answer.
                None if self.waiting(fd) => {}
                None => return None,
            }
        }
        open.next += 1;
        let id = open.next;
        let busy = Arc::new(AtomicBool::new(false));
        open.conns.insert(
            id,
            Entry {
                busy: busy.clone(),
                abort: None,
                fd,
            },
        );
        Some(Admitted {
            id,
            busy: Busy(busy),
            end: self.end,
        })
    }

    /// Records how to close an admitted connection (its task).
    pub fn register(&self, admitted: &Admitted, abort: tokio::task::AbortHandle) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = open.conns.get_mut(&admitted.id) {
            e.abort = Some(abort);
        }
    }

    /// Connections held now (ended ones included until the next admission).
    pub fn len(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .conns
            .len()
    }

    /// Whether no connection is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether socket `fd` holds a whole request not yet read. Peeks, so the reader still
    /// reads it.
    fn waiting(&self, fd: RawFd) -> bool {
        let mut buf = [0u8; PEEK];
        // A descriptor closed meanwhile fails (or peeks another socket, which reads nothing).
        peek(fd, &mut buf).is_ok_and(|n| scan(self.end, 0, &buf[..n]).1)
    }
}

/// What ends an HTTP request's header.
pub const HTTP_HEADER_END: &[u8] = b"\r\n\r\n";
/// What ends a control request (one line).
pub const LINE_END: &[u8] = b"\n";

/// Has the kernel queue a TCP connection for accepting only once its first bytes arrived (or
/// after `wait`): a client that connects and then takes its time to send its request never
/// holds a slot without a request in it, however long it is kept from writing.
pub fn defer_accept(listener: &TcpListener, wait: Duration) -> io::Result<()> {
    let secs = libc::c_int::try_from(wait.as_secs().max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid socket and an int option of the right size.
    let r = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&raw const secs).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// After `bytes`, with `matched` bytes of `end` seen just before them: how many are seen at
/// their end, and whether `end` was completed among them (matching starts again after it).
/// Exact for terminators whose first byte does not recur in them (`\r\n\r\n`, `\n`).
fn scan(end: &[u8], mut matched: usize, bytes: &[u8]) -> (usize, bool) {
    let mut completed = false;
    for &b in bytes {
        matched = if b == end[matched] {
            matched + 1
        } else {
            usize::from(b == end[0])
        };
        if matched == end.len() {
            completed = true;
            matched = 0;
        }
    }
    (matched, completed)
}

/// Bytes looked at, and then read, at most per read.
const PEEK: usize = 4096;

/// A connection's stream that marks its slot busy before it reads the bytes that complete a
/// request: each read peeks first and takes no more than it peeked. So a whole request is
/// always either waiting in the socket or marked, which [`Slots::admit`] checks in that order.
/// Made by [`Admitted::watch`].
pub struct Watched<S> {
    inner: S,
    busy: Busy,
    end: &'static [u8],
    matched: usize,
}

impl<S> Watched<S> {
    /// The stream itself (for what is not reading, e.g. the peer's credentials).
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// A socket [`Watched`] can wait on, peek and read without waiting: tokio's TCP and Unix
/// streams.
pub trait Socket: AsyncRead + AsyncWrite + AsRawFd + Unpin {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
}

macro_rules! socket {
    ($t:ty) => {
        impl Socket for $t {
            fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_read_ready(self, cx)
            }
            fn try_io<R>(
                &self,
                interest: Interest,
                f: impl FnOnce() -> io::Result<R>,
            ) -> io::Result<R> {
                <$t>::try_io(self, interest, f)
            }
            fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
                <$t>::try_read(self, buf)
            }
        }
    };
}
socket!(TcpStream);
socket!(UnixStream);

/// `recv(MSG_PEEK)` without waiting.
fn peek(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: a valid buffer of that length.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

impl<S: Socket> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let fd = this.inner.as_raw_fd();
        let mut peeked = [0u8; PEEK];
        let want = buf.remaining().min(PEEK);
        loop {
            ready!(this.inner.poll_read_ready(cx))?;
            // A WouldBlock clears the readiness, so the next round waits.
            let n = match this
                .inner
                .try_io(Interest::READABLE, || peek(fd, &mut peeked[..want]))
            {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            };
            if n == 0 {
                return Poll::Ready(Ok(()));
            }
            if scan(this.end, this.matched, &peeked[..n]).1 {
                this.busy.0.store(true, Ordering::SeqCst);
            }
            // The bytes just peeked, and no more: any after them are looked at first too.
            let dst = &mut buf.initialize_unfilled_to(n)[..n];
            let got = match this.inner.try_read(dst) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            };
            this.matched = scan(this.end, this.matched, &dst[..got]).0;
            buf.advance(got);
            return Poll::Ready(Ok(()));
        }
    }
}

impl<S: Socket> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;

    #[tokio::test]
    async fn a_new_connection_replaces_the_oldest_idle_one_never_a_waiting_one() {
        use std::io::Write as _;
        let slots = Slots::new(2, LINE_END);
        let pair = || std::os::unix::net::UnixStream::pair().unwrap();
        let (a_srv, _a_cli) = pair();
        let (b_srv, mut b_cli) = pair();
        let (c_srv, _c_cli) = pair();
        let (d_srv, mut d_cli) = pair();
        let park = || tokio::spawn(std::future::pending::<()>());
        let a = slots.admit(a_srv.as_raw_fd()).unwrap();
        let ta = park();
        slots.register(&a, ta.abort_handle());
        let b = slots.admit(b_srv.as_raw_fd()).unwrap();
        let tb = park();
        slots.register(&b, tb.abort_handle());
        // b has a whole request waiting: c takes a's place (the oldest idle one).
        b_cli.write_all(b"{}\n").unwrap();
        let c = slots.admit(c_srv.as_raw_fd()).unwrap();
        let tc = park();
        slots.register(&c, tc.abort_handle());
        assert!(ta.await.unwrap_err().is_cancelled());
        // c answering, b waiting: no room, and d has no request of its own.
        let _answering = c.busy.start();
        assert!(slots.admit(d_srv.as_raw_fd()).is_none());
        // d with its request waiting is served over the limit.
        d_cli.write_all(b"{}\n").unwrap();
        assert!(slots.admit(d_srv.as_raw_fd()).is_some());
        assert!(!tb.is_finished());
        tb.abort();
        tc.abort();
    }

    #[test]
    fn scanning_finds_the_header_end_across_any_split() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            // Short runs of the bytes that matter, so ends and near-ends are common.
            let len = (next() % 24) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| b"\r\nx"[(next() % 3) as usize]).collect();
            let whole = scan(HTTP_HEADER_END, 0, &bytes).1;
            let reference = bytes.windows(4).any(|w| w == b"\r\n\r\n");
            assert_eq!(whole, reference, "{bytes:?}");
            // Fed in two parts, the state carries the match over.
            let cut = if len == 0 {
                0
            } else {
                (next() as usize) % (len + 1)
            };
            let (m, first) = scan(HTTP_HEADER_END, 0, &bytes[..cut]);
            let (_, second) = scan(HTTP_HEADER_END, m, &bytes[cut..]);
            assert_eq!(first || second, whole, "{bytes:?} cut at {cut}");
        }
    }

    /// A request is marked busy before the read that takes its last bytes, and the reads give
    /// back exactly the bytes sent.
    #[tokio::test]
    async fn a_watched_stream_marks_a_whole_request_before_reading_it() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let slots = Slots::new(1, HTTP_HEADER_END);
        let admitted = slots.admit(server.as_raw_fd()).unwrap();
        let busy = admitted.busy.clone();
        let mut watched = admitted.watch(server);
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        let (head, tail) = (b"GET / HTTP/1.1\r\nHost: x\r", b"\n\r\n");
        client.write_all(head).await.unwrap();
        while got.len() < head.len() {
            let n = watched.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert!(!busy.0.load(Ordering::SeqCst), "no whole request yet");
        client.write_all(tail).await.unwrap();
        while got.len() < head.len() + tail.len() {
            let n = watched.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(busy.0.load(Ordering::SeqCst), "marked with its last bytes");
        drop(client);
        assert_eq!(watched.read(&mut buf).await.unwrap(), 0, "end of stream");
    }

    #[tokio::test]
    async fn the_listener_defers_accepting_until_the_first_bytes() {
        use tokio::io::AsyncWriteExt as _;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        defer_accept(&listener, Duration::from_secs(5)).unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let early = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
        assert!(early.is_err(), "accepted before any byte arrived");
        client.write_all(b"GET").await.unwrap();
        let (server, _) = tokio::time::timeout(Duration::from_secs(2), listener.accept())
            .await
            .expect("accepted once the bytes arrived")
            .unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(peek(server.as_raw_fd(), &mut buf).unwrap(), 3);
    }

    #[test]
    fn completeness() {
        let complete = |end, b| scan(end, 0, b).1;
        assert!(complete(
            HTTP_HEADER_END,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        ));
        assert!(!complete(HTTP_HEADER_END, b"GET / HTTP/1.1\r\nHost: x\r\n"));
        assert!(complete(LINE_END, b"{\"command\":\"status\"}\n"));
        assert!(!complete(LINE_END, b"{\"command\""));
    }
}
