//! The control protocol: one JSON [`Request`] per line from the client, one JSON [`Response`]
//! per line back. Lines are limited to [`MAX_LINE`] bytes; anything malformed or oversized gets
//! an error response, never a panic.

use std::{fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::config::{Action, Rate};

/// The longest request line the daemon accepts (bytes, newline excluded): room for a whole
/// list of IPv6 CIDRs at the largest capacity in one `list_add_all` (16,384 of up to 46
/// bytes each: ~750 KiB). Responses carry lists (bans, sources), so they get more room.
pub const MAX_LINE: usize = 1024 * 1024;
/// The longest response line a client accepts.
pub const MAX_RESPONSE: usize = 16 * 1024 * 1024;

/// A limit that can also be switched off (`none` on the command line and in the state file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit<T> {
    /// No limit.
    Unlimited,
    Value(T),
}

impl<T> Limit<T> {
    /// `None` for no limit.
    pub fn into_option(self) -> Option<T> {
        match self {
            Limit::Unlimited => None,
            Limit::Value(v) => Some(v),
        }
    }
}

impl<T: fmt::Display> fmt::Display for Limit<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Unlimited => f.write_str("none"),
            Limit::Value(v) => v.fmt(f),
        }
    }
}

impl<T: FromStr<Err = String>> FromStr for Limit<T> {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim() == "none" {
            Ok(Limit::Unlimited)
        } else {
            s.trim().parse().map(Limit::Value)
        }
    }
}

// In JSON and in the state file as the config file writes it: a count as a number (`3`),
// a rate as its string (`"9/100s"`), no limit as `"none"`. Read from either form.
impl<T: fmt::Display> Serialize for Limit<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = self.to_string();
        match text.parse::<u32>() {
            Ok(n) => s.serialize_u32(n),
            Err(_) => s.serialize_str(&text),
        }
    }
}

impl<'de, T: FromStr<Err = String>> Deserialize<'de> for Limit<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Number(u64),
            Text(String),
        }
        let text = match Form::deserialize(d)? {
            Form::Number(n) => n.to_string(),
            Form::Text(t) => t,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A concurrency limit: 1 or more connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxConnections(pub u32);

impl FromStr for MaxConnections {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().parse::<u32>() {
            Ok(0) => Err("0 would refuse every connection; use `none` for no limit".into()),
            Ok(n) => Ok(MaxConnections(n)),
            Err(_) => Err(format!(
                "{s:?} is not a number of connections (1-{}) or `none`",
                u32::MAX
            )),
        }
    }
}

impl fmt::Display for MaxConnections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A rate limit `N/WINDOW` (validated like the config file's `new_connections`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit(pub Rate);

impl FromStr for RateLimit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse().map(RateLimit)
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// `drop` or `reject`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ActionName {
    /// Drop the SYN silently.
    Drop,
    /// Answer with a TCP RST.
    Reject,
}

impl From<ActionName> for Action {
    fn from(a: ActionName) -> Self {
        match a {
            ActionName::Drop => Action::Drop,
            ActionName::Reject => Action::Reject,
        }
    }
}

impl From<Action> for ActionName {
    fn from(a: Action) -> Self {
        match a {
            Action::Drop => ActionName::Drop,
            Action::Reject => ActionName::Reject,
        }
    }
}

impl fmt::Display for ActionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Action::from(*self).fmt(f)
    }
}

/// Changes to one port's limits; a field left `None` keeps its current value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitChange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<Limit<MaxConnections>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_connections: Option<Limit<RateLimit>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_action: Option<ActionName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_action: Option<ActionName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syn_cookies: Option<crate::config::CookieMode>,
}

impl LimitChange {
    /// Nothing to change.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The allowlist or the denylist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListName {
    Allow,
    Deny,
}

impl fmt::Display for ListName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ListName::Allow => "allow",
            ListName::Deny => "deny",
        })
    }
}

