//! Real TCP traffic between a test bed's namespaces: a server that holds what it accepts (and
//! closes a connection when its client does, as a real server would), clients that connect from
//! a chosen source address, bursts of simultaneous connects, bare SYNs, and a WebSocket echo
//! server.

use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};

use crate::netns::in_ns;

/// Longest a helper thread runs, whatever happens.
const THREAD_LIMIT: Duration = Duration::from_secs(600);

/// Which listening sockets a [`Server`] opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    /// `0.0.0.0:port` and `[::]:port` (IPv6 only): IPv4 clients arrive on an IPv4 socket.
    Separate,
    /// `[::]:port` accepting IPv4 too: IPv4 clients appear as `::ffff:a.b.c.d`.
    Dual,
}

/// The two addresses of a connection compared across families (`::ffff:a.b.c.d` = `a.b.c.d`).
pub fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

/// A TCP server in a namespace. An accept thread keeps every accepted connection open until the
/// test closes it, or until its client closes it (the server then closes its side, like a real
/// server on EOF).
pub struct Server {
    /// The port it listens on.
    pub port: u16,
    held: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens on `port` in namespace `ns`.
    pub fn start(ns: &str, port: u16, stack: Stack) -> Self {
        let listeners = in_ns(ns, || {
            let mut ls = Vec::new();
            let v6 = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)).unwrap();
            v6.set_only_v6(stack == Stack::Separate).unwrap();
            v6.set_reuse_address(true).unwrap();
            v6.bind(&SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), port).into())
                .unwrap_or_else(|e| panic!("binding [::]:{port}: {e}"));
            v6.listen(256).unwrap();
            ls.push(TcpListener::from(v6));
            if stack == Stack::Separate {
                let v4 = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
                v4.set_reuse_address(true).unwrap();
                v4.bind(&SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port).into())
                    .unwrap_or_else(|e| panic!("binding 0.0.0.0:{port}: {e}"));
                v4.listen(256).unwrap();
                ls.push(TcpListener::from(v4));
            }
            for l in &ls {
                l.set_nonblocking(true).unwrap();
            }
            ls
        });
        let held = Arc::new(Mutex::new(Vec::<TcpStream>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (held, stop) = (held.clone(), stop.clone());
            std::thread::spawn(move || {
                let start = Instant::now();
                while !stop.load(Ordering::Relaxed) && start.elapsed() < THREAD_LIMIT {
                    for l in &listeners {
                        // Bounded: at most 64 accepts per listener per round.
                        for _ in 0..64 {
                            match l.accept() {
                                Ok((s, _)) => {
                                    s.set_nonblocking(true).unwrap();
                                    lock(&held).push(s);
                                }
                                Err(_) => break,
                            }
                        }
                    }
                    // Close what the clients closed (EOF) or reset.
                    lock(&held).retain(|s| {
                        let mut b = [0u8; 1];
                        match s.peek(&mut b) {
                            Ok(0) => false,
                            Ok(_) => true,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
                            Err(_) => false,
                        }
                    });
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        Server {
            port,
            held,
            stop,
            thread: Some(thread),
        }
    }

    /// Connections the server holds open.
    pub fn held(&self) -> usize {
        lock(&self.held).len()
    }

    /// Waits (bounded) until the server holds exactly `n` connections.
    pub fn wait_held(&self, n: usize, limit: Duration) -> bool {
        crate::netns::wait_until(limit, || self.held() == n)
    }

    /// Closes every held connection gracefully (FIN).
    pub fn close_all(&self) {
        for s in lock(&self.held).drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
    }

    fn take(&self, peer: SocketAddr) -> Option<TcpStream> {
        let mut held = lock(&self.held);
        let i = held
            .iter()
            .position(|s| s.peer_addr().is_ok_and(|p| same_endpoint(p, peer)))?;
        Some(held.remove(i))
    }

    /// Closes the connection from `peer` (the client's local address) gracefully: FIN.
    pub fn close(&self, peer: SocketAddr) -> bool {
        match self.take(peer) {
            Some(s) => {
                let _ = s.shutdown(std::net::Shutdown::Write);
                true
            }
            None => false,
        }
    }

    /// Resets the connection from `peer`: SO_LINGER 0, then close, so the server sends RST.
    pub fn reset(&self, peer: SocketAddr) -> bool {
        match self.take(peer) {
            Some(s) => {
                SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
                true
            }
            None => false,
        }
    }

    /// Reads one byte from `peer`'s connection and sends it back (bounded by `limit`).
    pub fn echo_once(&self, peer: SocketAddr, limit: Duration) -> io::Result<()> {
        let start = Instant::now();
        loop {
            {
                let held = lock(&self.held);
                let s = held
                    .iter()
                    .find(|s| s.peer_addr().is_ok_and(|p| same_endpoint(p, peer)))
                    .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such connection"))?;
                let mut b = [0u8; 1];
                match (&*s).read(&mut b) {
                    Ok(1) => return (&*s).write_all(&b),
                    Ok(_) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if start.elapsed() >= limit {
                return Err(io::ErrorKind::TimedOut.into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a connection attempt ended.
#[derive(Debug)]
pub enum Outcome {
    Connected(TcpStream),
    /// The server side answered with RST (ECONNREFUSED).
    Refused,
    /// No answer within the timeout (a dropped SYN).
    TimedOut,
    /// Anything else.
    Failed(io::Error),
}

impl Outcome {
    /// The stream; panics with the outcome otherwise.
    pub fn stream(self) -> TcpStream {
        match self {
            Outcome::Connected(s) => s,
            other => panic!("expected a connection, got {other:?}"),
        }
    }

    pub fn is_connected(&self) -> bool {
        matches!(self, Outcome::Connected(_))
    }
}

fn new_socket(src: IpAddr) -> io::Result<Socket> {
    let domain = if src.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    s.bind(&SocketAddr::new(src, 0).into())?;
    Ok(s)
}

/// Connects from `src` (any port) to `dst` inside namespace `ns`, waiting at most `timeout`.
pub fn connect_from(ns: &str, src: IpAddr, dst: SocketAddr, timeout: Duration) -> Outcome {
    in_ns(ns, || {
        let s = match new_socket(src) {
            Ok(s) => s,
            Err(e) => return Outcome::Failed(e),
        };
        match s.connect_timeout(&dst.into(), timeout) {
            Ok(()) => Outcome::Connected(s.into()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Outcome::Refused,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                ) =>
            {
                Outcome::TimedOut
            }
            Err(e) => Outcome::Failed(e),
        }
    })
}

/// What a burst of simultaneous connects gave.
#[derive(Debug, Default)]
pub struct Burst {
    pub connected: Vec<TcpStream>,
    pub refused: usize,
    pub timed_out: usize,
    pub failed: Vec<io::Error>,
}

/// Starts `n` non-blocking connects from `src` to `dst` at once (all SYNs leave before any
/// answer is looked at), then polls until each is decided or `limit` passes.
pub fn burst(ns: &str, src: IpAddr, dst: SocketAddr, n: usize, limit: Duration) -> Burst {
    in_ns(ns, || {
        let mut out = Burst::default();
        let mut socks = Vec::new();
        for _ in 0..n {
            let s = match new_socket(src) {
                Ok(s) => s,
                Err(e) => {
                    out.failed.push(e);
                    continue;
                }
            };
            s.set_nonblocking(true).unwrap();
            match s.connect(&dst.into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => {
                    out.failed.push(e);
                    continue;
                }
            }
            socks.push(Some(s));
        }
        let start = Instant::now();
        while socks.iter().any(Option::is_some) && start.elapsed() < limit {
            let mut fds: Vec<libc::pollfd> = socks
                .iter()
                .flatten()
                .map(|s| libc::pollfd {
                    fd: s.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                })
                .collect();
            // SAFETY: a valid array of pollfd of the given length.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 20) };
            let ready: Vec<i32> = fds
                .iter()
                .filter(|p| p.revents != 0)
                .map(|p| p.fd)
                .collect();
            for slot in socks.iter_mut() {
                let Some(s) = slot else { continue };
                if !ready.contains(&s.as_raw_fd()) {
                    continue;
                }
                let s = slot.take().unwrap();
                match s.take_error() {
                    Ok(None) => {
                        s.set_nonblocking(false).unwrap();
                        out.connected.push(s.into());
                    }
                    Ok(Some(e)) if e.kind() == io::ErrorKind::ConnectionRefused => out.refused += 1,
                    Ok(Some(e)) | Err(e) => out.failed.push(e),
                }
            }
        }
        out.timed_out = socks.iter().flatten().count();
        out
    })
}

/// A raw IPv4 socket of the calling thread's namespace whose packets carry their own IP header
/// (IPPROTO_RAW: IP_HDRINCL), so their source may be any address.
pub fn raw_ipv4_socket() -> Socket {
    Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )
    .expect("a raw IPv4 socket")
}

/// Sends one bare TCP SYN from `src:sport` to `dst` through a raw socket in namespace `ns`.
/// Nothing in `ns` owns that port, so if the SYN-ACK reaches `ns`, its kernel answers RST; if
/// `src` is not an address of `ns`, the SYN-ACK goes nowhere and the server keeps retrying.
pub fn send_syn(ns: &str, src: Ipv4Addr, sport: u16, dst: SocketAddrV4) {
    let mut pkt = Vec::new();
    etherparse::PacketBuilder::ipv4(src.octets(), dst.ip().octets(), 64)
        .tcp(sport, dst.port(), 0x1000_0000 + sport as u32, 64240)
        .syn()
        .write(&mut pkt, &[])
        .unwrap();
    in_ns(ns, || {
        let s = raw_ipv4_socket();
        let to = SockAddr::from(SocketAddr::V4(SocketAddrV4::new(*dst.ip(), 0)));
        let n = s.send_to(&pkt, &to).expect("sending a raw SYN");
        assert_eq!(n, pkt.len());
    });
}

/// A WebSocket echo server in a namespace: one thread per connection, echoing every message.
pub struct WsEchoServer {
    pub port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Connections accepted so far.
    pub accepted: Arc<Mutex<usize>>,
}

impl WsEchoServer {
    /// Listens on `0.0.0.0:port` in namespace `ns`.
    pub fn start(ns: &str, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(Mutex::new(0));
        let listener = in_ns(ns, || {
            let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
                .unwrap_or_else(|e| panic!("binding 0.0.0.0:{port}: {e}"));
            l.set_nonblocking(true).unwrap();
            l
        });
        let thread = {
            let (stop, accepted) = (stop.clone(), accepted.clone());
            std::thread::spawn(move || {
                let mut conns = Vec::new();
                let start = Instant::now();
                while !stop.load(Ordering::Relaxed) && start.elapsed() < THREAD_LIMIT {
                    if let Ok((s, _)) = listener.accept() {
                        *lock(&accepted) += 1;
                        let stop = stop.clone();
                        conns.push(std::thread::spawn(move || ws_echo(s, &stop)));
                    } else {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                for c in conns {
                    let _ = c.join();
                }
            })
        };
        WsEchoServer {
            port,
            stop,
            thread: Some(thread),
            accepted,
        }
    }
}

fn ws_echo(s: TcpStream, stop: &AtomicBool) {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let Ok(mut ws) = tungstenite::accept(s) else {
        return;
    };
    // Short reads from now on, so the stop flag is seen.
    ws.get_ref()
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let start = Instant::now();
    while !stop.load(Ordering::Relaxed) && start.elapsed() < THREAD_LIMIT {
        match ws.read() {
            Ok(m) if m.is_text() || m.is_binary() => {
                if ws.send(m).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for WsEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
