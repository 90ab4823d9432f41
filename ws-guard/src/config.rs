//! The TOML configuration: parsing, defaults and validation. A config is checked whole before
//! anything is applied; every error names the field and the problem.

use std::{
    collections::BTreeSet,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use ipnet::IpNet;

pub use crate::logging::LogFormat;

use serde::{Deserialize, Deserializer, de};
use thiserror::Error;
use ws_guard_common::maps::{
    ACTION_DROP, ACTION_REJECT, GlobalConfig, MAX_PORTS, PortConfig, RATE_SLOTS,
};

/// Why a configuration was refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// Not TOML, or a value of the wrong type or form: one line, `path:LINE:COLUMN: message`.
    #[error("{path}{}: {message}", line.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
    Parse {
        path: String,
        /// 1-based line and column where the offending value starts, when known.
        line: Option<(usize, usize)>,
        message: String,
    },
    #[error("{path}{}: {field}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        path: String,
        /// 1-based line of the field in the file, when the text is known and has the field.
        line: Option<usize>,
        field: String,
        message: String,
    },
}

/// How to attach the XDP program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode, falling back to generic mode with a warning.
    #[default]
    Auto,
    /// Native mode only; fail if the driver lacks it.
    Native,
    /// Generic (skb) mode.
    Generic,
}

/// What a new connection attempt gets when ws-guard cannot track it because a map is full
/// (a new source while `capacity.sources` counters exist, or any attempt while
/// `capacity.flows` connections are tracked). Counted as `map_full` either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnMapFull {
    /// Pass it untracked: nobody is locked out, but new sources are not limited meanwhile.
    #[default]
    Open,
    /// Refuse it with the port's `connection_action`: nothing passes unlimited, but new
    /// sources are locked out until the maps have room again.
    Closed,
}

/// What the first fragment of a TCP segment to a protected port gets (README, "What the
/// limits mean").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fragments {
    /// Dropped: a SYN in fragments would otherwise reach the kernel unjudged (the kernel
    /// reassembles it). Real TCP stacks never fragment their segments.
    #[default]
    Drop,
    /// Passed unjudged, as before ws-guard 0.1's hardening (counted all the same).
    Pass,
}

/// When a port answers new sources with SYN cookies (docs/limits.md, "SYN cookies").
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum CookieMode {
    /// Never: every attempt is judged on its SYN (iptables-exact).
    #[default]
    Off,
    /// Always: a source without state is judged at the ACK that returns its cookie.
    On,
    /// Under a flood: on while the port's half-open attempts are over `syn_cookie_threshold`.
    Auto,
}

impl fmt::Display for CookieMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CookieMode::Off => "off",
            CookieMode::On => "on",
            CookieMode::Auto => "auto",
        })
    }
}

impl std::str::FromStr for CookieMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(CookieMode::Off),
            "on" => Ok(CookieMode::On),
            "auto" => Ok(CookieMode::Auto),
            _ => Err(format!("{s:?} is not \"off\", \"on\" or \"auto\"")),
        }
    }
}

/// The default `syn_cookie_threshold`: half-open attempts of one port. A Linux listener's SYN
/// queue holds up to `net.core.somaxconn` (4096) before the kernel's own cookies start; a
/// WebSocket server's legitimate half-open attempts are a few per RTT per client.
pub const DEFAULT_SYN_COOKIE_THRESHOLD: u32 = 1000;

/// What to do with an attempt over a limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Drop the SYN silently; the client retries until it gives up.
    Drop,
    /// Send a TCP RST back from XDP; the client fails at once.
    Reject,
}

impl Action {
    fn code(self) -> u32 {
        match self {
            Action::Drop => ACTION_DROP,
            Action::Reject => ACTION_REJECT,
        }
    }

    /// The action of the kernel's code, if it is one.
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            ACTION_DROP => Some(Action::Drop),
            ACTION_REJECT => Some(Action::Reject),
            _ => None,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Drop => "drop",
            Action::Reject => "reject",
        })
    }
}

/// `N/DURATION`: at most N new connections per source key in any window of DURATION.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub window: Duration,
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (n, w) = s
            .split_once('/')
            .ok_or_else(|| format!("expected COUNT/WINDOW such as \"9/100s\", got {s:?}"))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("count {n:?} is not a whole number"))?;
        let window = humantime::parse_duration(w.trim())
            .map_err(|e| format!("window {w:?} is not a duration ({e})"))?;
        if count == 0 {
            return Err("count must be at least 1 (leave new_connections out for no limit)".into());
        }
        if count as usize > RATE_SLOTS {
            return Err(format!(
                "count {count} is above the maximum of {RATE_SLOTS}"
            ));
        }
        if window.is_zero() {
            return Err("window must be longer than zero".into());
        }
        if window > Duration::from_secs(86_400 * 7) {
            return Err("window must be at most 7 days".into());
        }
        Ok(Rate { count, window })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            self.count,
            humantime::format_duration(self.window)
        )
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// A count, or `"none"` for no limit (as the CLI and the state file write it).
fn count_or_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Count(u32),
        Text(String),
    }
    match Form::deserialize(d)? {
        Form::Count(n) => Ok(Some(n)),
        Form::Text(t) if t == "none" => Ok(None),
        Form::Text(t) => Err(de::Error::custom(format!(
            "expected a number of connections or \"none\", got {t:?}"
        ))),
    }
}

/// `COUNT/WINDOW`, or `"none"` for no limit.
fn rate_or_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Rate>, D::Error> {
    let s = String::deserialize(d)?;
    if s.trim() == "none" {
        return Ok(None);
    }
    s.parse().map(Some).map_err(de::Error::custom)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| de::Error::custom(format!("{s:?}: {e}")))
}

/// Limits of one protected port.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortLimits {
    /// TCP port, 1..=65535.
    pub port: u32,
    /// Concurrent connections per source key, half-open included. Omitted or `"none"`: no
    /// limit.
    #[serde(default, deserialize_with = "count_or_none")]
    pub max_connections: Option<u32>,
    /// What happens to an attempt over `max_connections`.
    #[serde(default = "default_connection_action")]
    pub connection_action: Action,
    /// New connections per source key per window. Omitted or `"none"`: no limit.
    #[serde(default, deserialize_with = "rate_or_none")]
    pub new_connections: Option<Rate>,
    /// What happens to an attempt over `new_connections`.
    #[serde(default = "default_rate_action")]
    pub rate_action: Action,
    /// SYN-cookie mode: "off" (default), "on", or "auto".
    #[serde(default)]
    pub syn_cookies: CookieMode,
    /// `auto`: half-open attempts of the port that switch cookies on.
    #[serde(default = "default_syn_cookie_threshold")]
    pub syn_cookie_threshold: u32,
}

fn default_syn_cookie_threshold() -> u32 {
    DEFAULT_SYN_COOKIE_THRESHOLD
}

fn default_connection_action() -> Action {
    Action::Reject
}
fn default_rate_action() -> Action {
    Action::Drop
}

impl PortLimits {
    /// The kernel's form of these limits.
    pub fn to_kernel(&self) -> PortConfig {
        let rate_window_ns = self
            .new_connections
            .map_or(0, |r| r.window.as_nanos() as u64);
        PortConfig {
            enabled: 1,
            max_connections: self.max_connections.unwrap_or(0),
            conn_action: self.connection_action.code(),
            rate_action: self.rate_action.code(),
            rate_limit: self.new_connections.map_or(0, |r| r.count),
            // Assigned by Guard::set_port.
            index: 0,
            rate_window_ns,
            // Switched by the daemon (crate::cookies), which sets the sysctls cookie mode needs
            // first; Guard::apply keeps what it set.
            syn_cookies: 0,
            rate_window_ms: ws_guard_common::rate::window_ms(rate_window_ns),
        }
    }
}

