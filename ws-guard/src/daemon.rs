//! `ws-guard run`: load (adopting pinned state), attach, keep the accounting in step, serve
//! metrics, reload on SIGHUP; on SIGINT/SIGTERM leave everything pinned and enforcing, or
//! remove it with `--detach-on-exit`. Under systemd (`Type=notify`) it reports readiness,
//! reloads, stopping and watchdog pings through sd_notify (see [`notify`]).

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
};

use anyhow::{Context as _, bail};
use log::{error, info, warn};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    config::Config,
    config::XdpMode,
    control::{self, protocol::ListName},
    guard::{self, Guard, LoadOptions},
    interfaces, metrics,
    pin::PinDir,
    state::{self, Overrides},
    sweep,
};

/// How `ws-guard run` pins and exits.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The pin root on bpffs (the layout version's directory goes under it).
    pub pin_root: PathBuf,
    /// On SIGINT/SIGTERM, detach and remove every pin instead of leaving them enforcing.
    pub detach_on_exit: bool,
    /// The control socket (`[control] socket`).
    pub control_socket: PathBuf,
    /// Where runtime changes are kept (`state_file`).
    pub state_file: PathBuf,
}

/// The daemon's state, shared by the main loop, the metrics endpoint and the control socket
/// (behind one mutex: a control change, a reload and a sweep never interleave).
pub struct Shared {
    pub guard: Guard,
    /// The configuration file as loaded (or the built-in default).
    pub file: Config,
    /// Runtime changes (the state file's content).
    pub overrides: Overrides,
    /// What is in force: `file` with `overrides` laid over it.
    pub cfg: Config,
    pub config_path: Option<PathBuf>,
    pub state_file: PathBuf,
    /// The last events (bans, sampled refusals) for `ws-guard events`.
    pub events: Arc<crate::events::EventRing>,
}

impl AsRef<Guard> for Shared {
    fn as_ref(&self) -> &Guard {
        &self.guard
    }
}

impl AsMut<Guard> for Shared {
    fn as_mut(&mut self) -> &mut Guard {
        &mut self.guard
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            pin_root: PathBuf::from(crate::pin::DEFAULT_ROOT),
            detach_on_exit: false,
            control_socket: PathBuf::from(crate::control::DEFAULT_SOCKET),
            state_file: PathBuf::from(crate::state::DEFAULT_STATE_FILE),
        }
    }
}

