//! The TCP socket tables of every network namespace on the host.
//!
//! A server behind a published container port lives in another network namespace than the
//! interface ws-guard is attached to; the sweep must find its sockets where they live. Every
//! task's `/proc/PID/task/TID/net/tcp{,6}` shows the table of that task's namespace (threads may
//! have namespaces of their own), and the file's inode number names the namespace (it is the
//! same for every task in it). Reading it needs no capability beyond seeing the task in /proc;
//! a namespace without any task holds no listening socket, only orphans on their way out, whose
//! close the tracepoint reports.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// Tasks of /proc looked at, at most (a bound on one sweep's work).
const MAX_TASKS: usize = 200_000;
/// Tasks of one namespace remembered as readers, in case the first exits meanwhile.
const READERS_PER_NAMESPACE: usize = 3;

/// One network namespace and where to read its tables.
#[derive(Clone, Debug)]
pub struct Namespace {
    /// The inode of its `net/tcp` file: the same for every task of the namespace.
    pub id: u64,
    /// The namespace of the calling thread (the one the daemon attached in).
    pub own: bool,
    /// `/proc/PID/task/TID/net` directories of tasks in it.
    readers: Vec<PathBuf>,
}

/// The network namespaces of the tasks in /proc, the calling thread's first.
pub fn namespaces() -> std::io::Result<Vec<Namespace>> {
    let own_dir = PathBuf::from("/proc/thread-self/net");
    let own_id = std::fs::metadata(own_dir.join("tcp"))?.ino();
    let mut found = vec![Namespace {
        id: own_id,
        own: true,
        readers: vec![own_dir],
    }];
    let mut index: HashMap<u64, usize> = HashMap::from([(own_id, 0)]);
    let mut tasks = 0usize;
    for pid in std::fs::read_dir("/proc")?.flatten() {
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
                return Ok(found);
            }
            let dir = tid.path().join("net");
            let Ok(meta) = std::fs::metadata(dir.join("tcp")) else {
                continue;
            };
            let i = *index.entry(meta.ino()).or_insert_with(|| {
                found.push(Namespace {
                    id: meta.ino(),
                    own: false,
                    readers: Vec::new(),
                });
                found.len() - 1
            });
            let readers = &mut found[i].readers;
            if readers.len() < READERS_PER_NAMESPACE {
                readers.push(dir);
            }
        }
    }
    Ok(found)
}

fn is_number(name: &std::ffi::OsStr) -> bool {
    name.to_str()
        .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
}

impl Namespace {
    /// The text of its `net/<file>` (`tcp` or `tcp6`); `None` when no task of it is left, or
    /// the file does not exist (no IPv6 in the namespace).
    pub fn read(&self, file: &str) -> std::io::Result<Option<Vec<u8>>> {
        for dir in &self.readers {
            match read_whole(&dir.join(file)) {
                Ok(text) => return Ok(Some(text)),
                // The task exited (the namespace may have gone with it), or no IPv6.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOENT) | Some(libc::ESRCH) | Some(libc::EINVAL)
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}

/// Reads a /proc/net table in as few read(2) calls as possible. The kernel produces it in
/// chunks, one per read, and finds where the next chunk starts by counting sockets again:
/// sockets that close meanwhile shift the count, and a live socket can be skipped. Big reads
/// make that rare; the sweep's two-round rule makes it harmless.
fn read_whole(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    // read_to_end doubles its reads while they come back full: a handful of read(2) calls.
    let mut buf = Vec::with_capacity(1 << 20);
    std::fs::File::open(path)?.read_to_end(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn own_namespace_comes_first_and_is_readable() {
        let all = namespaces().unwrap();
        assert!(all[0].own);
        assert_eq!(all.iter().filter(|n| n.own).count(), 1);
        let text = all[0].read("tcp").unwrap().unwrap();
        assert!(
            text.starts_with(b"  sl"),
            "{}",
            String::from_utf8_lossy(&text)
        );
        // Every namespace is listed once.
        let ids: HashSet<u64> = all.iter().map(|n| n.id).collect();
        assert_eq!(ids.len(), all.len());
    }
}
