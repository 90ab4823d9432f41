//! The allow and deny lists: CIDR tries (`WSG_ALLOW`, `WSG_DENY`) the XDP program consults
//! before any limit, and syncing them (with the ban duration) from the configuration, whole or
//! nothing.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use anyhow::{Context as _, bail};
use aya::maps::{
    MapData,
    lpm_trie::{Key, LpmTrie},
};
use ipnet::IpNet;
use ws_guard_common::{
    maps::{AF_INET, AF_INET6, GlobalConfig},
    names,
    policy::{CIDR_DATA_LEN, CidrKey, cidr_key},
};

use crate::guard::Guard;

/// One of the two CIDR lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum List {
    /// Sources never limited nor banned (still tracked).
    Allow,
    /// Sources whose new attempts are dropped.
    Deny,
}

impl List {
    /// The list's map.
    pub fn map_name(self) -> &'static str {
        match self {
            List::Allow => names::MAP_ALLOW,
            List::Deny => names::MAP_DENY,
        }
    }

    /// "allow" or "deny", as in the configuration and the metrics.
    pub fn name(self) -> &'static str {
        match self {
            List::Allow => "allow",
            List::Deny => "deny",
        }
    }
}

/// What [`Guard::apply_policy`] makes the lists and bans: the configuration's `allow`, `deny`
/// and `ban_duration`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
    /// Zero: no automatic bans.
    pub ban_duration: Duration,
}

impl Policy {
    /// The configuration's lists and ban duration.
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        Self {
            allow: cfg.allow.clone(),
            deny: cfg.deny.clone(),
            ban_duration: cfg.ban_duration,
        }
    }
}

type TrieKey = Key<[u8; CIDR_DATA_LEN]>;

/// The trie key of a CIDR (host bits cleared).
pub fn trie_key(net: &IpNet) -> TrieKey {
    let k = match net.trunc() {
        IpNet::V4(n) => {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&n.addr().octets());
            cidr_key(AF_INET, a, n.prefix_len() as u32)
        }
        IpNet::V6(n) => cidr_key(AF_INET6, n.addr().octets(), n.prefix_len() as u32),
    };
    Key::new(k.prefix_len, k.data)
}

/// The CIDR a trie key stands for; `None` for a key ws-guard does not write.
pub fn trie_net(key: &TrieKey) -> Option<IpNet> {
    let (family, addr, prefix) = CidrKey {
        prefix_len: key.prefix_len(),
        data: key.data(),
    }
    .parts()?;
    let ip = if family == AF_INET6 {
        IpAddr::from(addr)
    } else {
        IpAddr::from([addr[0], addr[1], addr[2], addr[3]])
    };
    IpNet::new(ip, prefix as u8).ok()
}

/// One change to a list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    Add(List, IpNet),
    Remove(List, IpNet),
}

impl Change {
    fn undo(self) -> Change {
        match self {
            Change::Add(l, n) => Change::Remove(l, n),
            Change::Remove(l, n) => Change::Add(l, n),
        }
    }
}

/// The changes that turn `have` into `want`: removals first (room for the additions).
fn diff(list: List, have: &BTreeSet<IpNet>, want: &BTreeSet<IpNet>) -> Vec<Change> {
    let mut out: Vec<Change> = have
        .difference(want)
        .map(|n| Change::Remove(list, *n))
        .collect();
    out.extend(want.difference(have).map(|n| Change::Add(list, *n)));
    out
}

/// Makes `changes` in order with `apply`, then runs `finish`. When a step fails, the changes
/// made are undone in reverse order (a failed undo is logged: nothing better can be done) and
/// the step's error is returned.
fn transact<S: ?Sized>(
    state: &mut S,
    changes: &[Change],
    mut apply: impl FnMut(&mut S, Change) -> anyhow::Result<()>,
    finish: impl FnOnce(&mut S) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut done = 0;
    let mut result = Ok(());
    for c in changes {
        if let Err(e) = apply(state, *c) {
            result = Err(e);
            break;
        }
        done += 1;
    }
    if result.is_ok() {
        result = finish(state);
    }
    if result.is_err() {
        for c in changes[..done].iter().rev() {
            if let Err(u) = apply(state, c.undo()) {
                log::error!("restoring the lists after a failed change: {u:#}");
            }
        }
    }
    result
}