/// Describes what a configuration enforces, one line per port.
pub fn describe(cfg: &Config) -> Vec<String> {
    let mut lines = Vec::new();
    for p in &cfg.ports {
        let conc = match p.max_connections {
            Some(n) => format!(
                "at most {n} concurrent connections (then {})",
                p.connection_action
            ),
            None => "no concurrency limit".into(),
        };
        let rate = match p.new_connections {
            Some(r) => format!(
                "at most {} new connections per {} (then {})",
                r.count,
                humantime::format_duration(r.window),
                p.rate_action
            ),
            None => "no rate limit".into(),
        };
        let cookies = match p.syn_cookies {
            crate::config::CookieMode::Off => String::new(),
            crate::config::CookieMode::On => "; SYN cookies on".into(),
            crate::config::CookieMode::Auto => format!(
                "; SYN cookies above {} half-open attempts",
                p.syn_cookie_threshold
            ),
        };
        lines.push(format!(
            "port {}: per source (IPv4 /{}, IPv6 /{}): {conc}; {rate}{cookies}",
            p.port, cfg.ipv4_prefix, cfg.ipv6_prefix
        ));
    }
    let cidrs = |l: &[ipnet::IpNet]| {
        l.iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !cfg.allow.is_empty() {
        lines.push(format!("never limited (allow): {}", cidrs(&cfg.allow)));
    }
    if !cfg.deny.is_empty() {
        lines.push(format!("always dropped (deny): {}", cidrs(&cfg.deny)));
    }
    if !cfg.ban_duration.is_zero() {
        lines.push(format!(
            "a source over a port's new_connections is banned from it for {}",
            humantime::format_duration(cfg.ban_duration)
        ));
    }
    if cfg.monitor {
        lines.push("monitor mode: nothing is refused, would-be refusals are counted".into());
    }
    lines
}

/// Loads (adopting what a previous daemon pinned), attaches and enforces `cfg` until SIGINT or
/// SIGTERM; then leaves it pinned, or removes everything with `opts.detach_on_exit`.
pub async fn run(
    file: Config,
    config_path: Option<PathBuf>,
    opts: RunOptions,
) -> anyhow::Result<()> {
    check_privileges()?;
    // Before anything is loaded: a SIGTERM or SIGINT during the start-up (the daemon logs
    // "enforcing on" before its main loop) is then taken by the main loop once the start is
    // complete, instead of killing the process half-way with the default action.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let state_file = opts.state_file.clone();
    let overrides = Overrides::load(&state_file)?;
    let cfg = state::effective(&file, &overrides).map_err(|e| {
        anyhow::anyhow!(
            "{e}\n(the runtime changes in {} do not fit this config file: fix the file, or \
             remove the state file to drop every runtime change)",
            state_file.display()
        )
    })?;
    if overrides != Overrides::default() {
        info!(
            "runtime changes from {} are laid over the config file",
            state_file.display()
        );
    }
    // Every interface is looked up before anything is loaded: a missing one is refused with
    // nothing attached or pinned (after waiting for it, at boot).
    let Some(interfaces) = await_interfaces(&cfg, &mut term, &mut int).await? else {
        info!("stopped while waiting for the interfaces; nothing was loaded");
        return Ok(());
    };
    // Bound first: a taken address fails before anything is loaded or attached.
    let metrics_listener = match cfg.metrics.listen_addr().map_err(anyhow::Error::msg)? {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let control = control::server::bind(&opts.control_socket)?;
    let pins = PinDir::new(&opts.pin_root);
    // With nothing pinned before, a failed start removes whatever it pinned; with adopted
    // state, the previous daemon's pins keep enforcing.
    let fresh = !pins.has_state()
        && !pins
            .other_versions()
            .iter()
            .any(|d| d.join("links").exists());
    let root_existed = opts.pin_root.exists();
    // Before anything is loaded or replaced: one daemon per pin directory.
    let _lock = match crate::pin::lock(&opts.pin_root) {
        Ok(l) => l,
        Err(e) => {
            if !root_existed {
                let _ = std::fs::remove_dir(&opts.pin_root);
            }
            return Err(e);
        }
    };
    let mut cookies = crate::cookies::Controller::new(crate::cookies::Sysctls::new(
        opts.control_socket.with_file_name("syn-cookie-sysctls"),
    ));
    // Sysctls a daemon that died left set for SYN cookies: back to what they were first.
    if let Err(e) = cookies.recover() {
        warn!("restoring the sysctls a previous daemon set for SYN cookies: {e:#}");
    }
    let started = start(&cfg, &pins, &interfaces);
    let guard = match started {
        Ok(g) => g,
        Err(e) => {
            if fresh {
                remove_fresh_pins(&pins, root_existed);
            }
            return Err(e);
        }
    };
    let xdp_mode = cfg.xdp_mode;
    for line in describe(&cfg) {
        info!("{line}");
    }
    info!(
        "rate windows keep the last {} attempts of each source: new_connections counts up to \
         that can be set live (capacity.rate_attempts)",
        guard.rate_ring()
    );
    for a in guard.attachments() {
        info!("enforcing on {} ({} XDP)", a.interface, a.mode);
    }

    let events = Arc::new(crate::events::EventRing::default());
    // Shared with the metrics endpoint, which reads the maps when Prometheus scrapes.
    let shared = Arc::new(Mutex::new(Shared {
        guard,
        file,
        overrides,
        cfg: cfg.clone(),
        config_path: config_path.clone(),
        state_file,
        events: events.clone(),
    }));
    crate::events::start(&shared, events);
    let mut metrics_addr = None;
    let server = match metrics_listener {
        Some(listener) => {
            let addr = listener.local_addr().context("metrics endpoint address")?;
            metrics_addr = Some(addr);
            info!("serving Prometheus metrics on http://{addr}/metrics");
            let endpoint = metrics::Endpoint {
                guard: shared.clone(),
                top_sources: cfg.metrics.top_sources as usize,
            };
            Some(tokio::spawn(metrics::serve(listener, Arc::new(endpoint))))
        }
        None => {
            info!("metrics endpoint off");
            None
        }
    };

    info!(
        "control socket on {} (root only)",
        opts.control_socket.display()
    );
    let control = tokio::spawn(control::server::serve(control, shared.clone()));
    let mut tick = tokio::time::interval(cfg.sweep_interval);
    // A sweep that overran its interval is not followed by a burst of catch-up sweeps: those
    // would run back to back and starve the control socket and the metrics endpoint (same
    // thread) for seconds on a loaded host.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweeper = sweep::Sweeper::default();
    let mut unmatched = UnmatchedLog::default();
    let mut tx_drops = TxErrorWatch::default();
    let mut watch = InterfaceWatch::default();
    let mut refusals = crate::events::RefusalSampler::default();
    {
        // Ports with syn_cookies = "on" go into cookie mode before the daemon reports ready.
        let mut shared = lock(&shared);
        let (ports, timeout) = (shared.cfg.ports.clone(), shared.cfg.handshake_timeout);
        let none = Default::default();
        if let Err(e) = cookies.tick(&mut shared.guard, &ports, &none, &none, timeout) {
            warn!("SYN cookies: {e:#}; retried every sweep");
        }
    }
    // Enforcing on every interface, metrics listening, signal handlers installed: ready.
    notify::ready(&status_line(&lock(&shared), metrics_addr));
    // Pinged from this loop only, so a daemon stuck in a sweep or a scrape stops pinging and
    // systemd restarts it (WatchdogSec=).
    let mut watchdog = notify::watchdog_interval();
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM"); notify::stopping(); break; }
            _ = int.recv() => { info!("SIGINT"); notify::stopping(); break; }
            _ = hup.recv() => {
                notify::reloading();
                let mut shared = lock(&shared);
                reload(&mut shared);
                notify::ready(&status_line(&shared, metrics_addr));
            }
            _ = notify::next_ping(&mut watchdog) => notify::watchdog(),
            _ = tick.tick() => {
                let mut shared = lock(&shared);
                let handshake_timeout = shared.cfg.handshake_timeout;
                let guard = &mut shared.guard;
                watch.check(guard, xdp_mode);
                guard.flush_kernel_log();
                tx_drops.check(guard);
                if let Err(e) = guard.expire_bans() {
                    warn!("ending expired bans failed (retried next sweep): {e:#}");
                }
                let half_open = match sweeper.run(guard, handshake_timeout) {
                    Ok(r) => {
                        if r.expired + r.released + r.adopted + r.translated > 0 {
                            log::debug!("sweep: {r:?}");
                        }
                        unmatched.add(r.unmatched);
                        Some((r.half_open, r.cookies_lost))
                    }
                    Err(e) => {
                        warn!("sweep failed (accounting not checked this round): {e:#}");
                        None
                    }
                };
                // The host's TCP settings, kept current for the SYN-ACKs (read only where a
                // port may use cookies: a few /proc files).
                let cookies_configured = shared
                    .cfg
                    .ports
                    .iter()
                    .any(|p| p.syn_cookies != crate::config::CookieMode::Off);
                if cookies_configured
                    && let Err(e) = shared
                        .guard
                        .set_cookie_settings(crate::cookies::host_settings(&interfaces))
                {
                    warn!("updating the SYN-cookie settings: {e:#}");
                }
                if let Some((half_open, lost)) = half_open {
                    let ports = shared.cfg.ports.clone();
                    if let Err(e) = cookies.tick(&mut shared.guard, &ports, &half_open, &lost, handshake_timeout) {
                        warn!("SYN cookies: {e:#}; retried next sweep");
                    }
                }
                if let Err(e) = refusals.tick(&shared.guard, &shared.cfg.deny, &shared.events) {
                    log::debug!("sampling refusals for `ws-guard events`: {e:#}");
                }
            }
        }
    }
    if let Some(server) = server {
        server.abort();
    }
    control.abort();
    // The socket file goes with the task (dropped once the abort is seen).
    let _ = control.await;
    let mut shared = lock(&shared);
    let guard = &mut shared.guard;
    if let Err(e) = cookies.shutdown(guard) {
        warn!("leaving SYN-cookie mode at exit: {e:#}");
    }
    if opts.detach_on_exit {
        let removed = guard.teardown()?;
        info!(
            "detached and removed {} pins under {}",
            removed.len(),
            opts.pin_root.display()
        );
    } else if guard.links_pinned() {
        guard.keep_pinned();
        info!(
            "exiting; programs, links and maps stay pinned in {} and keep enforcing (the \
             sweep pauses until the next start); `ws-guard teardown` removes them",
            pins.dir().display()
        );
    } else {
        // `ws-guard teardown` ran while this daemon was up: its links are gone.
        info!(
            "exiting; the pinned XDP links under {} were removed while running (ws-guard \
             teardown?): nothing stays attached or enforcing",
            pins.dir().display()
        );
    }
    Ok(())
}

