//! `cargo xtask bench`: ws-guard's benchmarks. The measuring code lives here, in the test
//! crate's library, so the `wsg-bench` binary (what xtask runs) and the smoke test
//! (tests/bench_smoke.rs, part of every `cargo xtask test`) run the very same code.
//!
//! - [`layer1`]: nanoseconds per packet of the XDP program, BPF_PROG_TEST_RUN, against an empty
//!   program measured the same way.
//! - [`layer2`]: packets per second under SYN floods through a veth pair, against no filter,
//!   the empty program, XDP_DROP of everything, the iptables recipe, iptables with hashlimit
//!   and nftables; CPU time per packet; legitimate clients connecting during the floods.
//! - [`report`]: the Markdown table, the JSON file and the PNG charts.

pub mod bpf;
pub mod layer1;
pub mod layer2;
pub mod report;

use std::process::Command;

/// The machine the figures come from.
#[derive(Clone, Debug, Default)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory_gib: f64,
    /// `git describe`-like: the commit, `-dirty` when the tree had changes.
    pub commit: String,
    /// UTC, ISO 8601.
    pub date: String,
}

impl Machine {
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        let out = |cmd: &mut Command| {
            cmd.output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        };
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let commit = out(Command::new("git").args(["-C", root, "rev-parse", "--short=12", "HEAD"]))
            .map(|c| {
                let dirty = out(Command::new("git").args(["-C", root, "status", "--porcelain"]))
                    .map(|s| !s.is_empty())
                    .unwrap_or(false);
                if dirty { format!("{c}-dirty") } else { c }
            })
            .unwrap_or_else(|| "unknown".into());
        let date = out(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]))
            .unwrap_or_else(|| "unknown".into());
        Self {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu_model,
            kernel,
            memory_gib: mem_kib / (1024.0 * 1024.0),
            commit,
            date,
        }
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        anyhow::bail!("pinning to CPU {cpu}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
