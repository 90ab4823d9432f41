//! Loading the kernel programs, attaching them, and reading and writing their maps.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    path::Path,
    sync::Arc,
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues},
    programs::{
        TestRun, TestRunOptions, TracePoint, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use log::{info, warn};
use ws_guard_common::{
    filter::{current_source, flows_settled, prefixes_changed},
    maps::{
        AF_INET, AF_INET6, CONTROL_DONE, ControlOp, Counter, FLAG_CHECK_FLOWS, FLOW_OWNED,
        FLOW_PENDING, FlowKey, FlowValue, GlobalConfig, MAX_PORTS, OP_CHARGE, OP_FORGET,
        OP_REKEY_OWNED, OP_REKEY_PENDING, OP_SETTLE_MEMO, OP_UNCHARGE, PortConfig, RateState,
        SourceKey, SourceState, UNATTRIBUTED, stats_bucket,
    },
    names, tracepoint as tp,
};

use crate::{
    bans::monotonic_ns,
    config::{self, Config},
    pin::PinDir,
    view::MapView,
};
// The list and ban types of the Guard API, where the rest of it is.
pub use crate::{
    bans::{Ban, BanReason},
    lists::{List, Policy},
};

/// The kernel object, built by build.rs from the ws-guard-ebpf crate.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ws-guard-ebpf"));

/// The same programs with the hash-map operations of `WSG_SOURCES` and `WSG_FLOWS` counted
/// (`WSG_OPS`), for the benchmark's check of the work per path.
#[cfg(feature = "op-counters")]
pub static COUNTED_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ws-guard-ebpf-counted"));

/// What [`Guard::load`] needs before the maps exist.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Capacity of the source map (`WSG_SOURCES`).
    pub sources: u32,
    /// Capacity of the flow map (`WSG_FLOWS`: half-open and established connections).
    pub flows: u32,
    /// Capacity of the ban map (`WSG_BANS`).
    pub bans: u32,
    /// Capacity of each CIDR list (`WSG_ALLOW`, `WSG_DENY`).
    pub cidrs: u32,
    /// aya-log level compiled into the programs' checks (0 = off ... 5 = trace).
    pub kernel_log_level: u8,
    /// Rate stamps kept per source (1 to `RATE_SLOTS`): the largest `new_connections` count
    /// the programs can enforce, and what a source entry's size follows.
    pub rate_ring: u32,
    /// Load [`COUNTED_OBJECT`] instead of the shipped programs (the benchmark).
    #[cfg(feature = "op-counters")]
    pub count_ops: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        let c = config::Capacity::default();
        Self {
            sources: c.sources,
            flows: c.flows,
            bans: c.bans,
            cidrs: c.cidrs,
            kernel_log_level: 2,
            rate_ring: ws_guard_common::maps::RATE_SLOTS as u32,
            #[cfg(feature = "op-counters")]
            count_ops: false,
        }
    }
}

impl LoadOptions {
    /// The options a configuration asks for.
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            sources: cfg.capacity.sources,
            flows: cfg.capacity.flows,
            bans: cfg.capacity.bans,
            cidrs: cfg.capacity.cidrs,
            kernel_log_level: cfg.kernel_log_level(),
            rate_ring: cfg.rate_ring(),
            #[cfg(feature = "op-counters")]
            count_ops: false,
        }
    }
}

/// One interface the XDP program is attached to.
#[derive(Debug)]
pub struct Attachment {
    pub interface: String,
    /// "native" or "generic".
    pub mode: &'static str,
    /// The interface's index when attached; the link goes with the interface if it is deleted.
    pub ifindex: u32,
    link: AttachLink,
    /// The link was pinned by an earlier daemon and this one took it over (its program
    /// swapped): it was enforcing before this start, so a failed start keeps it.
    pub taken_over: bool,
}

/// How an XDP attachment is held.
#[derive(Debug)]
enum AttachLink {
    /// Owned by the program: detached when the guard is dropped.
    Owned(XdpLinkId),
    /// Pinned on bpffs: stays attached until the pin is removed.
    Pinned(PinnedLink),
    /// Released: the interface went away and re-attaching has not succeeded yet.
    Released,
}

impl Attachment {
    /// Whether the interface still exists under its name with the index the program was
    /// attached to (in the calling thread's network namespace).
    pub fn interface_present(&self) -> bool {
        ifindex(&self.interface) == Some(self.ifindex)
    }
}

/// The index of interface `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// The loaded programs and their maps. Dropping it detaches everything.
pub struct Guard {
    ebpf: Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    attachments: Vec<Attachment>,
    tracepoint_attached: bool,
    /// The stats bucket of each protected port ([`PortConfig::index`]).
    port_index: BTreeMap<u16, u32>,
    /// Buckets assigned since load; the others hold only zeros.
    used_buckets: BTreeSet<u32>,
    /// Counts taken out of buckets reassigned to another port, so totals never go down.
    retired: [u64; Counter::COUNT as usize],
    /// Where programs, links and maps are pinned ([`Guard::load_pinned`]); `None`: nothing is.
    pins: Option<PinDir>,
    /// Whether the maps were adopted from pins a previous daemon left.
    adopted: bool,
    /// Rate stamps per source the source map holds (`LoadOptions::rate_ring`).
    rate_ring: u32,
    /// The pinned tracepoint link.
    tracepoint_link: Option<PinnedLink>,
    /// Handles on the traffic-sized maps, shared with readers on other threads.
    view: Arc<MapView>,
    /// What the allow and deny tries hold, once read (see [`Guard::apply_policy`]).
    pub(crate) lists_in_kernel: Option<(
        std::collections::BTreeSet<ipnet::IpNet>,
        std::collections::BTreeSet<ipnet::IpNet>,
    )>,
    /// Connections the sweep found in another namespace that match no admitted attempt
    /// (see [`crate::sweep::SweepReport::unmatched`]), since load.
    pub unmatched_connections: u64,
    /// Each protected port's SYN-cookie mode, as the daemon's [`crate::cookies::Controller`]
    /// last set it (for status and metrics).
    pub cookie_status: BTreeMap<u16, crate::cookies::PortCookies>,
    /// What the SYN-ACKs of cookie mode offer ([`Guard::set_cookie_settings`]).
    cookie_settings: ws_guard_common::maps::CookieSettings,
}

/// Counters per protected port and address family, summed over CPUs; arrays are indexed by
/// [`Counter`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Per (port, family): `AF_INET` or `AF_INET6`.
    pub ports: BTreeMap<(u16, u16), [u64; Counter::COUNT as usize]>,
    /// Frames and connections not tied to a protected port, both families together.
    pub unattributed: [u64; Counter::COUNT as usize],
}

/// Decision counters summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub BTreeMap<&'static str, u64>);

impl Counters {
    /// The value of one counter.
    pub fn get(&self, c: Counter) -> u64 {
        self.0.get(c.name()).copied().unwrap_or(0)
    }
}

impl AsRef<Guard> for Guard {
    fn as_ref(&self) -> &Guard {
        self
    }
}

impl AsMut<Guard> for Guard {
    fn as_mut(&mut self) -> &mut Guard {
        self
    }
}

