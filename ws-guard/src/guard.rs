//! Loading the kernel programs, attaching them, and reading and writing their maps.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions, TracePoint, Xdp, XdpMode, xdp::XdpLinkId},
};
use log::{info, warn};
use ws_guard_common::{
    maps::{
        CONTROL_DONE, ControlOp, Counter, FlowKey, FlowValue, GlobalConfig, PortConfig, SourceKey,
    },
    names, tracepoint as tp,
};

use crate::config::{self, Config};

/// The kernel object, built by build.rs from the ws-guard-ebpf crate.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ws-guard-ebpf"));

/// What [`Guard::load`] needs before the maps exist.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Capacity of the per-source maps.
    pub sources: u32,
    /// Capacity of the per-connection maps.
    pub flows: u32,
    /// aya-log level compiled into the programs' checks (0 = off ... 5 = trace).
    pub kernel_log_level: u8,
}

impl Default for LoadOptions {
    fn default() -> Self {
        let c = config::Capacity::default();
        Self {
            sources: c.sources,
            flows: c.flows,
            kernel_log_level: 2,
        }
    }
}

impl LoadOptions {
    /// The options a configuration asks for.
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            sources: cfg.capacity.sources,
            flows: cfg.capacity.flows,
            kernel_log_level: cfg.kernel_log_level(),
        }
    }
}

/// One interface the XDP program is attached to.
#[derive(Debug)]
pub struct Attachment {
    pub interface: String,
    /// "native" or "generic".
    pub mode: &'static str,
    link: XdpLinkId,
}

/// The loaded programs and their maps. Dropping it detaches everything.
pub struct Guard {
    ebpf: Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    attachments: Vec<Attachment>,
    tracepoint_attached: bool,
}

/// Decision counters summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub BTreeMap<&'static str, u64>);

impl Counters {
    /// The value of one counter.
    pub fn get(&self, c: Counter) -> u64 {
        self.0.get(c.name()).copied().unwrap_or(0)
    }
}

