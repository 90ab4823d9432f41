//! Bans (`WSG_BANS`): source keys whose new attempts are dropped until a deadline, started by
//! the XDP program after a rate-limit refusal (`ban_duration` > 0) or by the operator. The map
//! is pinned, so bans survive a daemon restart; expired ones are ended by the XDP program
//! when the source tries again, or by [`Guard::expire_bans`] from the sweep: either way in the
//! kernel, counted in `bans_ended` and reported in the event ring buffer.

use std::{net::IpAddr, time::Duration};

use anyhow::Context as _;
use aya::maps::{HashMap, MapData, MapError};
use log::{info, warn};
use ws_guard_common::{
    key,
    maps::{
        AF_INET, AF_INET6, BAN_MANUAL, BAN_RATE, BanValue, ControlOp, OP_EXPIRE_BAN, SourceKey,
    },
    names,
    policy::{ban_active, ban_remaining, ban_until},
};

use crate::guard::Guard;

/// Why a source is banned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BanReason {
    /// Refused by the new-connection rate while `ban_duration` > 0.
    Rate,
    /// Banned by the operator ([`Guard::ban`]).
    Manual,
}

impl BanReason {
    /// From [`BanValue::reason`]; unknown values read as manual.
    pub fn from_kernel(reason: u32) -> Self {
        if reason == BAN_RATE {
            BanReason::Rate
        } else {
            BanReason::Manual
        }
    }

    /// "rate" or "manual", for logs and JSON.
    pub fn name(self) -> &'static str {
        match self {
            BanReason::Rate => "rate",
            BanReason::Manual => "manual",
        }
    }
}

