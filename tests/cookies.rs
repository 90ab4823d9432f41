//! SYN-cookie mode, end to end (see `ws_guard_common::syncookie`).

use std::{
    io::{Read as _, Write as _},
    net::IpAddr,
    time::Duration,
};

use ws_guard_common::maps::Counter;
use ws_guard_tests::{
    netns::{Enforcer, Testbed, in_ns, sa, test_port},
    privileged,
    traffic::{Outcome, Server, Stack, connect_from},
};

fn sysctl(ns: &str, name: &str, value: &str) {
    in_ns(ns, || {
        std::fs::write(format!("/proc/sys/net/ipv4/{name}"), value).expect("sysctl")
    });
}

#[test]
fn probe() {
    if !privileged("probe") {
        return;
    }
    let port = test_port(1);
    let tb = Testbed::new("ckprobe", 1);
    let server = Server::start(&tb.srv, port, Stack::Separate);
    sysctl(&tb.srv, "tcp_syncookies", "2");
    sysctl(&tb.srv, "tcp_timestamps", "2");
    let enf = Enforcer::start(
        &tb,
        &format!("[[port]]\nport = {port}\nmax_connections = 3\nsyn_cookies = \"on\"\n"),
    );
    let out = std::process::Command::new("bpftool")
        .args(["prog", "show", "name", "wsg_xdp"])
        .output()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    for (src, dst) in [
        (tb.client_v4(0), tb.server_v4()),
        (tb.client_v6(0), tb.server_v6()),
    ] {
        match connect_from(&tb.cli, src, sa(dst, port), Duration::from_secs(3)) {
            Outcome::Connected(mut s) => {
                s.write_all(b"hello").unwrap();
                let mut b = [0u8; 5];
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let r = s.read(&mut b);
                eprintln!("read {r:?} {:?}", &b);
                let out = std::process::Command::new("ip")
                    .args(["netns", "exec", &tb.cli, "ss", "-tin"])
                    .output()
                    .unwrap();
                eprintln!("{}", String::from_utf8_lossy(&out.stdout));
            }
            other => eprintln!("{src}: {other:?}"),
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let c = enf.counters();
    for k in Counter::ALL {
        if c.get(k) > 0 {
            eprintln!("{} = {}", k.name(), c.get(k));
        }
    }
    eprintln!("held {}", server.held());
    let _ = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    panic!("probe");
}
