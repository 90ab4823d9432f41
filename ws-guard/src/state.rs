//! Runtime overrides: what `ws-guard limits set`, `monitor on|off`, `allow|deny add|remove`
//! changed while the daemon ran. They are kept in the state file (`state_file`), a fragment of
//! a configuration file in its own schema, laid over the configuration file: each key there
//! replaces the file's (a port's fields one by one), applied at start, on SIGHUP and after
//! every change, until `limits reset` / `allow|deny reset` drops it.
//!
//! The state file is written atomically (temporary file, fsync, rename, fsync of the
//! directory), so a crash leaves the old or the new overrides, never half of them.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    config::{Action, Config, PortLimits},
    control::protocol::{ActionName, LimitChange, ListName, MaxConnections, RateLimit},
};

/// The state file's default path (`state_file`).
pub const DEFAULT_STATE_FILE: &str = crate::config::DEFAULT_STATE_FILE;

/// Why the state file could not be read or written.
#[derive(Debug, Error)]
pub enum StateError {
    #[error("reading the state file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the state file {path} is not valid ({message}); fix or remove it (removing it drops \
         every runtime change)"
    )]
    Parse { path: PathBuf, message: String },
    #[error("writing the state file {path}: {what}: {source}")]
    Write {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
}

/// The overrides of one port (fields left out keep the config file's value).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortOverride {
    pub port: u16,
    #[serde(flatten)]
    pub change: LimitChange,
}

/// Everything changed at runtime.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// `monitor on|off`; unset: the config file's `monitor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<bool>,
    /// The allowlist, whole and sorted, once changed at runtime (`allow add|remove`); unset:
    /// the config file's. `allow reset` unsets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<IpNet>>,
    /// The denylist, likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny: Option<Vec<IpNet>>,
    /// State files of earlier versions kept list changes as differences from the config
    /// file's lists: read, and turned into whole lists on the next change of that list.
    #[serde(default, skip_serializing)]
    pub allow_added: Vec<IpNet>,
    #[serde(default, skip_serializing)]
    pub allow_removed: Vec<IpNet>,
    #[serde(default, skip_serializing)]
    pub deny_added: Vec<IpNet>,
    #[serde(default, skip_serializing)]
    pub deny_removed: Vec<IpNet>,
    /// Per-port limits (`limits set`), by port; `limits reset` removes one.
    #[serde(default, rename = "port", skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortOverride>,
}

const HEADER: &str = "# ws-guard runtime changes, written by the daemon (`ws-guard limits set`, \
`allow`, `deny`, `monitor`):\n# a fragment of a config file, in its schema. Each key here \
replaces the config file's (a [[port]]\n# table's fields one by one); paste them into the config \
file to keep them (or `ws-guard config show\n# --effective`). Edit only while the daemon is \
stopped; `ws-guard limits reset` and `allow|deny reset`\n# drop single changes, deleting this \
file drops all of them.\n\n";

