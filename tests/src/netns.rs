//! Network-namespace test beds: a server namespace and a client namespace joined by a veth
//! pair, and an in-process enforcer (ws-guard's real programs attached to the server's veth).
//!
//! Layout for test bed number `n` (one per test, 1..=250):
//!
//! ```text
//!  wsg-<tag>-<pid>-cli                                   wsg-<tag>-<pid>-srv
//!  wsg<n>c  198.18.<n>.2 ... 198.18.<n>.9/24   <--->    wsg<n>s  198.18.<n>.1/24
//!           2001:2:0:<nn>00::2, ::3/64                           2001:2:0:<nn>00::1/64
//!           2001:2:0:<nn>01::2/64 (another /64)                  + on-link route to 2001:2:0:<nn>01::/64
//! ```
//!
//! (`<nn>`: `n` in hex; the /64s are inside 2001:2::/48, the fourth group is the subnet.)
//!
//! The veth ends are created directly inside the namespaces, so nothing touches the host's own
//! interfaces. The client end is as a container's peer is: no XDP program and GRO off, so a
//! test sees what users see (on a veth, `xdp_mode = "auto"` attaches in generic mode, whose
//! RSTs reach such a peer; native XDP's would not).
//!
//! Everything a test bed creates is removed by its Drop, also when the test panics: the
//! processes it started (by PID), its guards, and its namespaces (by name).

use std::{
    collections::BTreeMap,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ws_guard::{
    config::Config,
    guard::{Counters, Guard, LoadOptions},
    sweep::{self, SweepReport},
};
use ws_guard_common::maps::{Counter, GlobalConfig, PortConfig, SourceKey};

/// Makes `interface` in `ns` like a container's veth end: GRO off (no XDP program is attached
/// to it). Panics if ethtool is missing or fails.
pub fn peer_like_a_container(ns: &str, interface: &str) {
    let out = Command::new("ip")
        .args([
            "netns", "exec", ns, "ethtool", "-K", interface, "gro", "off",
        ])
        .output()
        .unwrap_or_else(|e| panic!("running ethtool in {ns}: {e}"));
    assert!(
        out.status.success(),
        "ethtool -K {interface} gro off in {ns} failed (is ethtool installed? `cargo xtask \
         setup` installs it): {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Runs `ip ARGS`, panicking with its stderr when it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running `ip {}`: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// `ip ARGS`'s standard output.
pub fn ip_output(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running `ip {}`: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Moves the calling thread into network namespace `ns` (created with `ip netns add`).
/// Only ever called on threads made for it: never on a test's main thread.
fn enter(ns: &str) {
    let path = format!("/var/run/netns/{ns}");
    let f = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
    // SAFETY: a valid namespace fd; setns only changes this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
}

/// Runs `f` on a new thread inside network namespace `ns` and returns its result (a panic in
/// `f` is re-raised here). Sockets `f` creates belong to `ns` and may be used from any thread.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            enter(ns);
            f()
        });
        match h.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

/// Spawns a long-lived thread inside network namespace `ns`.
pub fn spawn_in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        enter(&ns);
        f()
    })
}

/// The protected port of test bed `n` in this process: 10000 + 32 * (pid % 1500) + n.
///
/// The tracepoint program sees the sockets of every namespace and judges them by port, so two
/// test processes running at once (two developers, or `cargo test` next to `cargo xtask test`)
/// must not protect the same port; the PID spreads them apart.
pub fn test_port(n: u8) -> u16 {
    assert!(n < 32, "test bed number {n}: at most 31 per process");
    10_000 + 32 * (std::process::id() % 1500) as u16 + n as u16
}

/// Polls `cond` every 20 ms until it holds or `limit` has passed; returns whether it held.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process a test bed started; killed (by PID) on the test bed's drop if still running.
#[derive(Clone)]
pub struct Process(Arc<Mutex<Child>>);

impl Process {
    /// The PID.
    pub fn pid(&self) -> u32 {
        self.child().id()
    }