/// An active ban.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ban {
    pub source: SourceKey,
    /// Time left until it ends.
    pub remaining: Duration,
    pub reason: BanReason,
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`, which the ban deadlines use.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Guard {
    /// Every entry of the ban map, expired ones included, deduplicated.
    pub(crate) fn ban_entries(&self) -> anyhow::Result<Vec<(SourceKey, BanValue)>> {
        self.view().ban_entries()
    }

    /// Whether the ban map has entries (one key read).
    pub(crate) fn bans_nonempty(&self) -> anyhow::Result<bool> {
        let m: HashMap<&MapData, SourceKey, BanValue> = self.map(names::MAP_BANS)?;
        Ok(m.keys().next().is_some())
    }

    /// Re-derives the global flags from the maps (after a ban was added or removed).
    fn refresh_flags(&mut self) -> anyhow::Result<()> {
        let g = self.global()?;
        self.set_global(g)
    }

    /// The source key `addr` is charged to on `port`, masked with the live prefixes. An
    /// IPv4-mapped IPv6 address is taken as the IPv4 address (as it arrives on the wire).
    pub fn source_key(&self, addr: IpAddr, port: u16) -> anyhow::Result<SourceKey> {
        let global = self.global()?;
        let addr = match addr {
            IpAddr::V6(a) => a.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(a)),
            a => a,
        };
        let (family, bytes) = match addr {
            IpAddr::V4(a) => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&a.octets());
                (AF_INET, b)
            }
            IpAddr::V6(a) => (AF_INET6, a.octets()),
        };
        Ok(key::source_key(family, bytes, port, &global))
    }

    /// Active bans (expired ones not yet removed are left out).
    pub fn bans(&self) -> anyhow::Result<Vec<Ban>> {
        let now = monotonic_ns();
        Ok(self
            .ban_entries()?
            .into_iter()
            .filter(|(_, v)| ban_active(v.until_ns, now))
            .map(|(source, v)| Ban {
                source,
                remaining: Duration::from_nanos(ban_remaining(&v, now)),
                reason: BanReason::from_kernel(v.reason),
            })
            .collect())
    }

    /// Bans `source` for `duration` from now (replacing a ban it has). The daemon's requests
    /// are held to [`check_ban_duration`] first; the tests use shorter bans.
    pub fn ban(&mut self, source: SourceKey, duration: Duration) -> anyhow::Result<()> {
        let value = BanValue {
            until_ns: ban_until(monotonic_ns(), duration_ns(duration)),
            reason: BAN_MANUAL,
            _pad: 0,
        };
        {
            let mut m: HashMap<&mut MapData, SourceKey, BanValue> =
                self.map_mut(names::MAP_BANS)?;
            m.insert(source, value, 0).context(
                "adding the ban (the ban map may be full: capacity.bans, takes effect after \
                 `ws-guard teardown`)",
            )?;
        }
        self.refresh_flags()
    }

    /// Copies the bans still in force from the pinned ban maps of other layout versions (what an
    /// older release left before this upgrade), so an upgrade lifts no ban; returns how many.
    /// A ban already in this version's map is kept. Versions older than
    /// [`names::BANS_LAYOUT_SINCE`] or newer than this one (a downgrade), or whose map does not
    /// have this version's key and value sizes, are skipped with a warning: their bans end.
    pub fn carry_over_bans(&mut self) -> anyhow::Result<usize> {
        let Some(pins) = self.pin_dir().cloned() else {
            return Ok(0);
        };
        let now = monotonic_ns();
        let mut carried = 0;
        for dir in pins.other_versions() {
            let path = dir.join("maps").join(names::MAP_BANS);
            if !path.exists() {
                continue;
            }
            let version = dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix('v'))
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0);
            // A newer layout (a downgrade) is not known here, whatever its sizes.
            if !(names::BANS_LAYOUT_SINCE..=names::LAYOUT_VERSION).contains(&version) {
                warn!(
                    "the bans of layout v{version} ({}) are not carried over: their layout is \
                     not this version's (v{}); they end here",
                    path.display(),
                    names::LAYOUT_VERSION
                );
                continue;
            }
            let data = MapData::from_pin(&path)
                .with_context(|| format!("opening the ban map {}", path.display()))?;
            // The typed map checks the key and value sizes against this version's.
            let old: HashMap<MapData, SourceKey, BanValue> =
                match HashMap::try_from(aya::maps::Map::HashMap(data)) {
                    Ok(m) => m,
                    Err(e) => {
                        warn!(
                            "the bans of layout v{version} are not carried over ({e}); they end \
                             with this upgrade"
                        );
                        continue;
                    }
                };
            let cap = self.capacity(names::MAP_BANS)? as usize;
            let active: Vec<(SourceKey, BanValue)> = old
                .iter()
                .take(cap.saturating_mul(2))
                .filter_map(Result::ok)
                .filter(|(_, v)| ban_active(v.until_ns, now))
                .collect();
            let mut m: HashMap<&mut MapData, SourceKey, BanValue> =
                self.map_mut(names::MAP_BANS)?;
            let mut n = 0;
            for (k, v) in active {
                if m.get(&k, 0).is_ok() {
                    continue;
                }
                match m.insert(k, v, 0) {
                    Ok(()) => n += 1,
                    Err(e) => {
                        warn!(
                            "carrying the bans of layout v{version} over stopped after {n}: {e} \
                             (capacity.bans may be too small)"
                        );
                        break;
                    }
                }
            }
            info!("carried {n} bans in force over from layout v{version}");
            carried += n;
        }
        self.refresh_flags()?;
        Ok(carried)
    }

    /// Lifts the ban of `source`; false if it was not banned (an expired ban counts as not).
    pub fn unban(&mut self, source: &SourceKey) -> anyhow::Result<bool> {
        let active = {
            let mut m: HashMap<&mut MapData, SourceKey, BanValue> =
                self.map_mut(names::MAP_BANS)?;
            let active = match m.get(source, 0) {
                Ok(v) => ban_active(v.until_ns, monotonic_ns()),
                Err(MapError::KeyNotFound) => return Ok(false),
                Err(e) => return Err(e).context("reading the ban"),
            };
            match m.remove(source) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("removing the ban"),
            }
            active
        };
        self.refresh_flags()?;
        Ok(active)
    }

    /// Ends the bans that are over; returns their sources. The control program ends each one
    /// (checked again by the kernel's clock, so a ban renewed meanwhile stays), counts it in
    /// `bans_ended` and reports it in the event ring buffer, as when the XDP program finds an
    /// expired ban on the source's next attempt. A ban the XDP program ended meanwhile is not
    /// returned (it reported that end itself).
    pub fn expire_bans(&mut self) -> anyhow::Result<Vec<SourceKey>> {
        let now = monotonic_ns();
        let expired: Vec<SourceKey> = self
            .ban_entries()?
            .into_iter()
            .filter(|(_, v)| !ban_active(v.until_ns, now))
            .map(|(k, _)| k)
            .collect();
        let mut out = Vec::new();
        for source in expired {
            let op = ControlOp {
                op: OP_EXPIRE_BAN,
                source,
                ..Default::default()
            };
            if self.control(op).context("ending an expired ban")? {
                out.push(source);
            }
        }
        // Always: the kernel ends bans itself (on the next attempt) without touching the flags,
        // so after the last one ends they would keep every SYN paying a ban lookup.
        self.refresh_flags()?;
        Ok(out)
    }

    /// Refused attempts per source key (`max_connections`, rate, denylist, ban) while it had an
    /// entry in the source map; sources without refusals left out. The count wraps at 2^32 and
    /// goes when the sweep reclaims the idle entry of a source.
    pub fn source_refusals(&self) -> anyhow::Result<Vec<(SourceKey, u64)>> {
        Ok(self
            .source_states()?
            .into_iter()
            .filter(|(_, s)| s.refused != 0)
            .map(|(k, s)| (k, s.refused as u64))
            .collect())
    }
}

/// The bounds of a manual ban's duration, checked wherever one comes from (the CLI, the control
/// socket, a library caller): 1 s to 365 days.
pub fn check_ban_duration(d: Duration) -> Result<(), String> {
    if d < Duration::from_secs(1) {
        return Err("a ban lasts at least 1s".into());
    }
    if d > Duration::from_secs(86_400 * 365) {
        return Err("a ban lasts at most 365 days".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_from_the_kernel() {
        assert_eq!(BanReason::from_kernel(BAN_RATE), BanReason::Rate);
        assert_eq!(BanReason::from_kernel(BAN_MANUAL), BanReason::Manual);
        assert_eq!(BanReason::Rate.name(), "rate");
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a);
    }
}
