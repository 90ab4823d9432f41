//! SYN-cookie mode, the daemon's half (the kernel's is `ws-guard-ebpf/src/cookie.rs`):
//!
//! - the host's TCP settings the XDP program's SYN-ACKs must match ([`host_settings`]);
//! - the two sysctls the kernel needs while a port is in cookie mode ([`Sysctls`]):
//!   `net.ipv4.tcp_syncookies = 2`, so `bpf_tcp_gen_syncookie` issues cookies for a listener
//!   whose queue is not full, and `net.ipv4.tcp_timestamps = 2` (timestamps without the random
//!   per-connection offset), so the options the SYN-ACK's timestamp carries decode at the ACK;
//!   set when the first port goes into cookie mode, restored [`LINGER`] after the last leaves;
//! - `syn_cookies = "auto"`: on while a port's half-open attempts reach its threshold, off once
//!   the flood is under half of it for [`COOLDOWN`] ([`Controller`]).

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use log::{info, warn};
use ws_guard_common::maps::{
    AF_INET, AF_INET6, COOKIE_SACK, COOKIE_TIMESTAMPS, COOKIE_WSCALE, CookieSettings, Counter,
    PortConfig,
};

use crate::{
    config::{CookieMode, PortLimits},
    guard::Guard,
};

/// How long a port in `auto` mode stays in cookie mode after its load fell under half its
/// threshold.
pub const COOLDOWN: Duration = Duration::from_secs(10);
/// How long the sysctls stay set after the last port left cookie mode: the ACKs of the last
/// cookies sent still decode (a client answers within its RTT).
pub const LINGER: Duration = Duration::from_secs(5);

const SYSCTL_DIR: &str = "/proc/sys/net/ipv4";
const SYNCOOKIES: &str = "tcp_syncookies";
const TIMESTAMPS: &str = "tcp_timestamps";

fn read_number(path: &Path) -> anyhow::Result<i64> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .with_context(|| format!("{}: {text:?} is not a number", path.display()))
}

/// The settings of the cookie SYN-ACKs for a host whose interfaces are `interfaces`: the
/// smallest MTU gives the MSS offered, the sysctls what is offered and the window scale, as the
/// kernel's `tcp_select_initial_window` computes it for a listener without SO_RCVBUF.
pub fn host_settings(interfaces: &[String]) -> CookieSettings {
    host_settings_at(
        Path::new("/proc/sys"),
        Path::new("/sys/class/net"),
        interfaces,
    )
}

fn host_settings_at(proc_sys: &Path, class_net: &Path, interfaces: &[String]) -> CookieSettings {
    let ipv4 = proc_sys.join("net/ipv4");
    let on = |name: &str| read_number(&ipv4.join(name)).map_or(true, |v| v != 0);
    let mtu = interfaces
        .iter()
        .filter_map(|i| read_number(&class_net.join(i).join("mtu")).ok())
        .filter(|m| (576..=65_535).contains(m))
        .min()
        .unwrap_or(1500) as u16;
    let rmem_max = |p: &Path, field: usize| -> u64 {
        fs::read_to_string(p)
            .ok()
            .and_then(|t| t.split_whitespace().nth(field)?.parse().ok())
            .unwrap_or(0)
    };
    let space = rmem_max(&ipv4.join("tcp_rmem"), 2)
        .max(rmem_max(&proc_sys.join("net/core/rmem_max"), 0))
        .clamp(1, 65_535 << 14);
    let wscale = (space.ilog2() as i64 - 15).clamp(0, 14) as u8;
    let mut flags = 0;
    if on("tcp_sack") {
        flags |= COOKIE_SACK;
    }
    if on(TIMESTAMPS) {
        flags |= COOKIE_TIMESTAMPS;
    }
    if on("tcp_window_scaling") {
        flags |= COOKIE_WSCALE;
    }
    CookieSettings {
        mss4: mtu - 40,
        mss6: mtu - 60,
        wscale,
        flags,
        _pad: 0,
    }
}