/// The fewest attempts a rate window remembers when `capacity.rate_attempts` is unset: counts
/// up to it can be set live whatever the file says (the recipe's 9 fits), for 4 bytes each per
/// source (a source entry of 152 bytes).
pub const MIN_RATE_ATTEMPTS: u32 = 10;

/// Sizes of the hash maps, fixed at load time.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Capacity {
    /// Source keys tracked at once (connection counts and rate windows).
    pub sources: u32,
    /// Connections (half-open and established) tracked at once.
    pub flows: u32,
    /// Active bans at once. Bans are never evicted: when full, a source over the rate is
    /// still refused but not banned (counted as `bans_full`).
    pub bans: u32,
    /// CIDRs per list (allow, deny).
    pub cidrs: u32,
    /// Attempts each source's rate window remembers: the largest `new_connections` count that
    /// can be set without a restart, and what a source entry's size follows (4 bytes each).
    /// Unset: the largest count of the configuration's ports when ws-guard starts, at least
    /// [`MIN_RATE_ATTEMPTS`].
    pub rate_attempts: Option<u32>,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            sources: 65_536,
            flows: 262_144,
            bans: 65_536,
            cidrs: 16_384,
            rate_attempts: None,
        }
    }
}

/// Where the Prometheus endpoint listens by default: loopback only, and a port from the range
/// Prometheus exporters use.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9105";
/// The most sources `metrics.top_sources` may export.
pub const MAX_TOP_SOURCES: u32 = 100;

/// The Prometheus endpoint (`/metrics`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// `ADDRESS:PORT` to serve `/metrics` on; `"off"` or `""` serves nothing.
    pub listen: String,
    /// Export the live connection count of the N sources holding the most (0: none). Each
    /// source is a time series: keep N small.
    pub top_sources: u32,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            listen: DEFAULT_METRICS_LISTEN.into(),
            top_sources: 0,
        }
    }
}

impl MetricsSettings {
    /// The address to listen on; `None` when the endpoint is off. Validated by
    /// [`Config::parse`], so only a hand-built config can make this an error.
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>, String> {
        match self.listen.trim() {
            "" | "off" => Ok(None),
            a => a.parse().map(Some).map_err(|_| {
                format!("{a:?} is not ADDRESS:PORT (e.g. \"{DEFAULT_METRICS_LISTEN}\") or \"off\"")
            }),
        }
    }
}

/// Where the daemon's control socket is by default.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/ws-guard/control.sock";
/// Where runtime changes made with the CLI are kept by default.
pub const DEFAULT_STATE_FILE: &str = "/var/lib/ws-guard/runtime.toml";

/// The control socket the CLI talks to (root only).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlSettings {
    /// Path of the Unix socket; its directory is created 0700 and the socket is 0600.
    pub socket: PathBuf,
}

impl Default for ControlSettings {
    fn default() -> Self {
        Self {
            socket: DEFAULT_CONTROL_SOCKET.into(),
        }
    }
}

fn cidrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    list.iter()
        .map(|s| parse_cidr(s).map_err(de::Error::custom))
        .collect()
}

/// Parses `ADDRESS/PREFIX` (or a bare address: a /32 or /128). Host bits must be zero, so
/// `198.18.0.1/24` is refused rather than silently widened. An IPv4-mapped IPv6 CIDR
/// (`::ffff:198.18.0.5/128`) is the IPv4 one it maps (`198.18.0.5/32`), as everywhere else in
/// ws-guard: IPv4 clients of dual-stack sockets arrive as IPv4 on the wire.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    let net = match s.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => match s.parse::<std::net::IpAddr>() {
            Ok(a) => IpNet::from(a),
            Err(_) => {
                return Err(format!(
                    "{s:?} is not a CIDR such as \"198.18.0.0/24\" or \"2001:2::/48\""
                ));
            }
        },
    };
    if net.trunc() != net {
        return Err(format!(
            "{s:?} has host bits set; did you mean \"{}\"?",
            net.trunc()
        ));
    }
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => {
                Ok(IpNet::new(v4.into(), v6.prefix_len() - 96).expect("a prefix of at most 32"))
            }
            None => Ok(net),
        },
        _ => Ok(net),
    }
}

/// The TOML form of a configuration: every key, defaults included, in the schema of the
/// configuration file, so [`Config::parse`] reads it back to the same configuration
/// (`ws-guard config show`; the round trip is tested).
pub fn to_toml(cfg: &Config) -> String {
    use toml::{Table, Value};
    // Destructured whole: a field added to `Config` must be written here too.
    let Config {
        interfaces,
        xdp_mode,
        monitor,
        ipv4_prefix,
        ipv6_prefix,
        on_map_full,
        fragments,
        handshake_timeout,
        sweep_interval,
        wait_for_interfaces,
        kernel_log,
        log_format,
        capacity,
        metrics,
        allow,
        deny,
        ban_duration,
        state_file,
        control,
        ports,
    } = cfg;
    let lower = |d: &dyn fmt::Debug| Value::String(format!("{d:?}").to_lowercase());
    let duration = |d: &Duration| Value::String(humantime::format_duration(*d).to_string());
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let int = |n: u32| Value::Integer(n.into());
    let mut t = Table::new();
    t.insert("interfaces".into(), strings(interfaces.clone()));
    t.insert("xdp_mode".into(), lower(xdp_mode));
    t.insert("monitor".into(), Value::Boolean(*monitor));
    t.insert("ipv4_prefix".into(), int(*ipv4_prefix));
    t.insert("ipv6_prefix".into(), int(*ipv6_prefix));
    t.insert("on_map_full".into(), lower(on_map_full));
    t.insert("fragments".into(), lower(fragments));
    t.insert("handshake_timeout".into(), duration(handshake_timeout));
    t.insert("sweep_interval".into(), duration(sweep_interval));
    t.insert("wait_for_interfaces".into(), duration(wait_for_interfaces));
    t.insert("kernel_log".into(), Value::String(kernel_log.clone()));
    t.insert("log_format".into(), Value::String(log_format.to_string()));
    t.insert(
        "allow".into(),
        strings(allow.iter().map(ToString::to_string).collect()),
    );
    t.insert(
        "deny".into(),
        strings(deny.iter().map(ToString::to_string).collect()),
    );
    t.insert("ban_duration".into(), duration(ban_duration));
    t.insert(
        "state_file".into(),
        Value::String(state_file.display().to_string()),
    );
    let Capacity {
        sources,
        flows,
        bans,
        cidrs,
        rate_attempts,
    } = capacity;
    let mut c = Table::new();
    for (k, v) in [
        ("sources", sources),
        ("flows", flows),
        ("bans", bans),
        ("cidrs", cidrs),
    ] {
        c.insert(k.into(), int(*v));
    }
    // Unset: derived from the ports' counts when ws-guard starts (`Config::rate_ring`).
    if let Some(n) = rate_attempts {
        c.insert("rate_attempts".into(), int(*n));
    }
    t.insert("capacity".into(), Value::Table(c));
    let MetricsSettings {
        listen,
        top_sources,
    } = metrics;
    let mut m = Table::new();
    m.insert("listen".into(), Value::String(listen.clone()));
    m.insert("top_sources".into(), int(*top_sources));
    t.insert("metrics".into(), Value::Table(m));
    let ControlSettings { socket } = control;
    let mut ctl = Table::new();
    ctl.insert("socket".into(), Value::String(socket.display().to_string()));
    t.insert("control".into(), Value::Table(ctl));
    let ports = ports
        .iter()
        .map(|p| {
            let PortLimits {
                port,
                max_connections,
                connection_action,
                new_connections,
                rate_action,
                syn_cookies,
                syn_cookie_threshold,
            } = p;
            let mut pt = Table::new();
            pt.insert("port".into(), int(*port));
            if let Some(n) = max_connections {
                pt.insert("max_connections".into(), int(*n));
            }
            pt.insert(
                "connection_action".into(),
                Value::String(connection_action.to_string()),
            );
            if let Some(r) = new_connections {
                pt.insert("new_connections".into(), Value::String(r.to_string()));
            }
            pt.insert("rate_action".into(), Value::String(rate_action.to_string()));
            pt.insert("syn_cookies".into(), Value::String(syn_cookies.to_string()));
            pt.insert("syn_cookie_threshold".into(), int(*syn_cookie_threshold));
            Value::Table(pt)
        })
        .collect();
    t.insert("port".into(), Value::Array(ports));
    toml::to_string(&t).expect("a table of strings, numbers and booleans encodes")
}

