//! The configuration file's reference: every key with its default and meaning, rendered as the
//! `ws-guard.toml(5)` man page (`ws-guard man`). A test checks that it names exactly the keys
//! [`crate::config::to_toml`] writes, so a key cannot be added without being documented.

use roff::{Roff, bold, italic, roman};

/// One key: its TOML path (`capacity.flows`, `port.max_connections`), default, meaning.
pub struct Key {
    pub key: &'static str,
    pub default: &'static str,
    pub meaning: &'static str,
}

/// Every key of the configuration file, in the order of the file.
pub const KEYS: &[Key] = &[
    Key {
        key: "interfaces",
        default: "[] (the interface of the default route)",
        meaning: "Interfaces to attach the XDP program to: the ones clients' traffic arrives \
                  on (the host's, for servers in containers behind published ports).",
    },
    Key {
        key: "xdp_mode",
        default: "\"auto\"",
        meaning: "\"auto\": native XDP, falling back to generic with a warning; generic on a \
                  veth or a bond of veths, where native XDP cannot send the RSTs of reject to \
                  a peer without an XDP program. \"native\" or \"generic\" force a mode.",
    },
    Key {
        key: "monitor",
        default: "false",
        meaning: "Count what would be refused, refuse nothing (for roll-outs).",
    },
    Key {
        key: "ipv4_prefix",
        default: "32",
        meaning: "Sources are keyed by their address masked to this prefix (0-32), like \
                  --connlimit-mask. A change at runtime moves the connections held to the new \
                  keys.",
    },
    Key {
        key: "ipv6_prefix",
        default: "64",
        meaning: "The same for IPv6 (0-128).",
    },
    Key {
        key: "on_map_full",
        default: "\"open\"",
        meaning: "An attempt that cannot be tracked because a map is full: \"open\" passes it \
                  untracked, \"closed\" refuses it with the port's connection_action.",
    },
    Key {
        key: "fragments",
        default: "\"drop\"",
        meaning: "The first fragment of a TCP segment to a protected port: \"drop\" (a SYN \
                  sent in fragments would otherwise reach the kernel unjudged) or \"pass\".",
    },
    Key {
        key: "handshake_timeout",
        default: "\"60s\"",
        meaning: "A half-open connection stops holding a slot after this (1s to 1h).",
    },
    Key {
        key: "sweep_interval",
        default: "\"1s\"",
        meaning: "How often the accounting is checked against the socket tables of every \
                  network namespace (100ms to 60s).",
    },
    Key {
        key: "wait_for_interfaces",
        default: "\"45s\"",
        meaning: "At start, how long to wait for the interfaces (or a default route) to \
                  appear; \"0s\" fails at once (at most 10m).",
    },
    Key {
        key: "kernel_log",
        default: "\"warn\"",
        meaning: "Log level of the kernel programs: off, error, warn, info, debug, trace.",
    },
    Key {
        key: "log_format",
        default: "\"auto\"",
        meaning: "The daemon's log lines: \"text\", \"json\" (JSON Lines), \"journald\" \
                  (priorities and fields), or \"auto\": journald when systemd's \
                  JOURNAL_STREAM says stderr goes to the journal, else text. One line per \
                  record.",
    },
    Key {
        key: "allow",
        default: "[]",
        meaning: "CIDRs never limited or banned (still counted). IPv4-mapped IPv6 CIDRs are \
                  the IPv4 ones.",
    },
    Key {
        key: "deny",
        default: "[]",
        meaning: "CIDRs whose new connections are always dropped (allow wins over deny).",
    },
    Key {
        key: "ban_duration",
        default: "\"0s\" (no automatic bans)",
        meaning: "A source refused by a port's new_connections is banned from that port for \
                  this long (at most 365 days).",
    },
    Key {
        key: "state_file",
        default: "\"/var/lib/ws-guard/runtime.toml\"",
        meaning: "Where runtime changes made with the CLI are kept, laid over this file.",
    },
    Key {
        key: "capacity.sources",
        default: "65536",
        meaning: "(source, port) pairs tracked at once (takes effect after `ws-guard \
                  teardown`).",
    },
    Key {
        key: "capacity.flows",
        default: "262144",
        meaning: "Connections (half-open and established) tracked at once.",
    },
    Key {
        key: "capacity.bans",
        default: "65536",
        meaning: "Bans in force at once (never evicted).",
    },
    Key {
        key: "capacity.cidrs",
        default: "16384",
        meaning: "CIDRs per list (allow, deny).",
    },
    Key {
        key: "capacity.rate_attempts",
        default: "the largest new_connections count, at least 10",
        meaning: "Attempts each source's rate window remembers (1 to 32, 4 bytes each): the \
                  largest count that can be set without a restart.",
    },
    Key {
        key: "metrics.listen",
        default: "\"127.0.0.1:9105\"",
        meaning: "The Prometheus endpoint's address; \"off\" serves nothing.",
    },
    Key {
        key: "metrics.top_sources",
        default: "0",
        meaning: "Export the N sources holding the most connections (0: none).",
    },
    Key {
        key: "control.socket",
        default: "\"/run/ws-guard/control.sock\"",
        meaning: "The CLI's control socket (root only).",
    },
    Key {
        key: "port.port",
        default: "(required)",
        meaning: "A protected TCP port, one [[port]] table each (at least one, at most 64), as \
                  clients connect to it where ws-guard is attached (behind `docker run -p \
                  8080:9000` on the host: 8080).",
    },
    Key {
        key: "port.max_connections",
        default: "(none)",
        meaning: "Concurrent connections, half-open included, per source (at least 1); \
                  \"none\" (as the state file writes a limit switched off) is no limit.",
    },
    Key {
        key: "port.connection_action",
        default: "\"reject\"",
        meaning: "What attempts over max_connections get: \"reject\" (a TCP RST from XDP) or \
                  \"drop\".",
    },
    Key {
        key: "port.new_connections",
        default: "(none)",
        meaning: "COUNT/WINDOW: at most COUNT (1-32) new connections per source in any window \
                  of WINDOW (at most 7 days), e.g. \"9/100s\"; \"none\" is no limit.",
    },
    Key {
        key: "port.rate_action",
        default: "\"drop\"",
        meaning: "What attempts over new_connections get: \"drop\" or \"reject\".",
    },
    Key {
        key: "port.syn_cookies",
        default: "\"off\"",
        meaning: "\"on\": a new attempt of a source without state is answered from XDP with a \
                  SYN cookie and judged at the ACK that returns it, so forged sources cost no \
                  state; \"auto\": on while the port has more half-open attempts than \
                  syn_cookie_threshold; \"off\": every attempt is judged on its SYN. While on, \
                  the daemon sets net.ipv4.tcp_syncookies = 2 and net.ipv4.tcp_timestamps = 2 \
                  (restored after).",
    },
    Key {
        key: "port.syn_cookie_threshold",
        default: "1000",
        meaning: "With syn_cookies = \"auto\": the half-open attempts of the port that switch \
                  cookies on; they go off once the flood is under half of it for 10 s.",
    },
];

