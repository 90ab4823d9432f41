//! SYN-cookie mode, end to end: the real daemon on the server's veth, real clients (no XDP
//! program on their side), a spoofed SYN flood sent from the client namespace with forged
//! source addresses, and hand-made segments where the test must control what is sent.
//!
//! Each test has its own test bed number and port. They run one at a time (a lock): each sets
//! the server namespace's sysctls through its daemon and measures what clients see.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use ws_guard_tests::{
    binary::{Daemon, DaemonFiles, wsg},
    netns::{Testbed, in_ns, ip_output, sa, spawn_in_ns, test_port, wait_until},
    privileged,
    traffic::{Outcome, connect_from},
};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn sysctl(ns: &str, name: &str) -> String {
    in_ns(ns, || {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
            .expect("reading a sysctl")
            .trim()
            .to_owned()
    })
}

/// `ws-guard status --json`.
fn status(files: &DaemonFiles) -> Value {
    wsg(&files.socket(), &["--json", "status"]).json()
}

/// A counter of `port`, both families summed.
fn counter(s: &Value, port: u16, name: &str) -> u64 {
    s["counters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["port"] == port)
        .map(|c| c["counters"][name].as_u64().unwrap_or(0))
        .sum()
}

/// Entries of every map, by name.
fn map_entries(s: &Value) -> Vec<(String, u64)> {
    s["maps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["map"].as_str().unwrap().to_owned(),
                m["entries"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn port_active(s: &Value, port: u16) -> bool {
    s["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == port)
        .map(|p| p["syn_cookies_active"].as_bool().unwrap())
        .unwrap_or(false)
}

/// An echo server on `port` (IPv4 and IPv6) in `ns`: accepts everything, echoes what it reads.
struct Echo {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    accepted: Arc<AtomicU64>,
}

impl Echo {
    fn start(ns: &str, port: u16) -> Self {
        let listeners = in_ns(ns, || {
            let v6 = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)).unwrap();
            v6.set_only_v6(false).unwrap();
            v6.set_reuse_address(true).unwrap();
            v6.bind(&SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), port).into())
                .unwrap();
            v6.listen(1024).unwrap();
            let l = TcpListener::from(v6);
            l.set_nonblocking(true).unwrap();
            l
        });
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let t = {
            let (stop, accepted) = (stop.clone(), accepted.clone());
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut conns = Vec::new();
                while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(300) {
                    match listeners.accept() {
                        Ok((s, _)) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            let stop = stop.clone();
                            conns.push(std::thread::spawn(move || echo(s, &stop)));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
                for c in conns {
                    let _ = c.join();
                }
            })
        };
        Echo {
            stop,
            threads: vec![t],
            accepted,
        }
    }
}

fn echo(mut s: TcpStream, stop: &AtomicBool) {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut b = [0u8; 4096];
    let start = Instant::now();
    while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(300) {
        match s.read(&mut b) {
            Ok(0) => return,
            Ok(n) => {
                if s.write_all(&b[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Sends `payload` and reads it back within 2 s.
fn round_trip(s: &mut TcpStream, payload: &[u8]) -> Result<(), String> {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(payload).map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; payload.len()];
    s.read_exact(&mut got).map_err(|e| format!("read: {e}"))?;
    if got != payload {
        return Err("echo differs".into());
    }
    Ok(())
}

/// The test bed, an echo server on `port`, and the daemon on the server's veth with `ports`.
fn setup(tag: &str, n: u8, ports: &str, top: &str) -> (Testbed, Echo, DaemonFiles, Daemon) {
    let tb = Testbed::new(tag, n);
    let port = test_port(n);
    let echo = Echo::start(&tb.srv, port);
    let files = DaemonFiles::new(tag);
    files.write_config(&tb.srv_if, top, ports);
    let daemon = files.start(&tb.srv, &[]);
    (tb, echo, files, daemon)
}

/// A flood of SYNs from forged sources (198.19.0.0/16, random ports) to `dst` from `ns`, in a
/// thread until `stop`; counts what it sent.
fn spoofed_flood(
    ns: &str,
    dst: SocketAddrV4,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> JoinHandle<()> {
    spawn_in_ns(ns, move || {
        let s = ws_guard_tests::traffic::raw_ipv4_socket();
        let to = SockAddr::from(SocketAddr::V4(SocketAddrV4::new(*dst.ip(), 0)));
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let start = Instant::now();
        while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(120) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let src = Ipv4Addr::new(198, 19, (x >> 8) as u8, (x >> 16) as u8 | 1);
            let sport = 1024 + (x >> 24) as u16 % 60000;
            let mut pkt = Vec::new();
            etherparse::PacketBuilder::ipv4(src.octets(), dst.ip().octets(), 64)
                .tcp(sport, dst.port(), (x >> 32) as u32, 64240)
                .syn()
                .options(&[
                    etherparse::TcpOptionElement::MaximumSegmentSize(1460),
                    etherparse::TcpOptionElement::SelectiveAcknowledgementPermitted,
                    etherparse::TcpOptionElement::Timestamp(x as u32, 0),
                    etherparse::TcpOptionElement::Noop,
                    etherparse::TcpOptionElement::WindowScale(7),
                ])
                .unwrap()
                .write(&mut pkt, &[])
                .unwrap();
            if s.send_to(&pkt, &to).is_ok() {
                sent.fetch_add(1, Ordering::Relaxed);
            }
            // A few thousand per second: the veth and both kernels keep up on two cores, and
            // the kernel's own SYN queue (1024) would overflow within a second without cookies.
            if sent.load(Ordering::Relaxed).is_multiple_of(64) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    })
}

fn v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => unreachable!(),
    }
}

/// Connects from `src`, within 900 ms (a SYN retransmission takes 1 s: none allowed).
fn connect_quickly(ns: &str, src: IpAddr, dst: SocketAddr) -> Result<TcpStream, String> {
    let t = Instant::now();
    match connect_from(ns, src, dst, Duration::from_millis(900)) {
        Outcome::Connected(s) => Ok(s),
        other => Err(format!("{src} -> {dst}: {other:?} after {:?}", t.elapsed())),
    }
}

#[test]
fn a_spoofed_flood_stores_nothing_while_real_clients_connect_and_exchange_data() {
    if !privileged("a_spoofed_flood_stores_nothing_while_real_clients_connect_and_exchange_data") {
        return;
    }
    let _serial = serial();
    let n = 1;
    let port = test_port(n);
    let (tb, echo, files, mut daemon) = setup(
        "ckflood",
        n,
        &format!("[[port]]\nport = {port}\nmax_connections = 10\nsyn_cookies = \"on\"\n"),
        "",
    );
    assert!(daemon.wait_for(
        &format!("port {port}: SYN cookies on"),
        Duration::from_secs(5)
    ));
    assert_eq!(sysctl(&tb.srv, "tcp_syncookies"), "2");
    assert_eq!(sysctl(&tb.srv, "tcp_timestamps"), "2");
    let before = map_entries(&status(&files));

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let dst = SocketAddrV4::new(v4(tb.server_v4()), port);
    let flood = spoofed_flood(&tb.cli, dst, stop.clone(), sent.clone());
    assert!(wait_until(Duration::from_secs(5), || sent
        .load(Ordering::Relaxed)
        > 2000));

    // Real clients, IPv4 and IPv6, during the flood: each connects without a retransmitted
    // SYN and exchanges data both ways.
    let mut failures = Vec::new();
    let mut open = Vec::new();
    for i in 0..3u8 {
        for (src, dst) in [
            (tb.client_v4(i), tb.server_v4()),
            (tb.client_v6(i), tb.server_v6()),
        ] {
            for k in 0..3 {
                match connect_quickly(&tb.cli, src, sa(dst, port)) {
                    Ok(mut s) => {
                        if let Err(e) = round_trip(&mut s, format!("hello {src} {k}").as_bytes()) {
                            failures.push(format!("{src}: {e}"));
                        }
                        open.push(s);
                    }
                    Err(e) => failures.push(e),
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    let s = status(&files);
    let forged = sent.load(Ordering::Relaxed);
    let cookies = counter(&s, port, "cookies_sent");
    eprintln!("forged SYNs {forged}, cookies sent {cookies}");
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(open.len(), 18);
    assert_eq!(echo.accepted.load(Ordering::Relaxed), 18);
    // Every forged SYN was answered with a cookie (the real clients' too), none judged.
    assert!(
        cookies >= forged * 99 / 100,
        "{cookies} cookies for {forged} SYNs"
    );
    // Five source keys (two of the IPv6 clients share a /64): each one's first connection came
    // through a cookie; its next ones were judged on their SYN (a source with state).
    assert_eq!(counter(&s, port, "cookie_acks_valid"), 5);
    assert_eq!(counter(&s, port, "admitted"), 18);
    // The maps hold the 5 real source keys and their 18 connections, nothing of the forged
    // ones.
    let after = map_entries(&s);
    let get = |m: &[(String, u64)], name: &str| {
        m.iter().find(|(n, _)| n == name).map(|(_, v)| *v).unwrap()
    };
    for (name, want) in [("WSG_SOURCES", 5), ("WSG_FLOWS", 18)] {
        assert_eq!(get(&before, name), 0, "{name} before");
        assert_eq!(get(&after, name), want, "{name} after: {after:?}");
    }
    // All 18 established.
    let half_open: u64 = s["counters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["half_open"].as_u64().unwrap())
        .sum();
    assert_eq!(half_open, 0, "{s}");
    drop(open);
    daemon.signal(libc::SIGTERM);
    daemon.stop_when_exited(Duration::from_secs(10));
    // The sysctls are the namespace's defaults again.
    assert_eq!(sysctl(&tb.srv, "tcp_syncookies"), "1");
    assert_eq!(sysctl(&tb.srv, "tcp_timestamps"), "1");
}

/// What the client's kernel says the connection negotiated (TCP_INFO, as `ss -ti` shows it):
/// timestamps, SACK, window scales both ways, the MSS used and advertised.
fn negotiated(s: &TcpStream) -> String {
    // SAFETY: a zeroed tcp_info is valid; getsockopt fills at most its size.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the buffer and its length are the struct's.
    let r = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "TCP_INFO");
    let o = info.tcpi_options;
    format!(
        "ts:{} sack:{} wscale:{},{} ecn:{} mss:{} advmss:{}",
        o & 1 != 0,
        o & 2 != 0,
        info.tcpi_snd_rcv_wscale & 0xf,
        info.tcpi_snd_rcv_wscale >> 4,
        o & 8 != 0,
        info.tcpi_snd_mss,
        info.tcpi_advmss,
    )
}

#[test]
fn connections_through_cookies_negotiate_what_the_kernel_would() {
    if !privileged("connections_through_cookies_negotiate_what_the_kernel_would") {
        return;
    }
    let _serial = serial();
    let n = 2;
    let port = test_port(n);
    let plain = test_port(n + 10);
    let tb = Testbed::new("ckopts", n);
    let _echo = Echo::start(&tb.srv, port);
    let _plain_echo = Echo::start(&tb.srv, plain);
    let files = DaemonFiles::new("ckopts");
    files.write_config(
        &tb.srv_if,
        "",
        &format!(
            "[[port]]\nport = {port}\nsyn_cookies = \"on\"\n[[port]]\nport = {plain}\nmax_connections = 100\n"
        ),
    );
    let mut daemon = files.start(&tb.srv, &[]);
    assert!(daemon.wait_for(
        &format!("port {port}: SYN cookies on"),
        Duration::from_secs(5)
    ));
    for (src, dst) in [
        (tb.client_v4(0), tb.server_v4()),
        (tb.client_v6(0), tb.server_v6()),
    ] {
        // The same host settings either way (timestamps without offsets while cookies are on).
        let mut a = connect_quickly(&tb.cli, src, sa(dst, plain)).unwrap();
        let mut b = connect_quickly(&tb.cli, src, sa(dst, port)).unwrap();
        round_trip(&mut a, b"x").unwrap();
        round_trip(&mut b, b"x").unwrap();
        let want = negotiated(&a);
        let got = negotiated(&b);
        eprintln!("{src}: without cookies: {want}\n{src}: through a cookie: {got}");
        assert!(want.contains("ts:true sack:true"), "{want}");
        assert_eq!(got, want, "{src}");
    }
    let s = status(&files);
    assert_eq!(counter(&s, port, "cookie_acks_valid"), 2);
    assert_eq!(counter(&s, plain, "cookies_sent"), 0);
    daemon.signal(libc::SIGTERM);
    daemon.stop_when_exited(Duration::from_secs(10));
}

#[test]
fn auto_switches_cookies_on_under_a_flood_and_off_after_it() {
    if !privileged("auto_switches_cookies_on_under_a_flood_and_off_after_it") {
        return;
    }
    let _serial = serial();
    let n = 3;
    let port = test_port(n);
    let (tb, _echo, files, mut daemon) = setup(
        "ckauto",
        n,
        &format!(
            "[[port]]\nport = {port}\nmax_connections = 10\nsyn_cookies = \"auto\"\nsyn_cookie_threshold = 200\n"
        ),
        "handshake_timeout = \"3s\"\n",
    );
    assert!(!port_active(&status(&files), port));
    assert_eq!(sysctl(&tb.srv, "tcp_syncookies"), "1");
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let dst = SocketAddrV4::new(v4(tb.server_v4()), port);
    let flood = spoofed_flood(&tb.cli, dst, stop.clone(), sent.clone());
    let on = daemon.wait_for(
        &format!("port {port}: SYN cookies on"),
        Duration::from_secs(10),
    );
    let engaged_after = sent.load(Ordering::Relaxed);
    assert!(on, "cookies never went on ({engaged_after} forged SYNs)");
    let s = status(&files);
    assert!(port_active(&s, port));
    assert_eq!(sysctl(&tb.srv, "tcp_syncookies"), "2");
    // While on, a real client gets in at once.
    let mut c = connect_quickly(&tb.cli, tb.client_v4(0), sa(tb.server_v4(), port)).unwrap();
    round_trip(&mut c, b"during").unwrap();
    assert!(wait_until(Duration::from_secs(3), || counter(
        &status(&files),
        port,
        "cookies_sent"
    ) > 500));
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    // Off once the flood is over: the unanswered cookies age out (3 s), then the cool-down.
    let off = daemon.wait_for(
        &format!("port {port}: SYN cookies off"),
        Duration::from_secs(30),
    );
    assert!(off, "cookies stayed on after the flood");
    let s = status(&files);
    assert!(!port_active(&s, port));
    let text = wsg(&files.socket(), &["status"]).ok().stdout;
    assert!(text.contains("auto"), "{text}");
    // The sysctls are put back a moment later.
    assert!(wait_until(Duration::from_secs(10), || sysctl(
        &tb.srv,
        "tcp_syncookies"
    ) == "1"));
    assert_eq!(sysctl(&tb.srv, "tcp_timestamps"), "1");
    // Judged on the SYN again.
    let before = counter(&s, port, "cookies_sent");
    let mut c2 = connect_quickly(&tb.cli, tb.client_v4(1), sa(tb.server_v4(), port)).unwrap();
    round_trip(&mut c2, b"after").unwrap();
    assert_eq!(counter(&status(&files), port, "cookies_sent"), before);
    daemon.signal(libc::SIGTERM);
    daemon.stop_when_exited(Duration::from_secs(10));
}

/// A raw handshake from an address the client namespace does not have, so its kernel never
/// answers for it: segments sent with IPPROTO_RAW, answers read with AF_PACKET.
struct RawPeer {
    send: Socket,
    sniff: Socket,
    src: Ipv4Addr,
    dst: SocketAddrV4,
}

const SPORT: u16 = 43_210;

impl RawPeer {
    fn new(ns: &str, interface: &str, src: Ipv4Addr, dst: SocketAddrV4) -> Self {
        in_ns(ns, || {
            let send = ws_guard_tests::traffic::raw_ipv4_socket();
            let sniff = Socket::new(
                Domain::PACKET,
                Type::RAW,
                Some(Protocol::from((libc::ETH_P_ALL as u16).to_be() as i32)),
            )
            .unwrap();
            let index = ws_guard::guard::ifindex(interface).expect("client interface");
            // SAFETY: a zeroed sockaddr_ll with family, protocol and index set.
            let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            ll.sll_family = libc::AF_PACKET as u16;
            ll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            ll.sll_ifindex = index as i32;
            // SAFETY: binding the packet socket to the interface.
            let r = unsafe {
                libc::bind(
                    std::os::fd::AsRawFd::as_raw_fd(&sniff),
                    (&raw const ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(r, 0, "binding the packet socket");
            sniff
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            RawPeer {
                send,
                sniff,
                src,
                dst,
            }
        })
    }

    fn send(&self, flags: &str, seq: u32, ack: u32) {
        let mut pkt = Vec::new();
        let b = etherparse::PacketBuilder::ipv4(self.src.octets(), self.dst.ip().octets(), 64).tcp(
            SPORT,
            self.dst.port(),
            seq,
            64240,
        );
        let b = match flags {
            "S" => b
                .syn()
                .options(&[
                    etherparse::TcpOptionElement::MaximumSegmentSize(1460),
                    etherparse::TcpOptionElement::SelectiveAcknowledgementPermitted,
                    etherparse::TcpOptionElement::Timestamp(1000, 0),
                    etherparse::TcpOptionElement::Noop,
                    etherparse::TcpOptionElement::WindowScale(7),
                ])
                .unwrap(),
            "A" => b.ack(ack),
            "R" => b.rst(),
            _ => unreachable!(),
        };
        b.write(&mut pkt, &[]).unwrap();
        let to = SockAddr::from(SocketAddr::V4(SocketAddrV4::new(*self.dst.ip(), 0)));
        self.send.send_to(&pkt, &to).unwrap();
    }

    /// The next TCP segment from the server to us within `limit`: (flags byte, seq, ack).
    fn answer(&self, limit: Duration) -> Option<(u8, u32, u32)> {
        let start = Instant::now();
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
        while start.elapsed() < limit {
            let Ok(n) = self.sniff.recv(&mut buf) else {
                continue;
            };
            // SAFETY: recv initialised the first n bytes.
            let frame: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            let Ok(h) = etherparse::PacketHeaders::from_ethernet_slice(&frame) else {
                continue;
            };
            let (
                Some(etherparse::NetHeaders::Ipv4(ip, _)),
                Some(etherparse::TransportHeader::Tcp(t)),
            ) = (h.net, h.transport)
            else {
                continue;
            };
            if ip.destination == self.src.octets() && t.destination_port == SPORT {
                let flags =
                    (t.fin as u8) | (t.syn as u8) << 1 | (t.rst as u8) << 2 | (t.ack as u8) << 4;
                return Some((flags, t.sequence_number, t.acknowledgment_number));
            }
        }
        None
    }
}

#[test]
fn invalid_and_replayed_cookie_acks_are_dropped() {
    if !privileged("invalid_and_replayed_cookie_acks_are_dropped") {
        return;
    }
    let _serial = serial();
    let n = 4;
    let port = test_port(n);
    let (tb, echo, files, mut daemon) = setup(
        "ckreplay",
        n,
        &format!("[[port]]\nport = {port}\nmax_connections = 10\nsyn_cookies = \"on\"\n"),
        "",
    );
    assert!(daemon.wait_for(
        &format!("port {port}: SYN cookies on"),
        Duration::from_secs(5)
    ));
    let dst = SocketAddrV4::new(v4(tb.server_v4()), port);
    let peer = RawPeer::new(&tb.cli, &tb.cli_if, Ipv4Addr::new(198, 18, n, 77), dst);

    // A forged ACK: no cookie of the server's. Dropped, not answered (the kernel would RST).
    peer.send("A", 5000, 0xdead_beef);
    assert_eq!(peer.answer(Duration::from_millis(500)), None);
    assert!(wait_until(Duration::from_secs(2), || counter(
        &status(&files),
        port,
        "cookie_acks_invalid"
    ) == 1));

    // A real handshake: SYN, SYN-ACK with the cookie (the same for a retransmitted SYN), ACK.
    peer.send("S", 7000, 0);
    let (flags, cookie, ack) = peer.answer(Duration::from_secs(1)).expect("a SYN-ACK");
    assert_eq!((flags, ack), (0x12, 7001));
    peer.send("S", 7000, 0);
    let (_, again, _) = peer
        .answer(Duration::from_secs(1))
        .expect("a second SYN-ACK");
    assert_eq!(again, cookie, "a retransmitted SYN gets the same cookie");
    peer.send("A", 7001, cookie.wrapping_add(1));
    assert!(wait_until(Duration::from_secs(2), || echo
        .accepted
        .load(Ordering::Relaxed)
        == 1));
    // The connection ends (a RST from the client), and the same ACK comes again.
    peer.send("R", 7001, 0);
    assert!(wait_until(Duration::from_secs(2), || {
        let s = status(&files);
        map_entries(&s)
            .iter()
            .any(|(m, n)| m == "WSG_FLOWS" && *n == 0)
    }));
    peer.send("A", 7001, cookie.wrapping_add(1));
    std::thread::sleep(Duration::from_millis(300));
    let s = status(&files);
    assert_eq!(counter(&s, port, "cookie_acks_replayed"), 1, "{s}");
    assert_eq!(
        echo.accepted.load(Ordering::Relaxed),
        1,
        "the replay made a connection"
    );
    assert_eq!(counter(&s, port, "cookie_acks_valid"), 1);
    assert_eq!(counter(&s, port, "cookie_acks_invalid"), 1);
    daemon.signal(libc::SIGTERM);
    daemon.stop_when_exited(Duration::from_secs(10));
}

#[test]
fn a_client_over_its_limit_is_refused_at_its_ack_with_a_reset() {
    if !privileged("a_client_over_its_limit_is_refused_at_its_ack_with_a_reset") {
        return;
    }
    let _serial = serial();
    let n = 5;
    let port = test_port(n);
    let (tb, _echo, files, mut daemon) = setup(
        "ckack",
        n,
        &format!(
            "[[port]]\nport = {port}\nmax_connections = 1\nconnection_action = \"reject\"\nsyn_cookies = \"on\"\n"
        ),
        "",
    );
    assert!(daemon.wait_for(
        &format!("port {port}: SYN cookies on"),
        Duration::from_secs(5)
    ));
    // The client's bare ACKs are held back, so both of its handshakes are still cookies when
    // their first data (which carries the ACK) arrives: the first is admitted, the second is
    // over max_connections = 1.
    let nft = |args: &str| {
        let out = ip_output(&["netns", "exec", &tb.cli, "sh", "-c", &format!("nft {args}")]);
        eprintln!("nft {args}: {out}");
    };
    nft("add table inet hold");
    nft("add chain inet hold out '{ type filter hook output priority 0; }'");
    nft(&format!(
        "add rule inet hold out tcp dport {port} tcp flags == ack drop"
    ));
    let src = tb.client_v4(0);
    let dst = sa(tb.server_v4(), port);
    let mut first = connect_quickly(&tb.cli, src, dst).unwrap();
    let mut second = connect_quickly(&tb.cli, src, dst).unwrap();
    nft("delete table inet hold");
    round_trip(&mut first, b"first").unwrap();
    let t = Instant::now();
    let r = round_trip(&mut second, b"second");
    let err = r.expect_err("the second connection was admitted");
    assert!(
        err.contains("reset") || err.contains("Connection reset"),
        "{err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "the refusal took {:?}",
        t.elapsed()
    );
    let s = status(&files);
    assert_eq!(counter(&s, port, "cookie_acks_valid"), 2);
    assert_eq!(counter(&s, port, "conn_limited"), 1);
    assert_eq!(counter(&s, port, "rst_sent"), 1);
    daemon.signal(libc::SIGTERM);
    daemon.stop_when_exited(Duration::from_secs(10));
}

#[test]
fn cookies_work_again_after_the_daemon_was_killed_and_restarted() {
    if !privileged("cookies_work_again_after_the_daemon_was_killed_and_restarted") {
        return;
    }
    let _serial = serial();
    let n = 6;
    let port = test_port(n);
    let (tb, echo, files, mut daemon) = setup(
        "ckkill",
        n,
        &format!("[[port]]\nport = {port}\nmax_connections = 10\nsyn_cookies = \"on\"\n"),
        "",
    );
    assert!(daemon.wait_for(
        &format!("port {port}: SYN cookies on"),
        Duration::from_secs(5)
    ));
    let mut c = connect_quickly(&tb.cli, tb.client_v4(0), sa(tb.server_v4(), port)).unwrap();
    round_trip(&mut c, b"before").unwrap();
    // Killed: the pinned programs keep the port in cookie mode, the sysctls stay set.
    daemon.signal(libc::SIGKILL);
    daemon.stop_when_exited(Duration::from_secs(10));
    assert_eq!(sysctl(&tb.srv, "tcp_syncookies"), "2");
    let mut daemon = files.start(&tb.srv, &[]);
    // The next daemon puts the sysctls back first, then sets them again for the port it
    // adopted in cookie mode: a new source still gets in through a cookie.
    assert!(daemon.wait_for(
        "restored net.ipv4.tcp_syncookies = 1",
        Duration::from_secs(5)
    ));
    assert!(wait_until(Duration::from_secs(5), || sysctl(
        &tb.srv,
        "tcp_syncookies"
    ) == "2"));
    let s = status(&files);
    assert!(port_active(&s, port), "{s}");
    let valid = counter(&s, port, "cookie_acks_valid");
    let mut d = connect_quickly(&tb.cli, tb.client_v4(1), sa(tb.server_v4(), port)).unwrap();
    round_trip(&mut d, b"after").unwrap();
    let s = status(&files);
    assert_eq!(counter(&s, port, "cookie_acks_valid"), valid + 1, "{s}");
    assert_eq!(counter(&s, port, "cookie_fallbacks"), 0, "{s}");
    assert_eq!(echo.accepted.load(Ordering::Relaxed), 2);
    daemon.signal(libc::SIGTERM);
    daemon.stop_when_exited(Duration::from_secs(10));
    assert_eq!(sysctl(&tb.srv, "tcp_syncookies"), "1");
    assert_eq!(sysctl(&tb.srv, "tcp_timestamps"), "1");
}
