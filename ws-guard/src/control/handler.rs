//! What the daemon does with each control request.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

/// A manual ban without --duration, when ban_duration is 0.
pub const DEFAULT_MANUAL_BAN: Duration = Duration::from_secs(3600);

use log::{error, info};
use ws_guard_common::maps::{AF_INET6, Counter, SourceKey};

use super::protocol::{
    BanInfo, BansReply, ChangeReply, EventInfo, EventKind, InterfaceInfo, LimitsReply, ListName,
    ListReply, MapInfo, PortCounters, PortInfo, Request, Response, SortBy, SourceInfo,
    SourcesReply, StatusReply,
};
use crate::{
    config::Config,
    daemon::Shared,
    metrics,
    state::{self, Overrides},
};

/// Answers one request. Changes are whole or nothing: see [`change`].
pub fn handle(s: &mut Shared, req: Request) -> Response {
    match req {
        Request::Status => status(s),
        Request::LimitsGet { port } => limits_get(s, port),
        Request::LimitsSet { .. }
        | Request::LimitsReset { .. }
        | Request::Monitor { .. }
        | Request::ListAdd { .. }
        | Request::ListAddAll { .. }
        | Request::ListRemove { .. }
        | Request::ListReset { .. } => {
            let mut next = s.overrides.clone();
            match change_overrides(&req, &mut next, &s.file) {
                Some(Ok(what)) => commit(s, next, &what),
                Some(Err(e)) => Response::error(e),
                None => Response::error("not a change of the runtime settings"),
            }
        }
        Request::ListShow { list } => list_show(s, list),
        Request::ConfigShow { effective } => Response::ok(&serde_json::json!({
            "effective": effective,
            "toml": crate::config::to_toml(if effective { &s.cfg } else { &s.file }),
        })),
        Request::SourcesTop { by, n } => sources_top(s, by, n),
        Request::BansList => bans_list(s),
        Request::BanAdd {
            addr,
            port,
            duration_ms,
        } => ban_add(s, addr, port, duration_ms),
        Request::BanRemove { addr, port } => ban_remove(s, addr, port),
        Request::Events { since } => Response::ok(&s.events.since(since)),
    }
}

fn port_infos(s: &Shared, port: Option<u16>) -> Vec<PortInfo> {
    let mut ports: Vec<PortInfo> = s
        .cfg
        .ports
        .iter()
        .filter(|p| port.is_none_or(|q| p.port == q as u32))
        .map(|p| {
            let mut i = state::port_info(p);
            i.source = state::origin(&s.file, &s.overrides, i.port).into();
            i.syn_cookies_active = s.guard.cookie_status.get(&i.port).is_some_and(|c| c.active);
            i
        })
        .collect();
    ports.sort_by_key(|p| p.port);
    ports
}

fn limits_get(s: &Shared, port: Option<u16>) -> Response {
    let ports = port_infos(s, port);
    if let Some(p) = port
        && ports.is_empty()
    {
        return Response::error(format!("port {p} is not protected"));
    }
    Response::ok(&LimitsReply {
        monitor: s.cfg.monitor,
        ports,
    })
}

fn status(s: &Shared) -> Response {
    let snap = match metrics::snapshot(&s.guard, 0) {
        Ok(snap) => snap,
        Err(e) => return Response::error(format!("reading the kernel's state: {e:#}")),
    };
    let mut counters = Vec::new();
    for ((port, family), c) in &snap.stats.ports {
        let g = snap
            .gauges
            .get(&(*port, *family))
            .copied()
            .unwrap_or_default();
        counters.push(PortCounters {
            port: *port,
            family: if *family == AF_INET6 { "ipv6" } else { "ipv4" }.into(),
            tracked_sources: g.tracked_sources,
            active_connections: g.active_connections,
            half_open: g.half_open,
            established: g.established,
            counters: Counter::ALL
                .iter()
                .map(|k| (k.name().to_owned(), c[*k as usize]))
                .collect::<BTreeMap<_, _>>(),
        });
    }
    // Every map of the snapshot: the hash maps, the ban map and the CIDR tries.
    let maps: Vec<MapInfo> = snap
        .maps
        .iter()
        .map(|m| MapInfo {
            map: m.map.into(),
            entries: m.entries,
            capacity: m.capacity,
        })
        .collect();
    Response::ok(&StatusReply {
        version: snap.version,
        pid: std::process::id(),
        monitor: snap.monitor,
        config_file: s.config_path.as_ref().map(|p| p.display().to_string()),
        state_file: s.state_file.display().to_string(),
        interfaces: snap
            .attachments
            .iter()
            .map(|a| InterfaceInfo {
                interface: a.interface.clone(),
                mode: a.mode.into(),
                attached: a.attached,
            })
            .collect(),
        ports: port_infos(s, None),
        counters,
        maps,
        unmatched_connections: s.guard.unmatched_connections,
    })
}