/// The sysctls cookie mode needs, and what they were before the daemon set them. The values
/// found are kept in a file (under /run) so a daemon that died with them set restores them at
/// its next start.
#[derive(Debug)]
pub struct Sysctls {
    dir: PathBuf,
    saved_file: PathBuf,
    /// (tcp_syncookies, tcp_timestamps) as found, while set.
    saved: Option<(i64, i64)>,
}

impl Sysctls {
    /// The sysctls of the daemon's network namespace; the values found are kept in
    /// `saved_file`.
    pub fn new(saved_file: PathBuf) -> Self {
        Self::at(PathBuf::from(SYSCTL_DIR), saved_file)
    }

    fn at(dir: PathBuf, saved_file: PathBuf) -> Self {
        Self {
            dir,
            saved_file,
            saved: None,
        }
    }

    /// Whether the daemon has them set.
    pub fn set(&self) -> bool {
        self.saved.is_some()
    }

    /// A previous daemon's values left in the file (it died with them set): put back.
    pub fn recover(&mut self) -> anyhow::Result<()> {
        let Ok(text) = fs::read_to_string(&self.saved_file) else {
            return Ok(());
        };
        let mut values = text
            .split_whitespace()
            .filter_map(|w| w.parse::<i64>().ok());
        if let (Some(c), Some(t)) = (values.next(), values.next()) {
            self.saved = Some((c, t));
            self.restore()?;
            info!(
                "restored net.ipv4.{SYNCOOKIES} = {c} and net.ipv4.{TIMESTAMPS} = {t}, left set \
                 for SYN cookies by a daemon that did not exit cleanly"
            );
        }
        let _ = fs::remove_file(&self.saved_file);
        Ok(())
    }

    /// Sets them for cookie mode (the values found are kept first).
    pub fn engage(&mut self) -> anyhow::Result<()> {
        if self.saved.is_some() {
            return Ok(());
        }
        let cookies = read_number(&self.dir.join(SYNCOOKIES))?;
        let stamps = read_number(&self.dir.join(TIMESTAMPS))?;
        if let Some(parent) = self.saved_file.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        fs::write(&self.saved_file, format!("{cookies} {stamps}\n"))
            .with_context(|| format!("writing {}", self.saved_file.display()))?;
        // 0 stays 0 (no timestamps: the cookies then carry neither window scale nor SACK, as
        // the kernel's own do); 1 becomes 2: the same timestamps without the random offset.
        let set = self.write(SYNCOOKIES, 2).and_then(|()| {
            if stamps == 1 {
                self.write(TIMESTAMPS, 2)
            } else {
                Ok(())
            }
        });
        if let Err(e) = set {
            // Nothing half-set is left behind, and the next attempt starts from scratch.
            let _ = self.write(SYNCOOKIES, cookies);
            let _ = fs::remove_file(&self.saved_file);
            return Err(e.context(
                "SYN cookies need to set net.ipv4.tcp_syncookies and tcp_timestamps (a \
                 read-only /proc/sys, e.g. systemd's ProtectKernelTunables=yes, prevents it: see \
                 docs/operations.md, \"SYN cookies\")",
            ));
        }
        self.saved = Some((cookies, stamps));
        info!(
            "SYN cookies: net.ipv4.{SYNCOOKIES} {cookies} -> 2{}",
            if stamps == 1 {
                format!(", net.ipv4.{TIMESTAMPS} 1 -> 2")
            } else {
                String::new()
            }
        );
        Ok(())
    }

    /// Puts back the values found, unless an operator changed them meanwhile.
    pub fn restore(&mut self) -> anyhow::Result<()> {
        let Some((cookies, stamps)) = self.saved.take() else {
            return Ok(());
        };
        for (name, ours, theirs) in [(SYNCOOKIES, 2, cookies), (TIMESTAMPS, 2, stamps)] {
            let now = read_number(&self.dir.join(name))?;
            if now == ours && theirs != ours {
                self.write(name, theirs)?;
            } else if now != theirs {
                warn!(
                    "net.ipv4.{name} is {now}, changed while SYN cookies were on: left as it is \
                     (it was {theirs} before)"
                );
            }
        }
        let _ = fs::remove_file(&self.saved_file);
        info!(
            "SYN cookies off: net.ipv4.{SYNCOOKIES} = {cookies}, net.ipv4.{TIMESTAMPS} = {stamps} again"
        );
        Ok(())
    }