/// The 1-based line and column (in characters) of byte `offset` of `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[start..].chars().count() + 1)
}

/// The largest configuration or state file read: far above any real one (a 16,384-CIDR list
/// is about 400 KiB), far below what would hurt the daemon.
pub const MAX_FILE_BYTES: u64 = 4 << 20;

/// Reads the UTF-8 text of `path`, which must be a regular file of at most
/// [`MAX_FILE_BYTES`]: a FIFO or a device (`/dev/zero`) at the path would block the daemon's
/// event loop or fill its memory. Opened non-blocking, so even a FIFO is never waited on.
pub fn read_regular_file(path: &Path) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read as _};
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "not a regular file (a FIFO, socket or device is never read)",
        ));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{} bytes, more than the {MAX_FILE_BYTES} read at most",
                meta.len()
            ),
        ));
    }
    let mut text = String::new();
    // A file growing while it is read stops at the cap all the same.
    file.take(MAX_FILE_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("more than the {MAX_FILE_BYTES} bytes read at most"),
        ));
    }
    Ok(text)
}

/// The whole configuration.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Interfaces to attach to. Empty or omitted: the interface of the default route.
    #[serde(default)]
    pub interfaces: Vec<String>,
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// Count what would be refused, refuse nothing.
    #[serde(default)]
    pub monitor: bool,
    /// Prefix length of IPv4 source keys.
    #[serde(default = "default_ipv4_prefix")]
    pub ipv4_prefix: u32,
    /// Prefix length of IPv6 source keys.
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix: u32,
    /// Fail open or closed when a map is full (docs/configuration.md, "When maps are full").
    #[serde(default)]
    pub on_map_full: OnMapFull,
    /// First fragments of TCP segments to a protected port: dropped (default) or passed.
    #[serde(default)]
    pub fragments: Fragments,
    /// A half-open attempt that the kernel has no socket for is released after a second; one
    /// whose handshake is still pending is released after this long.
    #[serde(default = "default_handshake_timeout", deserialize_with = "duration")]
    pub handshake_timeout: Duration,
    /// How often the accounting is checked against the kernel's socket table.
    #[serde(default = "default_sweep_interval", deserialize_with = "duration")]
    pub sweep_interval: Duration,
    /// How long `run` waits at start for the interfaces (or the default route) to appear: at
    /// boot the network may come up after the daemon. Zero: fail at once.
    #[serde(default = "default_wait_for_interfaces", deserialize_with = "duration")]
    pub wait_for_interfaces: Duration,
    /// Log level of the kernel programs' own logging (off, error, warn, info, debug).
    #[serde(default = "default_kernel_log")]
    pub kernel_log: String,
    /// How the daemon logs: "auto" (journald when systemd connected stderr to the journal,
    /// else text), "text", "json" (JSON Lines on stderr) or "journald". `ws-guard run
    /// --log-format` overrides it; takes effect on restart.
    #[serde(default = "default_log_format")]
    pub log_format: LogFormat,
    #[serde(default)]
    pub capacity: Capacity,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsSettings,
    /// Sources never limited (still counted). CIDRs, IPv4 or IPv6.
    #[serde(default, deserialize_with = "cidrs")]
    pub allow: Vec<IpNet>,
    /// Sources whose new connections are always dropped. CIDRs, IPv4 or IPv6.
    #[serde(default, deserialize_with = "cidrs")]
    pub deny: Vec<IpNet>,
    /// A source refused by a port's `new_connections` is banned from that port for this long
    /// (every new attempt dropped). Zero: no automatic bans.
    #[serde(default, deserialize_with = "duration")]
    pub ban_duration: Duration,
    /// Where runtime changes made with the CLI are kept (docs/operations.md, "Changing limits at runtime").
    #[serde(default = "default_state_file")]
    pub state_file: PathBuf,
    /// The control socket.
    #[serde(default)]
    pub control: ControlSettings,
    /// Protected ports. Omitted: refused by validation with a message saying why.
    #[serde(rename = "port", default)]
    pub ports: Vec<PortLimits>,
}

fn default_ipv4_prefix() -> u32 {
    32
}
fn default_ipv6_prefix() -> u32 {
    64
}
/// The longest `handshake_timeout`: the kernel gives up on a handshake after its SYN-ACK
/// retries (about a minute by default, `net.ipv4.tcp_synack_retries`); an hour covers any
/// sane setting, and keeps every duration in nanoseconds far from overflowing.
pub const MAX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3600);

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(60)
}
/// The longest `wait_for_interfaces`.
pub const MAX_WAIT_FOR_INTERFACES: Duration = Duration::from_secs(600);

fn default_wait_for_interfaces() -> Duration {
    Duration::from_secs(45)
}

fn default_sweep_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_state_file() -> PathBuf {
    DEFAULT_STATE_FILE.into()
}
fn default_kernel_log() -> String {
    "warn".into()
}
fn default_log_format() -> LogFormat {
    LogFormat::Auto
}

/// The kernel log levels, as aya-log numbers them.
pub const KERNEL_LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

