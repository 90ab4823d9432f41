//! Human-readable output of the daemon's answers: aligned tables.

use anyhow::Context as _;

use crate::control::protocol::{
    BansReply, ChangeReply, LimitsReply, ListReply, PortInfo, Request, SourcesReply, StatusReply,
};

/// Rows under headers, each column as wide as its widest cell, two spaces apart.
fn table(headers: &[&str], rows: &[Vec<String>], indent: &str) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::from(indent);
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  "));
            }
        }
        l.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn ports_table(ports: &[PortInfo], indent: &str) -> String {
    let rows: Vec<Vec<String>> = ports
        .iter()
        .map(|p| {
            vec![
                p.port.to_string(),
                p.max_connections
                    .map_or_else(|| "none".to_owned(), |n| n.to_string()),
                p.connection_action.to_string(),
                p.new_connections
                    .clone()
                    .unwrap_or_else(|| "none".to_owned()),
                p.rate_action.to_string(),
                if p.syn_cookies_active {
                    format!("{} (active)", p.syn_cookies)
                } else {
                    p.syn_cookies.clone()
                },
                p.source.clone(),
            ]
        })
        .collect();
    table(
        &[
            "PORT",
            "MAX CONNECTIONS",
            "THEN",
            "NEW CONNECTIONS",
            "THEN",
            "SYN COOKIES",
            "FROM",
        ],
        &rows,
        indent,
    )
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

/// The text for `req`'s answer `data`.
pub fn human(req: &Request, data: serde_json::Value) -> anyhow::Result<String> {
    let bad = || format!("unexpected answer from the daemon: {data}");
    Ok(match req {
        Request::Status => {
            let s: StatusReply = serde_json::from_value(data.clone()).with_context(bad)?;
            let mut o = format!(
                "ws-guard {} (pid {}), monitor mode {}\n",
                s.version,
                s.pid,
                on_off(s.monitor)
            );
            o += &format!(
                "config file: {}\nruntime changes: {}\n\ninterfaces:\n",
                s.config_file.as_deref().unwrap_or("(built-in default)"),
                s.state_file
            );
            let rows: Vec<Vec<String>> = s
                .interfaces
                .iter()
                .map(|i| {
                    vec![
                        i.interface.clone(),
                        format!("{} XDP", i.mode),
                        if i.attached {
                            "attached"
                        } else {
                            "gone (re-attached when back)"
                        }
                        .into(),
                    ]
                })
                .collect();
            o += &table(&["INTERFACE", "MODE", "STATE"], &rows, "  ");
            o += "\nlimits per source:\n";
            o += &ports_table(&s.ports, "  ");
            o += "\ncounters:\n";
            let rows: Vec<Vec<String>> = s
                .counters
                .iter()
                .map(|c| {
                    let n = |k: &str| c.counters.get(k).copied().unwrap_or(0).to_string();
                    let mut r = vec![
                        c.port.to_string(),
                        c.family.clone(),
                        c.tracked_sources.to_string(),
                        c.active_connections.to_string(),
                        c.half_open.to_string(),
                        n("admitted"),
                        n("conn_limited"),
                        n("rate_limited"),
                    ];
                    for k in ["allowed", "denied", "banned"] {
                        if c.counters.contains_key(k) {
                            r.push(n(k));
                        }
                    }
                    r.push(n("monitor_would_block"));
                    r
                })
                .collect();
            let extra = s
                .counters
                .first()
                .map(|c| {
                    ["allowed", "denied", "banned"]
                        .into_iter()
                        .filter(|k| c.counters.contains_key(*k))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            let mut headers = vec![
                "PORT",
                "FAMILY",
                "SOURCES",
                "ACTIVE",
                "HALF-OPEN",
                "ADMITTED",
                "CONN LIMITED",
                "RATE LIMITED",
            ];
            let upper: Vec<String> = extra.iter().map(|k| k.to_uppercase()).collect();
            headers.extend(upper.iter().map(String::as_str));
            headers.push("WOULD BLOCK");
            o += &table(&headers, &rows, "  ");
            o += "\nmaps:\n";
            let rows: Vec<Vec<String>> = s
                .maps
                .iter()
                .map(|m| {
                    let pct = if m.capacity == 0 {
                        0.0
                    } else {
                        100.0 * m.entries as f64 / m.capacity as f64
                    };
                    vec![
                        m.map.clone(),
                        m.entries.to_string(),
                        m.capacity.to_string(),
                        format!("{pct:.1}%"),
                    ]
                })
                .collect();
            o += &table(&["MAP", "ENTRIES", "CAPACITY", "FILL"], &rows, "  ");
            if s.unmatched_connections > 0 {
                o += &format!(
                    "\n{} connection(s) in other network namespaces matched no admitted attempt \
                     (client address rewritten: SNAT, masquerade, a proxy); per-source limits do \
                     not apply to them (docs/containers.md, \"Deploying with containers\")\n",
                    s.unmatched_connections
                );
            }
            o
        }
        Request::LimitsGet { .. } => {
            let l: LimitsReply = serde_json::from_value(data.clone()).with_context(bad)?;
            let mut o = ports_table(&l.ports, "");
            if l.monitor {
                o += "monitor mode on: nothing is refused, would-be refusals are counted\n";
            }
            o
        }
        Request::ListShow { .. } => {
            let l: ListReply = serde_json::from_value(data.clone()).with_context(bad)?;
            let mut o = if l.cidrs.is_empty() {
                format!("the {}list is empty\n", l.list)
            } else {
                l.cidrs.iter().map(|c| format!("{c}\n")).collect()
            };
            if l.source == "runtime" {
                o += &format!(
                    "(changed at runtime: `ws-guard {} reset` goes back to the config file's)\n",
                    l.list
                );
            }
            o
        }
        Request::BansList => {
            let b: BansReply = serde_json::from_value(data.clone()).with_context(bad)?;
            if b.bans.is_empty() {
                "no active bans\n".into()
            } else {
                let rows: Vec<Vec<String>> = b
                    .bans
                    .iter()
                    .map(|b| {
                        vec![
                            b.source.clone(),
                            b.port.to_string(),
                            humantime::format_duration(std::time::Duration::from_secs(
                                b.remaining_ms.div_ceil(1000),
                            ))
                            .to_string(),
                            b.reason.clone(),
                        ]
                    })
                    .collect();
                table(&["SOURCE", "PORT", "REMAINING", "REASON"], &rows, "")
            }
        }
        Request::SourcesTop { .. } => {
            let s: SourcesReply = serde_json::from_value(data.clone()).with_context(bad)?;
            if s.sources.is_empty() {
                "no sources\n".into()
            } else {
                let rows: Vec<Vec<String>> = s
                    .sources
                    .iter()
                    .map(|x| {
                        vec![
                            x.source.clone(),
                            x.port.to_string(),
                            x.connections.to_string(),
                            x.drops.to_string(),
                        ]
                    })
                    .collect();
                table(&["SOURCE", "PORT", "CONNECTIONS", "DROPS"], &rows, "")
            }
        }
        _ => {
            let c: ChangeReply = serde_json::from_value(data.clone()).with_context(bad)?;
            if c.persisted {
                format!("{} (in force now; kept in the state file)\n", c.message)
            } else {
                format!("{} (in force now)\n", c.message)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "LONG HEADER", "C"],
            &[vec!["wide cell".into(), "x".into(), "y".into()]],
            "",
        );
        assert_eq!(t, "A          LONG HEADER  C\nwide cell  x            y\n");
    }
}
