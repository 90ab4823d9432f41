//! ws-guard's userspace: configuration, loading and attaching the kernel programs, keeping the
//! accounting in step with the kernel's sockets, and the daemon around them.

pub mod bans;
pub mod cli;
pub mod config;
pub mod config_reference;
pub mod control;
pub mod cookies;
pub mod cpu;
pub mod daemon;
pub mod ebpf_object;
pub mod events;
pub mod guard;
pub mod interfaces;
pub mod lists;
pub mod logging;
pub mod metrics;
pub mod netns;
pub mod pin;
pub mod pinned;
pub mod rawmap;
pub mod slots;
pub mod state;
pub mod sweep;
pub mod view;
