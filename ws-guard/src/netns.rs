//! The TCP socket tables of every network namespace on the host.
//!
//! A server behind a published container port lives in another network namespace than the
//! interface ws-guard is attached to; the sweep must find its sockets where they live. Every
//! task's `/proc/PID/task/TID/net/tcp{,6}` shows the table of that task's namespace (threads may
//! have namespaces of their own), and the file's inode number names the namespace (it is the
//! same for every task in it). Reading it needs no capability beyond seeing the task in /proc.
//!
//! A namespace may also be kept by a bind mount alone (`ip netns add`, Docker's
//! `/run/docker/netns`) while its sockets belong to processes elsewhere (a program that opened
//! them there and left). Those are read by entering the namespace on a thread of their own,
//! which needs CAP_SYS_ADMIN: without it they are skipped (said once in the log).

use std::{
    collections::HashSet,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

/// Tasks of /proc looked at, at most (a bound on one sweep's work).
const MAX_TASKS: usize = 200_000;
/// Namespaces kept by bind mounts read, at most.
const MAX_MOUNTS: usize = 4096;
/// Where namespaces are bind-mounted: iproute2's and Docker's.
const MOUNT_DIRS: [&str; 2] = ["/run/netns", "/run/docker/netns"];

/// The socket tables of one network namespace.
#[derive(Clone, Debug)]
pub struct Tables {
    /// The inode of its `net/tcp` file: the same for every task of the namespace.
    pub id: u64,
    /// The namespace of the calling thread (the one the daemon attached in).
    pub own: bool,
    /// `net/tcp` and `net/tcp6` (`None`: no IPv6 there).
    pub tcp: Vec<u8>,
    pub tcp6: Option<Vec<u8>>,
}

/// The socket tables of every network namespace the host's tasks are in, the calling thread's
/// first, then those kept by bind mounts only.
pub fn tables() -> std::io::Result<Vec<Tables>> {
    let own = PathBuf::from("/proc/thread-self/net");
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    // The daemon's own namespace must be read: an error here is the sweep's.
    let first = read_dir_tables(&own, true)?
        .ok_or_else(|| std::io::Error::other("/proc/thread-self/net/tcp is missing"))?;
    seen.insert(first.id);
    out.push(first);
    let mut tasks = 0usize;
    'pids: for pid in std::fs::read_dir("/proc")?.flatten() {
        if !is_number(&pid.file_name()) {
            continue;
        }
        // A process may exit while it is looked at: skip what cannot be read.
        let Ok(threads) = std::fs::read_dir(pid.path().join("task")) else {
            continue;
        };
        for tid in threads.flatten() {
            tasks += 1;
            if tasks > MAX_TASKS {
                break 'pids;
            }
            let dir = tid.path().join("net");
            let Ok(meta) = std::fs::metadata(dir.join("tcp")) else {
                continue;
            };
            if seen.contains(&meta.ino()) {
                continue;
            }
            // Read now, while the task is known to be there; gone meanwhile: the next sweep.
            if let Ok(Some(t)) = read_dir_tables(&dir, false) {
                seen.insert(t.id);
                out.push(t);
            }
        }
    }
    for dir in MOUNT_DIRS {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten().take(MAX_MOUNTS) {
            if let Some(t) = read_mounted(&e.path(), &seen) {
                seen.insert(t.id);
                out.push(t);
            }
        }
    }
    Ok(out)
}