/// The one-line STATUS= for systemd: where it enforces, how many ports, where metrics are.
fn status_line(shared: &Shared, metrics: Option<std::net::SocketAddr>) -> String {
    let cfg = &shared.cfg;
    let on: Vec<String> = shared
        .guard
        .attachments()
        .iter()
        .map(|a| format!("{} ({} XDP)", a.interface, a.mode))
        .collect();
    let metrics = match metrics {
        Some(addr) => format!("metrics on {addr}"),
        None => "metrics off".into(),
    };
    format!(
        "enforcing on {}; {} protected port(s){}; {metrics}",
        on.join(", "),
        cfg.ports.len(),
        if cfg.monitor { " in monitor mode" } else { "" }
    )
}

/// systemd's notification protocol (sd_notify(3), `Type=notify`). Every call is a no-op when
/// `NOTIFY_SOCKET` is unset, i.e. when not started by systemd; a failed send is logged and
/// otherwise ignored (enforcement does not depend on it).
mod notify {
    use std::time::Duration;

    use log::{debug, warn};
    use sd_notify::NotifyState;

    fn send(what: &str, states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(states) {
            warn!("sd_notify {what}: {e}");
        }
    }

    /// READY=1 with a STATUS= summary: start-up (or a reload) is complete.
    pub fn ready(status: &str) {
        send("READY", &[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// RELOADING=1 before a SIGHUP reload (with the MONOTONIC_USEC= that systemd 253 and
    /// later require for `Type=notify-reload`); [`ready`] ends it.
    pub fn reloading() {
        let mut states = vec![NotifyState::Reloading, NotifyState::Status("reloading")];
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        send("RELOADING", &states);
    }

    /// EXTEND_TIMEOUT_USEC=: the start takes longer (waiting for the network), by `by`.
    pub fn extend_start(by: Duration) {
        let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
        send(
            "EXTEND_TIMEOUT_USEC",
            &[NotifyState::ExtendTimeoutUsec(usec)],
        );
    }

    /// STOPPING=1 on SIGTERM or SIGINT.
    pub fn stopping() {
        send("STOPPING", &[NotifyState::Stopping]);
    }

    /// WATCHDOG=1: the main loop is alive.
    pub fn watchdog() {
        if let Err(e) = sd_notify::notify(&[NotifyState::Watchdog]) {
            debug!("sd_notify WATCHDOG: {e}");
        }
    }

    /// With a watchdog (WATCHDOG_USEC=, and WATCHDOG_PID= unset or this process), a timer at
    /// half its interval, as sd_watchdog_enabled(3) recommends.
    pub fn watchdog_interval() -> Option<tokio::time::Interval> {
        let usec = sd_notify::watchdog_enabled()?;
        let period = (usec / 2).max(Duration::from_millis(1));
        let mut i = tokio::time::interval(period);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Some(i)
    }

    /// The next watchdog tick; never, without a watchdog.
    pub async fn next_ping(interval: &mut Option<tokio::time::Interval>) {
        match interval {
            Some(i) => {
                i.tick().await;
            }
            None => std::future::pending().await,
        }
    }
}

/// The interfaces to attach to: the configured ones, or the default route's. At boot the
/// network may come up after the daemon: waits for them up to `wait_for_interfaces`, saying so
/// every 5 s and extending systemd's start timeout meanwhile; a SIGTERM or SIGINT ends the wait
/// (`None`).
async fn await_interfaces(
    cfg: &Config,
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<Option<Vec<String>>> {
    let start = std::time::Instant::now();
    let mut said = None::<std::time::Instant>;
    loop {
        let missing = match resolve_interfaces(cfg) {
            Ok(found) => return Ok(Some(found)),
            Err(e) => e,
        };
        let waited = start.elapsed();
        if waited >= cfg.wait_for_interfaces {
            let tried = if cfg.wait_for_interfaces.is_zero() {
                String::new()
            } else {
                format!(
                    " after waiting {}",
                    humantime::format_duration(round_s(waited))
                )
            };
            bail!("{missing}{tried}; nothing was attached");
        }
        if said.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(5)) {
            info!(
                "{missing}: waiting for it (at most {}, wait_for_interfaces)",
                humantime::format_duration(cfg.wait_for_interfaces.saturating_sub(round_s(waited)))
            );
            notify::extend_start(std::time::Duration::from_secs(10));
            said = Some(std::time::Instant::now());
        }
        tokio::select! {
            _ = term.recv() => return Ok(None),
            _ = int.recv() => return Ok(None),
            _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
        }
    }
}

fn round_s(d: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_secs(d.as_secs())
}

/// The interfaces to attach to, if they all exist now; else what is missing.
fn resolve_interfaces(cfg: &Config) -> Result<Vec<String>, String> {
    let interfaces = if cfg.interfaces.is_empty() {
        vec![interfaces::default_route_interface().map_err(|e| format!("{e:#}"))?]
    } else {
        cfg.interfaces.clone()
    };
    for interface in &interfaces {
        if guard::ifindex(interface).is_none() {
            return Err(format!(
                "interface {interface} (in `interfaces`) does not exist in this network \
                 namespace"
            ));
        }
    }
    Ok(interfaces)
}

/// Refuses to start without the privileges loading and attaching need, with an error that says
/// so (instead of the first failing syscall's `Permission denied`).
fn check_privileges() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return Ok(());
    }
    let eff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    let missing = missing_capabilities(eff);
    if !missing.is_empty() {
        bail!(
            "ws-guard run needs root, or the capabilities CAP_BPF, CAP_NET_ADMIN and \
             CAP_PERFMON (CAP_SYS_ADMIN stands for CAP_BPF and CAP_PERFMON): it runs as uid \
             {euid} without {} (effective capabilities {eff:#x}); nothing was loaded",
            missing.join(", ")
        );
    }
    Ok(())
}

/// The capabilities a start needs that the effective set `eff` (CapEff's bits) lacks: CAP_BPF
/// (bit 39) to load, CAP_NET_ADMIN (12) to attach XDP, CAP_PERFMON (38) to attach the
/// tracepoint; CAP_SYS_ADMIN (21) covers CAP_BPF and CAP_PERFMON.
fn missing_capabilities(eff: u64) -> Vec<&'static str> {
    let has = |bit: u32| eff & (1u64 << bit) != 0;
    let admin = has(21);
    let mut missing = Vec::new();
    if !(has(39) || admin) {
        missing.push("CAP_BPF");
    }
    if !has(12) {
        missing.push("CAP_NET_ADMIN");
    }
    if !(has(38) || admin) {
        missing.push("CAP_PERFMON");
    }
    missing
}