impl Guard {
    /// Loads the programs into the kernel (verifier included) without attaching anything.
    pub fn load(opts: &LoadOptions) -> anyhow::Result<Self> {
        raise_memlock_limit();
        let level = opts.kernel_log_level;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::MAP_CONNS, opts.sources)
            .map_max_entries(names::MAP_RATE, opts.sources)
            .map_max_entries(names::MAP_PENDING, opts.flows)
            .map_max_entries(names::MAP_OWNED, opts.flows)
            // Levels above this are removed by the verifier as dead code.
            .override_global("AYA_LOG_LEVEL", &level, false)
            .load(OBJECT)
            .context("loading the ws-guard eBPF object (needs root or CAP_BPF + CAP_NET_ADMIN)")?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            // The object has no log map when every log statement was compiled out.
            Err(e) => {
                log::debug!("kernel logging unavailable: {e}");
                None
            }
        };
        for name in [names::PROG_XDP, names::PROG_CONTROL] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("the verifier refused program {name}"))?;
        }
        let tp: &mut TracePoint = ebpf
            .program_mut(names::PROG_SOCK_STATE)
            .ok_or_else(|| anyhow!("program {} missing from the object", names::PROG_SOCK_STATE))?
            .try_into()?;
        tp.load()
            .with_context(|| format!("the verifier refused program {}", names::PROG_SOCK_STATE))?;
        Ok(Self {
            ebpf,
            logger,
            attachments: Vec::new(),
            tracepoint_attached: false,
        })
    }

    /// Writes the configuration's limits and settings into the maps. Ports not in `cfg` stop
    /// being protected; tracked connections are left alone.
    pub fn apply(&mut self, cfg: &Config) -> anyhow::Result<()> {
        self.set_global(cfg.global())?;
        let wanted: BTreeMap<u16, PortConfig> = cfg
            .ports
            .iter()
            .map(|p| (p.port as u16, p.to_kernel()))
            .collect();
        for (port, old) in self.ports()? {
            if !wanted.contains_key(&port) && old.enabled != 0 {
                self.set_port(port, PortConfig::default())?;
            }
        }
        for (port, limits) in wanted {
            self.set_port(port, limits)?;
        }
        Ok(())
    }

    /// Sets the global settings; the next packet sees them.
    pub fn set_global(&mut self, g: GlobalConfig) -> anyhow::Result<()> {
        let mut m: Array<&mut MapData, GlobalConfig> = self.map_mut(names::MAP_GLOBAL)?;
        m.set(0, g, 0).context("writing global settings")?;
        Ok(())
    }

    /// The global settings in force.
    pub fn global(&self) -> anyhow::Result<GlobalConfig> {
        let m: Array<&MapData, GlobalConfig> = self.map(names::MAP_GLOBAL)?;
        Ok(m.get(&0, 0)?)
    }

    /// Sets the limits of one port; the next packet sees them. `PortConfig::default()` stops
    /// protecting it.
    pub fn set_port(&mut self, port: u16, limits: PortConfig) -> anyhow::Result<()> {
        let mut m: Array<&mut MapData, PortConfig> = self.map_mut(names::MAP_PORTS)?;
        m.set(port as u32, limits, 0)
            .with_context(|| format!("writing the limits of port {port}"))?;
        Ok(())
    }

    /// Every protected port and its limits.
    pub fn ports(&self) -> anyhow::Result<Vec<(u16, PortConfig)>> {
        let m: Array<&MapData, PortConfig> = self.map(names::MAP_PORTS)?;
        let mut out = Vec::new();
        for (i, v) in m.iter().enumerate() {
            let v = v?;
            if v.enabled != 0 {
                out.push((i as u16, v));
            }
        }
        Ok(out)
    }

    /// Checks the tracepoint's record layout against tracefs, then attaches it.
    pub fn attach_tracepoint(&mut self) -> anyhow::Result<()> {
        check_tracepoint_format()?;
        let tp: &mut TracePoint = self
            .ebpf
            .program_mut(names::PROG_SOCK_STATE)
            .ok_or_else(|| anyhow!("tracepoint program missing"))?
            .try_into()?;
        tp.attach("sock", "inet_sock_set_state")
            .context("attaching to the sock:inet_sock_set_state tracepoint")?;
        self.tracepoint_attached = true;
        Ok(())
    }

    /// Attaches the XDP program to `interface`. `Auto` tries native mode, then generic with a
    /// warning.
    pub fn attach_xdp(
        &mut self,
        interface: &str,
        mode: config::XdpMode,
    ) -> anyhow::Result<&'static str> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(names::PROG_XDP)
            .ok_or_else(|| anyhow!("XDP program missing"))?
            .try_into()?;
        let (link, mode_name) = match mode {
            config::XdpMode::Native => (
                prog.attach(interface, XdpMode::Driver)
                    .with_context(|| format!("attaching to {interface} in native mode"))?,
                "native",
            ),
            config::XdpMode::Generic => (
                prog.attach(interface, XdpMode::Skb)
                    .with_context(|| format!("attaching to {interface} in generic mode"))?,
                "generic",
            ),
            config::XdpMode::Auto => match prog.attach(interface, XdpMode::Driver) {
                Ok(link) => (link, "native"),
                Err(native_err) => {
                    let link = prog.attach(interface, XdpMode::Skb).with_context(|| {
                        format!("attaching to {interface}: native mode failed ({native_err}), and generic mode")
                    })?;
                    warn!(
                        "{interface}: native XDP unavailable ({native_err}); attached in generic mode, \
                         which runs later in the stack and costs more per packet"
                    );
                    (link, "generic")
                }
            },
        };
        info!("attached to {interface} ({mode_name} XDP)");
        self.attachments.push(Attachment {
            interface: interface.to_owned(),
            mode: mode_name,
            link,
        });
        Ok(mode_name)
    }

    /// Detaches the XDP program from every interface.
    pub fn detach_all(&mut self) -> anyhow::Result<()> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(names::PROG_XDP)
            .ok_or_else(|| anyhow!("XDP program missing"))?
            .try_into()?;
        for a in self.attachments.drain(..) {
            prog.detach(a.link)
                .with_context(|| format!("detaching from {}", a.interface))?;
            info!("detached from {}", a.interface);
        }
        Ok(())
    }

    /// Where the XDP program is attached.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Decision counters, summed over CPUs.
    pub fn counters(&self) -> anyhow::Result<Counters> {
        let m: PerCpuArray<&MapData, u64> = self.map(names::MAP_STATS)?;
        let mut out = BTreeMap::new();
        for c in Counter::ALL {
            let per_cpu = m.get(&(c as u32), 0)?;
            out.insert(c.name(), per_cpu.iter().sum());
        }
        Ok(Counters(out))
    }

    /// Live connections per source key (half-open included); zero entries left out.
    pub fn connections(&self) -> anyhow::Result<BTreeMap<SourceKey, u32>> {
        let m: HashMap<&MapData, SourceKey, u32> = self.map(names::MAP_CONNS)?;
        let mut out = BTreeMap::new();
        for kv in m.iter() {
            let (k, v) = kv?;
            if v != 0 {
                out.insert(k, v);
            }
        }
        Ok(out)
    }

    /// Source keys whose counter is zero (kept by the kernel, reclaimed by the sweep).
    pub fn idle_sources(&self) -> anyhow::Result<Vec<SourceKey>> {
        let m: HashMap<&MapData, SourceKey, u32> = self.map(names::MAP_CONNS)?;
        let mut out = Vec::new();
        for kv in m.iter() {
            let (k, v) = kv?;
            if v == 0 {
                out.push(k);
            }
        }
        Ok(out)
    }

    /// Removes a zero counter. The kernel recreates it on the source's next attempt.
    pub fn remove_idle_source(&mut self, key: &SourceKey) -> anyhow::Result<()> {
        let mut m: HashMap<&mut MapData, SourceKey, u32> = self.map_mut(names::MAP_CONNS)?;
        if m.get(key, 0).ok() == Some(0) {
            let _ = m.remove(key);
        }
        Ok(())
    }

    /// Half-open attempts the programs track.
    pub fn pending(&self) -> anyhow::Result<Vec<(FlowKey, FlowValue)>> {
        self.flows(names::MAP_PENDING)
    }

    /// Established connections the programs track.
    pub fn owned(&self) -> anyhow::Result<Vec<(FlowKey, FlowValue)>> {
        self.flows(names::MAP_OWNED)
    }

    fn flows(&self, name: &str) -> anyhow::Result<Vec<(FlowKey, FlowValue)>> {
        let m: HashMap<&MapData, FlowKey, FlowValue> = self.map(name)?;
        m.iter().map(|kv| kv.map_err(Into::into)).collect()
    }

    /// Runs one accounting request in the kernel; true if it changed anything.
    pub fn control(&mut self, op: ControlOp) -> anyhow::Result<bool> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(names::PROG_CONTROL)
            .ok_or_else(|| anyhow!("control program missing"))?
            .try_into()?;
        // SAFETY: ControlOp is plain `#[repr(C)]` data without padding.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&op as *const ControlOp).cast::<u8>(),
                std::mem::size_of::<ControlOp>(),
            )
        };
        let mut out = [0u8; std::mem::size_of::<ControlOp>()];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(bytes);
        opts.data_out = Some(&mut out);
        let r = prog.test_run(opts).context("running the control program")?;
        Ok(r.return_value == CONTROL_DONE)
    }

    /// The XDP program, e.g. for BPF_PROG_TEST_RUN.
    pub fn xdp_program(&mut self) -> anyhow::Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(names::PROG_XDP)
            .ok_or_else(|| anyhow!("XDP program missing"))?
            .try_into()?)
    }

    /// Runs the XDP program once on `frame`; returns its verdict and the frame as it left.
    pub fn run_xdp(&mut self, frame: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        let prog = self.xdp_program()?;
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        let r = prog
            .test_run(opts)
            .context("BPF_PROG_TEST_RUN of the XDP program")?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    /// Names of the maps in the loaded object (for checking them against `names`).
    pub fn map_names(&self) -> Vec<String> {
        self.ebpf.maps().map(|(n, _)| n.to_owned()).collect()
    }

    /// Names of the programs in the loaded object.
    pub fn program_names(&self) -> Vec<String> {
        self.ebpf.programs().map(|(n, _)| n.to_owned()).collect()
    }

    /// Forwards what the kernel programs logged.
    pub fn flush_kernel_log(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }

    fn map<'a, T>(&'a self, name: &str) -> anyhow::Result<T>
    where
        T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
    {
        let m = self
            .ebpf
            .map(name)
            .ok_or_else(|| anyhow!("map {name} missing from the object"))?;
        T::try_from(m).with_context(|| format!("map {name} has an unexpected type"))
    }

    fn map_mut<'a, T>(&'a mut self, name: &str) -> anyhow::Result<T>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        let m = self
            .ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the object"))?;
        T::try_from(m).with_context(|| format!("map {name} has an unexpected type"))
    }
}

