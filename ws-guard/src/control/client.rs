//! The CLI's side of the control socket: connect, send one request, read one response.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use thiserror::Error;

use super::protocol::{MAX_RESPONSE, Request, Response};

/// How long the client waits for the daemon's response.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Why a request got no answer, or a refusal.
#[derive(Debug, Error)]
pub enum ClientError {
    /// No daemon could be reached (exit code 3).
    #[error("{0}")]
    Unreachable(String),
    /// The daemon refused or failed the request (exit code 1).
    #[error("{0}")]
    Refused(String),
}

/// Sends `req` to the daemon at `socket`; the response's data, or why there is none.
pub fn request(socket: &Path, req: &Request) -> Result<serde_json::Value, ClientError> {
    let shown = socket.display();
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        ClientError::Unreachable(match e.kind() {
            std::io::ErrorKind::NotFound => format!(
                "cannot reach the daemon: {shown} does not exist. Is `ws-guard run` running? \
                 (`systemctl status ws-guard`); if it uses another [control] socket, pass \
                 --socket PATH"
            ),
            std::io::ErrorKind::ConnectionRefused => format!(
                "cannot reach the daemon: nothing listens on {shown} (a socket left by a \
                 daemon that is not running). Start it (`systemctl start ws-guard`) or pass \
                 the right --socket PATH"
            ),
            std::io::ErrorKind::PermissionDenied => format!(
                "cannot reach the daemon: permission denied on {shown}: only root may use \
                 the control socket; run this command as root (e.g. with sudo)"
            ),
            _ => format!("cannot reach the daemon at {shown}: {e}"),
        })
    })?;
    let io = |what: &str, e: std::io::Error| {
        ClientError::Unreachable(format!("talking to the daemon at {shown}: {what}: {e}"))
    };
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| io("setting timeouts", e))?;
    let mut line = serde_json::to_vec(req)
        .map_err(|e| ClientError::Refused(format!("encoding the request: {e}")))?;
    line.push(b'\n');
    // A daemon that refuses us (not root) closes at once: its response explains, so a failed
    // write is not the end yet.
    let written = stream.write_all(&line);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut reply = Vec::new();
    let read = BufReader::new(&stream)
        .take(MAX_RESPONSE as u64)
        .read_until(b'\n', &mut reply);
    if reply.is_empty() {
        return Err(match (written, read) {
            (Err(e), _) | (_, Err(e)) => io("no response", e),
            _ => ClientError::Unreachable(format!(
                "the daemon at {shown} closed the connection without a response"
            )),
        });
    }
    match serde_json::from_slice::<Response>(&reply) {
        Ok(Response::Ok(v)) => Ok(v),
        Ok(Response::Error(m)) => Err(ClientError::Refused(m)),
        Ok(Response::Denied(m)) => Err(ClientError::Unreachable(m)),
        Err(e) => Err(ClientError::Unreachable(format!(
            "the daemon at {shown} sent a response this client does not understand ({e}); \
             is it the same ws-guard version?"
        ))),
    }
}