impl Guard {
    /// Loads the programs into the kernel (verifier included) without attaching anything.
    pub fn load(opts: &LoadOptions) -> anyhow::Result<Self> {
        Self::load_inner(opts, None)
    }

    /// Like [`Guard::load`], with every map pinned under `pins`: maps a previous daemon pinned
    /// there are adopted with their contents (counts, flows, limits, counters), the others are
    /// created and pinned. The programs are pinned too, and [`Guard::attach_xdp`] and
    /// [`Guard::attach_tracepoint`] then pin their links (replacing pinned ones atomically), so
    /// enforcement continues when this process ends. [`Guard::adopted`] says which happened.
    pub fn load_pinned(opts: &LoadOptions, pins: PinDir) -> anyhow::Result<Self> {
        Self::load_inner(opts, Some(pins))
    }

    fn load_inner(opts: &LoadOptions, pins: Option<PinDir>) -> anyhow::Result<Self> {
        raise_memlock_limit();
        let level = opts.kernel_log_level;
        let mut loader = EbpfLoader::new();
        let mut adopted = false;
        if let Some(p) = &pins {
            p.prepare()?;
            adopted = p.has_state();
            if adopted {
                resize_rate_ring(p, opts.rate_ring)?;
            }
            forget_memos_of_new_sources(p)?;
            for name in names::MAPS {
                loader.map_pin_path(name, p.map(name));
            }
        }
        #[cfg(feature = "op-counters")]
        let source = if opts.count_ops {
            COUNTED_OBJECT
        } else {
            OBJECT
        };
        #[cfg(not(feature = "op-counters"))]
        let source = OBJECT;
        let object = crate::ebpf_object::with_rate_ring(source, opts.rate_ring)?;
        let ring = opts.rate_ring;
        let mut ebpf = loader
            .map_max_entries(names::MAP_SOURCES, opts.sources)
            .map_max_entries(names::MAP_FLOWS, opts.flows)
            .map_max_entries(names::MAP_BANS, opts.bans)
            .map_max_entries(names::MAP_ALLOW, opts.cidrs)
            .map_max_entries(names::MAP_DENY, opts.cidrs)
            // Levels above this are removed by the verifier as dead code.
            .override_global("AYA_LOG_LEVEL", &level, false)
            .override_global("RATE_RING", &ring, true)
            .load(object.bytes())
            .context("loading the ws-guard eBPF object (needs root or CAP_BPF + CAP_NET_ADMIN)")?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            // The object has no log map when every log statement was compiled out.
            Err(e) => {
                log::debug!("kernel logging unavailable: {e}");
                None
            }
        };
        for name in [names::PROG_XDP, names::PROG_CONTROL, names::PROG_COOKIE] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("the verifier refused program {name}"))?;
        }
        // The XDP program's tail call into the cookie half: this load's, replacing (atomically)
        // the one a pinned table held.
        {
            let fd = ebpf
                .program(names::PROG_COOKIE)
                .ok_or_else(|| anyhow!("program {} missing", names::PROG_COOKIE))?
                .fd()?
                .try_clone()
                .context("duplicating the cookie program's descriptor")?;
            let mut jump: aya::maps::ProgramArray<&mut MapData> = ebpf
                .map_mut(names::MAP_JUMP)
                .ok_or_else(|| anyhow!("map {} missing", names::MAP_JUMP))?
                .try_into()?;
            jump.set(0, &fd, 0)
                .context("filling the XDP program's tail-call table")?;
        }
        let tp: &mut TracePoint = ebpf
            .program_mut(names::PROG_SOCK_STATE)
            .ok_or_else(|| anyhow!("program {} missing from the object", names::PROG_SOCK_STATE))?
            .try_into()?;
        tp.load()
            .with_context(|| format!("the verifier refused program {}", names::PROG_SOCK_STATE))?;
        let view = Arc::new(MapView::of(&ebpf)?);
        let mut guard = Self {
            view,
            ebpf,
            logger,
            attachments: Vec::new(),
            tracepoint_attached: false,
            port_index: BTreeMap::new(),
            used_buckets: BTreeSet::new(),
            retired: [0; Counter::COUNT as usize],
            pins,
            adopted,
            tracepoint_link: None,
            unmatched_connections: 0,
            cookie_status: BTreeMap::new(),
            cookie_settings: Default::default(),
            lists_in_kernel: None,
            rate_ring: opts.rate_ring,
        };
        if guard.pins.is_some() {
            guard.pin_programs()?;
        }
        if adopted {
            guard.adopt_buckets()?;
        } else {
            // The array's entry starts as zeros, i.e. /0 prefixes: every source of a family
            // would share one key until the caller applies a config. Start from the defaults
            // (new maps track no flow, so no prefix "changes" under one).
            let flags = guard.live_flags(0)?;
            guard.write_global(GlobalConfig {
                flags,
                ..GlobalConfig::default()
            })?;
        }
        Ok(guard)
    }

    /// Pins the XDP and tracepoint programs (replacing the pins of a previous daemon's), and
    /// logs whether the XDP program differs from the one pinned before.
    fn pin_programs(&mut self) -> anyhow::Result<()> {
        let Some(pins) = self.pins.clone() else {
            return Ok(());
        };
        let xdp_path = pins.program(names::PROG_XDP);
        let old_tag = aya::programs::ProgramInfo::from_pin(&xdp_path)
            .ok()
            .map(|i| i.tag());
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(names::PROG_XDP)
            .ok_or_else(|| anyhow!("XDP program missing"))?
            .try_into()?;
        let new_tag = prog.info().context("reading the XDP program's info")?.tag();
        match old_tag {
            Some(t) if t == new_tag => info!("pinned XDP program unchanged (tag {new_tag:016x})"),
            Some(t) => info!(
                "XDP program changed (tag {t:016x} -> {new_tag:016x}): the pinned one will be \
                 replaced atomically"
            ),
            None => {}
        }
        for name in [names::PROG_XDP, names::PROG_SOCK_STATE] {
            let path = pins.program(name);
            if path.exists() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing the old pin {}", path.display()))?;
            }
            self.ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing"))?
                .pin(&path)
                .with_context(|| format!("pinning program {name} at {}", path.display()))?;
        }
        Ok(())
    }

    /// After adopting pinned maps: takes the protected ports' stats buckets from the pinned
    /// limits, and marks every bucket holding counts as used (so reusing it retires them).
    fn adopt_buckets(&mut self) -> anyhow::Result<()> {
        for (port, limits) in self.scan_ports()? {
            self.port_index.insert(port, limits.index);
            self.used_buckets.insert(limits.index);
        }
        let m: PerCpuArray<&MapData, u64> = self.map(names::MAP_STATS)?;
        let mut used = Vec::new();
        for index in 0..MAX_PORTS {
            for family in [AF_INET, AF_INET6] {
                if read_bucket(&m, index, family)?.iter().any(|v| *v != 0) {
                    used.push(index);
                }
            }
        }
        self.used_buckets.extend(used);
        Ok(())
    }

    /// The hash-map operations counted so far (lookups, inserts, deletes), all CPUs; only for a
    /// guard loaded with `count_ops`.
    #[cfg(feature = "op-counters")]
    pub fn op_counts(&self) -> anyhow::Result<[u64; 3]> {
        let m: aya::maps::PerCpuArray<&MapData, u64> = self.map(names::MAP_OPS)?;
        let mut out = [0u64; 3];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = m.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(out)
    }

    /// Rate stamps kept per source: the largest `new_connections` count this load enforces.
    pub fn rate_ring(&self) -> u32 {
        self.rate_ring
    }

    /// Whether the maps were adopted from a previous daemon's pins.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The pin directory, if the guard pins ([`Guard::load_pinned`]).
    pub fn pin_dir(&self) -> Option<&PinDir> {
        self.pins.as_ref()
    }

    /// Removes what a previous daemon pinned and this one does not use: XDP links of interfaces
    /// not in `keep`, and the pins of other layout versions. Returns what was removed.
    pub fn remove_stale_pins(&mut self) -> anyhow::Result<Vec<std::path::PathBuf>> {
        let Some(pins) = self.pins.clone() else {
            return Ok(Vec::new());
        };
        let mut removed = Vec::new();
        for (interface, path) in pins.xdp_links() {
            if !self.attachments.iter().any(|a| a.interface == interface) {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
                info!("detached from {interface}: no longer configured");
                removed.push(path);
            }
        }
        for dir in pins.other_versions() {
            removed.extend(crate::pin::remove_version_dir(&dir)?);
            info!(
                "removed the pins of another layout version: {}",
                dir.display()
            );
        }
        Ok(removed)
    }

    /// Whether one of this guard's XDP links is still pinned: `ws-guard teardown` run while the
    /// daemon is up removes them, and they are detached when the daemon lets go of them.
    pub fn links_pinned(&self) -> bool {
        let Some(pins) = &self.pins else {
            return false;
        };
        self.attachments
            .iter()
            .any(|a| pins.xdp_link(&a.interface, a.mode).exists())
    }

    /// Leaves the links, programs and maps pinned (enforcing) and forgets them here: the
    /// daemon's default on exit.
    pub fn keep_pinned(&mut self) {
        self.attachments.clear();
        self.tracepoint_link = None;
    }

    /// Detaches everything and removes every pin of this guard's pin directory (all layout
    /// versions): `--detach-on-exit`.
    pub fn teardown(&mut self) -> anyhow::Result<Vec<std::path::PathBuf>> {
        self.detach_all()?;
        if let Some(link) = self.tracepoint_link.take() {
            link.unpin().context("unpinning the tracepoint link")?;
        }
        match &self.pins {
            Some(p) => crate::pin::teardown(p.root()),
            None => Ok(Vec::new()),
        }
    }

    /// Writes the configuration's limits and settings into the maps. Ports not in `cfg` stop
    /// being protected; tracked connections are left alone. The allow and deny lists become
    /// exactly `cfg.allow` / `cfg.deny` first, whole or nothing ([`Guard::apply_policy`]): when
    /// that fails, nothing is changed.
    pub fn apply(&mut self, cfg: &Config) -> anyhow::Result<()> {
        // Before anything is written: a count the ring cannot hold would be enforced as the
        // ring's (the kernel clamps), stricter than asked.
        for p in &cfg.ports {
            let count = p.to_kernel().rate_limit;
            if count > self.rate_ring {
                bail!(
                    "port {}: a new_connections count of {count} needs a rate window of \
                     {count} attempts, and this run keeps {} per source \
                     (capacity.rate_attempts, by default the largest count in the \
                     configuration when ws-guard started): put the count in the configuration \
                     file, or set capacity.rate_attempts to {count} or more, and restart \
                     ws-guard",
                    p.port,
                    self.rate_ring,
                );
            }
        }
        self.apply_policy(&crate::lists::Policy::from_config(cfg))?;
        self.set_global(cfg.global())?;
        let wanted: BTreeMap<u16, PortConfig> = cfg
            .ports
            .iter()
            .map(|p| (p.port as u16, p.to_kernel()))
            .collect();
        let cookies_off: BTreeSet<u16> = cfg
            .ports
            .iter()
            .filter(|p| p.syn_cookies == crate::config::CookieMode::Off)
            .map(|p| p.port as u16)
            .collect();
        let current: BTreeMap<u16, PortConfig> = self.ports()?.into_iter().collect();
        for (port, old) in &current {
            if !wanted.contains_key(port) && old.enabled != 0 {
                self.set_port(*port, PortConfig::default())?;
            }
        }
        for (port, mut limits) in wanted {
            // Only what changed is written (a reload rewrites nothing it does not change).
            if let Some(cur) = current.get(&port) {
                limits.index = cur.index;
                // Cookie mode is the daemon's controller's to switch (crate::cookies), except
                // that "off" is off at once.
                if !cookies_off.contains(&port) {
                    limits.syn_cookies = cur.syn_cookies;
                }
                if limits == *cur {
                    continue;
                }
            }
            self.set_port(port, limits)?;
        }
        Ok(())
    }

    /// Sets what the SYN-ACKs of cookie mode offer (the host's MTU and TCP sysctls, see
    /// [`crate::cookies::host_settings`]); written at once when they changed.
    pub fn set_cookie_settings(
        &mut self,
        s: ws_guard_common::maps::CookieSettings,
    ) -> anyhow::Result<()> {
        if s == self.cookie_settings {
            return Ok(());
        }
        self.cookie_settings = s;
        let g = self.global()?;
        self.write_global(GlobalConfig { cookie: s, ..g })
    }

    /// Sets the global settings; the next packet sees them. `g.flags` is ignored: the flags
    /// follow the lists' and the ban map's contents (and `g.ban_ns`), and
    /// [`FLAG_CHECK_FLOWS`] is set when a prefix changes and kept until the sweep clears it
    /// ([`Guard::settle_flow_check`]).
    ///
    /// A prefix change moves every tracked flow to the source key the new prefixes give it, so
    /// a source at its limit stays at it: each flow is charged to its new key before the new
    /// prefixes are written and released from its old one after, so it is never charged to no
    /// key (for a moment, to both: a refusal too many, never an admission). All flows move, or
    /// none when the source map has no room for the new keys (then they keep their old keys
    /// until they close, as the warning says).
    pub fn set_global(&mut self, mut g: GlobalConfig) -> anyhow::Result<()> {
        let old = self.global()?;
        let changed = prefixes_changed(&old, &g);
        let check = if changed {
            FLAG_CHECK_FLOWS
        } else {
            old.flags & FLAG_CHECK_FLOWS
        };
        g.flags = self.live_flags(g.ban_ns)? | check;
        g.cookie = self.cookie_settings;
        let moves = if changed {
            self.charge_new_keys(&g)?
        } else {
            Vec::new()
        };
        if check != 0 && old.flags & FLAG_CHECK_FLOWS == 0 {
            // The flag before the prefixes: an XDP program reading the settings while they are
            // rewritten must not see new prefixes without it.
            self.write_global(GlobalConfig {
                flags: old.flags | FLAG_CHECK_FLOWS,
                ..old
            })?;
        }
        let written = self.write_global(g);
        for (code, flow, source) in moves {
            // Written or not, each charge is settled: moved, or given back.
            let code = if written.is_ok() { code } else { OP_UNCHARGE };
            self.control(ControlOp {
                op: code,
                prefix: ws_guard_common::key::prefix_of(flow.family, &g),
                flow,
                source,
                ..ControlOp::default()
            })?;
        }
        written
    }

    /// The first step of moving tracked flows to the keys `g`'s prefixes give them: charges
    /// each flow to its new key; the moves to finish (rekey op, flow, new key). None when the
    /// source map cannot hold the new keys (every charge made is given back).
    fn charge_new_keys(
        &mut self,
        g: &GlobalConfig,
    ) -> anyhow::Result<Vec<(u32, FlowKey, SourceKey)>> {
        let mut moves = Vec::new();
        for (code, flows) in [
            (OP_REKEY_PENDING, self.pending()?),
            (OP_REKEY_OWNED, self.owned()?),
        ] {
            for (flow, v) in flows {
                let new = current_source(&flow, &v, g);
                if new != v.source(&flow) {
                    moves.push((code, flow, new));
                }
            }
        }
        if moves.is_empty() {
            return Ok(moves);
        }
        let existing: HashSet<SourceKey> = self
            .source_counters()?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let new_keys: HashSet<SourceKey> = moves
            .iter()
            .map(|m| m.2)
            .filter(|k| !existing.contains(k))
            .collect();
        let capacity = self.capacity(names::MAP_SOURCES)? as usize;
        let mut charged = 0;
        if existing.len() + new_keys.len() <= capacity {
            for (_, flow, source) in &moves {
                let op = ControlOp {
                    op: OP_CHARGE,
                    flow: *flow,
                    source: *source,
                    ..ControlOp::default()
                };
                if !self.control(op)? {
                    break;
                }
                charged += 1;
            }
        }
        if charged == moves.len() {
            return Ok(moves);
        }
        for (_, flow, source) in &moves[..charged] {
            self.control(ControlOp {
                op: OP_UNCHARGE,
                flow: *flow,
                source: *source,
                ..ControlOp::default()
            })?;
        }
        warn!(
            "the source map has no room for the source keys the new prefixes give the {} \
             tracked connections: they stay charged to their old keys until they close \
             (capacity.sources)",
            moves.len()
        );
        Ok(Vec::new())
    }

    /// Clears [`FLAG_CHECK_FLOWS`] if every tracked flow is charged to the source key the live
    /// prefixes give it (each flow is then counted in the flow filter the XDP program reads for
    /// its SYNs). True if the flag is clear now. An attempt the XDP program judged under the
    /// previous prefixes and is still inserting when the flows are read would be missed: the
    /// periodic sweep only calls this for a flag it already saw set a round earlier.
    pub fn settle_flow_check(&mut self) -> anyhow::Result<bool> {
        let g = self.global()?;
        if g.flags & FLAG_CHECK_FLOWS == 0 {
            return Ok(true);
        }
        let pending = self.pending()?;
        let owned = self.owned()?;
        let flows = pending.iter().chain(owned.iter()).map(|(k, v)| (k, v));
        if !flows_settled(flows, &g) {
            return Ok(false);
        }
        // Written only if the settings are still those the flows were checked against.
        let now = self.global()?;
        if prefixes_changed(&now, &g) {
            return Ok(false);
        }
        self.write_global(GlobalConfig {
            flags: now.flags & !FLAG_CHECK_FLOWS,
            ..now
        })?;
        Ok(true)
    }

    /// Writes the global settings as given, flags included.
    pub(crate) fn write_global(&mut self, g: GlobalConfig) -> anyhow::Result<()> {
        let mut m: Array<&mut MapData, GlobalConfig> = self.map_mut(names::MAP_GLOBAL)?;
        m.set(0, g, 0).context("writing global settings")?;
        self.forget_refusals()
    }

    /// Tells the XDP program's refusal memos that the settings, limits, lists or bans changed,
    /// so no CPU refuses from what it remembers (see `ws_guard_common::memo`); after every such
    /// write.
    pub(crate) fn forget_refusals(&mut self) -> anyhow::Result<()> {
        self.control(ControlOp {
            op: OP_FORGET,
            ..Default::default()
        })
        .context("telling the XDP program the limits changed")?;
        Ok(())
    }

    /// The global settings in force.
    pub fn global(&self) -> anyhow::Result<GlobalConfig> {
        let m: Array<&MapData, GlobalConfig> = self.map(names::MAP_GLOBAL)?;
        Ok(m.get(&0, 0)?)
    }

    /// Sets the limits of one port; the next packet sees them. `PortConfig::default()` stops
    /// protecting it. `limits.index` is ignored: a protected port keeps the stats bucket it has,
    /// or gets a free one (at most [`MAX_PORTS`] ports are protected at once).
    pub fn set_port(&mut self, port: u16, mut limits: PortConfig) -> anyhow::Result<()> {
        // What the kernel judges the window with, always from the window itself.
        limits.rate_window_ms = ws_guard_common::rate::window_ms(limits.rate_window_ns);
        limits.index = if limits.enabled != 0 {
            self.bucket_for(port)?
        } else {
            0
        };
        let mut m: Array<&mut MapData, PortConfig> = self.map_mut(names::MAP_PORTS)?;
        m.set(port as u32, limits, 0)
            .with_context(|| format!("writing the limits of port {port}"))?;
        if limits.enabled == 0 {
            // The kernel no longer counts into it (up to frames in flight): free for reuse.
            self.port_index.remove(&port);
        }
        self.forget_refusals()
    }

    /// The stats bucket of `port`: the one it has, or the lowest free one, emptied.
    fn bucket_for(&mut self, port: u16) -> anyhow::Result<u32> {
        if let Some(i) = self.port_index.get(&port) {
            return Ok(*i);
        }
        let taken: BTreeSet<u32> = self.port_index.values().copied().collect();
        let Some(i) = (0..MAX_PORTS).find(|i| !taken.contains(i)) else {
            bail!("cannot protect port {port}: at most {MAX_PORTS} ports can be protected at once");
        };
        if self.used_buckets.contains(&i) {
            self.retire_bucket(i)?;
        }
        self.used_buckets.insert(i);
        self.port_index.insert(port, i);
        Ok(i)
    }

    /// Moves the counts of a bucket a former port used into [`Guard::retired`] and zeroes it.
    fn retire_bucket(&mut self, index: u32) -> anyhow::Result<()> {
        let nr_cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| anyhow!("reading {what}: {e}"))
            .context("counting CPUs")?;
        let mut m: PerCpuArray<&mut MapData, u64> = self.map_mut(names::MAP_STATS)?;
        let mut retired = [0u64; Counter::COUNT as usize];
        for family in [AF_INET, AF_INET6] {
            let base = stats_bucket(index, family);
            for c in Counter::ALL {
                let at = base + c as u32;
                retired[c as usize] += m.get(&at, 0)?.iter().sum::<u64>();
                let zeros = PerCpuValues::try_from(vec![0u64; nr_cpus])?;
                m.set(at, zeros, 0)
                    .with_context(|| format!("zeroing stats entry {at}"))?;
            }
        }
        for (r, v) in self.retired.iter_mut().zip(retired) {
            *r += v;
        }
        Ok(())
    }

    /// Every protected port and its limits.
    pub fn ports(&self) -> anyhow::Result<Vec<(u16, PortConfig)>> {
        // The guard knows which ports it protects (it set them, or scanned the adopted map
        // once): reading only those saves a system call per port of the 65,536-entry array,
        // ~0.1 s of every sweep.
        let m: Array<&MapData, PortConfig> = self.map(names::MAP_PORTS)?;
        let mut out = Vec::new();
        for port in self.port_index.keys() {
            let v = m
                .get(&(*port as u32), 0)
                .with_context(|| format!("reading the limits of port {port}"))?;
            if v.enabled != 0 {
                out.push((*port, v));
            }
        }
        Ok(out)
    }

    /// Every protected port of the map, read entry by entry (65,536 system calls): for
    /// adopting a pinned map, whose ports this guard has not set.
    fn scan_ports(&self) -> anyhow::Result<Vec<(u16, PortConfig)>> {
        let m: Array<&MapData, PortConfig> = self.map(names::MAP_PORTS)?;
        let mut out = Vec::new();
        for (i, v) in m.iter().enumerate() {
            let v = v?;
            if v.enabled != 0 {
                out.push((i as u16, v));
            }
        }
        Ok(out)
    }

    /// Checks the tracepoint's record layout against tracefs, then attaches it.
    pub fn attach_tracepoint(&mut self) -> anyhow::Result<()> {
        check_tracepoint_format()?;
        let tp: &mut TracePoint = self
            .ebpf
            .program_mut(names::PROG_SOCK_STATE)
            .ok_or_else(|| anyhow!("tracepoint program missing"))?
            .try_into()?;
        let id = tp
            .attach("sock", "inet_sock_set_state")
            .context("attaching to the sock:inet_sock_set_state tracepoint")?;
        if let Some(pins) = self.pins.clone() {
            // A perf-event link cannot be updated in place: the new one is attached first and
            // the old one released after, so closes are seen throughout (while both run, each
            // transition is still decided once, by a map delete).
            let link: FdLink = tp
                .take_link(id)?
                .try_into()
                .context("the tracepoint link is not a bpf_link (kernel too old to pin it)")?;
            let path = pins.tracepoint_link();
            if path.exists() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing the old pin {}", path.display()))?;
                info!("replaced the pinned tracepoint link");
            }
            let pinned = link
                .pin(&path)
                .with_context(|| format!("pinning the tracepoint link at {}", path.display()))?;
            self.tracepoint_link = Some(pinned);
        }
        self.tracepoint_attached = true;
        Ok(())
    }

    /// Attaches the XDP program to `interface`. `Auto` tries native mode, then generic with a
    /// warning.
    pub fn attach_xdp(
        &mut self,
        interface: &str,
        mode: config::XdpMode,
    ) -> anyhow::Result<&'static str> {
        let index = ifindex(interface).ok_or_else(|| {
            anyhow!("attaching to {interface}: no such interface in this network namespace")
        })?;
        let pins = self.pins.clone();
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(names::PROG_XDP)
            .ok_or_else(|| anyhow!("XDP program missing"))?
            .try_into()?;
        if let Some(pins) = &pins {
            let own = pins.find_xdp_link(interface);
            let other = own
                .is_none()
                .then(|| pins.find_xdp_link_other_version(interface))
                .flatten();
            let mut taken = None;
            if let Some((old_path, mode_name)) = &other {
                // An upgrade across layout versions: the older daemon's link keeps enforcing
                // (with its own maps) until its program is swapped for this one, atomically.
                match take_over_pinned_xdp(prog, old_path, &pins.xdp_link(interface, mode_name)) {
                    Ok(pinned) => {
                        info!(
                            "{interface}: took over the XDP link of another layout version \
                             ({}), swapping its program atomically; counts restart from the \
                             kernel's socket table",
                            old_path.display()
                        );
                        taken = Some((pinned, *mode_name));
                    }
                    Err(e) => warn!(
                        "{interface}: the XDP link of another layout version ({}) cannot be \
                         taken over ({e:#}); attaching anew",
                        old_path.display()
                    ),
                }
            }
            if let Some((path, mode_name)) = own {
                match replace_pinned_xdp(prog, &path) {
                    Ok(pinned) => {
                        info!(
                            "{interface}: replaced the pinned XDP program atomically \
                             ({mode_name} XDP, the link was never detached)"
                        );
                        let wanted = match mode {
                            config::XdpMode::Auto => mode_name,
                            config::XdpMode::Native => "native",
                            config::XdpMode::Generic => "generic",
                        };
                        if wanted != mode_name {
                            warn!(
                                "{interface}: the pinned link is {mode_name} XDP; xdp_mode = \
                                 \"{wanted}\" takes effect after `ws-guard teardown`"
                            );
                        }
                        taken = Some((pinned, mode_name));
                    }
                    Err(e) => {
                        // E.g. the interface was deleted and recreated: the link is defunct.
                        warn!(
                            "{interface}: the pinned XDP link cannot be reused ({e:#}); \
                             attaching anew"
                        );
                        std::fs::remove_file(&path)
                            .with_context(|| format!("removing {}", path.display()))?;
                    }
                }
            }
            if let Some((pinned, mode_name)) = taken {
                warn_if_native_veth(interface, mode_name);
                self.attachments.push(Attachment {
                    interface: interface.to_owned(),
                    mode: mode_name,
                    ifindex: index,
                    link: AttachLink::Pinned(pinned),
                    taken_over: true,
                });
                return Ok(mode_name);
            }
        }
        let attached = (|| -> anyhow::Result<_> {
            Ok(match mode {
                config::XdpMode::Native => (
                    prog.attach_to_if_index(index, XdpMode::Driver)
                        .with_context(|| {
                            format!(
                                "attaching to {interface} in native mode (xdp_mode = \"native\"): \
                             its driver may not support native XDP; xdp_mode = \"auto\" falls \
                             back to generic mode"
                            )
                        })?,
                    "native",
                ),
                config::XdpMode::Generic => (
                    prog.attach_to_if_index(index, XdpMode::Skb)
                        .with_context(|| format!("attaching to {interface} in generic mode"))?,
                    "generic",
                ),
                // Native XDP on a veth cannot deliver the RSTs of `reject` to a peer without an XDP
                // program (a container's end): generic XDP sends them through the stack.
                config::XdpMode::Auto if crate::interfaces::tx_through_veth(interface) => {
                    let link = prog
                        .attach_to_if_index(index, XdpMode::Skb)
                        .with_context(|| format!("attaching to {interface} in generic mode"))?;
                    info!(
                        "{interface} is a veth (or a bond of veths): attached in generic mode, so \
                     the RSTs of `reject` reach its peer (native XDP on a veth sends them only \
                     to a peer that runs an XDP program itself; xdp_mode = \"native\" forces \
                     native)"
                    );
                    (link, "generic")
                }
                config::XdpMode::Auto => match prog.attach_to_if_index(index, XdpMode::Driver) {
                    Ok(link) => (link, "native"),
                    Err(native_err) => {
                        let link = prog.attach_to_if_index(index, XdpMode::Skb).with_context(|| {
                        format!("attaching to {interface}: native mode failed ({native_err}), and generic mode")
                    })?;
                        warn!(
                            "{interface}: native XDP unavailable ({native_err}); attached in generic mode, \
                         which runs later in the stack and costs more per packet"
                        );
                        (link, "generic")
                    }
                },
            })
        })();
        let (link, mode_name) =
            attached.map_err(|e| match crate::interfaces::attached_xdp(interface) {
                // Occupied (EEXIST from bpf_link_create, EBUSY from netlink): name the occupant.
                Some(other) => e.context(format!(
                    "{interface} already has an XDP program attached ({other}): another ws-guard \
                 (another --pin-dir: `ws-guard teardown --pin-dir DIR` removes it) or another \
                 tool; detach it first (`ip link set dev {interface} xdp off` for one attached \
                 without a link)"
                )),
                None => e,
            })?;
        info!("attached to {interface} ({mode_name} XDP)");
        warn_if_native_veth(interface, mode_name);
        let link = match &pins {
            None => AttachLink::Owned(link),
            Some(pins) => {
                let fd: FdLink = prog.take_link(link)?.try_into().with_context(|| {
                    format!("{interface}: attached without a bpf_link (kernel too old to pin it)")
                })?;
                let path = pins.xdp_link(interface, mode_name);
                AttachLink::Pinned(
                    fd.pin(&path)
                        .with_context(|| format!("pinning the XDP link at {}", path.display()))?,
                )
            }
        };
        self.attachments.push(Attachment {
            interface: interface.to_owned(),
            mode: mode_name,
            ifindex: index,
            link,
            taken_over: false,
        });
        Ok(mode_name)
    }

    /// Detaches the XDP program from every interface.
    pub fn detach_all(&mut self) -> anyhow::Result<()> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(names::PROG_XDP)
            .ok_or_else(|| anyhow!("XDP program missing"))?
            .try_into()?;
        for a in self.attachments.drain(..) {
            match a.link {
                AttachLink::Owned(id) => prog
                    .detach(id)
                    .with_context(|| format!("detaching from {}", a.interface))?,
                // Unpinned, the link goes with its last descriptor, dropped here.
                AttachLink::Pinned(link) => drop(
                    link.unpin()
                        .with_context(|| format!("unpinning the link of {}", a.interface))?,
                ),
                AttachLink::Released => {}
            }
            info!("detached from {}", a.interface);
        }
        Ok(())
    }

    /// Undoes the attachments of a start that failed half-way: detaches the interfaces this
    /// start attached anew, and leaves pinned the links it took over from an earlier daemon
    /// (they were enforcing before, with the same maps, and keep doing so).
    pub fn undo_new_attachments(&mut self) -> anyhow::Result<()> {
        let (kept, new): (Vec<_>, Vec<_>) = self.attachments.drain(..).partition(|a| a.taken_over);
        self.attachments = new;
        let result = self.detach_all();
        for a in &kept {
            info!(
                "{}: keeping the link taken over from the earlier daemon",
                a.interface
            );
        }
        result
    }

    /// Attaches the XDP program again to `interface` after the interface it was attached to
    /// went away (deleted: the kernel detached the link) and an interface of that name exists
    /// again, with another index. The defunct link is released (its pin removed), then the
    /// program is attached anew in `mode` (and pinned). If attaching fails, the interface stays
    /// listed as not attached, and a later call tries again.
    pub fn reattach_xdp(
        &mut self,
        interface: &str,
        mode: config::XdpMode,
    ) -> anyhow::Result<&'static str> {
        let mut old = None;
        if let Some(i) = self
            .attachments
            .iter()
            .position(|a| a.interface == interface)
        {
            let a = self.attachments.remove(i);
            let prog: &mut Xdp = self
                .ebpf
                .program_mut(names::PROG_XDP)
                .ok_or_else(|| anyhow!("XDP program missing"))?
                .try_into()?;
            match a.link {
                AttachLink::Owned(id) => {
                    if let Err(e) = prog.detach(id) {
                        log::debug!("{interface}: releasing the defunct link: {e}");
                    }
                }
                AttachLink::Pinned(link) => match link.unpin() {
                    Ok(fd) => drop(fd),
                    Err(e) => log::debug!("{interface}: unpinning the defunct link: {e}"),
                },
                AttachLink::Released => {}
            }
            old = Some((a.mode, a.ifindex));
        }
        // A pin left behind (e.g. by a daemon that exited while the interface was gone) belongs
        // to the old interface too.
        if let Some(pins) = &self.pins {
            for m in ["native", "generic"] {
                let path = pins.xdp_link(interface, m);
                if path.exists() {
                    std::fs::remove_file(&path)
                        .with_context(|| format!("removing {}", path.display()))?;
                }
            }
        }
        match self.attach_xdp(interface, mode) {
            Ok(m) => Ok(m),
            Err(e) => {
                if let Some((mode_name, ifindex)) = old {
                    self.attachments.push(Attachment {
                        interface: interface.to_owned(),
                        mode: mode_name,
                        ifindex,
                        link: AttachLink::Released,
                        taken_over: false,
                    });
                }
                Err(e)
            }
        }
    }

    /// Where the XDP program is attached.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Decision counters, summed over CPUs, ports and families (since load: counts of ports
    /// no longer protected included).
    pub fn counters(&self) -> anyhow::Result<Counters> {
        let m: PerCpuArray<&MapData, u64> = self.map(names::MAP_STATS)?;
        let mut totals = self.retired;
        for index in self.used_buckets.iter().copied().chain([UNATTRIBUTED]) {
            for family in [AF_INET, AF_INET6] {
                let bucket = read_bucket(&m, index, family)?;
                for (t, v) in totals.iter_mut().zip(bucket) {
                    *t += v;
                }
            }
        }
        Ok(Counters(
            Counter::ALL
                .iter()
                .map(|c| (c.name(), totals[*c as usize]))
                .collect(),
        ))
    }

    /// Counters per protected port and address family, and those of no protected port.
    pub fn stats(&self) -> anyhow::Result<Stats> {
        let m: PerCpuArray<&MapData, u64> = self.map(names::MAP_STATS)?;
        let mut out = Stats::default();
        for (port, index) in &self.port_index {
            for family in [AF_INET, AF_INET6] {
                out.ports
                    .insert((*port, family), read_bucket(&m, *index, family)?);
            }
        }
        for family in [AF_INET, AF_INET6] {
            let bucket = read_bucket(&m, UNATTRIBUTED, family)?;
            for (t, v) in out.unattributed.iter_mut().zip(bucket) {
                *t += v;
            }
        }
        Ok(out)
    }

    /// Every source counter in the kernel, zero ones included (each holds a map entry).
    pub fn source_counters(&self) -> anyhow::Result<Vec<(SourceKey, u32)>> {
        self.view.source_counters()
    }

    /// Every entry of the source map (connection slots and flow filter), idle ones included.
    pub fn source_states(&self) -> anyhow::Result<Vec<(SourceKey, SourceState)>> {
        self.view.source_states()
    }

    /// The cookies of the connections admitted at their cookie's ACK ([`names::MAP_COOKIES`]:
    /// flow -> cookie), which a replayed ACK is checked against.
    pub fn used_cookies(&self) -> anyhow::Result<Vec<(FlowKey, u32)>> {
        let m: HashMap<&MapData, FlowKey, u32> = self.map(names::MAP_COOKIES)?;
        m.iter()
            .collect::<Result<Vec<_>, _>>()
            .context("reading the used SYN cookies")
    }

    /// Whether `flow` was admitted at the ACK of its SYN cookie ([`names::MAP_COOKIES`]).
    pub fn cookie_used(&self, flow: &FlowKey) -> anyhow::Result<bool> {
        let m: HashMap<&MapData, FlowKey, u32> = self.map(names::MAP_COOKIES)?;
        match m.get(flow, 0) {
            Ok(_) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e).context("reading the used SYN cookies"),
        }
    }

    /// The rate window of `key` (in its [`names::MAP_SOURCES`] entry), if it has an entry.
    /// Read-only (the differential test compares the kernel's ring with its model's).
    pub fn rate_state(&self, key: &SourceKey) -> anyhow::Result<Option<RateState>> {
        Ok(crate::view::source_entry(self.map_data(names::MAP_SOURCES)?, key)?.map(|s| s.rate()))
    }

    /// The capacity (max_entries) of map `name` as loaded.
    pub fn capacity(&self, name: &str) -> anyhow::Result<u32> {
        let m = self
            .ebpf
            .map(name)
            .ok_or_else(|| anyhow!("map {name} missing from the object"))?;
        let data: &MapData = match m {
            aya::maps::Map::HashMap(d)
            | aya::maps::Map::LruHashMap(d)
            | aya::maps::Map::Array(d)
            | aya::maps::Map::PerCpuArray(d)
            | aya::maps::Map::LpmTrie(d) => d,
            _ => bail!("map {name} has an unexpected type"),
        };
        Ok(data.info()?.max_entries())
    }

    /// Live connections per source key (half-open included); zero entries left out.
    pub fn connections(&self) -> anyhow::Result<BTreeMap<SourceKey, u32>> {
        Ok(self
            .source_states()?
            .into_iter()
            .filter(|(_, s)| s.slots != 0)
            .map(|(k, s)| (k, s.slots))
            .collect())
    }

    /// Removes `key`'s entry if it still holds nothing and its newest rate attempt is at
    /// least `min_age_ms` old (or it has none) when read. The kernel recreates it on the
    /// source's next attempt. True if it removed it.
    pub fn remove_idle_source(&mut self, key: &SourceKey, min_age_ms: u32) -> anyhow::Result<bool> {
        if !self.settle_memos_of(key)? {
            return Ok(false);
        }
        let now = monotonic_ns();
        let data = self.map_data(names::MAP_SOURCES)?;
        let idle = crate::view::source_entry(data, key)?.is_some_and(|v| {
            v.holds_nothing() && v.rate().newest_age_ms(now).is_none_or(|a| a >= min_age_ms)
        });
        if !idle {
            return Ok(false);
        }
        crate::rawmap::RawHashMap::new(data)?
            .remove(crate::rawmap::pod_bytes(key))
            .context("removing an idle source entry")
    }

    /// Moves the refusals the CPUs' memos counted for `key` into its entry, each on the memo's
    /// own CPU (see `ws_guard_common::memo`), so that none is left to land in a later entry of
    /// the key; false if a CPU could not be reached (the entry then stays for now).
    fn settle_memos_of(&mut self, key: &SourceKey) -> anyhow::Result<bool> {
        let cpus: Vec<usize> = self
            .view
            .memos()?
            .iter()
            .enumerate()
            .filter(|(_, m)| m.pending != 0 && m.source == *key)
            .map(|(cpu, _)| cpu)
            .collect();
        for cpu in cpus {
            let op = ControlOp {
                op: OP_SETTLE_MEMO,
                ..Default::default()
            };
            match crate::cpu::on_cpu(cpu, || self.control(op)) {
                Ok(r) => {
                    r?;
                }
                Err(e) => {
                    log::debug!("cannot run on CPU {cpu} to settle its refusal memo: {e}");
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Each possible CPU's refusal memo (see `ws_guard_common::memo`), by CPU number.
    pub fn refusal_memos(&self) -> anyhow::Result<Vec<ws_guard_common::maps::RefusalMemo>> {
        self.view.memos()
    }

    /// Half-open attempts the programs track.
    pub fn pending(&self) -> anyhow::Result<Vec<(FlowKey, FlowValue)>> {
        self.view.flows(Some(FLOW_PENDING))
    }

    /// Established connections the programs track.
    pub fn owned(&self) -> anyhow::Result<Vec<(FlowKey, FlowValue)>> {
        self.view.flows(Some(FLOW_OWNED))
    }

    /// Every tracked flow, in any state.
    pub fn flows(&self) -> anyhow::Result<Vec<(FlowKey, FlowValue)>> {
        self.view.flows(None)
    }

    /// Runs one accounting request in the kernel; true if it changed anything.
    pub fn control(&mut self, op: ControlOp) -> anyhow::Result<bool> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(names::PROG_CONTROL)
            .ok_or_else(|| anyhow!("control program missing"))?
            .try_into()?;
        // SAFETY: ControlOp is plain `#[repr(C)]` data without padding.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&op as *const ControlOp).cast::<u8>(),
                std::mem::size_of::<ControlOp>(),
            )
        };
        let mut out = [0u8; std::mem::size_of::<ControlOp>()];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(bytes);
        opts.data_out = Some(&mut out);
        let r = prog.test_run(opts).context("running the control program")?;
        Ok(r.return_value == CONTROL_DONE)
    }

    /// The XDP program, e.g. for BPF_PROG_TEST_RUN.
    pub fn xdp_program(&mut self) -> anyhow::Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(names::PROG_XDP)
            .ok_or_else(|| anyhow!("XDP program missing"))?
            .try_into()?)
    }

    /// Runs the XDP program once on `frame`; returns its verdict and the frame as it left.
    pub fn run_xdp(&mut self, frame: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        let prog = self.xdp_program()?;
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        let r = prog
            .test_run(opts)
            .context("BPF_PROG_TEST_RUN of the XDP program")?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    /// Names of the maps in the loaded object (for checking them against `names`).
    pub fn map_names(&self) -> Vec<String> {
        self.ebpf.maps().map(|(n, _)| n.to_owned()).collect()
    }

    /// Names of the programs in the loaded object.
    pub fn program_names(&self) -> Vec<String> {
        self.ebpf.programs().map(|(n, _)| n.to_owned()).collect()
    }

    /// Forwards what the kernel programs logged.
    pub fn flush_kernel_log(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }

    /// Read-only handles on the traffic-sized maps, for reading them without this guard (e.g.
    /// a scrape on another thread).
    pub fn view(&self) -> Arc<MapView> {
        self.view.clone()
    }

    /// The object's maps, e.g. to take one out for a task of its own (the event ring buffer).
    pub(crate) fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The map `name`'s data (a hash map).
    fn map_data(&self, name: &str) -> anyhow::Result<&MapData> {
        match self.ebpf.map(name) {
            Some(aya::maps::Map::HashMap(d)) => Ok(d),
            Some(_) => bail!("map {name} has an unexpected type"),
            None => bail!("map {name} missing from the object"),
        }
    }

    pub(crate) fn map<'a, T>(&'a self, name: &str) -> anyhow::Result<T>
    where
        T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
    {
        let m = self
            .ebpf
            .map(name)
            .ok_or_else(|| anyhow!("map {name} missing from the object"))?;
        T::try_from(m).with_context(|| format!("map {name} has an unexpected type"))
    }

    pub(crate) fn map_mut<'a, T>(&'a mut self, name: &str) -> anyhow::Result<T>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        let m = self
            .ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the object"))?;
        T::try_from(m).with_context(|| format!("map {name} has an unexpected type"))
    }
}

