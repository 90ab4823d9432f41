//! Read-only handles on the maps that grow with traffic (source counters, flows, rate windows,
//! bans, lists), separate from the [`Guard`](crate::guard::Guard) that loaded them: they can be
//! walked on another thread without holding the daemon's lock, so a scrape of full maps (up to
//! ~2 s at the default capacities) never stalls the sweep, signals or the control socket.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf,
    maps::{HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuValues},
};
use ipnet::IpNet;
use ws_guard_common::{
    maps::{BanValue, FlowKey, FlowValue, RefusalMemo, SourceKey, SourceState},
    names,
    policy::CIDR_DATA_LEN,
};

use crate::{
    lists::{List, trie_net},
    rawmap::{RawHashMap, pod_bytes, read_pod},
};

/// The maps a [`MapView`] holds.
const VIEWED: [&str; 6] = [
    names::MAP_SOURCES,
    names::MAP_MEMO,
    names::MAP_FLOWS,
    names::MAP_BANS,
    names::MAP_ALLOW,
    names::MAP_DENY,
];

/// Duplicated descriptors of the traffic-sized maps, for reading them.
pub struct MapView {
    maps: BTreeMap<&'static str, Map>,
}

impl MapView {
    /// Handles on `ebpf`'s maps of their own (duplicated file descriptors).
    pub(crate) fn of(ebpf: &Ebpf) -> anyhow::Result<Self> {
        let mut maps = BTreeMap::new();
        for name in VIEWED {
            let m = ebpf
                .map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the object"))?;
            let dup = |d: &MapData| -> anyhow::Result<MapData> {
                let fd = d
                    .fd()
                    .as_fd()
                    .try_clone_to_owned()
                    .with_context(|| format!("duplicating the descriptor of {name}"))?;
                MapData::from_fd(fd).with_context(|| format!("reopening {name}"))
            };
            let copy = match m {
                Map::HashMap(d) => Map::HashMap(dup(d)?),
                Map::LruHashMap(d) => Map::LruHashMap(dup(d)?),
                Map::LpmTrie(d) => Map::LpmTrie(dup(d)?),
                Map::PerCpuArray(d) => Map::PerCpuArray(dup(d)?),
                _ => bail!("map {name} has an unexpected type"),
            };
            maps.insert(name, copy);
        }
        Ok(Self { maps })
    }