/// The tables under `dir` (a `net` directory of /proc); `None` when it is gone.
fn read_dir_tables(dir: &Path, own: bool) -> std::io::Result<Option<Tables>> {
    let gone = |e: &std::io::Error| {
        matches!(
            e.raw_os_error(),
            Some(libc::ENOENT) | Some(libc::ESRCH) | Some(libc::EINVAL)
        )
    };
    let (id, tcp) = match read_whole(&dir.join("tcp")) {
        Ok(r) => r,
        Err(e) if gone(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let tcp6 = match read_whole(&dir.join("tcp6")) {
        Ok((_, t)) => Some(t),
        Err(e) if gone(&e) => None,
        Err(e) => return Err(e),
    };
    Ok(Some(Tables { id, own, tcp, tcp6 }))
}

/// The tables of the namespace bind-mounted at `path`, read from a thread that enters it,
/// unless it is one of `seen`; `None` when it cannot be entered (no CAP_SYS_ADMIN: said once).
fn read_mounted(path: &Path, seen: &HashSet<u64>) -> Option<Tables> {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let file = std::fs::File::open(path).ok()?;
    let seen = seen.clone();
    let result = std::thread::scope(|s| {
        s.spawn(move || -> std::io::Result<Option<Tables>> {
            // SAFETY: a valid descriptor; setns changes only this thread's namespace, and the
            // thread ends right after.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let dir = Path::new("/proc/thread-self/net");
            if seen.contains(&std::fs::metadata(dir.join("tcp"))?.ino()) {
                return Ok(None);
            }
            read_dir_tables(dir, false)
        })
        .join()
    });
    match result {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            if !WARNED.swap(true, Ordering::Relaxed) {
                log::info!(
                    "network namespaces bind-mounted under {} cannot be entered ({e}): sockets \
                     kept only there are not seen by the sweep (running without CAP_SYS_ADMIN; \
                     namespaces with a process in them are read all the same)",
                    path.parent().unwrap_or(path).display()
                );
            }
            None
        }
        Err(_) => None,
    }
}

fn is_number(name: &std::ffi::OsStr) -> bool {
    name.to_str()
        .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
}

/// Reads a /proc/net table in as few read(2) calls as possible, with the file's inode. The
/// kernel produces it in chunks, one per read, and finds where the next chunk starts by
/// counting sockets again: sockets that close meanwhile shift the count, and a live socket can
/// be skipped. Big reads make that rare; the sweep's two-round rule makes it harmless.
fn read_whole(path: &Path) -> std::io::Result<(u64, Vec<u8>)> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path)?;
    let id = f.metadata()?.ino();
    // read_to_end doubles its reads while they come back full: a handful of read(2) calls.
    let mut buf = Vec::with_capacity(1 << 20);
    f.read_to_end(&mut buf)?;
    Ok((id, buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_comes_first_and_every_one_once() {
        let all = tables().unwrap();
        assert!(all[0].own);
        assert_eq!(all.iter().filter(|n| n.own).count(), 1);
        assert!(all[0].tcp.starts_with(b"  sl"));
        let ids: HashSet<u64> = all.iter().map(|n| n.id).collect();
        assert_eq!(ids.len(), all.len());
    }

    #[test]
    fn a_namespace_kept_by_a_bind_mount_only_is_read() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        // A namespace with no task in it, bind-mounted as `ip netns add` does, holding a
        // listening socket that a thread opened there before leaving.
        let name = format!("wsg-nsunit-{}", std::process::id());
        let add = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status();
        if !add.is_ok_and(|s| s.success()) {
            panic!("ip netns add {name} failed (root, iproute2 needed)");
        }
        let path = PathBuf::from(format!("/run/netns/{name}"));
        let listener = std::thread::scope(|s| {
            s.spawn(|| {
                let f = std::fs::File::open(&path).unwrap();
                // SAFETY: as above, on a thread of its own.
                assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
                let lo = std::process::Command::new("ip")
                    .args(["link", "set", "lo", "up"])
                    .status();
                assert!(lo.is_ok_and(|s| s.success()));
                std::net::TcpListener::bind("127.0.0.1:47113").unwrap()
            })
            .join()
            .unwrap()
        });
        let all = tables().unwrap();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .status();
        drop(listener);
        // 47113 = 0xB809, listening (state 0A).
        assert!(
            all.iter().any(|t| !t.own
                && String::from_utf8_lossy(&t.tcp).contains("0100007F:B809 00000000:0000 0A")),
            "the bind-mounted namespace's listener was not read: {:?}",
            all.iter()
                .map(|t| (t.id, t.own, String::from_utf8_lossy(&t.tcp).into_owned()))
                .collect::<Vec<_>>()
        );
    }
}
