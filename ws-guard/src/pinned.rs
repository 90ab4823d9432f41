//! What the kernel enforces, read from the pinned maps without the daemon: `ws-guard status`
//! when the control socket does not answer (the daemon stopped, crashed or is restarting,
//! while the pinned programs keep enforcing).

use std::path::Path;

use anyhow::Context as _;
use aya::maps::{Array, HashMap, Map, MapData};
use serde::Serialize;
use ws_guard_common::{
    maps::{BanValue, GlobalConfig, PortConfig, SourceKey},
    names,
};

use crate::{
    config::{Action, Rate},
    pin::PinDir,
};

/// A protected port as its pinned `WSG_PORTS` entry says.
#[derive(Clone, Debug, Serialize)]
pub struct PinnedPort {
    pub port: u16,
    /// `null`: no concurrency limit.
    pub max_connections: Option<u32>,
    pub connection_action: String,
    /// `COUNT/WINDOW`; `null`: no rate limit.
    pub new_connections: Option<String>,
    pub rate_action: String,
    /// Slots held now (half-open and established connections).
    pub connections: u64,
    /// Sources holding at least one.
    pub sources: u64,
}

/// What the pins under a root say.
#[derive(Clone, Debug, Serialize)]
pub struct PinnedStatus {
    pub pin_dir: String,
    /// Interfaces with a pinned XDP link, and its mode.
    pub interfaces: Vec<(String, String)>,
    pub monitor: bool,
    pub ipv4_prefix: u32,
    pub ipv6_prefix: u32,
    pub ports: Vec<PinnedPort>,
    /// Bans pinned (in force or expired but not yet removed).
    pub bans: u64,
}

fn open(pins: &PinDir, name: &str) -> anyhow::Result<Map> {
    let path = pins.map(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("reading {}", path.display()))
}

/// Reads what the pins of this build's layout under `root` enforce; an error when nothing is
/// pinned there.
pub fn read(root: &Path) -> anyhow::Result<PinnedStatus> {
    let pins = PinDir::new(root);
    anyhow::ensure!(
        pins.has_state(),
        "nothing of this version of ws-guard is pinned under {}",
        root.display()
    );
    let global_map = open(&pins, names::MAP_GLOBAL)?;
    let global: Array<_, GlobalConfig> = Array::try_from(&global_map)?;
    let g = global.get(&0, 0).context("reading the global settings")?;
    let ports_map = open(&pins, names::MAP_PORTS)?;
    let port_array: Array<_, PortConfig> = Array::try_from(&ports_map)?;
    let sources_path = pins.map(names::MAP_SOURCES);
    let sources = MapData::from_pin(&sources_path)
        .with_context(|| format!("opening {}", sources_path.display()))?;
    let mut held: std::collections::BTreeMap<u16, (u64, u64)> = Default::default();
    for (k, s) in crate::view::source_entries(&sources).context("reading the connection counts")? {
        if s.slots > 0 {
            let e = held.entry(k.port).or_default();
            e.0 += u64::from(s.slots);
            e.1 += 1;
        }
    }
    let mut ports = Vec::new();
    for port in 1..=u16::MAX {
        let p = port_array
            .get(&u32::from(port), 0)
            .context("reading the protected ports")?;
        if p.enabled == 0 {
            continue;
        }
        let action = |code| Action::from_code(code).map_or("?".to_owned(), |a| a.to_string());
        let (connections, sources) = held.get(&port).copied().unwrap_or_default();
        ports.push(PinnedPort {
            port,
            max_connections: (p.max_connections != 0).then_some(p.max_connections),
            connection_action: action(p.conn_action),
            new_connections: (p.rate_limit != 0).then(|| {
                Rate {
                    count: p.rate_limit,
                    window: std::time::Duration::from_nanos(p.rate_window_ns),
                }
                .to_string()
            }),
            rate_action: action(p.rate_action),
            connections,
            sources,
        });
    }
    let bans_map = open(&pins, names::MAP_BANS)?;
    let bans: HashMap<_, SourceKey, BanValue> = HashMap::try_from(&bans_map)?;
    let bans = bans.keys().take(16 << 20).filter(Result::is_ok).count() as u64;
    let interfaces = pins
        .xdp_links()
        .into_iter()
        .map(|(interface, path)| {
            let mode = if path.to_string_lossy().ends_with("-native") {
                "native"
            } else {
                "generic"
            };
            (interface, mode.to_owned())
        })
        .collect();
    Ok(PinnedStatus {
        pin_dir: pins.dir().display().to_string(),
        interfaces,
        monitor: g.monitor != 0,
        ipv4_prefix: g.ipv4_prefix,
        ipv6_prefix: g.ipv6_prefix,
        ports,
        bans,
    })
}

/// The text of `ws-guard status` from the pins.
pub fn describe(s: &PinnedStatus) -> String {
    let mut o = format!(
        "the kernel keeps enforcing what is pinned in {} (monitor mode {}; sources keyed by \
         IPv4 /{}, IPv6 /{}):\n",
        s.pin_dir,
        if s.monitor { "on" } else { "off" },
        s.ipv4_prefix,
        s.ipv6_prefix
    );
    if s.interfaces.is_empty() {
        o += "  attached to no interface (no pinned XDP link)\n";
    }
    for (interface, mode) in &s.interfaces {
        o += &format!("  attached to {interface} ({mode} XDP)\n");
    }
    for p in &s.ports {
        o += &format!(
            "  port {}: max_connections {} (then {}), new_connections {} (then {}); {} \
             connection(s) held by {} source(s)\n",
            p.port,
            p.max_connections
                .map_or_else(|| "none".to_owned(), |n| n.to_string()),
            p.connection_action,
            p.new_connections.as_deref().unwrap_or("none"),
            p.rate_action,
            p.connections,
            p.sources
        );
    }
    o += &format!(
        "  bans pinned: {}\nnothing checks the accounting against the sockets until the \
         daemon runs again (`systemctl start ws-guard`)\n",
        s.bans
    );
    o
}