/// What `req` changes in the runtime overrides `o` (over the config file `file`), made in
/// `o`: `Some(Ok(description))`, or `Some(Err(why))` when the request is refused as such (the
/// effective config is validated afterwards, by [`commit`]). `None`: `req` does not change the
/// overrides. Pure: the daemon and the `control` fuzz target run exactly this.
pub fn change_overrides(
    req: &Request,
    o: &mut Overrides,
    file: &Config,
) -> Option<Result<String, String>> {
    Some(match req {
        Request::LimitsSet { port, change } => {
            if *port == 0 {
                Err("port 0 is not a TCP port (1-65535)".to_owned())
            } else if change.is_empty() {
                Err(
                    "nothing to change: give --max-connections, --new-connections, --action, \
                     --connection-action, --rate-action or --syn-cookies"
                        .to_owned(),
                )
            } else {
                o.set_port(*port, change);
                Ok(format!("port {port}: limits set"))
            }
        }
        Request::LimitsReset { port } => {
            if o.reset_port(*port) {
                Ok(format!("port {port}: override dropped"))
            } else {
                Err(format!("port {port} has no runtime override to reset"))
            }
        }
        Request::Monitor { on } => {
            o.monitor = Some(*on);
            Ok(format!("monitor mode {}", if *on { "on" } else { "off" }))
        }
        Request::ListAdd { list, cidr } | Request::ListRemove { list, cidr } => {
            let add = matches!(req, Request::ListAdd { .. });
            crate::config::parse_cidr(cidr).and_then(|net| {
                let entries = match list {
                    ListName::Allow => &file.allow,
                    ListName::Deny => &file.deny,
                };
                if add {
                    o.list_add(*list, entries, net)?;
                } else {
                    o.list_remove(*list, entries, net)?;
                }
                Ok(format!(
                    "{net} {} the {list}list",
                    if add { "added to" } else { "removed from" }
                ))
            })
        }
        Request::ListReset { list } => {
            if o.list_reset(*list) {
                Ok(format!(
                    "the {list}list is the config file's again (runtime changes dropped)"
                ))
            } else {
                Err(format!("the {list}list has no runtime change to reset"))
            }
        }
        Request::ListAddAll { list, cidrs } => {
            let entries = match list {
                ListName::Allow => &file.allow,
                ListName::Deny => &file.deny,
            };
            let mut added = 0usize;
            for (i, cidr) in cidrs.iter().enumerate() {
                let r =
                    crate::config::parse_cidr(cidr).and_then(|net| o.list_add(*list, entries, net));
                if let Err(e) = r {
                    return Some(Err(format!("CIDR {} of {}: {e}", i + 1, cidrs.len())));
                }
                added += 1;
            }
            if added == 0 {
                Err("no CIDR given".to_owned())
            } else {
                Ok(format!("{added} CIDRs added to the {list}list"))
            }
        }
        _ => return None,
    })
}

