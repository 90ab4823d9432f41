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

/// Runs ethtool command `data` (its first u32 is the command) on `interface`, in place.
fn ethtool(interface: &str, data: &mut [u64]) -> std::io::Result<()> {
    let name = interface.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::from_raw_os_error(libc::ENODEV));
    }
    // SAFETY: an all-zero ifreq is valid; the name fits (checked) and stays NUL-terminated;
    // the kernel writes at most the sizes the command inside `data` announces, which the
    // callers size `data` for; the socket is closed below.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(name) {
            *d = *s as libc::c_char;
        }
        req.ifr_ifru.ifru_data = data.as_mut_ptr().cast();
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let rc = libc::ioctl(fd, libc::SIOCETHTOOL, &mut req);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err);
        }
    }
    Ok(())
}

/// The driver of `interface` as ethtool names it (e.g. "veth", "virtio_net"); `None` when the
/// interface has no ethtool driver information (or does not exist).
pub fn driver(interface: &str) -> Option<String> {
    const ETHTOOL_GDRVINFO: u64 = 0x0000_0003;
    // struct ethtool_drvinfo: cmd, then driver[32], ... (196 bytes in all).
    let mut info = [0u64; 25];
    info[0] = ETHTOOL_GDRVINFO;
    ethtool(interface, &mut info).ok()?;
    let bytes: Vec<u8> = info.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let driver = &bytes[4..36];
    let end = driver.iter().position(|b| *b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&driver[..end]).into_owned())
}

/// The frames the driver of `interface` failed to send with XDP_TX since it came up (the sum of
/// its ethtool statistics named `*xdp_tx_errors`, as veth reports them): RSTs of `reject` that
/// never left. `None` when the driver reports no such statistic.
pub fn xdp_tx_errors(interface: &str) -> Option<u64> {
    const ETHTOOL_GSSET_INFO: u64 = 0x37;
    const ETHTOOL_GSTRINGS: u64 = 0x1b;
    const ETHTOOL_GSTATS: u64 = 0x1d;
    const ETH_SS_STATS: u64 = 1;
    const NAME: usize = 32;
    // struct ethtool_sset_info: cmd, reserved, sset_mask (u64), data[]: the set's size.
    let mut info = [0u64; 3];
    info[0] = ETHTOOL_GSSET_INFO;
    info[1] = 1 << ETH_SS_STATS;
    ethtool(interface, &mut info).ok()?;
    let n = (info[2] & 0xffff_ffff) as usize;
    if n == 0 || n > 65_536 {
        return None;
    }
    // struct ethtool_gstrings: cmd, string_set, len (u32 each), then len names of 32 bytes.
    let mut names = vec![0u64; 2 + n * NAME / 8];
    names[0] = ETHTOOL_GSTRINGS | (ETH_SS_STATS << 32);
    names[1] = n as u64;
    ethtool(interface, &mut names).ok()?;
    // struct ethtool_stats: cmd, n_stats (u32 each), then n u64.
    let mut stats = vec![0u64; 1 + n];
    stats[0] = ETHTOOL_GSTATS | ((n as u64) << 32);
    ethtool(interface, &mut stats).ok()?;
    let bytes: Vec<u8> = names.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let mut found = false;
    let mut sum = 0u64;
    for i in 0..n {
        let raw = &bytes[12 + i * NAME..12 + (i + 1) * NAME];
        let end = raw.iter().position(|b| *b == 0).unwrap_or(NAME);
        if raw[..end].ends_with(b"xdp_tx_errors") {
            found = true;
            sum = sum.saturating_add(stats[1 + i]);
        }
    }
    found.then_some(sum)
}

/// Whether `interface` is a veth: native XDP there sends XDP_TX frames (the RSTs of `reject`)
/// to the peer only if the peer runs an XDP program of its own, which a container's does not.
pub fn is_veth(interface: &str) -> bool {
    driver(interface).as_deref() == Some("veth")
}

/// The XDP program attached to `interface`, as `NAME, id ID, MODE mode`, from iproute2's JSON
/// (`ip -j -d link show`); `None` when none is, or it cannot be told.
pub fn attached_xdp(interface: &str) -> Option<String> {
    let out = std::process::Command::new("ip")
        .args(["-j", "-d", "link", "show", "dev", interface])
        .output()
        .ok()?;
    describe_attached_xdp(&String::from_utf8_lossy(&out.stdout))
}