    fn write(&self, name: &str, value: i64) -> anyhow::Result<()> {
        let path = self.dir.join(name);
        fs::write(&path, format!("{value}\n"))
            .with_context(|| format!("setting {} to {value}", path.display()))
    }
}

/// What `auto` decides for one port from one round's measurements.
#[derive(Clone, Debug, PartialEq)]
pub struct AutoState {
    engaged: bool,
    /// Since when the load has been under half the threshold (while engaged).
    calm_since: Option<Instant>,
}

/// `auto`: `load` is the port's half-open attempts, plus, while cookies are on, the cookies of
/// the last handshake timeout that no valid ACK answered (what would be half-open without
/// them). On at `threshold`; off after [`COOLDOWN`] under half of it. Returns the change.
pub fn decide(state: &mut AutoState, load: u64, threshold: u32, now: Instant) -> Option<bool> {
    let threshold = u64::from(threshold.max(1));
    if !state.engaged {
        if load >= threshold {
            state.engaged = true;
            state.calm_since = None;
            return Some(true);
        }
        return None;
    }
    if load * 2 >= threshold {
        state.calm_since = None;
        return None;
    }
    let since = *state.calm_since.get_or_insert(now);
    if now.duration_since(since) >= COOLDOWN {
        state.engaged = false;
        state.calm_since = None;
        return Some(false);
    }
    None
}

/// Whether connections admitted through a cookie fail to reach a socket too often to go on:
/// three at least, and at least half of those admitted since cookie mode went on.
pub fn lost_too_often(lost: u64, admitted: u64) -> bool {
    lost >= 3 && lost * 2 >= admitted
}

/// One port's cookie mode, for status and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortCookies {
    pub mode: CookieMode,
    /// In cookie mode now.
    pub active: bool,
    /// Times cookie mode went on, and off.
    pub turned_on: u64,
    pub turned_off: u64,
}

#[derive(Debug)]
struct Port {
    /// Cookie mode is off for this port until the daemon restarts: its cookie connections did
    /// not reach a socket (see [`lost_too_often`]).
    faulted: bool,
    /// Since cookie mode last went on: valid cookie ACKs at that moment, and connections
    /// admitted through a cookie that never got a socket.
    valid_at_on: u64,
    lost: u64,
    auto: AutoState,
    /// Cookies sent and valid cookie ACKs at the last round, and when.
    last: Option<(u64, u64, Instant)>,
    /// Unanswered cookies per round, over the last handshake timeout.
    unanswered: Vec<(Instant, u64)>,
}

/// Switches the ports' cookie mode: `on` at once, `auto` by [`decide`], `off` never; sets the
/// sysctls before the first port goes on and restores them [`LINGER`] after the last went off.
#[derive(Debug)]
pub struct Controller {
    sysctls: Sysctls,
    ports: BTreeMap<u16, Port>,
    /// When the last port left cookie mode (the sysctls are restored [`LINGER`] after).
    all_off_since: Option<Instant>,
    /// When the sysctls last failed to be set, logged (at most once a minute: it is tried
    /// again every round).
    warned_at: Option<Instant>,
}

impl Controller {
    pub fn new(sysctls: Sysctls) -> Self {
        Self {
            sysctls,
            ports: BTreeMap::new(),
            all_off_since: None,
            warned_at: None,
        }
    }