/// Puts the overrides `next` in force: builds the effective config, validates it whole,
/// applies it, then persists it. Nothing changes when any step fails: a failed apply is
/// undone by applying the previous config, and so is a failed write of the state file.
fn commit(s: &mut Shared, next: Overrides, what: &str) -> Response {
    let cfg = match state::effective(&s.file, &next) {
        Ok(c) => c,
        Err(e) => return Response::error(format!("refused, nothing changed: {e}")),
    };
    if let Err(e) = state::apply(&mut s.guard, &cfg) {
        let undo = state::apply(&mut s.guard, &s.cfg);
        if let Err(u) = &undo {
            error!("undoing a failed runtime change also failed: {u:#}");
        }
        return Response::error(format!(
            "applying failed ({e:#}); {}",
            match undo {
                Ok(()) => "the previous settings are back in force".to_owned(),
                Err(u) => format!("restoring the previous settings failed too: {u:#}"),
            }
        ));
    }
    if let Err(e) = next.save(&s.state_file) {
        let undo = state::apply(&mut s.guard, &s.cfg);
        return Response::error(format!(
            "{e}; the change was not kept: {}",
            match undo {
                Ok(()) => "the previous settings are back in force".to_owned(),
                Err(u) => format!("restoring the previous settings failed too: {u:#}"),
            }
        ));
    }
    info!(
        "runtime change: {what} (kept in {})",
        s.state_file.display()
    );
    s.overrides = next;
    s.cfg = cfg;
    Response::ok(&ChangeReply {
        message: what.to_owned(),
        persisted: true,
    })
}

fn list_show(s: &Shared, list: ListName) -> Response {
    let entries = match list {
        ListName::Allow => &s.cfg.allow,
        ListName::Deny => &s.cfg.deny,
    };
    Response::ok(&ListReply {
        list,
        cidrs: entries.iter().map(|c| c.to_string()).collect(),
        source: if s.overrides.list_changed(list) {
            "runtime"
        } else {
            "config"
        }
        .into(),
    })
}

fn sources_top(s: &Shared, by: SortBy, n: usize) -> Response {
    let read = || -> anyhow::Result<Vec<SourceInfo>> {
        let global = s.guard.global()?;
        let mut by_key: BTreeMap<SourceKey, (u64, u64)> = BTreeMap::new();
        for (k, c) in s.guard.connections()? {
            if c != 0 {
                by_key.entry(k).or_default().0 = c as u64;
            }
        }
        for (k, d) in s.guard.source_refusals()? {
            by_key.entry(k).or_default().1 = d;
        }
        Ok(by_key
            .iter()
            .map(|(k, (c, d))| SourceInfo {
                source: metrics::source_label(k, &global),
                port: k.port,
                connections: *c,
                drops: *d,
            })
            .collect())
    };
    let mut sources = match read() {
        Ok(v) => v,
        Err(e) => return Response::error(format!("reading the sources: {e:#}")),
    };
    let key = |x: &SourceInfo| match by {
        SortBy::Connections => (x.connections, x.drops),
        SortBy::Drops => (x.drops, x.connections),
    };
    sources.retain(|x| key(x).0 != 0);
    sources.sort_by(|a, b| {
        key(b)
            .cmp(&key(a))
            .then_with(|| a.source.cmp(&b.source))
            .then(a.port.cmp(&b.port))
    });
    sources.truncate(n);
    Response::ok(&SourcesReply { by, sources })
}

fn bans_list(s: &Shared) -> Response {
    let read = || -> anyhow::Result<Vec<BanInfo>> {
        let global = s.guard.global()?;
        let mut bans: Vec<BanInfo> = s
            .guard
            .bans()?
            .iter()
            .map(|b| BanInfo {
                source: metrics::source_label(&b.source, &global),
                port: b.source.port,
                remaining_ms: b.remaining.as_millis() as u64,
                reason: b.reason.name().into(),
            })
            .collect();
        bans.sort_by(|a, b| (&a.source, a.port).cmp(&(&b.source, b.port)));
        Ok(bans)
    };
    match read() {
        Ok(bans) => Response::ok(&BansReply { bans }),
        Err(e) => Response::error(format!("reading the bans: {e:#}")),
    }
}