    /// The child itself (its pipes, `try_wait`...).
    pub fn child(&self) -> MutexGuard<'_, Child> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `signal` if the process has not been reaped yet (so the PID is still ours).
    pub fn signal(&self, signal: i32) -> bool {
        let mut c = self.child();
        if !matches!(c.try_wait(), Ok(None)) {
            return false;
        }
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(c.id() as i32, signal) == 0 }
    }

    /// Waits (bounded) for the exit; `None` if still running after `limit`.
    pub fn wait_timeout(&self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child().try_wait() {
                return Some(st);
            }
            if start.elapsed() >= limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&self) {
        let mut c = self.child();
        if let Ok(None) = c.try_wait() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Two namespaces joined by a veth pair, addressed as the module documentation shows.
pub struct Testbed {
    /// Number of this test bed: the third IPv4 byte, the IPv6 subnets, the interface names.
    pub n: u8,
    /// Server namespace.
    pub srv: String,
    /// Client namespace.
    pub cli: String,
    /// Server end of the veth pair (in `srv`).
    pub srv_if: String,
    /// Client end of the veth pair (in `cli`).
    pub cli_if: String,
    processes: Mutex<Vec<Process>>,
    namespaces: Vec<String>,
}

impl Testbed {
    /// Creates the namespaces, the veth pair and the addresses. `tag` (a few letters) and `n`
    /// (1..=250) must be unique per test.
    pub fn new(tag: &str, n: u8) -> Self {
        assert!((1..=250).contains(&n), "test bed number {n} out of range");
        assert!(
            tag.len() <= 12 && tag.chars().all(|c| c.is_ascii_alphanumeric()),
            "tag {tag:?}"
        );
        let pid = std::process::id();
        let srv = format!("wsg-{tag}-{pid}-srv");
        let cli = format!("wsg-{tag}-{pid}-cli");
        let mut tb = Testbed {
            n,
            srv: srv.clone(),
            cli: cli.clone(),
            srv_if: format!("wsg{n}s"),
            cli_if: format!("wsg{n}c"),
            processes: Mutex::new(Vec::new()),
            namespaces: Vec::new(),
        };
        // Registered before each step, so a failure half-way still removes what exists.
        for ns in [&srv, &cli] {
            tb.namespaces.push(ns.clone());
            ip(&["netns", "add", ns]);
            // Global IPv6 addresses get nodad; this also covers the link-local ones, so
            // neighbour discovery never waits.
            in_ns(ns, || {
                for conf in ["all", "default"] {
                    std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/accept_dad"), "0")
                        .expect("accept_dad");
                }
            });
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let (s, c) = (tb.srv_if.clone(), tb.cli_if.clone());
        ip(&[
            "-n", &srv, "link", "add", &s, "type", "veth", "peer", "name", &c, "netns", &cli,
        ]);
        ip(&[
            "-n",
            &srv,
            "addr",
            "add",
            &format!("198.18.{n}.1/24"),
            "dev",
            &s,
        ]);
        ip(&[
            "-n",
            &srv,
            "addr",
            "add",
            &format!("{}/64", tb.server_v6()),
            "dev",
            &s,
            "nodad",
        ]);
        for a in tb.client_v4_all() {
            ip(&["-n", &cli, "addr", "add", &format!("{a}/24"), "dev", &c]);
        }
        for a in tb.client_v6_all() {
            ip(&[
                "-n",
                &cli,
                "addr",
                "add",
                &format!("{a}/64"),
                "dev",
                &c,
                "nodad",
            ]);
        }
        ip(&["-n", &srv, "link", "set", &s, "up"]);
        ip(&["-n", &cli, "link", "set", &c, "up"]);
        // The client's second /64 is on the same link: the server reaches it on-link.
        ip(&[
            "-n",
            &srv,
            "-6",
            "route",
            "add",
            &format!("2001:2:0:{:x}::/64", Self::subnet(n, 1)),
            "dev",
            &s,
        ]);
        let up = wait_until(Duration::from_secs(5), || {
            ip_output(&["-n", &srv, "-o", "link", "show", "dev", &s]).contains("state UP")
                && ip_output(&["-n", &cli, "-o", "link", "show", "dev", &c]).contains("state UP")
        });
        assert!(up, "veth pair {s}/{c} did not come up within 5 s");

        // The client end as a user's peer is: no XDP program, GRO off (a container's veth).
        peer_like_a_container(&cli, &c);
        tb
    }

    /// The server's IPv4 address.
    pub fn server_v4(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, self.n, 1))
    }

    /// The fourth group of this test bed's IPv6 /64 number `k` (0: the server's, 1: another).
    fn subnet(n: u8, k: u8) -> u16 {
        (n as u16) << 8 | k as u16
    }

    /// The server's IPv6 address.
    pub fn server_v6(&self) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            2,
            0,
            Self::subnet(self.n, 0),
            0,
            0,
            0,
            1,
        ))
    }

    /// Client IPv4 address `i` (0..8): 198.18.n.(2 + i).
    pub fn client_v4(&self, i: u8) -> IpAddr {
        assert!(i < 8, "client address {i}");
        IpAddr::V4(Ipv4Addr::new(198, 18, self.n, 2 + i))
    }

    fn client_v4_all(&self) -> Vec<IpAddr> {
        (0..8).map(|i| self.client_v4(i)).collect()
    }

    /// Client IPv6 addresses: `0` = 2001:2:0:<nn>00::2 and `1` = 2001:2:0:<nn>00::3 (one /64,
    /// the server's), `2` = 2001:2:0:<nn>01::2 (another /64).
    pub fn client_v6(&self, i: u8) -> IpAddr {
        let (s0, s1) = (Self::subnet(self.n, 0), Self::subnet(self.n, 1));
        IpAddr::V6(match i {
            0 => Ipv6Addr::new(0x2001, 2, 0, s0, 0, 0, 0, 2),
            1 => Ipv6Addr::new(0x2001, 2, 0, s0, 0, 0, 0, 3),
            2 => Ipv6Addr::new(0x2001, 2, 0, s1, 0, 0, 0, 2),
            _ => panic!("client IPv6 address {i}"),
        })
    }

    fn client_v6_all(&self) -> Vec<IpAddr> {
        (0..3).map(|i| self.client_v6(i)).collect()
    }

    /// `ip netns exec <ns> PROGRAM ARGS...`, started as a child that this test bed kills on drop.
    /// `ip netns exec` execs the program, so the PID is the program's own.
    pub fn spawn_in(&self, ns: &str, program: &str, args: &[&str], stderr: Stdio) -> Process {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program} in {ns}: {e}"));
        let p = Process(Arc::new(Mutex::new(child)));
        self.processes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(p.clone());
        p
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for p in self
            .processes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            p.kill();
        }
        for ns in self.namespaces.drain(..).rev() {
            let out = Command::new("ip").args(["netns", "del", &ns]).output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "warning: ip netns del {ns}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("warning: ip netns del {ns}: {e}"),
            }
        }
    }
}