    /// One round: `half_open` is each port's half-open attempts, `lost` its connections
    /// admitted through a cookie that got no socket (the sweep's counts).
    pub fn tick(
        &mut self,
        guard: &mut Guard,
        limits: &[PortLimits],
        half_open: &BTreeMap<u16, u64>,
        lost: &BTreeMap<u16, u64>,
        handshake_timeout: Duration,
    ) -> anyhow::Result<()> {
        let now = Instant::now();
        let kernel: BTreeMap<u16, PortConfig> = guard.ports()?.into_iter().collect();
        let stats = guard.stats()?;
        self.ports
            .retain(|p, _| limits.iter().any(|l| l.port == u32::from(*p)));
        let mut status = BTreeMap::new();
        for l in limits {
            let number = l.port as u16;
            let Some(current) = kernel.get(&number).copied() else {
                continue;
            };
            let sent_valid = [AF_INET, AF_INET6]
                .iter()
                .filter_map(|f| stats.ports.get(&(number, *f)))
                .fold((0, 0), |(s, v), c| {
                    (
                        s + c[Counter::CookiesSent as usize],
                        v + c[Counter::CookieAcksValid as usize],
                    )
                });
            let port = self.ports.entry(number).or_insert_with(|| Port {
                faulted: false,
                valid_at_on: sent_valid.1,
                lost: 0,
                auto: AutoState {
                    engaged: current.syn_cookies != 0,
                    calm_since: None,
                },
                last: None,
                unanswered: Vec::new(),
            });
            // Cookies no valid ACK answered this round (the ACK of a cookie comes within an
            // RTT: rounds are longer).
            if let Some((s0, v0, _)) = port.last {
                let sent = sent_valid.0.saturating_sub(s0);
                let valid = sent_valid.1.saturating_sub(v0);
                port.unanswered.push((now, sent.saturating_sub(valid)));
            }
            port.last = Some((sent_valid.0, sent_valid.1, now));
            port.unanswered
                .retain(|(t, _)| now.duration_since(*t) <= handshake_timeout);
            let waiting: u64 = port.unanswered.iter().map(|(_, n)| n).sum();
            let load = half_open.get(&number).copied().unwrap_or(0) + waiting;
            port.lost += lost.get(&number).copied().unwrap_or(0);
            if !port.faulted
                && current.syn_cookies != 0
                && lost_too_often(port.lost, sent_valid.1.saturating_sub(port.valid_at_on))
            {
                port.faulted = true;
                log::error!(
                    "port {number}: SYN cookies off until the daemon restarts: {} of the \
                     connections admitted through a cookie never reached a socket; the port's \
                     connections are most likely DNAT'd into another network namespace (a \
                     container's published port, with a listener such as docker-proxy in this \
                     one), where the kernel does not accept a cookie issued here. Use \
                     syn_cookies = \"off\" for such ports (docs/containers.md)",
                    port.lost
                );
            }
            let want = match l.syn_cookies {
                _ if port.faulted => false,
                CookieMode::Off => false,
                CookieMode::On => true,
                CookieMode::Auto => {
                    port.auto.engaged = current.syn_cookies != 0;
                    match decide(&mut port.auto, load, l.syn_cookie_threshold, now) {
                        Some(on) => {
                            if on {
                                warn!(
                                    "port {number}: SYN cookies on: {load} half-open attempts \
                                     (syn_cookie_threshold {}); new sources are judged at the \
                                     ACK of their cookie",
                                    l.syn_cookie_threshold
                                );
                            } else {
                                info!(
                                    "port {number}: SYN cookies off: about {load} unanswered \
                                     handshakes, under half of syn_cookie_threshold {} for {}s",
                                    l.syn_cookie_threshold,
                                    COOLDOWN.as_secs()
                                );
                            }
                            on
                        }
                        None => current.syn_cookies != 0,
                    }
                }
            };
            let mut s = guard
                .cookie_status
                .get(&number)
                .cloned()
                .unwrap_or_default();
            // Switched off since the last round by a reload or `limits set --syn-cookies off`
            // (Guard::apply turns "off" off at once): counted and said here.
            if s.active && current.syn_cookies == 0 && l.syn_cookies == CookieMode::Off {
                s.turned_off += 1;
                info!("port {number}: SYN cookies off (syn_cookies = \"off\")");
            }
            s.mode = l.syn_cookies;
            // Whenever a port is to be in cookie mode, the sysctls must be set: also for a port
            // adopted in it from a daemon that died (whose sysctls were restored at start).
            let want = if want && !self.sysctls.set() {
                match self.sysctls.engage() {
                    Ok(()) => true,
                    Err(e) => {
                        if self
                            .warned_at
                            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
                        {
                            self.warned_at = Some(now);
                            warn!(
                                "port {number}: SYN cookies stay off: {e:#}; new sources are \
                                 judged on their SYN (tried again every sweep)"
                            );
                        }
                        false
                    }
                }
            } else {
                want
            };
            if want != (current.syn_cookies != 0) {
                if want {
                    s.turned_on += 1;
                    port.valid_at_on = sent_valid.1;
                    port.lost = 0;
                } else {
                    s.turned_off += 1;
                }
                guard.set_port(
                    number,
                    PortConfig {
                        syn_cookies: want as u32,
                        ..current
                    },
                )?;
                if l.syn_cookies == CookieMode::On && want {
                    info!("port {number}: SYN cookies on (syn_cookies = \"on\")");
                } else if l.syn_cookies == CookieMode::Off && !want {
                    info!("port {number}: SYN cookies off (syn_cookies = \"off\")");
                }
            }
            s.active = want;
            status.insert(number, s);
        }
        guard.cookie_status = status;
        let any_on = guard.cookie_status.values().any(|s| s.active);
        if any_on {
            self.all_off_since = None;
        } else if self.sysctls.set() {
            let since = *self.all_off_since.get_or_insert(now);
            if now.duration_since(since) >= LINGER {
                self.sysctls.restore()?;
                self.all_off_since = None;
            }
        }
        Ok(())
    }