/// The ports a ban command covers: `port` if protected, else every protected port.
fn ban_ports(s: &Shared, port: Option<u16>) -> Result<Vec<u16>, String> {
    let protected: Vec<u16> = s.cfg.ports.iter().map(|p| p.port as u16).collect();
    match port {
        Some(p) if protected.contains(&p) => Ok(vec![p]),
        Some(p) => Err(format!(
            "port {p} is not protected (protected: {})",
            protected
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )),
        None => Ok(protected),
    }
}

fn ban_add(s: &mut Shared, addr: IpAddr, port: Option<u16>, ms: Option<u64>) -> Response {
    let ports = match ban_ports(s, port) {
        Ok(p) => p,
        Err(e) => return Response::error(e),
    };
    let duration = match ms {
        Some(ms) => Duration::from_millis(ms),
        None if s.cfg.ban_duration.is_zero() => DEFAULT_MANUAL_BAN,
        None => s.cfg.ban_duration,
    };
    // The socket is an interface of its own: what the CLI checks is checked again here.
    if let Err(e) = crate::bans::check_ban_duration(duration) {
        return Response::error(e);
    }
    let mut done = Vec::new();
    let mut label = String::new();
    for p in &ports {
        let r = s.guard.source_key(addr, *p).and_then(|k| {
            label = metrics::source_label(&k, &s.guard.global()?);
            s.guard.ban(k, duration).map(|()| k)
        });
        match r {
            Ok(k) => done.push(k),
            Err(e) => {
                // Whole or nothing: lift the bans this request added.
                for k in &done {
                    let _ = s.guard.unban(k);
                }
                return Response::error(format!("banning {addr} on port {p}: {e:#}"));
            }
        }
    }
    // For `ws-guard events` (a ban made here does not go through the kernel's ring buffer).
    if let Ok(global) = s.guard.global() {
        for k in &done {
            let mut e = EventInfo::new(EventKind::BanStarted);
            e.source = Some(metrics::source_label(k, &global));
            e.port = Some(k.port);
            e.reason = Some("manual".into());
            e.duration_ms = Some(duration.as_millis() as u64);
            s.events.record(e);
        }
    }
    let what = format!(
        "{label} banned for {} on {}",
        humantime::format_duration(duration),
        ports_phrase(&ports)
    );
    info!("control: {what}");
    Response::ok(&ChangeReply {
        message: what,
        persisted: false,
    })
}

/// "port 9000" or "ports 9000, 9001".
fn ports_phrase(ports: &[u16]) -> String {
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        "port{} {}",
        if ports.len() == 1 { "" } else { "s" },
        list.join(", ")
    )
}

fn ban_remove(s: &mut Shared, addr: IpAddr, port: Option<u16>) -> Response {
    let run = |s: &mut Shared| -> anyhow::Result<Vec<u16>> {
        // Every port the address has a ban on (also ports no longer protected), or just `port`.
        let ports: Vec<u16> = match port {
            Some(p) => vec![p],
            None => {
                let mut ps: Vec<u16> = s.guard.bans()?.iter().map(|b| b.source.port).collect();
                ps.sort();
                ps.dedup();
                ps
            }
        };
        let mut lifted = Vec::new();
        for p in ports {
            let k = s.guard.source_key(addr, p)?;
            if s.guard.unban(&k)? {
                lifted.push(p);
            }
        }
        Ok(lifted)
    };
    match run(s) {
        Ok(lifted) if lifted.is_empty() => Response::error(match port {
            Some(p) => format!("{addr} is not banned on port {p}"),
            None => format!("{addr} is not banned"),
        }),
        Ok(lifted) => {
            if let Ok(global) = s.guard.global() {
                for p in &lifted {
                    if let Ok(k) = s.guard.source_key(addr, *p) {
                        let mut e = EventInfo::new(EventKind::BanEnded);
                        e.source = Some(metrics::source_label(&k, &global));
                        e.port = Some(*p);
                        e.reason = Some("lifted".into());
                        s.events.record(e);
                    }
                }
            }
            let what = format!("ban of {addr} lifted on {}", ports_phrase(&lifted));
            info!("control: {what}");
            Response::ok(&ChangeReply {
                message: what,
                persisted: false,
            })
        }
        Err(e) => Response::error(format!("lifting the ban of {addr}: {e:#}")),
    }
}
