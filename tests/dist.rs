//! The release artifacts `cargo xtask dist` writes to target/dist/ (`cargo xtask test` runs it
//! before these tests), used the way an operator would:
//!
//! - the tarball: SHA256SUMS checks (`sha256sum -c`), it unpacks to one directory whose
//!   `ws-guard` runs (`--version`, `check-config` on the shipped config) and needs nothing but
//!   glibc's libraries, with the man pages, completions and packaging/ files beside it;
//! - the .deb, installed on this machine with `dpkg -i`: `ws-guard --version`, `systemd-analyze
//!   verify` of the installed unit, `check-config` of the installed conffile, man pages,
//!   completions, dashboard and alert rules in place; installing it again (the upgrade path)
//!   keeps the pins, the edited conffile and the state directory; `dpkg -r` removes the
//!   binary, keeps the conffile and the state directory, and tears down what is pinned under
//!   /sys/fs/bpf/ws-guard (a map pinned there by this test); `dpkg -P` leaves nothing behind.
//!
//! The package test changes the real system (/usr/bin/ws-guard, /etc/ws-guard, ...). It refuses
//! to run, failing, when anything of an operator's ws-guard is there (a ws-guard package in
//! any state, one of those files, pins under /sys/fs/bpf/ws-guard), and purges the package in a
//! drop guard, so a failing assertion leaves the machine as it found it.
//!
//! Missing artifacts fail the tests under WS_GUARD_REQUIRE_PRIVILEGED (CI), and skip them
//! otherwise, saying to run `cargo xtask dist`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use ws_guard_tests::privileged;

/// The workspace version, which the package and tarball carry.
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Where an operator's ws-guard would keep its pins (the package's prerm tears this down).
const PIN_ROOT: &str = "/sys/fs/bpf/ws-guard";
/// Paths the package owns or creates, which must not exist before the test installs it.
const SYSTEM_PATHS: &[&str] = &[
    "/usr/bin/ws-guard",
    "/etc/ws-guard",
    "/var/lib/ws-guard",
    "/run/ws-guard",
    "/lib/systemd/system/ws-guard.service",
    "/etc/systemd/system/ws-guard.service",
    "/usr/share/ws-guard",
    "/usr/share/doc/ws-guard",
    PIN_ROOT,
];
/// deb-systemd-helper's records of the unit (enablement links to purge, the mask set on
/// remove).
const HELPER_STATE: &[&str] = &[
    "/var/lib/systemd/deb-systemd-helper-enabled/ws-guard.service.dsh-also",
    "/var/lib/systemd/deb-systemd-helper-masked/ws-guard.service",
];

/// target/dist, beside target/debug (this test is target/debug/deps/dist-HASH).
fn dist_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .nth(3)
        .expect("test executable outside target/<profile>/deps")
        .join("dist")
}

/// The artifacts, or None (after saying why) when they are missing outside CI.
struct Artifacts {
    dir: PathBuf,
    deb: PathBuf,
    tarball: PathBuf,
}

fn artifacts(test: &str) -> Option<Artifacts> {
    let dir = dist_dir();
    let tarball = dir.join(format!(
        "ws-guard-{VERSION}-{}-linux-gnu.tar.gz",
        std::env::consts::ARCH
    ));
    let debs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let name = p.file_name().unwrap().to_string_lossy();
                    name.starts_with(&format!("ws-guard_{VERSION}-")) && name.ends_with(".deb")
                })
                .collect()
        })
        .unwrap_or_default();
    let missing = match debs.as_slice() {
        [_] if tarball.is_file() && dir.join("SHA256SUMS").is_file() => None,
        [_] => Some("the tarball or SHA256SUMS".to_owned()),
        [] => Some(format!("ws-guard_{VERSION}-*.deb")),
        more => Some(format!("one .deb, not {more:?}")),
    };
    if let Some(missing) = missing {
        let msg = format!(
            "{test}: {} lacks {missing}: run `cargo xtask dist` first (`cargo xtask test` does)",
            dir.display()
        );
        if std::env::var_os("WS_GUARD_REQUIRE_PRIVILEGED").is_some() {
            panic!("{msg}, and WS_GUARD_REQUIRE_PRIVILEGED is set");
        }
        eprintln!("SKIPPED {msg}");
        return None;
    }
    Some(Artifacts {
        deb: debs[0].clone(),
        dir,
        tarball,
    })
}

