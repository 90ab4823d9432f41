//! Test beds built like a Docker host: the daemon on the host's outside interface, the servers
//! in container namespaces behind a bridge, reached through DNAT (iptables-nft or nftables), by
//! routing, or with the daemon inside a container's namespace on its veth. What a test judges
//! is what the CLIENT sees: a connection open, refused (an RST: ECONNREFUSED), or timed out.
//!
//! Layout of host bed number `b` (1..=15, one per test), namespaces `wsgc<b>-<pid>-<role>`:
//!
//! ```text
//!  C (the internet's clients)           H (the host)                          K1..K3 (containers)
//!  wh<b>c 198.18.<b>.2..9/24    <--->   wh<b>o  198.18.<b>.1/24
//!         2001:2:0:<b>00::2/64                  2001:2:0:<b>00::1/64
//!         2001:2:0:<b>0<i>::2/64 (i=1..3)       (on-link routes to those /64s)
//!                                        wh<b>br 198.19.<b>.1/24                wh<b>k<i> 198.19.<b>.1<i>/24
//!                                                2001:2:0:<b>10::1/64   <--->          2001:2:0:<b>10::1<i>/64
//!                                          ports wh<b>h<i> (bridge)                    default routes via the bridge
//! ```
//!
//! (`<b>00`, `<b>0<i>`, `<b>10`: the fourth group of the IPv6 address, `b` in hex in its high
//! byte.) H forwards (IPv4 and IPv6). No veth end carries an XDP program except the one the
//! daemon attaches to, and every other end has GRO off: the peers are as users have them (on
//! veth, frames sent back with XDP_TX only reach a peer that has an XDP program).
//!
//! A container is a namespace with a process living in it (its "init", `sleep`, started with
//! `ip netns exec`), as a Docker container or a Kubernetes pause container has: the daemon finds
//! a container's sockets through the tasks in /proc, and a namespace with no task in it is not
//! what users have. The server holding the connections is a [`Server`] of this test process,
//! whose listening sockets were made inside the container's namespace.
//!
//! Everything is removed by Drop, also on panic: the daemon (killed by PID, then its pins
//! removed), the servers (in-process threads, their sockets closed), the containers' processes
//! (killed by PID), the namespaces by name.

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    binary::{Daemon, PinRoot, Private, binary},
    netns::{in_ns, ip, ip_output, wait_until},
    traffic::{Outcome, Server, Stack, connect_from},
};

/// How the containers' servers are reached, and where the daemon runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// Published ports by DNAT with iptables-nft / ip6tables-nft in H's PREROUTING (what
    /// `docker run -p WIRE:PORT` does); the daemon in H on the outside interface.
    IptablesDnat,
    /// The same DNAT written as an nftables ruleset of our own (`table ip wsgnat`, `ip6 wsgnat6`).
    NftDnat,
    /// No NAT: the client connects to the container's own address, routed through H; the
    /// daemon in H on the outside interface.
    Routed,
    /// Routed as above, but the daemon runs inside K1's namespace, attached to K1's end of its
    /// veth (the bridge-side peer has no XDP program and GRO off).
    DaemonInContainer,
}

/// A port published by DNAT: the client's `wire` port on H's outside address goes to container
/// `container` (1..=3) on `port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Publish {
    pub wire: u16,
    pub container: u8,
    pub port: u16,
}

/// The daemon of a host bed: its process, control socket, configuration and pins.
struct Deployed {
    // Dropped in this order: the daemon (killed by PID), then its pins, then the files.
    daemon: Daemon,
    _pins: PinRoot,
    private: Private,
    _dir: tempfile::TempDir,
}

/// A Docker-like host: see the module documentation.
pub struct HostBed {
    /// The bed number: third IPv4 byte, IPv6 subnets, interface names.
    pub b: u8,
    pub variant: Variant,
    /// The host's namespace.
    pub host: String,
    /// The clients' namespace.
    pub clients: String,
    containers: Vec<Option<String>>,
    published: Vec<Publish>,
    servers: Vec<Option<Server>>,
    /// Each container's process (killed by PID).
    inits: Vec<Option<Child>>,
    deployed: Option<Deployed>,
    namespaces: Vec<String>,
}

