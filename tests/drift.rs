//! No drift: thousands of real connections, opened and closed in every way, from several sources,
//! through ws-guard's real programs (see `ws_guard_tests::netns`); at the end every per-source
//! count is exactly zero, and nothing is left half-open or established in the maps.
//!
//! The ways a connection ends here: the client closes (FIN), the client resets (SO_LINGER 0),
//! the server closes (FIN), the server resets, the handshake never completes (a bare SYN whose
//! SYN-ACK the client's kernel resets, and one from an address nobody has, whose SYN-ACK goes
//! nowhere), and the server process is killed (SIGKILL) while it holds connections, some with
//! unread data (the kernel resets those), some without (it closes them with a FIN), some not
//! yet accepted (still in the listen queue).
//!
//! `WSG_DRIFT_CONNECTIONS` sets how many (default 10,000).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    process::{Child, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};
use ws_guard_common::maps::Counter;
use ws_guard_tests::{
    netns::{Enforcer, Testbed, in_ns, sa, test_port, wait_until},
    privileged,
    traffic::{Server, Stack},
};

/// Every way a connection ends in this test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    ClientFin,
    ClientRst,
    ServerFin,
    ServerRst,
    /// A bare SYN: the client's kernel resets the SYN-ACK, the server drops its request.
    HandshakeReset,
    /// A bare SYN from an address nobody has: the SYN-ACK goes nowhere.
    HandshakeUnanswered,
    /// The server process is killed while it holds the connection (or has it in its queue).
    ServerKilled,
}

const KINDS: [Kind; 7] = [
    Kind::ClientFin,
    Kind::ClientRst,
    Kind::ServerFin,
    Kind::ServerRst,
    Kind::HandshakeReset,
    Kind::HandshakeUnanswered,
    Kind::ServerKilled,
];

/// Connections (and bare SYNs) per kind.
#[derive(Default)]
struct Tally([AtomicU64; KINDS.len()]);

impl Tally {
    fn add(&self, k: Kind, n: u64) {
        self.0[k as usize].fetch_add(n, Ordering::Relaxed);
    }
    fn get(&self, k: Kind) -> u64 {
        self.0[k as usize].load(Ordering::Relaxed)
    }
    fn total(&self) -> u64 {
        KINDS.iter().map(|k| self.get(*k)).sum()
    }
    fn snapshot(&self) -> BTreeMap<Kind, u64> {
        KINDS.iter().map(|k| (*k, self.get(*k))).collect()
    }
}

/// How many connections: `WSG_DRIFT_CONNECTIONS`, default 10,000.
fn target() -> u64 {
    match std::env::var("WSG_DRIFT_CONNECTIONS") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("WSG_DRIFT_CONNECTIONS={s:?} is not a number")),
        Err(_) => 10_000,
    }
}

/// Longest the whole traffic phase may take, whatever the target.
const TRAFFIC_LIMIT: Duration = Duration::from_secs(600);
/// Time allowed for one connect, one close to be seen, one process to start.
const STEP: Duration = Duration::from_secs(3);

/// Connects from `src` (the calling thread is in the client namespace).
fn connect(src: IpAddr, dst: SocketAddr) -> TcpStream {
    let domain = if src.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    s.bind(&SocketAddr::new(src, 0).into())
        .unwrap_or_else(|e| panic!("binding {src}: {e}"));
    s.connect_timeout(&dst.into(), STEP)
        .unwrap_or_else(|e| panic!("{src} -> {dst}: {e}"));
    s.into()
}

