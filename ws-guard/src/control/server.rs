//! The daemon's side of the control socket.
//!
//! - The socket's directory is created 0700 if missing, the socket itself is 0600 (root).
//! - A socket file left by a previous daemon is replaced, but only when nothing answers on it:
//!   a second daemon never steals a running one's socket.
//! - Every client's credentials are checked (SO_PEERCRED): uid 0 only; others get an error
//!   response and the connection is closed.
//! - At most [`MAX_CLIENTS`] connections are held, each line must arrive within
//!   [`READ_TIMEOUT`], and a new connection never waits for a place: it takes the place of the
//!   oldest idle or slow one (see [`crate::slots`]), so idle clients or scripts polling
//!   `status` cannot lock the operator out.

use std::{
    os::{
        fd::AsRawFd as _,
        unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use log::{debug, info, warn};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};

use super::protocol::{MAX_LINE, Request, Response, parse_request};
use crate::{
    daemon::Shared,
    slots::{self, Busy, Slots, Watched},
};

/// Connections held at once (see [`crate::slots`]).
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

/// Serves clients until the task is dropped, answering with [`super::handler::handle`] under
/// the daemon's lock.
pub async fn serve(socket: ControlSocket, shared: Arc<Mutex<Shared>>) {
    let handler: Handler = Arc::new(move |req| {
        let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
        super::handler::handle(&mut s, req)
    });
    serve_with(socket, handler, MAX_CLIENTS, READ_TIMEOUT).await
}

/// Answers one parsed request.
pub type Handler = Arc<dyn Fn(Request) -> Response + Send + Sync>;

/// [`serve`] with any handler and limits (the tests use short ones).
pub async fn serve_with(
    socket: ControlSocket,
    handler: Handler,
    max_clients: usize,
    read_timeout: Duration,
) {
    let slots = Slots::new(max_clients, slots::LINE_END);
    loop {
        let stream = match socket.listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!("control socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(admitted) = slots.admit(stream.as_raw_fd()) else {
            debug!("control socket: a client closed, {max_clients} requests in progress");
            continue;
        };
        let handler = handler.clone();
        let busy = admitted.busy.clone();
        let stream = admitted.watch(stream);
        let task = tokio::spawn(async move {
            if let Err(e) = client(stream, &*handler, &busy, read_timeout).await {
                debug!("control socket: {e:#}");
            }
        });
        slots.register(&admitted, task.abort_handle());
    }
}

async fn send(
    stream: &mut (impl AsyncWrite + Unpin),
    r: &Response,
    timeout: Duration,
) -> anyhow::Result<()> {
    tokio::time::timeout(timeout, stream.write_all(r.to_line().as_bytes()))
        .await
        .context("client not reading its response")?
        .context("writing the response")
}

async fn client(
    mut stream: Watched<UnixStream>,
    handler: &(dyn Fn(Request) -> Response + Send + Sync),
    busy: &Busy,
    timeout: Duration,
) -> anyhow::Result<()> {
    let uid = stream.get_ref().peer_cred().map(|c| c.uid());
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
            timeout,
        )
        .await;
        return Ok(());
    }
    let (read, mut write) = tokio::io::split(stream);
    let mut read = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = tokio::time::timeout(
            timeout,
            (&mut read)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line),
        )
        .await;
        let n = match n {
            Ok(r) => r.context("reading a request")?,
            Err(_) => {
                let r =
                    Response::error(format!("no complete request within {:?}; closing", timeout));
                let _ =
                    tokio::time::timeout(timeout, write.write_all(r.to_line().as_bytes())).await;
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
            let _ = tokio::time::timeout(timeout, write.write_all(r.to_line().as_bytes())).await;
            return Ok(());
        }
        let answering = busy.start();
        let response = match parse_request(&line) {
            Ok(req) => handler(req),
            Err(e) => Response::error(e),
        };
        tokio::time::timeout(timeout, write.write_all(response.to_line().as_bytes()))
            .await
            .context("client not reading its response")?
            .context("writing the response")?;
        drop(answering);
        if !complete {
            // EOF without a newline: that was the last request.
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::AsyncReadExt as _;

    use super::*;

    /// A server on a socket in a fresh directory, answering Status with `{"ok": "pong"}`.
    async fn server(
        max_clients: usize,
        timeout: Duration,
    ) -> (PathBuf, tokio::task::JoinHandle<()>) {
        let dir = std::env::temp_dir().join(format!(
            "wsg-ctl-test-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos() ^ (max_clients as u128) << 20 ^ timeout.as_nanos()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub/ctl.sock");
        let socket = bind(&path).unwrap();
        let handler: Handler = Arc::new(|req| match req {
            Request::Status => Response::Ok(serde_json::json!("pong")),
            _ => Response::error("only status here"),
        });
        let task = tokio::spawn(serve_with(socket, handler, max_clients, timeout));
        (path, task)
    }

    async fn exchange(path: &Path, bytes: &[u8]) -> String {
        let mut s = UnixStream::connect(path).await.unwrap();
        s.write_all(bytes).await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn bad_requests_get_errors_and_the_server_goes_on() {
        let (path, task) = server(4, Duration::from_secs(5)).await;
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777,
            0o700
        );
        assert_eq!(
            exchange(&path, b"{\"command\":\"status\"}\n").await,
            "{\"ok\":\"pong\"}\n"
        );
        // Malformed JSON, an unknown command, binary garbage: an error each, same connection.
        let out = exchange(
            &path,
            b"{\n{\"command\":\"nope\"}\n\xff\xfe\n{\"command\":\"status\"}",
        )
        .await;
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        for l in &lines[..3] {
            assert!(l.starts_with("{\"error\":\"malformed request"), "{l}");
        }
        assert_eq!(lines[3], "{\"ok\":\"pong\"}");
        // An oversized line: an error, then the connection is closed.
        let mut big = vec![b'x'; MAX_LINE + 10];
        big.push(b'\n');
        let out = exchange(&path, &big).await;
        assert!(
            out.contains("longer than") && out.lines().count() == 1,
            "{out}"
        );
        // Still serving.
        assert_eq!(
            exchange(&path, b"{\"command\":\"status\"}\n").await,
            "{\"ok\":\"pong\"}\n"
        );
        task.abort();
        let _ = task.await;
        // The socket file goes with the server.
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }

    #[tokio::test]
    async fn idle_clients_are_timed_out_and_never_make_others_wait() {
        let timeout = Duration::from_millis(300);
        let (path, task) = server(2, timeout).await;
        // Two clients that send nothing take both places ...
        let mut idle1 = UnixStream::connect(&path).await.unwrap();
        let mut idle2 = UnixStream::connect(&path).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let start = Instant::now();
        // ... a third is served at once, in the place of the oldest.
        let out = exchange(&path, b"{\"command\":\"status\"}\n").await;
        assert_eq!(out, "{\"ok\":\"pong\"}\n");
        assert!(start.elapsed() < timeout / 2, "{:?}", start.elapsed());
        let mut said = String::new();
        idle1.read_to_string(&mut said).await.unwrap();
        assert_eq!(said, "", "the oldest idle client is closed without a word");
        // The other is timed out as before.
        idle2.read_to_string(&mut said).await.unwrap();
        assert!(said.contains("no complete request"), "{said}");
        task.abort();
        let _ = task.await;
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }

    #[tokio::test]
    async fn a_live_socket_is_not_taken_over_and_a_stale_one_is_replaced() {
        let (path, task) = server(2, Duration::from_secs(5)).await;
        let e = bind(&path).err().expect("bound over a live socket");
        assert!(
            format!("{e:#}").contains("another ws-guard daemon answers"),
            "{e:#}"
        );
        task.abort();
        let _ = task.await;
        // A socket file nobody listens on (a crashed daemon's).
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        assert!(path.exists());
        let again = bind(&path).unwrap();
        drop(again);
        // Not a socket: refused, left alone.
        std::fs::write(&path, "x").unwrap();
        assert!(format!("{:#}", bind(&path).err().unwrap()).contains("not a socket"));
        assert!(path.exists());
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }
}
