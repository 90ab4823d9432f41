//! Which interfaces to attach to when the configuration names none.

use anyhow::{Context as _, bail};

/// The interface of the IPv4 default route, else of the IPv6 one.
pub fn default_route_interface() -> anyhow::Result<String> {
    let v4 = std::fs::read_to_string("/proc/net/route").context("reading /proc/net/route")?;
    // Iface Destination Gateway ...: the default route has destination 00000000 and mask 0.
    for line in v4.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 7 && f[1] == "00000000" && f[7] == "00000000" {
            return Ok(f[0].to_owned());
        }
    }
    if let Ok(v6) = std::fs::read_to_string("/proc/net/ipv6_route") {
        for line in v6.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() == 10
                && f[0] == "00000000000000000000000000000000"
                && f[1] == "00"
                && f[9] != "lo"
            {
                return Ok(f[9].to_owned());
            }
        }
    }
    bail!("no default route, so no interface to attach to: name one in `interfaces` in the config")
}