/// Waits (bounded) for the server's FIN or RST, then closes.
fn close_after_peer(mut s: TcpStream) {
    s.set_read_timeout(Some(STEP)).unwrap();
    let mut b = [0u8; 16];
    let start = Instant::now();
    while start.elapsed() < STEP {
        match s.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// Sends bare IPv4 SYNs through a raw socket (IP_HDRINCL: any source address).
struct RawSyn(Socket);

impl RawSyn {
    fn new() -> Self {
        let s = ws_guard_tests::traffic::raw_ipv4_socket();
        Self(s)
    }

    fn send(&self, src: Ipv4Addr, sport: u16, dst: SocketAddrV4) {
        let mut pkt = Vec::new();
        etherparse::PacketBuilder::ipv4(src.octets(), dst.ip().octets(), 64)
            .tcp(sport, dst.port(), 0x2000_0000 + sport as u32, 64240)
            .syn()
            .write(&mut pkt, &[])
            .unwrap();
        let to = SockAddr::from(SocketAddr::V4(SocketAddrV4::new(*dst.ip(), 0)));
        let n = self.0.send_to(&pkt, &to).expect("sending a raw SYN");
        assert_eq!(n, pkt.len());
    }
}

/// One client address's traffic to the in-process server: rounds of eight connections closed
/// two by each of the four TCP ways, and (IPv4) a bare SYN every other round.
#[allow(clippy::too_many_arguments)]
fn worker(
    i: usize,
    src: IpAddr,
    dst: SocketAddr,
    server4: Ipv4Addr,
    server: &Server,
    quota: u64,
    tally: &Tally,
    failed: &AtomicBool,
) {
    let raw = src.is_ipv4().then(RawSyn::new);
    let mut done = 0u64;
    let mut round = 0u32;
    let start = Instant::now();
    while done < quota && start.elapsed() < TRAFFIC_LIMIT && !failed.load(Ordering::Relaxed) {
        let conns: Vec<TcpStream> = (0..8).map(|_| connect(src, dst)).collect();
        for (j, s) in conns.into_iter().enumerate() {
            match j % 4 {
                0 => {
                    drop(s);
                    tally.add(Kind::ClientFin, 1);
                }
                1 => {
                    SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
                    drop(s);
                    tally.add(Kind::ClientRst, 1);
                }
                k => {
                    let me = s.local_addr().unwrap();
                    let closed = wait_until(STEP, || {
                        if k == 2 {
                            server.close(me)
                        } else {
                            server.reset(me)
                        }
                    });
                    assert!(closed, "the server never accepted {me}");
                    close_after_peer(s);
                    tally.add(
                        if k == 2 {
                            Kind::ServerFin
                        } else {
                            Kind::ServerRst
                        },
                        1,
                    );
                }
            }
        }
        done += 8;
        if let (Some(raw), IpAddr::V4(a)) = (&raw, src)
            && round.is_multiple_of(2)
        {
            // A port nothing in the client namespace uses: its kernel resets the SYN-ACK.
            let sport = 20_000 + (round / 2 % 8000) as u16;
            raw.send(a, sport, SocketAddrV4::new(server4, dst.port()));
            tally.add(Kind::HandshakeReset, 1);
            done += 1;
        }
        // Every 64 rounds, one from an address nobody has (198.18.n.200 + i).
        if let (Some(raw), IpAddr::V4(a)) = (&raw, src)
            && round.is_multiple_of(64)
        {
            let o = a.octets();
            let ghost = Ipv4Addr::new(o[0], o[1], o[2], 200 + i as u8);
            let sport = 20_000 + (round / 64 % 8000) as u16;
            raw.send(ghost, sport, SocketAddrV4::new(server4, dst.port()));
            tally.add(Kind::HandshakeUnanswered, 1);
            done += 1;
        }
        round += 1;
    }
}

/// A Python TCP server in the server namespace that accepts `accept` connections (dual-stack,
/// on `port`), says so on its standard output, and holds them until it is killed (or 60 s).
const PY_SERVER: &str = r#"
import socket, sys, time
port, accept = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", port))
s.listen(1024)
print("ready", flush=True)
held = []
for _ in range(accept):
    c, _ = s.accept()
    held.append(c)
    print("accepted", flush=True)
time.sleep(60)
"#;

/// A child process we started; killed by its PID and reaped on drop if still running.
struct Killable {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Killable {
    fn start(ns: &str, port: u16, accept: usize) -> Self {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-u", "-c", PY_SERVER])
            .arg(port.to_string())
            .arg(accept.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting python3 in the server namespace");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut k = Killable { child, lines };
        k.expect_line("ready");
        k
    }

    fn expect_line(&mut self, want: &str) {
        match self.lines.recv_timeout(STEP) {
            Ok(l) if l == want => {}
            other => panic!(
                "the Python server said {other:?}, expected {want:?} (status {:?})",
                self.child.try_wait()
            ),
        }
    }

    /// SIGKILL by PID (`ip netns exec` execs python3, so the PID is the server's), then reap.
    fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        }
        let start = Instant::now();
        while start.elapsed() < STEP {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("the Python server (PID {}) did not die", self.child.id());
    }
}

impl Drop for Killable {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Rounds of: a Python server starts, every client address opens two connections to it (one
/// of them sends a byte the server never reads), it accepts two thirds of them, and is killed.
fn killed_servers(
    tb: &Testbed,
    port: u16,
    sources: &[IpAddr],
    rounds: u64,
    tally: &Tally,
    failed: &AtomicBool,
) {
    let per_round = 2 * sources.len();
    let accept = per_round * 2 / 3;
    let start = Instant::now();
    for _ in 0..rounds {
        if start.elapsed() > TRAFFIC_LIMIT || failed.load(Ordering::Relaxed) {
            break;
        }
        let mut server = Killable::start(&tb.srv, port, accept);
        let conns: Vec<TcpStream> = in_ns(&tb.cli, || {
            let mut v = Vec::new();
            for src in sources {
                let dst = if src.is_ipv4() {
                    sa(tb.server_v4(), port)
                } else {
                    sa(tb.server_v6(), port)
                };
                for j in 0..2 {
                    let mut s = connect(*src, dst);
                    if j == 0 {
                        s.write_all(b"x").unwrap();
                    }
                    v.push(s);
                }
            }
            v
        });
        for _ in 0..accept {
            server.expect_line("accepted");
        }
        server.kill();
        for s in conns {
            close_after_peer(s);
        }
        tally.add(Kind::ServerKilled, per_round as u64);
    }
}

#[test]
fn every_count_returns_to_zero() {
    if !privileged("every_count_returns_to_zero") {
        return;
    }
    let n = target();
    let port = test_port(14);
    let killed_port = test_port(15);
    let tb = Testbed::new("drift", 14);
    let server = Server::start(&tb.srv, port, Stack::Dual);
    // max_connections far above what the test holds at once: an attempt refused means a count
    // drifted up. handshake_timeout short, so unanswered handshakes are released within the test.
    let enf = Enforcer::start(
        &tb,
        &format!(
            "handshake_timeout = \"2s\"\n[capacity]\nsources = 1024\nflows = 16384\n\n\
             [[port]]\nport = {port}\nmax_connections = 256\n\n\
             [[port]]\nport = {killed_port}\nmax_connections = 256\n"
        ),
    );
    let sources: Vec<IpAddr> = (0..8)
        .map(|i| tb.client_v4(i))
        .chain((0..3).map(|i| tb.client_v6(i)))
        .collect();
    let tally = Tally::default();
    let failed = AtomicBool::new(false);
    // About 5 % of the connections end with a killed server; the rest split evenly between
    // the client addresses.
    let per_kill_round = 2 * sources.len() as u64;
    let kill_rounds = (n / 20).div_ceil(per_kill_round).max(1);
    let quota = (n - (kill_rounds * per_kill_round).min(n)).div_ceil(sources.len() as u64);
    let panics = Mutex::new(Vec::new());

    let start = Instant::now();
    std::thread::scope(|s| {
        for (i, src) in sources.iter().enumerate() {
            let dst = if src.is_ipv4() {
                sa(tb.server_v4(), port)
            } else {
                sa(tb.server_v6(), port)
            };
            let IpAddr::V4(server4) = tb.server_v4() else {
                unreachable!()
            };
            let (server, tally, failed, panics, cli) = (&server, &tally, &failed, &panics, &tb.cli);
            s.spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    in_ns(cli, || {
                        worker(i, *src, dst, server4, server, quota, tally, failed)
                    })
                }));
                if let Err(p) = r {
                    failed.store(true, Ordering::Relaxed);
                    panics.lock().unwrap().push(panic_text(&p));
                }
            });
        }
        let (tb, sources, tally, failed, panics) = (&tb, &sources, &tally, &failed, &panics);
        s.spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                killed_servers(tb, killed_port, sources, kill_rounds, tally, failed)
            }));
            if let Err(p) = r {
                failed.store(true, Ordering::Relaxed);
                panics.lock().unwrap().push(panic_text(&p));
            }
        });
    });
    let traffic = start.elapsed();
    let panics = panics.into_inner().unwrap();
    assert!(panics.is_empty(), "{panics:#?}\n{}", enf.describe());
    let total = tally.total();
    assert!(total >= n, "only {total} of {n} connections made");

    // Everything is released: closes by the tracepoint at once, handshakes that never
    // completed by the sweep (1 s without a socket, or the 2 s handshake timeout).
    let settle = Instant::now();
    let zero = wait_until(Duration::from_secs(10), || {
        enf.connections().is_empty() && enf.pending_len() == 0 && enf.owned_len() == 0
    });
    let settled = settle.elapsed();
    let c = enf.counters();
    let sweeps = enf.sweeps();
    eprintln!(
        "{total} connections in {traffic:?} ({:.0}/s), settled in {settled:?}: {:?}\n\
         counters {:?}\nsweeps {sweeps:?}",
        total as f64 / traffic.as_secs_f64(),
        tally.snapshot(),
        c.0.iter().filter(|(_, v)| **v != 0).collect::<Vec<_>>(),
    );
    assert!(zero, "counts did not return to zero\n{}", enf.describe());
    assert!(sweeps.errors.is_empty(), "{sweeps:?}");
    // Nothing refused, nothing untracked.
    for k in [
        Counter::ConnLimited,
        Counter::RateLimited,
        Counter::MapFull,
        Counter::UntrackedFull,
    ] {
        assert_eq!(c.get(k), 0, "{}: {c:?}", k.name());
    }
    // Every tracked connection released exactly once (by the tracepoint, or by the sweep).
    assert_eq!(
        c.get(Counter::Admitted) + c.get(Counter::Adopted),
        c.get(Counter::Closed) + c.get(Counter::Expired),
        "{c:?}"
    );
    // Every SYN judged (admitted, or seen as the retransmission of a tracked attempt); every
    // completed handshake counted (by the tracepoint, or adopted by the sweep); every bare SYN
    // released by the sweep.
    let bare = tally.get(Kind::HandshakeReset) + tally.get(Kind::HandshakeUnanswered);
    assert!(
        c.get(Counter::Admitted) + c.get(Counter::SynRetransmits) >= total,
        "{total} SYNs: {c:?}"
    );
    assert!(sweeps.expired >= bare, "{bare} bare SYNs: {sweeps:?}");
    // Every connection went through the XDP program and is counted exactly once: established by
    // the tracepoint, or (when its half-open entry was released before its handshake completed,
    // e.g. the kernel dropped SYNs under load for longer than the sweep's grace) adopted by the
    // sweep. A phantom adoption (a connection counted after it closed, between the sweep's two
    // reads) would count one connection twice and break the equality.
    // Under load, a connection whose half-open entry was released early and that closed before
    // two sweeps saw it is never counted at all (seen once in ~10 runs on a loaded 2-core VM):
    // reported, not failed; the counts returning to zero is what this test asserts.
    // Never admitted twice. A connection whose 4-tuple the client reused while the earlier
    // attempt on it was still tracked (a reset handshake is released by the sweep only a second
    // after its last SYN) passes as that attempt's retransmission instead: seen once in ~15
    // runs; the sum above still holds, and it is reported here.
    assert!(c.get(Counter::Admitted) <= total, "{total} SYNs: {c:?}");
    if c.get(Counter::Admitted) < total {
        eprintln!(
            "note: {} of {total} connections' SYNs met a tuple still tracked and passed as \
             retransmissions",
            total - c.get(Counter::Admitted)
        );
    }
    let counted = c.get(Counter::Established) + c.get(Counter::Adopted);
    if counted != total - bare {
        eprintln!(
            "note: {counted} handshakes counted (established + adopted) for {} completed",
            total - bare
        );
    }
    // A phantom (a connection counted after it closed, or counted again) was seen about once
    // per 10,000 connections under load before the sweep also required two rounds to release
    // a connection without a socket: /proc/net/tcp, read in chunks while connections close,
    // can skip a live socket, whose count was then released and adopted again. Not seen since
    // (five runs, 50,250 connections); still reported rather than failed, as it depends on
    // load.
    if sweeps.adopted > sweeps.expired - bare {
        eprintln!("note: adoptions without an early release before them (a phantom): {sweeps:?}");
    }
    if sweeps.adopted != 0 {
        eprintln!(
            "note: {} half-open attempts were released before their handshake completed and \
             counted again when it did",
            sweeps.adopted
        );
    }
    assert!(
        server.wait_held(0, STEP),
        "the server still holds {}",
        server.held()
    );
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}