    fn map<'a, T>(&'a self, name: &str) -> anyhow::Result<T>
    where
        T: TryFrom<&'a Map, Error = aya::maps::MapError>,
    {
        let m = self
            .maps
            .get(name)
            .ok_or_else(|| anyhow!("map {name} is not in the view"))?;
        T::try_from(m).with_context(|| format!("map {name} has an unexpected type"))
    }

    /// The memory the kernel charges for map `name` (one of the viewed maps), in bytes: its
    /// `memlock` in fdinfo, preallocated entries included.
    pub fn memory_bytes(&self, name: &str) -> anyhow::Result<u64> {
        let data: &MapData = match self.maps.get(name) {
            Some(Map::HashMap(d) | Map::LruHashMap(d) | Map::LpmTrie(d)) => d,
            _ => bail!("map {name} is not in the view"),
        };
        memlock(data.fd().as_fd()).with_context(|| format!("the memory of map {name}"))
    }

    /// How many entries map `name` (one of the viewed maps) holds at most.
    pub fn capacity(&self, name: &str) -> anyhow::Result<u32> {
        let data: &MapData = match self.maps.get(name) {
            Some(Map::HashMap(d) | Map::LruHashMap(d) | Map::LpmTrie(d)) => d,
            _ => bail!("map {name} is not in the view"),
        };
        Ok(data.info()?.max_entries())
    }

    /// Every source counter in the kernel, zero ones included (each holds a map entry).
    pub fn source_counters(&self) -> anyhow::Result<Vec<(SourceKey, u32)>> {
        Ok(self
            .source_states()?
            .into_iter()
            .map(|(k, v)| (k, v.slots))
            .collect())
    }

    /// Each possible CPU's refusal memo, by CPU number.
    pub fn memos(&self) -> anyhow::Result<Vec<RefusalMemo>> {
        let memos: PerCpuArray<&MapData, RefusalMemo> = self.map(names::MAP_MEMO)?;
        Ok(memos
            .get(&0, 0)
            .context("reading the refusal memos")?
            .iter()
            .copied()
            .collect())
    }

    /// Every entry of the source map (slots, flow filter, rate window), idle ones included;
    /// the refusal counts include those the CPUs' refusal memos hold for them.
    pub fn source_states(&self) -> anyhow::Result<Vec<(SourceKey, SourceState)>> {
        let data: &MapData = match self.maps.get(names::MAP_SOURCES) {
            Some(Map::HashMap(d)) => d,
            _ => bail!("map {} is not in the view", names::MAP_SOURCES),
        };
        let memos: PerCpuArray<&MapData, RefusalMemo> = self.map(names::MAP_MEMO)?;
        let read = || -> anyhow::Result<PerCpuValues<RefusalMemo>> {
            memos.get(&0, 0).context("reading the refusal memos")
        };
        // A memo moving its count into an entry between the two reads of the memos: read again.
        let mut tries = 0;
        loop {
            let before = read()?;
            let mut states = source_entries(data)?;
            let after = read()?;
            tries += 1;
            if memos_settled(&before, &after) || tries == MEMO_READS {
                add_pending(&mut states, &after);
                return Ok(states);
            }
        }
    }

    /// The tracked flows in `state` (`FLOW_PENDING`, `FLOW_OWNED`), or all of them. A flow
    /// being released (`FLOW_GONE`) is in none of the states.
    pub fn flows(&self, state: Option<u32>) -> anyhow::Result<Vec<(FlowKey, FlowValue)>> {
        let m: HashMap<&MapData, FlowKey, FlowValue> = self.map(names::MAP_FLOWS)?;
        let cap = self.capacity(names::MAP_FLOWS)? as usize;
        // A key deleted during the walk restarts it: bounded, and deduplicated.
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for kv in m.iter().take(cap.saturating_mul(2)) {
            let (k, v) = kv.context("reading the tracked flows")?;
            if state.is_none_or(|s| v.state() == s) && seen.insert(k) {
                out.push((k, v));
            }
        }
        Ok(out)
    }

    /// Every entry of the ban map, expired ones included.
    pub fn ban_entries(&self) -> anyhow::Result<Vec<(SourceKey, BanValue)>> {
        let m: HashMap<&MapData, SourceKey, BanValue> = self.map(names::MAP_BANS)?;
        let cap = self.capacity(names::MAP_BANS)? as usize;
        // A key deleted during the walk restarts it: bounded, and deduplicated.
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for kv in m.iter().take(cap.saturating_mul(2)) {
            let (k, v) = kv.context("reading the bans")?;
            if seen.insert(k) {
                out.push((k, v));
            }
        }
        Ok(out)
    }

    /// The entries of `list`.
    pub fn list_entries(&self, list: List) -> anyhow::Result<Vec<IpNet>> {
        let m: LpmTrie<&MapData, [u8; CIDR_DATA_LEN], u32> = self.map(list.map_name())?;
        let cap = self.capacity(list.map_name())? as usize;
        let mut out = BTreeSet::new();
        for k in m.keys().take(cap.saturating_mul(2)) {
            let k = k.with_context(|| format!("reading the {} list", list.name()))?;
            if let Some(n) = trie_net(&k) {
                out.insert(n);
            }
        }
        Ok(out.into_iter().collect())
    }
}

/// How often [`MapView::source_states`] reads the maps before it takes what it read (a count
/// moved in between is then counted twice or not at all, once): a move takes nanoseconds.
const MEMO_READS: u32 = 8;