/// Says so when a combination cannot deliver the RSTs of `reject` (see
/// [`crate::interfaces::tx_through_veth`]).
fn warn_if_native_veth(interface: &str, mode_name: &str) {
    if mode_name == "native" && crate::interfaces::tx_through_veth(interface) {
        warn!(
            "{interface} is a veth in native XDP mode: the RSTs of `reject` reach its peer only \
             if the peer runs an XDP program (a container's end does not), so refused clients \
             time out instead of failing fast; use xdp_mode = \"auto\" or \"generic\" on it \
             (after `ws-guard teardown` if the link is pinned), or connection_action and \
             rate_action = \"drop\""
        );
    }
}

/// Swaps the program of the XDP link pinned at `old` (another layout version's) for `prog`,
/// then moves the pin to `new`. The link is never detached.
fn take_over_pinned_xdp(prog: &mut Xdp, old: &Path, new: &Path) -> anyhow::Result<PinnedLink> {
    replace_pinned_xdp(prog, old)?;
    let fd: FdLink = PinnedLink::from_pin(old)
        .context("reopening the pinned link")?
        .into();
    let pinned = fd
        .pin(new)
        .with_context(|| format!("pinning the link at {}", new.display()))?;
    std::fs::remove_file(old).with_context(|| format!("removing the old pin {}", old.display()))?;
    Ok(pinned)
}