/// Kernels before 5.11 charge map memory to RLIMIT_MEMLOCK; harmless where they do not.
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Verifies that `sock:inet_sock_set_state` has the fields at the offsets the program reads, so
/// a kernel with another layout is refused with a clear error instead of miscounting.
pub fn check_tracepoint_format() -> anyhow::Result<()> {
    let rel = "events/sock/inet_sock_set_state/format";
    if !TRACEFS.iter().any(|d| Path::new(d).join("events").exists()) {
        mount_tracefs();
    }
    let text = TRACEFS
        .iter()
        .find_map(|d| std::fs::read_to_string(Path::new(d).join(rel)).ok())
        .ok_or_else(|| {
            anyhow!(
                "cannot read the sock:inet_sock_set_state format from tracefs; mount it with \
                 `mount -t tracefs nodev /sys/kernel/tracing`"
            )
        })?;
    check_format_text(&text)
}

/// Mounts tracefs where it is missing (e.g. in a fresh mount namespace such as `ip netns exec`
/// makes); failure is reported by the caller, which cannot find the format then.
fn mount_tracefs() {
    let target = c"/sys/kernel/tracing";
    // SAFETY: valid C strings; mount(2) has no memory-safety preconditions.
    let rc = unsafe {
        libc::mount(
            c"tracefs".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        info!("mounted tracefs at /sys/kernel/tracing");
    } else {
        log::debug!("mounting tracefs: {}", std::io::Error::last_os_error());
    }
}

/// The check of [`check_tracepoint_format`] on the format file's text.
pub fn check_format_text(text: &str) -> anyhow::Result<()> {
    for (name, offset, size) in tp::FIELDS {
        let line = text
            .lines()
            .find(|l| {
                l.split(';')
                    .next()
                    .and_then(|decl| decl.split_whitespace().last())
                    .map(|n| n.split('[').next() == Some(name))
                    .unwrap_or(false)
            })
            .ok_or_else(|| {
                anyhow!("inet_sock_set_state has no field {name}; this kernel is not supported")
            })?;
        let want = format!("offset:{offset};\tsize:{size};");
        if !line.replace(' ', "\t").contains(&want) {
            bail!(
                "inet_sock_set_state field {name} is not at offset {offset} size {size} on this \
                 kernel ({}); this kernel is not supported",
                line.trim()
            );
        }
    }
    Ok(())
}