fn normalized(nets: &[IpNet]) -> BTreeSet<IpNet> {
    nets.iter().map(|n| n.trunc()).collect()
}

impl Guard {
    /// The entries of `list`.
    pub fn list_entries(&self, list: List) -> anyhow::Result<Vec<IpNet>> {
        self.view().list_entries(list)
    }

    /// Whether `list` has entries (one key read).
    pub(crate) fn list_nonempty(&self, list: List) -> anyhow::Result<bool> {
        let m: LpmTrie<&MapData, [u8; CIDR_DATA_LEN], u32> = self.map(list.map_name())?;
        Ok(m.keys().next().is_some())
    }

    /// The flags for the maps' contents and `ban_ns` (see [`ws_guard_common::policy::flags`]).
    pub(crate) fn live_flags(&self, ban_ns: u64) -> anyhow::Result<u32> {
        Ok(ws_guard_common::policy::flags(
            self.list_nonempty(List::Allow)?,
            self.list_nonempty(List::Deny)?,
            ban_ns,
            self.bans_nonempty()?,
        ))
    }

    /// Makes the lists exactly `policy.allow` / `policy.deny` (adding what is missing, removing
    /// what is extra) and sets the ban duration. Whole or nothing: when a change fails, the ones
    /// made are undone and the previous global settings restored before the error returns.
    pub fn apply_policy(&mut self, policy: &Policy) -> anyhow::Result<()> {
        let want_allow = normalized(&policy.allow);
        let want_deny = normalized(&policy.deny);
        for (list, want) in [(List::Allow, &want_allow), (List::Deny, &want_deny)] {
            let cap = self.capacity(list.map_name())? as usize;
            if want.len() > cap {
                bail!(
                    "the {} list has {} entries, more than its capacity {cap} \
                     (capacity.cidrs; takes effect after `ws-guard teardown`)",
                    list.name(),
                    want.len()
                );
            }
        }
        // What the tries hold: read once (thousands of system calls for a long list), then kept
        // in step with every change made here, so adding one CIDR costs no walk of the tries.
        let (have_allow, have_deny) = match self.lists_in_kernel.take() {
            Some(have) => have,
            None => (
                self.list_entries(List::Allow)?.into_iter().collect(),
                self.list_entries(List::Deny)?.into_iter().collect(),
            ),
        };
        let mut changes = diff(List::Allow, &have_allow, &want_allow);
        changes.extend(diff(List::Deny, &have_deny, &want_deny));

        let old = self.global()?;
        let ban_ns = u64::try_from(policy.ban_duration.as_nanos()).unwrap_or(u64::MAX);
        // While changing, the flags cover both the old and the new contents, so no lookup the
        // final state needs is skipped midway.
        let during = GlobalConfig {
            flags: old.flags
                | ws_guard_common::policy::flags(
                    !want_allow.is_empty(),
                    !want_deny.is_empty(),
                    0,
                    false,
                ),
            ..old
        };
        self.write_global(during)?;
        let result = transact(
            self,
            &changes,
            |g, c| g.change_list(c),
            |g| g.set_global(GlobalConfig { ban_ns, ..old }),
        );
        if let Err(e) = result {
            if let Err(u) = self.write_global(old) {
                log::error!("restoring the global settings after a failed change: {u:#}");
            }
            // Undone (or not quite): read the tries again next time.
            return Err(e.context("changing the allow/deny lists (nothing changed)"));
        }
        self.lists_in_kernel = Some((want_allow, want_deny));
        Ok(())
    }