/// Whether `program` is on PATH (or in /usr/sbin, /sbin).
fn have(program: &str) -> bool {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin"])
        .any(|d| Path::new(d).join(program).is_file())
}

/// Panics with the Debian package to install when `program` is missing.
pub fn require_tool(program: &str, package: &str) {
    assert!(
        have(program),
        "`{program}` is missing: install the Debian package `{package}` (apt-get install {package}); \
         these container test beds need it"
    );
}

/// `ip netns exec NS PROGRAM ARGS...`, panicking with its output when it fails; with `stdin`
/// written to its standard input.
pub fn ns_exec(ns: &str, program: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, program])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting `{program} {}` in {ns}: {e}", args.join(" ")));
    if let Some(text) = stdin {
        let mut w = child.stdin.take().unwrap();
        w.write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "`{program} {}` in {ns} failed ({}): {}{}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        stdin.unwrap_or("")
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write_sysctl(ns: &str, key: &str, value: &str) {
    in_ns(ns, || {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        std::fs::write(&path, value).unwrap_or_else(|e| panic!("{path} = {value} in {ns}: {e}"));
    });
}

impl HostBed {
    /// Builds bed `b` (1..=15, unique per test of the process) with three containers and the
    /// given published ports (DNAT variants only).
    pub fn new(b: u8, variant: Variant, publish: &[Publish]) -> Self {
        assert!((1..=15).contains(&b), "host bed number {b} out of range");
        require_tool("ethtool", "ethtool");
        match variant {
            Variant::IptablesDnat => {
                require_tool("iptables", "iptables");
                require_tool("ip6tables", "iptables");
            }
            Variant::NftDnat => require_tool("nft", "nftables"),
            Variant::Routed | Variant::DaemonInContainer => {
                assert!(publish.is_empty(), "{variant:?} publishes nothing")
            }
        }
        for p in publish {
            assert!((1..=3).contains(&p.container), "{p:?}");
        }
        let pid = std::process::id();
        let name = |role: &str| format!("wsgc{b}-{pid}-{role}");
        let mut bed = HostBed {
            b,
            variant,
            host: name("h"),
            clients: name("c"),
            containers: (1..=3).map(|i| Some(name(&format!("k{i}")))).collect(),
            published: publish.to_vec(),
            servers: (0..3).map(|_| None).collect(),
            inits: (0..3).map(|_| None).collect(),
            deployed: None,
            namespaces: Vec::new(),
        };
        let all: Vec<String> = [bed.host.clone(), bed.clients.clone()]
            .into_iter()
            .chain(bed.containers.iter().flatten().cloned())
            .collect();
        // Registered before each step, so a failure half-way still removes what exists.
        for ns in &all {
            bed.namespaces.push(ns.clone());
            ip(&["netns", "add", ns]);
            write_sysctl(ns, "net.ipv6.conf.all.accept_dad", "0");
            write_sysctl(ns, "net.ipv6.conf.default.accept_dad", "0");
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        bed.build_outside();
        bed.build_bridge();
        for i in 1..=3u8 {
            let k = bed.container_ns(i).to_owned();
            // Bounded: it ends by itself after 15 minutes if never killed.
            let child = Command::new("ip")
                .args(["netns", "exec", &k, "sleep", "900"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("starting the process of container {k}: {e}"));
            bed.inits[i as usize - 1] = Some(child);
        }
        write_sysctl(&bed.host, "net.ipv4.ip_forward", "1");
        write_sysctl(&bed.host, "net.ipv6.conf.all.forwarding", "1");
        if matches!(variant, Variant::Routed | Variant::DaemonInContainer) {
            let (h4, h6) = (bed.outside_v4().to_string(), bed.outside_v6().to_string());
            let (c, net4, net6) = (
                bed.clients.clone(),
                format!("198.19.{b}.0/24"),
                format!("{}/64", bed.bridge_v6()),
            );
            ip(&["-n", &c, "route", "add", &net4, "via", &h4]);
            ip(&["-n", &c, "-6", "route", "add", &net6, "via", &h6]);
        }
        // GRO off on every veth end that will carry no XDP program.
        ns_exec(
            &bed.clients,
            "ethtool",
            &["-K", &bed.client_if(), "gro", "off"],
            None,
        );
        for i in 1..=3 {
            ns_exec(
                &bed.host,
                "ethtool",
                &["-K", &bed.bridge_port_if(i), "gro", "off"],
                None,
            );
            if !(variant == Variant::DaemonInContainer && i == 1) {
                let k = bed.container_ns(i).to_owned();
                ns_exec(
                    &k,
                    "ethtool",
                    &["-K", &bed.container_if(i), "gro", "off"],
                    None,
                );
            }
        }
        bed.apply_nat();
        bed
    }

    fn build_outside(&mut self) {
        let (h, c) = (self.host.clone(), self.clients.clone());
        let (o, ci) = (self.outside_if(), self.client_if());
        ip(&[
            "-n", &h, "link", "add", &o, "type", "veth", "peer", "name", &ci, "netns", &c,
        ]);
        ip(&[
            "-n",
            &h,
            "addr",
            "add",
            &format!("{}/24", self.outside_v4()),
            "dev",
            &o,
        ]);
        ip(&[
            "-n",
            &h,
            "addr",
            "add",
            &format!("{}/64", self.outside_v6()),
            "dev",
            &o,
            "nodad",
        ]);
        for i in 0..8 {
            ip(&[
                "-n",
                &c,
                "addr",
                "add",
                &format!("{}/24", self.client_v4(i)),
                "dev",
                &ci,
            ]);
        }
        for i in 0..4 {
            let a = format!("{}/64", self.client_v6(i));
            ip(&["-n", &c, "addr", "add", &a, "dev", &ci, "nodad"]);
        }
        ip(&["-n", &h, "link", "set", &o, "up"]);
        ip(&["-n", &c, "link", "set", &ci, "up"]);
        for i in 1..4 {
            // The clients' other /64s are on the same link.
            let net = format!("2001:2:0:{:x}::/64", self.v6_subnet(i));
            ip(&["-n", &h, "-6", "route", "add", &net, "dev", &o]);
        }
        let up = wait_until(Duration::from_secs(5), || {
            link_up(&h, &o) && link_up(&c, &ci)
        });
        assert!(up, "the outside veth {o}/{ci} did not come up within 5 s");
    }

    fn build_bridge(&mut self) {
        let h = self.host.clone();
        let br = self.bridge();
        ip(&[
            "-n",
            &h,
            "link",
            "add",
            &br,
            "type",
            "bridge",
            "stp_state",
            "0",
        ]);
        ip(&[
            "-n",
            &h,
            "addr",
            "add",
            &format!("198.19.{}.1/24", self.b),
            "dev",
            &br,
        ]);
        let a6 = format!("{}/64", self.bridge_v6());
        ip(&["-n", &h, "addr", "add", &a6, "dev", &br, "nodad"]);
        ip(&["-n", &h, "link", "set", &br, "up"]);
        for i in 1..=3u8 {
            let k = self.container_ns(i).to_owned();
            let (hp, kp) = (self.bridge_port_if(i), self.container_if(i));
            ip(&[
                "-n", &h, "link", "add", &hp, "type", "veth", "peer", "name", &kp, "netns", &k,
            ]);
            ip(&["-n", &h, "link", "set", &hp, "master", &br]);
            ip(&["-n", &h, "link", "set", &hp, "up"]);
            ip(&[
                "-n",
                &k,
                "addr",
                "add",
                &format!("{}/24", self.container_v4(i)),
                "dev",
                &kp,
            ]);
            let a6 = format!("{}/64", self.container_v6(i));
            ip(&["-n", &k, "addr", "add", &a6, "dev", &kp, "nodad"]);
            ip(&["-n", &k, "link", "set", &kp, "up"]);
            ip(&[
                "-n",
                &k,
                "route",
                "add",
                "default",
                "via",
                &format!("198.19.{}.1", self.b),
            ]);
            ip(&[
                "-n",
                &k,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &self.bridge_v6().to_string(),
            ]);
            let up = wait_until(Duration::from_secs(5), || {
                link_up(&h, &hp) && link_up(&k, &kp)
            });
            assert!(
                up,
                "the container veth {hp}/{kp} did not come up within 5 s"
            );
        }
        let up = wait_until(Duration::from_secs(5), || link_up(&h, &br));
        assert!(up, "the bridge {br} did not come up within 5 s");
    }

    /// Writes the DNAT rules of `self.published` (replacing earlier ones).
    fn apply_nat(&mut self) {
        let h = self.host.clone();
        let o = self.outside_if();
        match self.variant {
            Variant::IptablesDnat => {
                for (tool, v6) in [("iptables", false), ("ip6tables", true)] {
                    ns_exec(&h, tool, &["-t", "nat", "-F", "PREROUTING"], None);
                    for p in &self.published {
                        let to = if v6 {
                            format!("[{}]:{}", self.container_v6(p.container), p.port)
                        } else {
                            format!("{}:{}", self.container_v4(p.container), p.port)
                        };
                        let wire = p.wire.to_string();
                        ns_exec(
                            &h,
                            tool,
                            &[
                                "-t",
                                "nat",
                                "-A",
                                "PREROUTING",
                                "-i",
                                &o,
                                "-p",
                                "tcp",
                                "--dport",
                                &wire,
                                "-j",
                                "DNAT",
                                "--to-destination",
                                &to,
                            ],
                            None,
                        );
                    }
                }
            }
            Variant::NftDnat => {
                let mut rules4 = String::new();
                let mut rules6 = String::new();
                for p in &self.published {
                    rules4 += &format!(
                        "    iifname \"{o}\" tcp dport {} dnat to {}:{}\n",
                        p.wire,
                        self.container_v4(p.container),
                        p.port
                    );
                    rules6 += &format!(
                        "    iifname \"{o}\" tcp dport {} dnat to [{}]:{}\n",
                        p.wire,
                        self.container_v6(p.container),
                        p.port
                    );
                }
                let mut script = String::new();
                for (family, table) in [("ip", "wsgnat"), ("ip6", "wsgnat6")] {
                    // Declared first, so the delete works on the first application too.
                    script += &format!("table {family} {table}\ndelete table {family} {table}\n");
                }
                for (family, table, rules) in
                    [("ip", "wsgnat", &rules4), ("ip6", "wsgnat6", &rules6)]
                {
                    script += &format!(
                        "table {family} {table} {{\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n{rules}  }}\n  \
                         chain post {{\n    type nat hook postrouting priority srcnat; policy accept;\n  }}\n}}\n"
                    );
                }
                ns_exec(&h, "nft", &["-f", "-"], Some(&script));
            }
            Variant::Routed | Variant::DaemonInContainer => {}
        }
    }

    /// Points the published `wire` port at `container` (and `port`) instead, as a container
    /// started again with the same `-p` would.
    pub fn repoint(&mut self, wire: u16, container: u8, port: u16) {
        let p = self
            .published
            .iter_mut()
            .find(|p| p.wire == wire)
            .unwrap_or_else(|| panic!("wire port {wire} is not published"));
        p.container = container;
        p.port = port;
        self.apply_nat();
    }

    // Names and addresses.

    /// H's end of the outside veth.
    pub fn outside_if(&self) -> String {
        format!("wh{}o", self.b)
    }
    /// C's end of the outside veth.
    pub fn client_if(&self) -> String {
        format!("wh{}c", self.b)
    }
    /// The bridge in H.
    pub fn bridge(&self) -> String {
        format!("wh{}br", self.b)
    }
    /// The bridge-side (H) end of container `i`'s veth.
    pub fn bridge_port_if(&self, i: u8) -> String {
        format!("wh{}h{i}", self.b)
    }
    /// Container `i`'s own end of its veth.
    pub fn container_if(&self, i: u8) -> String {
        format!("wh{}k{i}", self.b)
    }
    /// Container `i`'s namespace (1..=3); panics if it was deleted.
    pub fn container_ns(&self, i: u8) -> &str {
        self.containers[i as usize - 1]
            .as_deref()
            .unwrap_or_else(|| panic!("container {i} was deleted"))
    }

    fn v6_subnet(&self, k: u8) -> u16 {
        (self.b as u16) << 8 | k as u16
    }
    /// H's outside IPv4 address.
    pub fn outside_v4(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, self.b, 1))
    }
    /// H's outside IPv6 address.
    pub fn outside_v6(&self) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, self.v6_subnet(0), 0, 0, 0, 1))
    }
    fn bridge_v6(&self) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            2,
            0,
            self.v6_subnet(0x10),
            0,
            0,
            0,
            1,
        ))
    }
    /// Client IPv4 source `i` (0..8): 198.18.b.(2 + i), each its own source key.
    pub fn client_v4(&self, i: u8) -> IpAddr {
        assert!(i < 8, "client address {i}");
        IpAddr::V4(Ipv4Addr::new(198, 18, self.b, 2 + i))
    }
    /// Client IPv6 source `i` (0..4), each in its own /64 (so its own source key).
    pub fn client_v6(&self, i: u8) -> IpAddr {
        assert!(i < 4, "client address {i}");
        IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, self.v6_subnet(i), 0, 0, 0, 2))
    }
    /// Container `i`'s IPv4 address: 198.19.b.(10 + i).
    pub fn container_v4(&self, i: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 19, self.b, 10 + i))
    }
    /// Container `i`'s IPv6 address.
    pub fn container_v6(&self, i: u8) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            2,
            0,
            self.v6_subnet(0x10),
            0,
            0,
            0,
            0x10 + i as u16,
        ))
    }
    /// Where a client of `family` (`true`: IPv6) connects for the published `wire` port.
    pub fn wire_dst(&self, v6: bool, wire: u16) -> SocketAddr {
        assert!(
            self.published.iter().any(|p| p.wire == wire),
            "wire port {wire} is not published"
        );
        SocketAddr::new(
            if v6 {
                self.outside_v6()
            } else {
                self.outside_v4()
            },
            wire,
        )
    }
    /// Container `i`'s own address and `port` (routed variants).
    pub fn container_dst(&self, v6: bool, i: u8, port: u16) -> SocketAddr {
        SocketAddr::new(
            if v6 {
                self.container_v6(i)
            } else {
                self.container_v4(i)
            },
            port,
        )
    }

    // Servers.

    /// Starts the holding server of container `i` on `port` (IPv4 and IPv6 sockets).
    pub fn start_server(&mut self, i: u8, port: u16) {
        let k = self.container_ns(i).to_owned();
        assert!(
            self.servers[i as usize - 1].is_none(),
            "container {i} has a server"
        );
        self.servers[i as usize - 1] = Some(Server::start(&k, port, Stack::Separate));
    }
    /// Container `i`'s server.
    pub fn server(&self, i: u8) -> &Server {
        self.servers[i as usize - 1]
            .as_ref()
            .unwrap_or_else(|| panic!("container {i} has no server"))
    }
    /// Stops container `i` as `docker stop` does: its processes die (the server's threads end
    /// and every socket it held is closed; the container's process is killed by PID).
    pub fn stop_container(&mut self, i: u8) {
        drop(self.servers[i as usize - 1].take());
        kill(&mut self.inits[i as usize - 1]);
    }
    /// Deletes container `i`'s namespace (its veth pair goes with it), stopping it first.
    pub fn delete_container(&mut self, i: u8) {
        self.stop_container(i);
        let ns = self.containers[i as usize - 1]
            .take()
            .unwrap_or_else(|| panic!("container {i} was deleted"));
        ip(&["netns", "del", &ns]);
        self.namespaces.retain(|n| *n != ns);
    }

    /// Before any daemon runs: checks that every destination opens a connection from a source
    /// the tests do not use (client v4 7, v6 3), so a broken bed is told apart from a refusal.
    /// This also fills the neighbour caches.
    pub fn check_reachable(&self, dsts: &[SocketAddr]) {
        assert!(
            self.deployed.is_none(),
            "check_reachable runs before the daemon"
        );
        for &dst in dsts {
            let src = if dst.is_ipv6() {
                self.client_v6(3)
            } else {
                self.client_v4(7)
            };
            match connect_from(&self.clients, src, dst, Duration::from_secs(3)) {
                Outcome::Connected(s) => drop(s),
                other => panic!(
                    "the test bed itself does not work (no daemon yet): {src} -> {dst}: {other:?}"
                ),
            }
        }
    }

    // The daemon.

    /// The namespace and interface the daemon runs in and attaches to.
    pub fn daemon_place(&self) -> (String, String) {
        match self.variant {
            Variant::DaemonInContainer => (self.container_ns(1).to_owned(), self.container_if(1)),
            _ => (self.host.clone(), self.outside_if()),
        }
    }

    /// Starts `ws-guard run` (nsenter into the daemon's namespace) with the bed's interface,
    /// `xdp_mode = "auto"`, `sweep_interval = "250ms"` and the `[[port]]` tables `ports`; its
    /// own control socket, state file and pin root; `--detach-on-exit`.
    pub fn start_daemon(&mut self, ports: &str) {
        assert!(self.deployed.is_none(), "the daemon already runs");
        let (ns, iface) = self.daemon_place();
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "interfaces = [\"{iface}\"]\nxdp_mode = \"auto\"\nsweep_interval = \"250ms\"\n\
                 [capacity]\nsources = 1024\nflows = 4096\n[metrics]\nlisten = \"off\"\n\n{ports}"
            ),
        )
        .unwrap();
        let pins = PinRoot::new(&format!("ct{}", self.b));
        let private = Private::new();
        let mut args: Vec<String> = vec![
            "run".into(),
            "--config".into(),
            cfg.to_str().unwrap().into(),
            "--pin-dir".into(),
            pins.path(),
            "--detach-on-exit".into(),
        ];
        args.extend(private.args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let daemon = Daemon::start_in(&ns, &args);
        self.deployed = Some(Deployed {
            daemon,
            _pins: pins,
            private,
            _dir: dir,
        });
        // The peers are as users have them: no XDP program anywhere but the daemon's interface.
        let mut ends = vec![(self.clients.clone(), self.client_if())];
        for i in 1..=3 {
            ends.push((self.host.clone(), self.bridge_port_if(i)));
            ends.push((self.container_ns(i).to_owned(), self.container_if(i)));
        }
        if self.variant == Variant::DaemonInContainer {
            ends.push((self.host.clone(), self.outside_if()));
        }
        for (n, dev) in ends {
            if (n.as_str(), dev.as_str()) == (ns.as_str(), iface.as_str()) {
                continue;
            }
            let link = ip_output(&["-n", &n, "-d", "link", "show", "dev", &dev]);
            assert!(
                !link.contains("prog/xdp") && !link.contains(" xdp"),
                "{dev} in {n} has an XDP program; the peers must have none: {link}"
            );
        }
    }

    fn deployed(&self) -> &Deployed {
        self.deployed.as_ref().expect("the daemon is not running")
    }

    /// The daemon.
    pub fn daemon(&self) -> &Daemon {
        &self.deployed().daemon
    }

    /// The daemon's control socket.
    pub fn socket(&self) -> PathBuf {
        PathBuf::from(&self.deployed().private.args()[1])
    }

    /// `ws-guard --socket S ARGS...` (from the test's namespace: the socket is a file), with its
    /// exit code and output.
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(binary())
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running the ws-guard CLI");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The slots the daemon charges to `src` (its /32 or /64) on protected `port`, from
    /// `ws-guard --json sources top`.
    pub fn slots_of(&self, src: IpAddr, port: u16) -> Result<u64, String> {
        let (code, out, err) = self.cli(&["--json", "sources", "top", "-n", "1000"]);
        if code != 0 {
            return Err(format!("sources top: exit {code}: {out}{err}"));
        }
        let v: serde_json::Value =
            serde_json::from_str(&out).map_err(|e| format!("sources top: {e}: {out}"))?;
        let prefix = if src.is_ipv6() {
            let IpAddr::V6(a) = src else { unreachable!() };
            let s = a.segments();
            format!("{}/64", Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        } else {
            format!("{src}/32")
        };
        Ok(v["sources"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|x| x["source"] == prefix.as_str() && x["port"] == port)
                    .filter_map(|x| x["connections"].as_u64())
                    .sum()
            })
            .unwrap_or(0))
    }

    /// The daemon's log (its last 80 lines) and what it accounts, for failure messages.
    pub fn report(&self) -> String {
        let Some(d) = &self.deployed else {
            return "(no daemon)".into();
        };
        let lines = d.daemon.lines();
        let skip = lines.len().saturating_sub(80);
        let (_, top, err) = self.cli(&["sources", "top", "-n", "50"]);
        format!(
            "daemon log ({} lines, the last {}):\n  {}\nws-guard sources top:\n{top}{err}",
            lines.len(),
            lines.len() - skip,
            lines[skip..].join("\n  ")
        )
    }

    /// Stops the daemon with SIGTERM and checks its clean exit (detached, pins removed).
    pub fn stop_daemon(&mut self) {
        let mut d = self.deployed.take().expect("the daemon is not running");
        let status = d.daemon.stop(libc::SIGTERM);
        assert!(
            status.success(),
            "daemon exit {status}: {:?}",
            d.daemon.lines()
        );
    }
}