/// After a failed start with nothing pinned before: removes what this start pinned, so a
/// failure never leaves programs attached or pinned.
fn remove_fresh_pins(pins: &PinDir, root_existed: bool) {
    let dir = pins.dir();
    if dir.exists() {
        match crate::pin::remove_version_dir(&dir) {
            Ok(removed) => info!(
                "start-up failed: removed the {} pins it made under {}",
                removed.len(),
                dir.display()
            ),
            Err(e) => error!("start-up failed, and removing {}: {e:#}", dir.display()),
        }
    }
    if !root_existed {
        let _ = std::fs::remove_dir(pins.root());
    }
}

/// Follows the configured interfaces while running: when one is deleted (the kernel detaches
/// the XDP link with it) says so once; when an interface of that name exists again, attaches
/// to it again.
#[derive(Default)]
struct InterfaceWatch {
    /// Interfaces known to be gone (warned once).
    gone: BTreeSet<String>,
    /// Re-attach failures already logged, by interface and index.
    failed: BTreeSet<(String, u32)>,
}

impl InterfaceWatch {
    fn check(&mut self, guard: &mut Guard, mode: XdpMode) {
        let lost: Vec<String> = guard
            .attachments()
            .iter()
            .filter(|a| !a.interface_present())
            .map(|a| a.interface.clone())
            .collect();
        for interface in lost {
            let Some(index) = guard::ifindex(&interface) else {
                if self.gone.insert(interface.clone()) {
                    warn!("{interface} is gone; XDP will be re-attached when it comes back");
                }
                continue;
            };
            match guard.reattach_xdp(&interface, mode) {
                Ok(m) => {
                    self.gone.remove(&interface);
                    self.failed.retain(|(i, _)| *i != interface);
                    info!("{interface} is back (index {index}): re-attached ({m} XDP), enforcing");
                }
                Err(e) => {
                    if self.failed.insert((interface.clone(), index)) {
                        error!(
                            "{interface} is back (index {index}) but re-attaching failed; \
                             retrying every sweep: {e:#}"
                        );
                    }
                }
            }
        }
    }
}