/// Replaces the program of the XDP link pinned at `path` by `prog`, atomically
/// (bpf_link_update): the interface is never without a program. Returns the link, still pinned.
fn replace_pinned_xdp(prog: &mut Xdp, path: &Path) -> anyhow::Result<PinnedLink> {
    let pinned = PinnedLink::from_pin(path).context("opening the pinned link")?;
    let fd: FdLink = pinned.into();
    let xdp = XdpLink::try_from(fd).context("the pinned link is not an XDP link")?;
    let id = prog
        .attach_to_link(xdp)
        .context("replacing the program of the pinned link")?;
    let fd: FdLink = prog.take_link(id)?.try_into()?;
    // Already pinned at `path`: only the handle is rebuilt; re-pinning would fail (EEXIST).
    drop(fd);
    PinnedLink::from_pin(path).context("reopening the pinned link")
}

/// One bucket of the stats map, summed over CPUs.
fn read_bucket(
    m: &PerCpuArray<&MapData, u64>,
    index: u32,
    family: u16,
) -> anyhow::Result<[u64; Counter::COUNT as usize]> {
    let base = stats_bucket(index, family);
    let mut out = [0u64; Counter::COUNT as usize];
    for c in Counter::ALL {
        let per_cpu = m
            .get(&(base + c as u32), 0)
            .with_context(|| format!("reading stats entry {}", base + c as u32))?;
        out[c as usize] = per_cpu.iter().sum();
    }
    Ok(out)
}