fn output(program: &str, args: &[&str], cwd: Option<&Path>) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("running {program} {args:?}: {e}"))
}

/// Runs the command, fails the test unless it exits with 0; returns stdout and stderr.
fn ok(program: &str, args: &[&str], cwd: Option<&Path>) -> String {
    let out = output(program, args, cwd);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{said}",
        out.status
    );
    said
}

fn exists(path: &str) -> bool {
    Path::new(path).symlink_metadata().is_ok()
}

#[test]
fn tarball_is_checksummed_and_runs_unpacked() {
    let Some(a) = artifacts("tarball_is_checksummed_and_runs_unpacked") else {
        return;
    };
    let checked = ok("sha256sum", &["-c", "SHA256SUMS"], Some(&a.dir));
    for file in [&a.deb, &a.tarball] {
        let name = file.file_name().unwrap().to_string_lossy();
        assert!(checked.contains(&format!("{name}: OK")), "{checked}");
    }

    let tmp = tempfile::tempdir().unwrap();
    ok(
        "tar",
        &[
            "-xzf",
            a.tarball.to_str().unwrap(),
            "-C",
            tmp.path().to_str().unwrap(),
        ],
        None,
    );
    let tops: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let name = format!("ws-guard-{VERSION}-{}-linux-gnu", std::env::consts::ARCH);
    assert_eq!(tops, [name.as_str()], "one top directory");
    let top = tmp.path().join(&name);
    for file in [
        "ws-guard",
        "README.md",
        "docs/containers.md",
        "docs/operations.md",
        "packaging/ws-guard.service",
        "packaging/config.toml",
        "packaging/grafana-dashboard.json",
        "packaging/prometheus-alerts.yml",
        "man/ws-guard.1",
        "man/ws-guard-limits-set.1",
        "man/ws-guard.toml.5",
        "completions/ws-guard.bash",
        "completions/_ws-guard",
        "completions/ws-guard.fish",
    ] {
        let path = top.join(file);
        assert!(
            path.metadata().is_ok_and(|m| m.is_file() && m.len() > 0),
            "the tarball lacks {file}"
        );
    }

    let bin = top.join("ws-guard");
    let bin = bin.to_str().unwrap();
    assert_eq!(
        ok(bin, &["--version"], None).trim(),
        format!("ws-guard {VERSION}")
    );
    let said = ok(bin, &["check-config", "packaging/config.toml"], Some(&top));
    assert!(said.contains("valid"), "{said}");

    // Self-contained but for glibc: the eBPF object is embedded, and the only shared libraries
    // are glibc's (and libgcc_s, which Debian's required libgcc-s1 provides).
    let headers = ok("objdump", &["-p", bin], None);
    let needed: Vec<&str> = headers
        .lines()
        .filter_map(|l| l.trim().strip_prefix("NEEDED"))
        .map(str::trim)
        .collect();
    assert!(needed.contains(&"libc.so.6"), "{needed:?}");
    for lib in &needed {
        assert!(
            [
                "libc.so.6",
                "libm.so.6",
                "libgcc_s.so.1",
                "libdl.so.2",
                "libpthread.so.0",
                "librt.so.1"
            ]
            .contains(lib)
                || lib.starts_with("ld-linux"),
            "the tarball's binary needs {lib}, which is not part of glibc: {needed:?}"
        );
    }
}