/// Loads (adopting pinned state), applies `cfg`, attaches the tracepoint and the XDP program to
/// every interface; on failure, detaches from the interfaces attached so far.
fn start(cfg: &Config, pins: &PinDir, interfaces: &[String]) -> anyhow::Result<Guard> {
    let mut guard = Guard::load_pinned(&LoadOptions::from_config(cfg), pins.clone())?;
    if guard.adopted() {
        let conns = guard.connections()?;
        info!(
            "adopted the pinned state in {}: {} connections held by {} sources ({} half-open, \
             {} established)",
            pins.dir().display(),
            conns.values().map(|v| *v as u64).sum::<u64>(),
            conns.len(),
            guard.pending()?.len(),
            guard.owned()?.len()
        );
        for (name, want) in [
            (ws_guard_common::names::MAP_SOURCES, cfg.capacity.sources),
            (ws_guard_common::names::MAP_FLOWS, cfg.capacity.flows),
            (ws_guard_common::names::MAP_BANS, cfg.capacity.bans),
            (ws_guard_common::names::MAP_ALLOW, cfg.capacity.cidrs),
        ] {
            let have = guard.capacity(name)?;
            if have != want {
                warn!(
                    "{name}: the adopted map holds {have} entries, the config asks {want}; a new \
                     capacity takes effect after `ws-guard teardown`"
                );
            }
        }
    } else {
        info!(
            "no pinned state in {}: starting empty",
            pins.dir().display()
        );
    }
    guard.set_cookie_settings(crate::cookies::host_settings(interfaces))?;
    // New limits apply to the adopted maps; counts and tracked connections stay.
    state::apply(&mut guard, cfg)?;
    guard.attach_tracepoint()?;
    if !guard.adopted() {
        // Before XDP sees a SYN: count the connections that already exist. (Adopted maps are
        // current: the pinned programs kept counting while no daemon ran.)
        let first = sweep::sweep_now(&mut guard, cfg.handshake_timeout)
            .context("counting existing connections")?;
        info!(
            "counted {} connections that existed before start-up",
            first.adopted
        );
    }

    for interface in interfaces {
        if let Err(e) = guard.attach_xdp(interface, cfg.xdp_mode) {
            // Never leave some interfaces protected and others not, except that links an
            // earlier daemon left enforcing keep enforcing.
            if let Err(d) = guard.undo_new_attachments() {
                error!("while undoing a failed attach: {d:#}");
            }
            return Err(e);
        }
    }
    // Before the older version's pins go: an upgrade lifts no ban. Not fatal: enforcing
    // without them beats not starting.
    if let Err(e) = guard.carry_over_bans() {
        warn!(
            "the bans of an older layout version were not carried over ({e:#}); they end with \
             this upgrade: `ws-guard bans add` sets them again"
        );
    }
    guard
        .remove_stale_pins()
        .context("removing pins this configuration does not use")?;
    Ok(guard)
}