/// How `sources top` orders sources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SortBy {
    /// Connections held now.
    Connections,
    /// Attempts refused since they were first seen.
    Drops,
}

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    LimitsGet {
        #[serde(default)]
        port: Option<u16>,
    },
    LimitsSet {
        port: u16,
        change: LimitChange,
    },
    LimitsReset {
        port: u16,
    },
    ListAdd {
        list: ListName,
        cidr: String,
    },
    /// Adds many CIDRs at once (an imported block list), whole or not at all.
    ListAddAll {
        list: ListName,
        cidrs: Vec<String>,
    },
    ListRemove {
        list: ListName,
        cidr: String,
    },
    /// Drops the runtime changes of a list: the config file's is in force again.
    ListReset {
        list: ListName,
    },
    ListShow {
        list: ListName,
    },
    /// The configuration in force, as TOML: the config file, or with `effective` the file with
    /// the runtime changes laid over it.
    ConfigShow {
        #[serde(default)]
        effective: bool,
    },
    BansList,
    BanAdd {
        addr: IpAddr,
        #[serde(default)]
        port: Option<u16>,
        /// Milliseconds; `None`: the configured ban_duration, or an hour if that is 0.
        #[serde(default)]
        duration_ms: Option<u64>,
    },
    BanRemove {
        addr: IpAddr,
        #[serde(default)]
        port: Option<u16>,
    },
    SourcesTop {
        by: SortBy,
        n: usize,
    },
    Monitor {
        on: bool,
    },
    /// The events the daemon keeps (bans started and ended, sampled refusals) after sequence
    /// number `since` (all it keeps without it); `ws-guard events --follow` polls this.
    Events {
        #[serde(default)]
        since: Option<u64>,
    },
}

/// The daemon's answer: `{"ok": DATA}` or `{"error": MESSAGE}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok(serde_json::Value),
    Error(String),
    /// The client may not use the socket (not root); the connection is closed.
    Denied(String),
}

impl Response {
    /// An error response.
    pub fn error(message: impl Into<String>) -> Self {
        Response::Error(message.into())
    }

    /// `data` as an ok response.
    pub fn ok<T: Serialize>(data: &T) -> Self {
        match serde_json::to_value(data) {
            Ok(v) => Response::Ok(v),
            Err(e) => Response::Error(format!("encoding the reply: {e}")),
        }
    }

    /// One line of JSON, newline included.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self)
            .unwrap_or_else(|e| format!("{{\"error\":\"encoding the reply: {e}\"}}"));
        s.push('\n');
        s
    }
}

/// Parses one request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_LINE {
        return Err(format!(
            "request of {} bytes refused: at most {MAX_LINE} bytes per line",
            line.len()
        ));
    }
    serde_json::from_slice(line).map_err(|e| format!("malformed request: {e}"))
}

/// One port's limits as they are in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortInfo {
    pub port: u16,
    /// `null`: no concurrency limit.
    pub max_connections: Option<u32>,
    pub connection_action: ActionName,
    /// `COUNT/WINDOW` (e.g. `9/1m 40s`); `null`: no rate limit.
    pub new_connections: Option<String>,
    pub rate_action: ActionName,
    /// Where these limits come from: "config", "runtime" (an override of `limits set`), or
    /// "config+runtime".
    pub source: String,
    /// The port's `syn_cookies` setting: "off", "on" or "auto".
    #[serde(default = "cookies_off")]
    pub syn_cookies: String,
    /// In SYN-cookie mode now (new sources judged at the ACK of their cookie).
    #[serde(default)]
    pub syn_cookies_active: bool,
}

fn cookies_off() -> String {
    "off".into()
}

/// `limits get`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsReply {
    pub monitor: bool,
    pub ports: Vec<PortInfo>,
}

/// An interface the XDP program is attached to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceInfo {
    pub interface: String,
    pub mode: String,
    pub attached: bool,
}

