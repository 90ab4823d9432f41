//! The daemon's side of the control socket.
//!
//! - The socket's directory is created 0700 if missing, the socket itself is 0600 (root).
//! - A socket file left by a previous daemon is replaced, but only when nothing answers on it:
//!   a second daemon never steals a running one's socket.
//! - Every client's credentials are checked (SO_PEERCRED): uid 0 only; others get an error
//!   response and the connection is closed.
//! - At most [`MAX_CLIENTS`] clients are served at once, each line must arrive within
//!   [`READ_TIMEOUT`], so a stuck client cannot hold the daemon.

use std::{
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use log::{debug, info, warn};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};

use super::protocol::{MAX_LINE, Response, parse_request};
use crate::daemon::Shared;

/// Clients served at once; more wait in the listen backlog.
pub const MAX_CLIENTS: usize = 8;
/// How long the daemon waits for a request line (and for a response to be taken).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A bound control socket; the file is removed on drop.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the control socket at `path` (see the module's documentation for the rules).
pub fn bind(path: &Path) -> anyhow::Result<ControlSocket> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| {
                format!("creating the control socket's directory {}", dir.display())
            })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                bail!(
                    "{} exists and is not a socket; remove it or set [control] socket to \
                     another path",
                    path.display()
                );
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "another ws-guard daemon answers on the control socket {}; stop it first \
                     (or give this one another [control] socket)",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale control socket {}", path.display()))?;
            info!("replaced the stale control socket {}", path.display());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    }
    // Created 0600 from the start: no moment where another user could connect.
    // SAFETY: umask(2) has no preconditions; restored right after.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener =
        bound.with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(ControlSocket {
        listener,
        path: path.to_owned(),
    })
}

/// Serves clients until the task is dropped.
pub async fn serve(socket: ControlSocket, shared: Arc<Mutex<Shared>>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match socket.listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!("control socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = client(stream, &shared).await {
                debug!("control socket: {e:#}");
            }
        });
    }
}

async fn send(stream: &mut UnixStream, r: &Response) -> anyhow::Result<()> {
    tokio::time::timeout(READ_TIMEOUT, stream.write_all(r.to_line().as_bytes()))
        .await
        .context("client not reading its response")?
        .context("writing the response")
}

async fn client(mut stream: UnixStream, shared: &Mutex<Shared>) -> anyhow::Result<()> {
    let uid = stream.peer_cred().map(|c| c.uid());
    if uid.as_ref().ok() != Some(&0) {
        let who = match uid {
            Ok(u) => format!("uid {u}"),
            Err(e) => format!("unknown user ({e})"),
        };
        warn!("control socket: refused a client running as {who}: only root may use it");
        let _ = send(
            &mut stream,
            &Response::Denied(format!(
                "permission denied: only root may use the control socket; you are {who}"
            )),
        )
        .await;
        return Ok(());
    }
    let (read, mut write) = stream.split();
    let mut read = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = tokio::time::timeout(
            READ_TIMEOUT,
            (&mut read)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line),
        )
        .await;
        let n = match n {
            Ok(r) => r.context("reading a request")?,
            Err(_) => {
                let r = Response::error(format!(
                    "no complete request within {}s; closing",
                    READ_TIMEOUT.as_secs()
                ));
                let _ = tokio::time::timeout(READ_TIMEOUT, write.write_all(r.to_line().as_bytes()))
                    .await;
                return Ok(());
            }
        };
        if n == 0 {
            return Ok(());
        }
        let complete = line.last() == Some(&b'\n');
        if complete {
            line.pop();
        }
        if !complete && line.len() > MAX_LINE {
            let r = Response::error(format!(
                "request refused: longer than {MAX_LINE} bytes; closing"
            ));
            let _ =
                tokio::time::timeout(READ_TIMEOUT, write.write_all(r.to_line().as_bytes())).await;
            return Ok(());
        }
        let response = match parse_request(&line) {
            Ok(req) => {
                let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
                super::handler::handle(&mut s, req)
            }
            Err(e) => Response::error(e),
        };
        tokio::time::timeout(READ_TIMEOUT, write.write_all(response.to_line().as_bytes()))
            .await
            .context("client not reading its response")?
            .context("writing the response")?;
        if !complete {
            // EOF without a newline: that was the last request.
            return Ok(());
        }
    }
}