impl Overrides {
    /// Reads `path`; a missing file is no overrides.
    pub fn load(path: &Path) -> Result<Self, StateError> {
        let text = match crate::config::read_regular_file(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(StateError::Read {
                    path: path.into(),
                    source,
                });
            }
        };
        let mut o: Self = toml::from_str(&text).map_err(|e| StateError::Parse {
            path: path.into(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        // Sorted as list_add keeps them, whatever an editor did to the file.
        for l in [
            &mut o.allow_added,
            &mut o.allow_removed,
            &mut o.deny_added,
            &mut o.deny_removed,
        ]
        .into_iter()
        .chain(o.allow.iter_mut())
        .chain(o.deny.iter_mut())
        {
            l.sort();
            l.dedup();
        }
        Ok(o)
    }

    /// Writes `path` atomically; its directory is created 0700 if missing.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let err = |what: &'static str| {
            move |source| StateError::Write {
                path: path.into(),
                what,
                source,
            }
        };
        let text = toml::to_string(self).map_err(|e| StateError::Write {
            path: path.into(),
            what: "encoding",
            source: std::io::Error::other(e),
        })?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err("creating its directory"))?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
        let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(HEADER.as_bytes())?;
            f.write_all(text.as_bytes())?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(err("writing a temporary file")(e));
        }
        if let Err(e) = fs::rename(&tmp, path) {
            let _ = fs::remove_file(&tmp);
            return Err(err("renaming the temporary file")(e));
        }
        // The rename itself is durable once the directory is synced.
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err("syncing its directory"))?;
        Ok(())
    }

    /// The override of `port`, if any.
    pub fn port(&self, port: u16) -> Option<&PortOverride> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// Merges `change` into the override of `port`.
    pub fn set_port(&mut self, port: u16, change: &LimitChange) {
        let i = match self.ports.iter().position(|p| p.port == port) {
            Some(i) => i,
            None => {
                self.ports.push(PortOverride {
                    port,
                    change: LimitChange::default(),
                });
                self.ports.sort_by_key(|p| p.port);
                self.ports.iter().position(|p| p.port == port).unwrap()
            }
        };
        let o = &mut self.ports[i].change;
        if change.max_connections.is_some() {
            o.max_connections = change.max_connections;
        }
        if change.new_connections.is_some() {
            o.new_connections = change.new_connections;
        }
        if change.connection_action.is_some() {
            o.connection_action = change.connection_action;
        }
        if change.rate_action.is_some() {
            o.rate_action = change.rate_action;
        }
        if change.syn_cookies.is_some() {
            o.syn_cookies = change.syn_cookies;
        }
    }

    /// Drops the override of `port`; false if there was none.
    pub fn reset_port(&mut self, port: u16) -> bool {
        let before = self.ports.len();
        self.ports.retain(|p| p.port != port);
        self.ports.len() != before
    }

    /// The fields of `list`: the whole runtime list, and an earlier version's differences.
    fn list_fields(&self, list: ListName) -> (&Option<Vec<IpNet>>, &Vec<IpNet>, &Vec<IpNet>) {
        match list {
            ListName::Allow => (&self.allow, &self.allow_added, &self.allow_removed),
            ListName::Deny => (&self.deny, &self.deny_added, &self.deny_removed),
        }
    }

    /// [`Overrides::list_fields`], to change.
    fn list_fields_mut(
        &mut self,
        list: ListName,
    ) -> (&mut Option<Vec<IpNet>>, &mut Vec<IpNet>, &mut Vec<IpNet>) {
        match list {
            ListName::Allow => (
                &mut self.allow,
                &mut self.allow_added,
                &mut self.allow_removed,
            ),
            ListName::Deny => (&mut self.deny, &mut self.deny_added, &mut self.deny_removed),
        }
    }

    /// The runtime list `list`, made from `file`'s entries (and an earlier version's
    /// differences) on its first change.
    fn list_mut(&mut self, list: ListName, file: &[IpNet]) -> &mut Vec<IpNet> {
        // Made once: later changes edit it in place (a bulk add is one change per CIDR).
        let first = self
            .list_fields(list)
            .0
            .is_none()
            .then(|| self.list_entries(list, file));
        let (whole, added, removed) = self.list_fields_mut(list);
        if let Some(current) = first {
            added.clear();
            removed.clear();
            *whole = Some(current);
        }
        whole.get_or_insert_with(Vec::new)
    }

    /// Records `cidr` added to `list`, whose config-file entries are `file`. Err: already in.
    pub fn list_add(&mut self, list: ListName, file: &[IpNet], cidr: IpNet) -> Result<(), String> {
        // Kept sorted, so an add costs a binary search and a move, not a sort (block lists of
        // thousands of CIDRs are added one by one or in bulk). A refused change leaves the
        // list as it was (not made into a runtime list).
        if !self.list_changed(list) && self.list_entries(list, file).contains(&cidr) {
            return Err(format!("{cidr} is already in the {list}list"));
        }
        let l = self.list_mut(list, file);
        match l.binary_search(&cidr) {
            Ok(_) => Err(format!("{cidr} is already in the {list}list")),
            Err(at) => {
                l.insert(at, cidr);
                Ok(())
            }
        }
    }

    /// Records `cidr` removed from `list`. Err: not in it.
    pub fn list_remove(
        &mut self,
        list: ListName,
        file: &[IpNet],
        cidr: IpNet,
    ) -> Result<(), String> {
        if !self.list_entries(list, file).contains(&cidr) {
            return Err(format!("{cidr} is not in the {list}list"));
        }
        let l = self.list_mut(list, file);
        if let Ok(at) = l.binary_search(&cidr) {
            l.remove(at);
        }
        Ok(())
    }

    /// Drops the runtime changes of `list`: the config file's list is in force again. False
    /// when it had none.
    pub fn list_reset(&mut self, list: ListName) -> bool {
        let (whole, added, removed) = self.list_fields_mut(list);
        let had = whole.is_some() || !added.is_empty() || !removed.is_empty();
        *whole = None;
        added.clear();
        removed.clear();
        had
    }

    /// Whether `list` was changed at runtime.
    pub fn list_changed(&self, list: ListName) -> bool {
        let (whole, added, removed) = self.list_fields(list);
        whole.is_some() || !added.is_empty() || !removed.is_empty()
    }

    /// The entries of `list` in force: the runtime list if it was changed, else `file`'s (with
    /// an earlier version's differences), sorted.
    pub fn list_entries(&self, list: ListName, file: &[IpNet]) -> Vec<IpNet> {
        let (whole, added, removed) = self.list_fields(list);
        if let Some(l) = whole {
            return l.clone();
        }
        let mut out: Vec<IpNet> = file
            .iter()
            .filter(|c| !removed.contains(c))
            .chain(added.iter().filter(|c| !file.contains(c)))
            .copied()
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The config file `file` with these overrides laid over it (not validated: see
    /// [`effective`]).
    pub fn overlay(&self, file: &Config) -> Config {
        let mut cfg = file.clone();
        if let Some(m) = self.monitor {
            cfg.monitor = m;
        }
        for o in &self.ports {
            let i = match cfg.ports.iter().position(|p| p.port == o.port as u32) {
                Some(i) => i,
                None => {
                    // A port the file does not protect: protected from this override on,
                    // with the file format's default actions.
                    cfg.ports.push(PortLimits {
                        port: o.port as u32,
                        max_connections: None,
                        connection_action: Action::Reject,
                        new_connections: None,
                        rate_action: Action::Drop,
                        syn_cookies: Default::default(),
                        syn_cookie_threshold: crate::config::DEFAULT_SYN_COOKIE_THRESHOLD,
                    });
                    cfg.ports.len() - 1
                }
            };
            let p = &mut cfg.ports[i];
            let c = &o.change;
            if let Some(m) = c.max_connections {
                p.max_connections = m.into_option().map(|m: MaxConnections| m.0);
            }
            if let Some(r) = c.new_connections {
                p.new_connections = r.into_option().map(|r: RateLimit| r.0);
            }
            if let Some(a) = c.connection_action {
                p.connection_action = a.into();
            }
            if let Some(a) = c.rate_action {
                p.rate_action = a.into();
            }
            if let Some(m) = c.syn_cookies {
                p.syn_cookies = m;
            }
        }
        self.overlay_lists(&mut cfg, file);
        cfg
    }
}

/// Where a port's limits come from.
pub fn origin(file: &Config, overrides: &Overrides, port: u16) -> &'static str {
    let in_file = file.ports.iter().any(|p| p.port == port as u32);
    match (in_file, overrides.port(port).is_some()) {
        (true, false) => "config",
        (true, true) => "config+runtime",
        (false, _) => "runtime",
    }
}