/// Whether no memo moved its pending count into an entry between two reads (`before`, then
/// `after`): the same number of moves, none in progress (see `RefusalMemo::flushes`).
fn memos_settled(before: &[RefusalMemo], after: &[RefusalMemo]) -> bool {
    before.len() == after.len()
        && before
            .iter()
            .zip(after)
            .all(|(b, a)| b.flushes == a.flushes && a.flushes % 2 == 0)
}

/// Adds the refusals the memos hold to the entries of the sources they name.
fn add_pending(states: &mut [(SourceKey, SourceState)], memos: &[RefusalMemo]) {
    for m in memos.iter().filter(|m| m.pending != 0) {
        if let Some((_, s)) = states.iter_mut().find(|(k, _)| *k == m.source) {
            s.refused = s.refused.wrapping_add(m.pending);
        }
    }
}

/// Every entry of a source map (`WSG_SOURCES`, of any rate ring), read as bytes: its values
/// are sized by the ring, which aya's typed maps do not allow. A key deleted during the walk
/// restarts it: bounded, and deduplicated.
pub fn source_entries(data: &MapData) -> anyhow::Result<Vec<(SourceKey, SourceState)>> {
    let map = RawHashMap::new(data)?;
    let cap = data.info()?.max_entries() as usize;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (k, v) in map
        .entries(cap.saturating_mul(2))
        .context("reading the source map")?
    {
        let key: SourceKey = read_pod(&k);
        let state = SourceState::from_bytes(&v)
            .with_context(|| format!("a source map value of {} bytes", v.len()))?;
        if seen.insert(key) {
            out.push((key, state));
        }
    }
    Ok(out)
}

/// The entry of `key` in a source map (`WSG_SOURCES`), if it has one.
pub fn source_entry(data: &MapData, key: &SourceKey) -> anyhow::Result<Option<SourceState>> {
    let map = RawHashMap::new(data)?;
    match map.get(pod_bytes(key)).context("reading the source map")? {
        Some(v) => Ok(Some(SourceState::from_bytes(&v).with_context(|| {
            format!("a source map value of {} bytes", v.len())
        })?)),
        None => Ok(None),
    }
}

/// The memory the kernel charges for the BPF object behind `fd` (`memlock` in its fdinfo).
pub fn memlock(fd: BorrowedFd<'_>) -> anyhow::Result<u64> {
    let path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .ok_or_else(|| anyhow!("{path} has no memlock line"))?;
    value
        .trim()
        .parse()
        .with_context(|| format!("{path}: memlock {value:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The view is handed to a blocking task while the daemon keeps the guard.
    #[test]
    fn a_view_can_move_to_another_thread() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<MapView>();
    }

    fn key(last: u8) -> SourceKey {
        SourceKey {
            addr: [198, 18, 0, last, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port: 9000,
            family: ws_guard_common::maps::AF_INET,
        }
    }

    #[test]
    fn pending_refusals_are_added_to_the_source_each_memo_names() {
        let state = |refused| SourceState {
            refused,
            ..Default::default()
        };
        let mut states = vec![(key(1), state(5)), (key(2), state(0))];
        let memo = |k, pending| RefusalMemo {
            source: k,
            pending,
            max: 3,
            ..Default::default()
        };
        // Two CPUs refusing the same source, one a source the map no longer has.
        add_pending(
            &mut states,
            &[memo(key(1), 10), memo(key(1), 1), memo(key(9), 4)],
        );
        assert_eq!(states[0].1.refused, 16);
        assert_eq!(states[1].1.refused, 0);
    }

    #[test]
    fn a_move_between_the_reads_or_in_progress_is_not_settled() {
        let m = |flushes| RefusalMemo {
            flushes,
            ..Default::default()
        };
        assert!(memos_settled(&[m(2), m(0)], &[m(2), m(0)]));
        assert!(!memos_settled(&[m(2), m(0)], &[m(4), m(0)]));
        assert!(!memos_settled(&[m(3)], &[m(3)]));
    }
}