/// Kills (by PID) and reaps a child still running; nothing if it already exited.
fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take()
        && let Ok(None) = c.try_wait()
    {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn link_up(ns: &str, dev: &str) -> bool {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", "dev", dev])
        .output();
    out.is_ok_and(|o| {
        let s = String::from_utf8_lossy(&o.stdout);
        s.contains("state UP") || s.contains(",UP,LOWER_UP")
    })
}

impl Drop for HostBed {
    fn drop(&mut self) {
        // The daemon first (killed by PID if still running, then its pins removed), then the
        // servers' threads and sockets, then the namespaces by name.
        drop(self.deployed.take());
        for s in self.servers.iter_mut() {
            drop(s.take());
        }
        for c in self.inits.iter_mut() {
            kill(c);
        }
        for ns in self.namespaces.drain(..).rev() {
            match Command::new("ip").args(["netns", "del", &ns]).output() {
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

/// What a client saw of one connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    Open,
    /// RST: ECONNREFUSED.
    Refused,
    /// No answer within the connect timeout.
    TimedOut,
    /// Anything else (unreachable...).
    Failed,
}

/// One client source connecting to one destination, holding what opens, keeping a log of
/// every attempt for failure messages.
pub struct Client {
    pub ns: String,
    pub src: IpAddr,
    pub dst: SocketAddr,
    /// The connections it holds open.
    pub held: Vec<TcpStream>,
    /// Every attempt: what was seen, after how long.
    pub seen: Vec<(Seen, Duration)>,
    log: Vec<String>,
    t0: Instant,
}

impl Client {
    pub fn new(bed: &HostBed, src: IpAddr, dst: SocketAddr) -> Self {
        Self {
            ns: bed.clients.clone(),
            src,
            dst,
            held: Vec::new(),
            seen: Vec::new(),
            log: Vec::new(),
            t0: Instant::now(),
        }
    }

    /// One attempt, waiting at most `timeout`; an open connection is held.
    pub fn attempt(&mut self, timeout: Duration) -> (Seen, Duration) {
        let at = self.t0.elapsed();
        let t = Instant::now();
        let out = connect_from(&self.ns, self.src, self.dst, timeout);
        let took = t.elapsed();
        let (seen, what) = match out {
            Outcome::Connected(s) => {
                let what = format!("open ({:?})", s.local_addr().ok());
                self.held.push(s);
                (Seen::Open, what)
            }
            Outcome::Refused => (Seen::Refused, "refused (RST)".into()),
            Outcome::TimedOut => (Seen::TimedOut, "timed out".into()),
            Outcome::Failed(e) => (Seen::Failed, format!("failed: {e}")),
        };
        self.log.push(format!(
            "#{} at {:.2}s: {what} after {} ms",
            self.seen.len() + 1,
            at.as_secs_f64(),
            took.as_millis()
        ));
        self.seen.push((seen, took));
        (seen, took)
    }

    /// Notes something that happened (a wait, a close) in the log.
    pub fn note(&mut self, what: &str) {
        self.log.push(format!(
            "   at {:.2}s: {what}",
            self.t0.elapsed().as_secs_f64()
        ));
    }

    /// How many attempts opened.
    pub fn opened(&self) -> usize {
        self.seen.iter().filter(|(s, _)| *s == Seen::Open).count()
    }

    /// The attempts, one a line.
    pub fn summary(&self) -> String {
        format!(
            "client {} -> {} ({} of {} attempts opened):\n    {}",
            self.src,
            self.dst,
            self.opened(),
            self.seen.len(),
            self.log.join("\n    ")
        )
    }
}
