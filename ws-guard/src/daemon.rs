//! `ws-guard run`: load (adopting pinned state), attach, keep the accounting in step, serve
//! metrics, reload on SIGHUP; on SIGINT/SIGTERM leave everything pinned and enforcing, or
//! remove it with `--detach-on-exit`.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
};

use anyhow::Context as _;
use log::{error, info, warn};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    config::Config,
    guard::{Guard, LoadOptions},
    interfaces, metrics,
    pin::PinDir,
    sweep,
};

/// How `ws-guard run` pins and exits.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The pin root on bpffs (the layout version's directory goes under it).
    pub pin_root: PathBuf,
    /// On SIGINT/SIGTERM, detach and remove every pin instead of leaving them enforcing.
    pub detach_on_exit: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            pin_root: PathBuf::from(crate::pin::DEFAULT_ROOT),
            detach_on_exit: false,
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
        lines.push(format!(
            "port {}: per source (IPv4 /{}, IPv6 /{}): {conc}; {rate}",
            p.port, cfg.ipv4_prefix, cfg.ipv6_prefix
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
    mut cfg: Config,
    config_path: Option<PathBuf>,
    opts: RunOptions,
) -> anyhow::Result<()> {
    // Bound first: a taken address fails before anything is loaded or attached.
    let metrics_listener = match cfg.metrics.listen_addr().map_err(anyhow::Error::msg)? {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let pins = PinDir::new(&opts.pin_root);
    let mut guard = Guard::load_pinned(&LoadOptions::from_config(&cfg), pins.clone())?;
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
            (ws_guard_common::names::MAP_CONNS, cfg.capacity.sources),
            (ws_guard_common::names::MAP_PENDING, cfg.capacity.flows),
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
    // New limits apply to the adopted maps; counts and tracked connections stay.
    guard.apply(&cfg)?;
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

    let interfaces = if cfg.interfaces.is_empty() {
        vec![interfaces::default_route_interface()?]
    } else {
        cfg.interfaces.clone()
    };
    for interface in &interfaces {
        if let Err(e) = guard.attach_xdp(interface, cfg.xdp_mode) {
            // Never leave some interfaces protected and others not.
            if let Err(d) = guard.detach_all() {
                error!("while undoing a failed attach: {d:#}");
            }
            return Err(e);
        }
    }
    guard
        .remove_stale_pins()
        .context("removing pins this configuration does not use")?;
    for line in describe(&cfg) {
        info!("{line}");
    }
    for a in guard.attachments() {
        info!("enforcing on {} ({} XDP)", a.interface, a.mode);
    }

    // Shared with the metrics endpoint, which reads the maps when Prometheus scrapes.
    let guard = Arc::new(Mutex::new(guard));
    let server = match metrics_listener {
        Some(listener) => {
            let addr = listener.local_addr().context("metrics endpoint address")?;
            info!("serving Prometheus metrics on http://{addr}/metrics");
            let endpoint = metrics::Endpoint {
                guard: guard.clone(),
                top_sources: cfg.metrics.top_sources as usize,
            };
            Some(tokio::spawn(metrics::serve(listener, Arc::new(endpoint))))
        }
        None => {
            info!("metrics endpoint off");
            None
        }
    };

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut tick = tokio::time::interval(cfg.sweep_interval);
    let mut sweeper = sweep::Sweeper::default();
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM"); break; }
            _ = int.recv() => { info!("SIGINT"); break; }
            _ = hup.recv() => reload(&mut lock(&guard), &mut cfg, config_path.as_deref()),
            _ = tick.tick() => {
                let mut guard = lock(&guard);
                guard.flush_kernel_log();
                match sweeper.run(&mut guard, cfg.handshake_timeout) {
                    Ok(r) if r.expired + r.released + r.adopted > 0 => log::debug!("sweep: {r:?}"),
                    Ok(_) => {}
                    Err(e) => warn!("sweep failed (accounting not checked this round): {e:#}"),
                }
            }
        }
    }
    if let Some(server) = server {
        server.abort();
    }
    let mut guard = lock(&guard);
    if opts.detach_on_exit {
        let removed = guard.teardown()?;
        info!(
            "detached and removed {} pins under {}",
            removed.len(),
            opts.pin_root.display()
        );
    } else {
        guard.keep_pinned();
        info!(
            "exiting; programs, links and maps stay pinned in {} and keep enforcing (the \
             sweep pauses until the next start); `ws-guard teardown` removes them",
            pins.dir().display()
        );
    }
    Ok(())
}

/// The guard, also when a scrape panicked while holding it (the maps are still consistent:
/// scrapes only read them).
fn lock(guard: &Mutex<Guard>) -> MutexGuard<'_, Guard> {
    guard.lock().unwrap_or_else(|p| p.into_inner())
}

/// SIGHUP: apply the file's limits and settings, or keep the running ones if it is invalid.
fn reload(guard: &mut Guard, cfg: &mut Config, path: Option<&std::path::Path>) {
    let Some(path) = path else {
        warn!("SIGHUP ignored: running with the built-in default config, no file to reload");
        return;
    };
    match Config::load(path) {
        Ok(new) => {
            if new.interfaces != cfg.interfaces
                || new.xdp_mode != cfg.xdp_mode
                || new.capacity != cfg.capacity
                || new.metrics != cfg.metrics
            {
                warn!("interfaces, xdp_mode, capacity and [metrics] take effect on restart only");
            }
            match guard.apply(&new) {
                Ok(()) => {
                    info!("reloaded {}", path.display());
                    for line in describe(&new) {
                        info!("{line}");
                    }
                    *cfg = new;
                }
                Err(e) => error!("reload of {} failed while applying: {e:#}", path.display()),
            }
        }
        Err(e) => error!("reload refused, the running limits stay: {e}"),
    }
}