impl Config {
    /// Reads and validates `path` (a regular file, see [`read_regular_file`]).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_regular_file(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates `text`; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            line: e.span().map(|s| line_column(text, s.start)),
            // The message alone: the caret block of toml's Display spans several lines.
            message: e.message().trim_end().replace('\n', "; "),
        })?;
        cfg.check(origin).map_err(|e| match e {
            ConfigError::Invalid {
                path,
                line: None,
                field,
                message,
            } => ConfigError::Invalid {
                path,
                line: locate::line_of(text, &field),
                field,
                message,
            },
            e => e,
        })?;
        Ok(cfg)
    }

    /// Validates a whole configuration (as [`Config::parse`] does after reading the TOML), e.g.
    /// one built from a file plus runtime changes. `origin` names it in errors.
    pub fn check(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |field: String, message: String| ConfigError::Invalid {
            path: origin.to_owned(),
            line: None,
            field,
            message,
        };
        if self.ports.is_empty() {
            return Err(invalid(
                "port".into(),
                "at least one [[port]] is needed: ws-guard protects nothing otherwise".into(),
            ));
        }
        if self.ports.len() > MAX_PORTS as usize {
            return Err(invalid(
                "port".into(),
                format!(
                    "{} ports configured; at most {MAX_PORTS} can be protected",
                    self.ports.len()
                ),
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            let field = |name: &str| format!("port[{i}].{name}");
            if !(1..=65535).contains(&p.port) {
                return Err(invalid(
                    field("port"),
                    format!("{} is not a TCP port (1-65535)", p.port),
                ));
            }
            if !seen.insert(p.port) {
                return Err(invalid(
                    field("port"),
                    format!("port {} is configured twice", p.port),
                ));
            }
            if p.max_connections == Some(0) {
                return Err(invalid(
                    field("max_connections"),
                    "0 would refuse every connection; leave it out for no limit".into(),
                ));
            }
            if p.syn_cookie_threshold == 0 {
                return Err(invalid(
                    field("syn_cookie_threshold"),
                    "must be at least 1 half-open attempt (syn_cookies = \"on\" keeps cookies \
                     on)"
                    .into(),
                ));
            }
        }
        if self.ipv4_prefix > 32 {
            return Err(invalid(
                "ipv4_prefix".into(),
                format!("{} is not 0-32", self.ipv4_prefix),
            ));
        }
        if self.ipv6_prefix > 128 {
            return Err(invalid(
                "ipv6_prefix".into(),
                format!("{} is not 0-128", self.ipv6_prefix),
            ));
        }
        if self.handshake_timeout < Duration::from_secs(1)
            || self.handshake_timeout > MAX_HANDSHAKE_TIMEOUT
        {
            return Err(invalid(
                "handshake_timeout".into(),
                "must be between 1s and 1h".into(),
            ));
        }
        if self.wait_for_interfaces > MAX_WAIT_FOR_INTERFACES {
            return Err(invalid(
                "wait_for_interfaces".into(),
                "must be at most 10m".into(),
            ));
        }
        if self.sweep_interval < Duration::from_millis(100)
            || self.sweep_interval > Duration::from_secs(60)
        {
            return Err(invalid(
                "sweep_interval".into(),
                "must be between 100ms and 60s".into(),
            ));
        }
        if !KERNEL_LOG_LEVELS.contains(&self.kernel_log.as_str()) {
            return Err(invalid(
                "kernel_log".into(),
                format!(
                    "{:?} is not one of {}",
                    self.kernel_log,
                    KERNEL_LOG_LEVELS.join(", ")
                ),
            ));
        }
        for (name, v) in [
            ("capacity.sources", self.capacity.sources),
            ("capacity.flows", self.capacity.flows),
            ("capacity.bans", self.capacity.bans),
            ("capacity.cidrs", self.capacity.cidrs),
        ] {
            if !(64..=16_777_216).contains(&v) {
                return Err(invalid(
                    name.into(),
                    format!("{v} is not between 64 and 16777216"),
                ));
            }
        }
        if let Some(n) = self.capacity.rate_attempts {
            if !(1..=RATE_SLOTS as u32).contains(&n) {
                return Err(invalid(
                    "capacity.rate_attempts".into(),
                    format!("{n} is not between 1 and {RATE_SLOTS}"),
                ));
            }
            if let Some(p) = self
                .ports
                .iter()
                .find(|p| p.new_connections.is_some_and(|r| r.count > n))
            {
                return Err(invalid(
                    "capacity.rate_attempts".into(),
                    format!(
                        "{n} is less than port {}'s new_connections count ({})",
                        p.port,
                        p.new_connections.map_or(0, |r| r.count)
                    ),
                ));
            }
        }
        self.metrics
            .listen_addr()
            .map_err(|m| invalid("metrics.listen".into(), m))?;
        if self.metrics.top_sources > MAX_TOP_SOURCES {
            return Err(invalid(
                "metrics.top_sources".into(),
                format!(
                    "{} is above the maximum of {MAX_TOP_SOURCES}",
                    self.metrics.top_sources
                ),
            ));
        }
        let mut names = BTreeSet::new();
        for (i, name) in self.interfaces.iter().enumerate() {
            if name.is_empty()
                || name.len() > 15
                || name.contains('/')
                || name.contains(char::is_whitespace)
            {
                return Err(invalid(
                    format!("interfaces[{i}]"),
                    format!("{name:?} is not an interface name"),
                ));
            }
            if !names.insert(name) {
                return Err(invalid(
                    format!("interfaces[{i}]"),
                    format!("{name:?} is listed twice"),
                ));
            }
        }
        for (name, list) in [("allow", &self.allow), ("deny", &self.deny)] {
            if list.len() > self.capacity.cidrs as usize {
                return Err(invalid(
                    name.into(),
                    format!(
                        "{} CIDRs; capacity.cidrs allows {}",
                        list.len(),
                        self.capacity.cidrs
                    ),
                ));
            }
            for (i, net) in list.iter().enumerate() {
                parse_cidr(&net.to_string()).map_err(|m| invalid(format!("{name}[{i}]"), m))?;
            }
            if let Some((i, j)) = first_overlap(list) {
                return Err(invalid(
                    format!("{name}[{j}]"),
                    format!(
                        "{} overlaps {name}[{i}] = {}; list each range once",
                        list[j], list[i]
                    ),
                ));
            }
        }
        if let Some(j) = self.deny.iter().position(|d| self.allow.contains(d)) {
            return Err(invalid(
                format!("deny[{j}]"),
                format!(
                    "{} is also in allow (a range inside an allowed one may be denied, and \
                     allow wins, but the same range in both says nothing)",
                    self.deny[j]
                ),
            ));
        }
        if self.ban_duration > Duration::from_secs(86_400 * 365) {
            return Err(invalid(
                "ban_duration".into(),
                "must be at most 365 days".into(),
            ));
        }
        for (name, path) in [
            ("state_file", &self.state_file),
            ("control.socket", &self.control.socket),
        ] {
            if !path.is_absolute() || path.file_name().is_none() {
                return Err(invalid(
                    name.into(),
                    format!("{} is not an absolute file path", path.display()),
                ));
            }
        }
        // sun_path holds 108 bytes, the terminating NUL included.
        if self.control.socket.as_os_str().len() > 107 {
            return Err(invalid(
                "control.socket".into(),
                "longer than the 107 bytes a Unix socket path may have".into(),
            ));
        }
        Ok(())
    }

    /// The kernel's form of the global settings.
    pub fn global(&self) -> GlobalConfig {
        GlobalConfig {
            monitor: self.monitor as u32,
            ipv4_prefix: self.ipv4_prefix,
            ipv6_prefix: self.ipv6_prefix,
            fail_closed: (self.on_map_full == OnMapFull::Closed) as u32,
            pass_fragments: (self.fragments == Fragments::Pass) as u32,
            ban_ns: u64::try_from(self.ban_duration.as_nanos()).unwrap_or(u64::MAX),
            // `flags` follow the maps' contents: the guard sets them.
            ..GlobalConfig::default()
        }
    }

    /// Panics if this configuration breaks a rule [`Config::parse`] enforces, or if turning
    /// it into the kernel's form does. Every config `parse` returns must pass; the fuzz target
    /// (`fuzz/fuzz_targets/config.rs`) and the parser's regression tests call it.
    pub fn assert_invariants(&self) {
        assert!(!self.ports.is_empty() && self.ports.len() <= MAX_PORTS as usize);
        let mut seen = BTreeSet::new();
        for p in &self.ports {
            assert!((1..=65535).contains(&p.port), "port {}", p.port);
            assert!(seen.insert(p.port), "port {} twice", p.port);
            assert_ne!(p.max_connections, Some(0));
            if let Some(r) = p.new_connections {
                assert!((1..=RATE_SLOTS as u32).contains(&r.count), "rate {r}");
                assert!(!r.window.is_zero() && r.window <= Duration::from_secs(86_400 * 7));
            }
            let k = p.to_kernel();
            assert_eq!(k.enabled, 1);
            assert_eq!(k.max_connections, p.max_connections.unwrap_or(0));
            assert_eq!(k.rate_limit, p.new_connections.map_or(0, |r| r.count));
            assert_eq!(k.rate_window_ns == 0, p.new_connections.is_none());
            for a in [k.conn_action, k.rate_action] {
                assert!(a == ACTION_DROP || a == ACTION_REJECT, "action {a}");
            }
        }
        assert!(self.ipv4_prefix <= 32 && self.ipv6_prefix <= 128);
        let g = self.global();
        assert_eq!(
            (g.monitor, g.ipv4_prefix, g.ipv6_prefix, g.fail_closed),
            (
                self.monitor as u32,
                self.ipv4_prefix,
                self.ipv6_prefix,
                (self.on_map_full == OnMapFull::Closed) as u32
            )
        );
        for v in [
            self.capacity.sources,
            self.capacity.flows,
            self.capacity.bans,
            self.capacity.cidrs,
        ] {
            assert!((64..=16_777_216).contains(&v), "capacity {v}");
        }
        assert!((Duration::from_secs(1)..=MAX_HANDSHAKE_TIMEOUT).contains(&self.handshake_timeout));
        assert!(
            (Duration::from_millis(100)..=Duration::from_secs(60)).contains(&self.sweep_interval)
        );
        assert!(KERNEL_LOG_LEVELS.contains(&self.kernel_log.as_str()));
        assert!((self.kernel_log_level() as usize) < KERNEL_LOG_LEVELS.len());
        assert!(self.metrics.listen_addr().is_ok());
        assert!(self.metrics.top_sources <= MAX_TOP_SOURCES);
        for list in [&self.allow, &self.deny] {
            assert!(list.len() <= self.capacity.cidrs as usize);
            assert!(list.iter().all(|n| n.trunc() == *n) && first_overlap(list).is_none());
        }
        assert!(self.deny.iter().all(|d| !self.allow.contains(d)));
        assert!(self.state_file.is_absolute() && self.control.socket.is_absolute());
        let mut names = BTreeSet::new();
        for n in &self.interfaces {
            assert!(!n.is_empty() && n.len() <= 15 && !n.contains('/'), "{n:?}");
            assert!(!n.contains(char::is_whitespace) && names.insert(n), "{n:?}");
        }
    }

    /// What differs from `self` in `new`, one line per change, in words an operator reads in
    /// a reload's log (`port 9000: max_connections 3 -> 5`). Empty: nothing changed.
    pub fn changes(&self, new: &Config) -> Vec<String> {
        let mut out = Vec::new();
        let opt = |v: Option<String>| v.unwrap_or_else(|| "none".into());
        let old_ports: std::collections::BTreeMap<u32, &PortLimits> =
            self.ports.iter().map(|p| (p.port, p)).collect();
        let new_ports: std::collections::BTreeMap<u32, &PortLimits> =
            new.ports.iter().map(|p| (p.port, p)).collect();
        for port in old_ports.keys() {
            if !new_ports.contains_key(port) {
                out.push(format!("port {port}: no longer protected"));
            }
        }
        for (port, p) in &new_ports {
            let Some(old) = old_ports.get(port) else {
                out.push(format!("port {port}: now protected"));
                continue;
            };
            let mut field = |name: &str, a: String, b: String| {
                if a != b {
                    out.push(format!("port {port}: {name} {a} -> {b}"));
                }
            };
            field(
                "max_connections",
                opt(old.max_connections.map(|n| n.to_string())),
                opt(p.max_connections.map(|n| n.to_string())),
            );
            field(
                "new_connections",
                opt(old.new_connections.map(|r| r.to_string())),
                opt(p.new_connections.map(|r| r.to_string())),
            );
            field(
                "connection_action",
                old.connection_action.to_string(),
                p.connection_action.to_string(),
            );
            field(
                "rate_action",
                old.rate_action.to_string(),
                p.rate_action.to_string(),
            );
            field(
                "syn_cookies",
                old.syn_cookies.to_string(),
                p.syn_cookies.to_string(),
            );
            field(
                "syn_cookie_threshold",
                old.syn_cookie_threshold.to_string(),
                p.syn_cookie_threshold.to_string(),
            );
        }
        let mut field = |name: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{name} {a} -> {b}"));
            }
        };
        field("monitor", self.monitor.to_string(), new.monitor.to_string());
        field(
            "ipv4_prefix",
            self.ipv4_prefix.to_string(),
            new.ipv4_prefix.to_string(),
        );
        field(
            "ipv6_prefix",
            self.ipv6_prefix.to_string(),
            new.ipv6_prefix.to_string(),
        );
        field(
            "on_map_full",
            format!("{:?}", self.on_map_full).to_lowercase(),
            format!("{:?}", new.on_map_full).to_lowercase(),
        );
        field(
            "fragments",
            format!("{:?}", self.fragments).to_lowercase(),
            format!("{:?}", new.fragments).to_lowercase(),
        );
        field(
            "ban_duration",
            humantime::format_duration(self.ban_duration).to_string(),
            humantime::format_duration(new.ban_duration).to_string(),
        );
        field(
            "handshake_timeout",
            humantime::format_duration(self.handshake_timeout).to_string(),
            humantime::format_duration(new.handshake_timeout).to_string(),
        );
        field(
            "sweep_interval",
            humantime::format_duration(self.sweep_interval).to_string(),
            humantime::format_duration(new.sweep_interval).to_string(),
        );
        field(
            "kernel_log",
            self.kernel_log.clone(),
            new.kernel_log.clone(),
        );
        for (name, a, b) in [
            ("allow", &self.allow, &new.allow),
            ("deny", &self.deny, &new.deny),
        ] {
            let a: BTreeSet<&IpNet> = a.iter().collect();
            let b: BTreeSet<&IpNet> = b.iter().collect();
            for added in b.difference(&a) {
                out.push(format!("{name}: + {added}"));
            }
            for removed in a.difference(&b) {
                out.push(format!("{name}: - {removed}"));
            }
        }
        out
    }

    /// Rate stamps kept per source: `capacity.rate_attempts`, or the largest
    /// `new_connections` count of the ports, at least [`MIN_RATE_ATTEMPTS`].
    pub fn rate_ring(&self) -> u32 {
        self.capacity.rate_attempts.unwrap_or_else(|| {
            self.ports
                .iter()
                .filter_map(|p| p.new_connections.map(|r| r.count))
                .fold(MIN_RATE_ATTEMPTS, u32::max)
        })
    }

    /// aya-log's number for `kernel_log`.
    pub fn kernel_log_level(&self) -> u8 {
        KERNEL_LOG_LEVELS
            .iter()
            .position(|l| *l == self.kernel_log)
            .unwrap_or(2) as u8
    }
}