/// One port's limits in the protocol's form.
pub fn port_info(p: &PortLimits) -> crate::control::protocol::PortInfo {
    crate::control::protocol::PortInfo {
        port: p.port as u16,
        max_connections: p.max_connections,
        connection_action: ActionName::from(p.connection_action),
        new_connections: p.new_connections.map(|r| r.to_string()),
        rate_action: ActionName::from(p.rate_action),
        source: String::new(),
        syn_cookies: p.syn_cookies.to_string(),
        syn_cookies_active: false,
    }
}

/// The effective configuration, validated whole: `Err` names what is wrong, and nothing is
/// applied.
pub fn effective(file: &Config, overrides: &Overrides) -> Result<Config, String> {
    let cfg = overrides.overlay(file);
    check(&cfg)?;
    Ok(cfg)
}

impl Overrides {
    /// The allow/deny lists of the effective config: the file's, with these changes.
    fn overlay_lists(&self, cfg: &mut Config, file: &Config) {
        cfg.allow = self.list_entries(ListName::Allow, &file.allow);
        cfg.deny = self.list_entries(ListName::Deny, &file.deny);
    }
}

/// Puts `cfg` in force ([`crate::guard::Guard::apply`]: the allow/deny lists whole or nothing,
/// then the global settings and the ports; on an error the caller applies the previous config).
pub fn apply(guard: &mut crate::guard::Guard, cfg: &Config) -> anyhow::Result<()> {
    guard.apply(cfg)
}

