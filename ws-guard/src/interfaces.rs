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

/// The driver of `interface` as ethtool names it (e.g. "veth", "virtio_net"); `None` when the
/// interface has no ethtool driver information (or does not exist).
pub fn driver(interface: &str) -> Option<String> {
    // struct ethtool_drvinfo: cmd, then driver[32], version[32], ... (196 bytes in all).
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;
    let name = interface.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    // SAFETY: an all-zero ifreq is valid; the name fits (checked) and stays NUL-terminated; the
    // ioctl writes only into `info`, which outlives the call; the socket is closed below.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(name) {
            *d = *s as libc::c_char;
        }
        req.ifr_ifru.ifru_data = (&raw mut info).cast();
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let rc = libc::ioctl(fd, libc::SIOCETHTOOL, &mut req);
        libc::close(fd);
        if rc != 0 {
            return None;
        }
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// Whether `interface` is a veth: native XDP there sends XDP_TX frames (the RSTs of `reject`)
/// to the peer only if the peer runs an XDP program of its own, which a container's does not.
pub fn is_veth(interface: &str) -> bool {
    driver(interface).as_deref() == Some("veth")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_not_a_veth() {
        assert!(!is_veth("lo"));
        assert!(!is_veth("no-such-interface"));
        assert!(driver("an-interface-name-far-too-long").is_none());
    }
}
