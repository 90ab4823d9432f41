//! The control socket: `ws-guard status`, `limits`, `allow`, `deny`, `bans`, `sources` and
//! `monitor` talk to the running daemon over a Unix socket only root can use.

pub mod client;
pub mod exercise;
pub mod handler;
pub mod protocol;
pub mod server;

/// The control socket's default path (`[control] socket`).
pub const DEFAULT_SOCKET: &str = crate::config::DEFAULT_CONTROL_SOCKET;