/// [`attached_xdp`] from `ip -j -d link show` output.
fn describe_attached_xdp(json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let xdp = &v.get(0)?["xdp"];
    let prog = &xdp["prog"];
    let id = prog["id"].as_u64()?;
    let name = prog["name"].as_str().unwrap_or("unnamed");
    // iproute2's XDP_ATTACHED_*: 1 native (driver), 2 generic (skb), 3 offloaded.
    let mode = match xdp["mode"].as_u64() {
        Some(1) => "native",
        Some(2) => "generic",
        Some(3) => "offloaded",
        _ => "some",
    };
    Some(format!("{name}, id {id}, {mode} mode"))
}

/// Whether native XDP on `interface` sends XDP_TX frames through a veth: it is one, or a bond
/// with a veth among its slaves (a bond's XDP_TX leaves through a slave).
pub fn tx_through_veth(interface: &str) -> bool {
    is_veth(interface) || bond_slaves(interface).iter().any(|s| is_veth(s))
}

/// The slaves of bond `interface` (none if it is not a bond), from the bonding driver's file
/// in the calling thread's network namespace.
fn bond_slaves(interface: &str) -> Vec<String> {
    let path = format!("/proc/thread-self/net/bonding/{interface}");
    match std::fs::read_to_string(path) {
        Ok(text) => slaves_of(&text),
        Err(_) => Vec::new(),
    }
}

/// The slaves a `/proc/net/bonding/BOND` file lists.
fn slaves_of(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("Slave Interface:"))
        .map(|s| s.trim().to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attached_program_is_described() {
        let json = r#"[{"ifname":"va","xdp":{"mode":1,"prog":{"id":3977,"name":"wsg_xdp",
            "tag":"cd2116990ebb332d","jited":1},"attached":[]}}]"#;
        assert_eq!(
            describe_attached_xdp(json).as_deref(),
            Some("wsg_xdp, id 3977, native mode")
        );
        assert_eq!(describe_attached_xdp(r#"[{"ifname":"va"}]"#), None);
        assert_eq!(describe_attached_xdp("garbage"), None);
        assert_eq!(attached_xdp("no-such-interface"), None);
    }

    #[test]
    fn bond_slaves_are_read_from_the_bonding_file() {
        // As the bonding driver writes it (this machine's kernel has no bonding to make one).
        let text = "Ethernet Channel Bonding Driver: v6.18\n\nBonding Mode: fault-tolerance \
                    (active-backup)\nCurrently Active Slave: veth0\nMII Status: up\n\n\
                    Slave Interface: veth0\nMII Status: up\n\nSlave Interface: eth1\n\
                    MII Status: down\n";
        assert_eq!(slaves_of(text), ["veth0", "eth1"]);
        assert!(slaves_of("").is_empty());
        assert!(bond_slaves("lo").is_empty());
        assert!(!tx_through_veth("lo"));
    }

    #[test]
    fn loopback_is_not_a_veth() {
        assert!(!is_veth("lo"));
        assert!(!is_veth("no-such-interface"));
        assert!(driver("an-interface-name-far-too-long").is_none());
        assert!(xdp_tx_errors("lo").is_none());
    }

    #[test]
    fn a_veth_reports_its_driver_and_xdp_tx_errors() {
        use std::os::fd::AsRawFd as _;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let ns = format!("wsg-ifunit-{}", std::process::id());
        let ip = |args: &[&str]| {
            let ok = std::process::Command::new("ip").args(args).status();
            assert!(ok.is_ok_and(|s| s.success()), "ip {args:?}");
        };
        ip(&["netns", "add", &ns]);
        ip(&[
            "-n", &ns, "link", "add", "wsgu0", "type", "veth", "peer", "name", "wsgu1",
        ]);
        let got = std::thread::scope(|s| {
            s.spawn(|| {
                let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
                // SAFETY: a valid descriptor; this thread only.
                assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
                (is_veth("wsgu0"), xdp_tx_errors("wsgu0"))
            })
            .join()
            .unwrap()
        });
        ip(&["netns", "del", &ns]);
        assert_eq!(got, (true, Some(0)));
    }
}