/// Purges the package on drop, whatever happened (the test checked that it was not installed
/// before), and removes the map the test pinned if it is still there.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let out = output("dpkg", &["--purge", "ws-guard"], None);
        if !out.status.success() {
            eprintln!(
                "warning: cleaning up with dpkg --purge ws-guard failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let probe = Path::new(PROBE_PIN);
        if probe.exists() {
            let _ = std::fs::remove_file(probe);
            for dir in probe.ancestors().skip(1).take(3) {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// A map this test pins where the daemon's pins go; the package's removal must tear it down.
const PROBE_PIN: &str = "/sys/fs/bpf/ws-guard/v0/maps/dist_test_probe";

fn dpkg_status() -> Option<String> {
    let out = output(
        "dpkg-query",
        &["-W", "-f=${Status} ${Version}", "ws-guard"],
        None,
    );
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|s| !s.starts_with("unknown ok not-installed"))
}

#[test]
fn deb_installs_verifies_removes_and_purges() {
    if !privileged("deb_installs_verifies_removes_and_purges") {
        return;
    }
    let Some(a) = artifacts("deb_installs_verifies_removes_and_purges") else {
        return;
    };
    let deb = a.deb.to_str().unwrap();

    // Never touch an operator's ws-guard.
    if let Some(status) = dpkg_status() {
        panic!(
            "a ws-guard package is already on this machine (dpkg: {status}): this test installs \
             and purges its own, so it does not run here; remove that one first if it is yours"
        );
    }
    let present: Vec<&&str> = SYSTEM_PATHS.iter().filter(|p| exists(p)).collect();
    assert!(
        present.is_empty(),
        "{present:?} exist on this machine (an operator's ws-guard?): this test installs the \
         package over them and purges it, so it does not run here"
    );

    let control = ok(
        "dpkg-deb",
        &["--field", deb, "Package", "Version", "Depends"],
        None,
    );
    assert!(control.contains("Package: ws-guard\n"), "{control}");
    assert!(
        control.contains(&format!("Version: {VERSION}-1\n")),
        "{control}"
    );
    assert!(
        control.contains("libc6 (>="),
        "Depends from dpkg-shlibdeps: {control}"
    );

    let _installed = Installed;
    let said = ok("dpkg", &["--install", deb], None);
    eprintln!("dpkg --install said:\n{said}");
    assert!(
        said.contains("systemctl enable --now ws-guard"),
        "the postinst says how to start it:\n{said}"
    );
    let status = dpkg_status().expect("installed");
    assert_eq!(status, format!("install ok installed {VERSION}-1"));

    assert_eq!(
        ok("/usr/bin/ws-guard", &["--version"], None).trim(),
        format!("ws-guard {VERSION}")
    );
    let files = ok("dpkg-query", &["--listfiles", "ws-guard"], None);
    let files: Vec<&str> = files.lines().map(str::trim).collect();
    for want in [
        "/usr/bin/ws-guard",
        "/lib/systemd/system/ws-guard.service",
        "/etc/ws-guard/config.toml",
        "/usr/share/man/man1/ws-guard.1.gz",
        "/usr/share/man/man1/ws-guard-limits-set.1.gz",
        "/usr/share/man/man5/ws-guard.toml.5.gz",
        "/usr/share/doc/ws-guard/docs/containers.md",
        "/usr/share/bash-completion/completions/ws-guard",
        "/usr/share/zsh/vendor-completions/_ws-guard",
        "/usr/share/fish/vendor_completions.d/ws-guard.fish",
        "/usr/share/ws-guard/grafana-dashboard.json",
        "/usr/share/ws-guard/prometheus-alerts.yml",
        "/usr/share/doc/ws-guard/copyright",
    ] {
        assert!(files.contains(&want), "the package lacks {want}: {files:?}");
        assert!(
            Path::new(want).metadata().is_ok_and(|m| m.len() > 0),
            "{want} is not installed"
        );
    }
    let conffiles = ok("dpkg-query", &["-W", "-f=${Conffiles}", "ws-guard"], None);
    assert!(
        conffiles.contains("/etc/ws-guard/config.toml "),
        "the config is a conffile: {conffiles}"
    );
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging");
    for (installed, shipped) in [
        ("/etc/ws-guard/config.toml", "config.toml"),
        (
            "/usr/share/ws-guard/grafana-dashboard.json",
            "grafana-dashboard.json",
        ),
        (
            "/usr/share/ws-guard/prometheus-alerts.yml",
            "prometheus-alerts.yml",
        ),
    ] {
        assert_eq!(
            std::fs::read(installed).unwrap(),
            std::fs::read(repo.join(shipped)).unwrap(),
            "{installed} differs from packaging/{shipped}"
        );
    }

    // The unit runs the packaged binary and passes systemd's own check, where it is installed.
    let unit = std::fs::read_to_string("/lib/systemd/system/ws-guard.service").unwrap();
    assert!(
        unit.contains("\nExecStart=/usr/bin/ws-guard run --config /etc/ws-guard/config.toml\n"),
        "{unit}"
    );
    let out = output(
        "systemd-analyze",
        &["verify", "/lib/systemd/system/ws-guard.service"],
        None,
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {}, said:\n{said}",
        out.status
    );
    let said = ok(
        "/usr/bin/ws-guard",
        &["check-config", "/etc/ws-guard/config.toml"],
        None,
    );
    assert!(said.contains("/etc/ws-guard/config.toml: valid"), "{said}");
    assert!(
        !exists("/etc/systemd/system/multi-user.target.wants/ws-guard.service"),
        "a new install must not enable the service"
    );

    // What a running service would have left: runtime changes, and pins. An upgrade keeps
    // both (and the operator's edit of the conffile); removal keeps the former and tears the
    // latter down.
    std::fs::create_dir_all("/var/lib/ws-guard").unwrap();
    std::fs::write("/var/lib/ws-guard/runtime.toml", "# runtime changes\n").unwrap();
    std::fs::create_dir_all(Path::new(PROBE_PIN).parent().unwrap()).unwrap();
    ok(
        "bpftool",
        &[
            "map",
            "create",
            PROBE_PIN,
            "type",
            "array",
            "key",
            "4",
            "value",
            "4",
            "entries",
            "1",
            "name",
            "wsg_dist_probe",
        ],
        None,
    );
    assert!(exists(PROBE_PIN));
    let mut config = std::fs::read_to_string("/etc/ws-guard/config.toml").unwrap();
    config.push_str("# edited by the operator\n");
    std::fs::write("/etc/ws-guard/config.toml", &config).unwrap();

    // The same package again takes the upgrade path (prerm upgrade, postinst configure OLD).
    let said = ok("dpkg", &["--install", deb], None);
    eprintln!("dpkg --install over itself said:\n{said}");
    assert!(!said.contains("installed, not enabled"), "{said}");
    assert!(
        exists(PROBE_PIN),
        "an upgrade must leave the pins enforcing:\n{said}"
    );
    assert_eq!(
        std::fs::read_to_string("/etc/ws-guard/config.toml").unwrap(),
        config,
        "an upgrade keeps the operator's config"
    );
    assert!(exists("/var/lib/ws-guard/runtime.toml"));

    let said = ok("dpkg", &["--remove", "ws-guard"], None);
    eprintln!("dpkg --remove said:\n{said}");
    assert!(said.contains(&format!("removed {PROBE_PIN}")), "{said}");
    assert!(!exists(PIN_ROOT), "remove tears down the pins:\n{said}");
    let status = dpkg_status().expect("config files stay");
    assert!(status.starts_with("deinstall ok config-files"), "{status}");
    for gone in [
        "/usr/bin/ws-guard",
        "/lib/systemd/system/ws-guard.service",
        "/usr/share/ws-guard",
        "/usr/share/man/man1/ws-guard.1.gz",
    ] {
        assert!(!exists(gone), "{gone} is left after dpkg --remove");
    }
    for kept in [
        "/etc/ws-guard/config.toml",
        "/var/lib/ws-guard/runtime.toml",
    ] {
        assert!(exists(kept), "dpkg --remove must keep {kept}");
    }
    assert_eq!(
        std::fs::read_link("/etc/systemd/system/ws-guard.service").ok(),
        Some(PathBuf::from("/dev/null")),
        "removal masks the unit (deb-systemd-helper), so that nothing starts it"
    );

    let said = ok("dpkg", &["--purge", "ws-guard"], None);
    eprintln!("dpkg --purge said:\n{said}");
    assert_eq!(
        dpkg_status(),
        None,
        "dpkg knows nothing of ws-guard after a purge"
    );
    assert!(
        !output("dpkg-query", &["--listfiles", "ws-guard"], None)
            .status
            .success()
    );
    let left: Vec<&str> = SYSTEM_PATHS
        .iter()
        .chain(HELPER_STATE)
        .copied()
        .chain(files.iter().copied().filter(|f| {
            // Shared directories (/usr/share/man/man1, ...) stay; every file goes.
            !Path::new(f).is_dir() && *f != "/."
        }))
        .filter(|p| exists(p))
        .collect();
    assert!(left.is_empty(), "left after dpkg --purge: {left:?}");
}