/// Counters of one port and family.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortCounters {
    pub port: u16,
    pub family: String,
    pub tracked_sources: u64,
    pub active_connections: u64,
    pub half_open: u64,
    pub established: u64,
    /// Every counter by name (`ws_guard_common::maps::Counter::name`).
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// How full one map is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapInfo {
    pub map: String,
    pub entries: u64,
    pub capacity: u64,
}

/// `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    pub version: String,
    pub pid: u32,
    pub monitor: bool,
    pub config_file: Option<String>,
    pub state_file: String,
    pub interfaces: Vec<InterfaceInfo>,
    pub ports: Vec<PortInfo>,
    pub counters: Vec<PortCounters>,
    pub maps: Vec<MapInfo>,
    /// Connections found in another network namespace that match no admitted attempt (SNAT,
    /// masquerade, a proxy), since the daemon started: charged to no source.
    #[serde(default)]
    pub unmatched_connections: u64,
}

/// One source in `sources top`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// `ADDRESS/PREFIX`.
    pub source: String,
    pub port: u16,
    pub connections: u64,
    pub drops: u64,
}

/// `sources top`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcesReply {
    pub by: SortBy,
    pub sources: Vec<SourceInfo>,
}

/// `allow list` / `deny list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListReply {
    pub list: ListName,
    /// Every CIDR in force, sorted.
    pub cidrs: Vec<String>,
    /// "config" (the config file's list) or "runtime" (changed with `add`/`remove` since;
    /// `reset` goes back to the file's).
    #[serde(default)]
    pub source: String,
}

/// One active ban.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BanInfo {
    pub source: String,
    pub port: u16,
    pub remaining_ms: u64,
    /// "rate" or "manual".
    pub reason: String,
}

/// `bans list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BansReply {
    pub bans: Vec<BanInfo>,
}

/// What a change did, for humans; scripts read the structured fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeReply {
    pub message: String,
    /// Whether the change was written to the state file.
    pub persisted: bool,
}

/// What an event says happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A source was banned from a port (`reason`: `rate` or `manual`; `duration_ms`).
    BanStarted,
    /// A ban ran out (`reason`: `expired`; `ban_reason`: the ban's), or was lifted with `bans
    /// remove` (`reason`: `lifted`).
    BanEnded,
    /// A source's attempts on a port were refused since the last event about it (`count`;
    /// `reason`: `banned`, `denied` or `limit`), sampled every sweep.
    Refused,
    /// `refused` events left out by the rate limit: `count` attempts from `sources` (source,
    /// port) pairs.
    RefusedSuppressed,
}

/// One event of `ws-guard events` (JSON Lines with `--json`: these field names are stable;
/// absent fields are left out).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventInfo {
    /// Sequence number: 1 for the daemon's first event, one more for each.
    pub seq: u64,
    /// When the daemon recorded it: RFC 3339, UTC, milliseconds.
    pub time: String,
    pub kind: EventKind,
    /// `ADDRESS/PREFIX`, the source key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Refused attempts (`refused`, `refused_suppressed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// (source, port) pairs whose events were left out (`refused_suppressed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<u64>,
    /// How long the ban lasts (`ban_started`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Why the ban that ended was made (`ban_ended`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ban_reason: Option<String>,
}

impl EventInfo {
    /// An event of `kind` with no details yet (`seq` and `time` are set when it is recorded).
    pub fn new(kind: EventKind) -> Self {
        Self {
            seq: 0,
            time: String::new(),
            kind,
            source: None,
            port: None,
            reason: None,
            count: None,
            sources: None,
            duration_ms: None,
            ban_reason: None,
        }
    }