/// What the background sweep has done so far.
#[derive(Clone, Debug, Default)]
pub struct SweepTotals {
    pub rounds: u64,
    pub expired: u64,
    pub released: u64,
    pub adopted: u64,
    pub errors: Vec<String>,
}

impl SweepTotals {
    fn add(&mut self, r: SweepReport) {
        self.rounds += 1;
        self.expired += r.expired as u64;
        self.released += r.released as u64;
        self.adopted += r.adopted as u64;
    }
}

/// ws-guard running inside the test process, as the daemon runs it: the configuration applied,
/// the tracepoint attached, a first sweep (adopting existing connections), the XDP program
/// attached to the server's veth, and a sweep every 200 ms from inside the server namespace.
pub struct Enforcer {
    guard: Arc<Mutex<Guard>>,
    /// The configuration it was started with.
    pub cfg: Config,
    stop: Arc<AtomicBool>,
    totals: Arc<Mutex<SweepTotals>>,
    sweeper: Option<JoinHandle<()>>,
}

/// How often the test enforcer sweeps.
pub const SWEEP_EVERY: Duration = Duration::from_millis(200);

impl Enforcer {
    /// Starts enforcing `toml` (a whole ws-guard configuration) on the test bed's server veth.
    pub fn start(tb: &Testbed, toml: &str) -> Self {
        let cfg = Config::parse(toml, "test config").expect("test config");
        let mut guard = Guard::load(&LoadOptions::from_config(&cfg)).expect("loading ws-guard");
        guard.apply(&cfg).expect("applying the config");
        guard.attach_tracepoint().expect("attaching the tracepoint");
        let guard = Arc::new(Mutex::new(guard));
        let totals = Arc::new(Mutex::new(SweepTotals::default()));
        in_ns(&tb.srv, || {
            let mut g = guard.lock().unwrap();
            let first = sweep::sweep_now(&mut g, cfg.handshake_timeout).expect("first sweep");
            totals.lock().unwrap().add(first);
            g.attach_xdp(&tb.srv_if, cfg.xdp_mode)
                .expect("attaching XDP to the server veth");
        });
        let stop = Arc::new(AtomicBool::new(false));
        let sweeper = {
            let (guard, stop, totals) = (guard.clone(), stop.clone(), totals.clone());
            let timeout = cfg.handshake_timeout;
            spawn_in_ns(&tb.srv, move || {
                // Bounded: at most 30 minutes even if never stopped.
                let start = Instant::now();
                let mut sweeper = sweep::Sweeper::default();
                while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(1800) {
                    std::thread::sleep(SWEEP_EVERY);
                    // The totals are updated before the guard is unlocked, so what a test
                    // reads from the maps and from the totals agree.
                    let mut g = guard.lock().unwrap_or_else(|p| p.into_inner());
                    let r = sweeper.run(&mut g, timeout);
                    let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
                    match r {
                        Ok(r) => t.add(r),
                        Err(e) => t.errors.push(format!("{e:#}")),
                    }
                }
            })
        };
        Enforcer {
            guard,
            cfg,
            stop,
            totals,
            sweeper: Some(sweeper),
        }
    }