    /// At exit: every port leaves cookie mode (the programs may stay pinned and enforce without
    /// a daemon, which could not restore the sysctls later), the ACKs of the last cookies get a
    /// moment to arrive, and the sysctls are restored.
    pub fn shutdown(&mut self, guard: &mut Guard) -> anyhow::Result<()> {
        let mut any = false;
        for (number, current) in guard.ports()? {
            if current.syn_cookies != 0 {
                guard.set_port(
                    number,
                    PortConfig {
                        syn_cookies: 0,
                        ..current
                    },
                )?;
                any = true;
            }
        }
        if any {
            std::thread::sleep(Duration::from_secs(1));
        }
        self.sysctls.restore()
    }

    /// Puts back sysctls a daemon that died left set (before anything else is decided).
    pub fn recover(&mut self) -> anyhow::Result<()> {
        self.sysctls.recover()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_engages_at_the_threshold_and_cools_down_under_half() {
        let t0 = Instant::now();
        let mut s = AutoState {
            engaged: false,
            calm_since: None,
        };
        assert_eq!(decide(&mut s, 99, 100, t0), None);
        assert_eq!(decide(&mut s, 100, 100, t0), Some(true));
        // Still at half: stays on, and the cool-down does not start.
        assert_eq!(decide(&mut s, 50, 100, t0 + COOLDOWN * 2), None);
        // Under half: off only after the whole cool-down.
        let t1 = t0 + COOLDOWN * 3;
        assert_eq!(decide(&mut s, 49, 100, t1), None);
        assert_eq!(decide(&mut s, 0, 100, t1 + COOLDOWN / 2), None);
        // A burst restarts the cool-down.
        assert_eq!(decide(&mut s, 80, 100, t1 + COOLDOWN / 2), None);
        assert_eq!(decide(&mut s, 0, 100, t1 + COOLDOWN), None);
        assert_eq!(decide(&mut s, 0, 100, t1 + COOLDOWN * 2), Some(false));
        assert!(!s.engaged);
    }

    fn fake_proc(dir: &Path, entries: &[(&str, &str)]) {
        for (name, value) in entries {
            let p = dir.join(name);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, value).unwrap();
        }
    }

    #[test]
    fn cookie_connections_that_never_reach_a_socket_turn_cookies_off() {
        assert!(!lost_too_often(2, 2));
        assert!(lost_too_often(3, 3));
        assert!(lost_too_often(3, 6));
        assert!(!lost_too_often(3, 7));
        assert!(lost_too_often(50, 90));
    }