/// Kernels before 5.11 charge map memory to RLIMIT_MEMLOCK; harmless where they do not.
/// Pinned source and flow maps made for another rate ring (the configuration's largest
/// `new_connections` count changed, or `capacity.rate_attempts`) cannot be adopted: their pins
/// are removed, so this load creates them afresh. The programs a previous daemon left keep
/// enforcing with the old maps until this one's replace them; this one learns the established
/// connections from the kernel (the start-up sweep), and the rate windows start empty.
fn resize_rate_ring(pins: &PinDir, ring: u32) -> anyhow::Result<()> {
    let path = pins.map(names::MAP_SOURCES);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let size = data.info()?.value_size() as usize;
    let pinned = ws_guard_common::maps::ring_of_value_size(size);
    if pinned == Some(ring) {
        return Ok(());
    }
    warn!(
        "the pinned source map keeps {} rate stamps per source, this configuration needs {ring}: \
         the source and flow maps are made afresh (established connections are counted again \
         from the kernel's sockets; rate windows start empty)",
        pinned.map_or_else(
            || format!("an unknown number of ({size}-byte values)"),
            |r| r.to_string()
        )
    );
    for name in [names::MAP_SOURCES, names::MAP_FLOWS] {
        let p = pins.map(name);
        std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(())
}

/// Removes the pinned refusal memos when the source map is to be made afresh: a memo names a
/// source at its limit in the map it was made against (see `ws_guard_common::memo`).
fn forget_memos_of_new_sources(pins: &PinDir) -> anyhow::Result<()> {
    let memo = pins.map(names::MAP_MEMO);
    if pins.map(names::MAP_SOURCES).exists() || !memo.exists() {
        return Ok(());
    }
    std::fs::remove_file(&memo).with_context(|| format!("removing {}", memo.display()))
}

fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Verifies that `sock:inet_sock_set_state` has the fields at the offsets the program reads, so
/// a kernel with another layout is refused with a clear error instead of miscounting.
pub fn check_tracepoint_format() -> anyhow::Result<()> {
    let rel = "events/sock/inet_sock_set_state/format";
    if !TRACEFS.iter().any(|d| Path::new(d).join("events").exists()) {
        mount_tracefs();
    }
    let text = TRACEFS
        .iter()
        .find_map(|d| std::fs::read_to_string(Path::new(d).join(rel)).ok())
        .ok_or_else(|| {
            anyhow!(
                "cannot read the sock:inet_sock_set_state format from tracefs; mount it with \
                 `mount -t tracefs nodev /sys/kernel/tracing`"
            )
        })?;
    check_format_text(&text)
}

/// Mounts tracefs where it is missing (e.g. in a fresh mount namespace such as `ip netns exec`
/// makes); failure is reported by the caller, which cannot find the format then.
fn mount_tracefs() {
    let target = c"/sys/kernel/tracing";
    // SAFETY: valid C strings; mount(2) has no memory-safety preconditions.
    let rc = unsafe {
        libc::mount(
            c"tracefs".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        info!("mounted tracefs at /sys/kernel/tracing");
    } else {
        log::debug!("mounting tracefs: {}", std::io::Error::last_os_error());
    }
}

/// The check of [`check_tracepoint_format`] on the format file's text.
pub fn check_format_text(text: &str) -> anyhow::Result<()> {
    for (name, offset, size) in tp::FIELDS {
        let line = text
            .lines()
            .find(|l| {
                l.split(';')
                    .next()
                    .and_then(|decl| decl.split_whitespace().last())
                    .map(|n| n.split('[').next() == Some(name))
                    .unwrap_or(false)
            })
            .ok_or_else(|| {
                anyhow!("inet_sock_set_state has no field {name}; this kernel is not supported")
            })?;
        let want = format!("offset:{offset};\tsize:{size};");
        if !line.replace(' ', "\t").contains(&want) {
            bail!(
                "inet_sock_set_state field {name} is not at offset {offset} size {size} on this \
                 kernel ({}); this kernel is not supported",
                line.trim()
            );
        }
    }
    Ok(())
}