    /// The guard, locked (the sweep waits meanwhile).
    pub fn guard(&self) -> MutexGuard<'_, Guard> {
        self.guard.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets one port's limits at run time (no reload).
    pub fn set_port(&self, port: u16, limits: PortConfig) {
        self.guard().set_port(port, limits).expect("set_port");
    }

    /// Sets the global settings at run time.
    pub fn set_global(&self, g: GlobalConfig) {
        self.guard().set_global(g).expect("set_global");
    }

    /// The limits of `port` now in force.
    pub fn port(&self, port: u16) -> PortConfig {
        self.guard()
            .ports()
            .expect("ports")
            .into_iter()
            .find(|(p, _)| *p == port)
            .map(|(_, c)| c)
            .unwrap_or_default()
    }

    /// Decision counters.
    pub fn counters(&self) -> Counters {
        self.guard().counters().expect("counters")
    }

    /// One counter.
    pub fn counter(&self, c: Counter) -> u64 {
        self.counters().get(c)
    }

    /// Live connections per source key.
    pub fn connections(&self) -> BTreeMap<SourceKey, u32> {
        self.guard().connections().expect("connections")
    }

    /// Live connections charged to `addr` (masked as the kernel masks it) on `port`.
    pub fn connections_of(&self, addr: IpAddr, port: u16) -> u32 {
        let g = self.guard();
        let global = g.global().expect("global");
        let (family, bytes) = match addr {
            IpAddr::V4(a) => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&a.octets());
                (ws_guard_common::maps::AF_INET, b)
            }
            IpAddr::V6(a) => (ws_guard_common::maps::AF_INET6, a.octets()),
        };
        let key = ws_guard_common::key::source_key(family, bytes, port, &global);
        g.connections()
            .expect("connections")
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    /// Live connections on `port`, all sources together.
    pub fn total_on(&self, port: u16) -> u32 {
        self.connections()
            .iter()
            .filter(|(k, _)| k.port == port)
            .map(|(_, v)| *v)
            .sum()
    }

    /// Half-open attempts tracked.
    pub fn pending_len(&self) -> usize {
        self.guard().pending().expect("pending").len()
    }

    /// Established connections tracked.
    pub fn owned_len(&self) -> usize {
        self.guard().owned().expect("owned").len()
    }

    /// What the background sweep has done.
    pub fn sweeps(&self) -> SweepTotals {
        self.totals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A snapshot of the accounting, for assertion messages.
    pub fn describe(&self) -> String {
        let g = self.guard();
        format!(
            "connections {:?}\npending {:?}\nowned {:?}\ncounters {:?}\nsweeps {:?}",
            g.connections().ok().map(|m| m
                .iter()
                .map(|(k, v)| (source_text(k), *v))
                .collect::<Vec<_>>()),
            g.pending().ok().map(|v| v.len()),
            g.owned().ok().map(|v| v.len()),
            g.counters()
                .ok()
                .map(|c| c.0.into_iter().filter(|(_, v)| *v != 0).collect::<Vec<_>>()),
            self.sweeps(),
        )
    }
}

/// A source key as text, e.g. `198.18.1.2/9101`.
pub fn source_text(k: &SourceKey) -> String {
    if k.family == ws_guard_common::maps::AF_INET {
        format!(
            "{}/{}",
            Ipv4Addr::new(k.addr[0], k.addr[1], k.addr[2], k.addr[3]),
            k.port
        )
    } else {
        format!("{}/{}", Ipv6Addr::from(k.addr), k.port)
    }
}

impl Drop for Enforcer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.sweeper.take() {
            let _ = h.join();
        }
    }
}

/// The socket address of `ip` and `port`.
pub fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}
