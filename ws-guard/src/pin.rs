//! Where the daemon pins its programs, links and maps on bpffs, so enforcement outlives it.
//!
//! Layout, under a root (default [`DEFAULT_ROOT`]):
//!
//! ```text
//! <root>/v<LAYOUT_VERSION>/maps/<MAP>              every map of names::MAPS
//! <root>/v<LAYOUT_VERSION>/programs/<PROGRAM>      the XDP and tracepoint programs
//! <root>/v<LAYOUT_VERSION>/links/xdp-<IF>-<MODE>   one XDP link per interface (native|generic)
//! <root>/v<LAYOUT_VERSION>/links/sock_state        the sock:inet_sock_set_state link
//! ```
//!
//! The version is that of the map layouts: aya reuses a pinned map by name without checking its
//! layout, so a daemon only ever adopts maps of the layout it was built for.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use log::info;
use ws_guard_common::names::LAYOUT_VERSION;

/// The default pin root.
pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/ws-guard";
/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// The pin directory of this build's layout version under a root.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    /// Pins under `root` (its `v<LAYOUT_VERSION>` subdirectory).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root given to [`PinDir::new`].
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/v<LAYOUT_VERSION>`.
    pub fn dir(&self) -> PathBuf {
        version_dir(&self.root, LAYOUT_VERSION)
    }

    /// The pin of map `name`.
    pub fn map(&self, name: &str) -> PathBuf {
        self.dir().join("maps").join(name)
    }

    /// The pin of program `name`.
    pub fn program(&self, name: &str) -> PathBuf {
        self.dir().join("programs").join(name)
    }

    /// The pin of the tracepoint link.
    pub fn tracepoint_link(&self) -> PathBuf {
        self.dir().join("links").join("sock_state")
    }

    /// The pin of the XDP link on `interface` attached in `mode` ("native" or "generic").
    pub fn xdp_link(&self, interface: &str, mode: &str) -> PathBuf {
        self.dir()
            .join("links")
            .join(format!("xdp-{interface}-{mode}"))
    }

    /// The pinned XDP link of `interface` in this version's directory, with its mode.
    pub fn find_xdp_link(&self, interface: &str) -> Option<(PathBuf, &'static str)> {
        ["native", "generic"]
            .into_iter()
            .map(|m| (self.xdp_link(interface, m), m))
            .find(|(p, _)| p.exists())
    }

    /// The pinned XDP link of `interface` left by a daemon of another layout version, with its
    /// mode: an upgrade takes it over (the link keeps enforcing while its program is swapped).
    /// The newest other version first.
    pub fn find_xdp_link_other_version(&self, interface: &str) -> Option<(PathBuf, &'static str)> {
        let mut dirs = self.other_versions();
        dirs.sort_by_key(|d| {
            d.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix('v'))
                .and_then(|v| v.parse::<u64>().ok())
                .map(std::cmp::Reverse)
        });
        dirs.iter().find_map(|d| {
            ["native", "generic"].into_iter().find_map(|m| {
                let p = d.join("links").join(format!("xdp-{interface}-{m}"));
                p.exists().then_some((p, m))
            })
        })
    }

    /// The interfaces with a pinned XDP link in this version's directory, with the link's pin.
    pub fn xdp_links(&self) -> Vec<(String, PathBuf)> {
        let Ok(rd) = std::fs::read_dir(self.dir().join("links")) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in rd.flatten().take(4096) {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("xdp-") else {
                continue;
            };
            for mode in ["-native", "-generic"] {
                if let Some(interface) = rest.strip_suffix(mode) {
                    out.push((interface.to_owned(), e.path()));
                }
            }
        }
        out
    }

    /// Whether maps of this version are pinned (a previous daemon left its state).
    pub fn has_state(&self) -> bool {
        self.map(ws_guard_common::names::MAP_SOURCES).exists()
    }

    /// Directories of other layout versions under the root.
    pub fn other_versions(&self) -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mine = format!("v{LAYOUT_VERSION}");
        rd.flatten()
            .take(4096)
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n != mine
                    && n.strip_prefix('v')
                        .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            })
            .map(|e| e.path())
            .collect()
    }

    /// Mounts bpffs if needed and creates the directories.
    pub fn prepare(&self) -> anyhow::Result<()> {
        ensure_bpffs(&self.root)?;
        for sub in ["maps", "programs", "links"] {
            let d = self.dir().join(sub);
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            check_private(&d)?;
        }
        Ok(())
    }
}

/// Refuses pins under a directory that another user could change. bpffs mounted without a
/// `mode` option is world-writable (sticky, like /tmp), so any local user can create
/// `/sys/fs/bpf/ws-guard` before the daemon does, and then unlink or replace the pins in it
/// (SECURITY.md). Every directory from `dir` up to the bpffs mount must belong to this user (or
/// root) and be writable by nobody else, unless it is sticky and its entries below are ours.
pub fn check_private(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    for d in dir.ancestors().take_while(|d| on_bpffs(d)) {
        let md = std::fs::symlink_metadata(d).with_context(|| format!("{}", d.display()))?;
        let open = md.mode() & 0o022 != 0 && md.mode() & 0o1000 == 0;
        if (md.uid() != euid && md.uid() != 0) || open || !md.is_dir() {
            bail!(
                "pin directory {}: {} is owned by uid {} with mode {:o}; pins need a directory \
                 only root or uid {euid} can change (remove it, or choose another --pin-dir)",
                dir.display(),
                d.display(),
                md.uid(),
                md.mode() & 0o7777
            );
        }
    }
    Ok(())
}

fn version_dir(root: &Path, version: u32) -> PathBuf {
    root.join(format!("v{version}"))
}

/// Whether `path` is on a bpf filesystem.
fn on_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid C string and a zeroed statfs buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == BPF_FS_MAGIC
}

/// Makes sure `root` can hold pins: mounts bpffs at [`BPFFS`] if nothing is mounted there, then
/// checks that the nearest existing ancestor of `root` is on bpffs.
pub fn ensure_bpffs(root: &Path) -> anyhow::Result<()> {
    if !on_bpffs(Path::new(BPFFS)) {
        // SAFETY: valid C strings; mount(2) has no memory-safety preconditions.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c"/sys/fs/bpf".as_ptr(),
                c"bpf".as_ptr(),
                0,
                // As systemd mounts it: without a mode, bpffs is world-writable.
                c"mode=0700".as_ptr().cast(),
            )
        };
        if rc != 0 {
            bail!(
                "bpffs is not mounted at {BPFFS} and mounting it failed ({}); mount it with \
                 `mount -t bpf bpf {BPFFS}` (as root)",
                std::io::Error::last_os_error()
            );
        }
        info!("mounted bpffs at {BPFFS}");
    }
    let existing = root
        .ancestors()
        .find(|a| a.exists())
        .ok_or_else(|| anyhow!("pin directory {}: no existing ancestor", root.display()))?;
    if !on_bpffs(existing) {
        bail!(
            "pin directory {} is not on a bpf filesystem ({} is not bpffs)",
            root.display(),
            existing.display()
        );
    }
    Ok(())
}

/// Held by the daemon that owns a pin root: exactly one daemon at a time may load, adopt and
/// replace what is pinned there (a second one would impose its limits under the first one's
/// feet). An exclusive `flock` on the root directory itself (bpffs holds no regular files),
/// released by the kernel when the daemon exits, however it exits.
#[derive(Debug)]
pub struct PinLock(#[allow(dead_code)] std::os::fd::OwnedFd);

/// Creates `root` if needed (mounting bpffs first, see [`ensure_bpffs`]) and takes its
/// [`PinLock`], or fails naming the daemon that holds it.
pub fn lock(root: &Path) -> anyhow::Result<PinLock> {
    use std::os::{fd::AsRawFd as _, unix::fs::MetadataExt as _};
    ensure_bpffs(root)?;
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    check_private(root)?;
    let dir = std::fs::File::open(root).with_context(|| format!("opening {}", root.display()))?;
    // SAFETY: a valid open descriptor; flock has no memory-safety preconditions.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(err).with_context(|| format!("locking {}", root.display()));
        }
        let meta = dir.metadata()?;
        let holder = lock_holder(meta.dev(), meta.ino()).map_or_else(
            || "another process".to_owned(),
            |pid| format!("process {pid}"),
        );
        bail!(
            "another ws-guard daemon ({holder}) owns the pin directory {}: stop it first \
             (`systemctl stop ws-guard`), or give this one its own with --pin-dir",
            root.display()
        );
    }
    Ok(PinLock(dir.into()))
}

/// The PID holding a `flock` on the inode (`dev`, `ino`), from /proc/locks.
fn lock_holder(dev: u64, ino: u64) -> Option<u32> {
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    // "1: FLOCK  ADVISORY  WRITE 646 00:28:1 0 EOF": major:minor in hex, inode in decimal.
    let want = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 5 && f[1] == "FLOCK" && f[5] == want)
            .then(|| f[4].parse().ok())
            .flatten()
    })
}

/// Removes everything pinned under `root` (every layout version): links first, which detaches
/// the XDP program from its interfaces and the tracepoint program, then programs and maps, which
/// the kernel frees once nothing else holds them. Works without a daemon. Returns the pins
/// removed.
pub fn teardown(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    if !on_bpffs(root) {
        bail!(
            "{} is not on a bpf filesystem: not removing it",
            root.display()
        );
    }
    let mut removed = Vec::new();
    let mut versions: Vec<PathBuf> = std::fs::read_dir(root)
        .with_context(|| format!("reading {}", root.display()))?
        .flatten()
        .take(4096)
        .map(|e| e.path())
        .collect();
    versions.sort();
    for v in &versions {
        removed.extend(remove_version_dir(v)?);
    }
    std::fs::remove_dir(root).with_context(|| format!("removing {}", root.display()))?;
    Ok(removed)
}

/// Removes the pin directory of one layout version (see [`teardown`]).
pub fn remove_version_dir(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for sub in ["links", "programs", "maps"] {
        let d = dir.join(sub);
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten().take(4096) {
            std::fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
            removed.push(e.path());
        }
        std::fs::remove_dir(&d).with_context(|| format!("removing {}", d.display()))?;
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_versioned() {
        let p = PinDir::new("/sys/fs/bpf/x");
        assert_eq!(
            p.map("WSG_SOURCES"),
            PathBuf::from(format!("/sys/fs/bpf/x/v{LAYOUT_VERSION}/maps/WSG_SOURCES"))
        );
        assert_eq!(
            p.xdp_link("eth0", "generic"),
            PathBuf::from(format!(
                "/sys/fs/bpf/x/v{LAYOUT_VERSION}/links/xdp-eth0-generic"
            ))
        );
    }
}