    #[test]
    fn a_failure_leaves_nothing_set_and_is_tried_again() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("ipv4");
        let saved = d.path().join("run/sysctls");
        fake_proc(&dir, &[(SYNCOOKIES, "1\n")]);
        // tcp_timestamps cannot be used: a directory in its place.
        fs::create_dir_all(dir.join(TIMESTAMPS).join("x")).unwrap();
        let mut s = Sysctls::at(dir.clone(), saved.clone());
        assert!(s.engage().is_err());
        assert!(!s.set() && !saved.exists());
        assert_eq!(read_number(&dir.join(SYNCOOKIES)).unwrap(), 1);
        assert!(s.engage().is_err(), "tried again, not taken as set");
    }

    #[test]
    fn settings_follow_the_host() {
        let d = tempfile::tempdir().unwrap();
        let proc_sys = d.path().join("sys");
        let net = d.path().join("net");
        fake_proc(
            &proc_sys,
            &[
                ("net/ipv4/tcp_sack", "1\n"),
                ("net/ipv4/tcp_timestamps", "1\n"),
                ("net/ipv4/tcp_window_scaling", "1\n"),
                ("net/ipv4/tcp_rmem", "4096\t131072\t6291456\n"),
                ("net/core/rmem_max", "212992\n"),
            ],
        );
        fake_proc(&net, &[("eth0/mtu", "1500\n"), ("eth1/mtu", "9000\n")]);
        let s = host_settings_at(&proc_sys, &net, &["eth0".into(), "eth1".into()]);
        // Linux's defaults: MSS 1460/1440, window scale 7 (6 MiB buffers).
        assert_eq!(s, CookieSettings::default());
        fake_proc(
            &proc_sys,
            &[
                ("net/ipv4/tcp_sack", "0\n"),
                ("net/ipv4/tcp_rmem", "4096\t131072\t33554432\n"),
            ],
        );
        let s = host_settings_at(&proc_sys, &net, &["eth1".into()]);
        assert_eq!((s.mss4, s.mss6, s.wscale), (8960, 8940, 10));
        assert_eq!(s.flags, COOKIE_TIMESTAMPS | COOKIE_WSCALE);
    }

    #[test]
    fn sysctls_are_set_and_put_back_and_recovered_after_a_crash() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("ipv4");
        let saved = d.path().join("run/sysctls");
        fake_proc(&dir, &[(SYNCOOKIES, "1\n"), (TIMESTAMPS, "1\n")]);
        let get = |n: &str| read_number(&dir.join(n)).unwrap();
        let mut s = Sysctls::at(dir.clone(), saved.clone());
        s.engage().unwrap();
        assert_eq!((get(SYNCOOKIES), get(TIMESTAMPS)), (2, 2));
        assert!(saved.exists());
        s.restore().unwrap();
        assert_eq!((get(SYNCOOKIES), get(TIMESTAMPS)), (1, 1));
        assert!(!saved.exists());

        // Timestamps off stay off; a daemon that died leaves the file, the next one restores.
        fake_proc(&dir, &[(SYNCOOKIES, "0\n"), (TIMESTAMPS, "0\n")]);
        let mut s = Sysctls::at(dir.clone(), saved.clone());
        s.engage().unwrap();
        assert_eq!((get(SYNCOOKIES), get(TIMESTAMPS)), (2, 0));
        drop(s);
        let mut next = Sysctls::at(dir.clone(), saved.clone());
        next.recover().unwrap();
        assert_eq!((get(SYNCOOKIES), get(TIMESTAMPS)), (0, 0));
        assert!(!saved.exists() && !next.set());

        // An operator's change meanwhile is kept.
        let mut s = Sysctls::at(dir.clone(), saved.clone());
        s.engage().unwrap();
        fake_proc(&dir, &[(SYNCOOKIES, "1\n")]);
        s.restore().unwrap();
        assert_eq!(get(SYNCOOKIES), 1);
    }
}