/// The indexes `(i, j)` of two CIDRs of `list` that overlap (one contains the other), if any.
pub fn first_overlap(list: &[IpNet]) -> Option<(usize, usize)> {
    let mut order: Vec<usize> = (0..list.len()).collect();
    // By family, network address, then shorter prefix first: CIDRs are nested or disjoint, so
    // if any two overlap, two neighbours in this order do.
    order.sort_by_key(|&i| (list[i].network(), list[i].prefix_len()));
    order.windows(2).find_map(|w| {
        let (a, b) = (&list[w[0]], &list[w[1]]);
        (a.contains(b) || b.contains(a)).then(|| (w[0].min(w[1]), w[0].max(w[1])))
    })
}

/// Where a field is in TOML text, for error messages.
mod locate {
    use toml_edit::{ImDocument, Item};

    /// The 1-based line of `field` (`a.b`, `port[2].max_connections`, `allow[1]`) in `text`:
    /// of its value, or of the innermost enclosing item the text has.
    pub fn line_of(text: &str, field: &str) -> Option<usize> {
        let doc = ImDocument::parse(text).ok()?;
        let mut item: &Item = doc.as_item();
        let mut span = None;
        'walk: for seg in field.split('.') {
            let (name, index) = match seg.split_once('[') {
                Some((n, i)) => (n, i.trim_end_matches(']').parse::<usize>().ok()),
                None => (seg, None),
            };
            let Some(next) = item.get(name) else {
                break 'walk;
            };
            span = next.span().or(span);
            item = next;
            if let Some(i) = index {
                let Some(next) = item.get(i) else { break 'walk };
                span = next.span().or(span);
                item = next;
            }
        }
        let start = span?.start.min(text.len());
        Some(text[..start].matches('\n').count() + 1)
    }
}