/// Validates the effective config like a config file.
fn check(cfg: &Config) -> Result<(), String> {
    cfg.check("the config file with the runtime overrides")
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_CONFIG;
    use crate::control::protocol::Limit;

    fn file() -> Config {
        Config::parse(DEFAULT_CONFIG, "default").unwrap()
    }

    #[test]
    fn overrides_overlay_and_reset() {
        let f = file();
        let mut o = Overrides::default();
        o.set_port(
            9000,
            &LimitChange {
                max_connections: Some(Limit::Value(MaxConnections(7))),
                ..Default::default()
            },
        );
        o.set_port(
            9000,
            &LimitChange {
                new_connections: Some(Limit::Unlimited),
                connection_action: Some(ActionName::Drop),
                ..Default::default()
            },
        );
        o.set_port(
            9100,
            &LimitChange {
                max_connections: Some(Limit::Value(MaxConnections(1))),
                ..Default::default()
            },
        );
        o.monitor = Some(true);
        let e = effective(&f, &o).unwrap();
        let p = e.ports.iter().find(|p| p.port == 9000).unwrap();
        assert_eq!(p.max_connections, Some(7));
        assert_eq!(p.new_connections, None);
        assert_eq!(p.connection_action, Action::Drop);
        assert!(e.monitor);
        assert_eq!(origin(&f, &o, 9000), "config+runtime");
        assert_eq!(origin(&f, &o, 9100), "runtime");
        assert!(o.reset_port(9100));
        assert!(!o.reset_port(9100));
        assert_eq!(effective(&f, &o).unwrap().ports.len(), f.ports.len());
    }

    #[test]
    fn save_is_atomic_and_round_trips() {
        let dir = tempfile_dir();
        let path = dir.join("sub/runtime.toml");
        let mut o = Overrides {
            monitor: Some(false),
            ..Default::default()
        };
        o.set_port(
            9000,
            &LimitChange {
                new_connections: Some(Limit::Value("5/10s".parse().unwrap())),
                rate_action: Some(ActionName::Reject),
                ..Default::default()
            },
        );
        o.save(&path).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(Overrides::load(&path).unwrap(), o);
        // No temporary file left behind.
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
        assert_eq!(
            Overrides::load(&dir.join("missing.toml")).unwrap(),
            Overrides::default()
        );
        fs::write(&path, "port = 3").unwrap();
        assert!(matches!(
            Overrides::load(&path),
            Err(StateError::Parse { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn port_changes_are_written_as_the_config_writes_them() {
        let mut o = Overrides::default();
        o.set_port(
            9000,
            &LimitChange {
                max_connections: Some(Limit::Value(MaxConnections(2))),
                new_connections: Some(Limit::Value("9/100s".parse().unwrap())),
                connection_action: Some(ActionName::Drop),
                ..Default::default()
            },
        );
        let text = toml::to_string(&o).unwrap();
        // A [[port]] table the config file takes as it is (numbers as numbers).
        assert!(text.contains("max_connections = 2\n"), "{text}");
        let cfg = Config::parse(&text, "state").unwrap();
        assert_eq!(cfg.ports[0].max_connections, Some(2));
        assert_eq!(cfg.ports[0].connection_action, Action::Drop);
        assert_eq!(
            cfg.ports[0]
                .new_connections
                .map(|r| r.to_string())
                .as_deref(),
            Some("9/1m 40s")
        );
        // State files of earlier versions (counts as strings) still read.
        let old: Overrides =
            toml::from_str("[[port]]\nport = 9000\nmax_connections = \"2\"\n").unwrap();
        assert_eq!(
            old.port(9000).unwrap().change.max_connections,
            Some(Limit::Value(MaxConnections(2)))
        );
    }

    #[test]
    fn list_changes() {
        let file: Vec<IpNet> = vec!["198.18.0.0/24".parse().unwrap()];
        let a: IpNet = "198.18.1.0/24".parse().unwrap();
        let mut o = Overrides::default();
        o.list_add(ListName::Allow, &file, a).unwrap();
        assert!(o.list_add(ListName::Allow, &file, a).is_err());
        assert!(o.list_add(ListName::Allow, &file, file[0]).is_err());
        assert_eq!(o.list_entries(ListName::Allow, &file), vec![file[0], a]);
        o.list_remove(ListName::Allow, &file, file[0]).unwrap();
        assert!(o.list_remove(ListName::Allow, &file, file[0]).is_err());
        assert_eq!(o.list_entries(ListName::Allow, &file), vec![a]);
        o.list_add(ListName::Allow, &file, file[0]).unwrap();
        o.list_remove(ListName::Allow, &file, a).unwrap();
        // Changed at runtime, even if back to the file's entries: the state file holds the
        // whole list, in the config's schema, until `allow reset`.
        assert_eq!(o.list_entries(ListName::Allow, &file), file);
        assert!(o.list_changed(ListName::Allow));
        let text = toml::to_string(&o).unwrap();
        assert_eq!(text, "allow = [\"198.18.0.0/24\"]\n");
        assert!(o.list_reset(ListName::Allow));
        assert!(!o.list_reset(ListName::Allow));
        assert_eq!(o, Overrides::default());
        assert!(o.list_remove(ListName::Deny, &file, a).is_err());
        assert_eq!(
            o,
            Overrides::default(),
            "a refused change changes nothing it keeps"
        );
    }

    #[test]
    fn the_state_file_is_a_config_fragment_and_older_ones_still_read() {
        let f = file();
        let mut o = Overrides::default();
        o.list_add(ListName::Deny, &f.deny, "198.19.0.0/16".parse().unwrap())
            .unwrap();
        o.monitor = Some(true);
        o.set_port(
            9000,
            &LimitChange {
                max_connections: Some(Limit::Value(MaxConnections(5))),
                ..Default::default()
            },
        );
        // The whole state file parses as a config file (its keys in the config's schema).
        let cfg = Config::parse(&toml::to_string(&o).unwrap(), "state").unwrap();
        assert!(cfg.monitor);
        assert_eq!(cfg.deny, vec!["198.19.0.0/16".parse::<IpNet>().unwrap()]);
        assert_eq!(cfg.ports[0].max_connections, Some(5));
        // An earlier version's differences: laid over the file, then turned into the whole
        // list on the next change of that list, and written in the new form.
        let file: Vec<IpNet> = vec!["198.18.0.0/24".parse().unwrap()];
        let mut old: Overrides = toml::from_str(
            "allow_added = [\"198.18.1.0/24\"]\nallow_removed = [\"198.18.0.0/24\"]\n",
        )
        .unwrap();
        let one: IpNet = "198.18.1.0/24".parse().unwrap();
        assert_eq!(old.list_entries(ListName::Allow, &file), vec![one]);
        let two: IpNet = "198.18.2.0/24".parse().unwrap();
        old.list_add(ListName::Allow, &file, two).unwrap();
        assert_eq!(old.allow, Some(vec![one, two]));
        assert!(old.allow_added.is_empty() && old.allow_removed.is_empty());
        assert_eq!(
            toml::to_string(&old).unwrap(),
            "allow = [\"198.18.1.0/24\", \"198.18.2.0/24\"]\n"
        );
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "wsg-state-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }
}
