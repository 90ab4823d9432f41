//! Shared by the ws-guard kernel programs and userspace: the `#[repr(C)]` map types and the pure
//! decision logic (packet parsing, key masking, the rate window, the RST reply). Everything here
//! is `no_std` so the eBPF program compiles exactly the code the host tests exercise.
#![no_std]

pub mod budget;
pub mod checksum;
pub mod filter;
pub mod key;
pub mod maps;
pub mod memo;
pub mod names;
pub mod parse;
pub mod policy;
pub mod rate;
pub mod reply;
pub mod rst;
pub mod syncookie;
pub mod tracepoint;

#[cfg(test)]
extern crate std;