/// The configuration `ws-guard run` uses when given none: port 9000 on the default route's
/// interface, 3 concurrent connections and 9 new connections per 100 s per source (the iptables
/// recipe in the README).
pub const DEFAULT_CONFIG: &str = include_str!("../../packaging/config.toml");

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, "test.toml")
    }

    #[test]
    fn default_config_parses() {
        let c = parse(DEFAULT_CONFIG).unwrap();
        assert_eq!(c.ports[0].port, 9000);
        assert_eq!(c.ports[0].max_connections, Some(3));
        assert_eq!(
            c.ports[0].new_connections,
            Some(Rate {
                count: 9,
                window: Duration::from_secs(100)
            })
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse("[[port]]\nport = 8080\n").unwrap();
        assert_eq!(c.ipv4_prefix, 32);
        assert_eq!(c.ipv6_prefix, 64);
        assert_eq!(c.xdp_mode, XdpMode::Auto);
        assert!(!c.monitor);
        assert_eq!(c.on_map_full, OnMapFull::Open);
        assert_eq!(c.global().fail_closed, 0);
        assert_eq!(
            c.metrics.listen_addr(),
            Ok(Some("127.0.0.1:9105".parse().unwrap()))
        );
        assert_eq!(c.metrics.top_sources, 0);
        assert_eq!(c.ports[0].connection_action, Action::Reject);
        assert_eq!(c.ports[0].rate_action, Action::Drop);
        let k = c.ports[0].to_kernel();
        assert_eq!((k.enabled, k.max_connections, k.rate_limit), (1, 0, 0));
    }

    #[test]
    fn rates() {
        let r: Rate = "10/1m".parse().unwrap();
        assert_eq!(r.window, Duration::from_secs(60));
        assert_eq!(r.count, 10);
        let r: Rate = " 3 / 500ms ".parse().unwrap();
        assert_eq!(r.window, Duration::from_millis(500));
        for bad in ["10", "0/1s", "x/1s", "3/0s", "3/abc", "33/1s", "1/8d"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }

    fn invalid_field(s: &str) -> String {
        match parse(s) {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        }
    }

    #[test]
    fn only_regular_files_of_bounded_size_are_read() {
        let dir = std::env::temp_dir().join(format!("wsg-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo.toml");
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let zero = dir.join("zero.toml");
        let _ = std::fs::remove_file(&zero);
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let big = dir.join("big.toml");
        std::fs::write(&big, vec![b'#'; MAX_FILE_BYTES as usize + 1]).unwrap();
        // Each is refused at once: a FIFO with no writer once hung the daemon, /dev/zero
        // filled its memory.
        let (tx, rx) = std::sync::mpsc::channel();
        let paths = [fifo.clone(), zero.clone(), big.clone()];
        std::thread::spawn(move || {
            for p in paths {
                tx.send((p.clone(), Config::load(&p).map(|_| ()))).unwrap();
            }
        });
        for _ in 0..3 {
            let (p, r) = rx
                .recv_timeout(std::time::Duration::from_secs(5))
                .expect("reading a config path blocked");
            let e = r.expect_err("read");
            assert!(
                matches!(e, ConfigError::Read { .. }),
                "{}: {e}",
                p.display()
            );
            let text = e.to_string();
            assert!(
                text.contains("not a regular file") || text.contains("read at most"),
                "{text}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn log_format_defaults_to_auto_and_takes_four_values() {
        assert_eq!(
            parse("[[port]]\nport = 1\n").unwrap().log_format,
            LogFormat::Auto
        );
        assert_eq!(parse(DEFAULT_CONFIG).unwrap().log_format, LogFormat::Auto);
        for (v, want) in [
            ("auto", LogFormat::Auto),
            ("text", LogFormat::Text),
            ("json", LogFormat::Json),
            ("journald", LogFormat::Journald),
        ] {
            let c = parse(&format!("log_format = \"{v}\"\n[[port]]\nport = 1\n")).unwrap();
            assert_eq!(c.log_format, want);
            assert_eq!(parse(&to_toml(&c)).unwrap(), c, "{}", to_toml(&c));
        }
        // Refused with the line, like any other value of the wrong form.
        for bad in ["\"syslog\"", "\"JSON\"", "1", "true"] {
            let r = parse(&format!("\n\nlog_format = {bad}\n[[port]]\nport = 1\n"));
            assert!(
                matches!(
                    r,
                    Err(ConfigError::Parse {
                        line: Some((3, _)),
                        ..
                    })
                ),
                "log_format = {bad}: {r:?}"
            );
        }
    }

    #[test]
    fn the_rate_ring_follows_the_largest_count_unless_set() {
        let two = "[[port]]\nport = 1\nnew_connections = \"9/100s\"\n\
                   [[port]]\nport = 2\nnew_connections = \"20/1s\"\n";
        assert_eq!(parse(two).unwrap().rate_ring(), 20);
        assert_eq!(
            parse("[[port]]\nport = 1\n").unwrap().rate_ring(),
            MIN_RATE_ATTEMPTS
        );
        let recipe = "[[port]]\nport = 1\nnew_connections = \"9/100s\"\n";
        assert_eq!(parse(recipe).unwrap().rate_ring(), MIN_RATE_ATTEMPTS);
        let set = format!("[capacity]\nrate_attempts = 32\n{two}");
        assert_eq!(parse(&set).unwrap().rate_ring(), 32);
        // Below a port's count, or out of range: refused, naming the key.
        for bad in [
            "rate_attempts = 10",
            "rate_attempts = 0",
            "rate_attempts = 33",
        ] {
            let e = parse(&format!("[capacity]\n{bad}\n{two}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("capacity.rate_attempts"), "{bad}: {e}");
        }
    }

    #[test]
    fn to_toml_reads_back_to_the_same_config() {
        let mut c = parse(DEFAULT_CONFIG).unwrap();
        assert_eq!(parse(&to_toml(&c)).unwrap(), c, "{}", to_toml(&c));
        // Every field away from its default.
        c = parse(
            "interfaces = [\"eth0\", \"eth1\"]\nxdp_mode = \"generic\"\nmonitor = true\n\
             ipv4_prefix = 24\nipv6_prefix = 48\non_map_full = \"closed\"\nfragments = \"pass\"\n\
             handshake_timeout = \"90s\"\nsweep_interval = \"250ms\"\n\
             wait_for_interfaces = \"0s\"\nkernel_log = \"debug\"\n\
             allow = [\"198.18.0.0/24\", \"2001:2::/48\"]\ndeny = [\"198.19.0.0/16\"]\n\
             ban_duration = \"1h 30m\"\nstate_file = \"/tmp/x y.toml\"\n\
             [capacity]\nsources = 1024\nflows = 4096\nbans = 64\ncidrs = 128\nrate_attempts = 20\n\
             [metrics]\nlisten = \"off\"\ntop_sources = 5\n[control]\nsocket = \"/tmp/c.sock\"\n\
             [[port]]\nport = 9000\nmax_connections = 3\nconnection_action = \"drop\"\n\
             new_connections = \"9/100s\"\nrate_action = \"reject\"\n[[port]]\nport = 9001\n",
        )
        .unwrap();
        assert_eq!(parse(&to_toml(&c)).unwrap(), c, "{}", to_toml(&c));
    }

    #[test]
    fn none_is_no_limit() {
        let c =
            parse("[[port]]\nport = 1\nmax_connections = \"none\"\nnew_connections = \"none\"\n")
                .unwrap();
        assert_eq!(
            (c.ports[0].max_connections, c.ports[0].new_connections),
            (None, None)
        );
        let e = parse("[[port]]\nport = 1\nmax_connections = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("number of connections or \"none\""), "{e}");
    }

    #[test]
    fn durations_are_bounded() {
        // 18446744074s once wrapped to 0.29 s in the sweep's nanoseconds (SECURITY.md).
        for v in ["18446744074s", "3601s", "999ms", "100000000000000h"] {
            let text = format!("handshake_timeout = \"{v}\"\n[[port]]\nport = 1\n");
            assert_eq!(invalid_field(&text), "handshake_timeout", "{v}");
        }
        let c = parse("handshake_timeout = \"1h\"\n[[port]]\nport = 1\n").unwrap();
        assert_eq!(c.handshake_timeout, MAX_HANDSHAKE_TIMEOUT);
        for (key, v) in [
            ("sweep_interval", "61s"),
            ("ban_duration", "366days"),
            ("ban_duration", "18446744074s"),
        ] {
            let text = format!("{key} = \"{v}\"\n[[port]]\nport = 1\n");
            assert_eq!(invalid_field(&text), key, "{v}");
        }
    }

    #[test]
    fn bad_values_name_their_field() {
        assert_eq!(invalid_field("[[port]]\nport = 0\n"), "port[0].port");
        assert_eq!(invalid_field("[[port]]\nport = 70000\n"), "port[0].port");
        assert_eq!(
            invalid_field("[[port]]\nport = 1\n[[port]]\nport = 1\n"),
            "port[1].port"
        );
        assert_eq!(
            invalid_field("[[port]]\nport = 1\nmax_connections = 0\n"),
            "port[0].max_connections"
        );
        assert_eq!(
            invalid_field("ipv4_prefix = 33\n[[port]]\nport = 1\n"),
            "ipv4_prefix"
        );
        assert_eq!(
            invalid_field("ipv6_prefix = 129\n[[port]]\nport = 1\n"),
            "ipv6_prefix"
        );
        assert_eq!(
            invalid_field("interfaces = [\"a b\"]\n[[port]]\nport = 1\n"),
            "interfaces[0]"
        );
        assert_eq!(
            invalid_field("kernel_log = \"loud\"\n[[port]]\nport = 1\n"),
            "kernel_log"
        );
        assert_eq!(
            invalid_field("[capacity]\nflows = 1\n[[port]]\nport = 1\n"),
            "capacity.flows"
        );
        assert_eq!(invalid_field("interfaces = []\n"), "port");
        let many: String = (1..=MAX_PORTS + 1)
            .map(|p| format!("[[port]]\nport = {p}\n"))
            .collect();
        assert_eq!(invalid_field(&many), "port");
        let most: String = (1..=MAX_PORTS)
            .map(|p| format!("[[port]]\nport = {p}\n"))
            .collect();
        assert!(parse(&most).is_ok());
    }

    #[test]
    fn semantic_errors_name_file_line_and_field() {
        let text = "monitor = false\n\n[[port]]\nport = 9000\n\n[[port]]\nport = 9001\nmax_connections = 0\n";
        let e = parse(text).unwrap_err();
        assert!(
            matches!(e, ConfigError::Invalid { line: Some(8), .. }),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "test.toml:8: port[1].max_connections: 0 would refuse every connection; leave it out \
             for no limit"
        );
        let e = parse("ipv4_prefix = 40\n[[port]]\nport = 1\n").unwrap_err();
        assert!(
            e.to_string().starts_with("test.toml:1: ipv4_prefix:"),
            "{e}"
        );
        let e = parse("[[port]]\nport = 1\n[capacity]\nflows = 3\n").unwrap_err();
        assert!(
            e.to_string().starts_with("test.toml:4: capacity.flows:"),
            "{e}"
        );
        let e = parse(
            "allow = [\n  \"198.18.0.0/24\",\n  \"198.18.0.128/25\",\n]\n[[port]]\nport = 1\n",
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("test.toml:3: allow[1]:"), "{e}");
        // A field the text does not have (a missing [[port]]) has no line.
        let e = parse("monitor = true\n").unwrap_err();
        assert!(e.to_string().starts_with("test.toml: port:"), "{e}");
        // check() on a config built in code has no text, hence no line.
        let mut c = parse("[[port]]\nport = 1\n").unwrap();
        c.ipv6_prefix = 200;
        assert!(matches!(
            c.check("runtime"),
            Err(ConfigError::Invalid { line: None, .. })
        ));
    }

    #[test]
    fn cidr_lists() {
        let c = parse(
            "allow = [\"198.18.0.0/24\", \"2001:2::/48\", \"198.19.0.7\"]\n\
             deny = [\"198.18.0.0/16\"]\nban_duration = \"10m\"\n[[port]]\nport = 1\n",
        )
        .unwrap();
        assert_eq!(c.allow.len(), 3);
        assert_eq!(c.allow[2].to_string(), "198.19.0.7/32");
        assert_eq!(c.deny[0].prefix_len(), 16);
        assert_eq!(c.ban_duration, Duration::from_secs(600));
        // IPv4-mapped IPv6 CIDRs are the IPv4 ones they map, as on the wire.
        assert_eq!(
            parse_cidr("::ffff:198.18.0.5/128").unwrap().to_string(),
            "198.18.0.5/32"
        );
        assert_eq!(
            parse_cidr("::ffff:198.18.0.5").unwrap().to_string(),
            "198.18.0.5/32"
        );
        assert_eq!(
            parse_cidr("::ffff:198.18.0.0/120").unwrap().to_string(),
            "198.18.0.0/24"
        );
        assert_eq!(
            parse_cidr("2001:2::/48").unwrap().to_string(),
            "2001:2::/48"
        );
        let e = parse("deny = [\"198.18.0.1/24\"]\n[[port]]\nport = 1\n").unwrap_err();
        assert!(
            e.to_string().contains("did you mean \"198.18.0.0/24\""),
            "{e}"
        );
        assert!(e.to_string().starts_with("test.toml:1:8: "), "{e}");
        for bad in ["198.18.0.0/33", "nonsense", "2001:2::/129", "198.18.0.0/"] {
            let e = parse(&format!("allow = [\"{bad}\"]\n[[port]]\nport = 1\n")).unwrap_err();
            assert!(e.to_string().contains("is not a CIDR"), "{bad}: {e}");
        }
        assert_eq!(
            invalid_field("deny = [\"2001:2::/48\", \"2001:2:0:1::/64\"]\n[[port]]\nport = 1\n"),
            "deny[1]"
        );
        assert_eq!(
            invalid_field(
                "allow = [\"198.18.0.0/24\"]\ndeny = [\"198.18.0.0/24\"]\n[[port]]\nport = 1\n"
            ),
            "deny[0]"
        );
        // A denied range with an allowed hole in it is the usual pattern.
        assert!(
            parse("allow = [\"198.18.0.5\"]\ndeny = [\"198.18.0.0/24\"]\n[[port]]\nport = 1\n")
                .is_ok()
        );
        // IPv4 and IPv6 never overlap.
        assert!(parse("allow = [\"0.0.0.0/0\", \"::/0\"]\n[[port]]\nport = 1\n").is_ok());
        let many: Vec<String> = (0..65).map(|i| format!("\"198.18.1.{i}\"")).collect();
        let text = format!(
            "allow = [{}]\n[capacity]\ncidrs = 64\n[[port]]\nport = 1\n",
            many.join(", ")
        );
        assert_eq!(invalid_field(&text), "allow");
        assert!(parse(&text.replace("cidrs = 64", "cidrs = 65")).is_ok());
    }

    #[test]
    fn overlap_finder_is_exhaustive() {
        // Against the quadratic definition, on random small CIDRs that often overlap.
        let mut rng: u64 = 0x1234_5678_9abc_def1;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..2000 {
            let n = 1 + (next() % 6) as usize;
            let list: Vec<IpNet> = (0..n)
                .map(|_| {
                    let prefix = 28 + (next() % 5) as u8;
                    let addr = std::net::Ipv4Addr::from(0xC612_0000 | (next() % 64) as u32);
                    IpNet::new(addr.into(), prefix).unwrap().trunc()
                })
                .collect();
            let quadratic = (0..n).any(|i| {
                (0..n).any(|j| i != j && (list[i].contains(&list[j]) || list[j].contains(&list[i])))
            });
            let found = first_overlap(&list);
            assert_eq!(found.is_some(), quadratic, "{list:?}");
            if let Some((i, j)) = found {
                assert!(i < j && (list[i].contains(&list[j]) || list[j].contains(&list[i])));
            }
        }
    }

    #[test]
    fn control_and_state_paths() {
        let c = parse("[[port]]\nport = 1\n").unwrap();
        assert_eq!(c.control.socket, Path::new(DEFAULT_CONTROL_SOCKET));
        assert_eq!(c.state_file, Path::new(DEFAULT_STATE_FILE));
        assert_eq!(c.capacity.bans, 65_536);
        assert_eq!(c.ban_duration, Duration::ZERO);
        assert_eq!(
            invalid_field("state_file = \"relative.toml\"\n[[port]]\nport = 1\n"),
            "state_file"
        );
        let long = format!("/run/{}.sock", "x".repeat(120));
        assert_eq!(
            invalid_field(&format!(
                "[control]\nsocket = \"{long}\"\n[[port]]\nport = 1\n"
            )),
            "control.socket"
        );
    }

    #[test]
    fn changes_list_only_the_difference() {
        let a = parse(
            "allow = [\"198.18.0.5\"]\n[[port]]\nport = 9000\nmax_connections = 3\n\
             [[port]]\nport = 9001\nnew_connections = \"5/1s\"\n",
        )
        .unwrap();
        assert!(a.changes(&a).is_empty());
        let b = parse(
            "monitor = true\nallow = [\"198.18.0.6\"]\n[[port]]\nport = 9000\nmax_connections = 4\n\
             [[port]]\nport = 9002\n",
        )
        .unwrap();
        assert_eq!(
            a.changes(&b),
            [
                "port 9001: no longer protected",
                "port 9000: max_connections 3 -> 4",
                "port 9002: now protected",
                "monitor false -> true",
                "allow: + 198.18.0.6/32",
                "allow: - 198.18.0.5/32",
            ]
        );
    }

    #[test]
    fn on_map_full() {
        let c = parse("on_map_full = \"closed\"\n[[port]]\nport = 1\n").unwrap();
        assert_eq!(c.on_map_full, OnMapFull::Closed);
        assert_eq!(c.global().fail_closed, 1);
        let c = parse("on_map_full = \"open\"\n[[port]]\nport = 1\n").unwrap();
        assert_eq!(c.global().fail_closed, 0);
        let e = parse("on_map_full = \"drop\"\n[[port]]\nport = 1\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("drop") && e.starts_with("test.toml:1:15: "),
            "{e}"
        );
    }

    #[test]
    fn metrics_settings() {
        let c = parse("[metrics]\nlisten = \"off\"\n[[port]]\nport = 1\n").unwrap();
        assert_eq!(c.metrics.listen_addr(), Ok(None));
        let c = parse("[metrics]\nlisten = \"\"\n[[port]]\nport = 1\n").unwrap();
        assert_eq!(c.metrics.listen_addr(), Ok(None));
        let c = parse("[metrics]\nlisten = \"[::1]:9999\"\ntop_sources = 10\n[[port]]\nport = 1\n")
            .unwrap();
        assert_eq!(
            c.metrics.listen_addr(),
            Ok(Some("[::1]:9999".parse().unwrap()))
        );
        assert_eq!(c.metrics.top_sources, 10);
        for bad in ["localhost:9105", "127.0.0.1", "9105", "on"] {
            let text = format!("[metrics]\nlisten = \"{bad}\"\n[[port]]\nport = 1\n");
            assert_eq!(invalid_field(&text), "metrics.listen", "{bad}");
        }
        assert_eq!(
            invalid_field("[metrics]\ntop_sources = 101\n[[port]]\nport = 1\n"),
            "metrics.top_sources"
        );
        let e = parse("[metrics]\nport = 1\n[[port]]\nport = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("port"), "{e}");
    }

    /// Parses `text` the way the fuzz target does: no panic, and an accepted config keeps the
    /// invariants. Returns whether it was accepted.
    fn parse_checked(text: &str) -> bool {
        match parse(text) {
            Ok(c) => {
                c.assert_invariants();
                true
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                false
            }
        }
    }

    #[test]
    fn fuzz_seed_corpus_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/config");
        let mut seeds = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            // The seeds are valid configurations; anything else libFuzzer left there locally
            // only has to be handled without a panic.
            if name.starts_with("seed-") {
                assert!(parse_checked(&text), "{name}: {:?}", parse(&text).err());
                seeds += 1;
            } else {
                parse_checked(&text);
            }
        }
        assert!(seeds >= 5, "{seeds} seeds in {}", dir.display());
    }

    /// Deterministic mutations of the shipped config (the fuzz target's job, cheaply and on
    /// stable, in every test run): every truncation, byte flips and replacements with bytes
    /// TOML cares about, and lines deleted, duplicated and swapped.
    #[test]
    fn mutated_default_config_never_panics() {
        let base = DEFAULT_CONFIG.as_bytes();
        let lines: Vec<&str> = DEFAULT_CONFIG.lines().collect();
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let (mut accepted, mut refused) = (0, 0);
        let mut check = |bytes: &[u8]| {
            if parse_checked(&String::from_utf8_lossy(bytes)) {
                accepted += 1;
            } else {
                refused += 1;
            }
        };
        for len in 0..=base.len() {
            check(&base[..len]);
        }
        const BYTES: &[u8] = b"\0\n\"'[]{}=#.,-+_ \\09xe\xff";
        for _ in 0..3000 {
            let mut m = base.to_vec();
            for _ in 0..1 + next() % 3 {
                let i = (next() % m.len() as u64) as usize;
                m[i] = match next() % 3 {
                    0 => m[i] ^ (1 << (next() % 8)),
                    1 => BYTES[(next() % BYTES.len() as u64) as usize],
                    _ => m[i].wrapping_add(1),
                };
            }
            check(&m);
        }
        for _ in 0..1000 {
            let mut l = lines.clone();
            let i = (next() % l.len() as u64) as usize;
            let j = (next() % l.len() as u64) as usize;
            match next() % 3 {
                0 => {
                    l.remove(i);
                }
                1 => l.insert(i, lines[j]),
                _ => l.swap(i, j),
            }
            check(l.join("\n").as_bytes());
        }
        // Values at and past the edges of every numeric and duration field.
        for (key, values) in [
            (
                "port",
                &[
                    "0",
                    "1",
                    "65535",
                    "65536",
                    "-1",
                    "4294967296",
                    "1e3",
                    "0x10",
                ][..],
            ),
            (
                "max_connections",
                &["0", "1", "4294967295", "4294967296", "-3"],
            ),
            (
                "ipv4_prefix",
                &["0", "32", "33", "-1", "99999999999999999999"],
            ),
            (
                "new_connections",
                &[
                    "\"32/1ns\"",
                    "\"33/1s\"",
                    "\"1/604800s\"",
                    "\"1/604801s\"",
                    "\"1/99999999999999999999s\"",
                    "\"/\"",
                    "\"1/\"",
                ],
            ),
            (
                "handshake_timeout",
                &[
                    "\"1s\"",
                    "\"999ms\"",
                    "\"1h\"",
                    "\"3601s\"",
                    "\"18446744074s\"",
                    "\"18446744073709551616s\"",
                    "1",
                ],
            ),
        ] {
            for v in values {
                let text: String = DEFAULT_CONFIG
                    .lines()
                    .map(|l| match l.split_once(" = ") {
                        Some((k, _)) if k == key => format!("{k} = {v}\n"),
                        _ => format!("{l}\n"),
                    })
                    .collect();
                check(text.as_bytes());
            }
        }
        // Both outcomes must occur, or the mutations test nothing.
        assert!(
            accepted > 100 && refused > 1000,
            "{accepted} accepted, {refused} refused"
        );
    }

    #[test]
    fn syntax_and_type_errors_say_where() {
        let e = parse("[[port]]\nport = \"9000\"\n")
            .unwrap_err()
            .to_string();
        // One line: file, line, column, message.
        assert_eq!(
            e, "test.toml:2:8: invalid type: string \"9000\", expected u32",
            "{e}"
        );
        let e = parse("[[port]]\nport = 9000\nmax_conections = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_conections"), "{e}");
        let e = parse("[[port]]\nport = 9000\nnew_connections = \"5\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("COUNT/WINDOW"), "{e}");
        let e = parse("[[port]]\nport = 9000\nconnection_action = \"kill\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("kill"), "{e}");
    }
}