/// The guard, also when a scrape panicked while holding it (the maps are still consistent:
/// scrapes only read them).
fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// SIGHUP: apply the file's limits and settings with the runtime changes laid over them, or
/// keep the running ones if either is invalid.
fn reload(shared: &mut Shared) {
    let Some(path) = shared.config_path.clone() else {
        warn!("SIGHUP ignored: running with the built-in default config, no file to reload");
        return;
    };
    let new_file = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            error!("reload refused, the running limits stay: {e}");
            return;
        }
    };
    // The state file too: an operator may have edited it while the daemon was stopped.
    let overrides = match Overrides::load(&shared.state_file) {
        Ok(o) => o,
        Err(e) => {
            error!("reload refused, the running limits stay: {e}");
            return;
        }
    };
    let new = match state::effective(&new_file, &overrides) {
        Ok(c) => c,
        Err(e) => {
            error!(
                "reload refused, the running limits stay: {e} (the runtime changes in {} do \
                 not fit the new config file; `ws-guard limits reset` or `allow|deny reset` \
                 drop single changes)",
                shared.state_file.display()
            );
            return;
        }
    };
    let cfg = &shared.cfg;
    if new.interfaces != cfg.interfaces
        || new.xdp_mode != cfg.xdp_mode
        || new.capacity != cfg.capacity
        || new.metrics != cfg.metrics
        || new.log_format != cfg.log_format
    {
        warn!(
            "interfaces, xdp_mode, capacity, [metrics] and log_format take effect on restart \
             only"
        );
    }
    // A list changed at runtime replaces the file's: an edit of the file's list is not in
    // force until `allow|deny reset`; say so rather than let it look applied.
    for (list, old, now) in [
        (ListName::Allow, &shared.file.allow, &new_file.allow),
        (ListName::Deny, &shared.file.deny, &new_file.deny),
    ] {
        if old != now && overrides.list_changed(list) {
            warn!(
                "reload: the config file's {list}list changed, but the {list}list changed at \
                 runtime (in {}) stays in force; `ws-guard {list} reset` puts the file's in force",
                shared.state_file.display()
            );
        }
    }
    let changes = cfg.changes(&new);
    match state::apply(&mut shared.guard, &new) {
        Ok(()) => {
            if changes.is_empty() {
                info!("reloaded {}: nothing changed", path.display());
            } else {
                info!("reloaded {}: {} change(s)", path.display(), changes.len());
            }
            for line in changes {
                info!("reload: {line}");
            }
            shared.file = new_file;
            shared.overrides = overrides;
            shared.cfg = new;
        }
        Err(e) => {
            error!("reload of {} failed while applying: {e:#}", path.display());
            if let Err(u) = state::apply(&mut shared.guard, &shared.cfg) {
                error!("restoring the previous limits failed too: {u:#}");
            }
        }
    }
}