/// The `ws-guard.toml(5)` man page.
pub fn man_page(version: &str) -> String {
    let mut page = Roff::new();
    page.control(
        "TH",
        ["ws-guard.toml", "5", "", &format!("ws-guard {version}")],
    )
    .control("SH", ["NAME"])
    .text([roman("ws-guard.toml - the configuration file of ws-guard")])
    .control("SH", ["SYNOPSIS"])
    .text([
        bold("/etc/ws-guard/config.toml"),
        roman(": TOML, read by "),
        bold("ws-guard run --config"),
        roman(" at start and on SIGHUP. Every key is optional except one "),
        bold("[[port]]"),
        roman(" table. "),
        bold("ws-guard check-config FILE"),
        roman(" validates a file; "),
        bold("ws-guard config show --effective"),
        roman(" prints the configuration in force, every key spelled out."),
    ])
    .control("SH", ["KEYS"]);
    for k in KEYS {
        page.control("TP", [])
            .text([
                bold(k.key),
                roman(" (default "),
                italic(k.default),
                roman(")"),
            ])
            .text([roman(k.meaning)]);
    }
    page.control("SH", ["SEE ALSO"])
        .text([bold("ws-guard"), roman("(1), docs/configuration.md.")]);
    page.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, DEFAULT_CONFIG, to_toml};

    /// The keys of a TOML document, dotted (`capacity.flows`; `[[port]]` keys as `port.X`).
    fn keys(v: &toml::Value, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    match v {
                        toml::Value::Table(_) => keys(v, &path, out),
                        toml::Value::Array(a)
                            if a.iter().all(|x| x.is_table()) && !a.is_empty() =>
                        {
                            for x in a {
                                keys(x, &path, out);
                            }
                        }
                        _ => {
                            out.insert(path);
                        }
                    }
                }
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn every_key_is_documented_once() {
        let mut cfg = Config::parse(DEFAULT_CONFIG, "default").unwrap();
        // A port with every optional key set, so each is written.
        cfg.ports[0].max_connections = Some(3);
        cfg.ports[0].new_connections = Some("9/100s".parse().unwrap());
        cfg.capacity.rate_attempts = Some(9);
        let written: toml::Value = toml::from_str(&to_toml(&cfg)).unwrap();
        let mut have = std::collections::BTreeSet::new();
        keys(&written, "", &mut have);
        let documented: std::collections::BTreeSet<String> =
            KEYS.iter().map(|k| k.key.to_owned()).collect();
        assert_eq!(documented.len(), KEYS.len(), "a key documented twice");
        assert_eq!(have, documented);
    }

    #[test]
    fn the_man_page_names_every_key() {
        let page = man_page("1.2.3");
        assert!(page.contains("\n.TH ws-guard.toml 5"), "{page}");
        for k in KEYS {
            assert!(page.contains(k.key), "{}", k.key);
        }
    }
}
