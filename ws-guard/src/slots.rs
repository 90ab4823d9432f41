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

use std::{
    collections::BTreeMap,
    os::fd::RawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

/// The slots of one endpoint.
pub struct Slots {
    max: usize,
    /// Whether bytes at the head of a socket hold a whole request.
    complete: fn(&[u8]) -> bool,
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
        self.0.store(true, Ordering::Relaxed);
        BusyGuard(self.0.clone())
    }
}

struct BusyGuard(Arc<AtomicBool>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// An admitted connection, to [`Slots::register`] once its task is spawned.
pub struct Admitted {
    id: u64,
    pub busy: Busy,
}

impl Slots {
    /// `max` connections at once; `complete` says whether a socket's first bytes hold a whole
    /// request.
    pub fn new(max: usize, complete: fn(&[u8]) -> bool) -> Self {
        Self {
            max,
            complete,
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
            let victim = open
                .conns
                .iter()
                .find(|(_, e)| !e.busy.load(Ordering::Relaxed) && !self.waiting(e.fd))
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
        let mut buf = [0u8; 4096];
        // SAFETY: a valid buffer of that length; MSG_PEEK leaves the data in the socket. A
        // descriptor closed meanwhile fails (or peeks another socket, which reads nothing).
        let n = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n > 0 && (self.complete)(&buf[..n as usize])
    }
}

/// An HTTP request's header is complete.
pub fn http_header_complete(b: &[u8]) -> bool {
    b.windows(4).any(|w| w == b"\r\n\r\n")
}

/// A control request (one line) is complete.
pub fn line_complete(b: &[u8]) -> bool {
    b.contains(&b'\n')
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;

    #[tokio::test]
    async fn a_new_connection_replaces_the_oldest_idle_one_never_a_waiting_one() {
        use std::io::Write as _;
        let slots = Slots::new(2, line_complete);
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
    fn completeness() {
        assert!(http_header_complete(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(!http_header_complete(b"GET / HTTP/1.1\r\nHost: x\r\n"));
        assert!(line_complete(b"{\"command\":\"status\"}\n"));
        assert!(!line_complete(b"{\"command\""));
    }
}