/// Reports connections that match no admitted attempt at most once a minute, with their count
/// since the last report.
#[derive(Default)]
struct UnmatchedLog {
    unreported: u64,
    last: Option<std::time::Instant>,
}

impl UnmatchedLog {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(60);

    fn add(&mut self, n: u32) {
        self.unreported += u64::from(n);
        if self.unreported == 0 || self.last.is_some_and(|t| t.elapsed() < Self::EVERY) {
            return;
        }
        warn!(
            "{} connection(s) established in another network namespace match no attempt \
             ws-guard admitted: their client address was rewritten before the socket (SNAT, \
             masquerade, a proxy) or they did not pass an attached interface; per-source limits \
             cannot apply to them (docs/containers.md \"Deploying with containers\"; metric \
             ws_guard_unmatched_connections_total)",
            self.unreported
        );
        self.unreported = 0;
        self.last = Some(std::time::Instant::now());
    }
}

/// Says when an interface's driver drops frames the XDP program sends back with XDP_TX (the
/// RSTs of `reject`): counted as sent, they never reach the client, who times out instead of
/// being refused. At most once a minute per interface, with the count since the last report.
#[derive(Default)]
struct TxErrorWatch {
    /// Per interface: the driver's count when last read, and when it was last reported.
    seen: std::collections::HashMap<String, (u64, Option<std::time::Instant>)>,
}