    /// What happened, as the daemon logs it (`ban started: source=198.18.0.5/32 port=9000
    /// reason=rate duration=1m`), without the time.
    pub fn message(&self) -> String {
        let s = |o: &Option<String>| o.clone().unwrap_or_default();
        let n = |o: Option<u64>| o.unwrap_or_default();
        let where_ = format!(
            "source={} port={}",
            s(&self.source),
            self.port.unwrap_or_default()
        );
        match self.kind {
            EventKind::BanStarted => format!(
                "ban started: {where_} reason={} duration={}",
                s(&self.reason),
                humantime::format_duration(std::time::Duration::from_secs(
                    n(self.duration_ms).div_ceil(1000)
                ))
            ),
            EventKind::BanEnded => match &self.ban_reason {
                Some(b) => format!(
                    "ban ended: {where_} reason={} ban_reason={b}",
                    s(&self.reason)
                ),
                None => format!("ban ended: {where_} reason={}", s(&self.reason)),
            },
            EventKind::Refused => format!(
                "refused: {where_} reason={} count={}",
                s(&self.reason),
                n(self.count)
            ),
            EventKind::RefusedSuppressed => format!(
                "refused events suppressed: count={} sources={}",
                n(self.count),
                n(self.sources)
            ),
        }
    }

    /// The line of `ws-guard events` without `--json`: the time, then [`EventInfo::message`].
    pub fn line(&self) -> String {
        format!("{} {}", self.time, self.message())
    }
}

/// `events`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsReply {
    /// The sequence number of the daemon's last event (0: none yet); the next request's
    /// `since`.
    pub seq: u64,
    /// Events after `since` that are no longer kept (the daemon keeps the last
    /// [`crate::events::RING_CAPACITY`]).
    pub lost: u64,
    pub events: Vec<EventInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let reqs = [
            Request::Status,
            Request::LimitsGet { port: Some(9000) },
            Request::LimitsSet {
                port: 9000,
                change: LimitChange {
                    max_connections: Some(Limit::Value(MaxConnections(2))),
                    new_connections: Some(Limit::Unlimited),
                    connection_action: Some(ActionName::Drop),
                    rate_action: None,
                    syn_cookies: Some(crate::config::CookieMode::Auto),
                },
            },
            Request::BanAdd {
                addr: "198.18.0.1".parse().unwrap(),
                port: None,
                duration_ms: Some(1000),
            },
            Request::SourcesTop {
                by: SortBy::Drops,
                n: 5,
            },
            Request::Events { since: None },
            Request::Events { since: Some(7) },
        ];
        for r in reqs {
            let line = serde_json::to_string(&r).unwrap();
            assert_eq!(parse_request(line.as_bytes()).unwrap(), r, "{line}");
        }
    }

    #[test]
    fn malformed_and_oversized_requests_are_errors() {
        for bad in [
            &b"{"[..],
            b"",
            b"null",
            b"\xff\xfe",
            br#"{"command":"nope"}"#,
            br#"{"command":"limits_set","port":70000,"change":{}}"#,
            br#"{"command":"limits_set","port":1,"change":{"max_connections":"0"}}"#,
            br#"{"command":"limits_set","port":1,"change":{"new_connections":"33/1s"}}"#,
            br#"{"command":"limits_set","port":1,"change":{"new_connections":"3/0s"}}"#,
        ] {
            let e = parse_request(bad).unwrap_err();
            assert!(e.starts_with("malformed request"), "{e}");
        }
        let big = vec![b' '; MAX_LINE + 1];
        assert!(parse_request(&big).unwrap_err().contains("at most"));
    }

    #[test]
    fn limits_parse_and_print() {
        let l: Limit<RateLimit> = "9/100s".parse().unwrap();
        assert_eq!(l.to_string(), "9/1m 40s");
        assert_eq!(l.to_string().parse::<Limit<RateLimit>>().unwrap(), l);
        assert_eq!(
            "none".parse::<Limit<MaxConnections>>(),
            Ok(Limit::Unlimited)
        );
        assert!("0".parse::<Limit<MaxConnections>>().is_err());
        assert!("-1".parse::<Limit<MaxConnections>>().is_err());
        assert!("33/1s".parse::<Limit<RateLimit>>().is_err());
        let r = Response::Error("x".into());
        assert_eq!(r.to_line(), "{\"error\":\"x\"}\n");
    }
}