    fn change_list(&mut self, c: Change) -> anyhow::Result<()> {
        let (list, net) = match c {
            Change::Add(l, n) | Change::Remove(l, n) => (l, n),
        };
        let mut m: LpmTrie<&mut MapData, [u8; CIDR_DATA_LEN], u32> =
            self.map_mut(list.map_name())?;
        let key = trie_key(&net);
        match c {
            Change::Add(..) => m
                .insert(&key, 1, 0)
                .with_context(|| format!("adding {net} to the {} list", list.name())),
            Change::Remove(..) => match m.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                Err(e) => {
                    Err(e).with_context(|| format!("removing {net} from the {} list", list.name()))
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// A list held in memory whose changes fail at chosen points.
    struct Fake {
        entries: BTreeSet<(List, IpNet)>,
        fail_on: Option<Change>,
        applied: usize,
    }

    fn fake_apply(f: &mut Fake, c: Change) -> anyhow::Result<()> {
        if f.fail_on == Some(c) {
            anyhow::bail!("refused {c:?}");
        }
        f.applied += 1;
        match c {
            Change::Add(l, n) => f.entries.insert((l, n)),
            Change::Remove(l, n) => f.entries.remove(&(l, n)),
        };
        Ok(())
    }

    #[test]
    fn a_failed_change_restores_the_lists() {
        let have: BTreeSet<_> = [net("198.18.0.0/24"), net("198.18.1.0/24")].into();
        let want: BTreeSet<_> = [net("198.18.1.0/24"), net("198.18.2.0/24"), net("::/0")].into();
        let changes = diff(List::Deny, &have, &want);
        let start: BTreeSet<_> = have.iter().map(|n| (List::Deny, *n)).collect();
        // Every point of failure, the last step (`finish`) included.
        for k in 0..=changes.len() {
            let mut f = Fake {
                entries: start.clone(),
                fail_on: changes.get(k).copied(),
                applied: 0,
            };
            let r = transact(&mut f, &changes, fake_apply, |_| {
                anyhow::ensure!(k < changes.len(), "finish failed");
                Ok(())
            });
            assert!(r.is_err(), "step {k}");
            assert_eq!(f.entries, start, "failure at step {k}");
            assert_eq!(f.applied, 2 * k, "{k} changes made and undone");
        }
        let mut f = Fake {
            entries: start,
            fail_on: None,
            applied: 0,
        };
        transact(&mut f, &changes, fake_apply, |_| Ok(())).unwrap();
        let end: BTreeSet<_> = want.iter().map(|n| (List::Deny, *n)).collect();
        assert_eq!(f.entries, end);
    }

    #[test]
    fn keys_round_trip() {
        for s in [
            "198.18.0.0/15",
            "198.18.3.4/32",
            "0.0.0.0/0",
            "2001:2::/48",
            "::/0",
        ] {
            assert_eq!(trie_net(&trie_key(&net(s))), Some(net(s)), "{s}");
        }
        // Host bits are cleared.
        assert_eq!(
            trie_net(&trie_key(&net("198.18.3.4/16"))),
            Some(net("198.18.0.0/16"))
        );
    }

    #[test]
    fn diff_removes_extra_and_adds_missing() {
        let have: BTreeSet<_> = [net("198.18.0.0/24"), net("198.18.1.0/24")].into();
        let want: BTreeSet<_> = [net("198.18.1.0/24"), net("2001:2::/48")].into();
        assert_eq!(
            diff(List::Deny, &have, &want),
            [
                Change::Remove(List::Deny, net("198.18.0.0/24")),
                Change::Add(List::Deny, net("2001:2::/48")),
            ]
        );
        assert!(diff(List::Allow, &want, &want).is_empty());
        assert_eq!(
            Change::Add(List::Allow, net("::/0")).undo(),
            Change::Remove(List::Allow, net("::/0"))
        );
    }
}