impl TxErrorWatch {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(60);

    fn check(&mut self, guard: &Guard) {
        for a in guard.attachments() {
            let Some(now) = crate::interfaces::xdp_tx_errors(&a.interface) else {
                continue;
            };
            let (base, last) = self.seen.entry(a.interface.clone()).or_insert((now, None));
            // The interface was recreated (its counters restarted): a new base.
            if now < *base {
                *base = now;
            }
            if now == *base || last.is_some_and(|t| t.elapsed() < Self::EVERY) {
                continue;
            }
            warn!(
                "{}: its driver dropped {} frame(s) the XDP program sent back (the RSTs of \
                 `reject`): refused clients time out instead of being refused. On a veth in \
                 native mode the peer must run an XDP program; use xdp_mode = \"auto\" or \
                 \"generic\" (after `ws-guard teardown` if the link is pinned), or \"drop\" \
                 actions (metric ws_guard_xdp_tx_errors_total)",
                a.interface,
                now - *base
            );
            *base = now;
            *last = Some(std::time::Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_bits() {
        let bit = |b: u32| 1u64 << b;
        // The unit's set: CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON.
        assert!(missing_capabilities(bit(39) | bit(12) | bit(38)).is_empty());
        // CAP_SYS_ADMIN stands for CAP_BPF and CAP_PERFMON, not CAP_NET_ADMIN.
        assert!(missing_capabilities(bit(21) | bit(12)).is_empty());
        assert_eq!(missing_capabilities(bit(21)), ["CAP_NET_ADMIN"]);
        // CAP_PERFMON is bit 38 (bit 37 is CAP_AUDIT_READ).
        assert_eq!(
            missing_capabilities(bit(39) | bit(12) | bit(37)),
            ["CAP_PERFMON"]
        );
        assert_eq!(
            missing_capabilities(0),
            ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]
        );
    }
}
